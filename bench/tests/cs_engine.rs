//! Tiny real `csload` runs against the engine (started here on a free loopback port with a
//! tenant configuration, stopped by PID): conversations alone with the pub/sub `loadgen` child
//! alongside, and conversations that must queue because the agents are full. Skipped, with a
//! note, when the engine binary is not there (`$SWITCHBOARD_BIN` or the workspace's
//! target/{release,debug}/switchboard).

use switchboard_bench::compare::{RunningServer, ServerSpec};
use switchboard_bench::cs::CsSettings;
use switchboard_bench::csrun::{self, DeskKnobs, PubsubSpec};

fn engine_binary() -> Option<std::path::PathBuf> {
    if let Some(p) = std::env::var_os("SWITCHBOARD_BIN") {
        return Some(p.into());
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map_or_else(|| std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../target"), Into::into);
    ["release", "debug"].iter().map(|p| target.join(p).join("switchboard")).find(|p| p.is_file())
}

fn engine(tag: &str, secret: &str) -> Option<RunningServer> {
    let Some(bin) = engine_binary() else {
        println!("SKIPPED: no switchboard binary (cargo build --release -p switchboard)");
        return None;
    };
    let dir = std::env::temp_dir().join(format!("csload-test-{tag}-{}", std::process::id()));
    let knobs = DeskKnobs { offer_timeout_ms: 30_000, agents_max: 10_000, conversations_max: 100_000, queue_length_max: 10_000, sessions_per_shard_max: None };
    let cfg = csrun::write_engine_config(&dir, secret, &knobs).unwrap();
    let mut spec = ServerSpec::new("switchboard", bin);
    spec.extra_args = vec!["--config".into(), cfg.display().to_string()];
    Some(RunningServer::start(&spec, None, &dir.join("server.log")).expect("the engine starts"))
}

#[test]
fn conversations_with_pubsub_alongside() {
    let secret = csrun::run_secret();
    let Some(server) = engine("pubsub", &secret) else { return };
    let st = CsSettings {
        addr: server.addr.clone(),
        rate: 300.0,
        agents: 40,
        capacity: 2,
        agent_conns: 2,
        open_conns: 2,
        hold_ms: 100,
        duration_s: 1.0,
        warmup_s: 0.3,
        drain_s: 5.0,
        server_pid: Some(server.pid()),
        ..CsSettings::default()
    };
    let out = std::env::temp_dir().join(format!("csload-test-pubsub-{}-loadgen", std::process::id()));
    let pubsub = PubsubSpec {
        loadgen: env!("CARGO_BIN_EXE_loadgen").into(),
        rate: 2000.0,
        token: csrun::token(&secret, "gateway", "loadgen").unwrap(),
        cpu: None,
        out_prefix: out,
    };
    let r = csrun::run("combined", &st, &secret, Some(&pubsub)).expect("run");
    println!("{}", serde_json::to_string_pretty(&r.counts).unwrap());
    assert!(r.errors.is_empty(), "{:?}", r.errors);
    let c = &r.counts;
    assert!(c.clean(), "{c:?}");
    assert!(c.opened >= 350, "{c:?}");
    assert_eq!((c.open_ok, c.offered, c.accepted, c.closed), (c.opened, c.opened, c.opened, c.opened), "{c:?}");
    assert!(r.offered_us.count > 250 && r.offered_us.p50 > 0.0, "{:?}", r.offered_us);
    assert!(r.server.as_ref().is_some_and(|s| s.cpu_ns_per_conversation.is_some()));
    let p = r.pubsub.as_ref().expect("the loadgen report");
    assert!(p.errors.is_empty(), "{:?}", p.errors);
    assert!(p.accounting.clean() && p.accounting.expected > 3000, "{:?}", p.accounting);
}

#[test]
fn full_agents_make_conversations_wait_and_none_is_lost_or_over_capacity() {
    let secret = csrun::run_secret();
    let Some(server) = engine("queue", &secret) else { return };
    // 10 agents × 2 = 20 slots; 150/s × 250 ms = 37 busy: conversations queue, and every
    // close frees a slot that the engine offers to the longest waiting one.
    let st = CsSettings {
        addr: server.addr.clone(),
        rate: 150.0,
        agents: 10,
        capacity: 2,
        agent_conns: 2,
        open_conns: 1,
        hold_ms: 250,
        duration_s: 0.8,
        warmup_s: 0.2,
        drain_s: 8.0,
        server_pid: Some(server.pid()),
        ..CsSettings::default()
    };
    let r = csrun::run("queue", &st, &secret, None).expect("run");
    println!("{}", serde_json::to_string_pretty(&r.counts).unwrap());
    assert!(r.errors.is_empty(), "{:?}", r.errors);
    let c = &r.counts;
    assert!(c.clean(), "{c:?}");
    assert_eq!(c.over_capacity, 0);
    assert_eq!(r.peak_agent_load, 2, "the agents were full at some point");
    assert_eq!(c.closed, c.opened, "{c:?}");
    assert!(r.offered_us.max > 100_000.0, "waiting shows as latency: {:?}", r.offered_us);
}
