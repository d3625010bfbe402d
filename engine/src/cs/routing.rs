//! Routing: which available agent gets a conversation, chosen per tenant among strategies
//! behind one trait, and A/B experiments that split new conversations across strategies.
//!
//! It owns the choice and the strategies' own state (round-robin counters); it never changes an
//! agent or a conversation. The desk first narrows the agents to the *candidates* (online,
//! connected, spare capacity, the queue's skills, not having declined this conversation, and
//! [`RoutingStrategy::eligible`]), then asks [`RoutingStrategy::pick`] for one of them.
//!
//! The contract every strategy keeps, so that "the longest-waiting eligible conversation is
//! offered first" holds: `pick` returns one of the candidates whenever there is any. Who may be
//! chosen is the business of `eligible`, not of `pick`.
//!
//! That trait and its five strategies define *what* is chosen. The desk itself does not build
//! the candidate list (O(agents) per decision): it routes through `Router`, built from the
//! same [`StrategyConfig`], which makes the same choice from the agent table's least-load
//! indexes and, for weighted round-robin, lazily kept counters — see `Router` for the cost of
//! each. A test drives both side by side on random states and requires the same agent each time.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use switchboard_protocol::Text;

use super::agents::{Agent, AgentKey, AgentTable};

/// What a strategy knows about the conversation being routed.
#[derive(Debug, Clone, Copy)]
pub struct ConversationInfo<'a> {
    /// The conversation's session id.
    pub session: &'a Text,
    /// The customer.
    pub customer: &'a Text,
    /// 0 (lowest) to 255.
    pub priority: u8,
    /// Skills asked for, sorted.
    pub skills: &'a [Text],
    /// The queue it waits in.
    pub queue: &'a Text,
    /// The agent who last served this customer, if the desk remembers one.
    pub last_agent: Option<AgentKey>,
}

/// The candidates for one conversation, over the tenant's agent table.
#[derive(Debug, Clone, Copy)]
pub struct AgentsView<'a> {
    table: &'a AgentTable,
    /// Sorted by key.
    candidates: &'a [AgentKey],
}

impl<'a> AgentsView<'a> {
    /// A view of `candidates` (sorted by key, all present in `table`).
    pub fn new(table: &'a AgentTable, candidates: &'a [AgentKey]) -> AgentsView<'a> {
        AgentsView { table, candidates }
    }

    /// The candidates, in key order.
    pub fn candidates(&self) -> impl Iterator<Item = (AgentKey, &'a Agent)> + '_ {
        self.candidates.iter().filter_map(|&key| self.table.get(key).map(|agent| (key, agent)))
    }

    /// True when `key` is a candidate.
    pub fn is_candidate(&self, key: AgentKey) -> bool {
        self.candidates.binary_search(&key).is_ok()
    }

    /// How many candidates there are.
    pub fn len(&self) -> usize {
        self.candidates.len()
    }

    /// True when there is none.
    pub fn is_empty(&self) -> bool {
        self.candidates.is_empty()
    }

    /// Any agent of the table (candidate or not).
    pub fn agent(&self, key: AgentKey) -> Option<&'a Agent> {
        self.table.get(key)
    }
}

/// A routing strategy. See the module comment for the contract.
pub trait RoutingStrategy: std::fmt::Debug {
    /// A short name for metrics and logs.
    fn name(&self) -> &'static str;

    /// May `agent` take `conv` under this strategy? (On top of the desk's own checks.)
    fn eligible(&self, _conv: &ConversationInfo<'_>, _key: AgentKey, _agent: &Agent) -> bool {
        true
    }

    /// One of the candidates, or `None` only when there is none.
    fn pick(&mut self, conv: &ConversationInfo<'_>, agents: &AgentsView<'_>, now_ms: u64) -> Option<AgentKey>;

    /// False when new conversations get the offline outcome at `now_ms` (business hours).
    fn open_at(&self, _now_ms: u64) -> bool {
        true
    }
}

/// The candidate with the most spare capacity; ties go to the one offered work least recently,
/// then to the lowest key.
pub(crate) fn least_load(agents: &AgentsView<'_>) -> Option<AgentKey> {
    agents
        .candidates()
        .min_by_key(|(key, agent)| (std::cmp::Reverse(agent.spare()), agent.last_offer_seq(), *key))
        .map(|(key, _)| key)
}

/// Most spare capacity first.
#[derive(Debug, Default)]
pub struct LeastLoad;

impl RoutingStrategy for LeastLoad {
    fn name(&self) -> &'static str {
        "least_load"
    }
    fn pick(&mut self, _conv: &ConversationInfo<'_>, agents: &AgentsView<'_>, _now_ms: u64) -> Option<AgentKey> {
        least_load(agents)
    }
}

/// Only agents with every skill the conversation asks for, then least load.
#[derive(Debug, Default)]
pub struct SkillBased;

impl RoutingStrategy for SkillBased {
    fn name(&self) -> &'static str {
        "skill_based"
    }
    fn eligible(&self, conv: &ConversationInfo<'_>, _key: AgentKey, agent: &Agent) -> bool {
        agent.has_skills(conv.skills)
    }
    fn pick(&mut self, _conv: &ConversationInfo<'_>, agents: &AgentsView<'_>, _now_ms: u64) -> Option<AgentKey> {
        least_load(agents)
    }
}

/// Smooth weighted round-robin (nginx's): each pick adds every candidate's weight to its
/// current value, takes the largest, and subtracts the total from the one taken. Over time each
/// agent gets its weight's share, interleaved rather than in bursts. Agents absent from the
/// weights get `default_weight`; weight 0 means never.
#[derive(Debug)]
pub struct WeightedRoundRobin {
    weights: HashMap<Text, u32>,
    default_weight: u32,
    /// Current value per agent key.
    current: Vec<i64>,
}

impl WeightedRoundRobin {
    /// A strategy with these weights.
    pub fn new(weights: &[(Text, u32)], default_weight: u32) -> WeightedRoundRobin {
        WeightedRoundRobin { weights: weights.iter().cloned().collect(), default_weight, current: Vec::new() }
    }

    fn weight(&self, agent: &Agent) -> u32 {
        self.weights.get(agent.id()).copied().unwrap_or(self.default_weight)
    }
}

impl RoutingStrategy for WeightedRoundRobin {
    fn name(&self) -> &'static str {
        "weighted_round_robin"
    }
    fn eligible(&self, _conv: &ConversationInfo<'_>, _key: AgentKey, agent: &Agent) -> bool {
        self.weight(agent) > 0
    }
    fn pick(&mut self, _conv: &ConversationInfo<'_>, agents: &AgentsView<'_>, _now_ms: u64) -> Option<AgentKey> {
        let mut total = 0i64;
        let mut best: Option<AgentKey> = None;
        for (key, agent) in agents.candidates() {
            let weight = i64::from(self.weight(agent));
            if weight == 0 {
                continue;
            }
            let index = key.0 as usize;
            if self.current.len() <= index {
                self.current.resize(index + 1, 0);
            }
            self.current[index] += weight;
            total += weight;
            if best.is_none_or(|b| self.current[index] > self.current[b.0 as usize]) {
                best = Some(key);
            }
        }
        if let Some(key) = best {
            self.current[key.0 as usize] -= total;
        }
        best
    }
}

/// The agent who last served this customer when it is a candidate; otherwise the fallback.
#[derive(Debug)]
pub struct Affinity {
    fallback: Box<dyn RoutingStrategy>,
}

impl Affinity {
    /// Affinity over `fallback`.
    pub fn new(fallback: Box<dyn RoutingStrategy>) -> Affinity {
        Affinity { fallback }
    }
}

impl RoutingStrategy for Affinity {
    fn name(&self) -> &'static str {
        "affinity"
    }
    fn eligible(&self, conv: &ConversationInfo<'_>, key: AgentKey, agent: &Agent) -> bool {
        conv.last_agent == Some(key) || self.fallback.eligible(conv, key, agent)
    }
    fn pick(&mut self, conv: &ConversationInfo<'_>, agents: &AgentsView<'_>, now_ms: u64) -> Option<AgentKey> {
        match conv.last_agent {
            Some(last) if agents.is_candidate(last) => Some(last),
            _ => self.fallback.pick(conv, agents, now_ms),
        }
    }
    fn open_at(&self, now_ms: u64) -> bool {
        self.fallback.open_at(now_ms)
    }
}

/// One opening range: `weekday` (0 = Monday … 6 = Sunday), minutes since local midnight,
/// `start_minute` included, `end_minute` excluded. A range past midnight is written as two.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OpenRange {
    /// 0 = Monday … 6 = Sunday.
    pub weekday: u8,
    /// First open minute of the day, 0..1440.
    pub start_minute: u16,
    /// First closed minute after it, `start_minute + 1..=1440`.
    pub end_minute: u16,
}

/// Opening hours in a fixed UTC offset (no daylight-saving rules: the control plane updates
/// the offset when the tenant's clocks change).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BusinessHours {
    /// Local time minus UTC, in minutes (−720..=840).
    pub utc_offset_minutes: i32,
    /// When it is open.
    pub open: Vec<OpenRange>,
}

impl BusinessHours {
    /// Checks ranges and offset.
    pub fn validate(&self) -> Result<(), String> {
        if !(-720..=840).contains(&self.utc_offset_minutes) {
            return Err(format!("utc_offset_minutes {} outside -720..=840", self.utc_offset_minutes));
        }
        for range in &self.open {
            if range.weekday > 6 || range.start_minute >= range.end_minute || range.end_minute > 1440 {
                return Err(format!("bad opening range {range:?}"));
            }
        }
        Ok(())
    }

    /// True when open at `now_ms` (Unix time in milliseconds).
    pub fn is_open(&self, now_ms: u64) -> bool {
        let local_minutes = i64::try_from(now_ms / 60_000).unwrap_or(i64::MAX - 1440) + i64::from(self.utc_offset_minutes);
        let day = local_minutes.div_euclid(1440);
        let minute = local_minutes.rem_euclid(1440) as u16;
        // 1970-01-01 was a Thursday (weekday 3 counting from Monday = 0).
        let weekday = (day + 3).rem_euclid(7) as u8;
        self.open.iter().any(|r| r.weekday == weekday && r.start_minute <= minute && minute < r.end_minute)
    }
}

/// Out of hours → the offline outcome for new conversations; in hours → `inner`.
#[derive(Debug)]
pub struct BusinessHoursGate {
    hours: BusinessHours,
    inner: Box<dyn RoutingStrategy>,
}

impl BusinessHoursGate {
    /// `inner`, gated by `hours`.
    pub fn new(hours: BusinessHours, inner: Box<dyn RoutingStrategy>) -> BusinessHoursGate {
        BusinessHoursGate { hours, inner }
    }
}

impl RoutingStrategy for BusinessHoursGate {
    fn name(&self) -> &'static str {
        "business_hours"
    }
    fn eligible(&self, conv: &ConversationInfo<'_>, key: AgentKey, agent: &Agent) -> bool {
        self.inner.eligible(conv, key, agent)
    }
    fn pick(&mut self, conv: &ConversationInfo<'_>, agents: &AgentsView<'_>, now_ms: u64) -> Option<AgentKey> {
        self.inner.pick(conv, agents, now_ms)
    }
    fn open_at(&self, now_ms: u64) -> bool {
        self.hours.is_open(now_ms) && self.inner.open_at(now_ms)
    }
}

/// Deepest nesting of wrapping strategies (affinity over business hours over …).
pub const STRATEGY_DEPTH_MAX: usize = 4;

/// A strategy as configured (what the control plane sends).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StrategyConfig {
    /// [`LeastLoad`].
    LeastLoad,
    /// [`WeightedRoundRobin`].
    WeightedRoundRobin {
        /// Weight per agent id.
        weights: Vec<(Text, u32)>,
        /// Weight of agents not listed.
        default_weight: u32,
    },
    /// [`SkillBased`].
    SkillBased,
    /// [`Affinity`].
    Affinity {
        /// Used when the last agent is not a candidate.
        fallback: Box<StrategyConfig>,
    },
    /// [`BusinessHoursGate`].
    BusinessHours {
        /// When open.
        hours: BusinessHours,
        /// Routing while open.
        inner: Box<StrategyConfig>,
    },
}

impl StrategyConfig {
    /// Checks nesting, weights and hours; `agents_max` bounds the weight list.
    pub fn validate(&self, agents_max: usize) -> Result<(), String> {
        self.validate_at(agents_max, 1)
    }

    fn validate_at(&self, agents_max: usize, depth: usize) -> Result<(), String> {
        if depth > STRATEGY_DEPTH_MAX {
            return Err(format!("strategies nested deeper than {STRATEGY_DEPTH_MAX}"));
        }
        match self {
            StrategyConfig::LeastLoad | StrategyConfig::SkillBased => Ok(()),
            StrategyConfig::WeightedRoundRobin { weights, default_weight } => {
                if weights.len() > agents_max {
                    return Err(format!("{} weights for at most {agents_max} agents", weights.len()));
                }
                if *default_weight == 0 && weights.iter().all(|(_, w)| *w == 0) {
                    return Err("every weight is 0: nobody could be picked".into());
                }
                Ok(())
            }
            StrategyConfig::Affinity { fallback } => fallback.validate_at(agents_max, depth + 1),
            StrategyConfig::BusinessHours { hours, inner } => {
                hours.validate()?;
                inner.validate_at(agents_max, depth + 1)
            }
        }
    }

    /// A fresh strategy (round-robin state starts at zero).
    pub fn build(&self) -> Box<dyn RoutingStrategy> {
        match self {
            StrategyConfig::LeastLoad => Box::new(LeastLoad),
            StrategyConfig::SkillBased => Box::new(SkillBased),
            StrategyConfig::WeightedRoundRobin { weights, default_weight } => {
                Box::new(WeightedRoundRobin::new(weights, *default_weight))
            }
            StrategyConfig::Affinity { fallback } => Box::new(Affinity::new(fallback.build())),
            StrategyConfig::BusinessHours { hours, inner } => Box::new(BusinessHoursGate::new(hours.clone(), inner.build())),
        }
    }
}

impl StrategyConfig {
    /// The desk's fast form of this strategy (see [`Router`]); state starts at zero, as with
    /// [`StrategyConfig::build`].
    pub(crate) fn router(&self) -> Router {
        match self {
            StrategyConfig::LeastLoad => Router::LeastLoad,
            StrategyConfig::SkillBased => Router::SkillBased,
            StrategyConfig::WeightedRoundRobin { weights, default_weight } => {
                Router::WeightedRoundRobin(WrrRouter::new(weights, *default_weight))
            }
            StrategyConfig::Affinity { fallback } => Router::Affinity(Box::new(fallback.router())),
            StrategyConfig::BusinessHours { hours, inner } => Router::BusinessHours(hours.clone(), Box::new(inner.router())),
        }
    }
}

/// One routing question as the desk asks it: the desk's own checks (available, the queue's
/// skills, not declined, in the pool) plus what the strategies look at. Skills are the agent
/// table's interned ids, sorted.
#[derive(Debug, Clone, Copy)]
pub(crate) struct RouteQuery<'a> {
    pub(crate) table: &'a AgentTable,
    /// The queue's skills.
    pub(crate) queue_skills: &'a [u32],
    /// The conversation's skills; `None` when it asks for one no agent ever had.
    pub(crate) conv_skills: Option<&'a [u32]>,
    /// Agents that declined the conversation.
    pub(crate) declined: &'a [AgentKey],
    /// `None`: every available agent; `Some`: only these (sorted by key).
    pub(crate) pool: Option<&'a [AgentKey]>,
    /// The agent who last served the customer.
    pub(crate) last_agent: Option<AgentKey>,
}

impl RouteQuery<'_> {
    /// The desk's checks, without the pool: a candidate as far as the desk is concerned.
    fn admits(&self, key: AgentKey, agent: &Agent) -> bool {
        agent.is_available() && agent.has_skill_ids(self.queue_skills) && !self.declined.contains(&key)
    }

    /// True when `key` is a candidate for every strategy that accepts it.
    fn is_candidate(&self, key: AgentKey) -> bool {
        self.pool.is_none_or(|pool| pool.binary_search(&key).is_ok())
            && self.table.get(key).is_some_and(|agent| self.admits(key, agent))
    }

    /// [`least_load`] over the candidates that also have `also` (the conversation's skills for
    /// skill-based routing, else nothing).
    fn least_load(&self, also: &[u32]) -> Option<AgentKey> {
        match self.pool {
            None => self.table.least_loaded(self.queue_skills, also, |key, _| !self.declined.contains(&key)),
            Some(pool) => pool
                .iter()
                .filter_map(|&key| self.table.get(key).map(|agent| (key, agent)))
                .filter(|&(key, agent)| self.admits(key, agent) && agent.has_skill_ids(also))
                .filter_map(|(_, agent)| agent.load_key())
                .min()
                .map(super::agents::key_of_load_order),
        }
    }
}

/// A strategy as the desk runs it: the same choices as the [`RoutingStrategy`] built from the
/// same [`StrategyConfig`] (the same agent for the same state), made from the agent table's
/// indexes instead of a list of every candidate:
/// - least-load and skill-based: the first agent of the least-load order (overall, or of the
///   rarest skill asked for) that passes the checks — cost: the agents skipped;
/// - affinity: the last agent when it is a candidate (one lookup), else the fallback;
/// - business hours: a gate on opening (`open_at`), routing by the inner strategy;
/// - weighted round-robin: nginx's smooth WRR with the counters kept lazily per class of agents
///   (see [`WrrRouter`]): cost about the classes × distinct weights, not the candidates.
#[derive(Debug)]
pub(crate) enum Router {
    LeastLoad,
    SkillBased,
    WeightedRoundRobin(WrrRouter),
    Affinity(Box<Router>),
    BusinessHours(BusinessHours, Box<Router>),
}

impl Router {
    /// As [`RoutingStrategy::open_at`].
    pub(crate) fn open_at(&self, now_ms: u64) -> bool {
        match self {
            Router::LeastLoad | Router::SkillBased | Router::WeightedRoundRobin(_) => true,
            Router::Affinity(fallback) => fallback.open_at(now_ms),
            Router::BusinessHours(hours, inner) => hours.is_open(now_ms) && inner.open_at(now_ms),
        }
    }

    /// The candidate chosen, `None` only when there is none: `pick` over the candidates that
    /// `eligible` and the desk's checks leave.
    pub(crate) fn route(&mut self, query: &RouteQuery<'_>) -> Option<AgentKey> {
        match self {
            Router::LeastLoad => query.least_load(&[]),
            Router::SkillBased => query.least_load(query.conv_skills?),
            Router::WeightedRoundRobin(wrr) => wrr.route(query),
            Router::Affinity(fallback) => match query.last_agent {
                Some(last) if query.is_candidate(last) => Some(last),
                _ => fallback.route(query),
            },
            Router::BusinessHours(_, inner) => inner.route(query),
        }
    }
}

/// [`WeightedRoundRobin`] for the desk: the same counters and the same choices, kept so that a
/// pick costs about the number of agent *classes* rather than the number of candidates.
///
/// Smooth WRR adds each candidate's weight to its counter on every pick. Candidates of a pick
/// are the active agents (available, weight > 0) having the queue's skills, less the few that
/// declined. So active agents are grouped into classes by which of the queues' skill sets
/// (`reqs`, those routed so far) they have; a pick for a queue adds 1 to the `offset` of every
/// class having that queue's set, and an agent's counter is `value + weight × offset` of its
/// class. Inside a class, agents of one weight keep their order by `value` as offsets move, so
/// each (class, weight) group is a sorted set and the pick looks only at the head of each
/// (declined agents skipped, their counters corrected one by one). An agent leaving or
/// entering the active set (availability, skills) is re-filed from the table's change log.
#[derive(Debug)]
pub(crate) struct WrrRouter {
    weights: HashMap<Text, u32>,
    default_weight: u32,
    /// Weight per agent key, resolved once (an agent keeps its key and id for the desk's life).
    by_key: Vec<u32>,
    /// Per agent key: its class while active, else `None`.
    class_of: Vec<Option<u32>>,
    /// Per agent key: `value` while active (counter = value + weight × class offset), else the
    /// counter itself.
    value: Vec<i128>,
    /// Queue skill sets seen (interned ids, sorted); a class is a subset of their indexes.
    reqs: Vec<Vec<u32>>,
    classes: Vec<WrrClass>,
    class_by_sig: HashMap<Vec<u16>, u32>,
    /// How far the table's change log has been read.
    synced_to: Option<u64>,
}

#[derive(Debug, Default)]
struct WrrClass {
    /// Indexes into `reqs` of the skill sets its agents have, sorted.
    sig: Vec<u16>,
    offset: i128,
    /// Summed weight of its agents.
    weight_sum: i128,
    /// Per weight: its agents by (value descending, key).
    groups: BTreeMap<u32, BTreeSet<(std::cmp::Reverse<i128>, u32)>>,
}

impl WrrRouter {
    fn new(weights: &[(Text, u32)], default_weight: u32) -> WrrRouter {
        WrrRouter {
            weights: weights.iter().cloned().collect(),
            default_weight,
            by_key: Vec::new(),
            class_of: Vec::new(),
            value: Vec::new(),
            reqs: Vec::new(),
            classes: Vec::new(),
            class_by_sig: HashMap::new(),
            synced_to: None,
        }
    }

    /// Current counter of agent `index`.
    fn counter(&self, index: usize) -> i128 {
        match self.class_of[index] {
            Some(class) => self.value[index] + i128::from(self.by_key[index]) * self.classes[class as usize].offset,
            None => self.value[index],
        }
    }

    fn deactivate(&mut self, index: usize) {
        let Some(class) = self.class_of[index] else { return };
        let counter = self.counter(index);
        let weight = self.by_key[index];
        let c = &mut self.classes[class as usize];
        if let Some(group) = c.groups.get_mut(&weight) {
            group.remove(&(std::cmp::Reverse(self.value[index]), index as u32));
        }
        c.weight_sum -= i128::from(weight);
        self.class_of[index] = None;
        self.value[index] = counter;
    }

    fn activate(&mut self, index: usize, agent: &Agent) {
        let weight = self.by_key[index];
        if weight == 0 || !agent.is_available() {
            return;
        }
        let sig: Vec<u16> =
            self.reqs.iter().enumerate().filter(|(_, req)| agent.has_skill_ids(req)).map(|(i, _)| i as u16).collect();
        let class = if let Some(&class) = self.class_by_sig.get(&sig) {
            class
        } else {
            let class = self.classes.len() as u32;
            self.classes.push(WrrClass { sig: sig.clone(), ..WrrClass::default() });
            self.class_by_sig.insert(sig, class);
            class
        };
        let c = &mut self.classes[class as usize];
        let value = self.value[index] - i128::from(weight) * c.offset;
        c.groups.entry(weight).or_default().insert((std::cmp::Reverse(value), index as u32));
        c.weight_sum += i128::from(weight);
        self.class_of[index] = Some(class);
        self.value[index] = value;
    }

    /// Sets `value` of active agent `index` (re-filing it in its group).
    fn set_value(&mut self, index: usize, value: i128) {
        if let Some(class) = self.class_of[index] {
            let weight = self.by_key[index];
            if let Some(group) = self.classes[class as usize].groups.get_mut(&weight) {
                group.remove(&(std::cmp::Reverse(self.value[index]), index as u32));
                group.insert((std::cmp::Reverse(value), index as u32));
            }
        }
        self.value[index] = value;
    }

    /// Every agent filed again (classes rebuilt): after a new queue skill set or a dropped log.
    fn refile_all(&mut self, table: &AgentTable) {
        for index in 0..self.by_key.len() {
            self.deactivate(index);
        }
        self.classes.clear();
        self.class_by_sig.clear();
        for (key, agent) in table.iter() {
            self.activate(key.0 as usize, agent);
        }
    }

    /// Catches up with the table: new agents' weights, then availability and skill changes.
    fn sync(&mut self, table: &AgentTable) {
        while self.by_key.len() < table.len() {
            let key = AgentKey(self.by_key.len() as u32);
            let weight = table.get(key).and_then(|a| self.weights.get(a.id()).copied()).unwrap_or(self.default_weight);
            self.by_key.push(weight);
            self.class_of.push(None);
            self.value.push(0);
        }
        if let Some(changes) = self.synced_to.and_then(|from| table.changes_since(from)) {
            for &key in changes {
                let index = key.0 as usize;
                self.deactivate(index);
                if let Some(agent) = table.get(key) {
                    self.activate(index, agent);
                }
            }
        } else {
            self.refile_all(table);
        }
        self.synced_to = Some(table.changes_end());
    }

    fn route(&mut self, query: &RouteQuery<'_>) -> Option<AgentKey> {
        self.sync(query.table);
        match query.pool {
            Some(pool) => self.route_pool(query, pool),
            None => self.route_all(query),
        }
    }

    /// Over a few agents: as [`WeightedRoundRobin::pick`], on the lazy counters.
    fn route_pool(&mut self, query: &RouteQuery<'_>, pool: &[AgentKey]) -> Option<AgentKey> {
        let mut total = 0i128;
        let mut best: Option<(i128, usize)> = None;
        for &key in pool {
            let index = key.0 as usize;
            let Some(agent) = query.table.get(key) else { continue };
            let weight = i128::from(self.by_key[index]);
            if weight == 0 || !query.admits(key, agent) {
                continue;
            }
            self.set_value(index, self.value[index] + weight);
            total += weight;
            let counter = self.counter(index);
            if best.is_none_or(|(b, _)| counter > b) {
                best = Some((counter, index));
            }
        }
        let (_, best) = best?;
        self.set_value(best, self.value[best] - total);
        Some(AgentKey(best as u32))
    }

    /// Over every available agent with the queue's skills.
    fn route_all(&mut self, query: &RouteQuery<'_>) -> Option<AgentKey> {
        let req = if let Some(req) = self.reqs.iter().position(|r| r.as_slice() == query.queue_skills) {
            req as u16
        } else {
            self.reqs.push(query.queue_skills.to_vec());
            self.refile_all(query.table);
            (self.reqs.len() - 1) as u16
        };
        let mut total = 0i128;
        for class in &mut self.classes {
            if class.sig.binary_search(&req).is_ok() {
                class.offset += 1;
                total += class.weight_sum;
            }
        }
        // Declined agents are not candidates: take back what the offsets gave them.
        for (n, &key) in query.declined.iter().enumerate() {
            let index = key.0 as usize;
            if query.declined[..n].contains(&key) || index >= self.class_of.len() {
                continue;
            }
            let Some(class) = self.class_of[index] else { continue };
            if self.classes[class as usize].sig.binary_search(&req).is_ok() {
                let weight = i128::from(self.by_key[index]);
                self.set_value(index, self.value[index] - weight);
                total -= weight;
            }
        }
        let mut best: Option<(i128, std::cmp::Reverse<u32>)> = None;
        for class in &self.classes {
            if class.sig.binary_search(&req).is_err() {
                continue;
            }
            for (&weight, group) in &class.groups {
                let head = group.iter().find(|(_, key)| !query.declined.contains(&AgentKey(*key)));
                if let Some(&(std::cmp::Reverse(value), key)) = head {
                    let candidate = (value + i128::from(weight) * class.offset, std::cmp::Reverse(key));
                    if best.is_none_or(|b| candidate > b) {
                        best = Some(candidate);
                    }
                }
            }
        }
        let (_, std::cmp::Reverse(best)) = best?;
        let index = best as usize;
        self.set_value(index, self.value[index] - total);
        Some(AgentKey(best))
    }
}

/// One arm of an A/B experiment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Variant {
    /// The group tag carried on the conversation and its events.
    pub group: Text,
    /// Relative share of new conversations.
    pub weight: u32,
    /// How its conversations are routed.
    pub strategy: StrategyConfig,
}

/// A stable 64-bit hash (FNV-1a, then the murmur3 finaliser so that ids differing only in
/// their last bytes spread over the low bits). Stable across processes and versions: a
/// conversation's A/B group must not change on restart.
pub fn stable_hash(bytes: &[u8]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for &byte in bytes {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    hash ^= hash >> 33;
    hash = hash.wrapping_mul(0xff51_afd7_ed55_8ccd);
    hash ^= hash >> 33;
    hash = hash.wrapping_mul(0xc4ce_b9fe_1a85_ec53);
    hash ^ (hash >> 33)
}

/// The variant index a session falls in, for these weights (`None` when they sum to 0).
pub fn variant_for(session: &str, weights: impl Iterator<Item = u32> + Clone) -> Option<usize> {
    let total: u64 = weights.clone().map(u64::from).sum();
    if total == 0 {
        return None;
    }
    let mut point = stable_hash(session.as_bytes()) % total;
    for (index, weight) in weights.enumerate() {
        if point < u64::from(weight) {
            return Some(index);
        }
        point -= u64::from(weight);
    }
    None
}

#[cfg(test)]
mod tests {
    use switchboard_protocol::AgentPresence;

    use super::*;

    fn table(agents: &[(&str, u16, &[&str])]) -> (AgentTable, Vec<AgentKey>) {
        let mut table = AgentTable::new(64);
        let mut keys = Vec::new();
        for (id, capacity, skills) in agents {
            let key = table.insert(&Text::from(*id)).unwrap();
            let skills: Vec<Text> = skills.iter().map(|s| Text::from(*s)).collect();
            table.set_status(key, AgentPresence::Online, *capacity, skills);
            keys.push(key);
        }
        (table, keys)
    }

    fn conv<'a>(session: &'a Text, skills: &'a [Text], last_agent: Option<AgentKey>) -> ConversationInfo<'a> {
        ConversationInfo { session, customer: session, priority: 0, skills, queue: session, last_agent }
    }

    #[test]
    fn least_load_prefers_spare_then_longest_idle() {
        let (mut table, keys) = table(&[("a", 2, &[]), ("b", 3, &[]), ("c", 3, &[])]);
        let s = Text::from("s");
        let info = conv(&s, &[], None);
        assert_eq!(LeastLoad.pick(&info, &AgentsView::new(&table, &keys), 0), Some(keys[1]));
        table.reserve(keys[1], &s, 1);
        // b and c tie on nothing now: c has 3 spare, b 2.
        assert_eq!(LeastLoad.pick(&info, &AgentsView::new(&table, &keys), 0), Some(keys[2]));
        table.reserve(keys[2], &s, 2);
        // All have 2 spare: a was never offered anything.
        assert_eq!(LeastLoad.pick(&info, &AgentsView::new(&table, &keys), 0), Some(keys[0]));
        assert_eq!(LeastLoad.pick(&info, &AgentsView::new(&table, &[]), 0), None);
    }

    #[test]
    fn smooth_wrr_matches_nginx_sequence() {
        let (table, keys) = table(&[("a", 9, &[]), ("b", 9, &[]), ("c", 9, &[])]);
        let weights = [(Text::from("a"), 5), (Text::from("b"), 1), (Text::from("c"), 1)];
        let mut wrr = WeightedRoundRobin::new(&weights, 1);
        let s = Text::from("s");
        let info = conv(&s, &[], None);
        let view = AgentsView::new(&table, &keys);
        let picks: String = (0..7).map(|_| table.get(wrr.pick(&info, &view, 0).unwrap()).unwrap().id().to_string()).collect();
        // nginx's documented sequence for weights {5, 1, 1}.
        assert_eq!(picks, "aabacaa");
    }

    #[test]
    fn wrr_zero_weight_is_not_eligible() {
        let (table, keys) = table(&[("a", 1, &[]), ("b", 1, &[])]);
        let wrr = WeightedRoundRobin::new(&[(Text::from("a"), 0)], 2);
        let s = Text::from("s");
        let info = conv(&s, &[], None);
        assert!(!wrr.eligible(&info, keys[0], table.get(keys[0]).unwrap()));
        assert!(wrr.eligible(&info, keys[1], table.get(keys[1]).unwrap()));
    }

    #[test]
    fn skill_based_filters_then_least_load() {
        let (table, keys) = table(&[("a", 5, &["billing"]), ("b", 1, &["billing", "fr"]), ("c", 9, &["fr"])]);
        let s = Text::from("s");
        let skills = [Text::from("billing"), Text::from("fr")];
        let info = conv(&s, &skills, None);
        let eligible: Vec<AgentKey> =
            keys.iter().copied().filter(|&k| SkillBased.eligible(&info, k, table.get(k).unwrap())).collect();
        assert_eq!(eligible, vec![keys[1]]);
        assert_eq!(SkillBased.pick(&info, &AgentsView::new(&table, &eligible), 0), Some(keys[1]));
    }

    #[test]
    fn affinity_returns_to_the_last_agent_when_possible() {
        let (table, keys) = table(&[("a", 9, &[]), ("b", 1, &[])]);
        let s = Text::from("s");
        let mut affinity = Affinity::new(Box::new(LeastLoad));
        let info = conv(&s, &[], Some(keys[1]));
        assert_eq!(affinity.pick(&info, &AgentsView::new(&table, &keys), 0), Some(keys[1]));
        assert_eq!(affinity.pick(&info, &AgentsView::new(&table, &keys[..1]), 0), Some(keys[0]));
    }

    #[test]
    fn business_hours_in_a_fixed_offset() {
        // Mon–Fri 09:00–17:00 at UTC+02:00.
        let hours = BusinessHours {
            utc_offset_minutes: 120,
            open: (0..5).map(|weekday| OpenRange { weekday, start_minute: 540, end_minute: 1020 }).collect(),
        };
        hours.validate().unwrap();
        // 2024-01-01 was a Monday; 07:00 UTC = 09:00 local.
        let monday_0700_utc = 1_704_092_400_000u64;
        assert!(hours.is_open(monday_0700_utc));
        assert!(!hours.is_open(monday_0700_utc - 1));
        assert!(hours.is_open(monday_0700_utc + 8 * 3_600_000 - 1));
        assert!(!hours.is_open(monday_0700_utc + 8 * 3_600_000));
        assert!(!hours.is_open(monday_0700_utc + 5 * 86_400_000), "Saturday");
        let gate = BusinessHoursGate::new(hours, Box::new(LeastLoad));
        assert!(!gate.open_at(monday_0700_utc - 1));
        let bad = BusinessHours { utc_offset_minutes: 0, open: vec![OpenRange { weekday: 7, start_minute: 0, end_minute: 1 }] };
        assert!(bad.validate().is_err());
    }

    #[test]
    fn variants_split_by_weight_and_are_stable() {
        let weights = [70u32, 20, 10];
        let mut counts = [0u32; 3];
        for n in 0..100_000 {
            counts[variant_for(&format!("conv-{n}"), weights.iter().copied()).unwrap()] += 1;
        }
        for (count, weight) in counts.iter().zip(weights) {
            let share = f64::from(*count) / 100_000.0;
            assert!((share - f64::from(weight) / 100.0).abs() < 0.01, "{counts:?}");
        }
        assert_eq!(variant_for("x", [0u32, 0].into_iter()), None);
        // Pinned: the group of a conversation must survive restarts and upgrades.
        assert_eq!(stable_hash(b""), 0xefd0_1f60_ba99_2926, "stable_hash changed: A/B groups would move");
        assert_eq!(stable_hash(b"conv-1"), 0x3b76_c2cb_91b6_a2d7, "stable_hash changed: A/B groups would move");
    }

    /// The desk's fast [`Router`] against the [`RoutingStrategy`] built from the same config,
    /// as the desk used it before (every available agent through the checks and `eligible`,
    /// then `pick`): the same agent every time, WRR counters carried along, over random agent
    /// changes, queue and conversation skills, declines, pools and last agents.
    #[test]
    #[allow(clippy::too_many_lines)]
    fn router_chooses_what_the_strategy_picks() {
        fn next(state: &mut u64) -> u64 {
            *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
            let mut z = *state;
            z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
            z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
            z ^ (z >> 31)
        }
        fn below(state: &mut u64, n: usize) -> usize {
            (next(state) % n as u64) as usize
        }
        const NAMES: [&str; 5] = ["de", "billing", "fr", "tech", "vip"];
        let pick_skills = |rng: &mut u64, per: usize, unknown: bool| -> Vec<Text> {
            let mut skills: Vec<Text> = NAMES.iter().filter(|_| below(rng, 10) < per).map(|s| Text::from(*s)).collect();
            if unknown && below(rng, 20) == 0 {
                skills.push(Text::from("zz-unknown"));
            }
            skills.sort();
            skills
        };
        let hours =
            BusinessHours { utc_offset_minutes: 0, open: vec![OpenRange { weekday: 0, start_minute: 0, end_minute: 1440 }] };
        let weights = |rng: &mut u64| -> Vec<(Text, u32)> {
            let mut weights = Vec::new();
            for n in 0..40 {
                if below(rng, 3) == 0 {
                    weights.push((Text::from(format!("a{n}")), below(rng, 4) as u32));
                }
            }
            weights
        };
        let mut rng = 0x00c0_ffee_u64;
        let configs = vec![
            StrategyConfig::LeastLoad,
            StrategyConfig::SkillBased,
            StrategyConfig::WeightedRoundRobin { weights: weights(&mut rng), default_weight: 1 },
            StrategyConfig::WeightedRoundRobin { weights: weights(&mut rng), default_weight: 0 },
            StrategyConfig::Affinity { fallback: Box::new(StrategyConfig::LeastLoad) },
            StrategyConfig::Affinity { fallback: Box::new(StrategyConfig::SkillBased) },
            StrategyConfig::BusinessHours {
                hours: hours.clone(),
                inner: Box::new(StrategyConfig::Affinity {
                    fallback: Box::new(StrategyConfig::WeightedRoundRobin { weights: weights(&mut rng), default_weight: 2 }),
                }),
            },
            StrategyConfig::Affinity {
                fallback: Box::new(StrategyConfig::BusinessHours { hours, inner: Box::new(StrategyConfig::SkillBased) }),
            },
        ];
        for config in &configs {
            for seed in 0..4u64 {
                let mut rng = seed.wrapping_mul(0x5851_f42d_4c95_7f2d) ^ 0x1234;
                let mut table = AgentTable::new(64);
                let mut old = config.build();
                let mut new = config.router();
                let mut offer_seq = 0u64;
                let mut session = 0u64;
                let mut decisions = 0usize;
                for step in 0..1_500 {
                    // Change an agent.
                    let n = below(&mut rng, 40);
                    let key = table.insert(&Text::from(format!("a{n}"))).unwrap();
                    match below(&mut rng, 8) {
                        0 => {
                            let presence = if below(&mut rng, 5) == 0 { AgentPresence::Away } else { AgentPresence::Online };
                            let skills = pick_skills(&mut rng, 4, false);
                            table.set_status(key, presence, below(&mut rng, 5) as u16, skills);
                        }
                        1 => table.set_connected(key, below(&mut rng, 4) != 0),
                        2 | 3 => {
                            offer_seq += 1;
                            session += 1;
                            table.reserve(key, &Text::from(format!("s{session}")), offer_seq);
                        }
                        4 => {
                            let agent = table.get(key).unwrap();
                            if agent.reserved() > 0 {
                                let s = agent.sessions().last().unwrap().clone();
                                if below(&mut rng, 2) == 0 {
                                    table.release_offer(key, &s);
                                } else {
                                    table.assign(key);
                                }
                            }
                        }
                        5 => {
                            let agent = table.get(key).unwrap();
                            if agent.load() > 0 {
                                let s = agent.sessions()[0].clone();
                                table.unassign(key, &s);
                            }
                        }
                        _ => {}
                    }
                    table.check_indexes().unwrap();
                    // Ask both.
                    let queue_skills = pick_skills(&mut rng, 1, true);
                    let conv_skills = pick_skills(&mut rng, 2, true);
                    let declined: Vec<AgentKey> = (0..below(&mut rng, 4)).map(|_| AgentKey(below(&mut rng, 40) as u32)).collect();
                    let pool: Option<Vec<AgentKey>> = (below(&mut rng, 3) == 0).then(|| {
                        let mut pool: Vec<AgentKey> =
                            (0..below(&mut rng, 6)).map(|_| AgentKey(below(&mut rng, 45) as u32)).collect();
                        pool.sort_unstable();
                        pool.dedup();
                        pool
                    });
                    let last_agent = (below(&mut rng, 2) == 0).then(|| AgentKey(below(&mut rng, 40) as u32));
                    let name = Text::from("c");
                    let info = ConversationInfo {
                        session: &name,
                        customer: &name,
                        priority: 0,
                        skills: &conv_skills,
                        queue: &name,
                        last_agent,
                    };
                    let pool_keys: Vec<AgentKey> = match &pool {
                        None => table.available().collect(),
                        Some(pool) => pool.clone(),
                    };
                    let candidates: Vec<AgentKey> = pool_keys
                        .into_iter()
                        .filter(|&k| {
                            table.get(k).is_some_and(|a| {
                                a.is_available()
                                    && a.has_skills(&queue_skills)
                                    && !declined.contains(&k)
                                    && old.eligible(&info, k, a)
                            })
                        })
                        .collect();
                    let want = if candidates.is_empty() {
                        None
                    } else {
                        let view = AgentsView::new(&table, &candidates);
                        let picked = old.pick(&info, &view, 0);
                        assert!(picked.is_some_and(|k| view.is_candidate(k)), "{config:?}: contract");
                        picked
                    };
                    let (mut queue_ids, mut conv_ids) = (Vec::new(), Vec::new());
                    let got = if table.resolve_skills(&queue_skills, &mut queue_ids) {
                        let conv_known = table.resolve_skills(&conv_skills, &mut conv_ids);
                        let query = RouteQuery {
                            table: &table,
                            queue_skills: &queue_ids,
                            conv_skills: conv_known.then_some(conv_ids.as_slice()),
                            declined: &declined,
                            pool: pool.as_deref(),
                            last_agent,
                        };
                        new.route(&query)
                    } else {
                        None
                    };
                    assert_eq!(got, want, "{config:?} seed {seed} step {step}: queue {queue_skills:?} conv {conv_skills:?}");
                    decisions += usize::from(want.is_some());
                    // Offer it, as the desk would, most of the time.
                    if let Some(key) = want.filter(|_| below(&mut rng, 4) != 0) {
                        offer_seq += 1;
                        session += 1;
                        assert!(table.reserve(key, &Text::from(format!("s{session}")), offer_seq));
                    }
                }
                assert!(decisions > 20, "{config:?}: only {decisions} decisions");
            }
        }
    }

    #[test]
    fn config_validation() {
        let mut deep = StrategyConfig::LeastLoad;
        for _ in 0..STRATEGY_DEPTH_MAX {
            deep = StrategyConfig::Affinity { fallback: Box::new(deep) };
        }
        assert!(deep.validate(10).is_err());
        let zero = StrategyConfig::WeightedRoundRobin { weights: vec![], default_weight: 0 };
        assert!(zero.validate(10).is_err());
        assert_eq!(StrategyConfig::SkillBased.build().name(), "skill_based");
    }
}
