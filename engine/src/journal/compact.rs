//! The compactor: copies forward the records quiet conversations still retain in old segments,
//! so their pins drop to zero and the next retention pass deletes those segments.
//!
//! Without it one quiet conversation with a few retained records in an old segment keeps the
//! whole segment (64 MiB by default) alive, and, since segments go oldest first, every segment
//! after it too, until the per-shard byte limit evicts them whatever they hold.
//!
//! Owns no file of its own: it reads segments like a resume does (whole frames, CRC checked,
//! so bit rot is never laundered into a fresh CRC) and re-appends through the writer, so the
//! copies are ordinary records in ordinary frames (same conversation, seq, timestamp, kind and
//! payload; a new position; `Sync`). The writer moves an index entry to its copy in the same
//! step that advances the durable point past the copy (`settle_copies`), never before: a
//! snapshot holds only synced positions, so it either points at the original or at a durable
//! copy, and the original's segment cannot be deleted while anything points into it.
//!
//! After a crash anywhere in between, replay meets both the original and its copy; the index
//! keeps one entry per record, at the newer position (see `index`), so nothing is lost and
//! nothing is served twice.

use std::collections::BTreeMap;
use std::rc::Rc;

use super::format::{check_frame, record_at, Record};
use super::index::IndexEntry;
use super::storage::{Storage, StorageFile};
use super::writer::{Journal, State, Ticket};
use super::JournalError;

/// What one [`Journal::compact`] call did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CompactOutcome {
    /// Segments it started copying out of.
    pub segments_chosen: u64,
    /// Of those, the ones nothing retained points into any more (retention deletes them once
    /// everything older is gone too).
    pub segments_cleared: u64,
    /// Records copied forward (their index entries moved to the copies).
    pub records_copied: u64,
    /// Records evicted or moved while the compactor was reading them, or too large for this
    /// run's limits (not copied).
    pub records_skipped: u64,
    /// Retained records whose frame or record failed its check: left where they are, their
    /// segment not chosen again until the journal is reopened.
    pub records_unreadable: u64,
    /// Bytes read (whole frames, as a resume reads them).
    pub bytes_read: u64,
    /// Record bytes appended (headers + payloads; the frame headers and block padding they
    /// share with concurrent appends are not counted).
    pub bytes_written: u64,
    /// Stopped because the next frame would have overrun the budget.
    pub budget_exhausted: bool,
    /// Stopped because normal appends filled the write queue (the compactor gives way).
    pub yielded_to_appends: bool,
    /// Another call was running; this one did nothing.
    pub already_running: bool,
}

/// Copies appended and not yet acknowledged.
#[derive(Default)]
struct InFlight {
    last: Option<Ticket>,
    bytes: u64,
}

impl InFlight {
    /// Waits until every copy appended so far is durable (and so, moved in the index).
    async fn settle<S: Storage>(&mut self, journal: &Journal<S>) -> Result<(), JournalError> {
        self.bytes = 0;
        match self.last.take() {
            // `Sync` acknowledgements come in position order: the last one covers the rest.
            Some(t) => journal.acked(t).await,
            None => Ok(()),
        }
    }
}

/// One call's running totals.
struct Pass {
    out: CompactOutcome,
    inflight: InFlight,
    /// Most copy bytes waiting in the write queue at once.
    inflight_bytes_max: u64,
    budget_bytes: u64,
}

/// Whether the pass goes on.
enum Next {
    Go,
    Stop,
}

/// Clears the running flag however the call ends (including the future being dropped).
struct Running<'a, S: Storage>(&'a Journal<S>);

impl<S: Storage> Drop for Running<'_, S> {
    fn drop(&mut self) {
        self.0.inner.state.borrow_mut().compacting = false;
    }
}

impl<S: Storage> Journal<S> {
    /// One compaction pass, spending at most `budget_bytes` of I/O (bytes read + record bytes
    /// written). Run it on the shard's executor, with the committer running (it waits for its
    /// copies' fdatasync), before a retention pass; calls do not overlap (a second one returns
    /// at once with `already_running`).
    ///
    /// Which segments: sealed ones, oldest first, that are
    /// - sparse: the record bytes still retained in them are at most
    ///   [`JournalConfig::compact_live_percent_max`] (default 25 %) of their size, so freeing
    ///   one costs reading its pinned frames and rewriting at most a quarter of it;
    /// - old: at least [`JournalConfig::compact_newer_segments_min`] (default 4) segments,
    ///   the active one included, are newer. A fresh segment's retained records are mostly
    ///   the tails of busy conversations, which their rings evict soon anyway, and the
    ///   compactor's own copies are not chased from segment to segment: a quiet tail is copied
    ///   again only after the journal moved on that many segments.
    ///
    /// Segments with nothing retained are left to retention; segments where a retained record
    /// failed its check are skipped.
    ///
    /// What: every retained record pointing into a chosen segment, frame by frame (each frame
    /// read once and checked whole), re-appended unchanged but for its position. A frame is
    /// taken only if it and its retained records fit in what is left of the budget, so the
    /// budget is never exceeded; a budget below one frame's cost moves nothing (give at least
    /// twice `frame_bytes_max`). The next call resumes where this one stopped (what moved no
    /// longer pins the old segment).
    ///
    /// Normal appends are not disturbed: copies take positions and frame space like any
    /// record but at most `min(write_bytes_max, pending_bytes_max / 4)` bytes of them wait in
    /// the write queue at once, and if appends filled the queue the call stops
    /// (`yielded_to_appends`).
    ///
    /// Errors: what an append would get (`NoSpace`, `Failed`, `Closed`), and read errors.
    /// What was copied and made durable before an error stays moved.
    ///
    /// [`JournalConfig::compact_live_percent_max`]: super::JournalConfig::compact_live_percent_max
    /// [`JournalConfig::compact_newer_segments_min`]: super::JournalConfig::compact_newer_segments_min
    pub async fn compact(&self, budget_bytes: u64) -> Result<CompactOutcome, JournalError> {
        let candidates = {
            let mut st = self.inner.state.borrow_mut();
            st.writable()?;
            if st.compacting {
                return Ok(CompactOutcome { already_running: true, ..CompactOutcome::default() });
            }
            st.compacting = true;
            let st = &mut *st;
            st.compact_skip.retain(|b| st.segments.contains_key(b));
            self.compaction_candidates(st)
        };
        let _running = Running(self);
        let cfg = &self.inner.config;
        let mut pass = Pass {
            out: CompactOutcome::default(),
            inflight: InFlight::default(),
            inflight_bytes_max: u64::from(cfg.write_bytes_max).min(cfg.pending_bytes_max / 4),
            budget_bytes,
        };
        let mut chosen = Vec::new();
        'segments: for (base, file) in candidates {
            let entries = self.inner.state.borrow().index.entries_in(base);
            if entries.is_empty() {
                continue;
            }
            chosen.push(base);
            let mut frames: BTreeMap<u32, (u32, Vec<(u64, IndexEntry)>)> = BTreeMap::new();
            for (conv, e) in entries {
                frames.entry(e.loc.frame_offset).or_insert((e.loc.frame_len, Vec::new())).1.push((conv, e));
            }
            for (offset, (len, list)) in frames {
                if let Next::Stop = self.copy_frame(&mut pass, base, &file, offset, len, list).await? {
                    break 'segments;
                }
            }
        }
        pass.inflight.settle(self).await?;
        let mut out = pass.out;
        let st = self.inner.state.borrow();
        out.segments_chosen = chosen.len() as u64;
        out.segments_cleared = chosen.iter().filter(|b| st.index.pins(**b) == 0).count() as u64;
        Ok(out)
    }

    /// Copies the records of one frame of segment `base` that `list` (conversation, entry)
    /// says are retained, if the frame fits in what is left of the budget.
    async fn copy_frame(
        &self,
        pass: &mut Pass,
        base: u64,
        file: &S::File,
        offset: u32,
        len: u32,
        list: Vec<(u64, IndexEntry)>,
    ) -> Result<Next, JournalError> {
        let out = &mut pass.out;
        let write_bytes_max: u64 = list.iter().map(|(_, e)| u64::from(e.loc.record_len)).sum();
        if out.bytes_read + out.bytes_written + u64::from(len) + write_bytes_max > pass.budget_bytes {
            out.budget_exhausted = true;
            return Ok(Next::Stop);
        }
        let bytes = file.read_at(u64::from(offset), len as usize).await.map_err(|e| JournalError::Io {
            op: "compaction read",
            kind: e.kind(),
            message: e.to_string(),
        })?;
        out.bytes_read += u64::from(len);
        let checked = check_frame(&bytes, len as usize).ok().filter(|fh| fh.frame_len == len && fh.segment_base == base);
        let Some(fh) = checked else {
            tracing::error!(segment = base, offset, "journal frame failed its check during compaction; its records stay");
            out.records_unreadable += list.len() as u64;
            self.inner.state.borrow_mut().compact_skip.insert(base);
            return Ok(Next::Go);
        };
        for (conv, e) in list {
            let record = record_at(&bytes, e.loc.record_offset as usize).map(|(r, _)| r).filter(|r| {
                r.conversation == conv
                    && r.seq == e.seq
                    && r.kind == e.kind
                    && r.timestamp_us == e.timestamp_us
                    && (fh.first_position..fh.end_position()).contains(&e.position)
            });
            let Some(record) = record else {
                tracing::error!(segment = base, offset, conv, seq = e.seq, "journal record does not match its index entry");
                pass.out.records_unreadable += 1;
                self.inner.state.borrow_mut().compact_skip.insert(base);
                continue;
            };
            // The read awaited: retention or another move may have changed the entry.
            let current = self.inner.state.borrow().index.get(conv, &e);
            if current.is_none_or(|c| c.position != e.position) {
                pass.out.records_skipped += 1;
                continue;
            }
            if let Next::Stop = self.copy_record(pass, base, &record, e.position).await? {
                return Ok(Next::Stop);
            }
        }
        Ok(Next::Go)
    }

    /// Appends the copy of `record` (at `from_position` in segment `base`), keeping the copies waiting in the
    /// write queue under `inflight_bytes_max`; stops when normal appends filled the queue.
    async fn copy_record(&self, pass: &mut Pass, base: u64, record: &Record<'_>, from_position: u64) -> Result<Next, JournalError> {
        let n = record.encoded_bytes() as u64;
        if pass.inflight.bytes > 0 && pass.inflight.bytes + n > pass.inflight_bytes_max {
            pass.inflight.settle(self).await?;
        }
        let ticket = match self.append_copy(record, from_position) {
            Err(JournalError::Backpressure { .. }) if pass.inflight.last.is_some() => {
                // Our own copies may be what fills the queue: let them drain, try once more.
                pass.inflight.settle(self).await?;
                self.append_copy(record, from_position)
            }
            res => res,
        };
        let ticket = match ticket {
            Ok(t) => t,
            Err(JournalError::Backpressure { .. }) => {
                pass.out.yielded_to_appends = true;
                return Ok(Next::Stop);
            }
            Err(JournalError::TooLarge { .. }) => {
                // Written under larger limits than this run's: it stays where it is, and so
                // does its segment (not chosen again in this run).
                pass.out.records_skipped += 1;
                self.inner.state.borrow_mut().compact_skip.insert(base);
                return Ok(Next::Go);
            }
            Err(err) => return Err(err),
        };
        pass.inflight.last = Some(ticket);
        pass.inflight.bytes += n;
        pass.out.records_copied += 1;
        pass.out.bytes_written += n;
        Ok(Next::Go)
    }

    /// The segments worth compacting, oldest first (the rule in [`Journal::compact`]).
    fn compaction_candidates(&self, st: &State<S::File>) -> Vec<(u64, Rc<S::File>)> {
        let percent = u64::from(self.inner.config.compact_live_percent_max);
        let newer_min = self.inner.config.compact_newer_segments_min as usize;
        let old_enough = st.segments.len().saturating_sub(newer_min);
        st.segments
            .iter()
            .take(old_enough)
            .filter(|&(&base, seg)| {
                let live = st.index.pinned_bytes(base);
                seg.sealed
                    && Some(base) != st.active
                    && !st.compact_skip.contains(&base)
                    && live > 0
                    && live.saturating_mul(100) <= seg.header.segment_bytes.saturating_mul(percent)
            })
            .map(|(&base, seg)| (base, seg.file.clone()))
            .collect()
    }
}
