//! Core NATS text protocol: `CONNECT`, `SUB`, `PUB`, `MSG`, `PING`/`PONG`.
//!
//! Session `i` is subject `s.{i}`; a gateway subscribes with sid = session index. After the
//! SUBs a gateway sends a PING: the server answers PONG only after it processed everything
//! before it, so the PONG means every SUB is registered.

use super::{PublisherPair, 
    connect, find_crlf, is_timeout, parse_u64, proto_err, push_subject, push_u64, Backend,
    Gateway, Poll, Publisher, ReadBuf, Replies, FLUSH_AT,
};
use std::io::{self, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Instant;

pub(crate) const CONNECT: &[u8] = b"CONNECT {\"verbose\":false,\"pedantic\":false,\"name\":\"switchboard-loadgen\"}\r\n";

/// The NATS backend.
pub struct Nats {
    addr: String,
}

impl Nats {
    /// A backend for the server at `addr`.
    pub fn new(addr: &str) -> Self {
        Self { addr: addr.to_string() }
    }
}

impl Backend for Nats {
    fn name(&self) -> &'static str {
        "nats"
    }

    fn gateway(&self, _index: usize, sessions: &[u32]) -> io::Result<Box<dyn Gateway>> {
        let mut sock = connect(&self.addr)?;
        let mut out = Vec::with_capacity(64 + sessions.len() * 24);
        out.extend_from_slice(CONNECT);
        for &s in sessions {
            out.extend_from_slice(b"SUB ");
            push_subject(&mut out, s);
            out.push(b' ');
            push_u64(&mut out, u64::from(s));
            out.extend_from_slice(b"\r\n");
        }
        out.extend_from_slice(b"PING\r\n");
        // The server does not answer SUBs (verbose off), so writing them all at once cannot
        // deadlock on a full receive buffer of ours.
        sock.write_all(&out)?;
        Ok(Box::new(NatsGateway { sock, rb: ReadBuf::new(1 << 18), pongs: 0 }))
    }

    fn publisher(&self, _index: usize) -> io::Result<PublisherPair> {
        let mut sock = connect(&self.addr)?;
        sock.write_all(CONNECT)?;
        let pong_due = Arc::new(AtomicBool::new(false));
        let replies = NatsReplies { sock: sock.try_clone()?, rb: ReadBuf::new(1 << 14), pong_due: pong_due.clone() };
        let publisher = NatsPublisher { sock, out: Vec::with_capacity(FLUSH_AT + 4096), pong_due };
        Ok((Box::new(publisher), Some(Box::new(replies))))
    }
}

/// What one parsed protocol line was.
pub(crate) enum Op {
    Msg { payload_start: usize, len: usize },
    Ping,
    Pong,
    Other,
}

/// Parse one complete operation at the front of `b`: `Ok(None)` if incomplete; on success the
/// operation and the bytes it took.
pub(crate) fn parse_op(b: &[u8]) -> io::Result<Option<(Op, usize)>> {
    let Some(eol) = find_crlf(b) else {
        if b.len() > 4096 {
            return Err(proto_err("NATS: protocol line longer than 4 KiB"));
        }
        return Ok(None);
    };
    let line = &b[..eol];
    if line.starts_with(b"MSG ") {
        // MSG <subject> <sid> [reply-to] <#bytes>
        let len_field = line.rsplit(|&c| c == b' ').next().unwrap_or_default();
        let len = parse_u64(len_field).ok_or_else(|| proto_err("NATS: bad MSG length"))? as usize;
        let need = eol + 2 + len + 2;
        if b.len() < need {
            return Ok(None);
        }
        return Ok(Some((Op::Msg { payload_start: eol + 2, len }, need)));
    }
    let op = if line == b"PING" {
        Op::Ping
    } else if line == b"PONG" {
        Op::Pong
    } else if line.starts_with(b"-ERR") {
        return Err(proto_err(format!("NATS server: {}", String::from_utf8_lossy(line))));
    } else {
        Op::Other // INFO, +OK
    };
    Ok(Some((op, eol + 2)))
}

struct NatsGateway {
    sock: TcpStream,
    rb: ReadBuf,
    pongs: u64,
}

impl NatsGateway {
    /// Parse everything complete in the buffer; answer PINGs.
    fn parse(&mut self, sink: &mut dyn FnMut(&[u8])) -> io::Result<()> {
        let mut pings = 0;
        loop {
            let data = self.rb.data();
            let Some((op, used)) = parse_op(data)? else { break };
            match op {
                Op::Msg { payload_start, len } => sink(&data[payload_start..payload_start + len]),
                Op::Ping => pings += 1,
                Op::Pong => self.pongs += 1,
                Op::Other => {}
            }
            self.rb.consume(used);
        }
        for _ in 0..pings {
            self.sock.write_all(b"PONG\r\n")?;
        }
        Ok(())
    }
}

impl Gateway for NatsGateway {
    fn wait_ready(&mut self, deadline: Instant) -> io::Result<()> {
        while self.pongs == 0 {
            if Instant::now() > deadline {
                return Err(io::Error::new(io::ErrorKind::TimedOut, "NATS: no PONG after SUBs"));
            }
            match self.poll(&mut |_| {})? {
                Poll::Closed => return Err(proto_err("NATS: server closed the connection during setup")),
                Poll::Data | Poll::Idle => {}
            }
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
        self.parse(sink)?;
        Ok(Poll::Data)
    }
}

struct NatsPublisher {
    sock: TcpStream,
    out: Vec<u8>,
    pong_due: Arc<AtomicBool>,
}

impl Publisher for NatsPublisher {
    fn publish(&mut self, session: u32, payload: &[u8]) -> io::Result<()> {
        let out = &mut self.out;
        out.extend_from_slice(b"PUB ");
        push_subject(out, session);
        out.push(b' ');
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

/// Reads what the server sends a publisher (INFO, PING, -ERR); PONGs are written by the
/// publishing thread at its next flush, so two threads never write the socket.
struct NatsReplies {
    sock: TcpStream,
    rb: ReadBuf,
    pong_due: Arc<AtomicBool>,
}

impl Replies for NatsReplies {
    fn poll(&mut self) -> io::Result<Poll> {
        match self.rb.fill(&mut self.sock) {
            Ok(0) => return Ok(Poll::Closed),
            Ok(_) => {}
            Err(e) if is_timeout(&e) => return Ok(Poll::Idle),
            Err(e) => return Err(e),
        }
        while let Some((op, used)) = parse_op(self.rb.data())? {
            if let Op::Ping = op {
                self.pong_due.store(true, Ordering::Relaxed);
            }
            self.rb.consume(used);
        }
        Ok(Poll::Data)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_ops_incrementally() {
        let wire = b"INFO {\"x\":1}\r\nMSG s.1 1 5\r\nhello\r\nPING\r\nMSG s.2 2 r.x 3\r\na\r\n\r\nPONG\r\n";
        // Every prefix parses without error; the full input yields the right ops.
        for cut in 0..wire.len() {
            let mut b = &wire[..cut];
            while let Some((_, used)) = parse_op(b).unwrap() {
                b = &b[used..];
            }
        }
        let mut b = &wire[..];
        let mut msgs = Vec::new();
        let (mut pings_seen, mut answers) = (0, 0);
        while let Some((op, used)) = parse_op(b).unwrap() {
            match op {
                Op::Msg { payload_start, len } => msgs.push(b[payload_start..payload_start + len].to_vec()),
                Op::Ping => pings_seen += 1,
                Op::Pong => answers += 1,
                Op::Other => {}
            }
            b = &b[used..];
        }
        assert!(b.is_empty());
        assert_eq!(msgs, vec![b"hello".to_vec(), b"a\r\n".to_vec()]);
        assert_eq!((pings_seen, answers), (1, 1));
        assert!(parse_op(b"-ERR 'Slow Consumer'\r\n").is_err());
    }
}
