//! The Switchboard wire protocol: a sans-IO codec.
//!
//! This crate owns the bytes that cross a Switchboard connection and nothing else: it opens no
//! socket, reads no clock and depends on no runtime. The engine, the embeddable client and the
//! load generator all speak through it, so one definition of every frame serves all three.
//! `protocol/PROTOCOL.md` is the normative description; the golden vectors in
//! `tests/golden.txt` pin the bytes.
//!
//! Layout:
//! - [`header`]: the fixed 16-byte frame header (magic, version, type, flags, length,
//!   correlation id) and the frame-type numbers.
//! - [`frame`]: every frame type as a plain struct, the [`Frame`] enum, and the incremental
//!   decoder ([`decode`]) and encoder ([`Frame::encode`]).
//! - [`text`]: [`Text`], a validated UTF-8 string that shares the read buffer (zero-copy).
//! - [`error`]: decode errors and the [`ErrorCode`]s carried in ERROR frames.
//! - [`limits`]: every length limit, with its unit last.
//!
//! Decoding is incremental: [`decode`] returns `Ok(None)` while a frame is incomplete, checks the
//! header (magic, version, type, length against the limit) before waiting for the body, and
//! slices payloads out of the read buffer without copying. It never panics on any input.
//! A hot path can go further: [`peek_frame`] finds the whole frame at the front of a buffer
//! without consuming it, and [`DeliverRef::decode_body`] (a subscriber's DELIVER) or
//! [`PublishRef::decode_body`] (a server's PUBLISH) reads the fields as borrows of that buffer
//! (no reference counts taken and dropped per field), accepting and refusing exactly what
//! [`decode`] does. [`DeliverRef`] and [`PubAckRef`] encode from borrowed fields the very bytes
//! of their owned frames.

pub mod error;
pub mod frame;
pub mod header;
pub mod limits;
pub mod text;
mod wire;

pub use error::{DecodeError, EncodeError, ErrorCode};
pub use frame::*;
pub use header::{FrameHeader, FrameType, HEADER_BYTES, MAGIC, PROTOCOL_VERSION};
pub use limits::Limits;
pub use text::Text;
