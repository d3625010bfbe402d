//! A tiny real run against nats-server, redis-server, the switchboard engine and the minimal
//! forwarder `floor`, each started here on a free loopback port and stopped by PID. Skipped,
//! with a note, only when the server binary is not there (CI installs nats-server and redis-server; the engine binary is taken from
//! `$SWITCHBOARD_BIN` or the workspace's target/{release,debug}/switchboard).

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
