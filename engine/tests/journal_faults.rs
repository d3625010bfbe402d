//! Storage faults under the running engine: a full device and a failed fdatasync.
//!
//! The faults are process-wide switches in the journal's direct-I/O backend
//! (`journal::dma::faults`), so this file holds one test that runs the scenarios in order.

mod common;

use std::time::Instant;

use common::{Raw, TempDir};
use switchboard::config::DurabilityMode;
use switchboard::journal::dma::faults;
use switchboard_protocol::{Durability, ErrorCode, Frame, ResumeFrom};

/// PUBLISH and its answer: the PUBACK's seq, or the ERROR's code and message.
fn try_publish(raw: &mut Raw, session: &str, payload: &[u8]) -> Result<u64, (ErrorCode, String)> {
    raw.send(&Raw::publish_frame(session, "customer", 0, payload));
    match raw.recv().frame {
        Frame::PubAck(ack) => {
            assert_eq!(ack.durability, Durability::Sync);
            Ok(ack.seq)
        }
        Frame::Error(error) => Err((ErrorCode::from_u16(error.code), error.message.to_string())),
        other => panic!("expected PUBACK or ERROR, got {other:?}"),
    }
}

fn payloads(addr: std::net::SocketAddr, session: &str) -> Vec<(u64, Vec<u8>)> {
    let mut raw = Raw::handshake(addr);
    let subscribed = raw.subscribe(session, ResumeFrom::Earliest);
    (subscribed.replay_from_seq..=subscribed.head_seq)
        .map(|_| {
            let deliver = raw.deliver();
            (deliver.seq, deliver.payload.to_vec())
        })
        .collect()
}

#[test]
fn a_full_device_and_a_failed_fdatasync_refuse_publishes_and_lose_nothing_acknowledged() {
    let dir = TempDir::new("faults");
    let mut config = common::durable_config(1, dir.path(), DurabilityMode::Sync);
    config.journal.maintenance_interval_ms = 20;
    let engine = common::start(config.clone());
    let (addr, control) = (engine.data_addr(), engine.control_addr());
    let mut raw = Raw::handshake(addr);
    for n in 1..=5_u64 {
        assert_eq!(try_publish(&mut raw, "conv", format!("m{n}").as_bytes()), Ok(n));
    }

    // Full device: a clear ERROR, no seq, /healthz says why; the connection carries on.
    faults::set_no_space(true);
    let (code, message) = try_publish(&mut raw, "conv", b"lost").unwrap_err();
    assert_eq!(code, ErrorCode::Unavailable);
    assert!(message.contains("device full"), "{message}");
    let (status, body) = common::http_get(control, "/healthz");
    assert_eq!(status, 503);
    assert!(body.contains("device full"), "{body}");
    // Space comes back; the maintenance pass resumes the journal. Retry until accepted, as a
    // client would; the refused message's seq is given to the next one.
    faults::set_no_space(false);
    let deadline = Instant::now() + common::EXPECT_TIMEOUT;
    let seq = loop {
        match try_publish(&mut raw, "conv", b"m6") {
            Ok(seq) => break seq,
            Err((ErrorCode::Unavailable, _)) if Instant::now() < deadline => {}
            Err(other) => panic!("{other:?}"),
        }
    };
    assert_eq!(seq, 6);
    assert_eq!(common::http_get(control, "/healthz").0, 200);

    // Failed fdatasync: fatal for the journal; publishes refused, /healthz 503, metrics say so.
    faults::fail_next_fdatasync();
    let (code, message) = try_publish(&mut raw, "conv", b"unsynced").unwrap_err();
    assert_eq!(code, ErrorCode::Unavailable);
    assert!(message.contains("journal failed"), "{message}");
    let (code, _) = try_publish(&mut raw, "conv", b"after failure").unwrap_err();
    assert_eq!(code, ErrorCode::Unavailable);
    let (status, body) = common::http_get(control, "/healthz");
    assert_eq!(status, 503);
    assert!(body.contains("journal failed"), "{body}");
    let metrics = common::http_get(control, "/metrics").1;
    assert_eq!(common::metric_sum(&metrics, "switchboard_journal_healthy"), 0);
    assert!(common::metric_sum(&metrics, "switchboard_journal_refusals_total") >= 3);
    // Subscribers see exactly what was acknowledged.
    let expected: Vec<(u64, Vec<u8>)> = (1..=6).map(|n| (n, format!("m{n}").into_bytes())).collect();
    assert_eq!(payloads(addr, "conv"), expected);
    drop(raw);
    engine.shutdown();

    // A restart reopens the journal: everything acknowledged is back, in order. The frame
    // whose fdatasync failed may be back too (it was written; never acknowledged).
    let engine = common::start(config);
    let stored = payloads(engine.data_addr(), "conv");
    assert_eq!(stored[..6], expected[..]);
    assert!(stored.len() <= 7 && stored.get(6).is_none_or(|m| m == &(7, b"unsynced".to_vec())), "{stored:?}");
    let mut raw = Raw::handshake(engine.data_addr());
    assert_eq!(try_publish(&mut raw, "conv", b"healthy again"), Ok(stored.len() as u64 + 1));
    assert_eq!(common::http_get(engine.control_addr(), "/healthz").0, 200);
    engine.shutdown();
}
