//! Switchboard: a thread-per-core push engine for customer-service platforms.
//!
//! The picture (Seastar's): memory and work are divided between cores, and cores talk only by
//! explicit messages.
//!
//! ```text
//!             gateways (binary protocol, SO_REUSEPORT spreads connections)
//!                 │                      │
//!        ┌────────▼────────┐    ┌────────▼────────┐
//!        │ shard 0 (CPU 0) │◄──►│ shard 1 (CPU 1) │   mesh: 2 bounded SPSC rings per
//!        │ sessions, conns │    │ sessions, conns │   ordered pair (requests, events)
//!        │ mmap pool       │    │ mmap pool       │
//!        │ io_uring sender │    │ io_uring sender │   one submit flushes many sockets
//!        │ journal, desks  │    │ journal, desks  │   O_DIRECT group commit; tenants' desks
//!        └────────▲────────┘    └────────▲────────┘
//!                 └──── flume ───┬───────┘
//!                       control threads: /healthz /readyz /metrics /v1
//! ```
//!
//! Layout, in the order a message meets it:
//! - [`runtime`]: start and stop; placement of shards on CPUs; mesh wiring.
//! - [`connection`]: one client connection: handshake, decode, dispatch.
//! - [`shard`]: what one shard owns; publish, subscribe, resume, fan-out.
//! - [`session`]: one session's seq, epoch, history and idempotency window (no I/O).
//! - [`journal`]: the per-shard durable journal (segments, group commit, recovery, retention,
//!   compaction); [`persist`]: what it keeps for sessions, and restoring them at start.
//! - [`mesh`]: messages between shards and the ordered links that carry them.
//! - [`pool`]: the per-shard mmap buffer pool with ref-counted leases.
//! - [`uring`]: the per-shard io_uring sender (batched, ordered, bounded per connection).
//! - [`control`] and [`metrics`]: the control threads (health, metrics, the JSON API on desks)
//!   and the Prometheus rendering.
//! - [`auth`]: tenants and HELLO token verification; [`rate`]: token buckets.
//! - [`cs`]: the customer-service domain (desks, routing, access rules), plain Rust; the shard
//!   hosts each tenant's desk on `mesh::tenant_shard(tenant)` and carries out its effects.
//! - [`timer`]: the hierarchical timer wheel the desks' timers run on.
//! - [`config`]: every limit, with its default; [`shutdown`]: shutdown as a type; [`notify`]:
//!   the one-waiter wake-up the shard's background tasks wait on; [`phase`]: time per stretch
//!   of the publish path, logged at shutdown when built with the `phase-timing` feature.

pub mod auth;
pub mod config;
pub mod connection;
pub mod control;
pub mod cs;
pub mod history;
pub mod journal;
pub mod mesh;
pub mod notify;
pub mod metrics;
pub mod persist;
pub mod phase;
pub mod pool;
pub mod rate;
pub mod runtime;
pub mod session;
pub mod shard;
pub mod shutdown;
pub mod timer;
pub mod uring;

pub use config::Config;
pub use runtime::{start, EngineHandle, StartError};
