//! The blocking driver over real loopback TCP, against the fake server (`testing` feature).
//! Until the engine lands these stand in for it; the fake speaks the same codec.
//!
//! No test sleeps to synchronise: every wait is on a reply or an item, bounded by a timeout
//! that only matters when the test fails.

use std::time::Duration;

use bytes::Bytes;
use switchboard_client::blocking::Client;
use switchboard_client::testing::tcp::TcpFakeServer;
use switchboard_client::testing::FakeServerConfig;
use switchboard_client::{
    ClientError, ClientOptions, ErrorCode, Event, GapCause, Item, OpenConversation, Publish, ReconnectPolicy, ResumeFrom,
    Text, TicketCommand, TicketOp,
};

const WAIT: Duration = Duration::from_secs(20);
/// Messages pushed through forced disconnects.
const CUT_COUNT: u64 = 200;
/// Messages pushed through a queue of 2.
const QUEUED_COUNT: u64 = 100;

fn options(server: &TcpFakeServer, seed: u64) -> ClientOptions {
    ClientOptions::new(server.addr().to_string())
        .client_name("blocking-test")
        .seed(seed)
        .reconnect(ReconnectPolicy { initial: Duration::from_millis(1), max: Duration::from_millis(20), attempts_max: None })
}

fn next_message(subscription: &switchboard_client::blocking::Subscription) -> switchboard_client::Delivery {
    match subscription.recv_timeout(WAIT) {
        Ok(Some(Item::Message(message))) => message,
        other => panic!("expected a message, got {other:?}"),
    }
}

#[test]
fn connect_subscribe_publish_receive() {
    let server = TcpFakeServer::start(FakeServerConfig::default()).unwrap();
    let client = Client::connect(options(&server, 1)).unwrap();
    assert_eq!(client.welcome().tenant, "test-tenant");
    let subscription = client.subscribe("conv-1", ResumeFrom::Live).unwrap();
    assert!(subscription.info().recovered);
    for (i, text) in ["hello", "is anyone there?", "thanks"].iter().enumerate() {
        let ack = client.publish("conv-1", "customer-1", *text).unwrap();
        assert_eq!(ack.seq, i as u64 + 1);
        assert!(!ack.duplicate);
    }
    for (i, text) in ["hello", "is anyone there?", "thanks"].iter().enumerate() {
        let message = next_message(&subscription);
        assert_eq!(message.seq, i as u64 + 1);
        assert_eq!(message.payload, Bytes::from(*text));
        assert_eq!(message.sender, "customer-1");
    }
    assert_eq!(subscription.try_recv().unwrap(), None);
}

#[test]
fn forced_disconnects_mid_stream_lose_and_duplicate_nothing() {
    // Every connection (subscriber's and publisher's) is cut mid-frame after 5 frames, 30 times.
    let config = FakeServerConfig { disconnect_after_frames: Some(5), disconnects_max: 30, ..FakeServerConfig::default() };
    let server = TcpFakeServer::start(config).unwrap();
    let subscriber = Client::connect(options(&server, 2)).unwrap();
    let subscription = subscriber.subscribe("conv-1", ResumeFrom::Live).unwrap();
    let publisher = Client::connect(options(&server, 3)).unwrap();
    let publishing = std::thread::spawn(move || {
        for i in 1..=CUT_COUNT {
            let ack = publisher.publish("conv-1", "agent-1", format!("m{i}")).unwrap();
            assert_eq!(ack.seq, i, "acks come in publish order and each message is stored once");
        }
        publisher
    });
    for i in 1..=CUT_COUNT {
        let message = next_message(&subscription);
        assert_eq!((message.seq, message.payload), (i, Bytes::from(format!("m{i}"))));
    }
    let publisher = publishing.join().unwrap();
    assert_eq!(subscription.try_recv().unwrap(), None, "nothing after the last message");
    let stats = server.with_server(|server| server.stats());
    assert_eq!(stats.messages, CUT_COUNT, "no publish stored twice");
    assert!(stats.kicks >= 10, "the test did cut connections: {stats:?}");
    let reconnects = subscriber.stats().unwrap().handshakes + publisher.stats().unwrap().handshakes;
    assert!(reconnects > 2, "clients reconnected ({reconnects} handshakes)");
}

#[test]
fn a_full_receive_queue_holds_reading_back_without_losing_anything() {
    let server = TcpFakeServer::start(FakeServerConfig::default()).unwrap();
    let subscriber = Client::connect(options(&server, 4).receive_queue_messages_max(2)).unwrap();
    let subscription = subscriber.subscribe("conv-1", ResumeFrom::Live).unwrap();
    let publisher = Client::connect(options(&server, 5)).unwrap();
    let pending: Vec<_> = (1..=QUEUED_COUNT)
        .map(|i| {
            publisher.publish_nowait(Publish {
                session: Text::from("conv-1"),
                client_msg_id: 0,
                trace_id: u128::from(i),
                sender: Text::from("agent-1"),
                payload: Bytes::from(format!("m{i}")),
            })
        })
        .collect();
    for pending in pending {
        pending.wait().unwrap();
    }
    // Every message is stored and sent; the subscriber's queue holds 2, the rest waits.
    for i in 1..=QUEUED_COUNT {
        assert!(subscription.queued() <= 2);
        let message = next_message(&subscription);
        assert_eq!((message.seq, message.trace_id), (i, u128::from(i)));
    }
    // The client kept reading afterwards: one more message arrives.
    publisher.publish("conv-1", "agent-1", "after").unwrap();
    assert_eq!(next_message(&subscription).payload, Bytes::from("after"));
    assert!(subscriber.stats().unwrap().receive_pauses >= 1, "the driver did hold reading back");
}

#[test]
fn an_unrecoverable_position_yields_a_gap_item_first() {
    let config = FakeServerConfig { history_messages_max: 2, ..FakeServerConfig::default() };
    let server = TcpFakeServer::start(config).unwrap();
    let epoch = server.with_server(|server| {
        for i in 1..=5 {
            server.publish("conv-1", "agent-1", format!("m{i}").as_bytes());
        }
        server.history("conv-1")[0].epoch
    });
    let client = Client::connect(options(&server, 6)).unwrap();
    let subscription = client.subscribe("conv-1", ResumeFrom::After { epoch, seq: 1 }).unwrap();
    assert!(!subscription.info().recovered);
    match subscription.recv_timeout(WAIT).unwrap() {
        Some(Item::Gap(gap)) => {
            assert_eq!(gap.cause, GapCause::NotRecovered);
            assert_eq!(gap.last.map(|last| last.seq), Some(1));
            assert_eq!(gap.next.seq, 4);
        }
        other => panic!("expected a gap, got {other:?}"),
    }
    assert_eq!(next_message(&subscription).seq, 4);
    assert_eq!(next_message(&subscription).seq, 5);
}

#[test]
fn a_refused_token_is_a_typed_error_and_no_retry_loop() {
    let config = FakeServerConfig { token: Some("secret".into()), ..FakeServerConfig::default() };
    let server = TcpFakeServer::start(config).unwrap();
    let refused = Client::connect(options(&server, 7).token("wrong"));
    assert!(matches!(refused, Err(ClientError::AuthRefused { .. })), "{refused:?}");
    assert!(Client::connect(options(&server, 8).token("secret")).is_ok());
    assert_eq!(server.with_server(|server| server.stats().connections), 2);
}

#[test]
fn nobody_listening_is_an_io_error() {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    drop(listener);
    let refused = Client::connect(ClientOptions::new(addr.to_string()));
    assert!(matches!(refused, Err(ClientError::Io(_))), "{refused:?}");
}

#[test]
fn customer_service_requests_get_typed_answers() {
    let server = TcpFakeServer::start(FakeServerConfig::default()).unwrap();
    let client = Client::connect(options(&server, 9)).unwrap();
    client
        .open_conversation(OpenConversation {
            session: Text::from("conv-9"),
            customer: Text::from("customer-9"),
            priority: 3,
            skills: vec![Text::from("billing")],
            context: Bytes::new(),
        })
        .unwrap();
    let create = |expected_version| TicketCommand {
        ticket: Text::from("ticket-1"),
        op: TicketOp::Create,
        expected_version,
        session: Text::from("conv-9"),
        assignee: Text::new(),
        trace_id: 0,
        payload: Bytes::from_static(b"{}"),
    };
    assert_eq!(client.ticket(create(0)).unwrap().version, 1);
    let conflict = client.ticket(create(0));
    assert!(matches!(conflict, Err(ClientError::Server { code: ErrorCode::Conflict, .. })), "{conflict:?}");
    let misuse = client.request(switchboard_client::Frame::Publish(Publish {
        session: Text::from("conv-9"),
        client_msg_id: 0,
        trace_id: 0,
        sender: Text::from("x"),
        payload: Bytes::new(),
    }));
    assert!(matches!(misuse, Err(ClientError::InvalidRequest(_))));
}

#[test]
fn connection_events_and_resume_after_the_server_drops_everyone() {
    let server = TcpFakeServer::start(FakeServerConfig::default()).unwrap();
    let client = Client::connect(options(&server, 10)).unwrap();
    let events = client.events().unwrap();
    let subscription = client.subscribe("conv-1", ResumeFrom::Live).unwrap();
    client.publish("conv-1", "customer-1", "before").unwrap();
    assert_eq!(next_message(&subscription).seq, 1);
    server.kick_all();
    // The subscription resumes by itself; the events receiver tells what happened.
    let mut saw_disconnect = false;
    loop {
        match events.recv_timeout(WAIT).unwrap() {
            Some(Event::Disconnected { reconnect_at: Some(_), .. }) => saw_disconnect = true,
            Some(Event::Connected { resumed: true, .. }) => break,
            Some(_) => {}
            None => panic!("no reconnect"),
        }
    }
    assert!(saw_disconnect);
    client.publish("conv-1", "customer-1", "after").unwrap();
    let message = next_message(&subscription);
    assert_eq!((message.seq, message.payload), (2, Bytes::from("after")));
}

#[test]
fn close_ends_subscriptions_with_a_typed_error() {
    let server = TcpFakeServer::start(FakeServerConfig::default()).unwrap();
    let client = Client::connect(options(&server, 11)).unwrap();
    let subscription = client.subscribe("conv-1", ResumeFrom::Live).unwrap();
    client.publish("conv-1", "customer-1", "queued before close").unwrap();
    client.close().unwrap();
    // What was queued (the message, unless it was still in flight) is delivered, then the end.
    loop {
        match subscription.recv() {
            Ok(Item::Message(message)) => assert_eq!(message.seq, 1),
            Err(error) => {
                assert_eq!(error, ClientError::Closed);
                break;
            }
            Ok(other) => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(subscription.recv(), Err(ClientError::Closed), "the end is sticky");
    assert_eq!(client.publish("conv-1", "customer-1", "x"), Err(ClientError::Closed));
}

#[test]
fn dropping_a_subscription_unsubscribes() {
    let server = TcpFakeServer::start(FakeServerConfig::default()).unwrap();
    let client = Client::connect(options(&server, 12)).unwrap();
    let first = client.subscribe("conv-1", ResumeFrom::Live).unwrap();
    drop(first);
    // Subscribing again only works once the drop's unsubscribe went through (commands are
    // handled in order), and the new subscription is not ended by the old handle.
    let second = client.subscribe("conv-1", ResumeFrom::Live).unwrap();
    client.publish("conv-1", "customer-1", "x").unwrap();
    assert_eq!(next_message(&second).seq, 1);
    second.unsubscribe().unwrap();
    assert_eq!(client.stats().unwrap().unrouted_dropped, 0);
}

#[test]
fn handles_can_be_shared_across_threads() {
    fn send_sync<T: Send + Sync>() {}
    send_sync::<Client>();
    send_sync::<switchboard_client::blocking::Subscription>();
    send_sync::<switchboard_client::blocking::Events>();
    send_sync::<switchboard_client::blocking::PendingPublish>();
    send_sync::<ClientError>();
}
