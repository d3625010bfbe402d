//! An in-process test backend: no sockets, no server. Publishes are routed to the gateways
//! that subscribed the session through channels, and the mock can drop, duplicate and reorder
//! deliveries on purpose, counting exactly what it did so tests can check the generator's
//! accounting against it.
//!
//! Faults are chosen per delivery (one publish to one subscribing gateway) by a global delivery
//! counter `c` (from 1): drop when `c % drop_every == 0`, else duplicate when
//! `c % dup_every == 0`, else hold back for reordering when `c % reorder_every == 0`. A held
//! delivery is sent right after the next delivery of the same session to the same gateway, so
//! it arrives after a later message: one reorder. If that next delivery is itself dropped, the
//! held one goes out in order and is not counted.

use super::{Backend, Gateway, Poll, Publisher, PublisherPair, READ_TIMEOUT};
use std::collections::HashMap;
use std::io;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// Which faults to inject (0 = never).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Faults {
    /// Drop every n-th delivery.
    pub drop_every: u64,
    /// Duplicate every n-th delivery.
    pub dup_every: u64,
    /// Reorder every n-th delivery (with the next one of its session on its gateway).
    pub reorder_every: u64,
}

impl Faults {
    /// Parse `drop=N,dup=M,reorder=K` (any subset, any order).
    pub fn parse(s: &str) -> Result<Self, String> {
        let mut f = Faults::default();
        for part in s.split(',').filter(|p| !p.is_empty()) {
            let (k, v) = part.split_once('=').ok_or_else(|| format!("bad fault {part:?}: want key=N"))?;
            let v: u64 = v.parse().map_err(|_| format!("bad number in {part:?}"))?;
            match k {
                "drop" => f.drop_every = v,
                "dup" => f.dup_every = v,
                "reorder" => f.reorder_every = v,
                _ => return Err(format!("unknown fault {k:?}: use drop, dup or reorder")),
            }
        }
        Ok(f)
    }
}

/// What the mock actually did.
#[derive(Debug, Default)]
pub struct Stats {
    /// Deliveries dropped.
    pub dropped: AtomicU64,
    /// Deliveries sent twice.
    pub duplicated: AtomicU64,
    /// Deliveries that were sent after a later message of the same session.
    pub reordered: AtomicU64,
    /// Deliveries handed to gateways (duplicates counted twice).
    pub sent: AtomicU64,
}

type Batch = Vec<Vec<u8>>;
/// session → gateways subscribed to it; gateway index → its channel.
type Routes = (HashMap<u32, Vec<usize>>, HashMap<usize, Sender<Batch>>);

struct Inner {
    faults: Faults,
    stats: Arc<Stats>,
    counter: AtomicU64,
    routes: Mutex<Routes>,
}

/// The mock backend.
#[derive(Clone)]
pub struct Mock {
    inner: Arc<Inner>,
}

impl Mock {
    /// A mock injecting `faults`.
    pub fn new(faults: Faults) -> Self {
        Self {
            inner: Arc::new(Inner {
                faults,
                stats: Arc::new(Stats::default()),
                counter: AtomicU64::new(0),
                routes: Mutex::new((HashMap::new(), HashMap::new())),
            }),
        }
    }

    /// The counts of what was injected.
    pub fn stats(&self) -> Arc<Stats> {
        self.inner.stats.clone()
    }
}

impl Backend for Mock {
    fn name(&self) -> &'static str {
        "mock"
    }

    fn gateway(&self, index: usize, sessions: &[u32]) -> io::Result<Box<dyn Gateway>> {
        let (tx, rx) = mpsc::channel();
        let mut r = self.inner.routes.lock().unwrap();
        for &s in sessions {
            r.0.entry(s).or_default().push(index);
        }
        r.1.insert(index, tx);
        Ok(Box::new(MockGateway { rx }))
    }

    fn publisher(&self, _index: usize) -> io::Result<PublisherPair> {
        // Gateways are all set up before publishers: take a snapshot of the routes.
        let r = self.inner.routes.lock().unwrap();
        Ok((
            Box::new(MockPublisher {
                inner: self.inner.clone(),
                routes: r.0.clone(),
                senders: r.1.clone(),
                out: HashMap::new(),
                held: HashMap::new(),
            }),
            None,
        ))
    }
}

struct MockGateway {
    rx: Receiver<Batch>,
}

impl Gateway for MockGateway {
    fn wait_ready(&mut self, _deadline: Instant) -> io::Result<()> {
        Ok(())
    }

    fn poll(&mut self, sink: &mut dyn FnMut(&[u8])) -> io::Result<Poll> {
        let first = match self.rx.recv_timeout(READ_TIMEOUT) {
            Ok(b) => b,
            Err(RecvTimeoutError::Timeout) => return Ok(Poll::Idle),
            Err(RecvTimeoutError::Disconnected) => return Ok(Poll::Closed),
        };
        for m in &first {
            sink(m);
        }
        while let Ok(b) = self.rx.try_recv() {
            for m in &b {
                sink(m);
            }
        }
        Ok(Poll::Data)
    }
}

struct MockPublisher {
    inner: Arc<Inner>,
    routes: HashMap<u32, Vec<usize>>,
    senders: HashMap<usize, Sender<Batch>>,
    out: HashMap<usize, Batch>,
    held: HashMap<(usize, u32), Vec<u8>>,
}

impl Publisher for MockPublisher {
    fn publish(&mut self, session: u32, payload: &[u8]) -> io::Result<()> {
        let Some(gws) = self.routes.get(&session) else { return Ok(()) };
        let f = self.inner.faults;
        let st = &self.inner.stats;
        let hit = |c: u64, every: u64| every != 0 && c % every == 0;
        for &g in gws {
            let c = self.inner.counter.fetch_add(1, Ordering::Relaxed) + 1;
            let out = self.out.entry(g).or_default();
            let key = (g, session);
            let sent_now = if hit(c, f.drop_every) {
                st.dropped.fetch_add(1, Ordering::Relaxed);
                false
            } else if hit(c, f.dup_every) {
                out.push(payload.to_vec());
                out.push(payload.to_vec());
                st.duplicated.fetch_add(1, Ordering::Relaxed);
                st.sent.fetch_add(2, Ordering::Relaxed);
                true
            } else if hit(c, f.reorder_every) && !self.held.contains_key(&key) {
                self.held.insert(key, payload.to_vec());
                continue;
            } else {
                out.push(payload.to_vec());
                st.sent.fetch_add(1, Ordering::Relaxed);
                true
            };
            if let Some(h) = self.held.remove(&key) {
                if sent_now {
                    st.reordered.fetch_add(1, Ordering::Relaxed);
                }
                out.push(h);
                st.sent.fetch_add(1, Ordering::Relaxed);
            }
        }
        Ok(())
    }

    fn flush(&mut self) -> io::Result<()> {
        for (g, batch) in &mut self.out {
            if !batch.is_empty() {
                let b = std::mem::take(batch);
                self.senders[g].send(b).map_err(|_| io::Error::new(io::ErrorKind::BrokenPipe, "mock gateway gone"))?;
            }
        }
        Ok(())
    }

    fn close(&mut self) -> io::Result<()> {
        // Whatever is still held goes out in order (not a reorder).
        for ((g, _), h) in self.held.drain() {
            self.out.entry(g).or_default().push(h);
            self.inner.stats.sent.fetch_add(1, Ordering::Relaxed);
        }
        self.flush()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_faults() {
        assert_eq!(Faults::parse("drop=5,reorder=7").unwrap(), Faults { drop_every: 5, dup_every: 0, reorder_every: 7 });
        assert!(Faults::parse("lose=1").is_err());
        assert_eq!(Faults::parse("").unwrap(), Faults::default());
    }
}
