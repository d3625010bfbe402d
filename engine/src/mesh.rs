//! The shard mesh: what shards say to each other, and the ordered links that carry it.
//!
//! Shards share nothing; all cross-shard work is a message. For every ordered pair of shards
//! there are two bounded SPSC rings (glommio shared channels, created once at start and
//! connected on their own cores): one for [`Request`]s (origin → owner of a session) and one
//! for [`Event`]s (owner → origin). Two kinds, because a shard handling a request may wait for
//! room to send events, while a shard handling events never waits for anything: with that rule
//! no cycle of shards can wait on each other.
//!
//! Many tasks on a shard produce messages for the same peer (connections, ring consumers), and
//! the order they produce them in is the order the peer must see (a SUBSCRIBED and the DELIVERs
//! around it). So producers never touch the ring directly: they append to the peer's
//! [`PeerLink`] (a local FIFO) and one pump task per link moves messages into the ring in order.
//! When a link's backlog reaches its limit, producers that can wait do so after appending
//! ([`LinkState::Backlogged`]); the event is counted.

use std::cell::{Cell, RefCell};
use std::collections::VecDeque;
use std::future::poll_fn;
use std::hash::{Hash, Hasher};
use std::rc::Rc;
use std::task::{Poll, Waker};

use bytes::Bytes;
use glommio::channels::shared_channel::ConnectedSender;
use glommio::{GlommioError, ResourceType};
use switchboard_protocol::{AgentPresence, ConversationEvent, ErrorCode, ResumeFrom, Text, TransferKind};

use crate::auth::Role;
use crate::session::ResumePlan;

/// A connection, named by the shard that holds it.
pub type ConnId = u64;

/// A session's identity: tenant and session id. Same scheme as the seed's
/// `session:{tenant}:{session}` keys.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct SessionKey {
    /// The tenant.
    pub tenant: Text,
    /// The session (conversation) id.
    pub session: Text,
}

impl SessionKey {
    /// A key whose session id owns its memory (so it does not pin a read buffer). The tenant
    /// is shared as is: connections hold one tenant `Text` each, never a read-buffer slice.
    pub fn owned(tenant: &Text, session: &Text) -> SessionKey {
        KeyRef { tenant, session: session.as_str() }.to_owned_key()
    }

    /// The shard that owns this session (see [`KeyRef::shard`]).
    pub fn shard(&self, shards: usize) -> usize {
        self.borrowed().shard(shards)
    }

    /// The session's id in its shard's journal (see [`KeyRef::conversation_id`]).
    pub fn conversation_id(&self) -> u64 {
        self.borrowed().conversation_id()
    }

    /// This key as a [`KeyRef`].
    pub fn borrowed(&self) -> KeyRef<'_> {
        KeyRef { tenant: &self.tenant, session: self.session.as_str() }
    }
}

/// A session's identity with its session id borrowed (from a read buffer): what the publish
/// path looks sessions up with. It hashes and compares like the [`SessionKey`] it stands for,
/// so maps keyed by `SessionKey` (or `Rc<SessionKey>`) find entries by it without one being
/// built.
#[derive(Debug, Clone, Copy)]
pub struct KeyRef<'a> {
    /// The tenant.
    pub tenant: &'a Text,
    /// The session (conversation) id.
    pub session: &'a str,
}

impl KeyRef<'_> {
    /// The shard that owns this session: `hash(tenant, session) % shards`.
    ///
    /// SipHash with fixed keys (std's `DefaultHasher::new()`), so every process, and any client
    /// that wants to predict placement, computes the same shard.
    pub fn shard(&self, shards: usize) -> usize {
        if shards <= 1 {
            return 0;
        }
        (self.conversation_id() % shards as u64) as usize
    }

    /// The session's id in its shard's journal: the same fixed-key hash, whole. Ids of two
    /// sessions may collide; journal records name their session, so a collision costs only
    /// shared retention, never a mix-up.
    pub fn conversation_id(&self) -> u64 {
        let mut hasher = std::collections::hash_map::DefaultHasher::new();
        self.tenant.as_str().hash(&mut hasher);
        self.session.hash(&mut hasher);
        hasher.finish()
    }

    /// The owned key, its session id in memory of its own (it is kept beyond the read).
    pub fn to_owned_key(&self) -> SessionKey {
        SessionKey { tenant: self.tenant.clone(), session: Text::from(self.session) }
    }
}

impl Hash for KeyRef<'_> {
    /// As `SessionKey`'s derived hash: each field's bytes as a slice (`Text` hashes its `Bytes`).
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        self.tenant.hash(state);
        self.session.as_bytes().hash(state);
    }
}

impl hashbrown::Equivalent<SessionKey> for KeyRef<'_> {
    fn equivalent(&self, key: &SessionKey) -> bool {
        *self.tenant == key.tenant && self.session == key.session.as_str()
    }
}

impl hashbrown::Equivalent<std::rc::Rc<SessionKey>> for KeyRef<'_> {
    fn equivalent(&self, key: &std::rc::Rc<SessionKey>) -> bool {
        self.equivalent(&**key)
    }
}

/// The key a session map keeps: the session id copied out of the read buffer it came in.
impl From<&SessionKey> for SessionKey {
    fn from(key: &SessionKey) -> SessionKey {
        SessionKey::owned(&key.tenant, &key.session)
    }
}

/// The shard that holds `tenant`'s desk (its agents, queues and conversation states):
/// `hash(tenant) % shards`, with the same fixed-key `SipHash` as [`SessionKey::shard`].
pub fn tenant_shard(tenant: &Text, shards: usize) -> usize {
    if shards <= 1 {
        return 0;
    }
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    tenant.as_str().hash(&mut hasher);
    (hasher.finish() % shards as u64) as usize
}

/// Who sends a desk request: the connection's verified identity.
#[derive(Debug, Clone)]
pub struct DeskActor {
    /// The tenant.
    pub tenant: Text,
    /// The role.
    pub role: Role,
    /// The subject (customer, agent, supervisor or gateway id).
    pub subject: Text,
}

/// What a connection asks of its tenant's desk. Ids own their memory (the desk keeps them).
#[derive(Debug)]
pub enum DeskOp {
    /// `OPEN_CONVERSATION`.
    Open {
        /// The conversation's session id.
        session: Text,
        /// The customer.
        customer: Text,
        /// Priority.
        priority: u8,
        /// Skills asked for.
        skills: Vec<Text>,
        /// Context for the agent (a copy: it outlives the read buffer).
        context: Bytes,
    },
    /// `AGENT_STATUS` from a client.
    AgentStatus {
        /// The agent.
        agent: Text,
        /// Presence.
        presence: AgentPresence,
        /// Capacity.
        capacity: u16,
        /// Skills.
        skills: Vec<Text>,
    },
    /// `OFFER_RESPONSE`.
    OfferResponse {
        /// The conversation.
        session: Text,
        /// The agent answering.
        agent: Text,
        /// Accept or decline.
        accept: bool,
    },
    /// TRANSFER.
    Transfer {
        /// The conversation.
        session: Text,
        /// Agent or queue.
        kind: TransferKind,
        /// The agent's or queue's id.
        target: Text,
        /// Note for the next agent.
        note: Text,
    },
    /// `CLOSE_CONVERSATION`.
    Close {
        /// The conversation.
        session: Text,
        /// Why.
        reason: Text,
    },
    /// May the actor watch (subscribe to, publish in) this conversation? Asked before a
    /// customer's or agent's `SUBSCRIBE`, `PUBLISH`, `READ_CURSOR` or `TYPING`.
    Watch {
        /// The conversation.
        session: Text,
    },
    /// `TICKET_COMMAND` (ids and payload owned). Answered with `TICKET_EVENT`, not OK.
    Ticket {
        /// The command.
        command: switchboard_protocol::TicketCommand,
    },
    /// The connection closed; it spoke for these agents (`AGENT_STATUS` or watching as one).
    ConnLost {
        /// The agents.
        agents: Vec<Text>,
    },
}

/// A desk request on its way to the tenant's shard.
#[derive(Debug)]
pub struct DeskRequest {
    /// The connection on the origin shard.
    pub conn: ConnId,
    /// Its request's correlation id.
    pub correlation: u32,
    /// Non-zero: an access check the origin is waiting on (answered to the waiter, not the
    /// connection).
    pub check: u64,
    /// Who asks.
    pub actor: DeskActor,
    /// What.
    pub op: DeskOp,
}

/// A PUBLISH on its way to the session's owner (from this shard or over the mesh).
#[derive(Debug)]
pub struct PublishRequest {
    /// The publishing connection on the origin shard.
    pub conn: ConnId,
    /// Its request's correlation id.
    pub correlation: u32,
    /// The session.
    pub key: SessionKey,
    /// Idempotency id.
    pub client_msg_id: u64,
    /// Trace id.
    pub trace_id: u128,
    /// Sender participant.
    pub sender: Text,
    /// The message (a slice of the origin's read buffer; the owner encodes it into history).
    pub payload: Bytes,
    /// When the origin decoded it (`quanta` raw clock), for latency.
    pub ingress_raw: u64,
}

impl PublishRequest {
    /// The request as the owner handles it.
    pub fn view(&self) -> PublishView<'_> {
        PublishView {
            conn: self.conn,
            correlation: self.correlation,
            key: self.key.borrowed(),
            owned_key: Some(&self.key),
            client_msg_id: self.client_msg_id,
            trace_id: self.trace_id,
            sender: self.sender.as_str(),
            payload: &self.payload,
            ingress_raw: self.ingress_raw,
        }
    }
}

/// A PUBLISH as its owner handles it, borrowed: from a request that came over the mesh, or
/// straight from a local connection's read buffer (no reference counts taken per field).
#[derive(Debug, Clone, Copy)]
pub struct PublishView<'a> {
    /// The publishing connection on the origin shard.
    pub conn: ConnId,
    /// Its request's correlation id.
    pub correlation: u32,
    /// The session.
    pub key: KeyRef<'a>,
    /// The same key owned, when the PUBLISH came over the mesh with one: what is kept beyond
    /// the publish (a pending acknowledgement, fan-out events, a PUBACK for another shard)
    /// clones it instead of copying the session id.
    pub owned_key: Option<&'a SessionKey>,
    /// Idempotency id.
    pub client_msg_id: u64,
    /// Trace id.
    pub trace_id: u128,
    /// Sender participant.
    pub sender: &'a str,
    /// The message.
    pub payload: &'a [u8],
    /// When the origin read it (`quanta` raw clock), for latency.
    pub ingress_raw: u64,
}

impl PublishView<'_> {
    /// The session's key to keep: the owned one cloned, else the borrowed one copied.
    pub fn key_to_keep(&self) -> SessionKey {
        self.owned_key.cloned().unwrap_or_else(|| self.key.to_owned_key())
    }
}

/// Origin shard → owner shard.
#[derive(Debug)]
pub enum Request {
    /// Append a message.
    Publish(PublishRequest),
    /// Start a subscription; the owner replies with [`Event::Subscribed`].
    Subscribe {
        /// The subscribing connection.
        conn: ConnId,
        /// Its request's correlation id.
        correlation: u32,
        /// The session.
        key: SessionKey,
        /// Where to start.
        from: ResumeFrom,
    },
    /// The origin shard has no subscriber of `key` left.
    Uninterest {
        /// The session.
        key: SessionKey,
    },
    /// Move a read cursor and push it to the session's subscribers.
    ReadCursor {
        /// The connection.
        conn: ConnId,
        /// Its correlation id.
        correlation: u32,
        /// The session.
        key: SessionKey,
        /// Who read.
        participant: Text,
        /// Up to where.
        seq: u64,
    },
    /// Push an ephemeral typing indicator to the session's subscribers.
    Typing {
        /// The session.
        key: SessionKey,
        /// Who types.
        participant: Text,
        /// Started or stopped.
        active: bool,
    },
    /// A customer-service request for the tenant's desk (on the tenant's shard).
    Desk(DeskRequest),
}

/// Owner shard → origin shard.
#[derive(Debug)]
pub enum Event {
    /// Answer a PUBLISH.
    PubAck {
        /// The publishing connection.
        conn: ConnId,
        /// Its correlation id.
        correlation: u32,
        /// The session id.
        session: Text,
        /// Idempotency id.
        client_msg_id: u64,
        /// Epoch.
        epoch: u64,
        /// Assigned (or original) seq.
        seq: u64,
        /// A repeat.
        duplicate: bool,
        /// What the acknowledgement promises.
        durability: switchboard_protocol::Durability,
    },
    /// Answer a SUBSCRIBE, with the replay (encoded DELIVER frames, oldest first).
    Subscribed {
        /// The subscribing connection.
        conn: ConnId,
        /// Its correlation id.
        correlation: u32,
        /// The session.
        key: SessionKey,
        /// The outcome.
        plan: ResumePlan,
        /// Encoded frames to replay.
        replay: Vec<Bytes>,
    },
    /// A frame for every subscriber of `key` on the origin shard (encoded once by the owner).
    Fanout {
        /// The session.
        key: SessionKey,
        /// The encoded frame.
        frame: Bytes,
        /// When the publish was decoded (`quanta` raw clock), 0 when not a publish.
        ingress_raw: u64,
    },
    /// A request failed; answer with ERROR.
    Failed {
        /// The connection.
        conn: ConnId,
        /// Its correlation id.
        correlation: u32,
        /// Why.
        code: ErrorCode,
        /// Detail.
        message: &'static str,
    },
    /// The owner refused a SUBSCRIBE (its session limit): undo the subscription on the
    /// connection's shard, then answer with ERROR.
    SubscribeRefused {
        /// The connection.
        conn: ConnId,
        /// Its correlation id.
        correlation: u32,
        /// The session.
        key: SessionKey,
        /// Why.
        code: ErrorCode,
        /// Detail.
        message: &'static str,
    },
    /// A request without a specific answer succeeded; answer with OK.
    Done {
        /// The connection.
        conn: ConnId,
        /// Its correlation id.
        correlation: u32,
    },
    /// The desk's answer to a [`DeskRequest`]: OK, ERROR, or the verdict of an access check.
    DeskAnswer {
        /// The connection.
        conn: ConnId,
        /// Its correlation id.
        correlation: u32,
        /// The check this answers (0: not a check; answer the connection).
        check: u64,
        /// Why it was refused (`None`: done).
        refusal: Option<(ErrorCode, String)>,
    },
    /// Desk shard → session owner: append this conversation event to the session (the owner
    /// sets epoch, seq and timestamp), fan it out, and feed it to the tenant's supervisors.
    /// An event, not a request, because the desk produces it while handling requests and
    /// timers and must not wait on a peer that may be waiting on it.
    ConversationEvent {
        /// The session.
        key: SessionKey,
        /// The event, seq not yet assigned.
        event: ConversationEvent,
    },
    /// Desk shard → session owner: these connections (agent consoles) no longer take part in
    /// the session. Sent after the events that ended their part, on the same ring, so the
    /// owner's fan-out of those events reaches them before their subscription ends.
    Revoke {
        /// The session.
        key: SessionKey,
        /// (shard, connection) pairs.
        conns: Vec<(usize, ConnId)>,
    },
    /// Session owner → a connection's shard: end that connection's subscription to `key`.
    RevokeConn {
        /// The connection.
        conn: ConnId,
        /// The session.
        key: SessionKey,
    },
    /// A frame for every supervisor connection of `tenant` on the receiving shard.
    SupervisorFeed {
        /// The tenant.
        tenant: Text,
        /// The encoded frame.
        frame: Bytes,
    },
    /// A frame for one connection (an offer to an agent's console).
    ToConn {
        /// The connection.
        conn: ConnId,
        /// The encoded frame.
        frame: Bytes,
    },
}

/// Whether producers may append to a link without waiting.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LinkState {
    /// Below its backlog limit.
    Flowing,
    /// At or above its backlog limit: producers that can wait, wait.
    Backlogged,
}

/// Counters of one link, for /metrics.
#[derive(Debug, Clone, Copy, Default)]
pub struct LinkStats {
    /// Messages moved into the ring.
    pub sent_total: u64,
    /// Times the ring was full when the pump tried to send.
    pub ring_full_total: u64,
    /// Times a producer had to wait for the backlog to shrink.
    pub backlogged_total: u64,
    /// Messages waiting now.
    pub backlog_messages: u64,
    /// Most messages ever waiting.
    pub backlog_messages_peak: u64,
}

/// An ordered outbound link to one peer shard: a local FIFO drained by one pump task.
pub struct PeerLink<T> {
    fifo: RefCell<VecDeque<T>>,
    backlog_messages_max: usize,
    pump_waker: Cell<Option<Waker>>,
    space_wakers: RefCell<Vec<Waker>>,
    stats: Cell<LinkStats>,
}

impl<T: Send + 'static> PeerLink<T> {
    /// An empty link.
    pub fn new(backlog_messages_max: usize) -> Rc<PeerLink<T>> {
        Rc::new(PeerLink {
            fifo: RefCell::new(VecDeque::with_capacity(backlog_messages_max)),
            backlog_messages_max,
            pump_waker: Cell::new(None),
            space_wakers: RefCell::new(Vec::new()),
            stats: Cell::new(LinkStats::default()),
        })
    }

    /// Appends a message; never waits. Callers that can wait then call
    /// [`PeerLink::wait_for_room`].
    pub fn push(&self, message: T) {
        let depth = {
            let mut fifo = self.fifo.borrow_mut();
            fifo.push_back(message);
            fifo.len() as u64
        };
        self.update_stats(|stats| stats.backlog_messages_peak = stats.backlog_messages_peak.max(depth));
        if let Some(waker) = self.pump_waker.take() {
            waker.wake();
        }
    }

    /// Flowing or backlogged.
    pub fn state(&self) -> LinkState {
        if self.fifo.borrow().len() >= self.backlog_messages_max {
            LinkState::Backlogged
        } else {
            LinkState::Flowing
        }
    }

    /// Resolves once the backlog is below its limit.
    pub async fn wait_for_room(&self) {
        if self.state() == LinkState::Flowing {
            return;
        }
        self.update_stats(|stats| stats.backlogged_total += 1);
        poll_fn(|cx| {
            if self.state() == LinkState::Flowing {
                Poll::Ready(())
            } else {
                self.space_wakers.borrow_mut().push(cx.waker().clone());
                Poll::Pending
            }
        })
        .await;
    }

    /// Counters.
    pub fn stats(&self) -> LinkStats {
        let mut stats = self.stats.get();
        stats.backlog_messages = self.fifo.borrow().len() as u64;
        stats
    }

    fn update_stats(&self, change: impl FnOnce(&mut LinkStats)) {
        let mut stats = self.stats.get();
        change(&mut stats);
        self.stats.set(stats);
    }

    /// Moves messages into the ring, in order, for as long as the ring is open.
    pub async fn pump(self: Rc<Self>, ring: ConnectedSender<T>) {
        loop {
            let next = self.fifo.borrow_mut().pop_front();
            let Some(message) = next else {
                poll_fn(|cx| {
                    if self.fifo.borrow().is_empty() {
                        self.pump_waker.set(Some(cx.waker().clone()));
                        Poll::Pending
                    } else {
                        Poll::Ready(())
                    }
                })
                .await;
                continue;
            };
            match ring.try_send(message) {
                Ok(()) => {}
                Err(GlommioError::WouldBlock(ResourceType::Channel(message))) => {
                    self.update_stats(|stats| stats.ring_full_total += 1);
                    if ring.send(message).await.is_err() {
                        return;
                    }
                }
                // The peer shard is gone (shutdown); nothing more can be delivered there.
                Err(_) => return,
            }
            self.update_stats(|stats| stats.sent_total += 1);
            if self.state() == LinkState::Flowing {
                for waker in self.space_wakers.borrow_mut().drain(..) {
                    waker.wake();
                }
            }
        }
    }
}

/// Hands out this process's session epoch: changes on every start, because (until the journal
/// lands) history does not survive a restart.
pub fn new_epoch() -> u64 {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos() as u64);
    // Keep it positive and distinct from 0 (0 means "no epoch" to clients).
    (nanos ^ u64::from(std::process::id()).rotate_left(48)) | 1
}

#[cfg(test)]
mod tests {
    use super::*;

    type Map<V> = hashbrown::HashMap<SessionKey, V, foldhash::quality::RandomState>;

    fn key(tenant: &str, session: &str) -> SessionKey {
        SessionKey { tenant: Text::from(tenant), session: Text::from(session) }
    }

    /// A borrowed key finds exactly the entry of the owned key it stands for, in maps keyed by
    /// `SessionKey` and by `Rc<SessionKey>` (it must hash like one: a mismatch misses).
    #[test]
    fn a_key_ref_finds_the_entry_of_its_owned_key() {
        let keys: Vec<SessionKey> = (0..200).map(|i| key(["acme", "globex", ""][i % 3], &format!("conv-{i}"))).collect();
        let mut map: Map<usize> = Map::default();
        let mut shared: hashbrown::HashMap<Rc<SessionKey>, usize, foldhash::quality::RandomState> = Default::default();
        for (i, k) in keys.iter().enumerate() {
            map.insert(k.clone(), i);
            shared.insert(Rc::new(k.clone()), i);
        }
        for (i, k) in keys.iter().enumerate() {
            let session = String::from(k.session.as_str());
            let borrowed = KeyRef { tenant: &k.tenant, session: &session };
            assert_eq!(map.get(&borrowed), Some(&i));
            assert_eq!(shared.get(&borrowed), Some(&i));
            assert_eq!(borrowed.to_owned_key(), *k);
        }
        let other_tenant = Text::from("initech");
        assert_eq!(map.get(&KeyRef { tenant: &other_tenant, session: "conv-0" }), None);
        assert_eq!(map.get(&KeyRef { tenant: &keys[0].tenant, session: "conv-1" }), None);
    }

    /// Placement is the fixed-key SipHash of tenant then session, as clients may compute it.
    #[test]
    fn placement_is_the_fixed_key_hash_of_tenant_and_session() {
        for (tenant, session) in [("acme", "conv-1"), ("globex", "a"), ("", "x"), ("acme", "conv-2")] {
            let mut hasher = std::collections::hash_map::DefaultHasher::new();
            tenant.hash(&mut hasher);
            session.hash(&mut hasher);
            let expected = hasher.finish();
            let k = key(tenant, session);
            assert_eq!(k.conversation_id(), expected);
            for shards in [1, 2, 3, 7] {
                let placed = if shards == 1 { 0 } else { (expected % shards as u64) as usize };
                assert_eq!(k.shard(shards), placed);
                assert_eq!(k.borrowed().shard(shards), placed);
            }
        }
    }
}
