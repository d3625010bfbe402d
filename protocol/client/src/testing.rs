//! An in-memory fake server, for tests, examples and fuzzing (feature `testing`).
//!
//! Owns a tiny, single-table imitation of the engine written with the same codec: HELLO →
//! WELCOME, SUBSCRIBE with replay from a bounded history, PUBLISH → seq + PUBACK + DELIVER
//! fan-out with de-duplication by `client_msg_id`, OK for the customer-service requests, and
//! knobs to break things (drop a connection after N frames, mid-frame; GOAWAY; lose a
//! session's history). It is sans-IO like the client: [`FakeServer`] takes and yields bytes,
//! [`Pair`] wires it to a [`ClientSession`] in memory with virtual time, and [`tcp`] serves it
//! over loopback TCP to test the real drivers. It is not the engine and makes no claim about
//! performance; it only speaks the protocol faithfully enough to test the client against it.

use std::collections::{BTreeMap, HashMap, HashSet, VecDeque};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use switchboard_protocol::{
    decode, Deliver, Durability, ErrorCode, ErrorFrame, Frame, GoAway, GoAwayReason, Limits, Pong, PubAck, Publish,
    ResumeFrom, ServerLimits, Subscribed, Success, Text, TicketEvent, TicketOp, TicketState, Welcome,
};

use crate::config::ClientConfig;
use crate::session::{Action, ClientSession, Event};

/// A connection of the fake server.
pub type ConnId = u64;

/// How the fake server behaves.
#[derive(Debug, Clone)]
pub struct FakeServerConfig {
    /// The token HELLO must carry (`None`: any token, as the engine without auth).
    pub token: Option<String>,
    /// Messages kept per session for replay.
    pub history_messages_max: usize,
    /// The limits announced in WELCOME.
    pub limits: ServerLimits,
    /// Close each connection after it was sent this many frames, cutting the next frame in
    /// half (`None`: never). Applies to the first `disconnects_max` connections only, so a
    /// test always ends.
    pub disconnect_after_frames: Option<usize>,
    /// How many connections `disconnect_after_frames` applies to.
    pub disconnects_max: usize,
    /// Answer PING with PONG (turn off to test the client's idle timeout).
    pub answer_pings: bool,
}

impl Default for FakeServerConfig {
    fn default() -> Self {
        FakeServerConfig {
            token: None,
            history_messages_max: 1024,
            limits: ServerLimits {
                frame_body_bytes_max: 1 << 20,
                payload_bytes_max: 64 * 1024,
                subscriptions_max: 1024,
                history_messages_max: 1024,
                keepalive_ms: 30_000,
                outbound_bytes_max: 1 << 20,
            },
            disconnect_after_frames: None,
            disconnects_max: 0,
            answer_pings: true,
        }
    }
}

/// What the fake server did, for assertions.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FakeServerStats {
    /// Connections accepted.
    pub connections: u64,
    /// Messages stored.
    pub messages: u64,
    /// PUBLISH frames answered as repeats (same `client_msg_id`).
    pub duplicate_publishes: u64,
    /// SUBSCRIBEs answered.
    pub subscribes: u64,
    /// SUBSCRIBEs answered with `recovered = false`.
    pub unrecovered_subscribes: u64,
    /// Connections cut by `disconnect_after_frames` or [`FakeServer::kick`].
    pub kicks: u64,
}

struct Log {
    epoch: u64,
    head_seq: u64,
    history: VecDeque<Deliver>,
}

struct Conn {
    rx: BytesMut,
    tx: BytesMut,
    welcomed: bool,
    subs: HashSet<Text>,
    frames_sent: usize,
    cut_after_frames: Option<usize>,
    closed: bool,
}

/// The fake server: a session table shared by any number of connections. See the module doc.
pub struct FakeServer {
    config: FakeServerConfig,
    next_epoch: u64,
    sessions: BTreeMap<Text, Log>,
    dedup: HashMap<(Text, u64), PubAck>,
    tickets: HashMap<Text, u64>,
    conns: BTreeMap<ConnId, Conn>,
    next_conn: ConnId,
    disconnects_done: usize,
    timestamp_us: u64,
    stats: FakeServerStats,
}

impl FakeServer {
    /// A server with no sessions and no connections.
    pub fn new(config: FakeServerConfig) -> FakeServer {
        FakeServer {
            config,
            next_epoch: 1,
            sessions: BTreeMap::new(),
            dedup: HashMap::new(),
            tickets: HashMap::new(),
            conns: BTreeMap::new(),
            next_conn: 1,
            disconnects_done: 0,
            timestamp_us: 1_700_000_000_000_000,
            stats: FakeServerStats::default(),
        }
    }

    /// The configuration (knobs can be changed between steps).
    pub fn config_mut(&mut self) -> &mut FakeServerConfig {
        &mut self.config
    }

    /// Counters.
    pub fn stats(&self) -> FakeServerStats {
        self.stats
    }

    /// A new connection.
    pub fn accept(&mut self) -> ConnId {
        let id = self.next_conn;
        self.next_conn += 1;
        self.stats.connections += 1;
        let cut_after_frames = match self.config.disconnect_after_frames {
            Some(frames) if self.disconnects_done < self.config.disconnects_max => Some(frames),
            _ => None,
        };
        self.conns.insert(
            id,
            Conn {
                rx: BytesMut::new(),
                tx: BytesMut::new(),
                welcomed: false,
                subs: HashSet::new(),
                frames_sent: 0,
                cut_after_frames,
                closed: false,
            },
        );
        id
    }

    /// The connections currently open.
    pub fn connections(&self) -> Vec<ConnId> {
        self.conns.keys().copied().collect()
    }

    /// Bytes from a client.
    pub fn handle_bytes(&mut self, conn: ConnId, bytes: &[u8]) {
        let Some(state) = self.conns.get_mut(&conn) else { return };
        if state.closed {
            return;
        }
        state.rx.extend_from_slice(bytes);
        loop {
            let Some(state) = self.conns.get_mut(&conn) else { return };
            if state.closed {
                return;
            }
            match decode(&mut state.rx, &Limits::default()) {
                Ok(Some(envelope)) => self.handle_frame(conn, envelope.correlation, envelope.frame),
                Ok(None) => return,
                Err(error) => {
                    self.send(conn, 0, &error_frame(error.code(), &error.to_string()));
                    self.close(conn);
                    return;
                }
            }
        }
    }

    /// Moves the bytes queued for `conn` into `buf`.
    pub fn poll_transmit(&mut self, conn: ConnId, buf: &mut BytesMut) {
        if let Some(state) = self.conns.get_mut(&conn) {
            buf.extend_from_slice(&state.tx.split());
        }
    }

    /// True when the server closed `conn`: send what [`FakeServer::poll_transmit`] still
    /// yields, then close the transport and call [`FakeServer::disconnect`].
    pub fn is_closed(&self, conn: ConnId) -> bool {
        self.conns.get(&conn).is_none_or(|state| state.closed)
    }

    /// The transport of `conn` is gone.
    pub fn disconnect(&mut self, conn: ConnId) {
        self.conns.remove(&conn);
    }

    /// Closes `conn` now (what is queued is still sent).
    pub fn kick(&mut self, conn: ConnId) {
        if self.conns.contains_key(&conn) {
            self.stats.kicks += 1;
            self.close(conn);
        }
    }

    /// Sends GOAWAY on `conn` and closes it.
    pub fn goaway(&mut self, conn: ConnId, reason: GoAwayReason, reconnect_after_ms: u32) {
        let goaway = Frame::GoAway(GoAway { reason, reconnect_after_ms, message: Text::from_static("fake server says goodbye") });
        self.send(conn, 0, &goaway);
        self.close(conn);
    }

    /// Sends any frame on `conn` (to test how the client takes frames the fake never sends).
    pub fn push(&mut self, conn: ConnId, correlation: u32, frame: &Frame) {
        self.send(conn, correlation, frame);
    }

    /// Stores a message in `session` as another participant would, and fans it out.
    pub fn publish(&mut self, session: &str, sender: &str, payload: &[u8]) -> (u64, u64) {
        let deliver = self.append(
            Text::from(session),
            0,
            Text::from(sender),
            Bytes::copy_from_slice(payload),
        );
        let position = (deliver.epoch, deliver.seq);
        self.fan_out(&deliver);
        position
    }

    /// The session loses its history and starts a new epoch (an engine restarted without its
    /// journal): a resume from the old epoch cannot be recovered.
    pub fn restart_session(&mut self, session: &str) {
        let epoch = self.take_epoch();
        if let Some(log) = self.sessions.get_mut(&Text::from(session)) {
            log.epoch = epoch;
            log.head_seq = 0;
            log.history.clear();
        }
    }

    /// Drops all but the last `keep` messages of `session`'s history.
    pub fn truncate_history(&mut self, session: &str, keep: usize) {
        if let Some(log) = self.sessions.get_mut(&Text::from(session)) {
            while log.history.len() > keep {
                log.history.pop_front();
            }
        }
    }

    /// Every message still held for `session`, in order.
    pub fn history(&self, session: &str) -> Vec<Deliver> {
        self.sessions.get(&Text::from(session)).map(|log| log.history.iter().cloned().collect()).unwrap_or_default()
    }

    fn take_epoch(&mut self) -> u64 {
        let epoch = self.next_epoch;
        self.next_epoch += 1;
        epoch
    }

    fn close(&mut self, conn: ConnId) {
        if let Some(state) = self.conns.get_mut(&conn) {
            state.closed = true;
            state.subs.clear();
        }
    }

    fn send(&mut self, conn: ConnId, correlation: u32, frame: &Frame) {
        let Some(state) = self.conns.get_mut(&conn) else { return };
        if state.closed {
            return;
        }
        let Ok(bytes) = frame.to_bytes(correlation) else { return };
        if state.cut_after_frames == Some(state.frames_sent) {
            // Cut mid-frame: the client must drop the partial frame with the connection.
            state.tx.extend_from_slice(&bytes[..bytes.len() / 2]);
            self.disconnects_done += 1;
            self.stats.kicks += 1;
            self.close(conn);
            return;
        }
        state.frames_sent += 1;
        state.tx.extend_from_slice(&bytes);
    }

    fn handle_frame(&mut self, conn: ConnId, correlation: u32, frame: Frame) {
        let welcomed = self.conns.get(&conn).is_some_and(|state| state.welcomed);
        if !welcomed {
            let Frame::Hello(hello) = frame else {
                self.send(conn, correlation, &error_frame(ErrorCode::HandshakeRequired, "HELLO first"));
                return self.close(conn);
            };
            if self.config.token.as_deref().is_some_and(|token| token != hello.token.as_str()) {
                self.send(conn, 0, &error_frame(ErrorCode::AuthFailed, "bad token"));
                return self.close(conn);
            }
            if let Some(state) = self.conns.get_mut(&conn) {
                state.welcomed = true;
            }
            let welcome = Welcome {
                version: 1,
                features: 0,
                server_name: Text::from_static("switchboard-fake"),
                connection_id: conn,
                tenant: Text::from_static("test-tenant"),
                limits: self.config.limits.clone(),
            };
            return self.send(conn, correlation, &Frame::Welcome(welcome));
        }
        match frame {
            Frame::Ping(ping) => {
                if self.config.answer_pings {
                    self.send(conn, correlation, &Frame::Pong(Pong { nonce: ping.nonce }));
                }
            }
            Frame::Subscribe(subscribe) => self.subscribe(conn, correlation, subscribe.session, subscribe.from),
            Frame::Unsubscribe(unsubscribe) => {
                if let Some(state) = self.conns.get_mut(&conn) {
                    state.subs.remove(&unsubscribe.session);
                }
                self.send(conn, correlation, &Frame::Success(Success {}));
            }
            Frame::Publish(publish) => self.handle_publish(conn, correlation, publish),
            Frame::ReadCursor(cursor) => {
                self.send(conn, correlation, &Frame::Success(Success {}));
                let session = cursor.session.clone();
                self.fan_out_frame(&session, Some(conn), &Frame::ReadCursor(cursor));
            }
            Frame::Typing(typing) => {
                let session = typing.session.clone();
                self.fan_out_frame(&session, Some(conn), &Frame::Typing(typing));
            }
            Frame::OpenConversation(_)
            | Frame::AgentStatus(_)
            | Frame::OfferResponse(_)
            | Frame::Transfer(_)
            | Frame::CloseConversation(_) => self.send(conn, correlation, &Frame::Success(Success {})),
            Frame::TicketCommand(command) => {
                let version = self.tickets.get(&command.ticket).copied().unwrap_or(0);
                if version != command.expected_version {
                    let message = format!("ticket is at version {version}");
                    return self.send(conn, correlation, &error_frame(ErrorCode::Conflict, &message));
                }
                self.tickets.insert(command.ticket.clone(), version + 1);
                let state = match command.op {
                    TicketOp::Create | TicketOp::Update | TicketOp::Escalate => TicketState::Accepted,
                    TicketOp::Assign => TicketState::Assigned,
                    TicketOp::Start => TicketState::InProgress,
                    TicketOp::FollowUp => TicketState::FollowUp,
                    TicketOp::Close => TicketState::Closed,
                };
                let event = TicketEvent {
                    ticket: command.ticket,
                    version: version + 1,
                    state,
                    escalation_level: 0,
                    session: command.session,
                    assignee: command.assignee,
                    sla_deadline_us: 0,
                    trace_id: command.trace_id,
                    payload: command.payload,
                };
                self.send(conn, correlation, &Frame::TicketEvent(event));
            }
            other => {
                let message = format!("{:?} is not a client request", other.frame_type());
                self.send(conn, correlation, &error_frame(ErrorCode::BadRequest, &message));
            }
        }
    }

    fn subscribe(&mut self, conn: ConnId, correlation: u32, session: Text, from: ResumeFrom) {
        self.stats.subscribes += 1;
        if !self.sessions.contains_key(&session) {
            let epoch = self.take_epoch();
            self.sessions.insert(session.clone(), Log { epoch, head_seq: 0, history: VecDeque::new() });
        }
        let log = &self.sessions[&session];
        let first_held = log.history.front().map_or(log.head_seq + 1, |deliver| deliver.seq);
        let (replay_from_seq, recovered) = match from {
            ResumeFrom::Live => (log.head_seq + 1, true),
            ResumeFrom::Earliest => (first_held, first_held == 1),
            ResumeFrom::After { epoch, seq } => {
                if epoch == log.epoch && seq + 1 >= first_held && seq <= log.head_seq {
                    (seq + 1, true)
                } else {
                    // Not recoverable: replay what is held, and say so.
                    (first_held, false)
                }
            }
        };
        if !recovered {
            self.stats.unrecovered_subscribes += 1;
        }
        let subscribed = Subscribed {
            session: session.clone(),
            epoch: log.epoch,
            head_seq: log.head_seq,
            replay_from_seq,
            recovered,
        };
        let replay: Vec<Deliver> = log.history.iter().filter(|deliver| deliver.seq >= replay_from_seq).cloned().collect();
        if let Some(state) = self.conns.get_mut(&conn) {
            state.subs.insert(session);
        }
        self.send(conn, correlation, &Frame::Subscribed(subscribed));
        for deliver in replay {
            self.send(conn, 0, &Frame::Deliver(deliver));
        }
    }

    fn handle_publish(&mut self, conn: ConnId, correlation: u32, publish: Publish) {
        let max = self.config.limits.payload_bytes_max as usize;
        if publish.payload.len() > max {
            let message = format!("payload of {} bytes, limit {max}", publish.payload.len());
            return self.send(conn, correlation, &error_frame(ErrorCode::LimitExceeded, &message));
        }
        if publish.client_msg_id != 0 {
            if let Some(ack) = self.dedup.get(&(publish.session.clone(), publish.client_msg_id)) {
                self.stats.duplicate_publishes += 1;
                let ack = PubAck { duplicate: true, ..ack.clone() };
                return self.send(conn, correlation, &Frame::PubAck(ack));
            }
        }
        let client_msg_id = publish.client_msg_id;
        let deliver = self.append(publish.session.clone(), publish.trace_id, publish.sender, publish.payload);
        let ack = PubAck {
            session: publish.session.clone(),
            client_msg_id,
            epoch: deliver.epoch,
            seq: deliver.seq,
            duplicate: false,
            durability: Durability::Memory,
        };
        if client_msg_id != 0 {
            self.dedup.insert((publish.session, client_msg_id), ack.clone());
        }
        self.send(conn, correlation, &Frame::PubAck(ack));
        self.fan_out(&deliver);
    }

    fn append(&mut self, session: Text, trace_id: u128, sender: Text, payload: Bytes) -> Deliver {
        if !self.sessions.contains_key(&session) {
            let epoch = self.take_epoch();
            self.sessions.insert(session.clone(), Log { epoch, head_seq: 0, history: VecDeque::new() });
        }
        self.timestamp_us += 1;
        self.stats.messages += 1;
        let history_max = self.config.history_messages_max;
        let log = self.sessions.get_mut(&session).expect("inserted above");
        log.head_seq += 1;
        let deliver =
            Deliver { session, epoch: log.epoch, seq: log.head_seq, timestamp_us: self.timestamp_us, trace_id, sender, payload };
        log.history.push_back(deliver.clone());
        while log.history.len() > history_max {
            log.history.pop_front();
        }
        deliver
    }

    fn fan_out(&mut self, deliver: &Deliver) {
        self.fan_out_frame(&deliver.session, None, &Frame::Deliver(deliver.clone()));
    }

    fn fan_out_frame(&mut self, session: &Text, except: Option<ConnId>, frame: &Frame) {
        let subscribers: Vec<ConnId> = self
            .conns
            .iter()
            .filter(|(id, state)| Some(**id) != except && state.subs.contains(session))
            .map(|(id, _)| *id)
            .collect();
        for conn in subscribers {
            self.send(conn, 0, frame);
        }
    }
}

fn error_frame(code: ErrorCode, message: &str) -> Frame {
    Frame::Error(ErrorFrame { code: code.as_u16(), message: Text::from(message) })
}

/// A [`ClientSession`] wired to a [`FakeServer`] in memory, with virtual time.
///
/// ```
/// use bytes::Bytes;
/// use switchboard_client::testing::Pair;
/// use switchboard_client::{Event, ResumeFrom, Text};
/// use switchboard_protocol::Publish;
///
/// let mut pair = Pair::new(Default::default(), Default::default());
/// pair.drive(); // connect and handshake
/// let now = pair.now;
/// pair.client.subscribe(now, Text::from("conv-1"), ResumeFrom::Live).unwrap();
/// let publish = Publish {
///     session: Text::from("conv-1"),
///     client_msg_id: 0,
///     trace_id: 0,
///     sender: Text::from("customer-9"),
///     payload: Bytes::from_static(b"hello"),
/// };
/// pair.client.publish(now, publish).unwrap();
/// pair.drive();
/// let delivered: Vec<u64> = pair.deliveries("conv-1").iter().map(|d| d.seq).collect();
/// assert_eq!(delivered, [1]);
/// ```
pub struct Pair {
    /// The server.
    pub server: FakeServer,
    /// The client.
    pub client: ClientSession,
    /// Virtual time.
    pub now: Instant,
    /// The current connection, if any.
    pub conn: Option<ConnId>,
    /// Every event the client emitted, in order.
    pub events: Vec<Event>,
    /// Server → client bytes are handed over in chunks of at most this many bytes.
    pub chunk_bytes: usize,
    /// Connection attempts fail while this is set.
    pub refuse_connections: bool,
    out: BytesMut,
}

impl Pair {
    /// A client (not yet connected) and a server.
    pub fn new(server: FakeServerConfig, client: ClientConfig) -> Pair {
        Pair {
            server: FakeServer::new(server),
            client: ClientSession::new(client).expect("valid client config"),
            now: Instant::now(),
            conn: None,
            events: Vec::new(),
            chunk_bytes: usize::MAX,
            refuse_connections: false,
            out: BytesMut::new(),
        }
    }

    /// Moves bytes, actions and events until nothing changes (no time passes).
    pub fn drive(&mut self) {
        for _ in 0..100_000 {
            if !self.step() {
                return;
            }
        }
        panic!("Pair::drive did not settle: a livelock between client and fake server");
    }

    fn step(&mut self) -> bool {
        let mut progress = false;
        while let Some(action) = self.client.poll_action() {
            progress = true;
            match action {
                Action::Connect if self.refuse_connections => self.client.handle_disconnected(self.now),
                Action::Connect => {
                    self.conn = Some(self.server.accept());
                    self.client.handle_connected(self.now);
                }
                Action::Close => {
                    if let Some(conn) = self.conn.take() {
                        self.server.disconnect(conn);
                    }
                }
            }
        }
        self.out.clear();
        if self.client.poll_transmit(self.now, &mut self.out) > 0 {
            progress = true;
            if let Some(conn) = self.conn {
                self.server.handle_bytes(conn, &self.out);
            }
        }
        if let Some(conn) = self.conn {
            self.out.clear();
            self.server.poll_transmit(conn, &mut self.out);
            if !self.out.is_empty() {
                progress = true;
                let chunk_bytes = self.chunk_bytes.max(1);
                for chunk in self.out.chunks(chunk_bytes) {
                    self.client.handle_bytes(self.now, chunk);
                }
            }
            if self.server.is_closed(conn) && self.conn == Some(conn) {
                progress = true;
                self.server.disconnect(conn);
                self.conn = None;
                self.client.handle_disconnected(self.now);
            }
        }
        while let Some(event) = self.client.poll_event() {
            progress = true;
            self.events.push(event);
        }
        progress
    }

    /// Advances virtual time by `by`, fires the client's timers and drives.
    pub fn advance(&mut self, by: Duration) {
        self.now += by;
        self.client.handle_timeout(self.now);
        self.drive();
    }

    /// Jumps to the client's next timer (if any), fires it and drives. Returns false when no
    /// timer runs.
    pub fn advance_to_timeout(&mut self) -> bool {
        let Some(at) = self.client.poll_timeout() else { return false };
        self.now = self.now.max(at);
        self.client.handle_timeout(self.now);
        self.drive();
        true
    }

    /// The server drops the current connection.
    pub fn kick(&mut self) {
        if let Some(conn) = self.conn {
            self.server.kick(conn);
        }
        self.drive();
    }

    /// Advances through timers until the client is connected (or `limit` timers fired).
    pub fn settle_connected(&mut self, limit: usize) -> bool {
        self.drive();
        for _ in 0..limit {
            if self.client.state() == crate::ConnectionState::Established && self.client.requests_pending() == 0 {
                return true;
            }
            if !self.advance_to_timeout() {
                return false;
            }
        }
        self.client.state() == crate::ConnectionState::Established
    }

    /// The deliveries of `session` the client emitted so far.
    pub fn deliveries(&self, session: &str) -> Vec<Deliver> {
        self.events
            .iter()
            .filter_map(|event| match event {
                Event::Delivery(deliver) if deliver.session == session => Some(deliver.clone()),
                _ => None,
            })
            .collect()
    }
}

/// The fake server over loopback TCP, for testing the real drivers.
pub mod tcp {
    use std::collections::BTreeMap;
    use std::io::{Read, Write};
    use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::sync::{Arc, Mutex, MutexGuard};
    use std::thread::JoinHandle;

    use bytes::BytesMut;

    use super::{ConnId, FakeServer, FakeServerConfig};

    struct State {
        server: FakeServer,
        streams: BTreeMap<ConnId, TcpStream>,
    }

    /// A [`FakeServer`] listening on `127.0.0.1:0`: one thread accepts, one thread per
    /// connection reads; every input is handled under one lock and every connection's output
    /// is written before the lock is released (so fan-out reaches the other connections).
    pub struct TcpFakeServer {
        addr: SocketAddr,
        state: Arc<Mutex<State>>,
        stop: Arc<AtomicBool>,
        accept_thread: Option<JoinHandle<()>>,
    }

    impl TcpFakeServer {
        /// Starts serving.
        pub fn start(config: FakeServerConfig) -> std::io::Result<TcpFakeServer> {
            let listener = TcpListener::bind("127.0.0.1:0")?;
            let addr = listener.local_addr()?;
            let state = Arc::new(Mutex::new(State { server: FakeServer::new(config), streams: BTreeMap::new() }));
            let stop = Arc::new(AtomicBool::new(false));
            let accept_thread = {
                let state = Arc::clone(&state);
                let stop = Arc::clone(&stop);
                std::thread::Builder::new()
                    .name("fake-server-accept".into())
                    .spawn(move || accept_loop(&listener, &state, &stop))?
            };
            Ok(TcpFakeServer { addr, state, stop, accept_thread: Some(accept_thread) })
        }

        /// Where it listens.
        pub fn addr(&self) -> SocketAddr {
            self.addr
        }

        /// Runs `f` on the server under its lock, then sends what it queued.
        pub fn with_server<R>(&self, f: impl FnOnce(&mut FakeServer) -> R) -> R {
            let mut state = lock(&self.state);
            let result = f(&mut state.server);
            flush(&mut state);
            result
        }

        /// Closes every connection now.
        pub fn kick_all(&self) {
            self.with_server(|server| {
                for conn in server.connections() {
                    server.kick(conn);
                }
            });
        }
    }

    impl Drop for TcpFakeServer {
        fn drop(&mut self) {
            self.stop.store(true, Ordering::SeqCst);
            // Wake the accept loop.
            let _ = TcpStream::connect(self.addr);
            if let Some(thread) = self.accept_thread.take() {
                let _ = thread.join();
            }
            let mut state = lock(&self.state);
            for stream in state.streams.values() {
                let _ = stream.shutdown(Shutdown::Both);
            }
            state.streams.clear();
        }
    }

    fn lock(state: &Mutex<State>) -> MutexGuard<'_, State> {
        state.lock().unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn accept_loop(listener: &TcpListener, state: &Arc<Mutex<State>>, stop: &AtomicBool) {
        for stream in listener.incoming() {
            if stop.load(Ordering::SeqCst) {
                return;
            }
            let Ok(stream) = stream else { continue };
            let _ = stream.set_nodelay(true);
            let Ok(reader) = stream.try_clone() else { continue };
            let conn = {
                let mut guard = lock(state);
                let conn = guard.server.accept();
                guard.streams.insert(conn, stream);
                conn
            };
            let state = Arc::clone(state);
            let _ = std::thread::Builder::new()
                .name(format!("fake-server-conn-{conn}"))
                .spawn(move || serve(conn, reader, &state));
        }
    }

    fn serve(conn: ConnId, mut reader: TcpStream, state: &Mutex<State>) {
        let mut buf = vec![0u8; 16 * 1024];
        loop {
            let read = match reader.read(&mut buf) {
                Ok(0) | Err(_) => 0,
                Ok(read) => read,
            };
            let mut guard = lock(state);
            if read == 0 {
                guard.server.disconnect(conn);
                if let Some(stream) = guard.streams.remove(&conn) {
                    let _ = stream.shutdown(Shutdown::Both);
                }
                flush(&mut guard);
                return;
            }
            guard.server.handle_bytes(conn, &buf[..read]);
            flush(&mut guard);
        }
    }

    fn flush(state: &mut State) {
        let mut out = BytesMut::new();
        let conns: Vec<ConnId> = state.streams.keys().copied().collect();
        for conn in conns {
            out.clear();
            state.server.poll_transmit(conn, &mut out);
            let Some(stream) = state.streams.get_mut(&conn) else { continue };
            let failed = !out.is_empty() && stream.write_all(&out).is_err();
            if failed || state.server.is_closed(conn) {
                let _ = stream.shutdown(Shutdown::Both);
                state.streams.remove(&conn);
                state.server.disconnect(conn);
            }
        }
    }
}
