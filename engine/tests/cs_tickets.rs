//! Tickets, the conversation context and the waiting customer's grace period, end to end: the
//! real engine on loopback (1 and 3 shards) and the real blocking client crate, with JWT
//! roles of two tenants. Every wait is on an event or an answer, with a deadline; none is a
//! sleep.

mod common;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use bytes::Bytes;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use switchboard::config::{DeskConfig, TenantConfig, TenantKeyConfig, TicketsConfig};
use switchboard_client::blocking::{Client, Events, Subscription};
use switchboard_client::{
    AgentPresence, AgentStatus, ClientError, ClientOptions, ConversationEvent, ConversationEventKind as Kind, ErrorCode, Event, Item,
    OfferResponse, OpenConversation, ResumeFrom, TicketCommand, TicketEvent, TicketOp,
};
use switchboard_protocol::TicketState;

const ACME: &str = "acme-secret-0123456789abcdef0123456789";
const GLOBEX: &str = "globex-secret-0123456789abcdef012345";
const WAIT: Duration = Duration::from_secs(20);

#[derive(serde::Serialize)]
struct Claims<'a> {
    tenant: &'a str,
    role: &'a str,
    sub: &'a str,
    exp: u64,
}

fn token(tenant: &str, role: &str, sub: &str) -> String {
    let (kid, secret) = if tenant == "acme" { ("acme-1", ACME) } else { ("globex-1", GLOBEX) };
    let exp = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs() + 3600;
    let header = Header { kid: Some(kid.into()), ..Header::new(Algorithm::HS256) };
    jsonwebtoken::encode(&header, &Claims { tenant, role, sub, exp }, &EncodingKey::from_secret(secret.as_bytes())).unwrap()
}

fn engine(shards: usize, acme: DeskConfig, globex: DeskConfig) -> switchboard::EngineHandle {
    let mut config = common::test_config(shards);
    let key = |kid: &str, secret: &str| vec![TenantKeyConfig { kid: kid.into(), secret: secret.into() }];
    config.tenants = vec![
        TenantConfig { id: "acme".into(), keys: key("acme-1", ACME), desk: Some(acme), rate_limits: None, durability: None, sessions_per_shard_max: None },
        TenantConfig { id: "globex".into(), keys: key("globex-1", GLOBEX), desk: Some(globex), rate_limits: None, durability: None, sessions_per_shard_max: None },
    ];
    common::start(config)
}

/// A real client with a role, and its receiver of unsubscribed events (ticket pushes,
/// offers, the supervisor's feed), taken before anything can arrive.
struct Who {
    client: Client,
    events: Events,
    name: String,
}

fn connect(addr: SocketAddr, tenant: &str, role: &str, sub: &str) -> Who {
    let options = ClientOptions::new(addr.to_string()).token(token(tenant, role, sub)).seed(7);
    let client = Client::connect(options).unwrap_or_else(|e| panic!("{role} {sub}@{tenant}: {e}"));
    let events = client.events().unwrap();
    Who { client, events, name: format!("{role} {sub}@{tenant}") }
}

fn code(error: &ClientError) -> ErrorCode {
    match error {
        ClientError::Forbidden { .. } => ErrorCode::Forbidden,
        ClientError::LimitExceeded { .. } => ErrorCode::LimitExceeded,
        ClientError::RateLimited { .. } => ErrorCode::RateLimited,
        ClientError::Server { code, .. } => *code,
        other => panic!("not a server refusal: {other:?}"),
    }
}

fn command(ticket: &str, op: TicketOp, expected_version: u64) -> TicketCommand {
    TicketCommand {
        ticket: ticket.into(),
        op,
        expected_version,
        session: "".into(),
        assignee: "".into(),
        trace_id: 0,
        payload: Bytes::new(),
    }
}

fn with_session(mut c: TicketCommand, session: &str) -> TicketCommand {
    c.session = session.into();
    c
}

fn with_assignee(mut c: TicketCommand, assignee: &str) -> TicketCommand {
    c.assignee = assignee.into();
    c
}

fn with_payload(mut c: TicketCommand, payload: &[u8]) -> TicketCommand {
    c.payload = Bytes::copy_from_slice(payload);
    c
}

fn open(session: &str, customer: &str, context: &[u8]) -> OpenConversation {
    OpenConversation { session: session.into(), customer: customer.into(), priority: 0, skills: vec![], context: Bytes::copy_from_slice(context) }
}

fn online(agent: &str, capacity: u16) -> AgentStatus {
    AgentStatus { agent: agent.into(), presence: AgentPresence::Online, capacity, load: 0, skills: vec![] }
}

impl Who {
    fn ticket(&self, c: TicketCommand) -> TicketEvent {
        let what = format!("{:?} {}", c.op, c.ticket);
        self.client.ticket(c).unwrap_or_else(|e| panic!("{}: {what} refused: {e}", self.name))
    }

    fn refused(&self, c: TicketCommand, want: ErrorCode) -> String {
        let what = format!("{:?} {}", c.op, c.ticket);
        match self.client.ticket(c) {
            Ok(event) => panic!("{}: {what} should be refused with {want:?}, got {event:?}", self.name),
            Err(error) => {
                assert_eq!(code(&error), want, "{}: {what}: {error}", self.name);
                error.to_string()
            }
        }
    }

    /// The first unsubscribed event `pick` accepts; the ones before it are dropped.
    fn wait_event<T>(&self, what: &str, mut pick: impl FnMut(&Event) -> Option<T>) -> T {
        let deadline = Instant::now() + WAIT;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.events.recv_timeout(left) {
                Ok(Some(event)) => {
                    if let Some(found) = pick(&event) {
                        return found;
                    }
                }
                Ok(None) => panic!("{}: no {what} within {WAIT:?}", self.name),
                Err(error) => panic!("{}: events ended while waiting for {what}: {error}", self.name),
            }
        }
    }

    /// The conversation event of `session` and `kind` (seq 0: a direct notification; else in
    /// the session's order, from the supervisor's feed).
    fn conversation(&self, session: &str, kind: Kind, direct: bool) -> ConversationEvent {
        self.wait_event(&format!("{kind:?} on {session}"), |event| match event {
            Event::ConversationEvent(ev) if ev.session == session && ev.kind == kind && (ev.seq == 0) == direct => Some(ev.clone()),
            _ => None,
        })
    }

    /// Every pushed version of `ticket` up to `version`, in arrival order.
    fn pushes_until(&self, ticket: &str, version: u64) -> Vec<u64> {
        let mut seen = Vec::new();
        self.wait_event(&format!("ticket {ticket} version {version}"), |event| match event {
            Event::TicketEvent(t) if t.ticket == ticket => {
                seen.push(t.version);
                (t.version >= version).then_some(())
            }
            _ => None,
        });
        seen
    }
}

fn next_conversation(subscription: &Subscription, what: &str) -> ConversationEvent {
    let deadline = Instant::now() + WAIT;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        match subscription.recv_timeout(left) {
            Ok(Some(Item::Conversation(event))) => return event,
            Ok(Some(_)) => {}
            Ok(None) => panic!("no conversation event ({what}) within {WAIT:?}"),
            Err(error) => panic!("subscription ended waiting for {what}: {error}"),
        }
    }
}

fn desk() -> DeskConfig {
    let mut desk = DeskConfig::default();
    (desk.policy.offer_timeout_ms, desk.policy.agent_grace_ms, desk.policy.customer_grace_ms) = (60_000, 60_000, 60_000);
    desk
}

#[test]
fn a_ticket_from_create_to_close_pushed_to_participants_and_supervisors() {
    for shards in [1, 3] {
        let engine = engine(shards, desk(), desk());
        let addr = engine.data_addr();
        let sup = connect(addr, "acme", "supervisor", "sup-1");
        let ann = connect(addr, "acme", "agent", "ann");
        let cus = connect(addr, "acme", "customer", "cus-1");
        ann.client.set_agent_status(online("ann", 1)).unwrap();

        // The context comes with the offer to the agent.
        let context = b"order=42; page=/checkout";
        cus.client.open_conversation(open("conv-1", "cus-1", context)).unwrap();
        let offer = ann.conversation("conv-1", Kind::Offered, true);
        assert_eq!(offer.reason.as_str().as_bytes(), &context[..], "{offer:?}");
        ann.client.respond_offer(OfferResponse { session: "conv-1".into(), agent: "ann".into(), accept: true }).unwrap();
        sup.conversation("conv-1", Kind::Assigned, false);

        // The customer opens a ticket on its conversation.
        let mut create = with_payload(with_session(command("t-1", TicketOp::Create, 0), "conv-1"), b"refund please");
        create.trace_id = 0xfeed;
        let created = cus.ticket(create);
        assert_eq!((created.version, created.state, created.session.as_str(), created.trace_id), (1, TicketState::Accepted, "conv-1", 0xfeed));
        assert_eq!(&created.payload[..], b"refund please");
        assert!(created.sla_deadline_us > 0, "accepted has an SLA by default");
        // The agent serving the conversation takes it and works on it.
        let assigned = ann.ticket(with_assignee(command("t-1", TicketOp::Assign, 1), "ann"));
        assert_eq!((assigned.version, assigned.state, assigned.assignee.as_str()), (2, TicketState::Assigned, "ann"));
        assert_eq!(ann.ticket(command("t-1", TicketOp::Start, 2)).state, TicketState::InProgress);
        assert_eq!(ann.ticket(command("t-1", TicketOp::FollowUp, 3)).state, TicketState::FollowUp);
        let updated = cus.ticket(with_payload(command("t-1", TicketOp::Update, 4), b"refund for order 42"));
        assert_eq!((updated.version, updated.state), (5, TicketState::FollowUp));
        // Compare-and-set: a stale version is a conflict and changes nothing.
        ann.refused(command("t-1", TicketOp::Close, 3), ErrorCode::Conflict);
        assert_eq!(ann.ticket(command("t-1", TicketOp::Start, 5)).version, 6);
        let escalated = sup.ticket(command("t-1", TicketOp::Escalate, 6));
        assert_eq!((escalated.escalation_level, escalated.state), (1, TicketState::InProgress));
        let closed = ann.ticket(command("t-1", TicketOp::Close, 7));
        assert_eq!((closed.version, closed.state, closed.sla_deadline_us), (8, TicketState::Closed, 0));
        assert_eq!(&closed.payload[..], b"refund for order 42");
        // Closed is final.
        let message = ann.refused(command("t-1", TicketOp::Update, 8), ErrorCode::InvalidState);
        assert!(message.contains("closed"), "{message}");

        // Every change was pushed, in order: to every supervisor (its feed is complete, its own
        // changes included), and to the others who follow the ticket except the one who made
        // the change (it had the reply).
        assert_eq!(sup.pushes_until("t-1", 8), vec![1, 2, 3, 4, 5, 6, 7, 8], "shards {shards}");
        assert_eq!(cus.pushes_until("t-1", 8), vec![2, 3, 4, 6, 7, 8], "shards {shards}");
        assert_eq!(ann.pushes_until("t-1", 7), vec![1, 5, 7], "shards {shards}");
        engine.shutdown();
    }
}

#[test]
fn tickets_refuse_other_roles_other_tenants_and_limits() {
    for shards in [1, 3] {
        let acme = DeskConfig { tickets: TicketsConfig { tickets_max: 3, payload_bytes_max: 16, ..TicketsConfig::default() }, ..desk() };
        let engine = engine(shards, acme, desk());
        let addr = engine.data_addr();
        let sup = connect(addr, "acme", "supervisor", "sup-1");
        let ann = connect(addr, "acme", "agent", "ann");
        let bob = connect(addr, "acme", "agent", "bob");
        let cus = connect(addr, "acme", "customer", "cus-1");
        let eve = connect(addr, "acme", "customer", "eve");
        let gw = connect(addr, "acme", "gateway", "gw-1");
        ann.client.set_agent_status(online("ann", 1)).unwrap();
        cus.client.open_conversation(open("conv-1", "cus-1", b"")).unwrap();
        ann.conversation("conv-1", Kind::Offered, true);
        ann.client.respond_offer(OfferResponse { session: "conv-1".into(), agent: "ann".into(), accept: true }).unwrap();
        sup.conversation("conv-1", Kind::Assigned, false);
        cus.ticket(with_session(command("t-1", TicketOp::Create, 0), "conv-1"));

        // Another customer: neither its conversation nor its ticket, whether it exists or not.
        eve.refused(with_session(command("t-2", TicketOp::Create, 0), "conv-1"), ErrorCode::Forbidden);
        eve.refused(command("t-1", TicketOp::Update, 1), ErrorCode::Forbidden);
        eve.refused(command("t-404", TicketOp::Update, 1), ErrorCode::Forbidden);
        eve.refused(command("t-1", TicketOp::Create, 0), ErrorCode::Forbidden);
        // The customer itself updates and closes only; it never assigns, starts or escalates.
        cus.refused(with_assignee(command("t-1", TicketOp::Assign, 1), "cus-1"), ErrorCode::Forbidden);
        cus.refused(command("t-1", TicketOp::Escalate, 1), ErrorCode::Forbidden);
        // An agent not serving the conversation, nor assigned: nothing.
        bob.refused(command("t-1", TicketOp::Escalate, 1), ErrorCode::Forbidden);
        bob.refused(with_session(command("t-3", TicketOp::Create, 0), "conv-1"), ErrorCode::Forbidden);
        // Assigned to bob, bob may work on it; ann (still serving the conversation) may not
        // start what is bob's.
        let assigned = ann.ticket(with_assignee(command("t-1", TicketOp::Assign, 1), "bob"));
        assert_eq!(assigned.assignee, "bob");
        ann.refused(command("t-1", TicketOp::Start, 2), ErrorCode::Forbidden);
        assert_eq!(bob.ticket(command("t-1", TicketOp::Start, 2)).state, TicketState::InProgress);
        // Bad fields and transitions, with the codes the spec gives.
        gw.refused(command("", TicketOp::Create, 0), ErrorCode::BadRequest);
        gw.refused(command("t-9", TicketOp::Create, 4), ErrorCode::BadRequest);
        gw.refused(command("t-1", TicketOp::Assign, 3), ErrorCode::BadRequest);
        gw.refused(command("t-404", TicketOp::Close, 1), ErrorCode::NotFound);
        gw.refused(with_session(command("t-9", TicketOp::Create, 0), "no-such-conv"), ErrorCode::NotFound);
        gw.refused(command("t-1", TicketOp::FollowUp, 2), ErrorCode::Conflict);
        gw.refused(command("t-1", TicketOp::Start, 3), ErrorCode::InvalidState);
        // Limits: payload size, open tickets.
        gw.refused(with_payload(command("t-big", TicketOp::Create, 0), &[b'x'; 17]), ErrorCode::LimitExceeded);
        gw.ticket(command("t-2", TicketOp::Create, 0));
        gw.ticket(command("t-3", TicketOp::Create, 0));
        let message = gw.refused(command("t-4", TicketOp::Create, 0), ErrorCode::LimitExceeded);
        assert!(message.contains("tickets_max"), "{message}");
        // A closed ticket frees its place.
        gw.ticket(command("t-3", TicketOp::Close, 1));
        gw.ticket(command("t-4", TicketOp::Create, 0));

        // Another tenant: acme's tickets and conversations do not exist there; its own tickets
        // (even with the same id) are its own, and acme's supervisor is not told of them.
        let globex_sup = connect(addr, "globex", "supervisor", "sup-9");
        let globex_cus = connect(addr, "globex", "customer", "cus-1");
        globex_sup.refused(command("t-1", TicketOp::Escalate, 3), ErrorCode::NotFound);
        globex_cus.refused(command("t-1", TicketOp::Update, 3), ErrorCode::Forbidden);
        globex_cus.refused(with_session(command("t-7", TicketOp::Create, 0), "conv-1"), ErrorCode::Forbidden);
        let theirs = globex_sup.ticket(command("t-1", TicketOp::Create, 0));
        assert_eq!((theirs.version, theirs.session.as_str()), (1, ""));
        // acme's t-1 is untouched by all this: bob still holds it at version 3.
        assert_eq!(bob.ticket(command("t-1", TicketOp::FollowUp, 3)).version, 4);
        // Nothing of globex's t-1 reached acme's supervisor: every push it got is acme's.
        let seen = sup.pushes_until("t-1", 4);
        assert_eq!(seen, vec![1, 2, 3, 4], "shards {shards}");
        engine.shutdown();
    }
}

#[test]
fn context_is_bounded_and_must_be_text() {
    let engine = engine(1, DeskConfig { context_bytes_max: 8, ..desk() }, desk());
    let cus = connect(engine.data_addr(), "acme", "customer", "cus-1");
    let error = cus.client.open_conversation(open("conv-1", "cus-1", b"123456789")).unwrap_err();
    assert_eq!(code(&error), ErrorCode::LimitExceeded, "{error}");
    let error = cus.client.open_conversation(open("conv-1", "cus-1", &[0xff, 0xfe])).unwrap_err();
    assert_eq!(code(&error), ErrorCode::BadRequest, "{error}");
    cus.client.open_conversation(open("conv-1", "cus-1", b"12345678")).unwrap();
    engine.shutdown();
}

#[test]
fn a_waiting_customer_who_reconnects_within_its_grace_keeps_its_place() {
    for shards in [1, 3] {
        let mut short = desk();
        short.policy.customer_grace_ms = 300;
        let engine = engine(shards, desk(), short);
        let addr = engine.data_addr();
        let sup = connect(addr, "acme", "supervisor", "sup-1");
        let first = connect(addr, "acme", "customer", "cus-a");
        let second = connect(addr, "acme", "customer", "cus-b");
        first.client.open_conversation(open("conv-a", "cus-a", b"")).unwrap();
        assert_eq!(sup.conversation("conv-a", Kind::Queued, false).position, 1);
        second.client.open_conversation(open("conv-b", "cus-b", b"")).unwrap();
        assert_eq!(sup.conversation("conv-b", Kind::Queued, false).position, 2);

        // The first customer's only connection drops: its conversation keeps position 1.
        drop(first);
        let away = sup.conversation("conv-a", Kind::Queued, false);
        assert_eq!((away.position, away.reason.as_str()), (1, "customer disconnected"), "{away:?}");
        // It comes back (a new connection of its own, resuming its session) within the grace.
        let back = connect(addr, "acme", "customer", "cus-a");
        let subscription = back.client.subscribe("conv-a", ResumeFrom::Earliest).unwrap();
        let returned = sup.conversation("conv-a", Kind::Queued, false);
        assert_eq!((returned.position, returned.reason.as_str()), (1, "customer reconnected"), "{returned:?}");
        // The first agent to come online is offered it first, ahead of the second customer.
        let ann = connect(addr, "acme", "agent", "ann");
        ann.client.set_agent_status(online("ann", 1)).unwrap();
        let offer = ann.wait_event("the first offer", |event| match event {
            Event::ConversationEvent(ev) if ev.kind == Kind::Offered && ev.seq == 0 => Some(ev.clone()),
            _ => None,
        });
        assert_eq!(offer.session, "conv-a", "shards {shards}");
        // The customer's session shows it all, in order, with nothing abandoned.
        let kinds: Vec<(Kind, String)> = (0..4).map(|_| next_conversation(&subscription, "conv-a history")).map(|e| (e.kind, e.reason.to_string())).collect();
        assert_eq!(
            kinds,
            vec![
                (Kind::Queued, String::new()),
                (Kind::Queued, "customer disconnected".into()),
                (Kind::Queued, "customer reconnected".into()),
                (Kind::Offered, String::new()),
            ]
        );

        // Gone past the grace period (globex: 300 ms): abandoned.
        let globex_sup = connect(addr, "globex", "supervisor", "sup-9");
        let leaving = connect(addr, "globex", "customer", "cus-z");
        leaving.client.open_conversation(open("conv-z", "cus-z", b"")).unwrap();
        globex_sup.conversation("conv-z", Kind::Queued, false);
        let started = Instant::now();
        drop(leaving);
        assert_eq!(globex_sup.conversation("conv-z", Kind::Queued, false).reason, "customer disconnected");
        let abandoned = globex_sup.conversation("conv-z", Kind::Abandoned, false);
        assert_eq!(abandoned.reason, "customer left");
        // The wheel fires on millisecond ticks of the wall clock: allow one tick.
        assert!(started.elapsed() >= Duration::from_millis(299), "abandoned before the grace period ended");
        engine.shutdown();
    }
}

#[test]
fn an_overdue_ticket_escalates_by_itself_and_is_pushed() {
    let tickets = TicketsConfig { sla_accepted_ms: 200, escalation_level_max: 1, ..TicketsConfig::default() };
    let engine = engine(3, DeskConfig { tickets, ..desk() }, desk());
    let addr = engine.data_addr();
    let sup = connect(addr, "acme", "supervisor", "sup-1");
    let gw = connect(addr, "acme", "gateway", "gw-1");
    let created = gw.ticket(command("t-sla", TicketOp::Create, 0));
    assert!(created.sla_deadline_us > 0);
    // Nobody assigned it within 200 ms: the level rises, the clock stops at the top level.
    let escalated = sup.wait_event("the escalation", |event| match event {
        Event::TicketEvent(t) if t.ticket == "t-sla" && t.version == 2 => Some(t.clone()),
        _ => None,
    });
    assert_eq!((escalated.escalation_level, escalated.state, escalated.sla_deadline_us, escalated.trace_id), (1, TicketState::Accepted, 0, 0));
    assert!(escalated.sla_deadline_us == 0 && created.sla_deadline_us >= 200_000);
    // The next change starts from the escalated version.
    gw.refused(command("t-sla", TicketOp::Close, 1), ErrorCode::Conflict);
    assert_eq!(gw.ticket(command("t-sla", TicketOp::Close, 2)).state, TicketState::Closed);
    engine.shutdown();
}
