//! Starting and stopping the engine: placement, the mesh wiring, the shard executors and the
//! control thread.
//!
//! Placement is data ([`placements`]): shard `i` runs on `cpus[i % cpus.len()]`. Every ring of
//! the mesh is created here, once, and each end is connected on its own shard. Each shard binds
//! its own listening socket on the same address with `SO_REUSEPORT`, so the kernel spreads
//! connections over shards without an acceptor thread handing them off (one fewer hop and no
//! shared accept queue); a connection's sessions may still live on other shards, reached over
//! the mesh.

use std::net::SocketAddr;
use std::rc::Rc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use futures_lite::future;
use glommio::channels::shared_channel::{self, SharedReceiver, SharedSender};
use glommio::net::TcpListener;
use glommio::{LocalExecutorBuilder, Placement};

use crate::config::Config;
use crate::control::{self, ControlHandle, ShardRequest};
use crate::history::HistoryLog;
use crate::journal::{DmaStorage, Journal};
use crate::persist;
use crate::mesh::{new_epoch, Event, PeerLink, Request};
use crate::pool::{BufferPool, PoolConfig, SizeClass};
use crate::shard::Shard;
use crate::uring::{SenderConfig, UringSender};

/// Why the engine could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// The configuration is invalid.
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
    /// A socket could not be bound.
    #[error("cannot bind {addr}: {source}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// The CPU set could not be read or is empty.
    #[error("no CPU to run on: {0}")]
    Cpus(String),
    /// A shard failed to start (executor, pool or io_uring).
    #[error("shard {shard} failed to start: {reason}")]
    Shard {
        /// Which.
        shard: usize,
        /// Why.
        reason: String,
    },
    /// The data directory cannot be used.
    #[error(transparent)]
    DataDir(#[from] crate::persist::LayoutError),
}

/// The CPUs this process may run on (its affinity mask).
pub fn allowed_cpus() -> Result<Vec<usize>, StartError> {
    // SAFETY: a zeroed cpu_set_t is a valid empty set; sched_getaffinity fills it.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    // SAFETY: pid 0 = this thread; the size matches the set passed.
    let rc = unsafe { libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &raw mut set) };
    if rc != 0 {
        return Err(StartError::Cpus(std::io::Error::last_os_error().to_string()));
    }
    // SAFETY: CPU_ISSET reads the set filled above.
    let cpus: Vec<usize> = (0..libc::CPU_SETSIZE as usize).filter(|&cpu| unsafe { libc::CPU_ISSET(cpu, &set) }).collect();
    if cpus.is_empty() {
        return Err(StartError::Cpus("the affinity mask is empty".into()));
    }
    Ok(cpus)
}

/// Where each shard runs: shard `i` pinned to `cpus[i % cpus.len()]` (more shards than CPUs
/// is allowed, for tests).
pub fn placements(shards: usize, cpus: &[usize]) -> Vec<Placement> {
    (0..shards).map(|shard| Placement::Fixed(cpus[shard % cpus.len()])).collect()
}

/// A running engine.
pub struct EngineHandle {
    data_addr: SocketAddr,
    control: ControlHandle,
    shard_threads: Vec<glommio::ExecutorJoinHandle<()>>,
    shards: usize,
}

impl EngineHandle {
    /// The data port actually bound (useful with port 0).
    pub fn data_addr(&self) -> SocketAddr {
        self.data_addr
    }

    /// The control port actually bound.
    pub fn control_addr(&self) -> SocketAddr {
        self.control.addr()
    }

    /// Number of shards.
    pub fn shards(&self) -> usize {
        self.shards
    }

    /// Starts a graceful shutdown (GOAWAY to every connection, bounded drain) and waits for it.
    pub fn shutdown(self) {
        self.control.trigger_shutdown();
        self.wait();
    }

    /// A cloneable trigger for shutdown, for signal handlers.
    pub fn shutdown_trigger(&self) -> control::ShutdownTrigger {
        self.control.shutdown_trigger()
    }

    /// Waits until every shard has stopped, then stops the control thread.
    pub fn wait(self) {
        for thread in self.shard_threads {
            let _ = thread.join();
        }
        self.control.stop();
    }
}

/// A SO_REUSEPORT socket bound (not listening) to resolve port 0 to one port that every shard
/// then binds. Kept until the shards listen, then dropped.
fn reserve_port(addr: SocketAddr) -> Result<(socket2::Socket, SocketAddr), StartError> {
    let bind_error = |source| StartError::Bind { addr, source };
    let socket = socket2::Socket::new(socket2::Domain::for_address(addr), socket2::Type::STREAM, None).map_err(bind_error)?;
    socket.set_reuse_port(true).map_err(bind_error)?;
    socket.bind(&addr.into()).map_err(bind_error)?;
    let local = socket.local_addr().map_err(bind_error)?.as_socket().ok_or_else(|| bind_error(std::io::Error::other("not an IP address")))?;
    Ok((socket, local))
}

/// Starts the engine; returns once every shard listens.
pub fn start(config: Config) -> Result<EngineHandle, StartError> {
    config.validate()?;
    let cpus = if config.server.cpus.is_empty() { allowed_cpus()? } else { config.server.cpus.clone() };
    let shards = if config.server.shards == 0 { cpus.len() } else { config.server.shards };
    let (reservation, data_addr) = reserve_port(config.server.listen)?;
    let config = Arc::new(config);
    let epoch = new_epoch();
    // With a journal, session epochs come from it (and survive restarts); the layout file
    // refuses a data directory written with another shard count.
    let layout = if config.journal_enabled() { Some(persist::open_layout(&config.server.data_dir, shards)?) } else { None };
    let clock = quanta::Clock::new();

    // The mesh: requests[i][j] and events[i][j] carry i → j, created once.
    let mut request_rings = ring_matrix::<Request>(shards, config.mesh.ring_slots);
    let mut event_rings = ring_matrix::<Event>(shards, config.mesh.ring_slots);

    let listening = Arc::new(AtomicUsize::new(0));
    let (started_tx, started_rx) = flume::bounded::<Result<usize, StartError>>(shards);
    let mut control_senders = Vec::with_capacity(shards);
    let mut shard_threads = Vec::with_capacity(shards);
    for (index, placement) in placements(shards, &cpus).into_iter().enumerate() {
        let (control_tx, control_rx) = flume::bounded::<ShardRequest>(64);
        control_senders.push(control_tx);
        let wiring = ShardWiring {
            index,
            shards,
            config: config.clone(),
            epoch,
            layout,
            clock: clock.clone(),
            data_addr,
            requests_out: request_rings.take_row(index),
            requests_in: request_rings.take_column(index),
            events_out: event_rings.take_row(index),
            events_in: event_rings.take_column(index),
            control_rx,
            listening: listening.clone(),
            started: started_tx.clone(),
        };
        let thread = LocalExecutorBuilder::new(placement)
            .name(&format!("shard-{index}"))
            .preempt_timer(Duration::from_micros(config.server.io_poll_interval_us))
            .io_memory(if config.journal_enabled() { JOURNAL_IO_MEMORY_BYTES } else { NO_JOURNAL_IO_MEMORY_BYTES })
            .spawn(move || run_shard(wiring))
            .map_err(|error| StartError::Shard { shard: index, reason: error.to_string() })?;
        shard_threads.push(thread);
    }
    drop(started_tx);
    for _ in 0..shards {
        match started_rx.recv() {
            Ok(Ok(_)) => {}
            Ok(Err(error)) => return Err(error),
            Err(_) => return Err(StartError::Shard { shard: usize::MAX, reason: "a shard stopped during start".into() }),
        }
    }
    drop(reservation);
    let control = control::start(config.server.control, control_senders, listening, shards, config.clone())
        .map_err(|source| StartError::Bind { addr: config.server.control, source })?;
    tracing::info!(%data_addr, control = %control.addr(), shards, epoch, "switchboard ready");
    Ok(EngineHandle { data_addr, control, shard_threads, shards })
}

struct RingMatrix<T: Send + Sized> {
    senders: Vec<Vec<Option<SharedSender<T>>>>,
    receivers: Vec<Vec<Option<SharedReceiver<T>>>>,
}

fn ring_matrix<T: Send + Sized>(shards: usize, slots: usize) -> RingMatrix<T> {
    let mut senders: Vec<Vec<Option<SharedSender<T>>>> = (0..shards).map(|_| (0..shards).map(|_| None).collect()).collect();
    let mut receivers: Vec<Vec<Option<SharedReceiver<T>>>> = (0..shards).map(|_| (0..shards).map(|_| None).collect()).collect();
    for from in 0..shards {
        for to in 0..shards {
            if from != to {
                let (tx, rx) = shared_channel::new_bounded(slots);
                senders[from][to] = Some(tx);
                receivers[to][from] = Some(rx);
            }
        }
    }
    RingMatrix { senders, receivers }
}

impl<T: Send + Sized> RingMatrix<T> {
    /// Senders from `shard` to every peer.
    fn take_row(&mut self, shard: usize) -> Vec<Option<SharedSender<T>>> {
        std::mem::take(&mut self.senders[shard])
    }
    /// Receivers at `shard` from every peer.
    fn take_column(&mut self, shard: usize) -> Vec<Option<SharedReceiver<T>>> {
        std::mem::take(&mut self.receivers[shard])
    }
}

struct ShardWiring {
    index: usize,
    shards: usize,
    config: Arc<Config>,
    epoch: u64,
    layout: Option<persist::Layout>,
    clock: quanta::Clock,
    data_addr: SocketAddr,
    requests_out: Vec<Option<SharedSender<Request>>>,
    requests_in: Vec<Option<SharedReceiver<Request>>>,
    events_out: Vec<Option<SharedSender<Event>>>,
    events_in: Vec<Option<SharedReceiver<Event>>>,
    control_rx: flume::Receiver<ShardRequest>,
    listening: Arc<AtomicUsize>,
    started: flume::Sender<Result<usize, StartError>>,
}

/// glommio's registered buffer memory per shard, which the journal's direct-I/O writes come
/// from (glommio's default).
const JOURNAL_IO_MEMORY_BYTES: usize = 10 << 20;

/// The same without a journal: nothing else of ours uses it, and glommio keeps it resident
/// (its minimum is 64 KiB).
const NO_JOURNAL_IO_MEMORY_BYTES: usize = 64 << 10;

fn pool_config(config: &Config) -> PoolConfig {
    PoolConfig {
        classes: config.pool.classes.iter().map(|class| SizeClass { slot_bytes: class.slot_bytes, slots: class.slots }).collect(),
        mlock: config.pool.mlock,
        prefault: config.pool.prefault,
    }
}

fn sender_config(config: &Config) -> SenderConfig {
    SenderConfig {
        ring_entries: config.uring.ring_entries,
        iov_per_send_max: config.uring.iov_per_send_max,
        conn_outbound_bytes_max: config.limits.outbound_bytes_max,
        conn_outbound_frames_max: config.limits.outbound_frames_max,
        conns_max: config.limits.connections_per_shard_max,
        send_zc_min_bytes: config.uring.send_zc_min_bytes,
        ..SenderConfig::default()
    }
}

async fn run_shard(wiring: ShardWiring) {
    let index = wiring.index;
    let fail = |reason: String| {
        let _ = wiring.started.send(Err(StartError::Shard { shard: index, reason }));
    };
    let pool = match BufferPool::new(&pool_config(&wiring.config)) {
        Ok(pool) => pool,
        Err(error) => return fail(error.to_string()),
    };
    let sender = match UringSender::new(sender_config(&wiring.config)) {
        Ok(sender) => sender,
        Err(error) => return fail(format!("io_uring: {error}")),
    };
    // SAFETY: the pool is moved into the shard below, which owns the sender too and drops
    // the sender's ring no later than the pool's mappings.
    let pool_registered = unsafe { sender.register_pool(&pool.regions()) };
    tracing::debug!(shard = index, pool_registered, "sender buffers");
    let mut history = match HistoryLog::new(wiring.config.limits.history_bytes_per_shard) {
        Ok(history) => history,
        Err(error) => return fail(format!("history ring of {} bytes: {error}", wiring.config.limits.history_bytes_per_shard)),
    };
    if wiring.config.limits.history_prefault {
        if let Err(error) = history.prefault() {
            return fail(format!("faulting in the history ring of {} bytes: {error}", wiring.config.limits.history_bytes_per_shard));
        }
    }
    let (journal, epoch, restored) = match wiring.layout {
        None => (None, wiring.epoch, Vec::new()),
        Some(_) => match open_journal(index, &wiring.config, wiring.epoch, &mut history).await {
            Ok((journal, epoch, restored)) => (Some(journal), epoch, restored),
            Err(reason) => return fail(reason),
        },
    };
    let listener = match TcpListener::bind(wiring.data_addr) {
        Ok(listener) => listener,
        Err(error) => return fail(format!("bind {}: {error}", wiring.data_addr)),
    };

    // One pump per outbound link. Each task connects its ring end first: connecting waits for
    // the peer to connect the other end, so connections must not be awaited one after another
    // (two shards would each wait for the other). Messages queue in the link meanwhile.
    let backlog = wiring.config.mesh.backlog_messages_max;
    let requests_out = wiring.requests_out.into_iter().map(|ring| ring.map(|ring| start_pump(ring, backlog))).collect();
    let events_out = wiring.events_out.into_iter().map(|ring| ring.map(|ring| start_pump(ring, backlog))).collect();
    let shard =
        Shard::new(index, wiring.shards, wiring.config.clone(), epoch, pool, history, sender, requests_out, events_out, wiring.clock, journal);
    shard.restore(restored);
    if let Some(journal) = shard.journal().cloned() {
        glommio::spawn_local(async move {
            if let Err(error) = journal.run_committer().await {
                tracing::error!(shard = index, %error, "journal failed: durable publishes are refused until restart");
            }
        })
        .detach();
        glommio::spawn_local(shard.clone().run_acks()).detach();
        glommio::spawn_local(shard.clone().maintain_journal()).detach();
    }
    let sender_loop = shard.sender.run();
    glommio::spawn_local(async move {
        if let Err(error) = sender_loop.await {
            tracing::error!(shard = index, %error, "io_uring sender stopped");
        }
    })
    .detach();

    let batch = wiring.config.mesh.drain_batch_max;
    for (origin, ring) in wiring.requests_in.into_iter().enumerate() {
        if let Some(ring) = ring {
            glommio::spawn_local(drain_requests(shard.clone(), origin, ring, batch)).detach();
        }
    }
    for ring in wiring.events_in.into_iter().flatten() {
        glommio::spawn_local(drain_events(shard.clone(), ring, batch)).detach();
    }
    glommio::spawn_local(serve_control(shard.clone(), wiring.control_rx)).detach();
    glommio::spawn_local(shard.clone().sweep_idle()).detach();
    glommio::spawn_local(shard.clone().sweep_sessions()).detach();

    wiring.listening.fetch_add(1, Ordering::SeqCst);
    let _ = wiring.started.send(Ok(index));
    tracing::debug!(shard = index, "listening");

    accept_until_shutdown(&shard, &listener).await;
    drop(listener);
    // Acknowledge what is being journaled before saying goodbye, so publishers get their PUBACKs.
    shard.drain_acks(Duration::from_millis(shard.config.server.shutdown_drain_ms)).await;
    drain_connections(&shard).await;
    if let Some(journal) = shard.journal() {
        match journal.close().await {
            Ok(()) => tracing::info!(shard = index, epoch = journal.epoch(), position = journal.synced_position(), "journal closed cleanly"),
            Err(error) => tracing::error!(shard = index, %error, "journal did not close cleanly; the next start recovers it"),
        }
    }
    crate::phase::report(index);
    tracing::debug!(shard = index, "stopped");
}

/// Opens and recovers a shard's journal and rebuilds its sessions; the error is for the log.
///
/// Returns the journal, the epoch the shard's next new session gets (restored sessions that
/// needed a new epoch took the ones before it, counting up from `start_epoch`), and the
/// sessions.
async fn open_journal(
    index: usize,
    config: &Config,
    start_epoch: u64,
    history_log: &mut HistoryLog,
) -> Result<(Journal<DmaStorage>, u64, Vec<(crate::mesh::SessionKey, crate::session::Session)>), String> {
    let dir = persist::shard_dir(&config.server.data_dir, index);
    let started = std::time::Instant::now();
    let storage = DmaStorage::new(&dir).map_err(|error| format!("journal directory {}: {error}", dir.display()))?;
    let (journal, report) =
        Journal::open(storage, index as u32, config.journal_store()).await.map_err(|error| format!("journal {}: {error}", dir.display()))?;
    if report.acked_may_be_missing || !report.damage.is_empty() || report.truncated_tail.is_some() {
        tracing::warn!(shard = index, "journal recovery:\n{report}");
    } else {
        tracing::info!(shard = index, "journal recovery: {}", report.to_string().trim_end());
    }
    let history = config.limits.history_messages_max as usize;
    let mut next_epoch = start_epoch;
    let mut fresh_epoch = || {
        let epoch = next_epoch;
        next_epoch = next_epoch.wrapping_add(1).max(1);
        epoch
    };
    let keep_epochs = !report.acked_may_be_missing;
    let (sessions, stats) =
        persist::restore_sessions(&journal, keep_epochs, &mut fresh_epoch, history, history_log).await.map_err(|error| format!("journal {}: {error}", dir.display()))?;
    let epoch = next_epoch;
    tracing::info!(
        shard = index,
        keep_epochs,
        sessions = stats.sessions,
        messages = stats.messages,
        skipped = stats.records_skipped,
        damaged_frames = stats.damaged_frames,
        elapsed_ms = started.elapsed().as_millis() as u64,
        "sessions restored from the journal"
    );
    Ok((journal, epoch, sessions))
}

async fn accept_until_shutdown(shard: &Rc<Shard>, listener: &TcpListener) {
    loop {
        let accepted = future::or(async { Some(listener.accept().await) }, async {
            shard.shutdown.wait().await;
            None
        })
        .await;
        match accepted {
            None => return,
            Some(Ok(stream)) => {
                glommio::spawn_local(crate::connection::serve(shard.clone(), stream)).detach();
            }
            Some(Err(error)) => {
                // EMFILE/ENFILE and friends: log, back off a little, keep serving the others.
                tracing::warn!(shard = shard.index, %error, "accept failed");
                glommio::timer::Timer::new(Duration::from_millis(10)).await;
            }
        }
    }
}

/// GOAWAY(shutdown) to every connection, then wait (bounded) until they have all closed.
async fn drain_connections(shard: &Rc<Shard>) {
    let drain = Duration::from_millis(shard.config.server.shutdown_drain_ms);
    shard.goaway_all(drain);
    let deadline = std::time::Instant::now() + drain + Duration::from_millis(100);
    while shard.connection_count() > 0 && std::time::Instant::now() < deadline {
        glommio::timer::Timer::new(Duration::from_millis(5)).await;
    }
}

fn start_pump<T: Send + 'static>(ring: SharedSender<T>, backlog: usize) -> Rc<PeerLink<T>> {
    let link = PeerLink::new(backlog);
    let pump = link.clone();
    glommio::spawn_local(async move { pump.pump(ring.connect().await).await }).detach();
    link
}

async fn drain_requests(shard: Rc<Shard>, origin: usize, ring: SharedReceiver<Request>, batch: usize) {
    let ring = ring.connect().await;
    let mut handled = 0;
    while let Some(request) = ring.recv().await {
        shard.handle_request(origin, request).await;
        handled += 1;
        if handled % batch == 0 {
            glommio::yield_if_needed().await;
        }
    }
}

async fn drain_events(shard: Rc<Shard>, ring: SharedReceiver<Event>, batch: usize) {
    let ring = ring.connect().await;
    let mut handled = 0;
    while let Some(event) = ring.recv().await {
        shard.handle_event(event);
        handled += 1;
        if handled % batch == 0 {
            glommio::yield_if_needed().await;
        }
    }
}

async fn serve_control(shard: Rc<Shard>, requests: flume::Receiver<ShardRequest>) {
    while let Ok(request) = requests.recv_async().await {
        match request {
            ShardRequest::Snapshot(reply) => {
                let _ = reply.send(shard.snapshot());
            }
            ShardRequest::Shutdown => shard.shutdown.trigger(),
            // Answers go into one-slot channels made for them: `send` never waits here.
            ShardRequest::DeskQuery { tenant, query, reply } => {
                let _ = reply.send(shard.desk_query(&tenant, query));
            }
            ShardRequest::SetPolicy { tenant, expected_version, policy, reply } => {
                let _ = reply.send(shard.change_desk_policy(&tenant, expected_version, *policy));
            }
            ShardRequest::PolicyApplied { tenant, version } => shard.note_policy_version(&tenant, version),
            ShardRequest::PolicyVersion { tenant, reply } => {
                let _ = reply.send(shard.policy_version(&tenant));
            }
            ShardRequest::DeskMetrics(reply) => {
                let _ = reply.send(shard.desk_metrics());
            }
        }
    }
}
