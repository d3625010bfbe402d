//! The conversation state machine: which events are valid in which state, where they lead, and
//! which `CONVERSATION_EVENT` kinds each transition pushes, in order.
//!
//! It owns the transition table and nothing else: no agent, queue or timer bookkeeping (that is
//! the desk's). The table is data, so the control plane can swap in a stricter one at run time
//! ([`Table::from_rules`] accepts any subset of the standard rules that keeps every rule
//! driven by the system rather than by a request: a tenant may forbid a transfer or a close,
//! never invent a transition the desk has no code for, nor strand a conversation whose agent
//! went offline or whose offer timed out).

use std::fmt;

use switchboard_protocol::{ConversationEventKind as Kind, ErrorCode};

/// Where a conversation is. The agent of `Offered` / `Active` is kept by the desk.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum State {
    /// Being opened: exists only inside `open_conversation`.
    New,
    /// Waiting in a queue.
    Queued,
    /// Offered to one agent, who has not answered yet.
    Offered,
    /// Assigned to one agent.
    Active,
    /// Closed by a participant or a supervisor (terminal).
    Closed,
    /// The customer left before an agent took it (terminal).
    Abandoned,
    /// Nobody will serve it now: out of hours, or waited too long with no overflow queue. The
    /// customer may leave an offline message (terminal).
    OfflineOutcome,
}

/// What can happen to a conversation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Event {
    /// Put in its queue on open.
    Enqueue,
    /// Opened outside business hours.
    OutOfHours,
    /// Offered to an agent by routing.
    Offer,
    /// The offered agent accepts.
    Accept,
    /// The offered agent declines.
    Decline,
    /// The offered agent did not answer in time.
    OfferTimeout,
    /// The agent holding it (offered or assigned) went offline.
    AgentLost,
    /// Moved to a named agent (who must accept).
    TransferToAgent,
    /// Moved to a named queue.
    TransferToQueue,
    /// Closed by a participant or supervisor.
    Close,
    /// The customer left.
    CustomerLeft,
    /// Waited past its queue's limit; moves to the overflow queue.
    Overflow,
    /// Waited past its queue's limit with no overflow queue (or a full one).
    OverflowOffline,
}

impl State {
    /// Every state, in table order.
    pub const ALL: [State; 7] =
        [State::New, State::Queued, State::Offered, State::Active, State::Closed, State::Abandoned, State::OfflineOutcome];

    /// True when nothing can happen to it any more.
    pub fn is_terminal(self) -> bool {
        matches!(self, State::Closed | State::Abandoned | State::OfflineOutcome)
    }

    /// Lower-case name, for error messages and metrics labels.
    pub fn name(self) -> &'static str {
        match self {
            State::New => "new",
            State::Queued => "queued",
            State::Offered => "offered",
            State::Active => "active",
            State::Closed => "closed",
            State::Abandoned => "abandoned",
            State::OfflineOutcome => "offline outcome",
        }
    }
}

impl Event {
    /// Every event, in table order.
    pub const ALL: [Event; 13] = [
        Event::Enqueue,
        Event::OutOfHours,
        Event::Offer,
        Event::Accept,
        Event::Decline,
        Event::OfferTimeout,
        Event::AgentLost,
        Event::TransferToAgent,
        Event::TransferToQueue,
        Event::Close,
        Event::CustomerLeft,
        Event::Overflow,
        Event::OverflowOffline,
    ];

    /// True for events a participant asks for (a custom table may forbid them); false for
    /// those the desk raises itself (routing, timeouts, lost agents), which every table keeps.
    pub fn is_request(self) -> bool {
        matches!(
            self,
            Event::Accept | Event::Decline | Event::TransferToAgent | Event::TransferToQueue | Event::Close | Event::CustomerLeft
        )
    }

    /// Lower-case name, for error messages.
    pub fn name(self) -> &'static str {
        match self {
            Event::Enqueue => "enqueue",
            Event::OutOfHours => "out of hours",
            Event::Offer => "offer",
            Event::Accept => "accept",
            Event::Decline => "decline",
            Event::OfferTimeout => "offer timeout",
            Event::AgentLost => "agent lost",
            Event::TransferToAgent => "transfer to agent",
            Event::TransferToQueue => "transfer to queue",
            Event::Close => "close",
            Event::CustomerLeft => "customer left",
            Event::Overflow => "overflow",
            Event::OverflowOffline => "overflow offline",
        }
    }
}

/// One row of the table.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rule {
    /// The state it applies in.
    pub from: State,
    /// The event.
    pub event: Event,
    /// The state it leads to.
    pub to: State,
    /// What to push to the conversation's participants, in order.
    pub emits: &'static [Kind],
}

const fn rule(from: State, event: Event, to: State, emits: &'static [Kind]) -> Rule {
    Rule { from, event, to, emits }
}

/// The standard rules. A decline, timeout or lost agent sends the conversation back to its queue
/// (so `Declined` is followed by `Queued`); a transfer is announced, then the new place.
pub const STANDARD_RULES: &[Rule] = &[
    rule(State::New, Event::Enqueue, State::Queued, &[Kind::Queued]),
    rule(State::New, Event::OutOfHours, State::OfflineOutcome, &[Kind::Overflowed]),
    rule(State::Queued, Event::Offer, State::Offered, &[Kind::Offered]),
    rule(State::Queued, Event::TransferToAgent, State::Offered, &[Kind::Transferred, Kind::Offered]),
    rule(State::Queued, Event::TransferToQueue, State::Queued, &[Kind::Transferred, Kind::Queued]),
    rule(State::Queued, Event::Overflow, State::Queued, &[Kind::Overflowed, Kind::Queued]),
    rule(State::Queued, Event::OverflowOffline, State::OfflineOutcome, &[Kind::Overflowed]),
    rule(State::Queued, Event::Close, State::Closed, &[Kind::Closed]),
    rule(State::Queued, Event::CustomerLeft, State::Abandoned, &[Kind::Abandoned]),
    rule(State::Offered, Event::Accept, State::Active, &[Kind::Accepted, Kind::Assigned]),
    rule(State::Offered, Event::Decline, State::Queued, &[Kind::Declined, Kind::Queued]),
    rule(State::Offered, Event::OfferTimeout, State::Queued, &[Kind::Declined, Kind::Queued]),
    rule(State::Offered, Event::AgentLost, State::Queued, &[Kind::Declined, Kind::Queued]),
    rule(State::Offered, Event::Close, State::Closed, &[Kind::Closed]),
    rule(State::Offered, Event::CustomerLeft, State::Abandoned, &[Kind::Abandoned]),
    rule(State::Active, Event::TransferToAgent, State::Offered, &[Kind::Transferred, Kind::Offered]),
    rule(State::Active, Event::TransferToQueue, State::Queued, &[Kind::Transferred, Kind::Queued]),
    rule(State::Active, Event::AgentLost, State::Queued, &[Kind::Transferred, Kind::Queued]),
    rule(State::Active, Event::Close, State::Closed, &[Kind::Closed]),
    rule(State::Active, Event::CustomerLeft, State::Closed, &[Kind::Closed]),
];

/// A transition the table allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Transition {
    /// The state after it.
    pub to: State,
    /// What to push, in order.
    pub emits: &'static [Kind],
}

/// An event that is not valid in the conversation's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FsmError {
    /// The state the conversation is in.
    pub state: State,
    /// The event refused.
    pub event: Event,
}

impl FsmError {
    /// The code an ERROR frame carries for it.
    pub fn code(&self) -> ErrorCode {
        ErrorCode::InvalidState
    }
}

impl fmt::Display for FsmError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "`{}` is not valid for a conversation in state `{}`", self.event.name(), self.state.name())
    }
}

impl std::error::Error for FsmError {}

/// Why a custom table was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TableError {
    /// The rule is not one of [`STANDARD_RULES`] (the desk has no code for it).
    UnknownRule(Rule),
    /// Two rules for the same state and event.
    Duplicate(State, Event),
    /// A system rule (not a request) is missing.
    MissingSystemRule(Rule),
}

impl fmt::Display for TableError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TableError::UnknownRule(rule) => {
                write!(f, "rule `{}` + `{}` → `{}` is not a standard rule", rule.from.name(), rule.event.name(), rule.to.name())
            }
            TableError::Duplicate(state, event) => write!(f, "two rules for `{}` + `{}`", state.name(), event.name()),
            TableError::MissingSystemRule(rule) => {
                write!(
                    f,
                    "rule `{}` + `{}` is raised by the desk itself and cannot be removed",
                    rule.from.name(),
                    rule.event.name()
                )
            }
        }
    }
}

impl std::error::Error for TableError {}

/// The transition table, indexed by (state, event): one array lookup per step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Table {
    cells: [[Option<Transition>; Event::ALL.len()]; State::ALL.len()],
}

impl Default for Table {
    fn default() -> Table {
        Table::standard()
    }
}

impl Table {
    /// The table of [`STANDARD_RULES`].
    pub fn standard() -> Table {
        let mut table = Table { cells: [[None; Event::ALL.len()]; State::ALL.len()] };
        for rule in STANDARD_RULES {
            table.cells[rule.from as usize][rule.event as usize] = Some(Transition { to: rule.to, emits: rule.emits });
        }
        table
    }

    /// A table of a subset of the standard rules; each rule must equal its standard one,
    /// `emits` included, and every system rule (see [`Event::is_request`]) must be there.
    pub fn from_rules(rules: &[Rule]) -> Result<Table, TableError> {
        let mut table = Table { cells: [[None; Event::ALL.len()]; State::ALL.len()] };
        for rule in rules {
            if !STANDARD_RULES.contains(rule) {
                return Err(TableError::UnknownRule(*rule));
            }
            let cell = &mut table.cells[rule.from as usize][rule.event as usize];
            if cell.is_some() {
                return Err(TableError::Duplicate(rule.from, rule.event));
            }
            *cell = Some(Transition { to: rule.to, emits: rule.emits });
        }
        if let Some(missing) = STANDARD_RULES.iter().find(|r| !r.event.is_request() && !rules.contains(r)) {
            return Err(TableError::MissingSystemRule(*missing));
        }
        Ok(table)
    }

    /// Where `event` leads from `state`, or why it cannot happen.
    pub fn step(&self, state: State, event: Event) -> Result<Transition, FsmError> {
        self.cells[state as usize][event as usize].ok_or(FsmError { state, event })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn terminal_states_accept_nothing() {
        let table = Table::standard();
        for state in State::ALL.into_iter().filter(|s| s.is_terminal()) {
            for event in Event::ALL {
                assert_eq!(table.step(state, event), Err(FsmError { state, event }));
            }
        }
    }

    #[test]
    fn every_rule_emits_and_every_non_terminal_state_can_end() {
        for rule in STANDARD_RULES {
            assert!(!rule.emits.is_empty(), "{rule:?} pushes nothing");
            assert!(!rule.from.is_terminal());
            // A transition into Queued always ends by telling the position.
            if rule.to == State::Queued {
                assert_eq!(rule.emits.last(), Some(&Kind::Queued), "{rule:?}");
            }
        }
        let table = Table::standard();
        for state in [State::Queued, State::Offered, State::Active] {
            assert!(table.step(state, Event::Close).is_ok_and(|t| t.to.is_terminal()));
            assert!(table.step(state, Event::CustomerLeft).is_ok_and(|t| t.to.is_terminal()));
        }
    }

    #[test]
    fn invalid_transition_names_state_and_event() {
        let error = Table::standard().step(State::Queued, Event::Accept).unwrap_err();
        assert_eq!(error.code(), ErrorCode::InvalidState);
        assert_eq!(error.to_string(), "`accept` is not valid for a conversation in state `queued`");
    }

    #[test]
    fn accept_pushes_accepted_then_assigned() {
        let t = Table::standard().step(State::Offered, Event::Accept).unwrap();
        assert_eq!(t, Transition { to: State::Active, emits: &[Kind::Accepted, Kind::Assigned] });
    }

    #[test]
    fn custom_tables_only_remove_rules() {
        let no_queue_transfers: Vec<Rule> =
            STANDARD_RULES.iter().copied().filter(|r| r.event != Event::TransferToQueue).collect();
        let table = Table::from_rules(&no_queue_transfers).unwrap();
        assert!(table.step(State::Active, Event::TransferToQueue).is_err());
        assert!(table.step(State::Active, Event::Close).is_ok());
        let invented = rule(State::Closed, Event::Enqueue, State::Queued, &[Kind::Queued]);
        assert_eq!(Table::from_rules(&[invented]), Err(TableError::UnknownRule(invented)));
        let twice = [STANDARD_RULES[0], STANDARD_RULES[0]];
        assert_eq!(Table::from_rules(&twice), Err(TableError::Duplicate(State::New, Event::Enqueue)));
        let no_timeouts: Vec<Rule> = STANDARD_RULES.iter().copied().filter(|r| r.event != Event::OfferTimeout).collect();
        assert!(
            matches!(Table::from_rules(&no_timeouts), Err(TableError::MissingSystemRule(r)) if r.event == Event::OfferTimeout)
        );
    }
}
