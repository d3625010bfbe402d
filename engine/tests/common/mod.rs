//! Test support: start the real engine on loopback, and talk to it with raw protocol frames
//! over real sockets (mini-redis's `tests/server.rs` style). Every wait has a deadline; none
//! is a sleep standing in for synchronisation.

#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use switchboard::Config;
use switchboard_protocol::{decode, Envelope, Frame, Hello, Limits, Publish, ResumeFrom, Subscribe, Text};

/// How long any single expectation may take before the test fails.
pub const EXPECT_TIMEOUT: Duration = Duration::from_secs(20);

/// A config for tests: ephemeral ports, `shards` shards (more than cores is fine).
pub fn test_config(shards: usize) -> Config {
    let mut config = Config::default();
    config.server.listen = "127.0.0.1:0".parse().unwrap();
    config.server.control = "127.0.0.1:0".parse().unwrap();
    config.server.shards = shards;
    config.server.shutdown_drain_ms = 500;
    // Small pools: tests start many engines.
    for class in &mut config.pool.classes {
        class.slots = class.slots.min(512);
    }
    // Memory only: these tests are about the data plane; tests/durability.rs covers the journal
    // (and the binary's tests run with the default, `sync`).
    config.journal.durability = switchboard::config::DurabilityMode::None;
    config
}

/// A directory under the system temp dir, removed on drop.
pub struct TempDir(pub std::path::PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("switchboard-test-{tag}-{}-{n}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        TempDir(dir)
    }

    pub fn path(&self) -> &std::path::Path {
        &self.0
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A durable config: `test_config` with the journal in `dir`.
pub fn durable_config(shards: usize, dir: &std::path::Path, durability: switchboard::config::DurabilityMode) -> Config {
    let mut config = test_config(shards);
    config.journal.durability = durability;
    config.server.data_dir = dir.to_path_buf();
    // Small segments so tests roll them.
    config.journal.store.segment_bytes = 4 << 20;
    config.journal.store.shard_bytes_max = 64 << 20;
    config
}

pub fn start(config: Config) -> switchboard::EngineHandle {
    switchboard::start(config).expect("engine starts")
}

/// A raw protocol connection.
pub struct Raw {
    pub stream: TcpStream,
    buffer: BytesMut,
    next_correlation: u32,
}

impl Raw {
    pub fn connect(addr: SocketAddr) -> Raw {
        let stream = TcpStream::connect(addr).expect("connect");
        stream.set_nodelay(true).unwrap();
        stream.set_read_timeout(Some(EXPECT_TIMEOUT)).unwrap();
        Raw { stream, buffer: BytesMut::with_capacity(64 * 1024), next_correlation: 1 }
    }

    /// Connects and completes the handshake.
    pub fn handshake(addr: SocketAddr) -> Raw {
        let mut raw = Raw::connect(addr);
        raw.send(&Frame::Hello(Hello { version_max: 1, version_min: 1, features: 0, client_name: Text::from("test"), token: Text::new() }));
        match raw.recv().frame {
            Frame::Welcome(_) => {}
            other => panic!("expected WELCOME, got {other:?}"),
        }
        raw
    }

    /// Sends a frame with a fresh correlation id; returns the id.
    pub fn send(&mut self, frame: &Frame) -> u32 {
        let correlation = self.next_correlation;
        self.next_correlation += 1;
        self.stream.write_all(&frame.to_bytes(correlation).unwrap()).unwrap();
        correlation
    }

    pub fn send_bytes(&mut self, bytes: &[u8]) {
        self.stream.write_all(bytes).unwrap();
    }

    /// The next frame, or None on EOF.
    pub fn try_recv(&mut self) -> Option<Envelope> {
        loop {
            if let Some(envelope) = decode(&mut self.buffer, &Limits::default()).expect("server sent a valid frame") {
                return Some(envelope);
            }
            let mut chunk = [0u8; 64 * 1024];
            match self.stream.read(&mut chunk) {
                Ok(0) => return None,
                Ok(read) => self.buffer.extend_from_slice(&chunk[..read]),
                Err(error) if error.kind() == std::io::ErrorKind::ConnectionReset => return None,
                // A signal landed in the test process (the engine's threads share it): retry.
                Err(error) if error.kind() == std::io::ErrorKind::Interrupted => {}
                Err(error) => panic!("read failed (timeout is {EXPECT_TIMEOUT:?}): {error}"),
            }
        }
    }

    pub fn recv(&mut self) -> Envelope {
        self.try_recv().expect("connection closed while a frame was expected")
    }

    /// The next frame; panics on EOF.
    pub fn recv_until_closed_or_first(&mut self) -> Frame {
        self.recv().frame
    }

    /// Reads until EOF, returning every frame seen.
    pub fn recv_until_closed(&mut self) -> Vec<Frame> {
        let mut frames = Vec::new();
        while let Some(envelope) = self.try_recv() {
            frames.push(envelope.frame);
        }
        frames
    }

    pub fn subscribe(&mut self, session: &str, from: ResumeFrom) -> switchboard_protocol::Subscribed {
        let correlation = self.send(&Frame::Subscribe(Subscribe { session: Text::from(session), from }));
        let envelope = self.recv();
        assert_eq!(envelope.correlation, correlation);
        match envelope.frame {
            Frame::Subscribed(subscribed) => subscribed,
            other => panic!("expected SUBSCRIBED, got {other:?}"),
        }
    }

    pub fn publish_frame(session: &str, sender: &str, client_msg_id: u64, payload: &[u8]) -> Frame {
        Frame::Publish(Publish {
            session: Text::from(session),
            client_msg_id,
            trace_id: 0,
            sender: Text::from(sender),
            payload: bytes::Bytes::copy_from_slice(payload),
        })
    }

    /// Publishes and waits for the PUBACK (frames for other correlations are not expected on a
    /// publisher connection that subscribes to nothing).
    pub fn publish(&mut self, session: &str, client_msg_id: u64, payload: &[u8]) -> switchboard_protocol::PubAck {
        let correlation = self.send(&Self::publish_frame(session, "alice", client_msg_id, payload));
        let envelope = self.recv();
        assert_eq!(envelope.correlation, correlation);
        match envelope.frame {
            Frame::PubAck(ack) => ack,
            other => panic!("expected PUBACK, got {other:?}"),
        }
    }

    /// Sends `frame` and returns the reply to it (the next frame must carry its correlation).
    pub fn request(&mut self, frame: &Frame) -> Frame {
        let correlation = self.send(frame);
        let envelope = self.recv();
        assert_eq!(envelope.correlation, correlation);
        envelope.frame
    }

    /// Sends `frame` and asserts the reply is ERROR(`code`); the connection stays open.
    pub fn refused(&mut self, frame: &Frame, code: switchboard_protocol::ErrorCode) {
        match self.request(frame) {
            Frame::Error(error) => assert_eq!(switchboard_protocol::ErrorCode::from_u16(error.code), code, "{}", error.message),
            other => panic!("expected ERROR({code:?}), got {other:?}"),
        }
    }

    /// Next DELIVER (fails on anything else).
    pub fn deliver(&mut self) -> switchboard_protocol::Deliver {
        match self.recv().frame {
            Frame::Deliver(deliver) => deliver,
            other => panic!("expected DELIVER, got {other:?}"),
        }
    }
}

/// A plain HTTP GET on the control port: (status, body).
pub fn http_get(addr: SocketAddr, path: &str) -> (u16, String) {
    let mut stream = TcpStream::connect(addr).unwrap();
    stream.set_read_timeout(Some(EXPECT_TIMEOUT)).unwrap();
    write!(stream, "GET {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n").unwrap();
    let mut response = String::new();
    stream.read_to_string(&mut response).unwrap();
    let status = response.split(' ').nth(1).and_then(|s| s.parse().ok()).expect("HTTP status line");
    let body = response.split_once("\r\n\r\n").map(|(_, body)| body.to_owned()).unwrap_or_default();
    (status, body)
}

/// Reads a counter or gauge summed over shards from /metrics text.
pub fn metric_sum(metrics: &str, name: &str) -> u64 {
    metrics
        .lines()
        .filter(|line| line.starts_with(name) && line[name.len()..].starts_with(['{', ' ']))
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64
}

/// Polls the control port until the metric `name` (summed over shards) is above zero; fails
/// with `what` after [`EXPECT_TIMEOUT`].
pub fn wait_for_metric(control: SocketAddr, name: &str, what: &str) {
    let deadline = deadline();
    while metric_sum(&http_get(control, "/metrics").1, name) == 0 {
        assert!(Instant::now() < deadline, "{what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

pub fn deadline() -> Instant {
    Instant::now() + EXPECT_TIMEOUT
}

/// A seeded generator (splitmix64): a failing seed replays exactly.
pub struct Rng(pub u64);

impl Rng {
    /// splitmix64.
    pub fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    pub fn below(&mut self, n: u64) -> u64 {
        if n == 0 {
            0
        } else {
            self.next() % n
        }
    }
    pub fn chance(&mut self, per_mille: u64) -> bool {
        self.below(1000) < per_mille
    }
    pub fn pick<'a, T>(&mut self, items: &'a [T]) -> Option<&'a T> {
        if items.is_empty() {
            None
        } else {
            Some(&items[self.below(items.len() as u64) as usize])
        }
    }
}
