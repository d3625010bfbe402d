//! The control plane: its own threads, never on a shard, serving HTTP on the control port.
//!
//! - `GET /healthz`: 200 when every shard's loop answers within a second and no journal has
//!   failed or filled its device, else 503 with the reason.
//! - `GET /readyz`: 200 once every shard listens (and until shutdown starts), else 503.
//! - `GET /metrics`: Prometheus text, from a snapshot each shard takes on its own core
//!   (desks included: agents, queues, conversations, A/B groups, desk requests).
//! - `/v1/...`: the JSON API on tenants' desks (policy, views), in [`api`]; the README's
//!   "Control API" section is its reference.
//!
//! It talks to shards only through one bounded flume channel per shard (the design card's
//! rule for threads outside the shards); a shard answers on its own executor, into a fresh
//! one-slot channel, so a shard never waits for the control plane. Every wait for a shard
//! here has a deadline ([`SHARD_ANSWER_TIMEOUT_MS`]). [`WORKERS`] threads take requests
//! from `tiny_http`, so one slow client holds up one of them, not the port.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use switchboard_protocol::Text;

use crate::config::Config;
use crate::cs::DeskPolicy;
use crate::shard::{DeskAnswer, DeskMetrics, DeskQuery, PolicyRefusal, ShardSnapshot};

mod api;

/// How long the control thread waits for a shard to take or answer a request, in milliseconds.
const SHARD_ANSWER_TIMEOUT_MS: u64 = 1_000;

/// Threads serving the control port.
const WORKERS: usize = 2;

/// What the control thread asks of a shard.
pub enum ShardRequest {
    /// Take a snapshot of counters and histograms.
    Snapshot(flume::Sender<ShardSnapshot>),
    /// Start a graceful shutdown.
    Shutdown,
    /// Read a tenant's desk (sent to its desk shard).
    DeskQuery {
        /// The tenant (a configured one).
        tenant: Text,
        /// What to read.
        query: DeskQuery,
        /// The answer, or why there is none.
        reply: flume::Sender<Result<DeskAnswer, String>>,
    },
    /// Replace a tenant's desk policy (sent to its desk shard), already validated.
    SetPolicy {
        /// The tenant.
        tenant: Text,
        /// Refuse unless this is the version in force.
        expected_version: Option<u64>,
        /// The new policy.
        policy: Box<DeskPolicy>,
        /// The new version, or why not.
        reply: flume::Sender<Result<u64, PolicyRefusal>>,
    },
    /// A tenant's policy reached `version` on its desk shard (sent to the other shards).
    PolicyApplied {
        /// The tenant.
        tenant: Text,
        /// The version.
        version: u64,
    },
    /// The policy version a shard has applied for a tenant.
    PolicyVersion {
        /// The tenant.
        tenant: Text,
        /// The version.
        reply: flume::Sender<u64>,
    },
    /// Metrics of the desks the shard hosts.
    DeskMetrics(flume::Sender<Vec<DeskMetrics>>),
}

/// Starts a graceful shutdown of every shard; cheap to clone, usable from any thread.
#[derive(Clone)]
pub struct ShutdownTrigger {
    shards: Vec<flume::Sender<ShardRequest>>,
    stopping: Arc<AtomicBool>,
}

impl ShutdownTrigger {
    /// Tells every shard to stop accepting, send GOAWAY(shutdown), drain and exit.
    pub fn trigger(&self) {
        if self.stopping.swap(true, Ordering::SeqCst) {
            return;
        }
        for shard in &self.shards {
            // A full channel means the shard is busy answering; blocking briefly is fine here.
            let _ = shard.send_timeout(ShardRequest::Shutdown, Duration::from_secs(1));
        }
    }
}

/// The running control threads.
pub struct ControlHandle {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    threads: Vec<JoinHandle<()>>,
    trigger: ShutdownTrigger,
}

impl ControlHandle {
    /// The address bound.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Starts a graceful shutdown.
    pub fn trigger_shutdown(&self) {
        self.trigger.trigger();
    }

    /// A trigger for other threads.
    pub fn shutdown_trigger(&self) -> ShutdownTrigger {
        self.trigger.clone()
    }

    /// Stops the HTTP threads.
    pub fn stop(mut self) {
        self.stop.store(true, Ordering::SeqCst);
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

struct ControlState {
    shards: Vec<flume::Sender<ShardRequest>>,
    listening: Arc<AtomicUsize>,
    shard_count: usize,
    stopping: Arc<AtomicBool>,
    config: Arc<Config>,
}

/// Binds the control port and starts its threads.
pub fn start(
    addr: SocketAddr,
    shards: Vec<flume::Sender<ShardRequest>>,
    listening: Arc<AtomicUsize>,
    shard_count: usize,
    config: Arc<Config>,
) -> std::io::Result<ControlHandle> {
    let server = Arc::new(tiny_http::Server::http(addr).map_err(std::io::Error::other)?);
    let bound = server.server_addr().to_ip().ok_or_else(|| std::io::Error::other("control port is not an IP socket"))?;
    let stop = Arc::new(AtomicBool::new(false));
    let stopping = Arc::new(AtomicBool::new(false));
    let trigger = ShutdownTrigger { shards: shards.clone(), stopping: stopping.clone() };
    let state = Arc::new(ControlState { shards, listening, shard_count, stopping, config });
    let mut threads = Vec::with_capacity(WORKERS);
    for worker in 0..WORKERS {
        let (server, state, stop) = (server.clone(), state.clone(), stop.clone());
        threads.push(std::thread::Builder::new().name(format!("control-{worker}")).spawn(move || serve(&server, &state, &stop))?);
    }
    Ok(ControlHandle { addr: bound, stop, threads, trigger })
}

/// A response: status, content type, body, and an optional extra header.
struct Reply {
    status: u16,
    content_type: &'static str,
    body: String,
    header: Option<(&'static str, &'static str)>,
}

const TEXT: &str = "text/plain; charset=utf-8";

fn serve(server: &tiny_http::Server, state: &ControlState, stop: &AtomicBool) {
    while !stop.load(Ordering::SeqCst) {
        let mut request = match server.recv_timeout(Duration::from_millis(100)) {
            Ok(Some(request)) => request,
            Ok(None) => continue,
            Err(error) => {
                tracing::warn!(%error, "control port receive failed");
                continue;
            }
        };
        let reply = if request.url().starts_with("/v1/") || request.url() == "/v1" {
            api::handle(state, &mut request)
        } else {
            let (status, content_type, body) = route(state, request.method(), request.url());
            Reply { status, content_type, body, header: None }
        };
        let mut response = tiny_http::Response::from_string(reply.body).with_status_code(reply.status);
        if let Ok(header) = tiny_http::Header::from_bytes("Content-Type", reply.content_type) {
            response.add_header(header);
        }
        if let Some(Ok(header)) = reply.header.map(|(name, value)| tiny_http::Header::from_bytes(name, value)) {
            response.add_header(header);
        }
        let _ = request.respond(response);
    }
}

fn route(state: &ControlState, method: &tiny_http::Method, url: &str) -> (u16, &'static str, String) {
    if *method != tiny_http::Method::Get {
        return (405, TEXT, "only GET is served here\n".into());
    }
    match url.split('?').next().unwrap_or_default() {
        "/healthz" => match snapshots(state) {
            Some(snapshots) => {
                let journal_problems: Vec<String> = snapshots
                    .iter()
                    .filter_map(|s| match s.journal.as_ref().map(|(health, _)| health) {
                        Some(crate::journal::Health::Failed(why)) => Some(format!("shard {} journal failed: {why}", s.shard)),
                        Some(crate::journal::Health::NoSpace) => Some(format!("shard {} journal device full", s.shard)),
                        _ => None,
                    })
                    .collect();
                if journal_problems.is_empty() {
                    (200, TEXT, "ok\n".into())
                } else {
                    (503, TEXT, journal_problems.join("\n") + "\n")
                }
            }
            None => (503, TEXT, "a shard did not answer\n".into()),
        },
        "/readyz" => {
            let listening = state.listening.load(Ordering::SeqCst);
            if state.stopping.load(Ordering::SeqCst) {
                (503, TEXT, "shutting down\n".into())
            } else if listening == state.shard_count {
                (200, TEXT, "ready\n".into())
            } else {
                (503, TEXT, format!("{listening} of {} shards listening\n", state.shard_count))
            }
        }
        "/metrics" => match (snapshots(state), desk_metrics(state)) {
            (Some(snapshots), Some(desks)) => {
                (200, "application/openmetrics-text; version=1.0.0; charset=utf-8", crate::metrics::render(&snapshots, &desks))
            }
            _ => (503, TEXT, "a shard did not answer\n".into()),
        },
        _ => (404, TEXT, "not found; try /healthz, /readyz, /metrics or /v1/tenants\n".into()),
    }
}

/// Asks every shard for a snapshot; `None` if any does not answer in time.
fn snapshots(state: &ControlState) -> Option<Vec<ShardSnapshot>> {
    ask_all(state, ShardRequest::Snapshot).into_iter().collect()
}

/// Asks every shard for its desks' metrics; `None` if any does not answer in time.
fn desk_metrics(state: &ControlState) -> Option<Vec<DeskMetrics>> {
    let per_shard: Option<Vec<Vec<DeskMetrics>>> = ask_all(state, ShardRequest::DeskMetrics).into_iter().collect();
    per_shard.map(|desks| desks.into_iter().flatten().collect())
}

/// Why a shard gave no answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum NoAnswer {
    /// Its channel stayed full (or it stopped): the request was not sent.
    NotSent,
    /// Sent, but no answer in time: it may still be carried out.
    Late,
}

/// Sends one request to `shard` and waits (bounded) for its answer.
fn ask<T>(state: &ControlState, shard: usize, request: impl FnOnce(flume::Sender<T>) -> ShardRequest) -> Result<T, NoAnswer> {
    let timeout = Duration::from_millis(SHARD_ANSWER_TIMEOUT_MS);
    let (reply_tx, reply_rx) = flume::bounded(1);
    let sender = state.shards.get(shard).ok_or(NoAnswer::NotSent)?;
    sender.send_timeout(request(reply_tx), timeout).map_err(|_| NoAnswer::NotSent)?;
    reply_rx.recv_timeout(timeout).map_err(|_| NoAnswer::Late)
}

/// Sends one request to every shard, then collects the answers (each wait bounded): the
/// shards work on them at the same time.
fn ask_all<T>(state: &ControlState, request: impl Fn(flume::Sender<T>) -> ShardRequest) -> Vec<Option<T>> {
    let timeout = Duration::from_millis(SHARD_ANSWER_TIMEOUT_MS);
    let replies: Vec<Option<flume::Receiver<T>>> = state
        .shards
        .iter()
        .map(|shard| {
            let (reply_tx, reply_rx) = flume::bounded(1);
            shard.send_timeout(request(reply_tx), timeout).ok().map(|()| reply_rx)
        })
        .collect();
    replies.into_iter().map(|reply| reply.and_then(|reply| reply.recv_timeout(timeout).ok())).collect()
}
