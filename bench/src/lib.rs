//! Switchboard's load generator and the machinery around it.
//!
//! Module map:
//! - [`clock`]: one process-wide time base; every timestamp is nanoseconds since it.
//! - [`payload`]: the 20-byte header every published message carries (session, per-session
//!   counter, intended send time), padded to `--payload` bytes.
//! - [`backend`]: the small [`backend::Backend`] trait (gateway connections that subscribe and
//!   read deliveries, publisher connections that write) and one file per backend: `switchboard`
//!   (the binary protocol through the `switchboard-protocol` codec), `nats` (core NATS text
//!   protocol), `redis` (RESP SUBSCRIBE/PUBLISH), `mock` (in-process, can drop, duplicate and
//!   reorder on purpose, for tests).
//! - [`accounting`]: sans-IO per (subscriber, session) order tracking: lost, duplicated,
//!   reordered deliveries.
//! - [`latency`]: hdrhistogram wrapper, percentiles, the percentile spectrum and `.hgrm` output.
//! - [`procstat`]: server CPU (utime+stime from /proc/PID/stat), RSS (/proc/PID/status), the
//!   generator's own CPU (getrusage) and allowed cores.
//! - [`run`]: the generator itself: threads, pacing on a tick, the bounded `--max` window, the
//!   measured window and the drain.
//! - [`report`]: the report (serde: JSON with every figure and the full settings) and its
//!   human-readable table.
//! - [`compare`]: the side-by-side matrix (servers, cases, repetitions, medians, ratios).
//! - [`plot`]: PNG plots of a comparison with plotters.
//! - [`ack`]: publish → acknowledgement backends (Switchboard PUBACK, NATS `JetStream`) and
//!   the sans-IO tracker that matches every publish to its answer; [`ackrun`]: the generator of
//!   `loadgen --ack` (paced or `--max` with a per-connection window).
//! - [`fsync`]: the disk's own fdatasync latency, written like the journal.
//! - [`durable`]: issue 6's suite (fdatasync baseline, durable latency, throughput against
//!   publisher connections) and its markdown tables.
//! - [`cs`]: issue 5's customer-service scenario, sans-IO: per-conversation accounting
//!   (opened, offered, accepted, closed, lost, doubled), client-side agent loads, the report
//!   and its tables; [`csrun`]: its generator (agents online over gateway connections, paced
//!   conversation opens, accept at once, close after a hold, `loadgen` alongside).
//!
//! Binaries: `loadgen` (one run; `--ack` for acknowledgements), `compare` (the matrix against
//! nats-server, redis-server and switchboard), `plot` (re-plot a saved comparison),
//! `fsync_probe` (the disk alone), `durable` (the durable suite), `csload` (conversations
//! under pub/sub load).

// Figures are counts and nanoseconds turned into rates and microseconds: the f64 conversions
// are on purpose and far from the 2^52 where they would round.
#![allow(clippy::cast_precision_loss, clippy::cast_sign_loss, clippy::cast_possible_wrap)]

pub mod accounting;
pub mod ack;
pub mod ackrun;
pub mod backend;
pub mod clock;
pub mod compare;
pub mod cs;
pub mod csrun;
pub mod durable;
pub mod fsync;
pub mod latency;
pub mod payload;
pub mod plot;
pub mod procstat;
pub mod report;
pub mod run;
