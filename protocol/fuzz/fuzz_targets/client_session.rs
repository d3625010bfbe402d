//! Fuzzes the client session state machine (`switchboard_client::ClientSession`): arbitrary
//! server bytes and well-formed-but-arbitrary server frames, arbitrary timing, disconnects and
//! application commands, in any order.
//!
//! Input layout: a sequence of operations; each starts with one byte choosing the operation
//! (`byte % 14`), followed by the bytes it reads as operands (see `step`). Raw server bytes
//! come in chunks of the input; structured server frames are built from operands, and can
//! answer (same correlation, same session or `client_msg_id`) one of the frames the client
//! actually sent, so the fuzzer reaches the subscription and publish logic quickly.
//!
//! For every input it checks:
//! - no panic, whatever arrives in whatever state;
//! - everything the client transmits decodes as whole, valid frames, and only client frames;
//! - per subscribed session, the caller never sees an item twice or out of order, and never a
//!   hole that was not announced by a `Gap` event (the session's delivery guarantee);
//! - `Delivery` events only come for sessions the caller is subscribed to;
//! - the pending-request counters stay within their configured limits.

#![no_main]

use std::collections::HashMap;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use libfuzzer_sys::fuzz_target;
use switchboard_client::{
    Action, ClientConfig, ClientSession, Event, Frame, OpenConversation, Publish, ReconnectPolicy, RequestId, ResumeFrom,
    Text, TicketCommand, TicketOp, Typing,
};
use switchboard_protocol::{
    decode, AgentPresence, AgentStatus, ConversationEvent, ConversationEventKind, Deliver, Durability, ErrorFrame,
    GoAway, GoAwayReason, Limits, Ping, Pong, PubAck, ReadCursor, ServerLimits, Subscribed, Success, TicketEvent,
    TicketState, Welcome,
};

const SESSIONS: [&str; 3] = ["conv-a", "conv-b", "conv-c"];
const INFLIGHT_PUBLISHES_MAX: usize = 8;
const REQUESTS_PENDING_MAX: usize = 8;

struct Input<'a> {
    data: &'a [u8],
}

impl<'a> Input<'a> {
    fn byte(&mut self) -> Option<u8> {
        let (&first, rest) = self.data.split_first()?;
        self.data = rest;
        Some(first)
    }

    fn u8(&mut self) -> u8 {
        self.byte().unwrap_or(0)
    }

    fn u16(&mut self) -> u16 {
        u16::from_le_bytes([self.u8(), self.u8()])
    }

    fn bool(&mut self) -> bool {
        self.u8() & 1 == 1
    }

    fn take(&mut self, len: usize) -> &'a [u8] {
        let len = len.min(self.data.len());
        let (taken, rest) = self.data.split_at(len);
        self.data = rest;
        taken
    }

    fn session(&mut self) -> Text {
        Text::from_static(SESSIONS[usize::from(self.u8()) % SESSIONS.len()])
    }
}

/// What the caller has seen of one subscribed session.
#[derive(Default)]
struct Seen {
    last: Option<(u64, u64)>,
    gap_announced: bool,
}

#[derive(Default)]
struct Checker {
    /// Sessions whose subscription is confirmed and not ended, as the events tell.
    subscribed: HashMap<Text, Seen>,
    /// Subscribe requests in flight, by request.
    subscribing: HashMap<RequestId, Text>,
    /// The last frames the client sent (correlation, frame), for the fuzzer to answer.
    sent: Vec<(u32, Frame)>,
}

impl Checker {
    fn item(&mut self, session: &Text, epoch: u64, seq: u64, delivery: bool) {
        let Some(seen) = self.subscribed.get_mut(session) else {
            assert!(!delivery, "DELIVER of {session} reached the caller without a subscription");
            return;
        };
        if let Some((last_epoch, last_seq)) = seen.last {
            if epoch == last_epoch {
                assert!(seq > last_seq, "{session}: seq {seq} after {last_seq} (duplicate or reordered)");
                assert!(seq == last_seq + 1 || seen.gap_announced, "{session}: silent hole between {last_seq} and {seq}");
            } else {
                assert!(seen.gap_announced, "{session}: epoch {last_epoch} → {epoch} without a gap");
            }
        }
        seen.last = Some((epoch, seq));
        seen.gap_announced = false;
    }

    fn event(&mut self, event: Event) {
        match event {
            Event::Subscribed { request, info } => {
                self.subscribing.remove(&request);
                self.subscribed.insert(info.session, Seen::default());
            }
            Event::Gap(gap) => {
                if let Some(seen) = self.subscribed.get_mut(&gap.session) {
                    seen.gap_announced = true;
                }
            }
            Event::SubscriptionFailed { session, .. } => {
                self.subscribed.remove(&session);
            }
            Event::RequestFailed { request, .. } => {
                if let Some(session) = self.subscribing.remove(&request) {
                    self.subscribed.remove(&session);
                }
            }
            Event::Delivery(deliver) => self.item(&deliver.session, deliver.epoch, deliver.seq, true),
            Event::ConversationEvent(event) => self.item(&event.session, event.epoch, event.seq, false),
            _ => {}
        }
    }

    fn transmitted(&mut self, bytes: &[u8]) {
        let mut src = BytesMut::from(bytes);
        loop {
            match decode(&mut src, &Limits::default()) {
                Ok(Some(envelope)) => {
                    assert!(
                        matches!(
                            envelope.frame,
                            Frame::Hello(_)
                                | Frame::Ping(_)
                                | Frame::Pong(_)
                                | Frame::Subscribe(_)
                                | Frame::Unsubscribe(_)
                                | Frame::Publish(_)
                                | Frame::ReadCursor(_)
                                | Frame::Typing(_)
                                | Frame::OpenConversation(_)
                                | Frame::AgentStatus(_)
                                | Frame::OfferResponse(_)
                                | Frame::Transfer(_)
                                | Frame::CloseConversation(_)
                                | Frame::TicketCommand(_)
                        ),
                        "the client sent a server frame: {:?}",
                        envelope.frame
                    );
                    if self.sent.len() == 16 {
                        self.sent.remove(0);
                    }
                    self.sent.push((envelope.correlation, envelope.frame));
                }
                Ok(None) => break,
                Err(error) => panic!("the client sent undecodable bytes: {error}"),
            }
        }
        assert!(src.is_empty(), "the client sent a partial frame");
    }
}

struct Harness {
    session: ClientSession,
    now: Instant,
    checker: Checker,
    out: BytesMut,
}

impl Harness {
    /// Carries out actions (connects always succeed), checks what is sent and what happens.
    fn settle(&mut self) {
        for _ in 0..64 {
            let mut progress = false;
            while let Some(action) = self.session.poll_action() {
                progress = true;
                if action == Action::Connect {
                    self.session.handle_connected(self.now);
                }
            }
            self.out.clear();
            if self.session.poll_transmit(self.now, &mut self.out) > 0 {
                progress = true;
                let out = std::mem::take(&mut self.out);
                self.checker.transmitted(&out);
                self.out = out;
            }
            while let Some(event) = self.session.poll_event() {
                progress = true;
                self.checker.event(event);
            }
            assert!(self.session.publishes_inflight() <= INFLIGHT_PUBLISHES_MAX);
            assert!(self.session.requests_pending() <= INFLIGHT_PUBLISHES_MAX + REQUESTS_PENDING_MAX);
            if !progress {
                return;
            }
        }
    }

    fn feed(&mut self, input: &mut Input, frame: &Frame, correlation: u32) {
        let Ok(bytes) = frame.to_bytes(correlation) else { return };
        // In one to three chunks.
        let cut = usize::from(input.u8()) % (bytes.len() + 1);
        self.session.handle_bytes(self.now, &bytes[..cut]);
        self.session.handle_bytes(self.now, &bytes[cut..]);
    }

    fn step(&mut self, op: u8, input: &mut Input) {
        let now = self.now;
        match op % 14 {
            0 => {
                let len = usize::from(input.u8());
                let raw = input.take(len);
                self.session.handle_bytes(now, raw);
            }
            1 => {
                let (correlation, frame) = server_frame(input, &self.checker.sent);
                self.feed(input, &frame, correlation);
            }
            2 => {
                self.now += Duration::from_millis(u64::from(input.u16()));
                self.session.handle_timeout(self.now);
            }
            3 => {
                if let Some(at) = self.session.poll_timeout() {
                    self.now = self.now.max(at);
                    self.session.handle_timeout(self.now);
                }
            }
            4 => self.session.handle_disconnected(now),
            5 => {
                let session = input.session();
                let from = match input.u8() % 3 {
                    0 => ResumeFrom::Live,
                    1 => ResumeFrom::Earliest,
                    _ => ResumeFrom::After { epoch: u64::from(input.u8() % 3), seq: u64::from(input.u8()) },
                };
                if let Ok(request) = self.session.subscribe(now, session.clone(), from) {
                    self.checker.subscribing.insert(request, session);
                }
            }
            6 => {
                let session = input.session();
                if self.session.unsubscribe(now, &session).is_ok() {
                    // No item of it may reach the caller from now on.
                    self.checker.subscribed.remove(&session);
                    self.checker.subscribing.retain(|_, pending| *pending != session);
                }
            }
            7 => {
                let session = input.session();
                let client_msg_id = u64::from(input.u8() % 4);
                let trace_id = u128::from(input.u8());
                let payload_bytes = usize::from(input.u8() % 32);
                let publish = Publish {
                    session,
                    client_msg_id,
                    trace_id,
                    sender: Text::from_static("customer"),
                    payload: Bytes::copy_from_slice(input.take(payload_bytes)),
                };
                let _ = self.session.publish(now, publish);
            }
            8 => {
                let frame = match input.u8() % 4 {
                    0 => Frame::Ping(Ping { nonce: u64::from(input.u8()) }),
                    1 => Frame::OpenConversation(OpenConversation {
                        session: input.session(),
                        customer: Text::from_static("customer"),
                        priority: input.u8(),
                        skills: vec![],
                        context: Bytes::new(),
                    }),
                    2 => Frame::TicketCommand(TicketCommand {
                        ticket: Text::from_static("ticket"),
                        op: TicketOp::Create,
                        expected_version: u64::from(input.u8()),
                        session: input.session(),
                        assignee: Text::new(),
                        trace_id: 0,
                        payload: Bytes::new(),
                    }),
                    // Not a request: must be refused without a panic.
                    _ => Frame::Success(Success {}),
                };
                let _ = self.session.request(now, frame);
            }
            9 => {
                let typing = Typing { session: input.session(), participant: Text::from_static("agent"), active: input.bool() };
                let _ = self.session.typing(now, typing);
            }
            10 => {
                let paused = input.bool();
                self.session.set_receive_paused(now, paused);
            }
            11 => {
                // Rarely: closing ends everything, so most inputs should keep the session alive.
                if input.u8() == 0xff {
                    self.session.close(now);
                    self.checker.subscribed.clear();
                }
            }
            12 => self.session.handle_connected(now),
            _ => {
                let len = usize::from(input.u8());
                let mut buf = BytesMut::from(input.take(len));
                self.session.handle_input(now, &mut buf);
            }
        }
        self.settle();
    }
}

/// A server frame built from operands; kinds that answer a request may take the correlation
/// (and session, client_msg_id) of a frame the client sent.
fn server_frame(input: &mut Input, sent: &[(u32, Frame)]) -> (u32, Frame) {
    let kind = input.u8() % 12;
    let answered = if sent.is_empty() { None } else { Some(&sent[usize::from(input.u8()) % sent.len()]) };
    let correlation = match (input.u8() % 4, answered) {
        (0, _) | (_, None) => 0,
        (1, _) => u32::from(input.u8()),
        (_, Some((correlation, _))) => *correlation,
    };
    let answered_session = match answered {
        Some((_, Frame::Subscribe(subscribe))) => Some(subscribe.session.clone()),
        Some((_, Frame::Publish(publish))) => Some(publish.session.clone()),
        _ => None,
    };
    let session = match answered_session {
        Some(session) if input.bool() => session,
        _ => input.session(),
    };
    let epoch = u64::from(input.u8() % 3);
    let seq = u64::from(input.u8() % 16);
    let frame = match kind {
        0 => Frame::Welcome(Welcome {
            version: if input.u8() == 0xff { 2 } else { 1 },
            features: 0,
            server_name: Text::from_static("fuzz"),
            connection_id: 1,
            tenant: Text::from_static("tenant"),
            limits: ServerLimits {
                frame_body_bytes_max: u32::from(input.u16()),
                payload_bytes_max: u32::from(input.u16()),
                subscriptions_max: u32::from(input.u8() % 4),
                history_messages_max: 16,
                keepalive_ms: u32::from(input.u16()),
                outbound_bytes_max: 1 << 20,
            },
        }),
        1 => Frame::Subscribed(Subscribed {
            session,
            epoch,
            head_seq: seq,
            replay_from_seq: u64::from(input.u8() % 18),
            recovered: input.bool(),
        }),
        2 => Frame::Deliver(Deliver {
            session,
            epoch,
            seq,
            timestamp_us: 0,
            trace_id: 0,
            sender: Text::from_static("agent"),
            payload: Bytes::from_static(b"x"),
        }),
        3 => Frame::ConversationEvent(ConversationEvent {
            session,
            epoch,
            seq,
            timestamp_us: 0,
            kind: ConversationEventKind::Assigned,
            agent: Text::from_static("agent"),
            queue: Text::new(),
            position: 0,
            estimated_wait_ms: 0,
            group: Text::new(),
            reason: Text::new(),
        }),
        4 => {
            let client_msg_id = match answered {
                Some((_, Frame::Publish(publish))) if input.bool() => publish.client_msg_id,
                _ => u64::from(input.u8()),
            };
            Frame::PubAck(PubAck { session, client_msg_id, epoch, seq, duplicate: input.bool(), durability: Durability::Memory })
        }
        5 => Frame::Error(ErrorFrame { code: u16::from(input.u8() % 18), message: Text::from_static("fuzz") }),
        6 => Frame::GoAway(GoAway {
            reason: [GoAwayReason::Shutdown, GoAwayReason::SlowConsumer, GoAwayReason::AuthExpired, GoAwayReason::Overloaded]
                [usize::from(input.u8() % 4)],
            reconnect_after_ms: u32::from(input.u16()),
            message: Text::new(),
        }),
        7 => Frame::Success(Success {}),
        8 => Frame::Ping(Ping { nonce: seq }),
        9 => Frame::Pong(Pong { nonce: seq }),
        10 => Frame::ReadCursor(ReadCursor { session, participant: Text::from_static("agent"), seq }),
        _ => match input.u8() % 2 {
            0 => Frame::AgentStatus(AgentStatus {
                agent: Text::from_static("agent"),
                presence: AgentPresence::Online,
                capacity: 3,
                load: 1,
                skills: vec![],
            }),
            _ => Frame::TicketEvent(TicketEvent {
                ticket: Text::from_static("ticket"),
                version: seq,
                state: TicketState::Accepted,
                escalation_level: 0,
                session,
                assignee: Text::new(),
                sla_deadline_us: 0,
                trace_id: 0,
                payload: Bytes::new(),
            }),
        },
    };
    (correlation, frame)
}

fuzz_target!(|data: &[u8]| {
    let config = ClientConfig {
        keepalive: Duration::from_secs(1),
        request_timeout: Duration::from_secs(5),
        retry_initial_connect: true,
        inflight_publishes_max: INFLIGHT_PUBLISHES_MAX,
        requests_pending_max: REQUESTS_PENDING_MAX,
        subscriptions_max: 2,
        reconnect: ReconnectPolicy {
            initial: Duration::from_millis(10),
            max: Duration::from_millis(200),
            attempts_max: Some(64),
        },
        seed: 1,
        ..ClientConfig::default()
    };
    let mut harness = Harness {
        session: ClientSession::new(config).expect("valid config"),
        now: Instant::now(),
        checker: Checker::default(),
        out: BytesMut::new(),
    };
    harness.settle();
    let mut input = Input { data };
    while let Some(op) = input.byte() {
        harness.step(op, &mut input);
    }
});
