//! `fsync_probe`: the disk's fdatasync latency alone, written the way the journal writes
//! (sequential appends into a preallocated file, `O_DIRECT` or buffered, fdatasync after each).
//!
//! `fsync_probe --dir bench/out/probe --sizes 4k,64k --mode direct --rounds 2000 --duration 3`

#![allow(clippy::cast_precision_loss)]

use clap::Parser;
use std::path::PathBuf;
use switchboard_bench::fsync::{self, ProbeSettings, WriteMode};

#[derive(Parser, Debug)]
#[command(version, about = "fdatasync latency of a directory's disk, written like the journal")]
struct Args {
    /// Directory to write in (put it on the disk the server's data directory is on).
    #[arg(long, default_value = ".")]
    dir: PathBuf,
    /// Bytes per write, comma separated (4096, 4k, 64KiB, 1m).
    #[arg(long, default_value = "4k,64k")]
    sizes: String,
    /// `direct` (`O_DIRECT`, as the journal) or `buffered`; comma separated for both.
    #[arg(long, value_enum, default_value = "direct", value_delimiter = ',')]
    mode: Vec<WriteMode>,
    /// Most rounds per size.
    #[arg(long, default_value_t = 2000)]
    rounds: u64,
    /// Longest seconds per size.
    #[arg(long, default_value_t = 3.0)]
    duration: f64,
    /// Preallocated file length in MiB (a fresh file when full, like a journal segment).
    #[arg(long, default_value_t = 64)]
    file_mib: u64,
    /// Write every result as JSON here.
    #[arg(long)]
    json: Option<PathBuf>,
}

fn main() {
    let a = Args::parse();
    let sizes = fsync::parse_sizes(&a.sizes).unwrap_or_else(|e| fail(&e));
    let mut results = Vec::new();
    println!("{:>8} {:>9} {:>8} {:>9} {:>9} {:>11} {:>11} {:>11} {:>9}", "size", "mode", "rounds", "ops/s", "write p50", "fsync p50", "fsync p99", "fsync p99.9", "max µs");
    for &mode in &a.mode {
        for &size in &sizes {
            let st = ProbeSettings { dir: a.dir.clone(), write_bytes: size, mode, rounds_max: a.rounds, duration_s: a.duration, file_bytes: a.file_mib << 20 };
            let r = fsync::probe(&st).unwrap_or_else(|e| fail(&e));
            println!(
                "{:>8} {:>9} {:>8} {:>9.0} {:>9.0} {:>11.0} {:>11.0} {:>11.0} {:>9.0}",
                fsync::fmt_size(size),
                r.mode,
                r.rounds,
                r.rounds_per_s,
                r.write_us.p50,
                r.fdatasync_us.p50,
                r.fdatasync_us.p99,
                r.fdatasync_us.p999,
                r.fdatasync_us.max
            );
            results.push(r);
        }
    }
    if let Some(fs) = results.first().and_then(|r| r.filesystem.clone()) {
        println!("filesystem: {fs}");
    }
    if let Some(p) = &a.json {
        let j = serde_json::to_string_pretty(&results).expect("serializes");
        if let Err(e) = std::fs::write(p, j + "\n") {
            fail(&format!("writing {}: {e}", p.display()));
        }
    }
}

fn fail(msg: &str) -> ! {
    eprintln!("fsync_probe: {msg}");
    std::process::exit(2);
}
