//! Tenants and JWT authentication: refused tokens get ERROR(AuthFailed) and a close, key
//! rotation by `kid` works, a token expiring on a live connection gets GOAWAY(auth expired),
//! and two tenants using the same session id never see each other's messages.

mod common;

use common::Raw;
use jsonwebtoken::{Algorithm, EncodingKey, Header};
use switchboard::config::{TenantConfig, TenantKeyConfig};
use switchboard_protocol::{ErrorCode, Frame, GoAwayReason, Hello, ResumeFrom, Text};

const ACME_OLD: &str = "acme-old-secret-0123456789abcdef0123";
const ACME_NEW: &str = "acme-new-secret-0123456789abcdef0123";
const GLOBEX: &str = "globex-secret-0123456789abcdef012345";

#[derive(serde::Serialize)]
struct Claims<'a> {
    tenant: &'a str,
    role: &'a str,
    sub: &'a str,
    exp: u64,
}

fn now_s() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs()
}

fn token(kid: &str, secret: &str, tenant: &str, exp: u64) -> String {
    let header = Header { kid: Some(kid.into()), ..Header::new(Algorithm::HS256) };
    jsonwebtoken::encode(&header, &Claims { tenant, role: "gateway", sub: "gw-1", exp }, &EncodingKey::from_secret(secret.as_bytes())).unwrap()
}

fn engine(shards: usize) -> switchboard::EngineHandle {
    common::start(config(shards))
}

fn config(shards: usize) -> switchboard::Config {
    let mut config = common::test_config(shards);
    let key = |kid: &str, secret: &str| TenantKeyConfig { kid: kid.into(), secret: secret.into() };
    config.tenants = vec![
        TenantConfig { id: "acme".into(), keys: vec![key("acme-1", ACME_OLD), key("acme-2", ACME_NEW)], durability: None, desk: None, rate_limits: None, sessions_per_shard_max: None },
        TenantConfig { id: "globex".into(), keys: vec![key("globex-1", GLOBEX)], durability: None, desk: None, rate_limits: None, sessions_per_shard_max: None },
    ];
    config.auth.leeway_s = 0;
    config
}

/// Sends HELLO with `token`; returns the WELCOME's tenant, or the ERROR after which the
/// connection closed.
fn hello(raw: &mut Raw, token: &str) -> Result<String, switchboard_protocol::ErrorFrame> {
    raw.send(&Frame::Hello(Hello { version_max: 1, version_min: 1, features: 0, client_name: "t".into(), token: Text::from(token) }));
    let frames = raw.recv_until_closed_or_first();
    match frames {
        Frame::Welcome(welcome) => Ok(welcome.tenant.to_string()),
        Frame::Error(error) => {
            assert!(raw.recv_until_closed().is_empty(), "the connection closes after ERROR");
            Err(error)
        }
        other => panic!("unexpected {other:?}"),
    }
}

#[test]
fn bad_tokens_are_refused_and_good_ones_name_their_tenant() {
    let engine = engine(2);
    let addr = engine.data_addr();
    let later = now_s() + 3600;
    let refused = [
        ("no token", String::new()),
        ("not a JWT", "garbage".to_owned()),
        ("unknown kid", token("nope", ACME_OLD, "acme", later)),
        ("wrong secret", token("acme-1", GLOBEX, "acme", later)),
        ("expired", token("acme-1", ACME_OLD, "acme", now_s() - 60)),
        ("tenant claim of another tenant", token("acme-1", ACME_OLD, "globex", later)),
    ];
    for (what, bad) in refused {
        let mut raw = Raw::connect(addr);
        let error = hello(&mut raw, &bad).expect_err(what);
        assert_eq!(ErrorCode::from_u16(error.code), ErrorCode::AuthFailed, "{what}: {}", error.message);
    }
    // Both keys of a tenant work during a rotation.
    for kid_secret in [("acme-1", ACME_OLD), ("acme-2", ACME_NEW)] {
        let mut raw = Raw::connect(addr);
        assert_eq!(hello(&mut raw, &token(kid_secret.0, kid_secret.1, "acme", later)).unwrap(), "acme");
    }
    let mut raw = Raw::connect(addr);
    assert_eq!(hello(&mut raw, &token("globex-1", GLOBEX, "globex", later)).unwrap(), "globex");
    engine.shutdown();
}

#[test]
fn tenants_never_see_each_others_sessions() {
    for shards in [1, 3] {
        let engine = engine(shards);
        let addr = engine.data_addr();
        let later = now_s() + 3600;
        let connect = |kid: &str, secret: &str, tenant: &str| {
            let mut raw = Raw::connect(addr);
            hello(&mut raw, &token(kid, secret, tenant, later)).unwrap();
            raw
        };
        let mut acme_sub = connect("acme-1", ACME_OLD, "acme");
        let mut globex_sub = connect("globex-1", GLOBEX, "globex");
        acme_sub.subscribe("conv-1", ResumeFrom::Live);
        globex_sub.subscribe("conv-1", ResumeFrom::Live);
        let mut acme_pub = connect("acme-2", ACME_NEW, "acme");
        let mut globex_pub = connect("globex-1", GLOBEX, "globex");
        assert_eq!(acme_pub.publish("conv-1", 0, b"acme secret").seq, 1);
        assert_eq!(globex_pub.publish("conv-1", 0, b"globex secret").seq, 1, "separate sessions, separate seqs");
        assert_eq!(&acme_sub.deliver().payload[..], b"acme secret");
        assert_eq!(&globex_sub.deliver().payload[..], b"globex secret");
        // Neither got the other's message: the next frame each sees is its own tenant's PONG.
        for raw in [&mut acme_sub, &mut globex_sub] {
            let correlation = raw.send(&Frame::Ping(switchboard_protocol::Ping { nonce: 1 }));
            let next = raw.recv();
            assert_eq!((next.correlation, matches!(next.frame, Frame::Pong(_))), (correlation, true), "{:?}", next.frame);
        }
        engine.shutdown();
    }
}

#[test]
fn a_token_expiring_on_a_live_connection_gets_goaway_auth_expired() {
    let engine = engine(1);
    let mut raw = Raw::connect(engine.data_addr());
    hello(&mut raw, &token("acme-1", ACME_OLD, "acme", now_s() + 1)).unwrap();
    let frames = raw.recv_until_closed();
    assert!(matches!(frames.last(), Some(Frame::GoAway(g)) if g.reason == GoAwayReason::AuthExpired), "{frames:?}");
    engine.shutdown();
}

/// A validly signed token that "never" expires (`exp` = u64::MAX) is welcomed and the engine
/// carries on: arming an expiry timer that far out used to panic, aborting every tenant.
#[test]
fn a_token_that_never_expires_is_welcomed_and_the_engine_carries_on() {
    let engine = engine(2);
    let mut forever = Raw::connect(engine.data_addr());
    assert_eq!(hello(&mut forever, &token("acme-1", ACME_OLD, "acme", u64::MAX)).unwrap(), "acme");
    forever.subscribe("conv-forever", ResumeFrom::Live);
    let mut other = Raw::connect(engine.data_addr());
    assert_eq!(hello(&mut other, &token("globex-1", GLOBEX, "globex", now_s() + 3600)).unwrap(), "globex");
    engine.shutdown();
}

/// A tenant with a session quota of its own gets ERROR(LimitExceeded) for one session more on
/// a shard, by SUBSCRIBE or PUBLISH; its existing sessions and the other tenant carry on.
#[test]
fn a_tenant_quota_refuses_its_new_sessions_and_no_one_else_s() {
    let mut config = config(1);
    config.tenants[0].sessions_per_shard_max = Some(3);
    let engine = common::start(config);
    let addr = engine.data_addr();
    let later = now_s() + 3600;
    let mut acme = Raw::connect(addr);
    hello(&mut acme, &token("acme-1", ACME_OLD, "acme", later)).unwrap();
    for i in 0..3 {
        acme.subscribe(&format!("conv-{i}"), ResumeFrom::Live);
    }
    acme.refused(&Frame::Subscribe(switchboard_protocol::Subscribe { session: "conv-3".into(), from: ResumeFrom::Live }), ErrorCode::LimitExceeded);
    acme.refused(&Raw::publish_frame("conv-4", "gw-1", 0, b"no room"), ErrorCode::LimitExceeded);
    let mut acme_pub = Raw::connect(addr);
    hello(&mut acme_pub, &token("acme-1", ACME_OLD, "acme", later)).unwrap();
    assert_eq!(acme_pub.publish("conv-1", 0, b"existing sessions work").seq, 1);
    assert_eq!(acme.deliver().seq, 1);
    let mut globex = Raw::connect(addr);
    hello(&mut globex, &token("globex-1", GLOBEX, "globex", later)).unwrap();
    for i in 0..5 {
        globex.subscribe(&format!("conv-{i}"), ResumeFrom::Live);
    }
    engine.shutdown();
}

/// A session dropped by the idle sweep gives its place in the tenant's quota back.
#[test]
fn an_idle_session_gives_its_place_in_the_tenant_quota_back() {
    let mut config = config(1);
    config.tenants[0].sessions_per_shard_max = Some(1);
    config.limits.session_idle_ms = 100;
    let engine = common::start(config);
    let mut acme = Raw::connect(engine.data_addr());
    hello(&mut acme, &token("acme-1", ACME_OLD, "acme", now_s() + 3600)).unwrap();
    assert_eq!(acme.publish("first", 0, b"takes the only place").seq, 1);
    acme.refused(&Raw::publish_frame("second", "gw-1", 0, b"no room yet"), ErrorCode::LimitExceeded);
    common::wait_for_metric(engine.control_addr(), "switchboard_sessions_dropped_idle_total", "the idle session was never dropped");
    assert_eq!(acme.publish("second", 0, b"room again").seq, 1);
    engine.shutdown();
}
