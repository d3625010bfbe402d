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

use std::collections::{HashMap, HashSet, VecDeque};
use std::fmt::Write as _;
use std::panic::{catch_unwind, AssertUnwindSafe};

use switchboard::cs::queue::{Overflow, QueuePolicy};
use switchboard::cs::routing::{BusinessHours, OpenRange, StrategyConfig, Variant};
use switchboard::cs::{CsTimerId, DeskLimits, DeskPolicy, Effect, State, TenantDesk, TimerKind, TimerPayload};
use switchboard::timer::{Fired, TimerId, TimerWheel};
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

struct Rng(u64);

impl Rng {
    /// splitmix64.
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: u64) -> u64 {
        if n == 0 { 0 } else { self.next() % n }
    }
    fn chance(&mut self, per_mille: u64) -> bool {
        self.below(1000) < per_mille
    }
    fn pick<'a, T>(&mut self, items: &'a [T]) -> Option<&'a T> {
        if items.is_empty() { None } else { Some(&items[self.below(items.len() as u64) as usize]) }
    }
}

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

#[derive(Debug, Clone, PartialEq, Eq)]
enum MState {
    New,
    Queued,
    Offered(String),
    /// Between Accepted and Assigned.
    Accepting(String),
    Active(String),
    /// Between Declined / Transferred / Overflowed and the Queued or Offered that follows.
    Moving,
    Ended(Kind),
}

#[derive(Debug)]
struct MConv {
    state: MState,
    skills: Vec<String>,
    group: Option<String>,
    told_position: u32,
    joined: Option<String>,
}

#[derive(Debug)]
struct MAgent {
    id: String,
    presence: AgentPresence,
    connected: bool,
    capacity: u16,
    skills: Vec<String>,
    reserved: u16,
    load: u16,
    grace: Option<CsTimerId>,
    known: bool,
}

impl MAgent {
    fn online(&self) -> bool {
        self.presence == AgentPresence::Online && self.connected
    }
    fn has(&self, skills: &[String]) -> bool {
        skills.iter().all(|s| self.skills.contains(s))
    }
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
    convs: HashMap<String, MConv>,
    open_sessions: Vec<String>,
    agents: Vec<MAgent>,
    agent_index: HashMap<String, usize>,
    group_opened: HashMap<String, u64>,
    next_session: u64,
    customers: u64,
    step: u64,
    log: VecDeque<String>,
    /// Sessions offered by routing during the current step (agent, session).
    routed_offers: Vec<(String, String)>,
    /// Sessions transferred during the current call (their next offer is manual).
    transferred: HashSet<String>,
    arrivals_target: u64,
    stats: HashMap<&'static str, u64>,
}

type Check = Result<(), String>;
type Waiting = (switchboard::cs::QueueKey, String, String, Vec<String>, usize);

macro_rules! ensure {
    ($cond:expr, $($fmt:tt)*) => {
        if !$cond {
            return Err(format!($($fmt)*));
        }
    };
}

impl Sim {
    fn new(seed: u64) -> Sim {
        let mut rng = Rng(seed);
        let agents_n = 100 + rng.below(200);
        let arrivals_target = 1_500 + rng.below(1_000);
        // Start between 06:00 and 21:00 UTC on a Friday or a Monday, so some runs cross the
        // "hours" variant's closing time.
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
        let desk = TenantDesk::new(limits, policy(15_000, 100, &heavy)).expect("valid policy");
        let mut agents = Vec::new();
        let mut agent_index = HashMap::new();
        for n in 0..agents_n {
            let id = format!("a{n}");
            agent_index.insert(id.clone(), agents.len());
            agents.push(MAgent {
                id,
                presence: AgentPresence::Offline,
                connected: false,
                capacity: 0,
                skills: Vec::new(),
                reserved: 0,
                load: 0,
                grace: None,
                known: false,
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
            customers: 400 + agents_n * 2,
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
        self.log.push_back(format!("step {} t+{}ms: {action}", self.step, self.now - self.start));
    }

    fn count(&mut self, what: &'static str) {
        *self.stats.entry(what).or_default() += 1;
    }

    fn random_skills(&mut self, per_mille: u64) -> Vec<String> {
        SKILLS.iter().filter(|_| self.rng.chance(per_mille)).map(|s| s.to_string()).collect()
    }

    // ----- applying effects to the model -----------------------------------------------------

    fn apply(&mut self, effects: Vec<Effect>) -> Check {
        for effect in effects {
            match effect {
                Effect::StartTimer { at_ms, timer } => {
                    ensure!(self.started.insert(timer.id), "timer {:?} started twice", timer.id);
                    ensure!(at_ms >= self.now, "timer {:?} due in the past ({at_ms} < {})", timer.id, self.now);
                    if let TimerKind::AgentGrace { agent } = &timer.kind {
                        let index = self.agent_index[agent.as_str()];
                        self.agents[index].grace = Some(timer.id);
                    }
                    let id = timer.id;
                    let wheel_id = self.wheel.insert(at_ms, timer).map_err(|e| format!("wheel: {e}"))?;
                    self.timers.insert(id, (wheel_id, at_ms));
                }
                Effect::CancelTimer { id } => {
                    let (wheel_id, _) = self.timers.remove(&id).ok_or(format!("cancel of timer {id:?} that is not live"))?;
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
                Effect::Event { session, kind, agent, queue, position, group, .. } => {
                    self.event(session.as_str(), kind, agent.as_str(), queue.as_str(), position, group.as_str())?;
                }
                Effect::NotifyAgent { agent, session, kind, .. } => {
                    ensure!(self.agent_index.contains_key(agent.as_str()), "notify unknown agent {agent}");
                    if kind == Kind::Offered {
                        let state = self.convs.get(session.as_str()).map(|c| c.state.clone());
                        ensure!(state == Some(MState::Offered(agent.to_string())), "offer notice to {agent} for {session} in {state:?}");
                    }
                }
                Effect::AgentJoined { session, agent } => {
                    let conv = self.convs.get_mut(session.as_str()).ok_or("join of unknown conversation")?;
                    ensure!(conv.state == MState::Active(agent.to_string()), "{agent} joined {session} in {:?}", conv.state);
                    ensure!(conv.joined.replace(agent.to_string()).is_none(), "{session}: two agents joined");
                }
                Effect::AgentLeft { session, agent } => {
                    let conv = self.convs.get_mut(session.as_str()).ok_or("leave of unknown conversation")?;
                    ensure!(conv.joined.take().as_deref() == Some(agent.as_str()), "{agent} left {session} without joining");
                }
                Effect::AgentStatus { agent, presence, capacity, load } => {
                    let m = &self.agents[self.agent_index[agent.as_str()]];
                    ensure!(m.presence == presence && m.capacity == capacity, "status of {agent}: {presence:?}/{capacity} vs model {:?}/{}", m.presence, m.capacity);
                    ensure!(m.load == load, "status of {agent}: load {load} vs model {}", m.load);
                }
            }
        }
        Ok(())
    }

    fn agent_mut(&mut self, id: &str) -> Result<&mut MAgent, String> {
        let index = *self.agent_index.get(id).ok_or(format!("event names unknown agent `{id}`"))?;
        Ok(&mut self.agents[index])
    }

    fn event(&mut self, session: &str, kind: Kind, agent: &str, queue: &str, position: u32, group: &str) -> Check {
        let Some(conv) = self.convs.get_mut(session) else { return Err(format!("event {kind:?} for unknown {session}")) };
        let group_now = if group.is_empty() { None } else { Some(group.to_string()) };
        if conv.state == MState::New {
            conv.group = group_now.clone();
            if let Some(g) = &group_now {
                *self.group_opened.entry(g.clone()).or_default() += 1;
            }
        }
        ensure!(conv.group == group_now, "{session}: group changed from {:?} to {group:?}", conv.group);
        let state = conv.state.clone();
        let next = match (kind, &state) {
            (Kind::Queued, MState::New | MState::Moving | MState::Queued) => {
                ensure!(position >= 1, "{session}: queued at position 0");
                ensure!(!queue.is_empty(), "{session}: queued in no queue");
                conv.told_position = position;
                MState::Queued
            }
            (Kind::Offered, MState::Queued | MState::Moving) => {
                let manual = self.transferred.contains(session);
                if !manual {
                    self.routed_offers.push((agent.to_string(), session.to_string()));
                }
                let a = self.agent_mut(agent)?;
                ensure!(a.online(), "{session} offered to {agent} who is {:?} connected={}", a.presence, a.connected);
                ensure!(a.reserved + a.load < a.capacity, "{session} offered to {agent} over capacity ({}+{} of {})", a.reserved, a.load, a.capacity);
                a.reserved += 1;
                MState::Offered(agent.to_string())
            }
            (Kind::Accepted, MState::Offered(a)) if a == agent => MState::Accepting(a.clone()),
            (Kind::Assigned, MState::Accepting(a)) if a == agent => {
                let a = self.agent_mut(agent)?;
                a.reserved -= 1;
                a.load += 1;
                MState::Active(agent.to_string())
            }
            (Kind::Declined, MState::Offered(a)) if a == agent => {
                self.agent_mut(agent)?.reserved -= 1;
                MState::Moving
            }
            (Kind::Transferred, MState::Active(a)) => {
                let a = a.clone();
                self.agent_mut(&a)?.load -= 1;
                self.transferred.insert(session.to_string());
                MState::Moving
            }
            (Kind::Transferred, MState::Queued) => {
                self.transferred.insert(session.to_string());
                MState::Moving
            }
            (Kind::Overflowed, MState::Queued) if !queue.is_empty() => MState::Moving,
            (Kind::Overflowed, MState::Queued | MState::New) => MState::Ended(kind),
            (Kind::Closed, MState::Queued) | (Kind::Abandoned, MState::Queued) => MState::Ended(kind),
            (Kind::Closed | Kind::Abandoned, MState::Offered(a)) if a == agent => {
                self.agent_mut(agent)?.reserved -= 1;
                MState::Ended(kind)
            }
            (Kind::Closed, MState::Active(a)) if a == agent => {
                self.agent_mut(agent)?.load -= 1;
                MState::Ended(kind)
            }
            _ => return Err(format!("{session}: event {kind:?} (agent `{agent}`, queue `{queue}`) invalid in {state:?}")),
        };
        let conv = self.convs.get_mut(session).ok_or("vanished")?;
        conv.state = next;
        Ok(())
    }

    // ----- driving the desk ------------------------------------------------------------------

    /// One request; `Ok(true)` when the desk accepted it.
    fn call(&mut self, request: impl FnOnce(&mut TenantDesk, &mut Vec<Effect>) -> Result<(), switchboard::cs::DeskError>) -> Result<bool, String> {
        let mut effects = Vec::new();
        self.transferred.clear();
        match request(&mut self.desk, &mut effects) {
            Ok(()) => {
                self.routed_offers.clear();
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
            let (wheel_id, due) = self.timers.remove(&id).ok_or(format!("timer {id:?} fired but is not live (cancelled or fired)"))?;
            ensure!(wheel_id == f.id && due == f.deadline_ms, "timer {id:?} fired with the wrong handle or deadline");
            ensure!(self.fired.insert(id), "timer {id:?} fired twice");
            if let TimerKind::AgentGrace { agent } = &f.payload.kind {
                let a = self.agent_mut(agent.as_str())?;
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

    fn random_open(&mut self, filter: impl Fn(&MState) -> bool) -> Option<String> {
        let candidates: Vec<&String> = self
            .open_sessions
            .iter()
            .filter(|s| self.convs.get(s.as_str()).is_some_and(|c| filter(&c.state)))
            .collect();
        let index = self.rng.below(candidates.len() as u64) as usize;
        candidates.get(index).map(|s| (*s).clone())
    }

    fn step(&mut self) -> Check {
        self.step += 1;
        let dt = self.rng.below(700);
        self.advance(dt)?;
        let roll = self.rng.below(1000);
        let now = self.now;
        match roll {
            0..=299 => {
                if self.next_session >= self.arrivals_target {
                    return self.after_step();
                }
                let session = format!("s{}", self.next_session);
                self.next_session += 1;
                let customer = format!("c{}", self.rng.below(self.customers));
                let priority = if self.rng.chance(150) { 2 } else if self.rng.chance(200) { 1 } else { 0 };
                let skills = self.random_skills(250);
                self.note(format!("open {session} for {customer} p{priority} {skills:?}"));
                self.convs.insert(
                    session.clone(),
                    MConv { state: MState::New, skills: skills.clone(), group: None, told_position: 0, joined: None },
                );
                let skills_t: Vec<Text> = skills.iter().map(|s| t(s)).collect();
                let accepted = self.call(|d, fx| d.open_conversation(now, &t(&session), &t(&customer), priority, &skills_t, fx))?;
                if accepted {
                    self.count("opened");
                    self.open_sessions.push(session);
                } else {
                    self.count("open refused");
                    self.convs.remove(&session);
                }
            }
            300..=549 => {
                let Some(session) = self.random_open(|s| matches!(s, MState::Offered(_))) else { return self.after_step() };
                let MState::Offered(agent) = self.convs[&session].state.clone() else { unreachable!() };
                let accept = self.rng.chance(750);
                self.note(format!("{agent} {} {session}", if accept { "accepts" } else { "declines" }));
                ensure!(self.call(|d, fx| d.offer_response(now, &t(&session), &t(&agent), accept, fx))?, "valid answer refused");
            }
            550..=679 => {
                let Some(session) = self.random_open(|s| matches!(s, MState::Active(_))) else { return self.after_step() };
                self.note(format!("close {session}"));
                ensure!(self.call(|d, fx| d.close(now, &t(&session), &t("done"), fx))?, "valid close refused");
            }
            680..=719 => {
                let Some(session) = self.random_open(|s| !matches!(s, MState::Ended(_))) else { return self.after_step() };
                self.note(format!("customer leaves {session}"));
                ensure!(self.call(|d, fx| d.customer_left(now, &t(&session), fx))?, "valid leave refused");
            }
            720..=769 => {
                let Some(session) = self.random_open(|s| matches!(s, MState::Active(_) | MState::Queued)) else { return self.after_step() };
                if self.rng.chance(500) {
                    let queue = self.rng.pick(&QUEUES).map(|q| q.0).unwrap_or("general");
                    self.note(format!("transfer {session} to queue {queue}"));
                    let ok = self.call(|d, fx| d.transfer(now, &t(&session), TransferKind::Queue, &t(queue), &t("note"), fx))?;
                    self.count(if ok { "transfer to queue" } else { "transfer to queue refused" });
                } else {
                    let agent = format!("a{}", self.rng.below(self.agents.len() as u64));
                    self.note(format!("transfer {session} to agent {agent}"));
                    let ok = self.call(|d, fx| d.transfer(now, &t(&session), TransferKind::Agent, &t(&agent), &t("note"), fx))?;
                    self.count(if ok { "transfer to agent" } else { "transfer to agent refused" });
                }
            }
            770..=879 => {
                let index = self.rng.below(self.agents.len() as u64) as usize;
                let presence = match self.rng.below(10) {
                    0..=6 => AgentPresence::Online,
                    7 | 8 => AgentPresence::Away,
                    _ => AgentPresence::Offline,
                };
                let capacity = self.rng.below(5) as u16;
                let skills = self.random_skills(400);
                let id = self.agents[index].id.clone();
                self.note(format!("{id} status {presence:?} cap {capacity} {skills:?}"));
                {
                    // The model changes first: events of this call see the new status.
                    let a = &mut self.agents[index];
                    a.presence = presence;
                    a.capacity = capacity;
                    a.skills = skills.clone();
                    a.connected = true;
                    a.known = true;
                }
                let skills_t: Vec<Text> = skills.iter().map(|s| t(s)).collect();
                ensure!(self.call(|d, fx| d.agent_status(now, &t(&id), presence, capacity, &skills_t, fx))?, "status refused");
            }
            880..=914 => {
                let connected: Vec<usize> = (0..self.agents.len()).filter(|&i| self.agents[i].known && self.agents[i].connected).collect();
                let Some(&index) = self.rng.pick(&connected) else { return self.after_step() };
                let id = self.agents[index].id.clone();
                self.note(format!("{id} disconnects"));
                self.agents[index].connected = false;
                ensure!(self.call(|d, fx| d.agent_disconnected(now, &t(&id), fx))?, "disconnect refused");
            }
            915..=989 => {
                // Reconnect a disconnected agent, as it was.
                let gone: Vec<usize> = (0..self.agents.len()).filter(|&i| self.agents[i].known && !self.agents[i].connected).collect();
                let Some(&index) = self.rng.pick(&gone) else { return self.after_step() };
                let (id, presence, capacity, skills) = {
                    let a = &mut self.agents[index];
                    a.connected = true;
                    (a.id.clone(), a.presence, a.capacity, a.skills.clone())
                };
                self.note(format!("{id} reconnects"));
                let skills_t: Vec<Text> = skills.iter().map(|s| t(s)).collect();
                ensure!(self.call(|d, fx| d.agent_status(now, &t(&id), presence, capacity, &skills_t, fx))?, "reconnect refused");
            }
            990..=996 => self.invalid_request()?,
            _ => {
                // A policy change: new timeouts and weights, same experiment groups and queues.
                let offer_timeout_ms = 5_000 + self.rng.below(20_000);
                let wait_scale = 50 + self.rng.below(100);
                let heavy: Vec<String> = (0..self.agents.len()).filter(|_| self.rng.chance(200)).map(|n| format!("a{n}")).collect();
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
        let (what, code) = match self.rng.below(4) {
            0 => {
                // Someone else answers an offer.
                let Some(session) = self.random_open(|s| matches!(s, MState::Offered(_))) else { return Ok(()) };
                let MState::Offered(agent) = self.convs[&session].state.clone() else { unreachable!() };
                let other = self.agents.iter().find(|a| a.known && a.id != agent).map(|a| a.id.clone());
                let Some(other) = other else { return Ok(()) };
                let mut fx = Vec::new();
                (format!("{other} answers {agent}'s offer of {session}"), self.desk.offer_response(now, &t(&session), &t(&other), true, &mut fx).err().map(|e| (e.code(), fx.len())))
            }
            1 => {
                let Some(session) = self.random_open(|s| matches!(s, MState::Queued | MState::Active(_))) else { return Ok(()) };
                let agent = self.agents[0].id.clone();
                let mut fx = Vec::new();
                (format!("accept of {session}, not offered"), self.desk.offer_response(now, &t(&session), &t(&agent), true, &mut fx).err().map(|e| (e.code(), fx.len())))
            }
            2 => {
                let mut fx = Vec::new();
                ("close of unknown".into(), self.desk.close(now, &t("no-such-session"), &Text::new(), &mut fx).err().map(|e| (e.code(), fx.len())))
            }
            _ => {
                let Some(session) = self.random_open(|s| matches!(s, MState::Active(_))) else { return Ok(()) };
                let mut fx = Vec::new();
                (format!("transfer of {session} to unknown queue"), self.desk.transfer(now, &t(&session), TransferKind::Queue, &t("nowhere"), &Text::new(), &mut fx).err().map(|e| (e.code(), fx.len())))
            }
        };
        self.note(format!("invalid: {what}"));
        let Some((code, effects)) = code else { return Err(format!("invalid request accepted: {what}")) };
        ensure!(effects == 0, "refused request pushed effects: {what}");
        ensure!(matches!(code, ErrorCode::Forbidden | ErrorCode::InvalidState | ErrorCode::NotFound), "{what}: code {code:?}");
        ensure!(self.desk.conversations_len() == before, "refused request changed the desk: {what}");
        self.count("invalid refused");
        Ok(())
    }

    // ----- invariants ------------------------------------------------------------------------

    /// Could `agent` take `session` (ignoring its spare capacity)? The same rules as the
    /// desk's, written independently: online and connected, the queue's skills, not having
    /// declined it, and the variant's own filter (skill-based: the conversation's skills).
    fn could_take(&self, agent: &MAgent, session: &str, queue: &str, declined: &[String]) -> bool {
        let conv = &self.convs[session];
        let queue_skills: Vec<String> = QUEUES.iter().find(|q| q.0 == queue).map(|q| q.1.iter().map(|s| s.to_string()).collect()).unwrap_or_default();
        agent.online()
            && agent.has(&queue_skills)
            && !declined.contains(&agent.id)
            && (conv.group.as_deref() != Some("skill") || agent.has(&conv.skills))
    }

    fn after_step(&mut self) -> Check {
        self.desk.check_invariants().map_err(|e| format!("desk invariant: {e}"))?;
        ensure!(self.desk.stats().stale_timers == 0, "the desk saw a stale timer");
        ensure!(self.desk.stats().strategy_misses == 0, "a strategy broke its contract");
        // Model against desk: every open conversation, same state and agent.
        self.open_sessions.retain(|s| !matches!(self.convs[s].state, MState::Ended(_)));
        ensure!(self.desk.conversations_len() == self.open_sessions.len(), "desk holds {} conversations, model {}", self.desk.conversations_len(), self.open_sessions.len());
        for session in &self.open_sessions {
            let m = &self.convs[session];
            let view = self.desk.conversation(&t(session)).ok_or(format!("{session} lost by the desk"))?;
            let agent = view.agent.map(|a| a.to_string());
            let same = match &m.state {
                MState::Queued => view.state == State::Queued,
                MState::Offered(a) => view.state == State::Offered && agent.as_ref() == Some(a),
                MState::Active(a) => view.state == State::Active && agent.as_ref() == Some(a),
                other => return Err(format!("{session} left in model state {other:?} after a call")),
            };
            ensure!(same, "{session}: model {:?}, desk {:?} with {agent:?}", m.state, view.state);
            ensure!(view.group.as_str() == m.group.as_deref().unwrap_or(""), "{session}: group differs");
        }
        for m in &self.agents {
            let key = self.desk.agents().key_of(&t(&m.id));
            let Some(agent) = key.and_then(|k| self.desk.agents().get(k)) else {
                ensure!(!m.known, "agent {} lost", m.id);
                continue;
            };
            ensure!(agent.reserved() == m.reserved && agent.load() == m.load, "agent {}: desk {}+{}, model {}+{}", m.id, agent.reserved(), agent.load(), m.reserved, m.load);
            ensure!(agent.presence() == m.presence && agent.connected() == m.connected, "agent {}: presence differs", m.id);
        }
        let waiting = self.waiting()?;
        for (_, session, _, _, index) in &waiting {
            if *index < self.desk.limits().position_updates_depth_max {
                let told = self.convs[session.as_str()].told_position;
                ensure!(told == *index as u32 + 1, "{session} told position {told}, is at {}", index + 1);
            }
        }
        // Dispatch is complete: no idle agent could take a waiting conversation.
        if !waiting.is_empty() {
            for m in self.agents.iter().filter(|a| a.online() && a.reserved + a.load < a.capacity) {
                for (_, session, queue, declined, _) in &waiting {
                    ensure!(!self.could_take(m, session, queue, declined), "{session} waits in {queue} while {} is idle and could take it", m.id);
                }
            }
        }
        Ok(())
    }

    /// FIFO within priority, after each call: nothing ahead of a conversation routed in this
    /// call (in any queue) could have been taken by the agent it went to. (Checked per call: a
    /// later call may legitimately put an older conversation back in a queue.)
    fn check_fifo(&self) -> Check {
        if self.routed_offers.is_empty() {
            return Ok(());
        }
        let waiting = self.waiting()?;
        for (agent, session) in &self.routed_offers {
            let Some(view) = self.desk.conversation(&t(session)) else { continue };
            let key = view.queue_key;
            let m = &self.agents[self.agent_index[agent.as_str()]];
            for (k, other, queue, declined, _) in waiting.iter().take_while(|w| w.0 < key) {
                ensure!(
                    !self.could_take(m, other, queue, declined),
                    "FIFO: {session} offered to {agent} while {other} (ahead, key {k:?} < {key:?}) waits in {queue} and {agent} could take it"
                );
            }
        }
        Ok(())
    }

    /// Waiting conversations in dispatch order: (key, session, queue, declined agents, index
    /// in its queue).
    fn waiting(&self) -> Result<Vec<Waiting>, String> {
        let mut waiting = Vec::new();
        for queue in self.desk.queues() {
            for (index, (key, session)) in queue.iter().enumerate() {
                let view = self.desk.conversation(session).ok_or("queued conversation missing")?;
                let declined: Vec<String> = view.declined.iter().filter_map(|k| self.desk.agents().get(*k)).map(|a| a.id().to_string()).collect();
                waiting.push((key, session.to_string(), queue.name().to_string(), declined, index));
            }
        }
        waiting.sort();
        Ok(waiting)
    }

    /// Everyone goes offline, time runs until no timer is left: every conversation must end.
    fn drain(&mut self) -> Check {
        for index in 0..self.agents.len() {
            if !self.agents[index].known {
                continue;
            }
            let id = self.agents[index].id.clone();
            let (capacity, skills) = (self.agents[index].capacity, self.agents[index].skills.clone());
            self.agents[index].presence = AgentPresence::Offline;
            self.agents[index].connected = true;
            let now = self.now;
            let skills_t: Vec<Text> = skills.iter().map(|s| t(s)).collect();
            self.note(format!("drain: {id} offline"));
            self.call(|d, fx| d.agent_status(now, &t(&id), AgentPresence::Offline, capacity, &skills_t, fx))?;
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
        for (group, weight) in VARIANTS {
            let got = self.group_opened.get(group).copied().unwrap_or(0);
            let share = got as f64 / total as f64;
            let want = f64::from(weight) / f64::from(weights);
            ensure!((share - want).abs() < AB_TOLERANCE, "A/B: group {group} got {share:.3} of {total}, weight share {want:.3}");
            let counted = self.desk.group_counts().into_iter().find(|(g, _)| g == group).map(|(_, c)| c.opened);
            ensure!(counted == Some(got), "A/B: desk counted {counted:?} for {group}, events show {got}");
        }
        Ok(())
    }

    fn run(&mut self) -> Check {
        // Bring most agents online before the first customers.
        for index in 0..self.agents.len() {
            if self.rng.chance(800) {
                let id = self.agents[index].id.clone();
                let capacity = 1 + self.rng.below(4) as u16;
                let skills = self.random_skills(400);
                {
                    let a = &mut self.agents[index];
                    a.presence = AgentPresence::Online;
                    a.capacity = capacity;
                    a.skills = skills.clone();
                    a.connected = true;
                    a.known = true;
                }
                let now = self.now;
                let skills_t: Vec<Text> = skills.iter().map(|s| t(s)).collect();
                self.call(|d, fx| d.agent_status(now, &t(&id), AgentPresence::Online, capacity, &skills_t, fx))?;
            }
        }
        self.after_step()?;
        while self.next_session < self.arrivals_target {
            self.step()?;
        }
        self.count("steps");
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
            panic.downcast_ref::<String>().cloned().or_else(|| panic.downcast_ref::<&str>().map(|s| s.to_string())).unwrap_or_default()
        )),
    };
    match failure {
        None => {
            let mut stats: Vec<_> = sim.stats.iter().collect();
            stats.sort();
            let desk = sim.desk.stats();
            Ok(format!(
                "seed {seed}: {} agents, {} steps, {stats:?}, offers {} timeouts {} declines {} overflows {}",
                sim.agents.len(),
                sim.step,
                desk.offers,
                desk.offer_timeouts,
                desk.declines,
                desk.overflows
            ))
        }
        Some(message) => {
            let mut report = format!("seed {seed} failed at step {}: {message}\nlast actions:\n", sim.step);
            for line in &sim.log {
                let _ = writeln!(report, "  {line}");
            }
            let _ = write!(report, "replay: CS_SIM_SEED={seed} cargo test -p switchboard --test cs_simulation -- --nocapture");
            Err(report)
        }
    }
}

#[test]
fn seeded_simulation() {
    let seeds: Vec<u64> = match std::env::var("CS_SIM_SEED") {
        Ok(seed) => vec![seed.trim().parse().expect("CS_SIM_SEED is a u64")],
        Err(_) => {
            let n = std::env::var("CS_SIM_SEEDS").ok().and_then(|n| n.parse().ok()).unwrap_or(DEFAULT_SEEDS);
            (1..=n).map(|i| i.wrapping_mul(0x9e37_79b9_7f4a_7c15)).collect()
        }
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
