//! Per-shard buffer pool: fixed-size slots carved out of anonymous memory maps made at shard
//! start, handed out as owned, ref-counted leases.
//!
//! Owns: one `mmap` per size class, each class's free-slot stack and per-slot reference counts,
//! and the pool's counters. Touches nothing else: no sockets, no rings, no clock. It is
//! single-threaded on purpose (`Rc`/`Cell`, so `!Send`): a shard owns its pool and its leases
//! never leave the shard (cross-shard messages copy their bytes onto the ring).
//!
//! Why leases and not borrows: an `io_uring` send holds a buffer until its completion arrives,
//! which is after the code that queued it has moved on (monoio's "async rent" argument). So a
//! [`Lease`] owns its slot; the sender keeps a clone per queued send and the slot goes back
//! to its free list when the last clone drops. A message is encoded once into a
//! [`LeaseMut`], frozen into a [`Lease`], and that one slot is queued on every subscriber.
//!
//! Allocation rule: every mapping, free stack and ref-count array is sized at
//! [`BufferPool::new`]; `lease`, `clone` and `drop` never allocate.
//!
//! Choice of class on lease: the smallest class whose `slot_bytes >= len` and that has a free
//! slot. If that class is empty the lease falls back to the next bigger class (counted as
//! `fallback_total` on the class that was empty): a burst of small messages may borrow
//! bigger slots rather than fail, at the price of memory. Only when every fitting class is
//! empty does the lease fail with [`LeaseError::Exhausted`], counted as `exhausted_total`
//! on the smallest fitting class. A caller that must still send can fall back to a heap
//! buffer (`uring::OutBuf::Heap`).

use std::cell::{Cell, RefCell};
use std::fmt;
use std::io;
use std::ops::{Bound, Deref, RangeBounds};
use std::ptr::NonNull;
use std::rc::Rc;

use memmap2::MmapMut;

/// One size class: `slots` slots of `slot_bytes` bytes each, in one mapping.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SizeClass {
    /// Bytes per slot; a lease of up to this many bytes fits.
    pub slot_bytes: usize,
    /// Number of slots, all mapped at start.
    pub slots: usize,
}

/// Pool configuration. Classes must be listed with strictly increasing `slot_bytes`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolConfig {
    /// The size classes, smallest first.
    pub classes: Vec<SizeClass>,
    /// Try to `mlock` every mapping so it is never swapped out. A failure (typically
    /// `RLIMIT_MEMLOCK`, 8 MiB by default) is logged once and the pool works unlocked.
    pub mlock: bool,
    /// Write one byte per page at start so that no lease page-faults on first use.
    pub prefault: bool,
}

/// Largest frame the protocol allows: 16-byte header plus a 1 MiB body.
pub const FRAME_BYTES_MAX: usize = switchboard_protocol::HEADER_BYTES
    + switchboard_protocol::limits::FRAME_BODY_BYTES_MAX as usize;

impl Default for PoolConfig {
    /// About 80 MiB per shard, chosen from the protocol's frame sizes:
    ///
    /// | `slot_bytes` | slots | bytes | what fits                                            |
    /// |-----------:|-------:|-------:|--------------------------------------------------------|
    /// | 256 B      | 32768  | 8 MiB  | acks, receipts, typing, short chat lines: most frames  |
    /// | 2 KiB      | 16384  | 32 MiB | a chat message at `MESSAGE_BYTES_MAX` (1 KiB) with ids |
    /// | 16 KiB     | 1024   | 16 MiB | small recovery batches, routing snapshots              |
    /// | 128 KiB    | 128    | 16 MiB | large recovery replays                                 |
    /// | 1 MiB+16 B | 8      | 8 MiB  | the protocol's largest frame (`FRAME_BYTES_MAX`); rare |
    ///
    /// Slot counts bound the number of distinct messages not yet written to every
    /// subscriber. At 1 M messages/s and ~1 ms to reach every socket that is ~1000 slots; the
    /// rest is head-room for slow consumers, which the sender caps per connection
    /// (`conn_outbound_frames_max`) long before they can pin a whole class.
    fn default() -> Self {
        PoolConfig {
            classes: vec![
                SizeClass { slot_bytes: 256, slots: 32768 },
                SizeClass { slot_bytes: 2 << 10, slots: 16384 },
                SizeClass { slot_bytes: 16 << 10, slots: 1024 },
                SizeClass { slot_bytes: 128 << 10, slots: 128 },
                SizeClass { slot_bytes: FRAME_BYTES_MAX, slots: 8 },
            ],
            mlock: true,
            prefault: true,
        }
    }
}

/// Why a pool could not be built.
#[derive(Debug, thiserror::Error)]
pub enum PoolError {
    /// The configuration breaks a rule stated on [`PoolConfig`].
    #[error("invalid pool config: {0}")]
    InvalidConfig(String),
    /// `mmap` of one class failed.
    #[error("mmap of {bytes} B for the {slot_bytes} B class failed: {source}")]
    Map {
        /// The class being mapped.
        slot_bytes: usize,
        /// Size of the mapping asked for.
        bytes: usize,
        /// The OS error.
        #[source]
        source: io::Error,
    },
}

/// Why a lease was refused. Both are counted in [`PoolStats`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum LeaseError {
    /// Every class that could hold `len_bytes` is fully leased.
    #[error("buffer pool exhausted: no free slot of {slot_bytes} B or larger for {len_bytes} B")]
    Exhausted {
        /// Bytes asked for.
        len_bytes: usize,
        /// The smallest class that would have fitted.
        slot_bytes: usize,
    },
    /// No class is big enough, however empty the pool is.
    #[error("{len_bytes} B is larger than the largest pool slot ({slot_bytes_max} B)")]
    TooLarge {
        /// Bytes asked for.
        len_bytes: usize,
        /// The largest class.
        slot_bytes_max: usize,
    },
}

/// Counters of one class.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ClassStats {
    /// Bytes per slot.
    pub slot_bytes: usize,
    /// Slots in the class.
    pub slots: usize,
    /// Slots leased now.
    pub in_use: usize,
    /// Highest `in_use` seen.
    pub in_use_max: usize,
    /// Leases served from this class since start.
    pub leases_total: u64,
    /// Leases that wanted this class, found it empty and were served by a bigger one.
    pub fallback_total: u64,
    /// Leases for which this was the smallest fitting class and every fitting class was empty.
    pub exhausted_total: u64,
}

/// A snapshot of the pool's counters.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct PoolStats {
    /// One entry per class, smallest first.
    pub classes: Vec<ClassStats>,
    /// Leases refused because no class was big enough.
    pub too_large_total: u64,
    /// Bytes mapped at start.
    pub mapped_bytes: usize,
    /// Bytes successfully `mlock`ed at start.
    pub locked_bytes: usize,
}

struct Class {
    /// Start of the mapping; stable for the pool's life because `map` is never remapped.
    base: NonNull<u8>,
    slot_bytes: usize,
    slots: u32,
    /// LIFO stack of free slot indices, capacity `slots`: the most recently freed (and
    /// cache-warm) slot is reused first.
    free: RefCell<Vec<u32>>,
    /// Reference count per slot: 0 = free, 1 = leased mutably or once, n = n `Lease` clones.
    refs: Box<[Cell<u32>]>,
    in_use_max: Cell<usize>,
    leases_total: Cell<u64>,
    fallback_total: Cell<u64>,
    exhausted_total: Cell<u64>,
    /// Owns the memory; declared last so `base` is never used after it is unmapped.
    _map: MmapMut,
}

impl Class {
    fn slot_ptr(&self, slot: u32) -> NonNull<u8> {
        debug_assert!(slot < self.slots);
        // SAFETY: slot < slots, so the offset stays inside the mapping.
        unsafe { self.base.add(slot as usize * self.slot_bytes) }
    }

    fn in_use(&self) -> usize {
        self.slots as usize - self.free.borrow().len()
    }
}

struct PoolInner {
    classes: Vec<Class>,
    too_large_total: Cell<u64>,
    mapped_bytes: usize,
    locked_bytes: usize,
}

impl PoolInner {
    fn retain(&self, class: u16, slot: u32) {
        let cell = &self.classes[class as usize].refs[slot as usize];
        let n = cell.get();
        assert!(n > 0, "retain of a free slot");
        cell.set(n.checked_add(1).expect("lease reference count overflow"));
    }

    fn release(&self, class: u16, slot: u32) {
        let class = &self.classes[class as usize];
        let cell = &class.refs[slot as usize];
        let n = cell.get();
        assert!(n > 0, "release of a free slot");
        cell.set(n - 1);
        if n == 1 {
            let mut free = class.free.borrow_mut();
            debug_assert!(free.len() < free.capacity(), "free stack would grow");
            free.push(slot);
        }
    }
}

/// A per-shard pool of mmap'd buffers. Cheap to clone (one `Rc`); `!Send`.
#[derive(Clone)]
pub struct BufferPool {
    inner: Rc<PoolInner>,
}

impl fmt::Debug for BufferPool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BufferPool")
            .field("mapped_bytes", &self.inner.mapped_bytes)
            .field("locked_bytes", &self.inner.locked_bytes)
            .finish_non_exhaustive()
    }
}

fn check_config(cfg: &PoolConfig) -> Result<(), PoolError> {
    let bad = |s: String| Err(PoolError::InvalidConfig(s));
    if cfg.classes.is_empty() {
        return bad("no size classes".into());
    }
    if cfg.classes.len() > usize::from(u16::MAX) {
        return bad(format!("{} classes; at most {}", cfg.classes.len(), u16::MAX));
    }
    let mut prev = 0;
    for c in &cfg.classes {
        if c.slot_bytes == 0 || c.slots == 0 {
            return bad(format!("class {c:?}: slot_bytes and slots must be positive"));
        }
        if c.slot_bytes <= prev {
            return bad(format!("class {c:?}: slot_bytes must increase strictly"));
        }
        if u32::try_from(c.slots).is_err() || c.slot_bytes > u32::MAX as usize {
            return bad(format!("class {c:?}: slots and slot_bytes must fit in u32"));
        }
        if c.slot_bytes.checked_mul(c.slots).is_none_or(|b| b > isize::MAX as usize) {
            return bad(format!("class {c:?}: mapping size overflows"));
        }
        prev = c.slot_bytes;
    }
    Ok(())
}

impl BufferPool {
    /// Each class's mapping as (start, bytes), in class order: what an `io_uring` registers as
    /// fixed buffers (buffer index = [`Lease::class`]). Valid while the pool lives.
    pub fn regions(&self) -> Vec<(*const u8, usize)> {
        self.inner.classes.iter().map(|c| (c.base.as_ptr().cast_const(), c.slot_bytes * c.slots as usize)).collect()
    }

    /// Maps, optionally locks and prefaults every class. This is the only place the pool
    /// allocates.
    pub fn new(cfg: &PoolConfig) -> Result<BufferPool, PoolError> {
        check_config(cfg)?;
        // SAFETY: sysconf has no preconditions.
        let page_bytes = usize::try_from(unsafe { libc::sysconf(libc::_SC_PAGESIZE) })
            .ok()
            .filter(|&p| p > 0)
            .unwrap_or(4096);
        let mut classes = Vec::with_capacity(cfg.classes.len());
        let mut mapped_bytes = 0;
        let mut locked_bytes = 0;
        let mut lock_error: Option<io::Error> = None;
        for c in &cfg.classes {
            let bytes = c.slot_bytes * c.slots;
            let mut map = MmapMut::map_anon(bytes).map_err(|source| PoolError::Map {
                slot_bytes: c.slot_bytes,
                bytes,
                source,
            })?;
            mapped_bytes += bytes;
            // Huge pages where the kernel gives them (before anything is faulted in): a send
            // gathers hundreds of slots spread over the class, and the kernel's copy of each
            // one otherwise walks the page tables (measured: the copy of a 200-byte slot cost
            // ~100 ns, most of the engine's time at `--max`). Best effort.
            #[cfg(target_os = "linux")]
            let _ = map.advise(memmap2::Advice::HugePage);
            if cfg.mlock && lock_error.is_none() {
                // SAFETY: the range is exactly the mapping we own.
                if unsafe { libc::mlock(map.as_ptr().cast(), bytes) } == 0 {
                    locked_bytes += bytes;
                } else {
                    // Stop trying after the first failure: later classes would fail the same
                    // way and would only burn the remaining limit that glommio may need.
                    lock_error = Some(io::Error::last_os_error());
                }
            }
            if cfg.prefault {
                // Pay the page faults now (about a quarter of a microsecond each) rather than
                // inside the fan-out path the first time a slot is written. mlock already
                // faulted locked pages in; touching them again is harmless.
                let ptr = map.as_mut_ptr();
                for off in (0..bytes).step_by(page_bytes) {
                    // SAFETY: off < bytes, inside the mapping; volatile so it is not elided.
                    unsafe { ptr.add(off).write_volatile(0) };
                }
            }
            let slots = u32::try_from(c.slots).expect("checked by check_config");
            // Reverse so that slot 0 is leased first (pops from the end).
            let free: Vec<u32> = (0..slots).rev().collect();
            let refs = (0..c.slots).map(|_| Cell::new(0)).collect();
            classes.push(Class {
                base: NonNull::new(map.as_mut_ptr()).expect("mmap never returns null"),
                slot_bytes: c.slot_bytes,
                slots,
                free: RefCell::new(free),
                refs,
                in_use_max: Cell::new(0),
                leases_total: Cell::new(0),
                fallback_total: Cell::new(0),
                exhausted_total: Cell::new(0),
                _map: map,
            });
        }
        if let Some(e) = lock_error {
            tracing::warn!(
                locked_bytes,
                mapped_bytes,
                memlock_limit_bytes = memlock_limit_bytes(),
                error = %e,
                "buffer pool: mlock failed (RLIMIT_MEMLOCK too low?); the pool runs unlocked \
                 and may be swapped out; raise LimitMEMLOCK to lock it"
            );
        }
        Ok(BufferPool {
            inner: Rc::new(PoolInner {
                classes,
                too_large_total: Cell::new(0),
                mapped_bytes,
                locked_bytes,
            }),
        })
    }

    /// Leases one slot able to hold `len_bytes`; see the module doc for the fallback rule.
    pub fn lease(&self, len_bytes: usize) -> Result<LeaseMut, LeaseError> {
        let classes = &self.inner.classes;
        let Some(first) = classes.iter().position(|c| c.slot_bytes >= len_bytes) else {
            self.inner.too_large_total.set(self.inner.too_large_total.get() + 1);
            return Err(LeaseError::TooLarge {
                len_bytes,
                slot_bytes_max: classes.last().map_or(0, |c| c.slot_bytes),
            });
        };
        for (index, class) in classes.iter().enumerate().skip(first) {
            let Some(slot) = class.free.borrow_mut().pop() else { continue };
            let refs = &class.refs[slot as usize];
            assert_eq!(refs.get(), 0, "slot on the free stack is referenced");
            refs.set(1);
            class.leases_total.set(class.leases_total.get() + 1);
            class.in_use_max.set(class.in_use_max.get().max(class.in_use()));
            if index != first {
                let wanted = &classes[first];
                wanted.fallback_total.set(wanted.fallback_total.get() + 1);
            }
            return Ok(LeaseMut {
                pool: self.inner.clone(),
                ptr: class.slot_ptr(slot),
                capacity: class.slot_bytes,
                class: u16::try_from(index).expect("checked by check_config"),
                slot,
            });
        }
        let wanted = &classes[first];
        wanted.exhausted_total.set(wanted.exhausted_total.get() + 1);
        Err(LeaseError::Exhausted { len_bytes, slot_bytes: wanted.slot_bytes })
    }

    /// Leases a slot, copies `data` into it and freezes it: the common "encode elsewhere,
    /// share here" path.
    pub fn lease_copy(&self, data: &[u8]) -> Result<Lease, LeaseError> {
        let mut lease = self.lease(data.len())?;
        lease.as_mut_slice()[..data.len()].copy_from_slice(data);
        Ok(lease.freeze(data.len()))
    }

    /// The largest lease this pool can ever grant.
    pub fn slot_bytes_max(&self) -> usize {
        self.inner.classes.last().map_or(0, |c| c.slot_bytes)
    }

    /// A snapshot of the counters (allocates the returned `Vec`; not for the hot path).
    pub fn stats(&self) -> PoolStats {
        PoolStats {
            classes: self
                .inner
                .classes
                .iter()
                .map(|c| ClassStats {
                    slot_bytes: c.slot_bytes,
                    slots: c.slots as usize,
                    in_use: c.in_use(),
                    in_use_max: c.in_use_max.get(),
                    leases_total: c.leases_total.get(),
                    fallback_total: c.fallback_total.get(),
                    exhausted_total: c.exhausted_total.get(),
                })
                .collect(),
            too_large_total: self.inner.too_large_total.get(),
            mapped_bytes: self.inner.mapped_bytes,
            locked_bytes: self.inner.locked_bytes,
        }
    }
}

pub(crate) fn memlock_limit_bytes() -> u64 {
    let mut lim = libc::rlimit { rlim_cur: 0, rlim_max: 0 };
    // SAFETY: lim is a valid out-pointer.
    if unsafe { libc::getrlimit(libc::RLIMIT_MEMLOCK, &raw mut lim) } == 0 {
        lim.rlim_cur
    } else {
        0
    }
}

/// An exclusive, writable slot. Fill it, then [`freeze`](LeaseMut::freeze) it to share it.
/// Dropping it unfrozen returns the slot.
pub struct LeaseMut {
    pool: Rc<PoolInner>,
    ptr: NonNull<u8>,
    capacity: usize,
    class: u16,
    slot: u32,
}

impl LeaseMut {
    /// The whole slot (its previous contents are unspecified).
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: the slot is inside a live mapping (self.pool keeps it) and this LeaseMut is
        // its only holder (refcount 1, no Lease exists until freeze consumes self).
        unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr(), self.capacity) }
    }

    /// Bytes in the slot (the class's `slot_bytes`), at least what was asked for.
    pub fn capacity(&self) -> usize {
        self.capacity
    }

    /// Makes the first `len` bytes an immutable, shareable [`Lease`].
    ///
    /// # Panics
    /// If `len > capacity()`: that is a bug in the caller (it wrote past what it leased), not
    /// a runtime condition.
    pub fn freeze(self, len: usize) -> Lease {
        assert!(len <= self.capacity, "freeze({len}) beyond a {} B slot", self.capacity);
        let this = std::mem::ManuallyDrop::new(self);
        // SAFETY: `this` is never dropped, so the Rc is moved out exactly once and the slot's
        // single reference passes to the Lease.
        let pool = unsafe { std::ptr::read(&raw const this.pool) };
        Lease { pool, ptr: this.ptr, len, class: this.class, slot: this.slot }
    }
}

impl Drop for LeaseMut {
    fn drop(&mut self) {
        self.pool.release(self.class, self.slot);
    }
}

impl fmt::Debug for LeaseMut {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("LeaseMut")
            .field("class", &self.class)
            .field("slot", &self.slot)
            .field("capacity", &self.capacity)
            .finish_non_exhaustive()
    }
}

/// An immutable, ref-counted (non-atomic) view of bytes in a pool slot. Its address is stable
/// until the last clone drops, which is what lets an in-flight `io_uring` send hold one.
pub struct Lease {
    pool: Rc<PoolInner>,
    ptr: NonNull<u8>,
    len: usize,
    class: u16,
    slot: u32,
}

impl Lease {
    /// A lease of a sub-range of these bytes, sharing (and keeping alive) the same slot.
    ///
    /// # Panics
    /// If the range is out of bounds, like slice indexing.
    #[must_use]
    pub fn slice(&self, range: impl RangeBounds<usize>) -> Lease {
        let start = match range.start_bound() {
            Bound::Included(&s) => s,
            Bound::Excluded(&s) => s + 1,
            Bound::Unbounded => 0,
        };
        let end = match range.end_bound() {
            Bound::Included(&e) => e + 1,
            Bound::Excluded(&e) => e,
            Bound::Unbounded => self.len,
        };
        assert!(start <= end && end <= self.len, "slice {start}..{end} of a {} B lease", self.len);
        self.pool.retain(self.class, self.slot);
        Lease {
            pool: self.pool.clone(),
            // SAFETY: start <= len, inside the slot.
            ptr: unsafe { self.ptr.add(start) },
            len: end - start,
            class: self.class,
            slot: self.slot,
        }
    }

    /// The size class (index into the pool's classes, and into [`BufferPool::regions`]).
    pub fn class(&self) -> u16 {
        self.class
    }

    /// How many `Lease`s (clones and slices) share this slot now.
    pub fn ref_count(&self) -> u32 {
        self.pool.classes[self.class as usize].refs[self.slot as usize].get()
    }
}

impl Deref for Lease {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        // SAFETY: the slot is in a live mapping (self.pool) and no LeaseMut exists for it, so
        // nothing writes these bytes while any Lease lives.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl AsRef<[u8]> for Lease {
    fn as_ref(&self) -> &[u8] {
        self
    }
}

impl Clone for Lease {
    fn clone(&self) -> Lease {
        self.pool.retain(self.class, self.slot);
        Lease {
            pool: self.pool.clone(),
            ptr: self.ptr,
            len: self.len,
            class: self.class,
            slot: self.slot,
        }
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        self.pool.release(self.class, self.slot);
    }
}

impl fmt::Debug for Lease {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Lease")
            .field("class", &self.class)
            .field("slot", &self.slot)
            .field("len", &self.len)
            .finish_non_exhaustive()
    }
}

#[cfg(test)]
#[allow(clippy::many_single_char_names)]
mod tests {
    use super::*;

    fn small() -> PoolConfig {
        PoolConfig {
            classes: vec![
                SizeClass { slot_bytes: 64, slots: 4 },
                SizeClass { slot_bytes: 256, slots: 2 },
                SizeClass { slot_bytes: 4096, slots: 1 },
            ],
            mlock: false,
            prefault: true,
        }
    }

    #[test]
    fn lease_freeze_clone_drop_returns_slot() {
        let pool = BufferPool::new(&small()).unwrap();
        let mut m = pool.lease(10).unwrap();
        assert_eq!(m.capacity(), 64);
        m.as_mut_slice()[..5].copy_from_slice(b"hello");
        let a = m.freeze(5);
        assert_eq!(&*a, b"hello");
        let b = a.clone();
        let c = b.slice(1..4);
        assert_eq!(&*c, b"ell");
        assert_eq!(a.ref_count(), 3);
        assert_eq!(a.as_ptr(), b.as_ptr(), "clones share one address");
        assert_eq!(pool.stats().classes[0].in_use, 1);
        drop(a);
        drop(b);
        assert_eq!(pool.stats().classes[0].in_use, 1, "slice still holds the slot");
        drop(c);
        assert_eq!(pool.stats().classes[0].in_use, 0);
        // Unfrozen LeaseMut also returns its slot.
        let m = pool.lease(64).unwrap();
        assert_eq!(pool.stats().classes[0].in_use, 1);
        drop(m);
        assert_eq!(pool.stats().classes[0].in_use, 0);
    }

    #[test]
    fn exhaustion_is_reported_counted_and_recovers() {
        let pool = BufferPool::new(&small()).unwrap();
        // 4 + 2 + 1 slots can hold a 200 B lease only in the two bigger classes.
        let a = pool.lease(200).unwrap();
        let b = pool.lease(200).unwrap();
        let c = pool.lease(200).unwrap();
        assert_eq!((a.capacity(), b.capacity(), c.capacity()), (256, 256, 4096));
        let err = pool.lease(200).unwrap_err();
        assert_eq!(err, LeaseError::Exhausted { len_bytes: 200, slot_bytes: 256 });
        assert_eq!(
            pool.lease(201).unwrap_err(),
            LeaseError::Exhausted { len_bytes: 201, slot_bytes: 256 }
        );
        let s = pool.stats();
        assert_eq!(s.classes[1].exhausted_total, 2);
        assert_eq!(s.classes[0].exhausted_total, 0);
        drop(b);
        let d = pool.lease(200).unwrap();
        assert_eq!(d.capacity(), 256);
        assert_eq!(
            pool.lease(5000).unwrap_err(),
            LeaseError::TooLarge { len_bytes: 5000, slot_bytes_max: 4096 }
        );
        assert_eq!(pool.stats().too_large_total, 1);
        drop((a, c, d));
    }

    #[test]
    fn falls_back_to_bigger_class() {
        let pool = BufferPool::new(&small()).unwrap();
        let held: Vec<_> = (0..4).map(|_| pool.lease(1).unwrap()).collect();
        assert!(held.iter().all(|l| l.capacity() == 64));
        let f = pool.lease(1).unwrap();
        assert_eq!(f.capacity(), 256);
        let s = pool.stats();
        assert_eq!(s.classes[0].fallback_total, 1);
        assert_eq!(s.classes[1].leases_total, 1);
        assert_eq!(s.classes[0].exhausted_total, 0);
        drop(held);
        assert_eq!(pool.lease(1).unwrap().capacity(), 64, "back to the smallest class");
        drop(f);
    }

    #[test]
    fn data_round_trips_and_slots_do_not_overlap() {
        let pool = BufferPool::new(&small()).unwrap();
        let mut leases = Vec::new();
        for i in 0..4u8 {
            let mut m = pool.lease(64).unwrap();
            m.as_mut_slice().fill(i);
            leases.push(m.freeze(64));
        }
        for (i, l) in leases.iter().enumerate() {
            assert!(l.iter().all(|&b| usize::from(b) == i), "slot {i} was overwritten");
        }
        let big: Vec<u8> = (0..4096u32).map(|i| (i * 7) as u8).collect();
        let l = pool.lease_copy(&big).unwrap();
        assert_eq!(&*l, &big[..]);
    }

    #[test]
    fn stats_add_up() {
        let pool = BufferPool::new(&small()).unwrap();
        let mut held = Vec::new();
        for len in [1, 64, 65, 256, 300, 1, 1, 1] {
            if let Ok(l) = pool.lease(len) {
                held.push(l);
            }
        }
        let s = pool.stats();
        let in_use: usize = s.classes.iter().map(|c| c.in_use).sum();
        let leases: u64 = s.classes.iter().map(|c| c.leases_total).sum();
        assert_eq!(in_use, held.len());
        assert_eq!(leases, held.len() as u64);
        assert_eq!(s.mapped_bytes, 64 * 4 + 256 * 2 + 4096);
        assert_eq!(s.locked_bytes, 0);
        for c in &s.classes {
            assert!(c.in_use <= c.slots && c.in_use <= c.in_use_max);
        }
        // 1, 64, 1, 1 fill the 64 B class; 65 and 256 the 256 B class; 300 the 4 KiB class;
        // the last 1 B request finds every class full.
        assert_eq!(held.len(), 7);
        assert_eq!(s.classes.iter().map(|c| c.in_use).collect::<Vec<_>>(), [4, 2, 1]);
        assert_eq!(s.classes[0].exhausted_total, 1);
        held.clear();
        assert!(pool.stats().classes.iter().all(|c| c.in_use == 0));
    }

    #[test]
    fn bad_configs_are_refused() {
        let mut cfg = small();
        cfg.classes.swap(0, 1);
        assert!(matches!(BufferPool::new(&cfg), Err(PoolError::InvalidConfig(_))));
        let empty = PoolConfig { classes: vec![], mlock: false, prefault: false };
        assert!(matches!(BufferPool::new(&empty), Err(PoolError::InvalidConfig(_))));
    }

    #[test]
    fn default_holds_the_largest_frame() {
        let cfg = PoolConfig::default();
        assert!(cfg.classes.last().unwrap().slot_bytes >= FRAME_BYTES_MAX);
        check_config(&cfg).unwrap();
    }

    #[test]
    #[should_panic(expected = "beyond")]
    fn freeze_past_capacity_panics() {
        let pool = BufferPool::new(&small()).unwrap();
        let m = pool.lease(1).unwrap();
        let _ = m.freeze(65);
    }
}
