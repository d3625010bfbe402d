//! The blocking driver: [`Client`] over `std::net`, callable from any thread.
//!
//! Owns the TCP connection and the threads that serve it: one driver thread per client owns
//! the [`ClientSession`] and the socket's write side; one reader thread per connection reads
//! and hands chunks to the driver. API calls are messages to the driver thread and wait for
//! its answer, so a [`Client`] is `Send + Sync + Clone` and any number of threads can share
//! it. May not touch protocol logic: that is the session's.
//!
//! # Backpressure
//!
//! - **Receiving.** Each [`Subscription`] has a bounded queue
//!   ([`ClientOptions::receive_queue_messages_max`], default 1024 items). When an item does
//!   not fit, the driver stops reading the socket until the consumer makes room — nothing is
//!   dropped in the client. The kernel's buffers fill, then the engine's bounded outbound
//!   buffer, and the engine closes the connection as a slow consumer
//!   ([`ClientError::SlowConsumer`] is only reported if the client cannot reconnect). The
//!   client then reconnects (once there is room) and resumes every subscription after the
//!   last item it queued, without loss or duplicates. Reading stops for the whole client, so
//!   drain every subscription (each on its own thread if they can be slow) — and do not wait
//!   on [`Client::publish`] on the thread that should be draining a full subscription: its
//!   PUBACK may be behind the items that do not fit. Use [`Client::publish_nowait`] there.
//! - **Publishing.** At most [`ClientOptions::inflight_publishes_max`] publishes wait for
//!   their PUBACK; one more fails at once with [`ClientError::InflightFull`].
//! - **Calls.** The driver takes up to 256 commands at a time; a caller beyond that waits.
//!
//! ```no_run
//! use switchboard_client::blocking::Client;
//! use switchboard_client::{ClientOptions, Item, ResumeFrom};
//!
//! # fn main() -> Result<(), switchboard_client::ClientError> {
//! let client = Client::connect(ClientOptions::new("127.0.0.1:7400"))?;
//! let subscription = client.subscribe("conv-42", ResumeFrom::Live)?;
//! let consumer = std::thread::spawn(move || {
//!     for item in subscription.iter() {
//!         if let Ok(Item::Message(message)) = item {
//!             println!("{}: {:?}", message.sender, message.payload);
//!         }
//!     }
//! });
//! client.publish("conv-42", "customer-7", "hello")?;
//! # drop(consumer);
//! # Ok(())
//! # }
//! ```

use std::io::{Read, Write};
use std::net::{Shutdown, TcpStream, ToSocketAddrs};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use flume::{Receiver, RecvTimeoutError, Sender, TryRecvError, WeakSender};
use switchboard_protocol::{
    AgentStatus, CloseConversation, Frame, OfferResponse, OpenConversation, PubAck, Publish, ReadCursor, ResumeFrom,
    Subscribed, Text, TicketCommand, TicketEvent, Transfer, Typing, Welcome,
};

use crate::driver::{
    ClientOptions, Command, Core, Input, Item, ItemReceiver, Reply, Shared, SubscriptionParts, INBOX_CAPACITY,
    READ_CHUNK_BYTES,
};
use crate::error::ClientError;
use crate::session::{Action, ClientSession, ConnectionState, Event, SessionStats};

/// A connected client. Cheap to clone; the connection closes when the last clone is dropped
/// (or on [`Client::close`]).
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
    welcome: Welcome,
}

struct Inner {
    /// Taken in `drop`: the driver stops once every strong sender is gone, which is what
    /// guarantees that a command in its inbox is always answered.
    inbox: Option<Sender<Input>>,
    shared: Arc<Shared>,
    thread: Mutex<Option<JoinHandle<()>>>,
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.shared.shutdown.store(true, Ordering::SeqCst);
        if let Some(inbox) = self.inbox.take() {
            let _ = inbox.try_send(Input::Wake);
        }
        let thread = self.thread.lock().unwrap_or_else(std::sync::PoisonError::into_inner).take();
        if let Some(thread) = thread {
            let _ = thread.join();
        }
    }
}

impl Client {
    /// Connects and completes the handshake. Fails with the connect's I/O error, a handshake
    /// timeout, or [`ClientError::AuthRefused`] — unless `retry_initial_connect` is set, in
    /// which case it keeps trying on the reconnect schedule.
    pub fn connect(options: ClientOptions) -> Result<Client, ClientError> {
        let session = ClientSession::new(options.session_config())?;
        let (inbox_tx, inbox_rx) = flume::bounded(INBOX_CAPACITY);
        let (ready_tx, ready_rx) = flume::bounded(1);
        let shared = Arc::new(Shared::default());
        let driver = Driver {
            core: Core::new(session, &options, Arc::clone(&shared), ready_tx),
            inbox: inbox_rx,
            inbox_tx: inbox_tx.downgrade(),
            options,
            conn: None,
            generation: 0,
            out: BytesMut::new(),
            input: BytesMut::new(),
            connect_deferred: false,
            paused: false,
        };
        let thread = std::thread::Builder::new().name("switchboard-client".into()).spawn(move || driver.run())?;
        let inner = Arc::new(Inner { inbox: Some(inbox_tx), shared, thread: Mutex::new(Some(thread)) });
        match ready_rx.recv() {
            Ok(Ok(welcome)) => Ok(Client { inner, welcome }),
            Ok(Err(error)) => Err(error),
            Err(_) => Err(inner.shared.closed_error()),
        }
    }

    /// The WELCOME of the first connection: the tenant and the engine's limits.
    pub fn welcome(&self) -> &Welcome {
        &self.welcome
    }

    /// Publishes `payload` to `session` as `sender` and waits for the PUBACK, which carries
    /// the seq the message got. Survives reconnects (re-sent with the same `client_msg_id`).
    pub fn publish(
        &self,
        session: impl Into<Text>,
        sender: impl Into<Text>,
        payload: impl Into<Bytes>,
    ) -> Result<PubAck, ClientError> {
        let publish = Publish {
            session: session.into(),
            client_msg_id: 0,
            trace_id: 0,
            sender: sender.into(),
            payload: payload.into(),
        };
        self.publish_message(publish)
    }

    /// Publishes a fully specified message (trace id, own `client_msg_id`) and waits.
    pub fn publish_message(&self, publish: Publish) -> Result<PubAck, ClientError> {
        self.publish_nowait(publish).wait()
    }

    /// Publishes without waiting; the returned handle yields the PUBACK later. Dropping the
    /// handle does not cancel the publish.
    pub fn publish_nowait(&self, publish: Publish) -> PendingPublish {
        let (reply, rx) = flume::bounded(1);
        let sent = self.inner.inbox().send(Input::Command(Command::Publish { publish, reply }));
        PendingPublish { rx, failed: sent.err().map(|_| self.inner.shared.closed_error()) }
    }

    /// Subscribes to `session` from `from` and waits for the confirmation.
    /// [`Subscription::info`] tells where the stream starts and whether the requested position
    /// was recovered (if not, the first item is an [`Item::Gap`]).
    pub fn subscribe(&self, session: impl Into<Text>, from: ResumeFrom) -> Result<Subscription, ClientError> {
        let session = session.into();
        let parts = self.call(|reply| Command::Subscribe { session, from, reply })?;
        Ok(Subscription::new(parts, self.inner.inbox().downgrade(), Arc::clone(&self.inner.shared)))
    }

    /// Sends any request (not PUBLISH, SUBSCRIBE or UNSUBSCRIBE, which have their own calls)
    /// and waits for its answer frame.
    pub fn request(&self, frame: Frame) -> Result<Frame, ClientError> {
        self.call(|reply| Command::Request { frame, reply })
    }

    /// A customer opens a conversation: it enters a queue; progress comes as conversation
    /// events on its session.
    pub fn open_conversation(&self, open: OpenConversation) -> Result<(), ClientError> {
        self.request(Frame::OpenConversation(open)).map(drop)
    }

    /// An agent sets its presence, capacity and skills.
    pub fn set_agent_status(&self, status: AgentStatus) -> Result<(), ClientError> {
        self.request(Frame::AgentStatus(status)).map(drop)
    }

    /// An agent accepts or declines an offered conversation.
    pub fn respond_offer(&self, response: OfferResponse) -> Result<(), ClientError> {
        self.request(Frame::OfferResponse(response)).map(drop)
    }

    /// Moves a conversation to another agent or queue.
    pub fn transfer(&self, transfer: Transfer) -> Result<(), ClientError> {
        self.request(Frame::Transfer(transfer)).map(drop)
    }

    /// Closes a conversation.
    pub fn close_conversation(&self, close: CloseConversation) -> Result<(), ClientError> {
        self.request(Frame::CloseConversation(close)).map(drop)
    }

    /// Moves a participant's read cursor.
    pub fn read_cursor(&self, cursor: ReadCursor) -> Result<(), ClientError> {
        self.request(Frame::ReadCursor(cursor)).map(drop)
    }

    /// Creates or changes a ticket; returns its state after the change. A stale
    /// `expected_version` fails with [`ClientError::Server`] (code `Conflict`).
    pub fn ticket(&self, command: TicketCommand) -> Result<TicketEvent, ClientError> {
        match self.request(Frame::TicketCommand(command))? {
            Frame::TicketEvent(ticket) => Ok(ticket),
            other => Err(ClientError::Protocol(format!("{:?} answers a ticket command", other.frame_type()))),
        }
    }

    /// Sends a typing indicator (ephemeral: not kept while disconnected).
    pub fn typing(&self, typing: Typing) -> Result<(), ClientError> {
        self.call(|reply| Command::Typing { typing, reply })
    }

    /// A receiver of the events that belong to no subscription: connection changes,
    /// conversation events of unsubscribed sessions, agent status, ticket pushes. Events that
    /// arrive while no receiver exists are not kept; a new call replaces the previous
    /// receiver. Its queue is bounded like a subscription's, with the same policy.
    pub fn events(&self) -> Result<Events, ClientError> {
        let rx = self.call(|reply| Command::Events { reply })?;
        Ok(Events { rx, inbox: self.inner.inbox().downgrade(), shared: Arc::clone(&self.inner.shared) })
    }

    /// Replaces the token used by the next handshake (after an `AuthExpired` GOAWAY).
    pub fn set_token(&self, token: impl Into<Text>) -> Result<(), ClientError> {
        let token = token.into();
        self.call(|reply| Command::SetToken { token, reply })
    }

    /// The session's counters.
    pub fn stats(&self) -> Result<SessionStats, ClientError> {
        self.call(|reply| Command::Stats { reply })
    }

    /// Closes the client for good: pending calls fail with [`ClientError::Closed`], every
    /// subscription ends once its queued items are read.
    pub fn close(&self) -> Result<(), ClientError> {
        self.call(|reply| Command::Close { reply })
    }

    fn call<T>(&self, command: impl FnOnce(Reply<T>) -> Command) -> Result<T, ClientError> {
        let (reply, rx) = flume::bounded(1);
        if self.inner.inbox().send(Input::Command(command(reply))).is_err() {
            return Err(self.inner.shared.closed_error());
        }
        rx.recv().unwrap_or_else(|_| Err(self.inner.shared.closed_error()))
    }
}

impl Inner {
    fn inbox(&self) -> &Sender<Input> {
        self.inbox.as_ref().expect("taken only in drop")
    }
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client").field("tenant", &self.welcome.tenant).finish_non_exhaustive()
    }
}

/// A publish on its way; [`PendingPublish::wait`] yields its PUBACK.
#[derive(Debug)]
pub struct PendingPublish {
    rx: Receiver<Result<PubAck, ClientError>>,
    failed: Option<ClientError>,
}

impl PendingPublish {
    /// Waits for the PUBACK (at most the request timeout).
    pub fn wait(self) -> Result<PubAck, ClientError> {
        if let Some(error) = self.failed {
            return Err(error);
        }
        self.rx.recv().unwrap_or(Err(ClientError::Closed))
    }

    /// The PUBACK if it already arrived.
    pub fn try_wait(&self) -> Option<Result<PubAck, ClientError>> {
        if let Some(error) = &self.failed {
            return Some(Err(error.clone()));
        }
        match self.rx.try_recv() {
            Ok(result) => Some(result),
            Err(TryRecvError::Empty) => None,
            Err(TryRecvError::Disconnected) => Some(Err(ClientError::Closed)),
        }
    }
}

/// The ordered items of one subscribed session. Unsubscribes when dropped.
pub struct Subscription {
    session: Text,
    slot: u64,
    info: Subscribed,
    items: ItemReceiver,
    inbox: WeakSender<Input>,
    shared: Arc<Shared>,
    ended: OnceLock<ClientError>,
    unsubscribed: bool,
}

impl Subscription {
    fn new(parts: SubscriptionParts, inbox: WeakSender<Input>, shared: Arc<Shared>) -> Subscription {
        Subscription {
            session: parts.session,
            slot: parts.slot,
            info: parts.info,
            items: parts.items,
            inbox,
            shared,
            ended: OnceLock::new(),
            unsubscribed: false,
        }
    }

    /// The session.
    pub fn session(&self) -> &Text {
        &self.session
    }

    /// The engine's confirmation: epoch, head seq, first replayed seq, `recovered`.
    pub fn info(&self) -> &Subscribed {
        &self.info
    }

    /// The next item, waiting as long as needed. An error means the subscription ended (the
    /// client closed, or the engine refused to resume it); every later call returns it again.
    pub fn recv(&self) -> Result<Item, ClientError> {
        let received = self.items.recv();
        self.take(received.ok())
    }

    /// The next item, or `Ok(None)` if none came within `timeout`.
    pub fn recv_timeout(&self, timeout: Duration) -> Result<Option<Item>, ClientError> {
        match self.items.recv_timeout(timeout) {
            Ok(received) => self.take(Some(received)).map(Some),
            Err(RecvTimeoutError::Timeout) => Ok(None),
            Err(RecvTimeoutError::Disconnected) => self.take(None).map(Some),
        }
    }

    /// The next item if one is queued.
    pub fn try_recv(&self) -> Result<Option<Item>, ClientError> {
        match self.items.try_recv() {
            Ok(received) => self.take(Some(received)).map(Some),
            Err(TryRecvError::Empty) => Ok(None),
            Err(TryRecvError::Disconnected) => self.take(None).map(Some),
        }
    }

    /// Items until the subscription ends; the error that ended it is the last element.
    pub fn iter(&self) -> impl Iterator<Item = Result<Item, ClientError>> + '_ {
        let mut done = false;
        std::iter::from_fn(move || {
            if done {
                return None;
            }
            let next = self.recv();
            done = next.is_err();
            Some(next)
        })
    }

    /// Items queued now, waiting for this consumer.
    pub fn queued(&self) -> usize {
        self.items.len()
    }

    /// Unsubscribes and waits for the engine's confirmation.
    pub fn unsubscribe(mut self) -> Result<(), ClientError> {
        self.unsubscribed = true;
        let (reply, rx) = flume::bounded(1);
        let command = Command::Unsubscribe { session: self.session.clone(), slot: Some(self.slot), reply: Some(reply) };
        let Some(inbox) = self.inbox.upgrade() else { return Err(self.shared.closed_error()) };
        if inbox.send(Input::Command(command)).is_err() {
            return Err(self.shared.closed_error());
        }
        drop(inbox);
        rx.recv().unwrap_or_else(|_| Err(self.shared.closed_error()))
    }

    fn take(&self, received: Option<Result<Item, ClientError>>) -> Result<Item, ClientError> {
        match received {
            Some(Ok(item)) => {
                self.shared.took_item(&self.inbox);
                Ok(item)
            }
            Some(Err(error)) => Err(self.ended.get_or_init(|| error).clone()),
            None => Err(self.ended.get_or_init(|| self.shared.closed_error()).clone()),
        }
    }
}

impl Drop for Subscription {
    fn drop(&mut self) {
        if !self.unsubscribed {
            let command = Command::Unsubscribe { session: self.session.clone(), slot: Some(self.slot), reply: None };
            // If the inbox is full the driver notices the dropped queue on the next item.
            if let Some(inbox) = self.inbox.upgrade() {
                let _ = inbox.try_send(Input::Command(command));
            }
        }
    }
}

impl std::fmt::Debug for Subscription {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Subscription")
            .field("session", &self.session)
            .field("queued", &self.items.len())
            .finish_non_exhaustive()
    }
}

/// Events that belong to no subscription; see [`Client::events`].
pub struct Events {
    rx: Receiver<Event>,
    inbox: WeakSender<Input>,
    shared: Arc<Shared>,
}

impl Events {
    /// The next event; an error once the client is closed and the queue is empty.
    pub fn recv(&self) -> Result<Event, ClientError> {
        let event = self.rx.recv().map_err(|_| self.shared.closed_error())?;
        self.shared.took_item(&self.inbox);
        Ok(event)
    }

    /// The next event, or `Ok(None)` if none came within `timeout`.
    pub fn recv_timeout(&self, timeout: Duration) -> Result<Option<Event>, ClientError> {
        match self.rx.recv_timeout(timeout) {
            Ok(event) => {
                self.shared.took_item(&self.inbox);
                Ok(Some(event))
            }
            Err(RecvTimeoutError::Timeout) => Ok(None),
            Err(RecvTimeoutError::Disconnected) => Err(self.shared.closed_error()),
        }
    }

    /// The next event if one is queued.
    pub fn try_recv(&self) -> Result<Option<Event>, ClientError> {
        match self.rx.try_recv() {
            Ok(event) => {
                self.shared.took_item(&self.inbox);
                Ok(Some(event))
            }
            Err(TryRecvError::Empty) => Ok(None),
            Err(TryRecvError::Disconnected) => Err(self.shared.closed_error()),
        }
    }
}

impl std::fmt::Debug for Events {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Events").field("queued", &self.rx.len()).finish_non_exhaustive()
    }
}

struct Conn {
    stream: TcpStream,
    generation: u64,
    /// One token per chunk: the reader reads the next chunk only after the driver took the
    /// last one and has room for more (how the driver stops reading).
    credit: Sender<()>,
    credit_owed: bool,
}

struct Driver {
    core: Core,
    options: ClientOptions,
    inbox: Receiver<Input>,
    /// Weak, for the readers it spawns: the driver's own copy must not keep the inbox open.
    inbox_tx: WeakSender<Input>,
    conn: Option<Conn>,
    generation: u64,
    out: BytesMut,
    input: BytesMut,
    connect_deferred: bool,
    paused: bool,
}

impl Driver {
    /// Runs until every handle is gone (the inbox disconnects): a command in the inbox is
    /// always answered, if only with [`ClientError::Closed`].
    fn run(mut self) {
        loop {
            self.core.check_shutdown(Instant::now());
            self.pump();
            let deadline = self.core.session.poll_timeout();
            let input = match deadline {
                Some(deadline) => match self.inbox.recv_deadline(deadline) {
                    Ok(input) => Some(input),
                    Err(RecvTimeoutError::Timeout) => None,
                    Err(RecvTimeoutError::Disconnected) => break,
                },
                None => match self.inbox.recv() {
                    Ok(input) => Some(input),
                    Err(_) => break,
                },
            };
            let now = Instant::now();
            if let Some(input) = input {
                self.handle_input(now, input);
            }
            if deadline.is_some_and(|deadline| deadline <= now) {
                self.core.session.handle_timeout(now);
            }
        }
        self.close_conn();
        self.core.finish();
    }

    /// Carries out the session's actions, writes, routes events, until nothing changes.
    fn pump(&mut self) {
        loop {
            let mut progress = false;
            while let Some(action) = self.core.session.poll_action() {
                progress = true;
                match action {
                    Action::Connect if self.core.is_parked() => self.connect_deferred = true,
                    Action::Connect => self.connect(),
                    Action::Close => self.close_conn(),
                }
            }
            if self.connect_deferred && !self.core.is_parked() {
                self.connect_deferred = false;
                progress = true;
                self.connect();
            }
            self.out.clear();
            if self.core.session.poll_transmit(Instant::now(), &mut self.out) > 0 {
                progress = true;
                self.write();
            }
            progress |= self.core.dispatch(Instant::now());
            self.core.settle_parked();
            if !progress {
                break;
            }
        }
        let parked = self.core.is_parked();
        if parked != self.paused {
            self.paused = parked;
            self.core.session.set_receive_paused(Instant::now(), parked);
        }
        if !parked {
            if let Some(conn) = &mut self.conn {
                if conn.credit_owed {
                    conn.credit_owed = false;
                    let _ = conn.credit.send(());
                }
            }
        }
    }

    fn handle_input(&mut self, now: Instant, input: Input) {
        match input {
            Input::Command(command) => self.core.handle_command(now, command),
            Input::Bytes { generation, bytes } => {
                let Some(conn) = &mut self.conn else { return };
                if conn.generation != generation {
                    return;
                }
                conn.credit_owed = true;
                if self.input.is_empty() {
                    self.input = bytes;
                } else {
                    self.input.extend_from_slice(&bytes);
                }
                self.core.session.handle_input(now, &mut self.input);
            }
            Input::ReadClosed { generation, error } => {
                if self.conn.as_ref().is_some_and(|conn| conn.generation == generation) {
                    self.close_conn();
                    if let Some(error) = error {
                        self.core.note_connect_error(error);
                    }
                    self.core.session.handle_disconnected(now);
                }
            }
            Input::Wake => {}
        }
    }

    fn connect(&mut self) {
        if self.core.session.state() != ConnectionState::Connecting {
            return;
        }
        match self.open() {
            Ok(stream) => match stream.try_clone() {
                Ok(reader) => {
                    self.generation += 1;
                    let generation = self.generation;
                    let (credit, credit_rx) = flume::bounded(1);
                    let Some(inbox) = self.inbox_tx.upgrade() else { return };
                    let spawned = std::thread::Builder::new()
                        .name("switchboard-client-reader".into())
                        .spawn(move || read_loop(reader, generation, &inbox, &credit_rx));
                    if let Err(error) = spawned {
                        self.core.note_connect_error(error);
                        return self.core.session.handle_disconnected(Instant::now());
                    }
                    self.input.clear();
                    self.conn = Some(Conn { stream, generation, credit, credit_owed: false });
                    self.core.session.handle_connected(Instant::now());
                }
                Err(error) => {
                    self.core.note_connect_error(error);
                    self.core.session.handle_disconnected(Instant::now());
                }
            },
            Err(error) => {
                self.core.note_connect_error(error);
                self.core.session.handle_disconnected(Instant::now());
            }
        }
    }

    fn open(&self) -> std::io::Result<TcpStream> {
        let mut last_error = None;
        for addr in self.options.addr.to_socket_addrs()? {
            match TcpStream::connect_timeout(&addr, self.options.connect_timeout) {
                Ok(stream) => {
                    // Frames are small and latency matters more than packet count.
                    stream.set_nodelay(true)?;
                    stream.set_write_timeout(Some(self.options.write_timeout()))?;
                    return Ok(stream);
                }
                Err(error) => last_error = Some(error),
            }
        }
        Err(last_error.unwrap_or_else(|| std::io::Error::new(std::io::ErrorKind::NotFound, "address resolved to nothing")))
    }

    fn write(&mut self) {
        let Some(conn) = &mut self.conn else { return };
        if let Err(error) = conn.stream.write_all(&self.out) {
            self.close_conn();
            self.core.note_connect_error(error);
            self.core.session.handle_disconnected(Instant::now());
        }
    }

    fn close_conn(&mut self) {
        if let Some(conn) = self.conn.take() {
            // Unblocks the reader's read; dropping `credit` unblocks its wait for credit.
            let _ = conn.stream.shutdown(Shutdown::Both);
        }
        self.input.clear();
    }
}

fn read_loop(mut stream: TcpStream, generation: u64, inbox: &Sender<Input>, credit: &Receiver<()>) {
    let mut buf = vec![0u8; READ_CHUNK_BYTES];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => {
                let _ = inbox.send(Input::ReadClosed { generation, error: None });
                return;
            }
            Ok(read) => {
                // A copy of exactly what was read: payloads decoded from it share it, so a
                // retained message pins its own chunk, not a 64 KiB buffer.
                let bytes = BytesMut::from(&buf[..read]);
                if inbox.send(Input::Bytes { generation, bytes }).is_err() || credit.recv().is_err() {
                    return;
                }
            }
            Err(error) if error.kind() == std::io::ErrorKind::Interrupted => {}
            Err(error) => {
                let _ = inbox.send(Input::ReadClosed { generation, error: Some(error) });
                return;
            }
        }
    }
}
