//! Engine configuration: one struct, every limit named with its unit last, embedded defaults.
//!
//! Read from TOML (`--config FILE`; `ops/switchboard.toml` documents every key with its
//! default), then overridden by command-line flags. Everything the shards size at start comes
//! from here; nothing grows past these limits at run time.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use switchboard_protocol::limits::ID_BYTES_MAX;
use switchboard_protocol::Text;

/// The history ring holds at least this many largest frames.
const HISTORY_FRAMES_MIN: usize = 4;

/// Largest DELIVER frame minus its payload: header, two maximal ids and the fixed fields.
pub const DELIVER_OVERHEAD_BYTES_MAX: usize = 16 + (1 + 128) + 8 + 8 + 8 + 16 + (1 + 128) + 4;

/// The whole configuration.
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    /// Addresses, shards, CPUs, data directory.
    pub server: ServerConfig,
    /// Per-connection and per-session limits.
    pub limits: LimitsConfig,
    /// The rings between shards.
    pub mesh: MeshConfig,
    /// The per-shard buffer pool.
    pub pool: PoolConfig,
    /// The per-shard io_uring sender.
    pub uring: UringConfig,
    /// Tenants and their token keys. None configured: the engine runs open (one tenant,
    /// `default`, tokens not checked).
    pub tenants: Vec<TenantConfig>,
    /// Token verification.
    pub auth: AuthConfig,
    /// The per-shard durable journal.
    pub journal: JournalSection,
    /// The customer-service desk of every tenant (routing, queues, timeouts, limits); a tenant's
    /// own `desk` section replaces it for that tenant. In open mode it is tenant `default`'s.
    pub desk: DeskConfig,
    /// Token buckets per connection and per tenant; a tenant's own `rate_limits` section
    /// replaces it for that tenant.
    pub rate_limits: RateLimitsConfig,
    /// The control port's API: admin token, page sizes.
    pub control: ControlConfig,
}

/// What a PUBLISH acknowledgement promises, chosen per engine and per tenant.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum DurabilityMode {
    /// PUBACK after the fdatasync covering the message: survives power loss.
    Sync,
    /// PUBACK after the journal write; synced every `journal.store.interval_ms`: survives a
    /// process kill, may lose the last interval on power loss.
    Interval,
    /// Memory only: survives reconnects, not a restart (the session epoch changes).
    None,
}

impl DurabilityMode {
    /// The journal's mode, `None` for memory only.
    pub fn journal(self) -> Option<crate::journal::Durability> {
        match self {
            DurabilityMode::Sync => Some(crate::journal::Durability::Sync),
            DurabilityMode::Interval => Some(crate::journal::Durability::Interval),
            DurabilityMode::None => None,
        }
    }

    /// What PUBACK reports.
    pub fn wire(self) -> switchboard_protocol::Durability {
        match self {
            DurabilityMode::Sync => switchboard_protocol::Durability::Sync,
            DurabilityMode::Interval => switchboard_protocol::Durability::Interval,
            DurabilityMode::None => switchboard_protocol::Durability::Memory,
        }
    }
}

/// The journal: one per shard under `server.data_dir/shard-N`, opened (and recovered) before
/// the shard listens.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct JournalSection {
    /// Durability of every tenant that does not set its own. With `none` here and for every
    /// tenant, no journal is opened and the data directory is not touched.
    pub durability: DurabilityMode,
    /// How often the shard runs retention and retries a full device, in milliseconds.
    pub maintenance_interval_ms: u64,
    /// How often an index snapshot is written (recovery replays only what follows the newest),
    /// in milliseconds.
    pub snapshot_interval_ms: u64,
    /// I/O the compactor may spend per maintenance pass (bytes read + written), copying what
    /// quiet conversations retain out of old, sparse segments so retention can delete them
    /// (0 = no compaction).
    pub compact_budget_bytes: u64,
    /// Segment, frame, queue and retention limits of each shard's journal.
    pub store: crate::journal::JournalConfig,
}

impl Default for JournalSection {
    fn default() -> Self {
        JournalSection {
            durability: DurabilityMode::Sync,
            maintenance_interval_ms: 1_000,
            snapshot_interval_ms: 30_000,
            compact_budget_bytes: 8 << 20,
            store: crate::journal::JournalConfig::default(),
        }
    }
}

impl Config {
    /// The durability a tenant's publishes get.
    pub fn durability_of(&self, tenant: &str) -> DurabilityMode {
        self.tenants.iter().find(|t| t.id == tenant).and_then(|t| t.durability).unwrap_or(self.journal.durability)
    }

    /// True when any tenant (or the default) writes to the journal.
    pub fn journal_enabled(&self) -> bool {
        self.journal.durability != DurabilityMode::None
            || self.tenants.iter().any(|t| t.durability.is_some_and(|d| d != DurabilityMode::None))
    }

    /// The journal limits the shards open with: `interval` is allowed exactly when some tenant
    /// uses it (recovery then assumes an unclean stop may have lost acknowledged data).
    pub fn journal_store(&self) -> crate::journal::JournalConfig {
        let interval = self.journal.durability == DurabilityMode::Interval
            || self.tenants.iter().any(|t| t.durability == Some(DurabilityMode::Interval));
        crate::journal::JournalConfig { interval_allowed: interval, ..self.journal.store.clone() }
    }
}

/// One tenant.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TenantConfig {
    /// The tenant id (the `tenant` claim of its tokens).
    pub id: String,
    /// Keys its tokens may be signed with (HS256); several at once for rotation by `kid`.
    pub keys: Vec<TenantKeyConfig>,
    /// This tenant's publish durability; unset = `journal.durability`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub durability: Option<DurabilityMode>,
    /// This tenant's desk; absent: the top-level `[desk]`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub desk: Option<DeskConfig>,
    /// This tenant's rate limits; absent: the top-level `[rate_limits]`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate_limits: Option<RateLimitsConfig>,
    /// Most sessions of this tenant one shard holds (new ones beyond get ERROR(LimitExceeded)),
    /// so one tenant cannot fill a shard for all; absent: only `limits.sessions_per_shard_max`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sessions_per_shard_max: Option<usize>,
}

/// How a desk picks an agent among those who can take a conversation: the same document in
/// the configuration file and on the control API.
///
/// Written as a name (`"least-load"`, `"skill-based"`, `"affinity"`: affinity over
/// least-load) or as a table tagged by `kind`:
///
/// - `{ kind = "least-load" }`, `{ kind = "skill-based" }`
/// - `{ kind = "weighted-round-robin", weights = { ann = 5, bob = 1 }, default_weight = 1 }`
///   (agents not listed get `default_weight`; weight 0 means never)
/// - `{ kind = "affinity", fallback = <strategy> }` (fallback default: least-load)
/// - `{ kind = "business-hours", utc_offset_minutes = 60, open = [{ weekday = 0,
///   start_minute = 540, end_minute = 1020 }], inner = <strategy> }` (weekday 0 = Monday;
///   out of hours new conversations get the offline outcome; inner default: least-load)
///
/// Nesting is at most [`crate::cs::routing::STRATEGY_DEPTH_MAX`] deep.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum StrategySpec {
    /// The agent with the most spare capacity.
    #[default]
    LeastLoad,
    /// Agents with every skill asked for, then the most spare capacity.
    SkillBased,
    /// Smooth weighted round-robin over the agents that can take the conversation.
    WeightedRoundRobin {
        /// Weight per agent id.
        weights: BTreeMap<String, u32>,
        /// Weight of agents not listed.
        default_weight: u32,
    },
    /// The customer's last agent when it can take the conversation, else `fallback`.
    Affinity {
        /// Routing when the last agent cannot take it.
        fallback: Box<StrategySpec>,
    },
    /// Out of hours: the offline outcome for new conversations; in hours: `inner`.
    BusinessHours {
        /// Local time minus UTC, in minutes (-720..=840).
        utc_offset_minutes: i32,
        /// When it is open.
        open: Vec<OpenRangeConfig>,
        /// Routing while open.
        inner: Box<StrategySpec>,
    },
}

/// One opening range of business hours: `weekday` 0 = Monday … 6 = Sunday, minutes since
/// local midnight, `start_minute` included, `end_minute` (at most 1440) excluded.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct OpenRangeConfig {
    /// 0 = Monday … 6 = Sunday.
    pub weekday: u8,
    /// First open minute of the day.
    pub start_minute: u16,
    /// First closed minute after it.
    pub end_minute: u16,
}

/// Most opening ranges in one business-hours strategy (a week of split shifts).
pub const OPEN_RANGES_MAX: usize = 64;

/// The tagged form of [`StrategySpec`] (what a table in TOML or an object in JSON is).
#[derive(Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "kebab-case", deny_unknown_fields)]
enum TaggedStrategy {
    // Braces, not unit variants: serde refuses unknown fields only in struct variants.
    LeastLoad {},
    SkillBased {},
    WeightedRoundRobin {
        #[serde(default)]
        weights: BTreeMap<String, u32>,
        #[serde(default = "default_weight")]
        default_weight: u32,
    },
    Affinity {
        #[serde(default)]
        fallback: Box<StrategySpec>,
    },
    BusinessHours {
        #[serde(default)]
        utc_offset_minutes: i32,
        open: Vec<OpenRangeConfig>,
        #[serde(default)]
        inner: Box<StrategySpec>,
    },
}

fn default_weight() -> u32 {
    1
}

impl Serialize for StrategySpec {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let tagged = match self {
            StrategySpec::LeastLoad => return serializer.serialize_str("least-load"),
            StrategySpec::SkillBased => return serializer.serialize_str("skill-based"),
            StrategySpec::WeightedRoundRobin { weights, default_weight } => {
                TaggedStrategy::WeightedRoundRobin { weights: weights.clone(), default_weight: *default_weight }
            }
            StrategySpec::Affinity { fallback } => TaggedStrategy::Affinity { fallback: fallback.clone() },
            StrategySpec::BusinessHours { utc_offset_minutes, open, inner } => {
                TaggedStrategy::BusinessHours { utc_offset_minutes: *utc_offset_minutes, open: open.clone(), inner: inner.clone() }
            }
        };
        tagged.serialize(serializer)
    }
}

impl<'de> Deserialize<'de> for StrategySpec {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<StrategySpec, D::Error> {
        struct Visitor;
        impl<'de> serde::de::Visitor<'de> for Visitor {
            type Value = StrategySpec;
            fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                f.write_str("a strategy name (\"least-load\", \"skill-based\", \"affinity\") or a table with `kind`")
            }
            fn visit_str<E: serde::de::Error>(self, name: &str) -> Result<StrategySpec, E> {
                match name {
                    "least-load" => Ok(StrategySpec::LeastLoad),
                    "skill-based" => Ok(StrategySpec::SkillBased),
                    "affinity" => Ok(StrategySpec::Affinity { fallback: Box::new(StrategySpec::LeastLoad) }),
                    "weighted-round-robin" | "business-hours" => {
                        Err(E::custom(format!("strategy `{name}` needs its settings: write it as a table with kind = \"{name}\"")))
                    }
                    other => Err(E::unknown_variant(other, &["least-load", "skill-based", "affinity", "weighted-round-robin", "business-hours"])),
                }
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(self, map: A) -> Result<StrategySpec, A::Error> {
                let tagged = TaggedStrategy::deserialize(serde::de::value::MapAccessDeserializer::new(map))?;
                Ok(match tagged {
                    TaggedStrategy::LeastLoad {} => StrategySpec::LeastLoad,
                    TaggedStrategy::SkillBased {} => StrategySpec::SkillBased,
                    TaggedStrategy::WeightedRoundRobin { weights, default_weight } => StrategySpec::WeightedRoundRobin { weights, default_weight },
                    TaggedStrategy::Affinity { fallback } => StrategySpec::Affinity { fallback },
                    TaggedStrategy::BusinessHours { utc_offset_minutes, open, inner } => StrategySpec::BusinessHours { utc_offset_minutes, open, inner },
                })
            }
        }
        deserializer.deserialize_any(Visitor)
    }
}

impl StrategySpec {
    /// The domain's strategy configuration.
    pub fn to_strategy(&self) -> crate::cs::StrategyConfig {
        use crate::cs::{BusinessHours, OpenRange, StrategyConfig};
        match self {
            StrategySpec::LeastLoad => StrategyConfig::LeastLoad,
            StrategySpec::SkillBased => StrategyConfig::SkillBased,
            StrategySpec::WeightedRoundRobin { weights, default_weight } => StrategyConfig::WeightedRoundRobin {
                weights: weights.iter().map(|(agent, weight)| (Text::from(agent.as_str()), *weight)).collect(),
                default_weight: *default_weight,
            },
            StrategySpec::Affinity { fallback } => StrategyConfig::Affinity { fallback: Box::new(fallback.to_strategy()) },
            StrategySpec::BusinessHours { utc_offset_minutes, open, inner } => StrategyConfig::BusinessHours {
                hours: BusinessHours {
                    utc_offset_minutes: *utc_offset_minutes,
                    open: open.iter().map(|r| OpenRange { weekday: r.weekday, start_minute: r.start_minute, end_minute: r.end_minute }).collect(),
                },
                inner: Box::new(inner.to_strategy()),
            },
        }
    }

    /// The document for a domain strategy (what GET shows of the policy in force).
    pub fn from_strategy(strategy: &crate::cs::StrategyConfig) -> StrategySpec {
        use crate::cs::StrategyConfig;
        match strategy {
            StrategyConfig::LeastLoad => StrategySpec::LeastLoad,
            StrategyConfig::SkillBased => StrategySpec::SkillBased,
            StrategyConfig::WeightedRoundRobin { weights, default_weight } => StrategySpec::WeightedRoundRobin {
                weights: weights.iter().map(|(agent, weight)| (agent.to_string(), *weight)).collect(),
                default_weight: *default_weight,
            },
            StrategyConfig::Affinity { fallback } => StrategySpec::Affinity { fallback: Box::new(StrategySpec::from_strategy(fallback)) },
            StrategyConfig::BusinessHours { hours, inner } => StrategySpec::BusinessHours {
                utc_offset_minutes: hours.utc_offset_minutes,
                open: hours.open.iter().map(|r| OpenRangeConfig { weekday: r.weekday, start_minute: r.start_minute, end_minute: r.end_minute }).collect(),
                inner: Box::new(StrategySpec::from_strategy(inner)),
            },
        }
    }

    /// What the domain's validation does not see: agent ids in weights, the number of
    /// opening ranges.
    fn check(&self, at: &str) -> Result<(), String> {
        match self {
            StrategySpec::LeastLoad | StrategySpec::SkillBased => Ok(()),
            StrategySpec::WeightedRoundRobin { weights, .. } => {
                match weights.keys().find(|agent| agent.is_empty() || agent.len() > ID_BYTES_MAX) {
                    Some(agent) => Err(format!("{at}: agent id `{agent}` in weights must be 1..={ID_BYTES_MAX} bytes")),
                    None => Ok(()),
                }
            }
            StrategySpec::Affinity { fallback } => fallback.check(&format!("{at}.fallback")),
            StrategySpec::BusinessHours { open, inner, .. } => {
                if open.len() > OPEN_RANGES_MAX {
                    return Err(format!("{at}.open: at most {OPEN_RANGES_MAX} ranges"));
                }
                inner.check(&format!("{at}.inner"))
            }
        }
    }
}

/// One arm of an A/B experiment: new conversations are split across the variants in
/// proportion to their weights (by a stable hash of the session id); the group tag is kept on
/// the conversation, sent in its events and counted in metrics.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct VariantConfig {
    /// The group tag (1 to 128 bytes, unique in the experiment).
    pub group: String,
    /// Relative share of new conversations.
    pub weight: u32,
    /// How its conversations are routed.
    #[serde(default)]
    pub strategy: StrategySpec,
}

/// One queue (team or skill) of a desk.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct QueueConfig {
    /// The queue's id (what TRANSFER to a queue names).
    pub name: String,
    /// Skills an agent needs to serve it; conversations asking for these skills wait here.
    #[serde(default)]
    pub skills: Vec<String>,
    /// Longest wait before overflow, in milliseconds (0: no limit).
    #[serde(default)]
    pub wait_ms_max: u64,
    /// Where a conversation goes after `wait_ms_max`: another queue's name, or "" for the
    /// offline-message outcome (the conversation ends).
    #[serde(default)]
    pub overflow: String,
}

/// A tenant's routing and queue policy: what may change at run time, through the control
/// API (`PUT /v1/tenants/{id}/policy`) or, at start, from the configuration file. One type
/// for both, so the file's `[desk]` keys below and the API's `policy` object are the same
/// document. Keys left out take their embedded defaults (not the values in force).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default)]
pub struct DeskPolicyConfig {
    /// Routing when there is no experiment (and for conversations of a removed group).
    pub strategy: StrategySpec,
    /// A/B variants; empty: no experiment.
    pub experiment: Vec<VariantConfig>,
    /// How long an agent has to answer an offer, in milliseconds.
    pub offer_timeout_ms: u64,
    /// How long an agent whose connections all dropped keeps its conversations before it goes
    /// offline and they are routed again, in milliseconds (0: at once).
    pub agent_grace_ms: u64,
    /// Handle time assumed for the estimated wait before any is measured, in milliseconds.
    pub initial_handle_ms: u64,
    /// The queues, the first being the default one.
    pub queues: Vec<QueueConfig>,
    /// How long a customer whose last connection dropped keeps its waiting conversations (and
    /// their places) before they are abandoned, in milliseconds (0: at once).
    pub customer_grace_ms: u64,
}

impl Default for DeskPolicyConfig {
    fn default() -> Self {
        let policy = crate::cs::DeskPolicy::default();
        DeskPolicyConfig {
            strategy: StrategySpec::LeastLoad,
            experiment: Vec::new(),
            offer_timeout_ms: policy.offer_timeout_ms,
            agent_grace_ms: policy.agent_grace_ms,
            initial_handle_ms: policy.initial_handle_ms,
            queues: vec![QueueConfig { name: "default".into(), skills: Vec::new(), wait_ms_max: 0, overflow: String::new() }],
            customer_grace_ms: policy.customer_grace_ms,
        }
    }
}

impl DeskPolicyConfig {
    /// The domain's policy (the standard conversation state machine).
    pub fn to_policy(&self) -> crate::cs::DeskPolicy {
        use crate::cs::{Overflow, QueuePolicy, Variant};
        let queues = self
            .queues
            .iter()
            .map(|queue| QueuePolicy {
                name: Text::from(queue.name.as_str()),
                skills: queue.skills.iter().map(|skill| Text::from(skill.as_str())).collect(),
                wait_ms_max: queue.wait_ms_max,
                overflow: if queue.overflow.is_empty() { Overflow::Offline } else { Overflow::Queue(Text::from(queue.overflow.as_str())) },
            })
            .collect();
        let experiment = self
            .experiment
            .iter()
            .map(|variant| Variant { group: Text::from(variant.group.as_str()), weight: variant.weight, strategy: variant.strategy.to_strategy() })
            .collect();
        crate::cs::DeskPolicy {
            strategy: self.strategy.to_strategy(),
            experiment,
            queues,
            offer_timeout_ms: self.offer_timeout_ms,
            agent_grace_ms: self.agent_grace_ms,
            initial_handle_ms: self.initial_handle_ms,
            customer_grace_ms: self.customer_grace_ms,
            ..crate::cs::DeskPolicy::default()
        }
    }

    /// The document for a policy in force (skills come back sorted, as the desk keeps them).
    pub fn from_policy(policy: &crate::cs::DeskPolicy) -> DeskPolicyConfig {
        use crate::cs::Overflow;
        DeskPolicyConfig {
            strategy: StrategySpec::from_strategy(&policy.strategy),
            experiment: policy
                .experiment
                .iter()
                .map(|v| VariantConfig { group: v.group.to_string(), weight: v.weight, strategy: StrategySpec::from_strategy(&v.strategy) })
                .collect(),
            offer_timeout_ms: policy.offer_timeout_ms,
            agent_grace_ms: policy.agent_grace_ms,
            initial_handle_ms: policy.initial_handle_ms,
            queues: policy
                .queues
                .iter()
                .map(|q| QueueConfig {
                    name: q.name.to_string(),
                    skills: q.skills.iter().map(ToString::to_string).collect(),
                    wait_ms_max: q.wait_ms_max,
                    overflow: match &q.overflow {
                        Overflow::Offline => String::new(),
                        Overflow::Queue(target) => target.to_string(),
                    },
                })
                .collect(),
            customer_grace_ms: policy.customer_grace_ms,
        }
    }

    /// Checks the whole document against a desk's limits, as the desk itself would, plus what
    /// only the document has (agent ids in weights, opening ranges): `Err` is the reason, for
    /// a 400 or a configuration error. Nothing is changed by a refused document.
    pub fn validate(&self, limits: &crate::cs::DeskLimits) -> Result<(), String> {
        self.strategy.check("strategy")?;
        for variant in &self.experiment {
            variant.strategy.check(&format!("experiment group `{}`: strategy", variant.group))?;
        }
        crate::cs::TenantDesk::new(limits.clone(), self.to_policy()).map(drop).map_err(|error| error.to_string())
    }
}

/// A tenant's customer-service desk: its policy (which the control API may replace at run
/// time) and its count limits (fixed at start; see `cs::desk`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct DeskConfig {
    /// Strategy, A/B experiment, timeouts and queues: the keys of [`DeskPolicyConfig`],
    /// written directly in the desk's section.
    #[serde(flatten)]
    pub policy: DeskPolicyConfig,
    /// Open conversations of the tenant; `OPEN_CONVERSATION` past it gets ERROR(LimitExceeded).
    pub conversations_max: usize,
    /// Agents of the tenant (kept once seen).
    pub agents_max: usize,
    /// Conversations waiting in one queue.
    pub queue_length_max: usize,
    /// Longest `OPEN_CONVERSATION` context kept and shown to the agent, in bytes (≤ 1024).
    pub context_bytes_max: usize,
    /// The tenant's tickets.
    pub tickets: TicketsConfig,
}

impl Default for DeskConfig {
    fn default() -> Self {
        let limits = crate::cs::DeskLimits::default();
        DeskConfig {
            policy: DeskPolicyConfig::default(),
            conversations_max: limits.conversations_max,
            agents_max: limits.agents_max,
            queue_length_max: limits.queue_length_max,
            context_bytes_max: limits.context_bytes_max,
            tickets: TicketsConfig::default(),
        }
    }
}

impl DeskConfig {
    /// The desk's policy.
    pub fn policy(&self) -> crate::cs::DeskPolicy {
        self.policy.to_policy()
    }

    /// The desk's count limits.
    pub fn limits(&self) -> crate::cs::DeskLimits {
        crate::cs::DeskLimits {
            conversations_max: self.conversations_max,
            agents_max: self.agents_max,
            queue_length_max: self.queue_length_max,
            context_bytes_max: self.context_bytes_max,
            ..crate::cs::DeskLimits::default()
        }
    }

    /// The tickets' limits and SLA. A payload limit that would not fit a frame of
    /// `frame_body_bytes_max` (with 2 KiB for the event's other fields) is lowered to fit.
    pub fn ticket_settings(&self, frame_body_bytes_max: u32) -> crate::cs::TicketSettings {
        let t = &self.tickets;
        crate::cs::TicketSettings {
            tickets_max: t.tickets_max,
            closed_tickets_max: t.closed_tickets_max,
            payload_bytes_max: t.payload_bytes_max.min((frame_body_bytes_max as usize).saturating_sub(2048)),
            escalation_level_max: t.escalation_level_max,
            sla_ms: [t.sla_accepted_ms, t.sla_assigned_ms, t.sla_in_progress_ms, t.sla_follow_up_ms],
        }
    }
}

/// A tenant's tickets (`[desk.tickets]`; see `cs::tickets`).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct TicketsConfig {
    /// Tickets not closed; a Create past it gets ERROR(LimitExceeded).
    pub tickets_max: usize,
    /// Closed tickets kept (the oldest is forgotten first).
    pub closed_tickets_max: usize,
    /// Largest ticket payload, in bytes (lowered to `limits.frame_body_bytes_max` - 2048 when
    /// larger: a TICKET_EVENT carries it with ids and fixed fields).
    pub payload_bytes_max: usize,
    /// Highest escalation level.
    pub escalation_level_max: u8,
    /// SLA of each state, in milliseconds (0: none): past it the escalation level rises.
    pub sla_accepted_ms: u64,
    /// See `sla_accepted_ms`.
    pub sla_assigned_ms: u64,
    /// See `sla_accepted_ms`.
    pub sla_in_progress_ms: u64,
    /// See `sla_accepted_ms`.
    pub sla_follow_up_ms: u64,
}

impl Default for TicketsConfig {
    fn default() -> Self {
        let d = crate::cs::TicketSettings::default();
        TicketsConfig {
            tickets_max: d.tickets_max,
            closed_tickets_max: d.closed_tickets_max,
            payload_bytes_max: d.payload_bytes_max,
            escalation_level_max: d.escalation_level_max,
            sla_accepted_ms: d.sla_ms[0],
            sla_assigned_ms: d.sla_ms[1],
            sla_in_progress_ms: d.sla_ms[2],
            sla_follow_up_ms: d.sla_ms[3],
        }
    }
}

/// The control port's API (see `control.rs` and the README's "Control API" section).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct ControlConfig {
    /// Bearer token for writes (`PUT /v1/tenants/{id}/policy`): requests must carry
    /// `Authorization: Bearer <admin_token>`. Empty (the default): writes are disabled (403);
    /// reads need no token. At least 16 bytes when set.
    pub admin_token: String,
    /// Most items one list answer holds (agents per page); a request's `limit` is capped at it.
    pub page_items_max: usize,
}

impl Default for ControlConfig {
    fn default() -> Self {
        ControlConfig { admin_token: String::new(), page_items_max: 500 }
    }
}

/// Shortest admin token accepted, in bytes.
pub const ADMIN_TOKEN_BYTES_MIN: usize = 16;

impl ControlConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        if !self.admin_token.is_empty() && self.admin_token.len() < ADMIN_TOKEN_BYTES_MIN {
            return Err(ConfigError::Invalid {
                key: "control.admin_token",
                problem: format!("must be empty (writes disabled) or at least {ADMIN_TOKEN_BYTES_MIN} bytes"),
            });
        }
        if self.page_items_max == 0 || self.page_items_max > 100_000 {
            return Err(ConfigError::Invalid { key: "control.page_items_max", problem: "must be between 1 and 100000".into() });
        }
        Ok(())
    }
}

/// Token buckets. Each rate is refilled continuously and holds at most `burst_ms` worth of it;
/// a request over it gets ERROR(RateLimited) and changes nothing. A rate of 0 is no limit (the
/// default: benchmarks push one gateway connection past a million publishes per second).
/// Tenant rates are shared by the tenant's connections on all shards: each shard enforces
/// `rate / shards` (connections are spread over shards by the kernel).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
#[serde(default, deny_unknown_fields)]
pub struct RateLimitsConfig {
    /// How much of a rate a bucket holds, in milliseconds of that rate (the burst).
    pub burst_ms: u64,
    /// PUBLISH frames per connection, per second.
    pub connection_publishes_per_s: u64,
    /// PUBLISH payload bytes per connection, per second.
    pub connection_publish_bytes_per_s: u64,
    /// `OPEN_CONVERSATION` frames per connection, per second.
    pub connection_opens_per_s: u64,
    /// SUBSCRIBE frames per connection, per second.
    pub connection_subscribes_per_s: u64,
    /// READ_CURSOR and TYPING frames per connection, per second.
    pub connection_signals_per_s: u64,
    /// PUBLISH frames per tenant, per second.
    pub tenant_publishes_per_s: u64,
    /// PUBLISH payload bytes per tenant, per second.
    pub tenant_publish_bytes_per_s: u64,
    /// `OPEN_CONVERSATION` frames per tenant, per second.
    pub tenant_opens_per_s: u64,
    /// SUBSCRIBE frames per tenant, per second.
    pub tenant_subscribes_per_s: u64,
    /// READ_CURSOR and TYPING frames per tenant, per second.
    pub tenant_signals_per_s: u64,
}

impl RateLimitsConfig {
    /// True when no bucket limits anything (every rate 0).
    pub fn is_unlimited(&self) -> bool {
        [
            self.connection_publishes_per_s,
            self.connection_publish_bytes_per_s,
            self.connection_opens_per_s,
            self.connection_subscribes_per_s,
            self.connection_signals_per_s,
            self.tenant_publishes_per_s,
            self.tenant_publish_bytes_per_s,
            self.tenant_opens_per_s,
            self.tenant_subscribes_per_s,
            self.tenant_signals_per_s,
        ]
        .iter()
        .all(|&rate| rate == 0)
    }
}

impl Config {
    /// True when some tenant (or the default) has a rate limit: otherwise the per-request
    /// token-bucket check is skipped.
    pub fn any_rate_limit(&self) -> bool {
        !self.rate_limits.is_unlimited() || self.tenants.iter().any(|t| t.rate_limits.as_ref().is_some_and(|r| !r.is_unlimited()))
    }
}

impl Default for RateLimitsConfig {
    fn default() -> Self {
        RateLimitsConfig {
            burst_ms: 1_000,
            connection_publishes_per_s: 0,
            connection_publish_bytes_per_s: 0,
            connection_opens_per_s: 0,
            connection_subscribes_per_s: 0,
            connection_signals_per_s: 0,
            tenant_publishes_per_s: 0,
            tenant_publish_bytes_per_s: 0,
            tenant_opens_per_s: 0,
            tenant_subscribes_per_s: 0,
            tenant_signals_per_s: 0,
        }
    }
}

/// One HS256 signing key.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct TenantKeyConfig {
    /// Key id, matched against the token header's `kid`; unique across tenants.
    pub kid: String,
    /// The shared secret (at least 32 bytes).
    pub secret: String,
}

/// Token verification settings.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct AuthConfig {
    /// Clock skew tolerated on `exp`, in seconds.
    pub leeway_s: u64,
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig { leeway_s: 5 }
    }
}

/// Where the engine listens and how it is laid out on the machine.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct ServerConfig {
    /// Data port for gateways (the binary protocol).
    pub listen: SocketAddr,
    /// Control port (HTTP: /healthz, /readyz, /metrics).
    pub control: SocketAddr,
    /// Number of shards; 0 = one per CPU the process may run on.
    pub shards: usize,
    /// CPUs to pin shards to, in order; empty = the process's affinity set.
    pub cpus: Vec<usize>,
    /// Where durable state lives.
    pub data_dir: PathBuf,
    /// How long a graceful shutdown may take to flush queued output, in milliseconds.
    pub shutdown_drain_ms: u64,
    /// How often a busy shard stops running tasks to poll for I/O, in microseconds (glommio's
    /// preempt timer). glommio polls its rings only when its task queues run dry or this timer
    /// fires, so under sustained load it bounds how late a ready socket is noticed.
    pub io_poll_interval_us: u64,
}

/// Limits on what clients may do and what the engine keeps.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct LimitsConfig {
    /// Largest frame body accepted, in bytes (at most the protocol's 1 MiB).
    pub frame_body_bytes_max: u32,
    /// Largest PUBLISH payload, in bytes.
    pub payload_bytes_max: u32,
    /// Most subscriptions one connection may hold.
    pub subscriptions_per_connection_max: u32,
    /// Messages kept per session for resume (and the idempotency window).
    pub history_messages_max: u32,
    /// Bytes of history one shard keeps, in one ring shared by its sessions: the oldest
    /// messages are overwritten first, so a session keeps fewer than `history_messages_max`
    /// when the shard's recent traffic no longer fits (resumes reaching further back are told
    /// `recovered = false`). Reserved at start, used as written.
    pub history_bytes_per_shard: usize,
    /// Fault the whole history ring in at start (each shard is then resident at its full
    /// `history_bytes_per_shard` from the first second) instead of as it is first written:
    /// first writes fault in one 2 MiB huge page at a time on the shard's thread, 0.3–2 ms
    /// each on a VM, and every message arriving meanwhile waits (bench/RESULTS.md, session 6).
    pub history_prefault: bool,
    /// Most sessions one shard holds.
    pub sessions_per_shard_max: usize,
    /// A session nobody subscribes to and nobody has published to for this long is dropped
    /// from memory and from the journal's index (retention by age), in milliseconds; a client
    /// resuming it later is told `recovered = false`. 0 = never.
    pub session_idle_ms: u64,
    /// The same for a session whose conversation ended (CLOSED or ABANDONED), in milliseconds:
    /// kept this long for late readers, then dropped. 0 = only `session_idle_ms` applies.
    pub closed_session_linger_ms: u64,
    /// Most connections one shard serves.
    pub connections_per_shard_max: usize,
    /// Outbound bytes buffered per connection before it is a slow consumer.
    pub outbound_bytes_max: usize,
    /// Outbound buffers queued per connection before it is a slow consumer: each message is
    /// one; small replies (PUBACK, OK…) gathered into one buffer count once together.
    pub outbound_frames_max: usize,
    /// A client must send something at least this often, in milliseconds.
    pub keepalive_ms: u32,
    /// Time allowed between accepting a connection and its HELLO, in milliseconds.
    pub handshake_timeout_ms: u64,
    /// After GOAWAY(slow consumer), how long the engine waits for the peer to read it before
    /// cutting the connection, in milliseconds.
    pub slow_consumer_close_ms: u64,
    /// Desk timers (offer, max wait, agent grace) one shard holds; a desk call that would start
    /// one more is carried out without it and logged.
    pub desk_timers_per_shard_max: usize,
}

/// The shard mesh: one bounded SPSC ring per ordered pair of shards, for requests and for
/// events each.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct MeshConfig {
    /// Slots in each ring.
    pub ring_slots: usize,
    /// Messages a shard may have waiting for one peer's ring before producers pause.
    pub backlog_messages_max: usize,
    /// Messages drained from one ring before yielding to other work.
    pub drain_batch_max: usize,
}

/// One size class of the buffer pool.
#[derive(Debug, Clone, Copy, Serialize, Deserialize, PartialEq, Eq)]
#[serde(deny_unknown_fields)]
pub struct SizeClassConfig {
    /// Bytes per buffer.
    pub slot_bytes: usize,
    /// Buffers in the class.
    pub slots: usize,
}

/// The per-shard buffer pool, allocated (mmap) at start.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct PoolConfig {
    /// Size classes, smallest first.
    pub classes: Vec<SizeClassConfig>,
    /// Try to mlock the pool (logged once when the memlock limit refuses).
    pub mlock: bool,
    /// Touch every page at start so no lease page-faults on first use.
    pub prefault: bool,
}

/// The per-shard io_uring used for outbound writes.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct UringConfig {
    /// Submission queue entries.
    pub ring_entries: u32,
    /// Buffers gathered into one send.
    pub iov_per_send_max: usize,
    /// Smallest single-frame send, in bytes, that goes out as zero-copy `SEND_ZC` from the
    /// registered pool (where the kernel has it); 0 (the default): never. Measured on loopback
    /// (bench/RESULTS.md): alone, zero copy starts to pay at 32-64 KiB; in the engine's
    /// fan-out it never did (60 KB frames cost 1.2-1.3x the CPU of copying), because loopback
    /// copies at delivery anyway. For real NICs, where it can pay, try 32768.
    pub send_zc_min_bytes: usize,
    /// Largest fan-out frame, in bytes, that is copied into each subscriber connection's
    /// gathering buffer (one contiguous iovec per send, as replies are) instead of being
    /// queued as the one shared pool buffer; 0: always share. Measured on loopback
    /// (bench/RESULTS.md, session 9): the kernel's per-iovec cost of a gathered send is larger
    /// than copying a small frame, so small chat messages are copied and large frames shared.
    pub fanout_copy_bytes_max: usize,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 7400)),
            control: SocketAddr::from(([127, 0, 0, 1], 7401)),
            shards: 0,
            cpus: Vec::new(),
            data_dir: PathBuf::from("./switchboard-data"),
            shutdown_drain_ms: 2_000,
            io_poll_interval_us: 500,
        }
    }
}

impl Default for LimitsConfig {
    fn default() -> Self {
        LimitsConfig {
            frame_body_bytes_max: 1 << 20,
            payload_bytes_max: 64 * 1024,
            subscriptions_per_connection_max: 100_000,
            history_messages_max: 128,
            history_bytes_per_shard: 32 << 20,
            history_prefault: true,
            sessions_per_shard_max: 2_000_000,
            session_idle_ms: 1_800_000,
            closed_session_linger_ms: 60_000,
            connections_per_shard_max: 65_536,
            outbound_bytes_max: 16 << 20,
            outbound_frames_max: 65_536,
            keepalive_ms: 30_000,
            handshake_timeout_ms: 5_000,
            slow_consumer_close_ms: 1_000,
            desk_timers_per_shard_max: 1_000_000,
        }
    }
}

impl Default for MeshConfig {
    fn default() -> Self {
        MeshConfig { ring_slots: 1024, backlog_messages_max: 8192, drain_batch_max: 256 }
    }
}

impl Default for PoolConfig {
    /// About 17 MiB per shard. A slot is held only until every subscriber's socket has taken
    /// the frame (history keeps its own compact copy), so slots bound messages in flight, not
    /// messages stored: 8192 small slots cover ~8 ms of fan-out at 1 M deliveries/s per shard
    /// before frames fall back to heap buffers (counted in `switchboard_pool_fallbacks_total`).
    /// Prefaulted so the first lease never page-faults; the memory is paid at start, which is
    /// why it is kept this small (the 100 000-session memory benchmark counts it).
    fn default() -> Self {
        let class = |slot_bytes, slots| SizeClassConfig { slot_bytes, slots };
        PoolConfig {
            classes: vec![
                class(256, 8192),
                class(2 << 10, 2048),
                class(16 << 10, 256),
                class(128 << 10, 16),
                class(crate::pool::FRAME_BYTES_MAX, 2),
            ],
            mlock: true,
            prefault: true,
        }
    }
}

impl Default for UringConfig {
    fn default() -> Self {
        // 512 buffers of a 128 B chat message are 64 KiB per sendmsg: large enough that one
        // submission per loop turn keeps up with a busy gateway connection (64 capped a
        // connection at 64 frames per turn and cut busy publishers off as slow consumers).
        UringConfig { ring_entries: 1024, iov_per_send_max: 512, send_zc_min_bytes: 0, fanout_copy_bytes_max: 512 }
    }
}

/// A configuration that cannot work, with the key at fault.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// The file could not be read.
    #[error("cannot read config file {path}: {source}")]
    Read {
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The file is not valid TOML for this schema.
    #[error("invalid config file {path}: {source}")]
    Parse {
        /// The file.
        path: PathBuf,
        /// Why.
        source: toml::de::Error,
    },
    /// A value is out of range.
    #[error("invalid config: {key} {problem}")]
    Invalid {
        /// The key, as written in TOML.
        key: &'static str,
        /// What is wrong.
        problem: String,
    },
}

impl Config {
    /// Reads a TOML file; keys it leaves out keep their defaults.
    pub fn from_file(path: &std::path::Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read { path: path.into(), source })?;
        toml::from_str(&text).map_err(|source| ConfigError::Parse { path: path.into(), source })
    }

    /// Checks every value that could make the engine misbehave.
    pub fn validate(&self) -> Result<(), ConfigError> {
        let invalid = |key, problem: &str| Err(ConfigError::Invalid { key, problem: problem.to_owned() });
        let limits = &self.limits;
        if limits.frame_body_bytes_max == 0 || limits.frame_body_bytes_max > switchboard_protocol::limits::FRAME_BODY_BYTES_MAX {
            return invalid("limits.frame_body_bytes_max", "must be between 1 and 1048576");
        }
        if limits.payload_bytes_max == 0 || limits.payload_bytes_max >= limits.frame_body_bytes_max {
            return invalid("limits.payload_bytes_max", "must be positive and below limits.frame_body_bytes_max");
        }
        if limits.history_messages_max == 0 {
            return invalid("limits.history_messages_max", "must be at least 1");
        }
        if limits.history_bytes_per_shard < HISTORY_FRAMES_MIN * (limits.frame_body_bytes_max as usize + 64) {
            return Err(ConfigError::Invalid {
                key: "limits.history_bytes_per_shard",
                problem: format!("must hold at least {HISTORY_FRAMES_MIN} largest frames (frame_body_bytes_max + 64 bytes each)"),
            });
        }
        if limits.outbound_bytes_max < limits.frame_body_bytes_max as usize + 64 {
            return invalid("limits.outbound_bytes_max", "must hold at least one largest frame");
        }
        // A resume replays up to the whole history at once; it must fit the outbound limit, or
        // the resuming client would be cut off as a slow consumer by its own replay.
        let replay_bytes_max = limits.history_messages_max as usize * (limits.payload_bytes_max as usize + DELIVER_OVERHEAD_BYTES_MAX);
        if limits.outbound_bytes_max < replay_bytes_max {
            return Err(ConfigError::Invalid {
                key: "limits.outbound_bytes_max",
                problem: format!(
                    "must hold a full history replay: history_messages_max x (payload_bytes_max + {DELIVER_OVERHEAD_BYTES_MAX}) = {replay_bytes_max} bytes"
                ),
            });
        }
        if limits.outbound_frames_max == 0 || limits.connections_per_shard_max == 0 || limits.sessions_per_shard_max == 0 {
            return invalid("limits", "counts must be positive");
        }
        if self.mesh.ring_slots < 2 || self.mesh.backlog_messages_max == 0 || self.mesh.drain_batch_max == 0 {
            return invalid("mesh", "ring_slots must be at least 2, other values positive");
        }
        if self.pool.classes.is_empty() || self.pool.classes.windows(2).any(|w| w[0].slot_bytes >= w[1].slot_bytes) {
            return invalid("pool.classes", "must be non-empty and sorted by slot_bytes, ascending");
        }
        if self.pool.classes.iter().any(|c| c.slots == 0 || c.slot_bytes == 0) {
            return invalid("pool.classes", "slot_bytes and slots must be positive");
        }
        if self.uring.ring_entries < 8 || !self.uring.ring_entries.is_power_of_two() {
            return invalid("uring.ring_entries", "must be a power of two, at least 8");
        }
        if self.uring.iov_per_send_max == 0 || self.uring.iov_per_send_max > 1024 {
            return invalid("uring.iov_per_send_max", "must be between 1 and 1024 (IOV_MAX)");
        }
        if self.uring.fanout_copy_bytes_max > crate::shard::GATHER_BUFFER_BYTES {
            return invalid("uring.fanout_copy_bytes_max", "must be at most 2048 (one gathering buffer)");
        }
        if !(50..=100_000).contains(&self.server.io_poll_interval_us) {
            return invalid("server.io_poll_interval_us", "must be between 50 and 100000");
        }
        let mut kids = std::collections::HashSet::new();
        for tenant in &self.tenants {
            if tenant.id.is_empty() || tenant.id.len() > switchboard_protocol::limits::ID_BYTES_MAX {
                return invalid("tenants.id", "must be 1 to 128 bytes");
            }
            if tenant.keys.is_empty() {
                return invalid("tenants.keys", "every tenant needs at least one key");
            }
            if tenant.sessions_per_shard_max == Some(0) {
                return invalid("tenants.sessions_per_shard_max", "must be at least 1 (leave it out for no quota of the tenant's own)");
            }
            for key in &tenant.keys {
                if key.secret.len() < 32 {
                    return invalid("tenants.keys.secret", "must be at least 32 bytes");
                }
                if !kids.insert(key.kid.as_str()) {
                    return invalid("tenants.keys.kid", "must be unique across tenants");
                }
            }
        }
        if let Err(error) = self.journal_store().validate() {
            return Err(ConfigError::Invalid { key: "journal.store", problem: error.to_string() });
        }
        if self.journal_enabled() && self.journal.store.retention_messages_max < limits.history_messages_max {
            return invalid(
                "journal.store.retention_messages_max",
                "must be at least limits.history_messages_max (a restart rebuilds history from it)",
            );
        }
        if self.journal_enabled() && self.journal.store.payload_bytes_max < limits.payload_bytes_max + DELIVER_OVERHEAD_BYTES_MAX as u32 + 1 + 128 + 8 {
            return invalid(
                "journal.store.payload_bytes_max",
                "must hold limits.payload_bytes_max plus a DELIVER frame's overhead, the tenant id and the message id",
            );
        }
        if self.journal.maintenance_interval_ms == 0 || self.journal.snapshot_interval_ms == 0 {
            return invalid("journal", "maintenance_interval_ms and snapshot_interval_ms must be positive");
        }
        if self.limits.desk_timers_per_shard_max == 0 {
            return invalid("limits.desk_timers_per_shard_max", "must be positive");
        }
        let desks = std::iter::once(("desk", &self.desk)).chain(self.tenants.iter().filter_map(|t| t.desk.as_ref().map(|d| ("tenants.desk", d))));
        for (key, desk) in desks {
            if let Err(problem) = desk.policy.validate(&desk.limits()) {
                return Err(ConfigError::Invalid { key, problem });
            }
            if desk.context_bytes_max > switchboard_protocol::limits::MESSAGE_BYTES_MAX {
                return Err(ConfigError::Invalid { key, problem: "context_bytes_max: at most 1024 (it travels in a message field)".into() });
            }
        }
        self.control.validate()?;
        if self.server.shards > 256 {
            return invalid("server.shards", "at most 256");
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_survive_toml() {
        let config = Config::default();
        config.validate().unwrap();
        let text = toml::to_string(&config).unwrap();
        assert_eq!(toml::from_str::<Config>(&text).unwrap(), config);
    }

    #[test]
    fn a_tenant_may_override_the_durability() {
        let mut config = Config::default();
        config.journal.durability = DurabilityMode::None;
        assert!(!config.journal_enabled());
        let key = TenantKeyConfig { kid: "k".into(), secret: "s".repeat(32) };
        config.tenants.push(TenantConfig { id: "acme".into(), keys: vec![key.clone()], durability: Some(DurabilityMode::Interval), desk: None, rate_limits: None, sessions_per_shard_max: None });
        config.tenants.push(TenantConfig { id: "globex".into(), keys: vec![TenantKeyConfig { kid: "g".into(), ..key }], durability: None, desk: None, rate_limits: None, sessions_per_shard_max: None });
        assert_eq!(config.durability_of("acme"), DurabilityMode::Interval);
        assert_eq!(config.durability_of("globex"), DurabilityMode::None);
        assert!(config.journal_enabled());
        // Interval anywhere allows it in the journal (recovery then assumes the worst of a crash).
        assert!(config.journal_store().interval_allowed);
        config.validate().unwrap();
        let text = toml::to_string(&config).unwrap();
        assert!(text.contains("durability = \"interval\""), "{text}");
        assert_eq!(toml::from_str::<Config>(&text).unwrap(), config);
    }

    #[test]
    fn unknown_keys_and_bad_values_are_refused() {
        assert!(toml::from_str::<Config>("[server]\nlisten_typo = 1").is_err());
        let mut config = Config::default();
        config.limits.payload_bytes_max = config.limits.frame_body_bytes_max;
        let error = config.validate().unwrap_err().to_string();
        assert!(error.contains("limits.payload_bytes_max"), "{error}");
        let mut config = Config::default();
        config.uring.fanout_copy_bytes_max = crate::shard::GATHER_BUFFER_BYTES + 1;
        let error = config.validate().unwrap_err().to_string();
        assert!(error.contains("uring.fanout_copy_bytes_max"), "{error}");
        config.uring.fanout_copy_bytes_max = 0;
        config.validate().unwrap();
    }

    #[test]
    fn every_strategy_and_an_experiment_read_from_the_file() {
        let text = r#"
            [desk]
            offer_timeout_ms = 500
            [desk.strategy]
            kind = "business-hours"
            utc_offset_minutes = 60
            open = [{ weekday = 0, start_minute = 540, end_minute = 1020 }]
            inner = { kind = "affinity", fallback = { kind = "weighted-round-robin", weights = { ann = 5, bob = 1 } } }
            [[desk.experiment]]
            group = "a"
            weight = 70
            strategy = "skill-based"
            [[desk.experiment]]
            group = "b"
            weight = 30
        "#;
        let config: Config = toml::from_str(text).unwrap();
        config.validate().unwrap();
        let policy = &config.desk.policy;
        let wrr = StrategySpec::WeightedRoundRobin { weights: [("ann".to_owned(), 5), ("bob".to_owned(), 1)].into(), default_weight: 1 };
        let expected = StrategySpec::BusinessHours {
            utc_offset_minutes: 60,
            open: vec![OpenRangeConfig { weekday: 0, start_minute: 540, end_minute: 1020 }],
            inner: Box::new(StrategySpec::Affinity { fallback: Box::new(wrr) }),
        };
        assert_eq!(policy.strategy, expected);
        assert_eq!(policy.experiment[1].strategy, StrategySpec::LeastLoad);
        assert_eq!(policy.offer_timeout_ms, 500);
        // The file, the API (JSON) and the policy in force describe the same document.
        assert_eq!(DeskPolicyConfig::from_policy(&policy.to_policy()), *policy);
        let json = serde_json::to_string(policy).unwrap();
        assert_eq!(serde_json::from_str::<DeskPolicyConfig>(&json).unwrap(), *policy);
        let again = toml::to_string(&config).unwrap();
        assert_eq!(toml::from_str::<Config>(&again).unwrap(), config, "{again}");
        // The short names still read as before.
        let affinity: Config = toml::from_str("[desk]\nstrategy = \"affinity\"").unwrap();
        assert_eq!(affinity.desk.policy.strategy, StrategySpec::Affinity { fallback: Box::new(StrategySpec::LeastLoad) });
    }

    #[test]
    fn bad_strategy_documents_are_refused_with_the_reason() {
        let parse = |text: &str| toml::from_str::<Config>(text).map_err(|e| e.to_string());
        assert!(parse("[desk]\nstrategy = \"round-robin\"").unwrap_err().contains("round-robin"));
        assert!(parse("[desk]\nstrategy = \"weighted-round-robin\"").unwrap_err().contains("needs its settings"));
        assert!(parse("[desk.strategy]\nkind = \"least-load\"\nweights = {}").unwrap_err().contains("weights"));
        assert!(parse("[desk]\nbogus = 1").unwrap_err().contains("bogus"));
        let invalid = |strategy: StrategySpec| {
            let policy = DeskPolicyConfig { strategy, ..DeskPolicyConfig::default() };
            policy.validate(&crate::cs::DeskLimits::default()).unwrap_err()
        };
        let zero = StrategySpec::WeightedRoundRobin { weights: BTreeMap::new(), default_weight: 0 };
        assert!(invalid(zero).contains("every weight is 0"));
        let empty_id = StrategySpec::WeightedRoundRobin { weights: [(String::new(), 1)].into(), default_weight: 1 };
        assert!(invalid(empty_id).contains("agent id"));
        let hours = StrategySpec::BusinessHours {
            utc_offset_minutes: 0,
            open: vec![OpenRangeConfig { weekday: 7, start_minute: 0, end_minute: 1 }],
            inner: Box::new(StrategySpec::LeastLoad),
        };
        assert!(invalid(hours).contains("opening range"));
        let mut config = Config::default();
        config.desk.policy.experiment = vec![VariantConfig { group: "a".into(), weight: 0, strategy: StrategySpec::LeastLoad }];
        assert!(config.validate().unwrap_err().to_string().contains("weights sum to 0"));
        config.desk.policy.experiment.clear();
        config.control.admin_token = "short".into();
        assert!(config.validate().unwrap_err().to_string().contains("control.admin_token"));
    }
}
