//! Opening a journal: recovery at shard start, before the shard says it is ready.
//!
//! Steps: remove temp files; read every segment header; load the newest valid index snapshot;
//! replay the frames after it (all of them without one) checking bounds, CRC, positions and the
//! chain; cut a torn tail of the last segment (zeroing it, so stale bytes cannot be mistaken for
//! frames later); quarantine any segment with damage followed by valid data (a note beside it,
//! the segment closed for writing but still read) and report the lost positions; decide whether
//! anything that may have been acknowledged is missing, and if so bump the epoch (in a new
//! segment's header, so the bump is itself durable before anything else is acknowledged).
//!
//! What may have been acknowledged: in `sync` mode only synced frames were acknowledged, and a
//! frame is written only after the previous one's fdatasync returned, so a torn last frame was
//! never acknowledged: the epoch is kept. Damage followed by valid frames means synced data was
//! lost: the epoch is bumped. When `interval` durability was allowed (segment header flag),
//! an unclean shutdown may have lost acknowledged-but-unsynced frames without a trace: the epoch
//! is bumped unless the clean marker proves a clean close.
//!
//! Damage before the snapshot point is not re-read at open (that is what the snapshot saves);
//! `verify` reads everything.

use std::collections::BTreeMap;
use std::fmt::{self, Write as _};
use std::ops::Range;
use std::rc::Rc;

use super::format::{check_frame, SegmentHeader, BLOCK_BYTES, SEGMENT_FLAG_EARLY_ACK, SEGMENT_HEADER_BYTES};
use super::index::{ConversationIndex, IndexEntry, Location, SnapshotError, SnapshotMeta};
use super::scan::{scan_segment, ScanStart, SegmentEnd};
use super::storage::{Storage, StorageFile};
use super::writer::{
    decode_clean_marker, parse_numbered, quarantine_name, segment_name, snapshot_name, write_file_atomically, Journal,
    Segment, State, WritePoint, CLEAN_MARKER, TMP_SUFFIX,
};
use super::format::frame_records;
use super::{JournalConfig, JournalError};

/// Lost data found at open.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Damage {
    /// The segment (base position) holding the damage, or following the missing range.
    pub segment: u64,
    /// Damaged bytes in that segment (empty for a missing range).
    pub offsets: Range<u64>,
    /// Positions lost (may be empty: a damaged seal loses nothing).
    pub lost_positions: Range<u64>,
    /// What was wrong.
    pub reason: String,
    /// Found and reported by an earlier open (the quarantine note has it): the epoch was
    /// bumped for it then.
    pub already_reported: bool,
}

impl Damage {
    fn key(&self) -> String {
        format!(
            "offsets {}..{} lost {}..{}",
            self.offsets.start, self.offsets.end, self.lost_positions.start, self.lost_positions.end
        )
    }
}

/// A torn tail cut at open.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TruncatedTail {
    /// The last segment.
    pub segment: u64,
    /// Where its valid data ends now.
    pub offset: u64,
    /// Bytes zeroed after that.
    pub bytes_zeroed: u64,
    /// What was there.
    pub reason: String,
}

/// What recovery found and did. Log it whole; act on `acked_may_be_missing` and `epoch`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RecoveryReport {
    /// The shard.
    pub shard: u32,
    /// Epoch of the newest segment before this open (`None`: a new journal).
    pub previous_epoch: Option<u64>,
    /// Epoch from now on.
    pub epoch: u64,
    /// The last run closed cleanly (clean marker matching the recovered end).
    pub clean_shutdown: bool,
    /// `interval` durability was allowed in the newest segment.
    pub early_ack_possible: bool,
    /// Something that may have been acknowledged is missing: the epoch was bumped, and resuming
    /// clients must be told `recovered = false`.
    pub acked_may_be_missing: bool,
    /// Segments in use after recovery.
    pub segments: usize,
    /// Oldest position still on disk.
    pub first_position: u64,
    /// The position the next append gets.
    pub next_position: u64,
    /// The snapshot used (its position), if any.
    pub snapshot_used: Option<u64>,
    /// Snapshots skipped and why.
    pub snapshots_rejected: Vec<(String, String)>,
    /// Frames replayed after the snapshot.
    pub frames_replayed: u64,
    /// Records in them.
    pub records_replayed: u64,
    /// Bytes scanned.
    pub bytes_replayed: u64,
    /// The cut tail, if any.
    pub truncated_tail: Option<TruncatedTail>,
    /// Damage found (new and already known).
    pub damage: Vec<Damage>,
    /// Headerless segment files removed (a crash while creating a segment; nothing in them).
    pub discarded_segments: Vec<String>,
}

impl fmt::Display for RecoveryReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "shard {} journal: epoch {} (was {:?}), positions {}..{}, {} segments, clean shutdown {}, acked data may be missing: {}",
            self.shard,
            self.epoch,
            self.previous_epoch,
            self.first_position,
            self.next_position,
            self.segments,
            self.clean_shutdown,
            self.acked_may_be_missing
        )?;
        writeln!(
            f,
            "  snapshot {:?}, replayed {} frames / {} records / {} bytes",
            self.snapshot_used, self.frames_replayed, self.records_replayed, self.bytes_replayed
        )?;
        for (name, why) in &self.snapshots_rejected {
            writeln!(f, "  snapshot {name} rejected: {why}")?;
        }
        if let Some(t) = &self.truncated_tail {
            writeln!(f, "  torn tail cut in segment {} at offset {} ({} bytes zeroed): {}", t.segment, t.offset, t.bytes_zeroed, t.reason)?;
        }
        for d in &self.damage {
            writeln!(
                f,
                "  DAMAGE in segment {}: {} ({}){}",
                d.segment,
                d.key(),
                d.reason,
                if d.already_reported { " [already reported]" } else { "" }
            )?;
        }
        for n in &self.discarded_segments {
            writeln!(f, "  discarded headerless segment {n}")?;
        }
        Ok(())
    }
}

enum Found<F> {
    Valid { file: Rc<F>, header: SegmentHeader, len: u64 },
    BadHeader { reason: String, len: u64, probe_end: Option<u64> },
}

fn io_err(op: &'static str) -> impl Fn(std::io::Error) -> JournalError {
    move |e| JournalError::Io { op, kind: e.kind(), message: e.to_string() }
}

impl<S: Storage> Journal<S> {
    /// Opens (creating if empty) the journal in `storage` for `shard` and recovers it. The
    /// caller spawns [`Journal::run_committer`] next.
    // The steps of the module doc, top to bottom; split, they would pass a dozen locals around.
    #[allow(clippy::too_many_lines)]
    pub async fn open(storage: S, shard: u32, config: JournalConfig) -> Result<(Self, RecoveryReport), JournalError> {
        config.validate()?;
        let mut report = RecoveryReport { shard, ..RecoveryReport::default() };
        let names = storage.list().await.map_err(io_err("list"))?;
        for n in names.iter().filter(|n| n.ends_with(TMP_SUFFIX)) {
            storage.remove(n).await.map_err(io_err("remove temp"))?;
        }
        let mut bases: Vec<u64> = names.iter().filter_map(|n| parse_numbered(n, "seg")).collect();
        bases.sort_unstable();
        let mut snaps: Vec<u64> = names.iter().filter_map(|n| parse_numbered(n, "idx")).collect();
        snaps.sort_unstable_by(|a, b| b.cmp(a));
        let mut notes: BTreeMap<u64, String> = BTreeMap::new();
        for base in names.iter().filter_map(|n| parse_numbered(n, "quarantine")) {
            let text = read_whole(&storage, &quarantine_name(base)).await?;
            notes.insert(base, String::from_utf8_lossy(&text).trim_end_matches('\0').to_string());
        }
        let clean = if names.iter().any(|n| n == CLEAN_MARKER) {
            decode_clean_marker(&read_whole(&storage, CLEAN_MARKER).await?)
        } else {
            None
        };

        // Headers.
        let mut found: Vec<(u64, Found<S::File>)> = Vec::new();
        for (i, &base) in bases.iter().enumerate() {
            let name = segment_name(base);
            let file = storage.open(&name).await.map_err(io_err("open segment"))?;
            let len = file.len().await.map_err(io_err("segment length"))?;
            let head = file.read_at(0, SEGMENT_HEADER_BYTES).await.map_err(io_err("read header"))?;
            match SegmentHeader::decode(&head) {
                Ok(h) if h.base_position == base => {
                    if h.shard != shard {
                        return Err(JournalError::ForeignShard { expected: shard, found: h.shard });
                    }
                    found.push((base, Found::Valid { file: Rc::new(file), header: h, len }));
                }
                res => {
                    let reason = match res {
                        Ok(h) => format!("header says base {} in file {name}", h.base_position),
                        Err(e) => e.to_string(),
                    };
                    let data = file.read_at(0, len as usize).await.map_err(io_err("read segment"))?;
                    let probe_end = probe_frames(&data, base);
                    if probe_end.is_none() && i + 1 == bases.len() {
                        // A crash while creating the segment: its header never became durable, so
                        // nothing was ever written (let alone acknowledged) in it.
                        drop(file);
                        storage.remove(&name).await.map_err(io_err("remove segment"))?;
                        storage.sync_dir().await.map_err(io_err("sync dir"))?;
                        report.discarded_segments.push(name);
                    } else {
                        found.push((base, Found::BadHeader { reason, len, probe_end }));
                    }
                }
            }
        }
        let first_valid = found.iter().find_map(|(b, f)| matches!(f, Found::Valid { .. }).then_some(*b));

        // Snapshot.
        let mut snapshot: Option<(SnapshotMeta, ConversationIndex)> = None;
        for &pos in &snaps {
            let name = snapshot_name(pos);
            let bytes = read_whole(&storage, &name).await?;
            let decoded = ConversationIndex::decode_snapshot(
                &bytes,
                config.retention_messages_max as usize,
                config.retention_state_max as usize,
                first_valid.unwrap_or(0),
            )
            .and_then(|(meta, ix)| {
                let ok = meta.shard == shard
                    && meta.next_position >= meta.segment
                    && found.iter().any(|(b, f)| {
                        *b == meta.segment
                            && matches!(f, Found::Valid { header, .. }
                                if meta.next_offset >= SEGMENT_HEADER_BYTES as u64 && meta.next_offset < header.segment_bytes)
                    });
                if ok { Ok((meta, ix)) } else { Err(SnapshotError::Stale) }
            });
            match decoded {
                Ok(s) => {
                    report.snapshot_used = Some(pos);
                    snapshot = Some(s);
                    break;
                }
                Err(e) => report.snapshots_rejected.push((name, e.to_string())),
            }
        }
        let (snap_meta, mut index) = match snapshot {
            Some((m, ix)) => (Some(m), ix),
            None => (
                None,
                ConversationIndex::new(config.retention_messages_max as usize, config.retention_state_max as usize),
            ),
        };

        // Replay.
        let mut segments: BTreeMap<u64, Segment<S::File>> = BTreeMap::new();
        let mut expected: Option<u64> = None;
        let mut tail: Option<(u64, WritePoint)> = None; // (base, point) of the last valid segment
        let mut damaged: BTreeMap<u64, Vec<Damage>> = BTreeMap::new();
        let count = found.len();
        let reads: Vec<(usize, Rc<S::File>, u64)> = found
            .iter()
            .enumerate()
            .filter_map(|(i, (base, f))| match f {
                Found::Valid { file, len, .. } if snap_meta.is_none_or(|m| *base >= m.segment) => {
                    Some((i, file.clone(), *len))
                }
                _ => None,
            })
            .collect();
        let mut prefetched: Option<(usize, Vec<u8>)> = None;
        for (i, (base, f)) in found.into_iter().enumerate() {
            let is_last = i + 1 == count;
            let next_base = bases.iter().copied().find(|b| *b > base);
            match f {
                Found::BadHeader { reason, len, probe_end } => {
                    let start = expected.unwrap_or(base).min(base);
                    let end = next_base.or(probe_end).unwrap_or(base).max(start);
                    damaged.entry(base).or_default().push(Damage {
                        segment: base,
                        offsets: 0..len,
                        lost_positions: start..end,
                        reason: format!("segment header: {reason}"),
                        already_reported: false,
                    });
                    expected = Some(end);
                }
                Found::Valid { file, header, len } => {
                    if let Some(exp) = expected {
                        if exp != base {
                            damaged.entry(base).or_default().push(Damage {
                                segment: base,
                                offsets: 0..0,
                                lost_positions: exp.min(base)..base.max(exp),
                                reason: if exp < base {
                                    "positions missing before this segment (segment file lost?)".into()
                                } else {
                                    "segment starts before the previous one ended".into()
                                },
                                already_reported: false,
                            });
                        }
                    }
                    let mut seg = Segment { file: file.clone(), header, sealed: !is_last, quarantined: false };
                    if snap_meta.is_some_and(|m| base < m.segment) {
                        // Covered by the snapshot: not re-read.
                        expected = None;
                        segments.insert(base, seg);
                        continue;
                    }
                    let start = match snap_meta {
                        Some(m) if m.segment == base => {
                            ScanStart { offset: m.next_offset, position: m.next_position, prev_crc: m.prev_crc }
                        }
                        _ => ScanStart { offset: SEGMENT_HEADER_BYTES as u64, position: base, prev_crc: header.crc() },
                    };
                    // The next segment's read is started before this one is scanned, so a backend
                    // that submits on first poll overlaps the two. glommio submits when the task
                    // yields, i.e. after the scan: measured, no overlap there yet (see the bench);
                    // a spawned prefetch task would need the executor, which this code does not name.
                    let data = match prefetched.take() {
                        Some((at, d)) if at == i => d,
                        _ => file.read_at(0, len as usize).await.map_err(io_err("read segment"))?,
                    };
                    let next = reads.iter().find(|r| r.0 > i).cloned();
                    let (next_data, scan) = futures_lite::future::zip(
                        async {
                            match next {
                                Some((at, f, l)) => Some(f.read_at(0, l as usize).await.map(|d| (at, d))),
                                None => None,
                            }
                        },
                        async { replay_segment(&data, base, start, &header, &mut index) },
                    )
                    .await;
                    prefetched = next_data.transpose().map_err(io_err("read segment"))?;
                    report.frames_replayed += scan.frames;
                    report.records_replayed += scan.records;
                    report.bytes_replayed += scan.end_offset.saturating_sub(start.offset);
                    for d in &scan.damage {
                        damaged.entry(base).or_default().push(Damage {
                            segment: base,
                            offsets: d.offsets.clone(),
                            lost_positions: d.lost_positions.clone(),
                            reason: d.reason.to_string(),
                            already_reported: false,
                        });
                    }
                    let mut end_offset = scan.end_offset;
                    match scan.end {
                        SegmentEnd::Sealed { .. } => seg.sealed = true,
                        SegmentEnd::Clean { .. } => {}
                        SegmentEnd::Torn { offset, reason } if is_last => {
                            let zeroed = zero_tail(&*file, &data, offset).await?;
                            report.truncated_tail = Some(TruncatedTail {
                                segment: base,
                                offset,
                                bytes_zeroed: zeroed,
                                reason: reason.to_string(),
                            });
                            end_offset = offset;
                        }
                        SegmentEnd::Torn { offset, reason } => {
                            damaged.entry(base).or_default().push(Damage {
                                segment: base,
                                offsets: offset..len,
                                lost_positions: scan.next_position..scan.next_position,
                                reason: format!("{reason} before the end of a closed segment"),
                                already_reported: false,
                            });
                        }
                    }
                    expected = Some(scan.next_position);
                    tail = Some((
                        base,
                        WritePoint { position: scan.next_position, segment: base, offset: end_offset, prev_crc: scan.last_crc },
                    ));
                    segments.insert(base, seg);
                }
            }
        }

        // Quarantine notes: what is new gets written down (after the epoch bump is durable,
        // below), so the next open does not bump the epoch again for the same loss.
        let mut notes_to_write: Vec<(u64, String)> = Vec::new();
        for (base, list) in &mut damaged {
            let note = notes.get(base).cloned().unwrap_or_default();
            let mut new_lines = String::new();
            for d in list.iter_mut() {
                d.already_reported = note.lines().any(|l| l.starts_with(&d.key()));
                if !d.already_reported {
                    let _ = writeln!(new_lines, "{} {}", d.key(), d.reason);
                }
            }
            if !new_lines.is_empty() {
                let text = format!("{note}{}{new_lines}", if note.is_empty() || note.ends_with('\n') { "" } else { "\n" });
                notes_to_write.push((*base, text));
                tracing::error!(shard, segment = base, "journal damage found: {}", new_lines.trim_end());
            }
            if let Some(seg) = segments.get_mut(base) {
                seg.quarantined = true;
                seg.sealed = true;
            }
            report.damage.extend(list.iter().cloned());
        }

        // Epoch and verdict.
        let newest = segments.values().next_back().map(|s| s.header);
        let previous_epoch = segments.values().map(|s| s.header.epoch).max().max(snap_meta.map(|m| m.epoch));
        // A damaged segment after the last readable one still consumed its positions.
        let next_position = tail.map_or(0, |t| t.1.position).max(expected.unwrap_or(0));
        report.previous_epoch = previous_epoch;
        report.early_ack_possible = newest.is_some_and(|h| h.flags & SEGMENT_FLAG_EARLY_ACK != 0);
        report.clean_shutdown = clean.is_some_and(|(p, e)| p == next_position && Some(e) == previous_epoch);
        let new_loss = report.damage.iter().any(|d| !d.already_reported && !d.lost_positions.is_empty());
        report.acked_may_be_missing = new_loss || (report.early_ack_possible && !report.clean_shutdown);
        let epoch = match previous_epoch {
            None => 1,
            Some(e) => e + u64::from(report.acked_may_be_missing),
        };
        report.epoch = epoch;

        let point = tail.map_or(
            WritePoint { position: next_position, segment: 0, offset: SEGMENT_HEADER_BYTES as u64, prev_crc: 0 },
            |t| WritePoint { position: next_position, ..t.1 },
        );
        let active = tail.filter(|t| t.1.position == next_position).map(|t| t.0).filter(|b| {
            let s = &segments[b];
            !s.sealed
                && !s.quarantined
                && s.header.epoch == epoch
                && s.header.segment_bytes == config.segment_bytes
                && s.header.frame_bytes_max == config.frame_bytes_max
                && (s.header.flags & SEGMENT_FLAG_EARLY_ACK != 0) == config.interval_allowed
        });
        if let (Some(a), None) = (tail.map(|t| t.0), active) {
            // Not written to again: a later open must not treat it as the tail.
            if let Some(s) = segments.get_mut(&a) {
                s.sealed = true;
            }
        }
        let mut state = State::new(epoch, index, point);
        state.segments = segments;
        state.active = active;
        let journal = Journal::from_parts(storage, config, shard, state);
        // The new epoch is durable once a segment header carries it; only then may the damage be
        // recorded as reported (a crash in between reports it, and bumps, again).
        let epoch_durable = if active.is_none() { journal.roll().await? } else { true };
        if epoch_durable {
            for (base, text) in &notes_to_write {
                write_file_atomically(&journal.inner.storage, &quarantine_name(*base), text.as_bytes())
                    .await
                    .map_err(io_err("quarantine note"))?;
            }
        }
        if let Some(a) = active {
            // What recovery read might sit in a volatile device cache (the last run crashed
            // before syncing it); make it durable before anything that depends on it is acked.
            let file = journal.inner.state.borrow().segments[&a].file.clone();
            file.fdatasync().await.map_err(io_err("fdatasync"))?;
        }
        if clean.is_some() || names.iter().any(|n| n == CLEAN_MARKER) {
            journal.inner.storage.remove(CLEAN_MARKER).await.map_err(io_err("remove clean marker"))?;
            journal.inner.storage.sync_dir().await.map_err(io_err("sync dir"))?;
        }
        {
            let st = journal.inner.state.borrow();
            report.segments = st.segments.len();
            report.first_position = st.segments.keys().next().copied().unwrap_or(st.next_position);
            report.next_position = st.next_position;
        }
        if report.acked_may_be_missing || !report.damage.is_empty() || report.truncated_tail.is_some() {
            tracing::warn!("{report}");
        } else {
            tracing::info!("{report}");
        }
        Ok((journal, report))
    }
}

async fn read_whole<S: Storage>(storage: &S, name: &str) -> Result<Vec<u8>, JournalError> {
    let f = storage.open(name).await.map_err(io_err("open"))?;
    let len = f.len().await.map_err(io_err("length"))?;
    f.read_at(0, len as usize).await.map_err(io_err("read"))
}

/// The end position of the furthest valid frame of segment `base` in `data`, if any.
fn probe_frames(data: &[u8], base: u64) -> Option<u64> {
    let mut end = None;
    let mut at = SEGMENT_HEADER_BYTES;
    while at < data.len() {
        if let Ok(fh) = check_frame(&data[at..], super::format::FRAME_BYTES_LIMIT) {
            if fh.segment_base == base {
                end = end.max(Some(fh.end_position()));
            }
        }
        at += BLOCK_BYTES;
    }
    end
}

/// Zeroes the torn tail from `offset` up to the first all-zero block, and syncs.
async fn zero_tail<F: StorageFile>(file: &F, data: &[u8], offset: u64) -> Result<u64, JournalError> {
    let mut end = offset as usize;
    while end < data.len() && data[end..(end + BLOCK_BYTES).min(data.len())].iter().any(|&b| b != 0) {
        end += BLOCK_BYTES;
    }
    let n = end - offset as usize;
    if n > 0 {
        file.write_at(offset, &vec![0u8; n]).await.map_err(io_err("zero tail"))?;
        file.fdatasync().await.map_err(io_err("fdatasync"))?;
    }
    Ok(n as u64)
}

/// Scans one segment from `start`, indexing every record of every valid frame (what `open`
/// does after reading a segment; public so the recovery benchmark measures this very code).
/// A compactor's copy and its original are both ordinary records here; the index keeps one
/// entry for the two, at the copy (the newer position).
pub fn replay_segment(
    data: &[u8],
    base: u64,
    start: ScanStart,
    header: &SegmentHeader,
    index: &mut ConversationIndex,
) -> super::scan::SegmentScan {
    scan_segment(data, base, start, header.frame_bytes_max as usize, |off, fh, frame| {
        for (i, (rec_off, r)) in frame_records(frame, fh).enumerate() {
            index.insert(
                r.conversation,
                IndexEntry {
                    seq: r.seq,
                    position: fh.first_position + i as u64,
                    timestamp_us: r.timestamp_us,
                    kind: r.kind,
                    fingerprint: IndexEntry::fingerprint_of(r.kind, r.payload),
                    loc: Location {
                        segment: base,
                        frame_offset: off as u32,
                        frame_len: fh.frame_len,
                        record_offset: rec_off,
                        record_len: r.encoded_bytes() as u32,
                    },
                },
            );
        }
    })
}
