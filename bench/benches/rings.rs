//! Cross-core rings: what one message costs between two threads pinned to CPU 0 and CPU 1.
//!
//! Four queues, all bounded at [`CAPACITY`] `u64` slots:
//! - `hand_spsc`: a minimal single-producer single-consumer ring written below on crossbeam
//!   primitives (the reference of what "our own ring" would cost);
//! - `array_queue`: `crossbeam_queue::ArrayQueue` (MPMC, lock-free);
//! - `flume`: `flume::bounded` (MPMC, a short spin lock inside);
//! - `glommio_shared`: glommio's `shared_channel` between two `LocalExecutor`s placed with
//!   `Placement::Fixed(0)` / `Fixed(1)`, driven with `send().await` / `recv().await` as the
//!   engine's mesh does (a parked peer is woken through its reactor).
//!
//! The first three are driven with `try_send` / `try_recv` in a spin loop on both sides, so
//! they compare the data structures, not parking policies.
//!
//! Per queue, two criterion benchmarks (one iteration = one message):
//! - `stream`: the producer sends `iters` sequence numbers as fast as it can, the consumer
//!   checks each one; the clock runs from the producer's first send (taken after the consumer
//!   is armed) to the consumer's last receive, both read on the worker threads, so the
//!   control hand-off is never timed. Criterion reports time per message and messages/s.
//! - `rtt`: ping-pong over a second ring back; time per round trip.
//!
//! After each queue's criterion runs, one more ping-pong pass records every round trip in an
//! HDR histogram and prints p50/p90/p99/p99.9/max on stdout, since criterion only gives
//! means and medians of sample averages.
//!
//! Only these benchmarks run on the two workers; the criterion thread is unpinned and blocked
//! while they run. If fewer than two CPUs are allowed, the workers run unpinned (said on
//! stdout) and the figures measure a time-shared core, not a cross-core transfer.

// `criterion_group!` generates a public function that cannot carry a doc comment.
#![allow(missing_docs)]
// Nanosecond counts become microseconds for a report.
#![allow(clippy::cast_precision_loss)]

use std::cell::UnsafeCell;
use std::mem::MaybeUninit;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use crossbeam_queue::ArrayQueue;
use crossbeam_utils::CachePadded;
use glommio::channels::shared_channel;
use glommio::{LocalExecutorBuilder, Placement};
use hdrhistogram::Histogram;

/// Slots in every ring (a power of two, as the hand ring requires).
const CAPACITY: usize = 1024;
/// Round trips recorded in the HDR pass (after `HDR_WARMUP_ROUND_TRIPS` unrecorded ones).
const HDR_ROUND_TRIPS: u64 = 200_000;
const HDR_WARMUP_ROUND_TRIPS: u64 = 10_000;

/// The minimal bounded SPSC ring: a power-of-two slot array, the consumer's index (`head`) and
/// the producer's index (`tail`) on separate cache lines, each side caching the other's index
/// so that it reads the shared line only when the cached value says full (or empty).
mod hand_ring {
    use super::{Arc, AtomicUsize, CachePadded, MaybeUninit, Ordering, UnsafeCell};

    struct Shared<T> {
        /// Next slot to read; written only by the consumer.
        head: CachePadded<AtomicUsize>,
        /// Next slot to write; written only by the producer.
        tail: CachePadded<AtomicUsize>,
        slots: Box<[UnsafeCell<MaybeUninit<T>>]>,
        mask: usize,
    }

    // SAFETY: a slot is written only by the producer while it is outside [head, tail) and read
    // only by the consumer while it is inside; the Release/Acquire pairs on head and tail
    // order those accesses. T crosses threads, hence T: Send.
    unsafe impl<T: Send> Sync for Shared<T> {}

    impl<T> Drop for Shared<T> {
        fn drop(&mut self) {
            let (head, tail) = (*self.head.get_mut(), *self.tail.get_mut());
            for i in head..tail {
                // SAFETY: slots in [head, tail) hold initialised values nobody else can read
                // any more (both handles are gone).
                unsafe { self.slots[i & self.mask].get_mut().assume_init_drop() };
            }
        }
    }

    /// The sending end; its cached copy of `head` lives with it, on the producer's core.
    pub struct Producer<T> {
        shared: Arc<Shared<T>>,
        tail: usize,
        head_cached: usize,
    }

    /// The receiving end; its cached copy of `tail` lives with it, on the consumer's core.
    pub struct Consumer<T> {
        shared: Arc<Shared<T>>,
        head: usize,
        tail_cached: usize,
    }

    pub fn bounded<T>(capacity: usize) -> (Producer<T>, Consumer<T>) {
        assert!(capacity.is_power_of_two(), "capacity {capacity} is not a power of two");
        let shared = Arc::new(Shared {
            head: CachePadded::new(AtomicUsize::new(0)),
            tail: CachePadded::new(AtomicUsize::new(0)),
            slots: (0..capacity).map(|_| UnsafeCell::new(MaybeUninit::uninit())).collect(),
            mask: capacity - 1,
        });
        (
            Producer { shared: shared.clone(), tail: 0, head_cached: 0 },
            Consumer { shared, head: 0, tail_cached: 0 },
        )
    }

    impl<T> Producer<T> {
        /// Gives the value back when the ring is full.
        pub fn try_push(&mut self, value: T) -> Result<(), T> {
            let capacity = self.shared.mask + 1;
            if self.tail.wrapping_sub(self.head_cached) == capacity {
                self.head_cached = self.shared.head.load(Ordering::Acquire);
                if self.tail.wrapping_sub(self.head_cached) == capacity {
                    return Err(value);
                }
            }
            // SAFETY: the slot is outside [head, tail): the consumer does not touch it.
            unsafe { (*self.shared.slots[self.tail & self.shared.mask].get()).write(value) };
            self.tail = self.tail.wrapping_add(1);
            self.shared.tail.store(self.tail, Ordering::Release);
            Ok(())
        }
    }

    impl<T> Consumer<T> {
        pub fn try_pop(&mut self) -> Option<T> {
            if self.head == self.tail_cached {
                self.tail_cached = self.shared.tail.load(Ordering::Acquire);
                if self.head == self.tail_cached {
                    return None;
                }
            }
            // SAFETY: the slot is inside [head, tail): initialised, and the producer does not
            // touch it until head moves past it.
            let value = unsafe { (*self.shared.slots[self.head & self.shared.mask].get()).assume_init_read() };
            self.head = self.head.wrapping_add(1);
            self.shared.head.store(self.head, Ordering::Release);
            Some(value)
        }
    }
}

/// Non-blocking ends of the spin-driven queues.
trait Tx: Send + 'static {
    fn try_send(&mut self, v: u64) -> bool;
}
trait Rx: Send + 'static {
    fn try_recv(&mut self) -> Option<u64>;
}

impl Tx for hand_ring::Producer<u64> {
    fn try_send(&mut self, v: u64) -> bool {
        self.try_push(v).is_ok()
    }
}
impl Rx for hand_ring::Consumer<u64> {
    fn try_recv(&mut self) -> Option<u64> {
        self.try_pop()
    }
}
struct Aq(Arc<ArrayQueue<u64>>);
impl Tx for Aq {
    fn try_send(&mut self, v: u64) -> bool {
        self.0.push(v).is_ok()
    }
}
impl Rx for Aq {
    fn try_recv(&mut self) -> Option<u64> {
        self.0.pop()
    }
}
impl Tx for flume::Sender<u64> {
    fn try_send(&mut self, v: u64) -> bool {
        flume::Sender::try_send(self, v).is_ok()
    }
}
impl Rx for flume::Receiver<u64> {
    fn try_recv(&mut self) -> Option<u64> {
        flume::Receiver::try_recv(self).ok()
    }
}

fn send_spin(tx: &mut impl Tx, v: u64) {
    while !tx.try_send(v) {
        std::hint::spin_loop();
    }
}

fn recv_spin(rx: &mut impl Rx) -> u64 {
    loop {
        if let Some(v) = rx.try_recv() {
            return v;
        }
        std::hint::spin_loop();
    }
}

/// What the two workers do next; each carries the run's generation number.
#[derive(Clone, Copy)]
enum Cmd {
    /// `n` messages one way.
    Stream { gen: u64, n: u64 },
    /// `n` round trips, timed as a whole.
    PingPong { gen: u64, n: u64 },
    /// `n` round trips, each timed into the histogram.
    Hdr { gen: u64, n: u64 },
    Stop,
}

/// What worker A (the producer / pinger, CPU 0) reports.
enum AReport {
    Started(Instant),
    Elapsed(Duration),
    Hdr(Box<Histogram<u64>>),
}

/// The protocol shared by both drivers: the consumer arms (stores the generation) before the
/// producer takes its start time, so the consumer's wake-up from the control channel is not
/// timed.
struct Control {
    armed: CachePadded<AtomicU64>,
}

impl Control {
    fn wait_armed(&self, gen: u64) {
        while self.armed.load(Ordering::Acquire) != gen {
            std::hint::spin_loop();
        }
    }
}

/// Two pinned workers and the channels that drive them.
struct Pair {
    to_a: mpsc::Sender<Cmd>,
    to_b: mpsc::Sender<Cmd>,
    from_a: mpsc::Receiver<AReport>,
    from_b: mpsc::Receiver<Instant>,
    gen: u64,
    threads: Vec<JoinHandle<()>>,
    executors: Vec<glommio::ExecutorJoinHandle<()>>,
}

impl Pair {
    fn next_gen(&mut self) -> u64 {
        self.gen += 1;
        self.gen
    }

    fn send(&self, cmd: Cmd) {
        // Consumer first: it arms, then the producer starts.
        self.to_b.send(cmd).expect("worker B alive");
        self.to_a.send(cmd).expect("worker A alive");
    }

    fn stream(&mut self, n: u64) -> Duration {
        let gen = self.next_gen();
        self.send(Cmd::Stream { gen, n });
        let AReport::Started(start) = self.from_a.recv().expect("worker A report") else {
            unreachable!("stream answers Started")
        };
        let end = self.from_b.recv().expect("worker B report");
        end.saturating_duration_since(start)
    }

    fn ping_pong(&mut self, n: u64) -> Duration {
        let gen = self.next_gen();
        self.send(Cmd::PingPong { gen, n });
        let AReport::Elapsed(d) = self.from_a.recv().expect("worker A report") else {
            unreachable!("ping-pong answers Elapsed")
        };
        let _ = self.from_b.recv().expect("worker B report");
        d
    }

    fn hdr(&mut self, n: u64) -> Histogram<u64> {
        let gen = self.next_gen();
        self.send(Cmd::Hdr { gen, n });
        let AReport::Hdr(h) = self.from_a.recv().expect("worker A report") else {
            unreachable!("hdr answers Hdr")
        };
        let _ = self.from_b.recv().expect("worker B report");
        *h
    }
}

impl Drop for Pair {
    fn drop(&mut self) {
        let _ = self.to_a.send(Cmd::Stop);
        let _ = self.to_b.send(Cmd::Stop);
        for t in self.threads.drain(..) {
            t.join().expect("worker panicked");
        }
        for e in self.executors.drain(..) {
            e.join().expect("executor panicked");
        }
    }
}

fn new_histogram() -> Histogram<u64> {
    // 1 ns .. 10 s at 3 significant digits.
    Histogram::new_with_bounds(1, 10_000_000_000, 3).expect("histogram bounds")
}

fn record(h: &mut Histogram<u64>, d: Duration) {
    let ns = u64::try_from(d.as_nanos()).unwrap_or(u64::MAX).clamp(1, h.high());
    h.record(ns).expect("value within bounds");
}

/// Pins the calling thread to `cpu`, when pinning is on.
fn pin(cpu: Option<usize>) {
    let Some(cpu) = cpu else { return };
    // SAFETY: cpu_set_t is plain data; the libc macros only touch the set we own.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        let rc = libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &raw const set);
        assert_eq!(rc, 0, "sched_setaffinity(cpu {cpu}): {}", std::io::Error::last_os_error());
    }
}

/// True when CPUs 0 and 1 are both allowed to this process.
fn two_cpus_allowed() -> bool {
    // SAFETY: as in `pin`; the set is an out-parameter.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &raw mut set) != 0 {
            return false;
        }
        libc::CPU_ISSET(0, &set) && libc::CPU_ISSET(1, &set)
    }
}

/// Starts two spin-driven workers over a forward ring (A to B) and a back ring (B to A).
fn spin_pair<T1: Tx, R1: Rx, T2: Tx, R2: Rx>(pinned: bool, fwd: (T1, R1), back: (T2, R2)) -> Pair {
    let (to_a, a_cmds) = mpsc::channel::<Cmd>();
    let (to_b, b_cmds) = mpsc::channel::<Cmd>();
    let (a_out, from_a) = mpsc::channel();
    let (b_out, from_b) = mpsc::channel();
    let control = Arc::new(Control { armed: CachePadded::new(AtomicU64::new(0)) });
    let (mut fwd_tx, mut fwd_rx) = fwd;
    let (mut back_tx, mut back_rx) = back;
    let ctl_a = control.clone();
    let a = thread::Builder::new()
        .name("ring-a".into())
        .spawn(move || {
            pin(pinned.then_some(0));
            while let Ok(cmd) = a_cmds.recv() {
                match cmd {
                    Cmd::Stream { gen, n } => {
                        ctl_a.wait_armed(gen);
                        let start = Instant::now();
                        for i in 0..n {
                            send_spin(&mut fwd_tx, i);
                        }
                        a_out.send(AReport::Started(start)).unwrap();
                    }
                    Cmd::PingPong { gen, n } => {
                        ctl_a.wait_armed(gen);
                        let start = Instant::now();
                        for i in 0..n {
                            send_spin(&mut fwd_tx, i);
                            let echo = recv_spin(&mut back_rx);
                            assert_eq!(echo, i, "echo out of order");
                        }
                        a_out.send(AReport::Elapsed(start.elapsed())).unwrap();
                    }
                    Cmd::Hdr { gen, n } => {
                        ctl_a.wait_armed(gen);
                        let mut h = new_histogram();
                        for i in 0..n {
                            let t0 = Instant::now();
                            send_spin(&mut fwd_tx, i);
                            let echo = recv_spin(&mut back_rx);
                            record(&mut h, t0.elapsed());
                            assert_eq!(echo, i, "echo out of order");
                        }
                        a_out.send(AReport::Hdr(Box::new(h))).unwrap();
                    }
                    Cmd::Stop => break,
                }
            }
        })
        .expect("spawn worker A");
    let b = thread::Builder::new()
        .name("ring-b".into())
        .spawn(move || {
            pin(pinned.then_some(1));
            while let Ok(cmd) = b_cmds.recv() {
                match cmd {
                    Cmd::Stream { gen, n } => {
                        control.armed.store(gen, Ordering::Release);
                        for i in 0..n {
                            let v = recv_spin(&mut fwd_rx);
                            assert_eq!(v, i, "stream out of order");
                        }
                        b_out.send(Instant::now()).unwrap();
                    }
                    Cmd::PingPong { gen, n } | Cmd::Hdr { gen, n } => {
                        control.armed.store(gen, Ordering::Release);
                        for _ in 0..n {
                            let v = recv_spin(&mut fwd_rx);
                            send_spin(&mut back_tx, v);
                        }
                        b_out.send(Instant::now()).unwrap();
                    }
                    Cmd::Stop => break,
                }
            }
        })
        .expect("spawn worker B");
    Pair { to_a, to_b, from_a, from_b, gen: 0, threads: vec![a, b], executors: Vec::new() }
}

/// Starts two glommio executors joined by two shared channels (forward and back). Each
/// executor blocks on its std control channel between runs: nothing else runs on it then.
fn glommio_pair(pinned: bool) -> Pair {
    let (to_a, a_cmds) = mpsc::channel::<Cmd>();
    let (to_b, b_cmds) = mpsc::channel::<Cmd>();
    let (a_out, from_a) = mpsc::channel();
    let (b_out, from_b) = mpsc::channel();
    let control = Arc::new(Control { armed: CachePadded::new(AtomicU64::new(0)) });
    let (fwd_tx, fwd_rx) = shared_channel::new_bounded::<u64>(CAPACITY);
    let (back_tx, back_rx) = shared_channel::new_bounded::<u64>(CAPACITY);
    let place = |cpu| if pinned { Placement::Fixed(cpu) } else { Placement::Unbound };
    let ctl_a = control.clone();
    let a = LocalExecutorBuilder::new(place(0))
        .name("ring-glommio-a")
        .spawn(move || async move {
            let fwd_tx = fwd_tx.connect().await;
            let back_rx = back_rx.connect().await;
            while let Ok(cmd) = a_cmds.recv() {
                match cmd {
                    Cmd::Stream { gen, n } => {
                        ctl_a.wait_armed(gen);
                        let start = Instant::now();
                        for i in 0..n {
                            fwd_tx.send(i).await.expect("receiver alive");
                        }
                        a_out.send(AReport::Started(start)).unwrap();
                    }
                    Cmd::PingPong { gen, n } => {
                        ctl_a.wait_armed(gen);
                        let start = Instant::now();
                        for i in 0..n {
                            fwd_tx.send(i).await.expect("receiver alive");
                            let echo = back_rx.recv().await.expect("sender alive");
                            assert_eq!(echo, i, "echo out of order");
                        }
                        a_out.send(AReport::Elapsed(start.elapsed())).unwrap();
                    }
                    Cmd::Hdr { gen, n } => {
                        ctl_a.wait_armed(gen);
                        let mut h = new_histogram();
                        for i in 0..n {
                            let t0 = Instant::now();
                            fwd_tx.send(i).await.expect("receiver alive");
                            let echo = back_rx.recv().await.expect("sender alive");
                            record(&mut h, t0.elapsed());
                            assert_eq!(echo, i, "echo out of order");
                        }
                        a_out.send(AReport::Hdr(Box::new(h))).unwrap();
                    }
                    Cmd::Stop => break,
                }
            }
        })
        .expect("start executor A");
    let b = LocalExecutorBuilder::new(place(1))
        .name("ring-glommio-b")
        .spawn(move || async move {
            let fwd_rx = fwd_rx.connect().await;
            let back_tx = back_tx.connect().await;
            while let Ok(cmd) = b_cmds.recv() {
                match cmd {
                    Cmd::Stream { gen, n } => {
                        control.armed.store(gen, Ordering::Release);
                        for i in 0..n {
                            let v = fwd_rx.recv().await.expect("sender alive");
                            assert_eq!(v, i, "stream out of order");
                        }
                        b_out.send(Instant::now()).unwrap();
                    }
                    Cmd::PingPong { gen, n } | Cmd::Hdr { gen, n } => {
                        control.armed.store(gen, Ordering::Release);
                        for _ in 0..n {
                            let v = fwd_rx.recv().await.expect("sender alive");
                            back_tx.send(v).await.expect("receiver alive");
                        }
                        b_out.send(Instant::now()).unwrap();
                    }
                    Cmd::Stop => break,
                }
            }
        })
        .expect("start executor B");
    Pair { to_a, to_b, from_a, from_b, gen: 0, threads: Vec::new(), executors: vec![a, b] }
}

fn print_hdr(name: &str, h: &Histogram<u64>) {
    let us = |q: f64| h.value_at_quantile(q) as f64 / 1000.0;
    println!(
        "HDR rtt {name:<15} n={} p50={:.3}us p90={:.3}us p99={:.3}us p99.9={:.3}us max={:.3}us",
        h.len(),
        us(0.50),
        us(0.90),
        us(0.99),
        us(0.999),
        h.max() as f64 / 1000.0
    );
}

fn bench_pair(c: &mut Criterion, name: &str, mut pair: Pair, hdr_round_trips: u64) {
    let mut g = c.benchmark_group(format!("rings/{name}"));
    g.throughput(Throughput::Elements(1));
    g.bench_function("stream", |b| b.iter_custom(|iters| pair.stream(iters)));
    g.bench_function("rtt", |b| b.iter_custom(|iters| pair.ping_pong(iters)));
    g.finish();
    let _ = pair.hdr(HDR_WARMUP_ROUND_TRIPS.min(hdr_round_trips));
    print_hdr(name, &pair.hdr(hdr_round_trips));
}

fn rings(c: &mut Criterion) {
    let pinned = two_cpus_allowed();
    if pinned {
        println!("rings: workers pinned to CPU 0 (producer / pinger) and CPU 1 (consumer / echo)");
    } else {
        println!("rings: CPUs 0 and 1 are not both allowed: running UNPINNED (not a cross-core figure)");
    }
    // `cargo bench` passes --bench; `cargo test --benches` does not and only smoke-tests.
    let hdr_round_trips = if std::env::args().any(|a| a == "--bench") { HDR_ROUND_TRIPS } else { 1000 };

    bench_pair(
        c,
        "hand_spsc",
        spin_pair(pinned, hand_ring::bounded(CAPACITY), hand_ring::bounded(CAPACITY)),
        hdr_round_trips,
    );
    let (q1, q2) = (Arc::new(ArrayQueue::new(CAPACITY)), Arc::new(ArrayQueue::new(CAPACITY)));
    bench_pair(
        c,
        "array_queue",
        spin_pair(pinned, (Aq(q1.clone()), Aq(q1)), (Aq(q2.clone()), Aq(q2))),
        hdr_round_trips,
    );
    bench_pair(c, "flume", spin_pair(pinned, flume::bounded(CAPACITY), flume::bounded(CAPACITY)), hdr_round_trips);
    bench_pair(c, "glommio_shared", glommio_pair(pinned), hdr_round_trips);
}

criterion_group!(benches, rings);
criterion_main!(benches);
