//! The side-by-side comparison: start each server on loopback pinned to one core, run the same
//! matrix of `loadgen` runs against each with the generator pinned to the other core,
//! repetitions interleaved, then medians, ratios against NATS, JSON and a plot.
//!
//! Servers are started by this process and stopped by PID (SIGTERM, then SIGKILL); they also
//! get `PR_SET_PDEATHSIG` so they die with it if it is killed. All traffic is on 127.0.0.1.

use crate::report::{Host, Report};
use serde::{Deserialize, Serialize};
use std::fmt::Write as _;
use std::io;
use std::net::{TcpListener, TcpStream};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// One server of the comparison.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ServerSpec {
    /// Name, also the `loadgen --backend` value.
    pub name: String,
    /// Binary to start.
    pub binary: PathBuf,
    /// Arguments added after the ones [`ServerSpec::args`] builds (e.g. switchboard's
    /// `--durability sync`).
    #[serde(default)]
    pub extra_args: Vec<String>,
}

impl ServerSpec {
    /// A server with no extra arguments.
    pub fn new(name: &str, binary: PathBuf) -> Self {
        ServerSpec { name: name.into(), binary, extra_args: Vec::new() }
    }

    /// The `loadgen --backend` that drives it: its name, except `floor` (the minimal
    /// forwarder, `bench/src/bin/floor.rs`), which speaks Redis's pub/sub subset.
    pub fn backend(&self) -> &str {
        if self.name == "floor" { "redis" } else { &self.name }
    }

    /// Arguments to listen on 127.0.0.1:`port` and nothing else; `scratch` is a fresh folder
    /// for any state the server keeps on disk (`jetstream`: nats-server `-js` with its store
    /// in `scratch/js`; `switchboard`: `--data-dir scratch`; `floor`: `--listen` only). Then
    /// [`ServerSpec::extra_args`].
    pub fn args(&self, port: u16, scratch: &Path) -> io::Result<Vec<String>> {
        let p = port.to_string();
        let mut args: Vec<String> = match self.name.as_str() {
            "nats" => vec!["-a".into(), "127.0.0.1".into(), "-p".into(), p],
            "jetstream" => vec!["-a".into(), "127.0.0.1".into(), "-p".into(), p, "-js".into(), "-sd".into(), scratch.join("js").display().to_string()],
            "floor" => vec!["--listen".into(), format!("127.0.0.1:{port}")],
            "redis" => ["--bind", "127.0.0.1", "--port", &p, "--save", "", "--appendonly", "no", "--daemonize", "no"]
                .iter()
                .map(|s| (*s).to_string())
                .collect(),
            _ => vec![
                "serve".into(),
                "--listen".into(),
                format!("127.0.0.1:{port}"),
                "--control".into(),
                format!("127.0.0.1:{}", free_port()?),
                "--shards".into(),
                "1".into(),
                "--data-dir".into(),
                scratch.display().to_string(),
            ],
        };
        // The pub/sub peers keep nothing (NATS core, Redis pub/sub): unless told otherwise (the
        // durable suite passes its own `--durability`), the engine runs memory-only too.
        if self.name == SWITCHBOARD && !self.extra_args.iter().any(|a| a == "--durability") {
            args.extend(["--durability".to_string(), "none".to_string()]);
        }
        args.extend(self.extra_args.iter().cloned());
        Ok(args)
    }
}

/// One cell of the matrix (the common workload plus what varies).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CaseSpec {
    /// Short name (`paced-20k`, `max`, `mem-100k`).
    pub name: String,
    /// Sessions.
    pub sessions: u32,
    /// Paced rate (publishes/s), or `None` for `--max`.
    pub rate: Option<f64>,
    /// Measured seconds.
    pub duration_s: f64,
    /// Warmup seconds.
    pub warmup_s: f64,
}

/// The workload common to every case.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Workload {
    /// Subscribers per session.
    pub subscribers: u32,
    /// Gateway connections.
    pub gateways: u32,
    /// Publisher connections.
    pub publishers: u32,
    /// Payload bytes.
    pub payload: usize,
}

/// The default matrix; `quick` keeps it under two minutes.
pub fn matrix(quick: bool) -> (Workload, Vec<CaseSpec>, u32) {
    let w = Workload { subscribers: 3, gateways: 8, publishers: 2, payload: 128 };
    let (dur, warm) = if quick { (3.0, 1.0) } else { (8.0, 2.0) };
    let paced = |r: f64| CaseSpec { name: format!("paced-{}k", r / 1000.0), sessions: 1000, rate: Some(r), duration_s: dur, warmup_s: warm };
    let mut cases: Vec<CaseSpec> = if quick { vec![paced(20_000.0)] } else { vec![paced(20_000.0), paced(50_000.0), paced(100_000.0)] };
    cases.push(CaseSpec { name: "max".into(), sessions: 1000, rate: None, duration_s: dur, warmup_s: warm });
    cases.push(CaseSpec {
        name: "mem-100k".into(),
        sessions: 100_000,
        rate: Some(10_000.0),
        duration_s: if quick { 1.0 } else { 3.0 },
        warmup_s: 1.0,
    });
    (w, cases, if quick { 1 } else { 3 })
}

/// One loadgen run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunRecord {
    /// Case name.
    pub case: String,
    /// Server name.
    pub server: String,
    /// Repetition (from 0).
    pub rep: u32,
    /// The loadgen report, if it produced one.
    pub report: Option<Report>,
    /// What went wrong, if anything.
    pub error: Option<String>,
}

/// Medians over the repetitions of one (case, server).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Summary {
    /// Case name.
    pub case: String,
    /// Server name.
    pub server: String,
    /// Offered rate (paced) or `None` (`--max`).
    pub rate: Option<f64>,
    /// Runs that produced a valid report.
    pub runs: usize,
    /// Median deliveries/s.
    pub deliveries_per_s: f64,
    /// Median publishes/s.
    pub publishes_per_s: f64,
    /// Median p50 latency, µs.
    pub p50_us: f64,
    /// Median p90 latency, µs.
    pub p90_us: f64,
    /// Median p99 latency, µs.
    pub p99_us: f64,
    /// Median p99.9 latency, µs.
    pub p999_us: f64,
    /// Median p99.99 latency, µs.
    pub p9999_us: f64,
    /// Median max latency, µs.
    pub max_us: f64,
    /// Median server CPU, % of one core.
    pub server_cpu_pct: f64,
    /// Median server CPU ns per delivery.
    pub cpu_ns_per_delivery: Option<f64>,
    /// Median server RSS after setup, MiB.
    pub rss_setup_mib: Option<f64>,
    /// Median server RSS at the end, MiB.
    pub rss_end_mib: Option<f64>,
    /// Worst run's lost + duplicated + reordered + unexpected deliveries.
    pub anomalies: u64,
    /// Some run flagged the generator as a possible bottleneck.
    pub generator_bottleneck: bool,
    /// Median cores used by other processes during the runs (noise).
    #[serde(default)]
    pub other_cores: f64,
    /// Percentile spectrum `(percentile, µs)` of the run with the median p99.
    pub spectrum: Vec<(f64, f64)>,
    /// p99 / NATS p99 (same case).
    pub p99_vs_nats: Option<f64>,
    /// CPU ns per delivery / NATS's.
    pub cpu_vs_nats: Option<f64>,
    /// Deliveries/s / NATS's.
    pub deliveries_vs_nats: Option<f64>,
    /// RSS after setup / NATS's.
    pub rss_vs_nats: Option<f64>,
}

/// A whole comparison (written as `results.json`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Comparison {
    /// Machine and start time.
    pub host: Host,
    /// `--quick`.
    pub quick: bool,
    /// Repetitions per (case, server).
    pub reps: u32,
    /// Common workload.
    pub workload: Workload,
    /// Cases in order.
    pub cases: Vec<CaseSpec>,
    /// Servers run.
    pub servers: Vec<ServerSpec>,
    /// Servers skipped and why.
    pub skipped: Vec<(String, String)>,
    /// CPU the servers were pinned to, and the generator's (None = not pinned).
    pub server_cpu: Option<usize>,
    /// CPU the generator was pinned to.
    pub generator_cpu: Option<usize>,
    /// Every run.
    pub runs: Vec<RunRecord>,
    /// Medians.
    pub summary: Vec<Summary>,
    /// Switchboard against each peer, repetition by repetition.
    #[serde(default)]
    pub pairs: Vec<PairCount>,
}

/// How often Switchboard beat one peer in the runs of the same repetition (which ran back to
/// back, so they shared the machine's state): the medians alone hide whether a lead is steady
/// or carried by a few runs.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PairCount {
    /// Case name.
    pub case: String,
    /// The peer (`nats`, `redis`, `floor`).
    pub peer: String,
    /// Repetitions in which both produced a report with the server's CPU.
    pub pairs: u32,
    /// Of those, Switchboard's p99 was lower.
    pub p99_lower: u32,
    /// Switchboard's CPU per delivery was lower.
    pub cpu_lower: u32,
    /// Both were lower.
    pub both_lower: u32,
}

/// Name of our server in the comparison.
pub const SWITCHBOARD: &str = "switchboard";

fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return 0.0;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 { v[n / 2] } else { f64::midpoint(v[n / 2 - 1], v[n / 2]) }
}

fn median_opt(v: Vec<Option<f64>>) -> Option<f64> {
    let v: Vec<f64> = v.into_iter().flatten().collect();
    if v.is_empty() { None } else { Some(median(v)) }
}

/// Compute the medians and ratios against NATS.
pub fn summarize(cases: &[CaseSpec], servers: &[ServerSpec], runs: &[RunRecord]) -> Vec<Summary> {
    let mut out = Vec::new();
    for c in cases {
        for s in servers {
            let reps: Vec<&Report> = runs
                .iter()
                .filter(|r| r.case == c.name && r.server == s.name && r.error.is_none())
                .filter_map(|r| r.report.as_ref())
                .collect();
            let m = |f: &dyn Fn(&Report) -> f64| median(reps.iter().map(|r| f(r)).collect());
            let mo = |f: &dyn Fn(&Report) -> Option<f64>| median_opt(reps.iter().map(|r| f(r)).collect());
            let mut by_p99: Vec<&&Report> = reps.iter().collect();
            by_p99.sort_by(|a, b| a.latency_us.p99.total_cmp(&b.latency_us.p99));
            out.push(Summary {
                case: c.name.clone(),
                server: s.name.clone(),
                rate: c.rate,
                runs: reps.len(),
                deliveries_per_s: m(&|r| r.deliveries_per_s),
                publishes_per_s: m(&|r| r.publishes_per_s),
                p50_us: m(&|r| r.latency_us.p50),
                p90_us: m(&|r| r.latency_us.p90),
                p99_us: m(&|r| r.latency_us.p99),
                p999_us: m(&|r| r.latency_us.p999),
                p9999_us: m(&|r| r.latency_us.p9999),
                max_us: m(&|r| r.latency_us.max),
                server_cpu_pct: m(&|r| r.server.as_ref().map_or(0.0, |s| s.cpu_cores * 100.0)),
                cpu_ns_per_delivery: mo(&|r| r.server.as_ref().and_then(|s| s.cpu_ns_per_delivery)),
                rss_setup_mib: mo(&|r| r.server.as_ref().and_then(|s| s.rss_setup_kb).map(|k| k as f64 / 1024.0)),
                rss_end_mib: mo(&|r| r.server.as_ref().and_then(|s| s.rss_end_kb).map(|k| k as f64 / 1024.0)),
                anomalies: reps
                    .iter()
                    .map(|r| {
                        let a = &r.accounting;
                        a.lost + a.duplicated + a.reordered + a.unexpected
                    })
                    .max()
                    .unwrap_or(0),
                generator_bottleneck: reps.iter().any(|r| r.generator.bottleneck),
                other_cores: m(&|r| r.machine.other_cores),
                spectrum: by_p99.get(by_p99.len().saturating_sub(1) / 2).map(|r| r.spectrum.clone()).unwrap_or_default(),
                ..Summary::default()
            });
        }
    }
    let ratio = |a: Option<f64>, b: Option<f64>| match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => Some(a / b),
        _ => None,
    };
    let copy = out.clone();
    for s in &mut out {
        let Some(n) = copy.iter().find(|n| n.case == s.case && n.server == "nats" && n.runs > 0) else { continue };
        if s.runs == 0 {
            continue;
        }
        s.p99_vs_nats = ratio(Some(s.p99_us), Some(n.p99_us));
        s.cpu_vs_nats = ratio(s.cpu_ns_per_delivery, n.cpu_ns_per_delivery);
        s.deliveries_vs_nats = ratio(Some(s.deliveries_per_s), Some(n.deliveries_per_s));
        s.rss_vs_nats = ratio(s.rss_setup_mib, n.rss_setup_mib);
    }
    out
}

/// Switchboard against every other server, per case, repetition by repetition.
pub fn pairs(cases: &[CaseSpec], servers: &[ServerSpec], runs: &[RunRecord]) -> Vec<PairCount> {
    let valid = |case: &str, server: &str, rep: u32| {
        runs.iter()
            .find(|r| r.case == case && r.server == server && r.rep == rep && r.error.is_none())
            .and_then(|r| r.report.as_ref())
            .and_then(|r| Some((r.latency_us.p99, r.server.as_ref()?.cpu_ns_per_delivery?)))
    };
    let mut out = Vec::new();
    if !servers.iter().any(|s| s.name == SWITCHBOARD) {
        return out;
    }
    for c in cases {
        for peer in servers.iter().filter(|s| s.name != SWITCHBOARD) {
            let mut count = PairCount { case: c.name.clone(), peer: peer.name.clone(), ..PairCount::default() };
            let reps = runs.iter().filter(|r| r.case == c.name && r.server == SWITCHBOARD).map(|r| r.rep);
            for rep in reps {
                let (Some((our_p99, our_cpu)), Some((their_p99, their_cpu))) = (valid(&c.name, SWITCHBOARD, rep), valid(&c.name, &peer.name, rep)) else {
                    continue;
                };
                count.pairs += 1;
                count.p99_lower += u32::from(our_p99 < their_p99);
                count.cpu_lower += u32::from(our_cpu < their_cpu);
                count.both_lower += u32::from(our_p99 < their_p99 && our_cpu < their_cpu);
            }
            if count.pairs > 0 {
                out.push(count);
            }
        }
    }
    out
}

fn fx(v: Option<f64>) -> String {
    v.map_or_else(|| "-".into(), |v| format!("{v:.2}×"))
}

/// The medians as one table.
pub fn table(c: &Comparison) -> String {
    let mut o = String::new();
    let _ = writeln!(
        o,
        "Medians of {} repetition(s); {} sessions per paced/max case, {} subscribers over {} gateways, {} publishers, {} B. Ratios are against NATS (same case).",
        c.reps,
        c.cases.first().map_or(0, |k| k.sessions),
        c.workload.subscribers,
        c.workload.gateways,
        c.workload.publishers,
        c.workload.payload
    );
    let _ = writeln!(
        o,
        "{:<11}{:<12}{:>11}{:>10}{:>9}{:>9}{:>9}{:>9}{:>9}{:>10}{:>10}{:>9}{:>8}{:>8}{:>8}{:>8}",
        "case", "server", "deliv/s", "pub/s", "p50µs", "p99µs", "p99.9µs", "maxµs", "srvCPU%", "ns/deliv", "RSS MiB", "anomal", "×p99", "×CPU", "×deliv", "×RSS"
    );
    for s in &c.summary {
        if s.runs == 0 {
            let _ = writeln!(o, "{:<11}{:<12}  (no valid run)", s.case, s.server);
            continue;
        }
        let _ = writeln!(
            o,
            "{:<11}{:<12}{:>11.0}{:>10.0}{:>9.0}{:>9.0}{:>9.0}{:>9.0}{:>9.1}{:>10}{:>10}{:>9}{:>8}{:>8}{:>8}{:>8}{}",
            s.case,
            s.server,
            s.deliveries_per_s,
            s.publishes_per_s,
            s.p50_us,
            s.p99_us,
            s.p999_us,
            s.max_us,
            s.server_cpu_pct,
            s.cpu_ns_per_delivery.map_or_else(|| "-".into(), |v| format!("{v:.0}")),
            s.rss_setup_mib.map_or_else(|| "-".into(), |v| format!("{v:.1}")),
            s.anomalies,
            fx(s.p99_vs_nats),
            fx(s.cpu_vs_nats),
            fx(s.deliveries_vs_nats),
            fx(s.rss_vs_nats),
            if s.generator_bottleneck { "  (generator-limited)" } else { "" }
        );
        if s.other_cores > 0.15 {
            let _ = writeln!(o, "{:<23}  ^ noisy: other processes used {:.2} cores (median) during these runs", "", s.other_cores);
        }
    }
    if !c.pairs.is_empty() {
        let _ = writeln!(o, "\nSwitchboard lower than the peer, repetition by repetition (p99 / CPU per delivery / both):");
        for p in &c.pairs {
            let _ = writeln!(o, "{:<11}vs {:<9}{:>3}/{} {:>3}/{} {:>3}/{}", p.case, p.peer, p.p99_lower, p.pairs, p.cpu_lower, p.pairs, p.both_lower, p.pairs);
        }
    }
    for (name, why) in &c.skipped {
        let _ = writeln!(o, "skipped {name}: {why}");
    }
    o
}

/// The last `n` non-empty lines of a log file, joined with ` | ` (for error messages).
pub fn log_tail(path: &Path, n: usize) -> String {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let mut lines: Vec<&str> = text.lines().map(str::trim).filter(|l| !l.is_empty()).rev().take(n).collect();
    lines.reverse();
    lines.join(" | ")
}

/// The first panic in a log file: the `panicked at` line and the message line after it.
pub fn log_panic(path: &Path) -> Option<String> {
    let text = std::fs::read_to_string(path).ok()?;
    let mut lines = text.lines().skip_while(|l| !l.contains("panicked at"));
    let first = lines.next()?.trim();
    Some(match lines.next() {
        Some(msg) => format!("{first} {}", msg.trim()),
        None => first.to_string(),
    })
}

/// Find `name` on PATH (and in /usr/sbin, where Debian puts nats-server).
pub fn which(name: &str) -> Option<PathBuf> {
    let path = std::env::var("PATH").unwrap_or_default();
    let found = path
        .split(':')
        .chain(["/usr/sbin", "/usr/bin", "/sbin", "/bin"])
        .map(|d| Path::new(d).join(name))
        .find(|p| p.is_file());
    found
}

/// A free TCP port on 127.0.0.1.
pub fn free_port() -> io::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

/// Restrict the calling (child, pre-exec) process to one CPU. Async-signal-safe.
fn pin_self(cpu: usize) -> io::Result<()> {
    // SAFETY: plain syscalls on a zeroed cpu_set_t we own.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &raw const set) != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    Ok(())
}

/// Pin the calling thread (and the threads it spawns afterwards) to one CPU.
pub fn pin_current_thread(cpu: usize) -> io::Result<()> {
    pin_self(cpu)
}

/// A command that runs pinned to `cpu` (if any) and gets SIGTERM if this process dies.
pub fn pinned_command(program: &Path, cpu: Option<usize>) -> Command {
    let mut cmd = Command::new(program);
    // SAFETY: the closure runs between fork and exec and only makes async-signal-safe syscalls.
    unsafe {
        cmd.pre_exec(move || {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM as libc::c_ulong, 0, 0, 0);
            if let Some(c) = cpu {
                pin_self(c)?;
            }
            Ok(())
        });
    }
    cmd
}

/// A server started by us; stopped by PID on drop.
pub struct RunningServer {
    child: Child,
    scratch: PathBuf,
    /// Its address.
    pub addr: String,
}

impl RunningServer {
    /// Start `spec` on a free loopback port, pinned to `cpu`, logging to `log`; wait until it
    /// accepts connections.
    pub fn start(spec: &ServerSpec, cpu: Option<usize>, log: &Path) -> io::Result<Self> {
        let port = free_port()?;
        let logf = std::fs::File::create(log)?;
        let scratch = log.with_extension("data");
        let _ = std::fs::remove_dir_all(&scratch);
        std::fs::create_dir_all(&scratch)?;
        let child = pinned_command(&spec.binary, cpu)
            .current_dir(&scratch)
            .args(spec.args(port, &scratch)?)
            .stdin(Stdio::null())
            .stdout(logf.try_clone()?)
            .stderr(logf)
            .spawn()?;
        let mut s = RunningServer { child, scratch, addr: format!("127.0.0.1:{port}") };
        let deadline = Instant::now() + Duration::from_secs(15);
        loop {
            if let Some(st) = s.child.try_wait()? {
                return Err(io::Error::other(format!("{} exited at start ({st}); see {}", spec.name, log.display())));
            }
            if TcpStream::connect(&s.addr).is_ok() {
                return Ok(s);
            }
            if Instant::now() > deadline {
                s.stop();
                return Err(io::Error::other(format!("{} did not listen on {} within 15 s", spec.name, s.addr)));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// `Some(status)` if the server has exited (it should not have, while we use it).
    pub fn exited(&mut self) -> Option<String> {
        match self.child.try_wait() {
            Ok(Some(st)) => Some(st.to_string()),
            _ => None,
        }
    }

    /// Its PID.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGTERM by PID, wait up to 5 s, then SIGKILL; remove its scratch folder.
    pub fn stop(&mut self) {
        self.signal_and_wait();
        let _ = std::fs::remove_dir_all(&self.scratch);
    }

    fn signal_and_wait(&mut self) {
        if matches!(self.child.try_wait(), Ok(Some(_))) {
            return;
        }
        // SAFETY: signalling our own child by its PID.
        unsafe { libc::kill(self.child.id() as libc::pid_t, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for RunningServer {
    fn drop(&mut self) {
        self.stop();
    }
}

#[cfg(test)]
#[allow(clippy::float_cmp)]
mod tests {
    use super::*;
    use crate::latency::Percentiles;

    fn rep(p99: f64, dps: f64, cpu: f64) -> Report {
        Report {
            deliveries_per_s: dps,
            latency_us: Percentiles { p99, ..Percentiles::default() },
            server: Some(crate::report::ServerStats { cpu_ns_per_delivery: Some(cpu), ..Default::default() }),
            ..Report::default()
        }
    }

    #[test]
    fn medians_and_ratios() {
        let (_, cases, _) = matrix(true);
        let servers: Vec<ServerSpec> = ["nats", "redis"].iter().map(|n| ServerSpec::new(n, PathBuf::new())).collect();
        let c = &cases[0].name;
        let mut runs = Vec::new();
        for (i, (p, d)) in [(100.0, 10.0), (300.0, 30.0), (200.0, 20.0)].iter().enumerate() {
            runs.push(RunRecord { case: c.clone(), server: "nats".into(), rep: i as u32, report: Some(rep(*p, *d, 100.0)), error: None });
            runs.push(RunRecord { case: c.clone(), server: "redis".into(), rep: i as u32, report: Some(rep(p / 2.0, d * 2.0, 50.0)), error: None });
        }
        runs.push(RunRecord { case: c.clone(), server: "redis".into(), rep: 9, report: Some(rep(1e9, 0.0, 0.0)), error: Some("x".into()) });
        let s = summarize(&cases, &servers, &runs);
        let n = s.iter().find(|s| &s.case == c && s.server == "nats").unwrap();
        let r = s.iter().find(|s| &s.case == c && s.server == "redis").unwrap();
        assert_eq!((n.runs, r.runs), (3, 3));
        assert_eq!(n.p99_us, 200.0);
        assert_eq!(r.p99_us, 100.0);
        assert_eq!(r.p99_vs_nats, Some(0.5));
        assert_eq!(r.deliveries_vs_nats, Some(2.0));
        assert_eq!(r.cpu_vs_nats, Some(0.5));
        assert_eq!(median(vec![4.0, 1.0, 3.0, 2.0]), 2.5);
    }

    #[test]
    fn pairs_count_repetitions_where_switchboard_was_lower() {
        let (_, cases, _) = matrix(true);
        let servers: Vec<ServerSpec> = ["nats", SWITCHBOARD].iter().map(|n| ServerSpec::new(n, PathBuf::new())).collect();
        let c = &cases[0].name;
        let mut runs = Vec::new();
        // (ours p99, ours cpu, theirs p99, theirs cpu): lower on both, on p99 only, on CPU only, tied.
        for (i, (p, cpu, tp, tcpu)) in [(1.0, 1.0, 2.0, 2.0), (1.0, 3.0, 2.0, 2.0), (3.0, 1.0, 2.0, 2.0), (2.0, 2.0, 2.0, 2.0)].into_iter().enumerate() {
            runs.push(RunRecord { case: c.clone(), server: SWITCHBOARD.into(), rep: i as u32, report: Some(rep(p, 1.0, cpu)), error: None });
            runs.push(RunRecord { case: c.clone(), server: "nats".into(), rep: i as u32, report: Some(rep(tp, 1.0, tcpu)), error: None });
        }
        // A repetition the peer failed is not a pair.
        runs.push(RunRecord { case: c.clone(), server: SWITCHBOARD.into(), rep: 4, report: Some(rep(1.0, 1.0, 1.0)), error: None });
        runs.push(RunRecord { case: c.clone(), server: "nats".into(), rep: 4, report: Some(rep(9.0, 1.0, 9.0)), error: Some("x".into()) });
        let p = pairs(&cases, &servers, &runs);
        let nats = p.iter().find(|p| &p.case == c && p.peer == "nats").unwrap();
        assert_eq!((nats.pairs, nats.p99_lower, nats.cpu_lower, nats.both_lower), (4, 2, 2, 1));
        assert!(p.iter().all(|p| p.peer != SWITCHBOARD));
    }

    #[test]
    fn log_panic_and_tail() {
        let p = std::env::temp_dir().join(format!("switchboard-bench-logtest-{}.log", std::process::id()));
        std::fs::write(&p, "INFO ready\n\nthread 'shard-0' panicked at x.rs:1:2:\nassertion failed: refcount\nstack backtrace:\n  0: foo\n").unwrap();
        assert_eq!(log_panic(&p).as_deref(), Some("thread 'shard-0' panicked at x.rs:1:2: assertion failed: refcount"));
        assert_eq!(log_tail(&p, 2), "stack backtrace: | 0: foo");
        std::fs::write(&p, "INFO ready\n").unwrap();
        assert_eq!(log_panic(&p), None);
        let _ = std::fs::remove_file(&p);
    }

    #[test]
    fn server_args_are_loopback_only() {
        assert_eq!(ServerSpec::new("floor", PathBuf::new()).args(4000, Path::new("/tmp/x")).unwrap(), vec!["--listen", "127.0.0.1:4000"]);
        assert_eq!(ServerSpec::new("floor", PathBuf::new()).backend(), "redis");
        assert_eq!(ServerSpec::new("nats", PathBuf::new()).backend(), "nats");
        for n in ["nats", "redis", "switchboard", "jetstream"] {
            let a = ServerSpec::new(n, PathBuf::new()).args(4000, Path::new("/tmp/x")).unwrap().join(" ");
            assert!(a.contains("127.0.0.1"), "{n}: {a}");
        }
        let js = ServerSpec::new("jetstream", PathBuf::new()).args(4000, Path::new("/tmp/x")).unwrap();
        assert!(js.ends_with(&["-js".to_string(), "-sd".into(), "/tmp/x/js".into()]), "{js:?}");
        let mut sb = ServerSpec::new("switchboard", PathBuf::new());
        sb.extra_args = vec!["--durability".into(), "sync".into()];
        let a = sb.args(4000, Path::new("/tmp/x")).unwrap();
        assert_eq!(a[a.len() - 2..], ["--durability".to_string(), "sync".into()]);
    }
}
