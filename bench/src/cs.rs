//! The customer-service load scenario (`csload`, issue 5's "open → offered latency under a paced
//! load of new conversations while messages flow"): the sans-IO parts.
//!
//! - [`OpenLedger`] / [`AgentLedger`]: what each generator thread saw of each conversation
//!   (numbered 0, 1, 2, … in the order they are scheduled), merged and classified at the end
//!   by [`classify`] into a [`ConvCounts`]: opened, refused, offered, accepted, closed, and the
//!   anomalies: conversations **lost** (opened, never offered), offered twice without the first
//!   offer being withdrawn, offers for conversations never opened.
//! - [`AgentLoads`]: each agent's load as the client sees it, to catch an offer beyond the
//!   agent's capacity (the engine's capacity check is meant to be atomic).
//! - [`CsReport`], [`CsSuite`]: what one run and a whole `csload` invocation report, and the
//!   markdown table.
//!
//! The generator itself is [`crate::csrun`].

use crate::latency::Percentiles;
use crate::report::{Host, MachineStats, Report};
use serde::{Deserialize, Serialize};
use std::fmt::Write as _;

/// How the engine answered one request.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Answer {
    /// Not answered (yet).
    #[default]
    None,
    /// OK.
    Ok,
    /// ERROR.
    Refused,
}

/// What the opener threads saw: per conversation, was it sent and how was it answered.
#[derive(Debug, Clone, Default)]
pub struct OpenLedger {
    sent: Vec<bool>,
    answer: Vec<Answer>,
}

impl OpenLedger {
    /// A ledger for conversations `0 .. n`.
    pub fn new(n: usize) -> Self {
        OpenLedger { sent: vec![false; n], answer: vec![Answer::None; n] }
    }

    /// Conversation `c`'s `OPEN_CONVERSATION` was written.
    pub fn sent(&mut self, c: usize) {
        if let Some(s) = self.sent.get_mut(c) {
            *s = true;
        }
    }

    /// Conversation `c`'s OPEN was answered; returns false for an answer to nothing sent or a
    /// second answer (counted by the caller as unexpected).
    pub fn answered(&mut self, c: usize, ok: bool) -> bool {
        match (self.sent.get(c), self.answer.get_mut(c)) {
            (Some(true), Some(a)) if *a == Answer::None => {
                *a = if ok { Answer::Ok } else { Answer::Refused };
                true
            }
            _ => false,
        }
    }

    /// Merge another opener's ledger (disjoint conversations) into this one.
    pub fn merge(&mut self, other: &OpenLedger) {
        for (c, (&s, &a)) in other.sent.iter().zip(&other.answer).enumerate() {
            if s {
                self.sent[c] = true;
            }
            if a != Answer::None {
                self.answer[c] = a;
            }
        }
    }
}

/// What the agent-side threads saw of one conversation.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AgentSide {
    /// Offered notifications.
    pub offers: u32,
    /// Offers withdrawn (Declined notification: the offer timed out).
    pub withdrawn: u32,
    /// `OFFER_RESPONSE` accept answered OK.
    pub accept_ok: u32,
    /// `OFFER_RESPONSE` accept refused.
    pub accept_refused: u32,
    /// `CLOSE_CONVERSATION` answered OK.
    pub close_ok: u32,
    /// `CLOSE_CONVERSATION` refused.
    pub close_refused: u32,
}

/// What one agent-side thread saw, per conversation.
#[derive(Debug, Clone, Default)]
pub struct AgentLedger {
    /// Indexed by conversation.
    pub conv: Vec<AgentSide>,
    /// Notifications about conversations outside the ledger (never scheduled).
    pub unknown: u64,
}

impl AgentLedger {
    /// A ledger for conversations `0 .. n`.
    pub fn new(n: usize) -> Self {
        AgentLedger { conv: vec![AgentSide::default(); n], unknown: 0 }
    }

    /// The entry of conversation `c`, or `None` (counted as unknown) when out of range.
    pub fn get(&mut self, c: usize) -> Option<&mut AgentSide> {
        let r = self.conv.get_mut(c);
        if r.is_none() {
            self.unknown += 1;
        }
        r
    }

    /// Merge another thread's ledger (a conversation may be offered on several).
    pub fn merge(&mut self, other: &AgentLedger) {
        for (a, b) in self.conv.iter_mut().zip(&other.conv) {
            a.offers += b.offers;
            a.withdrawn += b.withdrawn;
            a.accept_ok += b.accept_ok;
            a.accept_refused += b.accept_refused;
            a.close_ok += b.close_ok;
            a.close_refused += b.close_refused;
        }
        self.unknown += other.unknown;
    }
}

/// Every conversation of a run, accounted for.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConvCounts {
    /// `OPEN_CONVERSATION` written.
    pub opened: u64,
    /// OPEN answered OK.
    pub open_ok: u64,
    /// OPEN answered with ERROR.
    pub open_refused: u64,
    /// OPEN never answered (by the end of the drain).
    pub open_unanswered: u64,
    /// Conversations offered to an agent at least once.
    pub offered: u64,
    /// Offer notifications in all (re-offers after a timeout included).
    pub offers: u64,
    /// Offers withdrawn by the engine (offer timeout).
    pub withdrawn: u64,
    /// Conversations accepted (`OFFER_RESPONSE` answered OK).
    pub accepted: u64,
    /// `OFFER_RESPONSE` refused.
    pub accept_refused: u64,
    /// Conversations closed (`CLOSE_CONVERSATION` answered OK).
    pub closed: u64,
    /// `CLOSE_CONVERSATION` refused.
    pub close_refused: u64,
    /// **Lost**: opened OK, never offered by the end of the drain.
    pub lost: u64,
    /// Accepted but not closed by the end of the drain.
    pub unfinished: u64,
    /// A second offer while the first was still open (not withdrawn).
    pub double_offered: u64,
    /// Offers of conversations that were refused, never opened or never scheduled.
    pub unexpected: u64,
    /// Offers to an agent already at its capacity (as the client counts its load).
    pub over_capacity: u64,
    /// Answers (OK/ERROR) to requests the generator did not send.
    pub stray_answers: u64,
}

impl ConvCounts {
    /// True when nothing was lost, refused, doubled or unexpected.
    pub fn clean(&self) -> bool {
        self.open_refused == 0
            && self.open_unanswered == 0
            && self.lost == 0
            && self.accept_refused == 0
            && self.close_refused == 0
            && self.unfinished == 0
            && self.double_offered == 0
            && self.unexpected == 0
            && self.over_capacity == 0
            && self.stray_answers == 0
    }

    /// `lost/refused/double/unexpected/over-capacity` for tables.
    pub fn anomalies(&self) -> String {
        format!(
            "{}/{}/{}/{}/{}",
            self.lost,
            self.open_refused + self.open_unanswered + self.accept_refused + self.close_refused + self.unfinished,
            self.double_offered,
            self.unexpected + self.stray_answers,
            self.over_capacity
        )
    }
}

/// Classify every conversation from the merged ledgers.
pub fn classify(open: &OpenLedger, agents: &AgentLedger) -> ConvCounts {
    let mut c = ConvCounts { unexpected: agents.unknown, ..ConvCounts::default() };
    for (i, a) in agents.conv.iter().enumerate() {
        let sent = open.sent.get(i).copied().unwrap_or(false);
        let answer = open.answer.get(i).copied().unwrap_or_default();
        c.offers += u64::from(a.offers);
        c.withdrawn += u64::from(a.withdrawn);
        c.accept_refused += u64::from(a.accept_refused);
        c.close_refused += u64::from(a.close_refused);
        if a.offers > a.withdrawn + 1 {
            c.double_offered += u64::from(a.offers - a.withdrawn - 1);
        }
        if !sent || answer == Answer::Refused {
            c.unexpected += u64::from(a.offers);
        }
        if !sent {
            continue;
        }
        c.opened += 1;
        match answer {
            Answer::Ok => c.open_ok += 1,
            Answer::Refused => {
                c.open_refused += 1;
                continue;
            }
            Answer::None => c.open_unanswered += 1,
        }
        if a.offers > 0 {
            c.offered += 1;
        } else if answer == Answer::Ok {
            c.lost += 1;
        }
        if a.accept_ok > 0 {
            c.accepted += 1;
            if a.close_ok > 0 {
                c.closed += 1;
            } else {
                c.unfinished += 1;
            }
        }
    }
    c
}

/// Each agent's load as the client sees it: +1 on an offer, −1 when the offer is withdrawn or
/// the generator sends the close. All offers and withdrawals of an agent arrive on the one
/// connection that reported its status, in the engine's order, so an offer arriving while the
/// count is already at capacity was made to a full agent.
#[derive(Debug, Clone, Default)]
pub struct AgentLoads {
    load: Vec<u16>,
    capacity: u16,
    /// Offers that found the agent full.
    pub over_capacity: u64,
    /// Highest load seen on any agent.
    pub peak: u16,
}

impl AgentLoads {
    /// `agents` agents of `capacity` each.
    pub fn new(agents: usize, capacity: u16) -> Self {
        AgentLoads { load: vec![0; agents], capacity, over_capacity: 0, peak: 0 }
    }

    /// An offer to agent `a`; false when it was over capacity.
    pub fn offer(&mut self, a: usize) -> bool {
        let Some(l) = self.load.get_mut(a) else { return true };
        let ok = *l < self.capacity;
        if !ok {
            self.over_capacity += 1;
        }
        *l = l.saturating_add(1);
        self.peak = self.peak.max(*l);
        ok
    }

    /// Agent `a` is free of one conversation (offer withdrawn, or close sent).
    pub fn release(&mut self, a: usize) {
        if let Some(l) = self.load.get_mut(a) {
            *l = l.saturating_sub(1);
        }
    }
}

/// The conversation number in a session id `c.{n}` (or customer `u.{n}`, agent `a.{n}`).
pub fn parse_index(id: &str, prefix: &str) -> Option<usize> {
    id.strip_prefix(prefix)?.parse().ok()
}

/// Settings of one `csload` run (serialized in full into the report).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct CsSettings {
    /// Engine address.
    pub addr: String,
    /// New conversations per second (0: none, agents only).
    pub rate: f64,
    /// Agents brought online.
    pub agents: u32,
    /// Capacity of each agent.
    pub capacity: u16,
    /// Connections speaking for the agents (gateway role: each reports for a share of them).
    pub agent_conns: u32,
    /// Connections opening conversations (gateway role, for customers `u.{n}`).
    pub open_conns: u32,
    /// How long an agent keeps an accepted conversation before closing it, ms.
    pub hold_ms: u64,
    /// Measured seconds.
    pub duration_s: f64,
    /// Warm-up seconds.
    pub warmup_s: f64,
    /// Pacing tick, µs.
    pub tick_us: u64,
    /// Longest drain after the last open, seconds.
    pub drain_s: f64,
    /// Engine PID, for its CPU.
    pub server_pid: Option<u32>,
    /// CPU the engine is pinned to (for the per-CPU saturation note).
    #[serde(default)]
    pub server_cpu: Option<usize>,
    /// CPU the generators are pinned to.
    #[serde(default)]
    pub generator_cpu: Option<usize>,
}

impl Default for CsSettings {
    fn default() -> Self {
        CsSettings {
            addr: String::new(),
            rate: 2000.0,
            agents: 500,
            capacity: 4,
            agent_conns: 4,
            open_conns: 2,
            hold_ms: 500,
            duration_s: 10.0,
            warmup_s: 2.0,
            tick_us: 1000,
            drain_s: 5.0,
            server_pid: None,
            server_cpu: None,
            generator_cpu: None,
        }
    }
}

impl CsSettings {
    /// Check consistency; the message says what to change.
    pub fn validate(&self) -> Result<(), String> {
        if self.agents == 0 || self.capacity == 0 || self.agent_conns == 0 || self.open_conns == 0 {
            return Err("--agents, --capacity, --agent-conns and --open-conns must be at least 1".into());
        }
        if self.agent_conns > self.agents {
            return Err("--agent-conns must not exceed --agents".into());
        }
        if !(self.rate >= 0.0 && self.rate.is_finite()) {
            return Err("--cs-rate must be >= 0".into());
        }
        if !(self.duration_s > 0.0 && self.duration_s + self.warmup_s <= 60.0 && self.warmup_s >= 0.0) {
            return Err("--duration must be > 0 and warm-up + duration at most 60 s".into());
        }
        if self.tick_us == 0 || self.tick_us > 100_000 {
            return Err("--tick-us must be 1 ..= 100000".into());
        }
        Ok(())
    }

    /// Conversations scheduled over the whole run (warm-up included), rounded up, plus one per
    /// opener: the size of the ledgers.
    pub fn conversations_max(&self) -> usize {
        ((self.rate * (self.warmup_s + self.duration_s)).ceil() as usize) + self.open_conns as usize + 16
    }

    /// Steady-state busy agent slots (offered or active) expected: rate × hold, against
    /// agents × capacity.
    pub fn expected_busy(&self) -> f64 {
        self.rate * self.hold_ms as f64 / 1000.0
    }
}

/// Server figures over the measured window.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct CsServer {
    /// Cores used (user+sys / wall).
    pub cpu_cores: f64,
    /// CPU ns per conversation opened in the window (all of the server's CPU: pub/sub too).
    pub cpu_ns_per_conversation: Option<f64>,
    /// RSS at the end, kB.
    pub rss_end_kb: Option<u64>,
}

/// Everything one `csload` run measured.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct CsReport {
    /// The run's name (`cs-only`, `pubsub-only`, `combined`).
    pub name: String,
    /// Settings of the conversation load (`None` settings fields mean defaults).
    pub settings: Option<CsSettings>,
    /// Paced pub/sub publishes/s that ran concurrently (0: none).
    pub pubsub_rate: f64,
    /// Seconds to bring the agents online.
    pub setup_s: f64,
    /// Measured window, seconds.
    pub window_s: f64,
    /// Conversations opened per second over the window.
    pub opens_per_s: f64,
    /// Every conversation of the run.
    pub counts: ConvCounts,
    /// Open (intended send time) → Offered notification at the agent's connection, first offer,
    /// conversations scheduled in the window (µs).
    pub offered_us: Percentiles,
    /// Percentile spectrum of the same.
    pub offered_spectrum: Vec<(f64, f64)>,
    /// Open (intended send time) → its OK (µs).
    pub open_ok_us: Percentiles,
    /// Offer arrival → the accept's OK (µs).
    pub accept_ok_us: Percentiles,
    /// Highest load the client saw on one agent.
    pub peak_agent_load: u16,
    /// How late the openers woke for their tick (µs).
    pub opener_wake_lag_us: Percentiles,
    /// Server figures.
    pub server: Option<CsServer>,
    /// This process's CPU over the window (cores).
    pub generator_cores: f64,
    /// The pub/sub loadgen child's CPU over the window (cores).
    pub pubsub_generator_cores: f64,
    /// Whole-machine CPU (other load = noise).
    pub machine: MachineStats,
    /// Busy cores of each CPU over the window (user+nice+system+steal, all processes): shows
    /// whether the engine's or the generators' core was saturated.
    #[serde(default)]
    pub cpu_busy: Vec<f64>,
    /// The pub/sub loadgen report, when it ran.
    pub pubsub: Option<Report>,
    /// Marginal server CPU per conversation: (this run's server cores − the `pubsub-only`
    /// run's) / opens per second, in ns; filled by the suite.
    pub marginal_cpu_ns_per_conversation: Option<f64>,
    /// Errors met (a run with errors is not a valid measurement).
    pub errors: Vec<String>,
    /// Notes (generator behind schedule, pub/sub window alignment).
    pub notes: Vec<String>,
}

/// A whole `csload` invocation (`results.json`).
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct CsSuite {
    /// Machine and start time.
    pub host: Host,
    /// Git commit of the harness.
    pub commit: Option<String>,
    /// The command line.
    pub command: String,
    /// Every run.
    pub runs: Vec<CsReport>,
    /// Notes for the reader.
    pub notes: Vec<String>,
}

fn pct(p: &Percentiles) -> String {
    if p.count == 0 {
        "- | - | - | -".into()
    } else {
        format!("{:.0} | {:.0} | {:.0} | {:.0}", p.p50, p.p99, p.p999, p.max)
    }
}

impl CsSuite {
    /// Fill each run's marginal CPU per conversation from the `pubsub-only` run (same pub/sub
    /// rate) or, without pub/sub, from an idle engine (0).
    pub fn attribute_cpu(&mut self) {
        let base = self
            .runs
            .iter()
            .find(|r| r.settings.as_ref().is_some_and(|s| s.rate == 0.0) && r.errors.is_empty())
            .and_then(|r| r.server.as_ref().map(|s| (r.pubsub_rate, s.cpu_cores)));
        for r in &mut self.runs {
            let Some(srv) = &r.server else { continue };
            if r.opens_per_s <= 0.0 {
                continue;
            }
            let base_cores = if r.pubsub_rate == 0.0 {
                Some(0.0)
            } else {
                base.filter(|(rate, _)| (*rate - r.pubsub_rate).abs() < 0.5).map(|(_, c)| c)
            };
            r.marginal_cpu_ns_per_conversation = base_cores.map(|b| (srv.cpu_cores - b).max(0.0) * 1e9 / r.opens_per_s);
        }
    }

    /// The tables, in markdown.
    pub fn markdown(&self) -> String {
        let mut o = String::new();
        if let Some(s) = self.runs.iter().find_map(|r| r.settings.as_ref()) {
            let _ = writeln!(
                o,
                "Conversations: paced open loop on a {} µs tick over {} gateway connection(s) (customers `u.N`), {} agents × capacity {} online over {} gateway connection(s), accept at once, close after {} ms; {} s measured after {} s warm-up. Pub/sub: `loadgen` 1000 sessions × 3 subscribers over 8 gateways, 2 publishers, 128 B, as a child process.\n",
                s.tick_us, s.open_conns, s.agents, s.capacity, s.agent_conns, s.hold_ms, s.duration_s, s.warmup_s
            );
        }
        let _ = writeln!(o, "Open → Offered: from the OPEN_CONVERSATION's intended send time to the Offered notification on the agent's connection (µs).\n");
        let _ = writeln!(
            o,
            "| run | conv/s | pub/s | offered p50 | p99 | p99.9 | max | open→OK p99 | opened | offered | accepted | closed | lost/err/double/unexp/overcap | server CPU | ns CPU/conv (all) | ns CPU/conv (marginal) | RSS end MiB |"
        );
        let _ = writeln!(o, "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|");
        for r in &self.runs {
            let c = &r.counts;
            let srv = r.server.as_ref();
            let _ = writeln!(
                o,
                "| {} | {:.0} | {:.0} | {} | {} | {} | {} | {} | {} | {} | {} | {} |",
                r.name,
                r.opens_per_s,
                r.pubsub.as_ref().map_or(0.0, |p| p.publishes_per_s),
                pct(&r.offered_us),
                if r.open_ok_us.count == 0 { "-".into() } else { format!("{:.0}", r.open_ok_us.p99) },
                c.opened,
                c.offered,
                c.accepted,
                c.closed,
                c.anomalies(),
                srv.map_or_else(|| "-".into(), |s| format!("{:.1} %", s.cpu_cores * 100.0)),
                srv.and_then(|s| s.cpu_ns_per_conversation).map_or_else(|| "-".into(), |v| format!("{v:.0}")),
            );
            let last = o.pop();
            debug_assert_eq!(last, Some('\n'));
            let _ = writeln!(
                o,
                " {} | {} |",
                r.marginal_cpu_ns_per_conversation.map_or_else(|| "-".into(), |v| format!("{v:.0}")),
                srv.and_then(|s| s.rss_end_kb).map_or_else(|| "-".into(), |k| format!("{:.0}", k as f64 / 1024.0))
            );
        }
        let with_pubsub: Vec<&CsReport> = self.runs.iter().filter(|r| r.pubsub.is_some()).collect();
        if !with_pubsub.is_empty() {
            let _ = writeln!(o, "\nPub/sub during the same runs (`loadgen`, its own window, which covers the conversations' window):\n");
            let _ = writeln!(o, "| run | publishes/s | deliveries/s | p50 µs | p99 µs | p99.9 µs | max µs | lost/dup/reord/unexp | errors |");
            let _ = writeln!(o, "|---|---|---|---|---|---|---|---|---|");
            for r in with_pubsub {
                let p = r.pubsub.as_ref().expect("filtered");
                let a = &p.accounting;
                let _ = writeln!(
                    o,
                    "| {} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} | {}/{}/{}/{} | {} |",
                    r.name,
                    p.publishes_per_s,
                    p.deliveries_per_s,
                    p.latency_us.p50,
                    p.latency_us.p99,
                    p.latency_us.p999,
                    p.latency_us.max,
                    a.lost,
                    a.duplicated,
                    a.reordered,
                    a.unexpected,
                    p.errors.len()
                );
            }
        }
        let mut notes = Vec::new();
        for r in &self.runs {
            if r.machine.noisy {
                let per_cpu: Vec<String> = r.cpu_busy.iter().enumerate().map(|(i, b)| format!("CPU {i} {:.0} %", b * 100.0)).collect();
                notes.push(format!(
                    "{}: noisy, other processes used {:.2} cores{}",
                    r.name,
                    r.machine.other_cores,
                    if per_cpu.is_empty() { String::new() } else { format!(" (busy: {})", per_cpu.join(", ")) }
                ));
            }
            for n in &r.notes {
                notes.push(format!("{}: {n}", r.name));
            }
            for e in r.errors.iter().take(5) {
                notes.push(format!("{}: ERROR {e}", r.name));
            }
            if r.counts.withdrawn > 0 {
                notes.push(format!("{}: {} offers withdrawn (offer timeout)", r.name, r.counts.withdrawn));
            }
        }
        notes.extend(self.notes.iter().cloned());
        if !notes.is_empty() {
            let _ = writeln!(o);
        }
        for n in notes {
            let _ = writeln!(o, "- {}", n.replace('|', "/"));
        }
        o
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_clean_run_classifies_clean() {
        let mut open = OpenLedger::new(10);
        let mut ag = AgentLedger::new(10);
        for c in 0..8 {
            open.sent(c);
            assert!(open.answered(c, true));
            let e = ag.get(c).unwrap();
            e.offers = 1;
            e.accept_ok = 1;
            e.close_ok = 1;
        }
        let k = classify(&open, &ag);
        assert_eq!((k.opened, k.open_ok, k.offered, k.accepted, k.closed, k.offers), (8, 8, 8, 8, 8, 8));
        assert!(k.clean(), "{k:?}");
        assert_eq!(k.anomalies(), "0/0/0/0/0");
    }

    #[test]
    fn lost_refused_unanswered_and_unfinished() {
        let mut open = OpenLedger::new(8);
        let mut ag = AgentLedger::new(8);
        for c in 0..6 {
            open.sent(c);
        }
        assert!(open.answered(0, true)); // lost: never offered
        assert!(open.answered(1, false)); // refused
        // 2: never answered, but offered (the engine routed it; the OK went missing)
        ag.get(2).unwrap().offers = 1;
        assert!(open.answered(3, true)); // accepted, never closed
        *ag.get(3).unwrap() = AgentSide { offers: 1, accept_ok: 1, ..AgentSide::default() };
        assert!(open.answered(4, true)); // accept refused
        *ag.get(4).unwrap() = AgentSide { offers: 1, accept_refused: 1, ..AgentSide::default() };
        assert!(open.answered(5, true)); // close refused
        *ag.get(5).unwrap() = AgentSide { offers: 1, accept_ok: 1, close_refused: 1, ..AgentSide::default() };
        assert!(!open.answered(5, true), "a second answer");
        assert!(!open.answered(7, true), "an answer to nothing sent");
        let k = classify(&open, &ag);
        assert_eq!(k.opened, 6);
        assert_eq!((k.open_ok, k.open_refused, k.open_unanswered), (4, 1, 1));
        assert_eq!(k.lost, 1);
        assert_eq!(k.offered, 4);
        assert_eq!((k.accepted, k.closed, k.unfinished), (2, 0, 2));
        assert_eq!((k.accept_refused, k.close_refused), (1, 1));
        assert!(!k.clean());
        assert_eq!(k.anomalies(), "1/6/0/0/0");
    }

    #[test]
    fn doubled_withdrawn_and_unexpected_offers() {
        let mut open = OpenLedger::new(6);
        let mut ag = AgentLedger::new(6);
        for c in 0..3 {
            open.sent(c);
            open.answered(c, true);
        }
        // 0: offered, timed out (withdrawn), offered again: fine.
        *ag.get(0).unwrap() = AgentSide { offers: 2, withdrawn: 1, accept_ok: 1, close_ok: 1, ..AgentSide::default() };
        // 1: offered three times with no withdrawal: two doubles.
        *ag.get(1).unwrap() = AgentSide { offers: 3, accept_ok: 1, close_ok: 1, ..AgentSide::default() };
        // 4: never opened, offered.
        ag.get(4).unwrap().offers = 1;
        assert!(ag.get(99).is_none());
        let k = classify(&open, &ag);
        assert_eq!((k.withdrawn, k.double_offered, k.unexpected, k.offers), (1, 2, 2, 6));
        assert_eq!(k.lost, 1, "2 was opened and never offered");
        assert_eq!(k.offered, 2);
    }

    #[test]
    #[allow(clippy::many_single_char_names)]
    fn ledgers_merge() {
        let mut a = OpenLedger::new(4);
        let mut b = OpenLedger::new(4);
        a.sent(0);
        a.answered(0, true);
        b.sent(1);
        b.answered(1, false);
        b.sent(2);
        a.merge(&b);
        let mut x = AgentLedger::new(4);
        let mut y = AgentLedger::new(4);
        x.get(0).unwrap().offers = 1;
        y.get(0).unwrap().accept_ok = 1;
        y.get(0).unwrap().close_ok = 1;
        y.get(9);
        x.merge(&y);
        let k = classify(&a, &x);
        assert_eq!((k.opened, k.open_ok, k.open_refused, k.open_unanswered), (3, 1, 1, 1));
        assert_eq!((k.offered, k.accepted, k.closed, k.unexpected), (1, 1, 1, 1));
    }

    #[test]
    fn agent_loads_catch_offers_beyond_capacity() {
        let mut l = AgentLoads::new(3, 2);
        assert!(l.offer(0));
        assert!(l.offer(0));
        assert!(!l.offer(0), "third offer to a capacity-2 agent");
        assert_eq!((l.over_capacity, l.peak), (1, 3));
        l.release(0);
        l.release(0);
        assert!(l.offer(0), "room again after releases");
        l.release(2);
        l.release(2);
        assert!(l.offer(2) && l.offer(2), "releases never go below 0");
        assert!(l.offer(7), "unknown agents are not counted");
        assert_eq!(l.over_capacity, 1);
    }

    #[test]
    fn ids_parse() {
        assert_eq!(parse_index("c.42", "c."), Some(42));
        assert_eq!(parse_index("a.0", "a."), Some(0));
        assert_eq!(parse_index("s.42", "c."), None);
        assert_eq!(parse_index("c.x", "c."), None);
    }

    #[test]
    fn settings_validate_and_size() {
        let s = CsSettings::default();
        assert!(s.validate().is_ok());
        assert_eq!(s.conversations_max(), 24_000 + 2 + 16);
        assert!((s.expected_busy() - 1000.0).abs() < 1e-9);
        assert!(CsSettings { agent_conns: 501, ..CsSettings::default() }.validate().is_err());
        assert!(CsSettings { rate: -1.0, ..CsSettings::default() }.validate().is_err());
        assert!(CsSettings { duration_s: 70.0, ..CsSettings::default() }.validate().is_err());
        assert!(CsSettings { open_conns: 0, ..CsSettings::default() }.validate().is_err());
    }

    #[test]
    fn marginal_cpu_and_table() {
        let run = |name: &str, rate: f64, pubsub: f64, cores: f64| CsReport {
            name: name.into(),
            settings: Some(CsSettings { rate, ..CsSettings::default() }),
            pubsub_rate: pubsub,
            opens_per_s: rate,
            server: Some(CsServer { cpu_cores: cores, cpu_ns_per_conversation: (rate > 0.0).then(|| cores * 1e9 / rate), rss_end_kb: None }),
            ..CsReport::default()
        };
        let mut s = CsSuite {
            runs: vec![run("cs-only", 2000.0, 0.0, 0.10), run("pubsub-only", 0.0, 50_000.0, 0.25), run("combined", 2000.0, 50_000.0, 0.35)],
            ..CsSuite::default()
        };
        s.attribute_cpu();
        let m = |i: usize| s.runs[i].marginal_cpu_ns_per_conversation;
        assert!((m(0).unwrap() - 50_000.0).abs() < 1e-6, "{:?}", m(0));
        assert_eq!(m(1), None);
        assert!((m(2).unwrap() - 50_000.0).abs() < 1e-6, "{:?}", m(2));
        let md = s.markdown();
        assert!(md.contains("| combined | 2000 | 0 |"), "{md}");
        assert!(md.contains("| 35.0 % | 175000 | 50000 | - |"), "{md}");
        assert!(md.contains("| pubsub-only | 0 |"), "{md}");
    }
}
