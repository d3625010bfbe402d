//! Durable per-shard journal (issue 6): nothing acknowledged is lost across crash and restart.
//!
//! Owns the journal directory of one shard and everything in it. Touches nothing else: the
//! shard decides what to append, when to acknowledge, and what a recovery report means for
//! its sessions' epochs.
//!
//! Layout, in the order a record meets it:
//! - [`format`]: the bytes: segment header, group-commit frames, records, the seal (pure).
//! - [`writer`]: [`Journal`]: `append` → [`Ticket`], `acked(ticket).await`, the committer task
//!   (group commit, one fdatasync in flight), segment roll, snapshots, `close`.
//! - [`recover`]: [`Journal::open`]: headers, newest valid snapshot, replay, torn-tail cut,
//!   quarantine, epoch decision, [`RecoveryReport`].
//! - [`scan`]: the recovery scanner over one segment's bytes (pure).
//! - [`index`]: per-conversation rings (seq → segment, frame, record), segment pins, snapshot
//!   codec (pure).
//! - [`reader`]: resume reads ([`Journal::read_messages`]) and retention; [`bulk`]: everything
//!   retained in one pass ([`Journal::read_all_retained`]), for rebuilding sessions at start.
//! - [`compact`]: [`Journal::compact`], the compactor: copies forward what quiet conversations
//!   retain in old, sparse segments, so retention can delete them.
//! - [`storage`]: the [`Storage`] trait and [`MemStorage`] (in memory, fault injection);
//!   [`dma`]: [`DmaStorage`], the glommio direct-I/O backend the engine uses.
//! - [`inspect`]: `switchboard journal inspect|verify DIR`.
//!
//! Shard usage (all on the shard's executor):
//! ```text
//! let (journal, report) = Journal::open(DmaStorage::new(dir)?, shard, cfg).await?;
//! if report.acked_may_be_missing { /* sessions resume with recovered = false */ }
//! glommio::spawn_local({ let j = journal.clone(); async move { j.run_committer().await } }).detach();
//! let ticket = journal.append(&record, Durability::Sync)?;   // never waits
//! journal.acked(ticket).await?;                                // then PUBACK
//! let read = journal.read_messages(conversation, from_seq, max).await?;
//! journal.compact(budget_bytes).await?;      // periodic, before retention
//! journal.apply_retention(now_us).await?;  journal.write_snapshot().await?;  // periodic
//! journal.close().await?;                                      // graceful shutdown
//! ```

pub mod bulk;
pub mod compact;
pub mod dma;
pub mod format;
pub mod index;
pub mod inspect;
pub mod reader;
pub mod recover;
pub mod scan;
pub mod storage;
pub mod writer;

use serde::{Deserialize, Serialize};

pub use compact::CompactOutcome;
pub use dma::DmaStorage;
pub use format::{Record, RecordKind};
pub use inspect::{inspect, verify, Report};
pub use reader::{ResumeRead, RetentionOutcome, StoredRecord};
pub use recover::{Damage, RecoveryReport, TruncatedTail};
pub use storage::{Crash, MemStorage, Storage, StorageFile};
pub use writer::{Health, Journal, JournalStats, Ticket};

use format::{BLOCK_BYTES, FRAME_BYTES_LIMIT, FRAME_HEADER_BYTES, RECORD_HEADER_BYTES, SEGMENT_HEADER_BYTES};

/// What an acknowledgement promises.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Durability {
    /// After the fdatasync covering the record's frame: survives power loss.
    Sync,
    /// After the frame's write (`O_DIRECT`: it reached the device); synced every `interval_ms`
    /// or `interval_bytes`. Survives a process kill; power loss may take the last interval.
    /// Allowed only when `interval_allowed` is set (it changes what recovery may assume).
    /// (`none`, memory only, never reaches the journal: the shard does not append those.)
    Interval,
}

/// The journal's limits, each with its unit last; every one sized at open.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct JournalConfig {
    /// Size of each preallocated segment file, in bytes.
    pub segment_bytes: u64,
    /// Largest frame (header + records), in bytes. A record must fit in one frame.
    pub frame_bytes_max: u32,
    /// Most bytes written (and covered by one fdatasync) per commit.
    pub write_bytes_max: u32,
    /// Most record bytes appended but not yet written; past it appends get `Backpressure`.
    pub pending_bytes_max: u64,
    /// Largest record payload, in bytes.
    pub payload_bytes_max: u32,
    /// Whether `Durability::Interval` appends are accepted.
    pub interval_allowed: bool,
    /// Interval mode: sync at least this often while unsynced data exists, in milliseconds.
    pub interval_ms: u64,
    /// Interval mode: sync once this many bytes are unsynced.
    pub interval_bytes: u64,
    /// Messages kept per conversation (the resume window).
    pub retention_messages_max: u32,
    /// State records (events, read cursors) kept per conversation.
    pub retention_state_max: u32,
    /// Records older than this are dropped by the retention pass, in milliseconds (0 = no
    /// age limit).
    pub retention_age_ms: u64,
    /// Total segment bytes per shard; past it the oldest segments are deleted whatever they
    /// hold.
    pub shard_bytes_max: u64,
    /// Index snapshots kept (the newest valid one is used at open).
    pub snapshots_kept: u32,
    /// The compactor picks a sealed segment only when the record bytes still retained in it
    /// are at most this percentage of its size (0 = never compact). See [`Journal::compact`].
    pub compact_live_percent_max: u32,
    /// The compactor picks a segment only once at least this many segments (the active one
    /// included) are newer than it: the newest records are left to die in their rings, and
    /// the compactor's own copies are not copied again before the journal has moved on.
    pub compact_newer_segments_min: u32,
}

impl Default for JournalConfig {
    fn default() -> Self {
        Self {
            segment_bytes: 64 << 20,
            frame_bytes_max: 1 << 20,
            write_bytes_max: 4 << 20,
            pending_bytes_max: 16 << 20,
            payload_bytes_max: 1 << 20,
            interval_allowed: false,
            interval_ms: 100,
            interval_bytes: 4 << 20,
            retention_messages_max: 128,
            retention_state_max: 32,
            retention_age_ms: 0,
            shard_bytes_max: 16 << 30,
            snapshots_kept: 2,
            compact_live_percent_max: 25,
            compact_newer_segments_min: 4,
        }
    }
}

impl JournalConfig {
    /// Checks the limits against each other and the format's bounds.
    pub fn validate(&self) -> Result<(), JournalError> {
        let bad = |what: &str| Err(JournalError::Config(what.to_string()));
        let block = BLOCK_BYTES as u64;
        if self.segment_bytes % block != 0 {
            return bad("segment_bytes must be a multiple of 4096");
        }
        if (self.frame_bytes_max as usize) < FRAME_HEADER_BYTES + RECORD_HEADER_BYTES
            || self.frame_bytes_max as usize > FRAME_BYTES_LIMIT
        {
            return bad("frame_bytes_max out of range");
        }
        // Header + the largest frame (padded) + the seal must fit.
        if self.segment_bytes < SEGMENT_HEADER_BYTES as u64 + format::align_up(self.frame_bytes_max as usize) as u64 + block {
            return bad("segment_bytes too small for frame_bytes_max");
        }
        if self.segment_bytes > u64::from(u32::MAX) {
            return bad("segment_bytes must be below 4 GiB (index offsets are 32-bit)");
        }
        if self.write_bytes_max < self.frame_bytes_max {
            return bad("write_bytes_max must be at least frame_bytes_max");
        }
        if self.pending_bytes_max < u64::from(self.frame_bytes_max) {
            return bad("pending_bytes_max must be at least frame_bytes_max");
        }
        if self.retention_messages_max == 0 || self.retention_state_max == 0 {
            return bad("retention rings need at least one entry");
        }
        if self.compact_live_percent_max > 100 {
            return bad("compact_live_percent_max is a percentage (0..=100)");
        }
        if self.compact_newer_segments_min == 0 {
            return bad("compact_newer_segments_min must be at least 1 (the active segment is never compacted)");
        }
        if self.shard_bytes_max < 2 * self.segment_bytes {
            return bad("shard_bytes_max must hold at least two segments");
        }
        Ok(())
    }
}

/// Why an append, acknowledgement or open did not succeed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum JournalError {
    /// A write or fdatasync failed; the journal refuses appends until reopened.
    #[error("journal failed, refusing appends until reopened: {0}")]
    Failed(String),
    /// The device is full: the record was not written (nothing acknowledged was lost).
    #[error("journal device is full: record not written")]
    NoSpace,
    /// Too much appended and not yet written.
    #[error("journal queue full ({pending_bytes} bytes pending)")]
    Backpressure {
        /// Bytes waiting.
        pending_bytes: u64,
    },
    /// The record exceeds the limits.
    #[error("record payload of {bytes} bytes exceeds the journal limit of {max}")]
    TooLarge {
        /// Payload size.
        bytes: usize,
        /// Largest accepted.
        max: usize,
    },
    /// `Durability::Interval` while `interval_allowed` is off.
    #[error("interval durability is not enabled for this journal")]
    IntervalNotAllowed,
    /// Closed (or closing).
    #[error("journal is closed")]
    Closed,
    /// The directory belongs to another shard.
    #[error("journal directory belongs to shard {found}, not {expected}")]
    ForeignShard {
        /// The shard opening it.
        expected: u32,
        /// The shard in the segment headers.
        found: u32,
    },
    /// Invalid configuration.
    #[error("journal configuration: {0}")]
    Config(String),
    /// An I/O error outside the append path (open, snapshot, retention).
    #[error("journal I/O error during {op}: {message}")]
    Io {
        /// What was being done.
        op: &'static str,
        /// The error kind.
        kind: std::io::ErrorKind,
        /// The error text.
        message: String,
    },
}
