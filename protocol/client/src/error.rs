//! [`ClientError`]: every way a client call can fail, typed so a gateway can decide what to
//! tell its own user (retry, re-authenticate, shed load, give up).
//!
//! Owns the mapping from the wire's [`ErrorCode`] to these variants; nothing else.

use std::fmt;
use std::sync::Arc;

use switchboard_protocol::{ErrorCode, GoAwayReason};

/// Why a client call failed.
///
/// The server's [`ErrorCode`]s map onto the first variants ([`ClientError::from_server`]); the
/// rest are raised by the client itself. The type is `Clone` so one failure (say, the
/// connection being closed for good) can be handed to every waiter.
#[derive(Debug, Clone)]
#[non_exhaustive]
pub enum ClientError {
    /// The server refused the token (missing, invalid or expired). Terminal: the client does
    /// not retry with the same token.
    AuthRefused {
        /// The server's detail.
        message: String,
    },
    /// The token is valid but does not allow this (another tenant's session, wrong role).
    Forbidden {
        /// The server's detail.
        message: String,
    },
    /// A count or size limit was exceeded (subscriptions, payload size, …), by the server's
    /// answer or by the client's check against the limits the server announced.
    LimitExceeded {
        /// Which limit, and by how much.
        message: String,
    },
    /// A rate limit was exceeded; retry later.
    RateLimited {
        /// The server's detail.
        message: String,
    },
    /// The server closed the connection because this client did not read fast enough, and the
    /// client could not (or was not allowed to) reconnect.
    SlowConsumer,
    /// A peer broke the protocol: an undecodable frame, a reply that does not match its
    /// request, a seq that skips ahead within an epoch, or a server's protocol-level error.
    Protocol(String),
    /// The server answered with another error code.
    Server {
        /// The code.
        code: ErrorCode,
        /// The server's detail.
        message: String,
    },
    /// The server closed the connection (GOAWAY) and the client could not reconnect.
    GoAway {
        /// Why the server closed it.
        reason: GoAwayReason,
        /// The server's detail.
        message: String,
    },
    /// No answer within the request timeout (or the connect, handshake or keepalive timeout).
    Timeout,
    /// The request was sent but the connection was lost before its answer arrived, so whether
    /// the server applied it is unknown. Publishes and subscriptions never fail this way (they
    /// are re-sent after a reconnect); other requests are not idempotent and do.
    ConnectionLost,
    /// Too many publishes are waiting for their PUBACK (`inflight_publishes_max`); wait for
    /// some to complete. This is the publisher side of the client's backpressure.
    InflightFull {
        /// The limit.
        max: usize,
    },
    /// Too many other requests are waiting for an answer (`requests_pending_max`).
    TooManyRequests {
        /// The limit.
        max: usize,
    },
    /// The session is already subscribed on this client.
    AlreadySubscribed,
    /// The session is not subscribed on this client.
    NotSubscribed,
    /// The request cannot be sent: a field is too long, or the frame is not a request.
    InvalidRequest(String),
    /// An ephemeral frame (TYPING) was not sent because the client is not connected.
    NotConnected,
    /// The client was closed (by the application, or for good after a terminal error).
    Closed,
    /// A socket operation failed (for example the first connect).
    Io(Arc<std::io::Error>),
}

impl ClientError {
    /// The typed error for an ERROR frame's code and message.
    pub fn from_server(code: ErrorCode, message: &str) -> ClientError {
        let message = message.to_owned();
        match code {
            ErrorCode::AuthFailed => ClientError::AuthRefused { message },
            ErrorCode::Forbidden => ClientError::Forbidden { message },
            ErrorCode::LimitExceeded => ClientError::LimitExceeded { message },
            ErrorCode::RateLimited => ClientError::RateLimited { message },
            ErrorCode::Malformed
            | ErrorCode::UnsupportedVersion
            | ErrorCode::UnknownFrameType
            | ErrorCode::FrameTooLarge
            | ErrorCode::HandshakeRequired => ClientError::Protocol(format!("server reported {code}: {message}")),
            code => ClientError::Server { code, message },
        }
    }

    /// True when retrying the same call later can succeed (rate limits, timeouts, lost
    /// connections, a full inflight window, transient server errors).
    pub fn is_transient(&self) -> bool {
        match self {
            ClientError::RateLimited { .. }
            | ClientError::Timeout
            | ClientError::ConnectionLost
            | ClientError::InflightFull { .. }
            | ClientError::TooManyRequests { .. }
            | ClientError::NotConnected
            | ClientError::SlowConsumer
            | ClientError::GoAway { .. }
            | ClientError::Io(_) => true,
            ClientError::Server { code, .. } => matches!(code, ErrorCode::Unavailable | ErrorCode::Internal),
            _ => false,
        }
    }
}

impl fmt::Display for ClientError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ClientError::AuthRefused { message } => write!(f, "authentication refused: {message}"),
            ClientError::Forbidden { message } => write!(f, "forbidden: {message}"),
            ClientError::LimitExceeded { message } => write!(f, "limit exceeded: {message}"),
            ClientError::RateLimited { message } => write!(f, "rate limited: {message}"),
            ClientError::SlowConsumer => write!(f, "disconnected as a slow consumer"),
            ClientError::Protocol(detail) => write!(f, "protocol violation: {detail}"),
            ClientError::Server { code, message } => write!(f, "server error {code}: {message}"),
            ClientError::GoAway { reason, message } => write!(f, "server closed the connection ({reason:?}): {message}"),
            ClientError::Timeout => write!(f, "timed out"),
            ClientError::ConnectionLost => write!(f, "connection lost before the answer; outcome unknown"),
            ClientError::InflightFull { max } => write!(f, "{max} publishes already wait for their PUBACK"),
            ClientError::TooManyRequests { max } => write!(f, "{max} requests already wait for their answer"),
            ClientError::AlreadySubscribed => write!(f, "already subscribed to this session"),
            ClientError::NotSubscribed => write!(f, "not subscribed to this session"),
            ClientError::InvalidRequest(detail) => write!(f, "invalid request: {detail}"),
            ClientError::NotConnected => write!(f, "not connected"),
            ClientError::Closed => write!(f, "client closed"),
            ClientError::Io(error) => write!(f, "i/o error: {error}"),
        }
    }
}

impl std::error::Error for ClientError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            ClientError::Io(error) => Some(error.as_ref()),
            _ => None,
        }
    }
}

impl From<std::io::Error> for ClientError {
    fn from(error: std::io::Error) -> ClientError {
        ClientError::Io(Arc::new(error))
    }
}

impl PartialEq for ClientError {
    /// Same variant and same data; two `Io` errors are equal when their kinds are.
    fn eq(&self, other: &ClientError) -> bool {
        use ClientError as E;
        match (self, other) {
            (E::AuthRefused { message: a }, E::AuthRefused { message: b })
            | (E::Forbidden { message: a }, E::Forbidden { message: b })
            | (E::LimitExceeded { message: a }, E::LimitExceeded { message: b })
            | (E::RateLimited { message: a }, E::RateLimited { message: b })
            | (E::Protocol(a), E::Protocol(b))
            | (E::InvalidRequest(a), E::InvalidRequest(b)) => a == b,
            (E::Server { code: a, message: x }, E::Server { code: b, message: y }) => a == b && x == y,
            (E::GoAway { reason: a, message: x }, E::GoAway { reason: b, message: y }) => a == b && x == y,
            (E::InflightFull { max: a }, E::InflightFull { max: b })
            | (E::TooManyRequests { max: a }, E::TooManyRequests { max: b }) => a == b,
            (E::Io(a), E::Io(b)) => a.kind() == b.kind(),
            (E::SlowConsumer, E::SlowConsumer)
            | (E::Timeout, E::Timeout)
            | (E::ConnectionLost, E::ConnectionLost)
            | (E::AlreadySubscribed, E::AlreadySubscribed)
            | (E::NotSubscribed, E::NotSubscribed)
            | (E::NotConnected, E::NotConnected)
            | (E::Closed, E::Closed) => true,
            _ => false,
        }
    }
}

impl Eq for ClientError {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_codes_map_to_typed_errors() {
        assert!(matches!(ClientError::from_server(ErrorCode::AuthFailed, "x"), ClientError::AuthRefused { .. }));
        assert!(matches!(ClientError::from_server(ErrorCode::Forbidden, "x"), ClientError::Forbidden { .. }));
        assert!(matches!(ClientError::from_server(ErrorCode::LimitExceeded, "x"), ClientError::LimitExceeded { .. }));
        assert!(matches!(ClientError::from_server(ErrorCode::RateLimited, "x"), ClientError::RateLimited { .. }));
        assert!(matches!(ClientError::from_server(ErrorCode::Malformed, "x"), ClientError::Protocol(_)));
        assert!(matches!(
            ClientError::from_server(ErrorCode::Conflict, "x"),
            ClientError::Server { code: ErrorCode::Conflict, .. }
        ));
        assert!(ClientError::from_server(ErrorCode::Unavailable, "x").is_transient());
        assert!(!ClientError::from_server(ErrorCode::AuthFailed, "x").is_transient());
    }
}
