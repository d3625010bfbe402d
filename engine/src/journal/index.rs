//! The journal's in-memory index: per conversation, a ring of (seq → segment, frame, record)
//! sized to retention, plus how many retained entries (and record bytes) point into each
//! segment (its pins).
//!
//! Two rings per conversation: messages (`messages_max`, the resume window) and state records
//! (conversation events and read cursors, `state_max`), so a burst of cursor updates never
//! pushes messages out of the resume window. A segment whose pin count is zero holds nothing
//! retained. Also the index snapshot codec (the file recovery loads instead of replaying
//! everything). Plain Rust: no I/O, no clock.
//!
//! The compactor copies records forward, so the journal may hold one record twice (the
//! original and its copy, same conversation, seq, kind, timestamp and payload) and replay may
//! meet both. The index therefore keeps exactly one entry per record identity, the newest
//! location (highest position) winning:
//! - messages: identity is the seq (unique per conversation); the ring is kept sorted by seq
//!   (a copy replayed after its original's segment was deleted lands in its place, not at the
//!   back);
//! - state records: a read cursor's seq is the cursor value, which two participants may share,
//!   so identity is (seq, kind, timestamp, payload CRC); the ring is kept sorted by timestamp.

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
    /// Encoded length of the record (header + payload): what copying it forward writes.
    pub record_len: u32,
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
    /// CRC32C of the payload for state records (part of their identity, see the module doc);
    /// 0 for messages, whose seq alone is their identity. See [`IndexEntry::fingerprint_of`].
    pub fingerprint: u32,
    /// Where it is.
    pub loc: Location,
}

impl IndexEntry {
    /// The `fingerprint` a record of `kind` with `payload` gets.
    pub fn fingerprint_of(kind: RecordKind, payload: &[u8]) -> u32 {
        if kind == RecordKind::Message {
            0
        } else {
            crc32c(payload)
        }
    }

    /// Whether `self` and `other` are the same record (possibly at two locations).
    fn same_record(&self, other: &IndexEntry) -> bool {
        self.seq == other.seq
            && self.kind == other.kind
            && (self.kind == RecordKind::Message
                || (self.timestamp_us == other.timestamp_us && self.fingerprint == other.fingerprint))
    }
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
    /// Sorted by seq.
    messages: VecDeque<IndexEntry>,
    /// Sorted by timestamp (append order unless the clock stepped back).
    state: VecDeque<IndexEntry>,
}

impl Rings {
    fn ring_mut(&mut self, kind: RecordKind) -> &mut VecDeque<IndexEntry> {
        if kind == RecordKind::Message {
            &mut self.messages
        } else {
            &mut self.state
        }
    }
}

/// Where an entry belongs in its ring.
enum Slot {
    /// The same record is at this index.
    Same(usize),
    /// Not there; insert at this index to keep the order.
    Insert(usize),
}

/// Finds `e`'s record, or where it goes, in a ring of its kind. Appends in order (the live
/// path) take the first branch and cost one comparison.
fn slot(ring: &VecDeque<IndexEntry>, e: &IndexEntry) -> Slot {
    if e.kind == RecordKind::Message {
        if ring.back().is_none_or(|b| b.seq < e.seq) {
            return Slot::Insert(ring.len());
        }
        let at = ring.partition_point(|x| x.seq < e.seq);
        return if ring.get(at).is_some_and(|x| x.seq == e.seq) { Slot::Same(at) } else { Slot::Insert(at) };
    }
    if ring.back().is_none_or(|b| b.timestamp_us < e.timestamp_us) {
        return Slot::Insert(ring.len());
    }
    let lo = ring.partition_point(|x| x.timestamp_us < e.timestamp_us);
    let hi = ring.partition_point(|x| x.timestamp_us <= e.timestamp_us);
    match (lo..hi).find(|&i| ring[i].same_record(e)) {
        Some(i) => Slot::Same(i),
        None => Slot::Insert(hi),
    }
}

/// What a segment's pins add up to.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Pin {
    entries: u64,
    bytes: u64,
}

fn pin(pins: &mut BTreeMap<u64, Pin>, loc: &Location) {
    let p = pins.entry(loc.segment).or_default();
    p.entries += 1;
    p.bytes += u64::from(loc.record_len);
}

fn unpin(pins: &mut BTreeMap<u64, Pin>, loc: &Location) {
    let p = pins.get_mut(&loc.segment).expect("unpin of an unpinned segment");
    p.entries -= 1;
    p.bytes -= u64::from(loc.record_len);
    if p.entries == 0 {
        debug_assert_eq!(p.bytes, 0);
        pins.remove(&loc.segment);
    }
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
    /// Position of the newest retained record of any kind (of its copy, if the compactor
    /// moved it).
    pub last_position: u64,
}

/// The per-conversation rings and per-segment pins.
#[derive(Debug)]
pub struct ConversationIndex {
    conversations: Map<Rings>,
    pins: BTreeMap<u64, Pin>,
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

    /// Records a record of `conversation`. A new record goes in its place in the ring (which
    /// then drops its oldest entry when full); a record already there (the same identity, see
    /// the module doc) keeps one entry, at the newer of the two locations.
    pub fn insert(&mut self, conversation: u64, e: IndexEntry) {
        let ring_max = if e.kind == RecordKind::Message { self.messages_max } else { self.state_max };
        let ring = self.conversations.entry(conversation).or_default().ring_mut(e.kind);
        match slot(ring, &e) {
            Slot::Same(i) => {
                let old = ring[i];
                if old.position >= e.position {
                    return;
                }
                ring[i] = e;
                unpin(&mut self.pins, &old.loc);
                pin(&mut self.pins, &e.loc);
            }
            Slot::Insert(i) => {
                ring.insert(i, e);
                let evicted = if ring.len() > ring_max { ring.pop_front() } else { None };
                pin(&mut self.pins, &e.loc);
                if let Some(old) = evicted {
                    unpin(&mut self.pins, &old.loc);
                }
            }
        }
    }

    /// The retained entry of `conversation` that is the same record as `e`, if any (wherever
    /// it is now).
    pub fn get(&self, conversation: u64, e: &IndexEntry) -> Option<IndexEntry> {
        let r = self.conversations.get(&conversation)?;
        let ring = if e.kind == RecordKind::Message { &r.messages } else { &r.state };
        match slot(ring, e) {
            Slot::Same(i) => Some(ring[i]),
            Slot::Insert(_) => None,
        }
    }

    /// Moves the entry of `conversation` at position `from_position` to `to` (its copy: the
    /// same record, newer position), in place in its ring. False, and nothing changes, when
    /// that entry is no longer retained or was moved already.
    pub fn relocate(&mut self, conversation: u64, from_position: u64, to: IndexEntry) -> bool {
        let Some(rings) = self.conversations.get_mut(&conversation) else { return false };
        let ring = rings.ring_mut(to.kind);
        let Slot::Same(i) = slot(ring, &to) else { return false };
        let old = ring[i];
        if old.position != from_position || to.position <= from_position {
            return false;
        }
        ring[i] = to;
        unpin(&mut self.pins, &old.loc);
        pin(&mut self.pins, &to.loc);
        true
    }

    /// Every retained entry pointing into `segment`, with its conversation. One pass over the
    /// whole index.
    pub fn entries_in(&self, segment: u64) -> Vec<(u64, IndexEntry)> {
        let mut out = Vec::with_capacity(self.pins(segment) as usize);
        for (&conv, r) in &self.conversations {
            out.extend(r.messages.iter().chain(r.state.iter()).filter(|e| e.loc.segment == segment).map(|e| (conv, *e)));
        }
        out
    }

    /// Drops every entry older than `cutoff_us`. Returns how many. Costs one pass over the
    /// conversations (run it from a periodic retention tick, not per message).
    pub fn evict_older_than(&mut self, cutoff_us: u64) -> usize {
        let mut unpins = Vec::new();
        self.conversations.retain(|_, r| {
            for ring in [&mut r.messages, &mut r.state] {
                while ring.front().is_some_and(|e| e.timestamp_us < cutoff_us) {
                    unpins.push(ring.pop_front().expect("front").loc);
                }
            }
            !(r.messages.is_empty() && r.state.is_empty())
        });
        for loc in &unpins {
            unpin(&mut self.pins, loc);
        }
        unpins.len()
    }

    /// Drops every entry in `segment` or an older one (the per-shard byte limit deletes the
    /// oldest segments whatever they hold), and with it everything older in its ring: a copy
    /// moved forward may sit before an entry in an old segment, and the ring stays a suffix
    /// (a resume never sees a gap). Returns how many.
    pub fn evict_segments_through(&mut self, segment: u64) -> usize {
        let mut unpins = Vec::new();
        self.conversations.retain(|_, r| {
            for ring in [&mut r.messages, &mut r.state] {
                if let Some(last) = ring.iter().rposition(|e| e.loc.segment <= segment) {
                    unpins.extend(ring.drain(..=last).map(|e| e.loc));
                }
            }
            !(r.messages.is_empty() && r.state.is_empty())
        });
        for loc in &unpins {
            unpin(&mut self.pins, loc);
        }
        unpins.len()
    }

    /// Forgets a conversation (closed and no longer resumable). Returns the entries dropped.
    pub fn forget(&mut self, conversation: u64) -> usize {
        let Some(r) = self.conversations.remove(&conversation) else { return 0 };
        let n = r.messages.len() + r.state.len();
        for e in r.messages.iter().chain(r.state.iter()) {
            unpin(&mut self.pins, &e.loc);
        }
        n
    }

    /// Retained entries pointing into `segment`.
    pub fn pins(&self, segment: u64) -> u64 {
        self.pins.get(&segment).map_or(0, |p| p.entries)
    }

    /// Record bytes (headers + payloads) of the retained entries pointing into `segment`: what
    /// copying them forward writes.
    pub fn pinned_bytes(&self, segment: u64) -> u64 {
        self.pins.get(&segment).map_or(0, |p| p.bytes)
    }

    /// Total retained entries.
    pub fn entries(&self) -> u64 {
        self.pins.values().map(|p| p.entries).sum()
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
                b.extend_from_slice(&e.loc.record_len.to_le_bytes());
                b.extend_from_slice(&e.fingerprint.to_le_bytes());
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
        if bytes.len() >= 16 && bytes[0..8] == SNAPSHOT_MAGIC_V1 {
            return Err(SnapshotError::OldVersion);
        }
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
                        record_len: r.u32()?,
                    },
                    fingerprint: r.u32()?,
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

/// Version 2: entries carry the record length and the state-record fingerprint.
const SNAPSHOT_MAGIC: [u8; 8] = *b"SBJIDX\x00\x02";
/// Version 1 (before the compactor): refused, so recovery replays everything once instead.
const SNAPSHOT_MAGIC_V1: [u8; 8] = *b"SBJIDX\x00\x01";
const ENTRY_BYTES: usize = 8 * 4 + 4 * 5 + 1;

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
    /// Written by an older format (recovery replays the segments instead).
    OldVersion,
}

impl std::fmt::Display for SnapshotError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Self::BadMagic => "bad magic",
            Self::Truncated => "truncated",
            Self::BadCrc => "bad checksum",
            Self::Malformed => "malformed",
            Self::Stale => "points at a missing segment",
            Self::OldVersion => "older snapshot format",
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
            fingerprint: IndexEntry::fingerprint_of(kind, &seq.to_le_bytes()),
            loc: Location { segment, frame_offset: 4096, frame_len: 100, record_offset: 40, record_len: 60 },
        }
    }

    /// `x` copied forward into `segment` (a newer position, same record).
    fn copied(x: IndexEntry, segment: u64) -> IndexEntry {
        IndexEntry { position: segment * 1000 + 500 + x.seq, loc: Location { segment, ..x.loc }, ..x }
    }

    fn seqs(ix: &ConversationIndex, conv: u64) -> Vec<(u64, u64)> {
        ix.messages_from(conv, 0, usize::MAX).0.iter().map(|e| (e.seq, e.loc.segment)).collect()
    }

    #[test]
    fn a_record_met_twice_keeps_one_entry_at_the_newest_location() {
        let mut ix = ConversationIndex::new(4, 4);
        let originals: Vec<_> = (1..=3).map(|s| e(s, 0, s, RecordKind::Message)).collect();
        for x in &originals {
            ix.insert(7, *x);
        }
        ix.insert(7, e(4, 2, 4, RecordKind::Message));
        // Replay meets the copies of seqs 1 and 2 (segment 5) after the originals.
        ix.insert(7, copied(originals[0], 5));
        ix.insert(7, copied(originals[1], 5));
        assert_eq!(seqs(&ix, 7), vec![(1, 5), (2, 5), (3, 0), (4, 2)]);
        assert_eq!((ix.pins(0), ix.pins(2), ix.pins(5), ix.entries()), (1, 1, 2, 4));
        assert_eq!((ix.pinned_bytes(0), ix.pinned_bytes(5)), (60, 120));
        // The original met after its copy (an older position) changes nothing.
        ix.insert(7, originals[0]);
        assert_eq!(seqs(&ix, 7)[0], (1, 5));
        assert_eq!(ix.entries(), 4);
        // A copy whose original's segment is gone lands in seq order, not at the back; a full
        // ring then drops its lowest seq.
        let mut ix = ConversationIndex::new(3, 4);
        ix.insert(7, e(3, 1, 3, RecordKind::Message));
        ix.insert(7, e(4, 1, 4, RecordKind::Message));
        ix.insert(7, copied(e(2, 0, 2, RecordKind::Message), 5));
        assert_eq!(seqs(&ix, 7), vec![(2, 5), (3, 1), (4, 1)]);
        ix.insert(7, copied(e(1, 0, 1, RecordKind::Message), 5));
        assert_eq!(seqs(&ix, 7), vec![(2, 5), (3, 1), (4, 1)]);
        assert_eq!((ix.pins(1), ix.pins(5)), (2, 1));
    }

    #[test]
    fn state_records_sharing_a_seq_stay_apart_and_their_copies_merge() {
        let mut ix = ConversationIndex::new(4, 8);
        // Two participants' read cursors at the same seq, same microsecond: two records.
        let a = IndexEntry { fingerprint: 11, ..e(5, 0, 100, RecordKind::ReadCursor) };
        let b = IndexEntry { fingerprint: 22, position: a.position + 1, ..a };
        ix.insert(7, a);
        ix.insert(7, b);
        assert_eq!(ix.state_of(7).len(), 2);
        ix.insert(7, copied(a, 3));
        ix.insert(7, copied(b, 3));
        ix.insert(7, a);
        let state = ix.state_of(7);
        assert_eq!(state.len(), 2);
        assert!(state.iter().all(|x| x.loc.segment == 3));
        assert_eq!((ix.pins(0), ix.pins(3)), (0, 2));
        // An older state record arriving late goes in timestamp order.
        ix.insert(7, e(1, 1, 50, RecordKind::ConversationEvent));
        assert_eq!(ix.state_of(7)[0].timestamp_us, 50);
    }

    #[test]
    fn relocate_moves_only_the_entry_it_was_asked_to() {
        let mut ix = ConversationIndex::new(2, 2);
        let x = e(1, 0, 1, RecordKind::Message);
        ix.insert(7, x);
        assert!(ix.relocate(7, x.position, copied(x, 4)));
        assert_eq!((ix.pins(0), ix.pins(4)), (0, 1));
        // Moved already: the same move again, or a move from the old position, does nothing.
        assert!(!ix.relocate(7, x.position, copied(x, 6)));
        assert_eq!(ix.get(7, &x).unwrap().loc.segment, 4);
        // Evicted meanwhile: nothing to move, nothing resurrected.
        let y = e(2, 0, 2, RecordKind::Message);
        ix.insert(7, y);
        ix.insert(7, e(3, 1, 3, RecordKind::Message));
        ix.insert(7, e(4, 1, 4, RecordKind::Message));
        assert!(!ix.relocate(7, y.position, copied(y, 4)));
        assert!(!ix.relocate(8, y.position, copied(y, 4)));
        assert_eq!(seqs(&ix, 7), vec![(3, 1), (4, 1)]);
        assert_eq!((ix.pins(0), ix.pins(4), ix.entries()), (0, 0, 2));
        assert_eq!(ix.entries_in(1).len(), 2);
    }

    #[test]
    fn byte_limit_eviction_keeps_rings_a_suffix() {
        let mut ix = ConversationIndex::new(8, 8);
        // Seq 1 was copied forward into segment 9; seq 2 still sits in segment 5.
        ix.insert(7, copied(e(1, 0, 1, RecordKind::Message), 9));
        ix.insert(7, e(2, 5, 2, RecordKind::Message));
        ix.insert(7, e(3, 9, 3, RecordKind::Message));
        assert_eq!(ix.evict_segments_through(5), 2);
        assert_eq!(seqs(&ix, 7), vec![(3, 9)]);
        assert_eq!((ix.pins(5), ix.pins(9)), (0, 1));
    }

    #[test]
    fn ring_keeps_last_n_and_pins_follow() {
        let mut ix = ConversationIndex::new(3, 2);
        for seq in 1..=5 {
            ix.insert(9, e(seq, u64::from(seq > 2), seq, RecordKind::Message));
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
        assert_eq!(back.state_of(6), ix.state_of(6)[..1].to_vec());
        assert_eq!(back.pinned_bytes(2), ix.pinned_bytes(2));
        // Entries in deleted segments are dropped on load.
        let (_, back) = ConversationIndex::decode_snapshot(&bytes, 4, 4, 3).unwrap();
        assert_eq!(back.messages_from(5, 0, 9).0.len(), 0);
        bytes[30] ^= 1;
        assert_eq!(ConversationIndex::decode_snapshot(&bytes, 4, 4, 0).unwrap_err(), SnapshotError::BadCrc);
        bytes[..8].copy_from_slice(&SNAPSHOT_MAGIC_V1);
        assert_eq!(ConversationIndex::decode_snapshot(&bytes, 4, 4, 0).unwrap_err(), SnapshotError::OldVersion);
    }
}
