//! The customer-service side of a shard: hosts the [`TenantDesk`]s whose tenant hashes here,
//! carries out their [`Effect`]s, runs their timers, and knows the roles of this shard's
//! connections (for access checks, supervisor feeds and agent disconnects).
//!
//! Where things live (issue 5): a tenant's desk (agents, queues, conversation states) on
//! `tenant_shard(tenant)`; a conversation's session (seq, history, subscribers) on
//! `hash(tenant, session)`, like any session. Connections reach the desk through
//! [`Request::Desk`]; the desk's events reach the session owner as [`Event::ConversationEvent`]
//! (the owner stamps the seq, so events and messages share one order), then every shard's
//! supervisors through [`Event::SupervisorFeed`].
//!
//! Access: gateways and supervisors are scoped by tenant (session keys carry it). A customer's
//! or agent's `SUBSCRIBE`, `PUBLISH`, `READ_CURSOR` and `TYPING` first ask the desk (`DeskOp::Watch`)
//! and wait for its verdict: `cs::access` decides from the conversation's state, so access
//! follows offers, assignments and transfers with no grant table to keep in step. When an
//! agent leaves a conversation, its agent-role connections' subscriptions are revoked through
//! the session owner, after the event that ended its part.
//!
//! It may not touch the session tables except through the owner methods of `shard.rs`.
//! Desk effects are pushed onto links without waiting (a desk call produces a handful), because
//! the desk runs inside request handling and timer firings, and a shard that waits on a peer
//! there could wait on a peer waiting on it.

use std::cell::{Cell, RefCell};
use std::collections::HashMap;
use std::future::poll_fn;
use std::rc::Rc;
use std::task::{Poll, Waker};
use std::time::Duration;

use bytes::Bytes;
use switchboard_protocol::{AgentStatus, ConversationEvent, ErrorCode, ErrorFrame, Frame, Success, Text, TicketCommand, TicketEvent};

use super::Shard;
use crate::auth::{Identity, Role};
use crate::cs::access::{check_agent_status, check_conversation, check_open, Actor, ConversationAction};
use crate::cs::tickets::{self, ConversationLink, Ticket};
use crate::cs::{CsTimerId, DeskError, Effect, TenantDesk, TicketBook, TimerKind, TimerPayload};
use crate::mesh::{tenant_shard, ConnId, DeskActor, DeskOp, DeskRequest, Event, Request, SessionKey};
use crate::rate::{Limited, RateBuckets};
use crate::timer::{TimerId, TimerWheel};

/// How long a connection waits for the desk's verdict on an access check before it gets
/// ERROR(Unavailable): the desk's shard is busy or stopping.
const CHECK_TIMEOUT_MS: u64 = 5_000;

/// Longest sleep of the timer task with nothing due, in milliseconds (it also notices shutdown
/// this often).
const TIMER_IDLE_SLEEP_MS: u64 = 1_000;

/// A refusal as it travels back to the connection.
pub(crate) type Refusal = (ErrorCode, String);

fn refusal(error: &DeskError) -> Refusal {
    (error.code(), error.to_string())
}

fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_millis() as u64)
}

fn cs_role(role: Role) -> crate::cs::Role {
    match role {
        Role::Gateway => crate::cs::Role::Gateway,
        Role::Customer => crate::cs::Role::Customer,
        Role::Agent => crate::cs::Role::Agent,
        Role::Supervisor => crate::cs::Role::Supervisor,
    }
}

/// A connection that speaks for an agent, as the desk's shard knows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct AgentConn {
    shard: usize,
    conn: ConnId,
    role: Role,
    /// It sent `AGENT_STATUS` for the agent: the agent is connected while one such is open.
    reports: bool,
}

/// One tenant's desk, its tickets, and the connections they talk to.
struct HostedDesk {
    desk: TenantDesk,
    tickets: TicketBook,
    /// Agent → connections that speak for it (offers go to them).
    agents: HashMap<Text, Vec<AgentConn>>,
    /// Customer → its open connections (customer role only): the last one closing starts the
    /// customer's grace period, after which its waiting conversations are abandoned.
    customers: HashMap<Text, Vec<(usize, ConnId)>>,
}

/// Desk requests handled and refused (see `DeskHost::request_counts`).
pub(super) type RequestCounts = (u64, u64);

/// What this shard knows of one of its connections.
struct LocalConn {
    identity: Identity,
    /// Agents it spoke for (told to the desk when it closes).
    agents: Vec<Text>,
    /// Its rate buckets.
    rates: RateBuckets,
}

/// Wakes the timer task early when a timer is due before its planned wake-up.
#[derive(Default)]
struct Alarm {
    rung: Cell<bool>,
    waker: Cell<Option<Waker>>,
    /// When the task plans to wake, Unix milliseconds.
    sleep_until_ms: Cell<u64>,
}

/// The customer-service state of one shard.
#[derive(Default)]
pub(crate) struct DeskHost {
    desks: RefCell<HashMap<Text, HostedDesk>>,
    /// Desk timers: (tenant, payload). Created with the first desk.
    timers: RefCell<Option<TimerWheel<(Text, TimerPayload)>>>,
    timer_ids: RefCell<HashMap<(Text, CsTimerId), TimerId>>,
    alarm: Rc<Alarm>,
    conns: RefCell<HashMap<ConnId, LocalConn>>,
    /// Tenant → this shard's supervisor connections.
    supervisors: RefCell<HashMap<Text, Vec<ConnId>>>,
    /// Tenant → this shard's share of its rate limits.
    tenant_rates: RefCell<HashMap<Text, RateBuckets>>,
    /// Access checks waiting for the desk's verdict.
    checks: RefCell<HashMap<u64, flume::Sender<Option<Refusal>>>>,
    next_check: Cell<u64>,
    /// Tenant → the policy version this shard has applied (absent: the configuration's,
    /// version 1). Kept by `desk_control`.
    pub(super) policy_versions: RefCell<HashMap<Text, u64>>,
    /// (tenant, operation) → desk requests handled here and how many were refused (for
    /// /metrics; tenants are the configured ones, operations a fixed set). Kept by
    /// `desk_control`.
    pub(super) request_counts: RefCell<HashMap<(Text, &'static str), RequestCounts>>,
}

impl Shard {
    // ---- connections ----

    /// Notes a connection's verified identity (after WELCOME).
    pub(crate) fn desk_register(&self, conn: ConnId, identity: &Identity) {
        let rate_config = self.rate_config(&identity.tenant);
        let now_us = self.now_us();
        let rates = RateBuckets::for_connection(&rate_config, now_us);
        if identity.role == Role::Supervisor {
            self.desk.supervisors.borrow_mut().entry(identity.tenant.clone()).or_default().push(conn);
        }
        self.desk.tenant_rates.borrow_mut().entry(identity.tenant.clone()).or_insert_with(|| RateBuckets::for_tenant_share(&rate_config, self.shards, now_us));
        self.desk.conns.borrow_mut().insert(conn, LocalConn { identity: identity.clone(), agents: Vec::new(), rates });
    }

    fn rate_config(&self, tenant: &Text) -> crate::config::RateLimitsConfig {
        let own = self.config.tenants.iter().find(|t| t.id == tenant.as_str()).and_then(|t| t.rate_limits.clone());
        own.unwrap_or_else(|| self.config.rate_limits.clone())
    }

    /// A connection closed: forget it, and tell the desk if it spoke for agents or was a
    /// customer (so that agents go through their grace period and waiting customers abandon).
    pub(crate) fn desk_conn_closed(&self, conn: ConnId) {
        let Some(local) = self.desk.conns.borrow_mut().remove(&conn) else { return };
        let identity = local.identity;
        if identity.role == Role::Supervisor {
            if let Some(conns) = self.desk.supervisors.borrow_mut().get_mut(&identity.tenant) {
                conns.retain(|&c| c != conn);
            }
        }
        if local.agents.is_empty() && identity.role != Role::Customer {
            return;
        }
        let request = DeskRequest {
            conn,
            correlation: 0,
            check: 0,
            actor: DeskActor { tenant: identity.tenant.clone(), role: identity.role, subject: identity.subject.clone() },
            op: DeskOp::ConnLost { agents: local.agents },
        };
        let desk_shard = tenant_shard(&identity.tenant, self.shards);
        if desk_shard == self.index {
            self.desk_request(self.index, request);
        } else if let Some(link) = &self.requests_out[desk_shard] {
            // Not awaited: called while a connection is being removed (see `uninterest`).
            link.push(Request::Desk(request));
        }
    }

    /// Checks and takes from the connection's and the tenant's rate buckets; `Err` says which
    /// limit is reached (nothing is taken then).
    pub(crate) fn desk_rate_limit(&self, conn: ConnId, what: Limited, bytes: u64) -> Result<(), &'static str> {
        if !self.rate_limited {
            return Ok(());
        }
        let now_us = self.now_us();
        let mut conns = self.desk.conns.borrow_mut();
        let Some(local) = conns.get_mut(&conn) else { return Ok(()) };
        let mut tenants = self.desk.tenant_rates.borrow_mut();
        let Some(tenant) = tenants.get_mut(&local.identity.tenant) else { return Ok(()) };
        let message = |limited| match limited {
            Limited::Publishes => "rate limited: publishes per second",
            Limited::PublishBytes => "rate limited: publish bytes per second",
            Limited::Opens => "rate limited: conversations opened per second",
            Limited::Subscribes => "rate limited: subscribes per second",
            Limited::Signals => "rate limited: read cursors and typing per second",
        };
        if let Err(limited) = local.rates.check(what, bytes, now_us) {
            return Err(match limited {
                Limited::Publishes => "rate limited: publishes per second of this connection",
                Limited::PublishBytes => "rate limited: publish bytes per second of this connection",
                Limited::Opens => "rate limited: conversations opened per second of this connection",
                Limited::Subscribes => "rate limited: subscribes per second of this connection",
                Limited::Signals => "rate limited: read cursors and typing per second of this connection",
            });
        }
        if let Err(limited) = tenant.check(what, bytes, now_us) {
            return Err(message(limited));
        }
        for buckets in [&mut local.rates, tenant] {
            buckets.take(what, bytes);
        }
        Ok(())
    }

    // ---- requests from this shard's connections ----

    fn desk_actor(&self, conn: ConnId) -> Option<DeskActor> {
        let conns = self.desk.conns.borrow();
        let identity = &conns.get(&conn)?.identity;
        Some(DeskActor { tenant: identity.tenant.clone(), role: identity.role, subject: identity.subject.clone() })
    }

    /// A customer-service frame from a local connection: carried to the desk, answered with OK
    /// or ERROR there.
    pub(crate) async fn desk_call(&self, conn: ConnId, correlation: u32, op: DeskOp) {
        let Some(actor) = self.desk_actor(conn) else { return };
        self.note_agent(conn, &op);
        if actor.role == Role::Agent && matches!(op, DeskOp::Ticket { .. }) {
            // The desk now pushes this agent's tickets here: tell it when the connection closes.
            if let Some(local) = self.desk.conns.borrow_mut().get_mut(&conn) {
                if !local.agents.contains(&actor.subject) {
                    local.agents.push(actor.subject.clone());
                }
            }
        }
        let desk_shard = tenant_shard(&actor.tenant, self.shards);
        let request = DeskRequest { conn, correlation, check: 0, actor, op };
        if desk_shard == self.index {
            self.desk_request(self.index, request);
        } else {
            self.request(desk_shard, Request::Desk(request)).await;
        }
    }

    /// Remembers the agents a connection speaks for, to tell the desk when it closes.
    fn note_agent(&self, conn: ConnId, op: &DeskOp) {
        let DeskOp::AgentStatus { agent, .. } = op else { return };
        if let Some(local) = self.desk.conns.borrow_mut().get_mut(&conn) {
            if !local.agents.contains(agent) {
                local.agents.push(agent.clone());
            }
        }
    }

    /// May this connection watch (subscribe to, publish in) `session`? Gateways and supervisors
    /// may (within their tenant, which the session key already scopes); customers and agents
    /// only if the desk says the conversation is theirs. Waits for the desk's verdict.
    pub(crate) async fn desk_check_watch(&self, conn: ConnId, session: &Text) -> Result<(), Refusal> {
        let Some(actor) = self.desk_actor(conn) else { return Err((ErrorCode::Internal, "connection unknown".into())) };
        if matches!(actor.role, Role::Gateway | Role::Supervisor) {
            return Ok(());
        }
        if actor.role == Role::Agent {
            let agent = actor.subject.clone();
            if let Some(local) = self.desk.conns.borrow_mut().get_mut(&conn) {
                if !local.agents.contains(&agent) {
                    local.agents.push(agent);
                }
            }
        }
        let desk_shard = tenant_shard(&actor.tenant, self.shards);
        let op = DeskOp::Watch { session: Text::from(session.as_str()) };
        if desk_shard == self.index {
            return match self.desk_handle(self.index, conn, &actor, &op) {
                Ok(()) => Ok(()),
                Err(error) => Err(refusal(&error)),
            };
        }
        let check = self.desk.next_check.get() + 1;
        self.desk.next_check.set(check);
        let (verdict_tx, verdict_rx) = flume::bounded(1);
        self.desk.checks.borrow_mut().insert(check, verdict_tx);
        self.request(desk_shard, Request::Desk(DeskRequest { conn, correlation: 0, check, actor, op })).await;
        let verdict = glommio::timer::timeout(Duration::from_millis(CHECK_TIMEOUT_MS), async {
            Ok(verdict_rx.recv_async().await.ok())
        })
        .await;
        self.desk.checks.borrow_mut().remove(&check);
        match verdict {
            Ok(Some(None)) => Ok(()),
            Ok(Some(Some(refused))) => Err(refused),
            Ok(None) | Err(_) => Err((ErrorCode::Unavailable, "the desk did not answer the access check in time".into())),
        }
    }

    // ---- the desk's shard ----

    /// Handles a desk request (from this shard or a peer) and answers it.
    pub(super) fn desk_request(&self, origin: usize, request: DeskRequest) {
        let DeskRequest { conn, correlation, check, actor, op } = request;
        if let DeskOp::Ticket { command } = &op {
            if let Err(error) = self.ticket_request(origin, conn, correlation, &actor, command) {
                tracing::debug!(shard = self.index, tenant = %actor.tenant, role = ?actor.role, %error, "ticket command refused");
                self.reply(origin, Event::DeskAnswer { conn, correlation, check, refusal: Some(refusal(&error)) });
            }
            return;
        }
        let result = self.desk_handle(origin, conn, &actor, &op);
        if matches!(op, DeskOp::ConnLost { .. }) {
            return;
        }
        if let Err(error) = &result {
            tracing::debug!(shard = self.index, tenant = %actor.tenant, role = ?actor.role, %error, "desk request refused");
        }
        let refusal = result.err().map(|error| refusal(&error));
        self.reply(origin, Event::DeskAnswer { conn, correlation, check, refusal });
    }

    /// Reads `tenant`'s desk, creating it from the configuration when it has not been used yet
    /// (the control plane's views). Call on the tenant's shard.
    pub(super) fn desk_read<R>(&self, tenant: &Text, read: impl FnOnce(&TenantDesk) -> R) -> Result<R, DeskError> {
        if tenant_shard(tenant, self.shards) != self.index {
            return Err(DeskError::BadRequest { reason: format!("tenant `{tenant}`'s desk lives on another shard") });
        }
        let mut desks = self.desk.desks.borrow_mut();
        let hosted = self.hosted_desk(&mut desks, tenant)?;
        Ok(read(&hosted.desk))
    }

    fn hosted_desk<'a>(&self, desks: &'a mut HashMap<Text, HostedDesk>, tenant: &Text) -> Result<&'a mut HostedDesk, DeskError> {
        if !desks.contains_key(tenant) {
            let own = self.config.tenants.iter().find(|t| t.id == tenant.as_str()).and_then(|t| t.desk.as_ref());
            let config = own.unwrap_or(&self.config.desk);
            // Validated with the configuration at start; a failure here is a bug, answered
            // rather than panicked on.
            let desk = TenantDesk::new(config.limits(), config.policy())?;
            let tickets = TicketBook::new(config.ticket_settings(self.config.limits.frame_body_bytes_max));
            desks.insert(Text::from(tenant.as_str()), HostedDesk { desk, tickets, agents: HashMap::new(), customers: HashMap::new() });
            if self.desk.timers.borrow().is_none() {
                *self.desk.timers.borrow_mut() = Some(TimerWheel::new(self.config.limits.desk_timers_per_shard_max, now_ms()));
                if let Some(shard) = self.me.upgrade() {
                    glommio::spawn_local(run_desk_timers(shard)).detach();
                }
            }
        }
        desks.get_mut(tenant).ok_or_else(|| DeskError::not_found("tenant", tenant))
    }

    /// Runs one desk operation for `actor` (from connection `conn` on shard `origin`): access
    /// checks first, then the desk; then carries out the effects.
    fn desk_handle(&self, origin: usize, conn: ConnId, actor: &DeskActor, op: &DeskOp) -> Result<(), DeskError> {
        let now = now_ms();
        let mut effects = Vec::new();
        let tenant = &actor.tenant;
        let result = {
            let mut desks = self.desk.desks.borrow_mut();
            let hosted = self.hosted_desk(&mut desks, tenant)?;
            let who = Actor { tenant: tenant.as_str(), role: cs_role(actor.role), subject: actor.subject.as_str() };
            let facts_check = |hosted: &HostedDesk, session: &Text, action| -> Result<(), DeskError> {
                let view = hosted.desk.conversation(session).ok_or_else(|| DeskError::not_found("conversation", session))?;
                check_conversation(&who, action, &view.facts(tenant.as_str()))
            };
            match op {
                DeskOp::Open { session, customer, priority, skills, context } => {
                    check_open(&who, tenant, customer)?;
                    hosted.desk.open_conversation_with_context(now, session, customer, *priority, skills, context, &mut effects)?;
                    if actor.role == Role::Customer {
                        Self::customer_conn(hosted, now, origin, conn, customer, &mut effects);
                    }
                    Ok(())
                }
                DeskOp::AgentStatus { agent, presence, capacity, skills } => {
                    check_agent_status(&who, tenant, agent)?;
                    hosted.desk.agent_status(now, agent, *presence, *capacity, skills, &mut effects)?;
                    let conns = hosted.agents.entry(agent.clone()).or_default();
                    match conns.iter_mut().find(|c| c.shard == origin && c.conn == conn) {
                        Some(known) => known.reports = true,
                        None => conns.push(AgentConn { shard: origin, conn, role: actor.role, reports: true }),
                    }
                    Ok(())
                }
                DeskOp::OfferResponse { session, agent, accept } => {
                    if actor.role == Role::Agent && agent != &actor.subject {
                        return Err(DeskError::Forbidden { reason: "an agent answers only for itself" });
                    }
                    facts_check(hosted, session, ConversationAction::RespondToOffer)?;
                    hosted.desk.offer_response(now, session, agent, *accept, &mut effects)
                }
                DeskOp::Transfer { session, kind, target, note } => {
                    facts_check(hosted, session, ConversationAction::Transfer)?;
                    hosted.desk.transfer(now, session, *kind, target, note, &mut effects)
                }
                DeskOp::Close { session, reason } => {
                    facts_check(hosted, session, ConversationAction::Close)?;
                    hosted.desk.close(now, session, reason, &mut effects)
                }
                DeskOp::Watch { session } => {
                    // Unknown and closed conversations are refused like other people's: a
                    // customer or agent learns nothing about conversations that are not theirs.
                    if hosted.desk.conversation(session).is_none() {
                        return Err(DeskError::Forbidden { reason: "not an open conversation of yours" });
                    }
                    facts_check(hosted, session, ConversationAction::Watch)?;
                    match actor.role {
                        Role::Customer => Self::customer_conn(hosted, now, origin, conn, &actor.subject, &mut effects),
                        Role::Agent => {
                            let conns = hosted.agents.entry(actor.subject.clone()).or_default();
                            if !conns.iter().any(|c| c.shard == origin && c.conn == conn) {
                                conns.push(AgentConn { shard: origin, conn, role: Role::Agent, reports: false });
                            }
                        }
                        Role::Gateway | Role::Supervisor => {}
                    }
                    Ok(())
                }
                DeskOp::ConnLost { agents } => {
                    Self::conn_lost(hosted, now, origin, conn, actor, agents, &mut effects);
                    Ok(())
                }
                // Answered by `ticket_request` (with TICKET_EVENT, not OK); never sent here.
                DeskOp::Ticket { .. } => Err(DeskError::bad_request("ticket command outside the ticket path")),
            }
        };
        self.desk_carry_out(tenant, effects);
        self.desk_count(tenant, op, result.is_err());
        result
    }

    fn conn_lost(hosted: &mut HostedDesk, now: u64, origin: usize, conn: ConnId, actor: &DeskActor, agents: &[Text], effects: &mut Vec<Effect>) {
        for agent in agents {
            let Some(conns) = hosted.agents.get_mut(agent) else { continue };
            let reported = conns.iter().any(|c| c.shard == origin && c.conn == conn && c.reports);
            conns.retain(|c| !(c.shard == origin && c.conn == conn));
            let still_connected = conns.iter().any(|c| c.reports);
            if conns.is_empty() {
                hosted.agents.remove(agent);
            }
            if reported && !still_connected {
                // Unknown agent: nothing to do (it never reached the desk).
                let _ = hosted.desk.agent_disconnected(now, agent, effects);
            }
        }
        if actor.role != Role::Customer {
            return;
        }
        let Some(conns) = hosted.customers.get_mut(&actor.subject) else { return };
        conns.retain(|&c| c != (origin, conn));
        if !conns.is_empty() {
            return;
        }
        hosted.customers.remove(&actor.subject);
        // The customer's last connection is gone: conversations still waiting for an agent keep
        // their places for the grace period, then are abandoned (an active one stays: the
        // customer may come back and resume it).
        hosted.desk.customer_disconnected(now, &actor.subject, effects);
    }

    /// A connection of `customer` (customer role) showed up: remember it; if it is the
    /// customer's first, the customer is back within its grace period (if one runs).
    fn customer_conn(hosted: &mut HostedDesk, now: u64, origin: usize, conn: ConnId, customer: &Text, effects: &mut Vec<Effect>) {
        let conns = hosted.customers.entry(customer.clone()).or_default();
        let first = conns.is_empty();
        add_once(conns, (origin, conn));
        if first {
            hosted.desk.customer_reconnected(now, customer, effects);
        }
    }

    // ---- tickets ----

    /// A `TICKET_COMMAND` on the tenant's shard: runs it on the tenant's ticket book, answers
    /// the commanding connection with `TICKET_EVENT` (same correlation id), and pushes the
    /// event to the others who follow the ticket (see [`Shard::ticket_push`]). A refusal is
    /// returned for the caller to answer with ERROR; it changed nothing.
    fn ticket_request(&self, origin: usize, conn: ConnId, correlation: u32, actor: &DeskActor, command: &TicketCommand) -> Result<(), DeskError> {
        let now = now_ms();
        let tenant = &actor.tenant;
        let mut effects = Vec::new();
        let (ticket, previous_assignee) = {
            let mut desks = self.desk.desks.borrow_mut();
            let hosted = self.hosted_desk(&mut desks, tenant)?;
            let who = Actor { tenant: tenant.as_str(), role: cs_role(actor.role), subject: actor.subject.as_str() };
            let previous_assignee = hosted.tickets.get(&command.ticket).map(|t| t.assignee.clone()).unwrap_or_default();
            let ticket = {
                let HostedDesk { desk, tickets, .. } = &mut *hosted;
                let link = |session: &Text| desk.conversation(session).map(|view| ConversationLink { customer: view.customer, agent: view.agent });
                let cmd = tickets::Command {
                    ticket: &command.ticket,
                    op: command.op,
                    expected_version: command.expected_version,
                    session: &command.session,
                    assignee: &command.assignee,
                    trace_id: command.trace_id,
                    payload: &command.payload,
                };
                tickets.handle(now, &who, &cmd, link, &mut effects)?.clone()
            };
            // The commander follows the ticket from now on (pushes reach it, and its
            // connection's close is noticed); a customer's counts as it being back.
            match actor.role {
                Role::Customer => Self::customer_conn(hosted, now, origin, conn, &actor.subject, &mut effects),
                Role::Agent => {
                    let conns = hosted.agents.entry(actor.subject.clone()).or_default();
                    if !conns.iter().any(|c| c.shard == origin && c.conn == conn) {
                        conns.push(AgentConn { shard: origin, conn, role: Role::Agent, reports: false });
                    }
                }
                Role::Gateway | Role::Supervisor => {}
            }
            (ticket, previous_assignee)
        };
        self.desk_carry_out(tenant, effects);
        let reply = Frame::TicketEvent(ticket_event(&ticket));
        self.to_conn(origin, conn, self.encode_heap(&reply, correlation));
        self.ticket_push(tenant, &ticket, Some((origin, conn)), &previous_assignee);
        Ok(())
    }

    /// Pushes a ticket's new state (correlation id 0) to every supervisor connection of the
    /// tenant (their feed is complete: a supervisor's own changes included), and to the
    /// ticket's customer's connections and the connections of its assignee, of its previous
    /// assignee (`previous`, when it changed) and of the agent serving its conversation —
    /// each of those once, the commander's (`except`) not at all (it has the reply).
    fn ticket_push(&self, tenant: &Text, ticket: &Ticket, except: Option<(usize, ConnId)>, previous: &Text) {
        let frame = self.encode_heap(&Frame::TicketEvent(ticket_event(ticket)), 0);
        self.supervisor_broadcast(tenant, &frame);
        let mut targets: Vec<(usize, ConnId)> = Vec::new();
        {
            let desks = self.desk.desks.borrow();
            let Some(hosted) = desks.get(tenant) else { return };
            if !ticket.customer.is_empty() {
                for &target in hosted.customers.get(&ticket.customer).into_iter().flatten() {
                    add_once(&mut targets, target);
                }
            }
            let serving = hosted.desk.conversation(&ticket.session).and_then(|view| view.agent.cloned());
            for agent in [Some(&ticket.assignee), Some(previous), serving.as_ref()].into_iter().flatten().filter(|a| !a.is_empty()) {
                for c in hosted.agents.get(agent).into_iter().flatten().filter(|c| c.role != Role::Supervisor) {
                    add_once(&mut targets, (c.shard, c.conn));
                }
            }
        }
        for (shard, conn) in targets {
            if Some((shard, conn)) != except {
                self.to_conn(shard, conn, frame.clone());
            }
        }
    }

    /// Does what the desk asked, in order.
    fn desk_carry_out(&self, tenant: &Text, effects: Vec<Effect>) {
        for effect in effects {
            match effect {
                Effect::Event { session, kind, agent, queue, position, estimated_wait_ms, group, reason } => {
                    let key = SessionKey::owned(tenant, &session);
                    let event = ConversationEvent { session, epoch: 0, seq: 0, timestamp_us: 0, kind, agent, queue, position, estimated_wait_ms, group, reason };
                    let owner = key.shard(self.shards);
                    if owner == self.index {
                        self.owner_conversation_event(&key, event);
                    } else if let Some(link) = &self.events_out[owner] {
                        link.push(Event::ConversationEvent { key, event });
                    }
                }
                Effect::NotifyAgent { agent, session, kind, reason } => {
                    let frame = Frame::ConversationEvent(ConversationEvent {
                        session,
                        epoch: 0,
                        seq: 0,
                        timestamp_us: self.now_us(),
                        kind,
                        agent: agent.clone(),
                        queue: Text::new(),
                        position: 0,
                        estimated_wait_ms: 0,
                        group: Text::new(),
                        reason,
                    });
                    let encoded = self.encode_heap(&frame, 0);
                    let conns: Vec<AgentConn> = self.desk.desks.borrow().get(tenant).and_then(|h| h.agents.get(&agent)).map(|c| c.iter().copied().filter(|c| c.reports).collect()).unwrap_or_default();
                    for target in conns {
                        self.to_conn(target.shard, target.conn, encoded.clone());
                    }
                }
                // Access follows the desk's state (checked on every SUBSCRIBE and PUBLISH), so
                // joining needs nothing here: the agent's console subscribes itself.
                Effect::AgentJoined { .. } => {}
                Effect::AgentLeft { session, agent } => {
                    let conns: Vec<(usize, ConnId)> = self
                        .desk
                        .desks
                        .borrow()
                        .get(tenant)
                        .and_then(|h| h.agents.get(&agent))
                        .map(|c| c.iter().filter(|c| c.role == Role::Agent).map(|c| (c.shard, c.conn)).collect())
                        .unwrap_or_default();
                    if conns.is_empty() {
                        continue;
                    }
                    let key = SessionKey::owned(tenant, &session);
                    let owner = key.shard(self.shards);
                    if owner == self.index {
                        self.owner_revoke(&key, conns);
                    } else if let Some(link) = &self.events_out[owner] {
                        link.push(Event::Revoke { key, conns });
                    }
                }
                Effect::AgentStatus { agent, presence, capacity, load } => {
                    let skills = {
                        let desks = self.desk.desks.borrow();
                        let desk = desks.get(tenant).map(|h| &h.desk);
                        desk.and_then(|d| d.agents().key_of(&agent).and_then(|k| d.agents().get(k))).map(|a| a.skills().to_vec()).unwrap_or_default()
                    };
                    let frame = Frame::AgentStatus(AgentStatus { agent, presence, capacity, load, skills });
                    self.supervisor_broadcast(tenant, &self.encode_heap(&frame, 0));
                }
                Effect::StartTimer { at_ms, timer } => {
                    let id = timer.id;
                    let inserted = self.desk.timers.borrow_mut().as_mut().map(|wheel| wheel.insert(at_ms, (tenant.clone(), timer)));
                    match inserted {
                        Some(Ok(handle)) => {
                            self.desk.timer_ids.borrow_mut().insert((tenant.clone(), id), handle);
                            let alarm = &self.desk.alarm;
                            if at_ms < alarm.sleep_until_ms.get() {
                                alarm.rung.set(true);
                                if let Some(waker) = alarm.waker.take() {
                                    waker.wake();
                                }
                            }
                        }
                        Some(Err(error)) => tracing::warn!(shard = self.index, %tenant, %error, "desk timer not started"),
                        None => {}
                    }
                }
                Effect::CancelTimer { id } => {
                    if let Some(handle) = self.desk.timer_ids.borrow_mut().remove(&(tenant.clone(), id)) {
                        if let Some(wheel) = self.desk.timers.borrow_mut().as_mut() {
                            wheel.cancel(handle);
                        }
                    }
                }
            }
        }
    }

    /// Fires every desk timer due by `now`.
    fn fire_desk_timers(&self, now: u64) {
        let mut fired = Vec::new();
        match self.desk.timers.borrow_mut().as_mut() {
            Some(wheel) => wheel.advance(now, &mut fired),
            None => return,
        };
        for timer in fired {
            let (tenant, payload) = timer.payload;
            self.desk.timer_ids.borrow_mut().remove(&(tenant.clone(), payload.id));
            let mut effects = Vec::new();
            let mut escalated = None;
            if let Some(hosted) = self.desk.desks.borrow_mut().get_mut(&tenant) {
                if let TimerKind::TicketSla { .. } = payload.kind {
                    escalated = hosted.tickets.handle_timer(now, &payload, &mut effects).cloned();
                } else {
                    hosted.desk.handle_timer(now, &payload, &mut effects);
                }
            }
            self.desk_carry_out(&tenant, effects);
            if let Some(ticket) = escalated {
                self.ticket_push(&tenant, &ticket, None, &Text::new());
            }
        }
    }

    fn to_conn(&self, shard: usize, conn: ConnId, frame: Bytes) {
        if shard == self.index {
            self.send_buf(conn, self.to_pool(frame));
        } else if let Some(link) = &self.events_out[shard] {
            link.push(Event::ToConn { conn, frame });
        }
    }

    pub(super) fn supervisor_broadcast(&self, tenant: &Text, frame: &Bytes) {
        for link in self.events_out.iter().flatten() {
            link.push(Event::SupervisorFeed { tenant: tenant.clone(), frame: frame.clone() });
        }
        self.supervisor_local(tenant, frame.clone());
    }

    fn supervisor_local(&self, tenant: &Text, frame: Bytes) {
        let conns = self.desk.supervisors.borrow().get(tenant).cloned().unwrap_or_default();
        if conns.is_empty() {
            return;
        }
        let out = self.to_pool(frame);
        for conn in conns {
            self.send_buf(conn, out.clone());
        }
    }

    // ---- the session owner's side ----

    fn owner_conversation_event(&self, key: &SessionKey, event: ConversationEvent) {
        if !self.owner_append(key, Frame::ConversationEvent(event)) {
            tracing::warn!(shard = self.index, tenant = %key.tenant, session = %key.session, "conversation event dropped from the session's stream");
        }
    }

    fn owner_revoke(&self, key: &SessionKey, conns: Vec<(usize, ConnId)>) {
        for (shard, conn) in conns {
            if shard == self.index {
                self.revoke_local(conn, key);
            } else if let Some(link) = &self.events_out[shard] {
                link.push(Event::RevokeConn { conn, key: key.clone() });
            }
        }
    }

    fn revoke_local(&self, conn: ConnId, key: &SessionKey) {
        if self.with_conn(conn, |entry| entry.subscriptions.remove(key)).unwrap_or(false) {
            self.drop_local_subscriber(conn, key);
        }
    }

    // ---- events ----

    /// Handles the desk's events (never waits).
    pub(super) fn desk_event(&self, event: Event) {
        match event {
            Event::DeskAnswer { conn, correlation, check, refusal } => {
                if check != 0 {
                    if let Some(waiter) = self.desk.checks.borrow_mut().remove(&check) {
                        let _ = waiter.try_send(refusal);
                    }
                    return;
                }
                match refusal {
                    None => self.send_frame(conn, &Frame::Success(Success {}), correlation),
                    Some((code, message)) => self.refuse(conn, correlation, code, message),
                }
            }
            Event::ConversationEvent { key, event } => self.owner_conversation_event(&key, event),
            Event::Revoke { key, conns } => self.owner_revoke(&key, conns),
            Event::RevokeConn { conn, key } => self.revoke_local(conn, &key),
            Event::SupervisorFeed { tenant, frame } => self.supervisor_local(&tenant, frame),
            Event::ToConn { conn, frame } => {
                self.send_buf(conn, self.to_pool(frame));
            }
            _ => {}
        }
    }

    /// ERROR with a message built at run time (the connection stays open).
    pub(crate) fn refuse(&self, conn: ConnId, correlation: u32, code: ErrorCode, message: String) {
        self.count(|c| c.request_errors_total += 1);
        let frame = Frame::Error(ErrorFrame { code: code.as_u16(), message: Text::from(message) });
        self.send_frame(conn, &frame, correlation);
    }

    // ---- the control plane's entry points (to be called on the tenant's shard) ----

    /// Reads `tenant`'s desk (views, agents, queues, counters); `None` when it does not live on
    /// this shard or has not been used yet. The control plane reaches the tenant's shard
    /// (`mesh::tenant_shard`) through its channel and calls this there.
    pub fn desk_view<R>(&self, tenant: &Text, read: impl FnOnce(&TenantDesk) -> R) -> Option<R> {
        self.desk.desks.borrow().get(tenant).map(|hosted| read(&hosted.desk))
    }

    /// Replaces `tenant`'s desk policy (validated: a bad policy changes nothing) and carries out
    /// what follows (re-routing, timers restarted). Call on the tenant's shard.
    pub fn set_desk_policy(&self, tenant: &Text, policy: crate::cs::DeskPolicy) -> Result<(), DeskError> {
        if tenant_shard(tenant, self.shards) != self.index {
            return Err(DeskError::BadRequest { reason: format!("tenant `{tenant}`'s desk lives on another shard") });
        }
        let mut effects = Vec::new();
        {
            let mut desks = self.desk.desks.borrow_mut();
            let hosted = self.hosted_desk(&mut desks, tenant)?;
            hosted.desk.set_policy(now_ms(), policy, &mut effects)?;
        }
        self.desk_carry_out(tenant, effects);
        Ok(())
    }
}

fn ticket_event(ticket: &Ticket) -> TicketEvent {
    TicketEvent {
        ticket: ticket.id.clone(),
        version: ticket.version,
        state: ticket.state,
        escalation_level: ticket.escalation_level,
        session: ticket.session.clone(),
        assignee: ticket.assignee.clone(),
        sla_deadline_us: ticket.deadline_ms.saturating_mul(1000),
        trace_id: ticket.trace_id,
        payload: ticket.payload.clone(),
    }
}

fn add_once(conns: &mut Vec<(usize, ConnId)>, conn: (usize, ConnId)) {
    if !conns.contains(&conn) {
        conns.push(conn);
    }
}

/// The desk timer task of a shard: sleeps until the next timer is due (or an earlier one is
/// started), fires what is due, until shutdown.
async fn run_desk_timers(shard: Rc<Shard>) {
    let alarm = shard.desk.alarm.clone();
    while !shard.shutdown.is_set() {
        let now = now_ms();
        shard.fire_desk_timers(now);
        let next = shard.desk.timers.borrow().as_ref().and_then(TimerWheel::next_wake_ms);
        let sleep_ms = next.map_or(TIMER_IDLE_SLEEP_MS, |at| at.saturating_sub(now).clamp(1, TIMER_IDLE_SLEEP_MS));
        alarm.sleep_until_ms.set(now + sleep_ms);
        alarm.rung.set(false);
        let rung = poll_fn(|cx| {
            if alarm.rung.get() {
                Poll::Ready(())
            } else {
                alarm.waker.set(Some(cx.waker().clone()));
                Poll::Pending
            }
        });
        let sleep = async {
            glommio::timer::Timer::new(Duration::from_millis(sleep_ms)).await;
        };
        futures_lite::future::or(sleep, rung).await;
        alarm.sleep_until_ms.set(0);
    }
}
