//! The shard's history ring: every message's DELIVER frame, written once into one mapping per
//! shard, where sessions find their recent messages for resume and idempotency checks.
//!
//! Owns: one anonymous memory mapping (memmap2) used as a byte ring, and its write position.
//! May not touch: sessions (they write their history entries into it as plain bytes and keep
//! [`LogSpan`]s, see `session.rs`), sockets, the journal.
//!
//! Why one ring per shard rather than a heap buffer per message: a publish then costs no
//! allocation, and forgetting a session's oldest message costs nothing at all — no free, no
//! read of a long-cold buffer (that eviction was the top user-space cost of a publish when each
//! message had its own allocation: 1000 sessions x 128 messages of history do not stay in any
//! cache). The ring is overwritten in write order, so history memory has one bound per shard
//! (`limits.history_bytes_per_shard`) whatever the number of sessions or the payload sizes. A
//! message can be replayed while it is both among its session's last
//! `limits.history_messages_max` and not yet overwritten here; a resume that reaches further
//! back is told `recovered = false`, as for any history it lost.
//!
//! Frames never wrap around the end of the mapping: one that would is written at the start
//! and the skipped tail is counted as written, so every frame is one contiguous slice.

use std::io;

/// Where a frame sits in the ring: its logical position (bytes ever written before it) and
/// length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LogSpan {
    /// Logical position of the first byte.
    pub pos: u64,
    /// Length in bytes.
    pub len: u32,
}

/// Bytes past the write position warmed for the next frames (see [`prefetch`]).
const WRITE_AHEAD_BYTES: u64 = 512;

/// Cache line size assumed for prefetching.
const CACHE_LINE_BYTES: u64 = 64;

/// Asks the CPU to bring the cache line at `ptr` close, for a write that comes soon. Every
/// publish writes to memory last touched long ago (the ring position a full ring of traffic
/// ago): without the hint the store waits for the line; with it the line is fetched while
/// other work goes on. Only a hint: never faults.
#[inline(always)]
fn prefetch(ptr: *const u8) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: a prefetch is a hint and never faults, whatever the address.
    unsafe {
        core::arch::x86_64::_mm_prefetch::<{ core::arch::x86_64::_MM_HINT_T0 }>(ptr.cast());
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = ptr;
}

/// The shard's history ring.
pub struct HistoryLog {
    ring: memmap2::MmapMut,
    /// Logical write position: bytes written so far, skipped tails included.
    head: u64,
}

impl std::fmt::Debug for HistoryLog {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HistoryLog").field("capacity_bytes", &self.ring.len()).field("head", &self.head).finish()
    }
}

impl HistoryLog {
    /// A ring of `capacity_bytes`. The mapping is reserved, not touched: memory is used as it
    /// is written, unless [`prefault`](HistoryLog::prefault) is called. Huge pages are asked
    /// for (best effort) because sessions' recent messages are spread over the whole ring and
    /// a resume or duplicate check reads them at random.
    pub fn new(capacity_bytes: usize) -> io::Result<HistoryLog> {
        if capacity_bytes == 0 {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "history ring of 0 bytes"));
        }
        let ring = memmap2::MmapOptions::new().len(capacity_bytes).map_anon()?;
        #[cfg(target_os = "linux")]
        let _ = ring.advise(memmap2::Advice::HugePage);
        Ok(HistoryLog { ring, head: 0 })
    }

    /// Faults the whole ring in now (`limits.history_prefault`, on by default). Otherwise the
    /// ring's first pass faults in one page (a 2 MiB huge page where granted) per page
    /// written, on the shard's thread: 0.3–2 ms each on the project's VMs (`touch_probe`,
    /// bench/RESULTS.md), during which every arriving message waits. Measured at a paced
    /// 20 000 publishes/s (the ring's first pass lasts ~8 s there): p99 1.6–2.3 ms without,
    /// 0.5–0.7 ms with (Redis 0.55–0.65 ms in the same runs). The price is memory: every shard
    /// is resident at its full ring size from the start, traffic or not.
    pub fn prefault(&mut self) -> io::Result<()> {
        #[cfg(target_os = "linux")]
        if self.ring.advise(memmap2::Advice::PopulateWrite).is_ok() {
            return Ok(());
        }
        // Before Linux 5.14 (no MADV_POPULATE_WRITE): write one byte per page. The ring's
        // contents before a frame is written there are unspecified, so zeros are harmless.
        // SAFETY: sysconf has no preconditions.
        let page_bytes = usize::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).unwrap_or(4096).max(1);
        let base = self.ring.as_mut_ptr();
        for offset in (0..self.ring.len()).step_by(page_bytes) {
            // SAFETY: offset < len, inside the mapping we own; volatile so the store is kept.
            unsafe { base.add(offset).write_volatile(0) };
        }
        Ok(())
    }

    /// Size of the ring in bytes.
    pub fn capacity_bytes(&self) -> usize {
        self.ring.len()
    }

    /// Bytes written so far (the logical write position).
    pub fn written_bytes(&self) -> u64 {
        self.head
    }

    /// Reserves `len` contiguous bytes for a new frame and returns where they are and the
    /// bytes to fill. `None` when the frame is larger than the whole ring (the configuration
    /// makes the ring hold many largest frames, so this is a refusal, never a panic).
    pub fn reserve(&mut self, len: usize) -> Option<(LogSpan, &mut [u8])> {
        if !self.fits(len) {
            return None;
        }
        let capacity = self.ring.len() as u64;
        let mut pos = self.head;
        let offset = pos % capacity;
        if offset + len as u64 > capacity {
            pos += capacity - offset;
        }
        self.head = pos + len as u64;
        // Warm the lines the next frames will be written to.
        let base = self.ring.as_ptr();
        let mut ahead = self.head.next_multiple_of(CACHE_LINE_BYTES);
        while ahead < self.head + WRITE_AHEAD_BYTES {
            prefetch(base.wrapping_add((ahead % capacity) as usize));
            ahead += CACHE_LINE_BYTES;
        }
        let start = (pos % capacity) as usize;
        Some((LogSpan { pos, len: len as u32 }, &mut self.ring[start..start + len]))
    }

    /// Whether a frame of `len` bytes can be written (it is no larger than the ring).
    pub fn fits(&self, len: usize) -> bool {
        len <= self.ring.len() && u32::try_from(len).is_ok()
    }

    /// Appends a copy of `frame`.
    pub fn append(&mut self, frame: &[u8]) -> Option<LogSpan> {
        let (span, dst) = self.reserve(frame.len())?;
        dst.copy_from_slice(frame);
        Some(span)
    }

    /// True while `span`'s bytes have not been overwritten.
    pub fn intact(&self, span: LogSpan) -> bool {
        // The first byte at `pos` is overwritten once the writer passes `pos + capacity`.
        self.head.saturating_sub(span.pos) <= self.ring.len() as u64
    }

    /// The frame at `span`, unless it has been overwritten.
    pub fn get(&self, span: LogSpan) -> Option<&[u8]> {
        if !self.intact(span) {
            return None;
        }
        let start = (span.pos % self.ring.len() as u64) as usize;
        self.ring.get(start..start + span.len as usize)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_read_back_until_overwritten() {
        let mut log = HistoryLog::new(100).unwrap();
        let a = log.append(&[1; 40]).unwrap();
        let b = log.append(&[2; 40]).unwrap();
        assert_eq!(log.get(a), Some(&[1; 40][..]));
        assert_eq!(log.get(b), Some(&[2; 40][..]));
        // 40 more do not fit before the end: written at the start, over `a`.
        let c = log.append(&[3; 40]).unwrap();
        assert_eq!((c.pos, log.written_bytes()), (100, 140));
        assert_eq!(log.get(a), None);
        assert_eq!(log.get(b), Some(&[2; 40][..]));
        assert_eq!(log.get(c), Some(&[3; 40][..]));
        let d = log.append(&[4; 30]).unwrap();
        assert_eq!(log.get(b), None, "b's first bytes were overwritten by d");
        assert_eq!(log.get(d), Some(&[4; 30][..]));
    }

    #[test]
    fn a_frame_larger_than_the_ring_is_refused() {
        let mut log = HistoryLog::new(64).unwrap();
        assert!(log.append(&[0; 65]).is_none());
        assert_eq!(log.written_bytes(), 0);
        let whole = log.append(&[9; 64]).unwrap();
        assert_eq!(log.get(whole).map(<[u8]>::len), Some(64));
    }

    /// Pages of `log`'s mapping the kernel has resident, by `mincore`.
    fn resident_pages(log: &HistoryLog) -> (usize, usize) {
        let page_bytes = usize::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) }).unwrap();
        let pages = log.ring.len().div_ceil(page_bytes);
        let mut map = vec![0_u8; pages];
        // SAFETY: the range is exactly our mapping; `map` has one byte per page.
        let rc = unsafe { libc::mincore(log.ring.as_ptr() as *mut libc::c_void, log.ring.len(), map.as_mut_ptr()) };
        assert_eq!(rc, 0, "mincore: {}", std::io::Error::last_os_error());
        (map.iter().filter(|&&b| b & 1 == 1).count(), pages)
    }

    #[test]
    fn prefault_makes_the_whole_ring_resident_and_keeps_it_usable() {
        let mut cold = HistoryLog::new(8 << 20).unwrap();
        let (resident, pages) = resident_pages(&cold);
        assert!(resident < pages, "a fresh ring is not resident yet ({resident} of {pages} pages)");
        cold.prefault().unwrap();
        assert_eq!(resident_pages(&cold), (pages, pages), "every page resident after prefault");
        let (span, dst) = cold.reserve(5).unwrap();
        dst.copy_from_slice(b"hello");
        assert_eq!(cold.get(span), Some(&b"hello"[..]));
    }
}
