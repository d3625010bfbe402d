//! The tokio driver over real loopback TCP, against the fake server (`testing` feature).
//! No test sleeps to synchronise; timeouts only bound a failing test.

use std::time::Duration;

use bytes::Bytes;
use switchboard_client::testing::tcp::TcpFakeServer;
use switchboard_client::testing::FakeServerConfig;
use switchboard_client::tokio::{Client, Subscription};
use switchboard_client::{ClientError, ClientOptions, Delivery, Item, Publish, ReconnectPolicy, ResumeFrom, Text};

const WAIT: Duration = Duration::from_secs(20);
/// Messages pushed through forced disconnects.
const CUT_COUNT: u64 = 200;
/// Messages pushed through a queue of 2.
const QUEUED_COUNT: u64 = 100;

fn options(server: &TcpFakeServer, seed: u64) -> ClientOptions {
    ClientOptions::new(server.addr().to_string())
        .client_name("tokio-test")
        .seed(seed)
        .reconnect(ReconnectPolicy { initial: Duration::from_millis(1), max: Duration::from_millis(20), attempts_max: None })
}

async fn next_message(subscription: &Subscription) -> Delivery {
    match tokio::time::timeout(WAIT, subscription.recv()).await {
        Ok(Ok(Item::Message(message))) => message,
        other => panic!("expected a message, got {other:?}"),
    }
}

#[tokio::test]
async fn connect_subscribe_publish_receive() {
    let server = TcpFakeServer::start(FakeServerConfig::default()).unwrap();
    let client = Client::connect(options(&server, 1)).await.unwrap();
    assert_eq!(client.welcome().tenant, "test-tenant");
    let subscription = client.subscribe("conv-1", ResumeFrom::Live).await.unwrap();
    for i in 1..=3u64 {
        let ack = client.publish("conv-1", "customer-1", format!("m{i}")).await.unwrap();
        assert_eq!(ack.seq, i);
    }
    for i in 1..=3u64 {
        let message = next_message(&subscription).await;
        assert_eq!((message.seq, message.payload), (i, Bytes::from(format!("m{i}"))));
    }
    assert_eq!(subscription.try_recv().unwrap(), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn forced_disconnects_mid_stream_lose_and_duplicate_nothing() {
    let config = FakeServerConfig { disconnect_after_frames: Some(5), disconnects_max: 30, ..FakeServerConfig::default() };
    let server = TcpFakeServer::start(config).unwrap();
    let subscriber = Client::connect(options(&server, 2)).await.unwrap();
    let subscription = subscriber.subscribe("conv-1", ResumeFrom::Live).await.unwrap();
    let publisher = Client::connect(options(&server, 3)).await.unwrap();
    let publishing = tokio::spawn(async move {
        for i in 1..=CUT_COUNT {
            let ack = publisher.publish("conv-1", "agent-1", format!("m{i}")).await.unwrap();
            assert_eq!(ack.seq, i);
        }
    });
    for i in 1..=CUT_COUNT {
        let message = next_message(&subscription).await;
        assert_eq!((message.seq, message.payload), (i, Bytes::from(format!("m{i}"))));
    }
    publishing.await.unwrap();
    let stats = server.with_server(|server| server.stats());
    assert_eq!(stats.messages, CUT_COUNT);
    assert!(stats.kicks >= 10, "{stats:?}");
}

#[tokio::test]
async fn a_full_receive_queue_holds_reading_back_without_losing_anything() {
    let server = TcpFakeServer::start(FakeServerConfig::default()).unwrap();
    let subscriber = Client::connect(options(&server, 4).receive_queue_messages_max(2)).await.unwrap();
    let subscription = subscriber.subscribe("conv-1", ResumeFrom::Live).await.unwrap();
    let publisher = Client::connect(options(&server, 5)).await.unwrap();
    let mut pending = Vec::new();
    for i in 1..=QUEUED_COUNT {
        let publish = Publish {
            session: Text::from("conv-1"),
            client_msg_id: 0,
            trace_id: u128::from(i),
            sender: Text::from("agent-1"),
            payload: Bytes::from(format!("m{i}")),
        };
        pending.push(publisher.publish_nowait(publish).await);
    }
    for pending in pending {
        pending.wait().await.unwrap();
    }
    for i in 1..=QUEUED_COUNT {
        assert!(subscription.queued() <= 2);
        assert_eq!(next_message(&subscription).await.trace_id, u128::from(i));
    }
    publisher.publish("conv-1", "agent-1", "after").await.unwrap();
    assert_eq!(next_message(&subscription).await.payload, Bytes::from("after"));
    assert!(subscriber.stats().await.unwrap().receive_pauses >= 1, "the driver did hold reading back");
}

#[tokio::test]
async fn a_refused_token_is_a_typed_error() {
    let config = FakeServerConfig { token: Some("secret".into()), ..FakeServerConfig::default() };
    let server = TcpFakeServer::start(config).unwrap();
    let refused = Client::connect(options(&server, 6).token("wrong")).await;
    assert!(matches!(refused, Err(ClientError::AuthRefused { .. })), "{refused:?}");
}

#[tokio::test]
async fn resume_after_the_server_drops_everyone_and_close() {
    let server = TcpFakeServer::start(FakeServerConfig::default()).unwrap();
    let client = Client::connect(options(&server, 7)).await.unwrap();
    let subscription = client.subscribe("conv-1", ResumeFrom::Live).await.unwrap();
    client.publish("conv-1", "customer-1", "before").await.unwrap();
    assert_eq!(next_message(&subscription).await.seq, 1);
    server.kick_all();
    // Published while the client may be reconnecting: the publish waits and the resume
    // delivers it once.
    client.publish("conv-1", "customer-1", "after").await.unwrap();
    assert_eq!(next_message(&subscription).await.seq, 2);
    client.close().await.unwrap();
    assert_eq!(tokio::time::timeout(WAIT, subscription.recv()).await.unwrap(), Err(ClientError::Closed));
}

#[test]
fn handles_can_move_between_tasks() {
    fn send_sync<T: Send + Sync>() {}
    send_sync::<Client>();
    send_sync::<Subscription>();
    send_sync::<switchboard_client::tokio::Events>();
    send_sync::<switchboard_client::tokio::PendingPublish>();
}
