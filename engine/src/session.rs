//! One session's state on its owning shard: seq, epoch, history and the idempotency window.
//!
//! Plain Rust, no I/O and no clock (`now_us` is an argument), so the ordering and resume rules
//! are unit-tested here, away from sockets. Only the owning shard ever holds a [`Session`];
//! other shards learn about it through the mesh.

use std::collections::VecDeque;

use bytes::Bytes;
use switchboard_protocol::{ResumeFrom, Text};

/// A message as kept in history: its encoded DELIVER frame, ready to replay as is.
///
/// One allocation per message holds everything (ids, payload); replay and cross-shard fan-out
/// share it instead of re-encoding. The sender is found inside the frame for the idempotency
/// check, so it is not stored twice.
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
    fn sender(&self) -> &[u8] {
        let (offset, len) = (usize::from(self.sender_at.0), usize::from(self.sender_at.1));
        self.frame.get(offset..offset + len).unwrap_or_default()
    }
}

/// Encodes the DELIVER frame of a new message; returns it and where its sender id is.
pub type EncodeDeliver<'a> = &'a mut dyn FnMut(u64, u64) -> (Bytes, (u16, u8));

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
#[derive(Debug)]
pub struct Session {
    epoch: u64,
    head_seq: u64,
    history: VecDeque<StoredMessage>,
    history_messages_max: usize,
    /// Read cursors: (participant, last seen seq). Few participants per conversation, so a
    /// vector beats a map.
    read_cursors: Vec<(Text, u64)>,
}

impl Session {
    /// A new, empty session in `epoch`.
    pub fn new(epoch: u64, history_messages_max: usize) -> Session {
        Session { epoch, head_seq: 0, history: VecDeque::new(), history_messages_max, read_cursors: Vec::new() }
    }

    /// The current epoch.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// The last seq assigned (0 = none).
    pub fn head_seq(&self) -> u64 {
        self.head_seq
    }

    /// The oldest seq still in history, if any.
    pub fn oldest_seq(&self) -> Option<u64> {
        self.history.front().map(|message| message.seq)
    }

    /// Appends a message unless (sender, client_msg_id) is already in the window.
    ///
    /// `encode(epoch, seq)` builds the message's DELIVER frame; it is called only for a new
    /// message. The idempotency window is the history: a repeat older than that is appended
    /// again, as documented in PROTOCOL.md.
    pub fn publish(&mut self, sender: &str, client_msg_id: u64, encode: EncodeDeliver<'_>) -> PublishOutcome {
        if client_msg_id != 0 {
            if let Some(original) = self
                .history
                .iter()
                .rev()
                .find(|message| message.client_msg_id == client_msg_id && message.sender() == sender.as_bytes())
            {
                return PublishOutcome::Duplicate(original.seq);
            }
        }
        self.head_seq += 1;
        if self.history.len() == self.history_messages_max {
            self.history.pop_front();
        }
        let (frame, sender_at) = encode(self.epoch, self.head_seq);
        self.history.push_back(StoredMessage { seq: self.head_seq, client_msg_id, sender_at, frame });
        PublishOutcome::Appended(self.head_seq)
    }

    /// The message just appended (after [`Session::publish`] returned `Appended`).
    pub fn last(&self) -> Option<&StoredMessage> {
        self.history.back()
    }

    /// Decides what a subscription starting at `from` replays and whether that is complete.
    pub fn plan_resume(&self, from: ResumeFrom) -> ResumePlan {
        let oldest = self.oldest_seq().unwrap_or(self.head_seq + 1);
        let (replay_from_seq, recovered) = match from {
            ResumeFrom::Live => (self.head_seq + 1, true),
            ResumeFrom::Earliest => (oldest, oldest <= 1),
            ResumeFrom::After { epoch, seq } if epoch == self.epoch && seq <= self.head_seq => {
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
        ResumePlan { epoch: self.epoch, head_seq: self.head_seq, replay_from_seq, recovered }
    }

    /// Messages with seq >= `from_seq`, oldest first.
    pub fn replay(&self, from_seq: u64) -> impl Iterator<Item = &StoredMessage> {
        let skip = match self.oldest_seq() {
            Some(oldest) if from_seq > oldest => (from_seq - oldest) as usize,
            _ => 0,
        };
        self.history.iter().skip(skip)
    }

    /// Moves a participant's read cursor forward (never back); returns the cursor now.
    pub fn set_read_cursor(&mut self, participant: &Text, seq: u64) -> u64 {
        let seq = seq.min(self.head_seq);
        if let Some((_, cursor)) = self.read_cursors.iter_mut().find(|(who, _)| who == participant) {
            *cursor = (*cursor).max(seq);
            return *cursor;
        }
        self.read_cursors.push((Text::from(participant.as_str()), seq));
        seq
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A stand-in encoder: the frame is "sender|epoch|seq", the sender at offset 0.
    fn encoder(sender: &'static str) -> impl FnMut(u64, u64) -> (Bytes, (u16, u8)) {
        move |epoch, seq| (Bytes::from(format!("{sender}|{epoch}|{seq}")), (0, sender.len() as u8))
    }

    fn session_with(count: u64, history: usize) -> Session {
        let mut session = Session::new(7, history);
        for _ in 0..count {
            session.publish("alice", 0, &mut encoder("alice"));
        }
        session
    }

    #[test]
    fn seqs_are_consecutive_and_history_is_bounded() {
        let session = session_with(10, 4);
        assert_eq!(session.head_seq(), 10);
        assert_eq!(session.replay(0).map(|m| m.seq).collect::<Vec<_>>(), vec![7, 8, 9, 10]);
        assert_eq!(&session.last().unwrap().frame[..], b"alice|7|10");
    }

    #[test]
    fn duplicate_client_msg_id_returns_the_original_seq() {
        let mut session = Session::new(1, 8);
        assert_eq!(session.publish("alice", 42, &mut encoder("alice")), PublishOutcome::Appended(1));
        assert_eq!(session.publish("alice", 43, &mut encoder("alice")), PublishOutcome::Appended(2));
        let mut never = |_: u64, _: u64| -> (Bytes, (u16, u8)) { panic!("a duplicate is not encoded") };
        assert_eq!(session.publish("alice", 42, &mut never), PublishOutcome::Duplicate(1));
        // The same id from another sender is another message.
        assert_eq!(session.publish("bob", 42, &mut encoder("bob")), PublishOutcome::Appended(3));
        assert_eq!(session.head_seq(), 3);
    }

    #[test]
    fn resume_inside_history_is_recovered_without_gap() {
        let session = session_with(10, 4);
        let plan = session.plan_resume(ResumeFrom::After { epoch: 7, seq: 8 });
        assert_eq!((plan.replay_from_seq, plan.recovered), (9, true));
        assert_eq!(session.replay(plan.replay_from_seq).map(|m| m.seq).collect::<Vec<_>>(), vec![9, 10]);
        let caught_up = session.plan_resume(ResumeFrom::After { epoch: 7, seq: 10 });
        assert_eq!((caught_up.replay_from_seq, caught_up.recovered), (11, true));
        assert_eq!(session.replay(11).count(), 0);
    }

    #[test]
    fn resume_older_than_history_or_other_epoch_is_not_recovered() {
        let session = session_with(10, 4);
        let too_old = session.plan_resume(ResumeFrom::After { epoch: 7, seq: 2 });
        assert_eq!((too_old.replay_from_seq, too_old.recovered), (7, false));
        let other_epoch = session.plan_resume(ResumeFrom::After { epoch: 6, seq: 9 });
        assert!(!other_epoch.recovered);
        let from_future = session.plan_resume(ResumeFrom::After { epoch: 7, seq: 11 });
        assert!(!from_future.recovered);
        assert!(!session.plan_resume(ResumeFrom::Earliest).recovered);
        assert!(session_with(3, 4).plan_resume(ResumeFrom::Earliest).recovered);
    }

    #[test]
    fn read_cursors_only_move_forward_and_stay_within_head() {
        let mut session = session_with(5, 8);
        let bob = Text::from("bob");
        assert_eq!(session.set_read_cursor(&bob, 3), 3);
        assert_eq!(session.set_read_cursor(&bob, 2), 3);
        assert_eq!(session.set_read_cursor(&bob, 99), 5);
    }
}
