//! Journal benchmark (issue 6): durable append latency against the disk's own fdatasync, and
//! recovery scan speed.
//!
//! `cargo bench -p switchboard --bench journal` runs it in full; without `--bench` (e.g. under
//! `cargo test --benches`) it runs a few operations as a smoke test. Knobs (environment):
//! `JOURNAL_BENCH_DIR` (default: the system temp dir; must be a real file system: `O_DIRECT`),
//! `JOURNAL_BENCH_OPS` (appends per latency run, default 4000), `JOURNAL_BENCH_SCAN_MB`
//! (journal size for the recovery runs, default 256), `JOURNAL_BENCH_COMPACT_MB` (journal
//! size for the compaction run, default 128), `JOURNAL_BENCH_ONLY` (`compaction`: run only
//! that). Everything it writes is removed at the end. Prints percentiles from HDR histograms,
//! never averages alone.
//!
//! What is measured:
//! - `bare`: write 4 KiB at the next aligned offset of a preallocated file + fdatasync, the
//!   disk's limit for one durable small write (a journal frame at low load is exactly that).
//! - `journal sync xN`: N tasks each append a 200 B record and await its acknowledgement
//!   (sync mode), in a loop; latency is append → acked.
//! - recovery: open with no snapshot (full replay: read, CRC, chain, index) from disk; and the
//!   pure scan (CRC + chain + record walk) over segments already in memory.
//! - compaction: a journal where one record in ten belongs to one of many quiet conversations
//!   (8 records each) and the rest to 64 chatty ones (their rings keep the last 128), so old
//!   segments are sparse; then `compact` with an 8 MiB budget per call until nothing is left
//!   to copy: records and bytes moved per second, and each call's duration (how long the shard's
//!   executor is busy with it, awaits included).

// A benchmark: ratios and rates printed as floats; short names in measurement loops.
#![allow(
    clippy::cast_precision_loss,
    clippy::many_single_char_names,
    clippy::similar_names,
    clippy::case_sensitive_file_extension_comparisons,
    clippy::too_many_lines
)]

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use glommio::io::OpenOptions;
use glommio::{LocalExecutorBuilder, Placement};
use hdrhistogram::Histogram;
use switchboard::journal::format::{SegmentHeader, SEGMENT_HEADER_BYTES};
use switchboard::journal::index::ConversationIndex;
use switchboard::journal::recover::replay_segment;
use switchboard::journal::scan::{scan_segment, ScanStart};
use switchboard::journal::{Storage, StorageFile, DmaStorage, Durability, Journal, JournalConfig, JournalError, Record, RecordKind};

const PAYLOAD_BYTES: usize = 200;

fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

fn print_hist(label: &str, h: &Histogram<u64>, extra: &str) {
    println!(
        "{label:<22} n={:<6} p50={:>7.1}us p90={:>7.1}us p99={:>7.1}us p99.9={:>7.1}us max={:>8.1}us {extra}",
        h.len(),
        h.value_at_quantile(0.50) as f64 / 1000.0,
        h.value_at_quantile(0.90) as f64 / 1000.0,
        h.value_at_quantile(0.99) as f64 / 1000.0,
        h.value_at_quantile(0.999) as f64 / 1000.0,
        h.max() as f64 / 1000.0,
    );
}

fn hist() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 10_000_000_000, 3).expect("histogram bounds")
}

async fn bare_fdatasync(dir: &Path, ops: u64) -> Histogram<u64> {
    // Settle glommio's per-thread poll-ring probe on a file with data first (see dma.rs).
    let probe = dir.join("probe.dat");
    std::fs::write(&probe, vec![0u8; 4096]).unwrap();
    OpenOptions::new().read(true).dma_open(&probe).await.unwrap().close().await.unwrap();
    std::fs::remove_file(&probe).unwrap();
    let path = dir.join("bare.dat");
    let file = OpenOptions::new().read(true).write(true).create_new(true).dma_open(&path).await.unwrap();
    file.pre_allocate(64 << 20, false).await.unwrap();
    let mut h = hist();
    for i in 0..ops {
        let mut buf = file.alloc_dma_buffer(4096);
        buf.as_bytes_mut().fill(i as u8);
        let t0 = Instant::now();
        file.write_at(buf, (i % 16_000) * 4096).await.unwrap();
        file.fdatasync().await.unwrap();
        h.record(t0.elapsed().as_nanos() as u64).unwrap();
    }
    file.close().await.unwrap();
    std::fs::remove_file(&path).unwrap();
    h
}

async fn journal_sync(dir: &Path, appenders: u64, ops: u64) -> (Histogram<u64>, f64, u64) {
    let jdir = dir.join(format!("sync-{appenders}"));
    let (j, _) = Journal::open(DmaStorage::new(&jdir).unwrap(), 0, JournalConfig::default()).await.unwrap();
    let committer = glommio::spawn_local({
        let j = j.clone();
        async move { j.run_committer().await }
    });
    let t0 = Instant::now();
    let tasks: Vec<_> = (0..appenders)
        .map(|conv| {
            let j = j.clone();
            glommio::spawn_local(async move {
                let payload = vec![b'x'; PAYLOAD_BYTES];
                let mut h = hist();
                for seq in 0..ops / appenders {
                    let r = Record { conversation: conv, seq, timestamp_us: seq, kind: RecordKind::Message, payload: &payload };
                    let t = Instant::now();
                    let ticket = j.append(&r, Durability::Sync).unwrap();
                    j.acked(ticket).await.unwrap();
                    h.record(t.elapsed().as_nanos() as u64).unwrap();
                }
                h
            })
        })
        .collect();
    let mut h = hist();
    for t in tasks {
        h.add(t.await).unwrap();
    }
    let elapsed = t0.elapsed();
    let stats = j.stats();
    j.close().await.unwrap();
    committer.await.unwrap();
    std::fs::remove_dir_all(&jdir).unwrap();
    let rate = h.len() as f64 / elapsed.as_secs_f64();
    (h, rate, stats.fdatasyncs)
}

/// Fills a journal of about `mb` MiB of 200 B records in 64 conversations, then stops without
/// a snapshot (as after a crash).
async fn fill(jdir: &Path, mb: u64) -> u64 {
    let cfg = JournalConfig { pending_bytes_max: 4 << 20, ..JournalConfig::default() };
    let (j, _) = Journal::open(DmaStorage::new(jdir).unwrap(), 0, cfg).await.unwrap();
    let committer = glommio::spawn_local({
        let j = j.clone();
        async move { j.run_committer().await }
    })
    .detach();
    let payload = vec![b'y'; PAYLOAD_BYTES];
    let target = mb << 20;
    let mut seq = 0u64;
    let mut last = None;
    while j.stats().bytes_written < target {
        let r = Record {
            conversation: seq % 64,
            seq: seq / 64,
            timestamp_us: seq,
            kind: RecordKind::Message,
            payload: &payload,
        };
        match j.append(&r, Durability::Sync) {
            Ok(t) => {
                last = Some(t);
                seq += 1;
            }
            Err(JournalError::Backpressure { .. }) => {
                j.acked(last.take().expect("something pending")).await.unwrap();
            }
            Err(e) => panic!("{e}"),
        }
    }
    j.flush().await.unwrap();
    drop(committer);
    seq
}

async fn recovery(dir: &Path, mb: u64) {
    let jdir = dir.join("recovery");
    let t = Instant::now();
    let records = fill(&jdir, mb).await;
    println!("recovery: wrote {records} records ({mb} MiB) in {:.1}s", t.elapsed().as_secs_f64());
    let mut best_open = Duration::MAX;
    let mut replayed = 0;
    for _ in 0..3 {
        for e in std::fs::read_dir(&jdir).unwrap() {
            let p = e.unwrap().path();
            if p.extension().is_some_and(|x| x == "idx") || p.file_name().is_some_and(|n| n == "clean") {
                std::fs::remove_file(p).unwrap();
            }
        }
        let t = Instant::now();
        let (j, rep) = Journal::open(DmaStorage::new(&jdir).unwrap(), 0, JournalConfig::default()).await.unwrap();
        let took = t.elapsed();
        assert_eq!(rep.records_replayed, records, "{rep}");
        replayed = rep.bytes_replayed;
        best_open = best_open.min(took);
        drop(j);
    }
    println!(
        "recovery open (full replay from disk, O_DIRECT, index rebuilt): {:.2} GB/s ({} MB in {:.0} ms, best of 3)",
        replayed as f64 / best_open.as_secs_f64() / 1e9,
        replayed / 1_000_000,
        best_open.as_secs_f64() * 1000.0
    );
    // The read path alone (what open spends before scanning).
    let storage = DmaStorage::new(&jdir).unwrap();
    let t = Instant::now();
    let mut read_bytes = 0;
    for name in storage.list().await.unwrap().iter().filter(|n| n.ends_with(".seg")) {
        let f = storage.open(name).await.unwrap();
        let len = f.len().await.unwrap();
        read_bytes += f.read_at(0, len as usize).await.unwrap().len();
    }
    let took = t.elapsed();
    println!(
        "recovery read path alone (whole segment files, O_DIRECT): {:.2} GB/s ({} MB in {:.0} ms)",
        read_bytes as f64 / took.as_secs_f64() / 1e9,
        read_bytes / 1_000_000,
        took.as_secs_f64() * 1000.0
    );
    scan_in_memory(&jdir, records);
    std::fs::remove_dir_all(&jdir).unwrap();
}

fn scan_in_memory(jdir: &Path, records: u64) {
    let mut segments: Vec<PathBuf> = std::fs::read_dir(jdir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "seg"))
        .collect();
    segments.sort();
    let images: Vec<Vec<u8>> = segments.iter().map(|p| std::fs::read(p).unwrap()).collect();
    let mut best = Duration::MAX;
    let mut bytes = 0;
    for _ in 0..3 {
        let t = Instant::now();
        let (mut n, mut b) = (0u64, 0u64);
        for img in &images {
            let h = SegmentHeader::decode(&img[..SEGMENT_HEADER_BYTES]).unwrap();
            let start = ScanStart { offset: SEGMENT_HEADER_BYTES as u64, position: h.base_position, prev_crc: h.crc() };
            let s = scan_segment(img, h.base_position, start, h.frame_bytes_max as usize, |_, fh, _| {
                n += u64::from(fh.record_count);
            });
            b += s.end_offset;
        }
        best = best.min(t.elapsed());
        assert_eq!(n, records);
        bytes = b;
    }
    println!(
        "recovery scan (in memory: bounds, CRC32C, chain, records): {:.2} GB/s ({} MB in {:.0} ms, best of 3)",
        bytes as f64 / best.as_secs_f64() / 1e9,
        bytes / 1_000_000,
        best.as_secs_f64() * 1000.0
    );
    // The same plus the index rebuild (what open does after reading).
    let t = Instant::now();
    let mut index = ConversationIndex::new(128, 32);
    for img in &images {
        let h = SegmentHeader::decode(&img[..SEGMENT_HEADER_BYTES]).unwrap();
        let start = ScanStart { offset: SEGMENT_HEADER_BYTES as u64, position: h.base_position, prev_crc: h.crc() };
        replay_segment(img, h.base_position, start, &h, &mut index);
    }
    let took = t.elapsed();
    println!(
        "recovery scan + index rebuild (in memory): {:.2} GB/s ({:.0} ms, {} records)",
        bytes as f64 / took.as_secs_f64() / 1e9,
        took.as_secs_f64() * 1000.0,
        index.entries()
    );
}

/// See the module doc. `mb` of journal in 8 MiB segments.
async fn compaction(dir: &Path, mb: u64) {
    let jdir = dir.join("compaction");
    let cfg = JournalConfig { segment_bytes: 8 << 20, pending_bytes_max: 4 << 20, ..JournalConfig::default() };
    let (j, _) = Journal::open(DmaStorage::new(&jdir).unwrap(), 0, cfg).await.unwrap();
    let committer = glommio::spawn_local({
        let j = j.clone();
        async move { j.run_committer().await }
    });
    let payload = vec![b'q'; PAYLOAD_BYTES];
    let records = (mb << 20) / (PAYLOAD_BYTES as u64 + 32);
    let quiet = (records / 10 / 8).max(1);
    let mut last = None;
    let mut i = 0u64;
    while i < records {
        let (conversation, seq) = if i % 10 == 0 {
            let q = i / 10;
            (1_000_000 + q % quiet, q / quiet)
        } else {
            (i % 64, i / 64)
        };
        let r = Record { conversation, seq, timestamp_us: i, kind: RecordKind::Message, payload: &payload };
        match j.append(&r, Durability::Sync) {
            Ok(t) => {
                last = Some(t);
                i += 1;
            }
            Err(JournalError::Backpressure { .. }) => j.acked(last.take().expect("something pending")).await.unwrap(),
            Err(e) => panic!("{e}"),
        }
    }
    j.flush().await.unwrap();
    let segments = j.segments().len();
    let entries = j.retained_entries();
    let budget = 8 << 20;
    let mut calls = hist();
    let (mut copied, mut read, mut written) = (0u64, 0u64, 0u64);
    let t0 = Instant::now();
    loop {
        let t = Instant::now();
        let out = j.compact(budget).await.unwrap();
        calls.record(t.elapsed().as_nanos() as u64).unwrap();
        assert!(out.bytes_read + out.bytes_written <= budget);
        copied += out.records_copied;
        read += out.bytes_read;
        written += out.bytes_written;
        if out.records_copied == 0 {
            break;
        }
    }
    let took = t0.elapsed();
    let ret = j.apply_retention(0).await.unwrap();
    assert_eq!(j.retained_entries(), entries);
    println!(
        "compaction: {segments} segments of 8 MiB, {quiet} quiet conversations; copied {copied} records, read {} MB + wrote {} MB in {:.0} ms: {:.0} records/s, {:.0} MB/s I/O; retention then deleted {} segments",
        read / 1_000_000,
        written / 1_000_000,
        took.as_secs_f64() * 1000.0,
        copied as f64 / took.as_secs_f64(),
        (read + written) as f64 / took.as_secs_f64() / 1e6,
        ret.segments_deleted
    );
    print_hist("compact call (8 MiB)", &calls, "(wall time per call)");
    j.close().await.unwrap();
    committer.await.unwrap();
    std::fs::remove_dir_all(&jdir).unwrap();
}

fn main() {
    let full = std::env::args().any(|a| a == "--bench");
    let ops = if full { env_u64("JOURNAL_BENCH_OPS", 4000) } else { 64 };
    let scan_mb = if full { env_u64("JOURNAL_BENCH_SCAN_MB", 256) } else { 8 };
    let compact_mb = if full { env_u64("JOURNAL_BENCH_COMPACT_MB", 128) } else { 40 };
    let only_compaction = std::env::var("JOURNAL_BENCH_ONLY").is_ok_and(|v| v == "compaction");
    let base = std::env::var_os("JOURNAL_BENCH_DIR").map_or_else(std::env::temp_dir, PathBuf::from);
    let dir = base.join(format!("switchboard-journal-bench-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let commit = std::process::Command::new("git")
        .args(["rev-parse", "--short", "HEAD"])
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default();
    println!(
        "journal bench: commit {commit}, {} CPUs, dir {}, {ops} appends per run, {PAYLOAD_BYTES} B records",
        std::thread::available_parallelism().map_or(0, std::num::NonZero::get),
        dir.display()
    );
    let d = dir.clone();
    let result = LocalExecutorBuilder::new(Placement::Unbound)
        .spawn(move || async move {
            if only_compaction {
                compaction(&d, compact_mb).await;
                return;
            }
            let bare = bare_fdatasync(&d, ops).await;
            print_hist("bare write+fdatasync", &bare, "(4 KiB)");
            for appenders in [1u64, 16] {
                let (h, rate, syncs) = journal_sync(&d, appenders, ops).await;
                print_hist(
                    &format!("journal sync x{appenders}"),
                    &h,
                    &format!(
                        "{rate:.0} appends/s, {:.1} records/fdatasync, p99 {:.2}x bare",
                        h.len() as f64 / syncs.max(1) as f64,
                        h.value_at_quantile(0.99) as f64 / bare.value_at_quantile(0.99) as f64
                    ),
                );
            }
            recovery(&d, scan_mb).await;
            compaction(&d, compact_mb).await;
        })
        .unwrap()
        .join();
    let _ = std::fs::remove_dir_all(&dir);
    result.unwrap();
}
