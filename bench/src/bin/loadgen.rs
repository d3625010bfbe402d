//! `loadgen`: one load-generator run against NATS, Redis, Switchboard or the in-process mock.
//!
//! With `--ack`: publishers only, every publish matched to its acknowledgement (Switchboard
//! PUBACK, NATS `JetStream` publish ack, the mock), latency from intended send time to the
//! acknowledgement, lost/refused/unexpected acknowledgements counted, and the durability the
//! server claimed reported: `loadgen --ack --backend switchboard --publishers 16 --rate 10000`.
//!
//! Example: `loadgen --backend nats --addr 127.0.0.1:4222 --sessions 1000 --subscribers 3
//! --gateways 8 --publishers 2 --payload 128 --rate 20000 --duration 5 --warmup 1
//! --server-pid $(pidof nats-server) --json out.json --hgrm out.hgrm`

#![allow(clippy::cast_precision_loss)]

use clap::Parser;
use std::path::PathBuf;
use switchboard_bench::backend::{mock::Faults, BackendKind};
use switchboard_bench::ack::mock::AckFaults;
use switchboard_bench::ackrun::{self, AckSettings};
use switchboard_bench::run::{self, Settings};

#[derive(Parser, Debug)]
#[command(version, about = "Switchboard load generator: end-to-end push latency, throughput and delivery accounting")]
struct Args {
    /// Which server protocol to speak.
    #[arg(long, value_enum, default_value = "nats")]
    backend: BackendKind,
    /// Server address (loopback); default per backend (nats 127.0.0.1:4222, redis 127.0.0.1:6379).
    #[arg(long)]
    addr: Option<String>,
    /// Sessions (subjects / channels).
    #[arg(long, default_value_t = 1000)]
    sessions: u32,
    /// Subscribers per session, each on a different gateway connection.
    #[arg(long, default_value_t = 3)]
    subscribers: u32,
    /// Gateway (subscribing) connections.
    #[arg(long, default_value_t = 8)]
    gateways: u32,
    /// Publisher connections; sessions are split among them.
    #[arg(long, default_value_t = 2)]
    publishers: u32,
    /// Payload bytes per message (at least 20: the header).
    #[arg(long, default_value_t = 128)]
    payload: usize,
    /// Open-loop paced rate: publishes per second, all publishers together.
    #[arg(long, conflicts_with = "max")]
    rate: Option<f64>,
    /// As fast as possible, with a bounded outstanding window per publisher.
    #[arg(long)]
    max: bool,
    /// `--max`: publishes a publisher may have outstanding.
    #[arg(long, default_value_t = 4096)]
    window: u64,
    /// Measured seconds.
    #[arg(long, default_value_t = 5.0)]
    duration: f64,
    /// Warmup seconds before the measured window.
    #[arg(long, default_value_t = 1.0)]
    warmup: f64,
    /// Pacing tick in µs: each tick, each publisher sends the batch that is due.
    #[arg(long, default_value_t = 1000)]
    tick_us: u64,
    /// Server PID: report its CPU (user+sys), CPU per delivery and RSS.
    #[arg(long)]
    server_pid: Option<u32>,
    /// Write the full report as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
    /// Write the latency percentile distribution (`HdrHistogram` .hgrm text) here.
    #[arg(long)]
    hgrm: Option<PathBuf>,
    /// Longest wait for outstanding deliveries after the last publish, seconds.
    #[arg(long, default_value_t = 5.0)]
    drain: f64,
    /// Longest wait for connections and subscriptions, seconds.
    #[arg(long, default_value_t = 120.0)]
    setup_timeout: f64,
    /// Mock backend: inject faults, e.g. `drop=1000,dup=2000,reorder=3000` (with `--ack`:
    /// `drop=N,dup=M,err=K` acknowledgements).
    #[arg(long)]
    mock_faults: Option<String>,
    /// Measure publish → acknowledgement instead of fan-out (switchboard, jetstream, mock):
    /// no subscribers; `--window` is then the unacknowledged publishes per connection in
    /// `--max` (1 = a synchronous client).
    #[arg(long)]
    ack: bool,
    /// `--ack`: the durability the server was asked for (recorded in the report next to what
    /// its acknowledgements claim).
    #[arg(long)]
    durability: Option<String>,
}

fn main() {
    let a = Args::parse();
    if a.ack {
        ack_main(&a);
        return;
    }
    let faults = match a.mock_faults.as_deref().map(Faults::parse).transpose() {
        Ok(f) => f,
        Err(e) => fail(&e),
    };
    let addr = a.addr.clone().unwrap_or_else(|| a.backend.default_addr().to_string());
    let st = Settings {
        backend: format!("{:?}", a.backend).to_lowercase(),
        addr: addr.clone(),
        sessions: a.sessions,
        subscribers: a.subscribers,
        gateways: a.gateways,
        publishers: a.publishers,
        payload: a.payload,
        rate: a.rate,
        max: a.max,
        window: a.window,
        duration_s: a.duration,
        warmup_s: a.warmup,
        tick_us: a.tick_us,
        server_pid: a.server_pid,
        drain_s: a.drain,
        setup_timeout_s: a.setup_timeout,
        faults: if a.backend == BackendKind::Mock { Some(faults.unwrap_or_default()) } else { None },
    };
    if let Err(e) = st.validate() {
        fail(&e);
    }
    let backend = a.backend.build(&addr, faults.unwrap_or_default()).unwrap_or_else(|e| fail(&e));
    let out = match run::run(&st, &backend) {
        Ok(o) => o,
        Err(e) => fail(&e),
    };
    print!("{}", out.report.table());
    if let Some(p) = &a.json {
        let j = serde_json::to_string_pretty(&out.report).expect("report serializes");
        if let Err(e) = std::fs::write(p, j + "\n") {
            fail(&format!("writing {}: {e}", p.display()));
        }
    }
    if let Some(p) = &a.hgrm {
        let r = std::fs::File::create(p).and_then(|f| {
            let mut w = std::io::BufWriter::new(f);
            out.latency.write_hgrm(&mut w)
        });
        if let Err(e) = r {
            fail(&format!("writing {}: {e}", p.display()));
        }
    }
    if !out.report.errors.is_empty() {
        std::process::exit(1);
    }
}

/// `--ack`: one acknowledgement run.
fn ack_main(a: &Args) {
    let faults = match a.mock_faults.as_deref().map(AckFaults::parse).transpose() {
        Ok(f) => f.unwrap_or_default(),
        Err(e) => fail(&e),
    };
    let addr = a.addr.clone().unwrap_or_else(|| a.backend.default_addr().to_string());
    let st = AckSettings {
        backend: format!("{:?}", a.backend).to_lowercase(),
        addr: addr.clone(),
        publishers: a.publishers,
        sessions: a.sessions,
        payload: a.payload,
        rate: a.rate,
        max: a.max,
        window: a.window,
        duration_s: a.duration,
        warmup_s: a.warmup,
        tick_us: a.tick_us,
        server_pid: a.server_pid,
        drain_s: a.drain,
        durability_requested: a.durability.clone(),
    };
    if let Err(e) = st.validate() {
        fail(&e);
    }
    let backend = a.backend.build_ack(&addr, faults).unwrap_or_else(|e| fail(&e));
    let out = ackrun::run(&st, &backend).unwrap_or_else(|e| fail(&e));
    print!("{}", out.report.table());
    if let Some(p) = &a.json {
        let j = serde_json::to_string_pretty(&out.report).expect("report serializes");
        if let Err(e) = std::fs::write(p, j + "\n") {
            fail(&format!("writing {}: {e}", p.display()));
        }
    }
    if let Some(p) = &a.hgrm {
        let r = std::fs::File::create(p).and_then(|f| out.latency.write_hgrm(&mut std::io::BufWriter::new(f)));
        if let Err(e) = r {
            fail(&format!("writing {}: {e}", p.display()));
        }
    }
    if !out.report.errors.is_empty() {
        std::process::exit(1);
    }
}

fn fail(msg: &str) -> ! {
    eprintln!("loadgen: {msg}");
    std::process::exit(2);
}
