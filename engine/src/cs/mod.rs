//! The customer-service domain (issue 5): conversations, agents, queues and routing for one
//! tenant, as plain Rust with `now_ms` passed in — no I/O, no clock, no glommio — so that it is
//! deterministic, unit-tested here and simulation-tested in `tests/cs_simulation.rs`.
//!
//! In the engine a [`TenantDesk`] lives on its tenant's shard (hash of the tenant); the shard
//! feeds it requests and timer firings and carries out the [`Effect`]s it returns. Time is
//! Unix milliseconds (`u64`) everywhere; timers are effects, run on the shard's
//! [`crate::timer::TimerWheel`].
//!
//! Layout, from the façade down:
//! - [`desk`]: [`TenantDesk`], the façade: requests in, effects out; dispatch; limits; policy.
//! - [`fsm`]: the table-driven conversation state machine and the events each step pushes.
//! - [`queue`]: one queue: priority-then-FIFO order, positions, the estimated-wait formula.
//! - [`agents`]: presence, skills, capacity, load and offer reservations; the available set.
//! - [`routing`]: the strategy trait, the five strategies, A/B variant assignment.
//! - [`access`]: pure role and tenant checks (Forbidden), for the engine to call first.
//! - [`tickets`]: [`TicketBook`], a tenant's tickets: their state machine, role rules, limits
//!   and SLA escalation; hosted next to the desk.
//! - [`error`]: [`DeskError`], each refusal with its wire [`switchboard_protocol::ErrorCode`].

pub mod access;
pub mod agents;
pub mod desk;
pub mod error;
pub mod fsm;
pub mod queue;
pub mod routing;
pub mod tickets;

pub use access::{check_agent_status, check_conversation, check_open, check_tenant, Actor, ConversationAction, Role};
pub use agents::{Agent, AgentKey, AgentTable};
pub use desk::{
    ConversationView, CsTimerId, DeskLimits, DeskPolicy, DeskStats, Effect, GroupCounts, TenantDesk, TimerKind, TimerPayload,
};
pub use error::DeskError;
pub use fsm::{Event, State, Table};
pub use queue::{Overflow, Queue, QueueKey, QueuePolicy};
pub use routing::{BusinessHours, OpenRange, RoutingStrategy, StrategyConfig, Variant};
pub use tickets::{ConversationLink, Ticket, TicketBook, TicketSettings};
