//! The fan-out write path on loopback TCP: one message, encoded once into a pool lease, queued
//! on every one of N server-side connections, inside a glommio `LocalExecutor`.
//!
//! Two write paths over the same accepted sockets:
//! - `uring`: `switchboard::uring::UringSender`. Each connection is registered; the producer
//!   enqueues a clone of one `OutBuf::Pooled(lease)` per connection (no syscall) and, at the
//!   end of each turn of `batch` messages, yields; the sender's flusher then makes one
//!   `sendmsg` SQE per dirty connection (gathering its queued leases) and one
//!   `io_uring_enter` for all of them.
//! - `write_all`: the baseline, glommio's own `TcpStream` write path. One task per connection
//!   drains a local queue of lease clones with `write_all(&lease)`: one `send` syscall per
//!   message per connection when the socket has room (glommio arms readiness polling only
//!   when it would block). The producer's turns are the same.
//!
//! The executor is pinned to CPU 0. The client ends of the connections are drained by one
//! reader thread on CPU 1 (epoll, non-blocking reads into a 256 KiB buffer) that counts the
//! bytes in an atomic. The clock starts in the executor before the first lease and stops when
//! the reader has read the last expected byte (it stamps that moment itself), so every
//! measured message has been delivered to user space at the other end.
//!
//! Backpressure: at the end of each turn the producer sleeps (glommio timer, 50 us) while any
//! connection has more than [`HWM_BYTES`] unsent, so that neither path queues without bound;
//! while it sleeps, the executor's reactor runs and the writers/flusher keep sending.
//!
//! One criterion iteration = one published message (N deliveries); the throughput line is
//! deliveries/s. After each benchmark the counters of the runs it made are printed: the
//! sender's SQEs per submit, flusher turns, bytes per SQE, and the executor thread's CPU time
//! per delivery (user + system, which on loopback includes the kernel's TCP transmit and most
//! of the receive path).

// `criterion_group!` generates a public function that cannot carry a doc comment.
#![allow(missing_docs)]
// Counters become ratios for a report, and libc's C integer types meet Rust's: the values are
// far inside every range involved.
#![allow(clippy::cast_precision_loss, clippy::cast_sign_loss, clippy::cast_possible_wrap)]

use std::fmt::Write as _;
use std::io::{ErrorKind, Read};
use std::net::{TcpListener, TcpStream};
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use criterion::{criterion_group, criterion_main, Criterion, SamplingMode, Throughput};
use futures_lite::AsyncWriteExt;
use glommio::channels::local_channel::{self, LocalSender};
use glommio::{LocalExecutorBuilder, Placement};
use switchboard::pool::{BufferPool, Lease, PoolConfig, SizeClass};
use switchboard::uring::{ConnSlot, OutBuf, SenderConfig, SenderStats, UringSender};

/// Unsent bytes on one connection above which the producer waits at the end of its turn.
const HWM_BYTES: usize = 256 << 10;
/// How long the producer sleeps while over `HWM_BYTES`, and the poll period of the final wait.
const BACKOFF: Duration = Duration::from_micros(50);
/// Messages per producer turn in the main matrix (a shard handles a batch of publishes per
/// turn, then yields to its reactor).
const BATCH: usize = 16;
/// Failure guard on every wait; never reached when the code works.
const GUARD: Duration = Duration::from_secs(60);
const CONN_COUNTS: [usize; 2] = [8, 64];
const SIZES: [usize; 3] = [128, 1 << 10, 16 << 10];

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Method {
    Uring,
    WriteAll,
}

#[derive(Clone, Copy, Debug)]
struct Run {
    method: Method,
    size: usize,
    msgs: u64,
    batch: usize,
}

/// What one run measured.
#[derive(Clone, Copy, Debug, Default)]
struct Outcome {
    elapsed: Duration,
    deliveries: u64,
    cpu: Duration,
    submits: u64,
    sqes: u64,
    turns: u64,
    bytes_sent: u64,
    eagain: u64,
    short_writes: u64,
}

impl Outcome {
    fn add(&mut self, o: &Outcome) {
        self.elapsed += o.elapsed;
        self.deliveries += o.deliveries;
        self.cpu += o.cpu;
        self.submits += o.submits;
        self.sqes += o.sqes;
        self.turns += o.turns;
        self.bytes_sent += o.bytes_sent;
        self.eagain += o.eagain;
        self.short_writes += o.short_writes;
    }
}

/// Shared between the executor and the reader thread.
struct ReadSide {
    base: Instant,
    /// Bytes read from all client sockets since start.
    read_total: AtomicU64,
    /// `read_total` at which the current run is complete.
    target: AtomicU64,
    /// Nanoseconds since `base` when `read_total` reached `target`.
    end_ns: AtomicU64,
    stop: AtomicBool,
}

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

fn thread_cpu() -> Duration {
    let mut ts = libc::timespec { tv_sec: 0, tv_nsec: 0 };
    // SAFETY: ts is a valid out-pointer.
    let rc = unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &raw mut ts) };
    assert_eq!(rc, 0, "clock_gettime(CLOCK_THREAD_CPUTIME_ID)");
    Duration::new(ts.tv_sec as u64, ts.tv_nsec as u32)
}

/// Drains every client socket and counts the bytes; stamps the moment a run's target is met.
fn reader(clients: &[TcpStream], side: &ReadSide, cpu: Option<usize>) {
    pin(cpu);
    // SAFETY: plain syscalls on descriptors we own; results checked.
    let ep = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
    assert!(ep >= 0, "epoll_create1: {}", std::io::Error::last_os_error());
    for (i, c) in clients.iter().enumerate() {
        c.set_nonblocking(true).expect("non-blocking client");
        let mut ev = libc::epoll_event { events: libc::EPOLLIN as u32, u64: i as u64 };
        // SAFETY: as above; ev lives across the call.
        let rc = unsafe { libc::epoll_ctl(ep, libc::EPOLL_CTL_ADD, c.as_raw_fd(), &raw mut ev) };
        assert_eq!(rc, 0, "epoll_ctl: {}", std::io::Error::last_os_error());
    }
    let mut buf = vec![0u8; 256 << 10];
    let mut events = vec![libc::epoll_event { events: 0, u64: 0 }; clients.len()];
    while !side.stop.load(Ordering::Acquire) {
        // SAFETY: events has room for clients.len() entries.
        let n = unsafe { libc::epoll_wait(ep, events.as_mut_ptr(), events.len() as i32, 20) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            assert_eq!(e.kind(), ErrorKind::Interrupted, "epoll_wait: {e}");
            continue;
        }
        for ev in &events[..n as usize] {
            let index = { ev.u64 } as usize;
            let mut client = &clients[index];
            loop {
                match client.read(&mut buf) {
                    Ok(0) => {
                        // SAFETY: removing a descriptor we registered.
                        unsafe { libc::epoll_ctl(ep, libc::EPOLL_CTL_DEL, client.as_raw_fd(), std::ptr::null_mut()) };
                        break;
                    }
                    Ok(k) => {
                        let total = side.read_total.fetch_add(k as u64, Ordering::SeqCst) + k as u64;
                        if total == side.target.load(Ordering::SeqCst) {
                            side.end_ns.store(side.base.elapsed().as_nanos() as u64, Ordering::SeqCst);
                        }
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                    Err(e) if e.kind() == ErrorKind::Interrupted => {}
                    Err(e) => panic!("client read: {e}"),
                }
            }
        }
    }
    // SAFETY: closing the epoll descriptor we created.
    unsafe { libc::close(ep) };
}

/// N loopback connections, the executor that writes to them and the reader that drains them.
struct Rig {
    conns: usize,
    to_ex: mpsc::Sender<Option<Run>>,
    from_ex: mpsc::Receiver<Outcome>,
    side: Arc<ReadSide>,
    executor: Option<glommio::ExecutorJoinHandle<()>>,
    reader: Option<JoinHandle<()>>,
}

impl Rig {
    fn new(conns: usize, pinned: bool) -> Rig {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind loopback");
        let addr = listener.local_addr().expect("local addr");
        let mut servers = Vec::with_capacity(conns);
        let mut clients = Vec::with_capacity(conns);
        for _ in 0..conns {
            let client = TcpStream::connect(addr).expect("connect");
            let (server, _) = listener.accept().expect("accept");
            server.set_nodelay(true).expect("TCP_NODELAY");
            servers.push(server);
            clients.push(client);
        }
        let side = Arc::new(ReadSide {
            base: Instant::now(),
            read_total: AtomicU64::new(0),
            target: AtomicU64::new(u64::MAX),
            end_ns: AtomicU64::new(0),
            stop: AtomicBool::new(false),
        });
        let reader_side = side.clone();
        let reader = thread::Builder::new()
            .name("fanout-reader".into())
            .spawn(move || reader(&clients, &reader_side, pinned.then_some(1)))
            .expect("spawn reader");
        let (to_ex, runs) = mpsc::channel::<Option<Run>>();
        let (outcomes, from_ex) = mpsc::channel();
        let ex_side = side.clone();
        let placement = if pinned { Placement::Fixed(0) } else { Placement::Unbound };
        let executor = LocalExecutorBuilder::new(placement)
            .name("fanout")
            .spawn(move || writer_shard(servers, ex_side, runs, outcomes))
            .expect("start executor");
        Rig { conns, to_ex, from_ex, side, executor: Some(executor), reader: Some(reader) }
    }

    fn run(&self, run: Run) -> Outcome {
        self.to_ex.send(Some(run)).expect("executor alive");
        self.from_ex.recv().expect("executor outcome")
    }
}

impl Drop for Rig {
    fn drop(&mut self) {
        let _ = self.to_ex.send(None);
        if let Some(e) = self.executor.take() {
            e.join().expect("executor panicked");
        }
        self.side.stop.store(true, Ordering::Release);
        if let Some(r) = self.reader.take() {
            r.join().expect("reader panicked");
        }
    }
}

fn pool() -> BufferPool {
    // Distinct leases alive at once stay below HWM_BYTES / size + BATCH + 1: every connection
    // gets every message, so the slowest connection's queue bounds them.
    BufferPool::new(&PoolConfig {
        classes: vec![
            SizeClass { slot_bytes: 256, slots: 16384 },
            SizeClass { slot_bytes: 2 << 10, slots: 4096 },
            SizeClass { slot_bytes: 16 << 10, slots: 1024 },
        ],
        mlock: false,
        prefault: true,
    })
    .expect("pool")
}

async fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + GUARD;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        glommio::timer::sleep(BACKOFF).await;
    }
}

/// The executor's body: set up both write paths over the same sockets, then serve runs (the
/// executor blocks on its std control channel between runs; nothing is in flight then).
async fn writer_shard(
    servers: Vec<TcpStream>,
    side: Arc<ReadSide>,
    runs: mpsc::Receiver<Option<Run>>,
    outcomes: mpsc::Sender<Outcome>,
) {
    let pool = pool();
    let payload: Vec<u8> = (0..16 << 10).map(|i: usize| (i * 7) as u8).collect();
    let sender = UringSender::new(SenderConfig::default()).expect("io_uring sender");
    let runner = glommio::spawn_local(sender.run());
    let slots: Vec<ConnSlot> = servers.iter().map(|s| sender.register(s.as_raw_fd()).expect("register")).collect();
    // The baseline: one writer task per connection over a glommio TcpStream on the same socket.
    let queues: Vec<LocalSender<Lease>> = servers
        .into_iter()
        .map(|s| {
            // SAFETY: the descriptor comes from into_raw_fd, so the glommio stream owns it
            // alone (the sender holds its own dup).
            let mut stream = unsafe { glommio::net::TcpStream::from_raw_fd(s.into_raw_fd()) };
            let (tx, rx) = local_channel::new_unbounded::<Lease>();
            glommio::spawn_local(async move {
                while let Some(lease) = rx.recv().await {
                    stream.write_all(&lease).await.expect("write_all");
                }
            })
            .detach();
            tx
        })
        .collect();
    let conns = slots.len() as u64;

    while let Ok(Some(run)) = runs.recv() {
        let bytes = run.msgs * conns * run.size as u64;
        let target = side.read_total.load(Ordering::SeqCst) + bytes;
        side.target.store(target, Ordering::SeqCst);
        let before = sender.stats();
        let cpu0 = thread_cpu();
        let start_ns = side.base.elapsed().as_nanos() as u64;
        for m in 0..run.msgs {
            let mut lease = pool.lease(run.size).expect("pool slot (HWM_BYTES bounds the leases alive)");
            let buf = &mut lease.as_mut_slice()[..run.size];
            buf.copy_from_slice(&payload[..run.size]);
            buf[..8].copy_from_slice(&m.to_le_bytes());
            let lease = lease.freeze(run.size);
            match run.method {
                Method::Uring => {
                    for &slot in &slots {
                        sender.enqueue(slot, OutBuf::Pooled(lease.clone())).expect("enqueue");
                    }
                }
                Method::WriteAll => {
                    for q in &queues {
                        q.try_send(lease.clone()).map_err(|_| "writer gone").expect("queue");
                    }
                }
            }
            drop(lease);
            if (m + 1) % run.batch as u64 == 0 || m + 1 == run.msgs {
                // End of a turn: let the flusher (or the writer tasks) run.
                glommio::executor().yield_now().await;
                let over = || match run.method {
                    Method::Uring => slots.iter().any(|&s| sender.queued_bytes(s) > HWM_BYTES),
                    Method::WriteAll => queues.iter().any(|q| q.len() * run.size > HWM_BYTES),
                };
                while over() {
                    glommio::timer::sleep(BACKOFF).await;
                }
            }
        }
        wait_until("readers got every byte", || side.read_total.load(Ordering::SeqCst) >= target).await;
        let cpu = thread_cpu().saturating_sub(cpu0);
        let end_ns = side.end_ns.load(Ordering::SeqCst);
        assert_eq!(side.read_total.load(Ordering::SeqCst), target, "readers got more than was sent");
        if run.method == Method::Uring {
            wait_until("sends completed", || sender.stats().ops_in_flight == 0).await;
        }
        let after = sender.stats();
        outcomes
            .send(Outcome {
                elapsed: Duration::from_nanos(end_ns.saturating_sub(start_ns)),
                deliveries: run.msgs * conns,
                cpu,
                ..delta(&before, &after)
            })
            .expect("main alive");
    }
    for slot in slots {
        sender.close(slot);
    }
    drop(queues);
    sender.stop();
    runner.await.expect("sender run");
    let leased: usize = pool.stats().classes.iter().map(|c| c.in_use).sum();
    assert_eq!(leased, 0, "every lease went back to the pool");
}

fn delta(before: &SenderStats, after: &SenderStats) -> Outcome {
    Outcome {
        submits: after.submits_total - before.submits_total,
        sqes: after.sqes_total - before.sqes_total,
        turns: after.flush_turns_total - before.flush_turns_total,
        bytes_sent: after.bytes_sent_total - before.bytes_sent_total,
        eagain: after.eagain_total - before.eagain_total,
        short_writes: after.short_writes_total - before.short_writes_total,
        ..Outcome::default()
    }
}

fn report(id: &str, method: Method, o: &Outcome) {
    let per = |d: Duration| d.as_nanos() as f64 / o.deliveries.max(1) as f64;
    let mut line = format!(
        "COUNTERS {id}: deliveries={} wall/delivery={:.1}ns executor_cpu/delivery={:.1}ns",
        o.deliveries,
        per(o.elapsed),
        per(o.cpu)
    );
    match method {
        Method::Uring => write!(
            line,
            " submits={} sqes={} sqes/submit={:.2} flush_turns={} deliveries/sqe={:.2} bytes/sqe={:.0} eagain={} short={}",
            o.submits,
            o.sqes,
            o.sqes as f64 / o.submits.max(1) as f64,
            o.turns,
            o.deliveries as f64 / o.sqes.max(1) as f64,
            o.bytes_sent as f64 / o.sqes.max(1) as f64,
            o.eagain,
            o.short_writes
        ),
        Method::WriteAll => write!(line, " write_all_calls={}", o.deliveries),
    }
    .expect("write to a String");
    println!("{line}");
}

fn fanout(c: &mut Criterion) {
    let pinned = two_cpus_allowed();
    if pinned {
        println!("fanout: executor pinned to CPU 0, reader thread to CPU 1");
    } else {
        println!("fanout: CPUs 0 and 1 are not both allowed: running UNPINNED");
    }
    for conns in CONN_COUNTS {
        let rig = Rig::new(conns, pinned);
        let mut g = c.benchmark_group(format!("fanout/n{conns}"));
        g.throughput(Throughput::Elements(rig.conns as u64));
        g.sampling_mode(SamplingMode::Flat);
        g.sample_size(20);
        let mut cases: Vec<(String, Method, usize, usize)> = Vec::new();
        for size in SIZES {
            cases.push((format!("uring/{size}B"), Method::Uring, size, BATCH));
            cases.push((format!("write_all/{size}B"), Method::WriteAll, size, BATCH));
        }
        cases.push(("uring_batch1/128B".into(), Method::Uring, 128, 1));
        cases.push(("write_all_batch1/128B".into(), Method::WriteAll, 128, 1));
        for (id, method, size, batch) in cases {
            let mut total = Outcome::default();
            g.bench_function(&id, |b| {
                b.iter_custom(|msgs| {
                    let o = rig.run(Run { method, size, msgs, batch });
                    total.add(&o);
                    o.elapsed
                });
            });
            report(&format!("fanout/n{conns}/{id}"), method, &total);
        }
        g.finish();
    }
}

criterion_group!(benches, fanout);
criterion_main!(benches);
