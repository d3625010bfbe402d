//! One shard: the sessions it owns, the connections it serves, and the fan-out between them.
//!
//! A shard runs on one glommio executor pinned to one CPU and shares nothing with other shards
//! (Seastar's picture). It owns:
//! - the sessions whose `hash(tenant, session) % shards` is this shard ([`Session`]: seq, epoch,
//!   history), with the set of shards that have subscribers for each;
//! - its connections and, per session, which of its connections subscribe to it;
//! - its buffer pool and its io_uring sender.
//!
//! Work for a session owned elsewhere goes out as a [`Request`] on the mesh; the owner answers
//! with [`Event`]s. The owner encodes each message once: into one pool buffer queued on every
//! local subscriber, and into one shared `Bytes` sent to every other shard with subscribers,
//! which queues that same buffer on each of its own subscribers.
//!
//! Borrow rule: `state` is borrowed only between awaits, never across one.

use std::cell::{Cell, RefCell};
use std::collections::{HashMap, VecDeque};
use std::os::fd::RawFd;
use std::rc::{Rc, Weak};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use hdrhistogram::Histogram;
use switchboard_protocol::{
    ConversationEventKind, DeliverRef, EncodeError, ErrorCode, ErrorFrame, Frame, GoAway, GoAwayReason, PubAck, PubAckRef, ReadCursor, ResumeFrom, Subscribed, Success, Text,
    Typing,
};

use crate::config::{Config, DurabilityMode};
use crate::history::{HistoryLog, LogSpan};
use crate::journal::{DmaStorage, Health, Journal, JournalError, JournalStats, Record, RecordKind, Ticket};
use crate::notify::Notify;
use crate::mesh::{ConnId, Event, KeyRef, LinkStats, PeerLink, PublishRequest, PublishView, Request, SessionKey};
use crate::persist;
use crate::phase::{self, Phase};
use crate::pool::{BufferPool, LeaseMut};
use crate::session::{PublishOutcome, ResumePlan, Session};
use crate::shutdown::Latch;
use crate::uring::{ConnSlot, EnqueueError, OutBuf, UringSender};

mod desk_control;
mod desk_host;

pub use desk_control::{DeskAnswer, DeskMetrics, DeskQuery, PolicyRefusal, QueueView, INITIAL_POLICY_VERSION};

/// A set of shard indexes (at most 256 shards).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
struct ShardSet([u64; 4]);

impl ShardSet {
    fn insert(&mut self, shard: usize) {
        self.0[shard / 64] |= 1 << (shard % 64);
    }
    fn remove(&mut self, shard: usize) {
        self.0[shard / 64] &= !(1 << (shard % 64));
    }
    fn contains(&self, shard: usize) -> bool {
        self.0[shard / 64] & (1 << (shard % 64)) != 0
    }
    /// The members, lowest first: one step per member, not per possible shard (this runs for
    /// every published message).
    fn iter(self) -> impl Iterator<Item = usize> {
        self.0.into_iter().enumerate().flat_map(|(word_index, word)| {
            let mut rest = word;
            std::iter::from_fn(move || {
                (rest != 0).then(|| {
                    let bit = rest.trailing_zeros() as usize;
                    rest &= rest - 1;
                    word_index * 64 + bit
                })
            })
        })
    }
}

struct OwnedSession {
    session: Session,
    /// Shards with at least one subscriber (this one included).
    interest: ShardSet,
    /// When it was last published to or subscribed to, Unix milliseconds (the idle sweep).
    last_active_ms: u64,
    /// Its conversation ended (a CLOSED or ABANDONED event): the idle sweep drops it after
    /// `limits.closed_session_linger_ms` instead of `limits.session_idle_ms`.
    ended: bool,
}

#[derive(Default)]
struct LocalSubscribers {
    conns: Vec<LocalConn>,
    /// Subscriptions sent to the owner and not answered yet: while any is pending, the owner
    /// must keep sending this shard the session's messages.
    pending: u32,
}

/// A subscribed connection of this shard, with its sender slot, so that fan-out queues on it
/// without looking the connection up (a closing or closed connection's slot refuses enqueues
/// itself; a stale one, reused by a later connection, is told apart by its generation).
#[derive(Clone, Copy)]
struct LocalConn {
    conn: ConnId,
    slot: ConnSlot,
}

/// A journaled PUBLISH (or conversation event) waiting for its acknowledgement, in journal
/// order.
struct PendingAck {
    /// A conversation event from the desk: no publisher to answer; supervisors get it too.
    event: bool,
    /// `None`: a duplicate of a message still pending; answered once everything before it is.
    ticket: Option<Ticket>,
    origin: usize,
    conn: ConnId,
    correlation: u32,
    key: SessionKey,
    client_msg_id: u64,
    epoch: u64,
    seq: u64,
    durability: switchboard_protocol::Durability,
    /// The DELIVER frame to fan out once acknowledged (`None` for a duplicate).
    frame: Option<Bytes>,
    ingress_raw: u64,
}

/// A connection as the shard sees it.
pub(crate) struct ConnEntry {
    slot: ConnSlot,
    pub(crate) tenant: Option<Text>,
    /// The sessions it subscribes to: the same key allocation as the shard's local
    /// subscriber entry (a pointer each, not a copy of the ids).
    pub(crate) subscriptions: SessionSet,
    closing: bool,
    /// Raw clock reading of the last bytes received, for the idle sweep.
    last_read_raw: u64,
    /// The token-expiry timer; dropped (cancelled) with the connection.
    pub(crate) expiry: Option<glommio::Task<()>>,
}

/// Connection ids are handed out by this shard in sequence, never by a peer, so hashing them
/// needs no flooding resistance: a multiply spreads them over the table.
#[derive(Default)]
struct ConnIdHasher(u64);

impl std::hash::Hasher for ConnIdHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &byte in bytes {
            self.0 = (self.0 ^ u64::from(byte)).wrapping_mul(0x0100_0000_01b3);
        }
    }
    fn write_u64(&mut self, value: u64) {
        self.0 = value.wrapping_mul(0x9e37_79b9_7f4a_7c15);
    }
}

type ConnMap<V> = HashMap<ConnId, V, std::hash::BuildHasherDefault<ConnIdHasher>>;

/// Session keys come from the network, so their maps are randomly keyed (a fresh seed per
/// map): foldhash's quality variant, several times cheaper than std's SipHash for the short
/// ids looked up on every publish.
type SessionMap<V> = hashbrown::HashMap<SessionKey, V, foldhash::quality::RandomState>;

/// A session key shared by the local subscriber entry and every subscribing connection's set:
/// 100 000 sessions with three subscribers each otherwise kept four copies of every key.
type SharedKey = Rc<SessionKey>;

/// A connection's subscriptions (looked up by `&SessionKey`).
pub(crate) type SessionSet = hashbrown::HashSet<SharedKey, foldhash::quality::RandomState>;

#[derive(Default)]
struct ShardState {
    sessions: SessionMap<OwnedSession>,
    /// Sessions held per tenant that has `sessions_per_shard_max` of its own.
    tenant_sessions: hashbrown::HashMap<Text, usize, foldhash::quality::RandomState>,
    local: hashbrown::HashMap<SharedKey, LocalSubscribers, foldhash::quality::RandomState>,
    conns: ConnMap<ConnEntry>,
}

/// Counters of one shard (single-threaded; read by the control thread through a snapshot).
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct ShardCounters {
    /// Connections accepted.
    pub connections_accepted_total: u64,
    /// Connections refused at the limit.
    pub connections_refused_total: u64,
    /// PUBLISH frames that appended a message (on the owner).
    pub publishes_total: u64,
    /// PUBLISH frames answered as duplicates.
    pub publishes_duplicate_total: u64,
    /// Frames queued to subscribers by fan-out.
    pub deliveries_total: u64,
    /// Bytes queued to subscribers by fan-out.
    pub delivery_bytes_total: u64,
    /// Bytes read from connections.
    pub bytes_received_total: u64,
    /// Connections closed as slow consumers.
    pub slow_consumer_disconnects_total: u64,
    /// Connections closed for protocol errors.
    pub protocol_errors_total: u64,
    /// Requests refused with an ERROR (connection kept).
    pub request_errors_total: u64,
    /// Frames that went to a heap buffer because the pool was exhausted.
    pub pool_fallbacks_total: u64,
    /// Sessions refused at `sessions_per_shard_max` (the shard's, or a tenant's own).
    pub session_limit_refusals_total: u64,
    /// PUBLISH frames refused because the journal could not take them.
    pub journal_refusals_total: u64,
    /// Sessions dropped by the idle sweep.
    pub sessions_dropped_idle_total: u64,
}

/// Everything one shard owns. Lives in an `Rc` on its executor.
pub struct Shard {
    /// This shard's index.
    pub index: usize,
    /// Number of shards.
    pub shards: usize,
    /// The configuration.
    pub config: Arc<Config>,
    /// Decoder limits derived from the configuration.
    pub limits: switchboard_protocol::Limits,
    pool: BufferPool,
    /// The io_uring sender all outbound bytes go through.
    pub sender: UringSender,
    state: RefCell<ShardState>,
    /// Every message's frame, for resume and the idempotency window (see `history.rs`).
    history: RefCell<HistoryLog>,
    requests_out: Vec<Option<Rc<PeerLink<Request>>>>,
    events_out: Vec<Option<Rc<PeerLink<Event>>>>,
    counters: Cell<ShardCounters>,
    latency_ns: RefCell<Histogram<u64>>,
    clock: quanta::Clock,
    /// (quanta raw, wall-clock µs) read together; see [`Shard::now_us`].
    wall_anchor: Cell<(u64, u64)>,
    next_conn: Cell<u64>,
    fanout_scratch: RefCell<Vec<LocalConn>>,
    /// This shard, for tasks it spawns (they must not outlive it).
    me: Weak<Shard>,
    /// Fires when the shard must stop.
    pub shutdown: Rc<Latch>,
    /// Token verification; `None` when no tenant is configured (open mode).
    pub auth: Option<crate::auth::Authenticator>,
    /// This shard's journal; `None` when every tenant is memory only.
    journal: Option<Journal<DmaStorage>>,
    /// Journaled publishes waiting for their acknowledgement, oldest first.
    acks: RefCell<VecDeque<PendingAck>>,
    acks_wakeup: Notify,
    /// Reused for encoding journal records.
    record_scratch: RefCell<Vec<u8>>,
    /// Reused for a journaled frame, encoded before it goes into the history ring.
    frame_scratch: RefCell<Vec<u8>>,
    /// Tenants whose durability differs from `config.journal.durability`.
    tenant_durability: Vec<(String, DurabilityMode)>,
    /// Tenants with a session quota of their own on each shard.
    tenant_session_quota: Vec<(String, usize)>,
    /// The epoch the next new session gets.
    next_session_epoch: Cell<u64>,
    /// Whether any rate limit is configured (else the token-bucket check is skipped).
    rate_limited: bool,
    /// The customer-service side: desks of tenants hashed here, roles of local connections.
    desk: desk_host::DeskHost,
}

fn link_stats<T: Send + 'static>(links: &[Option<Rc<PeerLink<T>>>]) -> Vec<(usize, LinkStats)> {
    links.iter().enumerate().filter_map(|(peer, link)| link.as_ref().map(|link| (peer, link.stats()))).collect()
}

/// What the control thread reads of a shard.
#[derive(Debug, Clone)]
pub struct ShardSnapshot {
    /// Shard index.
    pub shard: usize,
    /// Open connections.
    pub connections: usize,
    /// Sessions owned.
    pub sessions: usize,
    /// Sessions with local subscribers.
    pub subscribed_sessions: usize,
    /// Counters.
    pub counters: ShardCounters,
    /// Request links per peer (peer, stats).
    pub request_links: Vec<(usize, LinkStats)>,
    /// Event links per peer.
    pub event_links: Vec<(usize, LinkStats)>,
    /// Pool counters.
    pub pool: crate::pool::PoolStats,
    /// io_uring sender counters.
    pub sender: crate::uring::SenderStats,
    /// Publish decoded → frame queued on the subscriber's socket, in nanoseconds.
    pub latency_ns: Histogram<u64>,
    /// The journal's state and counters, when there is one.
    pub journal: Option<(Health, JournalStats)>,
    /// Journaled publishes waiting for their acknowledgement.
    pub acks_pending: usize,
}

impl Shard {
    /// Builds a shard's state. Called on its own executor.
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        index: usize,
        shards: usize,
        config: Arc<Config>,
        epoch: u64,
        pool: BufferPool,
        history: HistoryLog,
        sender: UringSender,
        requests_out: Vec<Option<Rc<PeerLink<Request>>>>,
        events_out: Vec<Option<Rc<PeerLink<Event>>>>,
        clock: quanta::Clock,
        journal: Option<Journal<DmaStorage>>,
    ) -> Rc<Shard> {
        let limits = switchboard_protocol::Limits { frame_body_bytes_max: config.limits.frame_body_bytes_max };
        let auth = crate::auth::Authenticator::new(&config.tenants, config.auth.leeway_s);
        let tenant_durability = config
            .tenants
            .iter()
            .filter_map(|tenant| tenant.durability.filter(|&d| d != config.journal.durability).map(|d| (tenant.id.clone(), d)))
            .collect();
        let tenant_session_quota = config.tenants.iter().filter_map(|tenant| tenant.sessions_per_shard_max.map(|max| (tenant.id.clone(), max))).collect();
        let desk = desk_host::DeskHost::default();
        let rate_limited = config.any_rate_limit();
        Rc::new_cyclic(|me| Shard {
            desk,
            me: me.clone(),
            index,
            shards,
            limits,
            config,
            pool,
            sender,
            state: RefCell::new(ShardState::default()),
            history: RefCell::new(history),
            requests_out,
            events_out,
            counters: Cell::new(ShardCounters::default()),
            latency_ns: RefCell::new(Histogram::new_with_bounds(1, 60_000_000_000, 3).expect("static histogram bounds are valid")),
            clock,
            wall_anchor: Cell::new((0, 0)),
            next_conn: Cell::new(1),
            fanout_scratch: RefCell::new(Vec::new()),
            shutdown: Rc::new(Latch::default()),
            auth,
            journal,
            acks: RefCell::new(VecDeque::new()),
            acks_wakeup: Notify::default(),
            record_scratch: RefCell::new(Vec::new()),
            frame_scratch: RefCell::new(Vec::new()),
            tenant_durability,
            tenant_session_quota,
            next_session_epoch: Cell::new(epoch.max(1)),
            rate_limited,
        })
    }

    /// Puts sessions restored from the journal in place (at start, before listening).
    pub fn restore(&self, sessions: Vec<(SessionKey, Session)>) {
        let mut state = self.state.borrow_mut();
        for (key, session) in sessions {
            if self.session_quota(&key.tenant).is_some() {
                *state.tenant_sessions.entry(key.tenant.clone()).or_default() += 1;
            }
            state.sessions.insert(key, OwnedSession { session, interest: ShardSet::default(), last_active_ms: self.now_us() / 1000, ended: false });
        }
    }

    /// The journal, if this shard has one.
    pub fn journal(&self) -> Option<&Journal<DmaStorage>> {
        self.journal.as_ref()
    }

    fn durability_of(&self, tenant: &Text) -> DurabilityMode {
        if self.journal.is_none() {
            return DurabilityMode::None;
        }
        self.tenant_durability
            .iter()
            .find(|(id, _)| id.as_str() == tenant.as_str())
            .map_or(self.config.journal.durability, |&(_, mode)| mode)
    }

    /// The raw clock, for ingress timestamps.
    pub fn clock(&self) -> &quanta::Clock {
        &self.clock
    }

    pub(crate) fn count(&self, change: impl FnOnce(&mut ShardCounters)) {
        let mut counters = self.counters.get();
        change(&mut counters);
        self.counters.set(counters);
    }

    /// A snapshot for /metrics.
    pub fn snapshot(&self) -> ShardSnapshot {
        let state = self.state.borrow();
        ShardSnapshot {
            shard: self.index,
            connections: state.conns.len(),
            sessions: state.sessions.len(),
            subscribed_sessions: state.local.len(),
            counters: self.counters.get(),
            request_links: link_stats(&self.requests_out),
            event_links: link_stats(&self.events_out),
            pool: self.pool.stats(),
            sender: self.sender.stats(),
            latency_ns: self.latency_ns.borrow().clone(),
            journal: self.journal.as_ref().map(|journal| (journal.health(), journal.stats())),
            acks_pending: self.acks.borrow().len(),
        }
    }

    /// Wall-clock microseconds (DELIVER timestamps, idle accounting, retention), counted on
    /// from the TSC (`quanta`) and anchored to the system clock again every
    /// [`WALL_REANCHOR_NS`]: a `clock_gettime` per publish was ~0.4 % of the shard's CPU at
    /// 50k publishes/s. Between anchors the value can differ from the system clock by the TSC's
    /// drift over that interval (microseconds), and a re-anchor can step it back by as much:
    /// every user subtracts with saturation.
    fn now_us(&self) -> u64 {
        let raw = self.clock.raw();
        let (anchor_raw, anchor_us) = self.wall_anchor.get();
        let since_ns = self.clock.delta_as_nanos(anchor_raw, raw);
        if anchor_raw != 0 && since_ns < WALL_REANCHOR_NS {
            return anchor_us + since_ns / 1000;
        }
        let now_us = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_micros() as u64);
        self.wall_anchor.set((raw, now_us));
        now_us
    }

    fn record_latency(&self, ingress_raw: u64) {
        if ingress_raw == 0 {
            return;
        }
        let elapsed = self.clock.delta(ingress_raw, self.clock.raw());
        let _ = self.latency_ns.borrow_mut().record((elapsed.as_nanos() as u64).max(1));
    }

    // ---- connections ----

    /// Registers an accepted connection; `None` when the shard is at its connection limit.
    pub(crate) fn add_conn(&self, raw_fd: RawFd) -> Option<ConnId> {
        if self.state.borrow().conns.len() >= self.config.limits.connections_per_shard_max {
            self.count(|c| c.connections_refused_total += 1);
            return None;
        }
        let slot = match self.sender.register(raw_fd) {
            Ok(slot) => slot,
            Err(error) => {
                tracing::warn!(shard = self.index, %error, "cannot register connection with the sender");
                self.count(|c| c.connections_refused_total += 1);
                return None;
            }
        };
        let conn = (self.index as u64) << 48 | self.next_conn.get();
        self.next_conn.set(self.next_conn.get() + 1);
        let entry = ConnEntry { slot, tenant: None, subscriptions: SessionSet::default(), closing: false, last_read_raw: self.clock.raw(), expiry: None };
        self.state.borrow_mut().conns.insert(conn, entry);
        self.count(|c| c.connections_accepted_total += 1);
        Some(conn)
    }

    /// Runs `f` on a connection's entry, if it is still open.
    pub(crate) fn with_conn<R>(&self, conn: ConnId, f: impl FnOnce(&mut ConnEntry) -> R) -> Option<R> {
        self.state.borrow_mut().conns.get_mut(&conn).map(f)
    }

    /// True once the connection is closing (GOAWAY or ERROR sent) or gone.
    pub(crate) fn is_closing(&self, conn: ConnId) -> bool {
        self.state.borrow().conns.get(&conn).is_none_or(|entry| entry.closing || self.sender.is_closed(entry.slot))
    }

    /// Forgets a connection whose reader has stopped: its subscriptions end; its sender slot
    /// is released once in-flight sends complete (a last ERROR or GOAWAY is still flushed).
    pub(crate) fn remove_conn(&self, conn: ConnId) {
        self.desk_conn_closed(conn);
        let Some(entry) = self.state.borrow_mut().conns.remove(&conn) else { return };
        for key in &entry.subscriptions {
            self.drop_local_subscriber(conn, key);
        }
        self.sender.close(entry.slot);
    }

    /// Encodes a frame into a pool buffer; when the pool is exhausted, into a heap buffer
    /// (counted): nothing is dropped for lack of pool space.
    pub(crate) fn encode(&self, frame: &Frame, correlation: u32) -> OutBuf {
        let len = frame.encoded_len();
        if let Ok(mut lease) = self.pool.lease(len) {
            let mut dst = &mut lease.as_mut_slice()[..len];
            if frame.encode(correlation, &mut dst).is_ok() {
                return OutBuf::Pooled(lease.freeze(len));
            }
        } else {
            self.count(|c| c.pool_fallbacks_total += 1);
        }
        OutBuf::Heap(self.encode_heap(frame, correlation))
    }

    fn encode_heap(&self, frame: &Frame, correlation: u32) -> Bytes {
        // Every frame the engine builds comes from validated input or bounded server data, so
        // an encode error is a bug; answer with an internal error frame rather than panic.
        frame.to_bytes(correlation).unwrap_or_else(|error| {
            tracing::error!(shard = self.index, %error, "engine built an unencodable frame");
            Frame::Error(ErrorFrame { code: ErrorCode::Internal.as_u16(), message: Text::from_static("internal error") })
                .to_bytes(correlation)
                .unwrap_or_default()
        })
    }

    /// Queues a frame on a connection. A small one (a PUBACK, OK, PONG…) is gathered with the
    /// connection's other small frames into one pool buffer (see `UringSender::enqueue_gathered`).
    pub(crate) fn send_frame(&self, conn: ConnId, frame: &Frame, correlation: u32) {
        let len = frame.encoded_len();
        if len <= GATHERED_FRAME_BYTES_MAX {
            let mut scratch = [0_u8; GATHERED_FRAME_BYTES_MAX];
            let mut dst = &mut scratch[..len];
            if frame.encode(correlation, &mut dst).is_ok() && self.send_gathered(conn, &scratch[..len]) {
                return;
            }
        }
        let out = self.encode(frame, correlation);
        self.send_buf(conn, out);
    }

    /// Gathers a small encoded frame on a connection; false when it must be queued on its own
    /// (no pool buffer to gather into). A connection over its outbound limit is closed as a
    /// slow consumer (and the frame counts as handled).
    fn send_gathered(&self, conn: ConnId, frame: &[u8]) -> bool {
        let slot = match self.state.borrow().conns.get(&conn) {
            Some(entry) if !entry.closing => entry.slot,
            _ => return true,
        };
        match self.sender.enqueue_gathered(slot, frame, || self.gather_lease()) {
            Ok(gathered) => gathered,
            Err(EnqueueError::SlowConsumer) => {
                self.evict_slow_consumer(conn);
                true
            }
            Err(EnqueueError::Closed) => true,
        }
    }

    /// A buffer to gather small frames into. Only a slot of the gathering size: under pressure
    /// the pool would hand out a larger class, which large fan-out frames need more.
    fn gather_lease(&self) -> Option<LeaseMut> {
        self.pool.lease(GATHER_BUFFER_BYTES).ok().filter(|lease| lease.capacity() <= GATHER_BUFFER_BYTES)
    }

    /// Queues an encoded buffer on a connection; a connection over its outbound limit is
    /// closed as a slow consumer.
    fn send_buf(&self, conn: ConnId, out: OutBuf) -> bool {
        let slot = match self.state.borrow().conns.get(&conn) {
            Some(entry) if !entry.closing => entry.slot,
            _ => return false,
        };
        match self.sender.enqueue(slot, out) {
            Ok(()) => true,
            Err(EnqueueError::SlowConsumer) => {
                self.evict_slow_consumer(conn);
                false
            }
            Err(EnqueueError::Closed) => false,
        }
    }

    /// Replies to a request with ERROR; the connection stays open.
    pub(crate) fn fail_request(&self, conn: ConnId, correlation: u32, code: ErrorCode, message: &'static str) {
        self.count(|c| c.request_errors_total += 1);
        let frame = Frame::Error(ErrorFrame { code: code.as_u16(), message: Text::from_static(message) });
        self.send_frame(conn, &frame, correlation);
    }

    /// Sends a last frame (ERROR or GOAWAY) past the outbound limit and closes the connection
    /// once it is written — or after `grace` if the peer does not read it.
    pub(crate) fn close_conn(&self, conn: ConnId, last: &Frame, correlation: u32, grace: Duration) {
        let slot = {
            let mut state = self.state.borrow_mut();
            let Some(entry) = state.conns.get_mut(&conn) else { return };
            if entry.closing {
                return;
            }
            entry.closing = true;
            entry.slot
        };
        let out = self.encode(last, correlation);
        // Closed already: nothing left to say on this connection.
        let _ = self.sender.enqueue_final(slot, out);
        glommio::spawn_local(abort_after(slot, grace, self.me.clone())).detach();
    }

    /// Closes a connection for breaking the protocol: ERROR with the code, then close.
    pub(crate) fn protocol_error(&self, conn: ConnId, correlation: u32, code: ErrorCode, message: String) {
        self.count(|c| c.protocol_errors_total += 1);
        let frame = Frame::Error(ErrorFrame { code: code.as_u16(), message: Text::from(message) });
        self.close_conn(conn, &frame, correlation, Duration::from_millis(self.config.limits.slow_consumer_close_ms));
    }

    fn evict_slow_consumer(&self, conn: ConnId) {
        self.count(|c| c.slow_consumer_disconnects_total += 1);
        tracing::info!(shard = self.index, conn, "slow consumer: outbound limit exceeded, closing");
        let frame = Frame::GoAway(GoAway {
            reason: GoAwayReason::SlowConsumer,
            reconnect_after_ms: 0,
            message: Text::from_static("outbound buffer limit exceeded; resume from your last seq"),
        });
        self.close_conn(conn, &frame, 0, Duration::from_millis(self.config.limits.slow_consumer_close_ms));
    }

    /// GOAWAY(auth expired) to a connection whose token has expired, if it is still open.
    pub(crate) fn expire_token(&self, conn: ConnId) {
        let frame = Frame::GoAway(GoAway {
            reason: GoAwayReason::AuthExpired,
            reconnect_after_ms: 0,
            message: Text::from_static("token expired; reconnect with a fresh one"),
        });
        self.close_conn(conn, &frame, 0, Duration::from_millis(self.config.limits.slow_consumer_close_ms));
    }

    /// A weak handle, for timers that must not keep the shard alive.
    pub(crate) fn weak(&self) -> Weak<Shard> {
        self.me.clone()
    }

    /// GOAWAY(shutdown) to every connection.
    pub(crate) fn goaway_all(&self, grace: Duration) {
        let conns: Vec<ConnId> = self.state.borrow().conns.keys().copied().collect();
        let frame = Frame::GoAway(GoAway {
            reason: GoAwayReason::Shutdown,
            reconnect_after_ms: 0,
            message: Text::from_static("server shutting down"),
        });
        for conn in conns {
            self.close_conn(conn, &frame, 0, grace);
        }
    }

    /// Notes that a connection sent something (keepalive).
    pub(crate) fn touch(&self, conn: ConnId) {
        let now = self.clock.raw();
        if let Some(entry) = self.state.borrow_mut().conns.get_mut(&conn) {
            entry.last_read_raw = now;
        }
    }

    /// Closes connections silent for more than twice the keepalive interval, with
    /// GOAWAY(idle timeout). Runs every half keepalive, until shutdown.
    pub(crate) async fn sweep_idle(self: Rc<Self>) {
        let keepalive = Duration::from_millis(u64::from(self.config.limits.keepalive_ms));
        let frame = Frame::GoAway(GoAway {
            reason: GoAwayReason::IdleTimeout,
            reconnect_after_ms: 0,
            message: Text::from_static("nothing received within twice the keepalive interval"),
        });
        let grace = Duration::from_millis(self.config.limits.slow_consumer_close_ms);
        while !self.shutdown.is_set() {
            glommio::timer::Timer::new(keepalive / 2).await;
            let now = self.clock.raw();
            let idle: Vec<ConnId> = self
                .state
                .borrow()
                .conns
                .iter()
                .filter(|(_, entry)| !entry.closing && self.clock.delta(entry.last_read_raw, now) > keepalive * 2)
                .map(|(&conn, _)| conn)
                .collect();
            for conn in idle {
                tracing::debug!(shard = self.index, conn, "idle timeout");
                self.close_conn(conn, &frame, 0, grace);
            }
        }
    }

    /// Open connections.
    pub(crate) fn connection_count(&self) -> usize {
        self.state.borrow().conns.len()
    }

    // ---- requests from this shard's connections ----

    /// SUBSCRIBE from a local connection.
    pub(crate) async fn subscribe(&self, conn: ConnId, correlation: u32, key: SessionKey, from: ResumeFrom) {
        let owner = key.shard(self.shards);
        let key = {
            let mut state = self.state.borrow_mut();
            let ShardState { conns, local, .. } = &mut *state;
            let Some(entry) = conns.get_mut(&conn) else { return };
            if entry.subscriptions.contains(&key) {
                drop(state);
                return self.fail_request(conn, correlation, ErrorCode::InvalidState, "already subscribed to this session");
            }
            if entry.subscriptions.len() >= self.config.limits.subscriptions_per_connection_max as usize {
                drop(state);
                return self.fail_request(conn, correlation, ErrorCode::LimitExceeded, "subscriptions per connection limit reached");
            }
            // Kept for the subscription's lifetime: one owned copy of the strings per session
            // (not pinning a read buffer), shared with every connection subscribing to it.
            let shared = match local.get_key_value_mut(&key) {
                Some((shared, subscribers)) => {
                    subscribers.pending += 1;
                    shared.clone()
                }
                None => {
                    let shared = Rc::new(SessionKey::owned(&key.tenant, &key.session));
                    local.insert(shared.clone(), LocalSubscribers { pending: 1, ..LocalSubscribers::default() });
                    shared
                }
            };
            entry.subscriptions.insert(shared.clone());
            // What the request carries: the owned strings, not the read buffer's.
            (*shared).clone()
        };
        if owner == self.index {
            self.owner_subscribe(self.index, conn, correlation, key, from);
        } else {
            self.request(owner, Request::Subscribe { conn, correlation, key, from }).await;
        }
    }

    /// UNSUBSCRIBE from a local connection.
    pub(crate) fn unsubscribe(&self, conn: ConnId, correlation: u32, key: &SessionKey) {
        let removed = self.with_conn(conn, |entry| entry.subscriptions.remove(key)).unwrap_or(false);
        if !removed {
            return self.fail_request(conn, correlation, ErrorCode::NotFound, "not subscribed to this session");
        }
        self.drop_local_subscriber(conn, key);
        self.send_frame(conn, &Frame::Success(Success {}), correlation);
    }

    fn drop_local_subscriber(&self, conn: ConnId, key: &SessionKey) {
        let now_unused = {
            let mut state = self.state.borrow_mut();
            let Some(local) = state.local.get_mut(key) else { return };
            local.conns.retain(|c| c.conn != conn);
            let unused = local.conns.is_empty() && local.pending == 0;
            if unused {
                state.local.remove(key);
            }
            unused
        };
        if now_unused {
            self.uninterest(key.clone());
        }
    }

    fn uninterest(&self, key: SessionKey) {
        let owner = key.shard(self.shards);
        if owner == self.index {
            self.owner_uninterest(self.index, &key);
        } else if let Some(link) = &self.requests_out[owner] {
            // Not awaited: called from event handling, which must never wait (see mesh.rs).
            link.push(Request::Uninterest { key });
        }
    }

    /// PUBLISH from a local connection.
    pub(crate) async fn publish(&self, request: PublishRequest) {
        let owner = request.key.shard(self.shards);
        if owner == self.index {
            self.publish_owned_here(&request.view());
            self.wait_for_event_links().await;
        } else {
            self.request(owner, Request::Publish(request)).await;
        }
    }

    /// PUBLISH from a local connection to a session this shard owns, borrowed from where it
    /// was read. The caller then waits with [`wait_for_event_links`](Shard::wait_for_event_links).
    pub(crate) fn publish_owned_here(&self, publish: &PublishView<'_>) {
        let started = phase::now();
        self.owner_publish(self.index, publish);
        phase::lap(Phase::Publish, started);
    }

    /// READ_CURSOR from a local connection.
    pub(crate) async fn read_cursor(&self, conn: ConnId, correlation: u32, key: SessionKey, participant: Text, seq: u64) {
        let owner = key.shard(self.shards);
        if owner == self.index {
            self.owner_read_cursor(self.index, conn, correlation, &key, &participant, seq);
            self.wait_for_event_links().await;
        } else {
            self.request(owner, Request::ReadCursor { conn, correlation, key, participant, seq }).await;
        }
    }

    /// TYPING from a local connection.
    pub(crate) async fn typing(&self, key: SessionKey, participant: Text, active: bool) {
        let owner = key.shard(self.shards);
        if owner == self.index {
            self.owner_typing(&key, &participant, active);
            self.wait_for_event_links().await;
        } else {
            self.request(owner, Request::Typing { key, participant, active }).await;
        }
    }

    async fn request(&self, owner: usize, request: Request) {
        if let Some(link) = &self.requests_out[owner] {
            link.push(request);
            link.wait_for_room().await;
        }
    }

    /// A PUBACK for `origin`'s connection: written straight into the connection's gathering
    /// buffer when it is local, else sent over the mesh (with the session id of `owned_key`,
    /// which a PUBLISH from another shard always has).
    fn reply_pub_ack(&self, origin: usize, conn: ConnId, correlation: u32, ack: &PubAckRef<'_>, owned_key: Option<&SessionKey>) {
        if origin == self.index {
            let len = ack.encoded_len();
            let mut scratch = [0_u8; GATHERED_FRAME_BYTES_MAX];
            if let Some(mut dst) = scratch.get_mut(..len) {
                if ack.encode(correlation, &mut dst).is_ok() && self.send_gathered(conn, &scratch[..len]) {
                    return;
                }
            }
        }
        let PubAckRef { session, client_msg_id, epoch, seq, duplicate, durability } = *ack;
        let session = owned_key.map_or_else(|| Text::from(session), |key| key.session.clone());
        self.reply(origin, Event::PubAck { conn, correlation, session, client_msg_id, epoch, seq, duplicate, durability });
    }

    fn reply(&self, origin: usize, event: Event) {
        if origin == self.index {
            self.handle_event(event);
        } else if let Some(link) = &self.events_out[origin] {
            link.push(event);
        }
    }

    /// Waits until no event link is backlogged. Owner work pushes events (answers, and fan-out
    /// to every shard with subscribers) without waiting, so whoever caused it — a request
    /// handler, or a local connection's publish, cursor or typing — waits here afterwards: a
    /// slow peer then slows its producers instead of growing their links without bound. Event
    /// handlers drain these links and never wait, so no cycle of shards can wait on each other.
    pub(crate) async fn wait_for_event_links(&self) {
        for link in self.events_out.iter().flatten() {
            link.wait_for_room().await;
        }
    }

    // ---- the owner's side ----

    /// The session, created when new. A new session gets an epoch of its own, never handed
    /// out before: a session dropped by the idle sweep and created again must not let a client
    /// holding an old (epoch, seq) believe it resumed.
    ///
    /// Refused (with the message for the ERROR) when the shard holds `sessions_per_shard_max`
    /// sessions, or the session's tenant holds its own `sessions_per_shard_max` here.
    fn session_mut<'a>(&self, state: &'a mut ShardState, key: KeyRef<'_>, now_ms: u64) -> Result<&'a mut OwnedSession, &'static str> {
        let full = state.sessions.len() >= self.config.limits.sessions_per_shard_max;
        let ShardState { sessions, tenant_sessions, .. } = state;
        let owned = match sessions.entry_ref(&key) {
            hashbrown::hash_map::EntryRef::Occupied(entry) => entry.into_mut(),
            hashbrown::hash_map::EntryRef::Vacant(entry) => {
                // Only a new session looks at quotas: the publish path stays one lookup.
                let quota = self.session_quota(key.tenant);
                let tenant_full = quota.is_some_and(|max| tenant_sessions.get(key.tenant).copied().unwrap_or(0) >= max);
                if full || tenant_full {
                    self.count(|c| c.session_limit_refusals_total += 1);
                    return Err(if full { "session limit of the shard reached" } else { "the tenant's session limit on this shard reached" });
                }
                if quota.is_some() {
                    *tenant_sessions.entry(key.tenant.clone()).or_default() += 1;
                }
                let session = Session::new(self.fresh_session_epoch(), self.config.limits.history_messages_max as usize);
                entry.insert_with_key(key.to_owned_key(), OwnedSession { session, interest: ShardSet::default(), last_active_ms: now_ms, ended: false })
            }
        };
        owned.last_active_ms = now_ms;
        Ok(owned)
    }

    /// The tenant's own limit on sessions per shard, if it has one.
    fn session_quota(&self, tenant: &Text) -> Option<usize> {
        self.tenant_session_quota.iter().find(|(id, _)| id.as_str() == tenant.as_str()).map(|&(_, max)| max)
    }

    /// A session epoch not used before: the shard's start epoch (time-based) counted up.
    fn fresh_session_epoch(&self) -> u64 {
        let epoch = self.next_session_epoch.get();
        self.next_session_epoch.set(epoch.wrapping_add(1).max(1));
        epoch
    }

    /// Drops sessions nobody subscribes to, with nothing waiting for the journal, idle for
    /// `limits.session_idle_ms` (their memory, and their journal records' index entries so
    /// the journal can reclaim them). Runs every quarter of that, until shutdown. A client
    /// resuming a dropped session later is told `recovered = false` (the new session has a
    /// new epoch).
    pub(crate) async fn sweep_sessions(self: Rc<Self>) {
        let limits = &self.config.limits;
        let (idle_ms, linger_ms) = (limits.session_idle_ms, limits.closed_session_linger_ms);
        let shortest_ms = [idle_ms, linger_ms].into_iter().filter(|&ms| ms > 0).min();
        let Some(shortest_ms) = shortest_ms else { return };
        let every = Duration::from_millis((shortest_ms / 4).clamp(10, 60_000));
        while !self.shutdown.is_set() {
            glommio::timer::Timer::new(every).await;
            let now_ms = self.now_us() / 1000;
            let mut dropped = Vec::new();
            let mut state = self.state.borrow_mut();
            let ShardState { sessions, tenant_sessions, .. } = &mut *state;
            sessions.retain(|key, owned| {
                let after_ms = if owned.ended { linger_ms } else { idle_ms };
                let idle = after_ms > 0
                    && owned.interest == ShardSet::default()
                    && owned.last_active_ms.saturating_add(after_ms) < now_ms
                    && owned.session.visible_seq() == owned.session.head_seq();
                if idle {
                    dropped.push(key.conversation_id());
                    if let Some(count) = tenant_sessions.get_mut(&key.tenant) {
                        *count = count.saturating_sub(1);
                    }
                }
                !idle
            });
            drop(state);
            if dropped.is_empty() {
                continue;
            }
            self.count(|c| c.sessions_dropped_idle_total += dropped.len() as u64);
            tracing::debug!(shard = self.index, sessions = dropped.len(), "idle sessions dropped");
            if let Some(journal) = &self.journal {
                for conversation in dropped {
                    journal.forget_conversation(conversation);
                }
            }
        }
    }

    fn owner_publish(&self, origin: usize, publish: &PublishView<'_>) {
        let PublishView { conn, correlation, key, client_msg_id, trace_id, sender, payload, ingress_raw, .. } = *publish;
        let mode = self.durability_of(key.tenant);
        let journal = mode.journal().zip(self.journal.as_ref());
        let sequence_started = phase::now();
        let timestamp_us = self.now_us();
        let mut state = self.state.borrow_mut();
        let owned = match self.session_mut(&mut state, key, timestamp_us / 1000) {
            Ok(owned) => owned,
            Err(message) => {
                drop(state);
                return self.reply(origin, Event::Failed { conn, correlation, code: ErrorCode::LimitExceeded, message });
            }
        };
        let mut history = self.history.borrow_mut();
        let mut ticket = None;
        let mut encode = |epoch: u64, seq: u64, log: &mut HistoryLog| -> Result<(LogSpan, (u16, u8)), AppendRefused> {
            let deliver = DeliverRef { session: key.session, epoch, seq, timestamp_us, trace_id, sender, payload };
            let span = match journal {
                None => self.encode_into_history(log, deliver.encoded_len(), |dst| deliver.encode(0, dst))?,
                Some(journal) => {
                    let (span, journaled) = self.journal_then_history(log, journal, key, client_msg_id, seq, timestamp_us, |dst| deliver.encode(0, dst))?;
                    ticket = Some(journaled);
                    span
                }
            };
            Ok((span, persist::deliver_sender_at(key.session, sender)))
        };
        let outcome = match owned.session.publish(&mut history, sender, client_msg_id, journal.is_none(), &mut encode) {
            Ok(outcome) => outcome,
            Err(refused) => {
                drop((state, history));
                let (code, message) = self.refusal(&refused);
                return self.reply(origin, Event::Failed { conn, correlation, code, message });
            }
        };
        phase::lap(Phase::Sequence, sequence_started);
        let epoch = owned.session.epoch();
        let visible_seq = owned.session.visible_seq();
        let wire_durability = mode.wire();
        let seq = match outcome {
            PublishOutcome::Appended(seq) | PublishOutcome::Duplicate(seq) => seq,
        };
        // What waits for the journal: a new message (its ticket and frame), or a repeat of one
        // still waiting (neither: answered right after the original).
        let publish_ack = |ticket, frame| PendingAck {
            event: false,
            ticket,
            origin,
            conn,
            correlation,
            key: publish.key_to_keep(),
            client_msg_id,
            epoch,
            seq,
            durability: wire_durability,
            frame,
            ingress_raw,
        };
        match outcome {
            PublishOutcome::Appended(_) if journal.is_some() => {
                let frame = owned.session.last_frame(&history).map(Bytes::copy_from_slice);
                drop((state, history));
                self.await_ack(publish_ack(ticket, frame));
            }
            PublishOutcome::Appended(seq) => {
                // Copied out of the ring (into a pool buffer, and one heap copy if other
                // shards subscribe) before anything is sent: sending may close a slow consumer,
                // and nothing reached from there may find the ring borrowed.
                let fanout_started = phase::now();
                let interest = owned.interest;
                let copies = self.copy_for_fanout(interest, owned.session.last_frame(&history).unwrap_or_default());
                drop((state, history));
                self.count(|c| c.publishes_total += 1);
                let _span = (trace_id != 0).then(|| tracing::trace_span!("fanout", trace_id = %format_args!("{trace_id:032x}"), seq).entered());
                self.fanout_copies(key, || publish.key_to_keep(), copies, ingress_raw);
                let ack_started = phase::lap(Phase::Fanout, fanout_started);
                let ack = PubAckRef { session: key.session, client_msg_id, epoch, seq, duplicate: false, durability: wire_durability };
                self.reply_pub_ack(origin, conn, correlation, &ack, publish.owned_key);
                phase::lap(Phase::Ack, ack_started);
            }
            PublishOutcome::Duplicate(_) if seq > visible_seq => {
                // The original is still waiting for the journal: answer after it.
                drop((state, history));
                self.count(|c| c.publishes_duplicate_total += 1);
                self.await_ack(publish_ack(None, None));
            }
            PublishOutcome::Duplicate(seq) => {
                drop((state, history));
                self.count(|c| c.publishes_duplicate_total += 1);
                let ack = PubAckRef { session: key.session, client_msg_id, epoch, seq, duplicate: true, durability: wire_durability };
                self.reply_pub_ack(origin, conn, correlation, &ack, publish.owned_key);
            }
        }
    }

    fn await_ack(&self, pending: PendingAck) {
        self.acks.borrow_mut().push_back(pending);
        self.acks_wakeup.notify();
    }

    /// Answers journaled publishes in journal order as the journal acknowledges them: the
    /// message becomes visible, is fanned out, and its publisher gets PUBACK. Runs as long as
    /// the shard.
    pub(crate) async fn run_acks(self: Rc<Self>) {
        let Some(journal) = self.journal.clone() else { return };
        let mut answered = 0_u32;
        loop {
            let next = self.acks.borrow_mut().pop_front();
            let Some(pending) = next else {
                self.acks_wakeup.wait().await;
                continue;
            };
            let result = match pending.ticket {
                Some(ticket) => journal.acked(ticket).await,
                None => Ok(()),
            };
            self.answer(pending, &result);
            answered += 1;
            if answered % 256 == 0 {
                glommio::yield_if_needed().await;
            }
        }
    }

    /// Waits (bounded) until every journaled publish is answered; for shutdown.
    pub(crate) async fn drain_acks(&self, within: Duration) {
        if let Some(journal) = &self.journal {
            let _ = futures_lite::future::or(async { journal.flush().await.map(|()| true) }, async {
                glommio::timer::Timer::new(within).await;
                Ok(false)
            })
            .await;
        }
        let deadline = std::time::Instant::now() + within;
        while !self.acks.borrow().is_empty() && std::time::Instant::now() < deadline {
            glommio::timer::Timer::new(Duration::from_millis(1)).await;
        }
    }

    fn answer(&self, pending: PendingAck, result: &Result<(), JournalError>) {
        let PendingAck { event, origin, conn, correlation, key, client_msg_id, epoch, seq, durability, frame, ingress_raw, .. } = pending;
        let mut state = self.state.borrow_mut();
        let Some(owned) = state.sessions.get_mut(&key) else { return };
        let visible = match &result {
            Ok(()) => {
                owned.session.make_visible(seq);
                owned.session.visible_seq() >= seq
            }
            Err(_) => false,
        };
        if !visible {
            // Nobody saw these or was acknowledged them: their seqs are free again.
            owned.session.roll_back_invisible(&self.history.borrow());
            drop(state);
            self.count(|c| c.journal_refusals_total += 1);
            if event {
                tracing::warn!(shard = self.index, tenant = %key.tenant, session = %key.session, "conversation event not journaled: dropped from the session's stream");
                return;
            }
            let (code, message) = result.as_ref().err().map_or((ErrorCode::Unavailable, "journal dropped the message"), journal_refusal);
            return self.reply(origin, Event::Failed { conn, correlation, code, message });
        }
        let interest = owned.interest;
        drop(state);
        if event {
            if let Some(frame) = frame {
                self.fanout_encoded(&key, interest, frame.clone(), 0);
                self.supervisor_broadcast(&key.tenant, &frame);
            }
            return;
        }
        let duplicate = frame.is_none();
        if let Some(frame) = frame {
            self.count(|c| c.publishes_total += 1);
            self.fanout_encoded(&key, interest, frame, ingress_raw);
        }
        let session = key.session;
        self.reply(origin, Event::PubAck { conn, correlation, session, client_msg_id, epoch, seq, duplicate, durability });
    }

    /// Compaction (within its I/O budget), retention, index snapshots and recovery from a full
    /// device, every
    /// `journal.maintenance_interval_ms`, until shutdown.
    pub(crate) async fn maintain_journal(self: Rc<Self>) {
        let Some(journal) = self.journal.clone() else { return };
        let interval = Duration::from_millis(self.config.journal.maintenance_interval_ms);
        let snapshot_every = Duration::from_millis(self.config.journal.snapshot_interval_ms);
        let mut last_snapshot = std::time::Instant::now();
        while !self.shutdown.is_set() {
            glommio::timer::Timer::new(interval).await;
            if journal.health() == Health::NoSpace {
                // Try again only once the device has room for a whole segment: retrying blindly
                // would flap between healthy and full while publishers retry.
                let room = crate::journal::dma::has_room(journal.storage().dir(), journal.config().segment_bytes);
                match room {
                    Ok(true) => {
                        tracing::info!(shard = self.index, "journal device has room again: accepting durable publishes");
                        journal.resume_after_no_space();
                    }
                    Ok(false) => {}
                    Err(error) => tracing::warn!(shard = self.index, %error, "cannot read the journal device's free space"),
                }
            }
            if self.config.journal.compact_budget_bytes > 0 && journal.health() == Health::Healthy {
                match journal.compact(self.config.journal.compact_budget_bytes).await {
                    Ok(outcome) if outcome.records_copied > 0 => tracing::debug!(
                        shard = self.index,
                        records = outcome.records_copied,
                        segments_cleared = outcome.segments_cleared,
                        bytes_read = outcome.bytes_read,
                        "journal compaction"
                    ),
                    Ok(_) => {}
                    Err(error) => tracing::warn!(shard = self.index, %error, "journal compaction failed"),
                }
            }
            match journal.apply_retention(self.now_us()).await {
                Ok(outcome) if outcome.segments_deleted > 0 => {
                    tracing::debug!(shard = self.index, segments = outcome.segments_deleted, bytes = outcome.bytes_freed, "journal retention");
                }
                Ok(_) => {}
                Err(error) => tracing::warn!(shard = self.index, %error, "journal retention failed"),
            }
            if last_snapshot.elapsed() >= snapshot_every && journal.health() == Health::Healthy {
                last_snapshot = std::time::Instant::now();
                if let Err(error) = journal.write_snapshot().await {
                    tracing::warn!(shard = self.index, %error, "journal snapshot failed");
                }
            }
        }
    }

    /// Appends a server-built frame (a `CONVERSATION_EVENT`) to a session, as `owner_publish`
    /// appends a message: the owner stamps epoch, seq and timestamp, keeps it in history (so a
    /// resume replays it in order with the messages), journals it like a message when the
    /// tenant is durable, and once it is acknowledged fans it out and feeds it to the tenant's
    /// supervisors. False when the session limit or the journal refused it (counted, logged).
    fn owner_append(&self, key: &SessionKey, mut frame: Frame) -> bool {
        let journal = self.durability_of(&key.tenant).journal().zip(self.journal.as_ref());
        let mut state = self.state.borrow_mut();
        let timestamp_us = self.now_us();
        let Ok(owned) = self.session_mut(&mut state, key.borrowed(), timestamp_us / 1000) else { return false };
        if let Frame::ConversationEvent(event) = &frame {
            owned.ended = matches!(event.kind, ConversationEventKind::Closed | ConversationEventKind::Abandoned);
        }
        let mut history = self.history.borrow_mut();
        let mut ticket = None;
        let mut encode = |epoch: u64, seq: u64, log: &mut HistoryLog| -> Result<(LogSpan, (u16, u8)), AppendRefused> {
            if let Frame::ConversationEvent(event) = &mut frame {
                (event.epoch, event.seq, event.timestamp_us) = (epoch, seq, timestamp_us);
            }
            let span = match journal {
                None => self.encode_into_history(log, frame.encoded_len(), |dst| frame.encode(0, dst))?,
                Some(journal) => {
                    let (span, journaled) = self.journal_then_history(log, journal, key.borrowed(), 0, seq, timestamp_us, |dst| frame.encode(0, dst))?;
                    ticket = Some(journaled);
                    span
                }
            };
            // No sender: client_msg_id 0 below keeps it out of the idempotency check.
            Ok((span, (0, 0)))
        };
        let seq = match owned.session.publish(&mut history, "", 0, journal.is_none(), &mut encode) {
            Ok(PublishOutcome::Appended(seq) | PublishOutcome::Duplicate(seq)) => seq,
            Err(refused) => {
                drop((state, history));
                self.refusal(&refused);
                tracing::warn!(shard = self.index, tenant = %key.tenant, session = %key.session, "conversation event refused");
                return false;
            }
        };
        // Events are rare: a heap copy shared by the fan-out and the supervisors' feed.
        let encoded = Bytes::copy_from_slice(owned.session.last_frame(&history).unwrap_or_default());
        let (interest, epoch) = (owned.interest, owned.session.epoch());
        drop((state, history));
        if journal.is_some() {
            self.await_ack(PendingAck {
                event: true,
                ticket,
                origin: self.index,
                conn: 0,
                correlation: 0,
                key: SessionKey::owned(&key.tenant, &key.session),
                client_msg_id: 0,
                epoch,
                seq,
                durability: switchboard_protocol::Durability::Memory,
                frame: Some(encoded),
                ingress_raw: 0,
            });
        } else {
            self.fanout_encoded(key, interest, encoded.clone(), 0);
            self.supervisor_broadcast(&key.tenant, &encoded);
        }
        true
    }

    /// Sends a frame to every subscriber of `key`.
    fn fanout(&self, key: &SessionKey, interest: ShardSet, frame: &Frame, ingress_raw: u64) {
        self.fanout_encoded(key, interest, self.encode_heap(frame, 0), ingress_raw);
    }

    /// Sends an encoded frame to every subscriber of `key`: copied once into a pool buffer
    /// queued on each of this shard's subscribers, and shared as is with every other shard
    /// that has subscribers (which queues it on each of theirs).
    fn fanout_encoded(&self, key: &SessionKey, interest: ShardSet, frame: Bytes, ingress_raw: u64) {
        let mut remote = interest;
        remote.remove(self.index);
        let local = interest.contains(self.index).then(|| self.to_pool(frame.clone()));
        self.fanout_copies(key.borrowed(), || key.clone(), FanoutCopies { local, remote, shared: Some(frame) }, ingress_raw);
    }

    /// Copies a frame for its fan-out: into a pool buffer for this shard's subscribers, and
    /// once to the heap, shared by the other shards with subscribers.
    fn copy_for_fanout(&self, interest: ShardSet, frame: &[u8]) -> FanoutCopies {
        let mut remote = interest;
        remote.remove(self.index);
        let local = interest.contains(self.index).then(|| self.pool_copy(frame, || Bytes::copy_from_slice(frame)));
        let shared = (remote != ShardSet::default()).then(|| Bytes::copy_from_slice(frame));
        FanoutCopies { local, remote, shared }
    }

    /// Sends `copies` on: the shared one to the other shards with subscribers (as an event
    /// naming the session by `owned_key()`, asked for only then), the local one to this
    /// shard's subscribers.
    fn fanout_copies(&self, key: KeyRef<'_>, owned_key: impl FnOnce() -> SessionKey, copies: FanoutCopies, ingress_raw: u64) {
        if let Some(frame) = copies.shared {
            let owned = owned_key();
            for peer in copies.remote.iter() {
                if let Some(link) = &self.events_out[peer] {
                    link.push(Event::Fanout { key: owned.clone(), frame: frame.clone(), ingress_raw });
                }
            }
        }
        if let Some(out) = copies.local {
            self.local_fanout(key, &out, ingress_raw);
        }
    }

    /// Encodes a frame (correlation 0) into the history ring.
    fn encode_into_history(
        &self,
        log: &mut HistoryLog,
        len: usize,
        encode: impl FnOnce(&mut &mut [u8]) -> Result<(), EncodeError>,
    ) -> Result<LogSpan, AppendRefused> {
        let (span, mut dst) = log.reserve(len).ok_or(AppendRefused::LargerThanHistory)?;
        // Frames are built from validated input, so an encode error is a bug: refused, logged.
        encode(&mut dst).map_err(|error| AppendRefused::Unencodable(error.to_string()))?;
        Ok(span)
    }

    /// Journals a message record, then writes its frame into the history ring. In this order
    /// so that a record the journal refuses (backpressure, full device) uses no ring space:
    /// clients retrying under backpressure would otherwise overwrite other sessions' history.
    #[allow(clippy::too_many_arguments)]
    fn journal_then_history(
        &self,
        log: &mut HistoryLog,
        (durability, journal): (crate::journal::Durability, &Journal<DmaStorage>),
        key: KeyRef<'_>,
        client_msg_id: u64,
        seq: u64,
        timestamp_us: u64,
        encode: impl FnOnce(&mut Vec<u8>) -> Result<(), EncodeError>,
    ) -> Result<(LogSpan, Ticket), AppendRefused> {
        let mut frame = self.frame_scratch.borrow_mut();
        frame.clear();
        encode(&mut frame).map_err(|error| AppendRefused::Unencodable(error.to_string()))?;
        if !log.fits(frame.len()) {
            return Err(AppendRefused::LargerThanHistory);
        }
        let ticket = {
            let mut scratch = self.record_scratch.borrow_mut();
            persist::encode_message(&mut scratch, key.tenant, client_msg_id, &frame);
            let record = Record { conversation: key.conversation_id(), seq, timestamp_us, kind: RecordKind::Message, payload: &scratch };
            journal.append(&record, durability).map_err(AppendRefused::Journal)?
        };
        let span = log.append(&frame).ok_or(AppendRefused::LargerThanHistory)?;
        Ok((span, ticket))
    }

    /// Counts and logs a refused append; the code and message for the publisher.
    fn refusal(&self, refused: &AppendRefused) -> (ErrorCode, &'static str) {
        match refused {
            AppendRefused::Journal(error) => {
                self.count(|c| c.journal_refusals_total += 1);
                tracing::debug!(shard = self.index, %error, "append refused by the journal");
                journal_refusal(error)
            }
            AppendRefused::LargerThanHistory => (ErrorCode::LimitExceeded, "message larger than the shard's history ring"),
            AppendRefused::Unencodable(error) => {
                tracing::error!(shard = self.index, %error, "engine built an unencodable frame");
                (ErrorCode::Internal, "internal error")
            }
        }
    }

    /// Copies an encoded frame into a pool buffer (the I/O side's memory); keeps the heap
    /// buffer when the pool is exhausted (counted).
    fn to_pool(&self, frame: Bytes) -> OutBuf {
        self.pool_copy(&frame, || frame.clone())
    }

    /// `frame` in a pool buffer, or on the heap (`heap()`) when the pool is exhausted (counted).
    fn pool_copy(&self, frame: &[u8], heap: impl FnOnce() -> Bytes) -> OutBuf {
        if let Ok(lease) = self.pool.lease_copy(frame) {
            return OutBuf::Pooled(lease);
        }
        self.count(|c| c.pool_fallbacks_total += 1);
        OutBuf::Heap(heap())
    }

    fn local_fanout(&self, key: KeyRef<'_>, out: &OutBuf, ingress_raw: u64) {
        // The subscriber list is copied into a reused buffer (no allocation per message)
        // because sending may evict a slow consumer, which changes the state being iterated.
        let mut conns = self.fanout_scratch.take();
        match self.state.borrow().local.get(&key) {
            Some(local) => conns.extend_from_slice(&local.conns),
            None => {
                self.fanout_scratch.replace(conns);
                return;
            }
        }
        let mut delivered = 0;
        let frame = out.as_slice();
        // A small frame is copied into each subscriber's gathering buffer: a send then carries
        // one contiguous iovec instead of one per frame, which costs the kernel more than the
        // copy (bench/RESULTS.md, session 9). A large one is shared by every subscriber.
        let copy = frame.len() <= self.config.uring.fanout_copy_bytes_max;
        for &LocalConn { conn, slot } in &conns {
            let queued = if copy {
                self.sender
                    .enqueue_gathered(slot, frame, || self.gather_lease())
                    .and_then(|gathered| if gathered { Ok(()) } else { self.sender.enqueue(slot, out.clone()) })
            } else {
                self.sender.enqueue(slot, out.clone())
            };
            match queued {
                Ok(()) => delivered += 1,
                Err(EnqueueError::SlowConsumer) => self.evict_slow_consumer(conn),
                Err(EnqueueError::Closed) => {}
            }
        }
        conns.clear();
        self.fanout_scratch.replace(conns);
        let bytes = out.as_slice().len() as u64;
        self.count(|c| {
            c.deliveries_total += delivered;
            c.delivery_bytes_total += delivered * bytes;
        });
        self.record_latency(ingress_raw);
    }

    fn owner_subscribe(&self, origin: usize, conn: ConnId, correlation: u32, key: SessionKey, from: ResumeFrom) {
        let mut state = self.state.borrow_mut();
        let owned = match self.session_mut(&mut state, key.borrowed(), self.now_us() / 1000) {
            Ok(owned) => owned,
            Err(message) => {
                drop(state);
                return self.reply(origin, Event::SubscribeRefused { conn, correlation, key, code: ErrorCode::LimitExceeded, message });
            }
        };
        owned.interest.insert(origin);
        let history = self.history.borrow();
        let plan = owned.session.plan_resume(from, &history);
        let replay: Vec<Bytes> = owned.session.replay(plan.replay_from_seq, &history).map(Bytes::copy_from_slice).collect();
        drop((state, history));
        self.reply(origin, Event::Subscribed { conn, correlation, key, plan, replay });
    }

    fn owner_uninterest(&self, origin: usize, key: &SessionKey) {
        if let Some(owned) = self.state.borrow_mut().sessions.get_mut(key) {
            owned.interest.remove(origin);
        }
    }

    fn owner_read_cursor(&self, origin: usize, conn: ConnId, correlation: u32, key: &SessionKey, participant: &Text, seq: u64) {
        let mut state = self.state.borrow_mut();
        let Some(owned) = state.sessions.get_mut(key) else {
            drop(state);
            return self.reply(origin, Event::Failed { conn, correlation, code: ErrorCode::NotFound, message: "no such session" });
        };
        let set = owned.session.set_read_cursor(participant, seq);
        let interest = owned.interest;
        drop(state);
        let cursor = match set {
            Ok((cursor, true)) => cursor,
            // Unchanged: nothing to journal or tell anyone.
            Ok((_, false)) => return self.reply(origin, Event::Done { conn, correlation }),
            Err(crate::session::CursorsFull) => {
                let message = "read cursors per session limit reached";
                return self.reply(origin, Event::Failed { conn, correlation, code: ErrorCode::LimitExceeded, message });
            }
        };
        self.journal_read_cursor(key, participant, cursor);
        let frame = Frame::ReadCursor(ReadCursor { session: key.session.clone(), participant: participant.clone(), seq: cursor });
        self.fanout(key, interest, &frame, 0);
        self.reply(origin, Event::Done { conn, correlation });
    }

    /// Journals a read cursor. Not awaited: a cursor lost in a crash only moves back to an
    /// older one, which the participant's next READ_CURSOR moves forward again.
    fn journal_read_cursor(&self, key: &SessionKey, participant: &Text, cursor: u64) {
        let (Some(durability), Some(journal)) = (self.durability_of(&key.tenant).journal(), &self.journal) else { return };
        let mut scratch = self.record_scratch.borrow_mut();
        persist::encode_read_cursor(&mut scratch, key, participant);
        let record = Record { conversation: key.conversation_id(), seq: cursor, timestamp_us: self.now_us(), kind: RecordKind::ReadCursor, payload: &scratch };
        if let Err(error) = journal.append(&record, durability) {
            tracing::debug!(shard = self.index, %error, "read cursor not journaled");
        }
    }

    fn owner_typing(&self, key: &SessionKey, participant: &Text, active: bool) {
        let interest = match self.state.borrow().sessions.get(key) {
            Some(owned) => owned.interest,
            None => return,
        };
        let frame = Frame::Typing(Typing { session: key.session.clone(), participant: participant.clone(), active });
        self.fanout(key, interest, &frame, 0);
    }

    /// Handles one request from `origin`'s ring. May wait for room on the event links.
    pub(crate) async fn handle_request(&self, origin: usize, request: Request) {
        match request {
            Request::Publish(request) => self.owner_publish(origin, &request.view()),
            Request::Subscribe { conn, correlation, key, from } => self.owner_subscribe(origin, conn, correlation, key, from),
            Request::Uninterest { key } => self.owner_uninterest(origin, &key),
            Request::ReadCursor { conn, correlation, key, participant, seq } => {
                self.owner_read_cursor(origin, conn, correlation, &key, &participant, seq);
            }
            Request::Typing { key, participant, active } => self.owner_typing(&key, &participant, active),
            Request::Desk(request) => self.desk_request(origin, request),
        }
        self.wait_for_event_links().await;
    }

    // ---- events from owners (never wait) ----

    /// Handles one event from an owner (this shard included). Never waits.
    pub(crate) fn handle_event(&self, event: Event) {
        match event {
            Event::PubAck { conn, correlation, session, client_msg_id, epoch, seq, duplicate, durability } => {
                let frame = Frame::PubAck(PubAck { session, client_msg_id, epoch, seq, duplicate, durability });
                self.send_frame(conn, &frame, correlation);
            }
            Event::Subscribed { conn, correlation, key, plan, replay } => self.subscribed(conn, correlation, key, &plan, replay),
            Event::Fanout { key, frame, ingress_raw } => {
                let out = self.to_pool(frame);
                self.local_fanout(key.borrowed(), &out, ingress_raw);
            }
            Event::Failed { conn, correlation, code, message } => self.fail_request(conn, correlation, code, message),
            Event::SubscribeRefused { conn, correlation, key, code, message } => {
                // Not subscribed after all: a retry must not find it "already subscribed", and
                // the pending count must not keep the local entry alive.
                self.with_conn(conn, |entry| entry.subscriptions.remove(&key));
                let unused = {
                    let mut state = self.state.borrow_mut();
                    let unused = state.local.get_mut(&key).is_some_and(|local| {
                        local.pending = local.pending.saturating_sub(1);
                        local.conns.is_empty() && local.pending == 0
                    });
                    if unused {
                        state.local.remove(&key);
                    }
                    unused
                };
                if unused {
                    self.uninterest(key);
                }
                self.fail_request(conn, correlation, code, message);
            }
            Event::Done { conn, correlation } => self.send_frame(conn, &Frame::Success(Success {}), correlation),
            event @ (Event::DeskAnswer { .. }
            | Event::ConversationEvent { .. }
            | Event::Revoke { .. }
            | Event::RevokeConn { .. }
            | Event::SupervisorFeed { .. }
            | Event::ToConn { .. }) => self.desk_event(event),
        }
    }

    fn subscribed(&self, conn: ConnId, correlation: u32, key: SessionKey, plan: &ResumePlan, replay: Vec<Bytes>) {
        let alive = {
            let mut state = self.state.borrow_mut();
            let wanted_on = state.conns.get(&conn).filter(|entry| entry.subscriptions.contains(&key) && !entry.closing).map(|entry| entry.slot);
            // The entry exists: it counts this answer as pending.
            match state.local.get_mut(&key) {
                Some(local) => {
                    local.pending = local.pending.saturating_sub(1);
                    // Subscribed, unsubscribed and subscribed again before the first answer:
                    // both answers find it wanted, and it must be listed once.
                    if let Some(slot) = wanted_on {
                        if !local.conns.iter().any(|c| c.conn == conn) {
                            local.conns.push(LocalConn { conn, slot });
                        }
                    }
                    wanted_on.is_some()
                }
                None => false,
            }
        };
        if !alive {
            // Unsubscribed or gone while the owner was answering.
            let unused = self.state.borrow().local.get(&key).is_some_and(|l| l.conns.is_empty() && l.pending == 0);
            if unused {
                self.state.borrow_mut().local.remove(&key);
                self.uninterest(key);
            }
            return;
        }
        let frame = Frame::Subscribed(Subscribed {
            session: key.session.clone(),
            epoch: plan.epoch,
            head_seq: plan.head_seq,
            replay_from_seq: plan.replay_from_seq,
            recovered: plan.recovered,
        });
        self.send_frame(conn, &frame, correlation);
        for frame in replay {
            if !self.send_buf(conn, self.to_pool(frame)) {
                break;
            }
        }
    }
}

/// How long [`Shard::now_us`] counts on from one reading of the system clock.
const WALL_REANCHOR_NS: u64 = 1_000_000_000;

/// Frames up to this size are gathered per connection (replies: PUBACK is ~50 bytes).
const GATHERED_FRAME_BYTES_MAX: usize = 256;

/// The pool buffer small frames are gathered into (the 2 KiB class by default).
pub(crate) const GATHER_BUFFER_BYTES: usize = 2048;

/// A frame copied for its fan-out (see `Shard::copy_for_fanout`).
struct FanoutCopies {
    /// For this shard's subscribers.
    local: Option<OutBuf>,
    /// Other shards with subscribers, and the copy they share.
    remote: ShardSet,
    shared: Option<Bytes>,
}

/// Why a message or event was not appended to its session.
enum AppendRefused {
    /// The journal refused the record.
    Journal(JournalError),
    /// The frame does not fit the history ring (the configuration rules this out).
    LargerThanHistory,
    /// The engine built a frame it cannot encode (a bug).
    Unencodable(String),
}

fn journal_refusal(error: &JournalError) -> (ErrorCode, &'static str) {
    match error {
        JournalError::Backpressure { .. } => (ErrorCode::Unavailable, "journal queue full; retry later"),
        JournalError::NoSpace => (ErrorCode::Unavailable, "journal device full; message not stored"),
        JournalError::TooLarge { .. } => (ErrorCode::LimitExceeded, "message larger than the journal's record limit"),
        JournalError::Closed => (ErrorCode::Unavailable, "shutting down; message not stored"),
        JournalError::IntervalNotAllowed | JournalError::Config(_) => (ErrorCode::Internal, "journal misconfigured"),
        JournalError::Failed(_) | JournalError::ForeignShard { .. } | JournalError::Io { .. } => {
            (ErrorCode::Unavailable, "journal failed; this shard refuses durable publishes until restarted")
        }
    }
}

/// Bounds how long a closing connection may take to read its last frame: after `grace`, the
/// socket is cut. The sender's slot handle carries a generation, so this never touches a later
/// connection that reused the slot.
async fn abort_after(slot: ConnSlot, grace: Duration, shard: Weak<Shard>) {
    glommio::timer::Timer::new(grace).await;
    if let Some(shard) = shard.upgrade() {
        shard.sender.abort(slot);
    }
}
