//! NATS `JetStream` publish acknowledgements, spoken by hand over the core NATS text protocol
//! (the same parser as [`super::nats`]; no client crate).
//!
//! Setup creates one stream, [`STREAM`], over the subjects `s.>` with file storage and a byte
//! limit ([`STREAM_BYTES_MAX`], oldest discarded) through `$JS.API.STREAM.CREATE.<name>`.
//! Connection `i` subscribes `_INBOX.sb{i}.*` and publishes `PUB s.{session} _INBOX.sb{i}.{id}`;
//! `JetStream` answers each stored message on its reply subject with `{"stream":..,"seq":..}`
//! (or `{"error":{..}}`), so the reply subject's last token is the publish id. Many publishes
//! are in flight per connection (asynchronous publish).
//!
//! What the acknowledgement claims: the message is in the stream's file store. nats-server 2.9
//! writes it to the OS before acknowledging and fsyncs on a timer (every 2 minutes by default;
//! the `sync_interval` option only exists from 2.10), so the claim is labelled
//! `jetstream-file`: it survives a process kill, not a power loss (like Switchboard's
//! `interval`, not its `sync`).

use super::nats::{parse_op, Op, CONNECT};
use super::{connect, is_timeout, proto_err, push_subject, push_u64, Poll, ReadBuf, FLUSH_AT};
use crate::ack::{Ack, AckBackend, AckReceiver, AckSender, Answer};
use std::io::{self, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The stream every run publishes into.
pub const STREAM: &str = "SB";
/// The stream's byte limit (oldest messages discarded beyond it): bounds the disk a run uses.
pub const STREAM_BYTES_MAX: u64 = 1 << 30;
/// Longest wait for the stream to be created or a connection to be confirmed.
const SETUP_TIMEOUT: Duration = Duration::from_secs(10);
/// The claim label of a `JetStream` acknowledgement.
pub const CLAIM: &str = "jetstream-file";

/// The `JetStream` backend.
pub struct JetStream {
    addr: String,
}

impl JetStream {
    /// A backend for the server (started with `-js`) at `addr`.
    pub fn new(addr: &str) -> Self {
        Self { addr: addr.to_string() }
    }
}

/// The `$JS.API.STREAM.CREATE` request body.
pub fn stream_config() -> String {
    format!(
        r#"{{"name":"{STREAM}","subjects":["s.>"],"retention":"limits","storage":"file","num_replicas":1,"discard":"old","max_msgs":-1,"max_bytes":{STREAM_BYTES_MAX},"max_age":0}}"#
    )
}

/// What a `JetStream` API or publish reply says: `Ok` unless it carries an `error` object.
pub fn parse_reply(payload: &[u8]) -> Answer {
    #[derive(serde::Deserialize)]
    struct Reply {
        error: Option<serde_json::Value>,
        seq: Option<u64>,
        #[serde(rename = "type")]
        kind: Option<String>,
    }
    match serde_json::from_slice::<Reply>(payload) {
        Ok(Reply { error: Some(e), .. }) => Answer::Err(format!("JetStream: {e}")),
        // A publish ack has a seq; an API response has a type.
        Ok(Reply { seq: Some(_), .. } | Reply { kind: Some(_), .. }) => Answer::Ok { claim: CLAIM },
        Ok(_) => Answer::Err(format!("JetStream: reply without seq: {}", String::from_utf8_lossy(payload))),
        Err(e) => Answer::Err(format!("JetStream: bad reply ({e}): {}", String::from_utf8_lossy(payload))),
    }
}

/// The publish id in a reply subject `_INBOX.sb{i}.{id}`.
pub fn reply_id(subject: &[u8]) -> Option<u64> {
    let dot = subject.iter().rposition(|&c| c == b'.')?;
    super::parse_u64(&subject[dot + 1..])
}

/// The subject of a `MSG <subject> <sid> [reply] <len>` line.
fn msg_subject(line: &[u8]) -> &[u8] {
    line.split(|&c| c == b' ').nth(1).unwrap_or_default()
}

/// Read until the MSG answering our inbox (sid 1), answering nothing else; `-ERR` is an error.
fn read_reply(sock: &mut TcpStream, rb: &mut ReadBuf, want_pong: bool) -> io::Result<Vec<u8>> {
    let deadline = Instant::now() + SETUP_TIMEOUT;
    loop {
        while let Some((op, used)) = parse_op(rb.data())? {
            let data = rb.data();
            let found = match op {
                Op::Msg { payload_start, len } if !want_pong => Some(data[payload_start..payload_start + len].to_vec()),
                Op::Pong if want_pong => Some(Vec::new()),
                Op::Ping => {
                    sock.write_all(b"PONG\r\n")?;
                    None
                }
                _ => None,
            };
            rb.consume(used);
            if let Some(f) = found {
                return Ok(f);
            }
        }
        if Instant::now() > deadline {
            return Err(io::Error::new(io::ErrorKind::TimedOut, "JetStream: no reply within 10 s"));
        }
        match rb.fill(sock) {
            Ok(0) => return Err(proto_err("JetStream: server closed the connection during setup")),
            Ok(_) => {}
            Err(e) if is_timeout(&e) => {}
            Err(e) => return Err(e),
        }
    }
}

impl AckBackend for JetStream {
    fn name(&self) -> &'static str {
        "jetstream"
    }

    fn setup(&self) -> io::Result<()> {
        let mut sock = connect(&self.addr)?;
        let body = stream_config();
        let mut out = Vec::new();
        out.extend_from_slice(CONNECT);
        out.extend_from_slice(b"SUB _INBOX.sbsetup 1\r\n");
        out.extend_from_slice(format!("PUB $JS.API.STREAM.CREATE.{STREAM} _INBOX.sbsetup {}\r\n", body.len()).as_bytes());
        out.extend_from_slice(body.as_bytes());
        out.extend_from_slice(b"\r\n");
        sock.write_all(&out)?;
        let mut rb = ReadBuf::new(1 << 14);
        let reply = read_reply(&mut sock, &mut rb, false)?;
        match parse_reply(&reply) {
            Answer::Ok { .. } => Ok(()),
            Answer::Err(e) => Err(proto_err(format!(
                "creating stream {STREAM} failed (is nats-server running with -js?): {e}"
            ))),
        }
    }

    fn connect(&self, index: usize) -> io::Result<(Box<dyn AckSender>, Box<dyn AckReceiver>)> {
        let mut sock = connect(&self.addr)?;
        let mut out = Vec::new();
        out.extend_from_slice(CONNECT);
        out.extend_from_slice(format!("SUB _INBOX.sb{index}.* 1\r\nPING\r\n").as_bytes());
        sock.write_all(&out)?;
        let mut rb = ReadBuf::new(1 << 18);
        read_reply(&mut sock, &mut rb, true)?;
        if !rb.data().is_empty() {
            return Err(proto_err("JetStream: unexpected bytes after the setup PONG"));
        }
        let pong_due = Arc::new(AtomicBool::new(false));
        let receiver = JsReceiver { sock: sock.try_clone()?, rb, pong_due: pong_due.clone() };
        let inbox = format!("_INBOX.sb{index}.").into_bytes();
        Ok((Box::new(JsSender { sock, out: Vec::with_capacity(FLUSH_AT + 4096), inbox, next: 1, pong_due }), Box::new(receiver)))
    }
}

struct JsSender {
    sock: TcpStream,
    out: Vec<u8>,
    inbox: Vec<u8>,
    next: u64,
    pong_due: Arc<AtomicBool>,
}

impl AckSender for JsSender {
    fn publish(&mut self, session: u32, payload: &[u8]) -> io::Result<u64> {
        let id = self.next;
        self.next += 1;
        let out = &mut self.out;
        out.extend_from_slice(b"PUB ");
        push_subject(out, session);
        out.push(b' ');
        out.extend_from_slice(&self.inbox);
        push_u64(out, id);
        out.push(b' ');
        push_u64(out, payload.len() as u64);
        out.extend_from_slice(b"\r\n");
        out.extend_from_slice(payload);
        out.extend_from_slice(b"\r\n");
        Ok(id)
    }

    fn flush(&mut self) -> io::Result<()> {
        if self.pong_due.swap(false, Ordering::Relaxed) {
            self.out.extend_from_slice(b"PONG\r\n");
        }
        if !self.out.is_empty() {
            self.sock.write_all(&self.out)?;
            self.out.clear();
        }
        Ok(())
    }
}

/// Hand every complete acknowledgement in `rb` to `sink` and consume it; a server PING sets
/// `pong_due` (the sender answers it).
fn parse_acks(rb: &mut ReadBuf, sink: &mut dyn FnMut(Ack), pong_due: &AtomicBool) -> io::Result<()> {
    while let Some((op, used)) = parse_op(rb.data())? {
        let data = rb.data();
        match op {
            Op::Msg { payload_start, len } => {
                let subject = msg_subject(&data[..payload_start - 2]);
                let Some(id) = reply_id(subject) else {
                    return Err(proto_err(format!("JetStream: reply on unexpected subject {}", String::from_utf8_lossy(subject))));
                };
                sink(Ack { id, answer: parse_reply(&data[payload_start..payload_start + len]) });
            }
            Op::Ping => pong_due.store(true, Ordering::Relaxed),
            Op::Pong | Op::Other => {}
        }
        rb.consume(used);
    }
    Ok(())
}

struct JsReceiver {
    sock: TcpStream,
    rb: ReadBuf,
    pong_due: Arc<AtomicBool>,
}

impl AckReceiver for JsReceiver {
    fn poll(&mut self, sink: &mut dyn FnMut(Ack)) -> io::Result<Poll> {
        match self.rb.fill(&mut self.sock) {
            Ok(0) => return Ok(Poll::Closed),
            Ok(_) => {}
            Err(e) if is_timeout(&e) => return Ok(Poll::Idle),
            Err(e) => return Err(e),
        }
        parse_acks(&mut self.rb, sink, &self.pong_due)?;
        Ok(Poll::Data)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replies_and_ids() {
        assert_eq!(parse_reply(br#"{"stream":"SB","seq":42}"#), Answer::Ok { claim: CLAIM });
        assert_eq!(parse_reply(br#"{"stream":"SB","seq":43,"duplicate":true}"#), Answer::Ok { claim: CLAIM });
        let created = br#"{"type":"io.nats.jetstream.api.v1.stream_create_response","config":{"name":"SB"}}"#;
        assert_eq!(parse_reply(created), Answer::Ok { claim: CLAIM });
        let err = br#"{"error":{"code":503,"err_code":10077,"description":"maximum messages exceeded"}}"#;
        assert!(matches!(parse_reply(err), Answer::Err(t) if t.contains("maximum messages exceeded")));
        assert!(matches!(parse_reply(br#"{"stream":"SB"}"#), Answer::Err(_)));
        assert!(matches!(parse_reply(b"not json"), Answer::Err(_)));
        assert_eq!(reply_id(b"_INBOX.sb3.17"), Some(17));
        assert_eq!(reply_id(b"_INBOX.sb3.x"), None);
        assert_eq!(reply_id(b"nodot"), None);
        assert_eq!(msg_subject(b"MSG _INBOX.sb0.5 1 25"), b"_INBOX.sb0.5");
        let cfg: serde_json::Value = serde_json::from_str(&stream_config()).unwrap();
        assert_eq!(cfg["storage"], "file");
        assert_eq!(cfg["subjects"][0], "s.>");
    }

    /// The receiver's parser fed the server's bytes split at every position settles the same
    /// answers and flags the PING once.
    #[test]
    fn receiver_parses_split_input() {
        let ok = br#"{"stream":"SB","seq":1}"#;
        let err = br#"{"error":{"code":503,"description":"full"}}"#;
        let mut wire = format!("MSG _INBOX.sb0.1 1 {}\r\n", ok.len()).into_bytes();
        wire.extend_from_slice(ok);
        wire.extend_from_slice(b"\r\nPING\r\n");
        wire.extend_from_slice(format!("MSG _INBOX.sb0.2 1 {}\r\n", err.len()).as_bytes());
        wire.extend_from_slice(err);
        wire.extend_from_slice(b"\r\n");
        for cut in 0..wire.len() {
            let mut rb = ReadBuf::new(8);
            let pong = AtomicBool::new(false);
            let mut got = Vec::new();
            for part in [&wire[..cut], &wire[cut..]] {
                let mut src = part;
                while rb.fill(&mut src).unwrap() > 0 {}
                parse_acks(&mut rb, &mut |a| got.push(a), &pong).unwrap();
            }
            assert!(rb.data().is_empty(), "cut {cut}");
            assert!(pong.load(Ordering::Relaxed));
            assert_eq!(got.len(), 2, "cut {cut}");
            assert_eq!(got[0], Ack { id: 1, answer: Answer::Ok { claim: CLAIM } });
            assert!(matches!(&got[1], Ack { id: 2, answer: Answer::Err(t) } if t.contains("full")));
        }
        let mut rb = ReadBuf::new(64);
        let mut src: &[u8] = b"MSG other.subject 1 2\r\n{}\r\n";
        rb.fill(&mut src).unwrap();
        assert!(parse_acks(&mut rb, &mut |_| {}, &AtomicBool::new(false)).is_err());
    }
}
