//! Per-shard `io_uring` batched sender: the fan-out write path.
//!
//! Owns: one `io_uring` (io-uring crate) per shard, an eventfd registered on it, and a slab of
//! outbound connection states (a `dup` of each socket, its queue of [`OutBuf`]s, the `msghdr`
//! and `iovec` array of its in-flight send). May not touch: the glommio reactor's own ring,
//! the read side of sockets, protocol encoding, or any other shard.
//!
//! # One loop turn
//! Callers [`enqueue`](UringSender::enqueue) buffers (no syscall: the connection is marked
//! dirty and the flusher task is woken, once per turn however many enqueues happen). The
//! flusher then builds one `SendMsg` per dirty connection that has no operation in flight,
//! gathering up to `iov_per_send_max` queued buffers, and makes ONE `io_uring_enter` for all
//! of them (more only if the submission queue fills up: then it submits and continues). The
//! reaper task awaits the eventfd and drains the completion queue in a plain loop (never from
//! a completion handler). One operation in flight per connection keeps per-connection order;
//! a short write advances an offset into the first unsent buffer and the rest goes next turn.
//!
//! Small frames for one connection alone (replies: PUBACK, OK, PONG…) can be queued with
//! [`enqueue_gathered`](UringSender::enqueue_gathered): they are copied one after another into
//! one pool buffer (the connection's *tail*), which is sealed into the queue before anything
//! else is queued on it and before its next send is built, so order is kept and the kernel
//! gets one iovec for a turn's replies instead of one each. Fan-out buffers are never copied:
//! the same buffer goes to every subscriber.
//!
//! # Ownership rule
//! Every buffer (and the `msghdr`/`iovec`s) referenced by a submitted SQE stays owned by its
//! connection state until that SQE's completion arrives: buffers are popped from the queue
//! only by the completion handler, a slot is freed only when it has no operation in flight,
//! and dropping the sender shuts those sockets down and waits (bounded) for the completions,
//! leaking the buffers rather than freeing them under the kernel if they never come.
//!
//! # Errno table (completion result of a send, or of the `POLLOUT` poll armed after EAGAIN)
//! | result                                      | meaning                 | action                                                         | counter             |
//! |---------------------------------------------|-------------------------|----------------------------------------------------------------|---------------------|
//! | `n >= 0`, all bytes                         | written                 | pop the sent buffers (leases released)                         | `bytes_sent_total`  |
//! | `0 < n <` bytes                             | short write             | pop what was sent, offset into the next buffer, dirty again    | `short_writes_total`|
//! | `0` of a non-empty send                     | no progress             | like `EINTR`                                                   | `retries_total`     |
//! | `EAGAIN` / `EWOULDBLOCK`                    | socket buffer full      | arm `PollAdd(POLLOUT)`; resend when it fires                   | `eagain_total`      |
//! | `EINTR`, `ENOBUFS`, `ENOMEM`                | transient               | dirty again, retry next turn; after `send_retries_max` in a row: dead | `retries_total` |
//! | `EPIPE`, `ECONNRESET`, `ENOTCONN`, `ESHUTDOWN`, `EBADF`, `ECANCELED` | peer or socket gone | dead: drop the queue, close the dup, state `Closed` | `errors_total` |
//! | anything else                               | unexpected              | `warn!` with the errno, then dead                              | `errors_total`      |
//!
//! A dead connection answers further enqueues with [`EnqueueError::Closed`]; its slot is freed
//! when the owner calls [`close`](UringSender::close). Nothing here panics on an errno.
//!
//! # Waking the reaper
//! The eventfd is created blocking and non-semaphore and registered with
//! `register_eventfd` (not the `_async` variant, so completions that happen inline during
//! `submit` also signal it). The reaper reads it through
//! `glommio::io::BufferedFile::from_raw_fd(..).read_at(0, 8)`: glommio issues that read on its
//! own ring, where it parks until the counter is non-zero, so the glommio thread sleeps in its
//! reactor instead of spinning; the read returns the counter and resets it, then the CQ is
//! drained. A completion that lands after the drain re-signals the eventfd, so no wakeup is
//! lost. The ring is created without `COOP_TASKRUN`/`DEFER_TASKRUN` on purpose: with those,
//! task work of this ring would not interrupt the thread while it sleeps inside glommio's
//! ring, and completions could sit unposted.
//!
//! Measured here (kernel 6.18, glommio 0.9): the read sits poll-armed in glommio's main ring
//! (`/proc/self/fdinfo`: `op=22` in its `PollList`); an idle executor wakes ~0.1 ms after a
//! CQE. But glommio polls its rings only when every task queue is idle or its preempt timer
//! fires (default 100 ms): a task that keeps its queue busy (yielding with
//! `yield_task_queue_now`/`yield_if_needed`, or `Latency::Matters` on the reaper's queue)
//! delays reaping by up to that timer; `LocalExecutorBuilder::preempt_timer(1 ms)` bounds it
//! to ~1 ms. Caveat: glommio 0.9.0 can park while a task queue is still runnable if it was
//! preempted before running anything (`run_task_queues` returns `false` for both cases; see
//! pull request #53 of the glommio/glommio repository); a shorter preempt timer made that hang
//! frequent in our tests (busy yield loops + 1 ms timer: ~1 run in 20 stuck). Producers
//! should be driven by I/O or timers, not by yield loops.
//!
//! # CQ sizing
//! Each connection has at most one operation in flight (a parked send to a slow reader stays
//! in flight), and at most [`ZC_HELD_MAX`] zero-copy notifications are outstanding, so the
//! completion queue is sized to at least `conns_max` (+ `ZC_HELD_MAX` when zero copy is
//! configured) entries and cannot overflow below the kernel maximum of 65536; at that maximum
//! the kernel keeps overflowed completions (`IORING_FEAT_NODROP`), and the overflow flag is
//! checked and flushed.
//!
//! # Baseline for comparison (not implemented here)
//! glommio's own `TcpStream` write path is one `send` syscall per `write_all` call, falling
//! back to readiness polling on its ring only when the socket would block: a per-connection
//! task looping `stream.write_all(buf.as_slice()).await` over its queue. That is the
//! baseline to benchmark this sender against (syscalls per delivered message).
//!
//! # Zero-copy sends (`SEND_ZC`)
//! Support is probed at start ([`SenderStats::send_zc_supported`]). A buffer of at least
//! [`SenderConfig::send_zc_min_bytes`] from a registered pool class is sent alone (the gather
//! stops before it, and the send after it starts behind it) as `SEND_ZC` with
//! `IORING_RECVSEND_FIXED_BUF`: the kernel sends from the pinned pool pages instead of copying
//! them into socket buffers. The threshold is measured, not guessed: with
//! `zc_probe` (bench/RESULTS.md, session 6), from a registered buffer on loopback a zero-copy
//! send costs 1.5–2.5× a copying one below 16 KiB, breaks even at 32 KiB and costs 0.3–0.6× at
//! 64–256 KiB; so small frames (nearly all of a chat workload) keep the copying write and
//! only large single frames can take this path. In the engine's fan-out on loopback it never
//! paid (60 KB frames to 3 subscribers each: 1.2–1.3× the CPU per delivery of copying,
//! session 7), as loopback copies at delivery anyway: the engine's configured default is 0
//! (off), to be set for real NICs. Such a send completes twice: its result (the
//! connection then goes on as after any send, its next send may follow at once) and later a
//! notification once the kernel no longer reads the pages. Until that notification a clone of
//! the buffer is *held* (in a bounded table, [`ZC_HELD_MAX`] entries; when it is full, sends
//! copy), so its pool slot cannot be reused under the kernel — which also means a slow
//! reader's unacknowledged data keeps large pool slots out of use (other frames then fall back
//! to heap buffers, counted). If the kernel refuses a zero-copy send with `EINVAL`,
//! `EOPNOTSUPP` or `EFAULT`, the sender stops using them and resends those
//! bytes by copying.
//!
//! # Fixed buffers
//! The shard registers its buffer pool with [`register_pool`](UringSender::register_pool):
//! one fixed buffer per size class. A send whose buffers all lie in one class is then a
//! `WRITEV_FIXED` (Linux 6.15+) from the same shared leases: the kernel copies from the pages
//! it pinned at registration instead of importing a user iovec array and copying from each
//! user iovec, which at one iovec per delivery was the one kernel cost where the engine
//! lost to Redis's single contiguous write (`_copy_from_iter`, 4.4 % vs 2.3 % of samples at
//! paced 50k; 2.1 % with fixed buffers, plus 0.5 % importing them). Sends mixing classes or
//! heap buffers stay `SendMsg`. A write cannot carry `MSG_NOSIGNAL`, so the pool is only
//! registered when the process ignores `SIGPIPE` (Rust's runtime does); `send_dontwait` maps to
//! `RWF_NOWAIT`, which fails with `EAGAIN` like `MSG_DONTWAIT`. If the kernel ever answers a
//! fixed write with `EINVAL`, `EOPNOTSUPP` or `EFAULT`, the sender stops using fixed buffers and
//! resends those bytes with `SendMsg` (counted as one retry).

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::fmt;
use std::future::Future;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::rc::Rc;

use bytes::Bytes;
use io_uring::{cqueue, opcode, squeue, types, IoUring, Probe};

use crate::notify::Notify;
use crate::phase::{self, Phase};
use crate::pool::{Lease, LeaseMut};

/// One outbound buffer. A message encoded once is queued as clones of the same `Pooled`
/// lease on every subscriber connection.
#[derive(Debug, Clone)]
pub enum OutBuf {
    /// A slot of the shard's buffer pool.
    Pooled(Lease),
    /// A heap buffer, for what did not fit in (or could not get) a pool slot.
    Heap(Bytes),
}

impl OutBuf {
    /// The bytes to send.
    pub fn as_slice(&self) -> &[u8] {
        match self {
            OutBuf::Pooled(l) => l,
            OutBuf::Heap(b) => b,
        }
    }

    /// Length in bytes.
    pub fn len(&self) -> usize {
        self.as_slice().len()
    }

    /// True when there is nothing to send.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl From<Lease> for OutBuf {
    fn from(l: Lease) -> Self {
        OutBuf::Pooled(l)
    }
}

impl From<Bytes> for OutBuf {
    fn from(b: Bytes) -> Self {
        OutBuf::Heap(b)
    }
}

/// Limits of one shard's sender; all sized at [`UringSender::new`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SenderConfig {
    /// Submission queue entries (kernel maximum 32768). A turn with more sends than this
    /// submits more than once.
    pub ring_entries: u32,
    /// Most buffers gathered into one `sendmsg` (at most `IOV_MAX` = 1024).
    pub iov_per_send_max: usize,
    /// Unsent bytes (queued plus in flight) above which `enqueue` answers `SlowConsumer`.
    pub conn_outbound_bytes_max: usize,
    /// Unsent buffers (queued plus in flight) above which `enqueue` answers `SlowConsumer`.
    pub conn_outbound_frames_max: usize,
    /// Connections registered at once (at most 65536, the kernel's CQ maximum).
    pub conns_max: usize,
    /// Consecutive transient failures (`EINTR`, `ENOBUFS`, `ENOMEM`, zero-byte sends) after
    /// which a connection is declared dead rather than retried forever.
    pub send_retries_max: u32,
    /// Send with `MSG_DONTWAIT`: a full socket buffer then completes with `EAGAIN` and this
    /// sender arms `POLLOUT` itself (and gathers whatever was queued meanwhile into the
    /// resend). Off: the kernel parks the send and retries it internally.
    pub send_dontwait: bool,
    /// Smallest single-buffer send (bytes) that goes out as `SEND_ZC` from the registered
    /// pool; 0: never (see the module doc for where zero copy pays).
    pub send_zc_min_bytes: usize,
}

impl Default for SenderConfig {
    fn default() -> Self {
        SenderConfig {
            ring_entries: 1024,
            iov_per_send_max: 64,
            conn_outbound_bytes_max: 4 << 20,
            conn_outbound_frames_max: 16384,
            conns_max: 65536,
            send_retries_max: 64,
            send_dontwait: false,
            send_zc_min_bytes: 0,
        }
    }
}

/// A registered connection. Stale handles (after [`UringSender::close`]) are detected by a
/// generation number and treated as closed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ConnSlot {
    index: u32,
    gen: u32,
}

impl ConnSlot {
    /// Index in the slab (stable while registered); for metrics and logs.
    pub fn index(self) -> usize {
        self.index as usize
    }
}

/// Life of a registered connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnState {
    /// Accepting enqueues.
    Open,
    /// `enqueue_final` was called; flushing what is queued, then shutdown.
    Closing,
    /// Finished or dead (or the handle is stale): enqueues return `Closed`.
    Closed,
}

/// Why a connection could not be registered.
#[derive(Debug, thiserror::Error)]
pub enum SenderError {
    /// The slab is full.
    #[error("sender connection slab full ({conns_max} connections)")]
    ConnsFull {
        /// The configured limit.
        conns_max: usize,
    },
    /// `dup` of the socket failed (usually `EMFILE`).
    #[error("dup of fd {fd} failed: {source}")]
    Dup {
        /// The fd passed to `register`.
        fd: RawFd,
        /// The OS error.
        #[source]
        source: io::Error,
    },
}

/// Why a buffer was not queued. The buffer is dropped.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum EnqueueError {
    /// Over `conn_outbound_bytes_max` or `conn_outbound_frames_max`; the caller decides the
    /// policy (typically `enqueue_final` of an error frame, then `close`).
    #[error("slow consumer: outbound queue limit reached")]
    SlowConsumer,
    /// The connection is closing, closed, dead or the handle is stale.
    #[error("connection closed")]
    Closed,
}

/// Counters of one shard's sender. `*_total` only grow; the rest are gauges or maxima.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SenderStats {
    /// Flusher turns that ran.
    pub flush_turns_total: u64,
    /// Successful `io_uring_enter` submissions.
    pub submits_total: u64,
    /// SQEs pushed (sends and polls).
    pub sqes_total: u64,
    /// Most SQEs carried by one submission.
    pub max_sqes_per_submit: u64,
    /// Failed submissions (retried next turn).
    pub submit_errors_total: u64,
    /// Times the reaper woke from the eventfd.
    pub eventfd_wakeups_total: u64,
    /// Completion-queue drains.
    pub reap_turns_total: u64,
    /// Completions handled.
    pub completions_total: u64,
    /// Most completions handled in one drain.
    pub max_completions_per_reap: u64,
    /// Bytes the kernel accepted.
    pub bytes_sent_total: u64,
    /// Sends that wrote less than asked and were resumed.
    pub short_writes_total: u64,
    /// `EAGAIN` completions (each arms a `POLLOUT`).
    pub eagain_total: u64,
    /// Transient failures retried (`EINTR`, `ENOBUFS`, `ENOMEM`, zero-byte sends).
    pub retries_total: u64,
    /// Completions with an error that killed the connection.
    pub errors_total: u64,
    /// Connections declared dead (errors or too many retries).
    pub conns_dead_total: u64,
    /// Enqueues refused with `SlowConsumer`.
    pub slow_consumer_total: u64,
    /// Times the CQ overflow flag was seen (should stay 0 by construction).
    pub cq_overflow_total: u64,
    /// Connections registered now.
    pub conns_in_use: u64,
    /// Operations submitted (or pushed) and not yet completed.
    pub ops_in_flight: u64,
    /// Completion queue size.
    pub cq_entries: u32,
    /// The kernel supports `IORING_OP_SEND_ZC` (used for large frames; see the module doc).
    pub send_zc_supported: bool,
    /// The kernel supports `IORING_OP_WRITEV_FIXED` (Linux 6.15+).
    pub writev_fixed_supported: bool,
    /// The buffer pool is registered as the ring's fixed buffers (see
    /// [`UringSender::register_pool`]).
    pub pool_registered: bool,
    /// Sends issued as `WRITEV_FIXED` from the registered pool (the rest of `sqes_total` are
    /// `SendMsg` sends and `POLLOUT` polls).
    pub fixed_sends_total: u64,
    /// Sends issued as `SEND_ZC` from the registered pool (also counted in
    /// `fixed_sends_total`).
    pub zc_sends_total: u64,
    /// Zero-copy notifications that said the kernel copied after all (loopback always does).
    pub zc_copied_total: u64,
    /// Buffers of zero-copy sends still held for their notification.
    pub zc_held: u64,
}

const OP_SEND: u64 = 1;
const OP_POLL: u64 = 2;
/// A `SEND_ZC`: the low 32 bits of its user data index the held-buffer table, not the slab.
const OP_SEND_ZC: u64 = 3;
/// Buffers of zero-copy sends held at once for their notifications; when the table is full,
/// sends copy.
pub const ZC_HELD_MAX: usize = 1024;
/// `IORING_SEND_ZC_REPORT_USAGE`: the notification says whether the kernel copied anyway.
const ZC_REPORT_USAGE: u16 = 1 << 3;
/// `IORING_NOTIF_USAGE_ZC_COPIED` in a notification's result.
const NOTIF_USAGE_ZC_COPIED: u32 = 1 << 31;
const GEN_MASK: u32 = 0x00FF_FFFF;
/// Queues that grew beyond this many entries are shrunk when their slot is freed, so one
/// past burst does not pin memory on a slot forever.
const QUEUE_RETAINED_CAPACITY_MAX: usize = 1024;

/// Wait before retrying a failed submit.
const SUBMIT_RETRY_BACKOFF: std::time::Duration = std::time::Duration::from_micros(100);

fn user_data(kind: u64, index: u32, gen: u32) -> u64 {
    (kind << 56) | (u64::from(gen & GEN_MASK) << 32) | u64::from(index)
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Op {
    Idle,
    /// `fixed`: from the registered pool (a `WRITEV_FIXED`, or a `SEND_ZC` when `zc`), else a
    /// `SendMsg`.
    Send { bytes: usize, fixed: bool, zc: bool },
    PollOut,
}

/// The buffer of a zero-copy send, kept until the kernel's notification says it no longer
/// reads it; and whose connection the send's result belongs to.
struct ZcHeld {
    index: u32,
    gen: u32,
    _buf: OutBuf,
}

/// What a failed completion means; see the errno table in the module doc.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Disposition {
    PollOut,
    Retry,
    Dead,
    DeadUnexpected,
}

fn classify(errno: i32) -> Disposition {
    match errno {
        // EWOULDBLOCK == EAGAIN on Linux.
        libc::EAGAIN => Disposition::PollOut,
        libc::EINTR | libc::ENOBUFS | libc::ENOMEM => Disposition::Retry,
        libc::EPIPE
        | libc::ECONNRESET
        | libc::ENOTCONN
        | libc::ESHUTDOWN
        | libc::EBADF
        | libc::ECANCELED => Disposition::Dead,
        _ => Disposition::DeadUnexpected,
    }
}

// Independent facts about one connection; an enum would multiply the states.
#[allow(clippy::struct_excessive_bools)]
struct Conn {
    gen: u32,
    in_use: bool,
    /// Our `dup` of the socket; `None` once finished or dead.
    fd: Option<OwnedFd>,
    /// Unsent buffers; the first `iovs` of them are in flight while `op` is `Send`.
    queue: VecDeque<OutBuf>,
    /// Bytes of `queue[0]` already sent.
    head_offset: usize,
    /// Unsent bytes in `queue` (queued plus in flight).
    queued_bytes: usize,
    op: Op,
    state: ConnState,
    /// In the dirty list (avoids duplicates).
    dirty: bool,
    want_pollout: bool,
    /// `close` was called while an operation was in flight: free the slot on completion.
    owner_gone: bool,
    retries: u32,
    /// Small frames for this connection alone (replies), copied one after another into one
    /// pool buffer: (buffer, bytes used). Never referenced by the kernel: it is sealed into
    /// `queue` before anything else is queued and before a send is built.
    tail: Option<(LeaseMut, usize)>,
    /// Stable heap addresses handed to the kernel by `SendMsg`.
    hdr: Box<libc::msghdr>,
    iov: Box<[libc::iovec]>,
}

impl Conn {
    fn new(iov_max: usize) -> Conn {
        Conn {
            gen: 0,
            in_use: false,
            fd: None,
            queue: VecDeque::new(),
            head_offset: 0,
            queued_bytes: 0,
            op: Op::Idle,
            state: ConnState::Closed,
            dirty: false,
            want_pollout: false,
            owner_gone: false,
            retries: 0,
            tail: None,
            // SAFETY: msghdr is plain integers and pointers; all-zero is its empty value.
            hdr: Box::new(unsafe { std::mem::zeroed() }),
            iov: vec![libc::iovec { iov_base: std::ptr::null_mut(), iov_len: 0 }; iov_max]
                .into_boxed_slice(),
        }
    }

    /// Whether `len` more bytes would pass the connection's outbound limits. An empty queue
    /// always admits one buffer: a frame is bounded by the protocol, and refusing a lone frame
    /// would wedge the connection.
    fn over_limits(&self, len: usize, cfg: &SenderConfig) -> bool {
        self.buffers() > 0 && (self.queued_bytes + len > cfg.conn_outbound_bytes_max || self.buffers() >= cfg.conn_outbound_frames_max)
    }

    /// Moves the gathered small frames, if any, to the end of the queue.
    fn seal_tail(&mut self) {
        if let Some((lease, used)) = self.tail.take() {
            if used > 0 {
                self.queue.push_back(OutBuf::Pooled(lease.freeze(used)));
            }
        }
    }

    /// Queued buffers, the gathering one included (what `outbound_frames_max` bounds).
    fn buffers(&self) -> usize {
        self.queue.len() + usize::from(self.tail.is_some())
    }

    /// Drops the first `n` unsent bytes (the kernel accepted them).
    fn consume(&mut self, n: usize) {
        debug_assert!(n <= self.queued_bytes);
        self.queued_bytes = self.queued_bytes.saturating_sub(n);
        let mut left = n;
        while left > 0 {
            let Some(front) = self.queue.front() else {
                tracing::error!(left, "sender: kernel reported more bytes sent than queued");
                break;
            };
            let rest = front.len() - self.head_offset;
            if left >= rest {
                left -= rest;
                self.queue.pop_front();
                self.head_offset = 0;
            } else {
                self.head_offset += left;
                left = 0;
            }
        }
    }
}

struct State {
    conns: Vec<Conn>,
    free: Vec<u32>,
    dirty: Vec<u32>,
    /// The dirty list being processed by the flusher (swapped, so no allocation per turn).
    scratch: Vec<u32>,
    stats: SenderStats,
    /// Pool classes registered as fixed buffers: a send from one of them is a
    /// `WRITEV_FIXED`. 0: none registered, or the kernel refused a fixed write (every send is
    /// a `SendMsg` from then on).
    fixed_regions: u16,
    /// Zero-copy sends are used (supported, configured, and never refused by the kernel).
    zc_enabled: bool,
    /// Held buffers of zero-copy sends, indexed by the low bits of their user data.
    zc_held: Vec<Option<ZcHeld>>,
    zc_free: Vec<u32>,
}

impl State {
    fn conn(&mut self, slot: ConnSlot) -> Option<&mut Conn> {
        self.conns
            .get_mut(slot.index as usize)
            .filter(|c| c.in_use && c.gen == slot.gen)
    }

    /// The connection, if it still takes new buffers (open, not closing or closed).
    fn open_conn(&mut self, slot: ConnSlot) -> Result<&mut Conn, EnqueueError> {
        self.conn(slot).filter(|c| c.state == ConnState::Open).ok_or(EnqueueError::Closed)
    }

    fn mark_dirty(&mut self, index: u32) {
        let conn = &mut self.conns[index as usize];
        if !conn.dirty {
            conn.dirty = true;
            self.dirty.push(index);
        }
    }

    /// Frees a slot with no operation in flight.
    fn free_slot(&mut self, index: u32) {
        let conn = &mut self.conns[index as usize];
        assert_eq!(conn.op, Op::Idle, "freeing a slot with an operation in flight");
        conn.queue.clear();
        conn.tail = None;
        if conn.queue.capacity() > QUEUE_RETAINED_CAPACITY_MAX {
            conn.queue.shrink_to(64);
        }
        conn.fd = None;
        conn.in_use = false;
        conn.owner_gone = false;
        conn.want_pollout = false;
        conn.state = ConnState::Closed;
        conn.queued_bytes = 0;
        conn.head_offset = 0;
        conn.retries = 0;
        conn.gen = conn.gen.wrapping_add(1) & GEN_MASK;
        self.free.push(index);
        self.stats.conns_in_use -= 1;
    }

    /// The connection is unusable: release its buffers and socket; the slot waits for `close`.
    fn kill(&mut self, index: u32) {
        let conn = &mut self.conns[index as usize];
        conn.queue.clear();
        conn.tail = None;
        conn.queued_bytes = 0;
        conn.head_offset = 0;
        conn.want_pollout = false;
        conn.fd = None;
        conn.state = ConnState::Closed;
        self.stats.conns_dead_total += 1;
    }

    /// Everything up to the final buffer is sent: shut the socket down and close our dup.
    fn finish(&mut self, index: u32) {
        let conn = &mut self.conns[index as usize];
        if let Some(fd) = conn.fd.take() {
            // SAFETY: fd is an open descriptor we own. Failure (peer already gone) is fine.
            if unsafe { libc::shutdown(fd.as_raw_fd(), libc::SHUT_RDWR) } != 0 {
                tracing::debug!(error = %io::Error::last_os_error(), "sender: shutdown after final buffer");
            }
        }
        conn.state = ConnState::Closed;
    }

    /// Handles one completion. Never submits and never calls out, so never recursive.
    fn complete(&mut self, ud: u64, res: i32, flags: u32, cfg: &SenderConfig) {
        let kind = ud >> 56;
        self.stats.completions_total += 1;
        let (index, gen) = if kind == OP_SEND_ZC {
            match self.zc_completion(ud as u32, res, flags) {
                Some(owner) => owner,
                // A notification: it only released the held buffer.
                None => return,
            }
        } else {
            (ud as u32, ((ud >> 32) as u32) & GEN_MASK)
        };
        self.stats.ops_in_flight = self.stats.ops_in_flight.saturating_sub(1);
        let Some(conn) = self.conns.get_mut(index as usize).filter(|c| c.in_use && c.gen == gen)
        else {
            tracing::error!(ud, res, "sender: completion for no live connection (bug)");
            return;
        };
        match (kind, conn.op) {
            (OP_SEND, Op::Send { bytes, fixed, zc: false }) | (OP_SEND_ZC, Op::Send { bytes, fixed, zc: true }) => {
                conn.op = Op::Idle;
                let zc = kind == OP_SEND_ZC;
                if fixed && matches!(-res, libc::EINVAL | libc::EOPNOTSUPP | libc::EFAULT) {
                    // The kernel refuses what the probe said it has (or our region bookkeeping
                    // is wrong): drop that kind of send for good (a zero-copy one falls back to
                    // WRITEV_FIXED, a WRITEV_FIXED to SendMsg) and resend these bytes.
                    let op = if zc { "SEND_ZC" } else { "WRITEV_FIXED" };
                    tracing::warn!(errno = -res, op, "sender: a send from the registered pool failed; not using that kind of send from now on");
                    if zc {
                        self.zc_enabled = false;
                    } else {
                        self.fixed_regions = 0;
                    }
                    self.failed(index, Disposition::Retry, -res, cfg);
                    self.after_op(index);
                    return;
                }
                match usize::try_from(res) {
                    Ok(n) if n > 0 || bytes == 0 => {
                        conn.consume(n);
                        conn.retries = 0;
                        self.stats.bytes_sent_total += n as u64;
                        if n < bytes {
                            self.stats.short_writes_total += 1;
                        }
                    }
                    Ok(_) => self.failed(index, Disposition::Retry, 0, cfg),
                    Err(_) => self.failed(index, classify(-res), -res, cfg),
                }
            }
            (OP_POLL, Op::PollOut) => {
                conn.op = Op::Idle;
                if res >= 0 {
                    // Writable (or POLLERR/POLLHUP: the resend reports the real errno).
                    conn.want_pollout = false;
                } else {
                    self.failed(index, classify(-res), -res, cfg);
                }
            }
            (kind, op) => {
                tracing::error!(kind, ?op, res, "sender: completion does not match the operation in flight (bug)");
                return;
            }
        }
        self.after_op(index);
    }

    /// A completion of a zero-copy send. Its notification releases the held buffer (`None`);
    /// its result names the connection it belongs to, and releases the buffer at once when no
    /// notification follows (`IORING_CQE_F_MORE` unset).
    fn zc_completion(&mut self, held: u32, res: i32, flags: u32) -> Option<(u32, u32)> {
        let Some(entry) = self.zc_held.get(held as usize).and_then(Option::as_ref) else {
            tracing::error!(held, res, "sender: zero-copy completion for no held buffer (bug)");
            return None;
        };
        let owner = (entry.index, entry.gen);
        if cqueue::notif(flags) {
            if (res as u32) & NOTIF_USAGE_ZC_COPIED != 0 {
                self.stats.zc_copied_total += 1;
            }
            self.release_held(held);
            return None;
        }
        if !cqueue::more(flags) {
            self.release_held(held);
        }
        Some(owner)
    }

    fn release_held(&mut self, held: u32) {
        self.zc_held[held as usize] = None;
        self.zc_free.push(held);
        self.stats.zc_held -= 1;
    }

    fn failed(&mut self, index: u32, what: Disposition, errno: i32, cfg: &SenderConfig) {
        let conn = &mut self.conns[index as usize];
        match what {
            Disposition::PollOut => {
                self.stats.eagain_total += 1;
                conn.want_pollout = true;
            }
            Disposition::Retry => {
                self.stats.retries_total += 1;
                conn.retries += 1;
                if conn.retries > cfg.send_retries_max {
                    tracing::warn!(errno, retries = conn.retries, "sender: too many transient send failures; dropping connection");
                    self.kill(index);
                }
            }
            Disposition::Dead => {
                self.stats.errors_total += 1;
                tracing::debug!(errno, "sender: connection gone");
                self.kill(index);
            }
            Disposition::DeadUnexpected => {
                self.stats.errors_total += 1;
                tracing::warn!(errno, error = %io::Error::from_raw_os_error(errno), "sender: unexpected send error; dropping connection");
                self.kill(index);
            }
        }
    }

    /// What a connection needs once it has nothing in flight. A connection whose owner is
    /// gone is freed, unless it is flushing its final buffer (`Closing`): that is still sent
    /// (bounded by the owner's [`UringSender::abort`] timer), then the slot is freed.
    fn after_op(&mut self, index: u32) {
        let conn = &self.conns[index as usize];
        let owner_gone = conn.owner_gone;
        match conn.state {
            ConnState::Closed => {
                if owner_gone {
                    self.free_slot(index);
                }
            }
            ConnState::Open if owner_gone => self.free_slot(index),
            _ if conn.buffers() > 0 || conn.want_pollout => self.mark_dirty(index),
            ConnState::Closing => {
                self.finish(index);
                if owner_gone {
                    self.free_slot(index);
                }
            }
            ConnState::Open => {}
        }
    }
}

struct Inner {
    ring: RefCell<IoUring>,
    state: RefCell<State>,
    /// Wakes the flusher at most once per turn, however many times it is notified.
    flush_wake: Notify,
    eventfd: OwnedFd,
    cfg: SenderConfig,
    stopping: Cell<bool>,
    running: Cell<bool>,
}

/// One shard's batched `io_uring` sender. Cheap to clone (one `Rc`); `!Send`.
#[derive(Clone)]
pub struct UringSender {
    inner: Rc<Inner>,
}

impl fmt::Debug for UringSender {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("UringSender").field("cfg", &self.inner.cfg).finish_non_exhaustive()
    }
}

fn invalid(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidInput, msg)
}

/// Whether this process ignores `SIGPIPE` (Rust's runtime does so before `main`).
fn sigpipe_ignored() -> bool {
    // SAFETY: a zeroed sigaction is a valid out-parameter; a null new action only queries.
    unsafe {
        let mut old: libc::sigaction = std::mem::zeroed();
        libc::sigaction(libc::SIGPIPE, std::ptr::null(), &raw mut old) == 0 && old.sa_sigaction == libc::SIG_IGN
    }
}

fn dup_cloexec(fd: RawFd) -> io::Result<OwnedFd> {
    // SAFETY: F_DUPFD_CLOEXEC on any integer is memory-safe; the result is checked.
    let d = unsafe { libc::fcntl(fd, libc::F_DUPFD_CLOEXEC, 0) };
    if d < 0 {
        Err(io::Error::last_os_error())
    } else {
        // SAFETY: d is a fresh descriptor that nothing else owns.
        Ok(unsafe { OwnedFd::from_raw_fd(d) })
    }
}

impl UringSender {
    /// Creates the ring, the eventfd, registers it and probes for `SEND_ZC`.
    pub fn new(cfg: SenderConfig) -> io::Result<UringSender> {
        const CQ_ENTRIES_MAX: usize = 65536;
        if cfg.ring_entries == 0 || cfg.ring_entries > 32768 {
            return Err(invalid(format!("ring_entries {} not in 1..=32768", cfg.ring_entries)));
        }
        if cfg.iov_per_send_max == 0 || cfg.iov_per_send_max > 1024 {
            return Err(invalid(format!("iov_per_send_max {} not in 1..=1024", cfg.iov_per_send_max)));
        }
        if cfg.conns_max == 0 || cfg.conns_max > CQ_ENTRIES_MAX || cfg.conns_max > u32::MAX as usize {
            return Err(invalid(format!("conns_max {} not in 1..={CQ_ENTRIES_MAX}", cfg.conns_max)));
        }
        if cfg.conn_outbound_frames_max == 0 || cfg.conn_outbound_bytes_max == 0 {
            return Err(invalid("conn_outbound_*_max must be positive".into()));
        }
        // One operation per connection at most: a CQ of conns_max entries cannot overflow.
        let zc_notifications = if cfg.send_zc_min_bytes > 0 { ZC_HELD_MAX } else { 0 };
        let cq_entries = (cfg.conns_max + zc_notifications)
            .max(2 * cfg.ring_entries as usize)
            .next_power_of_two()
            .min(CQ_ENTRIES_MAX);
        let ring = IoUring::builder()
            .setup_cqsize(cq_entries as u32)
            // A bad SQE must not strand the ones after it in the SQ.
            .setup_submit_all()
            .build(cfg.ring_entries)?;
        let mut probe = Probe::new();
        let probed = ring.submitter().register_probe(&mut probe).is_ok();
        let send_zc_supported = probed && probe.is_supported(opcode::SendZc::CODE);
        let writev_fixed_supported = probed && probe.is_supported(opcode::WritevFixed::CODE);
        // Blocking and non-semaphore: glommio parks its read until a CQE is posted, and one
        // read resets the counter however many CQEs were posted.
        // SAFETY: plain syscall; the result is checked.
        let efd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
        if efd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: efd is a fresh descriptor that nothing else owns.
        let eventfd = unsafe { OwnedFd::from_raw_fd(efd) };
        ring.submitter().register_eventfd(eventfd.as_raw_fd())?;
        let cq_actual = ring.params().cq_entries();
        tracing::info!(
            ring_entries = ring.params().sq_entries(),
            cq_entries = cq_actual,
            send_zc_supported,
            "io_uring sender ready"
        );
        let slab = State {
            conns: Vec::with_capacity(cfg.conns_max),
            free: Vec::with_capacity(cfg.conns_max),
            dirty: Vec::with_capacity(cfg.conns_max),
            scratch: Vec::with_capacity(cfg.conns_max),
            stats: SenderStats { cq_entries: cq_actual, send_zc_supported, writev_fixed_supported, ..SenderStats::default() },
            fixed_regions: 0,
            zc_enabled: false,
            zc_held: Vec::new(),
            zc_free: Vec::new(),
        };
        Ok(UringSender {
            inner: Rc::new(Inner {
                ring: RefCell::new(ring),
                state: RefCell::new(slab),
                flush_wake: Notify::default(),
                eventfd,
                cfg,
                stopping: Cell::new(false),
                running: Cell::new(false),
            }),
        })
    }

    /// Registers the buffer pool's mappings (`regions[i]` = size class `i`, as
    /// [`BufferPool::regions`](crate::pool::BufferPool::regions) gives them) as the ring's
    /// fixed buffers, so that a send whose buffers all lie in one class goes out as
    /// `WRITEV_FIXED`: the kernel copies from the pages it pinned at registration instead of
    /// importing and walking a user iovec per buffer (measured: see the module doc). Call once,
    /// before the first enqueue. Returns false, and every send stays a `SendMsg`, when the
    /// kernel lacks `WRITEV_FIXED` (before Linux 6.15), refuses the registration (typically
    /// `RLIMIT_MEMLOCK`: pinned pages count against it), or `SIGPIPE` is not ignored (a write
    /// cannot carry `MSG_NOSIGNAL`, so a peer that is gone would raise it).
    ///
    /// # Safety
    /// Each region must be one live mapping that stays mapped while any lease in it can be
    /// queued here. (The kernel pins the pages at registration, so it never reads freed memory
    /// even if the mapping goes first; what it sends is whatever the queued lease holds.)
    pub unsafe fn register_pool(&self, regions: &[(*const u8, usize)]) -> bool {
        if !self.inner.state.borrow().stats.writev_fixed_supported {
            tracing::info!("sender: the kernel has no IORING_OP_WRITEV_FIXED (Linux 6.15+); pool buffers are sent with sendmsg");
            return false;
        }
        if regions.is_empty() || regions.len() > usize::from(u16::MAX) || self.inner.state.borrow().fixed_regions > 0 {
            return false;
        }
        if !sigpipe_ignored() {
            tracing::info!("sender: SIGPIPE is not ignored, so writes could raise it; pool buffers are sent with sendmsg(MSG_NOSIGNAL)");
            return false;
        }
        let iovs: Vec<libc::iovec> = regions.iter().map(|&(p, n)| libc::iovec { iov_base: p.cast_mut().cast(), iov_len: n }).collect();
        // SAFETY: the caller guarantees live mappings; the ring only ever reads from them
        // (WRITEV_FIXED), never writes.
        match unsafe { self.inner.ring.borrow().submitter().register_buffers(&iovs) } {
            Ok(()) => {
                let mut st = self.inner.state.borrow_mut();
                st.fixed_regions = regions.len() as u16;
                st.zc_enabled = st.stats.send_zc_supported && self.inner.cfg.send_zc_min_bytes > 0;
                true
            }
            Err(error) => {
                let bytes: usize = regions.iter().map(|r| r.1).sum();
                tracing::warn!(
                    %error,
                    pool_bytes = bytes,
                    memlock_limit_bytes = crate::pool::memlock_limit_bytes(),
                    "sender: registering the buffer pool as io_uring fixed buffers failed \
                     (RLIMIT_MEMLOCK too low?); pool buffers are sent with sendmsg"
                );
                false
            }
        }
    }

    /// Registers a connected socket. The sender `dup`s `fd` and owns the dup, so the socket
    /// stays valid while a send is in flight even if the reader drops its stream.
    pub fn register(&self, fd: RawFd) -> Result<ConnSlot, SenderError> {
        let mut st = self.inner.state.borrow_mut();
        if st.free.is_empty() && st.conns.len() >= self.inner.cfg.conns_max {
            return Err(SenderError::ConnsFull { conns_max: self.inner.cfg.conns_max });
        }
        let dup = dup_cloexec(fd).map_err(|source| SenderError::Dup { fd, source })?;
        let index = if let Some(i) = st.free.pop() {
            i
        } else {
            // Capacity was reserved at start: this push never reallocates.
            st.conns.push(Conn::new(self.inner.cfg.iov_per_send_max));
            (st.conns.len() - 1) as u32
        };
        st.stats.conns_in_use += 1;
        let conn = &mut st.conns[index as usize];
        debug_assert!(!conn.in_use && conn.op == Op::Idle && conn.queue.is_empty());
        conn.in_use = true;
        conn.fd = Some(dup);
        conn.state = ConnState::Open;
        Ok(ConnSlot { index, gen: conn.gen })
    }

    /// Queues `buf` behind everything already queued on `slot`. No syscall.
    pub fn enqueue(&self, slot: ConnSlot, buf: OutBuf) -> Result<(), EnqueueError> {
        self.push(slot, buf, false)
    }

    /// Queues a last buffer, bypassing the limits; once everything up to it is sent (or a
    /// send fails) the socket is shut down (`SHUT_RDWR`) and our dup closed. Later enqueues
    /// return `Closed`.
    pub fn enqueue_final(&self, slot: ConnSlot, buf: OutBuf) -> Result<(), EnqueueError> {
        self.push(slot, buf, true)
    }

    /// Queues a copy of a small frame meant for this connection alone (a reply), gathered
    /// with the other small frames queued since its last send into one pool buffer: one iovec
    /// for a turn's replies instead of one each. `fresh` leases that buffer when none has room.
    /// `Ok(false)`: not queued (no buffer to gather into, or the frame is larger than one);
    /// queue it with [`enqueue`](UringSender::enqueue).
    pub fn enqueue_gathered(&self, slot: ConnSlot, frame: &[u8], fresh: impl FnOnce() -> Option<LeaseMut>) -> Result<bool, EnqueueError> {
        let cfg = &self.inner.cfg;
        {
            let mut st = self.inner.state.borrow_mut();
            let conn = st.open_conn(slot)?;
            let len = frame.len();
            let room = conn.tail.as_ref().is_some_and(|(lease, used)| used + len <= lease.capacity());
            // A frame that fits the tail adds bytes, not a buffer.
            let over = if room { conn.queued_bytes + len > cfg.conn_outbound_bytes_max } else { conn.over_limits(len, cfg) };
            if over {
                st.stats.slow_consumer_total += 1;
                return Err(EnqueueError::SlowConsumer);
            }
            if !room {
                conn.seal_tail();
                match fresh() {
                    Some(lease) if lease.capacity() >= len => conn.tail = Some((lease, 0)),
                    _ => return Ok(false),
                }
            }
            let Some((lease, used)) = conn.tail.as_mut() else { return Ok(false) };
            lease.as_mut_slice()[*used..*used + len].copy_from_slice(frame);
            *used += len;
            conn.queued_bytes += len;
            st.mark_dirty(slot.index);
        }
        self.inner.flush_wake.notify();
        Ok(true)
    }

    fn push(&self, slot: ConnSlot, buf: OutBuf, last: bool) -> Result<(), EnqueueError> {
        let cfg = &self.inner.cfg;
        {
            let mut st = self.inner.state.borrow_mut();
            let conn = st.open_conn(slot)?;
            let len = buf.len();
            if conn.over_limits(len, cfg) && !last {
                st.stats.slow_consumer_total += 1;
                return Err(EnqueueError::SlowConsumer);
            }
            if len > 0 {
                conn.seal_tail();
                conn.queue.push_back(buf);
                conn.queued_bytes += len;
            }
            if last {
                conn.state = ConnState::Closing;
            }
            st.mark_dirty(slot.index);
        }
        self.inner.flush_wake.notify();
        Ok(())
    }

    /// The owner is gone: drop the queue (after the in-flight operation, if any, completes),
    /// close the dup and free the slot. With an operation in flight the socket is shut down
    /// so that a send parked on a slow reader completes now. Stale handles are ignored.
    ///
    /// A connection that is `Closing` (after [`enqueue_final`](UringSender::enqueue_final))
    /// keeps flushing its queue first, so its last frame (ERROR, GOAWAY) still reaches the
    /// peer; the owner bounds that with [`abort`](UringSender::abort).
    pub fn close(&self, slot: ConnSlot) {
        let wake = {
            let mut st = self.inner.state.borrow_mut();
            let Some(conn) = st.conn(slot) else { return };
            let flushing_final = conn.state == ConnState::Closing && conn.buffers() > 0;
            if conn.op == Op::Idle && !flushing_final {
                st.free_slot(slot.index);
                false
            } else {
                conn.owner_gone = true;
                if !flushing_final {
                    if let Some(fd) = &conn.fd {
                        // SAFETY: fd is an open descriptor we own.
                        unsafe { libc::shutdown(fd.as_raw_fd(), libc::SHUT_RDWR) };
                    }
                }
                if conn.op == Op::Idle {
                    st.mark_dirty(slot.index);
                    true
                } else {
                    false
                }
            }
        };
        if wake {
            self.inner.flush_wake.notify();
        }
    }

    /// Cuts a connection now: `shutdown(SHUT_RDWR)` on its socket, so a send parked on a peer
    /// that does not read completes with an error and the connection is dropped (and freed,
    /// if its owner already closed it). The reader of the same socket sees EOF. Stale handles
    /// are ignored, so a delayed abort can never hit a later connection.
    pub fn abort(&self, slot: ConnSlot) {
        let mut st = self.inner.state.borrow_mut();
        let Some(conn) = st.conn(slot) else { return };
        if let Some(fd) = &conn.fd {
            // SAFETY: fd is an open descriptor we own.
            unsafe { libc::shutdown(fd.as_raw_fd(), libc::SHUT_RDWR) };
        }
        if conn.op == Op::Idle {
            if conn.owner_gone {
                st.free_slot(slot.index);
            } else {
                st.kill(slot.index);
            }
        }
    }

    /// The connection's state; `Closed` for a stale handle.
    pub fn state(&self, slot: ConnSlot) -> ConnState {
        self.inner.state.borrow_mut().conn(slot).map_or(ConnState::Closed, |c| c.state)
    }

    /// True when enqueues are refused (`Closing`, `Closed` or a stale handle).
    pub fn is_closed(&self, slot: ConnSlot) -> bool {
        self.state(slot) != ConnState::Open
    }

    /// Unsent bytes (queued plus in flight); 0 for a closed or stale connection.
    pub fn queued_bytes(&self, slot: ConnSlot) -> usize {
        self.inner.state.borrow_mut().conn(slot).map_or(0, |c| c.queued_bytes)
    }

    /// A snapshot of the counters.
    pub fn stats(&self) -> SenderStats {
        let st = self.inner.state.borrow();
        SenderStats { pool_registered: st.fixed_regions > 0, ..st.stats }
    }

    /// The flusher and the reaper, to spawn on the shard's glommio executor. Returns after
    /// [`stop`](UringSender::stop), or with the error if reading the eventfd fails.
    pub fn run(&self) -> impl Future<Output = io::Result<()>> + 'static {
        let this = self.clone();
        async move {
            if this.inner.running.replace(true) {
                return Err(io::Error::other("UringSender::run is already running"));
            }
            this.inner.stopping.set(false);
            // The reaper is a task of its own, not a future zipped with the flusher: a zipped
            // future is polled at every flusher wakeup, and glommio's pending read keeps one
            // waker clone per poll until it completes, so a busy flusher overflowed the task's
            // 16-bit reference count (an abort after ~32 000 wakeups with no completion).
            let reaper = glommio::spawn_local({
                let this = this.clone();
                async move { this.reap_loop().await }
            });
            let flush_result = this.flush_loop().await;
            let reap_result = reaper.await;
            this.inner.running.set(false);
            flush_result.and(reap_result)
        }
    }

    /// Makes `run` return at its next wakeup. Queued data is not flushed any further.
    pub fn stop(&self) {
        self.inner.stopping.set(true);
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a live u64 to our eventfd.
        let _ = unsafe { libc::write(self.inner.eventfd.as_raw_fd(), (&raw const one).cast(), 8) };
        self.inner.flush_wake.notify();
    }

    async fn flush_loop(&self) -> io::Result<()> {
        loop {
            self.inner.flush_wake.wait().await;
            if self.inner.stopping.get() {
                return Ok(());
            }
            // Reap what has completed before sending more. The CQ is shared memory, so this
            // costs no syscall, and under load it is what keeps completions flowing: glommio
            // only polls its own ring (where the eventfd read waits) when its task queues run
            // dry or its preempt timer fires, which a busy shard may not do for up to 100 ms.
            let turn_started = phase::now();
            self.reap_completions();
            let deferred = self.flush_turn();
            if self.settle() {
                self.inner.flush_wake.notify();
            }
            phase::lap(Phase::Flush, turn_started);
            if deferred {
                // A submit failed (EAGAIN/EBUSY: the kernel is short of memory or has
                // completions to post). Back off briefly on a timer rather than yielding:
                // glommio 0.9 may park with a yielded task still runnable.
                glommio::timer::sleep(SUBMIT_RETRY_BACKOFF).await;
                self.inner.flush_wake.notify();
            }
        }
    }

    async fn reap_loop(&self) -> io::Result<()> {
        use glommio::io::BufferedFile;
        let fd = dup_cloexec(self.inner.eventfd.as_raw_fd())?;
        // SAFETY: BufferedFile takes ownership of our fresh dup.
        let file = unsafe { BufferedFile::from_raw_fd(std::os::fd::IntoRawFd::into_raw_fd(fd)) };
        let result = loop {
            if self.inner.stopping.get() {
                break Ok(());
            }
            match file.read_at(0, 8).await.map_err(io::Error::from) {
                Ok(r) if r.len() == 8 => {}
                Ok(r) => break Err(io::Error::other(format!("eventfd read returned {} B", r.len()))),
                Err(e) if matches!(e.kind(), io::ErrorKind::Interrupted | io::ErrorKind::WouldBlock) => {}
                Err(e) => {
                    // Without the reaper no completion is ever handled: say so loudly.
                    tracing::error!(error = %e, "sender: reading the ring's eventfd failed; reaper stops");
                    break Err(e);
                }
            }
            self.inner.state.borrow_mut().stats.eventfd_wakeups_total += 1;
            self.reap();
        };
        let _ = file.close().await;
        result
    }

    /// Drains the completion queue once. Returns nothing: it only changes connection states
    /// and wakes the flusher if some became dirty.
    fn reap(&self) {
        if self.settle() {
            self.inner.flush_wake.notify();
        }
    }

    /// Reaps what has completed, then lets the eventfd wake the reaper only while operations
    /// are still in flight. Sends to sockets with room complete inside `io_uring_enter`, so
    /// most turns end with nothing in flight: the eventfd then stays quiet instead of costing
    /// a signal, a completion on glommio's ring and a re-armed read per submission. Returns
    /// true when some connection became dirty.
    fn settle(&self) -> bool {
        let mut dirty = self.reap_completions();
        let in_flight = {
            let stats = &self.inner.state.borrow().stats;
            stats.ops_in_flight > 0 || stats.zc_held > 0
        };
        {
            let mut ring = self.inner.ring.borrow_mut();
            let (_, _, cq) = ring.split();
            if in_flight {
                cq.enable_eventfd();
            } else {
                cq.disable_eventfd();
            }
        }
        if in_flight {
            // A completion posted while notifications were off signalled nothing: look again.
            dirty |= self.reap_completions();
        }
        dirty
    }

    /// Drains the completion queue once; true when some connection became dirty.
    fn reap_completions(&self) -> bool {
        let inner = &*self.inner;
        {
            let mut ring = inner.ring.borrow_mut();
            let mut st = inner.state.borrow_mut();
            let (submitter, sq, mut cq) = ring.split();
            let mut n: u64 = 0;
            for cqe in &mut cq {
                st.complete(cqe.user_data(), cqe.result(), cqe.flags(), &inner.cfg);
                n += 1;
            }
            drop(cq);
            if sq.cq_overflow() {
                // Cannot happen with one op per connection and cq_entries >= conns_max; if it
                // does, an enter with GETEVENTS moves the kept CQEs in and signals the eventfd.
                st.stats.cq_overflow_total += 1;
                tracing::error!("sender: completion queue overflowed");
                let _ = submitter.submit();
            }
            st.stats.reap_turns_total += 1;
            st.stats.max_completions_per_reap = st.stats.max_completions_per_reap.max(n);
            !st.dirty.is_empty()
        }
    }

    /// One flusher turn: one SQE per dirty idle connection, one submit for all. Returns true
    /// when work was deferred to the next turn.
    fn flush_turn(&self) -> bool {
        let inner = &*self.inner;
        let cfg = &inner.cfg;
        let mut ring = inner.ring.borrow_mut();
        let mut st_guard = inner.state.borrow_mut();
        let st = &mut *st_guard;
        st.stats.flush_turns_total += 1;
        std::mem::swap(&mut st.dirty, &mut st.scratch);
        let (submitter, mut sq, _cq) = ring.split();
        let send_flags = libc::MSG_NOSIGNAL as u32
            | if cfg.send_dontwait { libc::MSG_DONTWAIT as u32 } else { 0 };
        let write_flags = if cfg.send_dontwait { libc::RWF_NOWAIT } else { 0 };
        let fixed_regions = st.fixed_regions;
        let zc_min_bytes = if st.zc_enabled && fixed_regions > 0 { cfg.send_zc_min_bytes } else { 0 };
        let mut pushed: u64 = 0;
        let mut deferred_from = None;
        for i in 0..st.scratch.len() {
            let index = st.scratch[i];
            let conn = &mut st.conns[index as usize];
            conn.dirty = false;
            if !conn.in_use || conn.op != Op::Idle || conn.state == ConnState::Closed {
                continue;
            }
            let Some(fd) = conn.fd.as_ref().map(AsRawFd::as_raw_fd) else { continue };
            conn.seal_tail();
            let (entry, op, held): (squeue::Entry, Op, Option<u32>) = if conn.want_pollout {
                let e = opcode::PollAdd::new(types::Fd(fd), libc::POLLOUT as u32)
                    .build()
                    .user_data(user_data(OP_POLL, index, conn.gen));
                (e, Op::PollOut, None)
            } else if !conn.queue.is_empty() {
                let mut bytes = 0;
                let mut iovs = 0;
                // The one registered mapping every buffer of this send lies in, if any.
                let mut region = None;
                for (k, buf) in conn.queue.iter().take(cfg.iov_per_send_max).enumerate() {
                    let s = if k == 0 { &buf.as_slice()[conn.head_offset..] } else { buf.as_slice() };
                    let class = match buf {
                        OutBuf::Pooled(lease) if lease.class() < fixed_regions => Some(lease.class()),
                        _ => None,
                    };
                    // A large registered buffer goes out alone, zero copy: the gather stops
                    // before it, or after it when it comes first.
                    let zero_copy = zc_min_bytes > 0 && class.is_some() && s.len() >= zc_min_bytes;
                    if zero_copy && k > 0 {
                        break;
                    }
                    conn.iov[k] = libc::iovec { iov_base: s.as_ptr() as *mut libc::c_void, iov_len: s.len() };
                    bytes += s.len();
                    iovs += 1;
                    region = if k == 0 { class } else { region.filter(|&r| Some(r) == class) };
                    if zero_copy {
                        break;
                    }
                }
                // One large buffer from the registered pool: zero copy (module doc), holding a
                // clone of the buffer until the kernel's notification.
                let held = match region {
                    Some(_) if zc_min_bytes > 0 && iovs == 1 && bytes >= zc_min_bytes => {
                        hold(&mut st.zc_held, &mut st.zc_free, &mut st.stats, index, conn.gen, conn.queue[0].clone())
                    }
                    _ => None,
                };
                let e = match (region, held) {
                    (Some(region), Some(held)) => opcode::SendZc::new(types::Fd(fd), conn.iov[0].iov_base as *const u8, bytes as u32)
                        .buf_index(Some(region))
                        .flags(send_flags as i32)
                        .zc_flags(ZC_REPORT_USAGE)
                        .build()
                        .user_data((OP_SEND_ZC << 56) | u64::from(held)),
                    (Some(region), None) => opcode::WritevFixed::new(types::Fd(fd), conn.iov.as_ptr(), iovs as u32, region)
                        .rw_flags(write_flags)
                        .build()
                        .user_data(user_data(OP_SEND, index, conn.gen)),
                    (None, _) => {
                        // SAFETY: all-zero is msghdr's empty value.
                        *conn.hdr = unsafe { std::mem::zeroed() };
                        conn.hdr.msg_iov = conn.iov.as_mut_ptr();
                        conn.hdr.msg_iovlen = iovs;
                        opcode::SendMsg::new(types::Fd(fd), &raw const *conn.hdr)
                            .flags(send_flags)
                            .build()
                            .user_data(user_data(OP_SEND, index, conn.gen))
                    }
                };
                (e, Op::Send { bytes, fixed: region.is_some(), zc: held.is_some() }, held)
            } else {
                if conn.state == ConnState::Closing {
                    let owner_gone = conn.owner_gone;
                    st.finish(index);
                    if owner_gone {
                        st.free_slot(index);
                    }
                }
                continue;
            };
            // SAFETY (ownership rule): the msghdr, iovecs and buffers this entry points to are
            // owned by `conn` and stay put until its completion: `op` is set below, and
            // nothing pops the queue, frees the slot or rewrites `hdr`/`iov` while op != Idle.
            let mut ok = unsafe { sq.push(&entry) }.is_ok();
            if !ok {
                // SQ full: submit what we have and continue with an empty SQ.
                sq.sync();
                if submit(&submitter, &mut st.stats, pushed).is_ok() {
                    pushed = 0;
                    sq.sync();
                    // SAFETY: as above.
                    ok = unsafe { sq.push(&entry) }.is_ok();
                }
            }
            if !ok {
                if let Some(held) = held {
                    st.release_held(held);
                }
                deferred_from = Some(i);
                break;
            }
            st.conns[index as usize].op = op;
            st.stats.ops_in_flight += 1;
            st.stats.sqes_total += 1;
            st.stats.fixed_sends_total += u64::from(matches!(op, Op::Send { fixed: true, .. }));
            st.stats.zc_sends_total += u64::from(held.is_some());
            pushed += 1;
        }
        if let Some(from) = deferred_from {
            for i in from..st.scratch.len() {
                let index = st.scratch[i];
                st.conns[index as usize].dirty = false;
                st.mark_dirty(index);
            }
        }
        st.scratch.clear();
        sq.sync();
        let mut deferred = deferred_from.is_some();
        if pushed > 0 && submit(&submitter, &mut st.stats, pushed).is_err() {
            // The SQEs stay in the SQ and go with the next successful submit.
            deferred = true;
        }
        deferred
    }
}

/// Holds a clone of a zero-copy send's buffer until its notification; the index for its user
/// data, or `None` when the table is full (the send then copies).
fn hold(held: &mut Vec<Option<ZcHeld>>, free: &mut Vec<u32>, stats: &mut SenderStats, index: u32, gen: u32, buf: OutBuf) -> Option<u32> {
    let slot = match free.pop() {
        Some(slot) => slot,
        None if held.len() < ZC_HELD_MAX => {
            held.push(None);
            (held.len() - 1) as u32
        }
        None => return None,
    };
    held[slot as usize] = Some(ZcHeld { index, gen, _buf: buf });
    stats.zc_held += 1;
    Some(slot)
}

fn submit(submitter: &io_uring::Submitter<'_>, stats: &mut SenderStats, sqes: u64) -> io::Result<()> {
    loop {
        match submitter.submit() {
            Ok(_) => {
                stats.submits_total += 1;
                stats.max_sqes_per_submit = stats.max_sqes_per_submit.max(sqes);
                return Ok(());
            }
            Err(e) if e.raw_os_error() == Some(libc::EINTR) => {}
            Err(e) => {
                // EAGAIN/EBUSY: the kernel is short of resources or has completions to post;
                // the SQEs stay queued and the next turn retries.
                stats.submit_errors_total += 1;
                tracing::warn!(error = %e, "sender: io_uring submit failed; retrying next turn");
                return Err(e);
            }
        }
    }
}

impl Drop for Inner {
    fn drop(&mut self) {
        let st = self.state.get_mut();
        if st.stats.ops_in_flight == 0 && st.stats.zc_held == 0 {
            return;
        }
        // Operations still in flight reference our buffers: shut their sockets down so they
        // complete now, and wait for them (bounded) before anything is freed. Buffers held for
        // zero-copy notifications are waited for too (a shutdown does not hurry those: they
        // come when the kernel frees the data, so a peer that stopped reading can make this
        // wait run out; then the buffers are leaked rather than freed under the kernel).
        for conn in &st.conns {
            if conn.op != Op::Idle {
                if let Some(fd) = &conn.fd {
                    // SAFETY: fd is an open descriptor we own.
                    unsafe { libc::shutdown(fd.as_raw_fd(), libc::SHUT_RDWR) };
                }
            }
        }
        let ring = self.ring.get_mut();
        let ts = types::Timespec::new().nsec(10_000_000);
        let args = types::SubmitArgs::new().timespec(&ts);
        for _ in 0..200 {
            if st.stats.ops_in_flight == 0 && st.stats.zc_held == 0 {
                break;
            }
            let _ = ring.submitter().submit_with_args(1, &args);
            for cqe in &mut ring.completion() {
                st.complete(cqe.user_data(), cqe.result(), cqe.flags(), &self.cfg);
            }
        }
        if st.stats.ops_in_flight > 0 || st.stats.zc_held > 0 {
            tracing::error!(
                ops_in_flight = st.stats.ops_in_flight,
                zc_held = st.stats.zc_held,
                "sender dropped with operations or zero-copy notifications still in flight; leaking their buffers"
            );
            std::mem::forget(std::mem::take(&mut st.conns));
            std::mem::forget(std::mem::take(&mut st.zc_held));
        }
    }
}
