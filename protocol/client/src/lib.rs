//! The embeddable Switchboard client.
//!
//! A gateway (web chat, app chat, agent console) uses it to publish into conversations,
//! follow them, and drive the customer-service flow (conversations, agent status, offers,
//! transfers, tickets) over the engine's binary TCP protocol.
//!
//! Layout:
//! - [`session`]: [`ClientSession`], the whole protocol logic as a sans-IO state machine
//!   (handshake, request correlation, subscriptions with their last seq and epoch, PUBACK
//!   tracking, keepalive, reconnect backoff and resume). No socket, no clock, no thread.
//! - [`blocking`] (feature `blocking`, default): a `std::net` driver — a [`blocking::Client`]
//!   you call from any thread.
//! - [`tokio`] (feature `tokio`): the same API, async, driven by one spawned task.
//! - [`config`], [`error`]: the session's limits and timeouts; [`ClientError`].
//! - `testing` (feature `testing`): an in-memory fake server, in memory and over loopback TCP.
//!
//! The client does not depend on glommio or on any engine code: only on the wire codec
//! (`switchboard-protocol`).
//!
//! # What the client guarantees
//!
//! - **Ordered, exactly-once delivery to the caller per subscription**, across reconnects: the
//!   client remembers the last (epoch, seq) it handed out, resubscribes after it, and drops
//!   any replayed item it already delivered. A seq that skips ahead within an epoch is a
//!   protocol violation: the client reconnects and resumes, so the missing items are fetched.
//! - **No silent gaps**: when the server cannot replay (`recovered = false`, or the epoch
//!   changed), the subscription yields an explicit [`Gap`] item before what follows it.
//! - **Publishes survive reconnects**: unacknowledged publishes are re-sent with the same
//!   `client_msg_id`, so the server stores each once and answers a repeat with the original
//!   seq (`duplicate = true`).
//! - **Bounded memory and explicit backpressure**: each subscription has a bounded receive
//!   queue; when one is full the driver stops reading the socket (see [`blocking`] for the
//!   full policy). At most `inflight_publishes_max` publishes wait for their PUBACK; one more
//!   fails at once with [`ClientError::InflightFull`].
//! - **Typed errors**: [`ClientError`] separates auth refusals (terminal: no reconnect loop),
//!   permission and limit errors, slow-consumer disconnects, protocol violations, timeouts.
//!
//! # Example (blocking)
//!
//! ```no_run
//! use std::time::Duration;
//! use switchboard_client::blocking::Client;
//! use switchboard_client::{ClientOptions, Item, ResumeFrom};
//!
//! # fn main() -> Result<(), switchboard_client::ClientError> {
//! let options = ClientOptions::new("127.0.0.1:7400").token("").client_name("my-gateway/1.0");
//! let client = Client::connect(options)?;
//! println!("connected to tenant {}", client.welcome().tenant);
//!
//! let subscription = client.subscribe("conv-42", ResumeFrom::Live)?;
//! let ack = client.publish("conv-42", "customer-7", "hello, is anyone there?")?;
//! println!("stored as seq {} of epoch {}", ack.seq, ack.epoch);
//!
//! while let Some(item) = subscription.recv_timeout(Duration::from_secs(5))? {
//!     match item {
//!         Item::Message(message) => println!("#{} {}: {:?}", message.seq, message.sender, message.payload),
//!         Item::Gap(gap) => println!("missed messages after {:?}", gap.last),
//!         other => println!("{other:?}"),
//!     }
//! }
//! # Ok(())
//! # }
//! ```
//!
//! # Example (sans-IO, runnable)
//!
//! The state machine can be driven by anything that moves bytes; here the in-memory fake
//! server of the `testing` feature plays the engine.
//!
//! ```
//! use std::time::Instant;
//! use bytes::BytesMut;
//! use switchboard_client::testing::{FakeServer, FakeServerConfig};
//! use switchboard_client::{Action, ClientConfig, ClientSession, Event, ResumeFrom, Text};
//!
//! let mut server = FakeServer::new(FakeServerConfig::default());
//! let mut client = ClientSession::new(ClientConfig::default()).unwrap();
//! let now = Instant::now();
//! server.publish("conv-1", "agent-3", b"how can I help?"); // history before we subscribe
//! client.subscribe(now, Text::from("conv-1"), ResumeFrom::Earliest).unwrap();
//!
//! assert_eq!(client.poll_action(), Some(Action::Connect));
//! let conn = server.accept(); // "open a socket"
//! client.handle_connected(now);
//! let mut wire = BytesMut::new();
//! for _ in 0..3 {
//!     // client → server: HELLO, then SUBSCRIBE; server → client: WELCOME, SUBSCRIBED, …
//!     wire.clear();
//!     client.poll_transmit(now, &mut wire);
//!     server.handle_bytes(conn, &wire);
//!     wire.clear();
//!     server.poll_transmit(conn, &mut wire);
//!     client.handle_bytes(now, &wire);
//! }
//! let events: Vec<Event> = std::iter::from_fn(|| client.poll_event()).collect();
//! assert!(matches!(&events[0], Event::Connected { resumed: false, .. }));
//! assert!(matches!(&events[1], Event::Subscribed { .. }));
//! assert!(matches!(&events[2], Event::Delivery(message) if message.seq == 1)); // replayed
//! ```

pub mod config;
pub mod error;
pub mod session;

#[cfg(any(feature = "blocking", feature = "tokio"))]
mod driver;

#[cfg(feature = "blocking")]
pub mod blocking;

#[cfg(feature = "tokio")]
pub mod tokio;

#[cfg(any(test, feature = "testing"))]
pub mod testing;

#[cfg(test)]
mod tests;

pub use config::{ClientConfig, ReconnectPolicy};
#[cfg(any(feature = "blocking", feature = "tokio"))]
pub use driver::{ClientOptions, Item};
pub use error::ClientError;
pub use session::{
    Action, ClientSession, ConnectionState, Delivery, DisconnectReason, Event, Gap, GapCause, Position, RequestId,
    SessionStats,
};
/// The wire codec this client speaks, re-exported so callers need not depend on it directly.
pub use switchboard_protocol as protocol;
pub use switchboard_protocol::{
    AgentPresence, AgentStatus, CloseConversation, ConversationEvent, ConversationEventKind, ErrorCode, Frame,
    GoAwayReason, OfferResponse, OpenConversation, PubAck, Publish, ReadCursor, ResumeFrom, Subscribed, Text,
    TicketCommand, TicketEvent, TicketOp, Transfer, TransferKind, Typing, Welcome,
};
