//! `durable`: issue 6's numbers in one command. On one disk, in one run:
//! 1. the bare fdatasync latency of the directory the servers keep their data in
//!    (`O_DIRECT` sequential appends into a preallocated file, like the journal);
//! 2. publish → acknowledgement latency, paced open loop (`--rate` over
//!    `--latency-publishers` connections), for Switchboard in each `--sb-durability` mode
//!    (passed to the engine as `serve --durability MODE`) and for NATS `JetStream` (file storage);
//! 3. acknowledged publishes/s against the number of publisher connections (`--max`, a window
//!    of `--scaling-window` per connection), Switchboard in the first mode and `JetStream`.
//!
//! Servers run on 127.0.0.1 pinned to `--server-cpu`, fresh for every run, stopped by PID; the
//! generator runs in this process pinned to `--generator-cpu`. Output: `results.json`,
//! `table.md`, `runs/*.json`, `logs/` under `--out`. A server that refuses its arguments (an
//! engine without `--durability`) is reported in the table, not fatal.

#![allow(clippy::cast_precision_loss)]

use clap::Parser;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::Instant;
use switchboard_bench::ack::mock::AckFaults;
use switchboard_bench::ackrun::{self, AckSettings};
use switchboard_bench::backend::BackendKind;
use switchboard_bench::compare::{self, RunningServer, ServerSpec};
use switchboard_bench::durable::{self, Suite, SuiteRun, Target};
use switchboard_bench::fsync::{self, ProbeSettings, WriteMode};
use switchboard_bench::report::Host;

/// Most publisher connections in one run (two generator threads each).
const PUBLISHERS_MAX: u32 = 256;

#[derive(Parser, Debug)]
#[command(version, about = "Durable acknowledgements: bare fdatasync vs Switchboard vs NATS JetStream")]
struct Args {
    /// Short runs (about 1 minute in all).
    #[arg(long)]
    quick: bool,
    /// Output folder (default bench/out/durable-<unix time>).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Servers: switchboard, jetstream (comma separated).
    #[arg(long, default_value = "switchboard,jetstream", value_delimiter = ',')]
    servers: Vec<String>,
    /// Switchboard durability modes, each run as `serve --durability MODE`; `default` runs
    /// without the flag (an engine that has no journal yet).
    #[arg(long, default_value = "sync,interval")]
    sb_durability: String,
    /// The switchboard server binary (default: `switchboard` next to this binary).
    #[arg(long)]
    switchboard_bin: Option<PathBuf>,
    /// Latency runs: publishes per second, all publishers together.
    #[arg(long, default_value_t = 10_000.0)]
    rate: f64,
    /// Latency runs: publisher connections.
    #[arg(long, default_value_t = 16)]
    latency_publishers: u32,
    /// Scaling runs: publisher connection counts.
    #[arg(long, default_value = "1,4,16,64")]
    scaling_publishers: String,
    /// Scaling runs: unacknowledged publishes per connection (1 = synchronous clients).
    #[arg(long, default_value_t = 1)]
    scaling_window: u64,
    /// Payload bytes.
    #[arg(long, default_value_t = 128)]
    payload: usize,
    /// Measured seconds per run (default 5; 2 with --quick; at most 10).
    #[arg(long)]
    duration: Option<f64>,
    /// fdatasync probe: write sizes.
    #[arg(long, default_value = "4k,64k")]
    fsync_sizes: String,
    /// fdatasync probe: `direct`, `buffered` (comma separated).
    #[arg(long, value_enum, default_value = "direct,buffered", value_delimiter = ',')]
    fsync_modes: Vec<WriteMode>,
    /// CPU the servers are pinned to.
    #[arg(long, default_value_t = 1)]
    server_cpu: usize,
    /// CPU the generator (this process) is pinned to.
    #[arg(long, default_value_t = 0)]
    generator_cpu: usize,
    /// Do not pin anything.
    #[arg(long)]
    no_pin: bool,
}

struct Ctx {
    logs: PathBuf,
    runs_dir: PathBuf,
    server_cpu: Option<usize>,
    switchboard: Option<PathBuf>,
    nats: Option<PathBuf>,
    payload: usize,
    duration_s: f64,
    warmup_s: f64,
}

#[allow(clippy::too_many_lines)]
fn main() {
    let a = Args::parse();
    let started = Instant::now();
    let modes = durable::parse_modes(&a.sb_durability).unwrap_or_else(|e| die(&e));
    let scaling = durable::parse_counts(&a.scaling_publishers, PUBLISHERS_MAX).unwrap_or_else(|e| die(&e));
    let sizes = fsync::parse_sizes(&a.fsync_sizes).unwrap_or_else(|e| die(&e));
    let duration_s = a.duration.unwrap_or(if a.quick { 2.0 } else { 5.0 });
    if !(duration_s > 0.0 && duration_s <= 10.0) {
        die("--duration must be > 0 and at most 10 s");
    }
    if a.latency_publishers == 0 || a.latency_publishers > PUBLISHERS_MAX {
        die(&format!("--latency-publishers must be 1 ..= {PUBLISHERS_MAX}"));
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
    let out = a.out.clone().unwrap_or_else(|| PathBuf::from(format!("bench/out/durable-{}", host.started_unix_s)));
    let logs = out.join("logs");
    let runs_dir = out.join("runs");
    for d in [&logs, &runs_dir] {
        std::fs::create_dir_all(d).unwrap_or_else(|e| die(&format!("creating {}: {e}", d.display())));
    }
    let exe_dir = std::env::current_exe().ok().and_then(|p| p.parent().map(Path::to_path_buf)).unwrap_or_default();
    let mut notes = Vec::new();
    let want = |s: &str| a.servers.iter().any(|x| x == s);
    let switchboard = if want("switchboard") {
        let p = a.switchboard_bin.clone().unwrap_or_else(|| exe_dir.join("switchboard"));
        if p.is_file() {
            // Servers start in their scratch directory: a relative path would not resolve.
            Some(std::fs::canonicalize(&p).unwrap_or(p))
        } else {
            notes.push(format!("switchboard skipped: no binary at {} (cargo build --release -p switchboard)", p.display()));
            None
        }
    } else {
        None
    };
    let nats = if want("jetstream") {
        let n = compare::which("nats-server");
        if n.is_none() {
            notes.push("jetstream skipped: nats-server not found (apt-get install nats-server)".into());
        }
        n
    } else {
        None
    };
    if let Some(n) = &nats {
        let v = Command::new(n).arg("--version").output().map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string()).unwrap_or_default();
        notes.push(format!(
            "{v}: JetStream acknowledges after writing to its file store and fsyncs on a timer (2 min by default; `sync_interval` only exists from 2.10), so its acknowledgement survives a process kill, not a power loss"
        ));
    }
    for n in &notes {
        println!("{n}");
    }
    let ctx = Ctx {
        logs: logs.clone(),
        runs_dir,
        server_cpu: if pin { Some(a.server_cpu) } else { None },
        switchboard,
        nats,
        payload: a.payload,
        duration_s,
        warmup_s: if a.quick { 0.5 } else { 1.0 },
    };

    // 1. The disk alone, in the directory the servers' data directories are created in.
    let probe_dir = logs.join("fsync.data");
    let mut probes = Vec::new();
    for &mode in &a.fsync_modes {
        for &size in &sizes {
            let st = ProbeSettings {
                dir: probe_dir.clone(),
                write_bytes: size,
                mode,
                rounds_max: 5000,
                duration_s: if a.quick { 1.0 } else { 3.0 },
                file_bytes: 64 << 20,
            };
            match fsync::probe(&st) {
                Ok(r) => {
                    println!(
                        "fdatasync {:>7} {:<8}: p50 {:>6.0} µs  p99 {:>6.0} µs  ({:.0} ops/s)",
                        fsync::fmt_size(size),
                        r.mode,
                        r.fdatasync_us.p50,
                        r.fdatasync_us.p99,
                        r.rounds_per_s
                    );
                    probes.push(r);
                }
                Err(e) => {
                    println!("fdatasync probe {} {mode:?} failed: {e}", fsync::fmt_size(size));
                    notes.push(format!("fdatasync probe {} {mode:?} failed: {e}", fsync::fmt_size(size)));
                }
            }
        }
    }
    let _ = std::fs::remove_dir(&probe_dir);

    // 2. Paced latency, every target; 3. throughput against publisher connections.
    let mut targets = Vec::new();
    if ctx.switchboard.is_some() {
        targets.extend(modes.iter().map(|m| Target { server: "switchboard".into(), durability: m.clone() }));
    }
    if ctx.nats.is_some() {
        targets.push(Target { server: "jetstream".into(), durability: None });
    }
    let mut runs = Vec::new();
    for t in &targets {
        runs.push(one_run(&ctx, "latency", t, a.latency_publishers, Some(a.rate), 1));
    }
    let scaling_targets: Vec<&Target> = {
        let sb = targets.iter().find(|t| t.server == "switchboard" && t.durability.as_deref() == Some("sync")).or_else(|| targets.iter().find(|t| t.server == "switchboard"));
        sb.into_iter().chain(targets.iter().filter(|t| t.server == "jetstream")).collect()
    };
    for &p in &scaling {
        for t in &scaling_targets {
            runs.push(one_run(&ctx, "scaling", t, p, None, a.scaling_window));
        }
    }

    let suite = Suite {
        host,
        commit: git_commit(),
        rate: a.rate,
        latency_publishers: a.latency_publishers,
        scaling_window: a.scaling_window,
        payload: a.payload,
        duration_s,
        fsync: probes,
        runs,
        notes,
    };
    let md = suite.markdown();
    println!("\n{md}");
    write(&out.join("results.json"), &(serde_json::to_string_pretty(&suite).expect("serializes") + "\n"));
    write(&out.join("table.md"), &md);
    println!("results: {} ({:.0} s)", out.join("results.json").display(), started.elapsed().as_secs_f64());
}

fn one_run(ctx: &Ctx, kind: &str, target: &Target, publishers: u32, rate: Option<f64>, window: u64) -> SuiteRun {
    let mut rec = SuiteRun { kind: kind.into(), target: target.clone(), publishers, report: None, error: None };
    let tag = format!("{kind}-{}-p{publishers}", target.label().replace([' ', '(', ')'], ""));
    print!("{kind:<8} {:<22} {publishers:>3} publishers: ", target.label());
    let (binary, backend) = match target.server.as_str() {
        "switchboard" => (ctx.switchboard.clone(), BackendKind::Switchboard),
        _ => (ctx.nats.clone(), BackendKind::Jetstream),
    };
    let Some(binary) = binary else {
        rec.error = Some("no server binary".into());
        println!("skipped");
        return rec;
    };
    let mut spec = ServerSpec::new(&target.server, binary);
    spec.extra_args = target.extra_args();
    let log = ctx.logs.join(format!("{tag}.server.log"));
    let mut server = match RunningServer::start(&spec, ctx.server_cpu, &log) {
        Ok(s) => s,
        Err(e) => {
            let why = format!("{} did not start with `{}`: {e}: {}", target.server, spec.extra_args.join(" "), compare::log_tail(&log, 3));
            println!("FAILED: {why}");
            rec.error = Some(why);
            return rec;
        }
    };
    let st = AckSettings {
        backend: target.server.clone(),
        addr: server.addr.clone(),
        publishers,
        sessions: 1000.max(publishers),
        payload: ctx.payload,
        rate,
        max: rate.is_none(),
        window,
        duration_s: ctx.duration_s,
        warmup_s: ctx.warmup_s,
        server_pid: Some(server.pid()),
        drain_s: 3.0,
        durability_requested: target.durability.clone(),
        ..AckSettings::default()
    };
    let be: Arc<dyn switchboard_bench::ack::AckBackend> = match backend.build_ack(&server.addr, AckFaults::default()) {
        Ok(b) => b,
        Err(e) => {
            rec.error = Some(e);
            return rec;
        }
    };
    match ackrun::run(&st, &be) {
        Ok(o) => {
            let r = o.report;
            println!(
                "{:>8.0} acks/s  p50 {:>7.0} µs  p99 {:>7.0} µs  claimed {}  lost/err {}/{}",
                r.acks_per_s,
                r.latency_us.p50,
                r.latency_us.p99,
                r.counts.claim_summary(),
                r.counts.lost,
                r.counts.errors
            );
            let mut errs = r.errors.clone();
            if let Some(st) = server.exited() {
                let why = compare::log_panic(&log).unwrap_or_else(|| compare::log_tail(&log, 4));
                errs.insert(0, format!("server exited during the run ({st}): {why}"));
            }
            if !errs.is_empty() {
                errs.truncate(3);
                println!("  errors: {}", errs.join("; "));
                rec.error = Some(errs.join("; "));
            }
            write(&ctx.runs_dir.join(format!("{tag}.json")), &(serde_json::to_string_pretty(&r).expect("serializes") + "\n"));
            rec.report = Some(r);
        }
        Err(e) => {
            println!("FAILED: {e}");
            rec.error = Some(e);
        }
    }
    drop(server);
    rec
}

fn git_commit() -> Option<String> {
    let o = Command::new("git").args(["rev-parse", "--short", "HEAD"]).output().ok()?;
    let h = String::from_utf8_lossy(&o.stdout).trim().to_string();
    let dirty = Command::new("git").args(["status", "--porcelain", "--untracked-files=no"]).output().ok().is_some_and(|o| !o.stdout.is_empty());
    (!h.is_empty()).then(|| if dirty { format!("{h}+dirty") } else { h })
}

fn write(p: &Path, s: &str) {
    if let Err(e) = std::fs::write(p, s) {
        eprintln!("durable: writing {}: {e}", p.display());
    }
}

fn die(msg: &str) -> ! {
    eprintln!("durable: {msg}");
    std::process::exit(2);
}
