//! Per (subscriber, session) delivery accounting, sans-IO.
//!
//! Every session's publisher numbers its messages 0, 1, 2, … Each subscription of that session
//! (one per subscriber, each on its own gateway connection) is a [`Stream`] that should see every
//! number exactly once, in order. A stream keeps a bitmap of the numbers it has seen (1 bit per
//! published message: 100 000 publishes/s for a minute on 3 subscribers is about 2 MiB), so the
//! counts are exact:
//! - **duplicated**: a number seen again;
//! - **reordered**: a first arrival of a number lower than one already seen (it came late);
//!   swapping two messages counts 1;
//! - **lost**: numbers published but never seen, decided at the end with the publisher's count;
//! - **unexpected**: numbers the publisher never sent (or a session this gateway did not
//!   subscribe, or a malformed payload: counted by the caller).

use serde::{Deserialize, Serialize};

/// Sequence numbers at or above this are treated as corrupt (they would need a huge bitmap).
pub const MAX_SEQ: u64 = 1 << 32;

/// What one arrival was.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Arrival {
    /// First arrival, and no higher number was seen before it.
    InOrder,
    /// First arrival, but a higher number was already seen.
    Reordered,
    /// Seen before.
    Duplicate,
    /// Sequence number out of range ([`MAX_SEQ`]).
    Corrupt,
}

/// The order state of one (subscriber, session) stream.
#[derive(Debug, Default, Clone)]
pub struct Stream {
    bits: Vec<u64>,
    /// One more than the highest number seen (0 = nothing seen).
    high: u64,
    distinct: u64,
    received: u64,
    duplicated: u64,
    reordered: u64,
    corrupt: u64,
}

impl Stream {
    /// Account for the arrival of message number `seq`.
    pub fn record(&mut self, seq: u64) -> Arrival {
        self.received += 1;
        if seq >= MAX_SEQ {
            self.corrupt += 1;
            return Arrival::Corrupt;
        }
        let word = (seq / 64) as usize;
        let bit = 1u64 << (seq % 64);
        if word >= self.bits.len() {
            let grown = (self.bits.len() + self.bits.len() / 2).max(word + 1);
            self.bits.resize(grown, 0);
        }
        if self.bits[word] & bit != 0 {
            self.duplicated += 1;
            return Arrival::Duplicate;
        }
        self.bits[word] |= bit;
        self.distinct += 1;
        if seq < self.high {
            self.reordered += 1;
            Arrival::Reordered
        } else {
            self.high = seq + 1;
            Arrival::InOrder
        }
    }

    /// How many distinct numbers below `n` were seen.
    fn distinct_below(&self, n: u64) -> u64 {
        if self.high <= n {
            return self.distinct;
        }
        let full = (n / 64) as usize;
        let mut count: u64 = self.bits[..full.min(self.bits.len())]
            .iter()
            .map(|w| u64::from(w.count_ones()))
            .sum();
        let rem = n % 64;
        if rem > 0 && full < self.bits.len() {
            count += u64::from((self.bits[full] & ((1u64 << rem) - 1)).count_ones());
        }
        count
    }

    /// The final tally, given how many messages the session's publisher sent.
    pub fn tally(&self, published: u64) -> Tally {
        let below = self.distinct_below(published);
        Tally {
            expected: published,
            received: self.received,
            unique: below,
            lost: published - below,
            duplicated: self.duplicated,
            reordered: self.reordered,
            unexpected: (self.distinct - below) + self.corrupt,
        }
    }
}

/// Delivery counts, for one stream or summed over many.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Tally {
    /// Deliveries that should have happened (publishes × subscribers).
    pub expected: u64,
    /// Deliveries that arrived, duplicates included.
    pub received: u64,
    /// Distinct expected messages that arrived.
    pub unique: u64,
    /// Expected deliveries that never arrived.
    pub lost: u64,
    /// Arrivals of a message already seen on the same subscription.
    pub duplicated: u64,
    /// First arrivals that came after a later message of the same session.
    pub reordered: u64,
    /// Arrivals that match nothing published to this subscription (corrupt, wrong session, …).
    pub unexpected: u64,
}

impl Tally {
    /// Add `other` into `self`.
    pub fn add(&mut self, other: &Tally) {
        self.expected += other.expected;
        self.received += other.received;
        self.unique += other.unique;
        self.lost += other.lost;
        self.duplicated += other.duplicated;
        self.reordered += other.reordered;
        self.unexpected += other.unexpected;
    }

    /// True when nothing was lost, duplicated, reordered or unexpected.
    pub fn clean(&self) -> bool {
        self.lost == 0 && self.duplicated == 0 && self.reordered == 0 && self.unexpected == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(seqs: &[u64], published: u64) -> Tally {
        let mut s = Stream::default();
        for &q in seqs {
            s.record(q);
        }
        s.tally(published)
    }

    #[test]
    fn clean_stream() {
        let t = run(&(0..1000).collect::<Vec<_>>(), 1000);
        assert_eq!(t, Tally { expected: 1000, received: 1000, unique: 1000, ..Tally::default() });
        assert!(t.clean());
    }

    #[test]
    fn losses_including_the_tail() {
        let seqs: Vec<u64> = (0..100).filter(|q| q % 10 != 3).collect();
        let t = run(&seqs, 102);
        assert_eq!(t.lost, 10 + 2);
        assert_eq!((t.duplicated, t.reordered, t.unexpected), (0, 0, 0));
    }

    #[test]
    fn duplicates() {
        let t = run(&[0, 1, 1, 2, 2, 2, 0, 3], 4);
        assert_eq!(t.duplicated, 4);
        assert_eq!(t.lost, 0);
        assert_eq!(t.reordered, 0, "a duplicate of an old message is not a reorder");
        assert_eq!(t.received, 8);
    }

    #[test]
    fn swaps_count_once_each() {
        let t = run(&[1, 0, 2, 4, 3, 5, 6, 8, 7], 9);
        assert_eq!(t.reordered, 3);
        assert_eq!((t.lost, t.duplicated), (0, 0));
    }

    #[test]
    fn late_arrival_after_many() {
        let t = run(&[1, 2, 3, 4, 0], 5);
        assert_eq!(t.reordered, 1);
    }

    #[test]
    fn unexpected_and_corrupt() {
        let t = run(&[0, 1, 5, MAX_SEQ + 3], 2);
        assert_eq!(t.unexpected, 2);
        assert_eq!(t.lost, 0);
        assert_eq!(t.unique, 2);
    }

    #[test]
    fn distinct_below_across_words() {
        let seqs: Vec<u64> = (0..300).filter(|q| q % 7 != 0).collect();
        let mut s = Stream::default();
        for &q in &seqs {
            s.record(q);
        }
        for n in [0, 1, 63, 64, 65, 128, 200, 299, 300] {
            let want = (0..n).filter(|q| q % 7 != 0).count() as u64;
            assert_eq!(s.distinct_below(n), want, "n={n}");
        }
    }

    #[test]
    fn tally_add() {
        let mut a = run(&[0, 0, 2], 3);
        a.add(&run(&[1, 0], 2));
        assert_eq!(a.expected, 5);
        assert_eq!(a.lost, 1);
        assert_eq!(a.duplicated, 1);
        assert_eq!(a.reordered, 1);
    }
}
