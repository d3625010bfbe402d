//! The real binary: start on ephemeral ports, control endpoints, SIGTERM drains and exits 0.

mod common;

use std::io::{BufRead, BufReader};
use std::net::SocketAddr;
use std::process::{Command, Stdio};

use common::Raw;
use switchboard_protocol::{Frame, GoAwayReason, ResumeFrom};

/// Reads the engine's log until it says where it listens.
fn wait_ready(stderr: &mut impl BufRead) -> (SocketAddr, SocketAddr) {
    let mut line = String::new();
    loop {
        line.clear();
        assert!(stderr.read_line(&mut line).unwrap() > 0, "engine exited before it was ready");
        if line.contains("switchboard ready") {
            let field = |name: &str| -> SocketAddr {
                let start = line.find(&format!("{name}=")).unwrap() + name.len() + 1;
                line[start..].split_whitespace().next().unwrap().parse().unwrap()
            };
            return (field("data_addr"), field("control"));
        }
    }
}

#[test]
fn sigterm_sends_goaway_drains_and_exits_zero() {
    // The defaults as the README's quick start runs them: `sync` durability, the journal in
    // the relative `./switchboard-data` (here under a directory of the test's own).
    let dir = common::TempDir::new("lifecycle");
    let mut child = Command::new(env!("CARGO_BIN_EXE_switchboard"))
        .args(["serve", "--listen", "127.0.0.1:0", "--control", "127.0.0.1:0", "--shards", "2"])
        .current_dir(dir.path())
        .env("RUST_LOG", "info")
        .env("NO_COLOR", "1")
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stderr = BufReader::new(child.stderr.take().unwrap());
    let (data, control) = wait_ready(&mut stderr);

    // Control endpoints.
    assert_eq!(common::http_get(control, "/healthz").0, 200);
    assert_eq!(common::http_get(control, "/readyz").0, 200);
    let (status, metrics) = common::http_get(control, "/metrics");
    assert_eq!(status, 200);
    for name in ["switchboard_connections", "switchboard_deliveries_total", "switchboard_uring_submits_total", "switchboard_pool_slots", "switchboard_publish_to_enqueue_latency_ns"] {
        assert!(metrics.contains(name), "/metrics lacks {name}");
    }
    assert_eq!(common::http_get(control, "/nope").0, 404);

    let mut subscriber = Raw::handshake(data);
    subscriber.subscribe("conv", ResumeFrom::Live);
    let mut publisher = Raw::handshake(data);
    let ack = publisher.publish("conv", 0, b"before shutdown");
    assert_eq!(ack.durability, switchboard_protocol::Durability::Sync);
    assert_eq!(subscriber.deliver().seq, 1);

    // SAFETY: plain kill(2) on our child's pid.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let frames = subscriber.recv_until_closed();
    assert!(
        matches!(frames.last(), Some(Frame::GoAway(g)) if g.reason == GoAwayReason::Shutdown),
        "expected GOAWAY(shutdown), got {frames:?}"
    );
    let status = child.wait().unwrap();
    assert_eq!(status.code(), Some(0), "graceful shutdown exits 0");
}

#[test]
fn bad_flags_and_config_are_refused_with_a_clear_message() {
    let output = Command::new(env!("CARGO_BIN_EXE_switchboard")).args(["serve", "--cpus", "3-1"]).output().unwrap();
    assert!(!output.status.success());
    assert!(String::from_utf8_lossy(&output.stderr).contains("bad CPU range"));

    let dir = std::env::temp_dir().join(format!("switchboard-test-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("bad.toml");
    std::fs::write(&file, "[limits]\npayload_bytes_max = 0\n").unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_switchboard")).args(["config", "--config"]).arg(&file).output().unwrap();
    assert_eq!(output.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&output.stderr).contains("limits.payload_bytes_max"));

    // The documented defaults file parses and equals the embedded defaults.
    let ops = concat!(env!("CARGO_MANIFEST_DIR"), "/../ops/switchboard.toml");
    let documented = Command::new(env!("CARGO_BIN_EXE_switchboard")).args(["config", "--config", ops]).output().unwrap();
    let embedded = Command::new(env!("CARGO_BIN_EXE_switchboard")).args(["config"]).output().unwrap();
    assert!(documented.status.success(), "{}", String::from_utf8_lossy(&documented.stderr));
    assert_eq!(String::from_utf8_lossy(&documented.stdout), String::from_utf8_lossy(&embedded.stdout), "ops/switchboard.toml must match the defaults");
    std::fs::remove_dir_all(&dir).ok();
}

#[test]
fn a_silent_connection_gets_goaway_idle_timeout_and_an_active_one_stays() {
    let mut config = common::test_config(1);
    config.limits.keepalive_ms = 200;
    let engine = common::start(config);
    let mut silent = Raw::handshake(engine.data_addr());
    let mut active = Raw::handshake(engine.data_addr());
    // The active one pings back to back (a round trip each) while the silent one says nothing.
    let started = std::time::Instant::now();
    let frames = std::thread::scope(|scope| {
        let silent_frames = scope.spawn(|| silent.recv_until_closed());
        while !silent_frames.is_finished() {
            let correlation = active.send(&Frame::Ping(switchboard_protocol::Ping { nonce: 9 }));
            assert_eq!(active.recv().correlation, correlation, "the active connection stays open");
            assert!(started.elapsed() < common::EXPECT_TIMEOUT);
        }
        silent_frames.join().unwrap()
    });
    assert!(matches!(frames.last(), Some(Frame::GoAway(g)) if g.reason == GoAwayReason::IdleTimeout), "{frames:?}");
    engine.shutdown();
}

#[test]
fn journal_inspect_and_verify_answer_for_operators() {
    let dir = std::env::temp_dir().join(format!("switchboard-journal-cli-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let verify = Command::new(env!("CARGO_BIN_EXE_switchboard")).args(["journal", "verify"]).arg(&dir).output().unwrap();
    assert_eq!(verify.status.code(), Some(0), "an empty journal directory verifies");
    assert!(String::from_utf8_lossy(&verify.stdout).contains("OK"));
    let missing = Command::new(env!("CARGO_BIN_EXE_switchboard")).args(["journal", "inspect"]).arg(dir.join("nope")).output().unwrap();
    assert_eq!(missing.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&missing.stderr).contains("cannot read journal"));
    std::fs::remove_dir_all(&dir).ok();
}
