//! Why the desk refused a request: one typed error per kind of refusal, each mapped to the
//! [`ErrorCode`] an ERROR frame carries and to a message that names what was refused.
//!
//! A refused request changes nothing: every desk operation validates before it mutates.

use std::fmt;

use switchboard_protocol::{ErrorCode, Text};

use super::fsm::FsmError;

/// A refusal.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DeskError {
    /// The event is not valid in the conversation's state.
    InvalidTransition(FsmError),
    /// The conversation, agent or queue does not exist.
    NotFound {
        /// "conversation", "agent" or "queue".
        what: &'static str,
        /// The id asked for.
        id: Text,
    },
    /// The actor may not do this (other agent's offer, other customer's conversation…).
    Forbidden {
        /// Why, for the message.
        reason: &'static str,
    },
    /// A count limit is reached.
    LimitExceeded {
        /// The limit's name, as in [`super::DeskLimits`].
        limit: &'static str,
        /// Its value.
        max: usize,
    },
    /// A field value is not acceptable.
    BadRequest {
        /// Why.
        reason: String,
    },
    /// The target agent cannot take a conversation now (not online, disconnected, full).
    Unavailable {
        /// Why.
        reason: &'static str,
        /// The agent.
        id: Text,
    },
    /// The request is not valid in the current state (a ticket transition the table refuses).
    InvalidState {
        /// Which state and what was refused.
        reason: String,
    },
    /// The conversation already exists.
    Conflict {
        /// Why.
        reason: &'static str,
        /// The id.
        id: Text,
    },
}

impl DeskError {
    /// The code an ERROR frame carries for it.
    pub fn code(&self) -> ErrorCode {
        match self {
            DeskError::InvalidTransition(error) => error.code(),
            DeskError::NotFound { .. } => ErrorCode::NotFound,
            DeskError::Forbidden { .. } => ErrorCode::Forbidden,
            DeskError::LimitExceeded { .. } => ErrorCode::LimitExceeded,
            DeskError::BadRequest { .. } => ErrorCode::BadRequest,
            DeskError::Unavailable { .. } => ErrorCode::Unavailable,
            DeskError::Conflict { .. } => ErrorCode::Conflict,
            DeskError::InvalidState { .. } => ErrorCode::InvalidState,
        }
    }

    pub(crate) fn bad_request(reason: impl Into<String>) -> DeskError {
        DeskError::BadRequest { reason: reason.into() }
    }

    pub(crate) fn not_found(what: &'static str, id: &Text) -> DeskError {
        DeskError::NotFound { what, id: id.clone() }
    }
}

impl From<FsmError> for DeskError {
    fn from(error: FsmError) -> DeskError {
        DeskError::InvalidTransition(error)
    }
}

impl fmt::Display for DeskError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DeskError::InvalidTransition(error) => error.fmt(f),
            DeskError::NotFound { what, id } => write!(f, "{what} `{id}` not found"),
            DeskError::Forbidden { reason } => write!(f, "forbidden: {reason}"),
            DeskError::LimitExceeded { limit, max } => write!(f, "limit `{limit}` ({max}) reached"),
            DeskError::BadRequest { reason } => write!(f, "bad request: {reason}"),
            DeskError::Unavailable { reason, id } => write!(f, "agent `{id}` unavailable: {reason}"),
            DeskError::Conflict { reason, id } => write!(f, "`{id}`: {reason}"),
            DeskError::InvalidState { reason } => f.write_str(reason),
        }
    }
}

impl std::error::Error for DeskError {}
