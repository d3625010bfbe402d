//! [`ClientSession`]: the client's protocol state machine, sans-IO.
//!
//! Owns the handshake, request ids and the matching of answers to requests, the subscription
//! table (with each subscription's last position handed to the caller), the publishes waiting
//! for their PUBACK, keepalive, and the reconnect schedule. It opens no socket, reads no clock
//! and starts no thread: a driver feeds it what happened (`handle_*`, with `now`) and carries
//! out what it asks for (`poll_*`). The drivers in [`crate::blocking`] and [`crate::tokio`]
//! are two such loops; the tests and the fuzz target are others.
//!
//! One turn of a driver's loop:
//! 1. [`ClientSession::poll_action`]: open ([`Action::Connect`]) or close ([`Action::Close`])
//!    the transport, then report with [`ClientSession::handle_connected`] or
//!    [`ClientSession::handle_disconnected`];
//! 2. [`ClientSession::poll_transmit`]: write those bytes;
//! 3. [`ClientSession::poll_event`]: hand the events to the application;
//! 4. wait for bytes ([`ClientSession::handle_bytes`]), a command (`subscribe`, `publish`, …) or
//!    the instant of [`ClientSession::poll_timeout`] ([`ClientSession::handle_timeout`]).
//!
//! The guarantees it keeps for the caller, per subscribed session: items come in seq order,
//! none twice, across any number of reconnects; a hole is never silent — it is either an
//! explicit [`Event::Gap`] (the server said it could not replay) or a protocol violation that
//! closes the connection and resumes from the last item the caller got.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::fmt;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use switchboard_protocol::{
    decode, AgentStatus, CloseConversation, ConversationEvent, Deliver, Envelope, ErrorCode, ErrorFrame, Frame, GoAway,
    GoAwayReason, Hello, Limits, OfferResponse, OpenConversation, Ping, Pong, PubAck, Publish, ReadCursor, ResumeFrom,
    Subscribe, Subscribed, Text, TicketCommand, TicketEvent, Transfer, Typing, Unsubscribe, Welcome, HEADER_BYTES,
    PROTOCOL_VERSION,
};

use crate::config::{splitmix64, ClientConfig};
use crate::error::ClientError;

/// One request of this session; it travels as the frame's correlation id (never 0).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct RequestId(u32);

impl RequestId {
    /// The correlation id on the wire.
    pub fn get(self) -> u32 {
        self.0
    }
}

impl fmt::Display for RequestId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "#{}", self.0)
    }
}

/// A position in a session's stream: the seq of an item within the session's epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Position {
    /// The session's epoch (changes when the server lost the session's history).
    pub epoch: u64,
    /// The seq within the epoch.
    pub seq: u64,
}

impl Position {
    /// Where to resume to get everything after this position.
    pub fn resume_from(self) -> ResumeFrom {
        ResumeFrom::After { epoch: self.epoch, seq: self.seq }
    }
}

/// A message of a subscribed session, as the server sent it (the DELIVER frame's body).
pub type Delivery = Deliver;

/// Messages of a subscribed session were missed and will not be replayed.
///
/// Emitted right after the SUBSCRIBED (first or after a reconnect) that revealed it, before any
/// item that follows the hole. The application decides what to do: fetch history elsewhere,
/// tell the agent, or carry on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Gap {
    /// The session.
    pub session: Text,
    /// The last position the caller received (or asked to resume after); `None` when none.
    pub last: Option<Position>,
    /// The position of the next item the caller will receive.
    pub next: Position,
    /// Why.
    pub cause: GapCause,
}

/// Why a [`Gap`] happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GapCause {
    /// The server answered `recovered = false`: its history no longer reaches back far enough.
    NotRecovered,
    /// The session's epoch changed (the server lost its history, e.g. restarted without a
    /// journal): nothing of the old epoch after `last` can be replayed.
    EpochChanged,
    /// The server claimed `recovered = true` but starts its replay after the caller's next seq.
    /// A server bug; surfaced rather than hidden.
    Inconsistent,
}

/// What the session asks its driver to do with the transport.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Open a transport to the server, then call [`ClientSession::handle_connected`] (or
    /// [`ClientSession::handle_disconnected`] if it could not be opened).
    Connect,
    /// Close the current transport and feed it no more bytes. The session already considers
    /// it gone: do not call [`ClientSession::handle_disconnected`] for it.
    Close,
}

/// The connection as the session sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnectionState {
    /// Waiting for the driver to open a transport.
    Connecting,
    /// The transport is up; HELLO is sent and WELCOME awaited.
    Handshaking,
    /// WELCOME received: requests flow.
    Established,
    /// Disconnected; the next attempt is due at this instant.
    Reconnecting {
        /// When the next attempt starts.
        at: Instant,
    },
    /// Closed for good (by the application or a terminal error).
    Closed,
}

/// Why a connection ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DisconnectReason {
    /// The driver could not open a transport.
    ConnectFailed,
    /// The transport closed or failed (EOF, reset, write error).
    TransportClosed,
    /// No WELCOME within the handshake timeout.
    HandshakeTimeout,
    /// Nothing arrived within the idle timeout.
    KeepaliveTimeout,
    /// The server did not confirm a resubscription within the request timeout.
    ResubscribeTimeout,
    /// The server sent GOAWAY.
    GoAway {
        /// Its reason.
        reason: GoAwayReason,
        /// Its detail.
        message: Text,
    },
    /// The server sent an ERROR about the connection itself (correlation 0, or during the
    /// handshake). Terminal when the code is `AuthFailed`, `Forbidden` or `UnsupportedVersion`.
    ServerError {
        /// The code.
        code: ErrorCode,
        /// The detail.
        message: Text,
    },
    /// The server broke the protocol (undecodable bytes, a mismatched answer, a seq that
    /// skips ahead within an epoch…). The client reconnects and resumes.
    ProtocolViolation(String),
    /// The application closed the client.
    Closed,
    /// Reconnecting failed this many times in a row ([`crate::ReconnectPolicy::attempts_max`]).
    GaveUp {
        /// Consecutive failed attempts.
        attempts: u32,
        /// Why the last one failed.
        last: Box<DisconnectReason>,
    },
}

impl DisconnectReason {
    /// True when the client does not reconnect after this.
    pub fn is_terminal(&self) -> bool {
        match self {
            DisconnectReason::ServerError { code, .. } => {
                matches!(code, ErrorCode::AuthFailed | ErrorCode::Forbidden | ErrorCode::UnsupportedVersion)
            }
            DisconnectReason::Closed | DisconnectReason::GaveUp { .. } => true,
            _ => false,
        }
    }

    /// The error a caller gets when this ended the client (or their request).
    pub fn to_error(&self) -> ClientError {
        match self {
            DisconnectReason::ConnectFailed | DisconnectReason::TransportClosed => ClientError::ConnectionLost,
            DisconnectReason::HandshakeTimeout
            | DisconnectReason::KeepaliveTimeout
            | DisconnectReason::ResubscribeTimeout => ClientError::Timeout,
            DisconnectReason::GoAway { reason: GoAwayReason::SlowConsumer, .. } => ClientError::SlowConsumer,
            DisconnectReason::GoAway { reason: GoAwayReason::AuthExpired, message } => {
                ClientError::AuthRefused { message: message.to_string() }
            }
            DisconnectReason::GoAway { reason, message } => {
                ClientError::GoAway { reason: *reason, message: message.to_string() }
            }
            DisconnectReason::ServerError { code, message } => ClientError::from_server(*code, message),
            DisconnectReason::ProtocolViolation(detail) => ClientError::Protocol(detail.clone()),
            DisconnectReason::Closed => ClientError::Closed,
            DisconnectReason::GaveUp { last, .. } => last.to_error(),
        }
    }
}

/// What happened, in the order it happened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// The handshake completed.
    Connected {
        /// The server's WELCOME (tenant, limits…).
        welcome: Welcome,
        /// False for the first connection, true after a reconnect (subscriptions and
        /// unacknowledged publishes have been re-sent).
        resumed: bool,
    },
    /// The connection ended.
    Disconnected {
        /// Why.
        reason: DisconnectReason,
        /// When the next attempt starts; `None` when the client is closed for good.
        reconnect_at: Option<Instant>,
    },
    /// A [`ClientSession::subscribe`] was confirmed. Items follow (a [`Event::Gap`] first when
    /// `info.recovered` is false).
    Subscribed {
        /// The subscribe request.
        request: RequestId,
        /// The server's answer.
        info: Subscribed,
    },
    /// A subscription was re-established after a reconnect, resuming after the caller's last
    /// position (a [`Event::Gap`] follows when that was not fully possible).
    Resubscribed {
        /// The server's answer.
        info: Subscribed,
    },
    /// Items of a subscribed session were missed; see [`Gap`].
    Gap(Gap),
    /// A subscription ended without the application asking: the server refused to resume it,
    /// or the client closed for good. No more items come for the session.
    SubscriptionFailed {
        /// The session.
        session: Text,
        /// Why.
        error: ClientError,
    },
    /// An [`ClientSession::unsubscribe`] completed.
    Unsubscribed {
        /// The unsubscribe request.
        request: RequestId,
        /// The session.
        session: Text,
    },
    /// A message of a subscribed session: the next in seq order.
    Delivery(Delivery),
    /// A conversation changed state. When the session is subscribed it is ordered (and
    /// de-duplicated) with the session's messages, whose seq it shares.
    ConversationEvent(ConversationEvent),
    /// A participant's read cursor moved (pushed by the server).
    ReadCursor(ReadCursor),
    /// A participant started or stopped typing (ephemeral).
    Typing(Typing),
    /// An agent's status (pushed by the server).
    AgentStatus(AgentStatus),
    /// A ticket changed (pushed by the server, not an answer to this client's command).
    TicketEvent(TicketEvent),
    /// The server announced it closes the connection. [`Event::Disconnected`] follows.
    GoAway(GoAway),
    /// A publish was acknowledged. `ack.duplicate` is true when the server had already stored
    /// it (a re-send after a reconnect): `ack.seq` is then the original seq.
    PubAck {
        /// The publish request.
        request: RequestId,
        /// The server's acknowledgement.
        ack: PubAck,
    },
    /// A request sent with [`ClientSession::request`] (or a typed helper) was answered: OK
    /// (`Frame::Success`), `TICKET_EVENT` for a ticket command, PONG for a ping.
    Response {
        /// The request.
        request: RequestId,
        /// The answer.
        frame: Frame,
    },
    /// A request failed.
    RequestFailed {
        /// The request.
        request: RequestId,
        /// Why.
        error: ClientError,
    },
}

/// Counters, for metrics and tests.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SessionStats {
    /// Transports reported with `handle_connected`.
    pub connects: u64,
    /// Handshakes completed.
    pub handshakes: u64,
    /// Connections lost or closed (any reason).
    pub disconnects: u64,
    /// Items dropped because the caller already had their seq (replay overlap).
    pub duplicates_dropped: u64,
    /// Items dropped because their session is not (or not yet) subscribed.
    pub unrouted_dropped: u64,
    /// Answers to requests that had already timed out or been abandoned.
    pub late_answers: u64,
    /// Gaps surfaced.
    pub gaps: u64,
    /// Publishes sent again after a reconnect.
    pub publishes_resent: u64,
    /// Protocol violations by the server.
    pub protocol_violations: u64,
    /// Keepalive PINGs sent.
    pub pings_sent: u64,
    /// Times the driver stopped reading because the application's queues were full.
    pub receive_pauses: u64,
}

enum Phase {
    Connecting,
    Handshaking { deadline: Instant },
    Established { last_rx: Instant, last_tx: Instant },
    Backoff { until: Instant },
    Closed,
}

enum Kind {
    /// `internal`: a resubscription the session made itself after a reconnect.
    Subscribe { session: Text, internal: bool },
    Unsubscribe { session: Text },
    Publish { client_msg_id: u64 },
    Other,
}

struct Pending {
    kind: Kind,
    /// Call order, to re-send in the order the application asked.
    issue_no: u64,
    /// The encoded frame (header included, correlation = the request id).
    frame: Bytes,
    /// Sent on the current connection.
    sent: bool,
    /// Sent on some earlier connection.
    sent_before: bool,
}

struct Sub {
    /// What the application asked for, used until the first SUBSCRIBED sets a position.
    from: ResumeFrom,
    /// The last position handed to the caller (or the position the stream starts after).
    position: Option<Position>,
    /// The SUBSCRIBE awaiting its SUBSCRIBED.
    request: Option<RequestId>,
    /// The epoch of the SUBSCRIBED on the current connection; `None` until it arrives (items
    /// before it cannot be placed and are dropped).
    confirmed_epoch: Option<u64>,
}

enum Verdict {
    Accept,
    Duplicate,
    NotSubscribed,
    Unconfirmed,
    Violation(String),
}

/// The client's protocol state machine. See the [module documentation](self).
///
/// ```
/// use std::time::Instant;
/// use bytes::BytesMut;
/// use switchboard_client::{Action, ClientConfig, ClientSession, Event};
///
/// let mut session = ClientSession::new(ClientConfig::default()).unwrap();
/// let now = Instant::now();
/// assert_eq!(session.poll_action(), Some(Action::Connect));
/// session.handle_connected(now); // the driver opened a socket
/// let mut out = BytesMut::new();
/// session.poll_transmit(now, &mut out); // HELLO, to be written to the socket
/// assert!(!out.is_empty());
/// assert_eq!(session.poll_event(), None); // nothing happens until WELCOME arrives
/// ```
pub struct ClientSession {
    config: ClientConfig,
    limits: Limits,
    phase: Phase,
    actions: VecDeque<Action>,
    events: VecDeque<Event>,
    outbox: VecDeque<Bytes>,
    rx: BytesMut,
    welcome: Option<Welcome>,
    ever_established: bool,
    attempts_failed: u32,
    /// Backoffs scheduled since the last handshake: the exponent of the next delay.
    backoff_step: u32,
    goaway_delay: Duration,
    keepalive: Duration,
    receive_paused: bool,
    requests: HashMap<u32, Pending>,
    /// `(deadline, id, issue_no)` in call order; deadlines are monotonic because every request
    /// gets the same timeout. Entries of finished requests are skipped lazily.
    deadlines: VecDeque<(Instant, u32, u64)>,
    issue_no: u64,
    next_id: u32,
    publishes_inflight: usize,
    requests_pending: usize,
    subs: BTreeMap<Text, Sub>,
    next_client_msg_id: u64,
    ping_nonce: u64,
    rng: u64,
    stats: SessionStats,
}

impl ClientSession {
    /// A session that wants to connect: [`ClientSession::poll_action`] yields
    /// [`Action::Connect`] first. Fails when the token or client name is too long for HELLO.
    pub fn new(config: ClientConfig) -> Result<ClientSession, ClientError> {
        hello(&config).to_bytes(0).map_err(|error| ClientError::InvalidRequest(error.to_string()))?;
        let mut rng = config.seed;
        // The id base is random per seed so a restarted client does not repeat the ids of its
        // previous life (the server would take new messages for repeats); never 0 (= no id).
        let next_client_msg_id = (splitmix64(&mut rng) >> 1).max(1);
        Ok(ClientSession {
            limits: Limits { frame_body_bytes_max: config.frame_body_bytes_max },
            keepalive: config.keepalive,
            config,
            phase: Phase::Connecting,
            actions: VecDeque::from([Action::Connect]),
            events: VecDeque::new(),
            outbox: VecDeque::new(),
            rx: BytesMut::new(),
            welcome: None,
            ever_established: false,
            attempts_failed: 0,
            backoff_step: 0,
            goaway_delay: Duration::ZERO,
            receive_paused: false,
            requests: HashMap::new(),
            deadlines: VecDeque::new(),
            issue_no: 0,
            next_id: 1,
            publishes_inflight: 0,
            requests_pending: 0,
            subs: BTreeMap::new(),
            next_client_msg_id,
            ping_nonce: 0,
            rng,
            stats: SessionStats::default(),
        })
    }

    // ----- inputs -------------------------------------------------------------------------

    /// The driver opened the transport asked for by [`Action::Connect`]: HELLO is queued.
    pub fn handle_connected(&mut self, now: Instant) {
        if !matches!(self.phase, Phase::Connecting) {
            return;
        }
        self.actions.retain(|action| *action != Action::Connect);
        self.stats.connects += 1;
        self.outbox.clear();
        self.rx.clear();
        match hello(&self.config).to_bytes(0) {
            Ok(frame) => self.outbox.push_back(frame),
            // Checked in `new` and `set_token`; unreachable, but never worth a panic.
            Err(error) => return self.close_for_good(DisconnectReason::ProtocolViolation(error.to_string())),
        }
        self.phase = Phase::Handshaking { deadline: now + self.config.handshake_timeout };
    }

    /// Bytes arrived on the transport. They are buffered inside the session; a partial frame
    /// waits for the rest. Bytes given while no transport is up are ignored.
    pub fn handle_bytes(&mut self, now: Instant, bytes: &[u8]) {
        if !self.transport_up() || bytes.is_empty() {
            return;
        }
        let mut rx = std::mem::take(&mut self.rx);
        rx.extend_from_slice(bytes);
        self.handle_input(now, &mut rx);
        if self.transport_up() {
            self.rx = rx;
        }
    }

    /// Decodes every whole frame at the front of `input` (the driver's own read buffer), leaving
    /// a partial frame in it. Use either this or [`ClientSession::handle_bytes`], not both.
    /// Decoded payloads share `input`'s memory (no copy).
    pub fn handle_input(&mut self, now: Instant, input: &mut BytesMut) {
        if !self.transport_up() {
            input.clear();
            return;
        }
        if input.is_empty() {
            return;
        }
        if let Phase::Established { last_rx, .. } = &mut self.phase {
            *last_rx = now;
        }
        loop {
            if !self.transport_up() {
                // A frame ended this connection; what follows it belongs to a dead transport.
                input.clear();
                return;
            }
            match decode(input, &self.limits) {
                Ok(Some(envelope)) => self.on_envelope(now, envelope),
                Ok(None) => return,
                Err(error) => {
                    input.clear();
                    return self.violation(now, format!("undecodable bytes from the server: {error}"));
                }
            }
        }
    }

    /// The transport closed (EOF, error), or the connect asked for by [`Action::Connect`]
    /// failed. Ignored when the session already closed it itself ([`Action::Close`]).
    pub fn handle_disconnected(&mut self, now: Instant) {
        match self.phase {
            Phase::Connecting => self.lose_connection(now, DisconnectReason::ConnectFailed, false),
            Phase::Handshaking { .. } | Phase::Established { .. } => {
                self.lose_connection(now, DisconnectReason::TransportClosed, false);
            }
            Phase::Backoff { .. } | Phase::Closed => {}
        }
    }

    /// Time passed: fires whatever is due (handshake and idle timeouts, keepalive PING, request
    /// timeouts, the next reconnect attempt). Safe to call at any time.
    pub fn handle_timeout(&mut self, now: Instant) {
        enum Due {
            Nothing,
            HandshakeTimeout,
            IdleTimeout,
            Ping,
            Reconnect,
        }
        let due = match self.phase {
            Phase::Handshaking { deadline } if now >= deadline => Due::HandshakeTimeout,
            Phase::Established { last_rx, .. } if !self.receive_paused && now >= last_rx + self.idle_timeout() => {
                Due::IdleTimeout
            }
            Phase::Established { last_tx, .. } if now >= last_tx + self.keepalive => Due::Ping,
            Phase::Backoff { until } if now >= until => Due::Reconnect,
            _ => Due::Nothing,
        };
        match due {
            Due::Nothing => {}
            Due::HandshakeTimeout => self.lose_connection(now, DisconnectReason::HandshakeTimeout, true),
            Due::IdleTimeout => self.lose_connection(now, DisconnectReason::KeepaliveTimeout, true),
            Due::Ping => {
                if let Phase::Established { last_tx, .. } = &mut self.phase {
                    // Counts as sent now, so one PING goes out per keepalive period.
                    *last_tx = now;
                }
                self.ping_nonce = self.ping_nonce.wrapping_add(1);
                self.stats.pings_sent += 1;
                self.queue_control(0, &Frame::Ping(Ping { nonce: self.ping_nonce }));
            }
            Due::Reconnect => {
                self.phase = Phase::Connecting;
                self.actions.push_back(Action::Connect);
            }
        }
        self.expire_requests(now);
    }

    /// Tells the session the driver stopped (`true`) or resumed (`false`) reading the
    /// transport because the application's queues are full. While paused the idle timeout is
    /// not enforced: the silence is the client's own doing, and the server decides whether
    /// this connection is a slow consumer. Resuming restarts the idle window.
    pub fn set_receive_paused(&mut self, now: Instant, paused: bool) {
        if paused && !self.receive_paused {
            self.stats.receive_pauses += 1;
        }
        if self.receive_paused && !paused {
            if let Phase::Established { last_rx, .. } = &mut self.phase {
                *last_rx = now;
            }
        }
        self.receive_paused = paused;
    }

    // ----- outputs ------------------------------------------------------------------------

    /// What to do with the transport, if anything.
    pub fn poll_action(&mut self) -> Option<Action> {
        self.actions.pop_front()
    }

    /// Appends every frame waiting to be sent to `buf`; returns how many bytes were appended.
    /// Write them all, in order, to the current transport.
    pub fn poll_transmit(&mut self, now: Instant, buf: &mut BytesMut) -> usize {
        if !self.transport_up() {
            self.outbox.clear();
            return 0;
        }
        let before = buf.len();
        for frame in self.outbox.drain(..) {
            buf.extend_from_slice(&frame);
        }
        let written = buf.len() - before;
        if written > 0 {
            if let Phase::Established { last_tx, .. } = &mut self.phase {
                *last_tx = now;
            }
        }
        written
    }

    /// The next event, if any. Events accumulate only from inputs; a driver that drains them
    /// after every input keeps the queue as small as the frames in one read.
    pub fn poll_event(&mut self) -> Option<Event> {
        self.events.pop_front()
    }

    /// When [`ClientSession::handle_timeout`] must be called next (`None`: no timer runs).
    pub fn poll_timeout(&mut self) -> Option<Instant> {
        while let Some(&(_, id, issue_no)) = self.deadlines.front() {
            if self.requests.get(&id).is_some_and(|pending| pending.issue_no == issue_no) {
                break;
            }
            self.deadlines.pop_front();
        }
        let request = self.deadlines.front().map(|&(deadline, _, _)| deadline);
        let phase = match self.phase {
            Phase::Handshaking { deadline } => Some(deadline),
            Phase::Established { last_rx, last_tx } => {
                let ping = last_tx + self.keepalive;
                Some(if self.receive_paused { ping } else { ping.min(last_rx + self.idle_timeout()) })
            }
            Phase::Backoff { until } => Some(until),
            Phase::Connecting | Phase::Closed => None,
        };
        match (request, phase) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    // ----- commands -----------------------------------------------------------------------

    /// Subscribes to `session` from `from`. Answered with [`Event::Subscribed`] (then the
    /// items) or [`Event::RequestFailed`]. Survives reconnects: the session re-subscribes after
    /// the last item handed out, so the caller sees no duplicate and no silent gap.
    pub fn subscribe(&mut self, now: Instant, session: Text, from: ResumeFrom) -> Result<RequestId, ClientError> {
        self.check_open()?;
        if self.subs.contains_key(&session) {
            return Err(ClientError::AlreadySubscribed);
        }
        let subscriptions_max = self.subscriptions_max();
        if self.subs.len() >= subscriptions_max {
            return Err(ClientError::LimitExceeded { message: format!("at most {subscriptions_max} subscriptions") });
        }
        self.check_requests_pending()?;
        let id = self.alloc_id();
        let frame = self.encode(id, &Frame::Subscribe(Subscribe { session: session.clone(), from }))?;
        let position = match from {
            ResumeFrom::After { epoch, seq } => Some(Position { epoch, seq }),
            ResumeFrom::Live | ResumeFrom::Earliest => None,
        };
        let request = RequestId(id);
        self.subs.insert(session.clone(), Sub { from, position, request: Some(request), confirmed_epoch: None });
        self.insert_pending(now, id, Kind::Subscribe { session, internal: false }, frame);
        Ok(request)
    }

    /// Unsubscribes from `session`; answered with [`Event::Unsubscribed`]. No item of the
    /// session is emitted after this call. A subscribe still waiting for its answer fails with
    /// [`ClientError::Closed`].
    pub fn unsubscribe(&mut self, now: Instant, session: &Text) -> Result<RequestId, ClientError> {
        self.check_open()?;
        let sub = self.subs.remove(session).ok_or(ClientError::NotSubscribed)?;
        if let Some(request) = sub.request {
            if let Some(pending) = self.requests.remove(&request.0) {
                self.uncount(&pending.kind);
                if matches!(pending.kind, Kind::Subscribe { internal: false, .. }) {
                    self.events.push_back(Event::RequestFailed { request, error: ClientError::Closed });
                }
            }
        }
        let id = self.alloc_id();
        let request = RequestId(id);
        if matches!(self.phase, Phase::Established { .. }) {
            let frame = self.encode(id, &Frame::Unsubscribe(Unsubscribe { session: session.clone() }))?;
            self.insert_pending(now, id, Kind::Unsubscribe { session: session.clone() }, frame);
        } else {
            // The server forgets subscriptions with the connection: not resubscribing is enough.
            self.events.push_back(Event::Unsubscribed { request, session: session.clone() });
        }
        Ok(request)
    }

    /// Publishes a message; answered with [`Event::PubAck`] (the assigned seq) or
    /// [`Event::RequestFailed`]. A `client_msg_id` of 0 is replaced by a fresh one. Until
    /// acknowledged the publish is kept and re-sent after a reconnect with the same
    /// `client_msg_id`, so the server stores it once.
    pub fn publish(&mut self, now: Instant, mut publish: Publish) -> Result<RequestId, ClientError> {
        self.check_open()?;
        if self.publishes_inflight >= self.config.inflight_publishes_max {
            return Err(ClientError::InflightFull { max: self.config.inflight_publishes_max });
        }
        if let Some(welcome) = &self.welcome {
            let max = welcome.limits.payload_bytes_max as usize;
            if max > 0 && publish.payload.len() > max {
                return Err(ClientError::LimitExceeded {
                    message: format!("payload of {} bytes, the server accepts {max}", publish.payload.len()),
                });
            }
        }
        if publish.client_msg_id == 0 {
            publish.client_msg_id = self.next_client_msg_id;
            self.next_client_msg_id = self.next_client_msg_id.wrapping_add(1).max(1);
        }
        let client_msg_id = publish.client_msg_id;
        let id = self.alloc_id();
        let frame = self.encode(id, &Frame::Publish(publish))?;
        self.insert_pending(now, id, Kind::Publish { client_msg_id }, frame);
        Ok(RequestId(id))
    }

    /// Sends any client request. PUBLISH, SUBSCRIBE and UNSUBSCRIBE go through
    /// [`ClientSession::publish`], [`ClientSession::subscribe`] and
    /// [`ClientSession::unsubscribe`]; the others (PING, `READ_CURSOR`, `OPEN_CONVERSATION`,
    /// `AGENT_STATUS`, `OFFER_RESPONSE`, TRANSFER, `CLOSE_CONVERSATION`, `TICKET_COMMAND`) are answered
    /// with [`Event::Response`] or [`Event::RequestFailed`]. They are sent once: if the
    /// connection is lost before the answer they fail with [`ClientError::ConnectionLost`].
    /// Requests made while disconnected wait for the next connection.
    pub fn request(&mut self, now: Instant, frame: Frame) -> Result<RequestId, ClientError> {
        match frame {
            Frame::Publish(publish) => self.publish(now, publish),
            Frame::Subscribe(subscribe) => self.subscribe(now, subscribe.session, subscribe.from),
            Frame::Unsubscribe(unsubscribe) => self.unsubscribe(now, &unsubscribe.session),
            Frame::Ping(_)
            | Frame::ReadCursor(_)
            | Frame::OpenConversation(_)
            | Frame::AgentStatus(_)
            | Frame::OfferResponse(_)
            | Frame::Transfer(_)
            | Frame::CloseConversation(_)
            | Frame::TicketCommand(_) => {
                self.check_open()?;
                self.check_requests_pending()?;
                let id = self.alloc_id();
                let frame = self.encode(id, &frame)?;
                self.insert_pending(now, id, Kind::Other, frame);
                Ok(RequestId(id))
            }
            Frame::Typing(_) => Err(ClientError::InvalidRequest("TYPING is never answered; use typing()".into())),
            other => Err(ClientError::InvalidRequest(format!("{:?} is not a client request", other.frame_type()))),
        }
    }

    /// A customer opens a conversation (it enters a queue); answered with OK.
    pub fn open_conversation(&mut self, now: Instant, open: OpenConversation) -> Result<RequestId, ClientError> {
        self.request(now, Frame::OpenConversation(open))
    }

    /// An agent sets its presence, capacity and skills; answered with OK.
    pub fn set_agent_status(&mut self, now: Instant, status: AgentStatus) -> Result<RequestId, ClientError> {
        self.request(now, Frame::AgentStatus(status))
    }

    /// An agent accepts or declines an offered conversation; answered with OK.
    pub fn respond_offer(&mut self, now: Instant, response: OfferResponse) -> Result<RequestId, ClientError> {
        self.request(now, Frame::OfferResponse(response))
    }

    /// Moves a conversation to another agent or queue; answered with OK.
    pub fn transfer(&mut self, now: Instant, transfer: Transfer) -> Result<RequestId, ClientError> {
        self.request(now, Frame::Transfer(transfer))
    }

    /// Closes a conversation; answered with OK.
    pub fn close_conversation(&mut self, now: Instant, close: CloseConversation) -> Result<RequestId, ClientError> {
        self.request(now, Frame::CloseConversation(close))
    }

    /// Moves a participant's read cursor; answered with OK.
    pub fn read_cursor(&mut self, now: Instant, cursor: ReadCursor) -> Result<RequestId, ClientError> {
        self.request(now, Frame::ReadCursor(cursor))
    }

    /// Creates or changes a ticket (compare-and-set on `expected_version`); answered with the
    /// ticket's `TICKET_EVENT`, or ERROR(Conflict) as [`ClientError::Server`].
    pub fn ticket_command(&mut self, now: Instant, command: TicketCommand) -> Result<RequestId, ClientError> {
        self.request(now, Frame::TicketCommand(command))
    }

    /// Sends a typing indicator. Ephemeral and never answered: when not connected it is not
    /// kept for later and [`ClientError::NotConnected`] is returned.
    pub fn typing(&mut self, _now: Instant, typing: Typing) -> Result<(), ClientError> {
        self.check_open()?;
        if !matches!(self.phase, Phase::Established { .. }) {
            return Err(ClientError::NotConnected);
        }
        let frame = self.encode(0, &Frame::Typing(typing))?;
        self.outbox.push_back(frame);
        Ok(())
    }

    /// Replaces the token sent in the next HELLO (after `GoAway(AuthExpired)`, say).
    pub fn set_token(&mut self, token: Text) -> Result<(), ClientError> {
        let mut config = self.config.clone();
        config.token = token;
        hello(&config).to_bytes(0).map_err(|error| ClientError::InvalidRequest(error.to_string()))?;
        self.config = config;
        Ok(())
    }

    /// Closes the client for good: pending requests fail with [`ClientError::Closed`],
    /// subscriptions end, and [`Action::Close`] is asked for if a transport is up.
    pub fn close(&mut self, _now: Instant) {
        if matches!(self.phase, Phase::Closed) {
            return;
        }
        if self.transport_up() {
            self.actions.push_back(Action::Close);
        }
        self.outbox.clear();
        self.close_for_good(DisconnectReason::Closed);
    }

    // ----- state --------------------------------------------------------------------------

    /// The connection's state.
    pub fn state(&self) -> ConnectionState {
        match self.phase {
            Phase::Connecting => ConnectionState::Connecting,
            Phase::Handshaking { .. } => ConnectionState::Handshaking,
            Phase::Established { .. } => ConnectionState::Established,
            Phase::Backoff { until } => ConnectionState::Reconnecting { at: until },
            Phase::Closed => ConnectionState::Closed,
        }
    }

    /// True once closed for good.
    pub fn is_closed(&self) -> bool {
        matches!(self.phase, Phase::Closed)
    }

    /// The last WELCOME received.
    pub fn welcome(&self) -> Option<&Welcome> {
        self.welcome.as_ref()
    }

    /// The last position handed to the caller for `session` (or where its stream starts).
    pub fn position(&self, session: &Text) -> Option<Position> {
        self.subs.get(session).and_then(|sub| sub.position)
    }

    /// The subscribed sessions, in name order.
    pub fn subscriptions(&self) -> impl Iterator<Item = &Text> {
        self.subs.keys()
    }

    /// Requests waiting for an answer (publishes included).
    pub fn requests_pending(&self) -> usize {
        self.publishes_inflight + self.requests_pending
    }

    /// Publishes waiting for their PUBACK.
    pub fn publishes_inflight(&self) -> usize {
        self.publishes_inflight
    }

    /// Counters.
    pub fn stats(&self) -> SessionStats {
        self.stats
    }

    /// The configuration.
    pub fn config(&self) -> &ClientConfig {
        &self.config
    }

    /// Makes the next correlation id `id` (to test wrapping).
    #[cfg(test)]
    pub(crate) fn set_next_id(&mut self, id: u32) {
        self.next_id = id;
    }

    // ----- frames -------------------------------------------------------------------------

    fn on_envelope(&mut self, now: Instant, envelope: Envelope) {
        let Envelope { correlation, frame } = envelope;
        if let Phase::Handshaking { .. } = self.phase {
            match frame {
                Frame::Welcome(welcome) => self.establish(now, welcome),
                Frame::Error(error) => self.on_connection_error(now, &error),
                Frame::GoAway(goaway) => self.on_goaway(now, goaway),
                Frame::Ping(ping) => self.queue_control(correlation, &Frame::Pong(Pong { nonce: ping.nonce })),
                other => self.violation(now, format!("{:?} before WELCOME", other.frame_type())),
            }
            return;
        }
        match frame {
            Frame::Deliver(deliver) => self.on_deliver(now, deliver),
            Frame::ConversationEvent(event) => self.on_conversation_event(now, event),
            Frame::Typing(typing) => self.events.push_back(Event::Typing(typing)),
            Frame::Ping(ping) => self.queue_control(correlation, &Frame::Pong(Pong { nonce: ping.nonce })),
            Frame::GoAway(goaway) => self.on_goaway(now, goaway),
            Frame::Error(error) if correlation == 0 => self.on_connection_error(now, &error),
            Frame::Welcome(_) => self.violation(now, "WELCOME after the handshake".into()),
            frame if correlation != 0 => {
                if self.requests.contains_key(&correlation) {
                    self.on_answer(now, correlation, frame);
                } else {
                    // The answer to a request that timed out or was abandoned.
                    self.stats.late_answers += 1;
                }
            }
            Frame::ReadCursor(cursor) => self.events.push_back(Event::ReadCursor(cursor)),
            Frame::AgentStatus(status) => self.events.push_back(Event::AgentStatus(status)),
            Frame::TicketEvent(ticket) => self.events.push_back(Event::TicketEvent(ticket)),
            Frame::Pong(_) => {}
            other => self.violation(now, format!("unsolicited {:?} frame", other.frame_type())),
        }
    }

    fn on_answer(&mut self, now: Instant, id: u32, frame: Frame) {
        let Some(pending) = self.requests.get(&id) else { return };
        let request = RequestId(id);
        let answers = match (&pending.kind, &frame) {
            (_, Frame::Error(_)) | (Kind::Other, _) | (Kind::Unsubscribe { .. }, Frame::Success(_)) => true,
            (Kind::Subscribe { session, .. }, Frame::Subscribed(info)) => info.session == *session,
            (Kind::Publish { client_msg_id }, Frame::PubAck(ack)) => ack.client_msg_id == *client_msg_id,
            _ => false,
        };
        if !answers {
            // The request stays pending: the reconnect re-sends or fails it by the usual rules.
            return self.violation(now, format!("{:?} does not answer request {request}", frame.frame_type()));
        }
        let pending = self.requests.remove(&id).expect("checked above");
        self.uncount(&pending.kind);
        match (pending.kind, frame) {
            (kind, Frame::Error(error)) => self.on_request_error(request, kind, &error),
            (Kind::Subscribe { internal, .. }, Frame::Subscribed(info)) => self.on_subscribed(request, internal, info),
            (Kind::Publish { .. }, Frame::PubAck(ack)) => self.events.push_back(Event::PubAck { request, ack }),
            (Kind::Unsubscribe { session }, _) => self.events.push_back(Event::Unsubscribed { request, session }),
            (_, frame) => self.events.push_back(Event::Response { request, frame }),
        }
    }

    fn on_request_error(&mut self, request: RequestId, kind: Kind, error: &ErrorFrame) {
        let error = ClientError::from_server(ErrorCode::from_u16(error.code), &error.message);
        match kind {
            Kind::Subscribe { session, internal } => {
                if self.subs.get(&session).is_some_and(|sub| sub.request == Some(request)) {
                    self.subs.remove(&session);
                }
                if internal {
                    self.events.push_back(Event::SubscriptionFailed { session, error });
                } else {
                    self.events.push_back(Event::RequestFailed { request, error });
                }
            }
            _ => self.events.push_back(Event::RequestFailed { request, error }),
        }
    }

    fn on_subscribed(&mut self, request: RequestId, internal: bool, info: Subscribed) {
        let Some(sub) = self.subs.get_mut(&info.session) else { return };
        sub.request = None;
        sub.confirmed_epoch = Some(info.epoch);
        let start = Position { epoch: info.epoch, seq: info.replay_from_seq.saturating_sub(1) };
        let last = sub.position;
        let cause = match last {
            None => {
                sub.position = Some(start);
                (!info.recovered).then_some(GapCause::NotRecovered)
            }
            Some(last) if last.epoch != info.epoch => {
                sub.position = Some(start);
                Some(GapCause::EpochChanged)
            }
            Some(last) if start.seq > last.seq => {
                sub.position = Some(start);
                Some(if info.recovered { GapCause::Inconsistent } else { GapCause::NotRecovered })
            }
            // The replay starts at or before the caller's next seq; the overlap is dropped.
            Some(_) => (!info.recovered).then_some(GapCause::NotRecovered),
        };
        let next = sub.position.map_or(start, |position| Position { epoch: position.epoch, seq: position.seq + 1 });
        let session = info.session.clone();
        if internal {
            self.events.push_back(Event::Resubscribed { info });
        } else {
            self.events.push_back(Event::Subscribed { request, info });
        }
        if let Some(cause) = cause {
            self.stats.gaps += 1;
            self.events.push_back(Event::Gap(Gap { session, last, next, cause }));
        }
    }

    fn check_seq(&mut self, session: &Text, epoch: u64, seq: u64) -> Verdict {
        let Some(sub) = self.subs.get_mut(session) else { return Verdict::NotSubscribed };
        let Some(confirmed_epoch) = sub.confirmed_epoch else { return Verdict::Unconfirmed };
        let Some(position) = sub.position else { return Verdict::Unconfirmed };
        if epoch != confirmed_epoch {
            return Verdict::Violation(format!(
                "session {session}: item of epoch {epoch} on a subscription confirmed in epoch {confirmed_epoch}"
            ));
        }
        if seq <= position.seq {
            return Verdict::Duplicate;
        }
        if seq != position.seq + 1 {
            return Verdict::Violation(format!(
                "session {session}: seq {seq} follows {} in epoch {epoch}; {} missing",
                position.seq,
                seq - position.seq - 1
            ));
        }
        sub.position = Some(Position { epoch, seq });
        Verdict::Accept
    }

    fn on_deliver(&mut self, now: Instant, deliver: Deliver) {
        match self.check_seq(&deliver.session, deliver.epoch, deliver.seq) {
            Verdict::Accept => self.events.push_back(Event::Delivery(deliver)),
            Verdict::Duplicate => self.stats.duplicates_dropped += 1,
            Verdict::NotSubscribed | Verdict::Unconfirmed => self.stats.unrouted_dropped += 1,
            Verdict::Violation(detail) => self.violation(now, detail),
        }
    }

    fn on_conversation_event(&mut self, now: Instant, event: ConversationEvent) {
        // Seq 0: a direct notification outside the session's order (an offer to an agent, or
        // an offer withdrawn), which may concern a session this client also follows.
        if event.seq == 0 {
            self.events.push_back(Event::ConversationEvent(event));
            return;
        }
        match self.check_seq(&event.session, event.epoch, event.seq) {
            // Events of a session this client does not follow (an agent's offers, say) are
            // passed on as they come.
            Verdict::Accept | Verdict::NotSubscribed => self.events.push_back(Event::ConversationEvent(event)),
            Verdict::Duplicate => self.stats.duplicates_dropped += 1,
            Verdict::Unconfirmed => self.stats.unrouted_dropped += 1,
            Verdict::Violation(detail) => self.violation(now, detail),
        }
    }

    fn on_goaway(&mut self, now: Instant, goaway: GoAway) {
        self.goaway_delay = Duration::from_millis(u64::from(goaway.reconnect_after_ms));
        let reason = DisconnectReason::GoAway { reason: goaway.reason, message: goaway.message.clone() };
        self.events.push_back(Event::GoAway(goaway));
        self.lose_connection(now, reason, true);
    }

    fn on_connection_error(&mut self, now: Instant, error: &ErrorFrame) {
        let reason = DisconnectReason::ServerError { code: ErrorCode::from_u16(error.code), message: error.message.clone() };
        self.lose_connection(now, reason, true);
    }

    fn violation(&mut self, now: Instant, detail: String) {
        self.stats.protocol_violations += 1;
        self.lose_connection(now, DisconnectReason::ProtocolViolation(detail), true);
    }

    fn queue_control(&mut self, correlation: u32, frame: &Frame) {
        if let Ok(frame) = frame.to_bytes(correlation) {
            self.outbox.push_back(frame);
        }
    }

    // ----- connection lifecycle -----------------------------------------------------------

    fn establish(&mut self, now: Instant, welcome: Welcome) {
        if welcome.version != u16::from(PROTOCOL_VERSION) {
            return self.violation(now, format!("WELCOME chose version {}, this client speaks 1", welcome.version));
        }
        self.phase = Phase::Established { last_rx: now, last_tx: now };
        self.attempts_failed = 0;
        self.backoff_step = 0;
        self.stats.handshakes += 1;
        self.keepalive = match welcome.limits.keepalive_ms {
            0 => self.config.keepalive,
            // Ping twice per window the server announces, so one late PING is not fatal.
            ms => self.config.keepalive.min(Duration::from_millis(u64::from(ms)) / 2),
        };
        let resumed = self.ever_established;
        self.ever_established = true;
        self.welcome = Some(welcome.clone());
        self.events.push_back(Event::Connected { welcome, resumed });

        // Confirmed subscriptions first, each after its last position.
        let resubscribe: Vec<(Text, Position)> = self
            .subs
            .iter()
            .filter(|(_, sub)| sub.request.is_none())
            .filter_map(|(session, sub)| sub.position.map(|position| (session.clone(), position)))
            .collect();
        for (session, position) in resubscribe {
            let id = self.alloc_id();
            let subscribe = Frame::Subscribe(Subscribe { session: session.clone(), from: position.resume_from() });
            let Ok(frame) = self.encode(id, &subscribe) else { continue };
            if let Some(sub) = self.subs.get_mut(&session) {
                sub.request = Some(RequestId(id));
            }
            self.insert_pending(now, id, Kind::Subscribe { session, internal: true }, frame);
        }

        // Then everything that waits, in call order.
        let mut waiting: Vec<(u64, u32)> =
            self.requests.iter().filter(|(_, pending)| !pending.sent).map(|(id, pending)| (pending.issue_no, *id)).collect();
        waiting.sort_unstable();
        for (_, id) in waiting {
            let Some(pending) = self.requests.get(&id) else { continue };
            let refreshed = match &pending.kind {
                Kind::Subscribe { session, .. } => self.subs.get(session).and_then(|sub| {
                    let from = sub.position.map_or(sub.from, Position::resume_from);
                    Frame::Subscribe(Subscribe { session: session.clone(), from }).to_bytes(id).ok()
                }),
                _ => None,
            };
            let Some(pending) = self.requests.get_mut(&id) else { continue };
            if let Some(frame) = refreshed {
                pending.frame = frame;
            }
            if pending.sent_before && matches!(pending.kind, Kind::Publish { .. }) {
                self.stats.publishes_resent += 1;
            }
            pending.sent = true;
            pending.sent_before = true;
            self.outbox.push_back(pending.frame.clone());
        }
    }

    fn lose_connection(&mut self, now: Instant, reason: DisconnectReason, close_transport: bool) {
        let was_established = matches!(self.phase, Phase::Established { .. });
        if matches!(self.phase, Phase::Handshaking { .. } | Phase::Established { .. }) {
            self.stats.disconnects += 1;
        }
        if close_transport {
            self.actions.push_back(Action::Close);
        }
        self.actions.retain(|action| *action != Action::Connect);
        self.outbox.clear();
        self.rx.clear();

        let mut ids: Vec<(u64, u32)> = self.requests.iter().map(|(id, pending)| (pending.issue_no, *id)).collect();
        ids.sort_unstable();
        for (_, id) in ids {
            let Some(pending) = self.requests.get_mut(&id) else { continue };
            match &pending.kind {
                Kind::Other if pending.sent => {
                    let pending = self.requests.remove(&id).expect("present");
                    self.uncount(&pending.kind);
                    self.events.push_back(Event::RequestFailed { request: RequestId(id), error: ClientError::ConnectionLost });
                }
                Kind::Unsubscribe { .. } => {
                    let pending = self.requests.remove(&id).expect("present");
                    self.uncount(&pending.kind);
                    if let Kind::Unsubscribe { session } = pending.kind {
                        self.events.push_back(Event::Unsubscribed { request: RequestId(id), session });
                    }
                }
                Kind::Subscribe { internal: true, .. } => {
                    // Made again from the subscription table on the next WELCOME.
                    self.requests.remove(&id);
                }
                _ => pending.sent = false,
            }
        }
        for sub in self.subs.values_mut() {
            sub.confirmed_epoch = None;
            if sub.request.is_some_and(|request| !self.requests.contains_key(&request.0)) {
                sub.request = None;
            }
        }

        if !was_established {
            self.attempts_failed = self.attempts_failed.saturating_add(1);
        }
        let gave_up = self.config.reconnect.attempts_max.is_some_and(|max| self.attempts_failed >= max);
        if reason.is_terminal() || (!self.ever_established && !self.config.retry_initial_connect) {
            return self.close_for_good(reason);
        }
        if gave_up {
            return self.close_for_good(DisconnectReason::GaveUp { attempts: self.attempts_failed, last: Box::new(reason) });
        }
        let jitter = splitmix64(&mut self.rng);
        let delay = self.config.reconnect.delay(self.backoff_step, jitter).max(self.goaway_delay);
        self.backoff_step = self.backoff_step.saturating_add(1);
        self.goaway_delay = Duration::ZERO;
        let until = now + delay;
        self.phase = Phase::Backoff { until };
        self.events.push_back(Event::Disconnected { reason, reconnect_at: Some(until) });
    }

    fn close_for_good(&mut self, reason: DisconnectReason) {
        let error = reason.to_error();
        let mut ids: Vec<(u64, u32)> = self.requests.iter().map(|(id, pending)| (pending.issue_no, *id)).collect();
        ids.sort_unstable();
        let mut failed_as_request = Vec::new();
        for (_, id) in ids {
            let Some(pending) = self.requests.remove(&id) else { continue };
            match pending.kind {
                Kind::Subscribe { internal: true, .. } => {}
                kind => {
                    if let Kind::Subscribe { session, .. } = kind {
                        failed_as_request.push(session);
                    }
                    self.events.push_back(Event::RequestFailed { request: RequestId(id), error: error.clone() });
                }
            }
        }
        for session in std::mem::take(&mut self.subs).into_keys() {
            // A subscribe still waiting for its first answer has just failed as a request.
            if !failed_as_request.contains(&session) {
                self.events.push_back(Event::SubscriptionFailed { session, error: error.clone() });
            }
        }
        self.deadlines.clear();
        self.publishes_inflight = 0;
        self.requests_pending = 0;
        self.outbox.clear();
        self.rx.clear();
        self.phase = Phase::Closed;
        self.events.push_back(Event::Disconnected { reason, reconnect_at: None });
    }

    fn expire_requests(&mut self, now: Instant) {
        while let Some(&(deadline, id, issue_no)) = self.deadlines.front() {
            if self.requests.get(&id).is_none_or(|pending| pending.issue_no != issue_no) {
                self.deadlines.pop_front();
                continue;
            }
            if deadline > now {
                return;
            }
            self.deadlines.pop_front();
            let pending = self.requests.remove(&id).expect("checked above");
            self.uncount(&pending.kind);
            let request = RequestId(id);
            match pending.kind {
                Kind::Subscribe { session, internal: true } => {
                    // A server that does not confirm a resubscription is not healthy: start over.
                    if let Some(sub) = self.subs.get_mut(&session) {
                        sub.request = None;
                    }
                    if self.transport_up() {
                        self.lose_connection(now, DisconnectReason::ResubscribeTimeout, true);
                    }
                }
                Kind::Subscribe { session, internal: false } => {
                    self.subs.remove(&session);
                    if pending.sent && matches!(self.phase, Phase::Established { .. }) {
                        // The server may still subscribe us; undo it (its answer will be late).
                        let id = self.alloc_id();
                        if let Ok(frame) = Frame::Unsubscribe(Unsubscribe { session }).to_bytes(id) {
                            self.outbox.push_back(frame);
                        }
                    }
                    self.events.push_back(Event::RequestFailed { request, error: ClientError::Timeout });
                }
                _ => self.events.push_back(Event::RequestFailed { request, error: ClientError::Timeout }),
            }
        }
    }

    // ----- bookkeeping --------------------------------------------------------------------

    fn transport_up(&self) -> bool {
        matches!(self.phase, Phase::Handshaking { .. } | Phase::Established { .. })
    }

    fn idle_timeout(&self) -> Duration {
        self.config.idle_timeout.unwrap_or(self.keepalive * 2)
    }

    fn subscriptions_max(&self) -> usize {
        let server = self.welcome.as_ref().map_or(0, |welcome| welcome.limits.subscriptions_max as usize);
        if server == 0 {
            self.config.subscriptions_max
        } else {
            self.config.subscriptions_max.min(server)
        }
    }

    fn check_open(&self) -> Result<(), ClientError> {
        if matches!(self.phase, Phase::Closed) {
            return Err(ClientError::Closed);
        }
        Ok(())
    }

    fn check_requests_pending(&self) -> Result<(), ClientError> {
        if self.requests_pending >= self.config.requests_pending_max {
            return Err(ClientError::TooManyRequests { max: self.config.requests_pending_max });
        }
        Ok(())
    }

    fn encode(&self, correlation: u32, frame: &Frame) -> Result<Bytes, ClientError> {
        if let Some(welcome) = &self.welcome {
            let body_bytes = frame.encoded_len() - HEADER_BYTES;
            let max = welcome.limits.frame_body_bytes_max as usize;
            if max > 0 && body_bytes > max {
                return Err(ClientError::LimitExceeded {
                    message: format!("frame body of {body_bytes} bytes, the server accepts {max}"),
                });
            }
        }
        frame.to_bytes(correlation).map_err(|error| ClientError::InvalidRequest(error.to_string()))
    }

    /// A non-zero correlation id not in use, wrapping.
    fn alloc_id(&mut self) -> u32 {
        loop {
            let id = self.next_id;
            self.next_id = self.next_id.wrapping_add(1);
            if id != 0 && !self.requests.contains_key(&id) {
                return id;
            }
        }
    }

    fn insert_pending(&mut self, now: Instant, id: u32, kind: Kind, frame: Bytes) {
        match kind {
            Kind::Publish { .. } => self.publishes_inflight += 1,
            Kind::Subscribe { internal: true, .. } => {}
            _ => self.requests_pending += 1,
        }
        self.issue_no += 1;
        let established = matches!(self.phase, Phase::Established { .. });
        if established {
            self.outbox.push_back(frame.clone());
        }
        self.deadlines.push_back((now + self.config.request_timeout, id, self.issue_no));
        self.requests
            .insert(id, Pending { kind, issue_no: self.issue_no, frame, sent: established, sent_before: established });
    }

    fn uncount(&mut self, kind: &Kind) {
        match kind {
            Kind::Publish { .. } => self.publishes_inflight -= 1,
            Kind::Subscribe { internal: true, .. } => {}
            _ => self.requests_pending -= 1,
        }
    }
}

fn hello(config: &ClientConfig) -> Frame {
    Frame::Hello(Hello {
        version_max: u16::from(PROTOCOL_VERSION),
        version_min: u16::from(PROTOCOL_VERSION),
        features: config.features,
        client_name: config.client_name.clone(),
        token: config.token.clone(),
    })
}

impl fmt::Debug for ClientSession {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientSession")
            .field("state", &self.state())
            .field("subscriptions", &self.subs.len())
            .field("requests_pending", &self.requests_pending())
            .field("stats", &self.stats)
            .finish_non_exhaustive()
    }
}
