//! The tokio driver: [`Client`] with `async` calls, driven by one spawned task.
//!
//! Owns the TCP connection; the task owns the [`ClientSession`] and selects over the socket,
//! the API's commands and the session's next timer. Same API and same backpressure policy as
//! [`crate::blocking`] (bounded per-subscription queues; a full queue stops the socket reads;
//! the engine eventually treats the connection as a slow consumer and the client resumes
//! without loss), only `async`. Needs a tokio runtime with I/O and time enabled; works on the
//! current-thread runtime too.
//!
//! ```no_run
//! use switchboard_client::tokio::Client;
//! use switchboard_client::{ClientOptions, Item, ResumeFrom};
//!
//! # async fn run() -> Result<(), switchboard_client::ClientError> {
//! let client = Client::connect(ClientOptions::new("127.0.0.1:7400")).await?;
//! let subscription = client.subscribe("conv-42", ResumeFrom::Live).await?;
//! tokio::spawn(async move {
//!     while let Ok(item) = subscription.recv().await {
//!         if let Item::Message(message) = item {
//!             println!("{}: {:?}", message.sender, message.payload);
//!         }
//!     }
//! });
//! let ack = client.publish("conv-42", "customer-7", "hello").await?;
//! println!("seq {}", ack.seq);
//! # Ok(())
//! # }
//! ```

use std::sync::atomic::Ordering;
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use ::tokio::io::{AsyncReadExt, AsyncWriteExt};
use ::tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use ::tokio::net::TcpStream;
use bytes::{Bytes, BytesMut};
use flume::{Receiver, Sender, TryRecvError, WeakSender};
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
}

impl Drop for Inner {
    fn drop(&mut self) {
        self.shared.shutdown.store(true, Ordering::SeqCst);
        if let Some(inbox) = self.inbox.take() {
            let _ = inbox.try_send(Input::Wake);
        }
    }
}

impl Client {
    /// Connects and completes the handshake (see [`crate::blocking::Client::connect`]).
    /// Spawns the driver task on the current runtime.
    pub async fn connect(options: ClientOptions) -> Result<Client, ClientError> {
        let session = ClientSession::new(options.session_config())?;
        let (inbox_tx, inbox_rx) = flume::bounded(INBOX_CAPACITY);
        let (ready_tx, ready_rx) = flume::bounded(1);
        let shared = Arc::new(Shared::default());
        let driver = Driver {
            core: Core::new(session, &options, Arc::clone(&shared), ready_tx),
            inbox: inbox_rx,
            options,
            reader: None,
            writer: None,
            out: BytesMut::new(),
            input: BytesMut::new(),
            connect_deferred: false,
            paused: false,
        };
        ::tokio::spawn(driver.run());
        let inner = Arc::new(Inner { inbox: Some(inbox_tx), shared });
        match ready_rx.recv_async().await {
            Ok(Ok(welcome)) => Ok(Client { inner, welcome }),
            Ok(Err(error)) => Err(error),
            Err(_) => Err(inner.shared.closed_error()),
        }
    }

    /// The WELCOME of the first connection: the tenant and the engine's limits.
    pub fn welcome(&self) -> &Welcome {
        &self.welcome
    }

    /// Publishes `payload` to `session` as `sender`; resolves to the PUBACK.
    pub async fn publish(
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
        self.publish_message(publish).await
    }

    /// Publishes a fully specified message; resolves to the PUBACK.
    pub async fn publish_message(&self, publish: Publish) -> Result<PubAck, ClientError> {
        self.publish_nowait(publish).await.wait().await
    }

    /// Hands the publish to the driver and returns at once; the handle resolves to the PUBACK.
    /// Dropping the handle does not cancel the publish.
    pub async fn publish_nowait(&self, publish: Publish) -> PendingPublish {
        let (reply, rx) = flume::bounded(1);
        let sent = self.inner.inbox().send_async(Input::Command(Command::Publish { publish, reply })).await;
        PendingPublish { rx, failed: sent.err().map(|_| self.inner.shared.closed_error()) }
    }

    /// Subscribes to `session` from `from`; resolves once the engine confirmed.
    pub async fn subscribe(&self, session: impl Into<Text>, from: ResumeFrom) -> Result<Subscription, ClientError> {
        let session = session.into();
        let parts = self.call(|reply| Command::Subscribe { session, from, reply }).await?;
        Ok(Subscription::new(parts, self.inner.inbox().downgrade(), Arc::clone(&self.inner.shared)))
    }

    /// Sends any request (not PUBLISH, SUBSCRIBE or UNSUBSCRIBE); resolves to its answer.
    pub async fn request(&self, frame: Frame) -> Result<Frame, ClientError> {
        self.call(|reply| Command::Request { frame, reply }).await
    }

    /// A customer opens a conversation.
    pub async fn open_conversation(&self, open: OpenConversation) -> Result<(), ClientError> {
        self.request(Frame::OpenConversation(open)).await.map(drop)
    }

    /// An agent sets its presence, capacity and skills.
    pub async fn set_agent_status(&self, status: AgentStatus) -> Result<(), ClientError> {
        self.request(Frame::AgentStatus(status)).await.map(drop)
    }

    /// An agent accepts or declines an offered conversation.
    pub async fn respond_offer(&self, response: OfferResponse) -> Result<(), ClientError> {
        self.request(Frame::OfferResponse(response)).await.map(drop)
    }

    /// Moves a conversation to another agent or queue.
    pub async fn transfer(&self, transfer: Transfer) -> Result<(), ClientError> {
        self.request(Frame::Transfer(transfer)).await.map(drop)
    }

    /// Closes a conversation.
    pub async fn close_conversation(&self, close: CloseConversation) -> Result<(), ClientError> {
        self.request(Frame::CloseConversation(close)).await.map(drop)
    }

    /// Moves a participant's read cursor.
    pub async fn read_cursor(&self, cursor: ReadCursor) -> Result<(), ClientError> {
        self.request(Frame::ReadCursor(cursor)).await.map(drop)
    }

    /// Creates or changes a ticket; resolves to its state after the change.
    pub async fn ticket(&self, command: TicketCommand) -> Result<TicketEvent, ClientError> {
        match self.request(Frame::TicketCommand(command)).await? {
            Frame::TicketEvent(ticket) => Ok(ticket),
            other => Err(ClientError::Protocol(format!("{:?} answers a ticket command", other.frame_type()))),
        }
    }

    /// Sends a typing indicator (ephemeral: not kept while disconnected).
    pub async fn typing(&self, typing: Typing) -> Result<(), ClientError> {
        self.call(|reply| Command::Typing { typing, reply }).await
    }

    /// A receiver of the events that belong to no subscription (see
    /// [`crate::blocking::Client::events`]).
    pub async fn events(&self) -> Result<Events, ClientError> {
        let rx = self.call(|reply| Command::Events { reply }).await?;
        Ok(Events { rx, inbox: self.inner.inbox().downgrade(), shared: Arc::clone(&self.inner.shared) })
    }

    /// Replaces the token used by the next handshake.
    pub async fn set_token(&self, token: impl Into<Text>) -> Result<(), ClientError> {
        let token = token.into();
        self.call(|reply| Command::SetToken { token, reply }).await
    }

    /// The session's counters.
    pub async fn stats(&self) -> Result<SessionStats, ClientError> {
        self.call(|reply| Command::Stats { reply }).await
    }

    /// Closes the client for good.
    pub async fn close(&self) -> Result<(), ClientError> {
        self.call(|reply| Command::Close { reply }).await
    }

    async fn call<T>(&self, command: impl FnOnce(Reply<T>) -> Command) -> Result<T, ClientError> {
        let (reply, rx) = flume::bounded(1);
        if self.inner.inbox().send_async(Input::Command(command(reply))).await.is_err() {
            return Err(self.inner.shared.closed_error());
        }
        rx.recv_async().await.unwrap_or_else(|_| Err(self.inner.shared.closed_error()))
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

/// A publish on its way; [`PendingPublish::wait`] resolves to its PUBACK.
#[derive(Debug)]
pub struct PendingPublish {
    rx: Receiver<Result<PubAck, ClientError>>,
    failed: Option<ClientError>,
}

impl PendingPublish {
    /// Resolves to the PUBACK (at most the request timeout later).
    pub async fn wait(self) -> Result<PubAck, ClientError> {
        if let Some(error) = self.failed {
            return Err(error);
        }
        self.rx.recv_async().await.unwrap_or(Err(ClientError::Closed))
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

    /// The engine's confirmation.
    pub fn info(&self) -> &Subscribed {
        &self.info
    }

    /// The next item. An error means the subscription ended; later calls return it again.
    /// Cancel-safe: dropping the future loses no item.
    pub async fn recv(&self) -> Result<Item, ClientError> {
        let received = self.items.recv_async().await;
        self.take(received.ok())
    }

    /// The next item if one is queued.
    pub fn try_recv(&self) -> Result<Option<Item>, ClientError> {
        match self.items.try_recv() {
            Ok(received) => self.take(Some(received)).map(Some),
            Err(TryRecvError::Empty) => Ok(None),
            Err(TryRecvError::Disconnected) => self.take(None).map(Some),
        }
    }

    /// Items queued now, waiting for this consumer.
    pub fn queued(&self) -> usize {
        self.items.len()
    }

    /// Unsubscribes and waits for the engine's confirmation.
    pub async fn unsubscribe(mut self) -> Result<(), ClientError> {
        self.unsubscribed = true;
        let (reply, rx) = flume::bounded(1);
        let command = Command::Unsubscribe { session: self.session.clone(), slot: Some(self.slot), reply: Some(reply) };
        let Some(inbox) = self.inbox.upgrade() else { return Err(self.shared.closed_error()) };
        if inbox.send_async(Input::Command(command)).await.is_err() {
            return Err(self.shared.closed_error());
        }
        drop(inbox);
        rx.recv_async().await.unwrap_or_else(|_| Err(self.shared.closed_error()))
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
    pub async fn recv(&self) -> Result<Event, ClientError> {
        let event = self.rx.recv_async().await.map_err(|_| self.shared.closed_error())?;
        self.shared.took_item(&self.inbox);
        Ok(event)
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

/// Room made in the read buffer before each read. Decoded payloads share the buffer's
/// allocation, so a small reserve keeps a retained message from pinning a large block.
const READ_RESERVE_BYTES: usize = 8 * 1024;

struct Driver {
    core: Core,
    options: ClientOptions,
    inbox: Receiver<Input>,
    reader: Option<OwnedReadHalf>,
    writer: Option<OwnedWriteHalf>,
    out: BytesMut,
    input: BytesMut,
    connect_deferred: bool,
    paused: bool,
}

// Lives on the stack for one turn of the loop; boxing the input would cost an allocation
// per command for nothing.
#[allow(clippy::large_enum_variant)]
enum Woke {
    Input(Option<Input>),
    Read(std::io::Result<usize>),
    Timer,
}

impl Driver {
    /// Runs until every handle is gone (the inbox disconnects): a command in the inbox is
    /// always answered, if only with [`ClientError::Closed`].
    async fn run(mut self) {
        loop {
            self.core.check_shutdown(Instant::now());
            self.pump().await;
            let deadline = self.core.session.poll_timeout();
            let woke = {
                let reading = !self.core.is_parked();
                let reader = self.reader.as_mut().filter(|_| reading);
                let input = &mut self.input;
                let read = async move {
                    match reader {
                        Some(reader) => {
                            input.reserve(READ_RESERVE_BYTES);
                            // At most one chunk per read: it bounds what can end up parked.
                            reader.take(READ_CHUNK_BYTES as u64).read_buf(input).await
                        }
                        None => std::future::pending().await,
                    }
                };
                let timer = async move {
                    match deadline {
                        Some(deadline) => ::tokio::time::sleep_until(deadline.into()).await,
                        None => std::future::pending().await,
                    }
                };
                ::tokio::select! {
                    input = self.inbox.recv_async() => Woke::Input(input.ok()),
                    read = read => Woke::Read(read),
                    () = timer => Woke::Timer,
                }
            };
            let now = Instant::now();
            match woke {
                Woke::Input(None) => break,
                Woke::Input(Some(Input::Command(command))) => self.core.handle_command(now, command),
                Woke::Input(Some(_)) | Woke::Timer => {}
                Woke::Read(Ok(0) | Err(_)) => {
                    self.close_conn();
                    self.core.session.handle_disconnected(now);
                }
                Woke::Read(Ok(_)) => self.core.session.handle_input(now, &mut self.input),
            }
            if deadline.is_some_and(|deadline| deadline <= now) {
                self.core.session.handle_timeout(now);
            }
        }
        self.close_conn();
        self.core.finish();
    }

    async fn pump(&mut self) {
        loop {
            let mut progress = false;
            while let Some(action) = self.core.session.poll_action() {
                progress = true;
                match action {
                    Action::Connect if self.core.is_parked() => self.connect_deferred = true,
                    Action::Connect => self.connect().await,
                    Action::Close => self.close_conn(),
                }
            }
            if self.connect_deferred && !self.core.is_parked() {
                self.connect_deferred = false;
                progress = true;
                self.connect().await;
            }
            self.out.clear();
            if self.core.session.poll_transmit(Instant::now(), &mut self.out) > 0 {
                progress = true;
                self.write().await;
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
    }

    async fn connect(&mut self) {
        if self.core.session.state() != ConnectionState::Connecting {
            return;
        }
        let connect = TcpStream::connect(self.options.addr.as_str());
        let result = match ::tokio::time::timeout(self.options.connect_timeout, connect).await {
            Ok(result) => result,
            Err(_) => Err(std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out")),
        };
        match result.and_then(|stream| stream.set_nodelay(true).map(|()| stream)) {
            Ok(stream) => {
                let (reader, writer) = stream.into_split();
                self.reader = Some(reader);
                self.writer = Some(writer);
                self.input.clear();
                self.core.session.handle_connected(Instant::now());
            }
            Err(error) => {
                self.core.note_connect_error(error);
                self.core.session.handle_disconnected(Instant::now());
            }
        }
    }

    async fn write(&mut self) {
        let Some(writer) = &mut self.writer else { return };
        let result = match ::tokio::time::timeout(self.options.write_timeout(), writer.write_all(&self.out)).await {
            Ok(result) => result,
            Err(_) => Err(std::io::Error::new(std::io::ErrorKind::TimedOut, "write timed out")),
        };
        if let Err(error) = result {
            self.close_conn();
            self.core.note_connect_error(error);
            self.core.session.handle_disconnected(Instant::now());
        }
    }

    fn close_conn(&mut self) {
        self.reader = None;
        self.writer = None;
        self.input.clear();
    }
}
