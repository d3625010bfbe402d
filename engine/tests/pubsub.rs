//! Publish, fan-out, order, resume and idempotency through the real engine, with 1 shard and
//! with more shards than cores (sessions then live on shards other than the connections').

mod common;

use common::{start, test_config, Raw};
use switchboard_protocol::{Frame, ResumeFrom};

/// How far a DELIVER timestamp may sit outside the test's own clock readings, in µs.
const TIMESTAMP_SLACK_US: u64 = 100_000;

fn wall_clock_us() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_micros() as u64
}

/// Three subscribers on three connections (the kernel spreads them over shards) see every
/// message of every session, in the same order, with consecutive seqs.
fn fan_out_in_order(shards: usize) {
    let engine = start(test_config(shards));
    let addr = engine.data_addr();
    let sessions: Vec<String> = (0..12).map(|i| format!("conv-{i}")).collect();
    let mut subscribers: Vec<Raw> = (0..3).map(|_| Raw::handshake(addr)).collect();
    for subscriber in &mut subscribers {
        for session in &sessions {
            let subscribed = subscriber.subscribe(session, ResumeFrom::Live);
            assert!(subscribed.recovered);
            assert_eq!(subscribed.head_seq, 0);
        }
    }
    let mut publisher = Raw::handshake(addr);
    let per_session = 50u64;
    let published_from_us = wall_clock_us();
    for round in 0..per_session {
        for session in &sessions {
            let ack = publisher.publish(session, 0, format!("{session}/{round}").as_bytes());
            assert_eq!(ack.seq, round + 1, "seqs are consecutive per session");
            assert!(!ack.duplicate);
        }
    }
    for subscriber in &mut subscribers {
        let mut next_seq = vec![1u64; sessions.len()];
        for _ in 0..per_session * sessions.len() as u64 {
            let deliver = subscriber.deliver();
            let index = sessions.iter().position(|s| *s == deliver.session.as_str()).expect("a subscribed session");
            assert_eq!(deliver.seq, next_seq[index], "per-session order, no gap, no duplicate");
            assert_eq!(&deliver.payload[..], format!("{}/{}", deliver.session, deliver.seq - 1).as_bytes());
            // The owner stamps wall-clock time (counted on from the TSC between readings of the
            // system clock): it lies between the first publish and now, give or take a little.
            let now_us = wall_clock_us();
            assert!(
                (published_from_us - TIMESTAMP_SLACK_US..=now_us + TIMESTAMP_SLACK_US).contains(&deliver.timestamp_us),
                "timestamp {} outside [{published_from_us}, {now_us}]",
                deliver.timestamp_us
            );
            next_seq[index] += 1;
        }
    }
    engine.shutdown();
}

#[test]
fn fan_out_in_order_one_shard() {
    fan_out_in_order(1);
}

#[test]
fn fan_out_in_order_four_shards() {
    fan_out_in_order(4);
}

fn resume(shards: usize) {
    let mut config = test_config(shards);
    config.limits.history_messages_max = 16;
    let engine = start(config);
    let addr = engine.data_addr();
    let mut publisher = Raw::handshake(addr);
    let mut subscriber = Raw::handshake(addr);
    subscriber.subscribe("conv", ResumeFrom::Live);
    let mut epoch = 0;
    for n in 1..=5u64 {
        epoch = publisher.publish("conv", 0, &n.to_le_bytes()).epoch;
        assert_eq!(subscriber.deliver().seq, n);
    }
    drop(subscriber);
    for n in 6..=12u64 {
        publisher.publish("conv", 0, &n.to_le_bytes());
    }
    // Resume inside history: replay 6..=12, then live, no gap, no duplicate.
    let mut subscriber = Raw::handshake(addr);
    let subscribed = subscriber.subscribe("conv", ResumeFrom::After { epoch, seq: 5 });
    assert!(subscribed.recovered);
    assert_eq!((subscribed.replay_from_seq, subscribed.head_seq), (6, 12));
    for n in 6..=12u64 {
        let deliver = subscriber.deliver();
        assert_eq!((deliver.seq, &deliver.payload[..]), (n, &n.to_le_bytes()[..]));
    }
    publisher.publish("conv", 0, b"live");
    assert_eq!(subscriber.deliver().seq, 13);

    // Past history (16 kept, 40 more published): recovered = false, and what is left replays.
    for n in 14..=53u64 {
        publisher.publish("conv", 0, &n.to_le_bytes());
    }
    let mut late = Raw::handshake(addr);
    let subscribed = late.subscribe("conv", ResumeFrom::After { epoch, seq: 13 });
    assert!(!subscribed.recovered, "a gap that history no longer covers must be reported");
    assert_eq!(subscribed.replay_from_seq, 53 - 16 + 1);
    assert_eq!(late.deliver().seq, 38);

    // Another epoch (e.g. a restart without journal): recovered = false too.
    let mut stranger = Raw::handshake(addr);
    assert!(!stranger.subscribe("conv", ResumeFrom::After { epoch: epoch ^ 2, seq: 50 }).recovered);
    engine.shutdown();
}

#[test]
fn resume_one_shard() {
    resume(1);
}

#[test]
fn resume_three_shards() {
    resume(3);
}

#[test]
fn duplicate_client_message_id_is_acknowledged_once_and_delivered_once() {
    let engine = start(test_config(2));
    let addr = engine.data_addr();
    let mut subscriber = Raw::handshake(addr);
    subscriber.subscribe("conv", ResumeFrom::Live);
    let mut publisher = Raw::handshake(addr);
    let first = publisher.publish("conv", 77, b"hello");
    let again = publisher.publish("conv", 77, b"hello");
    assert_eq!((first.seq, first.duplicate), (1, false));
    assert_eq!((again.seq, again.duplicate), (1, true));
    let next = publisher.publish("conv", 78, b"world");
    assert_eq!(next.seq, 2);
    assert_eq!(subscriber.deliver().seq, 1);
    let deliver = subscriber.deliver();
    assert_eq!((deliver.seq, &deliver.payload[..]), (2, &b"world"[..]), "the duplicate was not delivered");
    engine.shutdown();
}

#[test]
fn unsubscribe_stops_delivery_and_unknown_unsubscribe_is_an_error() {
    let engine = start(test_config(3));
    let addr = engine.data_addr();
    let mut subscriber = Raw::handshake(addr);
    subscriber.subscribe("a", ResumeFrom::Live);
    subscriber.subscribe("b", ResumeFrom::Live);
    let correlation = subscriber.send(&Frame::Unsubscribe(switchboard_protocol::Unsubscribe { session: "a".into() }));
    let reply = subscriber.recv();
    assert_eq!((reply.correlation, matches!(reply.frame, Frame::Success(_))), (correlation, true));
    let correlation = subscriber.send(&Frame::Unsubscribe(switchboard_protocol::Unsubscribe { session: "zzz".into() }));
    let reply = subscriber.recv();
    assert_eq!(reply.correlation, correlation);
    assert!(matches!(reply.frame, Frame::Error(ref e) if e.code == switchboard_protocol::ErrorCode::NotFound.as_u16()));
    let mut publisher = Raw::handshake(addr);
    publisher.publish("a", 0, b"not for you");
    publisher.publish("b", 0, b"for you");
    let deliver = subscriber.deliver();
    assert_eq!(deliver.session.as_str(), "b");
    engine.shutdown();
}

/// SUBSCRIBE, UNSUBSCRIBE and SUBSCRIBE again in one write, before the first answer can come
/// back from an owner on another shard: each answer is received, and every later message is
/// delivered once, not once per answer.
#[test]
fn resubscribing_before_the_answer_delivers_each_message_once() {
    let engine = start(test_config(3));
    let addr = engine.data_addr();
    let mut subscriber = Raw::handshake(addr);
    // Eight sessions spread over the three owners: whichever shard took the connection, most
    // of them are owned elsewhere, so their answers cross the mesh.
    let sessions: Vec<String> = (0..8).map(|i| format!("resub-{i}")).collect();
    let mut expected = Vec::new();
    for session in &sessions {
        let subscribe = Frame::Subscribe(switchboard_protocol::Subscribe { session: session.as_str().into(), from: ResumeFrom::Live });
        let unsubscribe = Frame::Unsubscribe(switchboard_protocol::Unsubscribe { session: session.as_str().into() });
        let mut bytes = Vec::new();
        for (correlation, frame) in [(1000, &subscribe), (1001, &unsubscribe), (1002, &subscribe)] {
            bytes.extend_from_slice(&frame.to_bytes(correlation).unwrap());
        }
        subscriber.send_bytes(&bytes);
        expected.extend([1000, 1001, 1002]);
    }
    let mut answered: Vec<u32> = (0..expected.len()).map(|_| subscriber.recv().correlation).collect();
    answered.sort_unstable();
    expected.sort_unstable();
    assert_eq!(answered, expected, "every SUBSCRIBE and UNSUBSCRIBE is answered once");
    let mut publisher = Raw::handshake(addr);
    // Each session gets its message and then a marker. Order holds per session only (the
    // owners are different shards), so a session's copies of "once" all arrive before its
    // first marker, and every session's marker must be seen before the count is final.
    for session in &sessions {
        publisher.publish(session, 0, b"once");
        publisher.publish(session, 0, b"marker");
    }
    let mut seen: Vec<String> = Vec::new();
    let mut marked = std::collections::HashSet::new();
    while marked.len() < sessions.len() {
        let deliver = subscriber.deliver();
        if &deliver.payload[..] == b"marker" {
            marked.insert(deliver.session.as_str().to_string());
        } else {
            seen.push(deliver.session.as_str().to_string());
        }
    }
    seen.sort();
    let mut want = sessions.clone();
    want.sort();
    assert_eq!(seen, want, "each session's message exactly once");
    engine.shutdown();
}

/// A SUBSCRIBE the owner refuses (its session limit) leaves nothing behind: the same
/// SUBSCRIBE succeeds once there is room.
#[test]
fn a_refused_subscribe_can_be_retried() {
    let mut config = test_config(1);
    config.limits.sessions_per_shard_max = 1;
    let engine = start(config);
    let addr = engine.data_addr();
    let mut client = Raw::handshake(addr);
    client.subscribe("first", ResumeFrom::Live);
    let second = Frame::Subscribe(switchboard_protocol::Subscribe { session: "second".into(), from: ResumeFrom::Live });
    client.refused(&second, switchboard_protocol::ErrorCode::LimitExceeded);
    // The same request again is refused for the same reason, not as "already subscribed".
    client.refused(&second, switchboard_protocol::ErrorCode::LimitExceeded);
    engine.shutdown();
}

/// One connection streaming 100 000 publishes without pause while its acknowledgements stream
/// back: every one is acknowledged, in order (the sender task is woken far more often than a
/// glommio task's 16-bit waker count; see `UringSender::run` for the abort that once caused).
#[test]
fn one_connection_gets_a_hundred_thousand_acks_in_order() {
    let engine = start(test_config(1));
    let mut publisher = Raw::handshake(engine.data_addr());
    const TOTAL: u64 = 100_000;
    let frame = Raw::publish_frame("conv", "me", 0, b"x").to_bytes(0).unwrap();
    let mut writer = publisher.stream.try_clone().unwrap();
    let sending = std::thread::spawn(move || {
        use std::io::Write;
        let batch: Vec<u8> = frame.iter().copied().cycle().take(frame.len() * 1000).collect();
        for _ in 0..TOTAL / 1000 {
            writer.write_all(&batch).unwrap();
        }
    });
    for expected in 1..=TOTAL {
        match publisher.recv().frame {
            Frame::PubAck(ack) => assert_eq!(ack.seq, expected),
            other => panic!("expected PUBACK {expected}, got {other:?}"),
        }
    }
    sending.join().unwrap();
    engine.shutdown();
}

/// A session nobody subscribes to or publishes to is dropped after `session_idle_ms`; coming
/// back to it starts a new epoch, so an old position is not mistaken for a resume.
#[test]
fn an_idle_session_is_dropped_and_comes_back_in_a_new_epoch() {
    let mut config = test_config(2);
    config.limits.session_idle_ms = 100;
    let engine = start(config);
    let mut raw = Raw::handshake(engine.data_addr());
    let first = raw.publish("idle", 0, b"before");
    // A session with a subscriber is never dropped, however long it waits.
    let mut watcher = Raw::handshake(engine.data_addr());
    watcher.subscribe("watched", ResumeFrom::Live);
    let watched = raw.publish("watched", 0, b"kept");
    common::wait_for_metric(engine.control_addr(), "switchboard_sessions_dropped_idle_total", "the idle session was never dropped");
    let resumed = raw.subscribe("idle", ResumeFrom::After { epoch: first.epoch, seq: first.seq });
    assert!(!resumed.recovered, "{resumed:?}");
    assert_ne!(resumed.epoch, first.epoch);
    assert_eq!(resumed.head_seq, 0);
    let kept = raw.subscribe("watched", ResumeFrom::After { epoch: watched.epoch, seq: 0 });
    assert!(kept.recovered && kept.head_seq == 1 && kept.epoch == watched.epoch, "{kept:?}");
    engine.shutdown();
}

/// A read cursor that moves is pushed to subscribers; one that does not is answered OK and not
/// pushed again; a session keeps at most 256 participants' cursors (the next gets
/// ERROR(LimitExceeded)) and the connection carries on.
#[test]
fn read_cursors_are_pushed_when_they_move_and_bounded_per_session() {
    use switchboard_protocol::{ErrorCode, ReadCursor};
    let engine = start(test_config(2));
    let addr = engine.data_addr();
    let mut subscriber = Raw::handshake(addr);
    subscriber.subscribe("cursors", ResumeFrom::Live);
    let mut gateway = Raw::handshake(addr);
    gateway.publish("cursors", 0, b"one");
    assert_eq!(subscriber.deliver().seq, 1);
    let cursor = |gateway: &mut Raw, participant: String| {
        gateway.request(&Frame::ReadCursor(ReadCursor { session: "cursors".into(), participant: participant.as_str().into(), seq: 1 }))
    };
    assert!(matches!(cursor(&mut gateway, "p0".into()), Frame::Success(_)));
    assert!(matches!(subscriber.recv().frame, Frame::ReadCursor(ref c) if c.participant.as_str() == "p0" && c.seq == 1));
    // The same cursor again: OK, and the subscriber's next frame is the next message, not a
    // second push of the cursor.
    assert!(matches!(cursor(&mut gateway, "p0".into()), Frame::Success(_)));
    gateway.publish("cursors", 0, b"two");
    assert_eq!(subscriber.deliver().seq, 2);
    for i in 1..256 {
        assert!(matches!(cursor(&mut gateway, format!("p{i}")), Frame::Success(_)), "cursor {i}");
    }
    let refused = cursor(&mut gateway, "p256".into());
    assert!(matches!(refused, Frame::Error(ref e) if ErrorCode::from_u16(e.code) == ErrorCode::LimitExceeded), "{refused:?}");
    assert_eq!(gateway.publish("cursors", 0, b"three").seq, 3, "the connection carries on");
    engine.shutdown();
}

/// The mesh at its smallest (rings of 2 slots, a backlog of 2, one message drained at a time)
/// with three publishers pipelining into sessions owned by other shards: producers hit full
/// rings and wait for backlogs, and still every publish is acknowledged, every subscriber
/// sees every session's messages once each with consecutive seqs, and nothing deadlocks.
#[test]
fn a_congested_mesh_loses_nothing_and_keeps_each_session_in_order() {
    let mut config = test_config(3);
    config.mesh.ring_slots = 2;
    config.mesh.backlog_messages_max = 2;
    config.mesh.drain_batch_max = 1;
    let engine = start(config);
    let addr = engine.data_addr();
    const PUBLISHERS: usize = 3;
    const PER_PUBLISHER_PER_SESSION: u64 = 100;
    let sessions: Vec<String> = (0..24).map(|i| format!("mesh-{i}")).collect();
    let per_session = PER_PUBLISHER_PER_SESSION * PUBLISHERS as u64;
    let subscribers: Vec<_> = (0..3)
        .map(|_| {
            let mut subscriber = Raw::handshake(addr);
            for session in &sessions {
                subscriber.subscribe(session, ResumeFrom::Live);
            }
            let sessions = sessions.clone();
            // Read while the publishers write, so no subscriber falls behind its outbound limit.
            std::thread::spawn(move || {
                let mut next_seq = vec![1u64; sessions.len()];
                for _ in 0..per_session * sessions.len() as u64 {
                    let deliver = subscriber.deliver();
                    let index = sessions.iter().position(|s| *s == deliver.session.as_str()).expect("a subscribed session");
                    assert_eq!(deliver.seq, next_seq[index], "per-session order, no gap, no duplicate");
                    next_seq[index] += 1;
                }
                next_seq
            })
        })
        .collect();
    let publishers: Vec<_> = (0..PUBLISHERS)
        .map(|p| {
            let mut publisher = Raw::handshake(addr);
            let sessions = sessions.clone();
            std::thread::spawn(move || {
                let mut writer = publisher.stream.try_clone().unwrap();
                let frames: Vec<u8> = (0..PER_PUBLISHER_PER_SESSION)
                    .flat_map(|round| sessions.iter().map(move |s| (round, s)))
                    .flat_map(|(round, session)| Raw::publish_frame(session, "me", 0, format!("{p}/{round}").as_bytes()).to_bytes(0).unwrap())
                    .collect();
                // Everything at once, without waiting for an answer.
                let sending = std::thread::spawn(move || std::io::Write::write_all(&mut writer, &frames).unwrap());
                let mut acked = 0;
                while acked < PER_PUBLISHER_PER_SESSION * sessions.len() as u64 {
                    match publisher.recv().frame {
                        Frame::PubAck(_) => acked += 1,
                        other => panic!("publisher {p}: expected PUBACK, got {other:?}"),
                    }
                }
                sending.join().unwrap();
                acked
            })
        })
        .collect();
    for publisher in publishers {
        assert_eq!(publisher.join().unwrap(), PER_PUBLISHER_PER_SESSION * sessions.len() as u64);
    }
    for subscriber in subscribers {
        assert!(subscriber.join().unwrap().iter().all(|&next| next == per_session + 1));
    }
    let metrics = common::http_get(engine.control_addr(), "/metrics").1;
    assert!(common::metric_sum(&metrics, "switchboard_mesh_ring_full_total") > 0, "the rings never filled: the test did not congest the mesh");
    assert!(common::metric_sum(&metrics, "switchboard_mesh_backlogged_total") > 0, "no producer ever waited for a backlog");
    // Producers wait at the backlog limit (2 here); a few messages more can be in flight
    // (events are pushed without waiting, so that two shards never wait for each other). A
    // producer that did not wait would leave hundreds queued.
    let peak = metrics
        .lines()
        .filter(|line| line.starts_with("switchboard_mesh_backlog_messages_peak{"))
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .fold(0.0, f64::max);
    assert!(peak <= 64.0, "a mesh backlog grew to {peak} messages with a limit of 2");
    engine.shutdown();
}

/// With zero-copy sends switched on, large messages (sent alone from the registered pool, held
/// until the kernel lets go) and small ones between them reach every subscriber intact and
/// in order; the engine reports the zero-copy sends where the kernel has them.
fn large_messages_zero_copy(shards: usize) {
    let mut config = test_config(shards);
    config.uring.send_zc_min_bytes = 16 << 10;
    let engine = start(config);
    let addr = engine.data_addr();
    let mut subscribers: Vec<Raw> = (0..3).map(|_| Raw::handshake(addr)).collect();
    for subscriber in &mut subscribers {
        assert!(subscriber.subscribe("big", ResumeFrom::Live).recovered);
    }
    let payload = |seq: u64| -> Vec<u8> {
        let len = if seq % 2 == 0 { 20_000 + (seq as usize * 977) % 40_000 } else { 100 };
        (0..len).map(|k| (k as u64 * 31 + seq * 7) as u8).collect()
    };
    let mut publisher = Raw::handshake(addr);
    const MESSAGES: u64 = 60;
    // Read as published, so that the pool's few large slots are not all queued at once (the
    // rest would fall back to heap buffers, which are copied).
    for seq in 1..=MESSAGES {
        assert_eq!(publisher.publish("big", 0, &payload(seq)).seq, seq);
        for subscriber in &mut subscribers {
            let deliver = subscriber.deliver();
            assert_eq!(deliver.seq, seq);
            assert!(deliver.payload[..] == payload(seq)[..], "message {seq} arrived altered");
        }
    }
    let (_, metrics) = common::http_get(engine.control_addr(), "/metrics");
    let zc_sends = common::metric_sum(&metrics, "switchboard_uring_zc_sends_total");
    let fixed_sends = common::metric_sum(&metrics, "switchboard_uring_fixed_sends_total");
    eprintln!("zero-copy sends: {zc_sends} of {fixed_sends} from the registered pool");
    // Where the pool is registered (Linux 6.15+; SEND_ZC is older), every large message went
    // out zero copy to each subscriber at least once; elsewhere everything was copied.
    if fixed_sends > 0 {
        assert!(zc_sends >= MESSAGES / 2 * 3, "{zc_sends} zero-copy sends");
    } else {
        assert_eq!(zc_sends, 0);
    }
    engine.shutdown();
}

#[test]
fn large_messages_zero_copy_one_shard() {
    large_messages_zero_copy(1);
}

#[test]
fn large_messages_zero_copy_three_shards() {
    large_messages_zero_copy(3);
}

/// Small fan-out frames are copied into each subscriber's gathering buffer and large ones are
/// queued as one shared buffer: with sizes alternating around the threshold, queued behind
/// each other while nobody reads, every subscriber still gets every message intact and in
/// order. With copying switched off (0) everything is shared, with the same result.
fn copied_and_shared_frames_keep_their_order(shards: usize, fanout_copy_bytes_max: usize) {
    let mut config = test_config(shards);
    config.uring.fanout_copy_bytes_max = fanout_copy_bytes_max;
    let engine = start(config);
    let addr = engine.data_addr();
    let mut subscribers: Vec<Raw> = (0..3).map(|_| Raw::handshake(addr)).collect();
    for subscriber in &mut subscribers {
        assert!(subscriber.subscribe("mixed", ResumeFrom::Live).recovered);
    }
    // Around the default threshold (512 B of frame: ~440 B of payload here), and some well
    // over it; each payload's bytes name its seq.
    let payload = |seq: u64| -> Vec<u8> {
        let len = [10, 300, 430, 450, 900, 1500, 60, 2000][seq as usize % 8];
        (0..len).map(|k| (k as u64 * 13 + seq * 7) as u8).collect()
    };
    let mut publisher = Raw::handshake(addr);
    const MESSAGES: u64 = 400;
    // All in one write, acknowledgements read afterwards: the engine reads many PUBLISHes at
    // once and queues their frames in one loop turn, so copied frames and shared buffers sit
    // in the same connection queue (one at a time, each would be sent before the next).
    let mut pipelined = Vec::new();
    for seq in 1..=MESSAGES {
        let frame = Raw::publish_frame("mixed", "alice", 0, &payload(seq));
        pipelined.extend_from_slice(&frame.to_bytes(seq as u32).unwrap());
    }
    publisher.send_bytes(&pipelined);
    for seq in 1..=MESSAGES {
        match publisher.recv().frame {
            Frame::PubAck(ack) => assert_eq!(ack.seq, seq),
            other => panic!("expected PUBACK {seq}, got {other:?}"),
        }
    }
    for subscriber in &mut subscribers {
        for seq in 1..=MESSAGES {
            let deliver = subscriber.deliver();
            assert_eq!(deliver.seq, seq, "order across copied and shared frames");
            assert!(deliver.payload[..] == payload(seq)[..], "message {seq} arrived altered");
        }
    }
    engine.shutdown();
}

#[test]
fn copied_and_shared_frames_keep_their_order_one_shard() {
    copied_and_shared_frames_keep_their_order(1, 512);
}

#[test]
fn copied_and_shared_frames_keep_their_order_three_shards() {
    copied_and_shared_frames_keep_their_order(3, 512);
}

#[test]
fn shared_frames_only_keep_their_order() {
    copied_and_shared_frames_keep_their_order(2, 0);
}
