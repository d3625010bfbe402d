//! Token buckets for the per-connection and per-tenant rate limits.
//!
//! Owns the arithmetic only: no clock (`now_us` is an argument), no I/O, no knowledge of what is
//! limited. The connection reader holds its connection's buckets; the shard holds its share of
//! each tenant's (see `config::RateLimitsConfig`).

use crate::config::RateLimitsConfig;

/// One bucket: refilled at `rate_per_s`, holding at most `burst` tokens. A rate of 0 is no limit.
#[derive(Debug, Clone, Copy)]
pub struct TokenBucket {
    rate_per_s: u64,
    /// Capacity, in micro-tokens (tokens × 10⁶), so that refill needs no division remainder.
    capacity_micro: u64,
    tokens_micro: u64,
    last_us: u64,
}

impl TokenBucket {
    /// A full bucket of `burst_ms` worth of `rate_per_s` (at least one token).
    pub fn new(rate_per_s: u64, burst_ms: u64, now_us: u64) -> TokenBucket {
        let burst_tokens = (u128::from(rate_per_s) * u128::from(burst_ms) / 1_000).max(1);
        let capacity_micro = u64::try_from(burst_tokens * 1_000_000).unwrap_or(u64::MAX);
        TokenBucket { rate_per_s, capacity_micro, tokens_micro: capacity_micro, last_us: now_us }
    }

    /// True when this bucket limits nothing.
    pub fn is_unlimited(&self) -> bool {
        self.rate_per_s == 0
    }

    fn refill(&mut self, now_us: u64) {
        let elapsed_us = now_us.saturating_sub(self.last_us);
        self.last_us = self.last_us.max(now_us);
        // rate tokens/s × elapsed µs = rate × elapsed micro-tokens.
        let added = self.rate_per_s.saturating_mul(elapsed_us);
        self.tokens_micro = self.tokens_micro.saturating_add(added).min(self.capacity_micro);
    }

    /// Whether `tokens` are available now (nothing is taken).
    pub fn has(&mut self, tokens: u64, now_us: u64) -> bool {
        if self.is_unlimited() {
            return true;
        }
        self.refill(now_us);
        // A request larger than the whole bucket passes once the bucket is full, so that a
        // single large message is slowed down, never refused forever.
        let need = tokens.saturating_mul(1_000_000).min(self.capacity_micro);
        self.tokens_micro >= need
    }

    /// Takes `tokens` (call after [`TokenBucket::has`] said yes; saturates at empty).
    pub fn take(&mut self, tokens: u64) {
        if !self.is_unlimited() {
            self.tokens_micro = self.tokens_micro.saturating_sub(tokens.saturating_mul(1_000_000));
        }
    }
}

/// What a rate limit is about, for the ERROR message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Limited {
    /// PUBLISH frames.
    Publishes,
    /// PUBLISH payload bytes.
    PublishBytes,
    /// `OPEN_CONVERSATION` frames.
    Opens,
    /// SUBSCRIBE frames.
    Subscribes,
    /// READ_CURSOR and TYPING frames (each may be pushed to every subscriber, and a read
    /// cursor journaled).
    Signals,
}

/// The buckets of one connection, or one shard's share of one tenant's.
#[derive(Debug, Clone, Copy)]
pub struct RateBuckets {
    publishes: TokenBucket,
    publish_bytes: TokenBucket,
    opens: TokenBucket,
    subscribes: TokenBucket,
    signals: TokenBucket,
}

impl RateBuckets {
    /// A connection's buckets.
    pub fn for_connection(config: &RateLimitsConfig, now_us: u64) -> RateBuckets {
        let bucket = |rate| TokenBucket::new(rate, config.burst_ms, now_us);
        RateBuckets {
            publishes: bucket(config.connection_publishes_per_s),
            publish_bytes: bucket(config.connection_publish_bytes_per_s),
            opens: bucket(config.connection_opens_per_s),
            subscribes: bucket(config.connection_subscribes_per_s),
            signals: bucket(config.connection_signals_per_s),
        }
    }

    /// One shard's share (`1 / shards`, at least 1 per second when limited) of a tenant's.
    pub fn for_tenant_share(config: &RateLimitsConfig, shards: usize, now_us: u64) -> RateBuckets {
        let share = |rate: u64| if rate == 0 { 0 } else { (rate / shards.max(1) as u64).max(1) };
        let bucket = |rate| TokenBucket::new(share(rate), config.burst_ms, now_us);
        RateBuckets {
            publishes: bucket(config.tenant_publishes_per_s),
            publish_bytes: bucket(config.tenant_publish_bytes_per_s),
            opens: bucket(config.tenant_opens_per_s),
            subscribes: bucket(config.tenant_subscribes_per_s),
            signals: bucket(config.tenant_signals_per_s),
        }
    }

    /// True when no bucket limits anything (the default configuration).
    pub fn is_unlimited(&self) -> bool {
        [self.publishes, self.publish_bytes, self.opens, self.subscribes, self.signals].iter().all(TokenBucket::is_unlimited)
    }

    /// Checks a request of kind `what` (`bytes` counts for a PUBLISH only): `Err` names the
    /// bucket that is empty; nothing is taken.
    pub fn check(&mut self, what: Limited, bytes: u64, now_us: u64) -> Result<(), Limited> {
        let has = |bucket: &mut TokenBucket, tokens: u64, limited: Limited| if bucket.has(tokens, now_us) { Ok(()) } else { Err(limited) };
        match what {
            Limited::Publishes | Limited::PublishBytes => {
                has(&mut self.publishes, 1, Limited::Publishes)?;
                has(&mut self.publish_bytes, bytes, Limited::PublishBytes)
            }
            Limited::Opens => has(&mut self.opens, 1, Limited::Opens),
            Limited::Subscribes => has(&mut self.subscribes, 1, Limited::Subscribes),
            Limited::Signals => has(&mut self.signals, 1, Limited::Signals),
        }
    }

    /// Takes a request of kind `what` (call after [`RateBuckets::check`] said yes).
    pub fn take(&mut self, what: Limited, bytes: u64) {
        match what {
            Limited::Publishes | Limited::PublishBytes => {
                self.publishes.take(1);
                self.publish_bytes.take(bytes);
            }
            Limited::Opens => self.opens.take(1),
            Limited::Subscribes => self.subscribes.take(1),
            Limited::Signals => self.signals.take(1),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bucket_allows_its_burst_then_its_rate() {
        let mut bucket = TokenBucket::new(10, 1_000, 0);
        for _ in 0..10 {
            assert!(bucket.has(1, 0));
            bucket.take(1);
        }
        assert!(!bucket.has(1, 0), "burst of 10 spent");
        assert!(!bucket.has(1, 99_999), "one token takes 100 ms at 10/s");
        assert!(bucket.has(1, 100_000));
        bucket.take(1);
        assert!(!bucket.has(1, 100_000));
        // Idle for long: refilled to the burst, not beyond.
        assert!(bucket.has(10, 60_000_000));
        bucket.take(10);
        assert!(!bucket.has(1, 60_000_000));
    }

    #[test]
    fn zero_is_unlimited_and_oversized_requests_pass_when_full() {
        let mut open = TokenBucket::new(0, 1_000, 0);
        assert!(open.has(u64::MAX, 0));
        let mut bytes = TokenBucket::new(100, 1_000, 0);
        assert!(bytes.has(1_000, 0), "larger than the bucket: passes when full");
        bytes.take(1_000);
        assert!(!bytes.has(1, 5_000), "and then the bucket is empty: half a token after 5 ms");
    }

    #[test]
    fn tenant_share_divides_by_shards() {
        let config = RateLimitsConfig { tenant_opens_per_s: 30, connection_opens_per_s: 0, ..RateLimitsConfig::default() };
        let mut share = RateBuckets::for_tenant_share(&config, 3, 0);
        for _ in 0..10 {
            assert!(share.check(Limited::Opens, 0, 0).is_ok());
            share.take(Limited::Opens, 0);
        }
        assert_eq!(share.check(Limited::Opens, 0, 0), Err(Limited::Opens));
        assert!(RateBuckets::for_connection(&config, 0).is_unlimited());
    }
}
