//! A tiny real run against nats-server, redis-server, the switchboard engine and the minimal
//! forwarder `floor`, each started here on a free loopback port and stopped by PID. Skipped,
//! with a note, only when the server binary is not there (CI installs nats-server and
//! redis-server; the engine binary is taken from `$SWITCHBOARD_BIN` or the workspace's
//! target/{release,debug}/switchboard; `floor` is built with these tests).

use switchboard_bench::backend::BackendKind;
use switchboard_bench::compare::{which, RunningServer, ServerSpec};
use switchboard_bench::ack::mock::AckFaults;
use switchboard_bench::ackrun::{self, AckSettings};
use switchboard_bench::run::{run, Settings};

fn tiny_run(name: &str, binary: &str, kind: BackendKind) {
    let found = match name {
        "switchboard" => engine_binary(),
        "floor" => Some(binary.into()),
        _ => which(binary),
    };
    let Some(bin) = found else {
        println!("SKIPPED: {binary} is not there (apt-get install {binary}, or cargo build -p switchboard)");
        return;
    };
    let log = std::env::temp_dir().join(format!("switchboard-bench-test-{name}-{}.log", std::process::id()));
    let server = RunningServer::start(&ServerSpec::new(name, bin), None, &log).expect("server starts");
    for max in [false, true] {
        let st = Settings {
            backend: name.into(),
            addr: server.addr.clone(),
            sessions: 200,
            subscribers: 2,
            gateways: 4,
            publishers: 2,
            payload: 128,
            rate: if max { None } else { Some(5_000.0) },
            max,
            window: 512,
            duration_s: 1.0,
            warmup_s: 0.2,
            server_pid: Some(server.pid()),
            ..Settings::default()
        };
        let backend = kind.build(&server.addr, switchboard_bench::backend::mock::Faults::default()).unwrap();
        let r = run(&st, &backend).expect("run").report;
        println!("{}", r.table());
        assert!(r.errors.is_empty(), "{:?}", r.errors);
        assert!(r.accounting.clean(), "{:?}", r.accounting);
        assert!(r.accounting.expected > 1000);
        assert_eq!(r.accounting.received, r.accounting.expected);
        let sv = r.server.as_ref().expect("server stats");
        assert!(sv.rss_setup_kb.unwrap() > 0 && sv.rss_end_kb.unwrap() > 0);
        assert!(r.latency_us.count > 0 && r.latency_us.p50 > 0.0);
    }
}

#[test]
fn nats_tiny_run() {
    tiny_run("nats", "nats-server", BackendKind::Nats);
}

#[test]
fn redis_tiny_run() {
    tiny_run("redis", "redis-server", BackendKind::Redis);
}

/// The minimal forwarder `compare --servers floor` measures (this package's `floor` binary),
/// driven as Redis: it must forward exactly too, or its numbers mean nothing.
#[test]
fn floor_tiny_run() {
    tiny_run("floor", env!("CARGO_BIN_EXE_floor"), BackendKind::Redis);
}

fn engine_binary() -> Option<std::path::PathBuf> {
    if let Some(p) = std::env::var_os("SWITCHBOARD_BIN") {
        return Some(p.into());
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map_or_else(|| std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"), Into::into);
    ["release", "debug"].iter().map(|p| target.join(p).join("switchboard")).find(|p| p.is_file())
}

#[test]
fn switchboard_tiny_run() {
    tiny_run("switchboard", "switchboard", BackendKind::Switchboard);
}

/// `--ack` against a real server: every publish acknowledged exactly once, in both modes, with
/// the claimed durability reported.
fn tiny_ack_run(name: &str, binary: &str, kind: BackendKind, claim: &str) {
    let found = if name == "switchboard" { engine_binary() } else { which(binary) };
    let Some(bin) = found else {
        println!("SKIPPED: {binary} is not there (apt-get install {binary}, or cargo build -p switchboard)");
        return;
    };
    let log = std::env::temp_dir().join(format!("switchboard-bench-test-ack-{name}-{}.log", std::process::id()));
    let server = RunningServer::start(&ServerSpec::new(name, bin), None, &log).expect("server starts");
    let backend = kind.build_ack(&server.addr, AckFaults::default()).unwrap();
    for max in [false, true] {
        let st = AckSettings {
            backend: name.into(),
            addr: server.addr.clone(),
            publishers: 4,
            sessions: 40,
            rate: if max { None } else { Some(2_000.0) },
            max,
            window: 8,
            duration_s: 0.5,
            warmup_s: 0.2,
            server_pid: Some(server.pid()),
            ..AckSettings::default()
        };
        let r = ackrun::run(&st, &backend).expect("run").report;
        println!("{}", r.table());
        assert!(r.errors.is_empty(), "{:?}", r.errors);
        assert!(r.counts.clean(), "{:?}", r.counts);
        assert!(r.counts.sent > 500, "{:?}", r.counts);
        assert_eq!(r.counts.claim_summary(), claim);
        assert!(r.latency_us.count > 0 && r.latency_us.p50 > 0.0);
    }
}

#[test]
fn jetstream_tiny_ack_run() {
    tiny_ack_run("jetstream", "nats-server", BackendKind::Jetstream, "jetstream-file");
}

#[test]
fn switchboard_tiny_ack_run() {
    // Until the journal is wired the engine acknowledges from memory.
    let claim = std::env::var("SWITCHBOARD_ACK_CLAIM").unwrap_or_else(|_| "memory".into());
    tiny_ack_run("switchboard", "switchboard", BackendKind::Switchboard, &claim);
}

/// A subscriber that stops reading makes `floor`'s writes to it short: once it reads again,
/// everything arrives whole and in order (the EPOLLOUT path), and the publisher got every reply.
#[test]
fn floor_keeps_a_stalled_readers_backlog_whole() {
    use std::io::{Read, Write};
    use std::net::TcpStream;
    const MESSAGES: usize = 20_000;
    const PAYLOAD_BYTES: usize = 1000;
    let log = std::env::temp_dir().join(format!("switchboard-bench-test-floor-backlog-{}.log", std::process::id()));
    let server = RunningServer::start(&ServerSpec::new("floor", env!("CARGO_BIN_EXE_floor").into()), None, &log).expect("floor starts");
    // A stall would otherwise hang the test: it fails instead.
    let stall = Some(std::time::Duration::from_secs(20));
    let mut subscriber = TcpStream::connect(&server.addr).unwrap();
    subscriber.set_read_timeout(stall).unwrap();
    subscriber.write_all(b"*2\r\n$9\r\nSUBSCRIBE\r\n$3\r\ns.1\r\n").unwrap();
    let confirmation = b"*3\r\n$9\r\nsubscribe\r\n$3\r\ns.1\r\n:1\r\n";
    let mut got = vec![0; confirmation.len()];
    subscriber.read_exact(&mut got).unwrap();
    assert_eq!(got, confirmation);

    // 20 MB while the subscriber does not read: more than both sockets' buffers hold.
    let payload = |i: usize| format!("{i:0width$}", width = PAYLOAD_BYTES).into_bytes();
    let mut publisher = TcpStream::connect(&server.addr).unwrap();
    publisher.set_read_timeout(stall).unwrap();
    let mut expected = Vec::with_capacity(MESSAGES * (PAYLOAD_BYTES + 40));
    for i in 0..MESSAGES {
        let body = payload(i);
        publisher.write_all(format!("*3\r\n$7\r\nPUBLISH\r\n$3\r\ns.1\r\n${}\r\n", body.len()).as_bytes()).unwrap();
        publisher.write_all(&body).unwrap();
        publisher.write_all(b"\r\n").unwrap();
        expected.extend_from_slice(format!("*3\r\n$7\r\nmessage\r\n$3\r\ns.1\r\n${}\r\n", body.len()).as_bytes());
        expected.extend_from_slice(&body);
        expected.extend_from_slice(b"\r\n");
    }
    let mut replies = vec![0; MESSAGES * 4];
    publisher.read_exact(&mut replies).unwrap();
    assert!(replies.chunks(4).all(|r| r == b":1\r\n"), "every PUBLISH answered :1");

    let mut delivered = vec![0; expected.len()];
    subscriber.read_exact(&mut delivered).unwrap();
    assert!(delivered == expected, "the backlog arrived whole and in order");
}
