//! The fixed frame header and the frame-type numbers.
//!
//! Every frame starts with 16 bytes, little-endian:
//!
//! | offset | size | field                                     |
//! |--------|------|-------------------------------------------|
//! | 0      | 2    | magic `0x53 0x42` ("SB")                  |
//! | 2      | 1    | protocol version (1)                      |
//! | 3      | 1    | frame type                                |
//! | 4      | 2    | flags (must be 0 in version 1)            |
//! | 6      | 2    | reserved (must be 0)                      |
//! | 8      | 4    | body length in bytes (header excluded)    |
//! | 12     | 4    | correlation id                            |

use crate::error::DecodeError;
use crate::limits::Limits;

/// The two magic bytes that open every frame: "SB".
pub const MAGIC: [u8; 2] = [0x53, 0x42];
/// The protocol version this crate speaks (and the only one so far).
pub const PROTOCOL_VERSION: u8 = 1;
/// Size of the fixed header in bytes.
pub const HEADER_BYTES: usize = 16;

macro_rules! frame_types {
    ($($(#[$doc:meta])* $name:ident = $value:literal,)*) => {
        /// The type byte of a frame.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        #[repr(u8)]
        pub enum FrameType {
            $($(#[$doc])* $name = $value,)*
        }

        impl FrameType {
            /// Every frame type, in wire-number order.
            pub const ALL: &'static [FrameType] = &[$(FrameType::$name,)*];

            /// The frame type for a type byte, if it is one.
            pub fn from_u8(value: u8) -> Option<FrameType> {
                match value {
                    $($value => Some(FrameType::$name),)*
                    _ => None,
                }
            }
        }
    };
}

frame_types! {
    /// Client → server: first frame of a connection (version range, features, token).
    Hello = 0x01,
    /// Server → client: handshake accepted (chosen version, limits).
    Welcome = 0x02,
    /// Either way: liveness probe.
    Ping = 0x03,
    /// Either way: answer to PING.
    Pong = 0x04,
    /// Server → client: a request failed, or the connection is about to close.
    Error = 0x05,
    /// Server → client: the connection will close; reconnect elsewhere or later.
    GoAway = 0x06,
    /// Server → client: a request without a more specific reply succeeded.
    Success = 0x07,
    /// Client → server: receive a session's messages, optionally from a position.
    Subscribe = 0x10,
    /// Server → client: subscription confirmed, with the recovery outcome.
    Subscribed = 0x11,
    /// Client → server: stop receiving a session.
    Unsubscribe = 0x12,
    /// Client → server: append a message to a session.
    Publish = 0x13,
    /// Server → client: the message got this seq.
    PubAck = 0x14,
    /// Server → client: a message of a subscribed session.
    Deliver = 0x15,
    /// Either way: a participant's last-seen seq (read receipt).
    ReadCursor = 0x16,
    /// Either way: ephemeral typing indicator, never stored.
    Typing = 0x17,
    /// Client → server: a customer opens a conversation (enters the queue).
    OpenConversation = 0x20,
    /// Server → client: a conversation changed state.
    ConversationEvent = 0x21,
    /// Either way: an agent's presence, capacity, load and skills.
    AgentStatus = 0x22,
    /// Client → server: an agent accepts or declines an offered conversation.
    OfferResponse = 0x23,
    /// Client → server: move a conversation to another agent or queue.
    Transfer = 0x24,
    /// Client → server: close a conversation.
    CloseConversation = 0x25,
    /// Client → server: create or change a ticket (compare-and-set on its version).
    TicketCommand = 0x30,
    /// Server → client: a ticket changed.
    TicketEvent = 0x31,
}

/// A decoded frame header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    /// What the body holds.
    pub frame_type: FrameType,
    /// Length of the body in bytes.
    pub body_bytes: u32,
    /// Correlation id: a client's request id, echoed in the reply (0 = unsolicited).
    pub correlation: u32,
}

impl FrameHeader {
    /// Checks a header without consuming anything.
    ///
    /// Returns `Ok(None)` when fewer bytes than a header are available and nothing seen so far
    /// is wrong. Problems are reported as soon as the bytes that show them are present, so a
    /// peer sending garbage is refused on its first bytes, and an oversize length is refused
    /// before its body is buffered.
    pub fn peek(src: &[u8], limits: &Limits) -> Result<Option<FrameHeader>, DecodeError> {
        for (index, expected) in MAGIC.iter().enumerate() {
            match src.get(index) {
                None => return Ok(None),
                Some(byte) if byte != expected => return Err(DecodeError::BadMagic),
                Some(_) => {}
            }
        }
        let Some(&version) = src.get(2) else { return Ok(None) };
        if version != PROTOCOL_VERSION {
            return Err(DecodeError::UnsupportedVersion(version));
        }
        let Some(&type_byte) = src.get(3) else { return Ok(None) };
        let frame_type = FrameType::from_u8(type_byte).ok_or(DecodeError::UnknownFrameType(type_byte))?;
        let Some(header) = src.get(..HEADER_BYTES) else { return Ok(None) };
        let flags = u16::from_le_bytes([header[4], header[5]]);
        let reserved = u16::from_le_bytes([header[6], header[7]]);
        if flags != 0 || reserved != 0 {
            return Err(DecodeError::ReservedBitsSet);
        }
        let body_bytes = u32::from_le_bytes([header[8], header[9], header[10], header[11]]);
        if body_bytes > limits.frame_body_bytes_max {
            return Err(DecodeError::FrameTooLarge { body_bytes, max_bytes: limits.frame_body_bytes_max });
        }
        let correlation = u32::from_le_bytes([header[12], header[13], header[14], header[15]]);
        Ok(Some(FrameHeader { frame_type, body_bytes, correlation }))
    }

    /// Writes the header.
    pub(crate) fn write(&self, dst: &mut impl bytes::BufMut) {
        dst.put_slice(&MAGIC);
        dst.put_u8(PROTOCOL_VERSION);
        dst.put_u8(self.frame_type as u8);
        dst.put_u16_le(0);
        dst.put_u16_le(0);
        dst.put_u32_le(self.body_bytes);
        dst.put_u32_le(self.correlation);
    }
}
