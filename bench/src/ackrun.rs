//! The acknowledgement generator (`loadgen --ack`): P publisher connections, no subscribers;
//! every publish is matched to its acknowledgement (Switchboard PUBACK, `JetStream` publish ack)
//! and its latency measured from its *intended* send time to the acknowledgement's receipt.
//!
//! Two modes, like the fan-out generator ([`crate::run`]):
//! - paced (`--rate R`): open loop on a tick; publishes are sent when due whatever is
//!   outstanding, so a slow server shows up as latency, not as a lower offered rate. A
//!   connection more than [`PACED_IN_FLIGHT_MAX`] publishes behind ends the run.
//! - `--max`: each connection keeps at most `--window` publishes unacknowledged and sends more
//!   as acknowledgements free the window (window 1 = one synchronous client per connection).
//!   Latency is then measured from the actual send time (there is no schedule).
//!
//! Timeline: setup (backend setup, connect) → `t0` → warmup → measured window `[w0, w1)` →
//! publishers stop → drain (every publish answered, nothing answered for 500 ms, or `--drain`)
//! → receivers stop → accounting: lost = sent and never answered.

use crate::ack::{Ack, AckBackend, AckCounts, AckReceiver, AckSender, AckTracker, Answer};
use crate::backend::Poll;
use crate::clock;
use crate::latency::{Latency, Percentiles};
use crate::payload::{self, Header};
use crate::procstat;
use crate::report::{GeneratorStats, Host, MachineStats, ServerStats};
use serde::{Deserialize, Serialize};
use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

/// A paced connection this many publishes behind its acknowledgements ends the run (bounds
/// the tracker's memory when a server stops answering).
pub const PACED_IN_FLIGHT_MAX: usize = 1_000_000;

/// Every setting of an acknowledgement run (serialized in full into the report).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct AckSettings {
    /// Backend name.
    pub backend: String,
    /// Server address.
    pub addr: String,
    /// Publisher connections.
    pub publishers: u32,
    /// Sessions (subjects), split among the publishers, each publisher round-robin over its own.
    pub sessions: u32,
    /// Payload bytes (header included).
    pub payload: usize,
    /// Paced: publishes per second, all publishers together.
    pub rate: Option<f64>,
    /// As fast as the window allows.
    pub max: bool,
    /// `--max`: unacknowledged publishes allowed per connection.
    pub window: u64,
    /// Measured seconds.
    pub duration_s: f64,
    /// Warmup seconds.
    pub warmup_s: f64,
    /// Pacing tick, µs.
    pub tick_us: u64,
    /// Server PID for CPU and RSS.
    pub server_pid: Option<u32>,
    /// Longest wait for outstanding acknowledgements after the last publish, seconds.
    pub drain_s: f64,
    /// What the run was asked to measure (e.g. `sync`), for the report; the server's claims
    /// are in the counts.
    pub durability_requested: Option<String>,
}

impl Default for AckSettings {
    fn default() -> Self {
        AckSettings {
            backend: "mock".into(),
            addr: "mock".into(),
            publishers: 16,
            sessions: 1000,
            payload: 128,
            rate: Some(10_000.0),
            max: false,
            window: 1,
            duration_s: 5.0,
            warmup_s: 1.0,
            tick_us: 1000,
            server_pid: None,
            drain_s: 5.0,
            durability_requested: None,
        }
    }
}

impl AckSettings {
    /// Check the settings; the message says what to change.
    pub fn validate(&self) -> Result<(), String> {
        if self.publishers == 0 || self.sessions < self.publishers {
            return Err("--publishers must be at least 1 and at most --sessions".into());
        }
        if self.publishers > 1024 {
            return Err("--publishers is at most 1024 in --ack mode (two threads per connection)".into());
        }
        payload::template(self.payload)?;
        match (self.rate, self.max) {
            (Some(_), true) => return Err("give either --rate or --max, not both".into()),
            (None, false) => return Err("give --rate R (paced) or --max".into()),
            (Some(r), false) if !(r > 0.0 && r.is_finite()) => return Err("--rate must be positive".into()),
            _ => {}
        }
        if self.max && self.window == 0 {
            return Err("--window must be at least 1".into());
        }
        if self.duration_s.is_nan() || self.duration_s <= 0.0 || self.warmup_s < 0.0 || self.duration_s + self.warmup_s > crate::run::HARD_CAP_S {
            return Err(format!("--duration must be > 0 and --warmup + --duration at most {} s", crate::run::HARD_CAP_S));
        }
        if self.tick_us == 0 || self.tick_us > 100_000 {
            return Err("--tick-us must be between 1 and 100000".into());
        }
        Ok(())
    }
}

/// The result of one acknowledgement run.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct AckReport {
    /// Generator name and version.
    pub tool: String,
    /// The settings (None only in a default report).
    pub settings: Option<AckSettings>,
    /// Machine and start time.
    pub host: Host,
    /// Seconds to set up (stream creation, connections).
    pub setup_s: f64,
    /// Measured window, seconds.
    pub window_s: f64,
    /// Paced target (publishes/s), None for `--max`.
    pub target_publishes_per_s: Option<f64>,
    /// Publishes sent per second in the window.
    pub publishes_per_s: f64,
    /// Acknowledgements (stored) received per second in the window.
    pub acks_per_s: f64,
    /// Every publish of the run: acknowledged, refused, lost, unexpected; claimed durability.
    pub counts: AckCounts,
    /// Publishes sent per connection (the whole run).
    pub sent_per_connection: Vec<u64>,
    /// Publish → acknowledgement latency of the publishes intended in the window (µs).
    pub latency_us: Percentiles,
    /// Percentile spectrum `(percentile, µs)`.
    pub spectrum: Vec<(f64, f64)>,
    /// The generator (send lag, CPU).
    pub generator: GeneratorStats,
    /// The server (`cpu_ns_per_delivery` here is server CPU ns per acknowledgement).
    pub server: Option<ServerStats>,
    /// Other load on the machine.
    pub machine: MachineStats,
    /// What went wrong during the run (empty when nothing did).
    pub errors: Vec<String>,
}

impl AckReport {
    /// A human-readable summary.
    pub fn table(&self) -> String {
        let mut o = String::new();
        let st = self.settings.clone().unwrap_or_default();
        let mode = match self.target_publishes_per_s {
            Some(r) => format!("paced {r:.0}/s"),
            None => format!("--max, window {} per connection", st.window),
        };
        let _ = writeln!(o, "{} --ack: {} publishers, {} B, {mode}, {:.1} s measured", st.backend, st.publishers, st.payload, self.window_s);
        let c = &self.counts;
        let _ = writeln!(o, "publishes/s {:.0}   acks/s {:.0}", self.publishes_per_s, self.acks_per_s);
        let p = &self.latency_us;
        let _ = writeln!(
            o,
            "publish→ack µs: p50 {:.0}  p90 {:.0}  p99 {:.0}  p99.9 {:.0}  max {:.0}  (n={})",
            p.p50, p.p90, p.p99, p.p999, p.max, p.count
        );
        let _ = writeln!(
            o,
            "acks: sent {} acked {} errors {} lost {} unexpected {}; durability claimed: {}{}",
            c.sent,
            c.acked,
            c.errors,
            c.lost,
            c.unexpected,
            c.claim_summary(),
            st.durability_requested.as_ref().map_or_else(String::new, |d| format!(" (requested {d})"))
        );
        for t in &c.error_texts {
            let _ = writeln!(o, "  error: {t}");
        }
        if let Some(s) = &self.server {
            let _ = writeln!(
                o,
                "server CPU {:.1} %  ({} ns per ack)",
                s.cpu_cores * 100.0,
                s.cpu_ns_per_delivery.map_or_else(|| "-".into(), |v| format!("{v:.0}"))
            );
        }
        for n in &self.generator.notes {
            let _ = writeln!(o, "WARNING: generator: {n}");
        }
        if self.machine.noisy {
            let _ = writeln!(o, "WARNING: other processes used {:.2} cores during the window", self.machine.other_cores);
        }
        for e in &self.errors {
            let _ = writeln!(o, "ERROR: {e}");
        }
        o
    }
}

/// One connection's tracker, shared by its publisher and receiver threads.
struct Link {
    tracker: Mutex<AckTracker>,
    /// Notified whenever acknowledgements were settled (the `--max` window waits on it).
    settled: Condvar,
}

struct Shared {
    stop: AtomicBool,
    abort: AtomicBool,
    published: AtomicU64,
    acked: AtomicU64,
    errors: Mutex<Vec<String>>,
}

impl Shared {
    fn fail(&self, msg: String) {
        self.errors.lock().unwrap().push(msg);
        self.abort.store(true, Ordering::SeqCst);
    }
}

#[derive(Clone, Copy)]
struct Timeline {
    t0: u64,
    w0: u64,
    w1: u64,
}

/// Round-robin over the publisher's sessions, writing the payload header.
struct Rotor {
    sessions: Vec<u32>,
    counts: Vec<u64>,
    next: usize,
    buf: Vec<u8>,
}

impl Rotor {
    fn publish(&mut self, s: &mut dyn AckSender, sent_ns: u64) -> std::io::Result<u64> {
        let k = self.next;
        self.next = if k + 1 == self.sessions.len() { 0 } else { k + 1 };
        let session = self.sessions[k];
        payload::write(&mut self.buf, Header { session, seq: self.counts[k], sent_ns });
        self.counts[k] += 1;
        s.publish(session, &self.buf)
    }
}

struct PubOut {
    wake_lag: Latency,
    send_lag: Latency,
    /// Kept open until the receivers stopped (closing it could end the reading half early).
    _sender: Box<dyn AckSender>,
}

fn receiver(i: usize, mut r: Box<dyn AckReceiver>, link: &Link, sh: &Shared) {
    let mut batch: Vec<Ack> = Vec::with_capacity(1024);
    while !sh.stop.load(Ordering::Relaxed) {
        let mut now: Option<u64> = None;
        let res = r.poll(&mut |a| {
            now.get_or_insert_with(clock::now_ns);
            batch.push(a);
        });
        if let Some(now) = now {
            let ok = batch.iter().filter(|a| matches!(a.answer, Answer::Ok { .. })).count() as u64;
            {
                let mut t = link.tracker.lock().unwrap();
                for a in &batch {
                    t.settle(a, now);
                }
            }
            link.settled.notify_all();
            batch.clear();
            sh.acked.fetch_add(ok, Ordering::Relaxed);
        }
        match res {
            Ok(Poll::Data | Poll::Idle) => {}
            Ok(Poll::Closed) => {
                if !sh.stop.load(Ordering::Relaxed) {
                    sh.fail(format!("publisher {i}: server closed the connection"));
                }
                break;
            }
            Err(e) => {
                sh.fail(format!("publisher {i}: {e}"));
                break;
            }
        }
    }
    // Wake a publisher waiting on the window so it sees the stop.
    link.settled.notify_all();
}

#[allow(clippy::needless_pass_by_value)]
fn publisher(i: u32, mut s: Box<dyn AckSender>, link: Arc<Link>, st: AckSettings, tl: Timeline, sh: Arc<Shared>) -> PubOut {
    clock::tight_timer_slack();
    let sessions: Vec<u32> = (i..st.sessions).step_by(st.publishers as usize).collect();
    let mut rot = Rotor { counts: vec![0; sessions.len()], sessions, next: 0, buf: payload::template(st.payload).expect("validated") };
    let (mut wake_lag, mut send_lag) = (Latency::new(), Latency::new());
    let res = match (st.rate, st.max) {
        (Some(rate), false) => paced(i, &mut *s, &mut rot, &link, &st, rate, tl, &sh, &mut wake_lag, &mut send_lag),
        _ => max(&mut *s, &mut rot, &link, st.window, tl, &sh, &mut send_lag),
    };
    if let Err(e) = res {
        sh.fail(format!("publisher {i}: {e}"));
    }
    PubOut { wake_lag, send_lag, _sender: s }
}

/// Publish `n` messages stamped `intended`, register them, then flush (the order matters: an
/// acknowledgement can only arrive after the flush, and then its id is known).
fn send_batch(s: &mut dyn AckSender, rot: &mut Rotor, link: &Link, stamps: &[u64], ids: &mut Vec<u64>) -> std::io::Result<()> {
    ids.clear();
    for &t in stamps {
        ids.push(rot.publish(s, t)?);
    }
    {
        let mut t = link.tracker.lock().unwrap();
        for (&id, &at) in ids.iter().zip(stamps) {
            t.sent(id, at).map_err(std::io::Error::other)?;
        }
    }
    s.flush()
}

#[allow(clippy::too_many_arguments)]
fn paced(
    i: u32,
    s: &mut dyn AckSender,
    rot: &mut Rotor,
    link: &Link,
    st: &AckSettings,
    rate: f64,
    tl: Timeline,
    sh: &Shared,
    wake_lag: &mut Latency,
    send_lag: &mut Latency,
) -> std::io::Result<()> {
    let tick = st.tick_us * 1000;
    let start = tl.t0 + tick * u64::from(i) / u64::from(st.publishers);
    let rate_p = rate / f64::from(st.publishers);
    let due_by = |k: u64| -> u64 { ((k * tick) as f64 * rate_p / 1e9).floor() as u64 + 1 };
    let (mut sent, mut k) = (0u64, 0u64);
    let mut stamps = Vec::new();
    let mut ids = Vec::new();
    loop {
        let t = start + k * tick;
        if t >= tl.w1 || sh.abort.load(Ordering::Relaxed) {
            return Ok(());
        }
        clock::sleep_until(t);
        let woke = clock::now_ns();
        wake_lag.record(woke.saturating_sub(t));
        let current = k.max((woke - start) / tick);
        stamps.clear();
        for kk in k..=current {
            let tt = start + kk * tick;
            if tt >= tl.w1 {
                break;
            }
            while sent < due_by(kk) {
                stamps.push(tt);
                sent += 1;
            }
        }
        if !stamps.is_empty() {
            send_batch(s, rot, link, &stamps, &mut ids)?;
            sh.published.fetch_add(stamps.len() as u64, Ordering::Relaxed);
            send_lag.record(clock::now_ns().saturating_sub(t));
            let behind = link.tracker.lock().unwrap().in_flight();
            if behind > PACED_IN_FLIGHT_MAX {
                return Err(std::io::Error::other(format!("{behind} publishes unacknowledged: the server fell behind")));
            }
        }
        k = current + 1;
    }
}

fn max(s: &mut dyn AckSender, rot: &mut Rotor, link: &Link, window: u64, tl: Timeline, sh: &Shared, send_lag: &mut Latency) -> std::io::Result<()> {
    let window = usize::try_from(window).unwrap_or(usize::MAX);
    let mut stamps = Vec::new();
    let mut ids = Vec::new();
    clock::sleep_until(tl.t0);
    loop {
        let free = {
            let t = link.tracker.lock().unwrap();
            let (t, _) = link
                .settled
                .wait_timeout_while(t, Duration::from_millis(50), |t| {
                    t.in_flight() >= window && !sh.abort.load(Ordering::Relaxed) && !sh.stop.load(Ordering::Relaxed)
                })
                .unwrap();
            window.saturating_sub(t.in_flight())
        };
        let now = clock::now_ns();
        if now >= tl.w1 || sh.abort.load(Ordering::Relaxed) {
            return Ok(());
        }
        if free == 0 {
            continue;
        }
        stamps.clear();
        stamps.resize(free.min(256), now);
        send_batch(s, rot, link, &stamps, &mut ids)?;
        sh.published.fetch_add(stamps.len() as u64, Ordering::Relaxed);
        send_lag.record(clock::now_ns().saturating_sub(now));
    }
}

fn wait_until(ns: u64, sh: &Shared) {
    loop {
        let now = clock::now_ns();
        if now >= ns || sh.abort.load(Ordering::Relaxed) {
            return;
        }
        thread::sleep(Duration::from_nanos((ns - now).min(20_000_000)));
    }
}

#[derive(Clone, Copy)]
struct Snap {
    at: u64,
    acked: u64,
    published: u64,
    own_cpu: u64,
    server_cpu: Option<u64>,
    machine_busy: Option<u64>,
}

fn snap(sh: &Shared, pid: Option<u32>) -> Snap {
    Snap {
        at: clock::now_ns(),
        acked: sh.acked.load(Ordering::Relaxed),
        published: sh.published.load(Ordering::Relaxed),
        own_cpu: procstat::own_cpu_ns(),
        server_cpu: pid.and_then(|p| procstat::cpu_ns(p).ok()),
        machine_busy: procstat::machine_busy_ns().ok(),
    }
}

/// The report and the merged latency histogram.
pub struct AckOutcome {
    /// Every figure.
    pub report: AckReport,
    /// Publish → acknowledgement latency.
    pub latency: Latency,
}

/// Run with `st` against `backend`. Setup failures are `Err`; failures during the load are
/// listed in the report's `errors`.
#[allow(clippy::too_many_lines, clippy::similar_names)]
pub fn run(st: &AckSettings, backend: &Arc<dyn AckBackend>) -> Result<AckOutcome, String> {
    st.validate()?;
    let host = Host::current();
    let setup_start = Instant::now();
    backend.setup().map_err(|e| format!("{} setup: {e}", backend.name()))?;
    let mut conns = Vec::new();
    for p in 0..st.publishers {
        conns.push(backend.connect(p as usize).map_err(|e| format!("publisher {p}: {e}"))?);
    }
    let setup_s = setup_start.elapsed().as_secs_f64();
    let sh = Arc::new(Shared {
        stop: AtomicBool::new(false),
        abort: AtomicBool::new(false),
        published: AtomicU64::new(0),
        acked: AtomicU64::new(0),
        errors: Mutex::new(Vec::new()),
    });
    let t0 = clock::now_ns() + 20_000_000;
    let w0 = t0 + (st.warmup_s * 1e9) as u64;
    let tl = Timeline { t0, w0, w1: w0 + (st.duration_s * 1e9) as u64 };

    let mut links = Vec::new();
    let mut receivers = Vec::new();
    let mut publishers: Vec<JoinHandle<PubOut>> = Vec::new();
    for (p, (sender, recv)) in conns.into_iter().enumerate() {
        let link = Arc::new(Link { tracker: Mutex::new(AckTracker::new(tl.w0, tl.w1)), settled: Condvar::new() });
        links.push(link.clone());
        let (l, s) = (link.clone(), sh.clone());
        receivers.push(spawn(format!("ack{p}"), move || receiver(p, recv, &l, &s)));
        let (st, s) = (st.clone(), sh.clone());
        publishers.push(spawn(format!("pub{p}"), move || publisher(p as u32, sender, link, st, tl, s)));
    }

    wait_until(tl.w0, &sh);
    let a = snap(&sh, st.server_pid);
    wait_until(tl.w1, &sh);
    let b = snap(&sh, st.server_pid);
    let outs: Vec<PubOut> = publishers.into_iter().map(|h| h.join().expect("publisher thread panicked")).collect();

    // Drain: until every publish is answered, nothing was answered for 500 ms, or --drain.
    let answered = || links.iter().map(|l| l.tracker.lock().unwrap().answered()).sum::<u64>();
    let in_flight = || links.iter().map(|l| l.tracker.lock().unwrap().in_flight()).sum::<usize>();
    let drain_end = clock::now_ns() + (st.drain_s * 1e9) as u64;
    let mut last = (answered(), clock::now_ns());
    while in_flight() > 0 && !sh.abort.load(Ordering::Relaxed) {
        let now = clock::now_ns();
        if now >= drain_end {
            break;
        }
        let n = answered();
        if n != last.0 {
            last = (n, now);
        } else if now - last.1 > 500_000_000 {
            break;
        }
        thread::sleep(Duration::from_millis(5));
    }
    sh.stop.store(true, Ordering::SeqCst);
    for h in receivers {
        h.join().expect("receiver thread panicked");
    }

    let mut counts = AckCounts::default();
    let mut latency = Latency::new();
    let mut sent_per_connection = Vec::with_capacity(links.len());
    for l in &links {
        let t = std::mem::replace(&mut *l.tracker.lock().unwrap(), AckTracker::new(0, 0));
        let (c, lat) = t.finish();
        sent_per_connection.push(c.sent);
        counts.add(&c);
        latency.merge(&lat);
    }
    let mut wake_lag = Latency::new();
    let mut send_lag = Latency::new();
    for o in &outs {
        wake_lag.merge(&o.wake_lag);
        send_lag.merge(&o.send_lag);
    }

    let window_ns = b.at.saturating_sub(a.at).max(1);
    let window_s = window_ns as f64 / 1e9;
    let acks_in_window = b.acked - a.acked;
    let server = st.server_pid.map(|pid| {
        let cpu = match (a.server_cpu, b.server_cpu) {
            (Some(x), Some(y)) => Some(y.saturating_sub(x)),
            _ => None,
        };
        ServerStats {
            pid,
            cpu_cores: cpu.map_or(0.0, |c| c as f64 / window_ns as f64),
            cpu_ns_per_delivery: cpu.filter(|_| acks_in_window > 0).map(|c| c as f64 / acks_in_window as f64),
            rss_setup_kb: None,
            rss_end_kb: procstat::rss_kb(pid).ok(),
        }
    });
    let allowed = procstat::allowed_cpus();
    let cpu_cores = b.own_cpu.saturating_sub(a.own_cpu) as f64 / window_ns as f64;
    let mut generator = GeneratorStats {
        cpu_cores,
        allowed_cpus: allowed,
        cpu_util: cpu_cores / allowed as f64,
        wake_lag_us: wake_lag.percentiles(),
        send_lag_us: send_lag.percentiles(),
        ..GeneratorStats::default()
    };
    if generator.cpu_util > 0.9 {
        generator.notes.push(format!("it used {:.0} % of its {} allowed CPU(s)", generator.cpu_util * 100.0, allowed));
    }
    let publishes_per_s = (b.published - a.published) as f64 / window_s;
    let target = if st.max { None } else { st.rate };
    if let Some(rate) = target {
        if publishes_per_s < rate * 0.97 {
            generator.notes.push(format!("it published {publishes_per_s:.0}/s of the {rate:.0}/s target"));
        }
        let allowed_lag_us = (2 * st.tick_us).max(2000) as f64;
        if generator.send_lag_us.p99 > allowed_lag_us {
            generator.notes.push(format!("it ran behind schedule: send lag p99 {:.0} µs", generator.send_lag_us.p99));
        }
    }
    generator.bottleneck = !generator.notes.is_empty();
    let machine = match (a.machine_busy, b.machine_busy) {
        (Some(x), Some(y)) => {
            let busy_cores = y.saturating_sub(x) as f64 / window_ns as f64;
            let server_cores = server.as_ref().map_or(0.0, |s| s.cpu_cores);
            let other_cores = (busy_cores - cpu_cores - server_cores).max(0.0);
            MachineStats { busy_cores, other_cores, noisy: other_cores > 0.15 }
        }
        _ => MachineStats::default(),
    };
    let errors = std::mem::take(&mut *sh.errors.lock().unwrap());
    let report = AckReport {
        tool: concat!("switchboard-loadgen ", env!("CARGO_PKG_VERSION"), " --ack").into(),
        settings: Some(st.clone()),
        host,
        setup_s,
        window_s,
        target_publishes_per_s: target,
        publishes_per_s,
        acks_per_s: acks_in_window as f64 / window_s,
        counts,
        sent_per_connection,
        latency_us: latency.percentiles(),
        spectrum: latency.spectrum(),
        generator,
        server,
        machine,
        errors,
    };
    Ok(AckOutcome { report, latency })
}

fn spawn<T: Send + 'static>(name: String, f: impl FnOnce() -> T + Send + 'static) -> JoinHandle<T> {
    thread::Builder::new().name(name).spawn(f).expect("spawn thread")
}
