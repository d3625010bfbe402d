//! The whole generator against the in-process mock backend: a mock that drops, duplicates and
//! reorders on purpose must be caught with exactly the counts it injected, and a clean mock
//! must report no anomaly.

use std::sync::atomic::Ordering;
use std::sync::Arc;
use switchboard_bench::backend::mock::{Faults, Mock};
use switchboard_bench::backend::Backend;
use switchboard_bench::run::{run, Settings};

fn settings(faults: Faults) -> Settings {
    Settings {
        backend: "mock".into(),
        addr: "mock".into(),
        sessions: 40,
        subscribers: 2,
        gateways: 3,
        publishers: 2,
        payload: 64,
        rate: Some(20_000.0),
        max: false,
        duration_s: 1.0,
        warmup_s: 0.2,
        faults: Some(faults),
        ..Settings::default()
    }
}

#[test]
fn injected_faults_are_counted_exactly() {
    let faults = Faults { drop_every: 101, dup_every: 211, reorder_every: 307 };
    let mock = Mock::new(faults);
    let stats = mock.stats();
    let backend: Arc<dyn Backend> = Arc::new(mock);
    let out = run(&settings(faults), &backend).expect("run");
    let r = &out.report;
    assert!(r.errors.is_empty(), "{:?}", r.errors);
    let a = r.accounting;
    let dropped = stats.dropped.load(Ordering::Relaxed);
    let duplicated = stats.duplicated.load(Ordering::Relaxed);
    let reordered = stats.reordered.load(Ordering::Relaxed);
    println!("{}", r.table());
    println!("mock injected: dropped {dropped} duplicated {duplicated} reordered {reordered}");
    assert!(dropped > 50 && duplicated > 30 && reordered > 20, "faults were injected");
    assert_eq!(a.lost, dropped);
    assert_eq!(a.duplicated, duplicated);
    assert_eq!(a.reordered, reordered);
    assert_eq!(a.unexpected, 0);
    assert_eq!(a.expected, r.publishes_total * 2);
    assert_eq!(a.received, stats.sent.load(Ordering::Relaxed));
    assert!(!a.clean());
}

#[test]
fn each_fault_alone() {
    for (faults, which) in [
        (Faults { drop_every: 50, ..Faults::default() }, "lost"),
        (Faults { dup_every: 50, ..Faults::default() }, "duplicated"),
        (Faults { reorder_every: 50, ..Faults::default() }, "reordered"),
    ] {
        let mock = Mock::new(faults);
        let stats = mock.stats();
        let backend: Arc<dyn Backend> = Arc::new(mock);
        let mut st = settings(faults);
        st.duration_s = 0.5;
        let a = run(&st, &backend).expect("run").report.accounting;
        let (got, want) = match which {
            "lost" => (a.lost, stats.dropped.load(Ordering::Relaxed)),
            "duplicated" => (a.duplicated, stats.duplicated.load(Ordering::Relaxed)),
            _ => (a.reordered, stats.reordered.load(Ordering::Relaxed)),
        };
        assert!(want > 0, "{which}: nothing injected");
        assert_eq!(got, want, "{which}");
        let others = a.lost + a.duplicated + a.reordered - got;
        assert_eq!(others, 0, "{which}: only that fault is reported: {a:?}");
    }
}

#[test]
fn clean_mock_reports_no_anomaly() {
    let backend: Arc<dyn Backend> = Arc::new(Mock::new(Faults::default()));
    let out = run(&settings(Faults::default()), &backend).expect("run");
    let r = &out.report;
    println!("{}", r.table());
    assert!(r.errors.is_empty(), "{:?}", r.errors);
    assert!(r.accounting.clean(), "{:?}", r.accounting);
    assert_eq!(r.accounting.received, r.accounting.expected);
    assert!(r.accounting.expected > 20_000);
    // Paced 20 000/s over 1 s measured, 2 subscribers: about 40 000 deliveries/s.
    assert!((r.publishes_per_s - 20_000.0).abs() < 2_000.0, "{}", r.publishes_per_s);
    assert!((r.deliveries_per_s - 40_000.0).abs() < 5_000.0, "{}", r.deliveries_per_s);
    assert!(r.latency_us.count > 30_000);
    assert_eq!(out.latency.count(), r.latency_us.count);
    // The JSON carries every figure and the settings, and reads back.
    let j = serde_json::to_string(r).unwrap();
    let back: switchboard_bench::report::Report = serde_json::from_str(&j).unwrap();
    assert_eq!(back.accounting, r.accounting);
    assert_eq!(back.settings.sessions, 40);
}

#[test]
fn max_mode_is_bounded_and_clean() {
    let backend: Arc<dyn Backend> = Arc::new(Mock::new(Faults::default()));
    let mut st = settings(Faults::default());
    st.rate = None;
    st.max = true;
    st.window = 256;
    st.duration_s = 0.5;
    let t = std::time::Instant::now();
    let r = run(&st, &backend).expect("run").report;
    assert!(t.elapsed().as_secs_f64() < 10.0);
    assert!(r.errors.is_empty(), "{:?}", r.errors);
    assert!(r.accounting.clean(), "{:?}", r.accounting);
    assert!(r.publishes_total > 1000);
    assert_eq!(r.generator.window_stalls, 0);
}

#[test]
fn max_mode_survives_losses() {
    // Dropped deliveries never complete the window; the publisher must not hang on them.
    let faults = Faults { drop_every: 3, ..Faults::default() };
    let mock = Mock::new(faults);
    let stats = mock.stats();
    let backend: Arc<dyn Backend> = Arc::new(mock);
    let mut st = settings(faults);
    st.rate = None;
    st.max = true;
    st.window = 64;
    st.duration_s = 0.6;
    let r = run(&st, &backend).expect("run").report;
    assert_eq!(r.accounting.lost, stats.dropped.load(Ordering::Relaxed));
    assert!(r.publishes_total > 64 * 2);
}

#[test]
fn bad_settings_are_refused_with_a_reason() {
    let backend: Arc<dyn Backend> = Arc::new(Mock::new(Faults::default()));
    let mut st = settings(Faults::default());
    st.payload = 8;
    assert!(run(&st, &backend).err().unwrap().contains("too small"));
    let mut st = settings(Faults::default());
    st.subscribers = 4;
    assert!(run(&st, &backend).err().unwrap().contains("--gateways"));
    let mut st = settings(Faults::default());
    st.max = true;
    assert!(run(&st, &backend).err().unwrap().contains("not both"));
}

#[test]
fn subscribers_of_a_session_are_on_distinct_gateways() {
    let mut st = settings(Faults::default());
    st.sessions = 1000;
    st.subscribers = 3;
    st.gateways = 8;
    let layout = st.gateway_sessions();
    let mut seen = vec![Vec::new(); 1000];
    for (g, ss) in layout.iter().enumerate() {
        for &s in ss {
            seen[s as usize].push(g);
        }
    }
    for (s, gs) in seen.iter().enumerate() {
        let mut d = gs.clone();
        d.dedup();
        assert_eq!(d.len(), 3, "session {s}: {gs:?}");
    }
    let sizes: Vec<usize> = layout.iter().map(Vec::len).collect();
    assert!(sizes.iter().max().unwrap() - sizes.iter().min().unwrap() <= 1, "{sizes:?}");
}
