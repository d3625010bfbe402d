//! Reading for resume, and retention.
//!
//! A resume asks for one conversation's messages from a seq: the index says exactly which
//! frames hold them; each frame is read once and its CRC checked before any record in it is
//! returned (bit rot since recovery is reported, not served).
//!
//! Retention: per conversation the rings keep the last N (and, when `retention_age_ms` is set,
//! drop entries older than that); per shard, when the segments exceed `shard_bytes_max`, the
//! oldest segments go whatever they hold. Segments are deleted oldest first only, so a gap in
//! the middle of the journal is always damage, never retention (recovery reports it). The
//! compactor ([`Journal::compact`], `compact.rs`) copies forward what quiet conversations still
//! retain in old segments, so their pins drop to zero and this pass deletes them.

use std::collections::BTreeMap;
use std::rc::Rc;

use bytes::Bytes;

use super::format::{check_frame, record_at, FrameHeader, RecordKind};
use super::index::{ConversationHead, IndexEntry};
use super::storage::{Storage, StorageFile};
use super::writer::{quarantine_name, segment_name, Health, Journal};
use super::JournalError;

/// A record read back.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredRecord {
    /// Journal position of the copy read (the compactor moves records forward: positions do
    /// not follow seqs; records come back in seq order).
    pub position: u64,
    /// Conversation id.
    pub conversation: u64,
    /// Conversation seq.
    pub seq: u64,
    /// Timestamp, microseconds since the Unix epoch.
    pub timestamp_us: u64,
    /// Kind.
    pub kind: RecordKind,
    /// Payload (owned copy).
    pub payload: Bytes,
}

/// What a resume read returned.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ResumeRead {
    /// The records, oldest first.
    pub records: Vec<StoredRecord>,
    /// Oldest message seq still retained for the conversation (`None`: nothing retained).
    pub first_retained_seq: Option<u64>,
    /// Frames whose check failed (their records are missing from `records`).
    pub damaged_frames: u32,
}

impl ResumeRead {
    /// True when every retained message from `from_seq` on was returned: nothing before it was
    /// evicted and nothing was damaged (`max` permitting).
    pub fn complete_from(&self, from_seq: u64) -> bool {
        self.damaged_frames == 0 && self.first_retained_seq.is_some_and(|f| f <= from_seq)
    }
}

/// An index entry and its place in the list a read was asked for.
type Numbered = (usize, IndexEntry);

/// What a retention pass did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RetentionOutcome {
    /// Index entries dropped (age, byte limit).
    pub entries_evicted: u64,
    /// Segments deleted.
    pub segments_deleted: u64,
    /// Bytes freed.
    pub bytes_freed: u64,
}

impl<S: Storage> Journal<S> {
    /// Up to `max` retained messages of `conversation` with seq ≥ `from_seq`, read from disk.
    /// Only records whose frame was written are indexed (in `sync` mode a record not yet
    /// acknowledged may be returned; the shard's in-memory history covers the newest anyway).
    pub async fn read_messages(&self, conversation: u64, from_seq: u64, max: usize) -> Result<ResumeRead, JournalError> {
        let (entries, first) = self.inner.state.borrow().index.messages_from(conversation, from_seq, max);
        let (records, damaged_frames) = self.read_entries(conversation, &entries).await?;
        Ok(ResumeRead { records, first_retained_seq: first, damaged_frames })
    }

    /// The retained state records (conversation events, read cursors) of `conversation`.
    pub async fn read_state(&self, conversation: u64) -> Result<ResumeRead, JournalError> {
        let entries = self.inner.state.borrow().index.state_of(conversation);
        let (records, damaged_frames) = self.read_entries(conversation, &entries).await?;
        Ok(ResumeRead { records, first_retained_seq: None, damaged_frames })
    }

    /// Every conversation with anything retained, and its range (to rebuild session heads after
    /// recovery).
    pub fn conversation_heads(&self) -> Vec<ConversationHead> {
        self.inner.state.borrow().index.heads().collect()
    }

    async fn read_entries(&self, conversation: u64, entries: &[IndexEntry]) -> Result<(Vec<StoredRecord>, u32), JournalError> {
        // Each record keeps its index in `entries` (the ring's order: seq for messages): after
        // compaction a conversation's records are no longer in position order on disk.
        let mut frames: BTreeMap<(u64, u32), (u32, Vec<Numbered>)> = BTreeMap::new();
        for (i, e) in entries.iter().enumerate() {
            frames.entry((e.loc.segment, e.loc.frame_offset)).or_insert((e.loc.frame_len, Vec::new())).1.push((i, *e));
        }
        let files: BTreeMap<u64, Rc<S::File>> = {
            let st = self.inner.state.borrow();
            frames.keys().filter_map(|(s, _)| st.segments.get(s).map(|seg| (*s, seg.file.clone()))).collect()
        };
        let mut out = Vec::with_capacity(entries.len());
        let mut damaged = 0u32;
        for ((segment, offset), (len, list)) in frames {
            let Some(file) = files.get(&segment) else {
                damaged += 1;
                continue;
            };
            let Some((bytes, fh)) = read_checked_frame(&**file, segment, offset, len).await? else {
                damaged += 1;
                continue;
            };
            for (i, e) in list {
                match stored_record(&bytes, &fh, conversation, &e) {
                    Some(record) => out.push((i, record)),
                    None => damaged += 1,
                }
            }
        }
        out.sort_unstable_by_key(|r| r.0);
        Ok((out.into_iter().map(|r| r.1).collect(), damaged))
    }

    /// Forgets a conversation (closed, no longer resumable): its entries stop pinning segments.
    pub fn forget_conversation(&self, conversation: u64) -> usize {
        self.inner.state.borrow_mut().index.forget(conversation)
    }

    /// One retention pass: age eviction (with `now_us`), the per-shard byte limit, then deletes
    /// the oldest segments nothing retained points into, then writes a fresh snapshot if any
    /// segment went (older snapshots may point into them). Leaves `NoSpace` if it freed space.
    /// Run it from a periodic tick on the shard.
    pub async fn apply_retention(&self, now_us: u64) -> Result<RetentionOutcome, JournalError> {
        let cfg = self.inner.config.clone();
        let mut outcome = RetentionOutcome::default();
        let victims: Vec<(u64, u64)> = {
            let mut st = self.inner.state.borrow_mut();
            let st = &mut *st;
            if cfg.retention_age_ms > 0 {
                let cutoff = now_us.saturating_sub(cfg.retention_age_ms.saturating_mul(1000));
                outcome.entries_evicted += st.index.evict_older_than(cutoff) as u64;
            }
            let total: u64 = st.segments.values().map(|s| s.header.segment_bytes).sum();
            let mut over = total.saturating_sub(cfg.shard_bytes_max);
            for (&base, seg) in &st.segments {
                if over == 0 || Some(base) == st.active {
                    break;
                }
                outcome.entries_evicted += st.index.evict_segments_through(base) as u64;
                over = over.saturating_sub(seg.header.segment_bytes);
            }
            let mut victims = Vec::new();
            for (&base, seg) in &st.segments {
                if Some(base) == st.active || !seg.sealed || st.index.pins(base) > 0 {
                    break;
                }
                victims.push((base, seg.header.segment_bytes));
            }
            for (base, _) in &victims {
                st.segments.remove(base);
            }
            victims
        };
        if victims.is_empty() {
            return Ok(outcome);
        }
        let storage = &self.inner.storage;
        for &(base, bytes) in &victims {
            storage.remove(&segment_name(base)).await.map_err(|e| JournalError::Io {
                op: "remove segment",
                kind: e.kind(),
                message: e.to_string(),
            })?;
            let _ = storage.remove(&quarantine_name(base)).await;
            outcome.segments_deleted += 1;
            outcome.bytes_freed += bytes;
        }
        storage.sync_dir().await.map_err(|e| JournalError::Io { op: "sync dir", kind: e.kind(), message: e.to_string() })?;
        {
            let mut st = self.inner.state.borrow_mut();
            st.stats.segments_deleted += outcome.segments_deleted;
        }
        self.resume_after_no_space();
        if self.health() == Health::Healthy {
            self.write_snapshot().await?;
        }
        Ok(outcome)
    }
}

/// Reads the frame at `offset` of `segment` and checks it (length, CRC, segment); `None` when
/// the check fails (logged: bit rot since recovery is reported, not served).
pub(super) async fn read_checked_frame<F: StorageFile>(
    file: &F,
    segment: u64,
    offset: u32,
    len: u32,
) -> Result<Option<(Vec<u8>, FrameHeader)>, JournalError> {
    let bytes = file
        .read_at(u64::from(offset), len as usize)
        .await
        .map_err(|e| JournalError::Io { op: "read frame", kind: e.kind(), message: e.to_string() })?;
    let checked = check_frame(&bytes, len as usize).ok().filter(|fh| fh.frame_len == len && fh.segment_base == segment);
    if checked.is_none() {
        tracing::error!(segment, offset, "journal frame failed its check on read");
    }
    Ok(checked.map(|fh| (bytes, fh)))
}

/// The record index entry `e` of `conversation` points at inside a checked frame, when it is
/// the one the entry names.
pub(super) fn stored_record(frame: &[u8], fh: &FrameHeader, conversation: u64, e: &IndexEntry) -> Option<StoredRecord> {
    match record_at(frame, e.loc.record_offset as usize) {
        Some((r, _)) if r.conversation == conversation && r.seq == e.seq && e.position >= fh.first_position => Some(StoredRecord {
            position: e.position,
            conversation,
            seq: r.seq,
            timestamp_us: r.timestamp_us,
            kind: r.kind,
            payload: Bytes::copy_from_slice(r.payload),
        }),
        _ => None,
    }
}
