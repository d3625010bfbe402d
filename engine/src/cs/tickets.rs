//! Tickets (`TICKET_COMMAND` / `TICKET_EVENT`): one tenant's tickets, their state machine,
//! who may touch which, their limits and their SLA escalation — plain Rust with `now_ms`
//! passed in, no I/O, no clock, like [`super::TenantDesk`], next to which it lives on the
//! tenant's shard.
//!
//! It owns the tickets and nothing else. What it needs to know about a conversation (its
//! customer and the agent it is offered or assigned to) is handed in by the caller as
//! [`ConversationLink`], read from the desk at the moment of the command; timers are
//! [`Effect::StartTimer`] / [`Effect::CancelTimer`] like the desk's, with ids from their own
//! half of the id space so that the two never collide on the shard's wheel.
//!
//! Order of checks, so that every refusal is the first that applies and changes nothing:
//! fields (`BadRequest`, `LimitExceeded` for sizes) → the ticket exists (`NotFound`) → the
//! actor may touch it (`Forbidden`) → compare-and-set (`Conflict`) → the state machine
//! (`InvalidState`) → count limits (`LimitExceeded`). Customers and agents get `Forbidden`
//! for tickets that do not exist as for tickets that are not theirs: they learn nothing
//! about other people's tickets.

use std::collections::{HashMap, VecDeque};
use std::fmt;

use bytes::Bytes;
use switchboard_protocol::limits::ID_BYTES_MAX;
use switchboard_protocol::{Text, TicketOp, TicketState};

use super::access::{Actor, Role};
use super::desk::{CsTimerId, Effect, TimerKind, TimerPayload};
use super::error::DeskError;

/// Ticket timer ids have this bit set; the desk's never do (it counts up from 1).
const TICKET_TIMER_BIT: u64 = 1 << 63;

/// Count and size limits of one tenant's tickets, and the SLA of each stage.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TicketSettings {
    /// Tickets not closed, per tenant; a Create past it gets `LimitExceeded`.
    pub tickets_max: usize,
    /// Closed tickets kept (commands on them get `InvalidState`); the oldest closed is
    /// forgotten first, after which its id is unknown again.
    pub closed_tickets_max: usize,
    /// Largest ticket payload, in bytes.
    pub payload_bytes_max: usize,
    /// Highest escalation level (Escalate past it gets `LimitExceeded`; SLA timeouts stop
    /// escalating there).
    pub escalation_level_max: u8,
    /// SLA of each open state, in milliseconds (0: none): `[accepted, assigned, in progress,
    /// follow-up]`. When a ticket stays in a state past it, its escalation level rises by one
    /// and the deadline restarts.
    pub sla_ms: [u64; 4],
}

impl Default for TicketSettings {
    fn default() -> TicketSettings {
        TicketSettings {
            tickets_max: 100_000,
            closed_tickets_max: 10_000,
            payload_bytes_max: 8 * 1024,
            escalation_level_max: 3,
            // Assign within an hour, start within an hour, resolve within a day; no clock while
            // waiting on the customer.
            sla_ms: [3_600_000, 3_600_000, 86_400_000, 0],
        }
    }
}

/// A ticket.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ticket {
    /// Its id (tenant-wide).
    pub id: Text,
    /// 1 at creation, +1 at every change.
    pub version: u64,
    /// Its state.
    pub state: TicketState,
    /// 0: not escalated.
    pub escalation_level: u8,
    /// The conversation it belongs to (empty: none).
    pub session: Text,
    /// The customer it is about (the conversation's, or the customer who created it; empty
    /// when neither).
    pub customer: Text,
    /// Who created it, and with which role.
    pub creator: (Role, Text),
    /// Current assignee (empty: none).
    pub assignee: Text,
    /// When the current SLA stage is due, Unix milliseconds (0: none).
    pub deadline_ms: u64,
    /// Trace id of the command (or 0 for a timeout) that made this version.
    pub trace_id: u128,
    /// Opaque data.
    pub payload: Bytes,
    sla_timer: Option<CsTimerId>,
}

/// A ticket command, as it came off the wire (ids already owned).
#[derive(Debug, Clone, Copy)]
pub struct Command<'a> {
    /// The ticket.
    pub ticket: &'a Text,
    /// What to do.
    pub op: TicketOp,
    /// Compare-and-set: the version the client last saw (0 for Create).
    pub expected_version: u64,
    /// The conversation (Create: the one it belongs to; other ops: empty or the same).
    pub session: &'a Text,
    /// New assignee (Assign only).
    pub assignee: &'a Text,
    /// Trace id.
    pub trace_id: u128,
    /// Opaque data (Create and Update only).
    pub payload: &'a Bytes,
}

/// What the desk knows of the conversation a ticket names, when it is open.
#[derive(Debug, Clone, Copy)]
pub struct ConversationLink<'a> {
    /// Its customer.
    pub customer: &'a Text,
    /// The agent it is offered or assigned to.
    pub agent: Option<&'a Text>,
}

/// The transition table: `(from, op, to)`. Escalate and Update keep the state. Closed is
/// terminal: no row starts there. Create has no row (it starts from nothing: `Accepted`).
pub const TICKET_RULES: &[(TicketState, TicketOp, TicketState)] = {
    use TicketOp as O;
    use TicketState as S;
    &[
        (S::Accepted, O::Assign, S::Assigned),
        (S::Assigned, O::Assign, S::Assigned),
        (S::InProgress, O::Assign, S::Assigned),
        (S::FollowUp, O::Assign, S::Assigned),
        (S::Assigned, O::Start, S::InProgress),
        (S::FollowUp, O::Start, S::InProgress),
        (S::InProgress, O::FollowUp, S::FollowUp),
        (S::Accepted, O::Close, S::Closed),
        (S::Assigned, O::Close, S::Closed),
        (S::InProgress, O::Close, S::Closed),
        (S::FollowUp, O::Close, S::Closed),
        (S::Accepted, O::Escalate, S::Accepted),
        (S::Assigned, O::Escalate, S::Assigned),
        (S::InProgress, O::Escalate, S::InProgress),
        (S::FollowUp, O::Escalate, S::FollowUp),
        (S::Accepted, O::Update, S::Accepted),
        (S::Assigned, O::Update, S::Assigned),
        (S::InProgress, O::Update, S::InProgress),
        (S::FollowUp, O::Update, S::FollowUp),
    ]
};

/// Every state, in wire order.
const STATES: usize = 5;
/// Every op, in wire order.
const OPS: usize = 7;

/// A command the table refuses in the ticket's state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TicketTransitionError {
    /// The ticket's state.
    pub state: TicketState,
    /// The op refused.
    pub op: TicketOp,
}

impl fmt::Display for TicketTransitionError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "`{}` is not valid for a ticket in state `{}`", op_name(self.op), state_name(self.state))
    }
}

/// The table, indexed by (state, op): one lookup per command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TicketTable {
    cells: [[Option<TicketState>; OPS]; STATES],
}

impl Default for TicketTable {
    fn default() -> TicketTable {
        let mut cells = [[None; OPS]; STATES];
        for &(from, op, to) in TICKET_RULES {
            cells[from as usize - 1][op as usize - 1] = Some(to);
        }
        TicketTable { cells }
    }
}

impl TicketTable {
    /// Where `op` leads from `state`, or why it cannot.
    pub fn step(&self, state: TicketState, op: TicketOp) -> Result<TicketState, TicketTransitionError> {
        self.cells[state as usize - 1][op as usize - 1].ok_or(TicketTransitionError { state, op })
    }
}

/// Lower-case name of a state, for messages.
pub fn state_name(state: TicketState) -> &'static str {
    match state {
        TicketState::Accepted => "accepted",
        TicketState::Assigned => "assigned",
        TicketState::InProgress => "in progress",
        TicketState::FollowUp => "follow-up",
        TicketState::Closed => "closed",
    }
}

/// Lower-case name of an op, for messages.
pub fn op_name(op: TicketOp) -> &'static str {
    match op {
        TicketOp::Create => "create",
        TicketOp::Assign => "assign",
        TicketOp::Start => "start",
        TicketOp::FollowUp => "follow-up",
        TicketOp::Close => "close",
        TicketOp::Escalate => "escalate",
        TicketOp::Update => "update",
    }
}

fn forbid(reason: &'static str) -> DeskError {
    DeskError::Forbidden { reason }
}

/// May `actor` see (and so be told about) `ticket`? `link` is its conversation, if open.
pub fn may_see(actor: &Actor<'_>, ticket: &Ticket, link: Option<ConversationLink<'_>>) -> bool {
    match actor.role {
        Role::Gateway | Role::Supervisor => true,
        Role::Customer => ticket.customer.as_str() == actor.subject,
        Role::Agent => {
            ticket.assignee.as_str() == actor.subject
                || ticket.creator == (Role::Agent, Text::from(actor.subject))
                || link.and_then(|l| l.agent).is_some_and(|a| a.as_str() == actor.subject)
        }
    }
}

/// May `actor` do `op` to a ticket it may see? (Create is checked by [`check_create`].)
#[allow(clippy::match_same_arms)] // One arm per rule reads better than merged patterns.
pub fn check_op(actor: &Actor<'_>, op: TicketOp, ticket: &Ticket) -> Result<(), DeskError> {
    match (actor.role, op) {
        (Role::Gateway | Role::Supervisor, _) => Ok(()),
        (Role::Customer, TicketOp::Update | TicketOp::Close) => Ok(()),
        (Role::Customer, _) => Err(forbid("a customer only updates or closes its own tickets")),
        (Role::Agent, TicketOp::Start) if ticket.assignee.as_str() != actor.subject => Err(forbid("only the assignee starts work")),
        (Role::Agent, _) => Ok(()),
    }
}

/// May `actor` create a ticket on the conversation `session` (`link`: it is open)?
pub fn check_create(actor: &Actor<'_>, session: &Text, link: Option<ConversationLink<'_>>) -> Result<(), DeskError> {
    if session.is_empty() {
        return Ok(());
    }
    match (actor.role, link) {
        (Role::Gateway | Role::Supervisor, Some(_)) => Ok(()),
        (Role::Gateway | Role::Supervisor, None) => Err(DeskError::not_found("conversation", session)),
        (Role::Customer, Some(link)) if link.customer.as_str() == actor.subject => Ok(()),
        (Role::Agent, Some(link)) if link.agent.is_some_and(|a| a.as_str() == actor.subject) => Ok(()),
        (Role::Customer | Role::Agent, _) => Err(forbid("not an open conversation of yours")),
    }
}

/// One tenant's tickets. See the module comment.
#[derive(Debug)]
pub struct TicketBook {
    settings: TicketSettings,
    table: TicketTable,
    tickets: HashMap<Text, Ticket>,
    open: usize,
    /// Closed tickets, oldest first (forgotten past `closed_tickets_max`).
    closed: VecDeque<Text>,
    next_timer: u64,
    now_ms: u64,
}

impl TicketBook {
    /// An empty book.
    pub fn new(settings: TicketSettings) -> TicketBook {
        TicketBook { settings, table: TicketTable::default(), tickets: HashMap::new(), open: 0, closed: VecDeque::new(), next_timer: 1, now_ms: 0 }
    }

    /// The settings in force.
    pub fn settings(&self) -> &TicketSettings {
        &self.settings
    }

    /// A ticket, open or closed (while kept).
    pub fn get(&self, id: &Text) -> Option<&Ticket> {
        self.tickets.get(id)
    }

    /// Tickets not closed.
    pub fn open_len(&self) -> usize {
        self.open
    }

    /// Tickets kept, closed ones included.
    pub fn len(&self) -> usize {
        self.tickets.len()
    }

    /// True when no ticket is kept.
    pub fn is_empty(&self) -> bool {
        self.tickets.is_empty()
    }

    /// Runs a command for `actor`. `link` tells what the desk knows of an open conversation
    /// (called with the command's session for Create, with the ticket's otherwise). Returns the
    /// ticket after the change; a refusal changes nothing and pushes no effect.
    pub fn handle<'l>(
        &mut self,
        now_ms: u64,
        actor: &Actor<'_>,
        command: &Command<'_>,
        link: impl Fn(&Text) -> Option<ConversationLink<'l>>,
        effects: &mut Vec<Effect>,
    ) -> Result<&Ticket, DeskError> {
        let now = self.clock(now_ms);
        self.validate(command)?;
        if command.op == TicketOp::Create {
            if let Some(existing) = self.tickets.get(command.ticket) {
                let existing_link = if existing.session.is_empty() { None } else { link(&existing.session) };
                if !may_see(actor, existing, existing_link) {
                    return Err(forbid("not a ticket of yours"));
                }
                return Err(DeskError::Conflict { reason: "the ticket already exists", id: ticket_version_id(existing) });
            }
            return self.create(now, actor, command, link(command.session), effects);
        }
        let Some(ticket) = self.tickets.get(command.ticket) else {
            return Err(match actor.role {
                Role::Customer | Role::Agent => forbid("not a ticket of yours"),
                Role::Gateway | Role::Supervisor => DeskError::not_found("ticket", command.ticket),
            });
        };
        let ticket_link = if ticket.session.is_empty() { None } else { link(&ticket.session) };
        if !may_see(actor, ticket, ticket_link) {
            return Err(forbid("not a ticket of yours"));
        }
        check_op(actor, command.op, ticket)?;
        if !command.session.is_empty() && command.session != &ticket.session {
            return Err(DeskError::bad_request("a ticket's conversation is set at creation and cannot change"));
        }
        if command.expected_version != ticket.version {
            return Err(DeskError::Conflict { reason: "expected_version is not the ticket's version", id: ticket_version_id(ticket) });
        }
        let to = self.table.step(ticket.state, command.op).map_err(|e| DeskError::InvalidState { reason: e.to_string() })?;
        if command.op == TicketOp::Escalate && ticket.escalation_level >= self.settings.escalation_level_max {
            return Err(DeskError::LimitExceeded { limit: "escalation_level_max", max: usize::from(self.settings.escalation_level_max) });
        }
        // Validated: apply.
        let sla_ms = self.settings.sla_ms;
        let Some(ticket) = self.tickets.get_mut(command.ticket) else { return Err(DeskError::not_found("ticket", command.ticket)) };
        let from = ticket.state;
        ticket.version += 1;
        ticket.state = to;
        ticket.trace_id = command.trace_id;
        match command.op {
            TicketOp::Assign => ticket.assignee = command.assignee.clone(),
            TicketOp::Escalate => ticket.escalation_level += 1,
            TicketOp::Update => ticket.payload = command.payload.clone(),
            TicketOp::Create | TicketOp::Start | TicketOp::FollowUp | TicketOp::Close => {}
        }
        // A new stage (a state change, or a new assignee) restarts the SLA clock.
        let new_stage = from != to || command.op == TicketOp::Assign;
        if new_stage {
            if let Some(id) = ticket.sla_timer.take() {
                effects.push(Effect::CancelTimer { id });
            }
            ticket.deadline_ms = 0;
        }
        let id = ticket.id.clone();
        if to == TicketState::Closed {
            self.open = self.open.saturating_sub(1);
            self.closed.push_back(id.clone());
            while self.closed.len() > self.settings.closed_tickets_max {
                if let Some(oldest) = self.closed.pop_front() {
                    self.tickets.remove(&oldest);
                }
            }
        } else if new_stage {
            self.arm_sla(now, &id, sla_ms, effects);
        }
        self.tickets.get(&id).ok_or_else(|| DeskError::not_found("ticket", &id))
    }

    /// A timer fired: a ticket's SLA stage is overdue, so its escalation level rises (up to
    /// the maximum) and the stage's clock restarts. Returns the escalated ticket, or `None`
    /// when the timer is stale (the ticket moved on, closed or was forgotten).
    pub fn handle_timer(&mut self, now_ms: u64, timer: &TimerPayload, effects: &mut Vec<Effect>) -> Option<&Ticket> {
        let now = self.clock(now_ms);
        let TimerKind::TicketSla { ticket: id } = &timer.kind else { return None };
        let max = self.settings.escalation_level_max;
        let sla_ms = self.settings.sla_ms;
        let ticket = self.tickets.get_mut(id).filter(|t| t.sla_timer == Some(timer.id))?;
        ticket.sla_timer = None;
        ticket.deadline_ms = 0;
        if ticket.escalation_level >= max {
            return None;
        }
        ticket.escalation_level += 1;
        ticket.version += 1;
        ticket.trace_id = 0;
        let id = ticket.id.clone();
        self.arm_sla(now, &id, sla_ms, effects);
        self.tickets.get(&id)
    }

    /// Checks every internal invariant; `Err` names the first one broken.
    pub fn check_invariants(&self) -> Result<(), String> {
        let open = self.tickets.values().filter(|t| t.state != TicketState::Closed).count();
        if open != self.open {
            return Err(format!("open count {} but {open} open tickets", self.open));
        }
        if self.open > self.settings.tickets_max || self.closed.len() > self.settings.closed_tickets_max {
            return Err("a count limit is exceeded".into());
        }
        if self.closed.len() + self.open != self.tickets.len() {
            return Err(format!("{} closed + {} open != {} kept", self.closed.len(), self.open, self.tickets.len()));
        }
        for (id, ticket) in &self.tickets {
            if id != &ticket.id || ticket.version == 0 {
                return Err(format!("ticket {id}: id {} version {}", ticket.id, ticket.version));
            }
            if ticket.escalation_level > self.settings.escalation_level_max {
                return Err(format!("ticket {id}: escalation {}", ticket.escalation_level));
            }
            let closed = ticket.state == TicketState::Closed;
            if closed && (ticket.sla_timer.is_some() || ticket.deadline_ms != 0 || !self.closed.contains(id)) {
                return Err(format!("ticket {id}: closed with a clock, or not in the closed list"));
            }
            if ticket.sla_timer.is_some() != (ticket.deadline_ms != 0) {
                return Err(format!("ticket {id}: deadline {} with timer {:?}", ticket.deadline_ms, ticket.sla_timer));
            }
            if matches!(ticket.state, TicketState::Assigned | TicketState::InProgress) && ticket.assignee.is_empty() {
                return Err(format!("ticket {id}: {} without assignee", state_name(ticket.state)));
            }
        }
        Ok(())
    }

    fn clock(&mut self, now_ms: u64) -> u64 {
        self.now_ms = self.now_ms.max(now_ms);
        self.now_ms
    }

    fn validate(&self, command: &Command<'_>) -> Result<(), DeskError> {
        if command.ticket.is_empty() || command.ticket.len() > ID_BYTES_MAX {
            return Err(DeskError::bad_request(format!("ticket id must be 1..={ID_BYTES_MAX} bytes")));
        }
        if command.payload.len() > self.settings.payload_bytes_max {
            return Err(DeskError::LimitExceeded { limit: "ticket_payload_bytes_max", max: self.settings.payload_bytes_max });
        }
        match command.op {
            TicketOp::Assign if command.assignee.is_empty() => return Err(DeskError::bad_request("Assign needs an assignee")),
            TicketOp::Assign => {}
            _ if !command.assignee.is_empty() => return Err(DeskError::bad_request("assignee is set by Assign only")),
            _ => {}
        }
        if !matches!(command.op, TicketOp::Create | TicketOp::Update) && !command.payload.is_empty() {
            return Err(DeskError::bad_request("payload is set by Create and Update only"));
        }
        if command.op == TicketOp::Create && command.expected_version != 0 {
            return Err(DeskError::bad_request("Create needs expected_version 0"));
        }
        Ok(())
    }

    fn create(
        &mut self,
        now: u64,
        actor: &Actor<'_>,
        command: &Command<'_>,
        link: Option<ConversationLink<'_>>,
        effects: &mut Vec<Effect>,
    ) -> Result<&Ticket, DeskError> {
        check_create(actor, command.session, link)?;
        if self.open >= self.settings.tickets_max {
            return Err(DeskError::LimitExceeded { limit: "tickets_max", max: self.settings.tickets_max });
        }
        let customer = match (link, actor.role) {
            (Some(link), _) => link.customer.clone(),
            (None, Role::Customer) => Text::from(actor.subject),
            (None, _) => Text::new(),
        };
        let ticket = Ticket {
            id: command.ticket.clone(),
            version: 1,
            state: TicketState::Accepted,
            escalation_level: 0,
            session: command.session.clone(),
            customer,
            creator: (actor.role, Text::from(actor.subject)),
            assignee: Text::new(),
            deadline_ms: 0,
            trace_id: command.trace_id,
            payload: command.payload.clone(),
            sla_timer: None,
        };
        self.open += 1;
        let id = ticket.id.clone();
        self.tickets.insert(id.clone(), ticket);
        let sla_ms = self.settings.sla_ms;
        self.arm_sla(now, &id, sla_ms, effects);
        self.tickets.get(&id).ok_or_else(|| DeskError::not_found("ticket", &id))
    }

    /// Starts the SLA clock of the ticket's current stage, if that stage has one and the
    /// ticket can still escalate.
    fn arm_sla(&mut self, now: u64, id: &Text, sla_ms: [u64; 4], effects: &mut Vec<Effect>) {
        let timer = TICKET_TIMER_BIT | self.next_timer;
        let max = self.settings.escalation_level_max;
        let Some(ticket) = self.tickets.get_mut(id) else { return };
        let stage_ms = match ticket.state {
            TicketState::Accepted => sla_ms[0],
            TicketState::Assigned => sla_ms[1],
            TicketState::InProgress => sla_ms[2],
            TicketState::FollowUp => sla_ms[3],
            TicketState::Closed => 0,
        };
        if stage_ms == 0 || ticket.escalation_level >= max {
            return;
        }
        self.next_timer += 1;
        let at_ms = now.saturating_add(stage_ms);
        let id = CsTimerId(timer);
        ticket.sla_timer = Some(id);
        ticket.deadline_ms = at_ms;
        effects.push(Effect::StartTimer { at_ms, timer: TimerPayload { id, kind: TimerKind::TicketSla { ticket: ticket.id.clone() } } });
    }
}

/// The ticket id with its current version, for a Conflict message.
fn ticket_version_id(ticket: &Ticket) -> Text {
    Text::from(format!("{} (version {})", ticket.id, ticket.version))
}

#[cfg(test)]
mod tests {
    use switchboard_protocol::ErrorCode;

    use super::*;

    const T0: u64 = 1_704_103_200_000;

    fn t(s: &str) -> Text {
        Text::from(s)
    }

    struct Cmd {
        ticket: Text,
        op: TicketOp,
        expected_version: u64,
        session: Text,
        assignee: Text,
        payload: Bytes,
    }

    fn cmd(ticket: &str, op: TicketOp, expected_version: u64) -> Cmd {
        Cmd { ticket: t(ticket), op, expected_version, session: Text::new(), assignee: Text::new(), payload: Bytes::new() }
    }

    impl Cmd {
        fn session(mut self, session: &str) -> Cmd {
            self.session = t(session);
            self
        }
        fn assignee(mut self, assignee: &str) -> Cmd {
            self.assignee = t(assignee);
            self
        }
        fn payload(mut self, payload: &'static [u8]) -> Cmd {
            self.payload = Bytes::from_static(payload);
            self
        }
    }

    fn actor(role: Role, subject: &'static str) -> Actor<'static> {
        Actor { tenant: "acme", role, subject }
    }

    /// The conversation `conv-1` of customer `cus`, assigned to agent `ann`.
    fn links(session: &Text) -> Option<ConversationLink<'static>> {
        static CUS: Text = Text::from_static("cus");
        static ANN: Text = Text::from_static("ann");
        (session.as_str() == "conv-1").then_some(ConversationLink { customer: &CUS, agent: Some(&ANN) })
    }

    fn run(book: &mut TicketBook, now: u64, who: &Actor<'_>, c: &Cmd) -> Result<(Ticket, Vec<Effect>), DeskError> {
        let mut fx = Vec::new();
        let command = Command {
            ticket: &c.ticket,
            op: c.op,
            expected_version: c.expected_version,
            session: &c.session,
            assignee: &c.assignee,
            trace_id: 7,
            payload: &c.payload,
        };
        let result = book.handle(now, who, &command, links, &mut fx).cloned();
        book.check_invariants().unwrap();
        match result {
            Ok(ticket) => Ok((ticket, fx)),
            Err(error) => {
                assert!(fx.is_empty(), "a refusal pushed {fx:?}");
                Err(error)
            }
        }
    }

    fn ok(book: &mut TicketBook, now: u64, who: &Actor<'_>, c: &Cmd) -> Ticket {
        run(book, now, who, c).unwrap_or_else(|e| panic!("{:?} refused: {e}", c.op)).0
    }

    fn code(book: &mut TicketBook, who: &Actor<'_>, c: &Cmd) -> ErrorCode {
        run(book, T0, who, c).unwrap_err().code()
    }

    #[test]
    fn lifecycle_with_versions_and_sla() {
        let mut book = TicketBook::new(TicketSettings::default());
        let sup = actor(Role::Supervisor, "sue");
        let (created, fx) = run(&mut book, T0, &sup, &cmd("t1", TicketOp::Create, 0).session("conv-1").payload(b"form")).unwrap();
        assert_eq!((created.version, created.state, created.customer.as_str()), (1, TicketState::Accepted, "cus"));
        assert_eq!(created.deadline_ms, T0 + 3_600_000);
        assert!(matches!(&fx[..], [Effect::StartTimer { at_ms, .. }] if *at_ms == T0 + 3_600_000));
        let assigned = ok(&mut book, T0 + 1, &sup, &cmd("t1", TicketOp::Assign, 1).assignee("bob"));
        assert_eq!((assigned.version, assigned.state, assigned.assignee.as_str()), (2, TicketState::Assigned, "bob"));
        let bob = actor(Role::Agent, "bob");
        let started = ok(&mut book, T0 + 2, &bob, &cmd("t1", TicketOp::Start, 2));
        assert_eq!((started.state, started.deadline_ms), (TicketState::InProgress, T0 + 2 + 86_400_000));
        let waiting = ok(&mut book, T0 + 3, &bob, &cmd("t1", TicketOp::FollowUp, 3));
        assert_eq!((waiting.state, waiting.deadline_ms), (TicketState::FollowUp, 0));
        let updated = ok(&mut book, T0 + 4, &actor(Role::Customer, "cus"), &cmd("t1", TicketOp::Update, 4).payload(b"more"));
        assert_eq!((updated.state, &updated.payload[..]), (TicketState::FollowUp, &b"more"[..]));
        ok(&mut book, T0 + 5, &bob, &cmd("t1", TicketOp::Start, 5));
        let escalated = ok(&mut book, T0 + 6, &bob, &cmd("t1", TicketOp::Escalate, 6));
        assert_eq!((escalated.escalation_level, escalated.state), (1, TicketState::InProgress));
        let (closed, fx) = run(&mut book, T0 + 7, &bob, &cmd("t1", TicketOp::Close, 7)).unwrap();
        assert_eq!((closed.version, closed.state, closed.deadline_ms), (8, TicketState::Closed, 0));
        assert!(matches!(&fx[..], [Effect::CancelTimer { .. }]));
        assert_eq!(book.open_len(), 0);
        // Closed is terminal; a stale version is a conflict before that.
        assert_eq!(code(&mut book, &sup, &cmd("t1", TicketOp::Update, 8)), ErrorCode::InvalidState);
        assert_eq!(code(&mut book, &sup, &cmd("t1", TicketOp::Close, 3)), ErrorCode::Conflict);
        assert_eq!(code(&mut book, &sup, &cmd("t1", TicketOp::Create, 0)), ErrorCode::Conflict);
    }

    #[test]
    fn invalid_transitions_name_state_and_op() {
        let mut book = TicketBook::new(TicketSettings::default());
        let sup = actor(Role::Supervisor, "sue");
        ok(&mut book, T0, &sup, &cmd("t1", TicketOp::Create, 0));
        let error = run(&mut book, T0, &sup, &cmd("t1", TicketOp::Start, 1)).unwrap_err();
        assert_eq!(error.code(), ErrorCode::InvalidState);
        assert_eq!(error.to_string(), "`start` is not valid for a ticket in state `accepted`");
        assert_eq!(code(&mut book, &sup, &cmd("t1", TicketOp::FollowUp, 1)), ErrorCode::InvalidState);
    }

    #[test]
    fn fields_are_checked_first() {
        let mut book = TicketBook::new(TicketSettings { payload_bytes_max: 4, ..TicketSettings::default() });
        let sup = actor(Role::Supervisor, "sue");
        assert_eq!(code(&mut book, &sup, &cmd("", TicketOp::Create, 0)), ErrorCode::BadRequest);
        assert_eq!(code(&mut book, &sup, &cmd("t1", TicketOp::Create, 1)), ErrorCode::BadRequest);
        assert_eq!(code(&mut book, &sup, &cmd("t1", TicketOp::Create, 0).assignee("bob")), ErrorCode::BadRequest);
        assert_eq!(code(&mut book, &sup, &cmd("t1", TicketOp::Create, 0).payload(b"12345")), ErrorCode::LimitExceeded);
        assert_eq!(code(&mut book, &sup, &cmd("t1", TicketOp::Create, 0).session("conv-x")), ErrorCode::NotFound);
        ok(&mut book, T0, &sup, &cmd("t1", TicketOp::Create, 0).payload(b"1234"));
        assert_eq!(code(&mut book, &sup, &cmd("t1", TicketOp::Assign, 1)), ErrorCode::BadRequest);
        assert_eq!(code(&mut book, &sup, &cmd("t1", TicketOp::Close, 1).payload(b"x")), ErrorCode::BadRequest);
        assert_eq!(code(&mut book, &sup, &cmd("t1", TicketOp::Close, 1).session("conv-1")), ErrorCode::BadRequest);
        assert_eq!(code(&mut book, &sup, &cmd("nope", TicketOp::Close, 1)), ErrorCode::NotFound);
    }

    #[test]
    fn roles_see_and_do_only_what_they_may() {
        let mut book = TicketBook::new(TicketSettings::default());
        let cus = actor(Role::Customer, "cus");
        let other = actor(Role::Customer, "eve");
        let ann = actor(Role::Agent, "ann");
        let bob = actor(Role::Agent, "bob");
        let gw = actor(Role::Gateway, "gw");
        // The customer opens a ticket on its own conversation; not on another's.
        let ticket = ok(&mut book, T0, &cus, &cmd("t1", TicketOp::Create, 0).session("conv-1"));
        assert_eq!(ticket.customer, "cus");
        assert_eq!(code(&mut book, &other, &cmd("t2", TicketOp::Create, 0).session("conv-1")), ErrorCode::Forbidden);
        assert_eq!(code(&mut book, &bob, &cmd("t2", TicketOp::Create, 0).session("conv-1")), ErrorCode::Forbidden);
        assert_eq!(code(&mut book, &cus, &cmd("t2", TicketOp::Create, 0).session("conv-x")), ErrorCode::Forbidden);
        // Others' tickets look like unknown ones to customers and agents.
        assert_eq!(code(&mut book, &other, &cmd("t1", TicketOp::Update, 1)), ErrorCode::Forbidden);
        assert_eq!(code(&mut book, &other, &cmd("t9", TicketOp::Update, 1)), ErrorCode::Forbidden);
        assert_eq!(code(&mut book, &other, &cmd("t1", TicketOp::Create, 0)), ErrorCode::Forbidden);
        assert_eq!(code(&mut book, &bob, &cmd("t1", TicketOp::Escalate, 1)), ErrorCode::Forbidden);
        // The customer may not assign, start or escalate.
        for op in [TicketOp::Start, TicketOp::FollowUp, TicketOp::Escalate] {
            assert_eq!(code(&mut book, &cus, &cmd("t1", op, 1)), ErrorCode::Forbidden);
        }
        assert_eq!(code(&mut book, &cus, &cmd("t1", TicketOp::Assign, 1).assignee("ann")), ErrorCode::Forbidden);
        // Ann serves the conversation: she may assign it, to bob; then bob sees it and starts
        // it; ann may not start what is bob's.
        ok(&mut book, T0, &ann, &cmd("t1", TicketOp::Assign, 1).assignee("bob"));
        assert_eq!(code(&mut book, &ann, &cmd("t1", TicketOp::Start, 2)), ErrorCode::Forbidden);
        ok(&mut book, T0, &bob, &cmd("t1", TicketOp::Start, 2));
        // A gateway does anything within the tenant.
        ok(&mut book, T0, &gw, &cmd("t1", TicketOp::Close, 3));
        // An agent's own ticket without a conversation stays visible to it.
        ok(&mut book, T0, &bob, &cmd("t3", TicketOp::Create, 0));
        ok(&mut book, T0, &bob, &cmd("t3", TicketOp::Update, 1).payload(b"x"));
        assert_eq!(code(&mut book, &ann, &cmd("t3", TicketOp::Update, 2)), ErrorCode::Forbidden);
    }

    #[test]
    fn limits_refuse_with_their_names() {
        let settings = TicketSettings { tickets_max: 2, closed_tickets_max: 1, escalation_level_max: 1, ..TicketSettings::default() };
        let mut book = TicketBook::new(settings);
        let sup = actor(Role::Supervisor, "sue");
        ok(&mut book, T0, &sup, &cmd("a", TicketOp::Create, 0));
        ok(&mut book, T0, &sup, &cmd("b", TicketOp::Create, 0));
        let error = run(&mut book, T0, &sup, &cmd("c", TicketOp::Create, 0)).unwrap_err();
        assert_eq!((error.code(), error.to_string().contains("tickets_max")), (ErrorCode::LimitExceeded, true));
        ok(&mut book, T0, &sup, &cmd("a", TicketOp::Escalate, 1));
        assert_eq!(code(&mut book, &sup, &cmd("a", TicketOp::Escalate, 2)), ErrorCode::LimitExceeded);
        // Closing frees a place; the oldest closed ticket is forgotten past closed_tickets_max.
        ok(&mut book, T0, &sup, &cmd("a", TicketOp::Close, 2));
        ok(&mut book, T0, &sup, &cmd("c", TicketOp::Create, 0));
        ok(&mut book, T0, &sup, &cmd("b", TicketOp::Close, 1));
        assert!(book.get(&t("a")).is_none());
        assert_eq!(book.get(&t("b")).map(|t| t.state), Some(TicketState::Closed));
    }

    #[test]
    fn sla_timeouts_escalate_then_stop_and_stale_timers_do_nothing() {
        let settings = TicketSettings { escalation_level_max: 2, sla_ms: [100, 200, 0, 0], ..TicketSettings::default() };
        let mut book = TicketBook::new(settings);
        let sup = actor(Role::Supervisor, "sue");
        let (_, fx) = run(&mut book, T0, &sup, &cmd("a", TicketOp::Create, 0)).unwrap();
        let Some(Effect::StartTimer { at_ms, timer }) = fx.first().cloned() else { panic!("{fx:?}") };
        assert_eq!(at_ms, T0 + 100);
        assert!(timer.id.0 & TICKET_TIMER_BIT != 0);
        let mut fx = Vec::new();
        let escalated = book.handle_timer(at_ms, &timer, &mut fx).cloned().unwrap();
        assert_eq!((escalated.escalation_level, escalated.version, escalated.deadline_ms), (1, 2, T0 + 200));
        let Some(Effect::StartTimer { at_ms, timer: second }) = fx.first().cloned() else { panic!("{fx:?}") };
        // The old firing again: stale.
        assert!(book.handle_timer(at_ms, &timer, &mut Vec::new()).is_none());
        let mut fx = Vec::new();
        let top = book.handle_timer(at_ms, &second, &mut fx).cloned().unwrap();
        assert_eq!((top.escalation_level, top.deadline_ms), (2, 0));
        assert!(fx.is_empty(), "at the top level the clock stops: {fx:?}");
        book.check_invariants().unwrap();
        // Assigning starts the assigned stage's clock... except at the top level.
        let assigned = ok(&mut book, T0 + 300, &sup, &cmd("a", TicketOp::Assign, 3).assignee("bob"));
        assert_eq!(assigned.deadline_ms, 0);
    }

    /// Seeded random commands from every role: after each, the invariants hold, a refusal
    /// changed nothing, and an accepted command moved the version by exactly one along a row
    /// of the table.
    #[test]
    fn random_commands_keep_the_invariants() {
        let seed = std::env::var("TICKET_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or(0x5eed_u64);
        let mut rng = seed;
        let mut next = move |n: u64| {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng % n
        };
        let settings = TicketSettings { tickets_max: 6, closed_tickets_max: 3, escalation_level_max: 2, sla_ms: [50, 80, 120, 0], ..TicketSettings::default() };
        let mut book = TicketBook::new(settings);
        let actors = [
            actor(Role::Supervisor, "sue"),
            actor(Role::Gateway, "gw"),
            actor(Role::Customer, "cus"),
            actor(Role::Customer, "eve"),
            actor(Role::Agent, "ann"),
            actor(Role::Agent, "bob"),
        ];
        let ops = TicketOp::ALL;
        let table = TicketTable::default();
        let mut timers: Vec<(u64, TimerPayload)> = Vec::new();
        let mut now = T0;
        let (mut accepted, mut escalations) = (0u32, 0u32);
        let mut states_seen = std::collections::HashSet::new();
        for step in 0..20_000 {
            now += next(20);
            let id = format!("t{}", next(10));
            let who = &actors[next(actors.len() as u64) as usize];
            if next(8) == 0 && !timers.is_empty() {
                let (at, timer) = timers.swap_remove(next(timers.len() as u64) as usize);
                let mut fx = Vec::new();
                if let Some(after) = book.handle_timer(now.max(at), &timer, &mut fx).cloned() {
                    escalations += 1;
                    assert!(after.escalation_level <= 2);
                    let TimerKind::TicketSla { ticket } = &timer.kind else { unreachable!() };
                    assert_eq!(ticket, &after.id);
                }
                collect(&mut timers, fx);
                book.check_invariants().unwrap_or_else(|e| panic!("seed {seed} step {step}: {e}"));
                continue;
            }
            let op = ops[next(ops.len() as u64) as usize];
            let current = book.get(&t(&id)).cloned();
            let version = match (next(4), &current) {
                (0, _) => next(5),
                (_, Some(ticket)) if op != TicketOp::Create => ticket.version,
                _ => 0,
            };
            let mut c = cmd(&id, op, version);
            if op == TicketOp::Assign {
                c = c.assignee(["ann", "bob"][next(2) as usize]);
            }
            if op == TicketOp::Create && next(2) == 0 {
                c = c.session("conv-1");
            }
            if matches!(op, TicketOp::Create | TicketOp::Update) {
                c = c.payload(b"p");
            }
            let before_len = book.len();
            if let Ok((after, fx)) = run(&mut book, now, who, &c) {
                accepted += 1;
                states_seen.insert(after.state as u8);
                match &current {
                    None => assert_eq!((op, after.version, after.state), (TicketOp::Create, 1, TicketState::Accepted)),
                    Some(before) => {
                        assert_eq!(after.version, before.version + 1, "seed {seed} step {step}");
                        assert_eq!(table.step(before.state, op), Ok(after.state), "seed {seed} step {step}");
                    }
                }
                collect(&mut timers, fx);
            } else {
                assert_eq!(book.get(&t(&id)), current.as_ref(), "seed {seed} step {step}: a refusal changed the ticket");
                assert_eq!(book.len(), before_len);
            }
        }
        // The walk must reach far, or it proves little.
        assert!(accepted > 2_000 && escalations > 50, "seed {seed}: {accepted} accepted, {escalations} escalations");
        assert_eq!(states_seen.len(), 5, "seed {seed}: states reached {states_seen:?}");
    }

    fn collect(timers: &mut Vec<(u64, TimerPayload)>, fx: Vec<Effect>) {
        for effect in fx {
            if let Effect::StartTimer { at_ms, timer } = effect {
                timers.push((at_ms, timer));
            }
        }
    }

    #[test]
    fn the_table_has_no_row_from_closed_and_every_open_state_can_close() {
        let table = TicketTable::default();
        for op in TicketOp::ALL {
            assert!(table.step(TicketState::Closed, *op).is_err());
        }
        assert!(table.step(TicketState::Accepted, TicketOp::Create).is_err());
        for state in [TicketState::Accepted, TicketState::Assigned, TicketState::InProgress, TicketState::FollowUp] {
            assert_eq!(table.step(state, TicketOp::Close), Ok(TicketState::Closed));
        }
    }
}
