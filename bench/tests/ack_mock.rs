//! The acknowledgement generator against the in-process mock: every fault it injects
//! (unanswered, doubly answered and refused publishes) is counted exactly, and a clean mock
//! gives a clean run in both modes.

use std::sync::Arc;
use switchboard_bench::ack::mock::{AckFaults, MockAck};
use switchboard_bench::ack::AckBackend;
use switchboard_bench::ackrun::{run, AckSettings};

fn settings(max: bool) -> AckSettings {
    AckSettings {
        publishers: 3,
        sessions: 30,
        rate: if max { None } else { Some(3_000.0) },
        max,
        window: 4,
        duration_s: 0.3,
        warmup_s: 0.1,
        drain_s: 2.0,
        durability_requested: Some("sync".into()),
        ..AckSettings::default()
    }
}

#[test]
#[allow(clippy::many_single_char_names)]
fn injected_faults_are_counted_exactly() {
    let faults = AckFaults { drop_every: 97, dup_every: 31, err_every: 53 };
    let backend: Arc<dyn AckBackend> = Arc::new(MockAck { faults, claim: "sync" });
    let r = run(&settings(false), &backend).expect("run").report;
    let c = &r.counts;
    assert!(r.errors.is_empty(), "{:?}", r.errors);
    assert_eq!(r.sent_per_connection.iter().sum::<u64>(), c.sent);
    assert!(c.sent > 500, "{c:?}");
    let (mut drop, mut dup, mut err) = (0, 0, 0);
    for &n in &r.sent_per_connection {
        let (d, u, e) = faults.expected(n);
        drop += d;
        dup += u;
        err += e;
    }
    assert!(drop > 0 && dup > 0 && err > 0);
    assert_eq!((c.lost, c.unexpected, c.errors), (drop, dup, err), "{c:?}");
    assert_eq!(c.acked, c.sent - drop - err);
    assert_eq!(c.claims.get("sync"), Some(&c.acked));
    assert_eq!(c.error_texts.len(), switchboard_bench::ack::ERROR_TEXTS_MAX);
    assert!(!c.clean());
    assert!(r.latency_us.count > 0 && r.latency_us.count <= c.acked);
    assert!(r.table().contains("lost"));
}

#[test]
fn clean_mock_is_clean_paced_and_max() {
    for max in [false, true] {
        let backend: Arc<dyn AckBackend> = Arc::new(MockAck { faults: AckFaults::default(), claim: "memory" });
        let r = run(&settings(max), &backend).expect("run").report;
        assert!(r.errors.is_empty(), "{:?}", r.errors);
        assert!(r.counts.clean(), "max={max}: {:?}", r.counts);
        assert!(r.counts.sent > 100, "max={max}: {:?}", r.counts);
        assert_eq!(r.counts.claim_summary(), "memory");
        assert!(r.acks_per_s > 0.0 && r.latency_us.count > 0);
        assert_eq!(r.target_publishes_per_s.is_none(), max);
    }
}

#[test]
fn settings_are_checked() {
    let mut st = settings(false);
    st.max = true;
    assert!(st.validate().is_err(), "both --rate and --max");
    let mut st = settings(true);
    st.window = 0;
    assert!(st.validate().is_err());
    let mut st = settings(false);
    st.publishers = 31;
    assert!(st.validate().is_err(), "more publishers than sessions");
    assert!(settings(true).validate().is_ok());
}
