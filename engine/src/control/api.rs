//! The control port's JSON API on tenants' desks (reference: the README's "Control API").
//!
//! - `GET /v1/tenants`: the configured tenants and their desk shards.
//! - `GET /v1/tenants/{id}/policy`: the policy in force, its version, and the version every
//!   shard has applied.
//! - `PUT /v1/tenants/{id}/policy` with `{"expected_version"?: n, "policy": {...}}`: replaces
//!   the policy (admin bearer token). The document is the configuration file's `[desk]` policy
//!   keys (`config::DeskPolicyConfig`); unknown fields are refused.
//! - `GET /v1/tenants/{id}/agents?limit=&cursor=`, `/queues`, `/conversations`, `/groups`:
//!   read-only views.
//!
//! A document is checked in full here (`DeskPolicyConfig::validate`, the desk's own checks)
//! before anything is sent to a shard; the desk shard then checks the version and what only it
//! knows (a removed queue must be empty), and applies it or changes nothing. It owns the HTTP
//! side only: shards are reached through `control::ask`, with deadlines, and nothing here
//! panics on what a client sends.

use std::io::Read;

use serde::Deserialize;
use serde_json::{json, Value};
use switchboard_protocol::Text;

use super::{ask, ask_all, ControlState, NoAnswer, Reply, ShardRequest, SHARD_ANSWER_TIMEOUT_MS};
use crate::config::{DeskConfig, DeskPolicyConfig};
use crate::mesh::tenant_shard;
use crate::shard::{DeskAnswer, DeskQuery, PolicyRefusal};

/// Largest request body, in bytes (a policy with weights for every one of 10 000 agents fits).
pub const BODY_BYTES_MAX: usize = 1 << 20;

const JSON: &str = "application/json";

fn reply(status: u16, body: &Value) -> Reply {
    Reply { status, content_type: JSON, body: body.to_string() + "\n", header: None }
}

fn error(status: u16, message: impl Into<String>) -> Reply {
    reply(status, &json!({ "error": message.into() }))
}

/// The body of `PUT /v1/tenants/{id}/policy`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PutPolicy {
    /// Refuse (409) unless this is the version in force.
    #[serde(default)]
    expected_version: Option<u64>,
    policy: StrictPolicy,
}

/// A [`DeskPolicyConfig`] that refuses unknown fields (the type itself cannot, since the
/// configuration's `[desk]` section flattens it next to the desk's limits).
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct StrictPolicy {
    #[serde(flatten)]
    policy: DeskPolicyConfig,
}

/// Handles a request under `/v1/`.
pub(super) fn handle(state: &ControlState, request: &mut tiny_http::Request) -> Reply {
    let url = request.url().to_owned();
    let (path, query) = url.split_once('?').unwrap_or((url.as_str(), ""));
    let segments: Vec<&str> = path.trim_end_matches('/').split('/').skip(1).collect();
    let method = request.method().clone();
    match segments.as_slice() {
        ["v1", "tenants"] => match method {
            tiny_http::Method::Get => tenants(state),
            _ => method_not_allowed("GET"),
        },
        ["v1", "tenants", id, resource] => {
            let Some(tenant) = percent_decode(id) else { return error(400, "the tenant id is not valid percent-encoded UTF-8") };
            let Some(desk) = desk_config(state, &tenant) else { return error(404, format!("no tenant `{tenant}` in the configuration")) };
            let tenant = Text::from(tenant);
            match (*resource, method) {
                ("policy", tiny_http::Method::Get) => get_policy(state, &tenant),
                ("policy", tiny_http::Method::Put) => put_policy(state, request, &tenant, desk),
                ("policy", _) => method_not_allowed("GET, PUT"),
                ("agents", tiny_http::Method::Get) => match agents_query(state, query) {
                    Ok(query) => view(state, &tenant, query),
                    Err(reason) => error(400, reason),
                },
                ("queues", tiny_http::Method::Get) => view(state, &tenant, DeskQuery::Queues),
                ("conversations", tiny_http::Method::Get) => view(state, &tenant, DeskQuery::Conversations),
                ("groups", tiny_http::Method::Get) => view(state, &tenant, DeskQuery::Groups),
                ("agents" | "queues" | "conversations" | "groups", _) => method_not_allowed("GET"),
                _ => error(404, "unknown resource; a tenant has policy, agents, queues, conversations, groups"),
            }
        }
        _ => error(404, "not found; try /v1/tenants"),
    }
}

fn method_not_allowed(allow: &'static str) -> Reply {
    Reply { header: Some(("Allow", allow)), ..error(405, format!("method not allowed; allowed: {allow}")) }
}

/// The tenants the API knows: the configured ones, or `default` in open mode.
fn tenant_ids(state: &ControlState) -> Vec<String> {
    if state.config.tenants.is_empty() {
        vec!["default".to_owned()]
    } else {
        state.config.tenants.iter().map(|t| t.id.clone()).collect()
    }
}

/// The desk configuration `tenant` started with; `None` for an unknown tenant.
fn desk_config<'a>(state: &'a ControlState, tenant: &str) -> Option<&'a DeskConfig> {
    if state.config.tenants.is_empty() {
        return (tenant == "default").then_some(&state.config.desk);
    }
    let own = state.config.tenants.iter().find(|t| t.id == tenant)?;
    Some(own.desk.as_ref().unwrap_or(&state.config.desk))
}

fn desk_shard(state: &ControlState, tenant: &Text) -> usize {
    tenant_shard(tenant, state.shard_count)
}

fn tenants(state: &ControlState) -> Reply {
    let tenants: Vec<Value> =
        tenant_ids(state).into_iter().map(|id| json!({ "id": id, "desk_shard": desk_shard(state, &Text::from(id.as_str())) })).collect();
    reply(200, &json!({ "tenants": tenants }))
}

fn no_answer(shard: usize, why: NoAnswer) -> Reply {
    match why {
        NoAnswer::NotSent => error(503, format!("shard {shard} is not taking requests (busy or stopping); nothing was changed")),
        NoAnswer::Late => error(504, format!("shard {shard} did not answer within {SHARD_ANSWER_TIMEOUT_MS} ms")),
    }
}

fn query_desk(state: &ControlState, tenant: &Text, query: DeskQuery) -> Result<DeskAnswer, Reply> {
    let shard = desk_shard(state, tenant);
    match ask(state, shard, |reply| ShardRequest::DeskQuery { tenant: tenant.clone(), query, reply }) {
        Ok(Ok(answer)) => Ok(answer),
        Ok(Err(reason)) => Err(error(500, format!("the desk could not answer: {reason}"))),
        Err(why) => Err(no_answer(shard, why)),
    }
}

fn view(state: &ControlState, tenant: &Text, query: DeskQuery) -> Reply {
    match query_desk(state, tenant, query) {
        Ok(answer) => {
            let mut body = serde_json::to_value(&answer).unwrap_or_else(|_| json!({}));
            if let Value::Object(fields) = &mut body {
                fields.insert("tenant".into(), json!(tenant.as_str()));
                fields.insert("desk_shard".into(), json!(desk_shard(state, tenant)));
            }
            reply(200, &body)
        }
        Err(reply) => reply,
    }
}

/// `limit` (1 to `page_items_max`, by default `page_items_max`) and `cursor` (an agent key).
fn agents_query(state: &ControlState, query: &str) -> Result<DeskQuery, String> {
    let page_max = state.config.control.page_items_max;
    let (mut limit, mut cursor) = (page_max, 0u32);
    for pair in query.split('&').filter(|p| !p.is_empty()) {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        match key {
            "limit" => {
                limit = value.parse().map_err(|_| format!("limit must be a number from 1 to {page_max}"))?;
                if limit == 0 {
                    return Err(format!("limit must be a number from 1 to {page_max}"));
                }
                limit = limit.min(page_max);
            }
            "cursor" => cursor = value.parse().map_err(|_| "cursor must be a next_cursor from an earlier page".to_owned())?,
            other => return Err(format!("unknown query parameter `{other}`; agents takes limit and cursor")),
        }
    }
    Ok(DeskQuery::Agents { cursor, limit })
}

fn get_policy(state: &ControlState, tenant: &Text) -> Reply {
    let view = match query_desk(state, tenant, DeskQuery::Policy) {
        Ok(DeskAnswer::Policy(view)) => view,
        Ok(_) => return error(500, "the desk answered another question"),
        Err(reply) => return reply,
    };
    let versions = ask_all(state, |reply| ShardRequest::PolicyVersion { tenant: tenant.clone(), reply });
    // A shard that missed the news of a change (its channel was full) is told again.
    for (shard, applied) in versions.iter().enumerate() {
        if applied.is_some_and(|applied| applied < view.version) {
            let _ = state.shards[shard].try_send(ShardRequest::PolicyApplied { tenant: tenant.clone(), version: view.version });
        }
    }
    let applied_version = versions.iter().copied().collect::<Option<Vec<u64>>>().and_then(|all| all.into_iter().min());
    let shards: Vec<Value> = versions.iter().enumerate().map(|(shard, applied)| json!({ "shard": shard, "applied_version": applied })).collect();
    reply(
        200,
        &json!({
            "tenant": tenant.as_str(),
            "version": view.version,
            "applied_version": applied_version,
            "desk_shard": desk_shard(state, tenant),
            "shards": shards,
            "policy": view.policy,
        }),
    )
}

/// Checks `Authorization: Bearer <control.admin_token>`; `Err` is the reply.
fn authorize(state: &ControlState, request: &tiny_http::Request) -> Result<(), Reply> {
    let token = state.config.control.admin_token.as_bytes();
    if token.is_empty() {
        return Err(error(403, "writes are disabled: set control.admin_token in the configuration to enable them"));
    }
    let unauthorized = |message: &str| Reply { header: Some(("WWW-Authenticate", "Bearer realm=\"switchboard\"")), ..error(401, message) };
    let Some(header) = request.headers().iter().find(|h| h.field.equiv("Authorization")) else {
        return Err(unauthorized("missing Authorization: Bearer <admin token>"));
    };
    let value = header.value.as_str().trim();
    let presented = match value.split_once(' ') {
        Some((scheme, rest)) if scheme.eq_ignore_ascii_case("bearer") => rest.trim().as_bytes(),
        _ => return Err(unauthorized("Authorization must be: Bearer <admin token>")),
    };
    if !constant_time_eq(presented, token) {
        return Err(unauthorized("wrong admin token"));
    }
    Ok(())
}

/// Compares without stopping at the first difference (the length is not secret).
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

fn put_policy(state: &ControlState, request: &mut tiny_http::Request, tenant: &Text, desk: &DeskConfig) -> Reply {
    if let Err(reply) = authorize(state, request) {
        return reply;
    }
    if request.body_length().is_some_and(|length| length > BODY_BYTES_MAX) {
        return error(413, format!("the body is larger than {BODY_BYTES_MAX} bytes"));
    }
    let mut body = Vec::new();
    if let Err(read_error) = request.as_reader().take(BODY_BYTES_MAX as u64 + 1).read_to_end(&mut body) {
        return error(400, format!("cannot read the body: {read_error}"));
    }
    if body.len() > BODY_BYTES_MAX {
        return error(413, format!("the body is larger than {BODY_BYTES_MAX} bytes"));
    }
    let put: PutPolicy = match serde_json::from_slice(&body) {
        Ok(put) => put,
        Err(parse_error) => return error(400, format!("invalid policy document: {parse_error}")),
    };
    let policy = put.policy.policy;
    if let Err(reason) = policy.validate(&desk.limits()) {
        return error(400, format!("invalid policy: {reason}"));
    }
    let shard = desk_shard(state, tenant);
    let change = |reply| ShardRequest::SetPolicy {
        tenant: tenant.clone(),
        expected_version: put.expected_version,
        policy: Box::new(policy.to_policy()),
        reply,
    };
    match ask(state, shard, change) {
        Ok(Ok(version)) => {
            // The other shards hold no desk: they only record the version. Not waited for; a
            // shard that misses it is told again by the next GET of the policy.
            for (other, sender) in state.shards.iter().enumerate().filter(|(other, _)| *other != shard) {
                if sender.try_send(ShardRequest::PolicyApplied { tenant: tenant.clone(), version }).is_err() {
                    tracing::debug!(shard = other, %tenant, version, "policy version not delivered now; the next GET repeats it");
                }
            }
            reply(200, &json!({ "tenant": tenant.as_str(), "version": version, "desk_shard": shard }))
        }
        Ok(Err(PolicyRefusal::Conflict { current })) => reply(
            409,
            &json!({
                "error": format!("version conflict: expected version {}, the policy in force is version {current}", put.expected_version.unwrap_or_default()),
                "version": current,
            }),
        ),
        Ok(Err(PolicyRefusal::Invalid(reason))) => error(400, format!("refused by the desk: {reason}")),
        Err(NoAnswer::Late) => error(
            504,
            format!("shard {shard} did not answer within {SHARD_ANSWER_TIMEOUT_MS} ms; the change may still be applied: GET the policy to see its version"),
        ),
        Err(why) => no_answer(shard, why),
    }
}

/// `%XX` decoding of a path segment; `None` when malformed or not UTF-8.
fn percent_decode(segment: &str) -> Option<String> {
    let bytes = segment.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut index = 0;
    while index < bytes.len() {
        if bytes[index] == b'%' {
            let hex = std::str::from_utf8(bytes.get(index + 1..index + 3)?).ok()?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            index += 3;
        } else {
            out.push(bytes[index]);
            index += 1;
        }
    }
    String::from_utf8(out).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percent_decoding_refuses_what_it_cannot_read() {
        assert_eq!(percent_decode("acme").as_deref(), Some("acme"));
        assert_eq!(percent_decode("a%20b").as_deref(), Some("a b"));
        assert_eq!(percent_decode("%"), None);
        assert_eq!(percent_decode("%zz"), None);
        assert_eq!(percent_decode("%ff"), None, "not UTF-8");
        assert_eq!(percent_decode("%e2%82"), None, "a cut UTF-8 sequence");
    }

    #[test]
    fn tokens_compare_whole() {
        assert!(constant_time_eq(b"0123456789abcdef", b"0123456789abcdef"));
        assert!(!constant_time_eq(b"0123456789abcdef", b"0123456789abcdeX"));
        assert!(!constant_time_eq(b"0123", b"0123456789abcdef"));
    }

    #[test]
    fn the_put_body_refuses_unknown_fields_at_every_level() {
        let ok = r#"{"expected_version": 1, "policy": {"strategy": {"kind": "weighted-round-robin", "weights": {"ann": 5}}, "offer_timeout_ms": 500}}"#;
        let put: PutPolicy = serde_json::from_str(ok).unwrap();
        assert_eq!(put.policy.policy.offer_timeout_ms, 500);
        for bad in [
            r#"{"policy": {}, "extra": 1}"#,
            r#"{"policy": {"stratgy": "least-load"}}"#,
            r#"{"policy": {"strategy": {"kind": "least-load", "weights": {}}}}"#,
            r#"{"policy": {"queues": [{"name": "q", "wait_max": 1}]}}"#,
            r#"{"policy": {"experiment": [{"group": "a", "weight": 1, "color": "red"}]}}"#,
            r#"{"policy": {"strategy": "round-robin"}}"#,
            r#"{"policy": {"offer_timeout_ms": -1}}"#,
            r#"{"expected_version": 1}"#,
        ] {
            assert!(serde_json::from_str::<PutPolicy>(bad).is_err(), "{bad}");
        }
    }
}
