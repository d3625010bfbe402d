//! The result of one generator run: every figure and the full settings (serde, written as
//! JSON), and a human-readable table.

use crate::accounting::Tally;
use crate::latency::Percentiles;
use crate::run::Settings;
use serde::{Deserialize, Serialize};
use std::fmt::Write as _;

/// Where and when the run happened.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Host {
    /// Host name.
    pub hostname: String,
    /// Kernel release.
    pub kernel: String,
    /// CPUs online.
    pub cpus_online: usize,
    /// Start of the run, seconds since the Unix epoch.
    pub started_unix_s: u64,
}

impl Host {
    /// Read the current host's facts.
    pub fn current() -> Self {
        let read = |p: &str| std::fs::read_to_string(p).map(|s| s.trim().to_string()).unwrap_or_default();
        Host {
            hostname: read("/proc/sys/kernel/hostname"),
            kernel: read("/proc/sys/kernel/osrelease"),
            cpus_online: std::thread::available_parallelism().map_or(1, std::num::NonZero::get),
            started_unix_s: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
        }
    }
}

/// Figures about the generator itself: is it the bottleneck?
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct GeneratorStats {
    /// CPU cores the generator used over the measured window (user+sys / wall time).
    pub cpu_cores: f64,
    /// CPUs it may run on (affinity).
    pub allowed_cpus: usize,
    /// `cpu_cores / allowed_cpus`.
    pub cpu_util: f64,
    /// How late publisher threads woke for their tick (µs).
    pub wake_lag_us: Percentiles,
    /// Time from a batch's intended send time until it was written to the socket (µs).
    pub send_lag_us: Percentiles,
    /// `--max` only: times a publisher's window made no progress for 200 ms and was reset.
    pub window_stalls: u64,
    /// True when the generator may have limited the result.
    pub bottleneck: bool,
    /// Why (empty when not a bottleneck).
    pub notes: Vec<String>,
}

/// The rest of the machine during the measured window: other load makes figures noisy.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct MachineStats {
    /// CPU cores busy on the whole machine (all processes, from /proc/stat).
    pub busy_cores: f64,
    /// Of those, cores used by neither the generator nor the server (`--server-pid`).
    pub other_cores: f64,
    /// True when other processes used enough CPU (over 0.15 of a core) to disturb the result.
    pub noisy: bool,
}

/// Figures about the server process (`--server-pid`).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ServerStats {
    /// Its PID.
    pub pid: u32,
    /// CPU cores it used over the measured window (user+sys / wall time).
    pub cpu_cores: f64,
    /// Server CPU nanoseconds per delivered message over the measured window.
    pub cpu_ns_per_delivery: Option<f64>,
    /// RSS after every subscription was confirmed (kB).
    pub rss_setup_kb: Option<u64>,
    /// RSS at the end of the run (kB).
    pub rss_end_kb: Option<u64>,
}

/// Everything one run measured.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Report {
    /// Generator name and version.
    pub tool: String,
    /// The full settings.
    pub settings: Settings,
    /// Machine and start time.
    pub host: Host,
    /// Seconds to connect and have every subscription confirmed.
    pub setup_s: f64,
    /// Length of the measured window (after warmup), seconds.
    pub window_s: f64,
    /// Paced runs: the target publish rate.
    pub target_publishes_per_s: Option<f64>,
    /// Publishes over the whole run (warmup included).
    pub publishes_total: u64,
    /// Publishes per second over the measured window.
    pub publishes_per_s: f64,
    /// Deliveries per second over the measured window.
    pub deliveries_per_s: f64,
    /// Every expected delivery of the whole run, accounted for.
    pub accounting: Tally,
    /// End-to-end latency from intended send time, messages sent in the measured window (µs).
    pub latency_us: Percentiles,
    /// Percentile spectrum `(percentile, µs)` of the same histogram.
    pub spectrum: Vec<(f64, f64)>,
    /// The generator's own figures.
    pub generator: GeneratorStats,
    /// Server figures, with `--server-pid`.
    pub server: Option<ServerStats>,
    /// Whole-machine CPU during the window (other load = noise).
    #[serde(default)]
    pub machine: MachineStats,
    /// Errors met during the run (a run with errors is not a valid measurement).
    pub errors: Vec<String>,
}

fn fmt_rate(v: f64) -> String {
    if v >= 1e6 {
        format!("{:.2} M/s", v / 1e6)
    } else if v >= 1e3 {
        format!("{:.1} k/s", v / 1e3)
    } else {
        format!("{v:.0} /s")
    }
}

fn fmt_us(v: f64) -> String {
    if v >= 10_000.0 {
        format!("{:.1} ms", v / 1000.0)
    } else if v >= 100.0 {
        format!("{v:.0} µs")
    } else {
        format!("{v:.1} µs")
    }
}

/// Format kB as MiB.
pub fn fmt_kb(kb: Option<u64>) -> String {
    kb.map_or_else(|| "-".into(), |k| format!("{:.1} MiB", k as f64 / 1024.0))
}

impl Report {
    /// The human-readable table.
    #[allow(clippy::many_single_char_names)]
    pub fn table(&self) -> String {
        let s = &self.settings;
        let mut o = String::new();
        let mode = match s.rate {
            Some(r) if !s.max => format!("paced {}", fmt_rate(r)),
            _ => format!("--max (window {} per publisher)", s.window),
        };
        let _ = writeln!(o, "== loadgen: {} at {} — {}", s.backend, s.addr, mode);
        let _ = writeln!(
            o,
            "   {} sessions × {} subscribers over {} gateways, {} publishers, {} B; warmup {} s, measured {:.2} s; setup {:.2} s",
            s.sessions, s.subscribers, s.gateways, s.publishers, s.payload, s.warmup_s, self.window_s, self.setup_s
        );
        let _ = writeln!(o, "{:<28}{:>16}", "publishes", fmt_rate(self.publishes_per_s));
        let _ = writeln!(o, "{:<28}{:>16}", "deliveries", fmt_rate(self.deliveries_per_s));
        let l = &self.latency_us;
        let _ = writeln!(o, "latency (from intended send time, {} samples)", l.count);
        for (k, v) in [("p50", l.p50), ("p90", l.p90), ("p99", l.p99), ("p99.9", l.p999), ("p99.99", l.p9999), ("max", l.max)] {
            let _ = writeln!(o, "  {:<26}{:>16}", k, fmt_us(v));
        }
        let a = &self.accounting;
        let _ = writeln!(
            o,
            "deliveries expected {} received {} | lost {} duplicated {} reordered {} unexpected {}{}",
            a.expected,
            a.received,
            a.lost,
            a.duplicated,
            a.reordered,
            a.unexpected,
            if a.clean() { "  (clean)" } else { "  (ANOMALIES)" }
        );
        if let Some(sv) = &self.server {
            let _ = writeln!(
                o,
                "server pid {}: CPU {:.1} % of a core, {} CPU/delivery, RSS after setup {}, at end {}",
                sv.pid,
                sv.cpu_cores * 100.0,
                sv.cpu_ns_per_delivery.map_or_else(|| "-".into(), |v| format!("{v:.0} ns")),
                fmt_kb(sv.rss_setup_kb),
                fmt_kb(sv.rss_end_kb)
            );
        }
        let g = &self.generator;
        let wake = if s.max {
            String::new()
        } else {
            format!("; wake lag p99 {} max {}", fmt_us(g.wake_lag_us.p99), fmt_us(g.wake_lag_us.max))
        };
        let _ = writeln!(
            o,
            "generator: CPU {:.1} % of {} allowed CPU(s){}; send lag p99 {} max {}{}",
            g.cpu_util * 100.0,
            g.allowed_cpus,
            wake,
            fmt_us(g.send_lag_us.p99),
            fmt_us(g.send_lag_us.max),
            if g.window_stalls > 0 { format!("; window stalls {}", g.window_stalls) } else { String::new() }
        );
        if g.bottleneck {
            for n in &g.notes {
                let _ = writeln!(o, "WARNING: generator may be the bottleneck: {n}");
            }
        } else {
            let _ = writeln!(o, "generator kept up (not the bottleneck)");
        }
        let m = &self.machine;
        if m.noisy {
            let _ = writeln!(
                o,
                "WARNING: other processes used {:.2} cores during the measured window (machine busy {:.2} cores): figures are disturbed",
                m.other_cores, m.busy_cores
            );
        }
        for e in &self.errors {
            let _ = writeln!(o, "ERROR: {e}");
        }
        o
    }
}
