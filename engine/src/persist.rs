//! What the shards keep in their journals, and how sessions come back from it after a restart.
//!
//! The journal (`journal/`) stores opaque records keyed by a conversation id; this module owns
//! their contents for the engine:
//! - a message record's payload is `[tenant length: u8][tenant][client_msg_id: u64 LE]` followed
//!   by the message's encoded DELIVER frame, exactly the bytes kept in memory history; the
//!   desk's conversation events are in the session's seq order too, so they are message
//!   records as well, holding a `CONVERSATION_EVENT` frame (`client_msg_id` 0);
//! - a read-cursor record's payload is `[tenant length: u8][tenant][session length: u8][session]
//!   [participant length: u8][participant]`, the cursor being the record's seq;
//! - the conversation id is [`SessionKey::conversation_id`], a fixed-key hash: ids of different
//!   sessions may collide, so every record names its session and restore goes by that name.
//!
//! Every session has an epoch of its own, chosen when it is created and written in each of
//! its frames; a restore keeps it, so clients resume across restarts without a gap.
//!
//! It also owns the data directory's layout file: the shard count (sessions are placed by
//! `hash % shards`, so a journal only makes sense with the count it was written with).

use std::collections::HashMap;
use std::io;
use std::path::{Path, PathBuf};

use bytes::{Bytes, BytesMut};
use switchboard_protocol::{Frame, Limits, Text, HEADER_BYTES};

use crate::journal::{DmaStorage, Journal, JournalError, RecordKind, StoredRecord};
use crate::mesh::SessionKey;
use crate::history::HistoryLog;
use crate::session::{Session, StoredMessage};

/// Bytes of a message record's payload before its DELIVER frame.
pub fn message_prefix_bytes(tenant: &Text) -> usize {
    1 + tenant.len() + 8
}

/// Writes a message record's payload into `out` (cleared first).
pub fn encode_message(out: &mut Vec<u8>, tenant: &Text, client_msg_id: u64, deliver_frame: &[u8]) {
    out.clear();
    out.push(tenant.len() as u8);
    out.extend_from_slice(tenant.as_bytes());
    out.extend_from_slice(&client_msg_id.to_le_bytes());
    out.extend_from_slice(deliver_frame);
}

/// Writes a read-cursor record's payload into `out` (cleared first).
pub fn encode_read_cursor(out: &mut Vec<u8>, key: &SessionKey, participant: &Text) {
    out.clear();
    for text in [&key.tenant, &key.session, participant] {
        out.push(text.len() as u8);
        out.extend_from_slice(text.as_bytes());
    }
}

/// Where a DELIVER frame's sender id sits: after the header, the session id and four fixed
/// fields (epoch, seq, timestamp, trace id) and its own length byte.
pub fn deliver_sender_at(session: &str, sender: &str) -> (u16, u8) {
    ((HEADER_BYTES + 1 + session.len() + 8 + 8 + 8 + 16 + 1) as u16, sender.len() as u8)
}

/// Why a record could not be restored (it is skipped and counted, never fatal).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RestoreError {
    /// The payload is shorter than its own lengths say.
    #[error("record payload truncated")]
    Truncated,
    /// The DELIVER frame inside does not decode.
    #[error("stored DELIVER frame does not decode: {0}")]
    Frame(String),
    /// The stored frame is not a DELIVER, or its seq differs from the record's.
    #[error("stored frame does not match its record")]
    Mismatch,
}

fn take_text(bytes: &[u8], at: &mut usize) -> Result<Text, RestoreError> {
    let len = usize::from(*bytes.get(*at).ok_or(RestoreError::Truncated)?);
    let text = bytes.get(*at + 1..*at + 1 + len).ok_or(RestoreError::Truncated)?;
    *at += 1 + len;
    std::str::from_utf8(text).map(Text::from).map_err(|_| RestoreError::Truncated)
}

/// A message record decoded: its session, the epoch it was written in, and the message (or
/// conversation event) as history keeps it.
pub fn decode_message(record: &StoredRecord) -> Result<(SessionKey, u64, StoredMessage), RestoreError> {
    let payload = &record.payload[..];
    let mut at = 0;
    let tenant = take_text(payload, &mut at)?;
    let id_bytes = payload.get(at..at + 8).ok_or(RestoreError::Truncated)?;
    let client_msg_id = u64::from_le_bytes(id_bytes.try_into().map_err(|_| RestoreError::Truncated)?);
    at += 8;
    let mut frame_bytes = BytesMut::from(&payload[at..]);
    let decoded = switchboard_protocol::decode(&mut frame_bytes, &Limits::default()).map_err(|error| RestoreError::Frame(error.to_string()))?;
    let Some(envelope) = decoded else { return Err(RestoreError::Truncated) };
    let (session, epoch, sender_at) = match &envelope.frame {
        Frame::Deliver(deliver) if deliver.seq == record.seq => {
            (deliver.session.clone(), deliver.epoch, deliver_sender_at(&deliver.session, &deliver.sender))
        }
        Frame::ConversationEvent(event) if event.seq == record.seq => (event.session.clone(), event.epoch, (0, 0)),
        _ => return Err(RestoreError::Mismatch),
    };
    let key = SessionKey { tenant, session };
    Ok((key, epoch, StoredMessage::restored(record.seq, client_msg_id, sender_at, Bytes::copy_from_slice(&payload[at..]))))
}

/// `message` re-encoded in `epoch` (a restored session whose epoch had to change).
fn in_epoch(message: StoredMessage, epoch: u64) -> Result<StoredMessage, RestoreError> {
    let mut bytes = BytesMut::from(&message.frame[..]);
    let decoded = switchboard_protocol::decode(&mut bytes, &Limits::default()).map_err(|error| RestoreError::Frame(error.to_string()))?;
    let mut frame = decoded.ok_or(RestoreError::Truncated)?.frame;
    match &mut frame {
        Frame::Deliver(deliver) => deliver.epoch = epoch,
        Frame::ConversationEvent(event) => event.epoch = epoch,
        _ => return Err(RestoreError::Mismatch),
    }
    let encoded = frame.to_bytes(0).map_err(|error| RestoreError::Frame(error.to_string()))?;
    Ok(message.with_frame(encoded))
}

/// A read-cursor record decoded: session, participant, cursor.
pub fn decode_read_cursor(record: &StoredRecord) -> Result<(SessionKey, Text, u64), RestoreError> {
    let payload = &record.payload[..];
    let mut at = 0;
    let tenant = take_text(payload, &mut at)?;
    let session = take_text(payload, &mut at)?;
    let participant = take_text(payload, &mut at)?;
    Ok((SessionKey { tenant, session }, participant, record.seq))
}

/// What restoring a shard's sessions found.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct RestoreStats {
    /// Sessions rebuilt.
    pub sessions: u64,
    /// Messages put back in history.
    pub messages: u64,
    /// Read cursors put back.
    pub read_cursors: u64,
    /// Records that did not decode (skipped; logged).
    pub records_skipped: u64,
    /// Frames whose check failed on read-back.
    pub damaged_frames: u64,
}

/// Rebuilds every session the journal retains: its newest `history_messages_max` messages,
/// its head seq and its read cursors. Reads each retained frame once.
///
/// Each session keeps the epoch its messages were written in, so clients resume without a gap
/// — unless `keep_epochs` is false (recovery found that acknowledged data may be missing) or a
/// session's history spans several epochs: then it gets a new one from `fresh_epoch`, and its
/// frames are re-encoded in it, so resuming clients are told `recovered = false`.
pub async fn restore_sessions(
    journal: &Journal<DmaStorage>,
    keep_epochs: bool,
    fresh_epoch: &mut dyn FnMut() -> u64,
    history_messages_max: usize,
    log: &mut HistoryLog,
) -> Result<(Vec<(SessionKey, Session)>, RestoreStats), JournalError> {
    let read = journal.read_all_retained(history_messages_max).await?;
    let mut stats = RestoreStats { damaged_frames: u64::from(read.damaged_frames), ..RestoreStats::default() };
    let mut messages: HashMap<SessionKey, Vec<(u64, StoredMessage)>> = HashMap::new();
    let mut cursors: HashMap<SessionKey, Vec<(Text, u64)>> = HashMap::new();
    for record in &read.records {
        let decoded = match record.kind {
            RecordKind::Message => decode_message(record).map(|(key, epoch, message)| messages.entry(key).or_default().push((epoch, message))),
            RecordKind::ReadCursor => {
                decode_read_cursor(record).map(|(key, participant, seq)| cursors.entry(key).or_default().push((participant, seq)))
            }
            // Conversation events are message records; this kind is not written.
            RecordKind::ConversationEvent => Ok(()),
        };
        if let Err(error) = decoded {
            stats.records_skipped += 1;
            tracing::warn!(conversation = record.conversation, seq = record.seq, %error, "journal record skipped");
        }
    }
    let mut sessions = Vec::with_capacity(messages.len());
    for (key, mut history) in messages {
        // A compaction copy may repeat a seq; journal order is not seq order after compaction.
        history.sort_by_key(|(_, message)| message.seq);
        history.dedup_by_key(|(_, message)| message.seq);
        let newest_epoch = history.last().map_or(0, |(epoch, _)| *epoch);
        let one_epoch = history.iter().all(|(epoch, _)| *epoch == newest_epoch);
        let (epoch, history) = if keep_epochs && one_epoch && newest_epoch != 0 {
            (newest_epoch, history.into_iter().map(|(_, message)| message).collect::<Vec<_>>())
        } else {
            let epoch = fresh_epoch();
            let mut moved = Vec::with_capacity(history.len());
            for (_, message) in history {
                match in_epoch(message, epoch) {
                    Ok(message) => moved.push(message),
                    Err(error) => {
                        stats.records_skipped += 1;
                        tracing::warn!(session = %key.session, %error, "journal record skipped");
                    }
                }
            }
            (epoch, moved)
        };
        let head_seq = history.last().map_or(0, |message| message.seq);
        stats.messages += history.len().min(history_messages_max) as u64;
        let mut session = Session::restored(epoch, history_messages_max, head_seq, history, log);
        for (participant, seq) in cursors.remove(&key).unwrap_or_default() {
            // A journal written before the per-session bound can hold more: the rest are left.
            if session.set_read_cursor(&participant, seq).is_ok() {
                stats.read_cursors += 1;
            }
        }
        sessions.push((key, session));
    }
    stats.sessions = sessions.len() as u64;
    Ok((sessions, stats))
}

/// The data directory's layout file.
const LAYOUT_FILE: &str = "LAYOUT.toml";

/// What the data directory was created with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Layout {
    /// Shards (each with a journal under `shard-N`).
    pub shards: usize,
}

/// Why the data directory cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum LayoutError {
    /// Reading or writing the directory failed.
    #[error("data directory {dir}: {source}")]
    Io {
        /// The directory.
        dir: PathBuf,
        /// Why.
        source: io::Error,
    },
    /// The layout file is not ours.
    #[error("data directory {dir}: {LAYOUT_FILE} is unreadable: {reason}")]
    Corrupt {
        /// The directory.
        dir: PathBuf,
        /// Why.
        reason: String,
    },
    /// Started with another shard count than the journals were written with.
    #[error(
        "data directory {dir} was written by {found} shards, not {wanted}: sessions are placed by hash % shards, so start with --shards {found} (or move the directory away to start empty)"
    )]
    ShardCount {
        /// The directory.
        dir: PathBuf,
        /// Shards now.
        wanted: usize,
        /// Shards it was written with.
        found: usize,
    },
}

/// Opens (creating when absent) the data directory's layout for `shards` shards.
pub fn open_layout(dir: &Path, shards: usize) -> Result<Layout, LayoutError> {
    let io_error = |source| LayoutError::Io { dir: dir.to_path_buf(), source };
    std::fs::create_dir_all(dir).map_err(io_error)?;
    let path = dir.join(LAYOUT_FILE);
    match std::fs::read_to_string(&path) {
        Ok(text) => {
            let layout: Layout =
                toml::from_str(&text).map_err(|error| LayoutError::Corrupt { dir: dir.to_path_buf(), reason: error.to_string() })?;
            if layout.shards != shards {
                return Err(LayoutError::ShardCount { dir: dir.to_path_buf(), wanted: shards, found: layout.shards });
            }
            Ok(layout)
        }
        Err(error) if error.kind() == io::ErrorKind::NotFound => {
            let layout = Layout { shards };
            let text = toml::to_string(&layout).map_err(|error| LayoutError::Corrupt { dir: dir.to_path_buf(), reason: error.to_string() })?;
            let temp = dir.join(format!("{LAYOUT_FILE}.tmp"));
            std::fs::write(&temp, text).map_err(io_error)?;
            std::fs::File::open(&temp).and_then(|file| file.sync_all()).map_err(io_error)?;
            std::fs::rename(&temp, &path).map_err(io_error)?;
            std::fs::File::open(dir).and_then(|file| file.sync_all()).map_err(io_error)?;
            Ok(layout)
        }
        Err(error) => Err(io_error(error)),
    }
}

/// The journal directory of one shard.
pub fn shard_dir(data_dir: &Path, shard: usize) -> PathBuf {
    data_dir.join(format!("shard-{shard}"))
}
