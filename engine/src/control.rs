//! The control plane: its own thread, never on a shard, serving HTTP on the control port.
//!
//! - `GET /healthz`: 200 when every shard's loop answers within a second and no journal has
//!   failed or filled its device, else 503 with the reason.
//! - `GET /readyz`: 200 once every shard listens (and until shutdown starts), else 503.
//! - `GET /metrics`: Prometheus text, from a snapshot each shard takes on its own core.
//!
//! It talks to shards only through one bounded flume channel per shard (the design card's
//! rule for threads outside the shards); a shard answers on its own executor.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use crate::shard::ShardSnapshot;

/// How long the control thread waits for a shard to answer, in milliseconds.
const SHARD_ANSWER_TIMEOUT_MS: u64 = 1_000;

/// What the control thread asks of a shard.
pub enum ShardRequest {
    /// Take a snapshot of counters and histograms.
    Snapshot(flume::Sender<ShardSnapshot>),
    /// Start a graceful shutdown.
    Shutdown,
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

/// The running control thread.
pub struct ControlHandle {
    addr: SocketAddr,
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
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

    /// Stops the HTTP thread.
    pub fn stop(mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

struct ControlState {
    shards: Vec<flume::Sender<ShardRequest>>,
    listening: Arc<AtomicUsize>,
    shard_count: usize,
    stopping: Arc<AtomicBool>,
}

/// Binds the control port and starts its thread.
pub fn start(addr: SocketAddr, shards: Vec<flume::Sender<ShardRequest>>, listening: Arc<AtomicUsize>, shard_count: usize) -> std::io::Result<ControlHandle> {
    let server = tiny_http::Server::http(addr).map_err(std::io::Error::other)?;
    let bound = server.server_addr().to_ip().ok_or_else(|| std::io::Error::other("control port is not an IP socket"))?;
    let stop = Arc::new(AtomicBool::new(false));
    let stopping = Arc::new(AtomicBool::new(false));
    let trigger = ShutdownTrigger { shards: shards.clone(), stopping: stopping.clone() };
    let state = ControlState { shards, listening, shard_count, stopping };
    let thread_stop = stop.clone();
    let thread = std::thread::Builder::new().name("control".into()).spawn(move || serve(&server, &state, &thread_stop))?;
    Ok(ControlHandle { addr: bound, stop, thread: Some(thread), trigger })
}

fn serve(server: &tiny_http::Server, state: &ControlState, stop: &AtomicBool) {
    while !stop.load(Ordering::SeqCst) {
        let request = match server.recv_timeout(Duration::from_millis(100)) {
            Ok(Some(request)) => request,
            Ok(None) => continue,
            Err(error) => {
                tracing::warn!(%error, "control port receive failed");
                continue;
            }
        };
        let (status, content_type, body) = route(state, request.method(), request.url());
        let header = tiny_http::Header::from_bytes("Content-Type", content_type).expect("static header is valid");
        let response = tiny_http::Response::from_string(body).with_status_code(status).with_header(header);
        let _ = request.respond(response);
    }
}

fn route(state: &ControlState, method: &tiny_http::Method, url: &str) -> (u16, &'static str, String) {
    const TEXT: &str = "text/plain; charset=utf-8";
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
        "/metrics" => match snapshots(state) {
            Some(snapshots) => (200, "application/openmetrics-text; version=1.0.0; charset=utf-8", crate::metrics::render(&snapshots)),
            None => (503, TEXT, "a shard did not answer\n".into()),
        },
        _ => (404, TEXT, "not found; try /healthz, /readyz or /metrics\n".into()),
    }
}

/// Asks every shard for a snapshot; `None` if any does not answer in time.
fn snapshots(state: &ControlState) -> Option<Vec<ShardSnapshot>> {
    let timeout = Duration::from_millis(SHARD_ANSWER_TIMEOUT_MS);
    let mut replies = Vec::with_capacity(state.shards.len());
    for shard in &state.shards {
        let (reply_tx, reply_rx) = flume::bounded(1);
        shard.send_timeout(ShardRequest::Snapshot(reply_tx), timeout).ok()?;
        replies.push(reply_rx);
    }
    replies.into_iter().map(|reply| reply.recv_timeout(timeout).ok()).collect()
}
