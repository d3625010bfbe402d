//! Tests of the session state machine against the in-memory fake server, with virtual time.

use std::time::Duration;

use bytes::{Bytes, BytesMut};
use proptest::prelude::*;
use switchboard_protocol::{
    decode, Deliver, ErrorCode, Frame, GoAwayReason, Limits, OpenConversation, Publish, ResumeFrom, Subscribed, Text,
    TicketCommand, TicketOp,
};

use crate::testing::{FakeServerConfig, Pair};
use crate::{
    Action, ClientConfig, ClientError, ClientSession, ConnectionState, DisconnectReason, Event, GapCause, Position,
    ReconnectPolicy, RequestId,
};

const S: &str = "conv-1";

fn client_config() -> ClientConfig {
    ClientConfig {
        reconnect: ReconnectPolicy { initial: Duration::from_millis(10), max: Duration::from_millis(500), attempts_max: None },
        seed: 7,
        ..ClientConfig::default()
    }
}

fn connected_pair(server: FakeServerConfig) -> Pair {
    let mut pair = Pair::new(server, client_config());
    pair.drive();
    assert_eq!(pair.client.state(), ConnectionState::Established);
    pair
}

fn publish(session: &str, payload: &str) -> Publish {
    Publish {
        session: Text::from(session),
        client_msg_id: 0,
        trace_id: 0,
        sender: Text::from("customer-1"),
        payload: Bytes::copy_from_slice(payload.as_bytes()),
    }
}

fn seqs(pair: &Pair, session: &str) -> Vec<u64> {
    pair.deliveries(session).iter().map(|deliver| deliver.seq).collect()
}

fn subscribe(pair: &mut Pair, session: &str, from: ResumeFrom) -> RequestId {
    let request = pair.client.subscribe(pair.now, Text::from(session), from).unwrap();
    pair.drive();
    request
}

fn frames(bytes: &[u8]) -> Vec<(u32, Frame)> {
    let mut src = BytesMut::from(bytes);
    let mut frames = Vec::new();
    while let Some(envelope) = decode(&mut src, &Limits::default()).unwrap() {
        frames.push((envelope.correlation, envelope.frame));
    }
    assert!(src.is_empty(), "partial frame left");
    frames
}

#[test]
fn handshake_sends_hello_then_reports_welcome() {
    let config = ClientConfig { token: Text::from("jwt-token"), client_name: Text::from("gw/1"), ..client_config() };
    let mut client = ClientSession::new(config).unwrap();
    let now = pair_now();
    assert_eq!(client.state(), ConnectionState::Connecting);
    assert_eq!(client.poll_action(), Some(Action::Connect));
    assert_eq!(client.poll_action(), None);
    client.handle_connected(now);
    assert_eq!(client.state(), ConnectionState::Handshaking);
    let mut out = BytesMut::new();
    client.poll_transmit(now, &mut out);
    let sent = frames(&out);
    assert_eq!(sent.len(), 1);
    let Frame::Hello(hello) = &sent[0].1 else { panic!("expected HELLO, got {:?}", sent[0]) };
    assert_eq!(hello.token, "jwt-token");
    assert_eq!(hello.client_name, "gw/1");
    assert_eq!((hello.version_min, hello.version_max), (1, 1));

    let mut pair = Pair::new(FakeServerConfig::default(), client_config());
    pair.drive();
    let Event::Connected { welcome, resumed } = &pair.events[0] else { panic!("{:?}", pair.events) };
    assert!(!resumed);
    assert_eq!(welcome.tenant, "test-tenant");
    assert_eq!(pair.client.welcome().unwrap().limits.payload_bytes_max, 64 * 1024);
}

fn pair_now() -> std::time::Instant {
    std::time::Instant::now()
}

#[test]
fn requests_made_before_the_handshake_wait_for_it() {
    let mut pair = Pair::new(FakeServerConfig::default(), client_config());
    let now = pair.now;
    pair.client.subscribe(now, Text::from(S), ResumeFrom::Live).unwrap();
    pair.client.publish(now, publish(S, "early")).unwrap();
    pair.drive();
    assert_eq!(seqs(&pair, S), [1]);
    assert!(pair.events.iter().any(|event| matches!(event, Event::PubAck { ack, .. } if ack.seq == 1)));
}

#[test]
fn correlation_ids_are_nonzero_unique_and_wrap() {
    let mut pair = connected_pair(FakeServerConfig::default());
    pair.client.set_next_id(u32::MAX - 1);
    let now = pair.now;
    let ids: Vec<u32> = (0..4).map(|i| pair.client.publish(now, publish(S, &i.to_string())).unwrap().get()).collect();
    assert_eq!(ids, [u32::MAX - 1, u32::MAX, 1, 2]);
    pair.drive();
    let acked: Vec<u32> = pair
        .events
        .iter()
        .filter_map(|event| match event {
            Event::PubAck { request, .. } => Some(request.get()),
            _ => None,
        })
        .collect();
    assert_eq!(acked, ids);
    // An id still in use is skipped when the counter comes round again.
    pair.client.set_next_id(1);
    pair.refuse_connections = true;
    pair.kick();
    let now = pair.now;
    let waiting = pair.client.publish(now, publish(S, "a")).unwrap();
    pair.client.set_next_id(waiting.get());
    let next = pair.client.publish(now, publish(S, "b")).unwrap();
    assert_ne!(next, waiting);
    assert_ne!(next.get(), 0);
}

#[test]
fn resume_after_reconnect_delivers_everything_once_in_order() {
    let mut pair = connected_pair(FakeServerConfig::default());
    subscribe(&mut pair, S, ResumeFrom::Live);
    for i in 0..5 {
        pair.server.publish(S, "agent-1", format!("m{i}").as_bytes());
    }
    pair.drive();
    assert_eq!(seqs(&pair, S), [1, 2, 3, 4, 5]);

    pair.refuse_connections = true;
    pair.kick();
    assert!(matches!(pair.client.state(), ConnectionState::Reconnecting { .. }));
    for i in 5..8 {
        pair.server.publish(S, "agent-1", format!("m{i}").as_bytes());
    }
    pair.refuse_connections = false;
    assert!(pair.settle_connected(10));
    assert_eq!(seqs(&pair, S), [1, 2, 3, 4, 5, 6, 7, 8]);
    assert!(pair.events.iter().any(|event| matches!(event, Event::Connected { resumed: true, .. })));
    let resubscribed = pair.events.iter().find_map(|event| match event {
        Event::Resubscribed { info } => Some(info.clone()),
        _ => None,
    });
    assert_eq!(resubscribed.map(|info| (info.replay_from_seq, info.recovered)), Some((6, true)));
    assert!(!pair.events.iter().any(|event| matches!(event, Event::Gap(_))));
    assert_eq!(pair.client.position(&Text::from(S)), Some(Position { epoch: 1, seq: 8 }));
}

#[test]
fn replayed_items_the_caller_has_are_dropped() {
    let mut pair = connected_pair(FakeServerConfig::default());
    subscribe(&mut pair, S, ResumeFrom::Live);
    let mut sent = Vec::new();
    for i in 0..3 {
        pair.server.publish(S, "agent-1", format!("m{i}").as_bytes());
    }
    pair.drive();
    sent.extend(pair.server.history(S));
    // A server that replays too much (here: pushes seq 2 and 3 again) must not duplicate.
    let conn = pair.conn.unwrap();
    for deliver in &sent[1..] {
        pair.server.push(conn, 0, &Frame::Deliver(deliver.clone()));
    }
    pair.server.publish(S, "agent-1", b"m3");
    pair.drive();
    assert_eq!(seqs(&pair, S), [1, 2, 3, 4]);
    assert_eq!(pair.client.stats().duplicates_dropped, 2);
}

#[test]
fn a_seq_that_skips_ahead_is_a_violation_and_the_resume_fills_the_hole() {
    let mut pair = connected_pair(FakeServerConfig::default());
    subscribe(&mut pair, S, ResumeFrom::Live);
    pair.server.publish(S, "agent-1", b"one");
    pair.drive();
    // The server stores 2 and 3 but (as a buggy server would) only sends 3: the server
    // forgets the connection so nothing fans out to it, and 3 is handed to the client directly.
    let conn = pair.conn.unwrap();
    pair.server.disconnect(conn);
    pair.server.publish(S, "agent-1", b"two");
    pair.server.publish(S, "agent-1", b"three");
    let third: Deliver = pair.server.history(S)[2].clone();
    pair.client.handle_bytes(pair.now, &Frame::Deliver(third).to_bytes(0).unwrap());
    assert_eq!(pair.client.poll_action(), Some(Action::Close));
    pair.conn = None;
    pair.drive();
    assert!(pair.events.iter().any(|event| matches!(
        event,
        Event::Disconnected { reason: DisconnectReason::ProtocolViolation(_), reconnect_at: Some(_) }
    )));
    assert_eq!(pair.client.stats().protocol_violations, 1);
    assert!(pair.settle_connected(10));
    assert_eq!(seqs(&pair, S), [1, 2, 3]);
}

#[test]
fn unrecoverable_resume_surfaces_a_gap() {
    let server = FakeServerConfig { history_messages_max: 2, ..FakeServerConfig::default() };
    let mut pair = connected_pair(server);
    subscribe(&mut pair, S, ResumeFrom::Live);
    pair.server.publish(S, "agent-1", b"1");
    pair.drive();
    pair.refuse_connections = true;
    pair.kick();
    for i in 2..=6 {
        pair.server.publish(S, "agent-1", i.to_string().as_bytes());
    }
    pair.refuse_connections = false;
    assert!(pair.settle_connected(10));
    // History holds 5 and 6 only: 2..=4 are lost, and the caller is told before item 5.
    assert_eq!(seqs(&pair, S), [1, 5, 6]);
    let gap_at = pair.events.iter().position(|event| matches!(event, Event::Gap(_))).expect("a gap event");
    let Event::Gap(gap) = &pair.events[gap_at] else { unreachable!() };
    assert_eq!(gap.cause, GapCause::NotRecovered);
    assert_eq!(gap.last, Some(Position { epoch: 1, seq: 1 }));
    assert_eq!(gap.next, Position { epoch: 1, seq: 5 });
    let fifth_at = pair.events.iter().position(|event| matches!(event, Event::Delivery(d) if d.seq == 5)).unwrap();
    assert!(gap_at < fifth_at);
    assert_eq!(pair.client.stats().gaps, 1);
}

#[test]
fn an_epoch_change_surfaces_a_gap() {
    let mut pair = connected_pair(FakeServerConfig::default());
    subscribe(&mut pair, S, ResumeFrom::Live);
    pair.server.publish(S, "agent-1", b"old");
    pair.drive();
    pair.refuse_connections = true;
    pair.kick();
    pair.server.restart_session(S);
    pair.server.publish(S, "agent-1", b"new");
    pair.refuse_connections = false;
    assert!(pair.settle_connected(10));
    let gap = pair.events.iter().find_map(|event| match event {
        Event::Gap(gap) => Some(gap.clone()),
        _ => None,
    });
    let gap = gap.expect("a gap event");
    assert_eq!(gap.cause, GapCause::EpochChanged);
    assert_eq!(gap.last.map(|last| last.seq), Some(1));
    let delivered: Vec<(u64, u64)> = pair.deliveries(S).iter().map(|d| (d.epoch, d.seq)).collect();
    assert_eq!(delivered, [(1, 1), (gap.next.epoch, 1)]);
}

#[test]
fn subscribing_after_a_position_the_server_cannot_reach_reports_it() {
    let server = FakeServerConfig { history_messages_max: 1, ..FakeServerConfig::default() };
    let mut pair = connected_pair(server);
    for i in 0..4 {
        pair.server.publish(S, "agent-1", i.to_string().as_bytes());
    }
    let epoch = pair.server.history(S)[0].epoch;
    let request = subscribe(&mut pair, S, ResumeFrom::After { epoch, seq: 1 });
    assert!(pair.events.iter().any(|event| matches!(
        event,
        Event::Subscribed { request: r, info: Subscribed { recovered: false, .. } } if *r == request
    )));
    assert!(pair.events.iter().any(|event| matches!(event, Event::Gap(gap) if gap.cause == GapCause::NotRecovered)));
    assert_eq!(seqs(&pair, S), [4]);
}

#[test]
fn unacknowledged_publish_is_resent_with_the_same_client_msg_id() {
    // The connection is cut in the middle of the PUBACK (frame 2 after WELCOME).
    let server = FakeServerConfig { disconnect_after_frames: Some(1), disconnects_max: 1, ..FakeServerConfig::default() };
    let mut pair = Pair::new(server, client_config());
    pair.drive();
    let now = pair.now;
    let request = pair.client.publish(now, publish(S, "exactly once")).unwrap();
    pair.drive();
    assert_eq!(pair.server.history(S).len(), 1, "the server stored it before the cut");
    assert!(!pair.events.iter().any(|event| matches!(event, Event::PubAck { .. })));
    assert!(pair.settle_connected(10));
    let ack = pair.events.iter().find_map(|event| match event {
        Event::PubAck { request: r, ack } if *r == request => Some(ack.clone()),
        _ => None,
    });
    let ack = ack.expect("acknowledged after the reconnect");
    assert!(ack.duplicate);
    assert_eq!(ack.seq, 1);
    assert_eq!(pair.server.history(S).len(), 1);
    assert_eq!(pair.server.stats().duplicate_publishes, 1);
    assert_eq!(pair.client.stats().publishes_resent, 1);
    assert_eq!(pair.client.publishes_inflight(), 0);
}

#[test]
fn inflight_publishes_are_bounded() {
    let config = ClientConfig { inflight_publishes_max: 2, ..client_config() };
    let mut pair = Pair::new(FakeServerConfig::default(), config);
    pair.refuse_connections = true;
    let now = pair.now;
    pair.client.publish(now, publish(S, "1")).unwrap();
    pair.client.publish(now, publish(S, "2")).unwrap();
    assert_eq!(pair.client.publish(now, publish(S, "3")), Err(ClientError::InflightFull { max: 2 }));
}

#[test]
fn payload_over_the_server_limit_is_refused_locally() {
    let mut server = FakeServerConfig::default();
    server.limits.payload_bytes_max = 4;
    let mut pair = connected_pair(server);
    let now = pair.now;
    assert!(matches!(pair.client.publish(now, publish(S, "too long")), Err(ClientError::LimitExceeded { .. })));
    assert!(matches!(
        pair.client.subscribe(now, Text::from("x".repeat(200)), ResumeFrom::Live),
        Err(ClientError::InvalidRequest(_))
    ));
}

#[test]
fn keepalive_pings_when_idle_and_the_server_answers() {
    let mut pair = connected_pair(FakeServerConfig::default());
    let keepalive = pair.client.config().keepalive;
    for _ in 0..5 {
        pair.advance(keepalive);
    }
    assert_eq!(pair.client.stats().pings_sent, 5);
    assert_eq!(pair.client.state(), ConnectionState::Established);
    assert_eq!(pair.client.stats().disconnects, 0);
}

#[test]
fn silence_past_the_idle_timeout_disconnects_and_reconnects() {
    let server = FakeServerConfig { answer_pings: false, ..FakeServerConfig::default() };
    let mut pair = connected_pair(server);
    let keepalive = pair.client.config().keepalive;
    pair.advance(keepalive);
    assert_eq!(pair.client.state(), ConnectionState::Established);
    pair.advance(keepalive);
    assert!(pair.events.iter().any(|event| matches!(
        event,
        Event::Disconnected { reason: DisconnectReason::KeepaliveTimeout, reconnect_at: Some(_) }
    )));
    pair.server.config_mut().answer_pings = true;
    assert!(pair.settle_connected(10));
}

#[test]
fn paused_reading_suspends_the_idle_timeout() {
    let server = FakeServerConfig { answer_pings: false, ..FakeServerConfig::default() };
    let mut pair = connected_pair(server);
    let keepalive = pair.client.config().keepalive;
    pair.client.set_receive_paused(pair.now, true);
    for _ in 0..10 {
        pair.advance(keepalive);
    }
    assert_eq!(pair.client.state(), ConnectionState::Established);
    pair.client.set_receive_paused(pair.now, false);
    pair.advance(keepalive);
    assert_eq!(pair.client.state(), ConnectionState::Established, "the idle window restarts on resume");
    pair.advance(keepalive);
    assert!(matches!(pair.client.state(), ConnectionState::Reconnecting { .. }));
}

#[test]
fn welcome_can_shorten_the_keepalive() {
    let mut server = FakeServerConfig::default();
    server.limits.keepalive_ms = 2_000;
    let mut pair = connected_pair(server);
    pair.advance(Duration::from_secs(1));
    assert_eq!(pair.client.stats().pings_sent, 1);
}

#[test]
fn backoff_grows_and_is_capped() {
    let policy = ReconnectPolicy { initial: Duration::from_millis(100), max: Duration::from_secs(1), attempts_max: None };
    let config = ClientConfig { reconnect: policy, retry_initial_connect: true, ..client_config() };
    let mut pair = Pair::new(FakeServerConfig::default(), config);
    pair.refuse_connections = true;
    pair.drive();
    let mut delays = Vec::new();
    for _ in 0..12 {
        let Some(at) = pair.client.poll_timeout() else { panic!("no reconnect timer") };
        delays.push(at - pair.now);
        assert!(pair.advance_to_timeout());
    }
    for (attempt, delay) in delays.iter().enumerate() {
        let base = (policy.initial * (1 << attempt.min(20))).min(policy.max);
        assert!(*delay >= base / 2 && *delay <= base, "attempt {attempt}: {delay:?} not in [{:?}, {base:?}]", base / 2);
    }
    assert!(delays.iter().all(|delay| *delay <= policy.max));
    assert!(delays[8..].iter().all(|delay| *delay >= policy.max / 2), "capped delays stay near the cap");
    // Jitter is deterministic per seed.
    assert_eq!(policy.delay(3, 12_345), policy.delay(3, 12_345));
}

#[test]
fn reconnecting_gives_up_after_attempts_max() {
    let policy = ReconnectPolicy { initial: Duration::from_millis(10), max: Duration::from_millis(10), attempts_max: Some(3) };
    let config = ClientConfig { reconnect: policy, ..client_config() };
    let mut pair = connected_pair_with(config);
    let now = pair.now;
    let request = pair.client.publish(now, publish(S, "x")).unwrap();
    pair.refuse_connections = true;
    pair.kick();
    while pair.advance_to_timeout() {}
    assert!(pair.client.is_closed());
    let closing = pair.events.iter().find_map(|event| match event {
        Event::Disconnected { reason, reconnect_at: None } => Some(reason.clone()),
        _ => None,
    });
    assert!(matches!(closing, Some(DisconnectReason::GaveUp { attempts: 3, .. })), "{closing:?}");
    assert!(pair
        .events
        .iter()
        .any(|event| matches!(event, Event::RequestFailed { request: r, error: ClientError::ConnectionLost } if *r == request)));
    assert_eq!(pair.client.poll_action(), None);
}

fn connected_pair_with(config: ClientConfig) -> Pair {
    let mut pair = Pair::new(FakeServerConfig::default(), config);
    pair.drive();
    assert_eq!(pair.client.state(), ConnectionState::Established);
    pair
}

#[test]
fn the_first_connect_failure_is_terminal_unless_asked_to_retry() {
    let mut pair = Pair::new(FakeServerConfig::default(), client_config());
    pair.refuse_connections = true;
    pair.drive();
    assert!(pair.client.is_closed());
    assert!(matches!(
        pair.events.last(),
        Some(Event::Disconnected { reason: DisconnectReason::ConnectFailed, reconnect_at: None })
    ));
}

#[test]
fn goaway_maps_to_a_typed_reason_and_honours_the_delay() {
    let mut pair = connected_pair(FakeServerConfig::default());
    subscribe(&mut pair, S, ResumeFrom::Live);
    pair.server.publish(S, "agent-1", b"1");
    pair.drive();
    let conn = pair.conn.unwrap();
    pair.server.goaway(conn, GoAwayReason::SlowConsumer, 2_000);
    let before = pair.now;
    pair.server.publish(S, "agent-1", b"2");
    pair.drive();
    assert!(pair.events.iter().any(|event| matches!(event, Event::GoAway(goaway) if goaway.reason == GoAwayReason::SlowConsumer)));
    let reconnect_at = pair.events.iter().find_map(|event| match event {
        Event::Disconnected { reason: DisconnectReason::GoAway { reason: GoAwayReason::SlowConsumer, .. }, reconnect_at } => {
            *reconnect_at
        }
        _ => None,
    });
    assert!(reconnect_at.expect("reconnects") >= before + Duration::from_secs(2));
    assert_eq!(
        DisconnectReason::GoAway { reason: GoAwayReason::SlowConsumer, message: Text::new() }.to_error(),
        ClientError::SlowConsumer
    );
    assert!(pair.settle_connected(10));
    assert_eq!(seqs(&pair, S), [1, 2]);
}

#[test]
fn shutdown_goaway_reconnects() {
    let mut pair = connected_pair(FakeServerConfig::default());
    let conn = pair.conn.unwrap();
    pair.server.goaway(conn, GoAwayReason::Shutdown, 0);
    pair.drive();
    assert!(matches!(pair.client.state(), ConnectionState::Reconnecting { .. }));
    assert!(pair.settle_connected(10));
}

#[test]
fn auth_failure_is_terminal() {
    let server = FakeServerConfig { token: Some("secret".into()), ..FakeServerConfig::default() };
    let config = ClientConfig { token: Text::from("wrong"), retry_initial_connect: true, ..client_config() };
    let mut pair = Pair::new(server, config);
    let now = pair.now;
    let request = pair.client.publish(now, publish(S, "x")).unwrap();
    pair.drive();
    assert!(pair.client.is_closed());
    let reason = pair.events.iter().find_map(|event| match event {
        Event::Disconnected { reason, reconnect_at: None } => Some(reason.clone()),
        _ => None,
    });
    let reason = reason.expect("closed for good");
    assert!(matches!(reason, DisconnectReason::ServerError { code: ErrorCode::AuthFailed, .. }));
    assert!(matches!(reason.to_error(), ClientError::AuthRefused { .. }));
    assert!(pair.events.iter().any(|event| matches!(
        event,
        Event::RequestFailed { request: r, error: ClientError::AuthRefused { .. } } if *r == request
    )));
    assert_eq!(pair.server.stats().connections, 1, "no reconnect loop");
    assert!(!pair.advance_to_timeout());
}

#[test]
fn connection_level_error_reconnects_unless_terminal() {
    let mut pair = connected_pair(FakeServerConfig::default());
    let conn = pair.conn.unwrap();
    pair.server.push(conn, 0, &Frame::Error(switchboard_protocol::ErrorFrame { code: 13, message: Text::from("busy") }));
    pair.drive();
    assert!(matches!(pair.client.state(), ConnectionState::Reconnecting { .. }));
    assert!(pair.settle_connected(10));
}

#[test]
fn error_with_a_correlation_fails_that_request_only() {
    let mut pair = connected_pair(FakeServerConfig::default());
    let now = pair.now;
    let create = |expected_version| TicketCommand {
        ticket: Text::from("t-1"),
        op: TicketOp::Create,
        expected_version,
        session: Text::from(S),
        assignee: Text::new(),
        trace_id: 0,
        payload: Bytes::new(),
    };
    let ok = pair.client.ticket_command(now, create(0)).unwrap();
    let conflict = pair.client.ticket_command(now, create(0)).unwrap();
    pair.drive();
    assert!(pair.events.iter().any(|event| matches!(
        event,
        Event::Response { request, frame: Frame::TicketEvent(ticket) } if *request == ok && ticket.version == 1
    )));
    assert!(pair.events.iter().any(|event| matches!(
        event,
        Event::RequestFailed { request, error: ClientError::Server { code: ErrorCode::Conflict, .. } } if *request == conflict
    )));
    assert_eq!(pair.client.state(), ConnectionState::Established);
}

#[test]
fn non_idempotent_requests_fail_when_the_connection_drops_before_the_answer() {
    let server = FakeServerConfig { disconnect_after_frames: Some(1), disconnects_max: 1, ..FakeServerConfig::default() };
    let mut pair = Pair::new(server, client_config());
    pair.drive();
    let now = pair.now;
    let open = OpenConversation {
        session: Text::from(S),
        customer: Text::from("customer-1"),
        priority: 1,
        skills: vec![],
        context: Bytes::new(),
    };
    let request = pair.client.open_conversation(now, open).unwrap();
    pair.drive();
    assert!(pair.events.iter().any(|event| matches!(
        event,
        Event::RequestFailed { request: r, error: ClientError::ConnectionLost } if *r == request
    )));
}

#[test]
fn requests_time_out() {
    let config = ClientConfig { retry_initial_connect: true, ..client_config() };
    let mut pair = Pair::new(FakeServerConfig::default(), config);
    pair.refuse_connections = true;
    let now = pair.now;
    let request = pair.client.publish(now, publish(S, "x")).unwrap();
    pair.drive();
    pair.advance(pair.client.config().request_timeout);
    assert!(pair.events.iter().any(|event| matches!(
        event,
        Event::RequestFailed { request: r, error: ClientError::Timeout } if *r == request
    )));
    assert_eq!(pair.client.publishes_inflight(), 0);
    pair.refuse_connections = false;
    assert!(pair.settle_connected(100));
    assert!(pair.server.history(S).is_empty(), "a timed-out publish is not re-sent");
}

#[test]
fn unsubscribe_stops_items() {
    let mut pair = connected_pair(FakeServerConfig::default());
    subscribe(&mut pair, S, ResumeFrom::Live);
    pair.server.publish(S, "agent-1", b"1");
    pair.drive();
    let now = pair.now;
    let request = pair.client.unsubscribe(now, &Text::from(S)).unwrap();
    pair.server.publish(S, "agent-1", b"2");
    pair.drive();
    assert!(pair.events.iter().any(|event| matches!(event, Event::Unsubscribed { request: r, .. } if *r == request)));
    assert_eq!(seqs(&pair, S), [1]);
    assert_eq!(pair.client.unsubscribe(now, &Text::from(S)), Err(ClientError::NotSubscribed));
    // And it is not resubscribed after a reconnect.
    pair.kick();
    assert!(pair.settle_connected(10));
    pair.server.publish(S, "agent-1", b"3");
    pair.drive();
    assert_eq!(seqs(&pair, S), [1]);
}

#[test]
fn double_subscribe_is_refused() {
    let mut pair = connected_pair(FakeServerConfig::default());
    subscribe(&mut pair, S, ResumeFrom::Live);
    let now = pair.now;
    assert_eq!(pair.client.subscribe(now, Text::from(S), ResumeFrom::Live), Err(ClientError::AlreadySubscribed));
}

#[test]
fn close_fails_what_is_pending() {
    let mut pair = connected_pair(FakeServerConfig::default());
    subscribe(&mut pair, S, ResumeFrom::Live);
    pair.refuse_connections = true;
    pair.kick();
    let now = pair.now;
    let request = pair.client.publish(now, publish(S, "x")).unwrap();
    pair.client.close(now);
    pair.drive();
    assert!(pair.client.is_closed());
    assert!(pair.events.iter().any(|event| matches!(
        event,
        Event::RequestFailed { request: r, error: ClientError::Closed } if *r == request
    )));
    assert!(pair.events.iter().any(|event| matches!(event, Event::SubscriptionFailed { error: ClientError::Closed, .. })));
    assert_eq!(pair.client.publish(now, publish(S, "y")), Err(ClientError::Closed));
}

#[test]
fn frames_cut_at_any_byte_decode_the_same() {
    for chunk_bytes in [1, 2, 3, 7, 16, 17, 64] {
        let mut pair = Pair::new(FakeServerConfig::default(), client_config());
        pair.chunk_bytes = chunk_bytes;
        pair.drive();
        subscribe(&mut pair, S, ResumeFrom::Live);
        for i in 0..4 {
            pair.server.publish(S, "agent-1", format!("message {i}").as_bytes());
        }
        pair.drive();
        assert_eq!(seqs(&pair, S), [1, 2, 3, 4], "chunks of {chunk_bytes}");
    }
}

#[test]
fn garbage_from_the_server_is_a_violation_not_a_panic() {
    let mut pair = connected_pair(FakeServerConfig::default());
    let now = pair.now;
    pair.client.handle_bytes(now, b"HTTP/1.1 400 Bad Request\r\n\r\n");
    pair.drive();
    assert_eq!(pair.client.stats().protocol_violations, 1);
    assert!(matches!(pair.client.state(), ConnectionState::Reconnecting { .. }));
}

#[test]
fn generic_requests_are_answered() {
    let mut pair = connected_pair(FakeServerConfig::default());
    let now = pair.now;
    let ping_request = pair.client.request(now, Frame::Ping(switchboard_protocol::Ping { nonce: 99 })).unwrap();
    assert!(matches!(
        pair.client.request(now, Frame::Success(switchboard_protocol::Success {})),
        Err(ClientError::InvalidRequest(_))
    ));
    pair.drive();
    assert!(pair.events.iter().any(|event| matches!(
        event,
        Event::Response { request, frame: Frame::Pong(pong) } if *request == ping_request && pong.nonce == 99
    )));
}

// ----- property tests ---------------------------------------------------------------------

#[derive(Debug, Clone)]
enum Op {
    /// The client publishes this many messages.
    ClientPublish(u8),
    /// Another participant publishes this many.
    ServerPublish(u8),
    /// The server drops the connection now.
    Kick,
    /// The next connection is cut after this many frames, mid-frame.
    CutAfter(u8),
    /// Virtual time passes.
    Advance(u16),
    /// Server bytes arrive in chunks of this size from now on.
    Chunks(u8),
    /// The server keeps only this many messages (makes gaps possible).
    Truncate(u8),
    /// The server loses the session (new epoch).
    Restart,
}

fn op(lossy: bool) -> impl Strategy<Value = Op> {
    let lossless = prop_oneof![
        4 => (1u8..4).prop_map(Op::ClientPublish),
        4 => (1u8..4).prop_map(Op::ServerPublish),
        2 => Just(Op::Kick),
        2 => (0u8..8).prop_map(Op::CutAfter),
        2 => (0u16..400).prop_map(Op::Advance),
        1 => (1u8..40).prop_map(Op::Chunks),
    ];
    if lossy {
        prop_oneof![8 => lossless, 1 => (0u8..3).prop_map(Op::Truncate), 1 => Just(Op::Restart)].boxed()
    } else {
        lossless.boxed()
    }
}

fn run_ops(ops: &[Op]) -> Pair {
    let config = ClientConfig {
        request_timeout: Duration::from_secs(3600),
        reconnect: ReconnectPolicy { initial: Duration::from_millis(5), max: Duration::from_millis(200), attempts_max: None },
        ..client_config()
    };
    let mut pair = Pair::new(FakeServerConfig::default(), config);
    pair.drive();
    let now = pair.now;
    pair.client.subscribe(now, Text::from(S), ResumeFrom::Live).unwrap();
    pair.drive();
    let mut counter = 0u32;
    for op in ops {
        match *op {
            Op::ClientPublish(count) => {
                for _ in 0..count {
                    counter += 1;
                    let now = pair.now;
                    pair.client.publish(now, publish(S, &format!("c{counter}"))).unwrap();
                }
            }
            Op::ServerPublish(count) => {
                for _ in 0..count {
                    counter += 1;
                    pair.server.publish(S, "agent-1", format!("s{counter}").as_bytes());
                }
            }
            Op::Kick => pair.kick(),
            Op::CutAfter(frames) => {
                let config = pair.server.config_mut();
                config.disconnect_after_frames = Some(usize::from(frames));
                config.disconnects_max += 1;
            }
            Op::Advance(ms) => pair.advance(Duration::from_millis(u64::from(ms))),
            Op::Chunks(bytes) => pair.chunk_bytes = usize::from(bytes),
            Op::Truncate(keep) => pair.server.truncate_history(S, usize::from(keep)),
            Op::Restart => pair.server.restart_session(S),
        }
        pair.drive();
    }
    // Let every cut heal, then one last message proves the stream is live again.
    pair.server.config_mut().disconnects_max = 0;
    assert!(pair.settle_connected(10_000), "client did not reconnect: {:?}", pair.client);
    pair.server.publish(S, "agent-1", b"last");
    // The connection in use may still be one that is cut after N frames: heal again.
    assert!(pair.settle_connected(10_000), "client did not reconnect: {:?}", pair.client);
    pair
}

/// The caller's view of the session: items in order, none twice, every hole announced.
fn check_stream(pair: &Pair) -> Result<(), TestCaseError> {
    let mut last: Option<(u64, u64)> = None;
    let mut gap_announced = false;
    for event in &pair.events {
        match event {
            Event::Gap(gap) if gap.session == S => gap_announced = true,
            Event::Delivery(deliver) if deliver.session == S => {
                let here = (deliver.epoch, deliver.seq);
                if let Some((epoch, seq)) = last {
                    let contiguous = deliver.epoch == epoch && deliver.seq == seq + 1;
                    prop_assert!(
                        contiguous || gap_announced,
                        "{here:?} after {last:?} with no gap announced"
                    );
                    prop_assert!(deliver.epoch != epoch || deliver.seq > seq, "duplicate or reordered: {here:?} after {last:?}");
                }
                last = Some(here);
                gap_announced = false;
            }
            _ => {}
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn disconnects_never_duplicate_reorder_or_lose(ops in proptest::collection::vec(op(false), 1..40)) {
        let pair = run_ops(&ops);
        check_stream(&pair)?;
        // Nothing was lost: the caller saw exactly the server's history, in order.
        let history: Vec<(u64, Bytes)> = pair.server.history(S).into_iter().map(|d| (d.seq, d.payload)).collect();
        let delivered: Vec<(u64, Bytes)> = pair.deliveries(S).into_iter().map(|d| (d.seq, d.payload)).collect();
        prop_assert_eq!(delivered, history);
        // Every publish was stored once and acknowledged once.
        let published = ops.iter().map(|op| match op { Op::ClientPublish(n) => u64::from(*n), _ => 0 }).sum::<u64>();
        let acks = pair.events.iter().filter(|event| matches!(event, Event::PubAck { .. })).count() as u64;
        prop_assert_eq!(acks, published);
        let failures = pair.events.iter().filter(|event| matches!(event, Event::RequestFailed { .. } | Event::Gap(_))).count();
        prop_assert_eq!(failures, 0);
        let server_publishes = ops.iter().map(|op| match op { Op::ServerPublish(n) => u64::from(*n), _ => 0 }).sum::<u64>();
        prop_assert_eq!(pair.server.stats().messages, published + server_publishes + 1);
    }

    #[test]
    fn lost_history_is_always_announced(ops in proptest::collection::vec(op(true), 1..40)) {
        let pair = run_ops(&ops);
        check_stream(&pair)?;
        let last = pair.deliveries(S).last().map(|d| d.payload.clone());
        prop_assert_eq!(last, Some(Bytes::from_static(b"last")));
    }
}

#[test]
fn the_property_harness_exercises_resends_and_gaps() {
    // Guards the properties above against passing vacuously.
    let lossless = run_ops(&[Op::ClientPublish(3), Op::CutAfter(2), Op::Kick, Op::ClientPublish(3), Op::Advance(50)]);
    assert!(lossless.client.stats().disconnects >= 2);
    assert!(lossless.client.stats().publishes_resent >= 1);
    assert_eq!(lossless.deliveries(S).len(), 7);

    let lossy = run_ops(&[Op::ServerPublish(3), Op::Restart, Op::ServerPublish(2), Op::Kick, Op::Advance(50)]);
    assert!(lossy.events.iter().any(|event| matches!(event, Event::Gap(gap) if gap.cause == GapCause::EpochChanged)));
    assert!(check_stream(&lossy).is_ok());
}

#[test]
fn a_seq_zero_notification_passes_even_on_a_followed_session() {
    let mut pair = connected_pair(FakeServerConfig::default());
    subscribe(&mut pair, S, ResumeFrom::Live);
    pair.server.publish(S, "agent-1", b"1");
    pair.drive();
    let notification = switchboard_protocol::ConversationEvent {
        session: Text::from(S),
        epoch: 0,
        seq: 0,
        timestamp_us: 1,
        kind: switchboard_protocol::ConversationEventKind::Offered,
        agent: Text::from("agent-1"),
        queue: Text::new(),
        position: 0,
        estimated_wait_ms: 0,
        group: Text::new(),
        reason: Text::new(),
    };
    let conn = pair.server.connections()[0];
    pair.server.push(conn, 0, &Frame::ConversationEvent(notification.clone()));
    pair.drive();
    pair.server.publish(S, "agent-1", b"2");
    pair.drive();
    assert!(pair.events.iter().any(|event| matches!(event, Event::ConversationEvent(e) if *e == notification)));
    assert_eq!(seqs(&pair, S), [1, 2], "the subscription's order is untouched");
    assert_eq!(pair.client.stats().protocol_violations, 0);
}
