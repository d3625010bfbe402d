//! Routing decisions per second on one thread (one shard), per strategy, for a tenant of 100,
//! 1 000 and 10 000 online agents (issue 5: "routing decisions/s per shard with 10 000 agents in
//! a tenant").
//!
//! The tenant: agents with capacity 3–5 and 1–3 of 20 skills (skill `i % 20` plus 0–2 random
//! others, so every skill has agents); one open queue; every conversation asks for one random
//! skill, priority 0; customers drawn from a pool of 4 × agents (so affinity has returning
//! customers). Before measuring, the desk is filled to half its slots with accepted
//! conversations, and it stays there: one measured iteration is
//! 1. `close` the oldest open conversation (its agent frees a slot),
//! 2. `open_conversation` of a new one, which must return an `Offered` effect at once (the bench
//!    panics otherwise: the load is meant to be steady, never full),
//! 3. `offer_response` (accept) by the agent offered, so the slot stays used.
//!
//! So one element = one routing decision, with the accept and one close included. `now_ms`
//! advances 1 ms per iteration and is passed in (no clock); timers are effects only (no timer
//! wheel here: `benches/timer_wheel.rs` measures that). Strategies as configured per tenant:
//! `least_load`, `weighted_round_robin` (every 10th agent weight 3, others 1), `skill_based`,
//! `affinity` (over least-load) and `business_hours` (Mon–Fri 08:00–20:00 UTC over least-load,
//! measured inside opening hours).
//!
//! Criterion reports the time per decision and decisions per second (`Throughput::Elements`);
//! the setup line printed before each benchmark gives slots, open conversations and agents
//! available (the candidate pool). The machine and commit go with the numbers in the report
//! that quotes them.

// criterion_group! generates an undocumented public function.
#![allow(missing_docs)]

use std::collections::VecDeque;
use std::time::Instant;

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use switchboard::cs::routing::{BusinessHours, OpenRange, StrategyConfig};
use switchboard::cs::{DeskLimits, DeskPolicy, Effect, TenantDesk};
use switchboard_protocol::{AgentPresence, ConversationEventKind as Kind, Text};

/// Monday 2024-01-01 10:00 UTC: inside the business-hours strategy's opening hours.
const START_MS: u64 = 1_704_103_200_000;
const SKILLS: usize = 20;
const AGENT_COUNTS: [usize; 3] = [100, 1_000, 10_000];
/// Share of the agents' summed capacity in use, in percent (accepted conversations).
const LOAD_PCT: usize = 50;

fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

fn below(state: &mut u64, n: usize) -> usize {
    (splitmix64(state) % n as u64) as usize
}

fn agent_id(n: usize) -> Text {
    Text::from(format!("agent-{n:05}"))
}

fn strategies(agents: usize) -> Vec<(&'static str, StrategyConfig)> {
    let hours = BusinessHours {
        utc_offset_minutes: 0,
        open: (0..5).map(|weekday| OpenRange { weekday, start_minute: 8 * 60, end_minute: 20 * 60 }).collect(),
    };
    vec![
        ("least_load", StrategyConfig::LeastLoad),
        (
            "weighted_round_robin",
            StrategyConfig::WeightedRoundRobin {
                weights: (0..agents).step_by(10).map(|n| (agent_id(n), 3)).collect(),
                default_weight: 1,
            },
        ),
        ("skill_based", StrategyConfig::SkillBased),
        ("affinity", StrategyConfig::Affinity { fallback: Box::new(StrategyConfig::LeastLoad) }),
        ("business_hours", StrategyConfig::BusinessHours { hours, inner: Box::new(StrategyConfig::LeastLoad) }),
    ]
}

/// One tenant's desk held at a steady load, and what the bench needs to drive it.
struct Steady {
    desk: TenantDesk,
    now_ms: u64,
    rng: u64,
    skills: Vec<Text>,
    customers: Vec<Text>,
    /// Session ids, one per open conversation (a closed conversation's id is reused by the
    /// next one opened).
    sessions: Vec<Text>,
    /// Indexes into `sessions`, oldest first.
    open: VecDeque<usize>,
    effects: Vec<Effect>,
    reason: Text,
}

impl Steady {
    fn new(agents: usize, strategy: StrategyConfig) -> Steady {
        let mut rng = 0x5eed_0000 + agents as u64;
        let skills: Vec<Text> = (0..SKILLS).map(|k| Text::from(format!("skill-{k:02}"))).collect();
        let policy = DeskPolicy { strategy, ..DeskPolicy::default() };
        let limits = DeskLimits { agents_max: agents.max(10_000), ..DeskLimits::default() };
        let mut desk = TenantDesk::new(limits, policy).expect("valid policy");
        let mut effects = Vec::new();
        let mut slots = 0usize;
        for n in 0..agents {
            let capacity = 3 + below(&mut rng, 3) as u16;
            let extra = below(&mut rng, 3);
            let mut own: Vec<Text> = vec![skills[n % SKILLS].clone()];
            own.extend((0..extra).map(|_| skills[below(&mut rng, SKILLS)].clone()));
            effects.clear();
            desk.agent_status(START_MS, &agent_id(n), AgentPresence::Online, capacity, &own, &mut effects).expect("agent online");
            slots += usize::from(capacity);
        }
        let target = slots * LOAD_PCT / 100;
        let mut steady = Steady {
            desk,
            now_ms: START_MS,
            rng,
            customers: (0..agents * 4).map(|n| Text::from(format!("customer-{n:06}"))).collect(),
            sessions: (0..target).map(|n| Text::from(format!("conv-{n:06}"))).collect(),
            skills,
            open: VecDeque::with_capacity(target),
            effects,
            reason: Text::new(),
        };
        for slot in 0..target {
            steady.open_and_accept(slot);
        }
        steady
    }

    /// Opens a conversation in session slot `slot` and accepts the offer it must get at once.
    fn open_and_accept(&mut self, slot: usize) {
        let customer = &self.customers[below(&mut self.rng, self.customers.len())];
        let skill = &self.skills[below(&mut self.rng, SKILLS)];
        let session = &self.sessions[slot];
        self.effects.clear();
        self.desk
            .open_conversation(self.now_ms, session, customer, 0, std::slice::from_ref(skill), &mut self.effects)
            .expect("open");
        let agent = self
            .effects
            .iter()
            .find_map(|e| match e {
                Effect::NotifyAgent { agent, session: s, kind: Kind::Offered, .. } if s == session => Some(agent.clone()),
                _ => None,
            })
            .unwrap_or_else(|| panic!("{session} was not offered at once: the bench load is not steady"));
        self.effects.clear();
        self.desk.offer_response(self.now_ms, session, &agent, true, &mut self.effects).expect("accept");
        self.open.push_back(slot);
    }

    /// One decision: close the oldest conversation, open a new one, accept its offer.
    fn step(&mut self) {
        self.now_ms += 1;
        let slot = self.open.pop_front().expect("open conversations");
        self.effects.clear();
        self.desk.close(self.now_ms, &self.sessions[slot], &self.reason, &mut self.effects).expect("close");
        debug_assert!(
            !self.effects.iter().any(|e| matches!(e, Effect::NotifyAgent { kind: Kind::Offered, .. })),
            "nothing waits, so a close offers nothing"
        );
        self.open_and_accept(slot);
    }
}

fn routing(c: &mut Criterion) {
    for (name, _) in strategies(0) {
        let mut group = c.benchmark_group(format!("routing/{name}"));
        group.sample_size(10);
        group.warm_up_time(std::time::Duration::from_millis(500));
        group.measurement_time(std::time::Duration::from_secs(2));
        group.throughput(Throughput::Elements(1));
        for agents in AGENT_COUNTS {
            let strategy = strategies(agents).into_iter().find(|(n, _)| *n == name).expect("strategy").1;
            let started = Instant::now();
            let mut steady = Steady::new(agents, strategy);
            let slots: usize = steady.desk.agents().iter().map(|(_, a)| usize::from(a.capacity())).sum();
            eprintln!(
                "setup {name}/{agents}: {slots} slots, {} conversations open, {} agents available, {:.1} s",
                steady.desk.conversations_len(),
                steady.desk.agents().available_len(),
                started.elapsed().as_secs_f64()
            );
            group.bench_function(BenchmarkId::from_parameter(agents), |b| b.iter(|| steady.step()));
            assert_eq!(steady.desk.stats().strategy_misses, 0, "{name} broke the strategy contract");
        }
        group.finish();
    }
}

criterion_group!(benches, routing);
criterion_main!(benches);
