//! The generator: connects gateways and publishers, publishes on a schedule (paced on a tick,
//! or `--max` with a bounded outstanding window), receives every delivery on one reader thread
//! per gateway, and measures over the window after the warmup.
//!
//! Timeline: setup (connect, subscribe, wait for confirmations) → `t0` → warmup → measured
//! window `[w0, w1)` → publishers stop → drain (until every expected delivery arrived, nothing
//! arrived for 500 ms, or `--drain` passed) → readers stop → accounting.
//!
//! No coordinated omission: a paced message's latency is measured from its intended send time
//! (its tick on the schedule), not from when the generator got round to sending it, so a
//! generator that stalls shows up as latency (and in `send_lag`).

use crate::accounting::{Stream, Tally};
use crate::backend::{mock::Faults, Backend, Gateway, Poll, Publisher, Replies};
use crate::clock;
use crate::latency::Latency;
use crate::payload::{self, Header};
use crate::procstat;
use crate::report::{GeneratorStats, Host, MachineStats, Report, ServerStats};
use serde::{Deserialize, Serialize};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

/// Longest run accepted (warmup + duration), seconds: every load loop ends by then.
pub const HARD_CAP_S: f64 = 3600.0;

/// Every setting of a run (serialized in full into the report).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Settings {
    /// Backend name.
    pub backend: String,
    /// Server address.
    pub addr: String,
    /// Sessions (subjects / channels).
    pub sessions: u32,
    /// Subscribers per session, each on a different gateway connection.
    pub subscribers: u32,
    /// Gateway (subscribing) connections.
    pub gateways: u32,
    /// Publisher connections (sessions split among them).
    pub publishers: u32,
    /// Payload size, bytes (header included).
    pub payload: usize,
    /// Paced: publishes per second, all publishers together.
    pub rate: Option<f64>,
    /// As fast as possible with a bounded outstanding window.
    pub max: bool,
    /// `--max`: publishes a publisher may have outstanding (not yet delivered to every subscriber).
    pub window: u64,
    /// Measured seconds.
    pub duration_s: f64,
    /// Warmup seconds (not measured).
    pub warmup_s: f64,
    /// Pacing tick, µs: every tick each publisher sends the batch that is due.
    pub tick_us: u64,
    /// Server PID for CPU and RSS.
    pub server_pid: Option<u32>,
    /// Longest wait for outstanding deliveries after the last publish, seconds.
    pub drain_s: f64,
    /// Longest wait for connections and subscriptions, seconds.
    pub setup_timeout_s: f64,
    /// Mock backend only: injected faults.
    pub faults: Option<Faults>,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            backend: "mock".into(),
            addr: "mock".into(),
            sessions: 1000,
            subscribers: 3,
            gateways: 8,
            publishers: 2,
            payload: 128,
            rate: Some(20_000.0),
            max: false,
            window: 4096,
            duration_s: 5.0,
            warmup_s: 1.0,
            tick_us: 1000,
            server_pid: None,
            drain_s: 5.0,
            setup_timeout_s: 120.0,
            faults: None,
        }
    }
}

#[derive(Debug, Clone, Copy)]
enum Mode {
    Paced { rate: f64 },
    Max { window: u64 },
}

impl Settings {
    /// Check the settings for consistency; the message says what to change.
    pub fn validate(&self) -> Result<(), String> {
        if self.sessions == 0 || self.subscribers == 0 || self.gateways == 0 || self.publishers == 0 {
            return Err("--sessions, --subscribers, --gateways and --publishers must be at least 1".into());
        }
        if self.subscribers > self.gateways {
            return Err(format!(
                "--subscribers {} needs at least as many --gateways (each subscriber of a session is on a different gateway connection), got {}",
                self.subscribers, self.gateways
            ));
        }
        if self.publishers > self.sessions {
            return Err("--publishers must not exceed --sessions (sessions are split among publishers)".into());
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
        if self.duration_s.is_nan() || self.duration_s <= 0.0 || self.warmup_s < 0.0 || self.duration_s + self.warmup_s > HARD_CAP_S {
            return Err(format!("--duration must be > 0 and --warmup + --duration at most {HARD_CAP_S} s"));
        }
        if self.tick_us == 0 || self.tick_us > 100_000 {
            return Err("--tick-us must be between 1 and 100000".into());
        }
        Ok(())
    }

    fn mode(&self) -> Mode {
        match self.rate {
            Some(rate) if !self.max => Mode::Paced { rate },
            _ => Mode::Max { window: self.window },
        }
    }

    /// Session → gateways: subscriber `j` of session `s` is on gateway `(s·S + j) mod G`, which
    /// differs for every `j < S ≤ G` and spreads subscriptions evenly.
    pub fn gateway_sessions(&self) -> Vec<Vec<u32>> {
        let g = self.gateways as usize;
        let mut v = vec![Vec::new(); g];
        for s in 0..self.sessions {
            for j in 0..self.subscribers {
                v[(s as usize * self.subscribers as usize + j as usize) % g].push(s);
            }
        }
        v
    }

    /// Publisher `p` publishes sessions `s` with `s mod P == p`.
    pub fn publisher_sessions(&self, p: u32) -> Vec<u32> {
        (p..self.sessions).step_by(self.publishers as usize).collect()
    }
}

/// State shared by every thread of a run.
struct Shared {
    /// Readers and reply readers stop.
    stop: AtomicBool,
    /// Something failed: everyone stops early.
    abort: AtomicBool,
    delivered: AtomicU64,
    delivered_by_pub: Vec<AtomicU64>,
    published: AtomicU64,
    errors: Mutex<Vec<String>>,
}

impl Shared {
    fn fail(&self, msg: String) {
        self.errors.lock().unwrap().push(msg);
        self.abort.store(true, Ordering::SeqCst);
    }
}

/// Times of the run, ns on the process clock.
#[derive(Clone, Copy)]
struct Timeline {
    t0: u64,
    w0: u64,
    w1: u64,
}

struct ReaderOut {
    sessions: Vec<u32>,
    streams: Vec<Stream>,
    latency: Latency,
    unexpected: u64,
}

#[allow(clippy::needless_pass_by_value, clippy::many_single_char_names)]
fn reader(i: usize, mut gw: Box<dyn Gateway>, sessions: Vec<u32>, st: Settings, tl: Timeline, sh: Arc<Shared>) -> ReaderOut {
    let mut index = vec![u32::MAX; st.sessions as usize];
    for (k, &s) in sessions.iter().enumerate() {
        index[s as usize] = k as u32;
    }
    let mut streams = vec![Stream::default(); sessions.len()];
    let mut latency = Latency::new();
    let mut unexpected = 0u64;
    let np = st.publishers as usize;
    let mut per_pub = vec![0u64; np];
    while !sh.stop.load(Ordering::Relaxed) {
        let mut now: Option<u64> = None;
        let mut n = 0u64;
        let r = gw.poll(&mut |p: &[u8]| {
            let now = *now.get_or_insert_with(clock::now_ns);
            n += 1;
            let Some(h) = payload::read(p) else {
                unexpected += 1;
                return;
            };
            let k = index.get(h.session as usize).copied().unwrap_or(u32::MAX);
            if k == u32::MAX || p.len() != st.payload {
                unexpected += 1;
                return;
            }
            streams[k as usize].record(h.seq);
            per_pub[h.session as usize % np] += 1;
            if h.sent_ns >= tl.w0 && h.sent_ns < tl.w1 {
                latency.record(now.saturating_sub(h.sent_ns));
            }
        });
        if n > 0 {
            sh.delivered.fetch_add(n, Ordering::Relaxed);
            for (p, c) in per_pub.iter_mut().enumerate() {
                if *c > 0 {
                    sh.delivered_by_pub[p].fetch_add(*c, Ordering::Relaxed);
                    *c = 0;
                }
            }
        }
        match r {
            Ok(Poll::Data | Poll::Idle) => {}
            Ok(Poll::Closed) => {
                if !sh.stop.load(Ordering::Relaxed) {
                    sh.fail(format!("gateway {i}: server closed the connection"));
                }
                break;
            }
            Err(e) => {
                sh.fail(format!("gateway {i}: {e}"));
                break;
            }
        }
    }
    ReaderOut { sessions, streams, latency, unexpected }
}

fn replies_reader(i: usize, mut r: Box<dyn Replies>, sh: &Shared) {
    while !sh.stop.load(Ordering::Relaxed) {
        match r.poll() {
            Ok(Poll::Data | Poll::Idle) => {}
            Ok(Poll::Closed) => {
                if !sh.stop.load(Ordering::Relaxed) {
                    sh.fail(format!("publisher {i}: server closed the connection"));
                }
                return;
            }
            Err(e) => {
                sh.fail(format!("publisher {i}: {e}"));
                return;
            }
        }
    }
}

struct PubOut {
    sessions: Vec<u32>,
    counts: Vec<u64>,
    wake_lag: Latency,
    send_lag: Latency,
    stalls: u64,
}

/// Publishes the next message of the publisher's round-robin over its sessions.
struct Rotor {
    sessions: Vec<u32>,
    counts: Vec<u64>,
    next: usize,
    buf: Vec<u8>,
}

impl Rotor {
    fn publish(&mut self, p: &mut dyn Publisher, sent_ns: u64) -> std::io::Result<()> {
        let k = self.next;
        self.next = if k + 1 == self.sessions.len() { 0 } else { k + 1 };
        let session = self.sessions[k];
        payload::write(&mut self.buf, Header { session, seq: self.counts[k], sent_ns });
        self.counts[k] += 1;
        p.publish(session, &self.buf)
    }
}

#[allow(clippy::needless_pass_by_value)]
fn publisher(i: u32, mut p: Box<dyn Publisher>, st: Settings, tl: Timeline, sh: Arc<Shared>) -> PubOut {
    clock::tight_timer_slack();
    let sessions = st.publisher_sessions(i);
    let mut rot = Rotor {
        counts: vec![0; sessions.len()],
        sessions,
        next: 0,
        buf: payload::template(st.payload).expect("validated"),
    };
    let mut wake_lag = Latency::new();
    let mut send_lag = Latency::new();
    let mut stalls = 0;
    let res = match st.mode() {
        Mode::Paced { rate } => paced(i, &mut *p, &mut rot, &st, rate, tl, &sh, &mut wake_lag, &mut send_lag),
        Mode::Max { window } => max(i, &mut *p, &mut rot, &st, window, tl, &sh, &mut send_lag, &mut stalls),
    };
    let res = res.and_then(|()| p.close());
    if let Err(e) = res {
        sh.fail(format!("publisher {i}: {e}"));
    }
    PubOut { sessions: rot.sessions, counts: rot.counts, wake_lag, send_lag, stalls }
}

/// Paced: every tick send every message that is due. Message `j` of this publisher is due
/// `j / rate_p` after its start; it belongs to the first tick at or after that, and that tick's
/// time is its intended send time. A late wake-up sends the missed ticks' messages at once,
/// each still stamped with its own tick.
#[allow(clippy::too_many_arguments, clippy::many_single_char_names)]
fn paced(
    i: u32,
    p: &mut dyn Publisher,
    rot: &mut Rotor,
    st: &Settings,
    rate: f64,
    tl: Timeline,
    sh: &Shared,
    wake_lag: &mut Latency,
    send_lag: &mut Latency,
) -> std::io::Result<()> {
    let tick = st.tick_us * 1000;
    // Stagger publishers within a tick so their bursts do not coincide.
    let start = tl.t0 + tick * u64::from(i) / u64::from(st.publishers);
    let rate_p = rate / f64::from(st.publishers);
    let due_by = |k: u64| -> u64 { ((k * tick) as f64 * rate_p / 1e9).floor() as u64 + 1 };
    let mut sent: u64 = 0;
    let mut k: u64 = 0;
    loop {
        let t = start + k * tick;
        if t >= tl.w1 || sh.abort.load(Ordering::Relaxed) {
            return Ok(());
        }
        clock::sleep_until(t);
        let woke = clock::now_ns();
        wake_lag.record(woke.saturating_sub(t));
        let current = k.max((woke - start) / tick);
        let mut n = 0;
        let mut kk = k;
        while kk <= current {
            let tt = start + kk * tick;
            if tt >= tl.w1 {
                break;
            }
            let due = due_by(kk);
            while sent < due {
                rot.publish(p, tt)?;
                sent += 1;
                n += 1;
            }
            kk += 1;
        }
        if n > 0 {
            p.flush()?;
            sh.published.fetch_add(n, Ordering::Relaxed);
            send_lag.record(clock::now_ns().saturating_sub(t));
        }
        k = current + 1;
    }
}

/// `--max`: publish batches as fast as the window allows. The window counts publishes not yet
/// delivered to every subscriber (this publisher's deliveries / S). If it makes no progress for
/// 200 ms (lost messages never come back) it is reset and the stall counted.
#[allow(clippy::too_many_arguments)]
fn max(
    i: u32,
    p: &mut dyn Publisher,
    rot: &mut Rotor,
    st: &Settings,
    window: u64,
    tl: Timeline,
    sh: &Shared,
    send_lag: &mut Latency,
    stalls: &mut u64,
) -> std::io::Result<()> {
    let batch = (window / 4).clamp(1, 256);
    let subs = u64::from(st.subscribers);
    let mut sent: u64 = 0;
    let mut forgiven: u64 = 0;
    let mut last_progress = (u64::MAX, 0u64);
    clock::sleep_until(tl.t0);
    loop {
        let now = clock::now_ns();
        if now >= tl.w1 || sh.abort.load(Ordering::Relaxed) {
            return Ok(());
        }
        let done = sh.delivered_by_pub[i as usize].load(Ordering::Relaxed) / subs + forgiven;
        let outstanding = sent.saturating_sub(done);
        if outstanding + batch > window {
            if last_progress.0 != done {
                last_progress = (done, now);
            } else if now - last_progress.1 > 200_000_000 {
                forgiven += outstanding;
                *stalls += 1;
                last_progress = (u64::MAX, now);
            }
            thread::sleep(Duration::from_micros(20));
            continue;
        }
        for _ in 0..batch {
            rot.publish(p, now)?;
        }
        p.flush()?;
        sent += batch;
        sh.published.fetch_add(batch, Ordering::Relaxed);
        send_lag.record(clock::now_ns().saturating_sub(now));
    }
}

/// Sleep until `ns` on the process clock, waking early if the run aborts.
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
    delivered: u64,
    published: u64,
    own_cpu: u64,
    server_cpu: Option<u64>,
    machine_busy: Option<u64>,
}

fn snap(sh: &Shared, pid: Option<u32>) -> Snap {
    Snap {
        at: clock::now_ns(),
        delivered: sh.delivered.load(Ordering::Relaxed),
        published: sh.published.load(Ordering::Relaxed),
        own_cpu: procstat::own_cpu_ns(),
        server_cpu: pid.and_then(|p| procstat::cpu_ns(p).ok()),
        machine_busy: procstat::machine_busy_ns().ok(),
    }
}

/// Run the generator with `st` against `backend`. Setup failures are `Err`; failures during the
/// load are listed in the report's `errors`.
#[allow(clippy::too_many_lines, clippy::similar_names, clippy::many_single_char_names)]
pub fn run(st: &Settings, backend: &Arc<dyn Backend>) -> Result<Outcome, String> {
    st.validate()?;
    let host = Host::current();
    let setup_start = Instant::now();
    let deadline = setup_start + Duration::from_secs_f64(st.setup_timeout_s);
    let layout = st.gateway_sessions();
    let mut gateways = Vec::with_capacity(layout.len());
    for (g, sessions) in layout.iter().enumerate() {
        gateways.push(backend.gateway(g, sessions).map_err(|e| format!("gateway {g}: {e}"))?);
    }
    for (g, gw) in gateways.iter_mut().enumerate() {
        gw.wait_ready(deadline).map_err(|e| format!("gateway {g} setup: {e}"))?;
    }
    let mut pubs = Vec::new();
    for p in 0..st.publishers {
        pubs.push(backend.publisher(p as usize).map_err(|e| format!("publisher {p}: {e}"))?);
    }
    let setup_s = setup_start.elapsed().as_secs_f64();
    let rss_setup_kb = st.server_pid.and_then(|p| procstat::rss_kb(p).ok());

    let sh = Arc::new(Shared {
        stop: AtomicBool::new(false),
        abort: AtomicBool::new(false),
        delivered: AtomicU64::new(0),
        delivered_by_pub: (0..st.publishers).map(|_| AtomicU64::new(0)).collect(),
        published: AtomicU64::new(0),
        errors: Mutex::new(Vec::new()),
    });
    let t0 = clock::now_ns() + 20_000_000;
    let w0 = t0 + (st.warmup_s * 1e9) as u64;
    let tl = Timeline { t0, w0, w1: w0 + (st.duration_s * 1e9) as u64 };

    let mut readers: Vec<JoinHandle<ReaderOut>> = Vec::new();
    for (g, (gw, sessions)) in gateways.into_iter().zip(layout).enumerate() {
        let (st, sh) = (st.clone(), sh.clone());
        readers.push(spawn(format!("gw{g}"), move || reader(g, gw, sessions, st, tl, sh)));
    }
    let mut repliers = Vec::new();
    let mut publishers: Vec<JoinHandle<PubOut>> = Vec::new();
    for (p, (pb, rep)) in pubs.into_iter().enumerate() {
        if let Some(rep) = rep {
            let sh = sh.clone();
            repliers.push(spawn(format!("rep{p}"), move || replies_reader(p, rep, &sh)));
        }
        let (st, sh) = (st.clone(), sh.clone());
        publishers.push(spawn(format!("pub{p}"), move || publisher(p as u32, pb, st, tl, sh)));
    }

    wait_until(tl.w0, &sh);
    let a = snap(&sh, st.server_pid);
    wait_until(tl.w1, &sh);
    let b = snap(&sh, st.server_pid);

    let pub_outs: Vec<PubOut> = publishers.into_iter().map(|h| h.join().expect("publisher thread panicked")).collect();
    // Drain: wait for every expected delivery, or until nothing arrives for 500 ms, or --drain.
    let expected = sh.published.load(Ordering::Relaxed) * u64::from(st.subscribers);
    let drain_end = clock::now_ns() + (st.drain_s * 1e9) as u64;
    let mut last = (sh.delivered.load(Ordering::Relaxed), clock::now_ns());
    loop {
        let now = clock::now_ns();
        let d = sh.delivered.load(Ordering::Relaxed);
        if d >= expected || now >= drain_end || sh.abort.load(Ordering::Relaxed) {
            break;
        }
        if d != last.0 {
            last = (d, now);
        } else if now - last.1 > 500_000_000 {
            break;
        }
        thread::sleep(Duration::from_millis(5));
    }
    sh.stop.store(true, Ordering::SeqCst);
    let reader_outs: Vec<ReaderOut> = readers.into_iter().map(|h| h.join().expect("reader thread panicked")).collect();
    for h in repliers {
        h.join().expect("replies thread panicked");
    }
    let rss_end_kb = st.server_pid.and_then(|p| procstat::rss_kb(p).ok());

    // Accounting: every stream against what its session's publisher sent.
    let mut published = vec![0u64; st.sessions as usize];
    let mut wake_lag = Latency::new();
    let mut send_lag = Latency::new();
    let mut stalls = 0;
    for po in &pub_outs {
        for (s, c) in po.sessions.iter().zip(&po.counts) {
            published[*s as usize] = *c;
        }
        wake_lag.merge(&po.wake_lag);
        send_lag.merge(&po.send_lag);
        stalls += po.stalls;
    }
    let mut tally = Tally::default();
    let mut latency = Latency::new();
    for ro in &reader_outs {
        for (s, stream) in ro.sessions.iter().zip(&ro.streams) {
            tally.add(&stream.tally(published[*s as usize]));
        }
        tally.unexpected += ro.unexpected;
        tally.received += ro.unexpected;
        latency.merge(&ro.latency);
    }

    let window_ns = b.at.saturating_sub(a.at).max(1);
    let window_s = window_ns as f64 / 1e9;
    let deliveries_in_window = b.delivered - a.delivered;
    let publishes_per_s = (b.published - a.published) as f64 / window_s;
    let deliveries_per_s = deliveries_in_window as f64 / window_s;
    let server = st.server_pid.map(|pid| {
        let cpu = match (a.server_cpu, b.server_cpu) {
            (Some(x), Some(y)) => Some(y.saturating_sub(x)),
            _ => None,
        };
        ServerStats {
            pid,
            cpu_cores: cpu.map_or(0.0, |c| c as f64 / window_ns as f64),
            cpu_ns_per_delivery: cpu.filter(|_| deliveries_in_window > 0).map(|c| c as f64 / deliveries_in_window as f64),
            rss_setup_kb,
            rss_end_kb,
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
        window_stalls: stalls,
        ..GeneratorStats::default()
    };
    if generator.cpu_util > 0.9 {
        generator.notes.push(format!(
            "it used {:.0} % of its {} allowed CPU(s)",
            generator.cpu_util * 100.0,
            allowed
        ));
    }
    let target = match st.mode() {
        Mode::Paced { rate } => Some(rate),
        Mode::Max { .. } => None,
    };
    if let Some(rate) = target {
        if publishes_per_s < rate * 0.97 {
            generator.notes.push(format!("it published {publishes_per_s:.0}/s of the {rate:.0}/s target"));
        }
        let allowed_lag_us = (2 * st.tick_us).max(2000) as f64;
        if generator.send_lag_us.p99 > allowed_lag_us {
            generator.notes.push(format!(
                "it ran behind schedule: send lag p99 {:.0} µs (more than {:.0} µs)",
                generator.send_lag_us.p99, allowed_lag_us
            ));
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
    let report = Report {
        tool: concat!("switchboard-loadgen ", env!("CARGO_PKG_VERSION")).into(),
        settings: st.clone(),
        host,
        setup_s,
        window_s,
        target_publishes_per_s: target,
        publishes_total: sh.published.load(Ordering::Relaxed),
        publishes_per_s,
        deliveries_per_s,
        accounting: tally,
        latency_us: latency.percentiles(),
        spectrum: latency.spectrum(),
        generator,
        server,
        machine,
        errors,
    };
    Ok(Outcome { report, latency })
}

/// What [`run`] returns: the report and the merged latency histogram (for `.hgrm` output).
pub struct Outcome {
    /// Every figure.
    pub report: Report,
    /// End-to-end latency of the messages sent in the measured window.
    pub latency: Latency,
}

fn spawn<T: Send + 'static>(name: String, f: impl FnOnce() -> T + Send + 'static) -> JoinHandle<T> {
    thread::Builder::new().name(name).spawn(f).expect("spawn thread")
}
