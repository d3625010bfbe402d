//! The journal's in-memory index: per conversation, a ring of (seq → segment, frame, record)
//! sized to retention, plus how many retained entries point into each segment (its pins).
//!
//! Two rings per conversation: messages (`messages_max`, the resume window) and state records
//! (conversation events and read cursors, `state_max`), so a burst of cursor updates never
//! pushes messages out of the resume window. A segment whose pin count is zero holds nothing
//! retained. Also the index snapshot codec (the file recovery loads instead of replaying
//! everything). Plain Rust: no I/O, no clock.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::hash::{BuildHasherDefault, Hasher};

use super::format::{crc32c, RecordKind};

/// Where a record lives on disk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Location {
    /// Segment (its base position).
    pub segment: u64,
    /// Offset of the frame in the segment.
    pub frame_offset: u32,
    /// Length of the frame (unpadded): a resume reads and checks the whole frame.
    pub frame_len: u32,
    /// Offset of the record inside the frame.
    pub record_offset: u32,
}

/// One retained record.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IndexEntry {
    /// Conversation seq.
    pub seq: u64,
    /// Journal position.
    pub position: u64,
    /// The record's timestamp (for max-age retention).
    pub timestamp_us: u64,
    /// The record's kind.
    pub kind: RecordKind,
    /// Where it is.
    pub loc: Location,
}

/// A cheap hasher for u64 conversation ids (`SipHash` costs more than the rest of an index
/// insert during replay).
#[derive(Debug, Default, Clone, Copy)]
pub struct U64Hasher(u64);

impl Hasher for U64Hasher {
    fn finish(&self) -> u64 {
        let h = self.0.wrapping_mul(0x9E37_79B9_7F4A_7C15);
        h ^ (h >> 29)
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(b);
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 ^= n;
    }
}

type Map<V> = HashMap<u64, V, BuildHasherDefault<U64Hasher>>;

#[derive(Debug, Default)]
struct Rings {
    messages: VecDeque<IndexEntry>,
    state: VecDeque<IndexEntry>,
}

/// What a conversation's retained range looks like.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ConversationHead {
    /// Conversation id.
    pub conversation: u64,
    /// Oldest retained message seq (`None`: no message retained).
    pub first_seq: Option<u64>,
    /// Newest retained message seq.
    pub last_seq: Option<u64>,
    /// Position of the newest retained record of any kind.
    pub last_position: u64,
}

/// The per-conversation rings and per-segment pins.
#[derive(Debug)]
pub struct ConversationIndex {
    conversations: Map<Rings>,
    pins: BTreeMap<u64, u64>,
    messages_max: usize,
    state_max: usize,
}

impl ConversationIndex {
    /// An empty index keeping at most `messages_max` messages and `state_max` state records per
    /// conversation.
    pub fn new(messages_max: usize, state_max: usize) -> Self {
        assert!(messages_max > 0 && state_max > 0, "retention rings need room");
        Self { conversations: Map::default(), pins: BTreeMap::new(), messages_max, state_max }
    }

    fn pin(&mut self, segment: u64) {
        *self.pins.entry(segment).or_insert(0) += 1;
    }

    fn unpin(&mut self, segment: u64) {
        let left = self.pins.get_mut(&segment).expect("unpin of an unpinned segment");
        *left -= 1;
        if *left == 0 {
            self.pins.remove(&segment);
        }
    }

    /// Records a new record of `conversation`; evicts that ring's oldest entry when full.
    pub fn insert(&mut self, conversation: u64, e: IndexEntry) {
        let (ring_max, rings) = {
            let rings = self.conversations.entry(conversation).or_default();
            if e.kind == RecordKind::Message {
                (self.messages_max, &mut rings.messages)
            } else {
                (self.state_max, &mut rings.state)
            }
        };
        rings.push_back(e);
        let evicted = if rings.len() > ring_max { rings.pop_front() } else { None };
        self.pin(e.loc.segment);
        if let Some(old) = evicted {
            self.unpin(old.loc.segment);
        }
    }

    /// Drops every entry older than `cutoff_us`. Returns how many. Costs one pass over the
    /// conversations (run it from a periodic retention tick, not per message).
    pub fn evict_older_than(&mut self, cutoff_us: u64) -> usize {
        self.evict_front_while(|e| e.timestamp_us < cutoff_us)
    }

    /// Drops every entry in `segment` or an older one (the per-shard byte limit deletes the
    /// oldest segments whatever they hold). Returns how many.
    pub fn evict_segments_through(&mut self, segment: u64) -> usize {
        self.evict_front_while(|e| e.loc.segment <= segment)
    }

    fn evict_front_while(&mut self, pred: impl Fn(&IndexEntry) -> bool) -> usize {
        let mut unpins = Vec::new();
        self.conversations.retain(|_, r| {
            for ring in [&mut r.messages, &mut r.state] {
                while ring.front().is_some_and(&pred) {
                    unpins.push(ring.pop_front().expect("front").loc.segment);
                }
            }
            !(r.messages.is_empty() && r.state.is_empty())
        });
        for s in &unpins {
            self.unpin(*s);
        }
        unpins.len()
    }

    /// Forgets a conversation (closed and no longer resumable). Returns the entries dropped.
    pub fn forget(&mut self, conversation: u64) -> usize {
        let Some(r) = self.conversations.remove(&conversation) else { return 0 };
        let n = r.messages.len() + r.state.len();
        for e in r.messages.iter().chain(r.state.iter()) {
            self.unpin(e.loc.segment);
        }
        n
    }

    /// Retained entries pointing into `segment`.
    pub fn pins(&self, segment: u64) -> u64 {
        self.pins.get(&segment).copied().unwrap_or(0)
    }

    /// Total retained entries.
    pub fn entries(&self) -> u64 {
        self.pins.values().sum()
    }

    /// Conversations with anything retained.
    pub fn conversations(&self) -> usize {
        self.conversations.len()
    }

    /// Up to `max` retained messages of `conversation` with seq ≥ `from_seq`, oldest first,
    /// and the oldest retained seq (to tell the caller whether the range was complete).
    pub fn messages_from(&self, conversation: u64, from_seq: u64, max: usize) -> (Vec<IndexEntry>, Option<u64>) {
        let Some(r) = self.conversations.get(&conversation) else { return (Vec::new(), None) };
        let first = r.messages.front().map(|e| e.seq);
        let start = r.messages.partition_point(|e| e.seq < from_seq);
        (r.messages.iter().skip(start).take(max).copied().collect(), first)
    }

    /// The retained state records (events, cursors) of `conversation`, oldest first.
    pub fn state_of(&self, conversation: u64) -> Vec<IndexEntry> {
        self.conversations.get(&conversation).map(|r| r.state.iter().copied().collect()).unwrap_or_default()
    }

    /// Every conversation's retained range (for rebuilding session heads after recovery).
    pub fn heads(&self) -> impl Iterator<Item = ConversationHead> + '_ {
        self.conversations.iter().map(|(&conversation, r)| ConversationHead {
            conversation,
            first_seq: r.messages.front().map(|e| e.seq),
            last_seq: r.messages.back().map(|e| e.seq),
            last_position: r
                .messages
                .back()
                .map_or(0, |e| e.position)
                .max(r.state.back().map_or(0, |e| e.position)),
        })
    }

    /// Encodes a snapshot of the entries below `meta.next_position` (only what is durable).
    pub fn encode_snapshot(&self, meta: &SnapshotMeta) -> Vec<u8> {
        let mut b = Vec::with_capacity(64 + self.entries() as usize * ENTRY_BYTES);
        b.extend_from_slice(&SNAPSHOT_MAGIC);
        b.extend_from_slice(&0u64.to_le_bytes()); // body length, filled below
        b.extend_from_slice(&meta.shard.to_le_bytes());
        b.extend_from_slice(&meta.epoch.to_le_bytes());
        b.extend_from_slice(&meta.next_position.to_le_bytes());
        b.extend_from_slice(&meta.segment.to_le_bytes());
        b.extend_from_slice(&meta.next_offset.to_le_bytes());
        b.extend_from_slice(&meta.prev_crc.to_le_bytes());
        let count_at = b.len();
        b.extend_from_slice(&0u64.to_le_bytes());
        let mut convs = 0u64;
        for (&conv, r) in &self.conversations {
            let keep = |e: &&IndexEntry| e.position < meta.next_position;
            let n = r.messages.iter().chain(r.state.iter()).filter(keep).count();
            if n == 0 {
                continue;
            }
            convs += 1;
            b.extend_from_slice(&conv.to_le_bytes());
            b.extend_from_slice(&(n as u32).to_le_bytes());
            for e in r.messages.iter().chain(r.state.iter()).filter(keep) {
                b.extend_from_slice(&e.seq.to_le_bytes());
                b.extend_from_slice(&e.position.to_le_bytes());
                b.extend_from_slice(&e.timestamp_us.to_le_bytes());
                b.extend_from_slice(&e.loc.segment.to_le_bytes());
                b.extend_from_slice(&e.loc.frame_offset.to_le_bytes());
                b.extend_from_slice(&e.loc.frame_len.to_le_bytes());
                b.extend_from_slice(&e.loc.record_offset.to_le_bytes());
                b.push(e.kind as u8);
            }
        }
        b[count_at..count_at + 8].copy_from_slice(&convs.to_le_bytes());
        let body_len = (b.len() - 16) as u64;
        b[8..16].copy_from_slice(&body_len.to_le_bytes());
        let crc = crc32c(&b);
        b.extend_from_slice(&crc.to_le_bytes());
        b
    }

    /// Decodes a snapshot (trailing padding allowed). Entries in segments older than
    /// `first_segment` (deleted since) are dropped.
    pub fn decode_snapshot(
        bytes: &[u8],
        messages_max: usize,
        state_max: usize,
        first_segment: u64,
    ) -> Result<(SnapshotMeta, Self), SnapshotError> {
        if bytes.len() < 16 || bytes[0..8] != SNAPSHOT_MAGIC {
            return Err(SnapshotError::BadMagic);
        }
        let body_len = u64::from_le_bytes(bytes[8..16].try_into().expect("8"));
        let total = usize::try_from(body_len).ok().and_then(|l| l.checked_add(16)).ok_or(SnapshotError::Truncated)?;
        let Some(crc_bytes) = bytes.get(total..total + 4) else { return Err(SnapshotError::Truncated) };
        if crc32c(&bytes[..total]) != u32::from_le_bytes(crc_bytes.try_into().expect("4")) {
            return Err(SnapshotError::BadCrc);
        }
        let mut r = Reader { b: &bytes[16..total] };
        let meta = SnapshotMeta {
            shard: r.u32()?,
            epoch: r.u64()?,
            next_position: r.u64()?,
            segment: r.u64()?,
            next_offset: r.u64()?,
            prev_crc: r.u32()?,
        };
        let mut index = Self::new(messages_max, state_max);
        let convs = r.u64()?;
        for _ in 0..convs {
            let conv = r.u64()?;
            let n = r.u32()?;
            for _ in 0..n {
                let e = IndexEntry {
                    seq: r.u64()?,
                    position: r.u64()?,
                    timestamp_us: r.u64()?,
                    loc: Location {
                        segment: r.u64()?,
                        frame_offset: r.u32()?,
                        frame_len: r.u32()?,
                        record_offset: r.u32()?,
                    },
                    kind: RecordKind::from_u8(r.u8()?).ok_or(SnapshotError::Malformed)?,
                };
                if e.loc.segment >= first_segment {
                    index.insert(conv, e);
                }
            }
        }
        if !r.b.is_empty() {
            return Err(SnapshotError::Malformed);
        }
        Ok((meta, index))
    }
}

const SNAPSHOT_MAGIC: [u8; 8] = *b"SBJIDX\x00\x01";
const ENTRY_BYTES: usize = 8 * 4 + 4 * 3 + 1;

/// Where a snapshot stands in the journal: replay resumes here.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SnapshotMeta {
    /// Shard that wrote it.
    pub shard: u32,
    /// Journal epoch when written.
    pub epoch: u64,
    /// Every record below this position is in the snapshot (if retained).
    pub next_position: u64,
    /// The segment holding the next frame.
    pub segment: u64,
    /// Offset of the next frame in that segment.
    pub next_offset: u64,
    /// CRC the next frame chains from.
    pub prev_crc: u32,
}

/// Why a snapshot was not used.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SnapshotError {
    /// Not a snapshot.
    BadMagic,
    /// Shorter than it says.
    Truncated,
    /// Checksum mismatch.
    BadCrc,
    /// Checksum fine, contents inconsistent.
    Malformed,
    /// Points at a segment or offset that does not exist (deleted since, or damaged).
    Stale,
}

impl std::fmt::Display for SnapshotError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::BadMagic => "bad magic",
            Self::Truncated => "truncated",
            Self::BadCrc => "bad checksum",
            Self::Malformed => "malformed",
            Self::Stale => "points at a missing segment",
        })
    }
}

struct Reader<'a> {
    b: &'a [u8],
}

impl Reader<'_> {
    fn take<const N: usize>(&mut self) -> Result<[u8; N], SnapshotError> {
        let (head, rest) = self.b.split_at_checked(N).ok_or(SnapshotError::Malformed)?;
        self.b = rest;
        Ok(head.try_into().expect("N"))
    }
    fn u8(&mut self) -> Result<u8, SnapshotError> {
        Ok(self.take::<1>()?[0])
    }
    fn u32(&mut self) -> Result<u32, SnapshotError> {
        Ok(u32::from_le_bytes(self.take()?))
    }
    fn u64(&mut self) -> Result<u64, SnapshotError> {
        Ok(u64::from_le_bytes(self.take()?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn e(seq: u64, segment: u64, ts: u64, kind: RecordKind) -> IndexEntry {
        IndexEntry {
            seq,
            position: segment * 1000 + seq,
            timestamp_us: ts,
            kind,
            loc: Location { segment, frame_offset: 4096, frame_len: 100, record_offset: 40 },
        }
    }

    #[test]
    fn ring_keeps_last_n_and_pins_follow() {
        let mut ix = ConversationIndex::new(3, 2);
        for seq in 1..=5 {
            ix.insert(9, e(seq, if seq <= 2 { 0 } else { 1 }, seq, RecordKind::Message));
        }
        let (got, first) = ix.messages_from(9, 0, 10);
        assert_eq!(got.iter().map(|e| e.seq).collect::<Vec<_>>(), vec![3, 4, 5]);
        assert_eq!(first, Some(3));
        assert_eq!((ix.pins(0), ix.pins(1)), (0, 3));
        // State records do not push messages out.
        for seq in 1..=4 {
            ix.insert(9, e(seq, 1, 9, RecordKind::ReadCursor));
        }
        assert_eq!(ix.messages_from(9, 4, 10).0.len(), 2);
        assert_eq!(ix.state_of(9).len(), 2);
        assert_eq!(ix.pins(1), 5);
    }

    #[test]
    fn age_and_segment_eviction_and_forget() {
        let mut ix = ConversationIndex::new(10, 10);
        for seq in 1..=6 {
            ix.insert(1, e(seq, seq / 3, seq * 10, RecordKind::Message));
            ix.insert(2, e(seq, seq / 3, seq * 10, RecordKind::ConversationEvent));
        }
        assert_eq!(ix.evict_older_than(30), 4);
        assert_eq!(ix.pins(0), 0);
        // Seqs 3, 4, 5 of both conversations are in segment 1; seq 6 in segment 2.
        assert_eq!(ix.evict_segments_through(1), 6);
        assert_eq!((ix.entries(), ix.pins(1), ix.pins(2)), (2, 0, 2));
        assert_eq!(ix.forget(1), 1);
        assert_eq!(ix.conversations(), 1);
        assert_eq!(ix.evict_older_than(u64::MAX), 1);
        assert_eq!((ix.conversations(), ix.entries()), (0, 0));
    }

    #[test]
    fn snapshot_round_trip_keeps_only_durable_entries() {
        let mut ix = ConversationIndex::new(4, 4);
        for seq in 1..=6 {
            ix.insert(5, e(seq, 2, seq, RecordKind::Message));
            ix.insert(6, e(seq, 3, seq, RecordKind::ReadCursor));
        }
        let meta = SnapshotMeta { shard: 1, epoch: 2, next_position: 3004, segment: 3, next_offset: 8192, prev_crc: 77 };
        let mut bytes = ix.encode_snapshot(&meta);
        bytes.resize(bytes.len() + 100, 0);
        let (m, back) = ConversationIndex::decode_snapshot(&bytes, 4, 4, 0).unwrap();
        assert_eq!(m, meta);
        assert_eq!(back.messages_from(5, 0, 9).0, ix.messages_from(5, 0, 9).0);
        // Conversation 6 retains positions 3003..=3006; only 3003 is below next_position.
        assert_eq!(back.state_of(6).len(), 1);
        // Entries in deleted segments are dropped on load.
        let (_, back) = ConversationIndex::decode_snapshot(&bytes, 4, 4, 3).unwrap();
        assert_eq!(back.messages_from(5, 0, 9).0.len(), 0);
        bytes[30] ^= 1;
        assert_eq!(ConversationIndex::decode_snapshot(&bytes, 4, 4, 0).unwrap_err(), SnapshotError::BadCrc);
    }
}
