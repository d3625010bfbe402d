//! Backends: how the generator talks to one kind of server.
//!
//! A backend opens two kinds of connection, both plain blocking `std::net` sockets driven by
//! their own threads:
//! - a [`Gateway`] subscribes a list of sessions, waits until the server confirmed them all,
//!   then is polled by one reader thread that hands every delivered payload to a sink;
//! - a [`Publisher`] buffers publishes and writes them per batch; whatever the server answers
//!   (acks, PINGs) is read by an optional [`Replies`] half on another thread so the socket never
//!   fills.
//!
//! Adding a backend is one file: implement [`Backend`] and add it to [`BackendKind`].
//!
//! Servers that acknowledge publishes also implement [`crate::ack::AckBackend`] (`loadgen
//! --ack`): `switchboard` (PUBACK) and `jetstream` (NATS `JetStream` publish acks, which is an
//! acknowledgement-only backend).

pub mod jetstream;
pub mod mock;
pub mod nats;
pub mod redis;
pub mod switchboard;

use std::io::{self, Read};
use std::net::TcpStream;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// How long a blocking read waits before the reader thread gets to check its stop flag.
pub const READ_TIMEOUT: Duration = Duration::from_millis(50);

/// Publishers write out their buffer when it grows past this, even mid-batch.
pub const FLUSH_AT: usize = 256 * 1024;

/// What one poll of a connection found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Poll {
    /// Bytes arrived (possibly no complete message yet).
    Data,
    /// Nothing arrived within [`READ_TIMEOUT`].
    Idle,
    /// The server closed the connection.
    Closed,
}

/// A publisher connection: its writing half and, if the server answers publishes, its reading half.
pub type PublisherPair = (Box<dyn Publisher>, Option<Box<dyn Replies>>);

/// A server the generator can load.
pub trait Backend: Send + Sync {
    /// Short name for reports (`nats`, `redis`, `switchboard`, `mock`).
    fn name(&self) -> &'static str;

    /// Open gateway connection `index` and send the subscriptions for `sessions` (without
    /// waiting for them to be confirmed: see [`Gateway::wait_ready`]).
    fn gateway(&self, index: usize, sessions: &[u32]) -> io::Result<Box<dyn Gateway>>;

    /// Open publisher connection `index`.
    fn publisher(&self, index: usize) -> io::Result<PublisherPair>;
}

/// One subscribing connection.
pub trait Gateway: Send {
    /// Block until every subscription sent so far is confirmed by the server, or `deadline`.
    fn wait_ready(&mut self, deadline: Instant) -> io::Result<()>;

    /// Read once (waiting up to about [`READ_TIMEOUT`]) and hand every complete delivered
    /// payload to `sink`.
    fn poll(&mut self, sink: &mut dyn FnMut(&[u8])) -> io::Result<Poll>;
}

/// The writing half of one publishing connection.
pub trait Publisher: Send {
    /// Queue one publish of `payload` to `session` (may write if the buffer is large).
    fn publish(&mut self, session: u32, payload: &[u8]) -> io::Result<()>;
    /// Write out everything queued.
    fn flush(&mut self) -> io::Result<()>;
    /// Flush and finish (after the last publish).
    fn close(&mut self) -> io::Result<()> {
        self.flush()
    }
}

/// The reading half of a publishing connection: reads and discards the server's answers.
pub trait Replies: Send {
    /// Read once (waiting up to about [`READ_TIMEOUT`]) and handle whatever came.
    fn poll(&mut self) -> io::Result<Poll>;
}

/// The backends the `loadgen` binary knows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BackendKind {
    /// Core NATS text protocol.
    Nats,
    /// Redis RESP SUBSCRIBE/PUBLISH.
    Redis,
    /// Switchboard's binary protocol (`switchboard-protocol` codec).
    Switchboard,
    /// NATS `JetStream` publish acknowledgements (`--ack` only: nats-server started with `-js`).
    Jetstream,
    /// In-process mock (no server), optionally with injected faults.
    Mock,
}

impl BackendKind {
    /// Build the fan-out backend for `addr`; `Err` for an acknowledgement-only backend.
    pub fn build(self, addr: &str, faults: mock::Faults) -> Result<Arc<dyn Backend>, String> {
        Ok(match self {
            BackendKind::Jetstream => return Err("jetstream only measures publish acknowledgements: add --ack".into()),
            BackendKind::Nats => Arc::new(nats::Nats::new(addr)),
            BackendKind::Redis => Arc::new(redis::Redis::new(addr)),
            BackendKind::Switchboard => Arc::new(switchboard::Switchboard::new(addr)),
            BackendKind::Mock => Arc::new(mock::Mock::new(faults)),
        })
    }

    /// Build the acknowledgement backend for `addr` (`--ack`); `Err` for servers that do not
    /// acknowledge publishes.
    pub fn build_ack(self, addr: &str, faults: crate::ack::mock::AckFaults) -> Result<Arc<dyn crate::ack::AckBackend>, String> {
        Ok(match self {
            BackendKind::Switchboard => Arc::new(switchboard::Switchboard::new(addr)),
            BackendKind::Jetstream => Arc::new(jetstream::JetStream::new(addr)),
            BackendKind::Mock => Arc::new(crate::ack::mock::MockAck { faults, claim: "memory" }),
            BackendKind::Nats => return Err("core NATS does not acknowledge publishes: use --backend jetstream".into()),
            BackendKind::Redis => return Err("Redis PUBLISH has no durable acknowledgement: use switchboard or jetstream".into()),
        })
    }

    /// The default server address for this backend.
    pub fn default_addr(self) -> &'static str {
        match self {
            BackendKind::Nats | BackendKind::Jetstream => "127.0.0.1:4222",
            BackendKind::Redis => "127.0.0.1:6379",
            BackendKind::Switchboard => "127.0.0.1:7400",
            BackendKind::Mock => "mock",
        }
    }
}

/// Connect a TCP socket with `TCP_NODELAY` and the reader timeout set.
pub fn connect(addr: &str) -> io::Result<TcpStream> {
    let s = TcpStream::connect(addr)
        .map_err(|e| io::Error::new(e.kind(), format!("connect {addr}: {e}")))?;
    s.set_nodelay(true)?;
    s.set_read_timeout(Some(READ_TIMEOUT))?;
    Ok(s)
}

/// True for the errors a read timeout produces.
pub fn is_timeout(e: &io::Error) -> bool {
    matches!(e.kind(), io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut | io::ErrorKind::Interrupted)
}

/// An error for a protocol violation or a server error reply.
pub fn proto_err(msg: impl Into<String>) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.into())
}

/// A read buffer for incremental parsing: partial messages stay at the front until the rest
/// arrives.
pub struct ReadBuf {
    buf: Vec<u8>,
    start: usize,
    end: usize,
}

impl ReadBuf {
    /// A buffer of `cap` bytes (grows when one message does not fit).
    pub fn new(cap: usize) -> Self {
        Self { buf: vec![0; cap], start: 0, end: 0 }
    }

    /// Read once from `r` into the free space; `Ok(0)` means end of stream.
    pub fn fill(&mut self, r: &mut impl Read) -> io::Result<usize> {
        if self.start == self.end {
            self.start = 0;
            self.end = 0;
        } else if self.end == self.buf.len() {
            if self.start > 0 {
                self.buf.copy_within(self.start..self.end, 0);
                self.end -= self.start;
                self.start = 0;
            } else {
                let n = self.buf.len() * 2;
                self.buf.resize(n, 0);
            }
        }
        let n = r.read(&mut self.buf[self.end..])?;
        self.end += n;
        Ok(n)
    }

    /// The bytes not yet consumed.
    pub fn data(&self) -> &[u8] {
        &self.buf[self.start..self.end]
    }

    /// Drop `n` bytes from the front.
    pub fn consume(&mut self, n: usize) {
        self.start += n;
        debug_assert!(self.start <= self.end);
    }
}

/// Position of the first `\r\n` in `b`, if any.
#[inline]
pub fn find_crlf(b: &[u8]) -> Option<usize> {
    let mut from = 0;
    while let Some(i) = b[from..].iter().position(|&c| c == b'\n') {
        let at = from + i;
        if at > 0 && b[at - 1] == b'\r' {
            return Some(at - 1);
        }
        from = at + 1;
    }
    None
}

/// Parse a decimal unsigned integer.
#[inline]
pub fn parse_u64(b: &[u8]) -> Option<u64> {
    if b.is_empty() || b.len() > 19 {
        return None;
    }
    let mut v: u64 = 0;
    for &c in b {
        if !c.is_ascii_digit() {
            return None;
        }
        v = v * 10 + u64::from(c - b'0');
    }
    Some(v)
}

/// Append the decimal form of `v`.
#[inline]
pub fn push_u64(out: &mut Vec<u8>, mut v: u64) {
    let mut tmp = [0u8; 20];
    let mut i = tmp.len();
    loop {
        i -= 1;
        tmp[i] = b'0' + (v % 10) as u8;
        v /= 10;
        if v == 0 {
            break;
        }
    }
    out.extend_from_slice(&tmp[i..]);
}

/// Subject / channel name of a session: `s.{i}`.
pub fn subject(session: u32) -> String {
    format!("s.{session}")
}

/// Append the subject of a session.
#[inline]
pub fn push_subject(out: &mut Vec<u8>, session: u32) {
    out.extend_from_slice(b"s.");
    push_u64(out, u64::from(session));
}

/// Number of decimal digits of the subject `s.{session}`.
#[inline]
pub fn subject_len(session: u32) -> usize {
    let mut n = 1;
    let mut v = session / 10;
    while v > 0 {
        n += 1;
        v /= 10;
    }
    2 + n
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn helpers() {
        assert_eq!(find_crlf(b"abc\r\nx"), Some(3));
        assert_eq!(find_crlf(b"a\nb\r\n"), Some(3));
        assert_eq!(find_crlf(b"abc\r"), None);
        assert_eq!(parse_u64(b"12345"), Some(12345));
        assert_eq!(parse_u64(b"12a"), None);
        assert_eq!(parse_u64(b""), None);
        let mut v = Vec::new();
        push_u64(&mut v, 0);
        push_u64(&mut v, 9_876_543_210);
        assert_eq!(v, b"09876543210");
        for s in [0u32, 9, 10, 99, 100, 123_456, u32::MAX] {
            assert_eq!(subject_len(s), subject(s).len());
            let mut o = Vec::new();
            push_subject(&mut o, s);
            assert_eq!(o, subject(s).as_bytes());
        }
    }

    #[test]
    fn readbuf_grows_and_compacts() {
        let data: Vec<u8> = (0..=255u8).cycle().take(10_000).collect();
        let mut src = &data[..];
        let mut rb = ReadBuf::new(16);
        let mut got = Vec::new();
        loop {
            let n = rb.fill(&mut src).unwrap();
            if n == 0 {
                break;
            }
            // consume all but 5 bytes each time (a partial message left behind)
            let keep = rb.data().len().min(5);
            let take = rb.data().len() - keep;
            got.extend_from_slice(&rb.data()[..take]);
            rb.consume(take);
        }
        got.extend_from_slice(rb.data());
        assert_eq!(got, data);
    }
}
