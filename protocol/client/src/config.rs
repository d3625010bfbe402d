//! The session's configuration: every limit and timeout of the client in one struct, with its
//! unit last and its default documented, and the reconnect backoff schedule.
//!
//! Owns no state; [`crate::ClientSession`] reads it.

use std::time::Duration;

use switchboard_protocol::Text;

/// How the client reconnects after losing a connection.
///
/// The delay before attempt `n` (0-based, counted since the last successful handshake) is
/// `base = min(max, initial × 2ⁿ)`, then jittered uniformly into `[base / 2, base]` so a fleet
/// of gateways that lost the same engine does not reconnect in lock step. The jitter comes from
/// a seeded generator ([`ClientConfig::seed`]): a failing schedule can be replayed exactly.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ReconnectPolicy {
    /// Delay before the first reconnect attempt (default 100 ms).
    pub initial: Duration,
    /// Largest delay between attempts (default 10 s).
    pub max: Duration,
    /// Consecutive failed attempts after which the client gives up and closes for good
    /// (`None`, the default: never give up).
    pub attempts_max: Option<u32>,
}

impl Default for ReconnectPolicy {
    fn default() -> Self {
        ReconnectPolicy { initial: Duration::from_millis(100), max: Duration::from_secs(10), attempts_max: None }
    }
}

impl ReconnectPolicy {
    /// The delay before attempt `attempt` (0-based), with `random` as the jitter source.
    ///
    /// ```
    /// # use std::time::Duration;
    /// # use switchboard_client::ReconnectPolicy;
    /// let policy = ReconnectPolicy { initial: Duration::from_millis(100), max: Duration::from_secs(1), attempts_max: None };
    /// assert_eq!(policy.delay(0, 0), Duration::from_millis(50)); // lowest jitter: half the base
    /// assert!(policy.delay(3, u64::MAX) <= Duration::from_millis(800));
    /// assert!(policy.delay(30, u64::MAX) <= Duration::from_secs(1)); // capped
    /// ```
    pub fn delay(&self, attempt: u32, random: u64) -> Duration {
        // 2^20 × initial exceeds any sane max; capping the exponent keeps the multiply in range.
        let factor = 1u32 << attempt.min(20);
        let base = self.initial.checked_mul(factor).unwrap_or(self.max).min(self.max);
        let half = base / 2;
        let spread_ns = u64::try_from(base.saturating_sub(half).as_nanos()).unwrap_or(u64::MAX);
        let jitter_ns = if spread_ns == u64::MAX { random } else { random % (spread_ns + 1) };
        half + Duration::from_nanos(jitter_ns)
    }
}

/// Everything [`crate::ClientSession`] needs to know; the drivers build it from their options.
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// Auth token sent in HELLO (a JWT; empty when the server runs without auth).
    pub token: Text,
    /// Name and version sent in HELLO, for the server's logs.
    pub client_name: Text,
    /// Feature bits requested in HELLO (none are defined in protocol version 1).
    pub features: u32,
    /// Send a PING when nothing was sent for this long (default 10 s). The server's WELCOME
    /// can only shorten it: the client pings at least twice per `keepalive_ms` it announces.
    pub keepalive: Duration,
    /// Close the connection and reconnect when nothing arrived for this long (default `None`:
    /// twice the effective keepalive). Not enforced while the application holds reading back
    /// ([`crate::ClientSession::set_receive_paused`]): that silence is the client's own doing.
    pub idle_timeout: Option<Duration>,
    /// Longest wait for WELCOME after the transport is up (default 5 s).
    pub handshake_timeout: Duration,
    /// Longest wait for a request's answer, counted from the call (default 10 s), across
    /// reconnects: a publish still unacknowledged after this fails with
    /// [`crate::ClientError::Timeout`] and is no longer re-sent.
    pub request_timeout: Duration,
    /// The reconnect schedule.
    pub reconnect: ReconnectPolicy,
    /// Whether a failure before the first successful handshake is retried with the reconnect
    /// schedule (default false: the first connect reports its error, so a typo in the address
    /// or a refused token surfaces at once).
    pub retry_initial_connect: bool,
    /// Publishes that may wait for their PUBACK at once (default 1024). They are kept, re-sent
    /// after a reconnect with the same `client_msg_id`, and count against this limit until
    /// acknowledged; one more fails with [`crate::ClientError::InflightFull`].
    pub inflight_publishes_max: usize,
    /// Other requests (subscribe, unsubscribe, conversation, agent, ticket…) that may wait for
    /// an answer at once (default 1024).
    pub requests_pending_max: usize,
    /// Subscriptions this client holds at most (default 1024); the server's WELCOME may lower it.
    pub subscriptions_max: usize,
    /// Largest frame body the client accepts from the server, in bytes (default: the
    /// protocol's maximum, 1 MiB).
    pub frame_body_bytes_max: u32,
    /// Seeds the reconnect jitter and the base of auto-assigned `client_msg_id`s. Two clients
    /// that publish to the same session must use different seeds, or their auto-assigned ids
    /// collide and the server takes the second message for a repeat of the first; the drivers
    /// draw a random seed unless one is given.
    pub seed: u64,
}

impl Default for ClientConfig {
    fn default() -> Self {
        ClientConfig {
            token: Text::new(),
            client_name: Text::from_static(concat!("switchboard-client/", env!("CARGO_PKG_VERSION"))),
            features: 0,
            keepalive: Duration::from_secs(10),
            idle_timeout: None,
            handshake_timeout: Duration::from_secs(5),
            request_timeout: Duration::from_secs(10),
            reconnect: ReconnectPolicy::default(),
            retry_initial_connect: false,
            inflight_publishes_max: 1024,
            requests_pending_max: 1024,
            subscriptions_max: 1024,
            frame_body_bytes_max: switchboard_protocol::limits::FRAME_BODY_BYTES_MAX,
            seed: 0x5eed_5b0a_4d00_0001,
        }
    }
}

/// `SplitMix64`: a tiny, well-mixed generator; enough for jitter and id bases, and replayable.
pub(crate) fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}
