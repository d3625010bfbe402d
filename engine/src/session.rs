//! One session's state on its owning shard: seq, epoch, history and the idempotency window.
//!
//! Plain Rust, no I/O and no clock, so the ordering and resume rules are unit-tested here,
//! away from sockets. Only the owning shard ever holds a [`Session`]; other shards learn
//! about it through the mesh. The frames of its history live in the shard's [`HistoryLog`];
//! the session keeps where they are, so every method that reads a frame takes the log.

use bytes::Bytes;
use switchboard_protocol::{ResumeFrom, Text};

use crate::history::{HistoryLog, LogSpan};

/// A message handed to [`Session::restored`]: read back from the journal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StoredMessage {
    /// Position in the session.
    pub seq: u64,
    /// The publisher's idempotency id (0 = none).
    pub client_msg_id: u64,
    /// Where the sender id sits inside `frame` (offset, length).
    sender_at: (u16, u8),
    /// The encoded DELIVER frame (correlation 0).
    pub frame: Bytes,
}

impl StoredMessage {
    /// A message read back from the journal: its DELIVER frame and where its sender id is.
    pub fn restored(seq: u64, client_msg_id: u64, sender_at: (u16, u8), frame: Bytes) -> StoredMessage {
        StoredMessage { seq, client_msg_id, sender_at, frame }
    }

    /// The same message with its frame re-encoded (same layout up to the epoch field).
    #[must_use]
    pub fn with_frame(self, frame: Bytes) -> StoredMessage {
        StoredMessage { frame, ..self }
    }
}

/// One message of a session's history: where its frame is in the log, and what the
/// idempotency check needs without reading the frame. Plain data (no destructor), so
/// forgetting the oldest costs nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct HistoryEntry {
    seq: u64,
    client_msg_id: u64,
    pos: u64,
    len: u32,
    /// Where the sender id sits inside the frame.
    sender_offset: u16,
    sender_len: u8,
}

impl HistoryEntry {
    fn span(&self) -> LogSpan {
        LogSpan { pos: self.pos, len: self.len }
    }

    /// The sender id, unless the frame was overwritten.
    fn sender<'a>(&self, log: &'a HistoryLog) -> Option<&'a [u8]> {
        let (offset, len) = (usize::from(self.sender_offset), usize::from(self.sender_len));
        log.get(self.span())?.get(offset..offset + len)
    }
}

/// Encodes the DELIVER frame of a new message into the log (and journals it, when the session
/// is durable); returns where it is and where its sender id sits inside it. An error leaves
/// the session unchanged.
pub type EncodeDeliver<'a, E> = &'a mut dyn FnMut(u64, u64, &mut HistoryLog) -> Result<(LogSpan, (u16, u8)), E>;

/// What a PUBLISH did to the session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PublishOutcome {
    /// A new message with this seq; deliver it.
    Appended(u64),
    /// A repeat of an earlier message (same sender and client_msg_id): acknowledge with the
    /// original seq and deliver nothing.
    Duplicate(u64),
}

/// What a SUBSCRIBE gets: the SUBSCRIBED fields and the messages to replay.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResumePlan {
    /// The session's epoch.
    pub epoch: u64,
    /// Last seq assigned.
    pub head_seq: u64,
    /// First seq replayed (head_seq + 1 when nothing is).
    pub replay_from_seq: u64,
    /// True when nothing between the requested position and the head is missing.
    pub recovered: bool,
}

/// A session's ordering state and history.
///
/// A durable session assigns a seq when the message is journaled and makes it *visible*
/// (replayed to subscribers, counted in the head they are told) only once the journal
/// acknowledges it, so no subscriber ever sees a message a crash could take back. A memory-only
/// session makes each message visible at once.
#[derive(Debug)]
pub struct Session {
    epoch: u64,
    head_seq: u64,
    /// Every message up to here is acknowledged and may be delivered.
    visible_seq: u64,
    /// The newest messages, chained newest to oldest through the log; those the log has
    /// overwritten are skipped as if evicted.
    history: EntryChain,
    /// The largest `client_msg_id` ever appended: a larger one cannot be a repeat, so the
    /// usual strictly increasing ids skip the scan of the window.
    client_msg_id_max: u64,
    /// Read cursors: (participant, last seen seq). Few participants per conversation, so a
    /// vector beats a map; boxed because most sessions (plain pub/sub) never have one.
    read_cursors: Option<Box<Vec<(Text, u64)>>>,
}

impl Session {
    /// A new, empty session in `epoch`.
    pub fn new(epoch: u64, history_messages_max: usize) -> Session {
        Session { epoch, head_seq: 0, visible_seq: 0, history: EntryChain::new(history_messages_max), client_msg_id_max: 0, read_cursors: None }
    }

    /// A session rebuilt from the journal at start: `messages` are its newest, oldest first,
    /// all acknowledged; `head_seq` is the last seq it assigned. Their frames are copied into
    /// `log`. Only the newest unbroken run is kept: a message missing in between (a damaged
    /// record, a frame the log refuses) ends history there, as eviction would, so a resume
    /// from before it is told `recovered = false` rather than replayed across the gap.
    pub fn restored(epoch: u64, history_messages_max: usize, head_seq: u64, messages: Vec<StoredMessage>, log: &mut HistoryLog) -> Session {
        let skip = messages.len().saturating_sub(history_messages_max);
        let mut history = EntryChain::new(history_messages_max);
        let mut client_msg_id_max = 0;
        let mut previous_seq = None;
        for message in messages.into_iter().skip(skip) {
            client_msg_id_max = client_msg_id_max.max(message.client_msg_id);
            let follows = previous_seq.is_none_or(|previous: u64| message.seq == previous + 1);
            previous_seq = Some(message.seq);
            if !follows {
                history = EntryChain::new(history_messages_max);
            }
            let appended = log.append(&message.frame).is_some_and(|span| {
                history.push(log, HistoryEntry::new(message.seq, message.client_msg_id, span, message.sender_at))
            });
            if !appended {
                history = EntryChain::new(history_messages_max);
            }
        }
        Session { epoch, head_seq, visible_seq: head_seq, history, client_msg_id_max, read_cursors: None }
    }

    /// The last seq subscribers may see.
    pub fn visible_seq(&self) -> u64 {
        self.visible_seq
    }

    /// Makes every message up to `seq` visible (the journal acknowledged it).
    pub fn make_visible(&mut self, seq: u64) {
        self.visible_seq = self.visible_seq.max(seq.min(self.head_seq));
    }

    /// Forgets the messages not yet visible (the journal refused them): their seqs are
    /// assigned again, since no one saw or was acknowledged them.
    pub fn roll_back_invisible(&mut self, log: &HistoryLog) {
        while self.history.back(log).is_some_and(|message| message.seq > self.visible_seq) {
            self.history.pop_back(log);
        }
        self.head_seq = self.visible_seq;
    }

    /// The current epoch.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// The last seq assigned (0 = none).
    pub fn head_seq(&self) -> u64 {
        self.head_seq
    }

    /// The oldest seq still in history (and in the log), if any.
    pub fn oldest_seq(&self, log: &HistoryLog) -> Option<u64> {
        self.history.iter_rev(log).last().map(|message| message.seq)
    }

    /// Appends a message unless (sender, client_msg_id) is already in the window.
    ///
    /// `encode(epoch, seq, log)` writes the message's DELIVER frame into the log; it is called
    /// only for a new message. The idempotency window is the history: a repeat older than that
    /// is appended again, as documented in PROTOCOL.md.
    /// The message becomes visible at once when `visible` is set; otherwise on
    /// [`Session::make_visible`].
    pub fn publish<E>(
        &mut self,
        log: &mut HistoryLog,
        sender: &str,
        client_msg_id: u64,
        visible: bool,
        encode: EncodeDeliver<'_, E>,
    ) -> Result<PublishOutcome, E> {
        if client_msg_id != 0 && client_msg_id <= self.client_msg_id_max {
            // Only what is still in the log: an overwritten message is out of the window.
            for message in self.history.iter_rev(log) {
                if message.client_msg_id == client_msg_id && message.sender(log) == Some(sender.as_bytes()) {
                    return Ok(PublishOutcome::Duplicate(message.seq));
                }
            }
        }
        let seq = self.head_seq + 1;
        let (span, sender_at) = encode(self.epoch, seq, log)?;
        self.head_seq = seq;
        self.client_msg_id_max = self.client_msg_id_max.max(client_msg_id);
        if visible {
            self.visible_seq = seq;
        }
        // The log holds at least four of the largest frames, so a header always fits.
        let pushed = self.history.push(log, HistoryEntry::new(seq, client_msg_id, span, sender_at));
        debug_assert!(pushed, "the log refused a history entry header");
        Ok(PublishOutcome::Appended(seq))
    }

    /// The frame of the message just appended (after [`Session::publish`] returned
    /// `Appended`), or `None` if the log no longer holds it.
    pub fn last_frame<'a>(&self, log: &'a HistoryLog) -> Option<&'a [u8]> {
        log.get(self.history.back(log)?.span())
    }

    /// Decides what a subscription starting at `from` replays and whether that is complete.
    /// Only visible messages count: the plan's head is the last visible seq.
    pub fn plan_resume(&self, from: ResumeFrom, log: &HistoryLog) -> ResumePlan {
        let head_seq = self.visible_seq;
        let oldest = self.oldest_seq(log).unwrap_or(head_seq + 1).min(head_seq + 1);
        let (replay_from_seq, recovered) = match from {
            ResumeFrom::Live => (head_seq + 1, true),
            ResumeFrom::Earliest => (oldest, oldest <= 1),
            ResumeFrom::After { epoch, seq } if epoch == self.epoch && seq <= head_seq => {
                if seq + 1 >= oldest {
                    (seq + 1, true)
                } else {
                    (oldest, false)
                }
            }
            // Another epoch (history lost, e.g. a restart without journal) or a position this
            // session never reached: replay what there is and say it is not a full recovery.
            ResumeFrom::After { .. } => (oldest, false),
        };
        ResumePlan { epoch: self.epoch, head_seq, replay_from_seq, recovered }
    }

    /// Frames of the visible messages with seq >= `from_seq`, oldest first.
    pub fn replay<'a>(&'a self, from_seq: u64, log: &'a HistoryLog) -> impl Iterator<Item = &'a [u8]> + 'a {
        // Collected newest first (the chain's direction), then handed out oldest first.
        let wanted: Vec<HistoryEntry> = self.history.iter_rev(log).take_while(|message| message.seq >= from_seq).collect();
        let visible = self.visible_seq;
        wanted.into_iter().rev().take_while(move |message| message.seq <= visible).map_while(|message| log.get(message.span()))
    }

    /// The read cursors, for the journal.
    pub fn read_cursors(&self) -> &[(Text, u64)] {
        self.read_cursors.as_deref().map_or(&[], Vec::as_slice)
    }

    /// Moves a participant's read cursor forward (never back). `Ok` with the cursor now and
    /// whether it changed (an unchanged cursor is not journaled or fanned out again); `Err`
    /// when the participant is new and the session already has [`READ_CURSORS_MAX`].
    pub fn set_read_cursor(&mut self, participant: &Text, seq: u64) -> Result<(u64, bool), CursorsFull> {
        let seq = seq.min(self.visible_seq);
        let cursors = self.read_cursors.get_or_insert_with(Box::default);
        if let Some((_, cursor)) = cursors.iter_mut().find(|(who, _)| who == participant) {
            let moved = seq > *cursor;
            *cursor = (*cursor).max(seq);
            return Ok((*cursor, moved));
        }
        if cursors.len() >= READ_CURSORS_MAX {
            return Err(CursorsFull);
        }
        cursors.push((Text::from(participant.as_str()), seq));
        Ok((seq, true))
    }
}

/// Most participants with a read cursor in one session. Gateways and supervisors may name any
/// participant, so without a bound one client could grow a session (and each lookup) at will.
pub const READ_CURSORS_MAX: usize = 256;

/// A new read cursor refused: the session has [`READ_CURSORS_MAX`] already.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CursorsFull;

/// A session's newest history entries, kept in the shard's log itself: each entry is written
/// there as a small header right after its frame, pointing to the session's previous entry;
/// the session holds only where its newest header is and how many entries count.
///
/// Why not an array per session: a publish then writes one entry into its session's array,
/// a different cold cache line (and 4 KiB page) for almost every publish once 1000 sessions
/// each own 128 slots, and that store was the engine's top user-space cost at paced traffic
/// (bench/RESULTS.md, session 5). The log's head, where the frame was just written, is hot.
/// Reading history (a resume, a duplicate check) walks the chain back instead, which is rare.
/// Entries whose header or frame the log has overwritten end the chain: older ones are gone
/// too, since the log is written in order.
#[derive(Debug)]
struct EntryChain {
    /// Log position of the newest entry's header (meaningless while `len` is 0).
    newest: u64,
    /// Entries that count (at most `max`); the chain may go further back in the log.
    len: u32,
    /// The session's `history_messages_max`.
    max: u32,
}

/// Bytes of an entry's header in the log: previous header's position, seq, client_msg_id,
/// frame position (u64 each), frame length (u32), sender offset (u16), sender length (u8).
const ENTRY_HEADER_BYTES: usize = 8 + 8 + 8 + 8 + 4 + 2 + 1;

impl EntryChain {
    fn new(max: usize) -> EntryChain {
        EntryChain { newest: 0, len: 0, max: u32::try_from(max).unwrap_or(u32::MAX) }
    }

    /// Appends `entry` (its frame already in `log`), forgetting the oldest once `max` count.
    /// Returns false (history unchanged) only if the log cannot hold a header at all.
    fn push(&mut self, log: &mut HistoryLog, entry: HistoryEntry) -> bool {
        let previous = self.newest;
        let Some((span, dst)) = log.reserve(ENTRY_HEADER_BYTES) else { return false };
        dst[0..8].copy_from_slice(&previous.to_le_bytes());
        dst[8..16].copy_from_slice(&entry.seq.to_le_bytes());
        dst[16..24].copy_from_slice(&entry.client_msg_id.to_le_bytes());
        dst[24..32].copy_from_slice(&entry.pos.to_le_bytes());
        dst[32..36].copy_from_slice(&entry.len.to_le_bytes());
        dst[36..38].copy_from_slice(&entry.sender_offset.to_le_bytes());
        dst[38] = entry.sender_len;
        self.newest = span.pos;
        self.len = (self.len + 1).min(self.max);
        true
    }

    /// The entry whose header is at `pos`, and where the previous one's is; None once the log
    /// has overwritten the header or the frame.
    fn read(log: &HistoryLog, pos: u64) -> Option<(HistoryEntry, u64)> {
        let header = log.get(LogSpan { pos, len: ENTRY_HEADER_BYTES as u32 })?;
        let u64_at = |at: usize| u64::from_le_bytes(header[at..at + 8].try_into().expect("8 bytes"));
        let entry = HistoryEntry {
            seq: u64_at(8),
            client_msg_id: u64_at(16),
            pos: u64_at(24),
            len: u32::from_le_bytes(header[32..36].try_into().expect("4 bytes")),
            sender_offset: u16::from_le_bytes(header[36..38].try_into().expect("2 bytes")),
            sender_len: header[38],
        };
        log.intact(entry.span()).then_some((entry, u64_at(0)))
    }

    /// The newest entry, if it is still in the log.
    fn back(&self, log: &HistoryLog) -> Option<HistoryEntry> {
        (self.len > 0).then(|| Self::read(log, self.newest)).flatten().map(|(entry, _)| entry)
    }

    /// Forgets the newest entry (a journal refusal). History ends if its header is gone.
    fn pop_back(&mut self, log: &HistoryLog) {
        match (self.len > 0).then(|| Self::read(log, self.newest)).flatten() {
            Some((_, previous)) => {
                self.newest = previous;
                self.len -= 1;
            }
            None => self.len = 0,
        }
    }

    /// The entries still in the log, newest first.
    fn iter_rev<'a>(&self, log: &'a HistoryLog) -> impl Iterator<Item = HistoryEntry> + 'a {
        let mut next = (self.len > 0).then_some(self.newest);
        let mut left = self.len;
        std::iter::from_fn(move || {
            if left == 0 {
                return None;
            }
            let (entry, previous) = Self::read(log, next?)?;
            left -= 1;
            next = Some(previous);
            Some(entry)
        })
    }
}

impl HistoryEntry {
    fn new(seq: u64, client_msg_id: u64, span: LogSpan, sender_at: (u16, u8)) -> HistoryEntry {
        HistoryEntry { seq, client_msg_id, pos: span.pos, len: span.len, sender_offset: sender_at.0, sender_len: sender_at.1 }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A stand-in encoder: the frame is "sender|epoch|seq", the sender at offset 0.
    fn encoder(sender: &'static str) -> impl FnMut(u64, u64, &mut HistoryLog) -> Result<(LogSpan, (u16, u8)), ()> {
        move |epoch, seq, log| Ok((log.append(format!("{sender}|{epoch}|{seq}").as_bytes()).ok_or(())?, (0, sender.len() as u8)))
    }

    fn publish(session: &mut Session, log: &mut HistoryLog, sender: &'static str, id: u64) -> PublishOutcome {
        session.publish(log, sender, id, true, &mut encoder(sender)).unwrap()
    }

    fn session_with(count: u64, history: usize) -> (Session, HistoryLog) {
        let mut log = HistoryLog::new(1 << 16).unwrap();
        let mut session = Session::new(7, history);
        for _ in 0..count {
            publish(&mut session, &mut log, "alice", 0);
        }
        (session, log)
    }

    fn seqs(session: &Session, from: u64, log: &HistoryLog) -> Vec<String> {
        session.replay(from, log).map(|frame| String::from_utf8_lossy(frame).into_owned()).collect()
    }

    #[test]
    fn seqs_are_consecutive_and_history_is_bounded() {
        let (session, log) = session_with(10, 4);
        assert_eq!(session.head_seq(), 10);
        assert_eq!(seqs(&session, 0, &log), ["alice|7|7", "alice|7|8", "alice|7|9", "alice|7|10"]);
        assert_eq!(session.last_frame(&log), Some(&b"alice|7|10"[..]));
    }

    #[test]
    fn sessions_sharing_a_log_each_replay_only_their_own_messages() {
        let mut log = HistoryLog::new(1 << 16).unwrap();
        let (mut alice, mut bob) = (Session::new(7, 3), Session::new(7, 8));
        for _ in 0..5 {
            publish(&mut alice, &mut log, "alice", 0);
            publish(&mut bob, &mut log, "bob", 0);
            publish(&mut bob, &mut log, "bob", 0);
        }
        assert_eq!(seqs(&alice, 0, &log), ["alice|7|3", "alice|7|4", "alice|7|5"]);
        assert_eq!(seqs(&bob, 7, &log), ["bob|7|7", "bob|7|8", "bob|7|9", "bob|7|10"]);
        assert_eq!((alice.oldest_seq(&log), bob.oldest_seq(&log)), (Some(3), Some(3)));
        assert_eq!(bob.last_frame(&log), Some(&b"bob|7|10"[..]));
    }

    #[test]
    fn duplicate_client_msg_id_returns_the_original_seq() {
        let mut log = HistoryLog::new(1 << 16).unwrap();
        let mut session = Session::new(1, 8);
        assert_eq!(publish(&mut session, &mut log, "alice", 42), PublishOutcome::Appended(1));
        assert_eq!(publish(&mut session, &mut log, "alice", 43), PublishOutcome::Appended(2));
        let mut never = |_: u64, _: u64, _: &mut HistoryLog| -> Result<(LogSpan, (u16, u8)), ()> { panic!("a duplicate is not encoded") };
        assert_eq!(session.publish(&mut log, "alice", 42, true, &mut never), Ok(PublishOutcome::Duplicate(1)));
        // The same id from another sender is another message.
        assert_eq!(publish(&mut session, &mut log, "bob", 42), PublishOutcome::Appended(3));
        assert_eq!(session.head_seq(), 3);
    }

    #[test]
    fn resume_inside_history_is_recovered_without_gap() {
        let (session, log) = session_with(10, 4);
        let plan = session.plan_resume(ResumeFrom::After { epoch: 7, seq: 8 }, &log);
        assert_eq!((plan.replay_from_seq, plan.recovered), (9, true));
        assert_eq!(seqs(&session, plan.replay_from_seq, &log), ["alice|7|9", "alice|7|10"]);
        let caught_up = session.plan_resume(ResumeFrom::After { epoch: 7, seq: 10 }, &log);
        assert_eq!((caught_up.replay_from_seq, caught_up.recovered), (11, true));
        assert_eq!(session.replay(11, &log).count(), 0);
    }

    #[test]
    fn resume_older_than_history_or_other_epoch_is_not_recovered() {
        let (session, log) = session_with(10, 4);
        let too_old = session.plan_resume(ResumeFrom::After { epoch: 7, seq: 2 }, &log);
        assert_eq!((too_old.replay_from_seq, too_old.recovered), (7, false));
        let other_epoch = session.plan_resume(ResumeFrom::After { epoch: 6, seq: 9 }, &log);
        assert!(!other_epoch.recovered);
        let from_future = session.plan_resume(ResumeFrom::After { epoch: 7, seq: 11 }, &log);
        assert!(!from_future.recovered);
        assert!(!session.plan_resume(ResumeFrom::Earliest, &log).recovered);
        let (short, short_log) = session_with(3, 4);
        assert!(short.plan_resume(ResumeFrom::Earliest, &short_log).recovered);
    }

    #[test]
    fn messages_overwritten_in_the_log_leave_history_and_the_idempotency_window() {
        // Room for about four messages (a 9-byte frame and its entry header each): the ring,
        // not the message count, is the limit.
        let mut log = HistoryLog::new(4 * (9 + ENTRY_HEADER_BYTES) + 8).unwrap();
        let mut session = Session::new(7, 100);
        for id in 1..=6 {
            publish(&mut session, &mut log, "alice", id);
        }
        assert_eq!(session.oldest_seq(&log), Some(3));
        assert_eq!(seqs(&session, 0, &log), ["alice|7|3", "alice|7|4", "alice|7|5", "alice|7|6"]);
        let plan = session.plan_resume(ResumeFrom::After { epoch: 7, seq: 1 }, &log);
        assert_eq!((plan.replay_from_seq, plan.recovered), (3, false));
        assert!(session.plan_resume(ResumeFrom::After { epoch: 7, seq: 2 }, &log).recovered);
        // Id 1's frame is gone: a repeat of it is a new message; id 5's is still there.
        assert_eq!(publish(&mut session, &mut log, "alice", 1), PublishOutcome::Appended(7));
        let mut never = |_: u64, _: u64, _: &mut HistoryLog| -> Result<(LogSpan, (u16, u8)), ()> { panic!("a duplicate is not encoded") };
        assert_eq!(session.publish(&mut log, "alice", 6, true, &mut never), Ok(PublishOutcome::Duplicate(6)));
    }

    #[test]
    fn read_cursors_only_move_forward_and_stay_within_head() {
        let (mut session, _log) = session_with(5, 8);
        let bob = Text::from("bob");
        assert_eq!(session.set_read_cursor(&bob, 3), Ok((3, true)));
        assert_eq!(session.set_read_cursor(&bob, 2), Ok((3, false)));
        assert_eq!(session.set_read_cursor(&bob, 3), Ok((3, false)));
        assert_eq!(session.set_read_cursor(&bob, 99), Ok((5, true)));
    }

    #[test]
    fn read_cursors_are_bounded_per_session() {
        let (mut session, _log) = session_with(5, 8);
        for i in 0..READ_CURSORS_MAX {
            assert!(session.set_read_cursor(&Text::from(format!("p{i}")), 1).is_ok());
        }
        assert_eq!(session.set_read_cursor(&Text::from("one-too-many"), 1), Err(CursorsFull));
        assert_eq!(session.set_read_cursor(&Text::from("p0"), 2), Ok((2, true)), "known participants still move");
        assert_eq!(session.read_cursors().len(), READ_CURSORS_MAX);
    }

    #[test]
    fn invisible_messages_are_neither_planned_nor_replayed_until_acknowledged() {
        let (mut session, mut log) = session_with(3, 8);
        for _ in 0..2 {
            session.publish(&mut log, "alice", 0, false, &mut encoder("alice")).unwrap();
        }
        assert_eq!((session.head_seq(), session.visible_seq()), (5, 3));
        let plan = session.plan_resume(ResumeFrom::After { epoch: 7, seq: 1 }, &log);
        assert_eq!((plan.head_seq, plan.replay_from_seq, plan.recovered), (3, 2, true));
        assert_eq!(seqs(&session, 2, &log), ["alice|7|2", "alice|7|3"]);
        // A position past the visible head was never handed out.
        assert!(!session.plan_resume(ResumeFrom::After { epoch: 7, seq: 4 }, &log).recovered);
        session.make_visible(4);
        assert_eq!(seqs(&session, 2, &log), ["alice|7|2", "alice|7|3", "alice|7|4"]);
    }

    #[test]
    fn a_refused_append_changes_nothing_and_a_rollback_reuses_the_seqs() {
        let (mut session, mut log) = session_with(2, 8);
        let mut refuse = |_: u64, _: u64, _: &mut HistoryLog| -> Result<(LogSpan, (u16, u8)), &'static str> { Err("journal full") };
        assert_eq!(session.publish(&mut log, "alice", 9, false, &mut refuse), Err("journal full"));
        assert_eq!(session.head_seq(), 2);
        session.publish(&mut log, "alice", 0, false, &mut encoder("alice")).unwrap();
        session.publish(&mut log, "alice", 0, false, &mut encoder("alice")).unwrap();
        session.roll_back_invisible(&log);
        assert_eq!((session.head_seq(), session.visible_seq()), (2, 2));
        assert_eq!(publish(&mut session, &mut log, "alice", 0), PublishOutcome::Appended(3));
        assert_eq!(seqs(&session, 0, &log), ["alice|7|1", "alice|7|2", "alice|7|3"]);
    }

    #[test]
    fn a_gap_in_restored_history_ends_it_there() {
        let mut log = HistoryLog::new(1 << 16).unwrap();
        let messages = [4, 6, 7].into_iter().map(|seq| StoredMessage::restored(seq, 0, (0, 5), Bytes::from(format!("alice|7|{seq}")))).collect();
        let session = Session::restored(7, 8, 7, messages, &mut log);
        assert_eq!(seqs(&session, 0, &log), ["alice|7|6", "alice|7|7"]);
        let plan = session.plan_resume(ResumeFrom::After { epoch: 7, seq: 3 }, &log);
        assert_eq!((plan.replay_from_seq, plan.recovered), (6, false));
    }

    #[test]
    fn a_restored_session_continues_its_seqs() {
        let mut log = HistoryLog::new(1 << 16).unwrap();
        let messages = (4..=6).map(|seq| StoredMessage::restored(seq, seq * 10, (0, 5), Bytes::from(format!("alice|7|{seq}")))).collect();
        let mut session = Session::restored(7, 2, 6, messages, &mut log);
        assert_eq!(seqs(&session, 0, &log), ["alice|7|5", "alice|7|6"]);
        // The idempotency window survived.
        let mut never = |_: u64, _: u64, _: &mut HistoryLog| -> Result<(LogSpan, (u16, u8)), ()> { panic!("a duplicate is not encoded") };
        assert_eq!(session.publish(&mut log, "alice", 60, true, &mut never), Ok(PublishOutcome::Duplicate(6)));
        assert_eq!(publish(&mut session, &mut log, "alice", 0), PublishOutcome::Appended(7));
    }
}
