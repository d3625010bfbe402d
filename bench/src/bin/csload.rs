//! `csload`: issue 5's customer-service number. Conversation open → Offered latency under a
//! paced load of new conversations while the ordinary pub/sub load flows, against the real
//! engine (`switchboard serve --config <run's TOML> --durability none --shards 1`).
//!
//! Runs, each on a fresh engine pinned to `--server-cpu` (the generator, and the `loadgen`
//! child, on `--generator-cpu`):
//! - `cs-only`: conversations alone (their own CPU cost);
//! - `pubsub-only`: agents online, no conversations, `loadgen` at `--pubsub-rate` (the
//!   baseline the combined run's CPU is compared with);
//! - `combined`: both.
//!
//! Output under `--out`: `results.json` (every figure), `table.md`, `runs/*` (each run's report,
//! the `loadgen` report and histogram), `logs/` (engine logs and configurations).

use clap::Parser;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};
use switchboard_bench::compare::{self, RunningServer, ServerSpec};
use switchboard_bench::cs::{CsReport, CsSettings, CsSuite};
use switchboard_bench::csrun::{self, DeskKnobs, PubsubSpec};
use switchboard_bench::report::Host;

#[derive(Parser, Debug)]
#[command(version, about = "Customer-service routing under load: open → offered latency while pub/sub flows")]
struct Args {
    /// Short runs (2 s measured, 1 s warm-up, 200 agents, 1000 conversations/s, 20k pub/s).
    #[arg(long)]
    quick: bool,
    /// Output folder (default bench/out/cs-<unix time>).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Runs, in order: cs-only, pubsub-only, combined (comma separated).
    #[arg(long, default_value = "cs-only,pubsub-only,combined", value_delimiter = ',')]
    runs: Vec<String>,
    /// New conversations per second (default 2000; 1000 with --quick).
    #[arg(long)]
    cs_rate: Option<f64>,
    /// Pub/sub publishes per second over 1000 sessions × 3 subscribers (default 50000; 20000
    /// with --quick).
    #[arg(long)]
    pubsub_rate: Option<f64>,
    /// Agents online (default 500; 200 with --quick).
    #[arg(long)]
    agents: Option<u32>,
    /// Capacity of each agent.
    #[arg(long, default_value_t = 4)]
    capacity: u16,
    /// Gateway connections speaking for the agents.
    #[arg(long, default_value_t = 4)]
    agent_conns: u32,
    /// Gateway connections opening conversations.
    #[arg(long, default_value_t = 2)]
    open_conns: u32,
    /// How long an agent keeps a conversation before closing it, ms.
    #[arg(long, default_value_t = 500)]
    hold_ms: u64,
    /// Measured seconds per run (default 10; 2 with --quick; at most 15).
    #[arg(long)]
    duration: Option<f64>,
    /// Warm-up seconds (default 2; 1 with --quick).
    #[arg(long)]
    warmup: Option<f64>,
    /// Pacing tick of the openers, µs.
    #[arg(long, default_value_t = 1000)]
    tick_us: u64,
    /// The engine's offer accept timeout, ms.
    #[arg(long, default_value_t = 30_000)]
    offer_timeout_ms: u64,
    /// The engine's `limits.sessions_per_shard_max` (default: the engine's); every conversation
    /// is a session.
    #[arg(long)]
    sessions_per_shard_max: Option<usize>,
    /// The switchboard binary (default: next to this one).
    #[arg(long)]
    switchboard_bin: Option<PathBuf>,
    /// The loadgen binary (default: next to this one).
    #[arg(long)]
    loadgen_bin: Option<PathBuf>,
    /// CPU the engine is pinned to.
    #[arg(long, default_value_t = 1)]
    server_cpu: usize,
    /// CPU the generators are pinned to.
    #[arg(long, default_value_t = 0)]
    generator_cpu: usize,
    /// Do not pin anything.
    #[arg(long)]
    no_pin: bool,
}

#[allow(clippy::too_many_lines)]
fn main() {
    let a = Args::parse();
    let started = Instant::now();
    let q = a.quick;
    let duration = a.duration.unwrap_or(if q { 2.0 } else { 10.0 });
    if !(duration > 0.0 && duration <= 15.0) {
        die("--duration must be > 0 and at most 15 s (each run stays under ~20 s)");
    }
    for r in &a.runs {
        if !["cs-only", "pubsub-only", "combined"].contains(&r.as_str()) {
            die(&format!("unknown run {r:?}: cs-only, pubsub-only, combined"));
        }
    }
    let host = Host::current();
    let pin = !a.no_pin && host.cpus_online >= 2;
    if pin {
        if let Err(e) = compare::pin_current_thread(a.generator_cpu) {
            die(&format!("pinning to CPU {}: {e}", a.generator_cpu));
        }
    } else {
        println!("note: not pinning (--no-pin or fewer than 2 CPUs)");
    }
    let out = a.out.clone().unwrap_or_else(|| PathBuf::from(format!("bench/out/cs-{}", host.started_unix_s)));
    let logs = out.join("logs");
    let runs_dir = out.join("runs");
    for d in [&logs, &runs_dir] {
        std::fs::create_dir_all(d).unwrap_or_else(|e| die(&format!("creating {}: {e}", d.display())));
    }
    let logs = std::fs::canonicalize(&logs).unwrap_or(logs);
    let runs_dir = std::fs::canonicalize(&runs_dir).unwrap_or(runs_dir);
    let exe_dir = std::env::current_exe().ok().and_then(|p| p.parent().map(Path::to_path_buf)).unwrap_or_default();
    let binary = |given: &Option<PathBuf>, name: &str| {
        let p = given.clone().unwrap_or_else(|| exe_dir.join(name));
        if !p.is_file() {
            die(&format!("no {name} binary at {} (cargo build --release -p switchboard -p switchboard-bench --bins)", p.display()));
        }
        std::fs::canonicalize(&p).unwrap_or(p)
    };
    let switchboard = binary(&a.switchboard_bin, "switchboard");
    let loadgen = binary(&a.loadgen_bin, "loadgen");
    let cs_rate = a.cs_rate.unwrap_or(if q { 1000.0 } else { 2000.0 });
    let pubsub_rate = a.pubsub_rate.unwrap_or(if q { 20_000.0 } else { 50_000.0 });
    let base = CsSettings {
        rate: cs_rate,
        agents: a.agents.unwrap_or(if q { 200 } else { 500 }),
        capacity: a.capacity,
        agent_conns: a.agent_conns,
        open_conns: a.open_conns,
        hold_ms: a.hold_ms,
        duration_s: duration,
        warmup_s: a.warmup.unwrap_or(if q { 1.0 } else { 2.0 }),
        tick_us: a.tick_us,
        drain_s: Duration::from_millis(a.hold_ms).as_secs_f64() + 3.0,
        ..CsSettings::default()
    };
    base.validate().unwrap_or_else(|e| die(&e));
    let slots = f64::from(base.agents) * f64::from(base.capacity);
    println!(
        "csload: {} agents × {} = {slots:.0} slots; {cs_rate:.0} conversations/s × {} ms hold ≈ {:.0} busy; pub/sub {pubsub_rate:.0}/s",
        base.agents,
        base.capacity,
        base.hold_ms,
        base.expected_busy()
    );
    let mut notes = Vec::new();
    if base.expected_busy() > slots * 0.9 {
        notes.push(format!("rate × hold ({:.0}) is close to or over the agents' capacity ({slots:.0}): conversations queue", base.expected_busy()));
    }
    let knobs = DeskKnobs {
        offer_timeout_ms: a.offer_timeout_ms,
        agents_max: (base.agents as usize).max(10_000),
        conversations_max: 100_000,
        queue_length_max: 10_000,
        sessions_per_shard_max: a.sessions_per_shard_max,
    };
    let mut suite = CsSuite {
        host,
        commit: git_commit(),
        command: std::env::args().collect::<Vec<_>>().join(" "),
        runs: Vec::new(),
        notes,
    };
    for name in &a.runs {
        let mut st = base.clone();
        let with_pubsub = name != "cs-only";
        if name == "pubsub-only" {
            st.rate = 0.0;
        }
        let secret = csrun::run_secret();
        let cfg = csrun::write_engine_config(&logs.join(format!("{name}.cfg")), &secret, &knobs).unwrap_or_else(|e| die(&format!("writing the engine config: {e}")));
        let mut spec = ServerSpec::new("switchboard", switchboard.clone());
        spec.extra_args = vec!["--config".into(), cfg.display().to_string(), "--durability".into(), "none".into()];
        let log = logs.join(format!("{name}.server.log"));
        print!("{name:<12}: ");
        let mut server = match RunningServer::start(&spec, pin.then_some(a.server_cpu), &log) {
            Ok(s) => s,
            Err(e) => {
                let why = format!("the engine did not start: {e}: {}", compare::log_tail(&log, 3));
                println!("FAILED: {why}");
                suite.runs.push(CsReport { name: name.clone(), settings: Some(st), errors: vec![why], ..CsReport::default() });
                continue;
            }
        };
        st.addr.clone_from(&server.addr);
        st.server_pid = Some(server.pid());
        st.server_cpu = pin.then_some(a.server_cpu);
        st.generator_cpu = pin.then_some(a.generator_cpu);
        let pubsub = with_pubsub.then(|| PubsubSpec {
            loadgen: loadgen.clone(),
            rate: pubsub_rate,
            token: csrun::token(&secret, "gateway", "loadgen").unwrap_or_else(|e| die(&e)),
            cpu: pin.then_some(a.generator_cpu),
            out_prefix: runs_dir.join(format!("{name}.loadgen")),
        });
        let mut rep = match csrun::run(name, &st, &secret, pubsub.as_ref()) {
            Ok(r) => r,
            Err(e) => CsReport { name: name.clone(), settings: Some(st.clone()), errors: vec![e], ..CsReport::default() },
        };
        if let Some(status) = server.exited() {
            let why = compare::log_panic(&log).unwrap_or_else(|| compare::log_tail(&log, 4));
            rep.errors.insert(0, format!("the engine exited during the run ({status}): {why}"));
        }
        drop(server);
        let (warnings, first) = csrun::log_warnings(&log, 3);
        if warnings > 0 {
            rep.notes.push(format!("engine log: {warnings} WARN/ERROR line(s), first: {}", first.join(" / ")));
        }
        let c = &rep.counts;
        println!(
            "{:>6.0} conv/s  offered p50 {:>6.0} µs  p99 {:>7.0} µs  p99.9 {:>7.0} µs  opened/offered/accepted/closed {}/{}/{}/{}  anomalies {}  server CPU {}{}",
            rep.opens_per_s,
            rep.offered_us.p50,
            rep.offered_us.p99,
            rep.offered_us.p999,
            c.opened,
            c.offered,
            c.accepted,
            c.closed,
            c.anomalies(),
            rep.server.as_ref().map_or_else(|| "-".into(), |s| format!("{:.1} %", s.cpu_cores * 100.0)),
            rep.pubsub.as_ref().map_or_else(String::new, |p| format!(
                "  | pub/sub {:.0}/s p99 {:.0} µs lost {}",
                p.publishes_per_s, p.latency_us.p99, p.accounting.lost
            ))
        );
        for e in rep.errors.iter().take(5) {
            println!("  error: {e}");
        }
        write(&runs_dir.join(format!("{name}.json")), &(serde_json::to_string_pretty(&rep).expect("serializes") + "\n"));
        suite.runs.push(rep);
    }
    suite.attribute_cpu();
    let md = suite.markdown();
    println!("\n{md}");
    write(&out.join("results.json"), &(serde_json::to_string_pretty(&suite).expect("serializes") + "\n"));
    write(&out.join("table.md"), &md);
    println!("results: {} ({:.0} s)", out.join("results.json").display(), started.elapsed().as_secs_f64());
    if suite.runs.iter().any(|r| !r.errors.is_empty() || !r.counts.clean()) {
        std::process::exit(1);
    }
}

fn git_commit() -> Option<String> {
    let o = Command::new("git").args(["rev-parse", "--short", "HEAD"]).output().ok()?;
    let h = String::from_utf8_lossy(&o.stdout).trim().to_string();
    let dirty = Command::new("git").args(["status", "--porcelain", "--untracked-files=no"]).output().ok().is_some_and(|o| !o.stdout.is_empty());
    (!h.is_empty()).then(|| if dirty { format!("{h}+dirty") } else { h })
}

fn write(p: &Path, s: &str) {
    if let Err(e) = std::fs::write(p, s) {
        eprintln!("csload: writing {}: {e}", p.display());
    }
}

fn die(msg: &str) -> ! {
    eprintln!("csload: {msg}");
    std::process::exit(2);
}
