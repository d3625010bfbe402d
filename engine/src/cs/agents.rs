//! A tenant's agents: presence, connection, skills, capacity, current load and outstanding
//! offers, and the set of agents able to take a new conversation right now.
//!
//! It owns the per-agent counters and keeps the "available" set exact after every change, so
//! routing looks only at agents that can take work. It does not decide anything: offers,
//! timers and re-routing are the desk's. Capacity is checked here, in one place: the desk is
//! single-threaded (it lives on its tenant's shard), so a check and the reservation that follows
//! it cannot be interleaved with another arrival — the race that lets Rocket.Chat assign past
//! an agent's limit has no room to happen.
//!
//! For routing it also keeps the available agents in *least-load order* — most spare capacity
//! first, then longest since last offered, then lowest key — once overall and once per skill
//! (skills are interned as small integer ids when an agent reports them). A least-load decision
//! is then the first agent of the shortest matching list that passes the remaining checks,
//! instead of a walk over every available agent. Every mutator below re-indexes the agent it
//! changed, so the lists are exact after each call.

use std::collections::{BTreeSet, HashMap};

use switchboard_protocol::{AgentPresence, Text};

use super::desk::CsTimerId;
use super::error::DeskError;

/// A desk-local handle for an agent: its index in the table (agents are never removed, so a
/// key stays valid for the desk's life).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct AgentKey(pub u32);

/// One agent.
#[derive(Debug, Clone)]
pub struct Agent {
    id: Text,
    presence: AgentPresence,
    connected: bool,
    capacity: u16,
    load: u16,
    reserved: u16,
    skills: Vec<Text>,
    /// Conversations offered or assigned to it (at most `capacity` + a lowered capacity's
    /// leftovers; small, so a vector).
    sessions: Vec<Text>,
    grace_timer: Option<CsTimerId>,
    /// When it was last offered something (desk offer counter), to break least-load ties
    /// in favour of whoever waited longest for work.
    last_offer_seq: u64,
    /// `skills` as interned ids (the table's), sorted.
    skill_ids: Vec<u32>,
    /// Its place in the least-load lists while available ([`load_order`]); `None` otherwise.
    load_key: Option<u128>,
}

impl Agent {
    /// The agent's id.
    pub fn id(&self) -> &Text {
        &self.id
    }

    /// Presence as the agent last set it (or Offline after a lost connection's grace period).
    pub fn presence(&self) -> AgentPresence {
        self.presence
    }

    /// False between a lost connection and reconnection (or the end of the grace period).
    pub fn connected(&self) -> bool {
        self.connected
    }

    /// Most concurrent conversations.
    pub fn capacity(&self) -> u16 {
        self.capacity
    }

    /// Conversations assigned (active).
    pub fn load(&self) -> u16 {
        self.load
    }

    /// Offers outstanding: each holds a slot until accepted, declined or timed out.
    pub fn reserved(&self) -> u16 {
        self.reserved
    }

    /// Capacity left for new offers.
    pub fn spare(&self) -> u16 {
        self.capacity.saturating_sub(self.load.saturating_add(self.reserved))
    }

    /// Skills, sorted and without duplicates.
    pub fn skills(&self) -> &[Text] {
        &self.skills
    }

    /// True when it has every skill in `required` (sorted, deduplicated).
    pub fn has_skills(&self, required: &[Text]) -> bool {
        has_all(&self.skills, required)
    }

    /// The conversations offered or assigned to it.
    pub fn sessions(&self) -> &[Text] {
        &self.sessions
    }

    /// When it was last offered a conversation (a desk-wide counter; 0 = never).
    pub fn last_offer_seq(&self) -> u64 {
        self.last_offer_seq
    }

    /// Online, connected and with spare capacity: routing may offer it a conversation.
    pub fn is_available(&self) -> bool {
        self.presence == AgentPresence::Online && self.connected && self.spare() > 0
    }

    /// Counts toward a queue's serving capacity (for the wait estimate).
    pub fn is_serving(&self) -> bool {
        self.presence == AgentPresence::Online && self.connected
    }

    pub(crate) fn grace_timer(&self) -> Option<CsTimerId> {
        self.grace_timer
    }

    /// True when it has every skill in `required` (interned ids, sorted).
    pub(crate) fn has_skill_ids(&self, required: &[u32]) -> bool {
        has_all_sorted(&self.skill_ids, required)
    }

    /// Its least-load sort key while available, `None` when not available.
    pub(crate) fn load_key(&self) -> Option<u128> {
        self.load_key
    }
}

/// The least-load sort key: ascending order is most spare capacity first, then the oldest
/// last offer, then the lowest key — exactly the order of `routing::least_load`.
fn load_order(key: AgentKey, agent: &Agent) -> u128 {
    (u128::from(u16::MAX - agent.spare()) << 96) | (u128::from(agent.last_offer_seq) << 32) | u128::from(key.0)
}

/// The agent key inside a [`load_order`] key.
pub(crate) fn key_of_load_order(order: u128) -> AgentKey {
    AgentKey(order as u32)
}

/// True when sorted `have` contains every element of sorted `need`.
pub fn has_all(have: &[Text], need: &[Text]) -> bool {
    has_all_sorted(have, need)
}

/// [`has_all`] for any sorted elements (interned skill ids).
fn has_all_sorted<T: Ord>(have: &[T], need: &[T]) -> bool {
    let mut have = have.iter();
    'need: for wanted in need {
        for candidate in have.by_ref() {
            match candidate.cmp(wanted) {
                std::cmp::Ordering::Less => {}
                std::cmp::Ordering::Equal => continue 'need,
                std::cmp::Ordering::Greater => return false,
            }
        }
        return false;
    }
    true
}

/// Every agent of a tenant, by key and by id.
#[derive(Debug)]
pub struct AgentTable {
    agents: Vec<Agent>,
    by_id: HashMap<Text, AgentKey>,
    /// Exactly the agents for which [`Agent::is_available`] holds, in key order (routing
    /// iterates it deterministically).
    available: BTreeSet<AgentKey>,
    /// The same agents in least-load order ([`load_order`] keys).
    by_load: BTreeSet<u128>,
    /// Per interned skill id: the available agents having it, in least-load order.
    by_skill: Vec<BTreeSet<u128>>,
    /// Skill name → interned id (never forgotten: bounded by `agents_max` × `SKILLS_MAX`).
    skill_ids: HashMap<Text, u32>,
    /// Agents whose availability or skills changed, oldest first, for routers that keep their
    /// own index of available agents ([`AgentTable::changes_since`]); cleared when long.
    changes: Vec<AgentKey>,
    /// The position of `changes[0]` since the table was made.
    changes_base: u64,
    agents_max: usize,
}

impl AgentTable {
    /// An empty table for at most `agents_max` agents.
    pub fn new(agents_max: usize) -> AgentTable {
        AgentTable {
            agents: Vec::new(),
            by_id: HashMap::new(),
            available: BTreeSet::new(),
            by_load: BTreeSet::new(),
            by_skill: Vec::new(),
            skill_ids: HashMap::new(),
            changes: Vec::new(),
            changes_base: 0,
            agents_max,
        }
    }

    /// Agents known.
    pub fn len(&self) -> usize {
        self.agents.len()
    }

    /// True when no agent is known.
    pub fn is_empty(&self) -> bool {
        self.agents.is_empty()
    }

    /// The agent with this key.
    pub fn get(&self, key: AgentKey) -> Option<&Agent> {
        self.agents.get(key.0 as usize)
    }

    /// The key of the agent with this id.
    pub fn key_of(&self, id: &Text) -> Option<AgentKey> {
        self.by_id.get(id).copied()
    }

    /// Every agent, in key order.
    pub fn iter(&self) -> impl Iterator<Item = (AgentKey, &Agent)> {
        self.agents.iter().enumerate().map(|(index, agent)| (AgentKey(index as u32), agent))
    }

    /// The agents that can take a conversation now, in key order.
    pub fn available(&self) -> impl Iterator<Item = AgentKey> + '_ {
        self.available.iter().copied()
    }

    /// How many agents can take a conversation now.
    pub fn available_len(&self) -> usize {
        self.available.len()
    }

    /// Adds an agent (offline, disconnected, no capacity) or refuses past `agents_max`.
    pub(crate) fn insert(&mut self, id: &Text) -> Result<AgentKey, DeskError> {
        if let Some(key) = self.key_of(id) {
            return Ok(key);
        }
        if self.agents.len() >= self.agents_max {
            return Err(DeskError::LimitExceeded { limit: "agents_max", max: self.agents_max });
        }
        let key = AgentKey(self.agents.len() as u32);
        self.agents.push(Agent {
            id: id.clone(),
            presence: AgentPresence::Offline,
            connected: false,
            capacity: 0,
            load: 0,
            reserved: 0,
            skills: Vec::new(),
            sessions: Vec::new(),
            grace_timer: None,
            last_offer_seq: 0,
            skill_ids: Vec::new(),
            load_key: None,
        });
        self.by_id.insert(id.clone(), key);
        Ok(key)
    }

    /// True when a new agent could be added.
    pub(crate) fn has_room(&self) -> bool {
        self.agents.len() < self.agents_max
    }

    /// The interned id of a skill, if any agent ever reported it.
    pub(crate) fn skill_id(&self, skill: &Text) -> Option<u32> {
        self.skill_ids.get(skill).copied()
    }

    /// `skills` as sorted interned ids into `out`; false when one of them no agent ever
    /// reported (then no agent has them all).
    pub(crate) fn resolve_skills(&self, skills: &[Text], out: &mut Vec<u32>) -> bool {
        out.clear();
        for skill in skills {
            match self.skill_id(skill) {
                Some(id) => out.push(id),
                None => return false,
            }
        }
        out.sort_unstable();
        true
    }

    /// The first available agent in least-load order (most spare capacity, then longest since
    /// its last offer, then lowest key) that has every skill of `required` and of `also`
    /// (interned ids, sorted) and for which `accept` holds. It walks the shortest of the lists
    /// that can hold the answer and stops at the first match: the cost is the agents skipped
    /// (other skills missing, declined, not eligible), not the agents available.
    pub(crate) fn least_loaded(
        &self,
        required: &[u32],
        also: &[u32],
        mut accept: impl FnMut(AgentKey, &Agent) -> bool,
    ) -> Option<AgentKey> {
        let list = required
            .iter()
            .chain(also)
            .filter_map(|&id| self.by_skill.get(id as usize))
            .min_by_key(|set| set.len())
            .unwrap_or(&self.by_load);
        list.iter().find_map(|&order| {
            let key = key_of_load_order(order);
            let agent = &self.agents[key.0 as usize];
            (agent.has_skill_ids(required) && agent.has_skill_ids(also) && accept(key, agent)).then_some(key)
        })
    }

    /// The position after the last change (see [`AgentTable::changes_since`]).
    pub(crate) fn changes_end(&self) -> u64 {
        self.changes_base + self.changes.len() as u64
    }

    /// The agents whose availability or skills changed since position `from` (an agent may
    /// appear more than once), or `None` when that part of the log was dropped: then the
    /// caller must look at every agent again.
    pub(crate) fn changes_since(&self, from: u64) -> Option<&[AgentKey]> {
        let start = usize::try_from(from.checked_sub(self.changes_base)?).ok()?;
        self.changes.get(start..)
    }

    fn log_change(&mut self, key: AgentKey) {
        if self.changes.len() >= 4 * self.agents.len() + 1024 {
            self.changes_base += self.changes.len() as u64;
            self.changes.clear();
        }
        self.changes.push(key);
    }

    /// Re-files the agent in the available and least-load sets after a change.
    fn refresh(&mut self, key: AgentKey) {
        let was_available = self.agents[key.0 as usize].load_key.is_some();
        if was_available != self.agents[key.0 as usize].is_available() {
            self.log_change(key);
        }
        let AgentTable { agents, available, by_load, by_skill, .. } = self;
        let agent = &mut agents[key.0 as usize];
        let order = agent.is_available().then(|| load_order(key, agent));
        if order.is_some() {
            available.insert(key);
        } else {
            available.remove(&key);
        }
        if order == agent.load_key {
            return;
        }
        if let Some(old) = agent.load_key.take() {
            by_load.remove(&old);
            for &id in &agent.skill_ids {
                by_skill[id as usize].remove(&old);
            }
        }
        if let Some(new) = order {
            by_load.insert(new);
            for &id in &agent.skill_ids {
                by_skill[id as usize].insert(new);
            }
        }
        agent.load_key = order;
    }

    /// Takes the agent out of the least-load sets (before its skills change).
    fn unfile(&mut self, key: AgentKey) {
        let AgentTable { agents, by_load, by_skill, .. } = self;
        let agent = &mut agents[key.0 as usize];
        if let Some(old) = agent.load_key.take() {
            by_load.remove(&old);
            for &id in &agent.skill_ids {
                by_skill[id as usize].remove(&old);
            }
        }
    }

    /// Sets what the agent reports about itself; it is connected (the report came from it).
    pub(crate) fn set_status(&mut self, key: AgentKey, presence: AgentPresence, capacity: u16, skills: Vec<Text>) {
        self.unfile(key);
        let mut ids = Vec::with_capacity(skills.len());
        for skill in &skills {
            let next = self.by_skill.len() as u32;
            let id = *self.skill_ids.entry(skill.clone()).or_insert(next);
            if id == next {
                self.by_skill.push(BTreeSet::new());
            }
            ids.push(id);
        }
        ids.sort_unstable();
        ids.dedup();
        let agent = &mut self.agents[key.0 as usize];
        agent.presence = presence;
        agent.capacity = capacity;
        agent.skills = skills;
        agent.skill_ids = ids;
        agent.connected = true;
        self.log_change(key);
        self.refresh(key);
    }

    /// Checks the available and least-load sets against the agents (O(agents × skills); for
    /// tests and the simulation).
    pub(crate) fn check_indexes(&self) -> Result<(), String> {
        let mut per_skill = vec![0usize; self.by_skill.len()];
        let mut available = 0usize;
        for (key, agent) in self.iter() {
            let order = agent.is_available().then(|| load_order(key, agent));
            if order != agent.load_key {
                return Err(format!("agent {}: load key {:?}, expected {order:?}", agent.id, agent.load_key));
            }
            let names: Option<Vec<u32>> = agent.skills.iter().map(|s| self.skill_id(s)).collect();
            let mut names = names.ok_or_else(|| format!("agent {}: skill not interned", agent.id))?;
            names.sort_unstable();
            if names != agent.skill_ids {
                return Err(format!("agent {}: skill ids {:?} for {:?}", agent.id, agent.skill_ids, agent.skills));
            }
            if let Some(order) = order {
                available += 1;
                if !self.available.contains(&key) || !self.by_load.contains(&order) {
                    return Err(format!("agent {}: available but not listed", agent.id));
                }
                for &id in &agent.skill_ids {
                    per_skill[id as usize] += 1;
                    if !self.by_skill[id as usize].contains(&order) {
                        return Err(format!("agent {}: missing from skill list {id}", agent.id));
                    }
                }
            }
        }
        if available != self.available.len() || available != self.by_load.len() {
            return Err(format!("{available} available, lists hold {} and {}", self.available.len(), self.by_load.len()));
        }
        for (id, set) in self.by_skill.iter().enumerate() {
            if set.len() != per_skill[id] {
                return Err(format!("skill list {id} holds {}, {} agents have it", set.len(), per_skill[id]));
            }
        }
        Ok(())
    }

    pub(crate) fn set_connected(&mut self, key: AgentKey, connected: bool) {
        self.agents[key.0 as usize].connected = connected;
        self.refresh(key);
    }

    pub(crate) fn set_presence(&mut self, key: AgentKey, presence: AgentPresence) {
        self.agents[key.0 as usize].presence = presence;
        self.refresh(key);
    }

    pub(crate) fn set_grace_timer(&mut self, key: AgentKey, timer: Option<CsTimerId>) -> Option<CsTimerId> {
        std::mem::replace(&mut self.agents[key.0 as usize].grace_timer, timer)
    }

    /// Takes one slot for an offer of `session`; false (and nothing changes) when the agent is
    /// not available. The only way a slot is taken, so capacity is never exceeded by routing.
    pub(crate) fn reserve(&mut self, key: AgentKey, session: &Text, offer_seq: u64) -> bool {
        let Some(agent) = self.agents.get_mut(key.0 as usize) else { return false };
        if !agent.is_available() {
            return false;
        }
        agent.reserved += 1;
        agent.last_offer_seq = offer_seq;
        agent.sessions.push(session.clone());
        self.refresh(key);
        true
    }

    /// Gives an offer's slot back (decline, timeout, withdrawn).
    pub(crate) fn release_offer(&mut self, key: AgentKey, session: &Text) {
        let agent = &mut self.agents[key.0 as usize];
        agent.reserved = agent.reserved.saturating_sub(1);
        agent.sessions.retain(|s| s != session);
        self.refresh(key);
    }

    /// Turns an offer's slot into an assignment (accept).
    pub(crate) fn assign(&mut self, key: AgentKey) {
        let agent = &mut self.agents[key.0 as usize];
        agent.reserved = agent.reserved.saturating_sub(1);
        agent.load = agent.load.saturating_add(1);
        self.refresh(key);
    }

    /// Frees an assignment's slot (close, transfer away, agent lost).
    pub(crate) fn unassign(&mut self, key: AgentKey, session: &Text) {
        let agent = &mut self.agents[key.0 as usize];
        agent.load = agent.load.saturating_sub(1);
        agent.sessions.retain(|s| s != session);
        self.refresh(key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn skills(names: &[&str]) -> Vec<Text> {
        names.iter().map(|s| Text::from(*s)).collect()
    }

    #[test]
    fn has_all_on_sorted_lists() {
        assert!(has_all(&skills(&["a", "b", "c"]), &skills(&["a", "c"])));
        assert!(has_all(&skills(&["a"]), &[]));
        assert!(!has_all(&skills(&["a", "c"]), &skills(&["b"])));
        assert!(!has_all(&[], &skills(&["a"])));
        assert!(!has_all(&skills(&["a", "b"]), &skills(&["b", "z"])));
    }

    #[test]
    fn reservations_never_pass_capacity() {
        let mut table = AgentTable::new(4);
        let key = table.insert(&Text::from("ann")).unwrap();
        table.set_status(key, AgentPresence::Online, 2, Vec::new());
        assert!(table.reserve(key, &Text::from("s1"), 1));
        assert!(table.reserve(key, &Text::from("s2"), 2));
        assert!(!table.reserve(key, &Text::from("s3"), 3), "third offer past capacity 2");
        assert_eq!(table.available_len(), 0);
        table.assign(key);
        assert_eq!((table.get(key).unwrap().load(), table.get(key).unwrap().reserved()), (1, 1));
        table.unassign(key, &Text::from("s1"));
        assert_eq!(table.available().collect::<Vec<_>>(), vec![key]);
        assert_eq!(table.get(key).unwrap().sessions(), &[Text::from("s2")]);
    }

    #[test]
    fn availability_needs_online_connected_and_spare() {
        let mut table = AgentTable::new(1);
        let key = table.insert(&Text::from("bo")).unwrap();
        assert_eq!(table.available_len(), 0);
        table.set_status(key, AgentPresence::Away, 3, Vec::new());
        assert_eq!(table.available_len(), 0);
        table.set_presence(key, AgentPresence::Online);
        assert_eq!(table.available_len(), 1);
        table.set_connected(key, false);
        assert_eq!(table.available_len(), 0);
        assert!(!table.reserve(key, &Text::from("s"), 1));
        assert_eq!(table.insert(&Text::from("cy")), Err(DeskError::LimitExceeded { limit: "agents_max", max: 1 }));
    }
}
