//! Seeded simulation of one tenant's desk (`switchboard::cs`) driven through the shard's timer
//! wheel (`switchboard::timer`) over simulated time: thousands of customers and hundreds of
//! agents, random arrivals, answers, declines, offer timeouts, disconnects, status changes,
//! transfers, closes, departures, policy changes and invalid requests.
//!
//! The simulation keeps its own model of every conversation and agent, built only from the
//! effects the desk emits and the requests it sent, and after every step checks:
//! - the event stream of each conversation is a valid walk of the state machine; each
//!   conversation ends exactly once (nothing lost, nothing duplicated) and carries one A/B
//!   group throughout;
//! - an offer is only made to an online, connected agent with a free slot (no agent ever over
//!   capacity), and never to a conversation already offered or assigned (never two agents);
//! - the desk's own view (states, agents, loads, reservations) equals the model's;
//! - FIFO within priority: when an agent is offered a conversation, no conversation ahead of it
//!   (higher priority, or same priority and earlier) that the agent could take is left waiting;
//! - no waiting conversation could be taken by an idle agent (dispatch is complete);
//! - waiting customers in the position window were told their current position;
//! - every timer fires at most once, never early, never after being cancelled, and the desk
//!   never sees a stale timer; at the end every timer started was fired or cancelled;
//! - at the end the A/B split is within tolerance of the weights.
//!
//! A failure prints the seed, the step and the last actions; replay it with
//! `CS_SIM_SEED=<seed> cargo test -p switchboard --test cs_simulation`.
//! `CS_SIM_SEEDS=<n>` runs n seeds instead of the default 20.

mod common;

use std::collections::{HashMap, HashSet, VecDeque};
use std::fmt::Write as _;
use std::panic::{catch_unwind, AssertUnwindSafe};

use switchboard::cs::queue::{Overflow, QueuePolicy};
use switchboard::cs::routing::{BusinessHours, OpenRange, StrategyConfig, Variant};
use switchboard::cs::{AgentKey, CsTimerId, DeskLimits, DeskPolicy, Effect, State, TenantDesk, TimerKind, TimerPayload};
use switchboard::timer::{Fired, TimerId, TimerWheel};
use common::Rng;
use switchboard_protocol::{AgentPresence, ConversationEventKind as Kind, ErrorCode, Text, TransferKind};

const DEFAULT_SEEDS: u64 = 20;
/// Monday 2024-01-01 00:00 UTC.
const MONDAY_MS: u64 = 1_704_067_200_000;
const SKILLS: [&str; 3] = ["billing", "tech", "fr"];
const QUEUES: [(&str, &[&str], u64, Option<&str>); 4] = [
    ("general", &[], 90_000, Some("backup")),
    ("billing", &["billing"], 60_000, Some("general")),
    ("tech", &["tech"], 60_000, Some("backup")),
    ("backup", &[], 120_000, None),
];
/// (group, weight, strategy kind) — see `policy`.
const VARIANTS: [(&str, u32); 3] = [("least", 5), ("skill", 3), ("hours", 2)];
/// Largest allowed gap between a group's share and its weight's share (about 5 standard
/// deviations at 1 800 conversations and p = 0.5).
const AB_TOLERANCE: f64 = 0.06;

fn t(s: &str) -> Text {
    Text::from(s)
}

fn policy(offer_timeout_ms: u64, wait_scale_pct: u64, heavy_agents: &[String]) -> DeskPolicy {
    let queues = QUEUES
        .iter()
        .map(|(name, skills, wait, overflow)| QueuePolicy {
            name: t(name),
            skills: skills.iter().map(|s| t(s)).collect(),
            wait_ms_max: wait * wait_scale_pct / 100,
            overflow: overflow.map_or(Overflow::Offline, |q| Overflow::Queue(t(q))),
        })
        .collect();
    // Open Monday to Friday, 08:00–20:00 at UTC+01:00.
    let hours = BusinessHours {
        utc_offset_minutes: 60,
        open: (0..5).map(|weekday| OpenRange { weekday, start_minute: 8 * 60, end_minute: 20 * 60 }).collect(),
    };
    let wrr = StrategyConfig::WeightedRoundRobin { weights: heavy_agents.iter().map(|a| (t(a), 3)).collect(), default_weight: 1 };
    let strategies = [
        StrategyConfig::LeastLoad,
        StrategyConfig::SkillBased,
        StrategyConfig::BusinessHours { hours, inner: Box::new(StrategyConfig::Affinity { fallback: Box::new(wrr) }) },
    ];
    DeskPolicy {
        strategy: StrategyConfig::LeastLoad,
        experiment: VARIANTS
            .iter()
            .zip(strategies)
            .map(|((group, weight), strategy)| Variant { group: t(group), weight: *weight, strategy })
            .collect(),
        queues,
        offer_timeout_ms,
        agent_grace_ms: 20_000,
        initial_handle_ms: 120_000,
        ..DeskPolicy::default()
    }
}

/// Bit mask of `SKILLS` entries.
fn mask_of<'a>(skills: impl IntoIterator<Item = &'a str>) -> u8 {
    skills.into_iter().fold(0, |mask, s| mask | SKILLS.iter().position(|k| *k == s).map_or(0, |i| 1 << i))
}

fn queue_mask(queue: usize) -> u8 {
    mask_of(QUEUES[queue].1.iter().copied())
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum MState {
    New,
    Queued,
    Offered(Text),
    /// Between Accepted and Assigned.
    Accepting(Text),
    Active(Text),
    /// Between Declined / Transferred / Overflowed and the Queued or Offered that follows.
    Moving,
    Ended(Kind),
}

#[derive(Debug)]
struct MConv {
    state: MState,
    priority: u8,
    /// Arrival order in its current queue, kept by the model itself: a new one on opening,
    /// transfer and overflow; the old one back after a decline, a timeout or a lost agent.
    ord: u64,
    skills: u8,
    group: Option<Text>,
    told_position: u32,
    joined: Option<Text>,
}

#[derive(Debug)]
struct MAgent {
    id: Text,
    presence: AgentPresence,
    connected: bool,
    capacity: u16,
    skills: Vec<String>,
    mask: u8,
    reserved: u16,
    load: u16,
    grace: Option<CsTimerId>,
    /// The desk's key, once the desk knows the agent.
    key: Option<AgentKey>,
}

impl MAgent {
    fn online(&self) -> bool {
        self.presence == AgentPresence::Online && self.connected
    }
    fn idle(&self) -> bool {
        self.online() && self.reserved + self.load < self.capacity
    }
    fn set_status(&mut self, presence: AgentPresence, capacity: u16, skills: Vec<String>) {
        self.presence = presence;
        self.capacity = capacity;
        self.mask = mask_of(skills.iter().map(String::as_str));
        self.skills = skills;
        self.connected = true;
    }
}

/// A waiting conversation as the checks see it.
struct Waiting {
    /// The model's order: higher priority first, then earlier arrival.
    order: (std::cmp::Reverse<u8>, u64),
    session: Text,
    queue: usize,
    /// Skills an agent needs: the queue's, plus the conversation's in the skill-based group.
    need: u8,
    declined: Vec<AgentKey>,
}

struct Sim {
    rng: Rng,
    desk: TenantDesk,
    wheel: TimerWheel<TimerPayload>,
    now: u64,
    start: u64,
    /// Live timers: desk id → (wheel id, due).
    timers: HashMap<CsTimerId, (TimerId, u64)>,
    started: HashSet<CsTimerId>,
    /// Fired by the wheel in the current batch, not yet handed to the desk.
    undelivered: HashSet<CsTimerId>,
    fired: HashSet<CsTimerId>,
    cancelled: HashSet<CsTimerId>,
    convs: HashMap<Text, MConv>,
    open_sessions: Vec<Text>,
    agents: Vec<MAgent>,
    agent_index: HashMap<Text, usize>,
    group_opened: HashMap<Text, u64>,
    next_session: u64,
    next_ord: u64,
    out_of_hours: u64,
    customers: u64,
    step: u64,
    log: VecDeque<String>,
    /// Offers made by routing in the current call: (agent index, session).
    routed_offers: Vec<(usize, Text)>,
    /// Sessions transferred in the current call (their next offer is a manual one).
    transferred: HashSet<Text>,
    arrivals_target: u64,
    stats: HashMap<&'static str, u64>,
}

type Check = Result<(), String>;

macro_rules! ensure {
    ($cond:expr, $($fmt:tt)*) => {
        let holds: bool = $cond;
        if !holds {
            return Err(format!($($fmt)*));
        }
    };
}

impl Sim {
    fn new(seed: u64) -> Sim {
        let mut rng = Rng(seed);
        let agents_n = 100 + rng.below(150);
        let arrivals_target = 1_000 + rng.below(600);
        // Start between 06:00 and 21:00 UTC on a Monday or a Friday, so some runs cross the
        // "hours" variant's opening or closing time (08:00–20:00 at UTC+1).
        let day = if rng.chance(500) { 0 } else { 4 };
        let now = MONDAY_MS + day * 86_400_000 + (6 + rng.below(15)) * 3_600_000 + rng.below(3_600_000);
        let heavy: Vec<String> = (0..agents_n).filter(|n| n % 7 == 0).map(|n| format!("a{n}")).collect();
        let limits = DeskLimits {
            conversations_max: 5_000,
            agents_max: 400,
            queue_length_max: 600,
            declined_agents_max: 4,
            affinity_entries_max: 500,
            position_updates_depth_max: 20,
            ..DeskLimits::default()
        };
        let desk = TenantDesk::new(limits, policy(20_000, 100, &heavy)).expect("valid policy");
        let mut agents = Vec::new();
        let mut agent_index = HashMap::new();
        for n in 0..agents_n {
            let id = t(&format!("a{n}"));
            agent_index.insert(id.clone(), agents.len());
            agents.push(MAgent {
                id,
                presence: AgentPresence::Offline,
                connected: false,
                capacity: 0,
                skills: Vec::new(),
                mask: 0,
                reserved: 0,
                load: 0,
                grace: None,
                key: None,
            });
        }
        Sim {
            rng,
            desk,
            wheel: TimerWheel::new(200_000, now),
            now,
            start: now,
            timers: HashMap::new(),
            started: HashSet::new(),
            undelivered: HashSet::new(),
            fired: HashSet::new(),
            cancelled: HashSet::new(),
            convs: HashMap::new(),
            open_sessions: Vec::new(),
            agents,
            agent_index,
            group_opened: HashMap::new(),
            next_session: 0,
            next_ord: 0,
            out_of_hours: 0,
            customers: 300 + agents_n * 2,
            step: 0,
            log: VecDeque::new(),
            routed_offers: Vec::new(),
            transferred: HashSet::new(),
            arrivals_target,
            stats: HashMap::new(),
        }
    }

    fn note(&mut self, action: String) {
        if self.log.len() == 30 {
            self.log.pop_front();
        }
        let mut line = action;
        line.insert_str(0, &format!("step {} t+{}ms: ", self.step, self.now - self.start));
        self.log.push_back(line);
    }

    fn count(&mut self, what: &'static str) {
        *self.stats.entry(what).or_default() += 1;
    }

    fn random_skills(&mut self, per_mille: u64) -> Vec<String> {
        SKILLS.iter().filter(|_| self.rng.chance(per_mille)).map(|s| (*s).to_string()).collect()
    }

    fn agent(&self, id: &Text) -> Result<usize, String> {
        self.agent_index.get(id).copied().ok_or_else(|| format!("unknown agent `{id}`"))
    }

    // ----- applying effects to the model -----------------------------------------------------

    fn apply(&mut self, effects: Vec<Effect>) -> Check {
        for effect in effects {
            match effect {
                Effect::StartTimer { at_ms, timer } => {
                    ensure!(self.started.insert(timer.id), "timer {:?} started twice", timer.id);
                    ensure!(at_ms >= self.now, "timer {:?} due in the past ({at_ms} < {})", timer.id, self.now);
                    if let TimerKind::AgentGrace { agent } = &timer.kind {
                        let index = self.agent(agent)?;
                        self.agents[index].grace = Some(timer.id);
                    }
                    let id = timer.id;
                    let wheel_id = self.wheel.insert(at_ms, timer).map_err(|e| format!("wheel: {e}"))?;
                    self.timers.insert(id, (wheel_id, at_ms));
                }
                Effect::CancelTimer { id } => {
                    let (wheel_id, _) =
                        self.timers.remove(&id).ok_or_else(|| format!("cancel of timer {id:?} that is not live"))?;
                    // Not in the wheel any more: it fired in the batch being delivered and has
                    // not been handed over yet. The engine must then drop it, as here.
                    if self.wheel.cancel(wheel_id).is_none() {
                        ensure!(self.undelivered.remove(&id), "wheel lost timer {id:?}");
                    }
                    self.cancelled.insert(id);
                    for agent in &mut self.agents {
                        if agent.grace == Some(id) {
                            agent.grace = None;
                        }
                    }
                }
                Effect::Event { session, kind, agent, queue, position, group, reason, .. } => {
                    self.event(&session, kind, &agent, &queue, position, &group, &reason)?;
                }
                Effect::NotifyAgent { agent, session, kind, .. } => {
                    self.agent(&agent)?;
                    if kind == Kind::Offered {
                        let state = self.convs.get(&session).map(|c| c.state.clone());
                        ensure!(
                            state == Some(MState::Offered(agent.clone())),
                            "offer notice to {agent} for {session} in {state:?}"
                        );
                    }
                }
                Effect::AgentJoined { session, agent } => {
                    let conv = self.convs.get_mut(&session).ok_or("join of unknown conversation")?;
                    ensure!(conv.state == MState::Active(agent.clone()), "{agent} joined {session} in {:?}", conv.state);
                    ensure!(conv.joined.replace(agent).is_none(), "{session}: two agents joined");
                }
                Effect::AgentLeft { session, agent } => {
                    let conv = self.convs.get_mut(&session).ok_or("leave of unknown conversation")?;
                    ensure!(conv.joined.take() == Some(agent.clone()), "{agent} left {session} without joining");
                }
                Effect::AgentStatus { agent, presence, capacity, load } => {
                    let m = &self.agents[self.agent(&agent)?];
                    ensure!(
                        m.presence == presence && m.capacity == capacity && m.load == load,
                        "status of {agent}: {presence:?}/{capacity}/{load} vs model {:?}/{}/{}",
                        m.presence,
                        m.capacity,
                        m.load
                    );
                }
            }
        }
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    fn event(
        &mut self,
        session: &Text,
        kind: Kind,
        agent: &Text,
        queue: &Text,
        position: u32,
        group: &Text,
        reason: &Text,
    ) -> Check {
        let agent_index = if agent.is_empty() { None } else { Some(self.agent(agent)?) };
        self.next_ord += 1;
        let new_ord = self.next_ord;
        let Some(conv) = self.convs.get_mut(session) else { return Err(format!("event {kind:?} for unknown {session}")) };
        let group_now = if group.is_empty() { None } else { Some(group.clone()) };
        if conv.state == MState::New {
            conv.group.clone_from(&group_now);
            if let Some(g) = &group_now {
                *self.group_opened.entry(g.clone()).or_default() += 1;
            }
        }
        ensure!(conv.group == group_now, "{session}: group changed from {:?} to {group:?}", conv.group);
        let state = conv.state.clone();
        let is = |a: &Text| a == agent;
        let next = match (kind, &state) {
            (Kind::Queued, MState::New | MState::Moving | MState::Queued) => {
                if state == MState::New {
                    conv.ord = new_ord;
                }
                ensure!(position >= 1, "{session}: queued at position 0");
                ensure!(!queue.is_empty(), "{session}: queued in no queue");
                conv.told_position = position;
                MState::Queued
            }
            (Kind::Offered, MState::Queued | MState::Moving) => {
                let index = agent_index.ok_or("offer to nobody")?;
                if !self.transferred.contains(session) {
                    self.routed_offers.push((index, session.clone()));
                }
                let a = &mut self.agents[index];
                ensure!(a.online(), "{session} offered to {agent} who is {:?} connected={}", a.presence, a.connected);
                ensure!(
                    a.reserved + a.load < a.capacity,
                    "{session} offered to {agent} over capacity ({}+{} of {})",
                    a.reserved,
                    a.load,
                    a.capacity
                );
                a.reserved += 1;
                MState::Offered(agent.clone())
            }
            (Kind::Accepted, MState::Offered(a)) if is(a) => MState::Accepting(a.clone()),
            (Kind::Assigned, MState::Accepting(a)) if is(a) => {
                let a = &mut self.agents[agent_index.ok_or("no agent")?];
                a.reserved -= 1;
                a.load += 1;
                MState::Active(agent.clone())
            }
            (Kind::Declined, MState::Offered(a)) if is(a) => {
                self.agents[agent_index.ok_or("no agent")?].reserved -= 1;
                MState::Moving
            }
            (Kind::Transferred, MState::Active(a)) => {
                // A lost agent's conversation keeps its place; a transfer starts a new one.
                if reason != "agent offline" {
                    conv.ord = new_ord;
                }
                let index = self.agent_index[a];
                self.agents[index].load -= 1;
                self.transferred.insert(session.clone());
                MState::Moving
            }
            (Kind::Transferred, MState::Queued) => {
                // To a queue: to its back. To an agent: its place is kept should the agent decline.
                if !queue.is_empty() {
                    conv.ord = new_ord;
                }
                self.transferred.insert(session.clone());
                MState::Moving
            }
            (Kind::Overflowed, MState::Queued) if !queue.is_empty() => {
                conv.ord = new_ord;
                MState::Moving
            }
            (Kind::Overflowed, MState::New) => {
                self.out_of_hours += 1;
                MState::Ended(kind)
            }
            (Kind::Overflowed | Kind::Closed | Kind::Abandoned, MState::Queued) => MState::Ended(kind),
            (Kind::Closed | Kind::Abandoned, MState::Offered(a)) if is(a) => {
                self.agents[agent_index.ok_or("no agent")?].reserved -= 1;
                MState::Ended(kind)
            }
            (Kind::Closed, MState::Active(a)) if is(a) => {
                self.agents[agent_index.ok_or("no agent")?].load -= 1;
                MState::Ended(kind)
            }
            _ => return Err(format!("{session}: event {kind:?} (agent `{agent}`, queue `{queue}`) invalid in {state:?}")),
        };
        if let Some(conv) = self.convs.get_mut(session) {
            conv.state = next;
        }
        Ok(())
    }

    // ----- driving the desk ------------------------------------------------------------------

    /// One request; `Ok(true)` when the desk accepted it. Refusals must push nothing.
    fn call(
        &mut self,
        request: impl FnOnce(&mut TenantDesk, &mut Vec<Effect>) -> Result<(), switchboard::cs::DeskError>,
    ) -> Result<bool, String> {
        let mut effects = Vec::new();
        self.transferred.clear();
        self.routed_offers.clear();
        match request(&mut self.desk, &mut effects) {
            Ok(()) => {
                self.apply(effects)?;
                self.check_fifo()?;
                Ok(true)
            }
            Err(error) => {
                ensure!(effects.is_empty(), "refused request ({error}) pushed effects");
                Ok(false)
            }
        }
    }

    fn advance(&mut self, dt: u64) -> Check {
        self.now += dt;
        let mut fired: Vec<Fired<TimerPayload>> = Vec::new();
        self.wheel.advance(self.now, &mut fired);
        self.undelivered = fired.iter().map(|f| f.payload.id).collect();
        for f in fired {
            let id = f.payload.id;
            if !self.undelivered.remove(&id) {
                // Cancelled by an earlier firing of this batch.
                continue;
            }
            ensure!(f.deadline_ms <= self.now, "timer {id:?} fired early");
            let (wheel_id, due) = self.timers.remove(&id).ok_or_else(|| format!("timer {id:?} fired but is not live"))?;
            ensure!(wheel_id == f.id && due == f.deadline_ms, "timer {id:?} fired with the wrong handle or deadline");
            ensure!(self.fired.insert(id), "timer {id:?} fired twice");
            if let TimerKind::AgentGrace { agent } = &f.payload.kind {
                let index = self.agent(agent)?;
                let a = &mut self.agents[index];
                ensure!(a.grace == Some(id), "grace timer of {agent} not current");
                a.grace = None;
                a.presence = AgentPresence::Offline;
            }
            self.count("timers fired");
            let now = self.now;
            self.call(|desk, fx| {
                desk.handle_timer(now, &f.payload, fx);
                Ok(())
            })?;
        }
        Ok(())
    }

    fn random_open(&mut self, filter: impl Fn(&MState) -> bool) -> Option<Text> {
        let candidates: Vec<&Text> =
            self.open_sessions.iter().filter(|s| self.convs.get(*s).is_some_and(|c| filter(&c.state))).collect();
        let index = self.rng.below(candidates.len() as u64) as usize;
        candidates.get(index).map(|s| (*s).clone())
    }

    fn set_status(&mut self, index: usize, presence: AgentPresence, capacity: u16, skills: Vec<String>) -> Check {
        let skills_t: Vec<Text> = skills.iter().map(|s| t(s)).collect();
        // The model changes first: the events of this call see the new status.
        self.agents[index].set_status(presence, capacity, skills);
        let skills = skills_t;
        let id = self.agents[index].id.clone();
        let now = self.now;
        ensure!(self.call(|d, fx| d.agent_status(now, &id, presence, capacity, &skills, fx))?, "status of {id} refused");
        self.agents[index].key = self.desk.agents().key_of(&id);
        Ok(())
    }

    /// Each open conversation, each step: an offer is answered with probability 3 % (mean
    /// ≈ 12 s of simulated time, so some time out), an active one closes with 0.3 % (mean
    /// handle ≈ 2 min), a waiting customer gives up with 0.1 %.
    fn sweep(&mut self) -> Check {
        let now = self.now;
        for session in self.open_sessions.clone() {
            let state = self.convs[&session].state.clone();
            match state {
                MState::Offered(agent) if self.rng.chance(30) => {
                    let accept = self.rng.chance(800);
                    self.note(format!("{agent} {} {session}", if accept { "accepts" } else { "declines" }));
                    ensure!(self.call(|d, fx| d.offer_response(now, &session, &agent, accept, fx))?, "valid answer refused");
                }
                MState::Active(_) if self.rng.chance(3) => {
                    self.note(format!("close {session}"));
                    ensure!(self.call(|d, fx| d.close(now, &session, &t("done"), fx))?, "valid close refused");
                }
                MState::Queued | MState::Offered(_) | MState::Active(_) if self.rng.chance(1) => {
                    self.note(format!("customer leaves {session}"));
                    ensure!(self.call(|d, fx| d.customer_left(now, &session, fx))?, "valid leave refused");
                }
                _ => {}
            }
        }
        Ok(())
    }

    fn step(&mut self) -> Check {
        self.step += 1;
        let dt = self.rng.below(700);
        self.advance(dt)?;
        self.sweep()?;
        let now = self.now;
        match self.rng.below(1000) {
            0..=499 => {
                if self.next_session >= self.arrivals_target {
                    return self.after_step();
                }
                let session = t(&format!("s{}", self.next_session));
                self.next_session += 1;
                let customer = t(&format!("c{}", self.rng.below(self.customers)));
                let priority = if self.rng.chance(150) { 2 } else { u8::from(self.rng.chance(200)) };
                let skills = self.random_skills(250);
                self.note(format!("open {session} for {customer} p{priority} {skills:?}"));
                let mask = mask_of(skills.iter().map(String::as_str));
                self.convs.insert(
                    session.clone(),
                    MConv { state: MState::New, priority, ord: 0, skills: mask, group: None, told_position: 0, joined: None },
                );
                let skills: Vec<Text> = skills.iter().map(|s| t(s)).collect();
                if self.call(|d, fx| d.open_conversation(now, &session, &customer, priority, &skills, fx))? {
                    self.count("opened");
                    self.open_sessions.push(session);
                } else {
                    self.count("open refused");
                    self.convs.remove(&session);
                }
            }
            500..=559 => {
                let Some(session) = self.random_open(|s| matches!(s, MState::Active(_) | MState::Queued)) else {
                    return self.after_step();
                };
                if self.rng.chance(500) {
                    let queue = t(QUEUES[self.rng.below(QUEUES.len() as u64) as usize].0);
                    self.note(format!("transfer {session} to queue {queue}"));
                    let ok = self.call(|d, fx| d.transfer(now, &session, TransferKind::Queue, &queue, &t("note"), fx))?;
                    self.count(if ok { "transfer to queue" } else { "transfer to queue refused" });
                } else {
                    let agent = self.agents[self.rng.below(self.agents.len() as u64) as usize].id.clone();
                    self.note(format!("transfer {session} to agent {agent}"));
                    let ok = self.call(|d, fx| d.transfer(now, &session, TransferKind::Agent, &agent, &t("note"), fx))?;
                    self.count(if ok { "transfer to agent" } else { "transfer to agent refused" });
                }
            }
            560..=759 => {
                let index = self.rng.below(self.agents.len() as u64) as usize;
                let presence = match self.rng.below(10) {
                    0..=6 => AgentPresence::Online,
                    7 | 8 => AgentPresence::Away,
                    _ => AgentPresence::Offline,
                };
                let capacity = self.rng.below(5) as u16;
                let skills = self.random_skills(400);
                self.note(format!("{} status {presence:?} cap {capacity} {skills:?}", self.agents[index].id));
                self.set_status(index, presence, capacity, skills)?;
            }
            760..=819 => {
                let connected: Vec<usize> =
                    (0..self.agents.len()).filter(|&i| self.agents[i].key.is_some() && self.agents[i].connected).collect();
                let Some(&index) = self.rng.pick(&connected) else { return self.after_step() };
                let id = self.agents[index].id.clone();
                self.note(format!("{id} disconnects"));
                self.agents[index].connected = false;
                ensure!(self.call(|d, fx| d.agent_disconnected(now, &id, fx))?, "disconnect refused");
            }
            820..=979 => {
                // A disconnected agent comes back, as it was.
                let gone: Vec<usize> =
                    (0..self.agents.len()).filter(|&i| self.agents[i].key.is_some() && !self.agents[i].connected).collect();
                let Some(&index) = self.rng.pick(&gone) else { return self.after_step() };
                let a = &self.agents[index];
                let (presence, capacity, skills) = (a.presence, a.capacity, a.skills.clone());
                self.note(format!("{} reconnects", a.id));
                self.set_status(index, presence, capacity, skills)?;
            }
            980..=996 => self.invalid_request()?,
            _ => {
                // A policy change: new timeouts and weights, same experiment groups and queues.
                let offer_timeout_ms = 5_000 + self.rng.below(25_000);
                let wait_scale = 50 + self.rng.below(100);
                let heavy: Vec<String> =
                    (0..self.agents.len()).filter(|_| self.rng.chance(200)).map(|n| format!("a{n}")).collect();
                self.note(format!("policy: offer timeout {offer_timeout_ms} ms, waits ×{wait_scale}%"));
                let p = policy(offer_timeout_ms, wait_scale, &heavy);
                ensure!(self.call(|d, fx| d.set_policy(now, p, fx))?, "valid policy refused");
                self.count("policy changes");
            }
        }
        self.after_step()
    }

    /// Requests that must be refused with the right code, changing nothing.
    fn invalid_request(&mut self) -> Check {
        let now = self.now;
        let before = self.desk.conversations_len();
        let mut fx = Vec::new();
        let (what, result) = match self.rng.below(4) {
            0 => {
                // Someone else answers an offer.
                let Some(session) = self.random_open(|s| matches!(s, MState::Offered(_))) else { return Ok(()) };
                let MState::Offered(agent) = self.convs[&session].state.clone() else { return Ok(()) };
                let Some(other) = self.agents.iter().find(|a| a.key.is_some() && a.id != agent).map(|a| a.id.clone()) else {
                    return Ok(());
                };
                (
                    format!("{other} answers {agent}'s offer of {session}"),
                    self.desk.offer_response(now, &session, &other, true, &mut fx),
                )
            }
            1 => {
                let Some(session) = self.random_open(|s| matches!(s, MState::Queued | MState::Active(_))) else { return Ok(()) };
                let agent = self.agents[0].id.clone();
                (format!("accept of {session}, not offered"), self.desk.offer_response(now, &session, &agent, true, &mut fx))
            }
            2 => ("close of unknown".into(), self.desk.close(now, &t("no-such-session"), &Text::new(), &mut fx)),
            _ => {
                let Some(session) = self.random_open(|s| matches!(s, MState::Active(_))) else { return Ok(()) };
                (
                    format!("transfer of {session} to unknown queue"),
                    self.desk.transfer(now, &session, TransferKind::Queue, &t("nowhere"), &Text::new(), &mut fx),
                )
            }
        };
        self.note(format!("invalid: {what}"));
        let Err(error) = result else { return Err(format!("invalid request accepted: {what}")) };
        ensure!(fx.is_empty(), "refused request pushed effects: {what}");
        let code = error.code();
        ensure!(matches!(code, ErrorCode::Forbidden | ErrorCode::InvalidState | ErrorCode::NotFound), "{what}: code {code:?}");
        ensure!(self.desk.conversations_len() == before, "refused request changed the desk: {what}");
        self.count("invalid refused");
        Ok(())
    }

    // ----- invariants ------------------------------------------------------------------------

    /// The waiting conversations, queue by queue, each queue in the desk's order — which must
    /// be the model's: priority, then arrival.
    fn waiting(&self) -> Result<Vec<Waiting>, String> {
        let mut waiting: Vec<Waiting> = Vec::new();
        for (queue_index, queue) in self.desk.queues().iter().enumerate() {
            ensure!(queue.name().as_str() == QUEUES[queue_index].0, "queue order changed");
            let first = waiting.len();
            for (_, session) in queue.iter() {
                let view = self.desk.conversation(session).ok_or("queued conversation missing")?;
                let conv = &self.convs[session];
                let order = (std::cmp::Reverse(conv.priority), conv.ord);
                if let Some(previous) = waiting[first..].last() {
                    ensure!(
                        previous.order < order,
                        "queue {}: {} ({:?}) before {session} ({order:?})",
                        QUEUES[queue_index].0,
                        previous.session,
                        previous.order
                    );
                }
                let skill_group = conv.group.as_ref().is_some_and(|g| g == "skill");
                let need = queue_mask(queue_index) | if skill_group { conv.skills } else { 0 };
                waiting.push(Waiting {
                    order,
                    session: session.clone(),
                    queue: queue_index,
                    need,
                    declined: view.declined.to_vec(),
                });
            }
        }
        Ok(waiting)
    }

    /// Could this agent take this waiting conversation (ignoring its spare capacity)? The
    /// desk's rules, written independently: online and connected, the queue's skills (and the
    /// conversation's, in the skill-based group), and not having declined it.
    fn could_take(agent: &MAgent, w: &Waiting) -> bool {
        agent.online() && agent.mask & w.need == w.need && agent.key.is_none_or(|k| !w.declined.contains(&k))
    }

    /// FIFO within priority, after each call: nothing ahead of a conversation routed in this
    /// call (in any queue) could have been taken by the agent it went to. (Per call: a later
    /// call may rightly put an older conversation back into a queue.)
    fn check_fifo(&self) -> Check {
        if self.routed_offers.is_empty() {
            return Ok(());
        }
        let waiting = self.waiting()?;
        for (agent, session) in &self.routed_offers {
            let conv = &self.convs[session];
            let order = (std::cmp::Reverse(conv.priority), conv.ord);
            let m = &self.agents[*agent];
            for w in waiting.iter().filter(|w| w.order < order) {
                ensure!(
                    !Self::could_take(m, w),
                    "FIFO: {session} offered to {} while {} (ahead: {:?} < {order:?}) waits in {} and {} could take it",
                    m.id,
                    w.session,
                    w.order,
                    QUEUES[w.queue].0,
                    m.id
                );
            }
        }
        Ok(())
    }

    fn after_step(&mut self) -> Check {
        self.desk.check_invariants().map_err(|e| format!("desk invariant: {e}"))?;
        ensure!(self.desk.stats().stale_timers == 0, "the desk saw a stale timer");
        ensure!(self.desk.stats().strategy_misses == 0, "a strategy broke its contract");
        // Model against desk: every open conversation, same state and agent.
        let convs = &self.convs;
        self.open_sessions.retain(|s| !matches!(convs[s].state, MState::Ended(_)));
        ensure!(
            self.desk.conversations_len() == self.open_sessions.len(),
            "desk holds {} conversations, model {}",
            self.desk.conversations_len(),
            self.open_sessions.len()
        );
        for session in &self.open_sessions {
            let m = &self.convs[session];
            let view = self.desk.conversation(session).ok_or_else(|| format!("{session} lost by the desk"))?;
            let same = match &m.state {
                MState::Queued => view.state == State::Queued,
                MState::Offered(a) => view.state == State::Offered && view.agent == Some(a),
                MState::Active(a) => view.state == State::Active && view.agent == Some(a),
                other => return Err(format!("{session} left in model state {other:?} after a call")),
            };
            ensure!(same, "{session}: model {:?}, desk {:?} with {:?}", m.state, view.state, view.agent);
            ensure!(
                Some(view.group) == m.group.as_ref() || (view.group.is_empty() && m.group.is_none()),
                "{session}: group differs"
            );
        }
        for m in &self.agents {
            let Some(agent) = m.key.and_then(|k| self.desk.agents().get(k)) else { continue };
            ensure!(
                agent.reserved() == m.reserved && agent.load() == m.load,
                "agent {}: desk {}+{}, model {}+{}",
                m.id,
                agent.reserved(),
                agent.load(),
                m.reserved,
                m.load
            );
            ensure!(agent.presence() == m.presence && agent.connected() == m.connected, "agent {}: presence differs", m.id);
        }
        let waiting = self.waiting()?;
        // Customers in the position window know their position.
        let depth = self.desk.limits().position_updates_depth_max;
        let mut index_in_queue = [0usize; QUEUES.len()];
        for w in &waiting {
            let index = index_in_queue[w.queue];
            index_in_queue[w.queue] += 1;
            if index < depth {
                let told = self.convs[&w.session].told_position;
                ensure!(told == index as u32 + 1, "{} told position {told}, is at {}", w.session, index + 1);
            }
        }
        // Dispatch is complete: no idle agent could take a waiting conversation. Idle agents
        // are grouped by skill mask; a group can only fail to serve a conversation when every
        // one of its agents declined it, so the inner loops stay short.
        if !waiting.is_empty() {
            let mut idle_by_mask: [Vec<&MAgent>; 8] = Default::default();
            for agent in self.agents.iter().filter(|a| a.idle()) {
                idle_by_mask[agent.mask as usize].push(agent);
            }
            for w in &waiting {
                for (mask, agents) in idle_by_mask.iter().enumerate() {
                    if mask as u8 & w.need != w.need {
                        continue;
                    }
                    if let Some(agent) = agents.iter().find(|a| Self::could_take(a, w)) {
                        return Err(format!(
                            "{} waits in {} while {} is idle and could take it",
                            w.session, QUEUES[w.queue].0, agent.id
                        ));
                    }
                }
            }
        }
        Ok(())
    }

    /// Everyone goes offline; time runs until no timer is left: every conversation must end.
    #[allow(clippy::cast_precision_loss)] // Counts of a few thousand.
    fn drain(&mut self) -> Check {
        for index in 0..self.agents.len() {
            if self.agents[index].key.is_none() {
                continue;
            }
            let (capacity, skills) = (self.agents[index].capacity, self.agents[index].skills.clone());
            self.note(format!("drain: {} offline", self.agents[index].id));
            self.set_status(index, AgentPresence::Offline, capacity, skills)?;
            self.after_step()?;
        }
        for _ in 0..10_000 {
            if self.wheel.is_empty() {
                break;
            }
            self.advance(10_000)?;
            self.after_step()?;
        }
        ensure!(self.wheel.is_empty(), "timers left after draining");
        ensure!(self.desk.conversations_len() == 0, "{} conversations never ended", self.desk.conversations_len());
        for (session, conv) in &self.convs {
            ensure!(matches!(conv.state, MState::Ended(_)), "{session} never ended: {:?}", conv.state);
        }
        for id in &self.started {
            ensure!(self.fired.contains(id) != self.cancelled.contains(id), "timer {id:?}: fired and cancelled, or neither");
        }
        // The A/B split.
        let total: u64 = self.group_opened.values().sum();
        let weights: u32 = VARIANTS.iter().map(|v| v.1).sum();
        let counts = self.desk.group_counts();
        for (group, weight) in VARIANTS {
            let got = self.group_opened.get(&t(group)).copied().unwrap_or(0);
            let share = got as f64 / total as f64;
            let want = f64::from(weight) / f64::from(weights);
            ensure!((share - want).abs() < AB_TOLERANCE, "A/B: group {group} got {share:.3} of {total}, weight share {want:.3}");
            let counted = counts.iter().find(|(g, _)| g == group).map(|(_, c)| c.opened);
            ensure!(counted == Some(got), "A/B: desk counted {counted:?} for {group}, events show {got}");
        }
        Ok(())
    }

    fn run(&mut self) -> Check {
        // Most agents come online before the first customer.
        for index in 0..self.agents.len() {
            if self.rng.chance(800) {
                let capacity = 1 + self.rng.below(4) as u16;
                let skills = self.random_skills(400);
                self.set_status(index, AgentPresence::Online, capacity, skills)?;
            }
        }
        self.after_step()?;
        while self.next_session < self.arrivals_target {
            self.step()?;
        }
        self.drain()
    }
}

fn run_seed(seed: u64) -> Result<String, String> {
    let mut sim = Sim::new(seed);
    let outcome = catch_unwind(AssertUnwindSafe(|| sim.run()));
    let failure = match outcome {
        Ok(Ok(())) => None,
        Ok(Err(message)) => Some(message),
        Err(panic) => Some(format!(
            "panicked: {}",
            panic
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| panic.downcast_ref::<&str>().map(|s| (*s).to_string()))
                .unwrap_or_default()
        )),
    };
    if let Some(message) = failure {
        let mut report = format!("seed {seed} failed at step {}: {message}\nlast actions:\n", sim.step);
        for line in &sim.log {
            let _ = writeln!(report, "  {line}");
        }
        let _ = write!(report, "replay: CS_SIM_SEED={seed} cargo test -p switchboard --test cs_simulation -- --nocapture");
        return Err(report);
    }
    let mut stats: Vec<_> = sim.stats.iter().collect();
    stats.sort();
    let desk = sim.desk.stats();
    Ok(format!(
        "seed {seed}: {} agents, {} steps, {} min simulated, offers {} (timeouts {}, declines {}), overflows {}, out of hours {}, {stats:?}",
        sim.agents.len(),
        sim.step,
        (sim.now - sim.start) / 60_000,
        desk.offers,
        desk.offer_timeouts,
        desk.declines,
        desk.overflows,
        sim.out_of_hours
    ))
}

#[test]
fn seeded_simulation() {
    let seeds: Vec<u64> = if let Ok(seed) = std::env::var("CS_SIM_SEED") {
        vec![seed.trim().parse().expect("CS_SIM_SEED is a u64")]
    } else {
        let n = std::env::var("CS_SIM_SEEDS").ok().and_then(|n| n.parse().ok()).unwrap_or(DEFAULT_SEEDS);
        (1..=n).map(|i: u64| i.wrapping_mul(0x9e37_79b9_7f4a_7c15)).collect()
    };
    let mut failures = Vec::new();
    for seed in seeds {
        match run_seed(seed) {
            Ok(summary) => println!("{summary}"),
            Err(report) => {
                eprintln!("{report}");
                failures.push(seed);
            }
        }
    }
    assert!(failures.is_empty(), "failing seeds: {failures:?} (replay instructions above)");
}
