//! Bad input, slow consumers and scale: the connection at fault is closed with a reason, and
//! the shard and every other connection carry on.

mod common;

use common::{start, test_config, Raw};
use switchboard_protocol::{ErrorCode, Frame, GoAwayReason, ResumeFrom, HEADER_BYTES};

fn expect_error_then_close(raw: &mut Raw, code: ErrorCode) {
    let frames = raw.recv_until_closed();
    let error = frames.iter().find_map(|frame| match frame {
        Frame::Error(error) => Some(error.clone()),
        _ => None,
    });
    let error = error.unwrap_or_else(|| panic!("expected ERROR({code:?}) before close, got {frames:?}"));
    assert_eq!(ErrorCode::from_u16(error.code), code, "message: {}", error.message);
    assert!(!error.message.is_empty());
}

/// A healthy subscriber and publisher that must keep working while others misbehave.
fn assert_others_unaffected(addr: std::net::SocketAddr, witness: &mut Raw, session: &str) {
    let mut publisher = Raw::handshake(addr);
    let ack = publisher.publish(session, 0, b"still here");
    let deliver = witness.deliver();
    assert_eq!((deliver.seq, &deliver.payload[..]), (ack.seq, &b"still here"[..]));
}

/// Before WELCOME only a HELLO-sized body is accepted: a header announcing a 100 kB HELLO is
/// refused at once (after WELCOME the same length is fine), so a peer that never
/// authenticates cannot make the engine reserve up to `frame_body_bytes_max` per connection.
#[test]
fn before_welcome_only_a_hello_sized_frame_is_accepted() {
    let engine = start(test_config(1));
    let addr = engine.data_addr();
    let mut raw = Raw::connect(addr);
    let hello = Frame::Hello(switchboard_protocol::Hello { version_max: 1, version_min: 1, features: 0, client_name: "big".into(), token: "t".into() });
    let mut header = hello.to_bytes(1).unwrap().to_vec();
    header[8..12].copy_from_slice(&100_000u32.to_le_bytes());
    raw.send_bytes(&header[..HEADER_BYTES]);
    expect_error_then_close(&mut raw, ErrorCode::FrameTooLarge);
    // After WELCOME a 100 kB frame is within the limits (its payload is then judged).
    let mut raw = Raw::handshake(addr);
    raw.refused(&Raw::publish_frame("x", "a", 0, &vec![0u8; 100_000]), ErrorCode::LimitExceeded);
    assert_eq!(raw.publish("x", 0, b"fine").seq, 1, "the connection is still usable");
    engine.shutdown();
}

/// A PUBLISH with no session or too large a payload is answered with ERROR and nothing else
/// happens: the same answer whether its session would live on this shard (where a PUBLISH is
/// handled in place) or on another, and the connection goes on publishing.
#[test]
fn faulty_publishes_are_refused_alike_on_every_shard_and_the_connection_carries_on() {
    for shards in [1, 3] {
        let mut config = test_config(shards);
        config.limits.payload_bytes_max = 1024;
        let engine = start(config);
        let mut raw = Raw::handshake(engine.data_addr());
        for session in ["s0", "s1", "s2", "s3", "s4", "s5"] {
            raw.refused(&Raw::publish_frame(session, "a", 0, &[7u8; 1025]), ErrorCode::LimitExceeded);
            raw.refused(&Raw::publish_frame("", "a", 0, b"x"), ErrorCode::BadRequest);
            let ack = raw.publish(session, 0, &[7u8; 1024]);
            assert_eq!(ack.seq, 1, "{shards} shards, {session}: only the valid publish got a seq");
        }
        engine.shutdown();
    }
}

#[test]
fn malformed_truncated_oversize_and_out_of_order_frames_close_only_their_connection() {
    for shards in [1, 3] {
        let mut config = test_config(shards);
        config.limits.frame_body_bytes_max = 4096;
        config.limits.payload_bytes_max = 1024;
        let engine = start(config);
        let addr = engine.data_addr();
        let mut witness = Raw::handshake(addr);
        witness.subscribe("witness", ResumeFrom::Live);

        // Garbage before any handshake: bad magic.
        let mut raw = Raw::connect(addr);
        raw.send_bytes(b"GET / HTTP/1.1\r\n\r\n");
        expect_error_then_close(&mut raw, ErrorCode::Malformed);

        // A frame other than HELLO first.
        let mut raw = Raw::connect(addr);
        raw.send(&Raw::publish_frame("x", "a", 0, b"p"));
        expect_error_then_close(&mut raw, ErrorCode::HandshakeRequired);

        // Oversize: refused from the header, before the body is sent.
        let mut raw = Raw::handshake(addr);
        let mut header = Raw::publish_frame("x", "a", 0, b"p").to_bytes(9).unwrap().to_vec();
        header[8..12].copy_from_slice(&100_000u32.to_le_bytes());
        raw.send_bytes(&header[..HEADER_BYTES]);
        expect_error_then_close(&mut raw, ErrorCode::FrameTooLarge);

        // Lengths that lie: the body says 3 bytes, the session id inside claims 200.
        let mut raw = Raw::handshake(addr);
        let mut bytes = Frame::Unsubscribe(switchboard_protocol::Unsubscribe { session: "abc".into() }).to_bytes(5).unwrap().to_vec();
        bytes[HEADER_BYTES] = 200;
        raw.send_bytes(&bytes);
        expect_error_then_close(&mut raw, ErrorCode::Malformed);

        // Unknown frame type.
        let mut raw = Raw::handshake(addr);
        let mut bytes = Frame::Ping(switchboard_protocol::Ping { nonce: 1 }).to_bytes(5).unwrap().to_vec();
        bytes[3] = 0x7f;
        raw.send_bytes(&bytes);
        expect_error_then_close(&mut raw, ErrorCode::UnknownFrameType);

        // Invalid UTF-8 in an id.
        let mut raw = Raw::handshake(addr);
        let mut bytes = Frame::Unsubscribe(switchboard_protocol::Unsubscribe { session: "ab".into() }).to_bytes(5).unwrap().to_vec();
        bytes[HEADER_BYTES + 1] = 0xff;
        raw.send_bytes(&bytes);
        expect_error_then_close(&mut raw, ErrorCode::Malformed);

        // A server-only frame from a client.
        let mut raw = Raw::handshake(addr);
        raw.send(&Frame::Success(switchboard_protocol::Success {}));
        expect_error_then_close(&mut raw, ErrorCode::Malformed);

        // A truncated frame followed by EOF: the connection just goes away, nothing else breaks.
        let mut raw = Raw::handshake(addr);
        let bytes = Raw::publish_frame("x", "a", 0, b"payload").to_bytes(5).unwrap();
        raw.send_bytes(&bytes[..bytes.len() - 3]);
        raw.stream.shutdown(std::net::Shutdown::Write).unwrap();
        assert!(raw.recv_until_closed().is_empty());

        // Request-level errors keep the connection: a payload over the limit.
        let mut raw = Raw::handshake(addr);
        let correlation = raw.send(&Raw::publish_frame("x", "a", 0, &[0u8; 2000]));
        let reply = raw.recv();
        assert_eq!(reply.correlation, correlation);
        assert!(matches!(reply.frame, Frame::Error(ref e) if ErrorCode::from_u16(e.code) == ErrorCode::LimitExceeded));
        assert_eq!(raw.publish("x", 0, b"fine").seq, 1, "the connection is still usable");

        assert_others_unaffected(addr, &mut witness, "witness");
        let (_, metrics) = common::http_get(engine.control_addr(), "/metrics");
        assert!(common::metric_sum(&metrics, "switchboard_protocol_errors_total") >= 7, "{metrics}");
        engine.shutdown();
    }
}

#[test]
fn slow_consumer_is_disconnected_while_a_fast_one_gets_everything() {
    for shards in [1, 2] {
        let mut config = test_config(shards);
        config.limits.outbound_bytes_max = 2 << 20;
        config.limits.outbound_frames_max = 10_000;
        config.limits.frame_body_bytes_max = 16 << 10;
        config.limits.payload_bytes_max = 4096;
        // A full replay must fit the outbound limit (the config refuses otherwise).
        let history = 400u64;
        config.limits.history_messages_max = history as u32;
        // The slow reader only starts reading after the publisher is done; give it time to
        // find the GOAWAY before the engine cuts the socket.
        config.limits.slow_consumer_close_ms = 60_000;
        let engine = start(config);
        let addr = engine.data_addr();

        let mut slow = Raw::handshake(addr);
        slow.subscribe("busy", ResumeFrom::Live);
        let mut fast = Raw::handshake(addr);
        fast.subscribe("busy", ResumeFrom::Live);
        let mut publisher = Raw::handshake(addr);

        // More than the kernel can buffer for the slow socket (autotuned send and receive
        // buffers, several MiB each) plus the outbound limit, so the limit must trip.
        let total = 6000u64;
        let payload = vec![7u8; 4000];
        // Pipeline the publishes, and read the fast subscriber concurrently; it reports its
        // progress so the publisher never runs more than two windows ahead of it (on a loaded
        // machine a reader thread can be descheduled long enough to fall megabytes behind).
        let (progress_tx, progress) = std::sync::mpsc::channel::<u64>();
        let fast_reader = std::thread::spawn(move || {
            let mut last = 0;
            while last < total {
                let frame = fast.recv().frame;
                let Frame::Deliver(deliver) = frame else { panic!("fast subscriber after seq {last}: {frame:?}") };
                assert_eq!(deliver.seq, last + 1, "the fast subscriber sees every message in order");
                last = deliver.seq;
                let _ = progress_tx.send(last);
            }
            fast
        });
        // Publish in windows of 32, waiting for the PUBACKs: a rate any reader that reads can
        // follow, while the slow one (which reads nothing) falls ever further behind.
        let mut fast_seen = 0;
        for window in (0..total).collect::<Vec<_>>().chunks(32) {
            while fast_seen + 64 < window[0] {
                fast_seen = progress.recv_timeout(common::EXPECT_TIMEOUT).expect("the fast subscriber keeps up");
            }
            for n in window {
                publisher.send(&Raw::publish_frame("busy", "alice", n + 1, &payload));
            }
            for _ in window {
                assert!(matches!(publisher.recv().frame, Frame::PubAck(_)));
            }
        }
        let _fast = fast_reader.join().expect("fast subscriber thread");

        // The slow one now reads: some deliveries, then GOAWAY(slow consumer), then EOF.
        let frames = slow.recv_until_closed();
        let delivered = frames.iter().filter(|f| matches!(f, Frame::Deliver(_))).count() as u64;
        assert!(delivered < total, "the slow consumer was cut off before the end");
        match frames.last() {
            Some(Frame::GoAway(goaway)) => assert_eq!(goaway.reason, GoAwayReason::SlowConsumer),
            other => panic!("expected GOAWAY(slow consumer) last, got {other:?}"),
        }
        // It resumes from its last seq and loses nothing still in history: the replay starts
        // right after its last seq if history reaches back that far, else at the oldest kept
        // message, and then says so (recovered = false).
        let last_seq = frames.iter().filter_map(|f| if let Frame::Deliver(d) = f { Some(d.seq) } else { None }).max().unwrap_or(0);
        let epoch = frames.iter().find_map(|f| if let Frame::Deliver(d) = f { Some(d.epoch) } else { None }).unwrap_or(0);
        let oldest = total - history + 1;
        let mut resumed = Raw::handshake(addr);
        let subscribed = resumed.subscribe("busy", ResumeFrom::After { epoch, seq: last_seq });
        assert_eq!(subscribed.recovered, last_seq + 1 >= oldest);
        assert_eq!(subscribed.replay_from_seq, (last_seq + 1).max(oldest));
        for seq in subscribed.replay_from_seq..=total {
            assert_eq!(resumed.deliver().seq, seq);
        }
        let (_, metrics) = common::http_get(engine.control_addr(), "/metrics");
        assert!(common::metric_sum(&metrics, "switchboard_slow_consumer_disconnects_total") >= 1);
        engine.shutdown();
    }
}

#[test]
fn a_hundred_thousand_sessions_on_one_engine() {
    let engine = start(test_config(2));
    let addr = engine.data_addr();
    let sessions = 100_000usize;
    let gateways = 4;
    let mut subscribers: Vec<Raw> = (0..gateways).map(|_| Raw::handshake(addr)).collect();
    // Pipelined SUBSCRIBEs, each session on one gateway.
    for (index, subscriber) in subscribers.iter_mut().enumerate() {
        let mut batch = bytes::BytesMut::new();
        for session in (index..sessions).step_by(gateways) {
            Frame::Subscribe(switchboard_protocol::Subscribe { session: format!("s{session}").into(), from: ResumeFrom::Live })
                .encode(session as u32 + 1, &mut batch)
                .unwrap();
        }
        subscriber.send_bytes(&batch);
    }
    for (index, subscriber) in subscribers.iter_mut().enumerate() {
        for _ in (index..sessions).step_by(gateways) {
            assert!(matches!(subscriber.recv().frame, Frame::Subscribed(_)));
        }
    }
    let (_, metrics) = common::http_get(engine.control_addr(), "/metrics");
    assert_eq!(common::metric_sum(&metrics, "switchboard_sessions"), sessions as u64);
    // A message to a sample of sessions reaches the right gateway.
    let mut publisher = Raw::handshake(addr);
    for session in (0..sessions).step_by(9973) {
        publisher.publish(&format!("s{session}"), 0, b"hi");
        let deliver = subscribers[session % gateways].deliver();
        assert_eq!(deliver.session.as_str(), format!("s{session}"));
    }
    engine.shutdown();
}
