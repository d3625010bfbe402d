//! A minimal gateway: connects, subscribes to a conversation, publishes into it and prints
//! what comes back — messages, gaps, conversation events, reconnects.
//!
//! ```text
//! cargo run -p switchboard-client --example gateway -- [ADDR] [SESSION]
//! cargo run -p switchboard-client --example gateway -- --fake   # against the in-memory fake
//! ```
//!
//! ADDR defaults to 127.0.0.1:7400 (the engine's default port), SESSION to `demo-conversation`.
//! The token comes from `SWITCHBOARD_TOKEN` (the engine currently accepts an empty one).

use std::time::Duration;

use switchboard_client::blocking::Client;
use switchboard_client::testing::tcp::TcpFakeServer;
use switchboard_client::testing::FakeServerConfig;
use switchboard_client::{ClientError, ClientOptions, Event, Item, ResumeFrom};

fn main() -> Result<(), ClientError> {
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    // `--fake` serves the protocol from an in-process fake server (for trying this out before
    // an engine is running); it is kept alive until the end of main.
    let fake = if args.first().is_some_and(|arg| arg == "--fake") {
        args.remove(0);
        Some(TcpFakeServer::start(FakeServerConfig::default())?)
    } else {
        None
    };
    let addr = match &fake {
        Some(server) => server.addr().to_string(),
        None => args.first().cloned().unwrap_or_else(|| "127.0.0.1:7400".into()),
    };
    let session = args.get(1).cloned().unwrap_or_else(|| "demo-conversation".into());
    let token = std::env::var("SWITCHBOARD_TOKEN").unwrap_or_default();

    let options = ClientOptions::new(&addr).token(token).client_name("example-gateway/0.1");
    let client = Client::connect(options)?;
    let welcome = client.welcome();
    println!(
        "connected to {addr} ({} {}), tenant {:?}, payloads up to {} bytes",
        welcome.server_name, welcome.connection_id, welcome.tenant, welcome.limits.payload_bytes_max
    );

    // Connection changes and pushes that belong to no subscription.
    let events = client.events()?;
    std::thread::spawn(move || {
        while let Ok(event) = events.recv() {
            match event {
                Event::Disconnected { reason, reconnect_at } => {
                    println!("[events] disconnected: {reason:?}; reconnecting: {}", reconnect_at.is_some());
                }
                Event::Connected { resumed, .. } => println!("[events] connected (resumed: {resumed})"),
                other => println!("[events] {other:?}"),
            }
        }
    });

    let subscription = client.subscribe(session.as_str(), ResumeFrom::Live)?;
    let info = subscription.info();
    println!("subscribed to {session}: epoch {}, head seq {}", info.epoch, info.head_seq);

    for text in ["Hi, my order has not arrived.", "Order #4711.", "Thanks!"] {
        let ack = client.publish(session.as_str(), "customer-1", text)?;
        println!("published {text:?} as seq {} (durability {:?})", ack.seq, ack.durability);
    }

    // Print what arrives; stop after a quiet second.
    while let Some(item) = subscription.recv_timeout(Duration::from_secs(1))? {
        match item {
            Item::Message(message) => println!(
                "#{} {} says {:?}",
                message.seq,
                message.sender,
                String::from_utf8_lossy(&message.payload)
            ),
            Item::Gap(gap) => println!("!! missed messages between {:?} and {:?} ({:?})", gap.last, gap.next, gap.cause),
            Item::Conversation(event) => println!("conversation {:?} (agent {:?})", event.kind, event.agent),
            Item::ReadCursor(cursor) => println!("{} read up to #{}", cursor.participant, cursor.seq),
            Item::Typing(typing) => println!("{} typing: {}", typing.participant, typing.active),
        }
    }
    subscription.unsubscribe()?;
    client.close()?;
    Ok(())
}
