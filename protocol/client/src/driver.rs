//! What the blocking and the tokio drivers share: the options, the commands the API sends to
//! the driver, and the router that hands the session's events to the callers' queues.
//!
//! Owns the per-subscription bounded queues, the waiters of pending calls, and the items
//! *parked* because their queue was full. It may not touch a socket or the clock: the drivers
//! do the I/O and pass `now`.
//!
//! # The receive backpressure policy
//!
//! Each subscription has a bounded queue of `receive_queue_messages_max` items, the events
//! receiver one of `event_queue_events_max`. When an item does not fit, it is parked (in
//! order; everything after it is parked behind it) and the driver **stops reading the socket**
//! until the consumer makes room. Nothing is dropped in the client. Reading stops for the
//! whole connection, so one subscription left unread holds up the others on the same client;
//! the unread bytes back up into the kernel's buffers, then into the server's bounded outbound
//! buffer, and the server finally closes the connection as a slow consumer. The client then
//! reconnects (while items are parked it waits to reconnect until there is room) and resumes
//! every subscription after the last item queued for it, so nothing is lost or duplicated.
//! At most one read's worth of frames (one chunk of at most 64 KiB) is ever parked.

use std::collections::{HashMap, VecDeque};
use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use flume::TrySendError;
use switchboard_protocol::{
    ConversationEvent, Frame, PubAck, Publish, ReadCursor, ResumeFrom, Subscribed, Text, Typing, Welcome,
};

use crate::config::{ClientConfig, ReconnectPolicy};
use crate::error::ClientError;
use crate::session::{ClientSession, Delivery, Event, Gap, Position, RequestId, SessionStats};

/// Bytes read from the socket at most at once. Bounds what one read can park.
pub(crate) const READ_CHUNK_BYTES: usize = 64 * 1024;
/// Commands (and, for the blocking driver, read chunks) waiting for the driver at most.
/// A caller that finds it full waits: the API's own backpressure.
pub(crate) const INBOX_CAPACITY: usize = 256;

/// How to connect, and the client's limits. Every field has a documented default.
///
/// ```
/// # use std::time::Duration;
/// use switchboard_client::{ClientOptions, ReconnectPolicy};
/// let options = ClientOptions::new("engine.internal:7400")
///     .token("eyJhbGciOi…")
///     .client_name("chat-gateway/2.3")
///     .receive_queue_messages_max(4096)
///     .reconnect(ReconnectPolicy { initial: Duration::from_millis(50), ..ReconnectPolicy::default() });
/// assert_eq!(options.request_timeout, Duration::from_secs(10));
/// ```
#[derive(Debug, Clone)]
pub struct ClientOptions {
    /// The engine's address, `host:port`; resolved again at every connect.
    pub addr: String,
    /// The auth token (a JWT; empty when the engine runs without auth).
    pub token: String,
    /// Sent in HELLO for the engine's logs (default `switchboard-client/<version>`).
    pub client_name: String,
    /// Longest wait for the TCP connect, and again for the handshake (default 5 s).
    pub connect_timeout: Duration,
    /// Longest wait for a request's answer, across reconnects (default 10 s).
    pub request_timeout: Duration,
    /// PING after this long without sending (default 10 s; WELCOME may shorten it).
    pub keepalive: Duration,
    /// Reconnect when nothing arrived for this long (default: twice the keepalive).
    pub idle_timeout: Option<Duration>,
    /// Items each subscription queues for its consumer at most (default 1024). See the
    /// backpressure policy in [`crate::blocking`].
    pub receive_queue_messages_max: usize,
    /// Events the events receiver queues at most (default 1024).
    pub event_queue_events_max: usize,
    /// Publishes waiting for their PUBACK at most (default 1024).
    pub inflight_publishes_max: usize,
    /// Other requests waiting for an answer at most (default 1024).
    pub requests_pending_max: usize,
    /// Subscriptions at most (default 1024; the engine's WELCOME may lower it).
    pub subscriptions_max: usize,
    /// Largest frame body accepted from the engine, in bytes (default 1 MiB).
    pub frame_body_bytes_max: u32,
    /// The reconnect schedule.
    pub reconnect: ReconnectPolicy,
    /// Retry the first connect on the reconnect schedule instead of failing `connect`
    /// (default false).
    pub retry_initial_connect: bool,
    /// Seed for the reconnect jitter and the `client_msg_id` base (default: random).
    pub seed: Option<u64>,
}

impl ClientOptions {
    /// Options with every default, for the engine at `addr`.
    pub fn new(addr: impl Into<String>) -> ClientOptions {
        let defaults = ClientConfig::default();
        ClientOptions {
            addr: addr.into(),
            token: String::new(),
            client_name: defaults.client_name.to_string(),
            connect_timeout: Duration::from_secs(5),
            request_timeout: defaults.request_timeout,
            keepalive: defaults.keepalive,
            idle_timeout: None,
            receive_queue_messages_max: 1024,
            event_queue_events_max: 1024,
            inflight_publishes_max: defaults.inflight_publishes_max,
            requests_pending_max: defaults.requests_pending_max,
            subscriptions_max: defaults.subscriptions_max,
            frame_body_bytes_max: defaults.frame_body_bytes_max,
            reconnect: defaults.reconnect,
            retry_initial_connect: false,
            seed: None,
        }
    }

    /// Sets the token.
    #[must_use]
    pub fn token(mut self, token: impl Into<String>) -> ClientOptions {
        self.token = token.into();
        self
    }

    /// Sets the client name.
    #[must_use]
    pub fn client_name(mut self, client_name: impl Into<String>) -> ClientOptions {
        self.client_name = client_name.into();
        self
    }

    /// Sets the connect (and handshake) timeout.
    #[must_use]
    pub fn connect_timeout(mut self, timeout: Duration) -> ClientOptions {
        self.connect_timeout = timeout;
        self
    }

    /// Sets the request timeout.
    #[must_use]
    pub fn request_timeout(mut self, timeout: Duration) -> ClientOptions {
        self.request_timeout = timeout;
        self
    }

    /// Sets the keepalive interval.
    #[must_use]
    pub fn keepalive(mut self, keepalive: Duration) -> ClientOptions {
        self.keepalive = keepalive;
        self
    }

    /// Sets each subscription's queue bound.
    #[must_use]
    pub fn receive_queue_messages_max(mut self, max: usize) -> ClientOptions {
        self.receive_queue_messages_max = max;
        self
    }

    /// Sets the reconnect schedule.
    #[must_use]
    pub fn reconnect(mut self, policy: ReconnectPolicy) -> ClientOptions {
        self.reconnect = policy;
        self
    }

    /// Sets the seed (tests use it to replay a schedule).
    #[must_use]
    pub fn seed(mut self, seed: u64) -> ClientOptions {
        self.seed = Some(seed);
        self
    }

    pub(crate) fn session_config(&self) -> ClientConfig {
        ClientConfig {
            token: Text::from(self.token.as_str()),
            client_name: Text::from(self.client_name.as_str()),
            features: 0,
            keepalive: self.keepalive,
            idle_timeout: self.idle_timeout,
            handshake_timeout: self.connect_timeout,
            request_timeout: self.request_timeout,
            reconnect: self.reconnect,
            retry_initial_connect: self.retry_initial_connect,
            inflight_publishes_max: self.inflight_publishes_max,
            requests_pending_max: self.requests_pending_max,
            subscriptions_max: self.subscriptions_max,
            frame_body_bytes_max: self.frame_body_bytes_max,
            seed: self.seed.unwrap_or_else(random_seed),
        }
    }

    /// How long a socket write may block before the connection counts as dead.
    pub(crate) fn write_timeout(&self) -> Duration {
        self.idle_timeout.unwrap_or(self.keepalive * 2).max(Duration::from_secs(1))
    }
}

/// A seed that differs per process and per call (std's hasher keys are random per process).
fn random_seed() -> u64 {
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |since| since.as_nanos());
    hasher.write_u128(nanos);
    hasher.write_u32(std::process::id());
    hasher.finish()
}

/// What a subscription yields, in the session's order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Item {
    /// A message.
    Message(Delivery),
    /// A conversation state change (shares the messages' seq order).
    Conversation(ConversationEvent),
    /// A participant's read cursor moved (not sequenced).
    ReadCursor(ReadCursor),
    /// A participant started or stopped typing (ephemeral, not sequenced).
    Typing(Typing),
    /// Items were missed here and will not be replayed; see [`Gap`].
    Gap(Gap),
}

impl Item {
    /// The position of a sequenced item (message or conversation event).
    pub fn position(&self) -> Option<Position> {
        match self {
            Item::Message(message) => Some(Position { epoch: message.epoch, seq: message.seq }),
            Item::Conversation(event) => Some(Position { epoch: event.epoch, seq: event.seq }),
            _ => None,
        }
    }
}

pub(crate) type Reply<T> = flume::Sender<Result<T, ClientError>>;
pub(crate) type ItemSender = flume::Sender<Result<Item, ClientError>>;
pub(crate) type ItemReceiver = flume::Receiver<Result<Item, ClientError>>;

/// A call from the API to the driver.
pub(crate) enum Command {
    Publish { publish: Publish, reply: Reply<PubAck> },
    Subscribe { session: Text, from: ResumeFrom, reply: Reply<SubscriptionParts> },
    /// `slot`: only if the subscription is still the one this handle was given (a dropped
    /// handle must not end a newer subscription to the same session).
    Unsubscribe { session: Text, slot: Option<u64>, reply: Option<Reply<()>> },
    Request { frame: Frame, reply: Reply<Frame> },
    Typing { typing: Typing, reply: Reply<()> },
    Events { reply: Reply<flume::Receiver<Event>> },
    SetToken { token: Text, reply: Reply<()> },
    Stats { reply: Reply<SessionStats> },
    Close { reply: Reply<()> },
}

/// What wakes a driver.
pub(crate) enum Input {
    Command(Command),
    /// Bytes read by a connection's reader thread (blocking driver).
    #[cfg_attr(not(feature = "blocking"), allow(dead_code))]
    Bytes { generation: u64, bytes: BytesMut },
    /// A connection's reader saw EOF or an error (blocking driver).
    #[cfg_attr(not(feature = "blocking"), allow(dead_code))]
    ReadClosed { generation: u64, error: Option<std::io::Error> },
    /// A consumer made room in a queue, or the last handle was dropped.
    Wake,
}

/// State shared by the driver and the handles.
#[derive(Default)]
pub(crate) struct Shared {
    /// Set by the driver while items are parked; a consumer that takes an item clears it and
    /// wakes the driver.
    wake_wanted: AtomicBool,
    /// Why the client closed for good, once it has.
    closed: Mutex<Option<ClientError>>,
    /// The last client handle is gone: the driver closes the session.
    pub(crate) shutdown: AtomicBool,
}

impl Shared {
    pub(crate) fn closed_error(&self) -> ClientError {
        self.closed.lock().unwrap_or_else(std::sync::PoisonError::into_inner).clone().unwrap_or(ClientError::Closed)
    }

    fn set_closed(&self, error: ClientError) {
        let mut closed = self.closed.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
        closed.get_or_insert(error);
    }

    /// Called by a consumer after it took an item.
    pub(crate) fn took_item(&self, inbox: &flume::WeakSender<Input>) {
        if self.wake_wanted.swap(false, Ordering::SeqCst) {
            if let Some(inbox) = inbox.upgrade() {
                // Full means the driver has inputs to handle anyway, and it retries parked
                // items after every input.
                let _ = inbox.try_send(Input::Wake);
            }
        }
    }
}

/// A confirmed subscription, handed to the API to wrap.
pub(crate) struct SubscriptionParts {
    pub(crate) session: Text,
    pub(crate) slot: u64,
    pub(crate) info: Subscribed,
    pub(crate) items: ItemReceiver,
}

struct SubSlot {
    id: u64,
    tx: ItemSender,
    /// Handed out with the SUBSCRIBED.
    rx: Option<ItemReceiver>,
}

enum Waiter {
    Publish(Reply<PubAck>),
    Subscribe { session: Text, reply: Reply<SubscriptionParts> },
    Unsubscribe(Option<Reply<()>>),
    Request(Reply<Frame>),
}

impl Waiter {
    fn fail(self, error: ClientError) {
        match self {
            Waiter::Publish(reply) => drop(reply.send(Err(error))),
            Waiter::Subscribe { reply, .. } => drop(reply.send(Err(error))),
            Waiter::Unsubscribe(reply) => {
                if let Some(reply) = reply {
                    drop(reply.send(Err(error)));
                }
            }
            Waiter::Request(reply) => drop(reply.send(Err(error))),
        }
    }
}

enum Parked {
    Item { tx: ItemSender, item: Result<Item, ClientError> },
    Event { tx: flume::Sender<Event>, event: Event },
}

/// The session plus the router: everything of a driver but the I/O.
pub(crate) struct Core {
    pub(crate) session: ClientSession,
    pub(crate) shared: Arc<Shared>,
    receive_queue_messages_max: usize,
    event_queue_events_max: usize,
    waiters: HashMap<RequestId, Waiter>,
    subs: HashMap<Text, SubSlot>,
    next_slot: u64,
    events: Option<flume::Sender<Event>>,
    parked: VecDeque<Parked>,
    connect_waiter: Option<Reply<Welcome>>,
    /// The driver's error for the last failed connect, reported if it ends the client.
    connect_error: Option<ClientError>,
}

impl Core {
    pub(crate) fn new(session: ClientSession, options: &ClientOptions, shared: Arc<Shared>, ready: Reply<Welcome>) -> Core {
        Core {
            session,
            shared,
            receive_queue_messages_max: options.receive_queue_messages_max.max(1),
            event_queue_events_max: options.event_queue_events_max.max(1),
            waiters: HashMap::new(),
            subs: HashMap::new(),
            next_slot: 1,
            events: None,
            parked: VecDeque::new(),
            connect_waiter: Some(ready),
            connect_error: None,
        }
    }

    /// Items wait for room in a full queue: do not read the socket, do not reconnect.
    pub(crate) fn is_parked(&self) -> bool {
        !self.parked.is_empty()
    }

    /// The last client handle is gone: close the session (once). The driver keeps running
    /// until its inbox is disconnected, so no command is ever left unanswered in it.
    pub(crate) fn check_shutdown(&mut self, now: Instant) {
        if self.shared.shutdown.load(Ordering::SeqCst) && !self.session.is_closed() {
            self.session.close(now);
        }
    }

    pub(crate) fn note_connect_error(&mut self, error: std::io::Error) {
        self.connect_error = Some(ClientError::from(error));
    }

    pub(crate) fn handle_command(&mut self, now: Instant, command: Command) {
        match command {
            Command::Publish { publish, reply } => match self.session.publish(now, publish) {
                Ok(request) => drop(self.waiters.insert(request, Waiter::Publish(reply))),
                Err(error) => drop(reply.send(Err(error))),
            },
            Command::Subscribe { session, from, reply } => match self.session.subscribe(now, session.clone(), from) {
                Ok(request) => {
                    let (tx, rx) = flume::bounded(self.receive_queue_messages_max);
                    let id = self.next_slot;
                    self.next_slot += 1;
                    self.subs.insert(session.clone(), SubSlot { id, tx, rx: Some(rx) });
                    self.waiters.insert(request, Waiter::Subscribe { session, reply });
                }
                Err(error) => drop(reply.send(Err(error))),
            },
            Command::Unsubscribe { session, slot, reply } => {
                if slot.is_some_and(|slot| self.subs.get(&session).is_none_or(|current| current.id != slot)) {
                    // The handle's subscription already ended; a newer one is not its to end.
                    if let Some(reply) = reply {
                        drop(reply.send(Ok(())));
                    }
                    return;
                }
                self.subs.remove(&session);
                match self.session.unsubscribe(now, &session) {
                    Ok(request) => drop(self.waiters.insert(request, Waiter::Unsubscribe(reply))),
                    Err(error) => {
                        if let Some(reply) = reply {
                            drop(reply.send(Err(error)));
                        }
                    }
                }
            }
            Command::Request { frame, reply } => {
                if matches!(frame, Frame::Publish(_) | Frame::Subscribe(_) | Frame::Unsubscribe(_)) {
                    let error = ClientError::InvalidRequest("use publish(), subscribe() or unsubscribe()".into());
                    return drop(reply.send(Err(error)));
                }
                match self.session.request(now, frame) {
                    Ok(request) => drop(self.waiters.insert(request, Waiter::Request(reply))),
                    Err(error) => drop(reply.send(Err(error))),
                }
            }
            Command::Typing { typing, reply } => drop(reply.send(self.session.typing(now, typing))),
            Command::Events { reply } => {
                let (tx, rx) = flume::bounded(self.event_queue_events_max);
                self.events = Some(tx);
                drop(reply.send(Ok(rx)));
            }
            Command::SetToken { token, reply } => drop(reply.send(self.session.set_token(token))),
            Command::Stats { reply } => drop(reply.send(Ok(self.session.stats()))),
            Command::Close { reply } => {
                self.session.close(now);
                drop(reply.send(Ok(())));
            }
        }
    }

    /// Routes every event the session has; true if there was any.
    pub(crate) fn dispatch(&mut self, now: Instant) -> bool {
        let mut any = false;
        while let Some(event) = self.session.poll_event() {
            any = true;
            self.route(now, event);
        }
        any
    }

    fn route(&mut self, now: Instant, event: Event) {
        match event {
            Event::Connected { ref welcome, .. } => {
                if let Some(ready) = self.connect_waiter.take() {
                    drop(ready.send(Ok(welcome.clone())));
                }
                self.connect_error = None;
                self.deliver_event(event);
            }
            Event::Disconnected { ref reason, reconnect_at: None } => {
                let error = match self.connect_error.take() {
                    Some(io) if self.connect_waiter.is_some() => io,
                    _ => reason.to_error(),
                };
                self.shared.set_closed(error.clone());
                if let Some(ready) = self.connect_waiter.take() {
                    drop(ready.send(Err(error.clone())));
                }
                for (_, waiter) in self.waiters.drain() {
                    waiter.fail(error.clone());
                }
                // Parked items keep their own senders; the queues end once they are delivered.
                self.subs.clear();
                self.deliver_event(event);
            }
            Event::Disconnected { .. } | Event::Resubscribed { .. } | Event::AgentStatus(_) | Event::TicketEvent(_) => {
                self.deliver_event(event);
            }
            Event::GoAway(_) => self.deliver_event(event),
            Event::Subscribed { request, info } => {
                let Some(Waiter::Subscribe { session, reply }) = self.waiters.remove(&request) else { return };
                let Some(slot) = self.subs.get_mut(&session) else { return };
                let Some(items) = slot.rx.take() else { return };
                let parts = SubscriptionParts { session: session.clone(), slot: slot.id, info, items };
                if reply.send(Ok(parts)).is_err() {
                    // The caller stopped waiting.
                    self.subs.remove(&session);
                    let _ = self.session.unsubscribe(now, &session);
                }
            }
            Event::Gap(gap) => {
                let session = gap.session.clone();
                self.deliver_item(now, &session, Ok(Item::Gap(gap)));
            }
            Event::SubscriptionFailed { session, error } => {
                self.deliver_item(now, &session, Err(error));
                self.subs.remove(&session);
            }
            Event::Unsubscribed { request, .. } => {
                if let Some(Waiter::Unsubscribe(Some(reply))) = self.waiters.remove(&request) {
                    drop(reply.send(Ok(())));
                }
            }
            Event::Delivery(message) => {
                let session = message.session.clone();
                self.deliver_item(now, &session, Ok(Item::Message(message)));
            }
            Event::ConversationEvent(conversation) => {
                if self.subs.contains_key(&conversation.session) {
                    let session = conversation.session.clone();
                    self.deliver_item(now, &session, Ok(Item::Conversation(conversation)));
                } else {
                    self.deliver_event(Event::ConversationEvent(conversation));
                }
            }
            Event::ReadCursor(cursor) => {
                if self.subs.contains_key(&cursor.session) {
                    let session = cursor.session.clone();
                    self.deliver_item(now, &session, Ok(Item::ReadCursor(cursor)));
                } else {
                    self.deliver_event(Event::ReadCursor(cursor));
                }
            }
            Event::Typing(typing) => {
                if self.subs.contains_key(&typing.session) {
                    let session = typing.session.clone();
                    self.deliver_item(now, &session, Ok(Item::Typing(typing)));
                } else {
                    self.deliver_event(Event::Typing(typing));
                }
            }
            Event::PubAck { request, ack } => {
                if let Some(Waiter::Publish(reply)) = self.waiters.remove(&request) {
                    drop(reply.send(Ok(ack)));
                }
            }
            Event::Response { request, frame } => {
                if let Some(Waiter::Request(reply)) = self.waiters.remove(&request) {
                    drop(reply.send(Ok(frame)));
                }
            }
            Event::RequestFailed { request, error } => {
                if let Some(waiter) = self.waiters.remove(&request) {
                    if let Waiter::Subscribe { session, .. } = &waiter {
                        if self.subs.get(session).is_some_and(|slot| slot.rx.is_some()) {
                            self.subs.remove(session);
                        }
                    }
                    waiter.fail(error);
                }
            }
        }
    }

    fn deliver_item(&mut self, now: Instant, session: &Text, item: Result<Item, ClientError>) {
        let Some(slot) = self.subs.get(session) else { return };
        let tx = slot.tx.clone();
        if !self.parked.is_empty() {
            return self.parked.push_back(Parked::Item { tx, item });
        }
        match tx.try_send(item) {
            Ok(()) => {}
            Err(TrySendError::Full(item)) => self.parked.push_back(Parked::Item { tx, item }),
            Err(TrySendError::Disconnected(_)) => {
                // The handle was dropped and its unsubscribe did not get through: do it now.
                self.subs.remove(session);
                let _ = self.session.unsubscribe(now, session);
            }
        }
    }

    fn deliver_event(&mut self, event: Event) {
        let Some(tx) = self.events.clone() else { return };
        if !self.parked.is_empty() {
            return self.parked.push_back(Parked::Event { tx, event });
        }
        match tx.try_send(event) {
            Ok(()) => {}
            Err(TrySendError::Full(event)) => self.parked.push_back(Parked::Event { tx, event }),
            Err(TrySendError::Disconnected(_)) => self.events = None,
        }
    }

    /// Moves parked items into their queues while they fit. If some remain, asks consumers to
    /// wake the driver when they take an item (set before the last retry, so a consumer that
    /// made room in between is not missed).
    pub(crate) fn settle_parked(&mut self) {
        if self.parked.is_empty() {
            return;
        }
        self.retry_parked();
        if !self.parked.is_empty() {
            self.shared.wake_wanted.store(true, Ordering::SeqCst);
            self.retry_parked();
        }
    }

    fn retry_parked(&mut self) {
        while let Some(parked) = self.parked.pop_front() {
            match parked {
                Parked::Item { tx, item } => match tx.try_send(item) {
                    Ok(()) | Err(TrySendError::Disconnected(_)) => {}
                    Err(TrySendError::Full(item)) => return self.parked.push_front(Parked::Item { tx, item }),
                },
                Parked::Event { tx, event } => match tx.try_send(event) {
                    Ok(()) | Err(TrySendError::Disconnected(_)) => {}
                    Err(TrySendError::Full(event)) => return self.parked.push_front(Parked::Event { tx, event }),
                },
            }
        }
    }

    /// The driver stops: every waiter fails, every queue ends.
    pub(crate) fn finish(&mut self) {
        let error = if self.session.is_closed() { self.shared.closed_error() } else { ClientError::Closed };
        self.shared.set_closed(error.clone());
        if let Some(ready) = self.connect_waiter.take() {
            drop(ready.send(Err(error.clone())));
        }
        for (_, waiter) in self.waiters.drain() {
            waiter.fail(error.clone());
        }
        self.subs.clear();
        self.parked.clear();
        self.events = None;
    }
}
