//! `touch_probe`: what the first write to fresh anonymous memory costs on this machine, per
//! 2 MiB, with 4 KiB pages and with transparent huge pages asked for (`MADV_HUGEPAGE`).
//!
//! Why it exists: on the project's VMs the host backs guest memory lazily, and a first touch
//! costs up to milliseconds per 2 MiB; a shard that faults memory in under live traffic stalls
//! every connection it serves for that long. The engine's buffer pools are populated at start,
//! and so is its history ring (`limits.history_prefault`, see `engine/src/history.rs`).
//! `touch_probe --mib 64 --rounds 3` measures the cost again.

#![allow(clippy::cast_precision_loss)]

use std::time::Instant;

use clap::Parser;

/// Bytes per measured chunk (one x86-64 huge page).
const CHUNK_BYTES: usize = 2 << 20;
/// Bytes between writes inside a chunk (one small page).
const PAGE_BYTES: usize = 4096;

#[derive(Parser, Debug)]
#[command(version, about = "first-touch cost of fresh anonymous memory, per 2 MiB")]
struct Args {
    /// MiB mapped (and touched) per round and page kind.
    #[arg(long, default_value_t = 64)]
    mib: usize,
    /// Rounds; each maps fresh memory (later rounds may reuse what the earlier ones freed).
    #[arg(long, default_value_t = 3)]
    rounds: u32,
}

fn main() {
    let args = Args::parse();
    let len_bytes = args.mib.max(2) << 20;
    println!("first write to fresh anonymous memory, per 2 MiB chunk ({} MiB per round)", len_bytes >> 20);
    for round in 1..=args.rounds {
        for huge in [false, true] {
            match touch_round(len_bytes, huge) {
                Ok((avg_us, max_us)) => println!(
                    "round {round} {:<10} avg {avg_us:>7.0} µs  max {max_us:>7.0} µs",
                    if huge { "huge pages" } else { "4 KiB" }
                ),
                Err(error) => println!("round {round}: {error}"),
            }
        }
    }
}

/// Maps `len_bytes` (2 MiB aligned), writes one byte per page, and returns the average and
/// largest time per 2 MiB chunk, in microseconds.
fn touch_round(len_bytes: usize, huge: bool) -> std::io::Result<(f64, f64)> {
    let map_bytes = len_bytes + CHUNK_BYTES;
    // SAFETY: a fresh private anonymous mapping; checked below, unmapped before returning.
    let raw = unsafe {
        libc::mmap(std::ptr::null_mut(), map_bytes, libc::PROT_READ | libc::PROT_WRITE, libc::MAP_PRIVATE | libc::MAP_ANONYMOUS, -1, 0)
    };
    if raw == libc::MAP_FAILED {
        return Err(std::io::Error::last_os_error());
    }
    let offset = (CHUNK_BYTES - raw as usize % CHUNK_BYTES) % CHUNK_BYTES;
    // SAFETY: offset < CHUNK_BYTES, so the aligned range lies inside the mapping.
    let base = unsafe { raw.cast::<u8>().add(offset) };
    if huge {
        // SAFETY: advice on our own mapping; failure only means no huge pages.
        unsafe { libc::madvise(base.cast(), len_bytes, libc::MADV_HUGEPAGE) };
    }
    let (mut total_us, mut max_us) = (0.0_f64, 0.0_f64);
    for chunk in 0..len_bytes / CHUNK_BYTES {
        let started = Instant::now();
        for page in (0..CHUNK_BYTES).step_by(PAGE_BYTES) {
            // SAFETY: inside the aligned range of our mapping.
            unsafe { base.add(chunk * CHUNK_BYTES + page).write_volatile(1) };
        }
        let us = started.elapsed().as_secs_f64() * 1e6;
        total_us += us;
        max_us = max_us.max(us);
    }
    // SAFETY: the whole mapping, mapped above.
    unsafe { libc::munmap(raw, map_bytes) };
    Ok((total_us / (len_bytes / CHUNK_BYTES) as f64, max_us))
}
