//! The disk's own limit: write N bytes and fdatasync, in a loop, the way the journal does
//! (sequential appends into a preallocated file, 4096 B aligned, `O_DIRECT` or buffered), and
//! the latency of each fdatasync. Durable acknowledgements cannot be faster than this on the
//! same disk; `durable` prints both side by side.
//!
//! A file is preallocated with `posix_fallocate` ([`ProbeSettings::file_bytes`], like a
//! journal segment) and written front to back; when the next write would not fit, a fresh
//! file replaces it (a new segment), so every write lands in never-written preallocated space.

use crate::latency::{Latency, Percentiles};
use serde::{Deserialize, Serialize};
use std::fs::{File, OpenOptions};
use std::io;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Alignment of `O_DIRECT` offsets, lengths and buffers (the journal's block).
pub const BLOCK_BYTES: usize = 4096;
/// Largest write probed.
pub const WRITE_BYTES_MAX: usize = 16 << 20;

/// How the data is written before each fdatasync.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, clap::ValueEnum)]
#[serde(rename_all = "lowercase")]
pub enum WriteMode {
    /// `O_DIRECT` (what the journal does).
    Direct,
    /// Through the page cache.
    Buffered,
}

/// One probe.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ProbeSettings {
    /// Directory the file is created in (removed afterwards).
    pub dir: PathBuf,
    /// Bytes per write.
    pub write_bytes: usize,
    /// Direct or buffered.
    pub mode: WriteMode,
    /// Most write + fdatasync rounds.
    pub rounds_max: u64,
    /// Longest probe, seconds (whichever of the two limits comes first).
    pub duration_s: f64,
    /// Preallocated file length (a fresh file when it is full).
    pub file_bytes: u64,
}

/// What one probe measured.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ProbeResult {
    /// Bytes per write.
    pub write_bytes: usize,
    /// `direct` or `buffered`.
    pub mode: String,
    /// Rounds done.
    pub rounds: u64,
    /// Rounds per second.
    pub rounds_per_s: f64,
    /// The write call alone (µs).
    pub write_us: Percentiles,
    /// The fdatasync alone (µs).
    pub fdatasync_us: Percentiles,
    /// Write + fdatasync (µs).
    pub total_us: Percentiles,
    /// The filesystem's type name from /proc/mounts, when found.
    pub filesystem: Option<String>,
}

/// Parse a size: `4096`, `4k`, `4KiB`, `64K`, `1m`, `1MiB` (binary units).
pub fn parse_size(s: &str) -> Result<usize, String> {
    let t = s.trim().to_ascii_lowercase();
    let t = t.strip_suffix("ib").or_else(|| t.strip_suffix('b')).unwrap_or(&t);
    let (num, mul) = match t.chars().last() {
        Some('k') => (&t[..t.len() - 1], 1usize << 10),
        Some('m') => (&t[..t.len() - 1], 1 << 20),
        _ => (t, 1),
    };
    let n: usize = num.parse().map_err(|_| format!("bad size {s:?}: use e.g. 4096, 4k, 64KiB, 1m"))?;
    n.checked_mul(mul).filter(|&v| v > 0 && v <= WRITE_BYTES_MAX).ok_or_else(|| format!("size {s:?} must be 1 B ..= 16 MiB"))
}

/// Parse a comma-separated list of sizes.
pub fn parse_sizes(s: &str) -> Result<Vec<usize>, String> {
    s.split(',').filter(|p| !p.trim().is_empty()).map(parse_size).collect()
}

impl ProbeSettings {
    /// Check the settings; the message says what to change.
    pub fn validate(&self) -> Result<(), String> {
        if self.write_bytes == 0 || self.write_bytes > WRITE_BYTES_MAX {
            return Err("write size must be 1 B ..= 16 MiB".into());
        }
        if self.mode == WriteMode::Direct && self.write_bytes % BLOCK_BYTES != 0 {
            return Err(format!("O_DIRECT writes must be a multiple of {BLOCK_BYTES} B (got {})", self.write_bytes));
        }
        if self.file_bytes < self.write_bytes as u64 || self.file_bytes % BLOCK_BYTES as u64 != 0 {
            return Err(format!("file size must be a multiple of {BLOCK_BYTES} B and hold one write"));
        }
        if self.rounds_max == 0 || !(self.duration_s > 0.0 && self.duration_s <= 600.0) {
            return Err("rounds must be ≥ 1 and duration 0 < s ≤ 600".into());
        }
        Ok(())
    }
}

/// Where the next write goes: `Some(offset)` in the current file, or `None` when it does not
/// fit and a fresh file must be started (whose first write is at 0). Offsets stay
/// [`BLOCK_BYTES`]-aligned (each write is padded to whole blocks, as the journal pads frames).
pub fn next_offset(at: u64, write_bytes: usize, file_bytes: u64) -> Option<u64> {
    let len = (write_bytes as u64).div_ceil(BLOCK_BYTES as u64) * BLOCK_BYTES as u64;
    (at + len <= file_bytes).then_some(at)
}

/// The offset after a write of `write_bytes` at `at`.
pub fn advance(at: u64, write_bytes: usize) -> u64 {
    at + (write_bytes as u64).div_ceil(BLOCK_BYTES as u64) * BLOCK_BYTES as u64
}

/// A buffer aligned to [`BLOCK_BYTES`] (for `O_DIRECT`), freed on drop.
struct Aligned {
    ptr: *mut u8,
    layout: std::alloc::Layout,
}

impl Aligned {
    fn new(len: usize) -> Self {
        let layout = std::alloc::Layout::from_size_align(len.div_ceil(BLOCK_BYTES) * BLOCK_BYTES, BLOCK_BYTES).expect("layout");
        // SAFETY: layout has a nonzero size (len ≥ 1 after validation).
        let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
        assert!(!ptr.is_null(), "out of memory");
        Self { ptr, layout }
    }

    fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: ptr is valid for layout.size() bytes and uniquely owned.
        unsafe { std::slice::from_raw_parts_mut(self.ptr, self.layout.size()) }
    }
}

impl Drop for Aligned {
    fn drop(&mut self) {
        // SAFETY: allocated with this layout in `new`.
        unsafe { std::alloc::dealloc(self.ptr, self.layout) };
    }
}

fn open_segment(path: &Path, mode: WriteMode, len: u64) -> io::Result<File> {
    let _ = std::fs::remove_file(path);
    let mut o = OpenOptions::new();
    o.read(true).write(true).create_new(true);
    if mode == WriteMode::Direct {
        o.custom_flags(libc::O_DIRECT);
    }
    let f = o.open(path).map_err(|e| io::Error::new(e.kind(), format!("open {} ({mode:?}): {e}", path.display())))?;
    // SAFETY: a valid fd; offset and length are in range.
    let rc = unsafe { libc::posix_fallocate(f.as_raw_fd(), 0, len as libc::off_t) };
    if rc != 0 {
        return Err(io::Error::from_raw_os_error(rc));
    }
    // Make the preallocation itself durable first, as the journal does when it opens a segment.
    f.sync_all()?;
    Ok(f)
}

fn fdatasync(f: &File) -> io::Result<()> {
    // SAFETY: a valid fd.
    if unsafe { libc::fdatasync(f.as_raw_fd()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The filesystem type of the mount holding `dir` (longest matching mount point).
pub fn filesystem_of(dir: &Path) -> Option<String> {
    let dir = std::fs::canonicalize(dir).ok()?;
    let mounts = std::fs::read_to_string("/proc/mounts").ok()?;
    mounts
        .lines()
        .filter_map(|l| {
            let mut f = l.split(' ');
            let (dev, at, fs) = (f.next()?, f.next()?, f.next()?);
            dir.starts_with(at).then(|| (at.len(), format!("{fs} on {dev} ({at})")))
        })
        .max_by_key(|(n, _)| *n)
        .map(|(_, s)| s)
}

/// Run one probe. The file is removed afterwards.
pub fn probe(st: &ProbeSettings) -> Result<ProbeResult, String> {
    st.validate()?;
    std::fs::create_dir_all(&st.dir).map_err(|e| format!("creating {}: {e}", st.dir.display()))?;
    let path = st.dir.join(format!("fsync-probe-{}.dat", std::process::id()));
    let res = run_probe(st, &path).map_err(|e| format!("fsync probe in {}: {e}", st.dir.display()));
    let _ = std::fs::remove_file(&path);
    res
}

fn run_probe(st: &ProbeSettings, path: &Path) -> io::Result<ProbeResult> {
    let mut buf = Aligned::new(st.write_bytes);
    for (i, b) in buf.as_mut_slice().iter_mut().enumerate() {
        *b = (i * 31 + 7) as u8; // not zeros: nothing may skip the write
    }
    let write_len = if st.mode == WriteMode::Direct { st.write_bytes.div_ceil(BLOCK_BYTES) * BLOCK_BYTES } else { st.write_bytes };
    let mut file = open_segment(path, st.mode, st.file_bytes)?;
    let (mut write, mut sync, mut total) = (Latency::new(), Latency::new(), Latency::new());
    let mut at = 0u64;
    let mut rounds = 0u64;
    let started = Instant::now();
    let budget = Duration::from_secs_f64(st.duration_s);
    while rounds < st.rounds_max && started.elapsed() < budget {
        let off = if let Some(o) = next_offset(at, st.write_bytes, st.file_bytes) {
            o
        } else {
            file = open_segment(path, st.mode, st.file_bytes)?;
            0
        };
        let t0 = Instant::now();
        file.write_all_at(&buf.as_mut_slice()[..write_len], off)?;
        let t1 = Instant::now();
        fdatasync(&file)?;
        let t2 = Instant::now();
        write.record((t1 - t0).as_nanos() as u64);
        sync.record((t2 - t1).as_nanos() as u64);
        total.record((t2 - t0).as_nanos() as u64);
        at = advance(off, st.write_bytes);
        rounds += 1;
    }
    let secs = started.elapsed().as_secs_f64().max(1e-9);
    Ok(ProbeResult {
        write_bytes: st.write_bytes,
        mode: format!("{:?}", st.mode).to_lowercase(),
        rounds,
        rounds_per_s: rounds as f64 / secs,
        write_us: write.percentiles(),
        fdatasync_us: sync.percentiles(),
        total_us: total.percentiles(),
        filesystem: filesystem_of(&st.dir),
    })
}

/// A human-readable size: `4 KiB`, `64 KiB`, `1 MiB`, `100 B`.
pub fn fmt_size(n: usize) -> String {
    if n >= 1 << 20 && n % (1 << 20) == 0 {
        format!("{} MiB", n >> 20)
    } else if n >= 1 << 10 && n % (1 << 10) == 0 {
        format!("{} KiB", n >> 10)
    } else {
        format!("{n} B")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse() {
        assert_eq!(parse_size("4096"), Ok(4096));
        assert_eq!(parse_size("4k"), Ok(4096));
        assert_eq!(parse_size("4KiB"), Ok(4096));
        assert_eq!(parse_size(" 64K "), Ok(65536));
        assert_eq!(parse_size("1m"), Ok(1 << 20));
        assert_eq!(parse_size("1MiB"), Ok(1 << 20));
        assert_eq!(parse_size("512b"), Ok(512));
        assert!(parse_size("0").is_err());
        assert!(parse_size("17m").is_err());
        assert!(parse_size("4g").is_err());
        assert!(parse_size("k").is_err());
        assert!(parse_size("99999999999999999999k").is_err());
        assert_eq!(parse_sizes("4k,64k"), Ok(vec![4096, 65536]));
        assert!(parse_sizes("4k,x").is_err());
        assert_eq!(fmt_size(4096), "4 KiB");
        assert_eq!(fmt_size(1 << 20), "1 MiB");
        assert_eq!(fmt_size(100), "100 B");
    }

    #[test]
    fn offsets_stay_aligned_and_rotate_at_the_end() {
        let file = 4 * BLOCK_BYTES as u64;
        let mut at = 0;
        let mut offs = Vec::new();
        for _ in 0..2 {
            let o = next_offset(at, 5000, file).expect("fits");
            offs.push(o);
            at = advance(o, 5000);
        }
        // 5000 B take two blocks: 0, 8192, then no room at 16384: a fresh file.
        assert_eq!(offs, [0, 8192]);
        assert_eq!(at, 16384);
        assert_eq!(next_offset(at, 5000, file), None);
        assert_eq!(next_offset(12288, 5000, file), None, "a padded write must fit whole");
        assert_eq!(next_offset(12288, 4096, file), Some(12288));
        assert_eq!(next_offset(16384, 4096, file), None);
        assert!(offs.iter().all(|o| o % BLOCK_BYTES as u64 == 0));
    }

    #[test]
    fn settings_are_checked() {
        let ok = ProbeSettings {
            dir: std::env::temp_dir(),
            write_bytes: 4096,
            mode: WriteMode::Direct,
            rounds_max: 10,
            duration_s: 1.0,
            file_bytes: 1 << 20,
        };
        assert!(ok.validate().is_ok());
        assert!(ProbeSettings { write_bytes: 1000, ..ok.clone() }.validate().is_err(), "O_DIRECT needs whole blocks");
        assert!(ProbeSettings { write_bytes: 1000, mode: WriteMode::Buffered, ..ok.clone() }.validate().is_ok());
        assert!(ProbeSettings { file_bytes: 100, ..ok.clone() }.validate().is_err());
        assert!(ProbeSettings { rounds_max: 0, ..ok.clone() }.validate().is_err());
    }

    /// A few real rounds in the build's target directory (a real disk, not tmpfs), both modes,
    /// across a file rotation.
    #[test]
    fn probes_a_real_file() {
        let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/fsync-probe-test");
        for mode in [WriteMode::Buffered, WriteMode::Direct] {
            let st = ProbeSettings { dir: dir.clone(), write_bytes: 8192, mode, rounds_max: 5, duration_s: 10.0, file_bytes: 16384 };
            let r = probe(&st).unwrap_or_else(|e| panic!("{mode:?}: {e}"));
            assert_eq!(r.rounds, 5);
            assert_eq!(r.fdatasync_us.count, 5);
            assert!(r.total_us.max >= r.fdatasync_us.max * 0.99);
        }
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 0, "probe files are removed");
        let _ = std::fs::remove_dir(&dir);
    }
}
