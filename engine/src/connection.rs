//! One client connection on its shard: handshake, then decode frames and dispatch them.
//!
//! Reading uses glommio's socket; writing never happens here: every outbound frame goes through
//! the shard's io_uring sender (see `uring.rs`), so replies and fan-out share one ordered queue
//! per connection. Decode errors answer ERROR and close this connection only; nothing a peer
//! sends can panic the shard.

use std::os::fd::AsRawFd;
use std::rc::Rc;
use std::time::Duration;

use bytes::{Buf, BytesMut};
use futures_lite::AsyncReadExt;
use glommio::net::TcpStream;
use switchboard_protocol::{
    decode, peek_frame, ErrorCode, Frame, FrameType, GoAway, GoAwayReason, Hello, Pong, PublishRef, ServerLimits, Text, TicketCommand, Welcome, HEADER_BYTES,
    PROTOCOL_VERSION,
};

use crate::auth::{Identity, Role, OPEN_TENANT};
use crate::mesh::{ConnId, DeskOp, KeyRef, PublishRequest, PublishView, SessionKey};
use crate::phase::{self, Phase};
use crate::rate::Limited;
use crate::shard::Shard;

/// Tokens expiring further out than this never expire on a live connection (no timer is armed).
const TOKEN_EXPIRY_TIMER_MAX: Duration = Duration::from_secs(100 * 365 * 24 * 3600);

/// Largest frame body accepted before WELCOME, in bytes: a whole HELLO (two versions, feature
/// bits, a client name and a token) fits. Without it a peer that never authenticates could
/// make the decoder reserve `frame_body_bytes_max` (1 MiB) per connection by sending a header.
const HANDSHAKE_BODY_BYTES_MAX: u32 = (switchboard_protocol::limits::TOKEN_BYTES_MAX + switchboard_protocol::limits::ID_BYTES_MAX + 64) as u32;

/// The ERROR message for a request naming no session.
const EMPTY_SESSION: &str = "session id must not be empty";

/// Bytes read from the socket per call.
const READ_CHUNK_BYTES: usize = 16 * 1024;

/// Serves one accepted connection until it closes.
pub async fn serve(shard: Rc<Shard>, stream: TcpStream) {
    let _ = stream.set_nodelay(true);
    let Some(conn) = shard.add_conn(stream.as_raw_fd()) else {
        // At the connection limit: say so, then close.
        refuse_overloaded(&stream);
        return;
    };
    let mut reader = Reader {
        shard: shard.clone(),
        conn,
        stream,
        buffer: BytesMut::with_capacity(READ_CHUNK_BYTES),
        scratch: vec![0; READ_CHUNK_BYTES],
        tenant: OPEN_TENANT,
        role: Role::Gateway,
        subject: Text::new(),
        limits: switchboard_protocol::Limits { frame_body_bytes_max: HANDSHAKE_BODY_BYTES_MAX.min(shard.limits.frame_body_bytes_max) },
    };
    reader.run().await;
    // Remove before the stream drops: a delayed force-close checks the id before using the fd.
    shard.remove_conn(conn);
    drop(reader);
}

/// Says why before the stream is dropped (and closed) by the caller.
fn refuse_overloaded(stream: &TcpStream) {
    let frame = Frame::GoAway(GoAway { reason: GoAwayReason::Overloaded, reconnect_after_ms: 1000, message: Text::from_static("connection limit reached") });
    if let Ok(bytes) = frame.to_bytes(0) {
        // Best effort on a fresh socket whose buffer is empty: one non-blocking send.
        // SAFETY: the fd is open (we own the stream) and the buffer outlives the call.
        unsafe { libc::send(stream.as_raw_fd(), bytes.as_ptr().cast(), bytes.len(), libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL) };
    }
}

struct Reader {
    shard: Rc<Shard>,
    conn: ConnId,
    stream: TcpStream,
    buffer: BytesMut,
    scratch: Vec<u8>,
    /// The verified tenant: every session this connection names is scoped to it.
    tenant: Text,
    /// The verified role: customers and agents are checked against the desk.
    role: Role,
    /// The verified subject (customer or agent id for those roles).
    subject: Text,
    /// What the decoder accepts: HELLO-sized until WELCOME, the configured limits after.
    limits: switchboard_protocol::Limits,
}

/// An id that owns its memory, for state kept beyond this frame (the desk's tables).
fn own(text: &Text) -> Text {
    Text::from(text.as_str())
}

enum Flow {
    Continue,
    Close,
}

impl Reader {
    async fn run(&mut self) {
        let handshake = Duration::from_millis(self.shard.config.limits.handshake_timeout_ms);
        match glommio::timer::timeout(handshake, async { Ok(self.handshake().await) }).await {
            Ok(true) => self.limits = self.shard.limits,
            Ok(false) => return,
            Err(_) => {
                self.shard.protocol_error(self.conn, 0, ErrorCode::HandshakeRequired, "no HELLO within the handshake timeout".into());
                return;
            }
        }
        while let Some(read) = self.fill().await {
            let handle_started = phase::now();
            loop {
                if self.publish_in_place() {
                    self.shard.wait_for_event_links().await;
                    continue;
                }
                let decode_started = phase::now();
                let next = self.next_frame();
                if matches!(next, Ok(Some(_))) {
                    phase::lap(Phase::Decode, decode_started);
                }
                match next {
                    Ok(Some((correlation, frame))) => {
                        if let Flow::Close = self.dispatch(correlation, frame).await {
                            return;
                        }
                    }
                    Ok(None) => break,
                    Err(()) => return,
                }
            }
            phase::lap(Phase::Handle, handle_started);
            if self.shard.is_closing(self.conn) {
                return;
            }
            // A read returns at once while the socket has data, so a busy publisher would keep
            // the executor to itself. Yield when the shard's I/O poll interval is up (glommio's
            // preempt timer): everything queued meanwhile then goes out in one submission, and
            // other connections get their turn. Yielding after every read instead made sends
            // small (many syscalls per delivery) and, worse, kept glommio from polling I/O.
            glommio::yield_if_needed().await;
            if read == self.scratch.len() {
                // A full read means a backlog (the shard was stalled, or the publisher is
                // faster than one read per turn): let the flusher send what this read produced
                // before reading on, as Redis writes after each read chunk. Otherwise the first
                // messages of a backlog wait until all of it is processed.
                futures_lite::future::yield_now().await;
            }
        }
    }

    /// Reads once into the buffer: the bytes read, or None on EOF, error or shutdown of this
    /// connection.
    async fn fill(&mut self) -> Option<usize> {
        match self.stream.read(&mut self.scratch).await {
            Ok(0) | Err(_) => None,
            Ok(read) => {
                self.buffer.extend_from_slice(&self.scratch[..read]);
                self.shard.count(|c| c.bytes_received_total += read as u64);
                self.shard.touch(self.conn);
                Some(read)
            }
        }
    }

    /// Handles a PUBLISH at the front of the buffer where it lies, when nothing about it has
    /// to wait or to leave the shard: from a gateway or supervisor (no desk check), to a
    /// session this shard owns, valid and within limits. Its fields are read as borrows of the
    /// buffer (no reference count per field, no owned key), then the frame is dropped from it.
    /// False when the front frame is anything else (or incomplete): the general path decodes
    /// it and answers whatever is wrong with it.
    fn publish_in_place(&mut self) -> bool {
        if !matches!(self.role, Role::Gateway | Role::Supervisor) {
            return false;
        }
        let decode_started = phase::now();
        let Ok(Some((header, body))) = peek_frame(&self.buffer, &self.limits) else { return false };
        if header.frame_type != FrameType::Publish {
            return false;
        }
        let Ok(publish) = PublishRef::decode_body(body) else { return false };
        let shard = &*self.shard;
        let key = KeyRef { tenant: &self.tenant, session: publish.session };
        if self.publish_fault(publish.session, publish.payload.len()).is_some() || key.shard(shard.shards) != shard.index {
            return false;
        }
        phase::lap(Phase::Decode, decode_started);
        let frame_bytes = HEADER_BYTES + body.len();
        if self.admit(header.correlation, Limited::Publishes, publish.payload.len() as u64) {
            shard.publish_owned_here(&PublishView {
                conn: self.conn,
                correlation: header.correlation,
                key,
                owned_key: None,
                client_msg_id: publish.client_msg_id,
                trace_id: publish.trace_id,
                sender: publish.sender,
                payload: publish.payload,
                ingress_raw: shard.clock().raw(),
            });
        }
        self.buffer.advance(frame_bytes);
        true
    }

    /// Decodes one frame; a decode error is answered and closes the connection.
    fn next_frame(&mut self) -> Result<Option<(u32, Frame)>, ()> {
        match decode(&mut self.buffer, &self.limits) {
            Ok(Some(envelope)) => Ok(Some((envelope.correlation, envelope.frame))),
            Ok(None) => Ok(None),
            Err(error) => {
                self.shard.protocol_error(self.conn, 0, error.code(), error.to_string());
                Err(())
            }
        }
    }

    /// Waits for HELLO and answers WELCOME; false when the connection must close.
    async fn handshake(&mut self) -> bool {
        loop {
            match self.next_frame() {
                Ok(Some((correlation, Frame::Hello(hello)))) => return self.welcome(correlation, &hello),
                Ok(Some((correlation, _))) => {
                    self.shard.protocol_error(self.conn, correlation, ErrorCode::HandshakeRequired, "the first frame must be HELLO".into());
                    return false;
                }
                Ok(None) => {
                    if self.fill().await.is_none() {
                        return false;
                    }
                }
                Err(()) => return false,
            }
        }
    }

    fn welcome(&mut self, correlation: u32, hello: &Hello) -> bool {
        let ours = u16::from(PROTOCOL_VERSION);
        if hello.version_min > ours || hello.version_max < ours {
            let message = format!("server speaks version {ours}, client {}..={}", hello.version_min, hello.version_max);
            self.shard.protocol_error(self.conn, correlation, ErrorCode::UnsupportedVersion, message);
            return false;
        }
        let identity = match &self.shard.auth {
            None => Identity { tenant: OPEN_TENANT, role: Role::Gateway, subject: own(&hello.client_name), expires_at_s: None },
            Some(auth) => match auth.verify(hello.token.as_str()) {
                Ok(identity) => identity,
                Err(error) => {
                    tracing::info!(shard = self.shard.index, conn = self.conn, %error, "HELLO refused");
                    self.shard.protocol_error(self.conn, correlation, ErrorCode::AuthFailed, error.to_string());
                    return false;
                }
            },
        };
        self.tenant = identity.tenant.clone();
        self.role = identity.role;
        self.subject = Text::from(identity.subject.as_str());
        self.shard.desk_register(self.conn, &identity);
        self.shard.with_conn(self.conn, |entry| entry.tenant = Some(identity.tenant.clone()));
        let limits = &self.shard.config.limits;
        let welcome = Frame::Welcome(Welcome {
            version: ours,
            features: 0,
            server_name: Text::from_static(concat!("switchboard/", env!("CARGO_PKG_VERSION"))),
            connection_id: self.conn,
            tenant: identity.tenant,
            limits: ServerLimits {
                frame_body_bytes_max: limits.frame_body_bytes_max,
                payload_bytes_max: limits.payload_bytes_max,
                subscriptions_max: limits.subscriptions_per_connection_max,
                history_messages_max: limits.history_messages_max,
                keepalive_ms: limits.keepalive_ms,
                outbound_bytes_max: u32::try_from(limits.outbound_bytes_max).unwrap_or(u32::MAX),
            },
        });
        tracing::debug!(shard = self.shard.index, conn = self.conn, client = %hello.client_name, "handshake");
        self.shard.send_frame(self.conn, &welcome, correlation);
        // The expiry timer only after WELCOME is queued: glommio polls a task spawned into the
        // running task queue at once (`spawn_and_run`), so a token with under a second left
        // ran `expire_token` inside `spawn_local`, and its GOAWAY replaced the WELCOME.
        if let Some(expires_at_s) = identity.expires_at_s {
            let now_s = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs());
            let left = Duration::from_secs(expires_at_s.saturating_sub(now_s).saturating_add(self.shard.config.auth.leeway_s));
            if left > TOKEN_EXPIRY_TIMER_MAX {
                // A signed token may say `exp: u64::MAX` ("never"): a timer that far out
                // overflows the timer's Instant arithmetic (a panic, which aborts the engine).
                return true;
            }
            let (shard, conn) = (self.shard.weak(), self.conn);
            let expiry = glommio::spawn_local(async move {
                glommio::timer::Timer::new(left).await;
                if let Some(shard) = shard.upgrade() {
                    shard.expire_token(conn);
                }
            });
            self.shard.with_conn(self.conn, |entry| entry.expiry = Some(expiry));
        }
        true
    }

    fn key(&self, session: &Text) -> SessionKey {
        SessionKey { tenant: self.tenant.clone(), session: session.clone() }
    }

    async fn dispatch(&mut self, correlation: u32, frame: Frame) -> Flow {
        let shard = &*self.shard;
        let conn = self.conn;
        match frame {
            Frame::Ping(ping) => shard.send_frame(conn, &Frame::Pong(Pong { nonce: ping.nonce }), correlation),
            Frame::Pong(_) => {}
            Frame::Subscribe(subscribe) => {
                if let Some(flow) = self.refuse_empty(correlation, &subscribe.session) {
                    return flow;
                }
                if !self.admit(correlation, Limited::Subscribes, 0) || !self.may_watch(correlation, &subscribe.session).await {
                    return Flow::Continue;
                }
                let key = self.key(&subscribe.session);
                shard.subscribe(conn, correlation, key, subscribe.from).await;
            }
            Frame::Unsubscribe(unsubscribe) => shard.unsubscribe(conn, correlation, &self.key(&unsubscribe.session)),
            Frame::Publish(publish) => {
                if let Some((code, message)) = self.publish_fault(&publish.session, publish.payload.len()) {
                    shard.fail_request(conn, correlation, code, message);
                    return Flow::Continue;
                }
                if !self.admit(correlation, Limited::Publishes, publish.payload.len() as u64)
                    || !self.speaks_as_self(correlation, &publish.sender, "sender")
                    || !self.may_watch(correlation, &publish.session).await
                {
                    return Flow::Continue;
                }
                let request = PublishRequest {
                    conn,
                    correlation,
                    key: self.key(&publish.session),
                    client_msg_id: publish.client_msg_id,
                    trace_id: publish.trace_id,
                    sender: publish.sender,
                    payload: publish.payload,
                    ingress_raw: shard.clock().raw(),
                };
                shard.publish(request).await;
            }
            Frame::ReadCursor(cursor) => {
                if let Some(flow) = self.refuse_empty(correlation, &cursor.session) {
                    return flow;
                }
                if !self.admit(correlation, Limited::Signals, 0)
                    || !self.speaks_as_self(correlation, &cursor.participant, "participant")
                    || !self.may_watch(correlation, &cursor.session).await
                {
                    return Flow::Continue;
                }
                let key = self.key(&cursor.session);
                shard.read_cursor(conn, correlation, key, cursor.participant, cursor.seq).await;
            }
            Frame::Typing(typing) => {
                // Over the rate a TYPING is dropped, unanswered: it never gets a reply, and the
                // protocol lets the server drop it under load.
                if shard.desk_rate_limit(conn, Limited::Signals, 0).is_err()
                    || !self.speaks_as_self(correlation, &typing.participant, "participant")
                    || !self.may_watch(correlation, &typing.session).await
                {
                    return Flow::Continue;
                }
                let key = self.key(&typing.session);
                shard.typing(key, typing.participant, typing.active).await;
            }
            frame @ (Frame::OpenConversation(_)
            | Frame::AgentStatus(_)
            | Frame::OfferResponse(_)
            | Frame::Transfer(_)
            | Frame::CloseConversation(_)
            | Frame::TicketCommand(_)) => self.dispatch_desk(correlation, frame).await,
            Frame::Hello(_) => {
                shard.protocol_error(conn, correlation, ErrorCode::HandshakeRequired, "HELLO sent twice".into());
                return Flow::Close;
            }
            other @ (Frame::Welcome(_)
            | Frame::Error(_)
            | Frame::GoAway(_)
            | Frame::Success(_)
            | Frame::Subscribed(_)
            | Frame::PubAck(_)
            | Frame::Deliver(_)
            | Frame::ConversationEvent(_)
            | Frame::TicketEvent(_)) => {
                let message = format!("{:?} frames are sent by servers only", other.frame_type());
                shard.protocol_error(conn, correlation, ErrorCode::Malformed, message);
                return Flow::Close;
            }
        }
        Flow::Continue
    }

    /// The customer-service frames: carried to the tenant's desk, which answers OK or ERROR.
    async fn dispatch_desk(&self, correlation: u32, frame: Frame) {
        match frame {
            Frame::OpenConversation(open) => {
                if !self.admit(correlation, Limited::Opens, 0) {
                    return;
                }
                let skills = open.skills.iter().map(own).collect();
                // Copied: the desk keeps it, and the read buffer must not be pinned by it.
                let context = bytes::Bytes::copy_from_slice(&open.context);
                let op = DeskOp::Open { session: own(&open.session), customer: own(&open.customer), priority: open.priority, skills, context };
                self.shard.desk_call(self.conn, correlation, op).await;
            }
            Frame::AgentStatus(status) => {
                // Refused here, before the shard notes the agent for this connection: a
                // customer or agent naming other agents must not grow that list.
                if !self.speaks_as_self(correlation, &status.agent, "agent") {
                    return;
                }
                let skills = status.skills.iter().map(own).collect();
                let op = DeskOp::AgentStatus { agent: own(&status.agent), presence: status.presence, capacity: status.capacity, skills };
                self.shard.desk_call(self.conn, correlation, op).await;
            }
            Frame::OfferResponse(response) => {
                let op = DeskOp::OfferResponse { session: own(&response.session), agent: own(&response.agent), accept: response.accept };
                self.shard.desk_call(self.conn, correlation, op).await;
            }
            Frame::Transfer(transfer) => {
                let op = DeskOp::Transfer {
                    session: own(&transfer.session),
                    kind: transfer.target.kind,
                    target: own(&transfer.target.name),
                    note: own(&transfer.note),
                };
                self.shard.desk_call(self.conn, correlation, op).await;
            }
            Frame::CloseConversation(close) => {
                let op = DeskOp::Close { session: own(&close.session), reason: own(&close.reason) };
                self.shard.desk_call(self.conn, correlation, op).await;
            }
            Frame::TicketCommand(command) => {
                let command = TicketCommand {
                    ticket: own(&command.ticket),
                    op: command.op,
                    expected_version: command.expected_version,
                    session: own(&command.session),
                    assignee: own(&command.assignee),
                    trace_id: command.trace_id,
                    // Copied: the ticket keeps it, and the read buffer must not be pinned by it.
                    payload: bytes::Bytes::copy_from_slice(&command.payload),
                };
                self.shard.desk_call(self.conn, correlation, DeskOp::Ticket { command }).await;
            }
            // `dispatch` sends only the frames above here.
            _ => {}
        }
    }

    /// Takes from the connection's and the tenant's rate buckets; false (and ERROR(RateLimited)
    /// sent) when one is empty.
    fn admit(&self, correlation: u32, what: Limited, bytes: u64) -> bool {
        match self.shard.desk_rate_limit(self.conn, what, bytes) {
            Ok(()) => true,
            Err(message) => {
                self.shard.fail_request(self.conn, correlation, ErrorCode::RateLimited, message);
                false
            }
        }
    }

    /// A customer or agent speaks only as itself (a gateway speaks for its users, a supervisor
    /// under its own name or theirs); false (and ERROR(Forbidden) sent) otherwise.
    fn speaks_as_self(&self, correlation: u32, who: &Text, field: &str) -> bool {
        if matches!(self.role, Role::Customer | Role::Agent) && who != &self.subject {
            self.shard.refuse(self.conn, correlation, ErrorCode::Forbidden, format!("forbidden: {field} must be your own id `{}`", self.subject));
            return false;
        }
        true
    }

    /// Customers and agents touch only their own conversations: asks the desk (and waits for
    /// its verdict); false (and ERROR sent) when refused.
    async fn may_watch(&self, correlation: u32, session: &Text) -> bool {
        if matches!(self.role, Role::Gateway | Role::Supervisor) {
            return true;
        }
        match self.shard.desk_check_watch(self.conn, session).await {
            Ok(()) => true,
            Err((code, message)) => {
                self.shard.refuse(self.conn, correlation, code, message);
                false
            }
        }
    }

    fn refuse_empty(&self, correlation: u32, session: &Text) -> Option<Flow> {
        if session.is_empty() {
            self.shard.fail_request(self.conn, correlation, ErrorCode::BadRequest, EMPTY_SESSION);
            return Some(Flow::Continue);
        }
        None
    }

    /// What is wrong with a PUBLISH on its face (before rate, desk or session look at it).
    /// Both the in-place and the general path ask here, so they accept exactly the same
    /// frames; the in-place path leaves a faulty one to the general path to answer.
    fn publish_fault(&self, session: &str, payload_bytes: usize) -> Option<(ErrorCode, &'static str)> {
        if session.is_empty() {
            Some((ErrorCode::BadRequest, EMPTY_SESSION))
        } else if payload_bytes > self.shard.config.limits.payload_bytes_max as usize {
            Some((ErrorCode::LimitExceeded, "payload larger than payload_bytes_max"))
        } else {
            None
        }
    }
}
