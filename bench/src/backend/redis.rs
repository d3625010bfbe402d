//! Redis pub/sub over RESP2: `SUBSCRIBE` / `PUBLISH`.
//!
//! Session `i` is channel `s.{i}`. A gateway sends SUBSCRIBE in chunks of channels and counts
//! the `subscribe` confirmations (interleaving writes and reads, so neither side's buffer fills
//! during setup with 100 000 sessions). A publisher's `:N` integer replies are read and
//! discarded by its [`Replies`] half.

use super::{PublisherPair, 
    connect, find_crlf, is_timeout, parse_u64, proto_err, push_subject, push_u64, subject_len,
    Backend, Gateway, Poll, Publisher, ReadBuf, Replies, FLUSH_AT,
};
use std::io::{self, Write};
use std::net::TcpStream;
use std::time::Instant;

/// Channels per SUBSCRIBE command.
const CHUNK: usize = 1000;
/// Unconfirmed subscriptions allowed in flight during setup.
const IN_FLIGHT: usize = 20_000;

/// The Redis backend.
pub struct Redis {
    addr: String,
}

impl Redis {
    /// A backend for the server at `addr`.
    pub fn new(addr: &str) -> Self {
        Self { addr: addr.to_string() }
    }
}

impl Backend for Redis {
    fn name(&self) -> &'static str {
        "redis"
    }

    fn gateway(&self, _index: usize, sessions: &[u32]) -> io::Result<Box<dyn Gateway>> {
        let sock = connect(&self.addr)?;
        let mut g = RedisGateway { sock, rb: ReadBuf::new(1 << 18), sessions: sessions.to_vec(), sent: 0, confirmed: 0 };
        g.send_more()?;
        Ok(Box::new(g))
    }

    fn publisher(&self, _index: usize) -> io::Result<PublisherPair> {
        let sock = connect(&self.addr)?;
        let replies = RedisReplies { sock: sock.try_clone()?, rb: ReadBuf::new(1 << 16), replies: 0 };
        Ok((Box::new(RedisPublisher { sock, out: Vec::with_capacity(FLUSH_AT + 4096) }), Some(Box::new(replies))))
    }
}

/// One RESP value at the top level or inside an array (arrays are only one level deep here).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Elem {
    /// `$len` bulk string: byte range in the parsed buffer (`None` = null).
    Bulk(Option<(usize, usize)>),
    /// `:n` integer.
    Int(i64),
    /// `+text` (range).
    Simple(usize, usize),
    /// `*n` array header.
    Array(usize),
}

/// Parse one element at `b[at..]`: `Ok(None)` if incomplete, else the element and the offset
/// just past it.
fn parse_elem(b: &[u8], at: usize) -> io::Result<Option<(Elem, usize)>> {
    let rest = &b[at..];
    let Some(eol) = find_crlf(rest) else {
        if rest.len() > 4096 {
            return Err(proto_err("Redis: RESP line longer than 4 KiB"));
        }
        return Ok(None);
    };
    if eol == 0 {
        return Err(proto_err("Redis: empty RESP line"));
    }
    let body = &rest[1..eol];
    let next = at + eol + 2;
    let bad = || proto_err(format!("Redis: bad RESP line {:?}", String::from_utf8_lossy(&rest[..eol])));
    let elem = match rest[0] {
        b'$' => {
            if body == b"-1" {
                return Ok(Some((Elem::Bulk(None), next)));
            }
            let len = parse_u64(body).ok_or_else(bad)? as usize;
            if b.len() < next + len + 2 {
                return Ok(None);
            }
            return Ok(Some((Elem::Bulk(Some((next, next + len))), next + len + 2)));
        }
        b':' => {
            let (neg, digits) = if body.first() == Some(&b'-') { (true, &body[1..]) } else { (false, body) };
            let v = parse_u64(digits).ok_or_else(bad)? as i64;
            Elem::Int(if neg { -v } else { v })
        }
        b'*' => Elem::Array(if body == b"-1" { 0 } else { parse_u64(body).ok_or_else(bad)? as usize }),
        b'+' => Elem::Simple(at + 1, at + eol),
        b'-' => return Err(proto_err(format!("Redis server: {}", String::from_utf8_lossy(body)))),
        _ => return Err(bad()),
    };
    Ok(Some((elem, next)))
}

/// A parsed top-level reply: up to 4 array items (pub/sub pushes have 3 or 4).
struct Reply {
    items: [Elem; 4],
    n: usize,
}

/// Parse one complete top-level reply at the front of `b`.
fn parse_reply(b: &[u8]) -> io::Result<Option<(Reply, usize)>> {
    let Some((head, mut at)) = parse_elem(b, 0)? else { return Ok(None) };
    let mut r = Reply { items: [Elem::Int(0); 4], n: 0 };
    match head {
        Elem::Array(n) => {
            if n > 4 {
                return Err(proto_err(format!("Redis: unexpected {n}-element reply")));
            }
            for i in 0..n {
                let Some((e, next)) = parse_elem(b, at)? else { return Ok(None) };
                if let Elem::Array(_) = e {
                    return Err(proto_err("Redis: nested array in a pub/sub reply"));
                }
                r.items[i] = e;
                at = next;
            }
            r.n = n;
        }
        other => {
            r.items[0] = other;
            r.n = 1;
        }
    }
    Ok(Some((r, at)))
}

fn bulk<'a>(b: &'a [u8], e: &Elem) -> Option<&'a [u8]> {
    match e {
        Elem::Bulk(Some((s, t))) => Some(&b[*s..*t]),
        _ => None,
    }
}

struct RedisGateway {
    sock: TcpStream,
    rb: ReadBuf,
    sessions: Vec<u32>,
    sent: usize,
    confirmed: usize,
}

impl RedisGateway {
    /// Send further SUBSCRIBE chunks while fewer than [`IN_FLIGHT`] are unconfirmed.
    fn send_more(&mut self) -> io::Result<()> {
        let mut out = Vec::new();
        while self.sent < self.sessions.len() && self.sent - self.confirmed < IN_FLIGHT {
            let chunk = &self.sessions[self.sent..(self.sent + CHUNK).min(self.sessions.len())];
            out.push(b'*');
            push_u64(&mut out, chunk.len() as u64 + 1);
            out.extend_from_slice(b"\r\n$9\r\nSUBSCRIBE\r\n");
            for &s in chunk {
                out.push(b'$');
                push_u64(&mut out, subject_len(s) as u64);
                out.extend_from_slice(b"\r\n");
                push_subject(&mut out, s);
                out.extend_from_slice(b"\r\n");
            }
            self.sent += chunk.len();
        }
        if !out.is_empty() {
            self.sock.write_all(&out)?;
        }
        Ok(())
    }
}

impl Gateway for RedisGateway {
    fn wait_ready(&mut self, deadline: Instant) -> io::Result<()> {
        while self.confirmed < self.sessions.len() {
            if Instant::now() > deadline {
                return Err(io::Error::new(
                    io::ErrorKind::TimedOut,
                    format!("Redis: {} of {} subscriptions confirmed", self.confirmed, self.sessions.len()),
                ));
            }
            if let Poll::Closed = self.poll(&mut |_| {})? {
                return Err(proto_err("Redis: server closed the connection during setup"));
            }
            self.send_more()?;
        }
        Ok(())
    }

    fn poll(&mut self, sink: &mut dyn FnMut(&[u8])) -> io::Result<Poll> {
        match self.rb.fill(&mut self.sock) {
            Ok(0) => return Ok(Poll::Closed),
            Ok(_) => {}
            Err(e) if is_timeout(&e) => return Ok(Poll::Idle),
            Err(e) => return Err(e),
        }
        loop {
            let data = self.rb.data();
            let Some((r, used)) = parse_reply(data)? else { break };
            if r.n == 3 {
                match bulk(data, &r.items[0]) {
                    Some(b"message") => {
                        if let Some(p) = bulk(data, &r.items[2]) {
                            sink(p);
                        }
                    }
                    Some(b"subscribe") => self.confirmed += 1,
                    _ => {}
                }
            }
            self.rb.consume(used);
        }
        Ok(Poll::Data)
    }
}

struct RedisPublisher {
    sock: TcpStream,
    out: Vec<u8>,
}

impl Publisher for RedisPublisher {
    fn publish(&mut self, session: u32, payload: &[u8]) -> io::Result<()> {
        let out = &mut self.out;
        out.extend_from_slice(b"*3\r\n$7\r\nPUBLISH\r\n$");
        push_u64(out, subject_len(session) as u64);
        out.extend_from_slice(b"\r\n");
        push_subject(out, session);
        out.extend_from_slice(b"\r\n$");
        push_u64(out, payload.len() as u64);
        out.extend_from_slice(b"\r\n");
        out.extend_from_slice(payload);
        out.extend_from_slice(b"\r\n");
        if out.len() >= FLUSH_AT {
            self.flush()?;
        }
        Ok(())
    }

    fn flush(&mut self) -> io::Result<()> {
        if !self.out.is_empty() {
            self.sock.write_all(&self.out)?;
            self.out.clear();
        }
        Ok(())
    }
}

/// Reads and discards PUBLISH replies (`:N`, the number of receivers).
struct RedisReplies {
    sock: TcpStream,
    rb: ReadBuf,
    replies: u64,
}

impl Replies for RedisReplies {
    fn poll(&mut self) -> io::Result<Poll> {
        match self.rb.fill(&mut self.sock) {
            Ok(0) => return Ok(Poll::Closed),
            Ok(_) => {}
            Err(e) if is_timeout(&e) => return Ok(Poll::Idle),
            Err(e) => return Err(e),
        }
        while let Some((_, used)) = parse_reply(self.rb.data())? {
            self.replies += 1;
            self.rb.consume(used);
        }
        Ok(Poll::Data)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_pubsub_incrementally() {
        let wire: &[u8] = b"*3\r\n$9\r\nsubscribe\r\n$3\r\ns.1\r\n:1\r\n*3\r\n$7\r\nmessage\r\n$3\r\ns.1\r\n$5\r\nhe\r\no\r\n:3\r\n+OK\r\n";
        for cut in 0..wire.len() {
            let mut b = &wire[..cut];
            while let Some((_, used)) = parse_reply(b).unwrap() {
                b = &b[used..];
            }
        }
        let mut b = wire;
        let (r, used) = parse_reply(b).unwrap().unwrap();
        assert_eq!((r.n, bulk(b, &r.items[0])), (3, Some(&b"subscribe"[..])));
        assert_eq!(r.items[2], Elem::Int(1));
        b = &b[used..];
        let (r, used) = parse_reply(b).unwrap().unwrap();
        assert_eq!(bulk(b, &r.items[0]), Some(&b"message"[..]));
        assert_eq!(bulk(b, &r.items[2]), Some(&b"he\r\no"[..]));
        b = &b[used..];
        let (r, used) = parse_reply(b).unwrap().unwrap();
        assert_eq!((r.n, r.items[0]), (1, Elem::Int(3)));
        b = &b[used..];
        let (r, used) = parse_reply(b).unwrap().unwrap();
        assert!(matches!(r.items[0], Elem::Simple(_, _)));
        assert_eq!(used, b.len());
        assert!(parse_reply(b"-ERR wrong\r\n").is_err());
        assert_eq!(parse_reply(b":-5\r\n").unwrap().unwrap().0.items[0], Elem::Int(-5));
    }
}
