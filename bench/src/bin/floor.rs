//! `floor`: the least a server can do for the pub/sub workload, to measure the floor under the
//! engine's and the peers' numbers in the same harness (FACTS.md's "minimal forwarder", here
//! speaking the RESP subset `loadgen --backend redis` uses, so the same generator drives it).
//!
//! One thread, level-triggered epoll, no history, no sequence numbers, no metrics, no limits
//! beyond what keeps it from misbehaving on the generator's input. Per wake-up it reads every
//! readable connection, routes each `PUBLISH` to the subscribers' output buffers (one copy per
//! subscriber, as Redis does), answers `:N`, and then writes each connection with pending output
//! once: the same segments per burst as Redis, with none of Redis's bookkeeping. It is a
//! measuring stick, not a server: commands other than SUBSCRIBE, PUBLISH and PING get `-ERR`.
//!
//! Usage: `floor --listen 127.0.0.1:PORT` (runs until killed).

use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::fd::AsRawFd;

/// Bytes read per `read` call (Redis 7.0's `PROTO_IOBUF_LEN`).
const READ_CHUNK_BYTES: usize = 16 * 1024;
/// Largest bulk string accepted, in bytes.
const BULK_MAX_BYTES: usize = 1 << 20;
/// A connection whose unparsed input grows past this is closed (room for one largest command).
const INPUT_MAX_BYTES: usize = 2 * BULK_MAX_BYTES + 4096;
/// A connection whose unsent output grows past this is closed (a reader that stopped).
const OUTPUT_MAX_BYTES: usize = 64 << 20;
/// Arguments per command accepted.
const ARGS_MAX: usize = 1 << 16;
// epoll's flags are positive `c_int`s; an event mask is a `u32`.
#[allow(clippy::cast_sign_loss)]
const EPOLLIN: u32 = libc::EPOLLIN as u32;
#[allow(clippy::cast_sign_loss)]
const EPOLLOUT: u32 = libc::EPOLLOUT as u32;
#[allow(clippy::cast_sign_loss)]
const EPOLLHUP: u32 = libc::EPOLLHUP as u32;
#[allow(clippy::cast_sign_loss)]
const EPOLLERR: u32 = libc::EPOLLERR as u32;
/// Readiness events taken per `epoll_wait`.
const EVENTS_PER_WAIT: i32 = 256;

struct Conn {
    stream: TcpStream,
    input: Vec<u8>,
    output: Vec<u8>,
    /// Bytes of `output` already written (compacted when all of it is).
    written: usize,
    /// Channels this connection subscribed (for the subscribe reply's count).
    subscriptions: usize,
    /// Already in the dirty list of this turn.
    dirty: bool,
    /// EPOLLOUT is registered (a write was short).
    want_write: bool,
}

fn main() -> io::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let Some(listen) = args.iter().position(|a| a == "--listen").and_then(|i| args.get(i + 1)).cloned() else {
        eprintln!("usage: floor --listen ADDR");
        std::process::exit(2);
    };
    let listener = TcpListener::bind(&listen)?;
    listener.set_nonblocking(true)?;
    // SAFETY: plain syscall; the result is checked.
    let ep = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
    if ep < 0 {
        return Err(io::Error::last_os_error());
    }
    let listener_token = u64::MAX;
    epoll_ctl(ep, libc::EPOLL_CTL_ADD, listener.as_raw_fd(), EPOLLIN, listener_token)?;

    let mut conns: Vec<Option<Conn>> = Vec::new();
    let mut channels: HashMap<Vec<u8>, Vec<usize>> = HashMap::new();
    let mut events = vec![libc::epoll_event { events: 0, u64: 0 }; EVENTS_PER_WAIT as usize];
    let mut dirty: Vec<usize> = Vec::new();
    let mut chunk = vec![0u8; READ_CHUNK_BYTES];
    let mut scratch = Scratch::default();
    loop {
        // SAFETY: `events` outlives the call and its length is passed.
        let n = unsafe { libc::epoll_wait(ep, events.as_mut_ptr(), EVENTS_PER_WAIT, -1) };
        let Ok(n) = usize::try_from(n) else {
            let e = io::Error::last_os_error();
            if e.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        };
        for ev in &events[..n] {
            let token = ev.u64;
            if token == listener_token {
                while let Ok((stream, _)) = listener.accept() {
                    let id = conns.iter().position(Option::is_none).unwrap_or_else(|| {
                        conns.push(None);
                        conns.len() - 1
                    });
                    // A connection that cannot be set up is dropped; the server carries on.
                    let ready = stream.set_nonblocking(true).and_then(|()| stream.set_nodelay(true));
                    if ready.and_then(|()| epoll_ctl(ep, libc::EPOLL_CTL_ADD, stream.as_raw_fd(), EPOLLIN, id as u64)).is_ok() {
                        conns[id] = Some(Conn {
                            stream,
                            input: Vec::new(),
                            output: Vec::new(),
                            written: 0,
                            subscriptions: 0,
                            dirty: false,
                            want_write: false,
                        });
                    }
                }
                continue;
            }
            let id = token as usize;
            if ev.events & EPOLLOUT != 0 {
                mark_dirty(&mut conns, &mut dirty, id);
            }
            if ev.events & (EPOLLIN | EPOLLHUP | EPOLLERR) == 0 {
                continue;
            }
            let Some(conn) = conns[id].as_mut() else { continue };
            let closed = match conn.stream.read(&mut chunk) {
                Ok(0) => true,
                Ok(k) => {
                    conn.input.extend_from_slice(&chunk[..k]);
                    conn.input.len() > INPUT_MAX_BYTES
                }
                Err(e) if e.kind() == io::ErrorKind::WouldBlock || e.kind() == io::ErrorKind::Interrupted => false,
                Err(_) => true,
            };
            if closed {
                close(ep, &mut conns, &mut channels, id);
                continue;
            }
            let input = std::mem::take(&mut conns[id].as_mut().expect("open").input);
            let (used, ok) = handle_input(&input, id, &mut conns, &mut channels, &mut dirty, &mut scratch);
            if !ok {
                close(ep, &mut conns, &mut channels, id);
                continue;
            }
            if let Some(conn) = conns[id].as_mut() {
                conn.input = input;
                conn.input.drain(..used);
            }
        }
        for id in dirty.drain(..) {
            write_once(ep, &mut conns, &mut channels, id);
        }
    }
}

/// One `write` of what connection `id` has pending (once per wake-up, as Redis does); closes
/// it on an error or when a reader let its backlog pass [`OUTPUT_MAX_BYTES`].
fn write_once(ep: i32, conns: &mut [Option<Conn>], channels: &mut HashMap<Vec<u8>, Vec<usize>>, id: usize) {
    let Some(conn) = conns[id].as_mut() else { return };
    conn.dirty = false;
    let mut failed = conn.output.len() - conn.written > OUTPUT_MAX_BYTES;
    if !failed && conn.written < conn.output.len() {
        match conn.stream.write(&conn.output[conn.written..]) {
            Ok(k) => {
                conn.written += k;
                if conn.written == conn.output.len() {
                    conn.output.clear();
                    conn.written = 0;
                }
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock || e.kind() == io::ErrorKind::Interrupted => {}
            Err(_) => failed = true,
        }
    }
    let want_write = conn.written < conn.output.len();
    if !failed && want_write != conn.want_write {
        conn.want_write = want_write;
        let interest = if want_write { EPOLLIN | EPOLLOUT } else { EPOLLIN };
        failed = epoll_ctl(ep, libc::EPOLL_CTL_MOD, conn.stream.as_raw_fd(), interest, id as u64).is_err();
    }
    if failed {
        close(ep, conns, channels, id);
    }
}

fn epoll_ctl(ep: i32, op: i32, fd: i32, events: u32, token: u64) -> io::Result<()> {
    let mut ev = libc::epoll_event { events, u64: token };
    // SAFETY: `ev` is valid for the call; the result is checked.
    if unsafe { libc::epoll_ctl(ep, op, fd, &raw mut ev) } < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn mark_dirty(conns: &mut [Option<Conn>], dirty: &mut Vec<usize>, id: usize) {
    if let Some(conn) = conns[id].as_mut() {
        if !conn.dirty {
            conn.dirty = true;
            dirty.push(id);
        }
    }
}

fn close(ep: i32, conns: &mut [Option<Conn>], channels: &mut HashMap<Vec<u8>, Vec<usize>>, id: usize) {
    if let Some(conn) = conns[id].take() {
        let _ = epoll_ctl(ep, libc::EPOLL_CTL_DEL, conn.stream.as_raw_fd(), 0, 0);
        if conn.subscriptions > 0 {
            for subscribers in channels.values_mut() {
                subscribers.retain(|&s| s != id);
            }
        }
    }
}

/// Buffers reused across reads (no allocation per command).
#[derive(Default)]
struct Scratch {
    /// The current command's arguments, as ranges into the input.
    args: Vec<(usize, usize)>,
    /// The `message` frame of the current PUBLISH, copied to each subscriber.
    message: Vec<u8>,
}

/// Runs every complete command in `input` for connection `id`; returns the bytes consumed and
/// whether the connection may stay (false on a protocol error).
fn handle_input(
    input: &[u8],
    id: usize,
    conns: &mut [Option<Conn>],
    channels: &mut HashMap<Vec<u8>, Vec<usize>>,
    dirty: &mut Vec<usize>,
    scratch: &mut Scratch,
) -> (usize, bool) {
    let Scratch { args, message } = scratch;
    let mut at = 0;
    loop {
        match parse_command(&input[at..], args) {
            Ok(None) => return (at, true),
            Err(()) => return (at, false),
            Ok(Some(used)) => {
                let base = at;
                at += used;
                let arg = |i: usize| &input[base + args[i].0..base + args[i].1];
                let name = arg(0);
                if name.eq_ignore_ascii_case(b"PUBLISH") && args.len() == 3 {
                    let (channel, payload) = (arg(1), arg(2));
                    let subscribers = channels.get(channel).map_or(&[][..], Vec::as_slice);
                    if !subscribers.is_empty() {
                        message.clear();
                        message.extend_from_slice(b"*3\r\n$7\r\nmessage\r\n");
                        bulk(message, channel);
                        bulk(message, payload);
                        for &s in subscribers {
                            if let Some(conn) = conns[s].as_mut() {
                                conn.output.extend_from_slice(message);
                            }
                            mark_dirty(conns, dirty, s);
                        }
                    }
                    let mut reply = [0u8; 24];
                    reply_to(conns, dirty, id, integer_reply(&mut reply, subscribers.len()));
                } else if name.eq_ignore_ascii_case(b"SUBSCRIBE") && args.len() >= 2 {
                    for i in 1..args.len() {
                        let channel = arg(i);
                        let list = channels.entry(channel.to_vec()).or_default();
                        let new = !list.contains(&id);
                        if new {
                            list.push(id);
                        }
                        let conn = conns[id].as_mut().expect("open");
                        conn.subscriptions += usize::from(new);
                        let mut reply = b"*3\r\n$9\r\nsubscribe\r\n".to_vec();
                        bulk(&mut reply, channel);
                        reply.extend_from_slice(format!(":{}\r\n", conn.subscriptions).as_bytes());
                        reply_to(conns, dirty, id, &reply);
                    }
                } else if name.eq_ignore_ascii_case(b"PING") {
                    reply_to(conns, dirty, id, b"+PONG\r\n");
                } else {
                    reply_to(conns, dirty, id, b"-ERR floor knows SUBSCRIBE ch.., PUBLISH ch msg and PING only\r\n");
                }
            }
        }
    }
}

fn reply_to(conns: &mut [Option<Conn>], dirty: &mut Vec<usize>, id: usize, bytes: &[u8]) {
    if let Some(conn) = conns[id].as_mut() {
        conn.output.extend_from_slice(bytes);
    }
    mark_dirty(conns, dirty, id);
}

/// `$len\r\nbytes\r\n` appended to `out` (no allocation beyond `out`'s own growth: this runs
/// twice per PUBLISH).
fn bulk(out: &mut Vec<u8>, bytes: &[u8]) {
    let _ = write!(out, "${}\r\n", bytes.len());
    out.extend_from_slice(bytes);
    out.extend_from_slice(b"\r\n");
}

/// One RESP array of bulk strings: `Ok(Some(bytes used))` with `args` as ranges into `buf`,
/// `Ok(None)` when incomplete, `Err` when malformed.
fn parse_command(buf: &[u8], args: &mut Vec<(usize, usize)>) -> Result<Option<usize>, ()> {
    args.clear();
    let Some((count, mut at)) = parse_line_number(buf, 0, b'*')? else { return Ok(None) };
    if count == 0 || count > ARGS_MAX {
        return Err(());
    }
    for _ in 0..count {
        let Some((len, start)) = parse_line_number(buf, at, b'$')? else { return Ok(None) };
        if len > BULK_MAX_BYTES {
            return Err(());
        }
        if buf.len() < start + len + 2 {
            return Ok(None);
        }
        if &buf[start + len..start + len + 2] != b"\r\n" {
            return Err(());
        }
        args.push((start, start + len));
        at = start + len + 2;
    }
    Ok(Some(at))
}

/// `<prefix><decimal>\r\n` at `at`: the number and the index after the line.
fn parse_line_number(buf: &[u8], at: usize, prefix: u8) -> Result<Option<(usize, usize)>, ()> {
    let Some(&first) = buf.get(at) else { return Ok(None) };
    if first != prefix {
        return Err(());
    }
    let Some(end) = buf[at..].windows(2).position(|w| w == b"\r\n") else {
        return if buf.len() - at > 24 { Err(()) } else { Ok(None) };
    };
    let digits = &buf[at + 1..at + end];
    if digits.is_empty() || digits.len() > 19 || !digits.iter().all(u8::is_ascii_digit) {
        return Err(());
    }
    let n = digits.iter().fold(0_usize, |n, d| n * 10 + usize::from(d - b'0'));
    Ok(Some((n, at + end + 2)))
}

/// `:n\r\n` in `buf`.
fn integer_reply(buf: &mut [u8; 24], n: usize) -> &[u8] {
    let mut w = &mut buf[..];
    let _ = write!(w, ":{n}\r\n");
    let len = 24 - w.len();
    &buf[..len]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_command_is_parsed_only_once_complete_whatever_the_cut() {
        let wire = b"*3\r\n$7\r\nPUBLISH\r\n$3\r\ns.1\r\n$5\r\nhe\r\no\r\n";
        let mut args = Vec::new();
        for cut in 0..wire.len() {
            assert_eq!(parse_command(&wire[..cut], &mut args), Ok(None), "cut at {cut}");
        }
        assert_eq!(parse_command(wire, &mut args), Ok(Some(wire.len())));
        let arg = |i: usize| &wire[args[i].0..args[i].1];
        assert_eq!((arg(0), arg(1), arg(2)), (&b"PUBLISH"[..], &b"s.1"[..], &b"he\r\no"[..]));
    }

    #[test]
    fn malformed_commands_are_refused() {
        let mut args = Vec::new();
        for bad in [&b"PING\r\n"[..], b"*0\r\n", b"*1\r\n+OK\r\n", b"*1\r\n$+4\r\nPING\r\n", b"*1\r\n$-1\r\n", b"*1\r\n$4\r\nPINGxx", b"*99999999999999999999\r\n", b"*1\r\n$2000000\r\n"] {
            assert_eq!(parse_command(bad, &mut args), Err(()), "{}", String::from_utf8_lossy(bad));
        }
        // A count line that never ends is refused once it is longer than any number.
        assert_eq!(parse_command(b"*1111111111111111111111111", &mut args), Err(()));
    }

    #[test]
    fn integer_replies() {
        let mut buf = [0u8; 24];
        assert_eq!(integer_reply(&mut buf, 0), b":0\r\n");
        assert_eq!(integer_reply(&mut buf, usize::MAX), format!(":{}\r\n", usize::MAX).as_bytes());
    }
}
