//! The real client crate against the real engine over loopback: ordered delivery, resume
//! after a slow-consumer disconnect with nothing lost or repeated, and an explicit gap when the
//! engine restarts (history is in memory until the journal lands, so the epoch changes).

mod common;

use std::time::Duration;

use switchboard_client::blocking::Client;
use switchboard_client::{ClientOptions, GapCause, Item, ResumeFrom};

fn options(addr: std::net::SocketAddr) -> ClientOptions {
    let mut options = ClientOptions::new(addr.to_string()).client_name("engine-test");
    options.reconnect.initial = Duration::from_millis(10);
    options.reconnect.max = Duration::from_millis(200);
    options
}

fn next_message(subscription: &switchboard_client::blocking::Subscription) -> switchboard_client::Delivery {
    match subscription.recv_timeout(common::EXPECT_TIMEOUT).expect("subscription open") {
        Some(Item::Message(message)) => message,
        other => panic!("expected a message, got {other:?}"),
    }
}

#[test]
fn blocking_client_publishes_and_receives_in_order() {
    for shards in [1, 3] {
        let engine = common::start(common::test_config(shards));
        let client = Client::connect(options(engine.data_addr())).unwrap();
        assert_eq!(client.welcome().tenant.as_str(), "default");
        let subscriptions: Vec<_> = (0..5).map(|i| client.subscribe(format!("conv-{i}"), ResumeFrom::Live).unwrap()).collect();
        let publisher = Client::connect(options(engine.data_addr())).unwrap();
        for round in 1..=20u64 {
            for i in 0..5 {
                let ack = publisher.publish(format!("conv-{i}"), "customer", format!("{i}:{round}")).unwrap();
                assert_eq!(ack.seq, round);
            }
        }
        for (i, subscription) in subscriptions.iter().enumerate() {
            for round in 1..=20u64 {
                let message = next_message(subscription);
                assert_eq!((message.seq, &message.payload[..]), (round, format!("{i}:{round}").as_bytes()));
            }
        }
        drop(subscriptions);
        engine.shutdown();
    }
}

#[test]
fn a_client_that_stops_reading_is_cut_off_then_resumes_without_loss_or_duplicates() {
    let mut config = common::test_config(2);
    config.limits.frame_body_bytes_max = 16 << 10;
    config.limits.payload_bytes_max = 2048;
    config.limits.history_messages_max = 4000;
    config.limits.outbound_bytes_max = 10 << 20;
    config.limits.outbound_frames_max = 256;
    config.limits.slow_consumer_close_ms = 100;
    let engine = common::start(config);

    let mut reader_options = options(engine.data_addr());
    // A small client queue: while the test does not read, the driver stops reading the socket,
    // the engine's outbound queue passes its frame limit and it sends GOAWAY(slow consumer).
    reader_options.receive_queue_messages_max = 16;
    let reader = Client::connect(reader_options).unwrap();
    let subscription = reader.subscribe("busy", ResumeFrom::Live).unwrap();
    let publisher = Client::connect(options(engine.data_addr())).unwrap();
    let total = 3000u64;
    let payload = vec![b'x'; 1500];
    for n in 1..=total {
        assert_eq!(publisher.publish("busy", "agent", payload.clone()).unwrap().seq, n);
    }
    for n in 1..=total {
        let message = next_message(&subscription);
        assert_eq!(message.seq, n, "ordered, no gap, no duplicate across the reconnect");
    }
    let (_, metrics) = common::http_get(engine.control_addr(), "/metrics");
    assert!(common::metric_sum(&metrics, "switchboard_slow_consumer_disconnects_total") >= 1, "the reader was cut off at least once");
    engine.shutdown();
}

#[test]
fn an_engine_restart_is_reported_as_a_gap() {
    let first = common::start(common::test_config(1));
    let addr = first.data_addr();
    let client = Client::connect(options(addr)).unwrap();
    let subscription = client.subscribe("conv", ResumeFrom::Live).unwrap();
    client.publish("conv", "customer", "before").unwrap();
    let before = next_message(&subscription);
    first.shutdown();

    let mut config = common::test_config(1);
    config.server.listen = addr;
    let second = common::start(config);
    let publisher = Client::connect(options(addr)).unwrap();
    // The subscriber reconnects on its own; publish until its resubscription has landed.
    let item = loop {
        publisher.publish("conv", "customer", "after").unwrap();
        if let Some(item) = subscription.recv_timeout(Duration::from_millis(100)).unwrap() {
            break item;
        }
    };
    match item {
        Item::Gap(gap) => {
            assert_eq!(gap.cause, GapCause::EpochChanged);
            assert_eq!(gap.last.map(|p| p.epoch), Some(before.epoch));
            assert_ne!(gap.next.epoch, before.epoch);
        }
        other => panic!("expected a gap after the restart, got {other:?}"),
    }
    second.shutdown();
}

#[test]
fn tokio_client_round_trip() {
    let engine = common::start(common::test_config(2));
    let addr = engine.data_addr();
    let runtime = tokio::runtime::Builder::new_multi_thread().worker_threads(1).enable_all().build().unwrap();
    runtime.block_on(async move {
        let client = switchboard_client::tokio::Client::connect(options(addr)).await.unwrap();
        let subscription = client.subscribe("conv", ResumeFrom::Live).await.unwrap();
        for n in 1..=10u64 {
            assert_eq!(client.publish("conv", "agent", format!("m{n}")).await.unwrap().seq, n);
        }
        for n in 1..=10u64 {
            match tokio::time::timeout(common::EXPECT_TIMEOUT, subscription.recv()).await.unwrap().unwrap() {
                Item::Message(message) => assert_eq!((message.seq, &message.payload[..]), (n, format!("m{n}").as_bytes())),
                other => panic!("expected a message, got {other:?}"),
            }
        }
    });
    engine.shutdown();
}
