//! Publish → acknowledgement: the backend traits for servers that acknowledge each publish
//! (Switchboard's PUBACK, NATS `JetStream`'s `{"stream":..,"seq":..}` reply) and the sans-IO
//! bookkeeping of one connection's acknowledgements.
//!
//! A connection is split in two like the fan-out publishers ([`crate::backend`]): an
//! [`AckSender`] queues publishes (each gets an id the server's acknowledgement echoes: the
//! correlation id, the reply subject's suffix) and writes them on [`AckSender::flush`]; an
//! [`AckReceiver`] on another thread hands every acknowledgement it reads to a sink. Between the
//! two sits an [`AckTracker`]: the sender records `(id, intended send time)` *before* the flush
//! that writes the publish, the receiver settles ids as acknowledgements arrive. What is still
//! outstanding at the end is lost; an acknowledgement for no outstanding id (a duplicate, or an
//! id never sent) is counted as unexpected; error answers are counted with the first few texts
//! kept. Every acknowledgement names the durability the server claimed, and the claims are
//! counted per label.

use crate::backend::Poll;
use crate::latency::Latency;
use serde::{Deserialize, Serialize};
use std::collections::hash_map::Entry;
use std::collections::{BTreeMap, HashMap};
use std::io;

/// Error texts kept per connection (the count goes on).
pub const ERROR_TEXTS_MAX: usize = 5;

/// What the server said about one publish.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Answer {
    /// Stored; the label says how durably the server claims it is (`memory`, `interval`,
    /// `sync`, `jetstream-file`).
    Ok {
        /// The durability the server claimed.
        claim: &'static str,
    },
    /// Refused; the server's text.
    Err(String),
}

/// One acknowledgement read from the wire.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ack {
    /// The id the sender returned for the publish.
    pub id: u64,
    /// What the server said.
    pub answer: Answer,
}

/// A server that acknowledges publishes.
pub trait AckBackend: Send + Sync {
    /// Short name for reports (`switchboard`, `jetstream`, `mock`).
    fn name(&self) -> &'static str;

    /// Prepare the server once before any connection (e.g. create the `JetStream` stream over
    /// the subjects `s.>`).
    fn setup(&self) -> io::Result<()> {
        Ok(())
    }

    /// Open publishing connection `index`.
    fn connect(&self, index: usize) -> io::Result<(Box<dyn AckSender>, Box<dyn AckReceiver>)>;
}

/// The writing half of an acknowledged connection.
pub trait AckSender: Send {
    /// Queue one publish of `payload` to `session` and return the id its acknowledgement will
    /// carry. Never writes: the caller records the id first, then calls [`AckSender::flush`].
    fn publish(&mut self, session: u32, payload: &[u8]) -> io::Result<u64>;
    /// Write out everything queued.
    fn flush(&mut self) -> io::Result<()>;
}

/// The reading half of an acknowledged connection.
pub trait AckReceiver: Send {
    /// Read once (waiting up to about [`crate::backend::READ_TIMEOUT`]) and hand every complete
    /// acknowledgement to `sink`. Errors that end the connection (GOAWAY, `-ERR`) are `Err`.
    fn poll(&mut self, sink: &mut dyn FnMut(Ack)) -> io::Result<Poll>;
}

/// Counts of one run (or one connection), merged by addition.
#[derive(Debug, Default, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AckCounts {
    /// Publishes written.
    pub sent: u64,
    /// Publishes acknowledged as stored.
    pub acked: u64,
    /// Publishes answered with an error.
    pub errors: u64,
    /// Publishes with no answer at the end of the run.
    pub lost: u64,
    /// Answers for no outstanding publish (duplicates, or ids never sent).
    pub unexpected: u64,
    /// Acknowledgements per claimed durability label.
    pub claims: BTreeMap<String, u64>,
    /// The first few error texts.
    pub error_texts: Vec<String>,
}

impl AckCounts {
    /// Add `o`.
    pub fn add(&mut self, o: &AckCounts) {
        self.sent += o.sent;
        self.acked += o.acked;
        self.errors += o.errors;
        self.lost += o.lost;
        self.unexpected += o.unexpected;
        for (k, v) in &o.claims {
            *self.claims.entry(k.clone()).or_default() += v;
        }
        for t in &o.error_texts {
            if self.error_texts.len() < ERROR_TEXTS_MAX {
                self.error_texts.push(t.clone());
            }
        }
    }

    /// Every publish acknowledged as stored, exactly once, no error.
    pub fn clean(&self) -> bool {
        self.acked == self.sent && self.errors == 0 && self.lost == 0 && self.unexpected == 0
    }

    /// The claim if every acknowledgement claimed the same durability, else `mixed: a=N b=M`.
    pub fn claim_summary(&self) -> String {
        match self.claims.len() {
            0 => "none".into(),
            1 => self.claims.keys().next().cloned().unwrap_or_default(),
            _ => format!(
                "mixed: {}",
                self.claims.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(" ")
            ),
        }
    }
}

/// One connection's outstanding publishes and what came back. Sans-IO: times are arguments.
pub struct AckTracker {
    /// id → intended send time (ns on the process clock).
    outstanding: HashMap<u64, u64>,
    /// Claims counted by label without allocating per acknowledgement.
    claims: Vec<(&'static str, u64)>,
    counts: AckCounts,
    /// Only publishes intended inside `[w0, w1)` are measured.
    w0: u64,
    w1: u64,
    latency: Latency,
}

impl AckTracker {
    /// A tracker that measures the publishes intended inside `[w0_ns, w1_ns)`.
    pub fn new(w0_ns: u64, w1_ns: u64) -> Self {
        Self {
            outstanding: HashMap::with_capacity(1024),
            claims: Vec::new(),
            counts: AckCounts::default(),
            w0: w0_ns,
            w1: w1_ns,
            latency: Latency::new(),
        }
    }

    /// Record that publish `id`, intended at `intended_ns`, is about to be written. An id that
    /// is already outstanding is a bug in the sender: `Err`.
    pub fn sent(&mut self, id: u64, intended_ns: u64) -> Result<(), String> {
        match self.outstanding.entry(id) {
            Entry::Occupied(_) => return Err(format!("publish id {id} reused while still outstanding")),
            Entry::Vacant(v) => v.insert(intended_ns),
        };
        self.counts.sent += 1;
        Ok(())
    }

    /// Settle one acknowledgement received at `now_ns`.
    pub fn settle(&mut self, ack: &Ack, now_ns: u64) {
        let Some(intended) = self.outstanding.remove(&ack.id) else {
            self.counts.unexpected += 1;
            return;
        };
        match &ack.answer {
            Answer::Ok { claim } => {
                self.counts.acked += 1;
                match self.claims.iter_mut().find(|(k, _)| k == claim) {
                    Some((_, n)) => *n += 1,
                    None => self.claims.push((claim, 1)),
                }
                if intended >= self.w0 && intended < self.w1 {
                    self.latency.record(now_ns.saturating_sub(intended));
                }
            }
            Answer::Err(text) => {
                self.counts.errors += 1;
                if self.counts.error_texts.len() < ERROR_TEXTS_MAX {
                    self.counts.error_texts.push(text.clone());
                }
            }
        }
    }

    /// Publishes not yet answered.
    pub fn in_flight(&self) -> usize {
        self.outstanding.len()
    }

    /// Answers settled so far (acknowledged or refused).
    pub fn answered(&self) -> u64 {
        self.counts.acked + self.counts.errors
    }

    /// The final counts (everything still outstanding is lost) and the latency histogram.
    pub fn finish(mut self) -> (AckCounts, Latency) {
        self.counts.lost = self.outstanding.len() as u64;
        for (k, v) in self.claims {
            *self.counts.claims.entry(k.to_string()).or_default() += v;
        }
        (self.counts, self.latency)
    }
}

/// An in-process backend for tests: acknowledges every publish through a channel, and can
/// drop, duplicate or refuse answers on purpose (every n-th publish of a connection, counted
/// from 1; 0 = never), so tests check the accounting against exact numbers.
pub mod mock {
    use super::{Ack, AckBackend, AckReceiver, AckSender, Answer};
    use crate::backend::{Poll, READ_TIMEOUT};
    use std::io;
    use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};

    /// Which answers to spoil (0 = never), per connection, by publish number from 1.
    #[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
    pub struct AckFaults {
        /// Never answer every n-th publish.
        pub drop_every: u64,
        /// Answer every n-th publish twice.
        pub dup_every: u64,
        /// Refuse every n-th publish with an error.
        pub err_every: u64,
    }

    impl AckFaults {
        /// Parse `drop=N,dup=M,err=K` (any subset).
        pub fn parse(s: &str) -> Result<Self, String> {
            let mut f = AckFaults::default();
            for part in s.split(',').filter(|p| !p.is_empty()) {
                let (k, v) = part.split_once('=').ok_or_else(|| format!("bad fault {part:?}: want key=N"))?;
                let v: u64 = v.parse().map_err(|_| format!("bad number in {part:?}"))?;
                match k {
                    "drop" => f.drop_every = v,
                    "dup" => f.dup_every = v,
                    "err" => f.err_every = v,
                    _ => return Err(format!("unknown ack fault {k:?}: use drop, dup or err")),
                }
            }
            Ok(f)
        }

        /// How many of `n` publishes of one connection are dropped, duplicated, refused.
        pub fn expected(&self, n: u64) -> (u64, u64, u64) {
            // Precedence as in the sender: drop, else err, else dup.
            let (mut drop, mut dup, mut err) = (0, 0, 0);
            for i in 1..=n {
                if self.drop_every > 0 && i % self.drop_every == 0 {
                    drop += 1;
                } else if self.err_every > 0 && i % self.err_every == 0 {
                    err += 1;
                } else if self.dup_every > 0 && i % self.dup_every == 0 {
                    dup += 1;
                }
            }
            (drop, dup, err)
        }
    }

    /// The mock acknowledging backend.
    pub struct MockAck {
        /// Faults to inject.
        pub faults: AckFaults,
        /// The durability it claims.
        pub claim: &'static str,
    }

    impl AckBackend for MockAck {
        fn name(&self) -> &'static str {
            "mock"
        }

        fn connect(&self, _index: usize) -> io::Result<(Box<dyn AckSender>, Box<dyn AckReceiver>)> {
            let (tx, rx) = mpsc::channel();
            Ok((
                Box::new(MockSender { tx, queued: Vec::new(), next: 1, faults: self.faults, claim: self.claim }),
                Box::new(MockReceiver { rx }),
            ))
        }
    }

    struct MockSender {
        tx: Sender<Vec<Ack>>,
        queued: Vec<Ack>,
        next: u64,
        faults: AckFaults,
        claim: &'static str,
    }

    impl AckSender for MockSender {
        fn publish(&mut self, _session: u32, _payload: &[u8]) -> io::Result<u64> {
            let id = self.next;
            self.next += 1;
            let f = self.faults;
            let hit = |k: u64| k > 0 && id % k == 0;
            if hit(f.drop_every) {
                return Ok(id);
            }
            if hit(f.err_every) {
                self.queued.push(Ack { id, answer: Answer::Err(format!("mock refused {id}")) });
                return Ok(id);
            }
            let ack = Ack { id, answer: Answer::Ok { claim: self.claim } };
            if hit(f.dup_every) {
                self.queued.push(ack.clone());
            }
            self.queued.push(ack);
            Ok(id)
        }

        fn flush(&mut self) -> io::Result<()> {
            if !self.queued.is_empty() {
                self.tx.send(std::mem::take(&mut self.queued)).map_err(|_| io::Error::other("mock receiver gone"))?;
            }
            Ok(())
        }
    }

    struct MockReceiver {
        rx: Receiver<Vec<Ack>>,
    }

    impl AckReceiver for MockReceiver {
        fn poll(&mut self, sink: &mut dyn FnMut(Ack)) -> io::Result<Poll> {
            match self.rx.recv_timeout(READ_TIMEOUT) {
                Ok(batch) => {
                    batch.into_iter().for_each(&mut *sink);
                    Ok(Poll::Data)
                }
                Err(RecvTimeoutError::Timeout) => Ok(Poll::Idle),
                Err(RecvTimeoutError::Disconnected) => Ok(Poll::Closed),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ok(id: u64, claim: &'static str) -> Ack {
        Ack { id, answer: Answer::Ok { claim } }
    }

    #[test]
    fn settles_counts_and_measures_only_the_window() {
        let mut t = AckTracker::new(1_000, 2_000);
        t.sent(1, 500).unwrap(); // before the window: counted, not measured
        t.sent(2, 1_000).unwrap();
        t.sent(3, 1_500).unwrap();
        t.sent(4, 2_000).unwrap(); // after the window
        t.sent(5, 1_900).unwrap(); // never answered
        assert!(t.sent(3, 1_600).is_err(), "an outstanding id must not be reused");
        t.settle(&ok(3, "sync"), 1_800);
        t.settle(&ok(1, "sync"), 1_800);
        t.settle(&ok(2, "memory"), 1_250);
        t.settle(&ok(2, "memory"), 1_260); // duplicate
        t.settle(&ok(99, "sync"), 1_260); // never sent
        t.settle(&Ack { id: 4, answer: Answer::Err("ENOSPC".into()) }, 2_100);
        assert_eq!(t.in_flight(), 1);
        assert_eq!(t.answered(), 4);
        let (c, lat) = t.finish();
        assert_eq!((c.sent, c.acked, c.errors, c.lost, c.unexpected), (5, 3, 1, 1, 2));
        assert_eq!(c.error_texts, vec!["ENOSPC".to_string()]);
        assert_eq!(c.claims.get("sync"), Some(&2));
        assert_eq!(c.claims.get("memory"), Some(&1));
        assert_eq!(c.claim_summary(), "mixed: memory=1 sync=2");
        assert!(!c.clean());
        // Measured: id 3 (300 ns) and id 2 (250 ns); not 1 (before w0) nor 4 (error, after w1).
        let p = lat.percentiles();
        assert_eq!(p.count, 2);
        assert!((p.max - 0.3).abs() < 0.001, "{p:?}");
    }

    #[test]
    fn counts_merge_and_cap_error_texts() {
        let mut a = AckCounts::default();
        let mut b = AckCounts { sent: 3, acked: 3, ..AckCounts::default() };
        b.claims.insert("sync".into(), 3);
        b.error_texts = (0..4).map(|i| format!("e{i}")).collect();
        a.add(&b);
        a.add(&b);
        assert_eq!((a.sent, a.acked), (6, 6));
        assert_eq!(a.claims.get("sync"), Some(&6));
        assert_eq!(a.error_texts.len(), ERROR_TEXTS_MAX);
        assert_eq!(a.claim_summary(), "sync");
        assert_eq!(AckCounts::default().claim_summary(), "none");
        assert!(AckCounts::default().clean());
    }

    #[test]
    fn mock_faults_parse_and_expectations() {
        let f = mock::AckFaults::parse("drop=10,dup=7,err=4").unwrap();
        assert_eq!((f.drop_every, f.dup_every, f.err_every), (10, 7, 4));
        assert!(mock::AckFaults::parse("lose=3").is_err());
        assert!(mock::AckFaults::parse("drop=x").is_err());
        // 1..=28: drop 10,20; err 4,8,12,16,24,28 (20 is dropped); dup 7,14,21 (28 is an error).
        assert_eq!(f.expected(28), (2, 3, 6));
        assert_eq!(mock::AckFaults::default().expected(1000), (0, 0, 0));
    }
}
