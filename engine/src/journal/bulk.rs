//! Reading everything retained at once: how a shard rebuilds its sessions at start.
//!
//! A resume read ([`Journal::read_messages`]) reads the frames one conversation needs; doing
//! that for every conversation would read a busy group-commit frame once per conversation in
//! it. Here every retained entry is gathered first, grouped by frame, and each frame is read
//! and checked once, in journal order (sequential on disk).

use std::collections::BTreeMap;

use super::index::IndexEntry;
use super::reader::{read_checked_frame, stored_record, StoredRecord};
use super::storage::Storage;
use super::writer::Journal;
use super::JournalError;

/// (segment, frame offset) → (frame length, [(conversation, entry)]): what to read, frame by frame.
type FramesWanted = BTreeMap<(u64, u32), (u32, Vec<(u64, IndexEntry)>)>;

/// What [`Journal::read_all_retained`] returned.
#[derive(Debug, Default)]
pub struct BulkRead {
    /// Every retained record wanted, in journal order.
    pub records: Vec<StoredRecord>,
    /// Frames whose check failed on read (their records are missing).
    pub damaged_frames: u32,
    /// Frames read.
    pub frames_read: u64,
    /// Bytes read.
    pub bytes_read: u64,
}

impl<S: Storage> Journal<S> {
    /// The newest `messages_max` retained messages and every retained state record of every
    /// conversation, each frame read once.
    pub async fn read_all_retained(&self, messages_max: usize) -> Result<BulkRead, JournalError> {
        let mut frames: FramesWanted = BTreeMap::new();
        let files = {
            let st = self.inner.state.borrow();
            let heads: Vec<_> = st.index.heads().collect();
            for head in heads {
                let from = head.last_seq.map_or(u64::MAX, |last| (last + 1).saturating_sub(messages_max as u64));
                let (messages, _) = st.index.messages_from(head.conversation, from, messages_max);
                for e in messages.into_iter().chain(st.index.state_of(head.conversation)) {
                    frames.entry((e.loc.segment, e.loc.frame_offset)).or_insert((e.loc.frame_len, Vec::new())).1.push((head.conversation, e));
                }
            }
            st.segments.iter().map(|(&base, segment)| (base, segment.file.clone())).collect::<BTreeMap<_, _>>()
        };
        let mut out = BulkRead::default();
        for ((segment, offset), (len, entries)) in frames {
            let Some(file) = files.get(&segment) else {
                out.damaged_frames += 1;
                continue;
            };
            let Some((bytes, fh)) = read_checked_frame(&**file, segment, offset, len).await? else {
                out.damaged_frames += 1;
                continue;
            };
            out.frames_read += 1;
            out.bytes_read += bytes.len() as u64;
            for (conversation, e) in entries {
                match stored_record(&bytes, &fh, conversation, &e) {
                    Some(record) => out.records.push(record),
                    None => out.damaged_frames += 1,
                }
            }
        }
        out.records.sort_by_key(|r| r.position);
        Ok(out)
    }
}
