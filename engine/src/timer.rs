//! The per-shard hierarchical timer wheel: every offer, queue-wait, agent-grace, SLA and idle
//! timeout of a shard lives here.
//!
//! It owns timers and nothing else: it reads no clock (`now_ms` is an argument, one tick is one
//! millisecond) and knows nothing of what a payload means. The shard calls [`TimerWheel::advance`]
//! on every loop turn and handles what fired.
//!
//! Layout (the shape of the Linux and tokio wheels): [`LEVELS`] levels of [`SLOTS`] slots; level
//! `k` slot `s` holds the timers whose deadline first differs from the wheel's time in the bits
//! of level `k` and has `s` there. Each slot is an intrusive doubly linked list threaded through
//! one slab, so insert and cancel are O(1) with no allocation after start; a bitmap per level
//! finds the next occupied slot in one instruction. When time reaches a slot of a higher level,
//! its timers cascade to lower levels (each timer moves at most `LEVELS - 1` times).
//!
//! Guarantees, checked against a `BinaryHeap` model in the tests below:
//! - a timer fires exactly once, in the first `advance(now_ms)` with `now_ms >= deadline`
//!   (never early, never later than that call); a cancelled timer never fires;
//! - timers fired by one `advance` come out by deadline, and in insertion order within a
//!   deadline;
//! - a deadline already past at insert fires at the next `advance`;
//! - deadlines [`HORIZON_MS`] or more ahead of the wheel's time (≈ 2.2 years) wait in an
//!   overflow list and are filed into the wheel when time comes within reach, so they are
//!   neither clamped nor fired early;
//! - a [`TimerId`] carries the slab slot's generation, so cancelling a timer that already fired
//!   or was cancelled is a no-op even after its slot is reused (generations are 32-bit: an id
//!   kept across 2^32 reuses of one slot could alias; nothing holds ids that long).

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

const WHEEL_LISTS: usize = LEVELS * SLOTS;
/// Timers whose deadline had already passed when inserted.
const DUE_LIST: usize = WHEEL_LISTS;
/// Timers beyond the horizon.
const OVERFLOW_LIST: usize = WHEEL_LISTS + 1;
const LISTS: usize = WHEEL_LISTS + 2;
/// Marks a free slab entry.
const FREE_LIST: u16 = u16::MAX;
const NIL: u32 = u32::MAX;

/// A timer's handle: its slab slot and that slot's generation when the timer was inserted.
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

struct Entry<T> {
    deadline_ms: u64,
    seq: u64,
    prev: u32,
    next: u32,
    /// The list the entry is on, or [`FREE_LIST`].
    list: u16,
    generation: u32,
    payload: Option<T>,
}

/// A hierarchical timer wheel with a fixed capacity of `timers_max` timers.
pub struct TimerWheel<T> {
    entries: Vec<Entry<T>>,
    free_head: u32,
    heads: [u32; LISTS],
    tails: [u32; LISTS],
    /// Bit `s` of `occupied[k]` is set when level `k` slot `s` is not empty.
    occupied: [u64; LEVELS],
    /// Every timer with a deadline at or before this has fired (or sits in the due list).
    elapsed_ms: u64,
    /// The earliest time at which some overflow timer comes within the horizon (a lower bound
    /// after cancels; `u64::MAX` when the overflow list is empty).
    overflow_refile_ms: u64,
    next_seq: u64,
    len: usize,
    timers_max: usize,
}

impl<T> fmt::Debug for TimerWheel<T> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TimerWheel")
            .field("len", &self.len)
            .field("timers_max", &self.timers_max)
            .field("elapsed_ms", &self.elapsed_ms)
            .finish_non_exhaustive()
    }
}

impl<T> TimerWheel<T> {
    /// A wheel whose time starts at `now_ms`, holding at most `timers_max` timers. The slab is
    /// allocated here, once, so inserting never allocates (the OS backs the pages on first use).
    pub fn new(timers_max: usize, now_ms: u64) -> TimerWheel<T> {
        // Slab indices are u32 and NIL is reserved.
        let timers_max = timers_max.min(NIL as usize);
        TimerWheel {
            entries: Vec::with_capacity(timers_max),
            free_head: NIL,
            heads: [NIL; LISTS],
            tails: [NIL; LISTS],
            occupied: [0; LEVELS],
            elapsed_ms: now_ms,
            overflow_refile_ms: u64::MAX,
            next_seq: 0,
            len: 0,
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
    /// slot), for deciding how long the shard may sleep; `None` when nothing is pending. Waking
    /// at it may find nothing due yet: that is a cascade, not a bug.
    pub fn next_wake_ms(&self) -> Option<u64> {
        if self.heads[DUE_LIST] != NIL {
            return Some(self.elapsed_ms);
        }
        let wheel = self.next_slot().map(|(_, start)| start);
        let overflow = (self.heads[OVERFLOW_LIST] != NIL).then_some(self.overflow_refile_ms);
        match (wheel, overflow) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// Adds a timer due at `deadline_ms`. O(1); never allocates.
    pub fn insert(&mut self, deadline_ms: u64, payload: T) -> Result<TimerId, TimerError> {
        if self.len >= self.timers_max {
            return Err(TimerError::Full { timers_max: self.timers_max });
        }
        let seq = self.next_seq;
        self.next_seq += 1;
        let index = if self.free_head == NIL {
            let index = self.entries.len() as u32;
            self.entries.push(Entry { deadline_ms, seq, prev: NIL, next: NIL, list: FREE_LIST, generation: 0, payload: Some(payload) });
            index
        } else {
            let index = self.free_head;
            let entry = &mut self.entries[index as usize];
            self.free_head = entry.next;
            entry.deadline_ms = deadline_ms;
            entry.seq = seq;
            entry.payload = Some(payload);
            index
        };
        self.file(index);
        self.len += 1;
        Ok(TimerId { index, generation: self.entries[index as usize].generation })
    }

    /// Removes a pending timer and returns its payload; `None` (and nothing changes) when the
    /// timer already fired or was cancelled. O(1).
    pub fn cancel(&mut self, id: TimerId) -> Option<T> {
        let entry = self.entries.get(id.index as usize)?;
        if entry.generation != id.generation || entry.list == FREE_LIST {
            return None;
        }
        self.unlink(id.index);
        let payload = self.release(id.index);
        Some(payload)
    }

    /// Moves the wheel's time to `now_ms` and appends every timer due at or before it to
    /// `fired`, by deadline then insertion order. Returns how many fired. A `now_ms` earlier than
    /// the wheel's time is taken as the wheel's time (time never runs backwards).
    pub fn advance(&mut self, now_ms: u64, fired: &mut Vec<Fired<T>>) -> usize {
        let now_ms = now_ms.max(self.elapsed_ms);
        let first = fired.len();
        // Lists filed at different times only interleave out of order through the due and
        // overflow lists; the wheel itself emits in (deadline, seq) order.
        let mut needs_sort = false;
        if self.heads[DUE_LIST] != NIL {
            let head = self.detach(DUE_LIST);
            self.fire_chain(head, fired);
            needs_sort = true;
        }
        loop {
            let wheel = self.next_slot();
            let refile = (self.heads[OVERFLOW_LIST] != NIL).then_some(self.overflow_refile_ms);
            match (wheel, refile) {
                (wheel, Some(refile_ms)) if refile_ms <= now_ms && wheel.is_none_or(|(_, start)| refile_ms <= start) => {
                    self.elapsed_ms = self.elapsed_ms.max(refile_ms);
                    self.overflow_refile_ms = u64::MAX;
                    let mut cursor = self.detach(OVERFLOW_LIST);
                    while cursor != NIL {
                        let next = self.entries[cursor as usize].next;
                        if self.entries[cursor as usize].deadline_ms <= self.elapsed_ms {
                            self.fire_one(cursor, fired);
                            needs_sort = true;
                        } else {
                            self.file(cursor);
                        }
                        cursor = next;
                    }
                }
                (Some((list, start_ms)), _) if start_ms <= now_ms => {
                    debug_assert!(start_ms > self.elapsed_ms, "an occupied slot lies in the past");
                    self.elapsed_ms = start_ms;
                    let mut cursor = self.detach(list);
                    while cursor != NIL {
                        let next = self.entries[cursor as usize].next;
                        if self.entries[cursor as usize].deadline_ms <= start_ms {
                            self.fire_one(cursor, fired);
                        } else {
                            self.file(cursor);
                        }
                        cursor = next;
                    }
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

    /// Puts an entry on the list its deadline belongs to, relative to the wheel's time.
    fn file(&mut self, index: u32) {
        let deadline_ms = self.entries[index as usize].deadline_ms;
        let elapsed_ms = self.elapsed_ms;
        if deadline_ms <= elapsed_ms {
            self.push_back(DUE_LIST, index);
            return;
        }
        // The highest bit where deadline and now differ picks the level (at least level 0).
        let masked = (elapsed_ms ^ deadline_ms) | (SLOTS as u64 - 1);
        let level = (63 - masked.leading_zeros()) as usize / SLOT_BITS as usize;
        if level >= LEVELS {
            self.overflow_refile_ms = self.overflow_refile_ms.min(deadline_ms & !(HORIZON_MS - 1));
            self.push_back(OVERFLOW_LIST, index);
            return;
        }
        let slot = ((deadline_ms >> (SLOT_BITS as usize * level)) as usize) & (SLOTS - 1);
        self.occupied[level] |= 1 << slot;
        self.push_back(level * SLOTS + slot, index);
    }

    fn push_back(&mut self, list: usize, index: u32) {
        let tail = self.tails[list];
        {
            let entry = &mut self.entries[index as usize];
            entry.list = list as u16;
            entry.prev = tail;
            entry.next = NIL;
        }
        if tail == NIL {
            self.heads[list] = index;
        } else {
            self.entries[tail as usize].next = index;
        }
        self.tails[list] = index;
    }

    fn unlink(&mut self, index: u32) {
        let (list, prev, next) = {
            let entry = &self.entries[index as usize];
            (entry.list as usize, entry.prev, entry.next)
        };
        if prev == NIL {
            self.heads[list] = next;
        } else {
            self.entries[prev as usize].next = next;
        }
        if next == NIL {
            self.tails[list] = prev;
        } else {
            self.entries[next as usize].prev = prev;
        }
        if list < WHEEL_LISTS && self.heads[list] == NIL {
            self.occupied[list / SLOTS] &= !(1 << (list % SLOTS));
        }
    }

    /// Takes a whole list off its head; the entries keep their `next` links for the walk.
    fn detach(&mut self, list: usize) -> u32 {
        let head = self.heads[list];
        self.heads[list] = NIL;
        self.tails[list] = NIL;
        if list < WHEEL_LISTS {
            self.occupied[list / SLOTS] &= !(1 << (list % SLOTS));
        }
        head
    }

    fn fire_chain(&mut self, mut cursor: u32, fired: &mut Vec<Fired<T>>) {
        while cursor != NIL {
            let next = self.entries[cursor as usize].next;
            self.fire_one(cursor, fired);
            cursor = next;
        }
    }

    fn fire_one(&mut self, index: u32, fired: &mut Vec<Fired<T>>) {
        let (generation, deadline_ms, seq) = {
            let entry = &self.entries[index as usize];
            (entry.generation, entry.deadline_ms, entry.seq)
        };
        let payload = self.release(index);
        fired.push(Fired { id: TimerId { index, generation }, deadline_ms, payload, seq });
    }

    /// Frees an entry that is on no list any more; bumps its generation so old ids go stale.
    fn release(&mut self, index: u32) -> T {
        let free_head = self.free_head;
        let entry = &mut self.entries[index as usize];
        entry.list = FREE_LIST;
        entry.generation = entry.generation.wrapping_add(1);
        entry.next = free_head;
        entry.prev = NIL;
        self.free_head = index;
        self.len -= 1;
        // Every entry on a list holds a payload; `release` is only called on listed entries.
        entry.payload.take().expect("a listed timer holds its payload")
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
        fn matches_a_binary_heap(start in 0u64..(1 << 45), timers_max in 1usize..40, ops in proptest::collection::vec(op(), 1..300)) {
            let mut wheel = TimerWheel::new(timers_max, start);
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
