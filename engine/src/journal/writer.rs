//! The journal handle: append, group commit, acknowledgement, segment roll, snapshot, close.
//!
//! One [`Journal`] per shard, cloned freely within the shard (an `Rc`): the publish path calls
//! [`Journal::append`] (synchronous: assigns the position and copies the record into the frame
//! being built) and awaits [`Journal::acked`]; one committer task ([`Journal::run_committer`])
//! writes frames and issues fdatasync. The committer keeps one write+fdatasync in flight; what
//! arrives meanwhile piles into the next frames (bounded by `write_bytes_max` per commit and
//! `pending_bytes_max` in all; past that, appends get `Backpressure`), which is group commit:
//! under load, each fdatasync covers everything that arrived during the previous one.
//!
//! States (named, like every backpressure state here): `Healthy`; `NoSpace` (the device is
//! full: the unwritten records were refused with `NoSpace`, their positions reused, appends are
//! refused until [`Journal::resume_after_no_space`] or a retention pass frees a segment);
//! `Failed` (a write or fdatasync failed: no retry, because after EIO the kernel may have
//! dropped the dirty pages; everything not yet acknowledged is refused and the journal must be
//! reopened, which runs recovery); `Closed`.
//!
//! Never holds the state borrow across an await.

use std::cell::RefCell;
use std::collections::{BTreeMap, VecDeque};
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use super::format::{
    align_up, encode_frame, encode_record, seal_frame_header, Record, SegmentHeader, BLOCK_BYTES,
    FORMAT_VERSION, FRAME_FLAG_SEAL, FRAME_HEADER_BYTES, RECORD_HEADER_BYTES, SEGMENT_FLAG_EARLY_ACK,
    SEGMENT_HEADER_BYTES,
};
use super::index::{ConversationIndex, IndexEntry, Location, SnapshotMeta};
use super::storage::{is_no_space, Storage, StorageFile};
use super::{Durability, JournalConfig, JournalError};
use crate::notify::Notify;

/// File name of the segment whose first position is `base`.
pub fn segment_name(base: u64) -> String {
    format!("{base:020}.seg")
}
/// File name of the quarantine note of segment `base`.
pub fn quarantine_name(base: u64) -> String {
    format!("{base:020}.quarantine")
}
/// File name of the snapshot covering positions below `next_position`.
pub fn snapshot_name(next_position: u64) -> String {
    format!("{next_position:020}.idx")
}
/// Written at clean close, removed at open.
pub const CLEAN_MARKER: &str = "clean";
/// Suffix of files written and renamed into place (removed at open).
pub const TMP_SUFFIX: &str = ".tmp";

/// Parses `NNNN….ext` into its number.
pub fn parse_numbered(name: &str, ext: &str) -> Option<u64> {
    let stem = name.strip_suffix(ext)?.strip_suffix('.')?;
    (stem.len() == 20).then(|| stem.parse().ok()).flatten()
}

/// Which state the journal is in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Health {
    /// Appending and acknowledging.
    Healthy,
    /// The device is full; appends refused until space is freed.
    NoSpace,
    /// A write or fdatasync failed; appends refused until reopened (the reason).
    Failed(String),
    /// Closed cleanly.
    Closed,
}

/// What an append gets: the position, and what to await for its acknowledgement.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[must_use = "an append is acknowledged only when its ticket is awaited with Journal::acked"]
pub struct Ticket {
    /// The record's journal position.
    pub position: u64,
    /// What the acknowledgement will mean.
    pub durability: Durability,
    generation: u64,
}

/// Counters for metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct JournalStats {
    /// Records appended.
    pub appends: u64,
    /// Frames written.
    pub frames: u64,
    /// Commits (one write each).
    pub commits: u64,
    /// fdatasyncs of segment files.
    pub fdatasyncs: u64,
    /// Bytes written to segments, padding included.
    pub bytes_written: u64,
    /// Segments created.
    pub segments_created: u64,
    /// Segments deleted by retention.
    pub segments_deleted: u64,
    /// Appends refused with `Backpressure`.
    pub backpressure: u64,
    /// Index snapshots written.
    pub snapshots: u64,
    /// Records the compactor appended (copies; not counted in `appends`).
    pub compaction_copies: u64,
    /// Index entries moved to their copy once it was durable.
    pub compaction_moves: u64,
}

/// A segment the journal knows.
#[derive(Debug)]
pub(super) struct Segment<F> {
    pub(super) file: Rc<F>,
    pub(super) header: SegmentHeader,
    /// Closed for writing (sealed, or quarantined, or not the last).
    pub(super) sealed: bool,
    pub(super) quarantined: bool,
}

/// A frame being filled: records already encoded after a reserved header.
#[derive(Debug)]
struct PendingFrame {
    buf: Vec<u8>,
    first_position: u64,
    count: u32,
    sync: bool,
    /// (conversation, entry, the original's position for a compactor's copy).
    entries: Vec<(u64, IndexEntry, Option<u64>)>,
}

/// The durable point: everything below `position` is on disk and synced; the next frame goes
/// at (`segment`, `offset`) chaining from `prev_crc`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct WritePoint {
    pub(super) position: u64,
    pub(super) segment: u64,
    pub(super) offset: u64,
    pub(super) prev_crc: u32,
}

#[derive(Debug)]
pub(super) struct State<F> {
    pub(super) health: Health,
    pub(super) epoch: u64,
    /// Next position an append gets.
    pub(super) next_position: u64,
    /// Where the next frame is written (position = first unwritten).
    pub(super) written: WritePoint,
    /// Where the last fdatasync left things (position = first unsynced).
    pub(super) synced: WritePoint,
    /// The segment being written (`None`: create one before the next frame).
    pub(super) active: Option<u64>,
    pub(super) segments: BTreeMap<u64, Segment<F>>,
    pub(super) index: ConversationIndex,
    /// Compactor copies written but not yet synced: (conversation, the copy's entry, the
    /// original's position). Their index entries move when an fdatasync covers them.
    unsynced_copies: Vec<(u64, IndexEntry, u64)>,
    /// A `compact` call is running (calls do not overlap).
    pub(super) compacting: bool,
    /// Segments the compactor found unreadable records in (not chosen again in this run).
    pub(super) compact_skip: std::collections::BTreeSet<u64>,
    pending: VecDeque<PendingFrame>,
    pending_bytes: u64,
    spare: Vec<Vec<u8>>,
    write_buf: Vec<u8>,
    unsynced_bytes: u64,
    /// When the oldest unsynced write completed (interval mode's time bound).
    unsynced_since: Option<std::time::Instant>,
    sync_requested: bool,
    /// `close` was called: appends are refused, the committer drains.
    closing: bool,
    generation: u64,
    /// (generation, first dropped position) of every `NoSpace` drop, newest last.
    drops: VecDeque<(u64, u64)>,
    waiters: Vec<Waker>,
    pub(super) stats: JournalStats,
}

pub(super) struct Inner<S: Storage> {
    pub(super) storage: S,
    pub(super) config: JournalConfig,
    pub(super) shard: u32,
    pub(super) state: RefCell<State<S::File>>,
    /// The committer waits on it; appends notify it.
    work: Notify,
}

/// One shard's journal. Cheap to clone (shared within the shard's executor; not Send).
pub struct Journal<S: Storage> {
    pub(super) inner: Rc<Inner<S>>,
}

impl<S: Storage> Clone for Journal<S> {
    fn clone(&self) -> Self {
        Self { inner: self.inner.clone() }
    }
}

impl<S: Storage> std::fmt::Debug for Journal<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let st = self.inner.state.borrow();
        f.debug_struct("Journal")
            .field("shard", &self.inner.shard)
            .field("health", &st.health)
            .field("epoch", &st.epoch)
            .field("next_position", &st.next_position)
            .field("synced_position", &st.synced.position)
            .finish_non_exhaustive()
    }
}

/// How much a drop list may remember (`NoSpace` episodes; a ticket older than that has long been
/// answered).
const DROPS_KEPT: usize = 64;

impl<F> State<F> {
    pub(super) fn new(epoch: u64, index: ConversationIndex, point: WritePoint) -> Self {
        Self {
            health: Health::Healthy,
            epoch,
            next_position: point.position,
            written: point,
            synced: point,
            active: None,
            segments: BTreeMap::new(),
            index,
            unsynced_copies: Vec::new(),
            compacting: false,
            compact_skip: std::collections::BTreeSet::new(),
            pending: VecDeque::new(),
            pending_bytes: 0,
            spare: Vec::new(),
            write_buf: Vec::new(),
            unsynced_bytes: 0,
            unsynced_since: None,
            sync_requested: false,
            closing: false,
            generation: 0,
            drops: VecDeque::new(),
            waiters: Vec::new(),
            stats: JournalStats::default(),
        }
    }

    /// Ok when appends are accepted; otherwise the error an append gets.
    pub(super) fn writable(&self) -> Result<(), JournalError> {
        match &self.health {
            Health::Healthy if self.closing => Err(JournalError::Closed),
            Health::Healthy => Ok(()),
            Health::NoSpace => Err(JournalError::NoSpace),
            Health::Failed(why) => Err(JournalError::Failed(why.clone())),
            Health::Closed => Err(JournalError::Closed),
        }
    }

    fn wake_all(&mut self) {
        for w in self.waiters.drain(..) {
            w.wake();
        }
    }

    fn dropped(&self, t: &Ticket) -> bool {
        self.drops.iter().find(|d| d.0 > t.generation).is_some_and(|d| t.position >= d.1)
    }

    fn fail(&mut self, why: String) {
        tracing::error!(reason = %why, "journal failed: refusing appends until reopened");
        self.health = Health::Failed(why);
        self.recycle_pending();
        self.wake_all();
    }

    /// Moves the index entries of every compactor copy the durable point now covers (called
    /// right after an fdatasync advanced it, in the same borrow: no snapshot can see the
    /// copies durable and the index still pointing at the originals, or the reverse).
    fn settle_copies(&mut self) {
        let synced = self.synced.position;
        let index = &mut self.index;
        let mut moved = 0;
        self.unsynced_copies.retain(|(conv, copy, from)| {
            if copy.position >= synced {
                return true;
            }
            moved += u64::from(index.relocate(*conv, *from, *copy));
            false
        });
        self.stats.compaction_moves += moved;
    }

    fn recycle_pending(&mut self) {
        while let Some(f) = self.pending.pop_front() {
            self.spare.push(f.buf);
        }
        self.pending_bytes = 0;
    }
}

fn io_err(op: &'static str, e: &io::Error) -> JournalError {
    JournalError::Io { op, kind: e.kind(), message: e.to_string() }
}

impl<S: Storage> Journal<S> {
    pub(super) fn from_parts(storage: S, config: JournalConfig, shard: u32, state: State<S::File>) -> Self {
        Self { inner: Rc::new(Inner { storage, config, shard, state: RefCell::new(state), work: Notify::default() }) }
    }

    /// The configuration it runs with.
    pub fn config(&self) -> &JournalConfig {
        &self.inner.config
    }

    /// The storage it writes to.
    pub fn storage(&self) -> &S {
        &self.inner.storage
    }

    /// The journal epoch (bumped by recovery when acknowledged data may be missing).
    pub fn epoch(&self) -> u64 {
        self.inner.state.borrow().epoch
    }

    /// The current state.
    pub fn health(&self) -> Health {
        self.inner.state.borrow().health.clone()
    }

    /// The position the next append gets.
    pub fn next_position(&self) -> u64 {
        self.inner.state.borrow().next_position
    }

    /// Every position below this is fdatasync'ed.
    pub fn synced_position(&self) -> u64 {
        self.inner.state.borrow().synced.position
    }

    /// Counters.
    pub fn stats(&self) -> JournalStats {
        self.inner.state.borrow().stats
    }

    /// Segments on disk (base positions), oldest first.
    pub fn segments(&self) -> Vec<u64> {
        self.inner.state.borrow().segments.keys().copied().collect()
    }

    /// Retained index entries (all conversations, both rings).
    pub fn retained_entries(&self) -> u64 {
        self.inner.state.borrow().index.entries()
    }

    /// Retained index entries pointing into segment `base` (its pins).
    pub fn segment_pins(&self, base: u64) -> u64 {
        self.inner.state.borrow().index.pins(base)
    }

    /// Appends a record to the frame being built and returns its ticket. Never waits: a full
    /// queue is `Backpressure`, a full device `NoSpace`, a failed journal `Failed`.
    pub fn append(&self, r: &Record<'_>, durability: Durability) -> Result<Ticket, JournalError> {
        self.append_with(r, durability, None)
    }

    /// Appends the compactor's copy of the record at position `from_position` (`Sync`): a
    /// record like any other in the frames, but its index entry moves only once it is durable
    /// (see `settle_copies`).
    pub(super) fn append_copy(&self, r: &Record<'_>, from_position: u64) -> Result<Ticket, JournalError> {
        self.append_with(r, Durability::Sync, Some(from_position))
    }

    fn append_with(&self, r: &Record<'_>, durability: Durability, copy_of: Option<u64>) -> Result<Ticket, JournalError> {
        let cfg = &self.inner.config;
        let mut st = self.inner.state.borrow_mut();
        st.writable()?;
        if r.payload.len() > cfg.payload_bytes_max as usize
            || FRAME_HEADER_BYTES + r.encoded_bytes() > cfg.frame_bytes_max as usize
        {
            return Err(JournalError::TooLarge {
                bytes: r.payload.len(),
                max: (cfg.payload_bytes_max as usize).min(cfg.frame_bytes_max as usize - FRAME_HEADER_BYTES - RECORD_HEADER_BYTES),
            });
        }
        if durability == Durability::Interval && !cfg.interval_allowed {
            return Err(JournalError::IntervalNotAllowed);
        }
        let bytes = r.encoded_bytes() as u64;
        if st.pending_bytes + bytes > cfg.pending_bytes_max {
            st.stats.backpressure += 1;
            return Err(JournalError::Backpressure { pending_bytes: st.pending_bytes });
        }
        let position = st.next_position;
        let fits = st.pending.back().is_some_and(|f| f.buf.len() + r.encoded_bytes() <= cfg.frame_bytes_max as usize);
        if !fits {
            let mut buf = st.spare.pop().unwrap_or_default();
            buf.clear();
            buf.resize(FRAME_HEADER_BYTES, 0);
            st.pending.push_back(PendingFrame { buf, first_position: position, count: 0, sync: false, entries: Vec::new() });
        }
        let frame = st.pending.back_mut().expect("a pending frame");
        let record_offset = frame.buf.len() as u32;
        encode_record(&mut frame.buf, r);
        frame.count += 1;
        frame.sync |= durability == Durability::Sync;
        frame.entries.push((
            r.conversation,
            IndexEntry {
                seq: r.seq,
                position,
                timestamp_us: r.timestamp_us,
                kind: r.kind,
                fingerprint: IndexEntry::fingerprint_of(r.kind, r.payload),
                loc: Location { segment: 0, frame_offset: 0, frame_len: 0, record_offset, record_len: bytes as u32 },
            },
            copy_of,
        ));
        st.pending_bytes += bytes;
        st.next_position += 1;
        if copy_of.is_some() {
            st.stats.compaction_copies += 1;
        } else {
            st.stats.appends += 1;
        }
        let generation = st.generation;
        drop(st);
        self.inner.work.notify();
        Ok(Ticket { position, durability, generation })
    }

    /// Resolves when the ticket's record is acknowledged: `Sync`, after the fdatasync covering
    /// its frame; `Interval`, after its frame's write completed. Errors if it never will be
    /// (`NoSpace`: the record was not written; `Failed`: the journal failed first).
    pub fn acked(&self, ticket: Ticket) -> Acked<S> {
        Acked { journal: self.clone(), ticket }
    }

    /// Resolves when everything appended so far is fdatasync'ed.
    pub async fn flush(&self) -> Result<(), JournalError> {
        let ticket = {
            let mut st = self.inner.state.borrow_mut();
            if st.next_position == st.synced.position {
                return Ok(());
            }
            st.sync_requested = true;
            Ticket { position: st.next_position - 1, durability: Durability::Sync, generation: st.generation }
        };
        self.inner.work.notify();
        self.acked(ticket).await
    }

    /// The committer: writes frames and syncs them until the journal closes or fails. Spawn it
    /// once on the shard's executor, right after [`Journal::open`].
    pub async fn run_committer(&self) -> Result<(), JournalError> {
        loop {
            let work = self.next_work();
            match work {
                Work::Stop(result) => return result,
                Work::Commit => {
                    self.commit_once().await?;
                }
                Work::Sync => self.sync_now().await?,
                Work::Wait => self.inner.work.wait().await,
                Work::WaitOrSyncAfter(d) => {
                    let woken = futures_lite::future::or(
                        async {
                            self.inner.work.wait().await;
                            true
                        },
                        async {
                            self.inner.storage.sleep(d).await;
                            false
                        },
                    )
                    .await;
                    if !woken {
                        self.sync_now().await?;
                    }
                }
            }
        }
    }

    fn next_work(&self) -> Work {
        let cfg = &self.inner.config;
        let st = self.inner.state.borrow();
        match &st.health {
            Health::Failed(why) => return Work::Stop(Err(JournalError::Failed(why.clone()))),
            Health::Closed => return Work::Stop(Ok(())),
            Health::NoSpace => return Work::Wait,
            Health::Healthy => {}
        }
        let unsynced = st.written.position > st.synced.position;
        let interval = Duration::from_millis(cfg.interval_ms);
        if unsynced && st.unsynced_since.is_some_and(|t| t.elapsed() >= interval) {
            // Under steady interval-mode load the byte budget may never fill: bound the time.
            return Work::Sync;
        }
        if !st.pending.is_empty() {
            return Work::Commit;
        }
        if unsynced && (st.sync_requested || st.unsynced_bytes >= cfg.interval_bytes) {
            return Work::Sync;
        }
        if unsynced {
            let waited = st.unsynced_since.map_or(Duration::ZERO, |t| t.elapsed());
            return Work::WaitOrSyncAfter(interval.saturating_sub(waited));
        }
        Work::Wait
    }

    /// One commit: takes the pending frames that fit one write, writes them, and fdatasyncs if
    /// any record in them asked for `Sync` (or the interval's byte budget is spent, or a flush
    /// is waiting). Returns the records committed (0: nothing to do or the journal stopped).
    /// The committer calls this in a loop; tests call it directly.
    pub async fn commit_once(&self) -> Result<u64, JournalError> {
        loop {
            let needs_roll = {
                let st = self.inner.state.borrow();
                if st.health != Health::Healthy || st.pending.is_empty() {
                    return Ok(0);
                }
                let need = align_up(st.pending.front().expect("pending").buf.len()) as u64;
                st.active.is_none() || st.written.offset + need + BLOCK_BYTES as u64 > self.inner.config.segment_bytes
            };
            if !needs_roll {
                break;
            }
            if !self.roll().await? {
                return Ok(0);
            }
        }
        let (file, offset, buf, first, end, crc, sync, entries) = {
            let mut st = self.inner.state.borrow_mut();
            let st = &mut *st;
            let seg = st.active.expect("active segment");
            let seg_bytes = self.inner.config.segment_bytes;
            let mut buf = std::mem::take(&mut st.write_buf);
            buf.clear();
            let (mut prev, start) = (st.written.prev_crc, st.written.offset);
            let first = st.written.position;
            debug_assert_eq!(first, st.pending.front().expect("pending").first_position);
            let mut sync = st.sync_requested;
            let mut entries = Vec::new();
            let mut end = first;
            while let Some(f) = st.pending.front() {
                let padded = align_up(f.buf.len());
                let room = start + (buf.len() + padded) as u64 + BLOCK_BYTES as u64 <= seg_bytes;
                if !buf.is_empty() && (buf.len() + padded > self.inner.config.write_bytes_max as usize || !room) {
                    break;
                }
                let mut f = st.pending.pop_front().expect("front");
                let frame_offset = start + buf.len() as u64;
                let frame_len = f.buf.len() as u32;
                prev = seal_frame_header(&mut f.buf, prev, seg, f.first_position, f.count, 0);
                buf.extend_from_slice(&f.buf);
                buf.resize(buf.len() + (padded - f.buf.len()), 0);
                for (conv, mut e, copy_of) in f.entries.drain(..) {
                    e.loc.segment = seg;
                    e.loc.frame_offset = frame_offset as u32;
                    e.loc.frame_len = frame_len;
                    entries.push((conv, e, copy_of));
                }
                st.pending_bytes -= (f.buf.len() - FRAME_HEADER_BYTES) as u64;
                sync |= f.sync;
                end = f.first_position + u64::from(f.count);
                st.stats.frames += 1;
                st.spare.push(f.buf);
            }
            let file = st.segments[&seg].file.clone();
            (file, start, buf, first, end, prev, sync, entries)
        };
        let len = buf.len();
        let res = file.write_at(offset, &buf).await;
        {
            let mut st = self.inner.state.borrow_mut();
            st.write_buf = buf;
            match res {
                Ok(n) if n == len => {}
                Ok(_) => {
                    Self::no_space(&mut st, first);
                    return Ok(0);
                }
                Err(e) if is_no_space(&e) => {
                    Self::no_space(&mut st, first);
                    return Ok(0);
                }
                Err(e) => {
                    st.fail(format!("segment write failed: {e}"));
                    return Err(JournalError::Failed(format!("segment write failed: {e}")));
                }
            }
            if st.health != Health::Healthy {
                return Ok(0);
            }
            st.written = WritePoint { position: end, segment: st.written.segment, offset: offset + len as u64, prev_crc: crc };
            st.unsynced_bytes += len as u64;
            st.unsynced_since.get_or_insert_with(std::time::Instant::now);
            st.stats.commits += 1;
            st.stats.bytes_written += len as u64;
            for (conv, e, copy_of) in entries {
                match copy_of {
                    None => st.index.insert(conv, e),
                    // Not indexed until durable: a snapshot holds only synced positions, and the
                    // original must stay reachable until its copy survives a power loss.
                    Some(from) => st.unsynced_copies.push((conv, e, from)),
                }
            }
            st.wake_all();
        }
        if sync || self.inner.state.borrow().unsynced_bytes >= self.inner.config.interval_bytes {
            self.sync_now().await?;
        }
        Ok(end - first)
    }

    /// fdatasyncs the active segment; everything written becomes acknowledged for `Sync`.
    async fn sync_now(&self) -> Result<(), JournalError> {
        let (file, target) = {
            let st = self.inner.state.borrow();
            if st.health != Health::Healthy && !matches!(st.health, Health::NoSpace) {
                return Ok(());
            }
            let Some(active) = st.active else { return Ok(()) };
            (st.segments[&active].file.clone(), st.written)
        };
        let res = file.fdatasync().await;
        let mut st = self.inner.state.borrow_mut();
        match res {
            Ok(()) => {
                st.stats.fdatasyncs += 1;
                if target.position >= st.synced.position {
                    st.synced = target;
                    st.settle_copies();
                }
                if st.written == target {
                    st.unsynced_bytes = 0;
                    st.unsynced_since = None;
                    st.sync_requested = false;
                }
                st.wake_all();
                Ok(())
            }
            Err(e) => {
                let why = format!("fdatasync failed: {e}");
                st.fail(why.clone());
                Err(JournalError::Failed(why))
            }
        }
    }

    fn no_space(st: &mut State<S::File>, first_dropped: u64) {
        tracing::warn!(first_dropped, "journal device full: refusing appends until space is freed");
        st.health = Health::NoSpace;
        st.generation += 1;
        let g = st.generation;
        st.drops.push_back((g, first_dropped));
        if st.drops.len() > DROPS_KEPT {
            st.drops.pop_front();
        }
        st.recycle_pending();
        st.next_position = first_dropped;
        st.wake_all();
    }

    /// Leaves `NoSpace` (the operator or a retention pass freed space). No-op otherwise.
    pub fn resume_after_no_space(&self) {
        let mut st = self.inner.state.borrow_mut();
        if st.health == Health::NoSpace {
            st.health = Health::Healthy;
        }
    }

    /// Seals the active segment (if any) and creates the next one, whose base is the next
    /// position to be written. Returns false when the device is full (state is then `NoSpace`).
    pub(super) async fn roll(&self) -> Result<bool, JournalError> {
        let cfg = self.inner.config.clone();
        let seal = {
            let st = self.inner.state.borrow();
            st.active.and_then(|a| {
                let seg = &st.segments[&a];
                (!seg.sealed).then(|| (seg.file.clone(), st.written, a))
            })
        };
        if let Some((file, point, base)) = seal {
            let mut b = Vec::with_capacity(BLOCK_BYTES);
            encode_frame(&mut b, &[], point.prev_crc, base, point.position, FRAME_FLAG_SEAL);
            let res = match file.write_at(point.offset, &b).await {
                Ok(_) => file.fdatasync().await,
                Err(e) => Err(e),
            };
            let mut st = self.inner.state.borrow_mut();
            match res {
                Ok(()) => {
                    st.stats.fdatasyncs += 1;
                    st.synced = st.written;
                    st.settle_copies();
                    st.unsynced_bytes = 0;
                    st.unsynced_since = None;
                    st.segments.get_mut(&base).expect("active").sealed = true;
                    st.active = None;
                    st.wake_all();
                }
                Err(e) if is_no_space(&e) => {
                    let first = st.written.position;
                    Self::no_space(&mut st, first);
                    return Ok(false);
                }
                Err(e) => {
                    let why = format!("sealing segment {base} failed: {e}");
                    st.fail(why.clone());
                    return Err(JournalError::Failed(why));
                }
            }
        }
        let (base, header) = {
            let mut st = self.inner.state.borrow_mut();
            st.active = None;
            let base = st.written.position;
            // A segment already named for this base holds no record (its records would have
            // positions ≥ base, so the next position would be past it): it is replaced.
            st.segments.remove(&base);
            let header = SegmentHeader {
                version: FORMAT_VERSION,
                flags: if cfg.interval_allowed { SEGMENT_FLAG_EARLY_ACK } else { 0 },
                shard: self.inner.shard,
                epoch: st.epoch,
                base_position: base,
                segment_bytes: cfg.segment_bytes,
                created_us: now_us(),
                frame_bytes_max: cfg.frame_bytes_max,
            };
            (base, header)
        };
        let name = segment_name(base);
        let created = self.create_segment(&name, &header).await;
        let mut st = self.inner.state.borrow_mut();
        match created {
            Ok(file) => {
                st.segments.insert(base, Segment { file: Rc::new(file), header, sealed: false, quarantined: false });
                st.active = Some(base);
                let point = WritePoint { position: base, segment: base, offset: SEGMENT_HEADER_BYTES as u64, prev_crc: header.crc() };
                st.written = point;
                st.synced = point;
                st.stats.segments_created += 1;
                Ok(true)
            }
            Err(e) if is_no_space(&e) => {
                let first = st.written.position;
                Self::no_space(&mut st, first);
                Ok(false)
            }
            Err(e) => {
                let why = format!("creating segment {name} failed: {e}");
                st.fail(why.clone());
                Err(JournalError::Failed(why))
            }
        }
    }

    async fn create_segment(&self, name: &str, header: &SegmentHeader) -> io::Result<S::File> {
        let storage = &self.inner.storage;
        // A leftover from a crash during an earlier roll (recovery removes headerless ones; this
        // covers a failed create in this run).
        let _ = storage.remove(name).await;
        let file = match storage.create(name, header.segment_bytes).await {
            Ok(f) => f,
            Err(e) => {
                let _ = storage.remove(name).await;
                return Err(e);
            }
        };
        let res = async {
            file.write_at(0, &header.encode()).await?;
            file.fdatasync().await?;
            storage.sync_dir().await
        }
        .await;
        if let Err(e) = res {
            let _ = storage.remove(name).await;
            return Err(e);
        }
        Ok(file)
    }

    /// Writes an index snapshot of everything synced (write temp, fdatasync, rename, fsync the
    /// directory) and removes snapshots beyond `snapshots_kept`. Call every few seconds; recovery
    /// then replays only what came after the newest one.
    pub async fn write_snapshot(&self) -> Result<u64, JournalError> {
        let (bytes, position) = {
            let st = self.inner.state.borrow();
            let meta = SnapshotMeta {
                shard: self.inner.shard,
                epoch: st.epoch,
                next_position: st.synced.position,
                segment: st.synced.segment,
                next_offset: st.synced.offset,
                prev_crc: st.synced.prev_crc,
            };
            (st.index.encode_snapshot(&meta), meta.next_position)
        };
        let name = snapshot_name(position);
        write_file_atomically(&self.inner.storage, &name, &bytes).await.map_err(|e| io_err("snapshot", &e))?;
        let names = self.inner.storage.list().await.map_err(|e| io_err("list", &e))?;
        let mut snaps: Vec<u64> = names.iter().filter_map(|n| parse_numbered(n, "idx")).collect();
        snaps.sort_unstable();
        let keep = self.inner.config.snapshots_kept.max(1) as usize;
        if snaps.len() > keep {
            for old in &snaps[..snaps.len() - keep] {
                let _ = self.inner.storage.remove(&snapshot_name(*old)).await;
            }
        }
        self.inner.state.borrow_mut().stats.snapshots += 1;
        Ok(position)
    }

    /// Clean shutdown: waits for everything appended to be synced, writes a snapshot and the
    /// clean marker, stops the committer. Appends are refused from the moment it is called.
    pub async fn close(&self) -> Result<(), JournalError> {
        self.inner.state.borrow_mut().closing = true;
        self.flush().await?;
        self.write_snapshot().await?;
        let position = self.inner.state.borrow().synced.position;
        let epoch = self.epoch();
        write_file_atomically(&self.inner.storage, CLEAN_MARKER, &encode_clean_marker(position, epoch))
            .await
            .map_err(|e| io_err("clean marker", &e))?;
        let mut st = self.inner.state.borrow_mut();
        st.health = Health::Closed;
        st.wake_all();
        drop(st);
        self.inner.work.notify();
        Ok(())
    }
}

/// The clean marker's contents: position, epoch, CRC.
pub fn encode_clean_marker(position: u64, epoch: u64) -> Vec<u8> {
    let mut b = Vec::with_capacity(20);
    b.extend_from_slice(&position.to_le_bytes());
    b.extend_from_slice(&epoch.to_le_bytes());
    let crc = super::format::crc32c(&b);
    b.extend_from_slice(&crc.to_le_bytes());
    b
}

/// Decodes a clean marker: (position, epoch).
pub fn decode_clean_marker(b: &[u8]) -> Option<(u64, u64)> {
    let b = b.get(..20)?;
    (super::format::crc32c(&b[..16]) == u32::from_le_bytes(b[16..20].try_into().ok()?)).then(|| {
        (u64::from_le_bytes(b[0..8].try_into().expect("8")), u64::from_le_bytes(b[8..16].try_into().expect("8")))
    })
}

/// Writes `name` so that it is either absent, the old version, or the new one whole: temp file,
/// fdatasync, rename, fsync of the directory. Contents are zero-padded to the block size.
pub async fn write_file_atomically<S: Storage>(storage: &S, name: &str, bytes: &[u8]) -> io::Result<()> {
    let tmp = format!("{name}{TMP_SUFFIX}");
    let _ = storage.remove(&tmp).await;
    let file = storage.create(&tmp, 0).await?;
    let mut padded = bytes.to_vec();
    padded.resize(align_up(bytes.len().max(1)), 0);
    let res = async {
        let n = file.write_at(0, &padded).await?;
        if n != padded.len() {
            return Err(io::Error::from_raw_os_error(libc::ENOSPC));
        }
        file.fdatasync().await
    }
    .await;
    if let Err(e) = res {
        let _ = storage.remove(&tmp).await;
        return Err(e);
    }
    storage.rename(&tmp, name).await?;
    storage.sync_dir().await
}

/// Wall clock in microseconds since the Unix epoch (segment creation time, for operators only).
fn now_us() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_micros() as u64)
}

enum Work {
    Stop(Result<(), JournalError>),
    Commit,
    Sync,
    Wait,
    WaitOrSyncAfter(Duration),
}

/// Future returned by [`Journal::acked`].
#[must_use = "futures do nothing unless awaited"]
pub struct Acked<S: Storage> {
    journal: Journal<S>,
    ticket: Ticket,
}

impl<S: Storage> Future for Acked<S> {
    type Output = Result<(), JournalError>;
    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let t = self.ticket;
        let mut st = self.journal.inner.state.borrow_mut();
        if st.dropped(&t) {
            return Poll::Ready(Err(JournalError::NoSpace));
        }
        let mark = match t.durability {
            Durability::Sync => st.synced.position,
            Durability::Interval => st.written.position,
        };
        if t.position < mark {
            return Poll::Ready(Ok(()));
        }
        match &st.health {
            Health::Failed(why) => return Poll::Ready(Err(JournalError::Failed(why.clone()))),
            Health::Closed => return Poll::Ready(Err(JournalError::Closed)),
            Health::Healthy | Health::NoSpace => {}
        }
        st.waiters.push(cx.waker().clone());
        Poll::Pending
    }
}
