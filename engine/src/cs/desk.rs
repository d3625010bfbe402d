//! [`TenantDesk`]: one tenant's conversations, agents and queues, and the façade the engine
//! calls. It lives on the tenant's shard; every method takes `now_ms` and returns its effects
//! as data, appended to the caller's vector (events to push, agents to notify, timers to start
//! or cancel). It does no I/O, reads no clock and holds no timer itself: timers are effects,
//! and come back through [`TenantDesk::handle_timer`].
//!
//! A refused request returns a [`DeskError`] and changes nothing (every method validates, then
//! mutates), and leaves the effects vector as it was.
//!
//! Routing ("dispatch") runs at the end of every call. It walks the waiting conversations of all
//! queues in one order — priority, then arrival — and offers each to an agent chosen by its
//! strategy among the candidates. It keeps this invariant, which the simulation checks after
//! every step: *when a call returns, no waiting conversation has a candidate agent*. So a
//! conversation never waits while an agent could take it, and when an agent frees a slot the
//! longest-waiting conversation it can take is offered first. To stay cheap, a call only
//! re-examines what it changed: conversations that (re-)entered a queue are matched against
//! every available agent; the rest only against agents whose state changed.
//!
//! Time never runs backwards here: a `now_ms` older than one already seen counts as that one.

use std::collections::{BTreeSet, HashMap, VecDeque};

use switchboard_protocol::limits::{ID_BYTES_MAX, MESSAGE_BYTES_MAX, SKILLS_MAX};
use switchboard_protocol::{AgentPresence, ConversationEventKind as Kind, Text, TransferKind};

use super::access::ConversationFacts;
use super::agents::{Agent, AgentKey, AgentTable};
use super::error::DeskError;
use super::fsm::{Event, State, Table, Transition};
use super::queue::{Overflow, Queue, QueueKey, QueuePolicy};
use super::routing::{variant_for, RouteQuery, Router, StrategyConfig, Variant};

/// A timer id the desk chooses (the engine maps it to its wheel's handle to cancel it).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CsTimerId(pub u64);

/// What a timer is for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TimerKind {
    /// The agent offered `session` did not answer in time.
    OfferTimeout {
        /// The conversation.
        session: Text,
    },
    /// `session` waited its queue's `wait_ms_max`.
    MaxWait {
        /// The conversation.
        session: Text,
    },
    /// `agent`'s connection has been gone for the grace period.
    AgentGrace {
        /// The agent.
        agent: Text,
    },
    /// `customer`'s last connection has been gone for the grace period: its waiting
    /// conversations are abandoned.
    CustomerGrace {
        /// The customer.
        customer: Text,
    },
    /// A ticket's SLA stage is due (handled by [`super::TicketBook::handle_timer`], not the
    /// desk).
    TicketSla {
        /// The ticket.
        ticket: Text,
    },
}

/// A timer's payload, handed back to [`TenantDesk::handle_timer`] when it fires.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TimerPayload {
    /// Which timer; a firing whose id is no longer current is ignored (counted as stale).
    pub id: CsTimerId,
    /// What for.
    pub kind: TimerKind,
}

/// Something the engine must do, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Effect {
    /// Push a `CONVERSATION_EVENT` to the conversation's participants and the tenant's
    /// supervisors (the engine adds epoch, seq and timestamp).
    Event {
        /// The conversation.
        session: Text,
        /// What happened.
        kind: Kind,
        /// The agent concerned (empty when none).
        agent: Text,
        /// The queue concerned (empty when none).
        queue: Text,
        /// 1-based queue position (0 when not queued).
        position: u32,
        /// Estimated wait (0 when not queued).
        estimated_wait_ms: u32,
        /// A/B group (empty when none).
        group: Text,
        /// Why (close reason, transfer note, "offer timeout", …).
        reason: Text,
    },
    /// Deliver this conversation event to `agent`'s connections directly: it is not (yet, or
    /// any more) a participant — an offer, or an offer withdrawn.
    NotifyAgent {
        /// The agent.
        agent: Text,
        /// The conversation.
        session: Text,
        /// Offered, Declined (timed out), Abandoned or Closed.
        kind: Kind,
        /// Why.
        reason: Text,
    },
    /// `agent` is now a participant of `session` (subscribe it).
    AgentJoined {
        /// The conversation.
        session: Text,
        /// The agent.
        agent: Text,
    },
    /// `agent` is no longer a participant of `session` (unsubscribe it).
    AgentLeft {
        /// The conversation.
        session: Text,
        /// The agent.
        agent: Text,
    },
    /// An agent's presence, capacity or load changed: push `AGENT_STATUS` to supervisors.
    AgentStatus {
        /// The agent.
        agent: Text,
        /// Presence.
        presence: AgentPresence,
        /// Capacity.
        capacity: u16,
        /// Conversations assigned.
        load: u16,
    },
    /// Start a timer due at `at_ms`; give `timer` back to `handle_timer` when it fires.
    StartTimer {
        /// Due time, in milliseconds (same clock as `now_ms`).
        at_ms: u64,
        /// What to hand back.
        timer: TimerPayload,
    },
    /// Cancel a timer started earlier (it may already have fired: then do nothing).
    CancelTimer {
        /// Which.
        id: CsTimerId,
    },
}

/// Every count limit of a desk, with its default.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeskLimits {
    /// Open (not yet closed, abandoned or offline) conversations of the tenant.
    pub conversations_max: usize,
    /// Agents of the tenant (agents are kept once seen).
    pub agents_max: usize,
    /// Queues in a policy.
    pub queues_max: usize,
    /// Conversations waiting in one queue; arrivals, transfers and overflows past it are
    /// refused (overflow then gives the offline outcome). A conversation the desk already holds
    /// is always taken back (after a decline, a timeout or a lost agent), so a queue may pass
    /// this by the number of offers outstanding.
    pub queue_length_max: usize,
    /// Agents remembered per conversation as having declined it (not offered it again); the
    /// oldest is forgotten first.
    pub declined_agents_max: usize,
    /// Customers whose last agent is remembered (for affinity); the oldest is forgotten first.
    pub affinity_entries_max: usize,
    /// Waiting conversations per queue told their new position when it changes (the first
    /// ones); those behind learn it when they move into this window.
    pub position_updates_depth_max: usize,
    /// Variants in an A/B experiment.
    pub variants_max: usize,
    /// Longest `OPEN_CONVERSATION` context kept, in bytes (at most the protocol's
    /// `MESSAGE_BYTES_MAX`: it is shown to the agent in the offer's `reason`).
    pub context_bytes_max: usize,
}

impl Default for DeskLimits {
    fn default() -> DeskLimits {
        DeskLimits {
            conversations_max: 100_000,
            agents_max: 10_000,
            queues_max: 64,
            queue_length_max: 10_000,
            declined_agents_max: 8,
            affinity_entries_max: 100_000,
            position_updates_depth_max: 100,
            variants_max: 8,
            context_bytes_max: MESSAGE_BYTES_MAX,
        }
    }
}

/// A tenant's routing and queue policy (what the control plane sets).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DeskPolicy {
    /// Routing when there is no experiment (and for conversations whose group was removed).
    pub strategy: StrategyConfig,
    /// A/B variants; empty: no experiment.
    pub experiment: Vec<Variant>,
    /// The queues; the first is the default one.
    pub queues: Vec<QueuePolicy>,
    /// How long an agent has to answer an offer, in milliseconds.
    pub offer_timeout_ms: u64,
    /// How long a disconnected agent stays as it was before going offline, in milliseconds
    /// (0: at once).
    pub agent_grace_ms: u64,
    /// The handle time assumed before any is measured, in milliseconds.
    pub initial_handle_ms: u64,
    /// How long a customer whose last connection dropped keeps its waiting (queued or offered)
    /// conversations, and their places, before they are abandoned, in milliseconds (0: at
    /// once).
    pub customer_grace_ms: u64,
    /// The conversation state machine.
    pub transitions: Table,
}

impl Default for DeskPolicy {
    fn default() -> DeskPolicy {
        DeskPolicy {
            strategy: StrategyConfig::LeastLoad,
            experiment: Vec::new(),
            queues: vec![QueuePolicy::open("default")],
            offer_timeout_ms: 30_000,
            agent_grace_ms: 60_000,
            initial_handle_ms: 300_000,
            customer_grace_ms: 30_000,
            transitions: Table::standard(),
        }
    }
}

/// Per-A/B-group counters.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GroupCounts {
    /// Conversations opened in the group.
    pub opened: u64,
    /// Offers accepted.
    pub assigned: u64,
    /// Closed.
    pub closed: u64,
    /// Abandoned by the customer.
    pub abandoned: u64,
    /// Given the offline outcome.
    pub offline: u64,
}

/// Desk-wide counters, for metrics.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct DeskStats {
    /// Offers made.
    pub offers: u64,
    /// Offers that timed out.
    pub offer_timeouts: u64,
    /// Offers declined.
    pub declines: u64,
    /// Conversations moved to an overflow queue.
    pub overflows: u64,
    /// Timer firings that were no longer current (fired after being replaced or cancelled).
    pub stale_timers: u64,
    /// Times a strategy broke its contract (picked a non-candidate or nothing); the desk then
    /// used least-load.
    pub strategy_misses: u64,
}

/// What the engine and the tests may read about a conversation.
#[derive(Debug, Clone, Copy)]
pub struct ConversationView<'a> {
    /// The session id.
    pub session: &'a Text,
    /// The customer.
    pub customer: &'a Text,
    /// Its state.
    pub state: State,
    /// The agent it is offered or assigned to.
    pub agent: Option<&'a Text>,
    /// The agent's key.
    pub agent_key: Option<AgentKey>,
    /// The queue it waits in (or came from).
    pub queue: &'a Text,
    /// Its place in that queue (kept while offered, so a decline returns it there).
    pub queue_key: QueueKey,
    /// Priority.
    pub priority: u8,
    /// Skills asked for, sorted.
    pub skills: &'a [Text],
    /// A/B group (empty when none).
    pub group: &'a Text,
    /// Agents that declined it or let the offer expire (not offered it again).
    pub declined: &'a [AgentKey],
    /// When its current stay in its queue began (the max-wait clock), Unix milliseconds.
    pub queued_since_ms: u64,
    /// The context it was opened with (empty when none).
    pub context: &'a Text,
}

impl ConversationView<'_> {
    /// The facts [`super::access::check_conversation`] needs.
    pub fn facts<'t>(&'t self, tenant: &'t str) -> ConversationFacts<'t> {
        ConversationFacts { tenant, customer: self.customer, state: self.state, agent: self.agent }
    }
}

#[derive(Debug)]
struct Conversation {
    session: Text,
    customer: Text,
    priority: u8,
    skills: Vec<Text>,
    state: State,
    /// Offered-to or assigned agent.
    agent: Option<AgentKey>,
    queue: usize,
    key: QueueKey,
    /// When its current stay in `queue` began (the max-wait clock).
    stint_started_ms: u64,
    assigned_at_ms: u64,
    variant: Option<usize>,
    group: Text,
    declined: Vec<AgentKey>,
    offer_timer: Option<CsTimerId>,
    wait_timer: Option<CsTimerId>,
    /// The position it was last told (0: not told / not waiting).
    told_position: u32,
    /// `OPEN_CONVERSATION`'s context, shown to each agent it is offered to.
    context: Text,
}

/// Per-event details the conversation itself does not hold.
#[derive(Default)]
struct EventCtx {
    /// The agent before the transition (declined, closed, abandoned offers).
    prev_agent: Text,
    /// Transfer target agent.
    target_agent: Text,
    /// Transfer or overflow target queue (empty: offline outcome).
    target_queue: Text,
    reason: Text,
}

/// Which agents dispatch matches a conversation against.
#[derive(Clone, Copy)]
enum Pool {
    /// Every available agent.
    All,
    /// Only agents whose state changed since the last dispatch.
    Changed,
}

const REASON_DECLINED: Text = Text::from_static("declined");
const REASON_OFFER_TIMEOUT: Text = Text::from_static("offer timeout");
const REASON_AGENT_OFFLINE: Text = Text::from_static("agent offline");
const REASON_CUSTOMER_LEFT: Text = Text::from_static("customer left");
const REASON_MAX_WAIT: Text = Text::from_static("max wait");
const REASON_OVERFLOW_FULL: Text = Text::from_static("max wait; overflow queue full");
const REASON_OUT_OF_HOURS: Text = Text::from_static("out of hours");
const REASON_CUSTOMER_DISCONNECTED: Text = Text::from_static("customer disconnected");
const REASON_CUSTOMER_RECONNECTED: Text = Text::from_static("customer reconnected");

/// One tenant's desk. See the module comment.
#[derive(Debug)]
pub struct TenantDesk {
    limits: DeskLimits,
    policy: DeskPolicy,
    agents: AgentTable,
    queues: Vec<Queue>,
    conversations: HashMap<Text, Conversation>,
    /// The main strategy and the experiment's, in the desk's fast form.
    strategy: Router,
    variants: Vec<Router>,
    group_counts: Vec<GroupCounts>,
    /// Counts of conversations with no group (no experiment).
    ungrouped_counts: GroupCounts,
    affinity: HashMap<Text, AgentKey>,
    affinity_order: VecDeque<Text>,
    /// Arrival counter: queue keys.
    next_seq: u64,
    next_timer: u64,
    offer_seq: u64,
    now_ms: u64,
    stats: DeskStats,
    /// Dispatch work: everything must be re-matched (policy change).
    rescan_all: bool,
    /// Dispatch work: agents whose availability, capacity or skills changed.
    changed_agents: BTreeSet<AgentKey>,
    /// Dispatch work: conversations that (re-)entered a queue, with the queue.
    fresh: Vec<(QueueKey, usize)>,
    /// Routing scratch: the queue's and the conversation's skills as interned ids.
    queue_skill_ids: Vec<u32>,
    conv_skill_ids: Vec<u32>,
    /// Some agent's presence, connection, capacity or skills changed since the last recount.
    serving_dirty: bool,
    /// Agents whose presence, capacity or load changed during this call (`AGENT_STATUS` due).
    status_changed: BTreeSet<AgentKey>,
    /// Customers in their grace period (last connection gone), with the timer that ends it.
    /// At most one per customer with a waiting conversation, so bounded by `conversations_max`.
    customer_grace: HashMap<Text, CsTimerId>,
}

fn check_id(what: &'static str, id: &Text) -> Result<(), DeskError> {
    if id.is_empty() || id.len() > ID_BYTES_MAX {
        return Err(DeskError::bad_request(format!("{what} id must be 1..={ID_BYTES_MAX} bytes")));
    }
    Ok(())
}

fn check_message(what: &'static str, text: &Text) -> Result<(), DeskError> {
    if text.len() > MESSAGE_BYTES_MAX {
        return Err(DeskError::bad_request(format!("{what} longer than {MESSAGE_BYTES_MAX} bytes")));
    }
    Ok(())
}

/// Sorted, deduplicated, bounded, no empty names.
fn normalize_skills(skills: &[Text]) -> Result<Vec<Text>, DeskError> {
    if skills.len() > SKILLS_MAX {
        return Err(DeskError::bad_request(format!("more than {SKILLS_MAX} skills")));
    }
    if skills.iter().any(|s| s.is_empty() || s.len() > ID_BYTES_MAX) {
        return Err(DeskError::bad_request(format!("skill names must be 1..={ID_BYTES_MAX} bytes")));
    }
    let mut skills = skills.to_vec();
    skills.sort();
    skills.dedup();
    Ok(skills)
}

/// Checks a policy against the limits; the reason names the offending field.
fn validate_policy(policy: &DeskPolicy, limits: &DeskLimits) -> Result<Vec<QueuePolicy>, DeskError> {
    let bad = |reason: String| Err(DeskError::bad_request(reason));
    if policy.queues.is_empty() || policy.queues.len() > limits.queues_max {
        return bad(format!("queues: 1..={} queues required", limits.queues_max));
    }
    let mut queues = Vec::with_capacity(policy.queues.len());
    for (index, queue) in policy.queues.iter().enumerate() {
        check_id("queue", &queue.name)?;
        if policy.queues[..index].iter().any(|q| q.name == queue.name) {
            return bad(format!("queue `{}` defined twice", queue.name));
        }
        let mut queue = queue.clone();
        queue.skills = normalize_skills(&queue.skills)?;
        queues.push(queue);
    }
    for queue in &queues {
        if let Overflow::Queue(target) = &queue.overflow {
            if !queues.iter().any(|q| &q.name == target) {
                return bad(format!("queue `{}` overflows to unknown queue `{target}`", queue.name));
            }
        }
    }
    for queue in &queues {
        // Follow the overflow chain: it must end (a loop would send a customer round and
        // round, to the back of each queue every time).
        let mut current = queue;
        let mut ends = false;
        for _ in 0..=queues.len() {
            let next = match &current.overflow {
                Overflow::Queue(target) if current.wait_ms_max > 0 => queues.iter().find(|q| &q.name == target),
                _ => None,
            };
            if let Some(next) = next {
                current = next;
            } else {
                ends = true;
                break;
            }
        }
        if !ends {
            return bad(format!("queue `{}`: overflow chain loops", queue.name));
        }
    }
    policy.strategy.validate(limits.agents_max).map_err(DeskError::bad_request)?;
    if policy.experiment.len() > limits.variants_max {
        return bad(format!("experiment: at most {} variants", limits.variants_max));
    }
    for (index, variant) in policy.experiment.iter().enumerate() {
        check_id("group", &variant.group)?;
        if policy.experiment[..index].iter().any(|v| v.group == variant.group) {
            return bad(format!("group `{}` defined twice", variant.group));
        }
        variant
            .strategy
            .validate(limits.agents_max)
            .map_err(|e| DeskError::bad_request(format!("group `{}`: {e}", variant.group)))?;
    }
    if !policy.experiment.is_empty() && policy.experiment.iter().all(|v| v.weight == 0) {
        return bad("experiment: weights sum to 0".into());
    }
    if policy.offer_timeout_ms == 0 {
        return bad("offer_timeout_ms must be at least 1".into());
    }
    Ok(queues)
}

impl TenantDesk {
    /// A desk with no agents and no conversations, or the reason the policy is refused.
    pub fn new(limits: DeskLimits, policy: DeskPolicy) -> Result<TenantDesk, DeskError> {
        let queue_policies = validate_policy(&policy, &limits)?;
        let queues = queue_policies.into_iter().map(|q| Queue::new(q, policy.initial_handle_ms)).collect();
        Ok(TenantDesk {
            agents: AgentTable::new(limits.agents_max),
            queues,
            conversations: HashMap::new(),
            strategy: policy.strategy.router(),
            variants: policy.experiment.iter().map(|v| v.strategy.router()).collect(),
            group_counts: vec![GroupCounts::default(); policy.experiment.len()],
            ungrouped_counts: GroupCounts::default(),
            affinity: HashMap::new(),
            affinity_order: VecDeque::new(),
            next_seq: 1,
            next_timer: 1,
            offer_seq: 0,
            now_ms: 0,
            stats: DeskStats::default(),
            rescan_all: false,
            changed_agents: BTreeSet::new(),
            fresh: Vec::new(),
            queue_skill_ids: Vec::new(),
            conv_skill_ids: Vec::new(),
            serving_dirty: false,
            status_changed: BTreeSet::new(),
            customer_grace: HashMap::new(),
            limits,
            policy,
        })
    }

    // ----- reading -----------------------------------------------------------------------

    /// The policy in force.
    pub fn policy(&self) -> &DeskPolicy {
        &self.policy
    }

    /// The limits.
    pub fn limits(&self) -> &DeskLimits {
        &self.limits
    }

    /// Counters.
    pub fn stats(&self) -> DeskStats {
        self.stats
    }

    /// The agents.
    pub fn agents(&self) -> &AgentTable {
        &self.agents
    }

    /// The queues, default first.
    pub fn queues(&self) -> &[Queue] {
        &self.queues
    }

    /// Open conversations.
    pub fn conversations_len(&self) -> usize {
        self.conversations.len()
    }

    /// A conversation, if open.
    pub fn conversation(&self, session: &Text) -> Option<ConversationView<'_>> {
        self.conversations.get(session).map(|conv| self.view(conv))
    }

    /// Every open conversation, in no particular order.
    pub fn conversations(&self) -> impl Iterator<Item = ConversationView<'_>> {
        self.conversations.values().map(|conv| self.view(conv))
    }

    fn view<'a>(&'a self, conv: &'a Conversation) -> ConversationView<'a> {
        ConversationView {
            session: &conv.session,
            customer: &conv.customer,
            state: conv.state,
            agent: conv.agent.and_then(|key| self.agents.get(key)).map(Agent::id),
            agent_key: conv.agent,
            queue: self.queues[conv.queue].name(),
            queue_key: conv.key,
            priority: conv.priority,
            skills: &conv.skills,
            group: &conv.group,
            declined: &conv.declined,
            queued_since_ms: conv.stint_started_ms,
            context: &conv.context,
        }
    }

    /// A/B counters per group, in experiment order, then the ungrouped counters under "".
    pub fn group_counts(&self) -> Vec<(Text, GroupCounts)> {
        let mut counts: Vec<(Text, GroupCounts)> =
            self.policy.experiment.iter().zip(&self.group_counts).map(|(v, c)| (v.group.clone(), *c)).collect();
        counts.push((Text::new(), self.ungrouped_counts));
        counts
    }

    /// The agent who last served `customer`, if remembered.
    pub fn last_agent_of(&self, customer: &Text) -> Option<AgentKey> {
        self.affinity.get(customer).copied()
    }

    // ----- requests ----------------------------------------------------------------------

    /// A customer asks for an agent: the conversation is queued (and offered at once if an
    /// agent can take it), or gets the offline outcome out of business hours.
    pub fn open_conversation(
        &mut self,
        now_ms: u64,
        session: &Text,
        customer: &Text,
        priority: u8,
        skills: &[Text],
        effects: &mut Vec<Effect>,
    ) -> Result<(), DeskError> {
        self.open_conversation_with_context(now_ms, session, customer, priority, skills, &[], effects)
    }

    /// [`TenantDesk::open_conversation`] with `OPEN_CONVERSATION`'s context, kept on the
    /// conversation and shown to every agent it is offered to. It must be UTF-8 (it travels
    /// in a `message` field) and at most `context_bytes_max` bytes.
    #[allow(clippy::too_many_arguments)] // The frame's fields, plus now and the effects.
    pub fn open_conversation_with_context(
        &mut self,
        now_ms: u64,
        session: &Text,
        customer: &Text,
        priority: u8,
        skills: &[Text],
        context: &[u8],
        effects: &mut Vec<Effect>,
    ) -> Result<(), DeskError> {
        let now = self.clock(now_ms);
        check_id("session", session)?;
        check_id("customer", customer)?;
        let context_bytes_max = self.limits.context_bytes_max.min(MESSAGE_BYTES_MAX);
        if context.len() > context_bytes_max {
            return Err(DeskError::LimitExceeded { limit: "context_bytes_max", max: context_bytes_max });
        }
        let Ok(context) = std::str::from_utf8(context) else {
            return Err(DeskError::bad_request("context must be UTF-8 text (it is shown to the agent in the offer)"));
        };
        let skills = normalize_skills(skills)?;
        if self.conversations.contains_key(session) {
            return Err(DeskError::Conflict { reason: "conversation already open", id: session.clone() });
        }
        if self.conversations.len() >= self.limits.conversations_max {
            return Err(DeskError::LimitExceeded { limit: "conversations_max", max: self.limits.conversations_max });
        }
        let variant = variant_for(session, self.policy.experiment.iter().map(|v| v.weight));
        let group = variant.map(|i| self.policy.experiment[i].group.clone()).unwrap_or_default();
        let queue = self.queue_for(&skills);
        let open = match variant {
            Some(i) => self.variants[i].open_at(now),
            None => self.strategy.open_at(now),
        };
        let event = if open { Event::Enqueue } else { Event::OutOfHours };
        let transition = self.policy.transitions.step(State::New, event)?;
        if open && self.queues[queue].len() >= self.limits.queue_length_max {
            return Err(DeskError::LimitExceeded { limit: "queue_length_max", max: self.limits.queue_length_max });
        }
        let mut conv = Conversation {
            session: session.clone(),
            customer: customer.clone(),
            priority,
            skills,
            state: transition.to,
            agent: None,
            queue,
            key: QueueKey::new(priority, self.take_seq()),
            stint_started_ms: now,
            assigned_at_ms: 0,
            variant,
            group,
            declined: Vec::new(),
            offer_timer: None,
            wait_timer: None,
            told_position: 0,
            context: Text::from(context),
        };
        self.counts(variant).opened += 1;
        if open {
            self.enter_queue(now, &mut conv, effects);
            self.emit(&mut conv, transition, &EventCtx::default(), effects);
            self.conversations.insert(session.clone(), conv);
        } else {
            self.counts(variant).offline += 1;
            let ctx = EventCtx { reason: REASON_OUT_OF_HOURS, ..EventCtx::default() };
            self.emit(&mut conv, transition, &ctx, effects);
        }
        self.settle(now, effects);
        Ok(())
    }

    /// An agent reports presence, capacity and skills (`AGENT_STATUS` from its connection, so it
    /// is connected). Going offline sends its offers and conversations back to their queues.
    pub fn agent_status(
        &mut self,
        now_ms: u64,
        agent: &Text,
        presence: AgentPresence,
        capacity: u16,
        skills: &[Text],
        effects: &mut Vec<Effect>,
    ) -> Result<(), DeskError> {
        let now = self.clock(now_ms);
        check_id("agent", agent)?;
        let skills = normalize_skills(skills)?;
        if self.agents.key_of(agent).is_none() && !self.agents.has_room() {
            return Err(DeskError::LimitExceeded { limit: "agents_max", max: self.limits.agents_max });
        }
        let key = self.agents.insert(agent)?;
        if let Some(id) = self.agents.set_grace_timer(key, None) {
            effects.push(Effect::CancelTimer { id });
        }
        self.agents.set_status(key, presence, capacity, skills);
        self.agent_changed(key);
        self.serving_dirty = true;
        if presence == AgentPresence::Offline {
            self.agent_lost(now, key, effects);
        }
        self.status_changed.insert(key);
        self.settle(now, effects);
        Ok(())
    }

    /// An agent's connection dropped: it takes no new offers, and goes offline (its work
    /// re-queued) unless it reconnects within the grace period.
    pub fn agent_disconnected(&mut self, now_ms: u64, agent: &Text, effects: &mut Vec<Effect>) -> Result<(), DeskError> {
        let now = self.clock(now_ms);
        let key = self.agents.key_of(agent).ok_or_else(|| DeskError::not_found("agent", agent))?;
        let Some(state) = self.agents.get(key) else { return Err(DeskError::not_found("agent", agent)) };
        if !state.connected() {
            return Ok(());
        }
        let offline = state.presence() == AgentPresence::Offline;
        self.agents.set_connected(key, false);
        self.agent_changed(key);
        self.serving_dirty = true;
        if !offline {
            if self.policy.agent_grace_ms == 0 {
                self.go_offline(now, key, effects);
            } else {
                let at_ms = now.saturating_add(self.policy.agent_grace_ms);
                let id = self.start_timer(at_ms, TimerKind::AgentGrace { agent: agent.clone() }, effects);
                self.agents.set_grace_timer(key, Some(id));
            }
        }
        self.settle(now, effects);
        Ok(())
    }

    /// The agent answers an offer.
    pub fn offer_response(
        &mut self,
        now_ms: u64,
        session: &Text,
        agent: &Text,
        accept: bool,
        effects: &mut Vec<Effect>,
    ) -> Result<(), DeskError> {
        let now = self.clock(now_ms);
        let conv = self.conversations.get(session).ok_or_else(|| DeskError::not_found("conversation", session))?;
        let key = self.agents.key_of(agent).ok_or_else(|| DeskError::not_found("agent", agent))?;
        let event = if accept { Event::Accept } else { Event::Decline };
        let transition = self.policy.transitions.step(conv.state, event)?;
        if conv.agent != Some(key) {
            return Err(DeskError::Forbidden { reason: "the offer was made to another agent" });
        }
        let Some(mut conv) = self.conversations.remove(session) else {
            return Err(DeskError::not_found("conversation", session));
        };
        if accept {
            Self::cancel_timer(&mut conv.offer_timer, effects);
            self.agents.assign(key);
            conv.state = transition.to;
            conv.assigned_at_ms = now;
            self.counts(conv.variant).assigned += 1;
            self.remember_affinity(&conv.customer, key);
            self.emit(&mut conv, transition, &EventCtx::default(), effects);
            effects.push(Effect::AgentJoined { session: session.clone(), agent: agent.clone() });
            self.status_changed.insert(key);
            self.conversations.insert(session.clone(), conv);
        } else {
            self.stats.declines += 1;
            self.return_offer(now, conv, transition, REASON_DECLINED, effects);
        }
        self.settle(now, effects);
        Ok(())
    }

    /// Moves a conversation to another agent (offered to it: it must accept) or queue.
    pub fn transfer(
        &mut self,
        now_ms: u64,
        session: &Text,
        kind: TransferKind,
        target: &Text,
        note: &Text,
        effects: &mut Vec<Effect>,
    ) -> Result<(), DeskError> {
        let now = self.clock(now_ms);
        check_message("note", note)?;
        let conv = self.conversations.get(session).ok_or_else(|| DeskError::not_found("conversation", session))?;
        let event = match kind {
            TransferKind::Agent => Event::TransferToAgent,
            TransferKind::Queue => Event::TransferToQueue,
        };
        let transition = self.policy.transitions.step(conv.state, event)?;
        // Validate the target fully before touching anything.
        let target_agent = match kind {
            TransferKind::Agent => {
                let key = self.agents.key_of(target).ok_or_else(|| DeskError::not_found("agent", target))?;
                if conv.agent == Some(key) {
                    return Err(DeskError::bad_request("transfer to the agent already assigned"));
                }
                let Some(agent) = self.agents.get(key) else { return Err(DeskError::not_found("agent", target)) };
                if !agent.is_available() {
                    return Err(DeskError::Unavailable { reason: "not online, disconnected or at capacity", id: target.clone() });
                }
                Some(key)
            }
            TransferKind::Queue => None,
        };
        let target_queue = match kind {
            TransferKind::Queue => {
                let index = self.queue_index(target).ok_or_else(|| DeskError::not_found("queue", target))?;
                if conv.state == State::Queued && conv.queue == index {
                    return Err(DeskError::bad_request("the conversation already waits in that queue"));
                }
                if self.queues[index].len() >= self.limits.queue_length_max {
                    return Err(DeskError::LimitExceeded { limit: "queue_length_max", max: self.limits.queue_length_max });
                }
                Some(index)
            }
            TransferKind::Agent => None,
        };
        let Some(mut conv) = self.conversations.remove(session) else {
            return Err(DeskError::not_found("conversation", session));
        };
        let mut ctx = EventCtx { reason: note.clone(), target_agent: Text::new(), ..EventCtx::default() };
        self.leave_current_place(now, &mut conv, effects);
        if let Some(index) = target_queue {
            conv.queue = index;
            conv.key = QueueKey::new(conv.priority, self.take_seq());
            conv.declined.clear();
            conv.state = transition.to;
            ctx.target_queue = self.queues[index].name().clone();
            self.enter_queue(now, &mut conv, effects);
            self.emit(&mut conv, transition, &ctx, effects);
        } else if let Some(key) = target_agent {
            // If the target declines, the conversation waits in its queue, behind those already
            // waiting (unless it was waiting already: then it keeps its place).
            if conv.state != State::Queued {
                conv.key = QueueKey::new(conv.priority, self.take_seq());
                conv.stint_started_ms = now;
            }
            ctx.target_agent = target.clone();
            if !self.make_offer(now, &mut conv, key, transition, &ctx, effects) {
                // Checked available above and nothing ran since: cannot fail. Keep the
                // conversation rather than lose it.
                debug_assert!(false, "transfer target became unavailable");
                conv.state = State::Queued;
                self.enter_queue(now, &mut conv, effects);
            }
        }
        self.conversations.insert(session.clone(), conv);
        self.settle(now, effects);
        Ok(())
    }

    /// Closes a conversation (by its agent, its customer or a supervisor).
    pub fn close(&mut self, now_ms: u64, session: &Text, reason: &Text, effects: &mut Vec<Effect>) -> Result<(), DeskError> {
        let now = self.clock(now_ms);
        check_message("reason", reason)?;
        self.finish_conversation(now, session, Event::Close, reason.clone(), effects)
    }

    /// The customer left: abandoned while waiting (or offered), closed when active.
    pub fn customer_left(&mut self, now_ms: u64, session: &Text, effects: &mut Vec<Effect>) -> Result<(), DeskError> {
        let now = self.clock(now_ms);
        self.finish_conversation(now, session, Event::CustomerLeft, REASON_CUSTOMER_LEFT, effects)
    }

    /// A timer fired. A firing that is no longer current (replaced or cancelled) does nothing.
    pub fn handle_timer(&mut self, now_ms: u64, timer: &TimerPayload, effects: &mut Vec<Effect>) {
        let now = self.clock(now_ms);
        match &timer.kind {
            TimerKind::OfferTimeout { session } => {
                let current = self.conversations.get(session).is_some_and(|c| c.offer_timer == Some(timer.id));
                if !current {
                    self.stats.stale_timers += 1;
                    return;
                }
                let Some(mut conv) = self.conversations.remove(session) else { return };
                conv.offer_timer = None;
                match self.policy.transitions.step(conv.state, Event::OfferTimeout) {
                    Ok(transition) => {
                        self.stats.offer_timeouts += 1;
                        if let Some(agent) = conv.agent.and_then(|k| self.agents.get(k)) {
                            effects.push(Effect::NotifyAgent {
                                agent: agent.id().clone(),
                                session: session.clone(),
                                kind: Kind::Declined,
                                reason: REASON_OFFER_TIMEOUT,
                            });
                        }
                        self.return_offer(now, conv, transition, REASON_OFFER_TIMEOUT, effects);
                    }
                    Err(_) => {
                        self.conversations.insert(session.clone(), conv);
                    }
                }
            }
            TimerKind::MaxWait { session } => {
                let current = self.conversations.get(session).is_some_and(|c| c.wait_timer == Some(timer.id));
                if !current {
                    self.stats.stale_timers += 1;
                    return;
                }
                let Some(mut conv) = self.conversations.remove(session) else { return };
                conv.wait_timer = None;
                self.overflow(now, conv, effects);
            }
            TimerKind::AgentGrace { agent } => {
                let key = self.agents.key_of(agent);
                let current = key.and_then(|k| self.agents.get(k)).is_some_and(|a| a.grace_timer() == Some(timer.id));
                let Some(key) = key.filter(|_| current) else {
                    self.stats.stale_timers += 1;
                    return;
                };
                self.agents.set_grace_timer(key, None);
                self.go_offline(now, key, effects);
            }
            TimerKind::CustomerGrace { customer } => {
                if self.customer_grace.get(customer) != Some(&timer.id) {
                    self.stats.stale_timers += 1;
                    return;
                }
                self.customer_grace.remove(customer);
                self.abandon_waiting(now, customer, effects);
            }
            // Not the desk's (the engine hands it to the ticket book).
            TimerKind::TicketSla { .. } => return,
        }
        self.settle(now, effects);
    }

    /// The customer's last connection dropped: its waiting (queued or offered) conversations
    /// keep their places for the grace period, then are abandoned; queued ones are told their
    /// position again with the reason "customer disconnected". Active conversations stay (the
    /// customer may come back and resume them). Nothing happens when it has nothing waiting.
    pub fn customer_disconnected(&mut self, now_ms: u64, customer: &Text, effects: &mut Vec<Effect>) {
        let now = self.clock(now_ms);
        let waiting = self.conversations.values().any(|c| &c.customer == customer && matches!(c.state, State::Queued | State::Offered));
        if !waiting || self.customer_grace.contains_key(customer) {
            return;
        }
        if self.policy.customer_grace_ms == 0 {
            self.abandon_waiting(now, customer, effects);
            return;
        }
        let at_ms = now.saturating_add(self.policy.customer_grace_ms);
        let id = self.start_timer(at_ms, TimerKind::CustomerGrace { customer: customer.clone() }, effects);
        self.customer_grace.insert(customer.clone(), id);
        self.retell_queued(customer, &REASON_CUSTOMER_DISCONNECTED, effects);
    }

    /// The customer is back (a connection of its own opened, watched or published) within its
    /// grace period: its conversations keep their places, queued ones are told so (reason
    /// "customer reconnected"). Nothing happens outside a grace period.
    pub fn customer_reconnected(&mut self, now_ms: u64, customer: &Text, effects: &mut Vec<Effect>) {
        self.clock(now_ms);
        let Some(id) = self.customer_grace.remove(customer) else { return };
        effects.push(Effect::CancelTimer { id });
        self.retell_queued(customer, &REASON_CUSTOMER_RECONNECTED, effects);
    }

    /// True while `customer` is in its grace period.
    pub fn customer_in_grace(&self, customer: &Text) -> bool {
        self.customer_grace.contains_key(customer)
    }

    fn abandon_waiting(&mut self, now: u64, customer: &Text, effects: &mut Vec<Effect>) {
        let mut waiting: Vec<(QueueKey, Text)> = self
            .conversations
            .values()
            .filter(|c| &c.customer == customer && matches!(c.state, State::Queued | State::Offered))
            .map(|c| (c.key, c.session.clone()))
            .collect();
        // In queue order, so that the events are deterministic.
        waiting.sort();
        for (_, session) in waiting {
            // Refused only by a custom table without the rule: then it stays.
            let _ = self.finish_conversation(now, &session, Event::CustomerLeft, REASON_CUSTOMER_LEFT, effects);
        }
    }

    /// Tells the customer's queued conversations their position again, with `reason`.
    fn retell_queued(&mut self, customer: &Text, reason: &Text, effects: &mut Vec<Effect>) {
        let mut queued: Vec<(QueueKey, Text)> =
            self.conversations.values().filter(|c| &c.customer == customer && c.state == State::Queued).map(|c| (c.key, c.session.clone())).collect();
        queued.sort();
        for (key, session) in queued {
            let Some(conv) = self.conversations.get_mut(&session) else { continue };
            let queue = &self.queues[conv.queue];
            let position = queue.position(key).unwrap_or(0);
            conv.told_position = position;
            effects.push(Effect::Event {
                session,
                kind: Kind::Queued,
                agent: Text::new(),
                queue: queue.name().clone(),
                position,
                estimated_wait_ms: queue.estimated_wait_ms(position),
                group: conv.group.clone(),
                reason: reason.clone(),
            });
        }
    }

    /// Replaces the policy (strategy, weights, A/B split, queues, timeouts, state machine).
    /// Queues keep their waiting conversations and statistics by name; a queue may only be
    /// removed once nobody waits in it. Conversations keep their A/B group; a group removed
    /// from the experiment routes by the main strategy. Max-wait timers restart under the new
    /// limits, counted from when each conversation entered its queue.
    pub fn set_policy(&mut self, now_ms: u64, policy: DeskPolicy, effects: &mut Vec<Effect>) -> Result<(), DeskError> {
        let now = self.clock(now_ms);
        let queue_policies = validate_policy(&policy, &self.limits)?;
        for old in &self.queues {
            if !old.is_empty() && !queue_policies.iter().any(|q| q.name == *old.name()) {
                return Err(DeskError::bad_request(format!(
                    "queue `{}` still has {} waiting conversations",
                    old.name(),
                    old.len()
                )));
            }
        }
        // Queues: by name, carrying waiting conversations and statistics.
        let mut old_queues = std::mem::take(&mut self.queues);
        let mut remap = vec![0usize; old_queues.len()];
        for qp in queue_policies {
            let mut queue = Queue::new(qp.clone(), policy.initial_handle_ms);
            if let Some(old_index) = old_queues.iter().position(|q| *q.name() == qp.name) {
                let old = &mut old_queues[old_index];
                queue.carry_statistics_from(old);
                for (key, session) in old.take_waiting() {
                    queue.insert(key, session);
                }
                remap[old_index] = self.queues.len();
            }
            self.queues.push(queue);
        }
        // Groups: by name.
        let group_remap: Vec<Option<usize>> =
            self.policy.experiment.iter().map(|old| policy.experiment.iter().position(|new| new.group == old.group)).collect();
        let mut counts = vec![GroupCounts::default(); policy.experiment.len()];
        for (old, new) in group_remap.iter().enumerate() {
            if let Some(new) = new {
                counts[*new] = self.group_counts[old];
            }
        }
        self.group_counts = counts;
        self.strategy = policy.strategy.router();
        self.variants = policy.experiment.iter().map(|v| v.strategy.router()).collect();
        self.policy = policy;
        let sessions: Vec<Text> = self.conversations.keys().cloned().collect();
        for session in sessions {
            let Some(mut conv) = self.conversations.remove(&session) else { continue };
            conv.queue = remap.get(conv.queue).copied().unwrap_or(0);
            conv.variant = conv.variant.and_then(|v| group_remap.get(v).copied().flatten());
            if conv.state == State::Queued {
                Self::cancel_timer(&mut conv.wait_timer, effects);
                self.start_wait_timer(now, &mut conv, effects);
            }
            self.conversations.insert(session, conv);
        }
        self.recompute_serving_slots();
        for queue in &mut self.queues {
            queue.positions_dirty = true;
        }
        self.rescan_all = true;
        self.fresh.clear();
        self.settle(now, effects);
        Ok(())
    }

    // ----- checking ----------------------------------------------------------------------

    /// Checks every internal invariant; `Err` names the first one broken. O(agents +
    /// conversations): for tests and the simulation, not the hot path.
    pub fn check_invariants(&self) -> Result<(), String> {
        let mut reserved = vec![0u16; self.agents.len()];
        let mut load = vec![0u16; self.agents.len()];
        let mut waiting = 0usize;
        for (session, conv) in &self.conversations {
            if *session != conv.session || conv.state.is_terminal() || conv.state == State::New {
                return Err(format!("conversation {session} stored in state {:?}", conv.state));
            }
            let queue = self.queues.get(conv.queue).ok_or_else(|| format!("{session}: queue index {}", conv.queue))?;
            let in_queue = queue.position(conv.key).is_some();
            match conv.state {
                State::Queued => {
                    waiting += 1;
                    if !in_queue || conv.agent.is_some() || conv.offer_timer.is_some() {
                        return Err(format!("{session}: queued but in_queue={in_queue} agent={:?}", conv.agent));
                    }
                    if (queue.policy().wait_ms_max > 0) != conv.wait_timer.is_some() {
                        return Err(format!("{session}: queued with wait timer {:?}", conv.wait_timer));
                    }
                }
                State::Offered | State::Active => {
                    let agent = conv.agent.ok_or_else(|| format!("{session}: {:?} without agent", conv.state))?;
                    let index = agent.0 as usize;
                    if index >= self.agents.len() || in_queue || conv.wait_timer.is_some() {
                        return Err(format!("{session}: {:?} but in_queue={in_queue}", conv.state));
                    }
                    if conv.state == State::Offered {
                        reserved[index] += 1;
                        if conv.offer_timer.is_none() {
                            return Err(format!("{session}: offered without offer timer"));
                        }
                    } else {
                        load[index] += 1;
                        if conv.offer_timer.is_some() {
                            return Err(format!("{session}: active with an offer timer"));
                        }
                    }
                    let holder = self.agents.get(agent).is_some_and(|a| a.sessions().contains(session));
                    if !holder {
                        return Err(format!("{session}: agent does not list it"));
                    }
                }
                _ => {}
            }
        }
        let queued_total: usize = self.queues.iter().map(Queue::len).sum();
        if queued_total != waiting {
            return Err(format!("queues hold {queued_total}, {waiting} conversations are queued"));
        }
        let mut available = 0;
        for (key, agent) in self.agents.iter() {
            let index = key.0 as usize;
            if agent.reserved() != reserved[index] || agent.load() != load[index] {
                return Err(format!(
                    "agent {}: reserved {} load {}, conversations say {} and {}",
                    agent.id(),
                    agent.reserved(),
                    agent.load(),
                    reserved[index],
                    load[index]
                ));
            }
            if agent.sessions().len() != usize::from(reserved[index]) + usize::from(load[index]) {
                return Err(format!("agent {}: lists {} sessions", agent.id(), agent.sessions().len()));
            }
            available += usize::from(agent.is_available());
        }
        if available != self.agents.available_len() {
            return Err(format!("available set {} != {available}", self.agents.available_len()));
        }
        self.agents.check_indexes()?;
        if self.conversations.len() > self.limits.conversations_max {
            return Err("conversations_max exceeded".into());
        }
        Ok(())
    }

    // ----- internals ---------------------------------------------------------------------

    fn clock(&mut self, now_ms: u64) -> u64 {
        self.now_ms = self.now_ms.max(now_ms);
        self.now_ms
    }

    fn take_seq(&mut self) -> u64 {
        let seq = self.next_seq;
        self.next_seq += 1;
        seq
    }

    fn counts(&mut self, variant: Option<usize>) -> &mut GroupCounts {
        match variant.and_then(|v| self.group_counts.get_mut(v)) {
            Some(counts) => counts,
            None => &mut self.ungrouped_counts,
        }
    }

    fn queue_index(&self, name: &Text) -> Option<usize> {
        self.queues.iter().position(|q| q.name() == name)
    }

    /// The queue whose skills the conversation asks for, the most specific first (ties: policy
    /// order); the default queue when no skilled queue matches.
    fn queue_for(&self, skills: &[Text]) -> usize {
        let mut best = (0usize, 0usize);
        for (index, queue) in self.queues.iter().enumerate() {
            let need = &queue.policy().skills;
            if !need.is_empty() && need.len() > best.1 && super::agents::has_all(skills, need) {
                best = (index, need.len());
            }
        }
        best.0
    }

    fn take_timer_id(&mut self) -> CsTimerId {
        let id = CsTimerId(self.next_timer);
        self.next_timer += 1;
        id
    }

    fn start_timer(&mut self, at_ms: u64, kind: TimerKind, effects: &mut Vec<Effect>) -> CsTimerId {
        let id = self.take_timer_id();
        effects.push(Effect::StartTimer { at_ms, timer: TimerPayload { id, kind } });
        id
    }

    fn cancel_timer(slot: &mut Option<CsTimerId>, effects: &mut Vec<Effect>) {
        if let Some(id) = slot.take() {
            effects.push(Effect::CancelTimer { id });
        }
    }

    /// Starts the max-wait timer for the current stay in its queue (if the queue has a limit).
    /// Due at the stay's start plus the limit, or now if that has passed.
    fn start_wait_timer(&mut self, now: u64, conv: &mut Conversation, effects: &mut Vec<Effect>) {
        let wait_ms_max = self.queues[conv.queue].policy().wait_ms_max;
        if wait_ms_max > 0 {
            let at_ms = conv.stint_started_ms.saturating_add(wait_ms_max).max(now);
            conv.wait_timer = Some(self.start_timer(at_ms, TimerKind::MaxWait { session: conv.session.clone() }, effects));
        }
    }

    /// Puts a conversation (state already Queued) in its queue at its key, for dispatch to see.
    fn enter_queue(&mut self, now: u64, conv: &mut Conversation, effects: &mut Vec<Effect>) {
        conv.agent = None;
        conv.told_position = 0;
        self.queues[conv.queue].insert(conv.key, conv.session.clone());
        self.fresh.push((conv.key, conv.queue));
        self.start_wait_timer(now, conv, effects);
    }

    /// Takes a conversation out of wherever it is (queue, offer, assignment), releasing what it
    /// holds. The state is left to the caller.
    fn leave_current_place(&mut self, now: u64, conv: &mut Conversation, effects: &mut Vec<Effect>) {
        match conv.state {
            State::Queued => {
                self.queues[conv.queue].remove(conv.key);
                Self::cancel_timer(&mut conv.wait_timer, effects);
            }
            State::Offered => {
                Self::cancel_timer(&mut conv.offer_timer, effects);
                if let Some(key) = conv.agent.take() {
                    self.agents.release_offer(key, &conv.session);
                    self.agent_changed(key);
                }
            }
            State::Active => {
                if let Some(key) = conv.agent.take() {
                    let handle_ms = now.saturating_sub(conv.assigned_at_ms);
                    self.queues[conv.queue].record_handle_time(handle_ms);
                    self.agents.unassign(key, &conv.session);
                    self.agent_changed(key);
                    if let Some(agent) = self.agents.get(key) {
                        effects.push(Effect::AgentLeft { session: conv.session.clone(), agent: agent.id().clone() });
                    }
                    self.status_changed.insert(key);
                }
            }
            _ => {}
        }
    }

    /// Offers `conv` to `agent` through `transition` (Offer or a transfer). False (nothing
    /// changed) when the agent cannot take it.
    fn make_offer(
        &mut self,
        now: u64,
        conv: &mut Conversation,
        agent: AgentKey,
        transition: Transition,
        ctx: &EventCtx,
        effects: &mut Vec<Effect>,
    ) -> bool {
        self.offer_seq += 1;
        if !self.agents.reserve(agent, &conv.session, self.offer_seq) {
            return false;
        }
        if conv.state == State::Queued {
            self.queues[conv.queue].remove(conv.key);
            Self::cancel_timer(&mut conv.wait_timer, effects);
        }
        self.stats.offers += 1;
        conv.state = transition.to;
        conv.agent = Some(agent);
        conv.told_position = 0;
        let at_ms = now.saturating_add(self.policy.offer_timeout_ms);
        conv.offer_timer = Some(self.start_timer(at_ms, TimerKind::OfferTimeout { session: conv.session.clone() }, effects));
        self.emit(conv, transition, ctx, effects);
        let agent_id = self.agents.get(agent).map(|a| a.id().clone()).unwrap_or_default();
        // The agent sees the transfer note of a transfer that has one, else the context.
        let reason = if ctx.reason.is_empty() { conv.context.clone() } else { ctx.reason.clone() };
        effects.push(Effect::NotifyAgent { agent: agent_id, session: conv.session.clone(), kind: Kind::Offered, reason });
        true
    }

    /// An offer ended without acceptance (decline, timeout, agent lost): back to its place in
    /// its queue; the agent is not offered it again.
    fn return_offer(
        &mut self,
        now: u64,
        mut conv: Conversation,
        transition: Transition,
        reason: Text,
        effects: &mut Vec<Effect>,
    ) {
        let prev = conv.agent;
        let prev_agent = prev.and_then(|k| self.agents.get(k)).map(|a| a.id().clone()).unwrap_or_default();
        self.leave_current_place(now, &mut conv, effects);
        if let Some(key) = prev {
            if conv.declined.len() >= self.limits.declined_agents_max && !conv.declined.is_empty() {
                conv.declined.remove(0);
            }
            if self.limits.declined_agents_max > 0 && !conv.declined.contains(&key) {
                conv.declined.push(key);
            }
        }
        conv.state = transition.to;
        self.enter_queue(now, &mut conv, effects);
        let ctx = EventCtx { prev_agent, reason, ..EventCtx::default() };
        self.emit(&mut conv, transition, &ctx, effects);
        self.conversations.insert(conv.session.clone(), conv);
    }

    /// Close or customer-left: ends the conversation.
    fn finish_conversation(
        &mut self,
        now: u64,
        session: &Text,
        event: Event,
        reason: Text,
        effects: &mut Vec<Effect>,
    ) -> Result<(), DeskError> {
        let conv = self.conversations.get(session).ok_or_else(|| DeskError::not_found("conversation", session))?;
        let transition = self.policy.transitions.step(conv.state, event)?;
        let Some(mut conv) = self.conversations.remove(session) else {
            return Err(DeskError::not_found("conversation", session));
        };
        let was = conv.state;
        let prev_agent = conv.agent.and_then(|k| self.agents.get(k)).map(|a| a.id().clone()).unwrap_or_default();
        self.leave_current_place(now, &mut conv, effects);
        conv.state = transition.to;
        if was == State::Offered && !prev_agent.is_empty() {
            let kind = transition.emits.first().copied().unwrap_or(Kind::Closed);
            effects.push(Effect::NotifyAgent {
                agent: prev_agent.clone(),
                session: session.clone(),
                kind,
                reason: reason.clone(),
            });
        }
        match transition.to {
            State::Abandoned => self.counts(conv.variant).abandoned += 1,
            _ => self.counts(conv.variant).closed += 1,
        }
        let ctx = EventCtx { prev_agent, reason, ..EventCtx::default() };
        self.emit(&mut conv, transition, &ctx, effects);
        self.settle(now, effects);
        Ok(())
    }

    /// Max wait reached: to the overflow queue, or the offline outcome.
    fn overflow(&mut self, now: u64, mut conv: Conversation, effects: &mut Vec<Effect>) {
        let target = match &self.queues[conv.queue].policy().overflow {
            Overflow::Queue(name) => self.queue_index(name),
            Overflow::Offline => None,
        };
        let room = target.filter(|&t| self.queues[t].len() < self.limits.queue_length_max);
        let event = if room.is_some() { Event::Overflow } else { Event::OverflowOffline };
        let Ok(transition) = self.policy.transitions.step(conv.state, event) else {
            // Not waiting (cannot happen: the timer is cancelled when it leaves the queue).
            self.conversations.insert(conv.session.clone(), conv);
            return;
        };
        self.leave_current_place(now, &mut conv, effects);
        conv.state = transition.to;
        if let Some(index) = room {
            self.stats.overflows += 1;
            conv.queue = index;
            conv.key = QueueKey::new(conv.priority, self.take_seq());
            conv.stint_started_ms = now;
            conv.declined.clear();
            let ctx =
                EventCtx { target_queue: self.queues[index].name().clone(), reason: REASON_MAX_WAIT, ..EventCtx::default() };
            self.enter_queue(now, &mut conv, effects);
            self.emit(&mut conv, transition, &ctx, effects);
            self.conversations.insert(conv.session.clone(), conv);
        } else {
            self.counts(conv.variant).offline += 1;
            let reason = if target.is_some() { REASON_OVERFLOW_FULL } else { REASON_MAX_WAIT };
            let ctx = EventCtx { reason, ..EventCtx::default() };
            self.emit(&mut conv, transition, &ctx, effects);
        }
    }

    fn go_offline(&mut self, now: u64, key: AgentKey, effects: &mut Vec<Effect>) {
        self.agents.set_presence(key, AgentPresence::Offline);
        self.agent_changed(key);
        self.serving_dirty = true;
        self.agent_lost(now, key, effects);
        self.status_changed.insert(key);
    }

    /// The agent is gone: its offers and conversations go back to their queues.
    fn agent_lost(&mut self, now: u64, key: AgentKey, effects: &mut Vec<Effect>) {
        let sessions: Vec<Text> = self.agents.get(key).map(|a| a.sessions().to_vec()).unwrap_or_default();
        for session in sessions {
            let Some(mut conv) = self.conversations.remove(&session) else { continue };
            let Ok(transition) = self.policy.transitions.step(conv.state, Event::AgentLost) else {
                self.conversations.insert(session, conv);
                continue;
            };
            if conv.state == State::Offered {
                self.return_offer(now, conv, transition, REASON_AGENT_OFFLINE, effects);
            } else {
                self.leave_current_place(now, &mut conv, effects);
                conv.state = transition.to;
                conv.stint_started_ms = now;
                self.enter_queue(now, &mut conv, effects);
                let ctx = EventCtx {
                    target_queue: self.queues[conv.queue].name().clone(),
                    reason: REASON_AGENT_OFFLINE,
                    ..EventCtx::default()
                };
                self.emit(&mut conv, transition, &ctx, effects);
                self.conversations.insert(session, conv);
            }
        }
    }

    fn remember_affinity(&mut self, customer: &Text, agent: AgentKey) {
        if self.limits.affinity_entries_max == 0 {
            return;
        }
        if self.affinity.insert(customer.clone(), agent).is_none() {
            self.affinity_order.push_back(customer.clone());
            while self.affinity_order.len() > self.limits.affinity_entries_max {
                if let Some(oldest) = self.affinity_order.pop_front() {
                    self.affinity.remove(&oldest);
                }
            }
        }
    }

    /// An agent's availability or spare capacity may have grown: dispatch must re-match it.
    fn agent_changed(&mut self, key: AgentKey) {
        self.changed_agents.insert(key);
    }

    /// Serving slots change only with presence, connection, capacity or skills (not load), so
    /// this O(agents × queues) recount runs after status changes only.
    fn recompute_serving_slots(&mut self) {
        for queue in &mut self.queues {
            let skills = &queue.policy().skills;
            let slots: u64 = self
                .agents
                .iter()
                .filter(|(_, a)| a.is_serving() && a.has_skills(skills))
                .map(|(_, a)| u64::from(a.capacity()))
                .sum();
            queue.set_serving_slots(slots);
        }
        self.serving_dirty = false;
    }

    fn push_agent_status(&self, key: AgentKey, effects: &mut Vec<Effect>) {
        if let Some(agent) = self.agents.get(key) {
            effects.push(Effect::AgentStatus {
                agent: agent.id().clone(),
                presence: agent.presence(),
                capacity: agent.capacity(),
                load: agent.load(),
            });
        }
    }

    /// Pushes the events of `transition` for `conv` (in its state after the transition).
    fn emit(&mut self, conv: &mut Conversation, transition: Transition, ctx: &EventCtx, effects: &mut Vec<Effect>) {
        let queue_name = self.queues[conv.queue].name().clone();
        let agent_name = conv.agent.and_then(|k| self.agents.get(k)).map(|a| a.id().clone()).unwrap_or_default();
        for &kind in transition.emits {
            let (mut agent, mut queue, mut position, mut estimated_wait_ms, mut reason) =
                (Text::new(), Text::new(), 0, 0, Text::new());
            match kind {
                Kind::Queued => {
                    queue = queue_name.clone();
                    let q = &self.queues[conv.queue];
                    position = q.position(conv.key).unwrap_or(0);
                    estimated_wait_ms = q.estimated_wait_ms(position);
                    conv.told_position = position;
                }
                Kind::Offered | Kind::Accepted | Kind::Assigned => {
                    agent = agent_name.clone();
                    queue = queue_name.clone();
                }
                Kind::Declined => {
                    agent = ctx.prev_agent.clone();
                    reason = ctx.reason.clone();
                }
                Kind::Transferred => {
                    agent = ctx.target_agent.clone();
                    queue = ctx.target_queue.clone();
                    reason = ctx.reason.clone();
                }
                Kind::Closed | Kind::Abandoned => {
                    agent = ctx.prev_agent.clone();
                    queue = queue_name.clone();
                    reason = ctx.reason.clone();
                }
                Kind::Overflowed => {
                    queue = ctx.target_queue.clone();
                    reason = ctx.reason.clone();
                }
            }
            effects.push(Effect::Event {
                session: conv.session.clone(),
                kind,
                agent,
                queue,
                position,
                estimated_wait_ms,
                group: conv.group.clone(),
                reason,
            });
        }
    }

    /// End of every call: route, then tell waiting customers their new positions.
    fn settle(&mut self, now: u64, effects: &mut Vec<Effect>) {
        if self.serving_dirty {
            self.recompute_serving_slots();
        }
        self.dispatch(now, effects);
        self.refresh_positions(effects);
        // Last, once per agent: the status after everything this call did.
        for key in std::mem::take(&mut self.status_changed) {
            self.push_agent_status(key, effects);
        }
    }

    /// The waiting conversation with the smallest key after `after`, across queues.
    fn next_waiting(&self, after: Option<QueueKey>) -> Option<(QueueKey, usize)> {
        let mut best: Option<(QueueKey, usize)> = None;
        for (index, queue) in self.queues.iter().enumerate() {
            let next = match after {
                None => queue.head().map(|(k, _)| k),
                Some(after) => queue.first_after(after),
            };
            if let Some(key) = next {
                if best.is_none_or(|(b, _)| key < b) {
                    best = Some((key, index));
                }
            }
        }
        best
    }

    /// Offers waiting conversations to agents until no waiting conversation has a candidate.
    /// See the module comment for the order and the invariant.
    fn dispatch(&mut self, now: u64, effects: &mut Vec<Effect>) {
        let rescan_all = std::mem::take(&mut self.rescan_all);
        let changed: Vec<AgentKey> = std::mem::take(&mut self.changed_agents).into_iter().collect();
        let mut fresh = std::mem::take(&mut self.fresh);
        if self.agents.available_len() == 0 {
            return;
        }
        fresh.sort_unstable();
        fresh.dedup();
        let mut fresh = fresh.into_iter().peekable();
        let mut cursor: Option<QueueKey> = None;
        loop {
            if self.agents.available_len() == 0 {
                break;
            }
            let old_pool_live = rescan_all || changed.iter().any(|&k| self.agents.get(k).is_some_and(Agent::is_available));
            // Skip old conversations when no changed agent is left to try them against.
            let next = if old_pool_live {
                self.next_waiting(cursor)
            } else {
                loop {
                    match fresh.next() {
                        None => break None,
                        Some((key, queue)) => {
                            if cursor.is_none_or(|c| key > c) && self.queues.get(queue).is_some_and(|q| q.position(key).is_some())
                            {
                                break Some((key, queue));
                            }
                        }
                    }
                }
            };
            let Some((key, queue)) = next else { break };
            cursor = Some(key);
            let mut is_fresh = !old_pool_live;
            while let Some(&(k, _)) = fresh.peek() {
                if k > key {
                    break;
                }
                is_fresh |= k == key;
                fresh.next();
            }
            let pool = if rescan_all || is_fresh { Pool::All } else { Pool::Changed };
            let Some(session) = self.queues[queue].session_at(key).cloned() else { continue };
            let Some(mut conv) = self.conversations.remove(&session) else { continue };
            if conv.state == State::Queued {
                if let Some(agent) = self.route(now, &conv, pool, &changed) {
                    if let Ok(transition) = self.policy.transitions.step(conv.state, Event::Offer) {
                        self.make_offer(now, &mut conv, agent, transition, &EventCtx::default(), effects);
                    }
                }
            }
            self.conversations.insert(session, conv);
        }
    }

    /// The candidate the conversation's strategy picks, if any: the desk's checks (available,
    /// the queue's skills, not declined, in `pool`) and the strategy's, answered by
    /// [`Router::route`] from the agent table's indexes (see there for the cost per strategy).
    fn route(&mut self, _now: u64, conv: &Conversation, pool: Pool, changed: &[AgentKey]) -> Option<AgentKey> {
        let TenantDesk { agents, queues, strategy, variants, affinity, queue_skill_ids, conv_skill_ids, .. } = self;
        let router: &mut Router = match conv.variant.filter(|&v| v < variants.len()) {
            Some(v) => &mut variants[v],
            None => strategy,
        };
        if !agents.resolve_skills(&queues[conv.queue].policy().skills, queue_skill_ids) {
            // The queue needs a skill no agent ever had.
            return None;
        }
        let conv_known = agents.resolve_skills(&conv.skills, conv_skill_ids);
        let query = RouteQuery {
            table: agents,
            queue_skills: queue_skill_ids,
            conv_skills: conv_known.then_some(conv_skill_ids.as_slice()),
            declined: &conv.declined,
            pool: match pool {
                Pool::All => None,
                Pool::Changed => Some(changed),
            },
            last_agent: affinity.get(&conv.customer).copied(),
        };
        let chosen = router.route(&query);
        debug_assert!(
            chosen.is_none_or(|key| agents.get(key).is_some_and(Agent::is_available)),
            "routing chose an agent that cannot take work"
        );
        chosen
    }

    /// Tells waiting customers (in the first `position_updates_depth_max` places) their new
    /// position when it changed.
    fn refresh_positions(&mut self, effects: &mut Vec<Effect>) {
        let depth = self.limits.position_updates_depth_max;
        for index in 0..self.queues.len() {
            if !self.queues[index].positions_dirty {
                continue;
            }
            self.queues[index].positions_dirty = false;
            let queue = &self.queues[index];
            for (offset, (_, session)) in queue.iter().take(depth).enumerate() {
                let position = offset as u32 + 1;
                let Some(conv) = self.conversations.get_mut(session) else { continue };
                if conv.told_position == position {
                    continue;
                }
                conv.told_position = position;
                effects.push(Effect::Event {
                    session: session.clone(),
                    kind: Kind::Queued,
                    agent: Text::new(),
                    queue: queue.name().clone(),
                    position,
                    estimated_wait_ms: queue.estimated_wait_ms(position),
                    group: conv.group.clone(),
                    reason: Text::new(),
                });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use switchboard_protocol::ErrorCode;

    use super::*;
    use crate::cs::routing::{BusinessHours, OpenRange};

    const T0: u64 = 1_704_103_200_000; // Monday 2024-01-01 10:00 UTC

    fn t(s: &str) -> Text {
        Text::from(s)
    }

    fn desk_with(policy: DeskPolicy) -> TenantDesk {
        TenantDesk::new(DeskLimits::default(), policy).unwrap()
    }

    fn desk_with_limits(limits: DeskLimits) -> TenantDesk {
        TenantDesk::new(limits, DeskPolicy::default()).unwrap()
    }

    fn desk() -> TenantDesk {
        desk_with(DeskPolicy::default())
    }

    /// The conversation events in `fx`, as (session, kind, agent).
    fn events(fx: &[Effect]) -> Vec<(String, Kind, String)> {
        fx.iter()
            .filter_map(|e| match e {
                Effect::Event { session, kind, agent, .. } => Some((session.to_string(), *kind, agent.to_string())),
                _ => None,
            })
            .collect()
    }

    fn kinds(fx: &[Effect]) -> Vec<Kind> {
        events(fx).into_iter().map(|(_, k, _)| k).collect()
    }

    fn timer(fx: &[Effect], want: fn(&TimerKind) -> bool) -> (u64, TimerPayload) {
        fx.iter()
            .rev()
            .find_map(|e| match e {
                Effect::StartTimer { at_ms, timer } if want(&timer.kind) => Some((*at_ms, timer.clone())),
                _ => None,
            })
            .expect("timer started")
    }

    fn online(desk: &mut TenantDesk, now: u64, agent: &str, capacity: u16, skills: &[&str]) -> Vec<Effect> {
        let skills: Vec<Text> = skills.iter().map(|s| t(s)).collect();
        let mut fx = Vec::new();
        desk.agent_status(now, &t(agent), AgentPresence::Online, capacity, &skills, &mut fx).unwrap();
        desk.check_invariants().unwrap();
        fx
    }

    fn open(desk: &mut TenantDesk, now: u64, session: &str, priority: u8) -> Vec<Effect> {
        let mut fx = Vec::new();
        desk.open_conversation(now, &t(session), &t(&format!("cust-{session}")), priority, &[], &mut fx).unwrap();
        desk.check_invariants().unwrap();
        fx
    }

    fn respond(desk: &mut TenantDesk, now: u64, session: &str, agent: &str, accept: bool) -> Result<Vec<Effect>, DeskError> {
        let mut fx = Vec::new();
        desk.offer_response(now, &t(session), &t(agent), accept, &mut fx)?;
        desk.check_invariants().unwrap();
        Ok(fx)
    }

    #[test]
    fn happy_path_queued_offered_assigned_closed() {
        let mut desk = desk();
        let fx = open(&mut desk, T0, "s1", 0);
        assert_eq!(events(&fx), vec![("s1".into(), Kind::Queued, String::new())]);
        let Effect::Event { position, estimated_wait_ms, queue, .. } = &fx[fx.len() - 1] else { panic!("{fx:?}") };
        assert_eq!((*position, queue.as_str()), (1, "default"));
        assert_eq!(*estimated_wait_ms, 300_000, "initial handle time, no agents");

        let fx = online(&mut desk, T0 + 1, "ann", 2, &[]);
        assert_eq!(events(&fx), vec![("s1".into(), Kind::Offered, "ann".into())]);
        assert!(fx.contains(&Effect::NotifyAgent {
            agent: t("ann"),
            session: t("s1"),
            kind: Kind::Offered,
            reason: Text::new()
        }));

        let fx = respond(&mut desk, T0 + 2, "s1", "ann", true).unwrap();
        assert_eq!(kinds(&fx), vec![Kind::Accepted, Kind::Assigned]);
        assert!(fx.iter().any(|e| matches!(e, Effect::CancelTimer { .. })), "offer timer cancelled");
        assert!(fx.contains(&Effect::AgentJoined { session: t("s1"), agent: t("ann") }));
        assert_eq!(desk.agents().get(AgentKey(0)).unwrap().load(), 1);

        let mut fx = Vec::new();
        desk.close(T0 + 60_002, &t("s1"), &t("resolved"), &mut fx).unwrap();
        assert_eq!(events(&fx), vec![("s1".into(), Kind::Closed, "ann".into())]);
        assert!(fx.contains(&Effect::AgentLeft { session: t("s1"), agent: t("ann") }));
        assert_eq!(desk.conversations_len(), 0);
        assert_eq!(desk.queues()[0].handle_samples(), 1);
        assert_eq!(desk.queues()[0].ewma_handle_ms(), (7 * 300_000 + 60_000) / 8);
        desk.check_invariants().unwrap();
    }

    #[test]
    fn never_offers_past_capacity_and_fifo_when_capacity_frees() {
        let mut desk = desk();
        online(&mut desk, T0, "ann", 1, &[]);
        open(&mut desk, T0 + 1, "a", 0);
        open(&mut desk, T0 + 2, "b", 0);
        let fx = open(&mut desk, T0 + 3, "c", 0);
        assert_eq!(kinds(&fx), vec![Kind::Queued], "ann holds one offer already");
        assert_eq!(desk.conversation(&t("c")).unwrap().state, State::Queued);
        respond(&mut desk, T0 + 4, "a", "ann", true).unwrap();
        let mut fx = Vec::new();
        desk.close(T0 + 5, &t("a"), &Text::new(), &mut fx).unwrap();
        // b (waiting longest) is offered, c moves up to position 1.
        let evs = events(&fx);
        assert!(evs.contains(&("b".into(), Kind::Offered, "ann".into())), "{evs:?}");
        assert!(evs.contains(&("c".into(), Kind::Queued, String::new())));
        assert_eq!(desk.conversation(&t("c")).unwrap().state, State::Queued);
        desk.check_invariants().unwrap();
    }

    #[test]
    fn priority_beats_arrival() {
        let mut desk = desk();
        open(&mut desk, T0, "low", 0);
        open(&mut desk, T0 + 1, "high", 9);
        let fx = online(&mut desk, T0 + 2, "ann", 1, &[]);
        assert_eq!(events(&fx)[0], ("high".into(), Kind::Offered, "ann".into()));
    }

    #[test]
    fn decline_requeues_in_place_and_routes_to_someone_else() {
        let mut desk = desk();
        online(&mut desk, T0, "ann", 1, &[]);
        open(&mut desk, T0 + 1, "s1", 0);
        open(&mut desk, T0 + 2, "s2", 0);
        let fx = respond(&mut desk, T0 + 3, "s1", "ann", false).unwrap();
        // s1 goes back in front of s2; ann is not offered s1 again, so s2 goes to ann.
        assert_eq!(
            events(&fx),
            vec![
                ("s1".into(), Kind::Declined, "ann".into()),
                ("s1".into(), Kind::Queued, String::new()),
                ("s2".into(), Kind::Offered, "ann".into()),
            ]
        );
        assert_eq!(desk.conversation(&t("s1")).unwrap().declined, &[AgentKey(0)]);
        let fx = online(&mut desk, T0 + 4, "bob", 1, &[]);
        assert_eq!(events(&fx), vec![("s1".into(), Kind::Offered, "bob".into())]);
    }

    #[test]
    fn offer_timeout_requeues_and_stale_timers_do_nothing() {
        let mut desk = desk();
        let fx = online(&mut desk, T0, "ann", 1, &[]);
        assert!(fx.iter().all(|e| !matches!(e, Effect::StartTimer { .. })));
        let fx = open(&mut desk, T0, "s1", 0);
        let (at, offer) = timer(&fx, |k| matches!(k, TimerKind::OfferTimeout { .. }));
        assert_eq!(at, T0 + 30_000);
        let mut fx = Vec::new();
        desk.handle_timer(at, &offer, &mut fx);
        assert_eq!(kinds(&fx), vec![Kind::Declined, Kind::Queued]);
        assert!(fx.contains(&Effect::NotifyAgent {
            agent: t("ann"),
            session: t("s1"),
            kind: Kind::Declined,
            reason: REASON_OFFER_TIMEOUT
        }));
        assert_eq!(desk.stats().offer_timeouts, 1);
        let mut fx = Vec::new();
        desk.handle_timer(at, &offer, &mut fx);
        assert!(fx.is_empty());
        assert_eq!(desk.stats().stale_timers, 1);
        desk.check_invariants().unwrap();
    }

    fn overflow_policy() -> DeskPolicy {
        DeskPolicy {
            queues: vec![
                QueuePolicy { name: t("front"), skills: vec![], wait_ms_max: 1_000, overflow: Overflow::Queue(t("backup")) },
                QueuePolicy { name: t("backup"), skills: vec![], wait_ms_max: 2_000, overflow: Overflow::Offline },
            ],
            ..DeskPolicy::default()
        }
    }

    #[test]
    fn max_wait_overflows_then_gives_the_offline_outcome() {
        let mut desk = desk_with(overflow_policy());
        let fx = open(&mut desk, T0, "s1", 0);
        let (at, wait) = timer(&fx, |k| matches!(k, TimerKind::MaxWait { .. }));
        assert_eq!(at, T0 + 1_000);
        let mut fx = Vec::new();
        desk.handle_timer(at, &wait, &mut fx);
        let evs: Vec<_> = fx
            .iter()
            .filter_map(|e| match e {
                Effect::Event { kind, queue, .. } => Some((*kind, queue.to_string())),
                _ => None,
            })
            .collect();
        assert_eq!(evs, vec![(Kind::Overflowed, "backup".into()), (Kind::Queued, "backup".into())]);
        let (at, wait) = timer(&fx, |k| matches!(k, TimerKind::MaxWait { .. }));
        assert_eq!(at, T0 + 3_000);
        let mut fx = Vec::new();
        desk.handle_timer(at, &wait, &mut fx);
        assert_eq!(kinds(&fx), vec![Kind::Overflowed]);
        assert!(matches!(&fx[0], Effect::Event { queue, .. } if queue.is_empty()), "offline outcome has no queue");
        assert_eq!(desk.conversations_len(), 0);
        assert_eq!(desk.group_counts().last().unwrap().1.offline, 1);
        assert_eq!(desk.stats().overflows, 1);
    }

    #[test]
    fn out_of_hours_gets_the_offline_outcome() {
        let hours = BusinessHours {
            utc_offset_minutes: 0,
            open: (0..5).map(|weekday| OpenRange { weekday, start_minute: 9 * 60, end_minute: 17 * 60 }).collect(),
        };
        let policy = DeskPolicy {
            strategy: StrategyConfig::BusinessHours { hours, inner: Box::new(StrategyConfig::LeastLoad) },
            ..DeskPolicy::default()
        };
        let mut desk = desk_with(policy);
        let fx = open(&mut desk, T0, "in-hours", 0);
        assert_eq!(kinds(&fx), vec![Kind::Queued]);
        let evening = T0 + 8 * 3_600_000;
        let fx = open(&mut desk, evening, "late", 0);
        assert_eq!(kinds(&fx), vec![Kind::Overflowed]);
        assert!(desk.conversation(&t("late")).is_none());
    }

    #[test]
    fn disconnect_grace_then_offline_requeues_work() {
        let mut desk = desk();
        online(&mut desk, T0, "ann", 2, &[]);
        open(&mut desk, T0, "s1", 0);
        respond(&mut desk, T0 + 1, "s1", "ann", true).unwrap();
        open(&mut desk, T0 + 2, "s2", 0);
        let mut fx = Vec::new();
        desk.agent_disconnected(T0 + 3, &t("ann"), &mut fx).unwrap();
        let (at, grace) = timer(&fx, |k| matches!(k, TimerKind::AgentGrace { .. }));
        assert_eq!(at, T0 + 3 + 60_000);
        assert_eq!(desk.agents().available_len(), 0);
        // Reconnecting cancels the grace timer; its late firing is stale.
        let fx = online(&mut desk, T0 + 4, "ann", 2, &[]);
        assert!(fx.contains(&Effect::CancelTimer { id: grace.id }));
        let mut fx = Vec::new();
        desk.handle_timer(at, &grace, &mut fx);
        assert!(fx.is_empty());
        // Disconnect again and let the grace period run out.
        let mut fx = Vec::new();
        desk.agent_disconnected(T0 + 5, &t("ann"), &mut fx).unwrap();
        let (at, grace) = timer(&fx, |k| matches!(k, TimerKind::AgentGrace { .. }));
        let mut fx = Vec::new();
        desk.handle_timer(at, &grace, &mut fx);
        let evs = events(&fx);
        assert!(evs.contains(&("s1".into(), Kind::Transferred, String::new())), "{evs:?}");
        assert!(evs.contains(&("s2".into(), Kind::Declined, "ann".into())), "{evs:?}");
        assert!(fx.contains(&Effect::AgentStatus { agent: t("ann"), presence: AgentPresence::Offline, capacity: 2, load: 0 }));
        // The active conversation keeps its place ahead of the offered one.
        assert_eq!(desk.queues()[0].head().unwrap().1, "s1");
        desk.check_invariants().unwrap();
    }

    #[test]
    fn a_waiting_customer_keeps_its_place_through_the_grace_period() {
        let mut desk = desk();
        open(&mut desk, T0, "s1", 0);
        open(&mut desk, T0, "s2", 0);
        let cust = t("cust-s1");
        // The customer's last connection drops: its position is told again, a timer runs.
        let mut fx = Vec::new();
        desk.customer_disconnected(T0 + 1, &cust, &mut fx);
        let (at, grace) = timer(&fx, |k| matches!(k, TimerKind::CustomerGrace { .. }));
        assert_eq!(at, T0 + 1 + 30_000);
        assert!(desk.customer_in_grace(&cust));
        assert!(matches!(&fx[1], Effect::Event { kind: Kind::Queued, position: 1, reason, .. } if reason == "customer disconnected"), "{fx:?}");
        // Back within it: same place, the late firing is stale.
        let mut fx = Vec::new();
        desk.customer_reconnected(T0 + 2, &cust, &mut fx);
        assert!(fx.contains(&Effect::CancelTimer { id: grace.id }));
        assert!(matches!(&fx[1], Effect::Event { kind: Kind::Queued, position: 1, reason, .. } if reason == "customer reconnected"), "{fx:?}");
        let mut fx = Vec::new();
        desk.handle_timer(at, &grace, &mut fx);
        assert!(fx.is_empty());
        assert_eq!(desk.queues()[0].head().unwrap().1, "s1");
        // Gone for good: abandoned when the period ends; s2 moves up.
        let mut fx = Vec::new();
        desk.customer_disconnected(T0 + 3, &cust, &mut fx);
        let (at, grace) = timer(&fx, |k| matches!(k, TimerKind::CustomerGrace { .. }));
        let mut fx = Vec::new();
        desk.handle_timer(at, &grace, &mut fx);
        assert_eq!(kinds(&fx), vec![Kind::Abandoned, Kind::Queued]);
        assert!(desk.conversation(&t("s1")).is_none());
        desk.check_invariants().unwrap();
        // Nothing waiting: nothing to keep. No grace at all: abandoned at once.
        let mut fx = Vec::new();
        desk.customer_disconnected(T0 + 4, &cust, &mut fx);
        assert!(fx.is_empty());
        let mut desk = desk_with(DeskPolicy { customer_grace_ms: 0, ..DeskPolicy::default() });
        open(&mut desk, T0, "s3", 0);
        let mut fx = Vec::new();
        desk.customer_disconnected(T0 + 1, &t("cust-s3"), &mut fx);
        assert_eq!(kinds(&fx), vec![Kind::Abandoned]);
    }

    #[test]
    fn the_context_is_kept_bounded_and_shown_in_the_offer() {
        let mut desk = desk_with_limits(DeskLimits { context_bytes_max: 8, ..DeskLimits::default() });
        let mut fx = Vec::new();
        let error = desk.open_conversation_with_context(T0, &t("s1"), &t("c"), 0, &[], b"123456789", &mut fx).unwrap_err();
        assert_eq!(error.code(), ErrorCode::LimitExceeded);
        let error = desk.open_conversation_with_context(T0, &t("s1"), &t("c"), 0, &[], b"\xff", &mut fx).unwrap_err();
        assert_eq!(error.code(), ErrorCode::BadRequest);
        assert!(fx.is_empty());
        desk.open_conversation_with_context(T0, &t("s1"), &t("c"), 0, &[], b"page=/buy", &mut fx).unwrap_err();
        desk.open_conversation_with_context(T0, &t("s1"), &t("c"), 0, &[], b"order=42", &mut fx).unwrap();
        assert_eq!(desk.conversation(&t("s1")).unwrap().context, "order=42");
        let fx = online(&mut desk, T0 + 1, "ann", 1, &[]);
        assert!(fx.contains(&Effect::NotifyAgent { agent: t("ann"), session: t("s1"), kind: Kind::Offered, reason: t("order=42") }), "{fx:?}");
    }

    #[test]
    fn transfers_to_agent_and_queue() {
        let mut policy = overflow_policy();
        policy.queues[0].wait_ms_max = 0;
        let mut desk = desk_with(policy);
        online(&mut desk, T0, "ann", 1, &[]);
        open(&mut desk, T0, "s1", 0);
        respond(&mut desk, T0 + 1, "s1", "ann", true).unwrap();
        let mut fx = Vec::new();
        let error = desk.transfer(T0 + 2, &t("s1"), TransferKind::Agent, &t("bob"), &Text::new(), &mut fx).unwrap_err();
        assert_eq!(error.code(), ErrorCode::NotFound);
        online(&mut desk, T0 + 2, "bob", 1, &[]);
        let mut fx = Vec::new();
        desk.transfer(T0 + 3, &t("s1"), TransferKind::Agent, &t("bob"), &t("vip"), &mut fx).unwrap();
        assert_eq!(events(&fx), vec![("s1".into(), Kind::Transferred, "bob".into()), ("s1".into(), Kind::Offered, "bob".into())]);
        assert!(fx.contains(&Effect::AgentLeft { session: t("s1"), agent: t("ann") }));
        respond(&mut desk, T0 + 4, "s1", "bob", true).unwrap();
        let mut fx = Vec::new();
        desk.transfer(T0 + 5, &t("s1"), TransferKind::Queue, &t("backup"), &Text::new(), &mut fx).unwrap();
        // ann is free again and takes it from the backup queue.
        assert_eq!(
            events(&fx),
            vec![
                ("s1".into(), Kind::Transferred, String::new()),
                ("s1".into(), Kind::Queued, String::new()),
                ("s1".into(), Kind::Offered, "ann".into()),
            ]
        );
        desk.check_invariants().unwrap();
    }

    #[test]
    fn refusals_are_typed_and_change_nothing() {
        let mut desk = TenantDesk::new(
            DeskLimits { conversations_max: 2, queue_length_max: 1, ..DeskLimits::default() },
            DeskPolicy::default(),
        )
        .unwrap();
        open(&mut desk, T0, "s1", 0);
        let mut fx = vec![];
        let code = |r: Result<(), DeskError>| r.unwrap_err().code();
        assert_eq!(code(desk.open_conversation(T0, &t("s1"), &t("c"), 0, &[], &mut fx)), ErrorCode::Conflict);
        assert_eq!(code(desk.open_conversation(T0, &t("s2"), &t("c"), 0, &[], &mut fx)), ErrorCode::LimitExceeded);
        assert_eq!(code(desk.open_conversation(T0, &Text::new(), &t("c"), 0, &[], &mut fx)), ErrorCode::BadRequest);
        let many: Vec<Text> = (0..=SKILLS_MAX).map(|n| t(&format!("k{n}"))).collect();
        assert_eq!(code(desk.open_conversation(T0, &t("s3"), &t("c"), 0, &many, &mut fx)), ErrorCode::BadRequest);
        assert_eq!(code(desk.offer_response(T0, &t("s1"), &t("nobody"), true, &mut fx)), ErrorCode::NotFound);
        online(&mut desk, T0, "ann", 0, &[]);
        let error = desk.offer_response(T0, &t("s1"), &t("ann"), true, &mut fx).unwrap_err();
        assert_eq!(error.code(), ErrorCode::InvalidState);
        assert_eq!(error.to_string(), "`accept` is not valid for a conversation in state `queued`");
        assert_eq!(code(desk.close(T0, &t("nope"), &Text::new(), &mut fx)), ErrorCode::NotFound);
        assert_eq!(
            code(desk.transfer(T0, &t("s1"), TransferKind::Agent, &t("ann"), &Text::new(), &mut fx)),
            ErrorCode::Unavailable
        );
        assert_eq!(
            code(desk.transfer(T0, &t("s1"), TransferKind::Queue, &t("default"), &Text::new(), &mut fx)),
            ErrorCode::BadRequest
        );
        assert!(fx.is_empty(), "refusals push no effects: {fx:?}");
        online(&mut desk, T0, "ann", 1, &[]);
        online(&mut desk, T0, "bob", 1, &[]);
        assert_eq!(respond(&mut desk, T0, "s1", "bob", true).unwrap_err().code(), ErrorCode::Forbidden);
        desk.check_invariants().unwrap();
        let mut tiny = TenantDesk::new(DeskLimits { agents_max: 1, ..DeskLimits::default() }, DeskPolicy::default()).unwrap();
        online(&mut tiny, T0, "ann", 1, &[]);
        assert_eq!(code(tiny.agent_status(T0, &t("bob"), AgentPresence::Online, 1, &[], &mut fx)), ErrorCode::LimitExceeded);
    }

    #[test]
    fn customer_leaving_abandons_or_closes() {
        let mut desk = desk();
        open(&mut desk, T0, "waiting", 0);
        let mut fx = Vec::new();
        desk.customer_left(T0 + 1, &t("waiting"), &mut fx).unwrap();
        assert_eq!(kinds(&fx), vec![Kind::Abandoned]);
        online(&mut desk, T0, "ann", 1, &[]);
        open(&mut desk, T0 + 2, "offered", 0);
        let mut fx = Vec::new();
        desk.customer_left(T0 + 3, &t("offered"), &mut fx).unwrap();
        assert_eq!(kinds(&fx), vec![Kind::Abandoned]);
        assert!(fx.contains(&Effect::NotifyAgent {
            agent: t("ann"),
            session: t("offered"),
            kind: Kind::Abandoned,
            reason: REASON_CUSTOMER_LEFT
        }));
        assert_eq!(desk.agents().get(AgentKey(0)).unwrap().reserved(), 0);
        let counts = desk.group_counts();
        assert_eq!(counts.last().unwrap().1.abandoned, 2);
        desk.check_invariants().unwrap();
    }

    #[test]
    fn positions_are_updated_as_the_queue_moves() {
        let mut desk = desk();
        for n in 0..3 {
            open(&mut desk, T0 + n, &format!("s{n}"), 0);
        }
        let fx = online(&mut desk, T0 + 5, "ann", 1, &[]);
        let updates: Vec<(String, u32)> = fx
            .iter()
            .filter_map(|e| match e {
                Effect::Event { session, kind: Kind::Queued, position, .. } => Some((session.to_string(), *position)),
                _ => None,
            })
            .collect();
        assert_eq!(updates, vec![("s1".into(), 1), ("s2".into(), 2)]);
    }

    #[test]
    fn skills_pick_the_queue_and_the_agent() {
        let policy = DeskPolicy {
            strategy: StrategyConfig::SkillBased,
            queues: vec![
                QueuePolicy::open("general"),
                QueuePolicy { name: t("billing"), skills: vec![t("billing")], wait_ms_max: 0, overflow: Overflow::Offline },
            ],
            ..DeskPolicy::default()
        };
        let mut desk = desk_with(policy);
        online(&mut desk, T0, "generalist", 5, &[]);
        let mut fx = Vec::new();
        desk.open_conversation(T0, &t("s1"), &t("c"), 0, &[t("fr"), t("billing")], &mut fx).unwrap();
        assert_eq!(desk.conversation(&t("s1")).unwrap().queue, "billing");
        assert_eq!(kinds(&fx), vec![Kind::Queued], "the generalist lacks the queue's skill");
        let fx = online(&mut desk, T0, "billing-en", 5, &["billing"]);
        assert!(kinds(&fx).is_empty(), "skill-based: the conversation asks for fr too");
        let fx = online(&mut desk, T0, "billing-fr", 1, &["billing", "fr"]);
        assert_eq!(events(&fx), vec![("s1".into(), Kind::Offered, "billing-fr".into())]);
    }

    #[test]
    fn ab_groups_are_tagged_and_counted() {
        let policy = DeskPolicy {
            experiment: vec![
                Variant { group: t("a"), weight: 1, strategy: StrategyConfig::LeastLoad },
                Variant { group: t("b"), weight: 1, strategy: StrategyConfig::SkillBased },
            ],
            ..DeskPolicy::default()
        };
        let mut desk = desk_with(policy);
        let mut seen = Vec::new();
        for n in 0..200 {
            let fx = open(&mut desk, T0, &format!("conv-{n}"), 0);
            let Effect::Event { group, .. } = &fx[fx.len() - 1] else { panic!() };
            seen.push(group.to_string());
        }
        let counts = desk.group_counts();
        assert_eq!(counts[0].1.opened + counts[1].1.opened, 200);
        assert_eq!(counts[0].1.opened as usize, seen.iter().filter(|g| *g == "a").count());
        assert!(counts[0].1.opened > 70 && counts[1].1.opened > 70, "{counts:?}");
    }

    #[test]
    fn policy_changes_are_validated_and_keep_queues() {
        let mut desk = desk_with(overflow_policy());
        open(&mut desk, T0, "s1", 0);
        let mut fx = Vec::new();
        let mut bad = overflow_policy();
        bad.queues[1].overflow = Overflow::Queue(t("front"));
        assert_eq!(desk.set_policy(T0, bad, &mut fx).unwrap_err().code(), ErrorCode::BadRequest, "overflow loop");
        let mut bad = overflow_policy();
        bad.queues[1].overflow = Overflow::Queue(t("nowhere"));
        assert!(desk.set_policy(T0, bad, &mut fx).is_err());
        let removes_front = DeskPolicy { queues: vec![QueuePolicy::open("backup")], ..DeskPolicy::default() };
        let error = desk.set_policy(T0, removes_front, &mut fx).unwrap_err();
        assert!(error.to_string().contains("still has 1 waiting"), "{error}");
        assert!(fx.is_empty());
        assert_eq!(desk.policy(), &overflow_policy());
        // Longer max wait: the timer restarts, counted from when s1 entered the queue.
        let mut longer = overflow_policy();
        longer.queues[0].wait_ms_max = 5_000;
        desk.set_policy(T0 + 10, longer, &mut fx).unwrap();
        let (at, _) = timer(&fx, |k| matches!(k, TimerKind::MaxWait { .. }));
        assert_eq!(at, T0 + 5_000);
        desk.check_invariants().unwrap();
    }

    #[test]
    fn affinity_returns_a_customer_to_its_last_agent() {
        let policy = DeskPolicy {
            strategy: StrategyConfig::Affinity { fallback: Box::new(StrategyConfig::LeastLoad) },
            ..DeskPolicy::default()
        };
        let mut desk = desk_with(policy);
        online(&mut desk, T0, "ann", 5, &[]);
        online(&mut desk, T0, "bob", 5, &[]);
        let mut fx = Vec::new();
        desk.open_conversation(T0, &t("first"), &t("carol"), 0, &[], &mut fx).unwrap();
        let (_, _, agent) = events(&fx).into_iter().find(|(_, k, _)| *k == Kind::Offered).unwrap();
        respond(&mut desk, T0, "first", &agent, true).unwrap();
        let mut fx = Vec::new();
        desk.close(T0 + 1, &t("first"), &Text::new(), &mut fx).unwrap();
        // Make the other agent the least loaded choice, then come back.
        let other = if agent == "ann" { "bob" } else { "ann" };
        online(&mut desk, T0 + 2, other, 50, &[]);
        let mut fx = Vec::new();
        desk.open_conversation(T0 + 3, &t("second"), &t("carol"), 0, &[], &mut fx).unwrap();
        assert_eq!(events(&fx).last().unwrap(), &("second".into(), Kind::Offered, agent));
    }
}
