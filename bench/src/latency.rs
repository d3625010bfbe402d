//! Latency histograms (hdrhistogram, nanoseconds, 3 significant digits) and what is reported
//! from them.

use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};
use std::io::Write;

/// Highest trackable value: 60 s, in ns. Larger values are clamped (and still counted).
pub const MAX_NS: u64 = 60_000_000_000;

/// A latency histogram in nanoseconds.
#[derive(Clone)]
pub struct Latency {
    hist: Histogram<u64>,
}

impl Default for Latency {
    fn default() -> Self {
        Self::new()
    }
}

impl Latency {
    /// An empty histogram, 1 ns to 60 s, 3 significant digits.
    pub fn new() -> Self {
        Self { hist: Histogram::new_with_bounds(1, MAX_NS, 3).expect("valid bounds") }
    }

    /// Record one value in ns (clamped to 1 ns ..= 60 s).
    #[inline]
    pub fn record(&mut self, ns: u64) {
        self.hist.saturating_record(ns.clamp(1, MAX_NS));
    }

    /// Add all values of `other`.
    pub fn merge(&mut self, other: &Latency) {
        self.hist.add(&other.hist).expect("same bounds");
    }

    /// Number of recorded values.
    pub fn count(&self) -> u64 {
        self.hist.len()
    }

    /// The reported percentiles, in microseconds.
    pub fn percentiles(&self) -> Percentiles {
        let us = |ns: u64| ns as f64 / 1000.0;
        let h = &self.hist;
        if h.is_empty() {
            return Percentiles::default();
        }
        Percentiles {
            count: h.len(),
            mean: h.mean() / 1000.0,
            p50: us(h.value_at_quantile(0.50)),
            p90: us(h.value_at_quantile(0.90)),
            p99: us(h.value_at_quantile(0.99)),
            p999: us(h.value_at_quantile(0.999)),
            p9999: us(h.value_at_quantile(0.9999)),
            max: us(h.max()),
        }
    }

    /// The percentile spectrum: `(percentile, value µs)` points, denser towards the tail
    /// (5 ticks per half distance, as `HdrHistogram`'s percentile output).
    pub fn spectrum(&self) -> Vec<(f64, f64)> {
        if self.hist.is_empty() {
            return Vec::new();
        }
        self.hist
            .iter_quantiles(5)
            .map(|v| (v.quantile_iterated_to() * 100.0, v.value_iterated_to() as f64 / 1000.0))
            .collect()
    }

    /// Write the `HdrHistogram` percentile-distribution text (`.hgrm`), values in microseconds,
    /// the format `HdrHistogram`'s plotter reads.
    pub fn write_hgrm(&self, out: &mut dyn Write) -> std::io::Result<()> {
        writeln!(out, "{:>12} {:>14} {:>10} {:>14}\n", "Value", "Percentile", "TotalCount", "1/(1-Percentile)")?;
        let h = &self.hist;
        let mut total = 0u64;
        for v in h.iter_quantiles(5) {
            total += v.count_since_last_iteration();
            let q = v.quantile_iterated_to();
            let inv = if q < 1.0 { format!("{:14.2}", 1.0 / (1.0 - q)) } else { format!("{:>14}", "inf") };
            writeln!(out, "{:12.3} {:14.12} {:10} {}", v.value_iterated_to() as f64 / 1000.0, q, total, inv)?;
        }
        let p = self.percentiles();
        writeln!(out, "#[Mean    = {:12.3}, StdDeviation   = {:12.3}]", p.mean, h.stdev() / 1000.0)?;
        writeln!(out, "#[Max     = {:12.3}, Total count    = {:12}]", p.max, h.len())?;
        writeln!(out, "#[Buckets = {:12}, SubBuckets     = {:12}]", h.buckets(), h.distinct_values())?;
        Ok(())
    }
}

/// Reported latency percentiles, in microseconds.
#[derive(Debug, Default, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Percentiles {
    /// Number of values.
    pub count: u64,
    /// Mean (µs).
    pub mean: f64,
    /// Median (µs).
    pub p50: f64,
    /// 90th percentile (µs).
    pub p90: f64,
    /// 99th percentile (µs).
    pub p99: f64,
    /// 99.9th percentile (µs).
    pub p999: f64,
    /// 99.99th percentile (µs).
    pub p9999: f64,
    /// Maximum (µs).
    pub max: f64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_of_uniform() {
        let mut l = Latency::new();
        for v in 1..=100_000u64 {
            l.record(v * 1000); // 1 µs ..= 100 ms
        }
        let p = l.percentiles();
        assert_eq!(p.count, 100_000);
        assert!((p.p50 - 50_000.0).abs() / 50_000.0 < 0.002, "{p:?}");
        assert!((p.p99 - 99_000.0).abs() / 99_000.0 < 0.002, "{p:?}");
        assert!((p.max - 100_000.0).abs() / 100_000.0 < 0.002, "{p:?}");
        let mut other = Latency::new();
        other.record(MAX_NS * 10);
        l.merge(&other);
        assert_eq!(l.count(), 100_001);
        assert!(l.percentiles().max >= 59_000_000.0);
        let spec = l.spectrum();
        assert!(spec.len() > 20);
        assert!(spec.windows(2).all(|w| w[0].0 <= w[1].0 && w[0].1 <= w[1].1));
        let mut out = Vec::new();
        l.write_hgrm(&mut out).unwrap();
        assert!(String::from_utf8(out).unwrap().contains("Percentile"));
    }

    #[test]
    fn empty_is_zero() {
        assert_eq!(Latency::new().percentiles(), Percentiles::default());
        assert!(Latency::new().spectrum().is_empty());
    }
}
