//! The control plane's side of a shard: answers the control thread's questions about the
//! desks hosted here (policy, agents, queues, conversations, A/B groups, metrics) and applies
//! policy changes, on the shard's own executor, between other work.
//!
//! Policy versions: version 1 is the configuration's policy; each accepted change adds one.
//! The tenant's desk shard (`tenant_shard(tenant)`) holds the authoritative version and checks
//! `expected_version` there, atomically with applying the change (the shard is one thread), so
//! two writers cannot both win. Other shards hold no desk, so nothing there depends on the
//! policy; the control thread still tells them each new version, and GET reports what every
//! shard has recorded.
//!
//! Everything here is bounded: a page of agents is at most the `limit` asked for, queues
//! are at most `DeskLimits::queues_max`, groups at most `variants_max + 1`; counting
//! conversations per state and the oldest wait per queue walks the desk's open conversations
//! once (at most `conversations_max`).
//!
//! It may read a desk only through `desk_read` / `desk_view`, and change one only through
//! `set_desk_policy`; it never waits, so the control thread cannot stall a shard.

use std::collections::HashMap;

use serde::Serialize;
use switchboard_protocol::{AgentPresence, Text};

use super::Shard;
use crate::config::DeskPolicyConfig;
use crate::cs::{DeskPolicy, DeskStats, State, TenantDesk};
use crate::mesh::{tenant_shard, DeskOp};

/// The version of the configuration's policy, before any change through the control API.
pub const INITIAL_POLICY_VERSION: u64 = 1;

fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

/// What the control thread may ask about a tenant's desk (on the tenant's desk shard).
#[derive(Debug, Clone, Copy)]
pub enum DeskQuery {
    /// The policy in force and its version.
    Policy,
    /// Agents from key `cursor` on, at most `limit`.
    Agents {
        /// First agent key to return (0: from the start).
        cursor: u32,
        /// Most agents to return.
        limit: usize,
    },
    /// Every queue.
    Queues,
    /// Conversations per state.
    Conversations,
    /// A/B group counts.
    Groups,
}

/// The answer to a [`DeskQuery`], ready to serialise.
#[derive(Debug, Clone, Serialize)]
#[serde(untagged)]
pub enum DeskAnswer {
    /// [`DeskQuery::Policy`].
    Policy(PolicyView),
    /// [`DeskQuery::Agents`].
    Agents(AgentsPage),
    /// [`DeskQuery::Queues`].
    Queues(QueuesView),
    /// [`DeskQuery::Conversations`].
    Conversations(ConversationCounts),
    /// [`DeskQuery::Groups`].
    Groups(GroupsView),
}

/// The policy in force on the desk shard.
#[derive(Debug, Clone, Serialize)]
pub struct PolicyView {
    /// Its version.
    pub version: u64,
    /// The document (the desk's normalised form: skills sorted).
    pub policy: DeskPolicyConfig,
}

/// One agent as the desk sees it.
#[derive(Debug, Clone, Serialize)]
pub struct AgentView {
    /// The agent's key (what `cursor` counts in).
    pub key: u32,
    /// The agent's id.
    pub id: String,
    /// "online", "away" or "offline".
    pub presence: &'static str,
    /// One of its connections reports its status.
    pub connected: bool,
    /// Online, connected and with spare capacity.
    pub available: bool,
    /// Most conversations at once.
    pub capacity: u16,
    /// Conversations assigned.
    pub load: u16,
    /// Offers outstanding.
    pub reserved: u16,
    /// Skills, sorted.
    pub skills: Vec<String>,
}

/// A page of agents.
#[derive(Debug, Clone, Serialize)]
pub struct AgentsPage {
    /// Agents the desk knows.
    pub total: usize,
    /// This page, by key.
    pub agents: Vec<AgentView>,
    /// Pass as `cursor` for the next page; absent on the last one.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub next_cursor: Option<u32>,
}

/// One queue.
#[derive(Debug, Clone, Serialize)]
pub struct QueueView {
    /// Its name.
    pub name: String,
    /// Conversations waiting in it.
    pub length: usize,
    /// How long the longest-waiting one has waited (since it entered this queue), in
    /// milliseconds; 0 when empty.
    pub oldest_wait_ms: u64,
    /// Skills its agents need.
    pub skills: Vec<String>,
    /// Its max wait (0: none), in milliseconds.
    pub wait_ms_max: u64,
    /// Where it overflows ("" = the offline outcome).
    pub overflow: String,
    /// The handle time its estimates use, in milliseconds.
    pub handle_ms_estimate: u64,
}

/// Every queue of a desk.
#[derive(Debug, Clone, Serialize)]
pub struct QueuesView {
    /// In policy order, the default first.
    pub queues: Vec<QueueView>,
}

/// Conversations per state.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct ConversationCounts {
    /// Open conversations (the three states below).
    pub open: u64,
    /// Waiting in a queue.
    pub queued: u64,
    /// Offered to an agent who has not answered.
    pub offered: u64,
    /// Assigned to an agent.
    pub active: u64,
    /// Ended since start (or since their group left the experiment), by outcome.
    pub ended: EndedCounts,
}

/// Conversations ended, by outcome.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct EndedCounts {
    /// Closed by a participant.
    pub closed: u64,
    /// Abandoned by the customer while waiting.
    pub abandoned: u64,
    /// Given the offline outcome (out of hours, or waited too long).
    pub offline: u64,
}

/// One A/B group's counters.
#[derive(Debug, Clone, Serialize)]
pub struct GroupView {
    /// The group tag; "" for conversations opened with no experiment.
    pub group: String,
    /// Its weight in the experiment in force; absent for "".
    #[serde(skip_serializing_if = "Option::is_none")]
    pub weight: Option<u32>,
    /// Conversations opened in it.
    pub opened: u64,
    /// Offers accepted.
    pub assigned: u64,
    /// Closed.
    pub closed: u64,
    /// Abandoned.
    pub abandoned: u64,
    /// Offline outcome.
    pub offline: u64,
}

/// A/B group counts.
#[derive(Debug, Clone, Serialize)]
pub struct GroupsView {
    /// In experiment order, then "".
    pub groups: Vec<GroupView>,
}

/// Why a policy change was not applied.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PolicyRefusal {
    /// `expected_version` is not the version in force.
    Conflict {
        /// The version in force.
        current: u64,
    },
    /// The desk refused it (the reason names the field or the state that prevents it).
    Invalid(String),
}

/// One tenant's desk for /metrics (on its desk shard).
#[derive(Debug, Clone)]
pub struct DeskMetrics {
    /// The tenant.
    pub tenant: String,
    /// The policy version applied on its desk shard.
    pub policy_version: u64,
    /// Agents online, away, offline.
    pub agents_by_presence: [u64; 3],
    /// Agents with a connection reporting their status.
    pub agents_connected: u64,
    /// Capacity of online agents, summed.
    pub capacity_online: u64,
    /// Load of all agents, summed.
    pub load: u64,
    /// Queues.
    pub queues: Vec<QueueView>,
    /// Conversations per state.
    pub conversations: ConversationCounts,
    /// A/B groups.
    pub groups: Vec<GroupView>,
    /// Desk counters.
    pub stats: DeskStats,
    /// (operation, requests, refusals).
    pub requests: Vec<(&'static str, u64, u64)>,
}

fn presence_name(presence: AgentPresence) -> &'static str {
    match presence {
        AgentPresence::Online => "online",
        AgentPresence::Away => "away",
        AgentPresence::Offline => "offline",
    }
}

/// The operation's name in metrics (a fixed set, whatever is added to `DeskOp` later).
fn op_name(op: &DeskOp) -> &'static str {
    match op {
        DeskOp::Open { .. } => "open",
        DeskOp::AgentStatus { .. } => "agent_status",
        DeskOp::OfferResponse { .. } => "offer_response",
        DeskOp::Transfer { .. } => "transfer",
        DeskOp::Close { .. } => "close",
        DeskOp::Watch { .. } => "watch",
        DeskOp::ConnLost { .. } => "conn_lost",
        #[allow(unreachable_patterns)]
        _ => "other",
    }
}

fn conversation_counts(desk: &TenantDesk) -> ConversationCounts {
    let mut counts = ConversationCounts::default();
    for view in desk.conversations() {
        match view.state {
            State::Queued => counts.queued += 1,
            State::Offered => counts.offered += 1,
            State::Active => counts.active += 1,
            _ => {}
        }
    }
    counts.open = counts.queued + counts.offered + counts.active;
    for (_, group) in desk.group_counts() {
        counts.ended.closed += group.closed;
        counts.ended.abandoned += group.abandoned;
        counts.ended.offline += group.offline;
    }
    counts
}

fn queues_view(desk: &TenantDesk, now: u64) -> Vec<QueueView> {
    // The oldest entry time per queue, from one walk over the open conversations.
    let mut oldest: HashMap<&Text, u64> = HashMap::new();
    for view in desk.conversations() {
        if view.state == State::Queued {
            let since = oldest.entry(view.queue).or_insert(u64::MAX);
            *since = (*since).min(view.queued_since_ms);
        }
    }
    desk.queues()
        .iter()
        .map(|queue| {
            let policy = queue.policy();
            QueueView {
                name: queue.name().to_string(),
                length: queue.len(),
                oldest_wait_ms: oldest.get(queue.name()).map_or(0, |&since| now.saturating_sub(since)),
                skills: policy.skills.iter().map(ToString::to_string).collect(),
                wait_ms_max: policy.wait_ms_max,
                overflow: match &policy.overflow {
                    crate::cs::Overflow::Offline => String::new(),
                    crate::cs::Overflow::Queue(target) => target.to_string(),
                },
                handle_ms_estimate: queue.ewma_handle_ms(),
            }
        })
        .collect()
}

fn groups_view(desk: &TenantDesk) -> Vec<GroupView> {
    let weights: HashMap<&Text, u32> = desk.policy().experiment.iter().map(|v| (&v.group, v.weight)).collect();
    desk.group_counts()
        .into_iter()
        .map(|(group, c)| GroupView {
            weight: weights.get(&group).copied(),
            group: group.to_string(),
            opened: c.opened,
            assigned: c.assigned,
            closed: c.closed,
            abandoned: c.abandoned,
            offline: c.offline,
        })
        .collect()
}

fn agents_page(desk: &TenantDesk, cursor: u32, limit: usize) -> AgentsPage {
    let table = desk.agents();
    let mut agents = Vec::with_capacity(limit.min(table.len()));
    let mut next_cursor = None;
    for (key, agent) in table.iter().filter(|(key, _)| key.0 >= cursor) {
        if agents.len() == limit {
            next_cursor = Some(key.0);
            break;
        }
        agents.push(AgentView {
            key: key.0,
            id: agent.id().to_string(),
            presence: presence_name(agent.presence()),
            connected: agent.connected(),
            available: agent.is_available(),
            capacity: agent.capacity(),
            load: agent.load(),
            reserved: agent.reserved(),
            skills: agent.skills().iter().map(ToString::to_string).collect(),
        });
    }
    AgentsPage { total: table.len(), agents, next_cursor }
}

impl Shard {
    /// The policy version this shard has applied for `tenant`.
    pub(crate) fn policy_version(&self, tenant: &Text) -> u64 {
        self.desk.policy_versions.borrow().get(tenant).copied().unwrap_or(INITIAL_POLICY_VERSION)
    }

    /// Records that `tenant`'s policy reached `version` (on a shard without its desk).
    pub(crate) fn note_policy_version(&self, tenant: &Text, version: u64) {
        let mut versions = self.desk.policy_versions.borrow_mut();
        let known = versions.entry(tenant.clone()).or_insert(INITIAL_POLICY_VERSION);
        *known = (*known).max(version);
    }

    /// Applies a policy change on `tenant`'s desk shard when `expected_version` (if given) is
    /// the version in force; answers the new version.
    pub(crate) fn change_desk_policy(&self, tenant: &Text, expected_version: Option<u64>, policy: DeskPolicy) -> Result<u64, PolicyRefusal> {
        let current = self.policy_version(tenant);
        if expected_version.is_some_and(|expected| expected != current) {
            return Err(PolicyRefusal::Conflict { current });
        }
        self.set_desk_policy(tenant, policy).map_err(|error| PolicyRefusal::Invalid(error.to_string()))?;
        let version = current + 1;
        self.desk.policy_versions.borrow_mut().insert(tenant.clone(), version);
        tracing::info!(shard = self.index, %tenant, version, "desk policy changed through the control port");
        Ok(version)
    }

    /// Answers a control-plane question about `tenant`'s desk (created from the configuration
    /// if unused so far). Call on the tenant's desk shard.
    pub(crate) fn desk_query(&self, tenant: &Text, query: DeskQuery) -> Result<DeskAnswer, String> {
        let version = self.policy_version(tenant);
        let now = now_ms();
        self.desk_read(tenant, |desk| match query {
            DeskQuery::Policy => DeskAnswer::Policy(PolicyView { version, policy: DeskPolicyConfig::from_policy(desk.policy()) }),
            DeskQuery::Agents { cursor, limit } => DeskAnswer::Agents(agents_page(desk, cursor, limit)),
            DeskQuery::Queues => DeskAnswer::Queues(QueuesView { queues: queues_view(desk, now) }),
            DeskQuery::Conversations => DeskAnswer::Conversations(conversation_counts(desk)),
            DeskQuery::Groups => DeskAnswer::Groups(GroupsView { groups: groups_view(desk) }),
        })
        .map_err(|error| error.to_string())
    }

    /// Every desk hosted here, for /metrics (desks exist only for tenants that were used or
    /// asked about, all of them configured tenants).
    pub(crate) fn desk_metrics(&self) -> Vec<DeskMetrics> {
        let tenants: Vec<Text> = self.config_tenants().into_iter().filter(|tenant| tenant_shard(tenant, self.shards) == self.index).collect();
        let now = now_ms();
        let counts = self.desk.request_counts.borrow();
        tenants
            .into_iter()
            .filter_map(|tenant| {
                let mut requests: Vec<(&'static str, u64, u64)> =
                    counts.iter().filter(|((t, _), _)| *t == tenant).map(|((_, op), (n, refused))| (*op, *n, *refused)).collect();
                requests.sort_unstable();
                let policy_version = self.policy_version(&tenant);
                self.desk_view(&tenant, |desk| {
                    let mut agents_by_presence = [0u64; 3];
                    let (mut connected, mut capacity_online, mut load) = (0, 0, 0);
                    for (_, agent) in desk.agents().iter() {
                        let index = match agent.presence() {
                            AgentPresence::Online => 0,
                            AgentPresence::Away => 1,
                            AgentPresence::Offline => 2,
                        };
                        agents_by_presence[index] += 1;
                        connected += u64::from(agent.connected());
                        if agent.presence() == AgentPresence::Online {
                            capacity_online += u64::from(agent.capacity());
                        }
                        load += u64::from(agent.load());
                    }
                    DeskMetrics {
                        tenant: tenant.to_string(),
                        policy_version,
                        agents_by_presence,
                        agents_connected: connected,
                        capacity_online,
                        load,
                        queues: queues_view(desk, now),
                        conversations: conversation_counts(desk),
                        groups: groups_view(desk),
                        stats: desk.stats(),
                        requests: requests.clone(),
                    }
                })
            })
            .collect()
    }

    /// The tenants of the configuration (`default` in open mode).
    fn config_tenants(&self) -> Vec<Text> {
        if self.config.tenants.is_empty() {
            vec![Text::from("default")]
        } else {
            self.config.tenants.iter().map(|t| Text::from(t.id.as_str())).collect()
        }
    }

    /// Counts a desk request of `tenant` (refused or not), for /metrics.
    pub(super) fn desk_count(&self, tenant: &Text, op: &DeskOp, refused: bool) {
        let name = op_name(op);
        if name == "conn_lost" {
            return;
        }
        let mut counts = self.desk.request_counts.borrow_mut();
        let entry = counts.entry((tenant.clone(), name)).or_default();
        entry.0 += 1;
        entry.1 += u64::from(refused);
    }
}
