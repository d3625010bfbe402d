//! The control port's JSON API over real HTTP, against the real engine (1 and 3 shards), with
//! conversations driven by raw protocol frames over real sockets (as in `cs_e2e.rs`): a policy
//! change takes effect on the next conversation; bad documents, missing tokens and stale
//! versions are refused and change nothing; the views and /metrics reflect the desk.

mod common;

use std::collections::VecDeque;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};

use common::Raw;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use serde_json::{json, Value};
use switchboard::config::{DeskConfig, DeskPolicyConfig, StrategySpec, TenantConfig, TenantKeyConfig, VariantConfig};
use switchboard_protocol::{
    AgentPresence, AgentStatus, ConversationEvent, ConversationEventKind as Kind, Envelope, ErrorCode, Frame, Hello, OfferResponse,
    OpenConversation, Text,
};

const ACME: &str = "acme-secret-0123456789abcdef0123456789";
const GLOBEX: &str = "globex-secret-0123456789abcdef012345";
const ADMIN: &str = "admin-token-0123456789abcdef";

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

fn engine(shards: usize, desk: DeskConfig, admin_token: &str) -> switchboard::EngineHandle {
    let mut config = common::test_config(shards);
    let key = |kid: &str, secret: &str| vec![TenantKeyConfig { kid: kid.into(), secret: secret.into() }];
    config.tenants = vec![
        TenantConfig { id: "acme".into(), keys: key("acme-1", ACME), desk: Some(desk), rate_limits: None, durability: None, sessions_per_shard_max: None },
        TenantConfig { id: "globex".into(), keys: key("globex-1", GLOBEX), desk: None, rate_limits: None, durability: None, sessions_per_shard_max: None },
    ];
    config.control.admin_token = admin_token.into();
    config.control.page_items_max = 50;
    common::start(config)
}

/// `{ann: a, bob: b}` weighted round-robin.
fn wrr(ann: u32, bob: u32) -> StrategySpec {
    StrategySpec::WeightedRoundRobin { weights: [("ann".to_owned(), ann), ("bob".to_owned(), bob)].into(), default_weight: 0 }
}

fn desk(strategy: StrategySpec) -> DeskConfig {
    DeskConfig { policy: DeskPolicyConfig { strategy, offer_timeout_ms: 30_000, agent_grace_ms: 30_000, ..DeskPolicyConfig::default() }, ..DeskConfig::default() }
}

// ---- HTTP ----

/// One HTTP request on the control port: (status, body). `Connection: close`, read to EOF.
fn http(addr: SocketAddr, method: &str, path: &str, bearer: Option<&str>, body: Option<&str>) -> (u16, String) {
    let mut stream = TcpStream::connect(addr).unwrap();
    stream.set_read_timeout(Some(common::EXPECT_TIMEOUT)).unwrap();
    let authorization = bearer.map(|token| format!("Authorization: Bearer {token}\r\n")).unwrap_or_default();
    let body = body.unwrap_or("");
    let request = format!(
        "{method} {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n{authorization}Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    stream.write_all(request.as_bytes()).unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let status = response.split(' ').nth(1).and_then(|s| s.parse().ok()).expect("HTTP status line");
    let body = response.split_once("\r\n\r\n").map(|(_, body)| body.to_owned()).unwrap_or_default();
    (status, body)
}

/// GET, expecting 200 and JSON.
fn get_json(addr: SocketAddr, path: &str) -> Value {
    let (status, body) = http(addr, "GET", path, None, None);
    assert_eq!(status, 200, "GET {path}: {body}");
    serde_json::from_str(&body).unwrap_or_else(|e| panic!("GET {path}: not JSON ({e}): {body}"))
}

/// PUT a policy document: (status, JSON body).
fn put_policy(addr: SocketAddr, tenant: &str, bearer: Option<&str>, body: &str) -> (u16, Value) {
    let (status, text) = http(addr, "PUT", &format!("/v1/tenants/{tenant}/policy"), bearer, Some(body));
    let value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("PUT answer is not JSON ({e}): {text}"));
    (status, value)
}

fn policy_version(addr: SocketAddr, tenant: &str) -> (u64, Value) {
    let policy = get_json(addr, &format!("/v1/tenants/{tenant}/policy"));
    (policy["version"].as_u64().unwrap(), policy)
}

// ---- the data port (a trimmed copy of cs_e2e's client) ----

struct Client {
    raw: Raw,
    backlog: VecDeque<Envelope>,
}

impl Client {
    fn connect(addr: SocketAddr, tenant: &str, role: &str, sub: &str) -> Client {
        let mut raw = Raw::connect(addr);
        let hello = Hello { version_max: 1, version_min: 1, features: 0, client_name: "control-api".into(), token: Text::from(token(tenant, role, sub)) };
        raw.send(&Frame::Hello(hello));
        assert!(matches!(raw.recv().frame, Frame::Welcome(_)));
        Client { raw, backlog: VecDeque::new() }
    }

    fn wait_for<T>(&mut self, what: &str, mut pick: impl FnMut(&Envelope) -> Option<T>) -> T {
        if let Some(index) = self.backlog.iter().position(|e| pick(e).is_some()) {
            let envelope = self.backlog.remove(index).unwrap();
            return pick(&envelope).unwrap();
        }
        loop {
            let Some(envelope) = self.raw.try_recv() else { panic!("closed while waiting for {what}; had {:?}", self.backlog) };
            if let Some(found) = pick(&envelope) {
                return found;
            }
            self.backlog.push_back(envelope);
        }
    }

    fn request_ok(&mut self, frame: &Frame) {
        let correlation = self.raw.send(frame);
        match self.wait_for("an answer", |e| (e.correlation == correlation).then(|| e.frame.clone())) {
            Frame::Success(_) => {}
            Frame::Error(error) => panic!("{frame:?} refused: {:?} {}", ErrorCode::from_u16(error.code), error.message),
            other => panic!("{frame:?}: unexpected answer {other:?}"),
        }
    }

    /// The next session event (seq > 0) of `session` of `kind`.
    fn event(&mut self, session: &str, kind: Kind) -> ConversationEvent {
        self.wait_for(&format!("{kind:?} on {session}"), |e| match &e.frame {
            Frame::ConversationEvent(ev) if ev.session == session && ev.kind == kind && ev.seq > 0 => Some(ev.clone()),
            _ => None,
        })
    }
}

fn open(session: &str, customer: &str) -> Frame {
    Frame::OpenConversation(OpenConversation { session: session.into(), customer: customer.into(), priority: 0, skills: vec![], context: bytes::Bytes::new() })
}

fn status(agent: &str, presence: AgentPresence, capacity: u16) -> Frame {
    Frame::AgentStatus(AgentStatus { agent: agent.into(), presence, capacity, load: 0, skills: vec![] })
}

fn accept(session: &str, agent: &str) -> Frame {
    Frame::OfferResponse(OfferResponse { session: session.into(), agent: agent.into(), accept: true })
}

// ---- tests ----

#[test]
fn a_weight_change_through_the_control_plane_takes_effect_on_the_next_conversation() {
    for shards in [1, 3] {
        // Only ann may be picked at first (bob's weight is 0).
        let engine = engine(shards, desk(wrr(1, 0)), ADMIN);
        let (data, control) = (engine.data_addr(), engine.control_addr());
        let mut sup = Client::connect(data, "acme", "supervisor", "sup-1");
        let mut gateway = Client::connect(data, "acme", "gateway", "gw-1");
        let mut ann = Client::connect(data, "acme", "agent", "ann");
        let mut bob = Client::connect(data, "acme", "agent", "bob");
        ann.request_ok(&status("ann", AgentPresence::Online, 5));
        bob.request_ok(&status("bob", AgentPresence::Online, 5));

        let (version, before) = policy_version(control, "acme");
        assert_eq!(version, 1, "the configuration's policy is version 1: {before}");
        assert_eq!(before["policy"]["strategy"], json!({ "kind": "weighted-round-robin", "weights": { "ann": 1, "bob": 0 }, "default_weight": 0 }));

        gateway.request_ok(&open("conv-1", "cus-1"));
        assert_eq!(sup.event("conv-1", Kind::Offered).agent, "ann", "{shards} shards: bob's weight is 0");
        ann.request_ok(&accept("conv-1", "ann"));
        sup.event("conv-1", Kind::Assigned);

        // Swap the weights through the control port: the next conversation goes to bob.
        let mut document = before["policy"].clone();
        document["strategy"]["weights"] = json!({ "ann": 0, "bob": 1 });
        let (code, answer) = put_policy(control, "acme", Some(ADMIN), &json!({ "expected_version": 1, "policy": document }).to_string());
        assert_eq!(code, 200, "{answer}");
        assert_eq!(answer["version"], 2);
        gateway.request_ok(&open("conv-2", "cus-2"));
        assert_eq!(sup.event("conv-2", Kind::Offered).agent, "bob", "{shards} shards: the change applies to the next conversation");
        bob.request_ok(&accept("conv-2", "bob"));
        sup.event("conv-2", Kind::Assigned);

        // The version every shard has applied; the desk shard runs it.
        let (version, after) = policy_version(control, "acme");
        assert_eq!(version, 2);
        assert_eq!(after["applied_version"], 2, "{after}");
        assert_eq!(after["shards"].as_array().unwrap().len(), shards);
        assert!(after["shards"].as_array().unwrap().iter().all(|s| s["applied_version"] == 2), "{after}");
        assert_eq!(after["policy"]["strategy"]["weights"], json!({ "ann": 0, "bob": 1 }));

        // A strategy change without expected_version (unconditional): least-load now prefers
        // ann (bob is equally loaded but was offered work more recently).
        let (code, answer) = put_policy(control, "acme", Some(ADMIN), r#"{"policy": {"strategy": "least-load", "offer_timeout_ms": 30000, "agent_grace_ms": 30000}}"#);
        assert_eq!((code, answer["version"].as_u64()), (200, Some(3)), "{answer}");
        gateway.request_ok(&open("conv-3", "cus-3"));
        assert_eq!(sup.event("conv-3", Kind::Offered).agent, "ann");
        // Another tenant's desk was not touched.
        assert_eq!(policy_version(control, "globex").0, 1);
        engine.shutdown();
    }
}

#[test]
fn bad_documents_stale_versions_and_missing_tokens_are_refused_and_change_nothing() {
    let engine = engine(3, desk(wrr(1, 0)), ADMIN);
    let (data, control) = (engine.data_addr(), engine.control_addr());
    let (_, original) = policy_version(control, "acme");
    let document = original["policy"].clone();
    let with = |edit: &dyn Fn(&mut Value)| {
        let mut policy = document.clone();
        edit(&mut policy);
        json!({ "policy": policy }).to_string()
    };

    let bad_documents: Vec<(String, &str)> = vec![
        ("{".into(), "invalid policy document"),
        ("[]".into(), "invalid policy document"),
        (r#"{"policy": {"strategy": "least-load"}, "force": true}"#.into(), "unknown field `force`"),
        (with(&|p| p["stratgy"] = json!("least-load")), "unknown field `stratgy`"),
        (with(&|p| p["strategy"] = json!("round-robin")), "round-robin"),
        (with(&|p| p["strategy"] = json!({ "kind": "weighted-round-robin", "weights": { "ann": 0 }, "default_weight": 0 })), "every weight is 0"),
        (with(&|p| p["strategy"] = json!({ "kind": "least-load", "weights": {} })), "unknown field `weights`"),
        (with(&|p| p["strategy"] = json!({ "kind": "business-hours", "open": [{ "weekday": 9, "start_minute": 0, "end_minute": 60 }] })), "opening range"),
        (with(&|p| p["queues"] = json!([{ "name": "front", "wait_ms_max": 1000, "overflow": "nowhere" }])), "unknown queue `nowhere`"),
        (with(&|p| p["queues"] = json!([])), "queues"),
        (with(&|p| p["offer_timeout_ms"] = json!(0)), "offer_timeout_ms"),
        (with(&|p| p["offer_timeout_ms"] = json!(-5)), "invalid policy document"),
        (with(&|p| p["experiment"] = json!([{ "group": "a", "weight": 0 }, { "group": "b", "weight": 0 }])), "weights sum to 0"),
        (with(&|p| p["experiment"] = json!([{ "group": "a", "weight": 1 }, { "group": "a", "weight": 1 }])), "defined twice"),
        (with(&|p| p["experiment"] = json!([{ "group": "", "weight": 1 }])), "group id"),
    ];
    for (body, reason) in &bad_documents {
        let (code, answer) = put_policy(control, "acme", Some(ADMIN), body);
        assert_eq!(code, 400, "{body} -> {answer}");
        let error = answer["error"].as_str().unwrap();
        assert!(error.contains(reason), "{body}: expected the reason to mention {reason:?}, got {error:?}");
    }
    let too_big = format!(r#"{{"policy": {{"queues": [{{"name": "{}"}}]}}}}"#, "x".repeat(2 << 20));
    assert_eq!(http(control, "PUT", "/v1/tenants/acme/policy", Some(ADMIN), Some(&too_big)).0, 413);

    // What only the desk knows: a queue with a waiting conversation cannot be removed.
    let mut gateway = Client::connect(data, "acme", "gateway", "gw-1");
    gateway.request_ok(&open("conv-w", "cus-1"));
    let (code, answer) = put_policy(control, "acme", Some(ADMIN), &with(&|p| p["queues"] = json!([{ "name": "other" }])));
    assert_eq!(code, 400, "{answer}");
    assert!(answer["error"].as_str().unwrap().contains("still has 1 waiting"), "{answer}");

    // Tokens: none, wrong, malformed → 401; nothing applied.
    let good = with(&|p| p["offer_timeout_ms"] = json!(12_345));
    for bearer in [None, Some("wrong-token-0123456789abcdef"), Some("")] {
        let (code, answer) = put_policy(control, "acme", bearer, &good);
        assert_eq!(code, 401, "{bearer:?}: {answer}");
    }
    let (code, _) = http(control, "PUT", "/v1/tenants/acme/policy", None, Some(&good));
    assert_eq!(code, 401);

    let (version, now) = policy_version(control, "acme");
    assert_eq!(version, 1, "nothing was applied");
    assert_eq!(now["policy"], original["policy"], "the policy is unchanged");

    // Versions: a stale expected_version gets 409 and the version in force.
    let versioned = |expected: u64| {
        let mut policy = document.clone();
        policy["offer_timeout_ms"] = json!(12_345);
        json!({ "expected_version": expected, "policy": policy }).to_string()
    };
    assert_eq!(put_policy(control, "acme", Some(ADMIN), &versioned(1)).0, 200);
    let (code, answer) = put_policy(control, "acme", Some(ADMIN), &versioned(1));
    assert_eq!(code, 409, "{answer}");
    assert_eq!(answer["version"], 2);
    assert_eq!(put_policy(control, "acme", Some(ADMIN), &versioned(2)).0, 200);
    let (version, now) = policy_version(control, "acme");
    assert_eq!((version, now["policy"]["offer_timeout_ms"].as_u64()), (3, Some(12_345)));

    // Unknown tenants and resources, other methods.
    assert_eq!(put_policy(control, "initech", Some(ADMIN), &good).0, 404);
    assert_eq!(http(control, "GET", "/v1/tenants/initech/agents", None, None).0, 404);
    assert_eq!(http(control, "GET", "/v1/tenants/acme/nope", None, None).0, 404);
    assert_eq!(http(control, "POST", "/v1/tenants/acme/policy", Some(ADMIN), Some(&good)).0, 405);
    assert_eq!(http(control, "DELETE", "/v1/tenants/acme/queues", Some(ADMIN), None).0, 405);
    assert_eq!(http(control, "GET", "/v1/tenants/%ff/policy", None, None).0, 400);
    assert_eq!(http(control, "GET", "/v1/tenants/acme/agents?limit=zero", None, None).0, 400);
    assert_eq!(http(control, "GET", "/v1/tenants/acme/agents?limit=0", None, None).0, 400);
    // Garbage on the control port: the port carries on.
    for garbage in [&b"\x00\x01\x02 nonsense\r\n\r\n"[..], b"GET /v1/tenants/acme/policy HTTP/1.1\r\nContent-Length: 99999999999999999999\r\n\r\n", b"PUT /v1/tenants/acme/policy HTTP/1.1\r\nContent-Length: 10\r\n\r\n{"] {
        let mut stream = TcpStream::connect(control).unwrap();
        stream.set_read_timeout(Some(std::time::Duration::from_secs(2))).unwrap();
        let _ = stream.write_all(garbage);
        let _ = stream.shutdown(std::net::Shutdown::Write);
        let _ = stream.read_to_end(&mut Vec::new());
    }
    assert_eq!(common::http_get(control, "/healthz").0, 200);
    assert_eq!(policy_version(control, "acme").0, 3);
    engine.shutdown();
}

#[test]
fn writes_are_disabled_without_an_admin_token() {
    let engine = engine(1, desk(StrategySpec::LeastLoad), "");
    let control = engine.control_addr();
    let (code, answer) = put_policy(control, "acme", Some(ADMIN), r#"{"policy": {}}"#);
    assert_eq!(code, 403);
    assert!(answer["error"].as_str().unwrap().contains("control.admin_token"), "{answer}");
    // Reads need no token.
    let tenants = get_json(control, "/v1/tenants");
    let ids: Vec<&str> = tenants["tenants"].as_array().unwrap().iter().map(|t| t["id"].as_str().unwrap()).collect();
    assert_eq!(ids, ["acme", "globex"]);
    assert_eq!(policy_version(control, "acme").0, 1);
    engine.shutdown();
}

#[test]
fn views_and_metrics_reflect_the_desk() {
    // An A/B experiment from the configuration file's document.
    let mut desk = desk(StrategySpec::LeastLoad);
    desk.policy.experiment = vec![
        VariantConfig { group: "a".into(), weight: 1, strategy: StrategySpec::LeastLoad },
        VariantConfig { group: "b".into(), weight: 1, strategy: wrr(1, 1) },
    ];
    let engine = engine(3, desk, ADMIN);
    let (data, control) = (engine.data_addr(), engine.control_addr());
    let mut sup = Client::connect(data, "acme", "supervisor", "sup-1");
    let mut gateway = Client::connect(data, "acme", "gateway", "gw-1");
    let mut ann = Client::connect(data, "acme", "agent", "ann");
    ann.request_ok(&status("ann", AgentPresence::Online, 1));
    let mut bob = Client::connect(data, "acme", "agent", "bob");
    bob.request_ok(&status("bob", AgentPresence::Away, 3));

    // Ann takes one conversation; the other five wait (bob is away).
    gateway.request_ok(&open("conv-0", "cus-0"));
    let offered = sup.event("conv-0", Kind::Offered);
    assert_eq!(offered.agent, "ann");
    ann.request_ok(&accept("conv-0", "ann"));
    sup.event("conv-0", Kind::Assigned);
    let mut groups = vec![offered.group.to_string()];
    for n in 1..=5 {
        let session = format!("conv-{n}");
        gateway.request_ok(&open(&session, &format!("cus-{n}")));
        groups.push(sup.event(&session, Kind::Queued).group.to_string());
    }
    // Not synchronisation (the events above say the desk has them): time for the queued
    // conversations to have waited, which the queues view must report (>= 20 ms below).
    std::thread::sleep(std::time::Duration::from_millis(20));

    let agents = get_json(control, "/v1/tenants/acme/agents");
    assert_eq!(agents["total"], 2);
    let ann_view = agents["agents"].as_array().unwrap().iter().find(|a| a["id"] == "ann").unwrap().clone();
    assert_eq!((ann_view["presence"].as_str(), ann_view["capacity"].as_u64(), ann_view["load"].as_u64()), (Some("online"), Some(1), Some(1)), "{agents}");
    let bob_view = agents["agents"].as_array().unwrap().iter().find(|a| a["id"] == "bob").unwrap().clone();
    assert_eq!((bob_view["presence"].as_str(), bob_view["available"].as_bool()), (Some("away"), Some(false)));
    // Paging: one at a time, with the cursor.
    let first = get_json(control, "/v1/tenants/acme/agents?limit=1");
    assert_eq!(first["agents"].as_array().unwrap().len(), 1);
    let cursor = first["next_cursor"].as_u64().expect("a next page");
    let second = get_json(control, &format!("/v1/tenants/acme/agents?limit=1&cursor={cursor}"));
    assert_eq!(second["agents"].as_array().unwrap().len(), 1);
    assert_ne!(first["agents"][0]["id"], second["agents"][0]["id"]);
    assert!(second.get("next_cursor").is_none(), "{second}");

    let queues = get_json(control, "/v1/tenants/acme/queues");
    let default = &queues["queues"][0];
    assert_eq!((default["name"].as_str(), default["length"].as_u64()), (Some("default"), Some(5)), "{queues}");
    assert!(default["oldest_wait_ms"].as_u64().unwrap() >= 20, "{queues}");

    let conversations = get_json(control, "/v1/tenants/acme/conversations");
    assert_eq!((conversations["open"].as_u64(), conversations["queued"].as_u64(), conversations["active"].as_u64()), (Some(6), Some(5), Some(1)), "{conversations}");

    let view = get_json(control, "/v1/tenants/acme/groups");
    let opened = |group: &str| view["groups"].as_array().unwrap().iter().find(|g| g["group"] == group).map_or(0, |g| g["opened"].as_u64().unwrap());
    for group in ["a", "b"] {
        assert_eq!(opened(group), groups.iter().filter(|g| *g == group).count() as u64, "group {group}: {view}");
    }
    assert_eq!(opened("a") + opened("b"), 6);

    let (status_code, metrics) = common::http_get(control, "/metrics");
    assert_eq!(status_code, 200);
    for family in [
        "switchboard_desk_agents{",
        "switchboard_desk_queue_length{",
        "switchboard_desk_queue_oldest_wait_ms{",
        "switchboard_desk_conversations{",
        "switchboard_desk_group_conversations_total{",
        "switchboard_desk_requests_total{",
        "switchboard_desk_refusals_total{",
        "switchboard_desk_offers_total{",
        "switchboard_desk_policy_version{",
    ] {
        assert!(metrics.contains(family), "/metrics lacks {family}:\n{metrics}");
    }
    assert!(metrics.contains(r#"switchboard_desk_agents{tenant="acme",presence="online"} 1"#), "{metrics}");
    assert!(metrics.contains(r#"switchboard_desk_agents{tenant="acme",presence="away"} 1"#), "{metrics}");
    assert!(metrics.contains(r#"switchboard_desk_queue_length{tenant="acme",queue="default"} 5"#), "{metrics}");
    assert!(metrics.contains(r#"switchboard_desk_conversations{tenant="acme",state="queued"} 5"#), "{metrics}");
    assert!(common::metric_sum(&metrics, "switchboard_desk_group_conversations_total") >= 6);
    let opened_metric: u64 = ["a", "b"]
        .iter()
        .map(|g| common::metric_sum(&metrics.lines().filter(|l| l.contains(&format!("group=\"{g}\",outcome=\"opened\""))).collect::<Vec<_>>().join("\n"), "switchboard_desk_group_conversations_total"))
        .sum();
    assert_eq!(opened_metric, 6);
    assert!(common::metric_sum(&metrics, "switchboard_desk_requests_total") >= 8, "opens and statuses are counted");
    engine.shutdown();
}

#[test]
fn open_mode_serves_the_default_tenant() {
    let engine = common::start(common::test_config(2));
    let control = engine.control_addr();
    let tenants = get_json(control, "/v1/tenants");
    assert_eq!(tenants["tenants"][0]["id"], "default", "{tenants}");
    let (version, policy) = policy_version(control, "default");
    assert_eq!((version, policy["policy"]["strategy"].as_str()), (1, Some("least-load")), "{policy}");
    assert_eq!(get_json(control, "/v1/tenants/default/conversations")["open"], 0);
    assert_eq!(http(control, "GET", "/v1/tenants/acme/policy", None, None).0, 404, "no other tenant in open mode");
    let (_, metrics) = common::http_get(control, "/metrics");
    assert!(metrics.contains(r#"switchboard_desk_policy_version{tenant="default"} 1"#), "{metrics}");
    engine.shutdown();
}
