//! The per-shard hierarchical timer wheel: every offer, queue-wait, agent-grace, SLA and idle
//! timeout of a shard lives here.
//!
//! It owns timers and nothing else: it reads no clock (`now_ms` is an argument, one tick is one
//! millisecond) and knows nothing of what a payload means. The shard calls [`TimerWheel::advance`]
//! on every loop turn and handles what fired.
//!
//! Layout (the shape of the Linux and tokio wheels): [`LEVELS`] levels of [`SLOTS`] slots; level
//! `k` slot `s` holds the timers whose deadline first differs from the wheel's time in the bits
//! of level `k` and has `s` there; a bitmap per level finds the next occupied slot in one
//! instruction. When time reaches a slot of a higher level, its timers cascade to lower levels
//! (each timer moves at most `LEVELS - 1` times).
//!
//! Memory layout, for the cache: payloads live in a slab allocated at start; a slot is a
//! contiguous vector of `(deadline, slab index, generation)`. Cascading copies these 16-byte
//! records from one vector to another without touching the slab, so the only cache miss per
//! timer is the one that reads its payload when it fires (an intrusive linked list costs two or
//! three per cascade: that version was no faster than a heap). Cancel frees the slab entry at
//! once and leaves the slot record behind, stale; stale records are skipped when reached, and
//! when they outnumber live timers (plus [`STALE_SLACK`]) every slot is compacted, so slot
//! memory stays below 2 × live + slack records. Slot vectors keep their capacity, so a shard in
//! steady state does not allocate.
//!
//! Guarantees, checked against a `BinaryHeap` model in the tests below:
//! - insert and cancel are O(1) (cancel amortised, counting compaction);
//! - a timer fires exactly once, in the first `advance(now_ms)` with `now_ms >= deadline`
//!   (never early, never later than that call); a cancelled timer never fires;
//! - timers fired by one `advance` come out by deadline, and in insertion order within a
//!   deadline;
//! - a deadline already past at insert fires at the next `advance`;
//! - deadlines [`HORIZON_MS`] or more ahead of the wheel's time (≈ 2.2 years) wait in an
//!   overflow list and are filed into the wheel when time comes within reach, so they are
//!   neither clamped nor fired early;
//! - a [`TimerId`] carries the slab entry's generation, so cancelling a timer that already fired
//!   or was cancelled is a no-op even after its entry is reused (generations are 32-bit: an id
//!   or stale record kept across 2^32 reuses of one entry could alias; nothing lives that long).

use std::fmt;

/// Bits of the deadline each level covers.
const SLOT_BITS: u32 = 6;
/// Slots per level.
pub const SLOTS: usize = 1 << SLOT_BITS;
/// Levels: 6 × 6 bits = 2^36 ticks of 1 ms reach.
pub const LEVELS: usize = 6;
/// How far ahead of the wheel's time a deadline may be and still be filed in the wheel, in
/// milliseconds (2^36 ms ≈ 795 days). Farther deadlines wait in the overflow list.
pub const HORIZON_MS: u64 = 1 << (SLOT_BITS as usize * LEVELS);
/// Stale slot records tolerated beyond the number of live timers before compaction.
pub const STALE_SLACK: usize = 4_096;

const WHEEL_LISTS: usize = LEVELS * SLOTS;
/// Timers whose deadline had already passed when inserted.
const DUE_LIST: usize = WHEEL_LISTS;
/// Timers beyond the horizon.
const OVERFLOW_LIST: usize = WHEEL_LISTS + 1;
const LISTS: usize = WHEEL_LISTS + 2;
const NIL: u32 = u32::MAX;

/// A timer's handle: its slab entry and that entry's generation when the timer was inserted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct TimerId {
    index: u32,
    generation: u32,
}

/// Why a timer could not be inserted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimerError {
    /// The wheel already holds `timers_max` timers.
    Full {
        /// The limit in force.
        timers_max: usize,
    },
}

impl fmt::Display for TimerError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TimerError::Full { timers_max } => write!(f, "timer wheel full ({timers_max} timers)"),
        }
    }
}

impl std::error::Error for TimerError {}

/// A timer that fired.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Fired<T> {
    /// The handle `insert` returned (now stale: cancelling it does nothing).
    pub id: TimerId,
    /// When it was due, in milliseconds; the caller may measure lateness against its `now`.
    pub deadline_ms: u64,
    /// What was inserted.
    pub payload: T,
    /// Insertion order, to keep equal deadlines in insertion order when lists are merged.
    seq: u64,
}

/// A slot's record of one timer (live, or stale once cancelled).
#[derive(Debug, Clone, Copy)]
struct Record {
    deadline_ms: u64,
    index: u32,
    generation: u32,
}

struct Entry<T> {
    seq: u64,
    generation: u32,
    /// Next free entry while free.
    next_free: u32,
    /// `Some` exactly while the timer is pending.
    payload: Option<T>,
}

/// A hierarchical timer wheel with a fixed capacity of `timers_max` timers.
pub struct TimerWheel<T> {
    entries: Vec<Entry<T>>,
    free_head: u32,
    lists: Vec<Vec<Record>>,
    /// Bit `s` of `occupied[k]` is set when level `k` slot `s` holds records.
    occupied: [u64; LEVELS],
    /// Every timer with a deadline at or before this has fired (or sits in the due list).
    elapsed_ms: u64,
    /// The earliest time at which some overflow timer comes within the horizon (a lower bound
    /// after cancels; `u64::MAX` when the overflow list is empty).
    overflow_refile_ms: u64,
    next_seq: u64,
    len: usize,
    /// Records of cancelled timers still in some list.
    stale: usize,
    /// [`STALE_SLACK`], lowered by tests to exercise compaction.
    stale_slack: usize,
    timers_max: usize,
}

impl<T> fmt::Debug for TimerWheel<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TimerWheel")
            .field("len", &self.len)
            .field("timers_max", &self.timers_max)
            .field("elapsed_ms", &self.elapsed_ms)
            .field("stale", &self.stale)
            .finish_non_exhaustive()
    }
}

impl<T> TimerWheel<T> {
    /// A wheel whose time starts at `now_ms`, holding at most `timers_max` timers. The slab is
    /// allocated here, once (the OS backs its pages on first use).
    pub fn new(timers_max: usize, now_ms: u64) -> TimerWheel<T> {
        // Slab indices are u32 and NIL is reserved.
        let timers_max = timers_max.min(NIL as usize);
        TimerWheel {
            entries: Vec::with_capacity(timers_max),
            free_head: NIL,
            lists: (0..LISTS).map(|_| Vec::new()).collect(),
            occupied: [0; LEVELS],
            elapsed_ms: now_ms,
            overflow_refile_ms: u64::MAX,
            next_seq: 0,
            len: 0,
            stale: 0,
            stale_slack: STALE_SLACK,
            timers_max,
        }
    }

    /// Timers pending.
    pub fn len(&self) -> usize {
        self.len
    }

    /// True when no timer is pending.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The capacity limit.
    pub fn timers_max(&self) -> usize {
        self.timers_max
    }

    /// The wheel's time: the `now_ms` of the last `advance` (or of `new`).
    pub fn elapsed_ms(&self) -> u64 {
        self.elapsed_ms
    }

    /// A time at or before the earliest pending deadline (the start of the earliest occupied
    /// slot), for deciding how long the shard may sleep; `None` when no slot holds anything.
    /// Waking at it may find nothing due yet (a cascade, or only stale records): that is fine.
    pub fn next_wake_ms(&self) -> Option<u64> {
        if !self.lists[DUE_LIST].is_empty() {
            return Some(self.elapsed_ms);
        }
        let wheel = self.next_slot().map(|(_, start)| start);
        let overflow = (!self.lists[OVERFLOW_LIST].is_empty()).then_some(self.overflow_refile_ms);
        match (wheel, overflow) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Adds a timer due at `deadline_ms`. O(1).
    pub fn insert(&mut self, deadline_ms: u64, payload: T) -> Result<TimerId, TimerError> {
        if self.len >= self.timers_max {
            return Err(TimerError::Full { timers_max: self.timers_max });
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        let index = if self.free_head == NIL {
            let index = self.entries.len() as u32;
            self.entries.push(Entry { seq, generation: 0, next_free: NIL, payload: Some(payload) });
            index
        } else {
            let index = self.free_head;
            let entry = &mut self.entries[index as usize];
            self.free_head = entry.next_free;
            entry.seq = seq;
            entry.payload = Some(payload);
            index
        };
        let generation = self.entries[index as usize].generation;
        self.file(Record { deadline_ms, index, generation });
        self.len += 1;
        Ok(TimerId { index, generation })
    }

    /// Removes a pending timer and returns its payload; `None` (and nothing changes) when the
    /// timer already fired or was cancelled. O(1) amortised.
    pub fn cancel(&mut self, id: TimerId) -> Option<T> {
        let entry = self.entries.get_mut(id.index as usize)?;
        if entry.generation != id.generation {
            return None;
        }
        let payload = entry.payload.take()?;
        self.release(id.index);
        self.stale += 1;
        if self.stale > self.len + self.stale_slack {
            self.compact();
        }
        Some(payload)
    }

    /// Moves the wheel's time to `now_ms` and appends every timer due at or before it to
    /// `fired`, by deadline then insertion order. Returns how many fired. A `now_ms` earlier than
    /// the wheel's time is taken as the wheel's time (time never runs backwards).
    pub fn advance(&mut self, now_ms: u64, fired: &mut Vec<Fired<T>>) -> usize {
        let now_ms = now_ms.max(self.elapsed_ms);
        let first = fired.len();
        // Only the due and overflow lists can interleave out of order with the wheel's slots;
        // the wheel itself emits in (deadline, seq) order.
        let mut needs_sort = false;
        if !self.lists[DUE_LIST].is_empty() {
            let mut batch = std::mem::take(&mut self.lists[DUE_LIST]);
            for record in batch.drain(..) {
                self.fire(record, fired);
            }
            self.lists[DUE_LIST] = batch;
            needs_sort = true;
        }
        loop {
            let wheel = self.next_slot();
            let refile = (!self.lists[OVERFLOW_LIST].is_empty()).then_some(self.overflow_refile_ms);
            match (wheel, refile) {
                (wheel, Some(refile_ms)) if refile_ms <= now_ms && wheel.is_none_or(|(_, start)| refile_ms <= start) => {
                    self.elapsed_ms = self.elapsed_ms.max(refile_ms);
                    self.overflow_refile_ms = u64::MAX;
                    // Records may go straight back to the overflow list: drain a copy.
                    let batch = std::mem::take(&mut self.lists[OVERFLOW_LIST]);
                    for record in batch {
                        if !self.is_live(record) {
                            self.stale -= 1;
                        } else if record.deadline_ms <= self.elapsed_ms {
                            self.fire(record, fired);
                            needs_sort = true;
                        } else {
                            self.file(record);
                        }
                    }
                }
                (Some((list, start_ms)), _) if start_ms <= now_ms => {
                    debug_assert!(start_ms > self.elapsed_ms, "an occupied slot lies in the past");
                    self.elapsed_ms = start_ms;
                    self.occupied[list / SLOTS] &= !(1 << (list % SLOTS));
                    // Records cascade to lower levels only, never back into this slot.
                    let mut batch = std::mem::take(&mut self.lists[list]);
                    for record in batch.drain(..) {
                        if record.deadline_ms <= start_ms {
                            self.fire(record, fired);
                        } else {
                            self.file(record);
                        }
                    }
                    self.lists[list] = batch;
                }
                _ => break,
            }
        }
        self.elapsed_ms = now_ms;
        if needs_sort {
            fired[first..].sort_by_key(|f| (f.deadline_ms, f.seq));
        }
        fired.len() - first
    }

    /// The earliest occupied wheel slot: (list, the time its slot starts). The first occupied
    /// level is the earliest: a level-k timer differs from the wheel's time above level k-1.
    fn next_slot(&self) -> Option<(usize, u64)> {
        for level in 0..LEVELS {
            let mask = self.occupied[level];
            if mask != 0 {
                let slot = u64::from(mask.trailing_zeros());
                let shift = SLOT_BITS as usize * level;
                let span_mask = (1u64 << (shift + SLOT_BITS as usize)) - 1;
                let start = (self.elapsed_ms & !span_mask) | (slot << shift);
                return Some((level * SLOTS + slot as usize, start));
            }
        }
        None
    }

    /// Puts a record on the list its deadline belongs to, relative to the wheel's time.
    fn file(&mut self, record: Record) {
        let elapsed_ms = self.elapsed_ms;
        let deadline_ms = record.deadline_ms;
        if deadline_ms <= elapsed_ms {
            self.lists[DUE_LIST].push(record);
            return;
        }
        // The highest bit where deadline and now differ picks the level (at least level 0).
        let masked = (elapsed_ms ^ deadline_ms) | (SLOTS as u64 - 1);
        let level = masked.ilog2() as usize / SLOT_BITS as usize;
        if level >= LEVELS {
            self.overflow_refile_ms = self.overflow_refile_ms.min(deadline_ms & !(HORIZON_MS - 1));
            self.lists[OVERFLOW_LIST].push(record);
            return;
        }
        let slot = ((deadline_ms >> (SLOT_BITS as usize * level)) as usize) & (SLOTS - 1);
        self.occupied[level] |= 1 << slot;
        self.lists[level * SLOTS + slot].push(record);
    }

    fn is_live(&self, record: Record) -> bool {
        let entry = &self.entries[record.index as usize];
        entry.generation == record.generation && entry.payload.is_some()
    }

    /// Hands a record's timer over, or drops the record if it is stale.
    fn fire(&mut self, record: Record, fired: &mut Vec<Fired<T>>) {
        let entry = &mut self.entries[record.index as usize];
        if entry.generation != record.generation {
            self.stale -= 1;
            return;
        }
        let Some(payload) = entry.payload.take() else {
            self.stale -= 1;
            return;
        };
        let seq = entry.seq;
        self.release(record.index);
        fired.push(Fired {
            id: TimerId { index: record.index, generation: record.generation },
            deadline_ms: record.deadline_ms,
            payload,
            seq,
        });
    }

    /// Frees an entry whose payload was taken; bumps its generation so old ids and records go
    /// stale.
    fn release(&mut self, index: u32) {
        let free_head = self.free_head;
        let entry = &mut self.entries[index as usize];
        entry.generation = entry.generation.wrapping_add(1);
        entry.next_free = free_head;
        self.free_head = index;
        self.len -= 1;
    }

    /// Drops every stale record (O(records)); runs when stale records outnumber live timers.
    fn compact(&mut self) {
        let entries = &self.entries;
        for (list, records) in self.lists.iter_mut().enumerate() {
            records.retain(|r| {
                let entry = &entries[r.index as usize];
                entry.generation == r.generation && entry.payload.is_some()
            });
            if list < WHEEL_LISTS && records.is_empty() {
                self.occupied[list / SLOTS] &= !(1 << (list % SLOTS));
            }
        }
        self.stale = 0;
    }

    #[cfg(test)]
    fn records(&self) -> usize {
        self.lists.iter().map(Vec::len).sum()
    }
}

#[cfg(test)]
mod tests {
    use std::cmp::Reverse;
    use std::collections::{BinaryHeap, HashSet};

    use proptest::prelude::*;

    use super::*;

    fn drain(wheel: &mut TimerWheel<u32>, now_ms: u64) -> Vec<(u64, u32)> {
        let mut fired = Vec::new();
        wheel.advance(now_ms, &mut fired);
        fired.into_iter().map(|f| (f.deadline_ms, f.payload)).collect()
    }

    #[test]
    fn fires_at_deadline_not_before() {
        let mut wheel = TimerWheel::new(16, 1_000);
        wheel.insert(1_005, 1).unwrap();
        assert!(drain(&mut wheel, 1_004).is_empty());
        assert_eq!(drain(&mut wheel, 1_005), vec![(1_005, 1)]);
        assert!(drain(&mut wheel, 10_000).is_empty());
        assert!(wheel.is_empty());
    }

    #[test]
    fn cascades_from_every_level_in_deadline_then_insertion_order() {
        let start = 123_456_789;
        let mut wheel = TimerWheel::new(64, start);
        // One deadline per level, inserted from the farthest, plus a twin of each (same deadline,
        // inserted later) to pin insertion order within a deadline.
        let mut expected = Vec::new();
        for level in (0..LEVELS).rev() {
            let deadline = start + (1u64 << (SLOT_BITS as usize * level)) + 3;
            wheel.insert(deadline, level as u32 * 2).unwrap();
            expected.push((deadline, level as u32 * 2));
        }
        for level in (0..LEVELS).rev() {
            let deadline = start + (1u64 << (SLOT_BITS as usize * level)) + 3;
            wheel.insert(deadline, level as u32 * 2 + 1).unwrap();
            expected.push((deadline, level as u32 * 2 + 1));
        }
        expected.sort_by_key(|&(deadline, payload)| (deadline, payload % 2));
        assert_eq!(drain(&mut wheel, start + HORIZON_MS), expected);
    }

    #[test]
    fn stepping_one_tick_at_a_time_fires_each_on_its_tick() {
        let mut wheel = TimerWheel::new(5_000, 0);
        for deadline in (1..5_000u64).rev() {
            wheel.insert(deadline, deadline as u32).unwrap();
        }
        for now in 1..5_000u64 {
            assert_eq!(drain(&mut wheel, now), vec![(now, now as u32)], "at {now}");
        }
    }

    #[test]
    fn past_deadline_fires_on_next_advance() {
        let mut wheel = TimerWheel::new(4, 500);
        wheel.insert(100, 1).unwrap();
        wheel.insert(500, 2).unwrap();
        assert_eq!(wheel.next_wake_ms(), Some(500));
        assert_eq!(drain(&mut wheel, 500), vec![(100, 1), (500, 2)]);
    }

    #[test]
    fn beyond_horizon_waits_in_overflow_and_is_never_early() {
        let mut wheel = TimerWheel::new(4, 7);
        let far = 7 + 3 * HORIZON_MS + 11;
        wheel.insert(far, 1).unwrap();
        wheel.insert(8, 2).unwrap();
        assert_eq!(drain(&mut wheel, 8), vec![(8, 2)]);
        assert!(drain(&mut wheel, far - 1).is_empty());
        assert_eq!(drain(&mut wheel, far), vec![(far, 1)]);
    }

    #[test]
    fn stale_cancel_is_a_no_op_after_reuse() {
        let mut wheel = TimerWheel::new(1, 0);
        let old = wheel.insert(10, 1).unwrap();
        assert_eq!(wheel.cancel(old), Some(1));
        assert_eq!(wheel.cancel(old), None);
        let new = wheel.insert(20, 2).unwrap();
        assert_ne!(old, new);
        assert_eq!(wheel.cancel(old), None, "a stale id must not cancel the slot's new timer");
        assert_eq!(drain(&mut wheel, 20), vec![(20, 2)]);
        assert_eq!(wheel.cancel(new), None, "fired timers cannot be cancelled");
    }

    #[test]
    fn cancelled_records_are_compacted() {
        let mut wheel = TimerWheel::new(100, 0);
        let keep = wheel.insert(1_000_000, 7).unwrap();
        for n in 0..10 * STALE_SLACK as u32 {
            let id = wheel.insert(500_000 + u64::from(n), n).unwrap();
            assert_eq!(wheel.cancel(id), Some(n));
        }
        assert!(wheel.records() <= 1 + wheel.len() + STALE_SLACK, "{} records", wheel.records());
        assert_eq!(drain(&mut wheel, 2_000_000), vec![(1_000_000, 7)]);
        assert_eq!(wheel.cancel(keep), None);
        assert_eq!(wheel.stale, 0);
    }

    #[test]
    fn full_wheel_refuses_with_the_limit() {
        let mut wheel = TimerWheel::new(2, 0);
        wheel.insert(1, 1).unwrap();
        wheel.insert(2, 2).unwrap();
        assert_eq!(wheel.insert(3, 3), Err(TimerError::Full { timers_max: 2 }));
        drain(&mut wheel, 1);
        wheel.insert(3, 3).unwrap();
    }

    #[test]
    fn time_never_runs_backwards() {
        let mut wheel = TimerWheel::new(2, 1_000);
        wheel.insert(1_001, 1).unwrap();
        assert!(drain(&mut wheel, 5).is_empty());
        assert_eq!(wheel.elapsed_ms(), 1_000);
        assert_eq!(drain(&mut wheel, 1_001), vec![(1_001, 1)]);
    }

    #[test]
    fn extreme_deadlines_do_not_overflow() {
        let mut wheel = TimerWheel::new(4, u64::MAX - 10);
        wheel.insert(u64::MAX, 1).unwrap();
        wheel.insert(u64::MAX - 5, 2).unwrap();
        assert_eq!(drain(&mut wheel, u64::MAX), vec![(u64::MAX - 5, 2), (u64::MAX, 1)]);
        let mut wheel = TimerWheel::new(4, 0);
        wheel.insert(u64::MAX, 1).unwrap();
        assert!(drain(&mut wheel, u64::MAX - 1).is_empty());
        assert_eq!(drain(&mut wheel, u64::MAX), vec![(u64::MAX, 1)]);
    }

    #[derive(Debug, Clone)]
    enum Op {
        /// Insert at now + delta (delta may be negative: a past deadline).
        Insert(i64),
        /// Cancel the n-th id ever issued (modulo), whether live, fired or cancelled.
        Cancel(usize),
        Advance(u64),
    }

    fn op() -> impl Strategy<Value = Op> {
        let delta = prop_oneof![
            4 => 0i64..64,
            4 => 0i64..5_000,
            3 => 0i64..(1 << 24),
            1 => 0i64..(1 << 40),
            1 => -1_000i64..0,
        ];
        let step = prop_oneof![4 => 0u64..70, 3 => 0u64..10_000, 1 => 0u64..(1 << 26), 1 => 0u64..(1 << 38)];
        prop_oneof![5 => delta.prop_map(Op::Insert), 2 => any::<usize>().prop_map(Op::Cancel), 3 => step.prop_map(Op::Advance)]
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

        /// The wheel against a BinaryHeap with lazy deletion: same timers fired, in the same
        /// order, at the same advance; each exactly once; never early; never past the first
        /// advance that reaches the deadline.
        #[test]
        fn matches_a_binary_heap(start in 0u64..(1 << 45), timers_max in 1usize..40, stale_slack in 0usize..4, ops in proptest::collection::vec(op(), 1..300)) {
            let mut wheel = TimerWheel::new(timers_max, start);
            wheel.stale_slack = stale_slack;
            let mut heap: BinaryHeap<Reverse<(u64, u64)>> = BinaryHeap::new();
            let mut model_live: HashSet<u64> = HashSet::new();
            let mut ids: Vec<(TimerId, u64)> = Vec::new();
            let mut fired_ever: HashSet<u64> = HashSet::new();
            // Which advance each timer was inserted after (0 = before the first).
            let mut inserted_after: std::collections::HashMap<u64, usize> = std::collections::HashMap::new();
            let mut advances = 0usize;
            let mut now = start;
            let mut seq = 0u64;
            for op in ops {
                match op {
                    Op::Insert(delta) => {
                        let deadline = now.saturating_add_signed(delta);
                        match wheel.insert(deadline, seq) {
                            Ok(id) => {
                                prop_assert!(model_live.len() < timers_max);
                                heap.push(Reverse((deadline, seq)));
                                model_live.insert(seq);
                                ids.push((id, seq));
                                inserted_after.insert(seq, advances);
                            }
                            Err(TimerError::Full { timers_max: max }) => {
                                prop_assert_eq!(max, timers_max);
                                prop_assert_eq!(model_live.len(), timers_max);
                            }
                        }
                        seq += 1;
                    }
                    Op::Cancel(n) => {
                        if ids.is_empty() { continue; }
                        let (id, tag) = ids[n % ids.len()];
                        let got = wheel.cancel(id);
                        prop_assert_eq!(got.is_some(), model_live.remove(&tag));
                        if let Some(payload) = got { prop_assert_eq!(payload, tag); }
                    }
                    Op::Advance(step) => {
                        let previous = now;
                        advances += 1;
                        now = now.saturating_add(step);
                        let mut fired = Vec::new();
                        wheel.advance(now, &mut fired);
                        let mut expected = Vec::new();
                        while let Some(&Reverse((deadline, tag))) = heap.peek() {
                            if deadline > now { break; }
                            heap.pop();
                            if model_live.remove(&tag) { expected.push((deadline, tag)); }
                        }
                        let got: Vec<(u64, u64)> = fired.iter().map(|f| (f.deadline_ms, f.payload)).collect();
                        prop_assert_eq!(&got, &expected);
                        for &(deadline, tag) in &got {
                            prop_assert!(deadline <= now, "early");
                            prop_assert!(fired_ever.insert(tag), "fired twice");
                            // Due before the previous advance: only allowed when inserted after it.
                            if deadline <= previous {
                                prop_assert_eq!(inserted_after[&tag], advances - 1, "late");
                            }
                        }
                    }
                }
                prop_assert_eq!(wheel.len(), model_live.len());
            }
        }
    }
}
