//! `switchboard journal inspect|verify DIR`: what is on disk, for operators.
//!
//! Reads with `std::fs` (no executor needed; the engine need not run) and changes nothing.
//! `inspect` checks every segment header and scans every frame (bounds, CRC, positions,
//! chain); `verify` also checks that every entry of every snapshot points at a record that is
//! there. Both return a [`Report`]; its `Display` is the printout, `is_ok()` the exit status.

use std::fmt;
use std::io;
use std::path::{Path, PathBuf};

use super::format::{check_frame, record_at, SegmentHeader, SEGMENT_HEADER_BYTES};
use super::index::{ConversationIndex, SnapshotMeta};
use super::scan::{scan_segment, DamageSpan, ScanStart, SegmentEnd};
use super::writer::{decode_clean_marker, parse_numbered, CLEAN_MARKER, TMP_SUFFIX};

/// One segment as found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SegmentReport {
    /// File name.
    pub name: String,
    /// Base position (from the name).
    pub base: u64,
    /// File length.
    pub file_bytes: u64,
    /// The header, or why it is unreadable.
    pub header: Result<SegmentHeader, String>,
    /// Valid frames.
    pub frames: u64,
    /// Records in them.
    pub records: u64,
    /// Position after the last valid record.
    pub next_position: u64,
    /// Bytes up to the end of valid data.
    pub used_bytes: u64,
    /// How the data ends (`None` when the header is unreadable).
    pub end: Option<SegmentEnd>,
    /// Damage followed by valid frames.
    pub damage: Vec<DamageSpan>,
    /// CRC of the last valid frame (the chain head).
    pub last_crc: u32,
    /// Contents of its quarantine note, if any.
    pub quarantine_note: Option<String>,
}

/// One snapshot as found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SnapshotReport {
    /// File name.
    pub name: String,
    /// Where it stands, or why it is unreadable.
    pub meta: Result<SnapshotMeta, String>,
    /// Conversations and entries in it.
    pub conversations: usize,
    /// Index entries in it.
    pub entries: u64,
    /// `verify` only: entries whose record is not where the snapshot says.
    pub bad_entries: Option<u64>,
}

/// Everything found in a journal directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Report {
    /// The directory.
    pub dir: PathBuf,
    /// Segments, oldest first.
    pub segments: Vec<SegmentReport>,
    /// Snapshots, newest first.
    pub snapshots: Vec<SnapshotReport>,
    /// The clean marker: (position, epoch), if present and valid.
    pub clean_marker: Option<(u64, u64)>,
    /// Damage: anything here means data was lost or a file is wrong.
    pub problems: Vec<String>,
    /// Worth knowing, not damage (a torn tail recovery will cut, leftover temp files).
    pub notes: Vec<String>,
}

impl Report {
    /// True when nothing is damaged.
    pub fn is_ok(&self) -> bool {
        self.problems.is_empty()
    }
}

/// Reads and checks every segment and snapshot in `dir`.
// One pass over the directory, in the order the printout shows it.
#[allow(clippy::too_many_lines)]
pub fn inspect(dir: &Path) -> io::Result<Report> {
    let mut names: Vec<String> = std::fs::read_dir(dir)?
        .filter_map(Result::ok)
        .filter_map(|e| e.file_name().to_str().map(str::to_string))
        .collect();
    names.sort();
    let mut report = Report {
        dir: dir.to_path_buf(),
        segments: Vec::new(),
        snapshots: Vec::new(),
        clean_marker: None,
        problems: Vec::new(),
        notes: Vec::new(),
    };
    for n in names.iter().filter(|n| n.ends_with(TMP_SUFFIX)) {
        report.notes.push(format!("leftover temp file {n} (removed at next open)"));
    }
    if names.iter().any(|n| n == CLEAN_MARKER) {
        report.clean_marker = decode_clean_marker(&std::fs::read(dir.join(CLEAN_MARKER))?);
        if report.clean_marker.is_none() {
            report.notes.push("clean marker unreadable".into());
        }
    }
    let bases: Vec<u64> = names.iter().filter_map(|n| parse_numbered(n, "seg")).collect();
    let mut expected: Option<u64> = None;
    for (i, &base) in bases.iter().enumerate() {
        let name = format!("{base:020}.seg");
        let data = std::fs::read(dir.join(&name))?;
        let note_path = dir.join(format!("{base:020}.quarantine"));
        let quarantine_note = std::fs::read(&note_path)
            .ok()
            .map(|b| String::from_utf8_lossy(&b).trim_end_matches('\0').trim_end().to_string());
        let mut seg = SegmentReport {
            name: name.clone(),
            base,
            file_bytes: data.len() as u64,
            header: Err(String::new()),
            frames: 0,
            records: 0,
            next_position: base,
            used_bytes: 0,
            end: None,
            damage: Vec::new(),
            last_crc: 0,
            quarantine_note,
        };
        match SegmentHeader::decode(&data[..data.len().min(SEGMENT_HEADER_BYTES)]) {
            Ok(h) if h.base_position == base => {
                if let Some(exp) = expected {
                    if exp != base {
                        report.problems.push(format!("positions {exp}..{base} missing before {name}"));
                    }
                }
                let start = ScanStart { offset: SEGMENT_HEADER_BYTES as u64, position: base, prev_crc: h.crc() };
                let scan = scan_segment(&data, base, start, h.frame_bytes_max as usize, |_, _, _| {});
                for d in &scan.damage {
                    report.problems.push(format!(
                        "{name}: damage at offsets {}..{}, positions {}..{} lost ({})",
                        d.offsets.start, d.offsets.end, d.lost_positions.start, d.lost_positions.end, d.reason
                    ));
                }
                if let SegmentEnd::Torn { offset, reason } = scan.end {
                    let msg = format!("{name}: torn at offset {offset} ({reason})");
                    if i + 1 == bases.len() {
                        report.notes.push(format!("{msg}; an unacknowledged tail, cut at next open"));
                    } else {
                        report.problems.push(format!("{msg} before the end of a closed segment"));
                    }
                }
                seg.header = Ok(h);
                seg.frames = scan.frames;
                seg.records = scan.records;
                seg.next_position = scan.next_position;
                seg.used_bytes = scan.end_offset;
                seg.end = Some(scan.end);
                seg.damage = scan.damage;
                seg.last_crc = scan.last_crc;
                expected = Some(scan.next_position);
            }
            res => {
                let why = match res {
                    Ok(h) => format!("header says base {}", h.base_position),
                    Err(e) => e.to_string(),
                };
                report.problems.push(format!("{name}: unreadable header ({why})"));
                seg.header = Err(why);
                expected = None;
            }
        }
        report.segments.push(seg);
    }
    let mut snaps: Vec<u64> = names.iter().filter_map(|n| parse_numbered(n, "idx")).collect();
    snaps.sort_unstable_by(|a, b| b.cmp(a));
    for pos in snaps {
        let name = format!("{pos:020}.idx");
        let bytes = std::fs::read(dir.join(&name))?;
        let snap = match ConversationIndex::decode_snapshot(&bytes, usize::MAX, usize::MAX, 0) {
            Ok((meta, ix)) => {
                SnapshotReport { name, meta: Ok(meta), conversations: ix.conversations(), entries: ix.entries(), bad_entries: None }
            }
            Err(e) => {
                report.notes.push(format!("snapshot {name} unusable ({e}); recovery falls back to an older one or a full replay"));
                SnapshotReport { name, meta: Err(e.to_string()), conversations: 0, entries: 0, bad_entries: None }
            }
        };
        report.snapshots.push(snap);
    }
    Ok(report)
}

/// [`inspect`], plus: every entry of every readable snapshot points at its record.
pub fn verify(dir: &Path) -> io::Result<Report> {
    let mut report = inspect(dir)?;
    for snap in &mut report.snapshots {
        if snap.meta.is_err() {
            continue;
        }
        let bytes = std::fs::read(dir.join(&snap.name))?;
        let Ok((_, ix)) = ConversationIndex::decode_snapshot(&bytes, usize::MAX, usize::MAX, 0) else { continue };
        let mut bad = 0u64;
        let mut cache: std::collections::HashMap<u64, Option<Vec<u8>>> = std::collections::HashMap::new();
        for head in ix.heads() {
            let c = head.conversation;
            let entries = ix.messages_from(c, 0, usize::MAX).0.into_iter().chain(ix.state_of(c));
            for e in entries {
                let seg = cache
                    .entry(e.loc.segment)
                    .or_insert_with(|| std::fs::read(dir.join(format!("{:020}.seg", e.loc.segment))).ok());
                let ok = seg.as_ref().is_some_and(|data| {
                    let at = e.loc.frame_offset as usize;
                    data.get(at..).and_then(|b| check_frame(b, e.loc.frame_len as usize).ok()).is_some_and(|_| {
                        record_at(&data[at..at + e.loc.frame_len as usize], e.loc.record_offset as usize)
                            .is_some_and(|(r, _)| r.conversation == c && r.seq == e.seq && r.kind == e.kind)
                    })
                });
                bad += u64::from(!ok);
            }
        }
        if bad > 0 {
            report.problems.push(format!("snapshot {}: {bad} entries do not point at their records", snap.name));
        }
        snap.bad_entries = Some(bad);
    }
    Ok(report)
}

impl fmt::Display for Report {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(f, "journal {}", self.dir.display())?;
        for s in &self.segments {
            match &s.header {
                Ok(h) => writeln!(
                    f,
                    "  {}  shard {} epoch {}  positions {}..{}  {} frames {} records  {}/{} bytes  chain {:08x}  {}{}",
                    s.name,
                    h.shard,
                    h.epoch,
                    s.base,
                    s.next_position,
                    s.frames,
                    s.records,
                    s.used_bytes,
                    s.file_bytes,
                    s.last_crc,
                    match s.end {
                        Some(SegmentEnd::Sealed { .. }) => "sealed",
                        Some(SegmentEnd::Clean { .. }) => "open",
                        Some(SegmentEnd::Torn { .. }) => "TORN",
                        None => "?",
                    },
                    if s.quarantine_note.is_some() { "  QUARANTINED" } else { "" },
                )?,
                Err(why) => writeln!(f, "  {}  UNREADABLE HEADER: {why}", s.name)?,
            }
            if let Some(note) = &s.quarantine_note {
                for line in note.lines() {
                    writeln!(f, "      quarantine: {line}")?;
                }
            }
        }
        for s in &self.snapshots {
            match &s.meta {
                Ok(m) => writeln!(
                    f,
                    "  {}  epoch {} covers positions <{} (segment {} offset {})  {} conversations {} entries{}",
                    s.name,
                    m.epoch,
                    m.next_position,
                    m.segment,
                    m.next_offset,
                    s.conversations,
                    s.entries,
                    s.bad_entries.map_or(String::new(), |b| format!("  {b} bad")),
                )?,
                Err(why) => writeln!(f, "  {}  UNUSABLE: {why}", s.name)?,
            }
        }
        match self.clean_marker {
            Some((p, e)) => writeln!(f, "  clean shutdown at position {p}, epoch {e}")?,
            None => writeln!(f, "  no clean-shutdown marker (running, or the last run did not close cleanly)")?,
        }
        for n in &self.notes {
            writeln!(f, "  note: {n}")?;
        }
        for p in &self.problems {
            writeln!(f, "  PROBLEM: {p}")?;
        }
        writeln!(f, "  {}", if self.is_ok() { "OK" } else { "DAMAGED" })
    }
}
