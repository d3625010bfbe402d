//! The customer-service load generator (`csload`): agents online through a few gateway
//! connections, conversations opened at a paced rate from other gateway connections, every
//! offer accepted at once and closed after a hold; optionally the ordinary pub/sub load
//! (`loadgen`, as a child process) at the same time.
//!
//! Timeline: setup (agent connections report every agent Online and wait for the OKs; opener
//! connections connect; the `loadgen` child, if any, connects and subscribes) → `t0` → warm-up
//! → measured window `[w0, w1)` → openers stop → drain (until every opened conversation is
//! closed, nothing moved for `hold + 1 s`, or `drain_s`) → accounting.
//!
//! Ids, all in the engine's tenant `bench`: conversation `n` is session `c.{n}` for customer
//! `u.{n}`; agent `a` is `a.{a}`, reported by agent connection `a mod agent_conns`. Opener `i`
//! of `O` sends conversations `n = k·O + i` (its `k`-th, correlation id `k + 1`), so neither a
//! shared map nor a lock is needed to match answers and offers to conversations.
//!
//! No coordinated omission: a conversation's latencies are measured from its *intended* send
//! time (its pacing tick), stored before the write in a shared array the agent threads read.

use crate::clock;
use crate::compare;
use crate::cs::{self, AgentLedger, AgentLoads, CsReport, CsServer, CsSettings, OpenLedger};
use crate::latency::Latency;
use crate::procstat;
use crate::report::{MachineStats, Report};
use bytes::{Bytes, BytesMut};
use std::collections::{BinaryHeap, HashMap};
use std::fmt::Write as _;
use std::io::{self, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};
use switchboard_protocol::{
    decode, AgentPresence, AgentStatus, CloseConversation, ConversationEventKind as Kind, ErrorCode, Frame, Hello, Limits,
    OfferResponse, OpenConversation, Pong, Text,
};

/// The tenant every connection of a run belongs to.
pub const TENANT: &str = "bench";
/// Its signing key id.
pub const KID: &str = "bench-1";
/// Bytes read per `read` call.
const READ_CHUNK: usize = 64 * 1024;
/// Read timeout of the agent connections: how late a due close may be written.
const AGENT_READ_TIMEOUT: Duration = Duration::from_millis(1);
/// Read timeout of the openers' answer readers.
const OPENER_READ_TIMEOUT: Duration = Duration::from_millis(20);
/// Most ERROR texts kept per run.
const ERRORS_KEPT: usize = 20;

/// A random HS256 secret for one run (64 hex characters from the clock and the PID: the
/// engine only listens on loopback and lives for one run).
pub fn run_secret() -> String {
    let seed = clock::now_ns() ^ (u64::from(std::process::id()) << 32) ^ std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64);
    let mut x = seed | 1;
    let mut s = String::with_capacity(64);
    for _ in 0..4 {
        // xorshift64*
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        let _ = write!(s, "{:016x}", x.wrapping_mul(0x2545_F491_4F6C_DD1D));
    }
    s
}

#[derive(serde::Serialize)]
struct Claims<'a> {
    tenant: &'a str,
    role: &'a str,
    sub: &'a str,
    exp: u64,
}

/// A JWT for `role` and subject `sub` of tenant [`TENANT`], signed HS256 with `secret` under
/// [`KID`], valid for an hour.
pub fn token(secret: &str, role: &str, sub: &str) -> Result<String, String> {
    use jsonwebtoken::{Algorithm, EncodingKey, Header};
    let exp = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs()) + 3600;
    let header = Header { kid: Some(KID.into()), ..Header::new(Algorithm::HS256) };
    jsonwebtoken::encode(&header, &Claims { tenant: TENANT, role, sub, exp }, &EncodingKey::from_secret(secret.as_bytes())).map_err(|e| format!("signing a token: {e}"))
}

/// The engine's desk settings for a run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DeskKnobs {
    /// Offer accept timeout, ms.
    pub offer_timeout_ms: u64,
    /// Agents allowed in the tenant.
    pub agents_max: usize,
    /// Open conversations allowed in the tenant.
    pub conversations_max: usize,
    /// Conversations waiting in one queue.
    pub queue_length_max: usize,
    /// The engine's `limits.sessions_per_shard_max`, when not its default (every conversation
    /// is a session).
    pub sessions_per_shard_max: Option<usize>,
}

/// The engine configuration (TOML) of a run: memory only, one tenant [`TENANT`] with one key,
/// least-load routing over one default queue. Addresses, shards and the data directory come
/// from the command line.
pub fn engine_config(secret: &str, desk: &DeskKnobs) -> String {
    let limits = desk.sessions_per_shard_max.map_or_else(String::new, |n| format!("[limits]\nsessions_per_shard_max = {n}\n\n"));
    format!(
        r#"# Written by csload for one run.
{limits}[journal]
durability = "none"

[desk]
strategy = "least-load"
offer_timeout_ms = {offer}
agent_grace_ms = 60000
conversations_max = {conv}
agents_max = {agents}
queue_length_max = {queue}

[[desk.queues]]
name = "default"
skills = []
wait_ms_max = 0
overflow = ""

[[tenants]]
id = "{TENANT}"

[[tenants.keys]]
kid = "{KID}"
secret = "{secret}"
"#,
        offer = desk.offer_timeout_ms,
        conv = desk.conversations_max,
        agents = desk.agents_max,
        queue = desk.queue_length_max,
    )
}

fn proto_err(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

fn encode(out: &mut BytesMut, f: &Frame, corr: u32) -> io::Result<()> {
    f.encode(corr, out).map_err(|e| proto_err(format!("encode: {e:?}")))
}

fn error_text(code: u16, message: &str) -> String {
    format!("ERROR {:?} ({code}): {message}", ErrorCode::from_u16(code))
}

/// One connection after HELLO → WELCOME.
struct Conn {
    sock: TcpStream,
    rbuf: BytesMut,
    next_corr: u32,
}

impl Conn {
    fn open(addr: &str, token: &str, name: &str, read_timeout: Duration) -> io::Result<Conn> {
        let sock = TcpStream::connect(addr).map_err(|e| io::Error::new(e.kind(), format!("connect {addr}: {e}")))?;
        sock.set_nodelay(true)?;
        sock.set_read_timeout(Some(read_timeout))?;
        let mut c = Conn { sock, rbuf: BytesMut::with_capacity(READ_CHUNK), next_corr: 1 };
        let hello = Frame::Hello(Hello { version_max: 1, version_min: 1, features: 0, client_name: Text::from(name), token: Text::from(token) });
        let mut out = BytesMut::new();
        let corr = c.corr();
        encode(&mut out, &hello, corr)?;
        c.sock.write_all(&out)?;
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if Instant::now() > deadline {
                return Err(io::Error::new(io::ErrorKind::TimedOut, "no WELCOME within 10 s"));
            }
            if !c.fill()? {
                return Err(proto_err("the server closed the connection during the handshake"));
            }
            if let Some(env) = c.next()? {
                return match env.frame {
                    Frame::Welcome(_) => Ok(c),
                    Frame::Error(e) => Err(proto_err(error_text(e.code, e.message.as_str()))),
                    other => Err(proto_err(format!("expected WELCOME, got {:?}", other.frame_type()))),
                };
            }
        }
    }

    fn corr(&mut self) -> u32 {
        let c = self.next_corr;
        self.next_corr = self.next_corr.wrapping_add(1).max(1);
        c
    }

    /// Read once; false when the server closed the connection.
    fn fill(&mut self) -> io::Result<bool> {
        fill(&mut self.sock, &mut self.rbuf)
    }

    fn next(&mut self) -> io::Result<Option<switchboard_protocol::Envelope>> {
        decode(&mut self.rbuf, &Limits::default()).map_err(|e| proto_err(format!("decode: {e:?}")))
    }
}

fn fill(sock: &mut TcpStream, rbuf: &mut BytesMut) -> io::Result<bool> {
    crate::backend::switchboard::fill(sock, rbuf).map(|poll| poll != crate::backend::Poll::Closed)
}

/// State shared by every thread of a run.
struct Shared {
    stop: AtomicBool,
    abort: AtomicBool,
    errors: Mutex<Vec<String>>,
    /// Intended send time of each conversation (ns on the process clock; 0 = not sent).
    intended: Vec<AtomicU64>,
    /// Opens answered (OK or ERROR).
    answered: AtomicU64,
    /// Opens answered OK.
    open_ok: AtomicU64,
    /// Opens written.
    sent: AtomicU64,
    /// Conversations finished on the agent side (close answered, or accept refused).
    finished: AtomicU64,
}

impl Shared {
    fn fail(&self, msg: String) {
        self.note(msg);
        self.abort.store(true, Ordering::SeqCst);
    }

    fn note(&self, msg: String) {
        let mut e = self.errors.lock().unwrap();
        if e.len() < ERRORS_KEPT {
            e.push(msg);
        }
    }
}

#[derive(Clone, Copy)]
struct Timeline {
    t0: u64,
    w0: u64,
    w1: u64,
}

impl Timeline {
    fn in_window(&self, t: u64) -> bool {
        t >= self.w0 && t < self.w1
    }
}

// ---- agents ----

#[derive(Clone, Copy)]
enum Pending {
    Accept { conv: usize, agent: usize, offered_ns: u64 },
    Close { conv: usize },
}

struct AgentOut {
    ledger: AgentLedger,
    loads: AgentLoads,
    offered: Latency,
    accept_ok: Latency,
}

/// Connect agent connection `k` and report its agents Online; waits for every OK.
fn agent_setup(st: &CsSettings, k: u32, token: &str, deadline: Instant) -> Result<Conn, String> {
    let mut c = Conn::open(&st.addr, token, &format!("csload-agents-{k}"), AGENT_READ_TIMEOUT).map_err(|e| format!("agent connection {k}: {e}"))?;
    let mut out = BytesMut::new();
    let mut want = 0usize;
    for a in (k..st.agents).step_by(st.agent_conns as usize) {
        let f = Frame::AgentStatus(AgentStatus { agent: Text::from(format!("a.{a}")), presence: AgentPresence::Online, capacity: st.capacity, load: 0, skills: vec![] });
        let corr = c.corr();
        encode(&mut out, &f, corr).map_err(|e| e.to_string())?;
        want += 1;
    }
    c.sock.write_all(&out).map_err(|e| format!("agent connection {k}: {e}"))?;
    let mut got = 0;
    while got < want {
        if Instant::now() > deadline {
            return Err(format!("agent connection {k}: {got} of {want} AGENT_STATUS answered"));
        }
        if !c.fill().map_err(|e| format!("agent connection {k}: {e}"))? {
            return Err(format!("agent connection {k}: closed during setup"));
        }
        while let Some(env) = c.next().map_err(|e| format!("agent connection {k}: {e}"))? {
            match env.frame {
                Frame::Success(_) => got += 1,
                Frame::Error(e) => return Err(format!("agent connection {k}: AGENT_STATUS refused: {}", error_text(e.code, e.message.as_str()))),
                _ => {}
            }
        }
    }
    Ok(c)
}

#[allow(clippy::needless_pass_by_value, clippy::too_many_lines)]
fn agent_thread(k: u32, mut c: Conn, st: CsSettings, tl: Timeline, sh: Arc<Shared>, n_conv: usize) -> AgentOut {
    clock::tight_timer_slack();
    let mut ledger = AgentLedger::new(n_conv);
    let mut loads = AgentLoads::new(st.agents as usize, st.capacity);
    let mut offered = Latency::new();
    let mut accept_ok = Latency::new();
    let mut pending: HashMap<u32, Pending> = HashMap::new();
    // Min-heap of (due ns, conversation, agent), as Reverse.
    let mut closes: BinaryHeap<std::cmp::Reverse<(u64, usize, usize)>> = BinaryHeap::new();
    let hold_ns = st.hold_ms * 1_000_000;
    let mut out = BytesMut::with_capacity(64 * 1024);
    let reason = Text::from("resolved");
    let mut run = || -> io::Result<()> {
        while !sh.stop.load(Ordering::Relaxed) {
            if !c.fill()? {
                if !sh.stop.load(Ordering::Relaxed) {
                    return Err(proto_err("the server closed the connection"));
                }
                return Ok(());
            }
            let mut now: Option<u64> = None;
            while let Some(env) = c.next()? {
                match env.frame {
                    Frame::ConversationEvent(ev) if ev.seq == 0 => {
                        let now = *now.get_or_insert_with(clock::now_ns);
                        let conv = cs::parse_index(ev.session.as_str(), "c.");
                        let agent = cs::parse_index(ev.agent.as_str(), "a.");
                        let (Some(conv), Some(agent)) = (conv, agent) else {
                            ledger.unknown += 1;
                            continue;
                        };
                        let Some(e) = ledger.get(conv) else { continue };
                        match ev.kind {
                            Kind::Offered => {
                                e.offers += 1;
                                if e.offers == 1 {
                                    let t = sh.intended.get(conv).map_or(0, |x| x.load(Ordering::Acquire));
                                    if t != 0 && tl.in_window(t) {
                                        offered.record(now.saturating_sub(t));
                                    }
                                }
                                loads.offer(agent);
                                let corr = c.corr();
                                let f = Frame::OfferResponse(OfferResponse { session: ev.session.clone(), agent: ev.agent.clone(), accept: true });
                                encode(&mut out, &f, corr)?;
                                pending.insert(corr, Pending::Accept { conv, agent, offered_ns: now });
                            }
                            // The offer was withdrawn (timeout): the agent is free of it.
                            Kind::Declined | Kind::Abandoned => {
                                e.withdrawn += 1;
                                loads.release(agent);
                            }
                            _ => {}
                        }
                    }
                    Frame::Success(_) => match pending.remove(&env.correlation) {
                        Some(Pending::Accept { conv, agent, offered_ns }) => {
                            let now = *now.get_or_insert_with(clock::now_ns);
                            if let Some(e) = ledger.get(conv) {
                                e.accept_ok += 1;
                            }
                            let t = sh.intended.get(conv).map_or(0, |x| x.load(Ordering::Acquire));
                            if t != 0 && tl.in_window(t) {
                                accept_ok.record(now.saturating_sub(offered_ns));
                            }
                            closes.push(std::cmp::Reverse((now + hold_ns, conv, agent)));
                        }
                        Some(Pending::Close { conv }) => {
                            if let Some(e) = ledger.get(conv) {
                                e.close_ok += 1;
                            }
                            sh.finished.fetch_add(1, Ordering::Relaxed);
                        }
                        None => ledger.unknown += 1,
                    },
                    Frame::Error(er) if env.correlation != 0 => {
                        let text = error_text(er.code, er.message.as_str());
                        match pending.remove(&env.correlation) {
                            Some(Pending::Accept { conv, agent, .. }) => {
                                if let Some(e) = ledger.get(conv) {
                                    e.accept_refused += 1;
                                }
                                loads.release(agent);
                                sh.finished.fetch_add(1, Ordering::Relaxed);
                                sh.note(format!("accept of c.{conv} by a.{agent}: {text}"));
                            }
                            Some(Pending::Close { conv }) => {
                                if let Some(e) = ledger.get(conv) {
                                    e.close_refused += 1;
                                }
                                sh.finished.fetch_add(1, Ordering::Relaxed);
                                sh.note(format!("close of c.{conv}: {text}"));
                            }
                            None => {
                                ledger.unknown += 1;
                                sh.note(format!("agent connection {k}: {text} for an unknown request"));
                            }
                        }
                    }
                    Frame::Error(er) => return Err(proto_err(error_text(er.code, er.message.as_str()))),
                    Frame::GoAway(g) => return Err(proto_err(format!("GOAWAY {:?}: {}", g.reason, g.message.as_str()))),
                    Frame::Ping(p) => encode(&mut out, &Frame::Pong(Pong { nonce: p.nonce }), env.correlation)?,
                    _ => {}
                }
            }
            let now = clock::now_ns();
            while let Some(std::cmp::Reverse((due, conv, agent))) = closes.peek().copied() {
                if due > now {
                    break;
                }
                closes.pop();
                let corr = c.corr();
                let f = Frame::CloseConversation(CloseConversation { session: Text::from(format!("c.{conv}")), reason: reason.clone() });
                encode(&mut out, &f, corr)?;
                pending.insert(corr, Pending::Close { conv });
                // The agent is free once the engine takes the close; an offer that arrives
                // before this write cannot have used the slot.
                loads.release(agent);
            }
            if !out.is_empty() {
                c.sock.write_all(&out)?;
                out.clear();
            }
        }
        Ok(())
    };
    if let Err(e) = run() {
        sh.fail(format!("agent connection {k}: {e}"));
    }
    AgentOut { ledger, loads, offered, accept_ok }
}

// ---- openers ----

struct OpenerOut {
    wake_lag: Latency,
    send_lag: Latency,
}

struct AnswerOut {
    ledger: OpenLedger,
    open_ok: Latency,
    stray: u64,
}

/// Opener `i` of `O`: paced on the tick, sends the conversations due by each tick, stamped
/// with the tick's time (as `run::paced`).
#[allow(clippy::needless_pass_by_value, clippy::many_single_char_names)]
fn opener_thread(i: u32, mut sock: TcpStream, st: CsSettings, tl: Timeline, sh: Arc<Shared>, pongs: Arc<Mutex<Vec<(u32, u64)>>>) -> OpenerOut {
    clock::tight_timer_slack();
    let mut wake_lag = Latency::new();
    let mut send_lag = Latency::new();
    let o = u64::from(st.open_conns);
    let tick = st.tick_us * 1000;
    let start = tl.t0 + tick * u64::from(i) / o;
    let rate_i = st.rate / o as f64;
    let due_by = |k: u64| -> u64 { ((k * tick) as f64 * rate_i / 1e9).floor() as u64 + 1 };
    let empty = Bytes::new();
    let mut out = BytesMut::with_capacity(16 * 1024);
    let mut sent: u64 = 0;
    let mut k: u64 = 0;
    let mut run = || -> io::Result<()> {
        loop {
            let t = start + k * tick;
            if t >= tl.w1 || sh.abort.load(Ordering::Relaxed) {
                return Ok(());
            }
            clock::sleep_until(t);
            let woke = clock::now_ns();
            wake_lag.record(woke.saturating_sub(t));
            let current = k.max((woke - start) / tick);
            let mut kk = k;
            while kk <= current {
                let tt = start + kk * tick;
                if tt >= tl.w1 {
                    break;
                }
                while sent < due_by(kk) {
                    let n = (sent * o + u64::from(i)) as usize;
                    let Some(slot) = sh.intended.get(n) else { return Ok(()) };
                    slot.store(tt, Ordering::Release);
                    let f = Frame::OpenConversation(OpenConversation {
                        session: Text::from(format!("c.{n}")),
                        customer: Text::from(format!("u.{n}")),
                        priority: 0,
                        skills: vec![],
                        context: empty.clone(),
                    });
                    encode(&mut out, &f, (sent + 1) as u32)?;
                    sent += 1;
                    sh.sent.fetch_add(1, Ordering::Relaxed);
                }
                kk += 1;
            }
            for (corr, nonce) in std::mem::take(&mut *pongs.lock().unwrap()) {
                encode(&mut out, &Frame::Pong(Pong { nonce }), corr)?;
            }
            if !out.is_empty() {
                sock.write_all(&out)?;
                out.clear();
                send_lag.record(clock::now_ns().saturating_sub(t));
            }
            k = current + 1;
        }
    };
    if let Err(e) = run() {
        sh.fail(format!("opener {i}: {e}"));
    }
    OpenerOut { wake_lag, send_lag }
}

/// Reads opener `i`'s answers: OK / ERROR per OPEN (correlation `k + 1` = its `k`-th).
#[allow(clippy::needless_pass_by_value)]
fn answer_thread(i: u32, mut sock: TcpStream, st: CsSettings, tl: Timeline, sh: Arc<Shared>, pongs: Arc<Mutex<Vec<(u32, u64)>>>, n_conv: usize) -> AnswerOut {
    let mut ledger = OpenLedger::new(n_conv);
    let mut open_ok = Latency::new();
    let mut stray = 0u64;
    let mut rbuf = BytesMut::with_capacity(READ_CHUNK);
    let o = st.open_conns as usize;
    let mut run = || -> io::Result<()> {
        while !sh.stop.load(Ordering::Relaxed) {
            if !fill(&mut sock, &mut rbuf)? {
                if !sh.stop.load(Ordering::Relaxed) {
                    return Err(proto_err("the server closed the connection"));
                }
                return Ok(());
            }
            let mut now: Option<u64> = None;
            while let Some(env) = decode(&mut rbuf, &Limits::default()).map_err(|e| proto_err(format!("decode: {e:?}")))? {
                let ok = match &env.frame {
                    Frame::Success(_) => true,
                    Frame::Error(e) if env.correlation != 0 => {
                        sh.note(format!("open (opener {i}, correlation {}): {}", env.correlation, error_text(e.code, e.message.as_str())));
                        false
                    }
                    Frame::Error(e) => return Err(proto_err(error_text(e.code, e.message.as_str()))),
                    Frame::GoAway(g) => return Err(proto_err(format!("GOAWAY {:?}: {}", g.reason, g.message.as_str()))),
                    Frame::Ping(p) => {
                        pongs.lock().unwrap().push((env.correlation, p.nonce));
                        continue;
                    }
                    _ => continue,
                };
                let n = (env.correlation as usize).wrapping_sub(1) * o + i as usize;
                let t = sh.intended.get(n).map_or(0, |x| x.load(Ordering::Acquire));
                if env.correlation == 0 || t == 0 {
                    stray += 1;
                    continue;
                }
                ledger.sent(n);
                if !ledger.answered(n, ok) {
                    stray += 1;
                    continue;
                }
                sh.answered.fetch_add(1, Ordering::Relaxed);
                if ok {
                    sh.open_ok.fetch_add(1, Ordering::Relaxed);
                    let now = *now.get_or_insert_with(clock::now_ns);
                    if tl.in_window(t) {
                        open_ok.record(now.saturating_sub(t));
                    }
                }
            }
        }
        Ok(())
    };
    if let Err(e) = run() {
        sh.fail(format!("opener {i} answers: {e}"));
    }
    AnswerOut { ledger, open_ok, stray }
}

// ---- the pub/sub child ----

/// The ordinary pub/sub load, run as a `loadgen` child process during the conversations.
#[derive(Debug, Clone)]
pub struct PubsubSpec {
    /// The `loadgen` binary.
    pub loadgen: PathBuf,
    /// Publishes per second.
    pub rate: f64,
    /// Gateway token (`$SWITCHBOARD_TOKEN` of the child).
    pub token: String,
    /// CPU to pin it to.
    pub cpu: Option<usize>,
    /// Where its report, histogram and output go (`<prefix>.json`, `.hgrm`, `.log`).
    pub out_prefix: PathBuf,
}

struct PubsubChild {
    child: Child,
    json: PathBuf,
    log: PathBuf,
}

impl PubsubChild {
    fn start(spec: &PubsubSpec, addr: &str, server_pid: Option<u32>, warmup_s: f64, duration_s: f64) -> io::Result<PubsubChild> {
        let json = spec.out_prefix.with_extension("json");
        let hgrm = spec.out_prefix.with_extension("hgrm");
        let log = spec.out_prefix.with_extension("log");
        let logf = std::fs::File::create(&log)?;
        let mut cmd = compare::pinned_command(&spec.loadgen, spec.cpu);
        cmd.env("SWITCHBOARD_TOKEN", &spec.token)
            .args(["--backend", "switchboard", "--addr", addr, "--sessions", "1000", "--subscribers", "3", "--gateways", "8", "--publishers", "2", "--payload", "128"])
            .args(["--rate", &spec.rate.to_string(), "--warmup", &format!("{warmup_s:.3}"), "--duration", &format!("{duration_s:.3}"), "--drain", "3"])
            .arg("--json")
            .arg(&json)
            .arg("--hgrm")
            .arg(&hgrm)
            .stdin(Stdio::null())
            .stdout(logf.try_clone()?)
            .stderr(logf);
        if let Some(p) = server_pid {
            cmd.args(["--server-pid", &p.to_string()]);
        }
        Ok(PubsubChild { child: cmd.spawn()?, json, log })
    }

    /// Wait until its publisher threads exist (its setup is over and its `t0` is ~20 ms
    /// away), or it exits, or `deadline`.
    fn wait_publishing(&mut self, deadline: Instant) -> Result<(), String> {
        let task_dir = format!("/proc/{}/task", self.child.id());
        loop {
            if let Ok(Some(st)) = self.child.try_wait() {
                return Err(format!("loadgen exited during its setup ({st}): {}", compare::log_tail(&self.log, 3)));
            }
            let publishing = std::fs::read_dir(&task_dir).into_iter().flatten().flatten().any(|t| {
                std::fs::read_to_string(t.path().join("comm")).is_ok_and(|c| c.trim() == "pub0")
            });
            if publishing {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err("loadgen did not finish its setup within 60 s".into());
            }
            thread::sleep(Duration::from_millis(2));
        }
    }

    /// Wait for it to finish and read its report.
    fn finish(mut self, deadline: Instant) -> Result<Report, String> {
        loop {
            match self.child.try_wait() {
                Ok(Some(st)) => {
                    let text = std::fs::read_to_string(&self.json).map_err(|e| format!("loadgen ({st}) wrote no report: {e}: {}", compare::log_tail(&self.log, 3)))?;
                    return serde_json::from_str(&text).map_err(|e| format!("loadgen report: {e}"));
                }
                Ok(None) if Instant::now() > deadline => {
                    let _ = self.child.kill();
                    let _ = self.child.wait();
                    return Err("loadgen did not finish in time (killed)".into());
                }
                Ok(None) => thread::sleep(Duration::from_millis(20)),
                Err(e) => return Err(format!("waiting for loadgen: {e}")),
            }
        }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }
}

impl Drop for PubsubChild {
    fn drop(&mut self) {
        if matches!(self.child.try_wait(), Ok(None)) {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

// ---- the run ----

/// Busy clock ticks (user, nice, system, steal, as [`procstat::parse_proc_stat_busy`]) of each
/// CPU, in CPU order, from the text of /proc/stat.
pub fn parse_per_cpu_busy(stat: &str) -> Vec<u64> {
    stat.lines()
        .filter(|l| l.starts_with("cpu") && l.as_bytes().get(3).is_some_and(u8::is_ascii_digit))
        .filter_map(|l| {
            let v: Vec<u64> = l.split_ascii_whitespace().skip(1).filter_map(|x| x.parse().ok()).collect();
            (v.len() >= 8).then(|| v[0] + v[1] + v[2] + v[7])
        })
        .collect()
}

fn per_cpu_busy_ns() -> Vec<u64> {
    let ns = 1_000_000_000 / procstat::clk_tck();
    std::fs::read_to_string("/proc/stat").map(|s| parse_per_cpu_busy(&s).into_iter().map(|t| t * ns).collect()).unwrap_or_default()
}

#[derive(Clone)]
struct Snap {
    per_cpu: Vec<u64>,
    at: u64,
    own_cpu: u64,
    server_cpu: Option<u64>,
    child_cpu: Option<u64>,
    machine_busy: Option<u64>,
}

fn snap(server: Option<u32>, child: Option<u32>) -> Snap {
    Snap {
        per_cpu: per_cpu_busy_ns(),
        at: clock::now_ns(),
        own_cpu: procstat::own_cpu_ns(),
        server_cpu: server.and_then(|p| procstat::cpu_ns(p).ok()),
        child_cpu: child.and_then(|p| procstat::cpu_ns(p).ok()),
        machine_busy: procstat::machine_busy_ns().ok(),
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

fn spawn<T: Send + 'static>(name: String, f: impl FnOnce() -> T + Send + 'static) -> JoinHandle<T> {
    thread::Builder::new().name(name).spawn(f).expect("spawn thread")
}

/// Run the scenario: `st` against the engine at `st.addr` (tokens signed with `secret`), with
/// the pub/sub load of `pubsub` alongside. Setup failures are `Err`; failures during the load
/// are in the report's `errors`.
#[allow(clippy::too_many_lines)]
pub fn run(name: &str, st: &CsSettings, secret: &str, pubsub: Option<&PubsubSpec>) -> Result<CsReport, String> {
    st.validate()?;
    let setup_start = Instant::now();
    let deadline = setup_start + Duration::from_secs(60);
    let gw = token(secret, "gateway", "csload")?;
    let mut agent_conns = Vec::new();
    for k in 0..st.agent_conns {
        agent_conns.push(agent_setup(st, k, &gw, deadline)?);
    }
    let openers = if st.rate > 0.0 { st.open_conns } else { 0 };
    let mut open_conns = Vec::new();
    for i in 0..openers {
        let c = Conn::open(&st.addr, &gw, &format!("csload-opener-{i}"), OPENER_READ_TIMEOUT).map_err(|e| format!("opener {i}: {e}"))?;
        open_conns.push(c.sock);
    }
    let setup_s = setup_start.elapsed().as_secs_f64();
    let mut child = match pubsub {
        Some(p) => {
            let mut c = PubsubChild::start(p, &st.addr, st.server_pid, st.warmup_s, st.duration_s + 1.0).map_err(|e| format!("starting loadgen: {e}"))?;
            c.wait_publishing(Instant::now() + Duration::from_secs(60))?;
            Some(c)
        }
        None => None,
    };
    let n_conv = st.conversations_max();
    let sh = Arc::new(Shared {
        stop: AtomicBool::new(false),
        abort: AtomicBool::new(false),
        errors: Mutex::new(Vec::new()),
        intended: (0..n_conv).map(|_| AtomicU64::new(0)).collect(),
        answered: AtomicU64::new(0),
        open_ok: AtomicU64::new(0),
        sent: AtomicU64::new(0),
        finished: AtomicU64::new(0),
    });
    // loadgen's own t0 is 20 ms after its publisher threads appear: start together.
    let t0 = clock::now_ns() + 20_000_000;
    let w0 = t0 + (st.warmup_s * 1e9) as u64;
    let tl = Timeline { t0, w0, w1: w0 + (st.duration_s * 1e9) as u64 };

    let mut agents = Vec::new();
    for (k, c) in agent_conns.into_iter().enumerate() {
        let (st, sh) = (st.clone(), sh.clone());
        agents.push(spawn(format!("agents{k}"), move || agent_thread(k as u32, c, st, tl, sh, n_conv)));
    }
    let mut answers = Vec::new();
    let mut writers = Vec::new();
    for (i, sock) in open_conns.into_iter().enumerate() {
        let pongs = Arc::new(Mutex::new(Vec::new()));
        let rsock = sock.try_clone().map_err(|e| format!("opener {i}: {e}"))?;
        let (st2, sh2, p2) = (st.clone(), sh.clone(), pongs.clone());
        answers.push(spawn(format!("answers{i}"), move || answer_thread(i as u32, rsock, st2, tl, sh2, p2, n_conv)));
        let (st2, sh2) = (st.clone(), sh.clone());
        writers.push(spawn(format!("opener{i}"), move || opener_thread(i as u32, sock, st2, tl, sh2, pongs)));
    }

    let child_pid = child.as_ref().map(PubsubChild::pid);
    wait_until(tl.w0, &sh);
    let a = snap(st.server_pid, child_pid);
    wait_until(tl.w1, &sh);
    let b = snap(st.server_pid, child_pid);
    let rss_end_kb = st.server_pid.and_then(|p| procstat::rss_kb(p).ok());

    let opener_outs: Vec<OpenerOut> = writers.into_iter().map(|h| h.join().expect("opener thread panicked")).collect();
    // Drain: every open answered and every OK'd conversation finished, or no progress for
    // hold + 1 s, or drain_s.
    let drain_end = clock::now_ns() + (st.drain_s * 1e9) as u64;
    let quiet_ns = (st.hold_ms + 1000) * 1_000_000;
    let progress = || (sh.answered.load(Ordering::Relaxed), sh.finished.load(Ordering::Relaxed));
    let mut last = (progress(), clock::now_ns());
    loop {
        let now = clock::now_ns();
        let (answered, finished) = progress();
        let sent = sh.sent.load(Ordering::Relaxed);
        if (answered >= sent && finished >= sh.open_ok.load(Ordering::Relaxed)) || now >= drain_end || sh.abort.load(Ordering::Relaxed) {
            break;
        }
        if (answered, finished) != last.0 {
            last = ((answered, finished), now);
        } else if now - last.1 > quiet_ns {
            break;
        }
        thread::sleep(Duration::from_millis(5));
    }
    sh.stop.store(true, Ordering::SeqCst);
    let agent_outs: Vec<AgentOut> = agents.into_iter().map(|h| h.join().expect("agent thread panicked")).collect();
    let answer_outs: Vec<AnswerOut> = answers.into_iter().map(|h| h.join().expect("answer thread panicked")).collect();
    let pubsub_report = match child.take() {
        Some(c) => match c.finish(Instant::now() + Duration::from_secs(20)) {
            Ok(r) => Some(r),
            Err(e) => {
                sh.note(format!("pub/sub: {e}"));
                None
            }
        },
        None => None,
    };

    // Accounting.
    let mut open_ledger = OpenLedger::new(n_conv);
    let mut open_ok = Latency::new();
    let mut stray = 0;
    for ao in &answer_outs {
        open_ledger.merge(&ao.ledger);
        open_ok.merge(&ao.open_ok);
        stray += ao.stray;
    }
    let mut in_window = 0u64;
    for (n, t) in sh.intended.iter().enumerate() {
        let t = t.load(Ordering::Acquire);
        if t != 0 {
            open_ledger.sent(n);
            if tl.in_window(t) {
                in_window += 1;
            }
        }
    }
    let mut agent_ledger = AgentLedger::new(n_conv);
    let mut offered = Latency::new();
    let mut accept_ok = Latency::new();
    let mut over_capacity = 0;
    let mut peak = 0;
    for ao in &agent_outs {
        agent_ledger.merge(&ao.ledger);
        offered.merge(&ao.offered);
        accept_ok.merge(&ao.accept_ok);
        over_capacity += ao.loads.over_capacity;
        peak = peak.max(ao.loads.peak);
    }
    let mut counts = cs::classify(&open_ledger, &agent_ledger);
    counts.over_capacity = over_capacity;
    counts.stray_answers = stray;
    let mut wake_lag = Latency::new();
    let mut send_lag = Latency::new();
    for o in &opener_outs {
        wake_lag.merge(&o.wake_lag);
        send_lag.merge(&o.send_lag);
    }

    let window_ns = b.at.saturating_sub(a.at).max(1);
    let measured_s = window_ns as f64 / 1e9;
    let delta = |x: Option<u64>, y: Option<u64>| match (x, y) {
        (Some(x), Some(y)) => Some(y.saturating_sub(x)),
        _ => None,
    };
    let server_cpu = delta(a.server_cpu, b.server_cpu);
    let server = st.server_pid.map(|_| CsServer {
        cpu_cores: server_cpu.map_or(0.0, |c| c as f64 / window_ns as f64),
        cpu_ns_per_conversation: server_cpu.filter(|_| in_window > 0).map(|c| c as f64 / in_window as f64),
        rss_end_kb,
    });
    let generator_cores = b.own_cpu.saturating_sub(a.own_cpu) as f64 / window_ns as f64;
    let pubsub_generator_cores = delta(a.child_cpu, b.child_cpu).map_or(0.0, |c| c as f64 / window_ns as f64);
    let machine = match delta(a.machine_busy, b.machine_busy) {
        Some(busy) => {
            let busy_cores = busy as f64 / window_ns as f64;
            let known = generator_cores + pubsub_generator_cores + server.as_ref().map_or(0.0, |s| s.cpu_cores);
            let other_cores = (busy_cores - known).max(0.0);
            MachineStats { busy_cores, other_cores, noisy: other_cores > 0.15 }
        }
        None => MachineStats::default(),
    };
    let cpu_busy: Vec<f64> = a.per_cpu.iter().zip(&b.per_cpu).map(|(x, y)| y.saturating_sub(*x) as f64 / window_ns as f64).collect();
    let mut notes = Vec::new();
    for (what, cpu) in [("engine", st.server_cpu), ("generators", st.generator_cpu)] {
        if let Some(busy) = cpu.and_then(|c| cpu_busy.get(c)) {
            if *busy > 0.9 {
                notes.push(format!(
                    "CPU {} ({what}) was {:.0} % busy, all processes counted: latencies include waiting for it",
                    cpu.unwrap_or_default(),
                    busy * 100.0
                ));
            }
        }
    }
    let wake = wake_lag.percentiles();
    let opens_per_s = in_window as f64 / ((tl.w1 - tl.w0) as f64 / 1e9);
    if st.rate > 0.0 && opens_per_s < st.rate * 0.97 {
        notes.push(format!("the openers scheduled {opens_per_s:.0}/s of the {:.0}/s asked", st.rate));
    }
    let lag = send_lag.percentiles();
    let allowed_lag_us = (2 * st.tick_us).max(2000) as f64;
    if lag.p99 > allowed_lag_us {
        notes.push(format!("the openers ran behind schedule: send lag p99 {:.0} µs (latency includes it: no coordinated omission)", lag.p99));
    }
    if pubsub.is_some() {
        notes.push("pub/sub window: starts with this run's (±~5 ms, loadgen's setup end is detected by its publisher threads) and ends 1 s later".into());
    }
    let errors = std::mem::take(&mut *sh.errors.lock().unwrap());
    Ok(CsReport {
        name: name.into(),
        settings: Some(st.clone()),
        pubsub_rate: pubsub.map_or(0.0, |p| p.rate),
        setup_s,
        window_s: measured_s,
        opens_per_s,
        counts,
        offered_us: offered.percentiles(),
        offered_spectrum: offered.spectrum(),
        open_ok_us: open_ok.percentiles(),
        accept_ok_us: accept_ok.percentiles(),
        peak_agent_load: peak,
        opener_wake_lag_us: wake,
        server,
        generator_cores,
        pubsub_generator_cores,
        machine,
        cpu_busy,
        pubsub: pubsub_report,
        marginal_cpu_ns_per_conversation: None,
        errors,
        notes,
    })
}

/// The engine log's WARN and ERROR lines (colour codes removed): how many, and the first few.
pub fn log_warnings(path: &Path, keep: usize) -> (usize, Vec<String>) {
    let text = std::fs::read_to_string(path).unwrap_or_default();
    let mut n = 0;
    let mut first = Vec::new();
    for line in text.lines() {
        let plain = strip_ansi(line);
        if plain.contains(" WARN ") || plain.contains(" ERROR ") {
            n += 1;
            if first.len() < keep {
                first.push(plain.trim().to_string());
            }
        }
    }
    (n, first)
}

fn strip_ansi(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut it = s.chars().peekable();
    while let Some(c) = it.next() {
        if c == '\u{1b}' && it.peek() == Some(&'[') {
            for d in it.by_ref() {
                if d.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// Write the engine configuration for a run into `dir` and return its path.
pub fn write_engine_config(dir: &Path, secret: &str, desk: &DeskKnobs) -> io::Result<PathBuf> {
    std::fs::create_dir_all(dir)?;
    let p = dir.join("engine.toml");
    std::fs::write(&p, engine_config(secret, desk))?;
    Ok(p)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn engine_log_warnings_are_counted_without_colours() {
        let p = std::env::temp_dir().join(format!("csload-log-test-{}.log", std::process::id()));
        std::fs::write(&p, "\u{1b}[2m2026\u{1b}[0m \u{1b}[32m INFO\u{1b}[0m ready\n\u{1b}[2m2026\u{1b}[0m \u{1b}[33m WARN\u{1b}[0m \u{1b}[2mswitchboard::shard\u{1b}[0m conversation event dropped\nx ERROR y\nplain WARN z\n").unwrap();
        let (n, first) = log_warnings(&p, 1);
        assert_eq!(n, 3);
        assert_eq!(first, vec!["2026  WARN switchboard::shard conversation event dropped".to_string()]);
        let _ = std::fs::remove_file(&p);
    }

    #[test]
    fn per_cpu_busy_parses() {
        let stat = "cpu  10 1 5 100 3 0 2 4 0 0\ncpu0 4 0 2 50 1 0 1 1 0 0\ncpu1 6 1 3 50 2 0 1 3 0 0\nintr 5\ncpufreq x\n";
        assert_eq!(parse_per_cpu_busy(stat), vec![7, 13]);
        assert!(parse_per_cpu_busy("cpu0 1 2\n").is_empty());
    }

    #[test]
    fn the_engine_accepts_the_config_and_the_tokens() {
        let secret = run_secret();
        assert_eq!(secret.len(), 64);
        assert_ne!(secret, run_secret());
        let knobs = DeskKnobs { offer_timeout_ms: 30_000, agents_max: 10_000, conversations_max: 100_000, queue_length_max: 10_000, sessions_per_shard_max: None };
        let dir = std::env::temp_dir().join(format!("csload-config-test-{}", std::process::id()));
        let path = write_engine_config(&dir, &secret, &knobs).unwrap();
        let config = switchboard::config::Config::from_file(&path).expect("the engine parses the config");
        config.validate().expect("the engine accepts the config");
        assert_eq!(config.tenants.len(), 1);
        assert_eq!(config.tenants[0].id, TENANT);
        assert_eq!(config.journal.durability, switchboard::config::DurabilityMode::None);
        assert_eq!(config.desk.policy.offer_timeout_ms, 30_000);
        let auth = switchboard::auth::Authenticator::new(&config.tenants, config.auth.leeway_s).expect("tenants configured");
        for role in ["gateway", "agent", "customer", "supervisor"] {
            let id = auth.verify(&token(&secret, role, "x.1").unwrap()).unwrap_or_else(|e| panic!("{role}: {e:?}"));
            assert_eq!(id.tenant.as_str(), TENANT);
        }
        assert!(auth.verify(&token("another-secret-0123456789abcdef0123456789", "gateway", "x").unwrap()).is_err());
        let limited = DeskKnobs { sessions_per_shard_max: Some(5000), ..knobs };
        let path = write_engine_config(&dir, &secret, &limited).unwrap();
        let config = switchboard::config::Config::from_file(&path).expect("the engine parses the config");
        config.validate().expect("the engine accepts the config");
        assert_eq!(config.limits.sessions_per_shard_max, 5000);
        let _ = std::fs::remove_dir_all(&dir);
    }
}
