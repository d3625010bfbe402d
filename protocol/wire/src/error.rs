//! What can go wrong on the wire, and the codes an ERROR frame carries.

use std::fmt;

/// Why a byte stream is not a valid frame. After any of these the stream cannot be
/// resynchronised: the receiver answers with ERROR (see [`DecodeError::code`]) and closes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DecodeError {
    /// The first two bytes are not "SB".
    BadMagic,
    /// The version byte is not one this decoder speaks.
    UnsupportedVersion(u8),
    /// The type byte names no frame.
    UnknownFrameType(u8),
    /// Flags or reserved header bits are set (none are defined in version 1).
    ReservedBitsSet,
    /// The header announces a body longer than the limit.
    FrameTooLarge {
        /// Announced body length.
        body_bytes: u32,
        /// The limit in force.
        max_bytes: u32,
    },
    /// The body ended inside a field: the lengths inside the body lie.
    Truncated {
        /// The field being read.
        field: &'static str,
    },
    /// A text field is not valid UTF-8.
    InvalidUtf8 {
        /// The field.
        field: &'static str,
    },
    /// A length-prefixed field is longer than its limit.
    FieldTooLong {
        /// The field.
        field: &'static str,
        /// Its announced length.
        len: usize,
        /// The limit.
        max: usize,
    },
    /// An enumerated field holds a value with no meaning.
    InvalidValue {
        /// The field.
        field: &'static str,
        /// The value found.
        value: u64,
    },
    /// The body is longer than its fields: bytes are left over.
    TrailingBytes {
        /// How many bytes are left.
        count: usize,
    },
}

impl DecodeError {
    /// The code to send back in an ERROR frame for this problem.
    pub fn code(&self) -> ErrorCode {
        match self {
            DecodeError::UnsupportedVersion(_) => ErrorCode::UnsupportedVersion,
            DecodeError::UnknownFrameType(_) => ErrorCode::UnknownFrameType,
            DecodeError::FrameTooLarge { .. } => ErrorCode::FrameTooLarge,
            _ => ErrorCode::Malformed,
        }
    }
}

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DecodeError::BadMagic => write!(f, "bad magic: frames start with \"SB\""),
            DecodeError::UnsupportedVersion(v) => write!(f, "unsupported protocol version {v}"),
            DecodeError::UnknownFrameType(t) => write!(f, "unknown frame type 0x{t:02x}"),
            DecodeError::ReservedBitsSet => write!(f, "flags or reserved header bits set"),
            DecodeError::FrameTooLarge { body_bytes, max_bytes } => {
                write!(f, "frame body of {body_bytes} bytes exceeds the limit of {max_bytes} bytes")
            }
            DecodeError::Truncated { field } => write!(f, "frame body ends inside field `{field}`"),
            DecodeError::InvalidUtf8 { field } => write!(f, "field `{field}` is not valid UTF-8"),
            DecodeError::FieldTooLong { field, len, max } => {
                write!(f, "field `{field}` is {len} bytes long, the limit is {max}")
            }
            DecodeError::InvalidValue { field, value } => write!(f, "field `{field}` has invalid value {value}"),
            DecodeError::TrailingBytes { count } => write!(f, "{count} bytes left after the last field"),
        }
    }
}

impl std::error::Error for DecodeError {}

/// Why a frame cannot be encoded: a field is longer than the protocol allows.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct EncodeError {
    /// The field.
    pub field: &'static str,
    /// Its length.
    pub len: usize,
    /// The limit.
    pub max: usize,
}

impl fmt::Display for EncodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "field `{}` is {} long, the protocol allows {}", self.field, self.len, self.max)
    }
}

impl std::error::Error for EncodeError {}

macro_rules! error_codes {
    ($($(#[$doc:meta])* $name:ident = $value:literal,)*) => {
        /// The code in an ERROR frame. Unknown codes decode as [`ErrorCode::Unknown`] so an
        /// older client still reads a newer server's errors.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
        pub enum ErrorCode {
            $($(#[$doc])* $name,)*
            /// A code this version does not know.
            Unknown(u16),
        }

        impl ErrorCode {
            /// Every known code.
            pub const ALL: &'static [ErrorCode] = &[$(ErrorCode::$name,)*];

            /// The wire value.
            pub fn as_u16(self) -> u16 {
                match self {
                    $(ErrorCode::$name => $value,)*
                    ErrorCode::Unknown(value) => value,
                }
            }

            /// The code for a wire value.
            pub fn from_u16(value: u16) -> ErrorCode {
                match value {
                    $($value => ErrorCode::$name,)*
                    other => ErrorCode::Unknown(other),
                }
            }
        }
    };
}

error_codes! {
    /// The bytes are not a valid frame (bad magic, truncated or lying lengths, bad UTF-8,
    /// invalid enum value, trailing bytes). The connection is closed.
    Malformed = 1,
    /// No protocol version in common. The connection is closed.
    UnsupportedVersion = 2,
    /// The frame type is unknown. The connection is closed.
    UnknownFrameType = 3,
    /// The frame is larger than the server's limit. The connection is closed.
    FrameTooLarge = 4,
    /// HELLO was missing, repeated or sent out of order.
    HandshakeRequired = 5,
    /// The token is missing, invalid or expired. The connection is closed.
    AuthFailed = 6,
    /// The token is valid but does not allow this (other tenant, other role).
    Forbidden = 7,
    /// A rate limit (publishes/s, bytes/s) was exceeded; retry later.
    RateLimited = 8,
    /// A count limit (subscriptions, open conversations, payload size) was exceeded.
    LimitExceeded = 9,
    /// The session, conversation, agent or ticket does not exist.
    NotFound = 10,
    /// The request is well-formed but not valid in the current state (FSM transition).
    InvalidState = 11,
    /// Compare-and-set failed: the version given is not the current one.
    Conflict = 12,
    /// The server is temporarily out of a resource (buffers, queue space); retry later.
    Unavailable = 13,
    /// A field value is not acceptable (empty id, bad priority…).
    BadRequest = 14,
    /// The request was not handled because of a server fault.
    Internal = 15,
    /// The request is known but this server does not implement it yet.
    NotImplemented = 16,
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{self:?}")
    }
}
