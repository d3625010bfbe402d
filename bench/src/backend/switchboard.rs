//! Switchboard's binary protocol, through the `switchboard-protocol` codec.
//!
//! Session `i` is session id `s.{i}`. Each connection does the HELLO → WELCOME handshake (token
//! from `$SWITCHBOARD_TOKEN`, empty by default), then a gateway sends one SUBSCRIBE per session
//! (from `Live`) and counts the SUBSCRIBED replies; DELIVER payloads go to the sink, decoded in
//! place with the codec's borrowed decoder (as the other backends parse their peers' replies
//! in place; with the owned `decode` the generator spent ~140 ns more CPU per delivery). Publishers
//! send PUBLISH (`client_msg_id` 0: no idempotency window) and their PUBACKs are read and
//! discarded by the [`Replies`] half. Both answer server PINGs and send a PING of their own when
//! they have written nothing for a third of `keepalive_ms`.
//!
//! As an [`AckBackend`] (`loadgen --ack`), a connection's PUBLISH correlation ids are the
//! publish ids: the PUBACK (or an ERROR) carrying that correlation answers it, and the PUBACK's
//! durability field is the claim counted in the report.

use super::{PublisherPair, is_timeout, proto_err, subject, Backend, Gateway, Poll, Publisher, Replies, FLUSH_AT};
use crate::ack::{Ack, AckBackend, AckReceiver, AckSender, Answer};
use bytes::{Buf, Bytes, BytesMut};
use std::io::{self, Read, Write};
use std::net::TcpStream;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};
use switchboard_protocol::{
    decode, peek_frame, DeliverRef, Durability, ErrorCode, Frame, FrameType, Hello, Limits, Ping, Pong, Publish, ResumeFrom, ServerLimits,
    Subscribe, Text, HEADER_BYTES,
};

/// Unconfirmed SUBSCRIBEs allowed in flight during setup.
const IN_FLIGHT: usize = 20_000;
/// Bytes read per `read` call.
const READ_CHUNK: usize = 128 * 1024;

/// The Switchboard backend.
pub struct Switchboard {
    addr: String,
    token: String,
}

impl Switchboard {
    /// A backend for the engine at `addr`; the token comes from `$SWITCHBOARD_TOKEN`.
    pub fn new(addr: &str) -> Self {
        Self { addr: addr.to_string(), token: std::env::var("SWITCHBOARD_TOKEN").unwrap_or_default() }
    }
}

/// One connection after the handshake: socket, read buffer, next correlation id, limits.
struct Conn {
    sock: TcpStream,
    rbuf: BytesMut,
    next_corr: u32,
    limits: ServerLimits,
    last_write: Instant,
}

fn frame_err(f: &Frame) -> Option<io::Error> {
    match f {
        Frame::Error(e) => Some(proto_err(format!(
            "switchboard ERROR {:?} ({}): {}",
            ErrorCode::from_u16(e.code),
            e.code,
            e.message.as_str()
        ))),
        Frame::GoAway(g) => Some(proto_err(format!("switchboard GOAWAY {:?}: {}", g.reason, g.message.as_str()))),
        _ => None,
    }
}

fn encode_into(out: &mut BytesMut, f: &Frame, corr: u32) -> io::Result<()> {
    f.encode(corr, out).map_err(|e| proto_err(format!("encode: {e:?}")))
}

impl Conn {
    fn open(addr: &str, token: &str, name: &str) -> io::Result<Conn> {
        let sock = super::connect(addr)?;
        let mut c = Conn {
            sock,
            rbuf: BytesMut::with_capacity(READ_CHUNK),
            next_corr: 1,
            limits: ServerLimits {
                frame_body_bytes_max: 0,
                payload_bytes_max: 0,
                subscriptions_max: 0,
                history_messages_max: 0,
                keepalive_ms: 0,
                outbound_bytes_max: 0,
            },
            last_write: Instant::now(),
        };
        let hello = Frame::Hello(Hello {
            version_max: 1,
            version_min: 1,
            features: 0,
            client_name: Text::from(name),
            token: Text::from(token),
        });
        let corr = c.corr();
        let mut out = BytesMut::new();
        encode_into(&mut out, &hello, corr)?;
        c.sock.write_all(&out)?;
        let deadline = Instant::now() + Duration::from_secs(10);
        loop {
            if Instant::now() > deadline {
                return Err(io::Error::new(io::ErrorKind::TimedOut, "switchboard: no WELCOME within 10 s"));
            }
            if c.fill()? == Poll::Closed {
                return Err(proto_err("switchboard: server closed the connection during the handshake"));
            }
            if let Some(env) = decode(&mut c.rbuf, &Limits::default()).map_err(|e| proto_err(format!("decode: {e:?}")))? {
                if let Some(e) = frame_err(&env.frame) {
                    return Err(e);
                }
                let Frame::Welcome(w) = env.frame else {
                    return Err(proto_err(format!("switchboard: expected WELCOME, got {:?}", env.frame.frame_type())));
                };
                c.limits = w.limits;
                return Ok(c);
            }
        }
    }

    fn corr(&mut self) -> u32 {
        let c = self.next_corr;
        self.next_corr = self.next_corr.wrapping_add(1).max(1);
        c
    }

    /// Read once into the buffer.
    fn fill(&mut self) -> io::Result<Poll> {
        fill(&mut self.sock, &mut self.rbuf)
    }

    /// Whether a keepalive PING is due.
    fn keepalive_due(&self) -> bool {
        let k = u64::from(self.limits.keepalive_ms);
        k > 0 && self.last_write.elapsed() >= Duration::from_millis(k / 3)
    }
}

thread_local! {
    /// Each reader thread's read scratch, zeroed once. Reading straight into the `BytesMut`
    /// would need its spare room zeroed before every read (128 KiB of memset per wakeup, which
    /// the other backends' readers do not pay); copying the bytes read is far cheaper.
    static READ_SCRATCH: std::cell::RefCell<Vec<u8>> = std::cell::RefCell::new(vec![0; READ_CHUNK]);
}

/// Reads once into `rbuf` (through the thread's scratch).
pub(crate) fn fill(sock: &mut TcpStream, rbuf: &mut BytesMut) -> io::Result<Poll> {
    READ_SCRATCH.with(|scratch| {
        let mut scratch = scratch.borrow_mut();
        match sock.read(&mut scratch[..]) {
            Ok(0) => Ok(Poll::Closed),
            Ok(n) => {
                rbuf.extend_from_slice(&scratch[..n]);
                Ok(Poll::Data)
            }
            Err(e) => {
                if is_timeout(&e) { Ok(Poll::Idle) } else { Err(e) }
            }
        }
    })
}

impl Backend for Switchboard {
    fn name(&self) -> &'static str {
        "switchboard"
    }

    fn gateway(&self, index: usize, sessions: &[u32]) -> io::Result<Box<dyn Gateway>> {
        let conn = Conn::open(&self.addr, &self.token, &format!("loadgen-gateway-{index}"))?;
        let max = conn.limits.subscriptions_max as usize;
        if max > 0 && sessions.len() > max {
            return Err(proto_err(format!(
                "switchboard allows {max} subscriptions per connection; gateway {index} needs {} (use more --gateways)",
                sessions.len()
            )));
        }
        let mut g = SbGateway { conn, sessions: sessions.to_vec(), sent: 0, confirmed: 0 };
        g.send_more()?;
        Ok(Box::new(g))
    }

    fn publisher(&self, index: usize) -> io::Result<PublisherPair> {
        let conn = Conn::open(&self.addr, &self.token, &format!("loadgen-publisher-{index}"))?;
        let pending = Arc::new(Mutex::new(Vec::new()));
        let replies = SbReplies { sock: conn.sock.try_clone()?, rbuf: BytesMut::with_capacity(READ_CHUNK), pongs_due: pending.clone() };
        Ok((
            Box::new(SbPublisher {
                conn,
                out: BytesMut::with_capacity(FLUSH_AT + 4096),
                subjects: Vec::new(),
                sender: Text::from("loadgen"),
                pongs_due: pending,
            }),
            Some(Box::new(replies)),
        ))
    }
}

struct SbGateway {
    conn: Conn,
    sessions: Vec<u32>,
    sent: usize,
    confirmed: usize,
}

impl SbGateway {
    fn send_more(&mut self) -> io::Result<()> {
        let mut out = BytesMut::new();
        while self.sent < self.sessions.len() && self.sent - self.confirmed < IN_FLIGHT && out.len() < FLUSH_AT {
            let s = self.sessions[self.sent];
            let corr = self.conn.corr();
            encode_into(&mut out, &Frame::Subscribe(Subscribe { session: Text::from(subject(s)), from: ResumeFrom::Live }), corr)?;
            self.sent += 1;
        }
        if !out.is_empty() {
            self.conn.sock.write_all(&out)?;
            self.conn.last_write = Instant::now();
        }
        Ok(())
    }

    fn parse(&mut self, sink: &mut dyn FnMut(&[u8])) -> io::Result<()> {
        let limits = Limits::default();
        // DELIVERs (nearly everything a gateway reads) are decoded in place, borrowing the read
        // buffer (the codec's `peek_frame` + `DeliverRef::decode_body`: no reference
        // counts, no copies); anything else, and any error, goes through `decode` below.
        let mut delivered = 0;
        while let Ok(Some((header, body))) = peek_frame(&self.conn.rbuf[delivered..], &limits) {
            if header.frame_type != FrameType::Deliver {
                break;
            }
            let Ok(deliver) = DeliverRef::decode_body(body) else { break };
            sink(deliver.payload);
            delivered += HEADER_BYTES + body.len();
        }
        self.conn.rbuf.advance(delivered);
        let mut out = BytesMut::new();
        while let Some(env) = decode(&mut self.conn.rbuf, &Limits::default()).map_err(|e| proto_err(format!("decode: {e:?}")))? {
            match &env.frame {
                Frame::Deliver(d) => sink(&d.payload),
                Frame::Subscribed(_) => self.confirmed += 1,
                Frame::Ping(p) => encode_into(&mut out, &Frame::Pong(Pong { nonce: p.nonce }), env.correlation)?,
                f => {
                    if let Some(e) = frame_err(f) {
                        return Err(e);
                    }
                }
            }
        }
        if self.conn.keepalive_due() {
            let corr = self.conn.corr();
            encode_into(&mut out, &Frame::Ping(Ping { nonce: u64::from(corr) }), corr)?;
        }
        if !out.is_empty() {
            self.conn.sock.write_all(&out)?;
            self.conn.last_write = Instant::now();
        }
        Ok(())
    }
}

impl Gateway for SbGateway {
    fn wait_ready(&mut self, deadline: Instant) -> io::Result<()> {
        while self.confirmed < self.sessions.len() {
            if Instant::now() > deadline {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("switchboard: {} of {} subscriptions confirmed", self.confirmed, self.sessions.len()),
                ));
            }
            if self.poll(&mut |_| {})? == Poll::Closed {
                return Err(proto_err("switchboard: server closed the connection during setup"));
            }
            self.send_more()?;
        }
        Ok(())
    }

    fn poll(&mut self, sink: &mut dyn FnMut(&[u8])) -> io::Result<Poll> {
        let p = self.conn.fill()?;
        if p != Poll::Closed {
            self.parse(sink)?;
        }
        Ok(p)
    }
}

struct SbPublisher {
    conn: Conn,
    out: BytesMut,
    /// Session id texts, built on first use (cloning a `Text` is a reference count).
    subjects: Vec<Option<Text>>,
    sender: Text,
    /// (correlation, nonce) of server PINGs to answer, queued by the replies thread.
    pongs_due: Arc<Mutex<Vec<(u32, u64)>>>,
}

impl Publisher for SbPublisher {
    fn publish(&mut self, session: u32, payload: &[u8]) -> io::Result<()> {
        let i = session as usize;
        if i >= self.subjects.len() {
            self.subjects.resize(i + 1, None);
        }
        let subj = self.subjects[i].get_or_insert_with(|| Text::from(subject(session))).clone();
        let corr = self.conn.corr();
        let f = Frame::Publish(Publish {
            session: subj,
            client_msg_id: 0,
            trace_id: 0,
            sender: self.sender.clone(),
            payload: Bytes::copy_from_slice(payload),
        });
        encode_into(&mut self.out, &f, corr)?;
        if self.out.len() >= FLUSH_AT {
            self.flush()?;
        }
        Ok(())
    }

    fn flush(&mut self) -> io::Result<()> {
        let due: Vec<(u32, u64)> = std::mem::take(&mut *self.pongs_due.lock().unwrap());
        for (corr, nonce) in due {
            encode_into(&mut self.out, &Frame::Pong(Pong { nonce }), corr)?;
        }
        if self.out.is_empty() && self.conn.keepalive_due() {
            let corr = self.conn.corr();
            encode_into(&mut self.out, &Frame::Ping(Ping { nonce: u64::from(corr) }), corr)?;
        }
        if !self.out.is_empty() {
            self.conn.sock.write_all(&self.out)?;
            self.out.clear();
            self.conn.last_write = Instant::now();
        }
        Ok(())
    }
}

/// Reads PUBACKs (discarded), PONGs and server PINGs (answered by the publisher at its next
/// flush, so only one thread writes the socket); ERROR and GOAWAY end the run.
struct SbReplies {
    sock: TcpStream,
    rbuf: BytesMut,
    pongs_due: Arc<Mutex<Vec<(u32, u64)>>>,
}

impl Replies for SbReplies {
    fn poll(&mut self) -> io::Result<Poll> {
        let p = fill(&mut self.sock, &mut self.rbuf)?;
        while let Some(env) = decode(&mut self.rbuf, &Limits::default()).map_err(|e| proto_err(format!("decode: {e:?}")))? {
            match &env.frame {
                Frame::Ping(ping) => self.pongs_due.lock().unwrap().push((env.correlation, ping.nonce)),
                f => {
                    if let Some(e) = frame_err(f) {
                        return Err(e);
                    }
                }
            }
        }
        Ok(p)
    }
}

/// The label reported for a PUBACK's durability.
pub fn durability_label(d: Durability) -> &'static str {
    match d {
        Durability::Memory => "memory",
        Durability::Interval => "interval",
        Durability::Sync => "sync",
    }
}

/// What one frame read by an acknowledgement receiver means for the run.
#[derive(Debug, PartialEq, Eq)]
enum AckFrame {
    /// An answer to the publish with this correlation id.
    Answer(Ack),
    /// A server PING to answer: (correlation, nonce).
    Ping(u32, u64),
    /// The connection is over (GOAWAY).
    End(String),
    /// Nothing for the run (PONG, …).
    Other,
}

/// Classify one decoded frame: PUBACK and ERROR answer the publish whose correlation they
/// carry (an ERROR for no outstanding publish is then counted as unexpected).
fn ack_frame(correlation: u32, f: &Frame) -> AckFrame {
    match f {
        Frame::PubAck(a) => AckFrame::Answer(Ack { id: u64::from(correlation), answer: Answer::Ok { claim: durability_label(a.durability) } }),
        Frame::Error(e) => AckFrame::Answer(Ack {
            id: u64::from(correlation),
            answer: Answer::Err(format!("ERROR {:?} ({}): {}", ErrorCode::from_u16(e.code), e.code, e.message.as_str())),
        }),
        Frame::GoAway(g) => AckFrame::End(format!("switchboard GOAWAY {:?}: {}", g.reason, g.message.as_str())),
        Frame::Ping(p) => AckFrame::Ping(correlation, p.nonce),
        _ => AckFrame::Other,
    }
}

impl AckBackend for Switchboard {
    fn name(&self) -> &'static str {
        "switchboard"
    }

    fn connect(&self, index: usize) -> io::Result<(Box<dyn AckSender>, Box<dyn AckReceiver>)> {
        let conn = Conn::open(&self.addr, &self.token, &format!("loadgen-ack-{index}"))?;
        let pongs_due = Arc::new(Mutex::new(Vec::new()));
        let receiver = SbAckReceiver { sock: conn.sock.try_clone()?, rbuf: BytesMut::with_capacity(READ_CHUNK), pongs_due: pongs_due.clone() };
        let sender = SbPublisher {
            conn,
            out: BytesMut::with_capacity(FLUSH_AT + 4096),
            subjects: Vec::new(),
            sender: Text::from("loadgen"),
            pongs_due,
        };
        Ok((Box::new(SbAckSender(sender)), Box::new(receiver)))
    }
}

/// An [`SbPublisher`] that returns each PUBLISH's correlation id and only writes on flush.
struct SbAckSender(SbPublisher);

impl AckSender for SbAckSender {
    fn publish(&mut self, session: u32, payload: &[u8]) -> io::Result<u64> {
        let p = &mut self.0;
        let i = session as usize;
        if i >= p.subjects.len() {
            p.subjects.resize(i + 1, None);
        }
        let subj = p.subjects[i].get_or_insert_with(|| Text::from(subject(session))).clone();
        let corr = p.conn.corr();
        let f = Frame::Publish(Publish {
            session: subj,
            client_msg_id: 0,
            trace_id: 0,
            sender: p.sender.clone(),
            payload: Bytes::copy_from_slice(payload),
        });
        encode_into(&mut p.out, &f, corr)?;
        Ok(u64::from(corr))
    }

    fn flush(&mut self) -> io::Result<()> {
        Publisher::flush(&mut self.0)
    }
}

struct SbAckReceiver {
    sock: TcpStream,
    rbuf: BytesMut,
    pongs_due: Arc<Mutex<Vec<(u32, u64)>>>,
}

impl AckReceiver for SbAckReceiver {
    fn poll(&mut self, sink: &mut dyn FnMut(Ack)) -> io::Result<Poll> {
        let p = fill(&mut self.sock, &mut self.rbuf)?;
        while let Some(env) = decode(&mut self.rbuf, &Limits::default()).map_err(|e| proto_err(format!("decode: {e:?}")))? {
            match ack_frame(env.correlation, &env.frame) {
                AckFrame::Answer(a) => sink(a),
                AckFrame::Ping(corr, nonce) => self.pongs_due.lock().unwrap().push((corr, nonce)),
                AckFrame::End(why) => return Err(proto_err(why)),
                AckFrame::Other => {}
            }
        }
        Ok(p)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use switchboard_protocol::{ErrorFrame, GoAway, GoAwayReason, PubAck};

    /// Frames as the server writes them, decoded back and classified.
    #[test]
    fn puback_error_and_goaway_are_classified_from_the_wire() {
        let mut wire = BytesMut::new();
        for d in Durability::ALL {
            let ack = PubAck { session: Text::from("s.1"), client_msg_id: 0, epoch: 1, seq: 7, duplicate: false, durability: *d };
            Frame::PubAck(ack).encode(40 + u32::from(*d as u8), &mut wire).unwrap();
        }
        Frame::Error(ErrorFrame { code: ErrorCode::Malformed.as_u16(), message: Text::from("journal failed") }).encode(9, &mut wire).unwrap();
        Frame::Ping(Ping { nonce: 5 }).encode(3, &mut wire).unwrap();
        Frame::GoAway(GoAway { reason: GoAwayReason::Shutdown, reconnect_after_ms: 0, message: Text::from("bye") }).encode(0, &mut wire).unwrap();
        let mut got = Vec::new();
        while let Some(env) = decode(&mut wire, &Limits::default()).unwrap() {
            got.push(ack_frame(env.correlation, &env.frame));
        }
        let claims: Vec<_> = got[..3].iter().map(|f| match f {
            AckFrame::Answer(Ack { id, answer: Answer::Ok { claim } }) => (*id, *claim),
            other => panic!("{other:?}"),
        }).collect();
        assert_eq!(claims, vec![(40, "memory"), (41, "interval"), (42, "sync")]);
        assert!(matches!(&got[3], AckFrame::Answer(Ack { id: 9, answer: Answer::Err(t) }) if t.contains("journal failed")));
        assert_eq!(got[4], AckFrame::Ping(3, 5));
        assert!(matches!(&got[5], AckFrame::End(t) if t.contains("bye")));
        assert!(wire.is_empty());
    }
}
