//! One waiting line of a tenant (the tenant's default queue, or a team/skill queue): its
//! policy, its conversations in priority-then-FIFO order, positions and the wait estimate.
//!
//! It owns the order and the handling-rate statistics; it does not route, start timers or
//! decide overflow (the desk does, from [`QueuePolicy`]).
//!
//! Estimated wait, in milliseconds, for the conversation at 1-based `position`:
//!
//! ```text
//! estimated_wait_ms = position × ewma_handle_ms / max(serving_slots, 1)
//! ```
//!
//! - `ewma_handle_ms`: exponentially weighted moving average (α = 1/8, as TCP's SRTT) of handle
//!   times, from assignment to close or transfer out, of conversations served from this queue;
//!   it starts at the policy's `initial_handle_ms`.
//! - `serving_slots`: the summed capacity of the agents online, connected and having the
//!   queue's skills: how many conversations the queue's agents work at once.
//!
//! So a queue drains about `serving_slots / ewma_handle_ms` conversations per millisecond and
//! the customer at `position` waits for `position` of them. It ignores agents shared between
//! queues and the time left on conversations in progress; it is an estimate, updated each time
//! the position changes.

use std::collections::BTreeMap;
use std::ops::Bound;

use switchboard_protocol::Text;

/// Longest handle time one sample may count for, in milliseconds (a conversation left open
/// for days must not freeze the estimate).
pub const HANDLE_SAMPLE_MS_MAX: u64 = 24 * 60 * 60 * 1000;

/// Where a conversation goes when it waited past `wait_ms_max`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Overflow {
    /// To the named backup queue (or the offline outcome when that queue is full).
    Queue(Text),
    /// The offline-message outcome: the conversation ends, the customer may leave a message.
    Offline,
}

/// A queue's configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueuePolicy {
    /// The queue's id (the name a transfer targets).
    pub name: Text,
    /// Skills an agent must have to serve it (empty: any agent).
    pub skills: Vec<Text>,
    /// Longest wait before overflow, in milliseconds (0: no limit).
    pub wait_ms_max: u64,
    /// What happens after `wait_ms_max`.
    pub overflow: Overflow,
}

impl QueuePolicy {
    /// A queue any agent serves, with no wait limit.
    pub fn open(name: &str) -> QueuePolicy {
        QueuePolicy { name: Text::from(name), skills: Vec::new(), wait_ms_max: 0, overflow: Overflow::Offline }
    }
}

/// A conversation's place in a queue: higher priority first, then lower sequence number (the
/// desk hands out sequence numbers in arrival order).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct QueueKey {
    /// 255 − priority, so that the derived order puts high priority first.
    rank: u8,
    seq: u64,
}

impl QueueKey {
    /// The key of a conversation of `priority` that arrived `seq`-th.
    pub fn new(priority: u8, seq: u64) -> QueueKey {
        QueueKey { rank: u8::MAX - priority, seq }
    }

    /// The priority.
    pub fn priority(self) -> u8 {
        u8::MAX - self.rank
    }

    /// The arrival sequence number.
    pub fn seq(self) -> u64 {
        self.seq
    }
}

/// A queue: its policy and the conversations waiting in it.
#[derive(Debug, Clone)]
pub struct Queue {
    policy: QueuePolicy,
    waiting: BTreeMap<QueueKey, Text>,
    /// Waiting conversations per priority, for O(1)-ish positions of arrivals.
    per_priority: Box<[u32; 256]>,
    ewma_handle_ms: u64,
    handle_samples: u64,
    serving_slots: u64,
    /// Set when someone's position may have changed since the desk last told them.
    pub(crate) positions_dirty: bool,
}

impl Queue {
    /// An empty queue; `initial_handle_ms` seeds the handle-time average.
    pub fn new(policy: QueuePolicy, initial_handle_ms: u64) -> Queue {
        Queue {
            policy,
            waiting: BTreeMap::new(),
            per_priority: Box::new([0; 256]),
            ewma_handle_ms: initial_handle_ms.min(HANDLE_SAMPLE_MS_MAX),
            handle_samples: 0,
            serving_slots: 0,
            positions_dirty: false,
        }
    }

    /// The queue's id.
    pub fn name(&self) -> &Text {
        &self.policy.name
    }

    /// The policy.
    pub fn policy(&self) -> &QueuePolicy {
        &self.policy
    }

    /// Conversations waiting.
    pub fn len(&self) -> usize {
        self.waiting.len()
    }

    /// True when nobody waits.
    pub fn is_empty(&self) -> bool {
        self.waiting.is_empty()
    }

    /// Waiting conversations, first to be served first.
    pub fn iter(&self) -> impl Iterator<Item = (QueueKey, &Text)> {
        self.waiting.iter().map(|(key, session)| (*key, session))
    }

    /// The conversation served next.
    pub fn head(&self) -> Option<(QueueKey, &Text)> {
        self.waiting.first_key_value().map(|(key, session)| (*key, session))
    }

    /// The first waiting key after `after`.
    pub fn first_after(&self, after: QueueKey) -> Option<QueueKey> {
        self.waiting.range((Bound::Excluded(after), Bound::Unbounded)).next().map(|(key, _)| *key)
    }

    /// The session waiting at `key`.
    pub fn session_at(&self, key: QueueKey) -> Option<&Text> {
        self.waiting.get(&key)
    }

    /// The handle-time average, in milliseconds.
    pub fn ewma_handle_ms(&self) -> u64 {
        self.ewma_handle_ms
    }

    /// Handle-time samples taken.
    pub fn handle_samples(&self) -> u64 {
        self.handle_samples
    }

    /// Summed capacity of the agents serving it now.
    pub fn serving_slots(&self) -> u64 {
        self.serving_slots
    }

    pub(crate) fn insert(&mut self, key: QueueKey, session: Text) {
        if self.waiting.insert(key, session).is_none() {
            self.per_priority[key.priority() as usize] += 1;
        }
        self.positions_dirty = true;
    }

    pub(crate) fn remove(&mut self, key: QueueKey) -> bool {
        let removed = self.waiting.remove(&key).is_some();
        if removed {
            self.per_priority[key.priority() as usize] -= 1;
            self.positions_dirty = true;
        }
        removed
    }

    /// The 1-based position of `key`, if it waits here. O(log n) for the last arrival of its
    /// priority (the common case), O(ahead of it within its priority) otherwise.
    pub fn position(&self, key: QueueKey) -> Option<u32> {
        if !self.waiting.contains_key(&key) {
            return None;
        }
        let priority = key.priority() as usize;
        let higher: u32 = self.per_priority[priority + 1..].iter().sum();
        let is_last_of_priority =
            self.waiting.range((Bound::Excluded(key), Bound::Unbounded)).next().is_none_or(|(next, _)| next.rank != key.rank);
        let within = if is_last_of_priority {
            self.per_priority[priority]
        } else {
            self.waiting.range(QueueKey { rank: key.rank, seq: 0 }..=key).count() as u32
        };
        Some(higher + within)
    }

    /// The estimate for `position` (see the module comment), saturating at `u32::MAX`.
    pub fn estimated_wait_ms(&self, position: u32) -> u32 {
        let wait = u64::from(position).saturating_mul(self.ewma_handle_ms) / self.serving_slots.max(1);
        wait.min(u64::from(u32::MAX)) as u32
    }

    /// Feeds one handle time into the average.
    pub(crate) fn record_handle_time(&mut self, handle_ms: u64) {
        let sample = handle_ms.min(HANDLE_SAMPLE_MS_MAX);
        self.ewma_handle_ms = (7 * self.ewma_handle_ms + sample) / 8;
        self.handle_samples += 1;
    }

    pub(crate) fn set_serving_slots(&mut self, slots: u64) {
        self.serving_slots = slots;
    }

    /// Takes the waiting conversations (for moving them into a rebuilt queue).
    pub(crate) fn take_waiting(&mut self) -> BTreeMap<QueueKey, Text> {
        self.per_priority.fill(0);
        std::mem::take(&mut self.waiting)
    }

    pub(crate) fn carry_statistics_from(&mut self, old: &Queue) {
        self.ewma_handle_ms = old.ewma_handle_ms;
        self.handle_samples = old.handle_samples;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn queue() -> Queue {
        Queue::new(QueuePolicy::open("q"), 60_000)
    }

    #[test]
    fn priority_then_fifo() {
        let mut q = queue();
        q.insert(QueueKey::new(0, 1), Text::from("low-1"));
        q.insert(QueueKey::new(5, 2), Text::from("high-2"));
        q.insert(QueueKey::new(0, 3), Text::from("low-3"));
        q.insert(QueueKey::new(5, 4), Text::from("high-4"));
        let order: Vec<&str> = q.iter().map(|(_, s)| s.as_str()).collect();
        assert_eq!(order, ["high-2", "high-4", "low-1", "low-3"]);
        for (index, (key, _)) in q.iter().enumerate() {
            assert_eq!(q.position(key), Some(index as u32 + 1));
        }
        assert!(q.remove(QueueKey::new(5, 2)));
        assert!(!q.remove(QueueKey::new(5, 2)));
        assert_eq!(q.position(QueueKey::new(0, 1)), Some(2));
        assert_eq!(q.position(QueueKey::new(5, 2)), None);
    }

    #[test]
    fn reinserted_key_gets_its_old_place_back() {
        let mut q = queue();
        for seq in 1..=5 {
            q.insert(QueueKey::new(1, seq), Text::from(format!("s{seq}")));
        }
        q.remove(QueueKey::new(1, 2));
        q.insert(QueueKey::new(1, 2), Text::from("s2"));
        assert_eq!(q.position(QueueKey::new(1, 2)), Some(2));
        assert_eq!(q.head().unwrap().1, "s1");
    }

    #[test]
    fn estimate_follows_the_formula() {
        let mut q = queue();
        assert_eq!(q.estimated_wait_ms(3), 180_000, "no serving agents counts as one slot");
        q.set_serving_slots(4);
        assert_eq!(q.estimated_wait_ms(3), 45_000);
        q.record_handle_time(20_000);
        assert_eq!(q.ewma_handle_ms(), (7 * 60_000 + 20_000) / 8);
        q.record_handle_time(u64::MAX);
        assert!(q.ewma_handle_ms() <= HANDLE_SAMPLE_MS_MAX);
        assert_eq!(q.estimated_wait_ms(u32::MAX), u32::MAX);
    }
}
