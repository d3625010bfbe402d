//! The customer-service flow end to end: the real engine on loopback (1 and 3 shards), raw
//! protocol frames over real sockets, JWT roles. Every wait is on a frame, with a deadline.

mod common;

use std::collections::VecDeque;
use std::net::SocketAddr;

use common::Raw;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use switchboard::config::{DeskConfig, DeskPolicyConfig, QueueConfig, RateLimitsConfig, TenantConfig, TenantKeyConfig};
use switchboard_protocol::{
    AgentPresence, AgentStatus, CloseConversation, ConversationEvent, ConversationEventKind as Kind, Envelope, ErrorCode, Frame, Hello,
    OfferResponse, OpenConversation, Ping, ReadCursor, ResumeFrom, Subscribe, Subscribed, Text, Transfer, TransferKind, TransferTarget, Typing,
};

const ACME: &str = "acme-secret-0123456789abcdef0123456789";
const GLOBEX: &str = "globex-secret-0123456789abcdef012345";

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

fn engine(shards: usize, desk: DeskConfig, rate_limits: Option<RateLimitsConfig>) -> switchboard::EngineHandle {
    common::start(config(shards, desk, rate_limits))
}

fn config(shards: usize, desk: DeskConfig, rate_limits: Option<RateLimitsConfig>) -> switchboard::Config {
    let mut config = common::test_config(shards);
    let key = |kid: &str, secret: &str| vec![TenantKeyConfig { kid: kid.into(), secret: secret.into() }];
    config.tenants = vec![
        TenantConfig { id: "acme".into(), keys: key("acme-1", ACME), desk: Some(desk), rate_limits, durability: None, sessions_per_shard_max: None },
        TenantConfig { id: "globex".into(), keys: key("globex-1", GLOBEX), desk: None, rate_limits: None, durability: None, sessions_per_shard_max: None },
    ];
    config
}

/// A connection with a role, keeping frames it read past while waiting for another one.
struct Client {
    raw: Raw,
    backlog: VecDeque<Envelope>,
    name: String,
}

impl Client {
    fn connect(addr: SocketAddr, tenant: &str, role: &str, sub: &str) -> Client {
        let mut raw = Raw::connect(addr);
        let hello = Hello { version_max: 1, version_min: 1, features: 0, client_name: "cs-e2e".into(), token: Text::from(token(tenant, role, sub)) };
        raw.send(&Frame::Hello(hello));
        match raw.recv().frame {
            Frame::Welcome(welcome) => assert_eq!(welcome.tenant, tenant),
            other => panic!("expected WELCOME, got {other:?}"),
        }
        Client { raw, backlog: VecDeque::new(), name: format!("{role} {sub}@{tenant}") }
    }

    fn send(&mut self, frame: &Frame) -> u32 {
        self.raw.send(frame)
    }

    /// The first frame (backlog first, then the socket) `pick` accepts; the others stay queued.
    fn wait_for<T>(&mut self, what: &str, mut pick: impl FnMut(&Envelope) -> Option<T>) -> T {
        if let Some(index) = self.backlog.iter().position(|e| pick(e).is_some()) {
            let envelope = self.backlog.remove(index).unwrap();
            return pick(&envelope).unwrap();
        }
        loop {
            let Some(envelope) = self.raw.try_recv() else { panic!("{}: closed while waiting for {what}; had {:?}", self.name, self.backlog) };
            if let Some(found) = pick(&envelope) {
                return found;
            }
            self.backlog.push_back(envelope);
        }
    }

    /// The answer to request `correlation`: Ok for OK, Err for ERROR.
    fn answer(&mut self, correlation: u32) -> Result<(), (ErrorCode, String)> {
        match self.answer_any(correlation) {
            Frame::Success(_) => Ok(()),
            Frame::Error(error) => Err((ErrorCode::from_u16(error.code), error.message.to_string())),
            other => panic!("{}: unexpected answer {other:?}", self.name),
        }
    }

    fn request_ok(&mut self, frame: &Frame) {
        let correlation = self.send(frame);
        if let Err(error) = self.answer(correlation) {
            panic!("{}: {frame:?} refused: {error:?}", self.name);
        }
    }

    /// Sends `frame` and expects ERROR with `code`.
    fn refused(&mut self, frame: &Frame, code: ErrorCode) -> String {
        let correlation = self.send(frame);
        match self.answer_any(correlation) {
            Frame::Error(error) => {
                assert_eq!(ErrorCode::from_u16(error.code), code, "{}: {frame:?} -> {}", self.name, error.message);
                assert!(!error.message.is_empty());
                error.message.to_string()
            }
            other => panic!("{}: {frame:?} should be refused with {code:?}, got {other:?}", self.name),
        }
    }

    fn answer_any(&mut self, correlation: u32) -> Frame {
        self.wait_for("an answer", |e| (e.correlation == correlation).then(|| e.frame.clone()))
    }

    fn subscribe(&mut self, session: &str, from: ResumeFrom) -> Subscribed {
        let correlation = self.send(&Frame::Subscribe(Subscribe { session: session.into(), from }));
        match self.answer_any(correlation) {
            Frame::Subscribed(subscribed) => subscribed,
            other => panic!("{}: SUBSCRIBE {session}: {other:?}", self.name),
        }
    }

    /// Every frame of `session`'s stream up to `head`, as (seq, what), from a fresh Earliest
    /// subscription on a new connection.
    fn stream(&mut self, session: &str, head: u64) -> Vec<(u64, String)> {
        let mut reader = Raw::connect(self.raw.stream.peer_addr().unwrap());
        let token = token("acme", "supervisor", "stream-reader");
        let hello = Hello { version_max: 1, version_min: 1, features: 0, client_name: "cs-e2e".into(), token: Text::from(token) };
        reader.send(&Frame::Hello(hello));
        assert!(matches!(reader.recv().frame, Frame::Welcome(_)));
        let subscribed = reader.subscribe(session, ResumeFrom::Earliest);
        assert_eq!((subscribed.replay_from_seq, subscribed.head_seq), (1, head));
        let mut out = Vec::new();
        while out.len() < head as usize {
            match reader.recv().frame {
                Frame::Deliver(d) if d.session == session => out.push((d.seq, format!("{}: {}", d.sender, String::from_utf8_lossy(&d.payload)))),
                Frame::ConversationEvent(e) if e.session == session && e.seq > 0 => out.push((e.seq, format!("{:?} {} {}", e.kind, e.agent, e.reason))),
                _ => {}
            }
        }
        assert_eq!(out.iter().map(|(seq, _)| *seq).collect::<Vec<_>>(), (1..=head).collect::<Vec<_>>(), "{out:?}");
        out
    }

    /// The next `CONVERSATION_EVENT` of `session` of `kind` in the session's order (seq > 0).
    fn event(&mut self, session: &str, kind: Kind) -> ConversationEvent {
        self.wait_for(&format!("{kind:?} on {session}"), |e| match &e.frame {
            Frame::ConversationEvent(ev) if ev.session == session && ev.kind == kind && ev.seq > 0 => Some(ev.clone()),
            _ => None,
        })
    }

    /// A direct notification (seq 0) of `kind` about `session`.
    fn notification(&mut self, session: &str, kind: Kind) -> ConversationEvent {
        self.wait_for(&format!("notification {kind:?} on {session}"), |e| match &e.frame {
            Frame::ConversationEvent(ev) if ev.session == session && ev.kind == kind && ev.seq == 0 => Some(ev.clone()),
            _ => None,
        })
    }

    fn agent_status(&mut self, agent: &str) -> AgentStatus {
        self.wait_for(&format!("AGENT_STATUS {agent}"), |e| match &e.frame {
            Frame::AgentStatus(status) if status.agent == agent => Some(status.clone()),
            _ => None,
        })
    }

    fn deliver(&mut self, session: &str) -> switchboard_protocol::Deliver {
        self.wait_for(&format!("DELIVER on {session}"), |e| match &e.frame {
            Frame::Deliver(d) if d.session == session => Some(d.clone()),
            _ => None,
        })
    }

    /// The next DELIVER on `session` from `sender` (a subscribed publisher gets its own too).
    fn deliver_from(&mut self, session: &str, sender: &str) -> switchboard_protocol::Deliver {
        self.wait_for(&format!("DELIVER on {session} from {sender}"), |e| match &e.frame {
            Frame::Deliver(d) if d.session == session && d.sender == sender => Some(d.clone()),
            _ => None,
        })
    }

    fn publish(&mut self, session: &str, sender: &str, payload: &[u8]) -> Result<u64, (ErrorCode, String)> {
        let correlation = self.send(&Raw::publish_frame(session, sender, 0, payload));
        match self.answer_any(correlation) {
            Frame::PubAck(ack) => Ok(ack.seq),
            Frame::Error(error) => Err((ErrorCode::from_u16(error.code), error.message.to_string())),
            other => panic!("{}: PUBLISH answered with {other:?}", self.name),
        }
    }

    /// Round-trips a PING and returns every frame that arrived before the PONG (the connection
    /// is alive, and nothing else is in flight to it).
    fn drain(&mut self) -> Vec<Frame> {
        let correlation = self.send(&Frame::Ping(Ping { nonce: 7 }));
        self.wait_for("PONG", |e| (e.correlation == correlation && matches!(e.frame, Frame::Pong(_))).then_some(()));
        self.backlog.drain(..).map(|e| e.frame).collect()
    }
}

fn open(session: &str, customer: &str) -> Frame {
    Frame::OpenConversation(OpenConversation {
        session: session.into(),
        customer: customer.into(),
        priority: 0,
        skills: vec![],
        context: bytes::Bytes::new(),
    })
}

fn online(agent: &str, capacity: u16) -> Frame {
    Frame::AgentStatus(AgentStatus { agent: agent.into(), presence: AgentPresence::Online, capacity, load: 0, skills: vec![] })
}

fn respond(session: &str, agent: &str, accept: bool) -> Frame {
    Frame::OfferResponse(OfferResponse { session: session.into(), agent: agent.into(), accept })
}

fn transfer_to_agent(session: &str, agent: &str, note: &str) -> Frame {
    Frame::Transfer(Transfer { session: session.into(), target: TransferTarget { kind: TransferKind::Agent, name: agent.into() }, note: note.into() })
}

fn close(session: &str, reason: &str) -> Frame {
    Frame::CloseConversation(CloseConversation { session: session.into(), reason: reason.into() })
}

fn short_desk() -> DeskConfig {
    DeskConfig { policy: DeskPolicyConfig { offer_timeout_ms: 30_000, agent_grace_ms: 30_000, ..DeskPolicyConfig::default() }, ..DeskConfig::default() }
}

#[test]
fn a_conversation_from_open_to_close() {
    // Memory only on 1 shard; journaled (sync) on 3, then restarted: the conversation's stream,
    // events and messages in one seq order, comes back whole in the same epoch.
    let journal = common::TempDir::new("cs-e2e");
    for (shards, durable) in [(1, false), (3, true)] {
        let mut config = config(shards, short_desk(), None);
        if durable {
            config.journal.durability = switchboard::config::DurabilityMode::Sync;
            config.server.data_dir = journal.path().to_path_buf();
        }
        let engine = common::start(config.clone());
        let addr = engine.data_addr();
        let mut sup = Client::connect(addr, "acme", "supervisor", "sup-1");
        let mut cus = Client::connect(addr, "acme", "customer", "cus-1");

        // Queued with a position, seen by the customer (on its session) and the supervisor.
        cus.request_ok(&open("conv-1", "cus-1"));
        let subscribed = cus.subscribe("conv-1", ResumeFrom::Earliest);
        let queued = cus.event("conv-1", Kind::Queued);
        assert_eq!((queued.position, queued.queue.as_str(), queued.seq), (1, "default", 1), "{queued:?}");
        assert!(queued.estimated_wait_ms > 0, "an estimate before any agent is online: {queued:?}");
        assert_eq!(sup.event("conv-1", Kind::Queued).seq, 1);

        // An agent comes online and is offered it (directly, and on the session).
        let mut ann = Client::connect(addr, "acme", "agent", "ann");
        ann.request_ok(&online("ann", 2));
        assert_eq!(ann.notification("conv-1", Kind::Offered).agent, "ann");
        let offered = cus.event("conv-1", Kind::Offered);
        assert_eq!((offered.agent.as_str(), offered.seq), ("ann", 2));
        let status = sup.agent_status("ann");
        assert_eq!((status.presence, status.capacity), (AgentPresence::Online, 2));

        // Accept, then chat; events and messages share one order.
        ann.request_ok(&respond("conv-1", "ann", true));
        assert_eq!(cus.event("conv-1", Kind::Accepted).seq, 3);
        assert_eq!(cus.event("conv-1", Kind::Assigned).seq, 4);
        let ann_sub = ann.subscribe("conv-1", ResumeFrom::Earliest);
        assert_eq!(ann_sub.epoch, subscribed.epoch);
        for (seq, kind) in [(1, Kind::Queued), (2, Kind::Offered), (3, Kind::Accepted), (4, Kind::Assigned)] {
            assert_eq!(ann.event("conv-1", kind).seq, seq, "the agent's replay of {kind:?}");
        }
        assert_eq!(cus.publish("conv-1", "cus-1", b"my order is late").unwrap(), 5);
        assert_eq!(&ann.deliver_from("conv-1", "cus-1").payload[..], b"my order is late");
        assert_eq!(ann.publish("conv-1", "ann", b"let me check").unwrap(), 6);
        assert_eq!(cus.deliver_from("conv-1", "ann").seq, 6);

        // A supervisor watches: the whole history, then live.
        sup.subscribe("conv-1", ResumeFrom::Earliest);
        assert_eq!(sup.deliver("conv-1").seq, 5);
        assert_eq!(sup.deliver("conv-1").seq, 6);

        // Transfer to another agent, who accepts; the first agent is out.
        let mut bob = Client::connect(addr, "acme", "agent", "bob");
        bob.request_ok(&online("bob", 1));
        ann.request_ok(&transfer_to_agent("conv-1", "bob", "billing question"));
        let transferred = cus.event("conv-1", Kind::Transferred);
        assert_eq!((transferred.agent.as_str(), transferred.reason.as_str()), ("bob", "billing question"));
        assert_eq!(bob.notification("conv-1", Kind::Offered).reason, "billing question");
        bob.request_ok(&respond("conv-1", "bob", true));
        assert_eq!(cus.event("conv-1", Kind::Assigned).agent, "bob");
        let (code, _) = ann.publish("conv-1", "ann", b"still here?").unwrap_err();
        assert_eq!(code, ErrorCode::Forbidden, "a transferred-away agent may not publish");
        bob.subscribe("conv-1", ResumeFrom::Live);
        let bob_seq = bob.publish("conv-1", "bob", b"bob here").unwrap();
        assert_eq!(cus.deliver_from("conv-1", "bob").seq, bob_seq);
        let leaked: Vec<Frame> = ann.drain().into_iter().filter(|f| matches!(f, Frame::Deliver(d) if d.seq == bob_seq)).collect();
        assert!(leaked.is_empty(), "the revoked agent still got messages: {leaked:?}");

        // The customer drops and resumes from its last seq: recovered, nothing missed.
        let last_seen = bob_seq;
        drop(cus);
        let missed = bob.publish("conv-1", "bob", b"are you still there?").unwrap();
        let mut cus = Client::connect(addr, "acme", "customer", "cus-1");
        let resumed = cus.subscribe("conv-1", ResumeFrom::After { epoch: subscribed.epoch, seq: last_seen });
        assert!(resumed.recovered, "{resumed:?}");
        assert_eq!(resumed.replay_from_seq, last_seen + 1);
        assert_eq!(cus.deliver_from("conv-1", "bob").seq, missed);

        // Close: everyone sees it; the customer may no longer publish.
        bob.request_ok(&close("conv-1", "resolved"));
        assert_eq!(cus.event("conv-1", Kind::Closed).reason, "resolved");
        let closed = sup.event("conv-1", Kind::Closed);
        assert_eq!(closed.agent, "bob");
        assert_eq!(cus.publish("conv-1", "cus-1", b"thanks").unwrap_err().0, ErrorCode::Forbidden);
        let before = sup.stream("conv-1", closed.seq);
        drop((sup, cus, ann, bob));
        engine.shutdown();
        if durable {
            let engine = common::start(config);
            let mut sup = Client::connect(engine.data_addr(), "acme", "supervisor", "sup-1");
            let restored = sup.subscribe("conv-1", ResumeFrom::Earliest);
            assert_eq!((restored.epoch, restored.head_seq), (subscribed.epoch, closed.seq), "{restored:?}");
            assert_eq!(sup.stream("conv-1", closed.seq), before, "the restored stream differs");
            engine.shutdown();
        }
    }
}

#[test]
fn every_cross_tenant_and_cross_role_attempt_is_refused() {
    let engine = engine(3, short_desk(), None);
    let addr = engine.data_addr();
    let mut cus = Client::connect(addr, "acme", "customer", "cus-1");
    cus.request_ok(&open("conv-1", "cus-1"));
    let mut ann = Client::connect(addr, "acme", "agent", "ann");
    ann.request_ok(&online("ann", 1));
    ann.notification("conv-1", Kind::Offered);
    let mut other = Client::connect(addr, "acme", "customer", "cus-2");
    let mut bob = Client::connect(addr, "acme", "agent", "bob");
    let mut sup = Client::connect(addr, "acme", "supervisor", "sup-1");
    let mut globex = Client::connect(addr, "globex", "gateway", "gw-9");
    let mut globex_sup = Client::connect(addr, "globex", "supervisor", "sup-9");
    let subscribe = |session: &str| Frame::Subscribe(Subscribe { session: session.into(), from: ResumeFrom::Earliest });
    let cursor = |who: &str| Frame::ReadCursor(ReadCursor { session: "conv-1".into(), participant: who.into(), seq: 1 });

    // Another customer: nothing of cus-1's conversation.
    other.refused(&subscribe("conv-1"), ErrorCode::Forbidden);
    other.refused(&Raw::publish_frame("conv-1", "cus-2", 0, b"hi"), ErrorCode::Forbidden);
    other.refused(&cursor("cus-2"), ErrorCode::Forbidden);
    other.refused(&close("conv-1", "mine now"), ErrorCode::Forbidden);
    other.refused(&open("conv-2", "cus-1"), ErrorCode::Forbidden);
    other.refused(&subscribe("never-opened"), ErrorCode::Forbidden);
    // The customer itself: not as someone else, not an agent's or supervisor's actions.
    cus.refused(&Raw::publish_frame("conv-1", "ann", 0, b"I am the agent"), ErrorCode::Forbidden);
    cus.refused(&online("cus-1", 5), ErrorCode::Forbidden);
    cus.refused(&respond("conv-1", "ann", true), ErrorCode::Forbidden);
    cus.refused(&transfer_to_agent("conv-1", "bob", ""), ErrorCode::Forbidden);
    // Another agent: not offered, so nothing; and never in ann's name.
    bob.refused(&subscribe("conv-1"), ErrorCode::Forbidden);
    bob.refused(&respond("conv-1", "bob", true), ErrorCode::Forbidden);
    bob.refused(&respond("conv-1", "ann", true), ErrorCode::Forbidden);
    bob.refused(&online("ann", 3), ErrorCode::Forbidden);
    bob.refused(&open("conv-3", "bob"), ErrorCode::Forbidden);
    // The offered agent may not transfer or close before accepting; a supervisor may not
    // answer in its place.
    ann.refused(&transfer_to_agent("conv-1", "bob", ""), ErrorCode::Forbidden);
    ann.refused(&close("conv-1", ""), ErrorCode::Forbidden);
    sup.refused(&respond("conv-1", "ann", true), ErrorCode::Forbidden);
    sup.refused(&open("conv-4", "cus-1"), ErrorCode::Forbidden);
    // Another tenant: its own (empty) world.
    globex.refused(&close("conv-1", "x"), ErrorCode::NotFound);
    globex.refused(&respond("conv-1", "ann", true), ErrorCode::NotFound);
    assert_eq!(globex.subscribe("conv-1", ResumeFrom::Earliest).head_seq, 0, "globex's conv-1 is another session");
    // Nothing leaked: the other tenant's supervisor saw nothing, the refused connections got
    // nothing but their answers, and every connection carries on.
    ann.request_ok(&respond("conv-1", "ann", true));
    cus.subscribe("conv-1", ResumeFrom::Earliest);
    assert_eq!(cus.event("conv-1", Kind::Assigned).agent, "ann", "the refusals changed nothing");
    assert!(globex_sup.drain().is_empty());
    assert!(globex.drain().is_empty());
    assert!(other.drain().is_empty());
    assert!(bob.drain().is_empty());
    engine.shutdown();
}

#[test]
fn a_declined_or_unanswered_offer_goes_to_the_next_agent() {
    let mut desk = short_desk();
    desk.policy.offer_timeout_ms = 300;
    let engine = engine(3, desk, None);
    let addr = engine.data_addr();
    let mut sup = Client::connect(addr, "acme", "supervisor", "sup-1");
    let mut gateway = Client::connect(addr, "acme", "gateway", "gw-1");
    gateway.request_ok(&open("conv-d", "cus-7"));
    assert_eq!(sup.event("conv-d", Kind::Queued).position, 1);

    let mut ann = Client::connect(addr, "acme", "agent", "ann");
    ann.request_ok(&online("ann", 1));
    ann.notification("conv-d", Kind::Offered);
    assert_eq!(sup.event("conv-d", Kind::Offered).agent, "ann");
    ann.request_ok(&respond("conv-d", "ann", false));
    let declined = sup.event("conv-d", Kind::Declined);
    assert_eq!((declined.agent.as_str(), declined.reason.as_str()), ("ann", "declined"));
    sup.event("conv-d", Kind::Queued);

    // Bob is offered it (ann declined it: not again) and lets the offer expire.
    let mut bob = Client::connect(addr, "acme", "agent", "bob");
    bob.request_ok(&online("bob", 1));
    assert_eq!(sup.event("conv-d", Kind::Offered).agent, "bob");
    assert_eq!(bob.notification("conv-d", Kind::Declined).reason, "offer timeout");
    let timed_out = sup.event("conv-d", Kind::Declined);
    assert_eq!((timed_out.agent.as_str(), timed_out.reason.as_str()), ("bob", "offer timeout"));
    let requeued = sup.event("conv-d", Kind::Queued);
    assert_eq!(requeued.position, 1);
    // A late answer is refused; a third agent gets it.
    assert!(bob.refused(&respond("conv-d", "bob", true), ErrorCode::Forbidden).contains("not offered"));
    let mut carol = Client::connect(addr, "acme", "agent", "carol");
    carol.request_ok(&online("carol", 1));
    carol.notification("conv-d", Kind::Offered);
    carol.request_ok(&respond("conv-d", "carol", true));
    assert_eq!(sup.event("conv-d", Kind::Assigned).agent, "carol");
    engine.shutdown();
}

#[test]
fn a_queue_overflows_then_gives_the_offline_outcome() {
    let queue = |name: &str, overflow: &str| QueueConfig { name: name.into(), skills: vec![], wait_ms_max: 200, overflow: overflow.into() };
    let mut desk = short_desk();
    desk.policy.queues = vec![queue("front", "backup"), queue("backup", "")];
    for shards in [1, 3] {
        let engine = engine(shards, desk.clone(), None);
        let mut cus = Client::connect(engine.data_addr(), "acme", "customer", "cus-1");
        cus.request_ok(&open("conv-o", "cus-1"));
        cus.subscribe("conv-o", ResumeFrom::Earliest);
        assert_eq!(cus.event("conv-o", Kind::Queued).queue, "front");
        let overflowed = cus.event("conv-o", Kind::Overflowed);
        assert_eq!((overflowed.queue.as_str(), overflowed.reason.as_str()), ("backup", "max wait"));
        assert_eq!(cus.event("conv-o", Kind::Queued).queue, "backup");
        let offline = cus.event("conv-o", Kind::Overflowed);
        assert_eq!(offline.queue, "", "the offline outcome names no queue");
        assert_eq!(cus.publish("conv-o", "cus-1", b"hello?").unwrap_err().0, ErrorCode::Forbidden, "the conversation is over");
        engine.shutdown();
    }
}

#[test]
fn a_leaving_customer_abandons_and_a_lost_agent_goes_offline_after_its_grace() {
    let mut desk = short_desk();
    desk.policy.agent_grace_ms = 200;
    desk.policy.customer_grace_ms = 200;
    let engine = engine(3, desk, None);
    let addr = engine.data_addr();
    let mut sup = Client::connect(addr, "acme", "supervisor", "sup-1");
    let mut cus = Client::connect(addr, "acme", "customer", "cus-1");
    cus.request_ok(&open("conv-a", "cus-1"));
    sup.event("conv-a", Kind::Queued);
    drop(cus);
    assert_eq!(sup.event("conv-a", Kind::Abandoned).reason, "customer left");

    let mut ann = Client::connect(addr, "acme", "agent", "ann");
    ann.request_ok(&online("ann", 1));
    let mut cus = Client::connect(addr, "acme", "customer", "cus-2");
    cus.request_ok(&open("conv-b", "cus-2"));
    ann.notification("conv-b", Kind::Offered);
    ann.request_ok(&respond("conv-b", "ann", true));
    sup.event("conv-b", Kind::Assigned);
    drop(ann);
    let offline = sup.wait_for("ann offline", |e| match &e.frame {
        Frame::AgentStatus(s) if s.agent == "ann" && s.presence == AgentPresence::Offline => Some(s.clone()),
        _ => None,
    });
    assert_eq!(offline.load, 0);
    assert_eq!(sup.event("conv-b", Kind::Transferred).reason, "agent offline");
    assert_eq!(sup.event("conv-b", Kind::Queued).position, 1);
    // The customer kept its conversation through all this.
    assert!(cus.subscribe("conv-b", ResumeFrom::Earliest).head_seq >= 5);
    engine.shutdown();
}

#[test]
fn rate_limits_answer_rate_limited_and_the_connection_carries_on() {
    let limits = RateLimitsConfig { connection_publishes_per_s: 5, connection_opens_per_s: 2, ..RateLimitsConfig::default() };
    let engine = engine(2, short_desk(), Some(limits));
    let mut gateway = Client::connect(engine.data_addr(), "acme", "gateway", "gw-1");
    let mut acked = 0;
    let mut limited = 0;
    for n in 0..20u8 {
        match gateway.publish("chat", "cus-1", &[n]) {
            Ok(_) => acked += 1,
            Err((ErrorCode::RateLimited, message)) => {
                assert!(message.contains("publishes per second"), "{message}");
                limited += 1;
            }
            Err(other) => panic!("{other:?}"),
        }
    }
    assert!((5..=7).contains(&acked), "a burst of 5 (plus refill while sending): {acked}");
    assert_eq!(acked + limited, 20);
    gateway.request_ok(&open("conv-r1", "cus-1"));
    gateway.request_ok(&open("conv-r2", "cus-2"));
    gateway.refused(&open("conv-r3", "cus-3"), ErrorCode::RateLimited);
    assert!(gateway.drain().is_empty(), "still connected, nothing else sent");
    // Another tenant is not limited by acme's buckets.
    let mut globex = Client::connect(engine.data_addr(), "globex", "gateway", "gw-9");
    for n in 0..20u8 {
        globex.publish("chat", "cus-1", &[n]).unwrap();
    }
    engine.shutdown();
}

#[test]
fn read_cursors_and_typing_over_their_rate_are_refused_or_dropped_and_never_pushed() {
    let limits = RateLimitsConfig { connection_signals_per_s: 3, ..RateLimitsConfig::default() };
    let engine = engine(2, short_desk(), Some(limits));
    let mut gateway = Client::connect(engine.data_addr(), "acme", "gateway", "gw-1");
    let mut watcher = Client::connect(engine.data_addr(), "acme", "gateway", "gw-2");
    // Ten messages, so that cursors 1..=10 all move (a cursor stops at the head).
    for n in 0..10u8 {
        gateway.publish("chat", "cus-1", &[n]).unwrap();
    }
    watcher.subscribe("chat", ResumeFrom::Live);
    let cursor = |seq| Frame::ReadCursor(ReadCursor { session: "chat".into(), participant: "cus-1".into(), seq });
    let mut accepted = Vec::new();
    for seq in 1..=10 {
        let correlation = gateway.send(&cursor(seq));
        match gateway.answer(correlation) {
            Ok(()) => accepted.push(seq),
            Err((ErrorCode::RateLimited, message)) => assert!(message.contains("read cursors and typing"), "{message}"),
            Err(other) => panic!("{other:?}"),
        }
    }
    assert!((3..=4).contains(&accepted.len()), "a burst of 3 (plus refill while sending): {accepted:?}");
    // TYPING shares the (now empty) bucket: dropped, and never answered.
    for _ in 0..5 {
        gateway.send(&Frame::Typing(Typing { session: "chat".into(), participant: "cus-1".into(), active: true }));
    }
    assert!(gateway.drain().is_empty(), "a dropped TYPING is not answered");
    // Publishes are not limited here. This one travels behind the cursors and the TYPINGs (same
    // connection, same session), so once the watcher has it, it has had everything pushed before.
    gateway.publish("chat", "cus-1", b"sync").unwrap();
    watcher.wait_for("the sync message", |e| matches!(&e.frame, Frame::Deliver(d) if d.payload.as_ref() == b"sync").then_some(()));
    let pushed: Vec<&Frame> = watcher.backlog.iter().map(|e| &e.frame).collect();
    let cursors: Vec<u64> = pushed.iter().filter_map(|f| if let Frame::ReadCursor(c) = f { Some(c.seq) } else { None }).collect();
    assert_eq!(cursors, accepted, "only accepted cursors are pushed: {pushed:?}");
    assert!(!pushed.iter().any(|f| matches!(f, Frame::Typing(_))), "no TYPING over the rate is forwarded: {pushed:?}");
    engine.shutdown();
}

#[test]
fn an_ended_conversation_is_dropped_after_its_linger() {
    let mut config = config(1, short_desk(), None);
    config.limits.session_idle_ms = 0;
    config.limits.closed_session_linger_ms = 100;
    let engine = common::start(config);
    let addr = engine.data_addr();
    let mut cus = Client::connect(addr, "acme", "customer", "cus-1");
    let mut ann = Client::connect(addr, "acme", "agent", "ann");
    cus.request_ok(&open("conv-1", "cus-1"));
    cus.request_ok(&open("conv-2", "cus-1"));
    ann.request_ok(&online("ann", 2));
    for session in ["conv-1", "conv-2"] {
        ann.notification(session, Kind::Offered);
        ann.request_ok(&respond(session, "ann", true));
    }
    ann.request_ok(&close("conv-1", "resolved"));
    drop((cus, ann));
    let dropped = || common::metric_sum(&common::http_get(engine.control_addr(), "/metrics").1, "switchboard_sessions_dropped_idle_total");
    common::wait_for_metric(engine.control_addr(), "switchboard_sessions_dropped_idle_total", "the ended conversation's session was never dropped");
    // Only the ended one: the open conversation's session stays (session_idle_ms = 0).
    assert_eq!(dropped(), 1);
    let mut sup = Client::connect(addr, "acme", "supervisor", "sup-1");
    assert_eq!(sup.subscribe("conv-2", ResumeFrom::Earliest).head_seq, 4, "conv-2 kept its stream");
    assert_eq!(sup.subscribe("conv-1", ResumeFrom::Earliest).head_seq, 0, "conv-1 was dropped");
    engine.shutdown();
}

/// Each routing strategy, chosen in the tenant's desk configuration, decides over real sockets
/// as it is documented to.
#[test]
fn every_strategy_routes_as_documented() {
    use switchboard::config::StrategySpec;
    let skilled = |agent: &str, capacity: u16, skills: &[&str]| {
        Frame::AgentStatus(AgentStatus {
            agent: agent.into(),
            presence: AgentPresence::Online,
            capacity,
            load: 0,
            skills: skills.iter().map(|&s| Text::from(s)).collect(),
        })
    };
    let with = |strategy: StrategySpec, queues: Vec<QueueConfig>| {
        let mut desk = short_desk();
        desk.policy.strategy = strategy;
        if !queues.is_empty() {
            desk.policy.queues = queues;
        }
        common::start(config(3, desk, None))
    };

    // Least load: the second conversation goes to the agent with more room.
    let engine = with(StrategySpec::LeastLoad, Vec::new());
    let addr = engine.data_addr();
    let (mut cus, mut ann, mut bob) = (
        Client::connect(addr, "acme", "customer", "cus-1"),
        Client::connect(addr, "acme", "agent", "ann"),
        Client::connect(addr, "acme", "agent", "bob"),
    );
    ann.request_ok(&online("ann", 3));
    bob.request_ok(&online("bob", 3));
    cus.request_ok(&open("ll-1", "cus-1"));
    cus.subscribe("ll-1", ResumeFrom::Earliest);
    let first = cus.event("ll-1", Kind::Offered).agent;
    let (taker, other) = if first == "ann" { (&mut ann, &mut bob) } else { (&mut bob, &mut ann) };
    taker.notification("ll-1", Kind::Offered);
    taker.request_ok(&respond("ll-1", &first, true));
    cus.request_ok(&open("ll-2", "cus-1"));
    cus.subscribe("ll-2", ResumeFrom::Earliest);
    let second = cus.event("ll-2", Kind::Offered).agent;
    assert_ne!(second, first, "least-load offered the busier agent");
    other.notification("ll-2", Kind::Offered);
    drop((cus, ann, bob));
    engine.shutdown();

    // Skill based: only the agent with the queue's skill is offered it, even with less room.
    let billing = QueueConfig { name: "billing".into(), skills: vec!["billing".into()], wait_ms_max: 0, overflow: String::new() };
    let default = QueueConfig { name: "default".into(), skills: Vec::new(), wait_ms_max: 0, overflow: String::new() };
    let engine = with(StrategySpec::SkillBased, vec![default, billing]);
    let addr = engine.data_addr();
    let (mut cus, mut ann, mut bob) = (
        Client::connect(addr, "acme", "customer", "cus-1"),
        Client::connect(addr, "acme", "agent", "ann"),
        Client::connect(addr, "acme", "agent", "bob"),
    );
    ann.request_ok(&skilled("ann", 5, &[]));
    bob.request_ok(&skilled("bob", 1, &["billing"]));
    let mut billing_open = open("sk-1", "cus-1");
    if let Frame::OpenConversation(o) = &mut billing_open {
        o.skills = vec!["billing".into()];
    }
    cus.request_ok(&billing_open);
    cus.subscribe("sk-1", ResumeFrom::Earliest);
    let queued = cus.event("sk-1", Kind::Queued);
    assert_eq!(queued.queue, "billing");
    assert_eq!(cus.event("sk-1", Kind::Offered).agent, "bob");
    bob.notification("sk-1", Kind::Offered);
    drop((cus, ann, bob));
    engine.shutdown();

    // Affinity: the customer's last agent, although least-load would pick the other one.
    let engine = with(StrategySpec::Affinity { fallback: Box::new(StrategySpec::LeastLoad) }, Vec::new());
    let addr = engine.data_addr();
    let (mut cus, mut ann) = (Client::connect(addr, "acme", "customer", "cus-1"), Client::connect(addr, "acme", "agent", "ann"));
    ann.request_ok(&online("ann", 3));
    cus.request_ok(&open("af-1", "cus-1"));
    ann.notification("af-1", Kind::Offered);
    ann.request_ok(&respond("af-1", "ann", true));
    ann.request_ok(&close("af-1", "done"));
    let mut other = Client::connect(addr, "acme", "customer", "cus-2");
    other.request_ok(&open("af-busy", "cus-2"));
    ann.notification("af-busy", Kind::Offered);
    ann.request_ok(&respond("af-busy", "ann", true));
    let mut bob = Client::connect(addr, "acme", "agent", "bob");
    bob.request_ok(&online("bob", 3));
    cus.request_ok(&open("af-2", "cus-1"));
    cus.subscribe("af-2", ResumeFrom::Earliest);
    assert_eq!(cus.event("af-2", Kind::Offered).agent, "ann", "affinity ignored the customer's last agent");
    drop((cus, ann, bob, other));
    engine.shutdown();

    // Business hours with no opening range: always out of hours, the offline outcome at once.
    let hours = StrategySpec::BusinessHours { utc_offset_minutes: 0, open: Vec::new(), inner: Box::new(StrategySpec::LeastLoad) };
    let engine = with(hours, Vec::new());
    let addr = engine.data_addr();
    let (mut cus, mut ann) = (Client::connect(addr, "acme", "customer", "cus-1"), Client::connect(addr, "acme", "agent", "ann"));
    let mut sup = Client::connect(addr, "acme", "supervisor", "sup-1");
    ann.request_ok(&online("ann", 3));
    cus.request_ok(&open("bh-1", "cus-1"));
    // Ended at once: the conversation's stream (read here by a supervisor) says why.
    sup.subscribe("bh-1", ResumeFrom::Earliest);
    let outcome = sup.event("bh-1", Kind::Overflowed);
    assert_eq!((outcome.reason.as_str(), outcome.queue.as_str()), ("out of hours", ""));
    assert!(ann.drain().iter().all(|f| !matches!(f, Frame::ConversationEvent(e) if e.session == "bh-1")), "an agent was offered it");
    drop((cus, ann, sup));
    engine.shutdown();
}
