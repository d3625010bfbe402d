//! The durable suite (`durable`, issue 6's numbers): the disk's bare fdatasync latency, durable
//! publish → acknowledgement latency in a paced open-loop run, and acknowledged throughput
//! against the number of publisher connections, for Switchboard (in each durability mode
//! asked for) and NATS `JetStream` (file storage), all in one run on one disk.
//!
//! This module holds the suite's data (serialized as `results.json`) and its markdown tables;
//! the `durable` binary runs it.

use crate::ackrun::AckReport;
use crate::fsync::{self, ProbeResult};
use crate::report::Host;
use serde::{Deserialize, Serialize};
use std::fmt::Write as _;

/// One server configuration of the suite: `switchboard` with a durability, or `jetstream`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Target {
    /// `switchboard` or `jetstream`.
    pub server: String,
    /// Switchboard: the `--durability` value passed (None = no flag, the engine's default).
    pub durability: Option<String>,
}

impl Target {
    /// `switchboard sync`, `switchboard (default)`, `jetstream`.
    pub fn label(&self) -> String {
        match (&self.server[..], &self.durability) {
            ("switchboard", Some(d)) => format!("switchboard {d}"),
            ("switchboard", None) => "switchboard (no flag)".into(),
            (s, _) => s.to_string(),
        }
    }

    /// Extra server arguments for this target.
    pub fn extra_args(&self) -> Vec<String> {
        self.durability.as_ref().map(|d| vec!["--durability".into(), d.clone()]).unwrap_or_default()
    }
}

/// Parse `--sb-durability`: comma-separated modes; `default` means no flag.
pub fn parse_modes(s: &str) -> Result<Vec<Option<String>>, String> {
    let mut v = Vec::new();
    for m in s.split(',').map(str::trim).filter(|m| !m.is_empty()) {
        match m {
            "default" => v.push(None),
            "sync" | "interval" | "none" => v.push(Some(m.to_string())),
            other => return Err(format!("unknown durability {other:?}: use sync, interval, none or default (no flag)")),
        }
    }
    if v.is_empty() {
        return Err("no switchboard durability mode given".into());
    }
    Ok(v)
}

/// Parse a comma-separated list of publisher counts, each 1 ..= `max`.
pub fn parse_counts(s: &str, max: u32) -> Result<Vec<u32>, String> {
    let mut v = Vec::new();
    for p in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let n: u32 = p.parse().map_err(|_| format!("bad publisher count {p:?}"))?;
        if n == 0 || n > max {
            return Err(format!("publisher count {n} must be 1 ..= {max}"));
        }
        v.push(n);
    }
    if v.is_empty() {
        return Err("no publisher counts given".into());
    }
    Ok(v)
}

/// One run of the suite.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SuiteRun {
    /// `latency` (paced) or `scaling` (`--max`).
    pub kind: String,
    /// What was run.
    pub target: Target,
    /// Publisher connections.
    pub publishers: u32,
    /// The report, when the run produced one.
    pub report: Option<AckReport>,
    /// What went wrong (server refused to start, setup failed, errors during the run).
    pub error: Option<String>,
}

/// The whole suite (`results.json`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Suite {
    /// Machine and start time.
    pub host: Host,
    /// Git commit of the harness, when known.
    pub commit: Option<String>,
    /// Paced rate of the latency runs (publishes/s, all publishers).
    pub rate: f64,
    /// Publisher connections of the latency runs.
    pub latency_publishers: u32,
    /// `--max` window per connection in the scaling runs.
    pub scaling_window: u64,
    /// Payload bytes.
    pub payload: usize,
    /// Measured seconds per run.
    pub duration_s: f64,
    /// Bare fdatasync probes, in the directory the servers' data directories are in.
    pub fsync: Vec<ProbeResult>,
    /// Every run.
    pub runs: Vec<SuiteRun>,
    /// Notes for the reader (skipped servers, refused flags).
    pub notes: Vec<String>,
}

fn lost_err(r: &AckReport) -> String {
    let c = &r.counts;
    format!("{}/{}/{}", c.lost, c.errors, c.unexpected)
}

impl Suite {
    /// The fdatasync baseline durable latency is compared with: the smallest `O_DIRECT` size
    /// (a journal frame for a small message is one block), else the smallest probed.
    pub fn baseline(&self) -> Option<&ProbeResult> {
        let direct = self.fsync.iter().filter(|p| p.mode == "direct").min_by_key(|p| p.write_bytes);
        direct.or_else(|| self.fsync.iter().min_by_key(|p| p.write_bytes))
    }

    /// The tables, in markdown.
    pub fn markdown(&self) -> String {
        let mut o = String::new();
        let _ = writeln!(o, "### Bare fdatasync (same directory as the servers' data)\n");
        if let Some(fs) = self.fsync.first().and_then(|p| p.filesystem.clone()) {
            let _ = writeln!(o, "Filesystem: {fs}. Sequential writes into a preallocated file, fdatasync after each.\n");
        }
        let _ = writeln!(o, "| size | mode | ops/s | write p50 µs | fdatasync p50 µs | p99 µs | p99.9 µs | max µs |");
        let _ = writeln!(o, "|---|---|---|---|---|---|---|---|");
        for p in &self.fsync {
            let f = &p.fdatasync_us;
            let _ = writeln!(
                o,
                "| {} | {} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} |",
                fsync::fmt_size(p.write_bytes),
                p.mode,
                p.rounds_per_s,
                p.write_us.p50,
                f.p50,
                f.p99,
                f.p999,
                f.max
            );
        }
        let base = self.baseline();
        let base_label = base.map_or_else(|| "-".into(), |b| format!("{} {}", fsync::fmt_size(b.write_bytes), b.mode));
        let _ = writeln!(
            o,
            "\n### Publish → acknowledgement, paced {:.0}/s over {} publisher connections, {} B\n",
            self.rate, self.latency_publishers, self.payload
        );
        let _ = writeln!(o, "Latency from each publish's intended send time to its acknowledgement. ×fsync = p99 / bare fdatasync p99 ({base_label}).\n");
        let _ = writeln!(o, "| server | claimed | acks/s | p50 µs | p99 µs | p99.9 µs | max µs | ×fsync p99 | lost/err/unexp | server CPU |");
        let _ = writeln!(o, "|---|---|---|---|---|---|---|---|---|---|");
        for r in self.runs.iter().filter(|r| r.kind == "latency") {
            let Some(rep) = &r.report else {
                let _ = writeln!(o, "| {} | - | - | - | - | - | - | - | - | {} |", r.target.label(), r.error.as_deref().unwrap_or("no report").replace('|', "/"));
                continue;
            };
            let l = &rep.latency_us;
            let x = base.filter(|b| b.fdatasync_us.p99 > 0.0).map_or_else(|| "-".into(), |b| format!("{:.2}×", l.p99 / b.fdatasync_us.p99));
            let _ = writeln!(
                o,
                "| {} | {} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} | {x} | {} | {} |{}",
                r.target.label(),
                rep.counts.claim_summary(),
                rep.acks_per_s,
                l.p50,
                l.p99,
                l.p999,
                l.max,
                lost_err(rep),
                rep.server.as_ref().map_or_else(|| "-".into(), |s| format!("{:.0} %", s.cpu_cores * 100.0)),
                flags(r)
            );
        }
        let _ = writeln!(o, "\n### Acknowledged throughput vs publisher connections (`--max`, window {} per connection)\n", self.scaling_window);
        let targets = self.scaling_targets();
        let mut counts: Vec<u32> = self.runs.iter().filter(|r| r.kind == "scaling").map(|r| r.publishers).collect();
        counts.sort_unstable();
        counts.dedup();
        let _ = write!(o, "| publishers |");
        for t in &targets {
            let _ = write!(o, " {} acks/s | p50 µs | p99 µs |", t.label());
        }
        let _ = writeln!(o);
        let _ = writeln!(o, "|---|{}", "---|---|---|".repeat(targets.len()));
        for p in counts {
            let _ = write!(o, "| {p} |");
            for t in &targets {
                match self.runs.iter().find(|r| r.kind == "scaling" && &r.target == t && r.publishers == p) {
                    Some(SuiteRun { report: Some(rep), .. }) => {
                        let _ = write!(o, " {:.0}{} | {:.0} | {:.0} |", rep.acks_per_s, mark(rep), rep.latency_us.p50, rep.latency_us.p99);
                    }
                    _ => {
                        let _ = write!(o, " failed | - | - |");
                    }
                }
            }
            let _ = writeln!(o);
        }
        let failed: Vec<&SuiteRun> = self.runs.iter().filter(|r| r.error.is_some()).collect();
        if !failed.is_empty() || !self.notes.is_empty() {
            let _ = writeln!(o);
        }
        for n in &self.notes {
            let _ = writeln!(o, "- {n}");
        }
        for r in failed {
            let _ = writeln!(o, "- {} {} × {}: {}", r.kind, r.target.label(), r.publishers, r.error.as_deref().unwrap_or_default());
        }
        o
    }

    /// The targets of the scaling runs, in first-run order.
    fn scaling_targets(&self) -> Vec<Target> {
        let mut v: Vec<Target> = Vec::new();
        for r in self.runs.iter().filter(|r| r.kind == "scaling") {
            if !v.contains(&r.target) {
                v.push(r.target.clone());
            }
        }
        v
    }
}

/// `¹` when the run had lost/refused acknowledgements, `²` when it was noisy.
fn mark(r: &AckReport) -> &'static str {
    if !r.counts.clean() {
        " (lost/err!)"
    } else if r.machine.noisy || r.generator.bottleneck {
        " (noisy)"
    } else {
        ""
    }
}

fn flags(r: &SuiteRun) -> String {
    let mut v = Vec::new();
    if let Some(rep) = &r.report {
        if let (Some(asked), false) = (&r.target.durability, rep.counts.claims.is_empty()) {
            if rep.counts.claims.keys().any(|k| k != asked) {
                v.push(format!("claims differ from the {asked} asked"));
            }
        }
        if rep.machine.noisy {
            v.push(format!("noisy: {:.2} other cores", rep.machine.other_cores));
        }
        v.extend(rep.generator.notes.iter().cloned());
    }
    if let Some(e) = &r.error {
        v.push(e.clone());
    }
    if v.is_empty() { String::new() } else { format!(" {}", v.join("; ").replace('|', "/")) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ack::AckCounts;
    use crate::latency::Percentiles;

    fn report(acks: f64, p99: f64, claim: &str) -> AckReport {
        let mut counts = AckCounts { sent: 10, acked: 10, ..AckCounts::default() };
        counts.claims.insert(claim.into(), 10);
        AckReport { acks_per_s: acks, latency_us: Percentiles { p50: p99 / 2.0, p99, ..Percentiles::default() }, counts, ..AckReport::default() }
    }

    #[test]
    fn parses_modes_and_counts() {
        assert_eq!(parse_modes("sync,interval"), Ok(vec![Some("sync".into()), Some("interval".into())]));
        assert_eq!(parse_modes("default"), Ok(vec![None]));
        assert!(parse_modes("fast").is_err());
        assert!(parse_modes("").is_err());
        assert_eq!(parse_counts("1,4,16,64", 64), Ok(vec![1, 4, 16, 64]));
        assert!(parse_counts("0", 64).is_err());
        assert!(parse_counts("65", 64).is_err());
        assert!(parse_counts("x", 64).is_err());
        let t = Target { server: "switchboard".into(), durability: Some("sync".into()) };
        assert_eq!(t.extra_args(), vec!["--durability".to_string(), "sync".into()]);
        assert_eq!(t.label(), "switchboard sync");
        assert!(Target { server: "jetstream".into(), durability: None }.extra_args().is_empty());
    }

    #[test]
    fn tables_compare_with_the_direct_baseline_and_flag_wrong_claims() {
        let probe = |size: usize, mode: &str, p99: f64| ProbeResult {
            write_bytes: size,
            mode: mode.into(),
            fdatasync_us: Percentiles { p99, ..Percentiles::default() },
            ..ProbeResult::default()
        };
        let sync = Target { server: "switchboard".into(), durability: Some("sync".into()) };
        let js = Target { server: "jetstream".into(), durability: None };
        let run = |kind: &str, target: &Target, p: u32, rep: Option<AckReport>, error: Option<&str>| SuiteRun {
            kind: kind.into(),
            target: target.clone(),
            publishers: p,
            report: rep,
            error: error.map(Into::into),
        };
        let s = Suite {
            host: Host::default(),
            commit: None,
            rate: 10_000.0,
            latency_publishers: 16,
            scaling_window: 1,
            payload: 128,
            duration_s: 5.0,
            fsync: vec![probe(65536, "direct", 9000.0), probe(4096, "buffered", 1.0), probe(4096, "direct", 4000.0)],
            runs: vec![
                run("latency", &sync, 16, Some(report(10_000.0, 6000.0, "memory")), None),
                run("latency", &js, 16, Some(report(10_000.0, 400.0, "jetstream-file")), None),
                run("scaling", &sync, 1, Some(report(250.0, 4000.0, "sync")), None),
                run("scaling", &js, 1, Some(report(9000.0, 150.0, "jetstream-file")), None),
                run("scaling", &sync, 4, None, Some("switchboard refused --durability")),
                run("scaling", &js, 4, Some(report(20_000.0, 300.0, "jetstream-file")), None),
            ],
            notes: vec!["a note".into()],
        };
        assert_eq!(s.baseline().map(|b| (b.write_bytes, b.mode.as_str())), Some((4096, "direct")));
        let md = s.markdown();
        assert!(md.contains("| switchboard sync | memory | 10000 | 3000 | 6000 |"), "{md}");
        assert!(md.contains("1.50×"), "{md}");
        assert!(md.contains("claims differ from the sync asked"), "{md}");
        assert!(md.contains("| 1 | 250 | 2000 | 4000 | 9000 | 75 | 150 |"), "{md}");
        assert!(md.contains("| 4 | failed | - | - | 20000 |"), "{md}");
        assert!(md.contains("switchboard refused --durability"), "{md}");
        assert!(md.contains("- a note"), "{md}");
    }
}
