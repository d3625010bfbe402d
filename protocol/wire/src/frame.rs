//! Every frame of the protocol, and the incremental decoder and encoder.
//!
//! Each struct below is one frame body; its fields are on the wire in the order written, each
//! through the codec named after `=` (see `wire.rs`). `protocol/PROTOCOL.md` lists the same
//! layouts for implementers in other languages, and `tests/golden.rs` checks the two agree.

use bytes::{BufMut, Bytes, BytesMut};

use crate::error::{DecodeError, EncodeError};
use crate::header::{FrameHeader, FrameType, HEADER_BYTES};
use crate::limits::Limits;
use crate::text::Text;
use crate::wire::{Bool, Codec, Enum, Id, Message, Nested, NestedFields, Payload, Reader, Skills, Token, WireEnum, U128, U16, U32, U64, U8};

macro_rules! wire_enum {
    ($(#[$doc:meta])* $name:ident { $($(#[$vdoc:meta])* $variant:ident = $value:literal,)* }) => {
        $(#[$doc])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        #[repr(u8)]
        pub enum $name {
            $($(#[$vdoc])* $variant = $value,)*
        }

        impl $name {
            /// Every value, in wire order.
            pub const ALL: &'static [$name] = &[$($name::$variant,)*];
        }

        impl WireEnum for $name {
            fn to_u8(self) -> u8 {
                self as u8
            }
            fn from_u8(value: u8) -> Option<$name> {
                match value {
                    $($value => Some($name::$variant),)*
                    _ => None,
                }
            }
        }
    };
}

macro_rules! fields {
    ($(#[$doc:meta])* $name:ident { $($(#[$fdoc:meta])* $field:ident : $ty:ty = $codec:ty,)* }) => {
        $(#[$doc])*
        #[derive(Debug, Clone, PartialEq, Eq)]
        pub struct $name {
            $($(#[$fdoc])* pub $field: $ty,)*
        }

        impl NestedFields for $name {
            fn fields_len(&self) -> usize {
                0 $(+ <$codec as Codec<$ty>>::len(&self.$field))*
            }
            #[allow(unused_variables)]
            fn fields_check(&self) -> Result<(), EncodeError> {
                $(<$codec as Codec<$ty>>::check(&self.$field, stringify!($field))?;)*
                Ok(())
            }
            #[allow(unused_variables)]
            fn fields_put(&self, dst: &mut impl BufMut) {
                $(<$codec as Codec<$ty>>::put(&self.$field, dst);)*
            }
            #[allow(unused_variables)]
            fn fields_get(src: &mut Reader) -> Result<$name, DecodeError> {
                Ok($name { $($field: <$codec as Codec<$ty>>::get(src, stringify!($field))?,)* })
            }
        }
    };
}

macro_rules! frames {
    ($($(#[$doc:meta])* $variant:ident($name:ident) { $($body:tt)* })*) => {
        $(fields! { $(#[$doc])* $name { $($body)* } })*

        /// Any frame.
        #[derive(Debug, Clone, PartialEq, Eq)]
        pub enum Frame {
            $($(#[$doc])* $variant($name),)*
        }

        impl Frame {
            /// The type byte this frame is sent with.
            pub fn frame_type(&self) -> FrameType {
                match self {
                    $(Frame::$variant(_) => FrameType::$variant,)*
                }
            }

            fn body_bytes(&self) -> usize {
                match self {
                    $(Frame::$variant(body) => body.fields_len(),)*
                }
            }

            fn check(&self) -> Result<(), EncodeError> {
                match self {
                    $(Frame::$variant(body) => body.fields_check(),)*
                }
            }

            fn put_body(&self, dst: &mut impl BufMut) {
                match self {
                    $(Frame::$variant(body) => body.fields_put(dst),)*
                }
            }

            fn get_body(frame_type: FrameType, src: &mut Reader) -> Result<Frame, DecodeError> {
                Ok(match frame_type {
                    $(FrameType::$variant => Frame::$variant($name::fields_get(src)?),)*
                })
            }
        }

        $(impl From<$name> for Frame {
            fn from(body: $name) -> Frame {
                Frame::$variant(body)
            }
        })*
    };
}

wire_enum! {
    /// Why the server is closing a connection (GOAWAY).
    GoAwayReason {
        /// The server is shutting down; reconnect (to it when it is back, or to a peer).
        Shutdown = 1,
        /// The connection's outbound buffer exceeded its limit; resume from the last seq seen.
        SlowConsumer = 2,
        /// The token expired; reconnect with a fresh one.
        AuthExpired = 3,
        /// The peer broke the protocol (an ERROR frame precedes this).
        ProtocolError = 4,
        /// Nothing was received within the keepalive window.
        IdleTimeout = 5,
        /// The server sheds load; reconnect after the hinted delay.
        Overloaded = 6,
    }
}

wire_enum! {
    /// How durably an acknowledged message is stored (PUBACK).
    Durability {
        /// In memory only: survives reconnects, not a restart.
        Memory = 0,
        /// Written to the journal, synced on an interval: survives a process kill.
        Interval = 1,
        /// Synced to disk before the acknowledgement.
        Sync = 2,
    }
}

wire_enum! {
    /// What happened to a conversation (CONVERSATION_EVENT).
    ConversationEventKind {
        /// Waiting in a queue; `position` and `estimated_wait_ms` are set.
        Queued = 1,
        /// Offered to `agent`, who must accept within the offer timeout.
        Offered = 2,
        /// `agent` accepted the offer.
        Accepted = 3,
        /// `agent` is now assigned and the conversation is active.
        Assigned = 4,
        /// `agent` declined (or let the offer expire); it is routed again.
        Declined = 5,
        /// Moved to another agent or queue (`agent` / `queue`).
        Transferred = 6,
        /// Closed; `reason` says by whom or why.
        Closed = 7,
        /// The customer left while it was queued.
        Abandoned = 8,
        /// Waited past the queue's limit and moved to the overflow target (`queue`), or got the
        /// offline outcome when `queue` is empty.
        Overflowed = 9,
    }
}

wire_enum! {
    /// An agent's presence (AGENT_STATUS).
    AgentPresence {
        /// Available for new conversations up to its capacity.
        Online = 1,
        /// Connected but not taking new conversations.
        Away = 2,
        /// Not connected.
        Offline = 3,
    }
}

wire_enum! {
    /// A ticket command (TICKET_COMMAND).
    TicketOp {
        /// Create the ticket (state accepted); `expected_version` must be 0.
        Create = 1,
        /// Assign to `assignee`.
        Assign = 2,
        /// The assignee starts work.
        Start = 3,
        /// Waiting on the customer.
        FollowUp = 4,
        /// Close the ticket.
        Close = 5,
        /// Raise the escalation level.
        Escalate = 6,
        /// Replace the ticket's payload only.
        Update = 7,
    }
}

wire_enum! {
    /// A ticket's state (TICKET_EVENT).
    TicketState {
        /// Created, not yet assigned.
        Accepted = 1,
        /// Has an assignee.
        Assigned = 2,
        /// Being worked on.
        InProgress = 3,
        /// Waiting on the customer.
        FollowUp = 4,
        /// Done.
        Closed = 5,
    }
}

wire_enum! {
    /// Where a transfer goes.
    TransferKind {
        /// To a named agent.
        Agent = 1,
        /// To a named queue (team or skill).
        Queue = 2,
    }
}

/// Where a subscription starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResumeFrom {
    /// Only messages published after the subscription (mode 0).
    Live,
    /// Everything after `seq` in `epoch` (mode 1): the resume position of a reconnecting client.
    After {
        /// The epoch the client saw `seq` in.
        epoch: u64,
        /// The last seq the client has.
        seq: u64,
    },
    /// Everything the server still holds (mode 2).
    Earliest,
}

/// ResumeFrom on the wire: mode u8, epoch u64, seq u64 (always 17 bytes; unused fields are 0).
pub(crate) struct Resume;
impl Codec<ResumeFrom> for Resume {
    fn len(_: &ResumeFrom) -> usize {
        17
    }
    fn check(_: &ResumeFrom, _: &'static str) -> Result<(), EncodeError> {
        Ok(())
    }
    fn put(value: &ResumeFrom, dst: &mut impl BufMut) {
        let (mode, epoch, seq) = match *value {
            ResumeFrom::Live => (0, 0, 0),
            ResumeFrom::After { epoch, seq } => (1, epoch, seq),
            ResumeFrom::Earliest => (2, 0, 0),
        };
        dst.put_u8(mode);
        dst.put_u64_le(epoch);
        dst.put_u64_le(seq);
    }
    fn get(src: &mut Reader, field: &'static str) -> Result<ResumeFrom, DecodeError> {
        let mode = U8::get(src, field)?;
        let epoch = U64::get(src, field)?;
        let seq = U64::get(src, field)?;
        match (mode, epoch, seq) {
            (0, 0, 0) => Ok(ResumeFrom::Live),
            (1, epoch, seq) => Ok(ResumeFrom::After { epoch, seq }),
            (2, 0, 0) => Ok(ResumeFrom::Earliest),
            _ => Err(DecodeError::InvalidValue { field, value: u64::from(mode) }),
        }
    }
}

fields! {
    /// The limits a server announces in WELCOME. A client must stay within them.
    ServerLimits {
        /// Largest frame body the server accepts, in bytes.
        frame_body_bytes_max: u32 = U32,
        /// Largest PUBLISH payload, in bytes.
        payload_bytes_max: u32 = U32,
        /// Most subscriptions one connection may hold.
        subscriptions_max: u32 = U32,
        /// Messages of history kept per session (how far back a resume can reach).
        history_messages_max: u32 = U32,
        /// Send something (PING at least) at least this often, in milliseconds.
        keepalive_ms: u32 = U32,
        /// Outbound bytes the server buffers for this connection before it is a slow consumer.
        outbound_bytes_max: u32 = U32,
    }
}

fields! {
    /// Where a transfer goes: an agent or a queue, by name.
    TransferTarget {
        /// Agent or queue.
        kind: TransferKind = Enum,
        /// The agent's or queue's id.
        name: Text = Id,
    }
}

frames! {
    /// HELLO (0x01), client → server, first frame: the version range the client speaks, the
    /// features it asks for, its name and its auth token.
    Hello(Hello) {
        /// Highest protocol version the client speaks.
        version_max: u16 = U16,
        /// Lowest protocol version the client speaks.
        version_min: u16 = U16,
        /// Feature bits requested (none defined in version 1; servers ignore unknown bits).
        features: u32 = U32,
        /// Free-form client name and version, for logs.
        client_name: Text = Id,
        /// Auth token (a JWT); may be empty when the server runs without auth.
        token: Text = Token,
    }
    /// WELCOME (0x02), server → client: handshake accepted.
    Welcome(Welcome) {
        /// The version both sides speak from now on.
        version: u16 = U16,
        /// Feature bits granted (a subset of those requested).
        features: u32 = U32,
        /// Server name and version, for logs.
        server_name: Text = Id,
        /// Server-assigned id of this connection, for logs on both sides.
        connection_id: u64 = U64,
        /// The tenant the token maps to.
        tenant: Text = Id,
        /// Limits the client must respect.
        limits: ServerLimits = Nested,
    }
    /// PING (0x03), either way.
    Ping(Ping) {
        /// Echoed in the PONG.
        nonce: u64 = U64,
    }
    /// PONG (0x04), either way.
    Pong(Pong) {
        /// The PING's nonce.
        nonce: u64 = U64,
    }
    /// ERROR (0x05), server → client. The correlation id is that of the failed request (0 when
    /// the error is about the connection itself, which the server then closes).
    Error(ErrorFrame) {
        /// What went wrong, as an [`crate::ErrorCode`] value.
        code: u16 = U16,
        /// Human-readable detail.
        message: Text = Message,
    }
    /// GOAWAY (0x06), server → client: the server closes the connection after this frame.
    GoAway(GoAway) {
        /// Why.
        reason: GoAwayReason = Enum,
        /// Wait at least this long before reconnecting, in milliseconds (0 = at once).
        reconnect_after_ms: u32 = U32,
        /// Human-readable detail.
        message: Text = Message,
    }
    /// OK (0x07), server → client: the request with this correlation id succeeded.
    Success(Success) {}
    /// SUBSCRIBE (0x10), client → server.
    Subscribe(Subscribe) {
        /// The session (conversation) id.
        session: Text = Id,
        /// Where to start.
        from: ResumeFrom = Resume,
    }
    /// SUBSCRIBED (0x11), server → client: the subscription is live. Replayed DELIVER frames
    /// (if any) follow it, then live ones, with no gap and no duplicate.
    Subscribed(Subscribed) {
        /// The session.
        session: Text = Id,
        /// The session's current epoch.
        epoch: u64 = U64,
        /// The last seq assigned in the session (0 = none yet).
        head_seq: u64 = U64,
        /// The first seq that will be replayed (head_seq + 1 when nothing is replayed).
        replay_from_seq: u64 = U64,
        /// True when everything after the requested position is replayed; false when the epoch
        /// changed or history no longer reaches back that far (messages were missed).
        recovered: bool = Bool,
    }
    /// UNSUBSCRIBE (0x12), client → server; answered with OK.
    Unsubscribe(Unsubscribe) {
        /// The session.
        session: Text = Id,
    }
    /// PUBLISH (0x13), client → server; answered with PUBACK.
    Publish(Publish) {
        /// The session.
        session: Text = Id,
        /// Client-chosen id for idempotency (0 = none): a repeat within the server's window
        /// gets the original seq back and is not delivered twice.
        client_msg_id: u64 = U64,
        /// Trace id carried into the server's spans and the DELIVER frames (0 = none).
        trace_id: u128 = U128,
        /// The participant who sent it.
        sender: Text = Id,
        /// The message, opaque to the server.
        payload: Bytes = Payload,
    }
    /// PUBACK (0x14), server → client.
    PubAck(PubAck) {
        /// The session.
        session: Text = Id,
        /// The PUBLISH's client_msg_id.
        client_msg_id: u64 = U64,
        /// The session's epoch.
        epoch: u64 = U64,
        /// The seq the message got.
        seq: u64 = U64,
        /// True when this is a repeat of an earlier PUBLISH (same client_msg_id).
        duplicate: bool = Bool,
        /// How durably the message is stored.
        durability: Durability = Enum,
    }
    /// DELIVER (0x15), server → client: a message of a subscribed session.
    Deliver(Deliver) {
        /// The session.
        session: Text = Id,
        /// The session's epoch.
        epoch: u64 = U64,
        /// The message's seq: consecutive within an epoch.
        seq: u64 = U64,
        /// When the server accepted it, in microseconds since the Unix epoch.
        timestamp_us: u64 = U64,
        /// The PUBLISH's trace id.
        trace_id: u128 = U128,
        /// The participant who sent it.
        sender: Text = Id,
        /// The message.
        payload: Bytes = Payload,
    }
    /// READ_CURSOR (0x16), either way: `participant` has seen everything up to `seq`. The
    /// server answers a client's with OK and pushes it to the session's subscribers.
    ReadCursor(ReadCursor) {
        /// The session.
        session: Text = Id,
        /// Who read.
        participant: Text = Id,
        /// Last seq seen.
        seq: u64 = U64,
    }
    /// TYPING (0x17), either way: ephemeral, never stored, never acknowledged.
    Typing(Typing) {
        /// The session.
        session: Text = Id,
        /// Who types.
        participant: Text = Id,
        /// Started (true) or stopped (false).
        active: bool = Bool,
    }
    /// OPEN_CONVERSATION (0x20), client → server: a customer asks for an agent. Answered with
    /// OK; the conversation's progress comes as CONVERSATION_EVENTs on its session.
    OpenConversation(OpenConversation) {
        /// The conversation's session id.
        session: Text = Id,
        /// The customer.
        customer: Text = Id,
        /// 0 (lowest) to 255 (highest).
        priority: u8 = U8,
        /// Skills the agent needs.
        skills: Vec<Text> = Skills,
        /// Opaque context for the agent (form data, page, …).
        context: Bytes = Payload,
    }
    /// CONVERSATION_EVENT (0x21), server → client: a state change, ordered by seq with the
    /// session's messages.
    ConversationEvent(ConversationEvent) {
        /// The session.
        session: Text = Id,
        /// The session's epoch.
        epoch: u64 = U64,
        /// Position in the session's order (shared with DELIVER).
        seq: u64 = U64,
        /// When, in microseconds since the Unix epoch.
        timestamp_us: u64 = U64,
        /// What happened.
        kind: ConversationEventKind = Enum,
        /// The agent concerned (empty when none).
        agent: Text = Id,
        /// The queue concerned (empty when none).
        queue: Text = Id,
        /// Queue position, 1-based (0 when not queued).
        position: u32 = U32,
        /// Estimated wait in milliseconds (0 when not queued).
        estimated_wait_ms: u32 = U32,
        /// A/B experiment group (empty when none).
        group: Text = Id,
        /// Why (close reason, transfer note, …).
        reason: Text = Message,
    }
    /// AGENT_STATUS (0x22), either way: an agent sets its presence; the server reports it.
    AgentStatus(AgentStatus) {
        /// The agent.
        agent: Text = Id,
        /// Presence.
        presence: AgentPresence = Enum,
        /// Most concurrent conversations.
        capacity: u16 = U16,
        /// Current conversations (ignored from clients).
        load: u16 = U16,
        /// Skills offered.
        skills: Vec<Text> = Skills,
    }
    /// OFFER_RESPONSE (0x23), client → server: accept or decline an offer; answered with OK.
    OfferResponse(OfferResponse) {
        /// The conversation offered.
        session: Text = Id,
        /// The agent answering.
        agent: Text = Id,
        /// Accept (true) or decline (false).
        accept: bool = Bool,
    }
    /// TRANSFER (0x24), client → server; answered with OK.
    Transfer(Transfer) {
        /// The conversation.
        session: Text = Id,
        /// Where to.
        target: TransferTarget = Nested,
        /// Note for the next agent.
        note: Text = Message,
    }
    /// CLOSE_CONVERSATION (0x25), client → server; answered with OK.
    CloseConversation(CloseConversation) {
        /// The conversation.
        session: Text = Id,
        /// Why.
        reason: Text = Message,
    }
    /// TICKET_COMMAND (0x30), client → server; answered with TICKET_EVENT (same correlation)
    /// or ERROR(Conflict) when `expected_version` is not current.
    TicketCommand(TicketCommand) {
        /// The ticket.
        ticket: Text = Id,
        /// What to do.
        op: TicketOp = Enum,
        /// The version the client last saw (compare-and-set); 0 for Create.
        expected_version: u64 = U64,
        /// The conversation the ticket belongs to (may be empty).
        session: Text = Id,
        /// New assignee (Assign), else empty.
        assignee: Text = Id,
        /// Trace id (0 = none).
        trace_id: u128 = U128,
        /// Opaque ticket data.
        payload: Bytes = Payload,
    }
    /// TICKET_EVENT (0x31), server → client: the ticket's state after a change.
    TicketEvent(TicketEvent) {
        /// The ticket.
        ticket: Text = Id,
        /// Its version now.
        version: u64 = U64,
        /// Its state now.
        state: TicketState = Enum,
        /// 0 = not escalated.
        escalation_level: u8 = U8,
        /// The conversation.
        session: Text = Id,
        /// Current assignee.
        assignee: Text = Id,
        /// When the current SLA stage is due, microseconds since the Unix epoch (0 = none).
        sla_deadline_us: u64 = U64,
        /// Trace id of the command that caused it.
        trace_id: u128 = U128,
        /// Opaque ticket data.
        payload: Bytes = Payload,
    }
}

/// A frame with the correlation id it travelled with.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Envelope {
    /// Correlation id from the header.
    pub correlation: u32,
    /// The frame.
    pub frame: Frame,
}

impl Frame {
    /// Total bytes this frame takes on the wire, header included.
    pub fn encoded_len(&self) -> usize {
        HEADER_BYTES + self.body_bytes()
    }

    /// Writes header and body into `dst` (a `BytesMut`, a `&mut [u8]`, a pool buffer…).
    ///
    /// Every field is checked against its limit before anything is written, so on error `dst`
    /// is untouched. `dst` must have room for [`Frame::encoded_len`] bytes (`BytesMut` grows).
    pub fn encode(&self, correlation: u32, dst: &mut impl BufMut) -> Result<(), EncodeError> {
        self.check()?;
        let body_bytes = self.body_bytes();
        let max = crate::limits::FRAME_BODY_BYTES_MAX as usize;
        if body_bytes > max {
            return Err(EncodeError { field: "frame body", len: body_bytes, max });
        }
        FrameHeader { frame_type: self.frame_type(), body_bytes: body_bytes as u32, correlation }.write(dst);
        self.put_body(dst);
        Ok(())
    }

    /// Encodes into a new buffer of exactly the right size.
    pub fn to_bytes(&self, correlation: u32) -> Result<Bytes, EncodeError> {
        let mut dst = BytesMut::with_capacity(self.encoded_len());
        self.encode(correlation, &mut dst)?;
        Ok(dst.freeze())
    }
}

/// A DELIVER frame's fields, borrowed: what a server encodes once per message. Encoding it
/// writes exactly the bytes of the equivalent [`Deliver`] (a property test checks this), without
/// building one — no reference counts taken and dropped on the PUBLISH's buffer.
#[derive(Debug, Clone, Copy)]
pub struct DeliverRef<'a> {
    /// The session.
    pub session: &'a str,
    /// The session's epoch.
    pub epoch: u64,
    /// The message's seq.
    pub seq: u64,
    /// When the server accepted it, in microseconds since the Unix epoch.
    pub timestamp_us: u64,
    /// The PUBLISH's trace id.
    pub trace_id: u128,
    /// The participant who sent it.
    pub sender: &'a str,
    /// The message.
    pub payload: &'a [u8],
}

impl<'a> DeliverRef<'a> {
    /// Decodes a DELIVER body (the bytes after the header, as [`peek_frame`] gives them)
    /// without copying and without taking reference counts: the fields borrow `body`. What a
    /// subscriber's hot path wants. It accepts and refuses exactly what [`decode`] does for the
    /// same body, with the same errors (a property test and the fuzzer check this).
    pub fn decode_body(body: &'a [u8]) -> Result<DeliverRef<'a>, DecodeError> {
        let mut src = crate::wire::SliceReader::new(body);
        let deliver = DeliverRef {
            session: src.id("session")?,
            epoch: src.u64("epoch")?,
            seq: src.u64("seq")?,
            timestamp_us: src.u64("timestamp_us")?,
            trace_id: src.u128("trace_id")?,
            sender: src.id("sender")?,
            payload: src.payload("payload")?,
        };
        src.finish()?;
        Ok(deliver)
    }

    /// Body bytes: the two ids and the payload with their length prefixes, and the fixed fields.
    fn body_bytes(&self) -> usize {
        (1 + self.session.len()) + 8 + 8 + 8 + 16 + (1 + self.sender.len()) + (4 + self.payload.len())
    }

    /// Total bytes on the wire, header included.
    pub fn encoded_len(&self) -> usize {
        HEADER_BYTES + self.body_bytes()
    }

    /// Writes header and body into `dst`; like [`Frame::encode`], every length is checked
    /// before anything is written.
    pub fn encode(&self, correlation: u32, dst: &mut impl BufMut) -> Result<(), EncodeError> {
        crate::wire::check_len(self.session.len(), crate::limits::ID_BYTES_MAX, "session")?;
        crate::wire::check_len(self.sender.len(), crate::limits::ID_BYTES_MAX, "sender")?;
        let body_bytes = self.body_bytes();
        crate::wire::check_len(body_bytes, crate::limits::FRAME_BODY_BYTES_MAX as usize, "frame body")?;
        FrameHeader { frame_type: FrameType::Deliver, body_bytes: body_bytes as u32, correlation }.write(dst);
        dst.put_u8(self.session.len() as u8);
        dst.put_slice(self.session.as_bytes());
        dst.put_u64_le(self.epoch);
        dst.put_u64_le(self.seq);
        dst.put_u64_le(self.timestamp_us);
        dst.put_u128_le(self.trace_id);
        dst.put_u8(self.sender.len() as u8);
        dst.put_slice(self.sender.as_bytes());
        dst.put_u32_le(self.payload.len() as u32);
        dst.put_slice(self.payload);
        Ok(())
    }
}

/// A PUBLISH frame's fields, borrowed from the buffer it was read into: what a server's hot
/// path decodes, without taking and dropping a reference count per field as [`decode`]'s
/// [`Publish`] does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PublishRef<'a> {
    /// The session.
    pub session: &'a str,
    /// Client-chosen id for idempotency (0 = none).
    pub client_msg_id: u64,
    /// Trace id (0 = none).
    pub trace_id: u128,
    /// The participant who sent it.
    pub sender: &'a str,
    /// The message.
    pub payload: &'a [u8],
}

impl<'a> PublishRef<'a> {
    /// Decodes a PUBLISH body (the bytes after the header, as [`peek_frame`] gives them); the
    /// fields borrow `body`. It accepts and refuses exactly what [`decode`] does for the same
    /// body, with the same errors (a property test and the fuzzer check this).
    pub fn decode_body(body: &'a [u8]) -> Result<PublishRef<'a>, DecodeError> {
        let mut src = crate::wire::SliceReader::new(body);
        let publish = PublishRef {
            session: src.id("session")?,
            client_msg_id: src.u64("client_msg_id")?,
            trace_id: src.u128("trace_id")?,
            sender: src.id("sender")?,
            payload: src.payload("payload")?,
        };
        src.finish()?;
        Ok(publish)
    }
}

/// A PUBACK frame with its session borrowed: encoding it writes exactly the bytes of the
/// equivalent [`PubAck`] (a property test checks this) without building a [`Text`] for it.
#[derive(Debug, Clone, Copy)]
pub struct PubAckRef<'a> {
    /// The session.
    pub session: &'a str,
    /// The PUBLISH's client_msg_id.
    pub client_msg_id: u64,
    /// The session's epoch.
    pub epoch: u64,
    /// The seq the message got.
    pub seq: u64,
    /// True when this is a repeat of an earlier PUBLISH (same client_msg_id).
    pub duplicate: bool,
    /// How durably the message is stored.
    pub durability: Durability,
}

impl PubAckRef<'_> {
    fn body_bytes(&self) -> usize {
        (1 + self.session.len()) + 8 + 8 + 8 + 1 + 1
    }

    /// Total bytes on the wire, header included.
    pub fn encoded_len(&self) -> usize {
        HEADER_BYTES + self.body_bytes()
    }

    /// Writes header and body into `dst`; the session's length is checked before anything is
    /// written.
    pub fn encode(&self, correlation: u32, dst: &mut impl BufMut) -> Result<(), EncodeError> {
        crate::wire::check_len(self.session.len(), crate::limits::ID_BYTES_MAX, "session")?;
        FrameHeader { frame_type: FrameType::PubAck, body_bytes: self.body_bytes() as u32, correlation }.write(dst);
        dst.put_u8(self.session.len() as u8);
        dst.put_slice(self.session.as_bytes());
        dst.put_u64_le(self.client_msg_id);
        dst.put_u64_le(self.epoch);
        dst.put_u64_le(self.seq);
        dst.put_u8(u8::from(self.duplicate));
        dst.put_u8(self.durability.to_u8());
        Ok(())
    }
}

/// The whole frame at the front of `src`, borrowed: its header and its body, without
/// consuming anything (the frame is `HEADER_BYTES + header.body_bytes` long). `Ok(None)`: not
/// all of it is there yet. The header is checked as [`decode`] checks it, with the same errors;
/// the body is not looked at (see [`DeliverRef::decode_body`], [`PublishRef::decode_body`]).
pub fn peek_frame<'a>(src: &'a [u8], limits: &Limits) -> Result<Option<(FrameHeader, &'a [u8])>, DecodeError> {
    let Some(header) = FrameHeader::peek(src, limits)? else { return Ok(None) };
    let frame_bytes = HEADER_BYTES + header.body_bytes as usize;
    Ok(src.get(HEADER_BYTES..frame_bytes).map(|body| (header, body)))
}

/// Takes one whole frame off the front of `src`, if one is there.
///
/// - `Ok(Some(envelope))`: a frame was removed from `src`; its payloads share `src`'s memory.
/// - `Ok(None)`: not enough bytes yet (a normal result); nothing is consumed.
/// - `Err(_)`: the stream is invalid; reply with ERROR([`DecodeError::code`]) and close.
///   Nothing is consumed, so the offending bytes are still at the front of `src`.
///
/// The header is checked (magic, version, type, reserved bits, length against `limits`) as
/// soon as its bytes arrive, before waiting for the body.
pub fn decode(src: &mut BytesMut, limits: &Limits) -> Result<Option<Envelope>, DecodeError> {
    let Some(header) = FrameHeader::peek(src, limits)? else { return Ok(None) };
    let frame_bytes = HEADER_BYTES + header.body_bytes as usize;
    if src.len() < frame_bytes {
        // Reserve once for the whole frame so the reads that complete it do not reallocate.
        src.reserve(frame_bytes - src.len());
        return Ok(None);
    }
    let whole = src.split_to(frame_bytes).freeze();
    let mut reader = Reader::new(whole.slice(HEADER_BYTES..));
    let decoded = Frame::get_body(header.frame_type, &mut reader).and_then(|frame| reader.finish().map(|()| frame));
    match decoded {
        Ok(frame) => Ok(Some(Envelope { correlation: header.correlation, frame })),
        Err(error) => {
            // Errors consume nothing, whether found in the header or the body: the caller may
            // log the offending bytes. The copy only happens on this terminal path.
            let mut restored = BytesMut::with_capacity(whole.len() + src.len());
            restored.extend_from_slice(&whole);
            restored.extend_from_slice(src);
            *src = restored;
            Err(error)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn publish() -> Frame {
        Frame::Publish(Publish {
            session: Text::from("conv-1"),
            client_msg_id: 7,
            trace_id: 0xabc,
            sender: Text::from("customer-9"),
            payload: Bytes::from_static(b"hello"),
        })
    }

    #[test]
    fn round_trip_one_byte_at_a_time() {
        let frame = publish();
        let bytes = frame.to_bytes(42).unwrap();
        let mut src = BytesMut::new();
        for (index, byte) in bytes.iter().enumerate() {
            assert_eq!(decode(&mut src, &Limits::default()).unwrap(), None, "complete too early at {index}");
            src.put_u8(*byte);
        }
        let envelope = decode(&mut src, &Limits::default()).unwrap().unwrap();
        assert_eq!(envelope, Envelope { correlation: 42, frame });
        assert!(src.is_empty());
    }

    #[test]
    fn oversize_is_refused_from_the_header() {
        let frame = publish();
        let bytes = frame.to_bytes(1).unwrap();
        let mut src = BytesMut::from(&bytes[..HEADER_BYTES]);
        let limits = Limits { frame_body_bytes_max: 8 };
        assert!(matches!(decode(&mut src, &limits), Err(DecodeError::FrameTooLarge { max_bytes: 8, .. })));
    }

    #[test]
    fn encode_refuses_long_ids_and_writes_nothing() {
        let frame = Frame::Unsubscribe(Unsubscribe { session: Text::from("x".repeat(129)) });
        let mut dst = BytesMut::new();
        let error = frame.encode(0, &mut dst).unwrap_err();
        assert_eq!(error.field, "session");
        assert!(dst.is_empty());
    }
}
