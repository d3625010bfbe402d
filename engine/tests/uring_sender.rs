//! The `io_uring` sender over real loopback sockets on a real glommio executor.
//!
//! The server side of each TCP pair is registered with the sender; the client side is read by
//! a plain thread with a read timeout (a failure guard only). Waits inside the executor poll a
//! condition with a deadline; nothing relies on a sleep being long enough.

use std::future::Future;
use std::io::Read;
use std::net::{TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use bytes::Bytes;
use glommio::{LocalExecutorBuilder, Placement};
use switchboard::pool::{BufferPool, PoolConfig, SizeClass, FRAME_BYTES_MAX};
use switchboard::uring::{ConnSlot, ConnState, EnqueueError, OutBuf, SenderConfig, UringSender};

/// Failure guard for every wait; never reached when the code works.
const GUARD: Duration = Duration::from_secs(30);

fn pairs(n: usize) -> Vec<(TcpStream, TcpStream)> {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    (0..n)
        .map(|_| {
            let client = TcpStream::connect(addr).unwrap();
            let (server, _) = listener.accept().unwrap();
            client.set_read_timeout(Some(GUARD)).unwrap();
            (server, client)
        })
        .collect()
}

fn read_exactly(mut client: TcpStream, len: usize) -> JoinHandle<Vec<u8>> {
    thread::spawn(move || {
        let mut buf = vec![0; len];
        client.read_exact(&mut buf).expect("client read");
        buf
    })
}

/// `conns` connected pairs whose client sides are each read on a thread until they have the
/// bytes `expected(conn)` names: (server sockets, readers, expected bytes per connection).
fn streams(conns: usize, expected: impl Fn(u32) -> Vec<u8>) -> (Vec<TcpStream>, Vec<JoinHandle<Vec<u8>>>, Vec<Vec<u8>>) {
    let (mut servers, mut readers, mut wants) = (Vec::new(), Vec::new(), Vec::new());
    for (c, (server, client)) in pairs(conns).into_iter().enumerate() {
        let want = expected(c as u32);
        readers.push(read_exactly(client, want.len()));
        wants.push(want);
        servers.push(server);
    }
    (servers, readers, wants)
}

fn read_to_eof(mut client: TcpStream, eof: Arc<AtomicBool>) -> JoinHandle<Vec<u8>> {
    thread::spawn(move || {
        let mut buf = Vec::new();
        client.read_to_end(&mut buf).expect("client read to EOF");
        eof.store(true, Ordering::Release);
        buf
    })
}


fn on_glommio<G, F>(body: G)
where
    G: FnOnce() -> F + Send + 'static,
    F: Future<Output = ()> + 'static,
{
    LocalExecutorBuilder::new(Placement::Unbound)
        .name("uring-sender-test")
        .spawn(body)
        .expect("start executor")
        .join()
        .expect("executor body panicked");
}

async fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = Instant::now() + GUARD;
    while !cond() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        glommio::timer::sleep(Duration::from_millis(1)).await;
    }
}

/// True if `cond` becomes true within `within`. Used once, to conclude that a reader that
/// never reads has filled its socket buffers (its queue stops draining); never to order events.
async fn holds_within(within: Duration, mut cond: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + within;
    while !cond() {
        if Instant::now() >= deadline {
            return false;
        }
        glommio::timer::sleep(Duration::from_millis(1)).await;
    }
    true
}

/// A frame whose bytes depend on who it is for and its sequence number, so that any
/// reordering, loss or duplication changes the stream.
fn frame(conn: u32, seq: u32, len: usize) -> Vec<u8> {
    assert!(len >= 8);
    let mut v = Vec::with_capacity(len);
    v.extend_from_slice(&conn.to_le_bytes());
    v.extend_from_slice(&seq.to_le_bytes());
    v.extend((8..len).map(|k| (seq as usize * 31 + conn as usize * 7 + k) as u8));
    v
}

/// Sets the socket's send buffer (`SO_SNDBUF`, which the kernel doubles).
fn set_send_buffer(socket: &TcpStream, bytes: libc::c_int) {
    // SAFETY: a valid socket and a c_int option value of the right size.
    let rc = unsafe {
        libc::setsockopt(socket.as_raw_fd(), libc::SOL_SOCKET, libc::SO_SNDBUF, (&raw const bytes).cast(), std::mem::size_of::<libc::c_int>() as libc::socklen_t)
    };
    assert_eq!(rc, 0, "setsockopt(SO_SNDBUF): {}", std::io::Error::last_os_error());
}

fn pool(classes: &[(usize, usize)]) -> BufferPool {
    BufferPool::new(&PoolConfig {
        classes: classes.iter().map(|&(slot_bytes, slots)| SizeClass { slot_bytes, slots }).collect(),
        mlock: false,
        prefault: true,
    })
    .unwrap()
}

/// Closes every connection, stops the sender and waits for its tasks to end.
async fn close_and_stop(sender: &UringSender, slots: &[ConnSlot], runner: impl Future<Output = std::io::Result<()>>) {
    for &slot in slots {
        sender.close(slot);
    }
    sender.stop();
    runner.await.unwrap();
}

/// Joins each connection's reader and checks its stream byte for byte against `expected`.
fn assert_streams(readers: Vec<JoinHandle<Vec<u8>>>, expected: Vec<Vec<u8>>) {
    for (c, (reader, want)) in readers.into_iter().zip(expected).enumerate() {
        let got = reader.join().unwrap();
        assert_eq!(first_mismatch(&got, &want), None, "connection {c}: stream differs");
    }
}

fn first_mismatch(got: &[u8], want: &[u8]) -> Option<usize> {
    if got.len() != want.len() {
        return Some(got.len().min(want.len()));
    }
    got.iter().zip(want).position(|(a, b)| a != b)
}

const SHARED: u32 = u32::MAX;

/// Frame `seq` of connection `conn` in test (a): every third frame is one pooled buffer
/// shared by all connections, the others are per-connection heap buffers.
fn plan_a(conn: u32, seq: u32) -> (bool, Vec<u8>) {
    if seq % 3 == 0 {
        (true, frame(SHARED, seq, 16 + (seq as usize * 7) % 240))
    } else {
        (false, frame(conn, seq, 16 + (seq as usize * 7 + conn as usize * 13) % 240))
    }
}

#[test]
fn a_ordering_and_completeness_8_conns_10k_frames() {
    const CONNS: u32 = 8;
    const FRAMES: u32 = 10_000;
    let (servers, readers, expected) = streams(CONNS as usize, |c| (0..FRAMES).flat_map(|s| plan_a(c, s).1).collect());
    let total: u64 = expected.iter().map(|e| e.len() as u64).sum();
    on_glommio(move || async move {
        let pool = pool(&[(256, 4096)]);
        let sender = UringSender::new(SenderConfig { conns_max: 64, ..SenderConfig::default() }).unwrap();
        let runner = glommio::spawn_local(sender.run());
        let slots: Vec<_> = servers.iter().map(|s| sender.register(s.as_raw_fd()).unwrap()).collect();
        for seq in 0..FRAMES {
            let shared = (seq % 3 == 0).then(|| pool.lease_copy(&plan_a(0, seq).1).unwrap());
            for (c, &slot) in slots.iter().enumerate() {
                let buf = match &shared {
                    Some(lease) => OutBuf::Pooled(lease.clone()),
                    None => OutBuf::Heap(Bytes::from(plan_a(c as u32, seq).1)),
                };
                sender.enqueue(slot, buf).unwrap();
            }
            if seq % 500 == 499 {
                // Let sends and enqueues interleave over many turns, as under real load.
                wait_until("queues below 64 KiB", || slots.iter().all(|&s| sender.queued_bytes(s) < 64 << 10)).await;
            }
        }
        wait_until("all queues drained", || slots.iter().all(|&s| sender.queued_bytes(s) == 0)).await;
        let st = sender.stats();
        eprintln!("8 conns x 10k frames: {st:?}");
        assert_eq!(st.bytes_sent_total, total);
        assert_eq!((st.errors_total, st.conns_dead_total, st.slow_consumer_total), (0, 0, 0));
        assert!(st.submits_total < st.sqes_total, "no batching: {st:?}");
        assert_eq!(st.ops_in_flight, 0);
        assert!(
            pool.stats().classes.iter().all(|c| c.in_use == 0),
            "every lease is released once sent everywhere"
        );
        for &slot in &slots {
            assert_eq!(sender.state(slot), ConnState::Open);
            sender.close(slot);
        }
        assert_eq!(sender.stats().conns_in_use, 0);
        sender.stop();
        runner.await.unwrap();
        drop(servers);
    });
    assert_streams(readers, expected);
}

fn slow_consumer(send_dontwait: bool) {
    const FAST_FRAMES: u32 = 4000;
    const FAST_LEN: usize = 1024;
    let mut p = pairs(2);
    let (fast_server, fast_client) = p.pop().unwrap();
    let (slow_server, slow_client) = p.pop().unwrap();
    let want: Vec<u8> = (0..FAST_FRAMES).flat_map(|s| frame(1, s, FAST_LEN)).collect();
    let fast_reader = read_exactly(fast_client, want.len());
    on_glommio(move || async move {
        let sender = UringSender::new(SenderConfig {
            conns_max: 16,
            conn_outbound_bytes_max: 256 << 10,
            conn_outbound_frames_max: 1024,
            send_dontwait,
            ..SenderConfig::default()
        })
        .unwrap();
        let runner = glommio::spawn_local(sender.run());
        let fast = sender.register(fast_server.as_raw_fd()).unwrap();
        let slow = sender.register(slow_server.as_raw_fd()).unwrap();
        let mut slow_hit_at = None;
        let mut seq = 0u32;
        let mut slow_seq = 0u32;
        let half = 128 << 10;
        let mut slow_stuck = false;
        while seq < FAST_FRAMES || slow_hit_at.is_none() {
            if seq < FAST_FRAMES {
                // A well-behaved producer lets I/O run when a connection is half full; the
                // point is that the fast connection keeps draining while the slow one is stuck.
                if sender.queued_bytes(fast) > half {
                    wait_until("fast connection below half its limit", || sender.queued_bytes(fast) <= half)
                        .await;
                }
                if let Err(e) = sender.enqueue(fast, OutBuf::Heap(frame(1, seq, FAST_LEN).into())) {
                    panic!(
                        "the fast connection was refused ({e}) at frame {seq} with {} B queued; {:?}",
                        sender.queued_bytes(fast),
                        sender.stats()
                    );
                }
                seq += 1;
            }
            if slow_hit_at.is_none() {
                // Until its socket buffers are full the slow connection is paced like the fast
                // one, so that the SlowConsumer below comes from the reader, not from a burst.
                if !slow_stuck && sender.queued_bytes(slow) > half {
                    slow_stuck = !holds_within(Duration::from_millis(200), || sender.queued_bytes(slow) <= half).await;
                }
                match sender.enqueue(slow, OutBuf::Heap(frame(2, slow_seq, 16 << 10).into())) {
                    Ok(()) => slow_seq += 1,
                    Err(EnqueueError::SlowConsumer) => {
                        assert!(slow_stuck, "refused before the reader's buffers were full");
                        let fast_sent = seq as usize * FAST_LEN - sender.queued_bytes(fast);
                        let slow_sent = sender.stats().bytes_sent_total as usize - fast_sent;
                        assert_eq!(slow_sent + sender.queued_bytes(slow), slow_seq as usize * (16 << 10));
                        assert!(slow_sent >= 64 << 10, "the kernel took only {slow_sent} B");
                        slow_hit_at = Some(slow_seq);
                    }
                    Err(e) => panic!("slow connection: {e}"),
                }
                assert!(slow_seq < 100_000, "the slow connection never hit its limit");
            }
        }
        assert!(sender.queued_bytes(slow) <= 256 << 10);
        wait_until("fast queue drained", || sender.queued_bytes(fast) == 0).await;
        // The slow connection is still stuck, and still accepts a final frame over its limit.
        assert!(sender.queued_bytes(slow) > 0, "{:?} {:?}", sender.state(slow), sender.stats());
        sender.enqueue_final(slow, OutBuf::Heap(frame(2, 0, 64).into())).unwrap();
        assert_eq!(sender.state(slow), ConnState::Closing);
        assert_eq!(
            sender.enqueue(slow, OutBuf::Heap(frame(2, 0, 64).into())),
            Err(EnqueueError::Closed)
        );
        let st = sender.stats();
        eprintln!("slow consumer (dontwait {send_dontwait}): {st:?}");
        assert!(st.slow_consumer_total >= 1);
        if send_dontwait {
            assert!(st.eagain_total > 0, "MSG_DONTWAIT must have produced EAGAIN: {st:?}");
        }
        // The owner goes away while a send (or POLLOUT) is parked on the slow reader. The
        // connection is Closing, so close keeps it to flush its final frame; the owner's
        // bound on that (abort, after its grace period) must unpark the send and free the slot.
        sender.close(slow);
        assert_eq!(sender.stats().conns_in_use, 2, "a closing connection keeps flushing after close");
        sender.abort(slow);
        wait_until("slow slot freed", || sender.stats().conns_in_use == 1).await;
        assert_eq!(sender.stats().ops_in_flight, 0);
        sender.close(fast);
        sender.stop();
        runner.await.unwrap();
        drop((fast_server, slow_server));
    });
    let got = fast_reader.join().unwrap();
    assert_eq!(first_mismatch(&got, &want), None, "fast connection stream differs");
    drop(slow_client);
}

#[test]
fn b_slow_reader_hits_slow_consumer_fast_one_unaffected_kernel_parks() {
    slow_consumer(false);
}

#[test]
fn b_slow_reader_hits_slow_consumer_fast_one_unaffected_eagain_pollout() {
    slow_consumer(true);
}

#[test]
fn c_enqueue_final_delivers_then_peer_sees_eof() {
    let (server, client) = pairs(1).pop().unwrap();
    let want: Vec<u8> = (0..101).flat_map(|s| frame(3, s, 200)).collect();
    let eof = Arc::new(AtomicBool::new(false));
    let reader = read_to_eof(client, eof.clone());
    on_glommio(move || async move {
        let pool = pool(&[(256, 128)]);
        let sender = UringSender::new(SenderConfig { conns_max: 4, ..SenderConfig::default() }).unwrap();
        let runner = glommio::spawn_local(sender.run());
        let slot = sender.register(server.as_raw_fd()).unwrap();
        for s in 0..100 {
            sender.enqueue(slot, OutBuf::Pooled(pool.lease_copy(&frame(3, s, 200)).unwrap())).unwrap();
        }
        sender.enqueue_final(slot, OutBuf::Pooled(pool.lease_copy(&frame(3, 100, 200)).unwrap())).unwrap();
        assert!(sender.is_closed(slot));
        assert_eq!(sender.enqueue(slot, OutBuf::Heap(Bytes::from_static(b"late"))), Err(EnqueueError::Closed));
        // The server's own stream stays open: EOF can only come from the sender's shutdown.
        wait_until("peer saw EOF", || eof.load(Ordering::Acquire)).await;
        assert_eq!(sender.state(slot), ConnState::Closed);
        assert_eq!(pool.stats().classes[0].in_use, 0);
        let st = sender.stats();
        assert_eq!((st.errors_total, st.conns_dead_total), (0, 0));
        sender.close(slot);
        sender.stop();
        runner.await.unwrap();
        drop(server);
    });
    let got = reader.join().unwrap();
    assert_eq!(first_mismatch(&got, &want), None, "stream before EOF differs");
}

#[test]
fn d_peer_close_then_enqueue_returns_closed() {
    peer_close(false);
}

/// The same with the pool registered: the sends are `WRITEV_FIXED` writes, which carry no
/// `MSG_NOSIGNAL`; the test process (like the engine) ignores SIGPIPE, so EPIPE is an errno.
#[test]
fn d_peer_close_then_enqueue_returns_closed_fixed_buffers() {
    peer_close(true);
}

fn peer_close(fixed: bool) {
    let (mut server, client) = pairs(1).pop().unwrap();
    drop(client);
    // Wait for the peer's FIN on our own side, so the sends below hit a closed peer.
    server.set_read_timeout(Some(GUARD)).unwrap();
    assert_eq!(server.read(&mut [0; 16]).unwrap(), 0);
    on_glommio(move || async move {
        let pool = pool(&[(256, 64)]);
        let sender = UringSender::new(SenderConfig { conns_max: 4, ..SenderConfig::default() }).unwrap();
        // SAFETY: the pool outlives the sender (dropped after it at the end of this block).
        let registered = fixed && unsafe { sender.register_pool(&pool.regions()) };
        assert_eq!(registered, fixed && sender.stats().writev_fixed_supported);
        let runner = glommio::spawn_local(sender.run());
        let slot = sender.register(server.as_raw_fd()).unwrap();
        let deadline = Instant::now() + GUARD;
        let mut sent = 0u32;
        loop {
            let buf = OutBuf::Pooled(pool.lease_copy(&frame(4, sent, 100)).unwrap());
            match sender.enqueue(slot, buf) {
                Ok(()) => sent += 1,
                Err(EnqueueError::Closed) => break,
                Err(e) => panic!("unexpected {e}"),
            }
            assert!(Instant::now() < deadline, "sends to a closed peer never failed");
            wait_until("send completed", || sender.queued_bytes(slot) == 0).await;
        }
        assert!(sent >= 1);
        assert_eq!(sender.state(slot), ConnState::Closed);
        let st = sender.stats();
        assert!(st.errors_total >= 1, "{st:?}");
        assert_eq!(st.fixed_sends_total > 0, registered, "{st:?}");
        assert_eq!(st.conns_dead_total, 1);
        assert_eq!(pool.stats().classes[0].in_use, 0, "a dead connection releases its leases");
        sender.close(slot);
        assert_eq!(sender.stats().conns_in_use, 0);
        // A stale handle is harmless.
        assert_eq!(sender.enqueue(slot, OutBuf::Heap(Bytes::from_static(b"x"))), Err(EnqueueError::Closed));
        sender.close(slot);
        sender.stop();
        runner.await.unwrap();
        drop(server);
    });
}

#[test]
fn e_one_mib_buffers_short_writes_are_resumed() {
    const BIG: u32 = 12;
    // Big shared frames interleaved with small per-connection ones.
    let plan = |c: u32, s: u32| -> Vec<u8> {
        let mut v = frame(SHARED, s, FRAME_BYTES_MAX);
        v.extend(frame(c, s, 40));
        v
    };
    let (servers, readers, expected) = streams(2, |c| (0..BIG).flat_map(|s| plan(c, s)).collect());
    on_glommio(move || async move {
        let pool = pool(&[(256, 16), (FRAME_BYTES_MAX, BIG as usize)]);
        let sender = UringSender::new(SenderConfig {
            conns_max: 4,
            conn_outbound_bytes_max: 64 << 20,
            ..SenderConfig::default()
        })
        .unwrap();
        let runner = glommio::spawn_local(sender.run());
        let slots: Vec<_> = servers.iter().map(|s| sender.register(s.as_raw_fd()).unwrap()).collect();
        for s in 0..BIG {
            let big = pool.lease_copy(&frame(SHARED, s, FRAME_BYTES_MAX)).unwrap();
            for (c, &slot) in slots.iter().enumerate() {
                sender.enqueue(slot, OutBuf::Pooled(big.clone())).unwrap();
                sender.enqueue(slot, OutBuf::Heap(frame(c as u32, s, 40).into())).unwrap();
            }
        }
        wait_until("all queues drained", || slots.iter().all(|&s| sender.queued_bytes(s) == 0)).await;
        let st = sender.stats();
        assert!(st.short_writes_total > 0, "12 MiB per socket must need short writes: {st:?}");
        assert_eq!(st.errors_total, 0);
        assert!(pool.stats().classes.iter().all(|c| c.in_use == 0));
        close_and_stop(&sender, &slots, runner).await;
        drop(servers);
    });
    assert_streams(readers, expected);
}

#[test]
fn f_fan_out_to_16_sockets_is_one_submission() {
    const CONNS: usize = 16;
    let want = frame(SHARED, 7, 200);
    let mut servers = Vec::new();
    let mut readers = Vec::new();
    for (server, client) in pairs(CONNS) {
        readers.push(read_exactly(client, want.len()));
        servers.push(server);
    }
    let msg = want.clone();
    on_glommio(move || async move {
        let pool = pool(&[(256, 16)]);
        let sender = UringSender::new(SenderConfig { conns_max: 32, ..SenderConfig::default() }).unwrap();
        let runner = glommio::spawn_local(sender.run());
        let slots: Vec<_> = servers.iter().map(|s| sender.register(s.as_raw_fd()).unwrap()).collect();
        let before = sender.stats();
        // Encoded once, queued on every connection within one turn.
        let lease = pool.lease_copy(&msg).unwrap();
        for &slot in &slots {
            sender.enqueue(slot, OutBuf::Pooled(lease.clone())).unwrap();
        }
        assert_eq!(lease.ref_count(), 1 + CONNS as u32);
        drop(lease);
        wait_until("all queues drained", || slots.iter().all(|&s| sender.queued_bytes(s) == 0)).await;
        let after = sender.stats();
        assert_eq!(after.sqes_total - before.sqes_total, CONNS as u64, "{after:?}");
        assert_eq!(after.submits_total - before.submits_total, 1, "{after:?}");
        assert_eq!(after.max_sqes_per_submit, CONNS as u64);
        assert_eq!(after.completions_total - before.completions_total, CONNS as u64);
        assert!(after.eventfd_wakeups_total >= 1);
        assert_eq!(pool.stats().classes[0].in_use, 0);
        close_and_stop(&sender, &slots, runner).await;
        drop(servers);
    });
    for reader in readers {
        assert_eq!(reader.join().unwrap(), want);
    }
}

/// Frame `seq` of connection `conn` in test (g): every fourth frame is a pooled buffer shared
/// by all connections; the others are small per-connection frames gathered into one buffer.
fn plan_g(conn: u32, seq: u32) -> (bool, Vec<u8>) {
    if seq % 4 == 0 {
        (true, frame(SHARED, seq, 64 + (seq as usize * 5) % 160))
    } else {
        (false, frame(conn, seq, 16 + (seq as usize * 11 + conn as usize * 3) % 48))
    }
}

#[test]
fn g_gathered_small_frames_keep_order_with_shared_buffers() {
    const CONNS: u32 = 4;
    const FRAMES: u32 = 20_000;
    let (servers, readers, expected) = streams(CONNS as usize, |c| (0..FRAMES).flat_map(|s| plan_g(c, s).1).collect());
    let total: u64 = expected.iter().map(|e| e.len() as u64).sum();
    on_glommio(move || async move {
        // Few gathering buffers: some small frames find none and take the plain path, so the
        // two paths interleave on one connection too.
        let pool = pool(&[(256, 4096), (2048, 256)]);
        let sender = UringSender::new(SenderConfig { conns_max: 64, ..SenderConfig::default() }).unwrap();
        let runner = glommio::spawn_local(sender.run());
        let slots: Vec<_> = servers.iter().map(|s| sender.register(s.as_raw_fd()).unwrap()).collect();
        let (mut gathered, mut plain) = (0_u64, 0_u64);
        for seq in 0..FRAMES {
            let shared = (seq % 4 == 0).then(|| pool.lease_copy(&plan_g(0, seq).1).unwrap());
            for (c, &slot) in slots.iter().enumerate() {
                match &shared {
                    Some(lease) => sender.enqueue(slot, OutBuf::Pooled(lease.clone())).unwrap(),
                    None => {
                        let bytes = plan_g(c as u32, seq).1;
                        if sender.enqueue_gathered(slot, &bytes, || pool.lease(2048).ok()).unwrap() {
                            gathered += 1;
                        } else {
                            plain += 1;
                            sender.enqueue(slot, OutBuf::Heap(Bytes::from(bytes))).unwrap();
                        }
                    }
                }
            }
            if seq % 300 == 299 {
                // Sends in flight while more frames are gathered behind them.
                wait_until("queues below 16 KiB", || slots.iter().all(|&s| sender.queued_bytes(s) < 16 << 10)).await;
            }
        }
        wait_until("all queues drained", || slots.iter().all(|&s| sender.queued_bytes(s) == 0)).await;
        let st = sender.stats();
        assert_eq!(st.bytes_sent_total, total);
        assert_eq!((st.errors_total, st.conns_dead_total, st.slow_consumer_total), (0, 0, 0));
        assert_eq!(gathered + plain, u64::from(CONNS * FRAMES / 4 * 3));
        assert!(gathered > plain, "most small frames were gathered: {gathered} gathered, {plain} not");
        assert!(pool.stats().classes.iter().all(|c| c.in_use == 0), "every gathering buffer is released once sent");
        close_and_stop(&sender, &slots, runner).await;
        drop(servers);
    });
    assert_streams(readers, expected);
}

/// The frames of group `g` in test (h) for connection `conn`, each with its size class
/// (`None`: a heap frame). Groups are sent one at a time, so each is one send per connection
/// (more after a short write): ten small pooled frames (one class: a `WRITEV_FIXED`), one
/// frame of about 1 MiB (into a small socket buffer: short writes resume inside a registered
/// buffer), or small pooled frames with, on connection 1 only, a heap frame among them (that
/// send cannot be `WRITEV_FIXED` and falls back to `SendMsg`).
fn plan_h(conn: u32, g: u32) -> Vec<(Option<usize>, Vec<u8>)> {
    let seq = |k: u32| g * 16 + k;
    match g % 3 {
        0 => (0..10).map(|k| (Some(0), frame(SHARED, seq(k), 16 + (seq(k) as usize * 7) % 240))).collect(),
        1 => vec![(Some(1), frame(SHARED, seq(0), FRAME_BYTES_MAX - (g as usize % 97)))],
        _ => (0..6)
            .map(|k| if conn == 1 && k == 3 { (None, frame(conn, seq(k), 30 + g as usize % 50)) } else { (Some(0), frame(SHARED, seq(k), 40)) })
            .collect(),
    }
}

#[test]
fn h_registered_pool_goes_out_as_fixed_writes_in_order_with_short_writes_and_mixed_sends() {
    const CONNS: u32 = 2;
    const GROUPS: u32 = 60;
    let (servers, readers, expected) =
        streams(CONNS as usize, |c| (0..GROUPS).flat_map(|g| plan_h(c, g)).flat_map(|(_, bytes)| bytes).collect());
    for server in &servers {
        // A small send buffer, so that a 1 MiB frame cannot go out in one send.
        set_send_buffer(server, 64 << 10);
    }
    let total: u64 = expected.iter().map(|e| e.len() as u64).sum();
    on_glommio(move || async move {
        let pool = pool(&[(256, 256), (FRAME_BYTES_MAX, 2)]);
        let sender = UringSender::new(SenderConfig { conns_max: 8, conn_outbound_bytes_max: 8 << 20, ..SenderConfig::default() }).unwrap();
        // SAFETY: the pool outlives the sender (dropped after it at the end of this block).
        let registered = unsafe { sender.register_pool(&pool.regions()) };
        assert_eq!(registered, sender.stats().writev_fixed_supported, "registration refused: {:?}", sender.stats());
        let runner = glommio::spawn_local(sender.run());
        let slots: Vec<_> = servers.iter().map(|s| sender.register(s.as_raw_fd()).unwrap()).collect();
        for g in 0..GROUPS {
            // Pooled frames are encoded once and shared by both connections.
            let shared: Vec<Option<_>> = plan_h(0, g)
                .into_iter()
                .map(|(class, bytes)| class.map(|class| {
                    let lease = pool.lease_copy(&bytes).unwrap();
                    assert_eq!(usize::from(lease.class()), class);
                    lease
                }))
                .collect();
            for (c, &slot) in slots.iter().enumerate() {
                for (k, (class, bytes)) in plan_h(c as u32, g).into_iter().enumerate() {
                    let buf = match (class, &shared[k]) {
                        (Some(_), Some(lease)) => OutBuf::Pooled(lease.clone()),
                        _ => OutBuf::Heap(Bytes::from(bytes)),
                    };
                    sender.enqueue(slot, buf).unwrap();
                }
            }
            drop(shared);
            wait_until("group sent", || slots.iter().all(|&s| sender.queued_bytes(s) == 0)).await;
        }
        let st = sender.stats();
        eprintln!("registered pool ({registered}): {st:?}");
        assert_eq!(st.bytes_sent_total, total);
        assert_eq!((st.errors_total, st.conns_dead_total, st.retries_total), (0, 0, 0), "{st:?}");
        assert!(st.short_writes_total > 0, "1 MiB frames into a 64 KiB send buffer must need short writes: {st:?}");
        if registered {
            assert!(st.pool_registered);
            // Every group but the mixed one on connection 1 is single-class.
            assert!(st.fixed_sends_total > u64::from(GROUPS), "too few sends used the registered pool: {st:?}");
            assert!(st.fixed_sends_total < st.sqes_total, "a send with a heap frame must fall back to SendMsg: {st:?}");
        } else {
            assert_eq!(st.fixed_sends_total, 0);
        }
        assert!(pool.stats().classes.iter().all(|c| c.in_use == 0));
        close_and_stop(&sender, &slots, runner).await;
        drop(servers);
    });
    assert_streams(readers, expected);
}

/// Group `g` of test (i): one large frame (above the zero-copy threshold, some above the
/// socket's send buffer) shared by both connections, then small frames (below it).
fn plan_i(g: u32) -> Vec<Vec<u8>> {
    let large = ZC_MIN_BYTES + (g as usize * 7919) % (100 << 10);
    let mut group = vec![frame(SHARED, g * 8, large)];
    group.extend((1..5).map(|k| frame(SHARED, g * 8 + k, 40 + k as usize * 9)));
    group
}

const ZC_MIN_BYTES: usize = 32 << 10;

#[test]
fn i_large_frames_go_out_zero_copy_and_are_held_until_the_kernel_lets_go() {
    const CONNS: usize = 2;
    const GROUPS: u32 = 40;
    let (servers, readers, expected) = streams(CONNS, |_| (0..GROUPS).flat_map(plan_i).flatten().collect());
    for server in &servers {
        // A send buffer smaller than some frames. (On loopback the readers keep up and the
        // kernel takes each frame whole: a short zero-copy send, which resumes inside the same
        // held buffer, is coded but not reached here.)
        set_send_buffer(server, 64 << 10);
    }
    let total: u64 = expected.iter().map(|e| e.len() as u64).sum();
    on_glommio(move || async move {
        // Few large slots: a slot released before its notification would be leased again
        // while the kernel may still read it; released late (or never) the pool runs dry.
        let pool = pool(&[(256, 256), (256 << 10, 4)]);
        let cfg = SenderConfig { conns_max: 8, conn_outbound_bytes_max: 8 << 20, send_zc_min_bytes: ZC_MIN_BYTES, ..SenderConfig::default() };
        let sender = UringSender::new(cfg).unwrap();
        // SAFETY: the pool outlives the sender (dropped after it at the end of this block).
        let registered = unsafe { sender.register_pool(&pool.regions()) };
        let zero_copy = registered && sender.stats().send_zc_supported;
        let runner = glommio::spawn_local(sender.run());
        let slots: Vec<_> = servers.iter().map(|s| sender.register(s.as_raw_fd()).unwrap()).collect();
        for g in 0..GROUPS {
            let leases: Vec<_> = plan_i(g).iter().map(|bytes| pool.lease_copy(bytes).unwrap()).collect();
            for &slot in &slots {
                for lease in &leases {
                    sender.enqueue(slot, OutBuf::Pooled(lease.clone())).unwrap();
                }
            }
            drop(leases);
            // The notifications must arrive and be reaped (the eventfd stays armed while
            // buffers are held), or this never holds.
            wait_until("group sent and every held buffer released", || {
                slots.iter().all(|&s| sender.queued_bytes(s) == 0) && sender.stats().zc_held == 0
            })
            .await;
            assert!(pool.stats().classes.iter().all(|c| c.in_use == 0), "a sent buffer is still leased: {:?}", pool.stats());
        }
        let st = sender.stats();
        eprintln!("zero copy ({zero_copy}): {st:?}");
        assert_eq!(st.bytes_sent_total, total);
        assert_eq!((st.errors_total, st.conns_dead_total, st.retries_total), (0, 0, 0), "{st:?}");
        if zero_copy {
            // Every large frame goes out zero copy, at least once per connection; small ones
            // never do.
            assert!(st.zc_sends_total >= u64::from(GROUPS) * CONNS as u64, "{st:?}");
            assert!(st.zc_sends_total < st.fixed_sends_total, "small frames must be copied: {st:?}");
        } else {
            assert_eq!(st.zc_sends_total, 0);
        }
        close_and_stop(&sender, &slots, runner).await;
        drop(servers);
    });
    assert_streams(readers, expected);
}
