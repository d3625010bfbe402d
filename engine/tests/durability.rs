//! The journal wired into the engine: what PUBACK promises survives restarts and `kill -9`.
//!
//! In-process engines cover graceful restarts (same epoch, history and idempotency window
//! back); the real binary, killed with SIGKILL at seeded moments under load from the real
//! client, covers crashes: every acknowledged message is present exactly once and in order,
//! and a subscriber resumes with no gap and no duplicate.

mod common;

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use common::{Raw, Rng, TempDir};
use switchboard::config::DurabilityMode;
use switchboard_client::blocking::Client;
use switchboard_client::{ClientOptions, Item, Position, ResumeFrom};
use switchboard_protocol::{Durability, ErrorCode, Frame};

fn options(addr: SocketAddr) -> ClientOptions {
    let mut options = ClientOptions::new(addr.to_string()).client_name("durability-test");
    options.reconnect.initial = Duration::from_millis(10);
    options.reconnect.max = Duration::from_millis(100);
    options
}

/// Every message of `session` from `from` on, through a fresh subscription, until `head`.
fn read_session(addr: SocketAddr, session: &str, from: ResumeFrom) -> (switchboard_protocol::Subscribed, Vec<(u64, u64, Vec<u8>)>) {
    let mut raw = Raw::handshake(addr);
    let subscribed = raw.subscribe(session, from);
    let mut messages = Vec::new();
    for _ in subscribed.replay_from_seq..=subscribed.head_seq {
        let deliver = raw.deliver();
        messages.push((deliver.epoch, deliver.seq, deliver.payload.to_vec()));
    }
    (subscribed, messages)
}

#[test]
fn acknowledged_messages_survive_a_graceful_restart_with_the_same_epoch() {
    for (shards, mode, wire) in [(1, DurabilityMode::Sync, Durability::Sync), (3, DurabilityMode::Interval, Durability::Interval)] {
        let dir = TempDir::new("graceful");
        let engine = common::start(common::durable_config(shards, dir.path(), mode));
        let addr = engine.data_addr();
        let mut publisher = Raw::handshake(addr);
        let mut watcher = Raw::handshake(addr);
        watcher.subscribe("conv-0", ResumeFrom::Live);
        // Every session has its own epoch.
        let mut epochs = [0; 4];
        for round in 1..=20_u64 {
            for session in 0..4 {
                let ack = publisher.publish(&format!("conv-{session}"), round * 10 + session, format!("{session}:{round}").as_bytes());
                assert_eq!((ack.seq, ack.durability, ack.duplicate), (round, wire, false), "{mode:?}");
                assert!(epochs[session as usize] == 0 || epochs[session as usize] == ack.epoch, "a session's epoch moved");
                epochs[session as usize] = ack.epoch;
            }
        }
        // A subscriber sees only acknowledged messages, in order.
        for round in 1..=20 {
            assert_eq!(watcher.deliver().seq, round);
        }
        // Read cursors are journaled too.
        let cursor = Frame::ReadCursor(switchboard_protocol::ReadCursor { session: "conv-1".into(), participant: "agent-7".into(), seq: 15 });
        publisher.send(&cursor);
        assert!(matches!(publisher.recv().frame, Frame::Success(_)));
        drop((publisher, watcher));
        engine.shutdown();

        let engine = common::start(common::durable_config(shards, dir.path(), mode));
        let addr = engine.data_addr();
        for (session, &epoch) in epochs.iter().enumerate() {
            let (subscribed, messages) = read_session(addr, &format!("conv-{session}"), ResumeFrom::After { epoch, seq: 12 });
            assert_eq!((subscribed.epoch, subscribed.head_seq, subscribed.recovered), (epoch, 20, true), "{mode:?} {shards} shards");
            let expected: Vec<_> = (13..=20).map(|round| (epoch, round, format!("{session}:{round}").into_bytes())).collect();
            assert_eq!(messages, expected);
        }
        let mut publisher = Raw::handshake(addr);
        // The idempotency window came back: a repeat gets its original seq.
        let repeat = publisher.publish("conv-2", 20 * 10 + 2, b"2:20");
        assert_eq!((repeat.seq, repeat.duplicate), (20, true));
        // New messages continue the sequence.
        assert_eq!(publisher.publish("conv-2", 0, b"after").seq, 21);
        engine.shutdown();
    }
}

#[test]
fn a_data_directory_refuses_another_shard_count() {
    let dir = TempDir::new("layout");
    common::start(common::durable_config(2, dir.path(), DurabilityMode::Sync)).shutdown();
    let error = switchboard::start(common::durable_config(3, dir.path(), DurabilityMode::Sync)).err().expect("refused");
    let text = error.to_string();
    assert!(text.contains("written by 2 shards, not 3") && text.contains("--shards 2"), "{text}");
    // The right count still starts.
    common::start(common::durable_config(2, dir.path(), DurabilityMode::Sync)).shutdown();
}

#[test]
fn memory_only_mode_touches_no_data_directory() {
    let dir = TempDir::new("memory");
    let data_dir = dir.path().join("data");
    let engine = common::start(common::durable_config(1, &data_dir, DurabilityMode::None));
    let ack = Raw::handshake(engine.data_addr()).publish("conv", 0, b"x");
    assert_eq!((ack.durability, ack.seq), (Durability::Memory, 1));
    engine.shutdown();
    assert!(!data_dir.exists(), "memory-only mode created {}", data_dir.display());
}

#[test]
fn a_record_larger_than_the_journal_allows_is_refused_and_the_connection_carries_on() {
    let dir = TempDir::new("toolarge");
    let mut config = common::durable_config(1, dir.path(), DurabilityMode::Sync);
    config.limits.payload_bytes_max = 8 << 10;
    config.journal.store.payload_bytes_max = 16 << 10;
    config.journal.store.frame_bytes_max = 16 << 10;
    config.journal.store.write_bytes_max = 64 << 10;
    config.journal.store.pending_bytes_max = 64 << 10;
    let engine = common::start(config);
    let mut raw = Raw::handshake(engine.data_addr());
    // Fits the wire and the journal: accepted.
    assert_eq!(raw.publish("conv", 0, &[7; 8 << 10]).seq, 1);
    // Over the wire limit: refused before the journal.
    raw.send(&Raw::publish_frame("conv", "me", 0, &[7; (8 << 10) + 1]));
    match raw.recv().frame {
        Frame::Error(error) => assert_eq!(ErrorCode::from_u16(error.code), ErrorCode::LimitExceeded),
        other => panic!("expected ERROR, got {other:?}"),
    }
    assert_eq!(raw.publish("conv", 0, b"still here").seq, 2);
    engine.shutdown();
}

// ---- the real binary, killed ----

struct Engine {
    child: Child,
    data: SocketAddr,
}

impl Engine {
    fn spawn(dir: &std::path::Path, config: &std::path::Path, shards: usize, listen: &str) -> Engine {
        let mut child = Command::new(env!("CARGO_BIN_EXE_switchboard"))
            .args(["serve", "--listen", listen, "--control", "127.0.0.1:0", "--shards", &shards.to_string(), "--data-dir"])
            .arg(dir)
            .arg("--config")
            .arg(config)
            .env("RUST_LOG", "info")
            .env("NO_COLOR", "1")
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut stderr = BufReader::new(child.stderr.take().unwrap());
        let mut line = String::new();
        let mut log = String::new();
        let data = loop {
            line.clear();
            assert!(stderr.read_line(&mut line).unwrap() > 0, "engine exited before it was ready:\n{log}");
            log.push_str(&line);
            if line.contains("switchboard ready") {
                let start = line.find("data_addr=").unwrap() + "data_addr=".len();
                break line[start..].split_whitespace().next().unwrap().parse().unwrap();
            }
        };
        // Keep draining the log so the engine never blocks on a full pipe.
        std::thread::spawn(move || for _ in stderr.lines() {});
        Engine { child, data }
    }

    fn kill(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }
}

const SESSIONS: usize = 6;
const PUBLISHERS: usize = 3;

#[test]
fn sigkill_under_load_loses_nothing_acknowledged() {
    let seed = std::env::var("SWITCHBOARD_CRASH_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or(0x005b_0a2d);
    eprintln!("crash test seed {seed} (SWITCHBOARD_CRASH_SEED to replay)");
    let mut rng = Rng(seed);
    let dir = TempDir::new("crash");
    let config = dir.path().join("engine.toml");
    // History large enough to read every session back whole.
    std::fs::write(
        &config,
        "[limits]\nhistory_messages_max = 4096\npayload_bytes_max = 256\noutbound_bytes_max = 33554432\n\
         [journal.store]\nretention_messages_max = 4096\nsegment_bytes = 4194304\nshard_bytes_max = 67108864\n",
    )
    .unwrap();
    let data_dir = dir.path().join("data");
    // session → (epoch, seq) → payload, for every PUBACK received.
    let mut acked: BTreeMap<String, BTreeMap<u64, Vec<u8>>> = BTreeMap::new();
    // session → its epoch, which no crash in sync mode may move.
    let mut epochs: BTreeMap<String, u64> = BTreeMap::new();
    // A subscriber's position, carried across crashes.
    let mut watched: Option<Position> = None;
    let shards = 2;
    for round in 0..5 {
        let engine = Engine::spawn(&data_dir, &config, shards, "127.0.0.1:0");
        // Resume the watcher where it stopped: same epoch (sync mode keeps it), no gap.
        let watch = Client::connect(options(engine.data)).unwrap();
        let from = watched.map_or(ResumeFrom::Earliest, |p| ResumeFrom::After { epoch: p.epoch, seq: p.seq });
        let watching = watch.subscribe("conv-0", from).unwrap();
        if let Some(position) = watched {
            assert!(watching.info().recovered, "round {round}: resume from {position:?} not recovered: {:?}", watching.info());
            assert_eq!(watching.info().epoch, position.epoch, "round {round}: sync mode must keep the epoch");
        }
        let kill_after_acks = 50 + rng.below(400) as usize;
        let publishers: Vec<Client> = (0..PUBLISHERS).map(|_| Client::connect(options(engine.data)).unwrap()).collect();
        let mut pending = std::collections::VecDeque::new();
        let mut acks_this_round = 0;
        let mut n = 0_u64;
        while acks_this_round < kill_after_acks {
            // Keep a window of publishes in flight on every connection.
            while pending.len() < 64 {
                n += 1;
                let session = format!("conv-{}", rng.below(SESSIONS as u64));
                let payload = format!("r{round}-n{n}").into_bytes();
                let publisher = &publishers[(n as usize) % PUBLISHERS];
                let publish = switchboard_protocol::Publish {
                    session: session.as_str().into(),
                    client_msg_id: 0,
                    trace_id: 0,
                    sender: "customer".into(),
                    payload: payload.clone().into(),
                };
                pending.push_back((session, payload, publisher.publish_nowait(publish)));
            }
            let (session, payload, handle) = pending.pop_front().unwrap();
            let ack = handle.wait().expect("the engine is alive: every publish is acknowledged");
            assert_eq!(ack.durability, Durability::Sync);
            assert!(!ack.duplicate);
            assert_eq!(*epochs.entry(session.clone()).or_insert(ack.epoch), ack.epoch, "round {round}: {session}'s epoch moved");
            assert!(acked.entry(session).or_default().insert(ack.seq, payload).is_none(), "seq {} acknowledged twice", ack.seq);
            acks_this_round += 1;
        }
        // Crash with publishes in flight.
        engine.kill();
        // What the watcher got before the crash: consecutive, each one acknowledged content.
        let mut last = watched;
        while let Ok(Some(item)) = watching.try_recv() {
            if let Item::Message(message) = item {
                let expected_seq = last.map_or(1, |p| p.seq + 1);
                assert_eq!(message.seq, expected_seq, "round {round}: watcher gap or duplicate");
                last = Some(Position { epoch: message.epoch, seq: message.seq });
            }
        }
        watched = last;
        drop((publishers, pending, watching, watch));
    }

    // After the last crash: every acknowledged message is there, once, in order, with its seq.
    let engine = Engine::spawn(&data_dir, &config, shards, "127.0.0.1:0");
    for (session, messages) in &acked {
        let (subscribed, stored) = read_session(engine.data, session, ResumeFrom::Earliest);
        assert_eq!(subscribed.epoch, epochs[session], "{session}: epoch moved although only unacknowledged tails were cut");
        let seqs: Vec<u64> = stored.iter().map(|m| m.1).collect();
        assert_eq!(seqs, (1..=subscribed.head_seq).collect::<Vec<_>>(), "{session}: seqs not consecutive from 1");
        for (seq, payload) in messages {
            let found = &stored[(*seq - 1) as usize];
            assert_eq!(&found.2, payload, "{session} seq {seq}: acknowledged content differs");
        }
        // Anything stored beyond what was acknowledged is an unacknowledged publish that made it.
        let payloads: std::collections::HashSet<&Vec<u8>> = stored.iter().map(|m| &m.2).collect();
        assert_eq!(payloads.len(), stored.len(), "{session}: a message is stored twice");
    }
    engine.kill();
}

#[test]
fn the_compactor_frees_old_segments_a_quiet_session_pinned() {
    let dir = TempDir::new("compact");
    let mut config = common::durable_config(1, dir.path(), DurabilityMode::Sync);
    config.journal.maintenance_interval_ms = 20;
    config.journal.store.compact_newer_segments_min = 2;
    let engine = common::start(config.clone());
    let (addr, control) = (engine.data_addr(), engine.control_addr());
    let mut raw = Raw::handshake(addr);
    let quiet = raw.publish("quiet", 0, b"said once, long ago");
    // A busy session fills segments; its own history rolls over (128 kept), so the first
    // segments hold nothing retained but the quiet session's one message.
    let payload = vec![b'b'; 16 << 10];
    for _ in 0..(24 << 20) / payload.len() / 64 {
        for _ in 0..64 {
            raw.send(&Raw::publish_frame("busy", "me", 0, &payload));
        }
        for _ in 0..64 {
            assert!(matches!(raw.recv().frame, Frame::PubAck(_)));
        }
    }
    let deadline = std::time::Instant::now() + common::EXPECT_TIMEOUT;
    loop {
        let metrics = common::http_get(control, "/metrics").1;
        if common::metric_sum(&metrics, "switchboard_journal_segments_deleted_total") > 0 {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "no segment was ever deleted:\n{metrics}");
        std::thread::sleep(Duration::from_millis(20));
    }
    drop(raw);
    engine.shutdown();
    // The quiet message was copied forward, not lost: it comes back after a restart.
    let engine = common::start(config);
    let (subscribed, messages) = read_session(engine.data_addr(), "quiet", ResumeFrom::Earliest);
    assert_eq!((subscribed.epoch, subscribed.head_seq), (quiet.epoch, 1));
    assert_eq!(messages, vec![(quiet.epoch, 1, b"said once, long ago".to_vec())]);
    engine.shutdown();
}
