//! `compare`: the side-by-side matrix against nats-server, redis-server and switchboard.
//!
//! Installs nats-server and redis-server (and a font for the plot) from Debian packages if
//! missing, starts each server on 127.0.0.1 pinned to one CPU with the generator on another,
//! runs the same cases against each (repetitions interleaved), prints medians with ratios
//! against NATS, and writes `results.json`, `table.txt`, `compare.png` and every run's JSON and
//! logs under `--out`. Every server it starts is stopped by PID.

#![allow(clippy::cast_precision_loss)]

use clap::Parser;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};
use switchboard_bench::backend::BackendKind;
use switchboard_bench::compare::{self, Comparison, RunRecord, RunningServer, ServerSpec};
use switchboard_bench::report::{Host, Report};

#[derive(Parser, Debug)]
#[command(version, about = "Run the same load against NATS, Redis and Switchboard and compare")]
struct Args {
    /// Smoke check: fewer cases, one repetition, short runs (under 2 minutes).
    #[arg(long)]
    quick: bool,
    /// Repetitions per (case, server); default 3 (1 with --quick).
    #[arg(long)]
    reps: Option<u32>,
    /// Override every case's measured seconds.
    #[arg(long)]
    duration: Option<f64>,
    /// Output folder (default bench/out/compare-<unix time>).
    #[arg(long)]
    out: Option<PathBuf>,
    /// Servers to run, comma separated: nats, redis, switchboard, and floor (the minimal
    /// forwarder of `bench/src/bin/floor.rs`: what the kernel alone costs for this workload).
    #[arg(long, default_value = "nats,redis,switchboard", value_delimiter = ',')]
    servers: Vec<String>,
    /// The switchboard server binary (default: `switchboard` next to this binary).
    #[arg(long)]
    switchboard_bin: Option<PathBuf>,
    /// Do not apt-get install missing servers.
    #[arg(long)]
    no_install: bool,
    /// CPU the servers are pinned to.
    #[arg(long, default_value_t = 1)]
    server_cpu: usize,
    /// CPU the generator is pinned to.
    #[arg(long, default_value_t = 0)]
    generator_cpu: usize,
    /// Do not pin anything.
    #[arg(long)]
    no_pin: bool,
    /// Only these cases (names as printed: paced-50k, max, ...), comma separated.
    #[arg(long, value_delimiter = ',')]
    cases: Vec<String>,
}

fn main() {
    let a = Args::parse();
    let started = Instant::now();
    let exe_dir = std::env::current_exe().ok().and_then(|p| p.parent().map(Path::to_path_buf)).unwrap_or_default();
    let loadgen = exe_dir.join("loadgen");
    if !loadgen.is_file() {
        die(&format!("no loadgen binary at {} (cargo build --release -p switchboard-bench)", loadgen.display()));
    }
    let (workload, mut cases, default_reps) = compare::matrix(a.quick);
    if let Some(d) = a.duration {
        for c in &mut cases {
            c.duration_s = d;
        }
    }
    if !a.cases.is_empty() {
        let known: Vec<String> = cases.iter().map(|c| c.name.clone()).collect();
        if let Some(unknown) = a.cases.iter().find(|n| !known.contains(n)) {
            die(&format!("unknown case {unknown:?}; cases: {}", known.join(", ")));
        }
        cases.retain(|c| a.cases.contains(&c.name));
    }
    let reps = a.reps.unwrap_or(default_reps).max(1);
    let host = Host::current();
    let out = a.out.clone().unwrap_or_else(|| PathBuf::from(format!("bench/out/compare-{}", host.started_unix_s)));
    let logs = out.join("logs");
    let runs_dir = out.join("runs");
    for d in [&logs, &runs_dir] {
        std::fs::create_dir_all(d).unwrap_or_else(|e| die(&format!("creating {}: {e}", d.display())));
    }

    ensure_installed(&a);
    let (servers, skipped) = pick_servers(&a, &exe_dir);
    for (n, why) in &skipped {
        println!("skipping {n}: {why}");
    }
    if servers.is_empty() {
        die("no server to run");
    }
    let pin = !a.no_pin && host.cpus_online >= 2;
    if !pin {
        println!("note: not pinning (--no-pin or fewer than 2 CPUs); servers and generator share CPUs");
    }
    let (server_cpu, gen_cpu) = if pin { (Some(a.server_cpu), Some(a.generator_cpu)) } else { (None, None) };

    let total = reps as usize * cases.len() * servers.len();
    let mut runs = Vec::new();
    let mut k = 0;
    for rep in 0..reps {
        for case in &cases {
            for srv in &servers {
                k += 1;
                let tag = format!("{}-{}-r{}", case.name, srv.name, rep);
                print!("[{k}/{total}] {:<10} {:<12} rep {}: ", case.name, srv.name, rep + 1);
                let rec = one_run(srv, case, &workload, rep, server_cpu, gen_cpu, &loadgen, &logs, &runs_dir, &tag);
                match (&rec.report, &rec.error) {
                    (Some(r), None) => println!(
                        "{:>9.0} deliv/s  p99 {:>8.0} µs  server CPU {:>5.1} %  RSS {}{}",
                        r.deliveries_per_s,
                        r.latency_us.p99,
                        r.server.as_ref().map_or(0.0, |s| s.cpu_cores * 100.0),
                        switchboard_bench::report::fmt_kb(r.server.as_ref().and_then(|s| s.rss_setup_kb)),
                        if r.accounting.clean() { String::new() } else { format!("  ANOMALIES {:?}", r.accounting) }
                    ),
                    (_, Some(e)) => println!("FAILED: {e}"),
                    _ => println!("no report"),
                }
                runs.push(rec);
            }
        }
    }
    let summary = compare::summarize(&cases, &servers, &runs);
    let pairs = compare::pairs(&cases, &servers, &runs);
    let c = Comparison {
        host,
        quick: a.quick,
        reps,
        workload,
        cases,
        servers,
        skipped,
        server_cpu,
        generator_cpu: gen_cpu,
        runs,
        summary,
        pairs,
    };
    let table = compare::table(&c);
    println!("\n{table}");
    let json = serde_json::to_string_pretty(&c).expect("serializes");
    write(&out.join("results.json"), &(json + "\n"));
    write(&out.join("table.txt"), &table);
    let png = out.join("compare.png");
    match switchboard_bench::plot::plot(&c, &png) {
        Ok(()) => println!("plot: {}", png.display()),
        Err(e) => println!("plot skipped: {e}"),
    }
    println!("results: {} ({:.0} s)", out.join("results.json").display(), started.elapsed().as_secs_f64());
}

#[allow(clippy::too_many_arguments)]
fn one_run(
    srv: &ServerSpec,
    case: &compare::CaseSpec,
    w: &compare::Workload,
    rep: u32,
    server_cpu: Option<usize>,
    gen_cpu: Option<usize>,
    loadgen: &Path,
    logs: &Path,
    runs_dir: &Path,
    tag: &str,
) -> RunRecord {
    let mut rec = RunRecord { case: case.name.clone(), server: srv.name.clone(), rep, report: None, error: None };
    let server = match RunningServer::start(srv, server_cpu, &logs.join(format!("{tag}.server.log"))) {
        Ok(s) => s,
        Err(e) => {
            rec.error = Some(format!("starting {}: {e}", srv.name));
            return rec;
        }
    };
    let json = runs_dir.join(format!("{tag}.json"));
    let mut args: Vec<String> = vec![
        "--backend".into(),
        srv.backend().to_string(),
        "--addr".into(),
        server.addr.clone(),
        "--server-pid".into(),
        server.pid().to_string(),
        "--sessions".into(),
        case.sessions.to_string(),
        "--subscribers".into(),
        w.subscribers.to_string(),
        "--gateways".into(),
        w.gateways.to_string(),
        "--publishers".into(),
        w.publishers.to_string(),
        "--payload".into(),
        w.payload.to_string(),
        "--duration".into(),
        case.duration_s.to_string(),
        "--warmup".into(),
        case.warmup_s.to_string(),
        "--json".into(),
        json.display().to_string(),
        "--hgrm".into(),
        runs_dir.join(format!("{tag}.hgrm")).display().to_string(),
    ];
    match case.rate {
        Some(r) => args.extend(["--rate".into(), r.to_string()]),
        None => args.push("--max".into()),
    }
    let log = logs.join(format!("{tag}.loadgen.log"));
    let budget = Duration::from_secs_f64(case.duration_s + case.warmup_s + 120.0 + 10.0);
    let status = std::fs::File::create(&log).and_then(|f| {
        let mut child = compare::pinned_command(loadgen, gen_cpu)
            .args(&args)
            .stdin(Stdio::null())
            .stdout(f.try_clone()?)
            .stderr(f)
            .spawn()?;
        let deadline = Instant::now() + budget;
        loop {
            if let Some(st) = child.try_wait()? {
                return Ok(st);
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                let _ = child.wait();
                return Err(std::io::Error::other("loadgen overran its time budget and was killed"));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    });
    drop(server); // stopped by PID
    match status {
        Err(e) => rec.error = Some(e.to_string()),
        Ok(st) => {
            match std::fs::read_to_string(&json).map_err(|e| e.to_string()).and_then(|s| serde_json::from_str::<Report>(&s).map_err(|e| e.to_string())) {
                Ok(r) => {
                    if !r.errors.is_empty() {
                        rec.error = Some(r.errors.join("; "));
                    }
                    rec.report = Some(r);
                }
                Err(e) => {
                    let tail: String = std::fs::read_to_string(&log).unwrap_or_default().lines().rev().take(3).collect::<Vec<_>>().join(" | ");
                    rec.error = Some(format!("loadgen {st}: no report ({e}); log: {tail}"));
                }
            }
        }
    }
    rec
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

/// apt-get install what is missing: nats-server, redis-server, and a font for the plot.
fn ensure_installed(a: &Args) {
    let mut missing = Vec::new();
    if a.servers.iter().any(|s| s == "nats") && compare::which("nats-server").is_none() {
        missing.push("nats-server");
    }
    if a.servers.iter().any(|s| s == "redis") && compare::which("redis-server").is_none() {
        missing.push("redis-server");
    }
    if !switchboard_bench::plot::FONTS.iter().any(|f| Path::new(f).is_file()) {
        missing.push("fonts-dejavu-core");
    }
    if missing.is_empty() {
        return;
    }
    if a.no_install || !is_root() || compare::which("apt-get").is_none() {
        println!("missing {} (not installing: --no-install, not root, or no apt-get)", missing.join(" "));
        return;
    }
    println!("installing {} with apt-get …", missing.join(" "));
    let ok = Command::new("apt-get").arg("update").arg("-qq").status().is_ok_and(|s| s.success())
        && Command::new("apt-get")
            .args(["install", "-y", "-qq", "--no-install-recommends"])
            .args(&missing)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .status()
            .is_ok_and(|s| s.success());
    if !ok {
        println!("apt-get install failed; continuing with what is there");
    }
    // Debian's redis-server package starts a service where systemd runs; ours are separate
    // processes on their own ports, so that does not matter here.
}

fn pick_servers(a: &Args, exe_dir: &Path) -> (Vec<ServerSpec>, Vec<(String, String)>) {
    let mut servers = Vec::new();
    let mut skipped = Vec::new();
    for name in &a.servers {
        let bin = match name.as_str() {
            "nats" => compare::which("nats-server").ok_or("nats-server not found (apt-get install nats-server)".to_string()),
            "redis" => compare::which("redis-server").ok_or("redis-server not found (apt-get install redis-server)".to_string()),
            "switchboard" => {
                let p = a.switchboard_bin.clone().unwrap_or_else(|| exe_dir.join("switchboard"));
                if <BackendKind as clap::ValueEnum>::from_str("switchboard", true).is_err() {
                    Err("loadgen has no switchboard backend yet".to_string())
                } else if p.is_file() {
                    Ok(p)
                } else {
                    Err(format!("no server binary at {} (cargo build --release -p switchboard)", p.display()))
                }
            }
            "floor" => {
                let p = exe_dir.join("floor");
                if p.is_file() { Ok(p) } else { Err(format!("no floor binary at {} (cargo build --release -p switchboard-bench)", p.display())) }
            }
            other => Err(format!("unknown server {other:?}")),
        };
        match bin {
            Ok(binary) => servers.push(ServerSpec::new(name, binary)),
            Err(why) => skipped.push((name.clone(), why)),
        }
    }
    (servers, skipped)
}

fn write(p: &Path, s: &str) {
    if let Err(e) = std::fs::write(p, s) {
        eprintln!("compare: writing {}: {e}", p.display());
    }
}

fn die(msg: &str) -> ! {
    eprintln!("compare: {msg}");
    std::process::exit(2);
}
