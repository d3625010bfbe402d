//! `zc_probe`: from what payload size `IORING_OP_SEND_ZC` pays over a copying send on this
//! machine, both from a registered (fixed) buffer as the engine's pool is.
//!
//! Why it exists: the engine issue asks for `SEND_ZC` "where it pays", with the size where it
//! starts to pay measured. The engine registers its buffer pool as `io_uring` fixed buffers
//! and sends with `WRITEV_FIXED` (a copy into the socket); this probe sends one loopback TCP
//! stream of `size`-byte messages from a registered buffer, once with `WRITE_FIXED` (copy) and
//! once with `SEND_ZC` + `IORING_RECVSEND_FIXED_BUF` (pages pinned and handed to the stack,
//! buffer reusable only after the notification CQE), and reports the sending thread's CPU
//! time per message and per KiB (the sending thread also runs the loopback receive path, as
//! a server does) and the wall throughput. A reader thread on another CPU drains the stream.
//!
//! `zc_probe --sizes 128,1024,4096,16384,65536,262144,1048576 --reps 3` (CPU 1 sends, CPU 0
//! reads). One send in flight at a time, as the engine has per connection.

#![allow(clippy::cast_precision_loss)]

use std::io::Read;
use std::net::{TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::thread;
use std::time::Instant;

use clap::Parser;
use io_uring::{cqueue, opcode, types, IoUring};

#[derive(Parser, Debug)]
#[command(version, about = "SEND_ZC vs copying send from a registered buffer, by message size")]
struct Args {
    /// Message sizes in bytes, comma separated.
    #[arg(long, value_delimiter = ',', default_value = "128,1024,4096,16384,65536,262144,1048576")]
    sizes: Vec<usize>,
    /// Bytes sent per (size, mode, repetition), MiB; at least 2 000 and at most 200 000 messages.
    #[arg(long, default_value_t = 256)]
    mib: usize,
    /// Repetitions per (size, mode); the median is reported.
    #[arg(long, default_value_t = 3)]
    reps: usize,
    /// CPU of the sending thread.
    #[arg(long, default_value_t = 1)]
    send_cpu: usize,
    /// CPU of the reading thread.
    #[arg(long, default_value_t = 0)]
    read_cpu: usize,
}

/// Largest message the probe accepts (bytes).
const SIZE_MAX_BYTES: usize = 16 << 20;
/// Buffer slots in the registered region: a zero-copy send's slot is reused only after its
/// notification, so several must be in rotation.
const SLOTS: usize = 8;
const USER_DATA_SEND: u64 = 1;
/// `IORING_SEND_ZC_REPORT_USAGE`: the notification says whether the kernel copied anyway.
const ZC_REPORT_USAGE: u16 = 1 << 3;
/// `IORING_NOTIF_USAGE_ZC_COPIED` in a notification's result.
const NOTIF_USAGE_ZC_COPIED: u32 = 1 << 31;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    Copy,
    ZeroCopy,
}

#[derive(Clone, Copy, Debug, Default)]
struct Sample {
    cpu_ns_per_msg: f64,
    wall_ns_per_msg: f64,
    short_sends: u64,
    zc_copied: u64,
}

fn pin(cpu: usize) {
    // SAFETY: a zeroed cpu_set_t is empty; CPU_SET stays in bounds for cpu < CPU_SETSIZE.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &raw const set) != 0 {
            eprintln!("warning: cannot pin to CPU {cpu}: {}", std::io::Error::last_os_error());
        }
    }
}

fn thread_cpu_ns() -> u64 {
    // SAFETY: a zeroed timespec is a valid out-parameter.
    let mut ts: libc::timespec = unsafe { std::mem::zeroed() };
    // SAFETY: CLOCK_THREAD_CPUTIME_ID with a valid pointer.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &raw mut ts) };
    u64::try_from(ts.tv_sec).unwrap_or(0) * 1_000_000_000 + u64::try_from(ts.tv_nsec).unwrap_or(0)
}

fn main() {
    let args = Args::parse();
    if let Some(&bad) = args.sizes.iter().find(|&&s| s == 0 || s > SIZE_MAX_BYTES) {
        eprintln!("size {bad} not in 1..={SIZE_MAX_BYTES}");
        std::process::exit(2);
    }
    println!("sender on CPU {}, reader on CPU {}; median of {} runs; one send in flight", args.send_cpu, args.read_cpu, args.reps);
    println!("{:>9} {:>14} {:>14} {:>12} {:>12} {:>9} {:>10}", "size B", "copy CPU ns/msg", "zc CPU ns/msg", "copy ns/KiB", "zc ns/KiB", "zc/copy", "zc copied");
    for &size in &args.sizes {
        let messages = ((args.mib << 20) / size).clamp(2_000, 200_000);
        let mut per_mode = Vec::new();
        for mode in [Mode::Copy, Mode::ZeroCopy] {
            let mut samples: Vec<Sample> = (0..args.reps.max(1))
                .map(|_| match run(&args, size, messages, mode) {
                    Ok(sample) => sample,
                    Err(error) => {
                        eprintln!("size {size} {mode:?}: {error}");
                        std::process::exit(1);
                    }
                })
                .collect();
            samples.sort_by(|a, b| a.cpu_ns_per_msg.total_cmp(&b.cpu_ns_per_msg));
            per_mode.push(samples[samples.len() / 2]);
        }
        let (copy, zc) = (per_mode[0], per_mode[1]);
        let kib = size as f64 / 1024.0;
        println!(
            "{size:>9} {:>14.0} {:>14.0} {:>12.0} {:>12.0} {:>8.2}× {:>10}",
            copy.cpu_ns_per_msg,
            zc.cpu_ns_per_msg,
            copy.cpu_ns_per_msg / kib,
            zc.cpu_ns_per_msg / kib,
            zc.cpu_ns_per_msg / copy.cpu_ns_per_msg,
            zc.zc_copied,
        );
        eprintln!("  size {size}: wall ns/msg copy {:.0}, zc {:.0}; short sends copy {}, zc {}", copy.wall_ns_per_msg, zc.wall_ns_per_msg, copy.short_sends, zc.short_sends);
    }
}

/// One stream of `messages` messages of `size` bytes in `mode`.
fn run(args: &Args, size: usize, messages: usize, mode: Mode) -> std::io::Result<Sample> {
    let listener = TcpListener::bind("127.0.0.1:0")?;
    let client = TcpStream::connect(listener.local_addr()?)?;
    let (server, _) = listener.accept()?;
    server.set_nodelay(true)?;
    let total = (size * messages) as u64;
    let read_cpu = args.read_cpu;
    let reader = thread::spawn(move || -> std::io::Result<u64> {
        pin(read_cpu);
        let mut client = client;
        let mut buf = vec![0_u8; 1 << 20];
        let mut got = 0_u64;
        while got < total {
            let n = client.read(&mut buf)?;
            if n == 0 {
                break;
            }
            got += n as u64;
        }
        Ok(got)
    });
    pin(args.send_cpu);
    let mut region = vec![0_u8; size * SLOTS];
    for (i, b) in region.iter_mut().enumerate() {
        *b = (i % 251) as u8;
    }
    let mut ring = IoUring::new(64)?;
    let iov = libc::iovec { iov_base: region.as_mut_ptr().cast(), iov_len: region.len() };
    // SAFETY: `region` outlives the ring (dropped after it at the end of this function) and
    // is only read by the kernel (sends).
    unsafe { ring.submitter().register_buffers(&[iov])? };
    let fd = types::Fd(server.as_raw_fd());
    let mut notif_pending = [false; SLOTS];
    let mut sample = Sample::default();
    let started = Instant::now();
    let cpu_started = thread_cpu_ns();
    for m in 0..messages {
        let slot = m % SLOTS;
        while notif_pending[slot] {
            reap(&mut ring, &mut notif_pending, &mut sample, true)?;
        }
        let base = slot * size;
        let mut sent = 0;
        while sent < size {
            // SAFETY (both): the slot's bytes live in `region`, registered as buffer 0, and are
            // not written while the send (or, for SEND_ZC, its notification) is outstanding.
            let ptr = unsafe { region.as_ptr().add(base + sent) };
            let len = (size - sent) as u32;
            let entry = match mode {
                Mode::Copy => opcode::WriteFixed::new(fd, ptr.cast_mut(), len, 0).build(),
                Mode::ZeroCopy => opcode::SendZc::new(fd, ptr, len).buf_index(Some(0)).zc_flags(ZC_REPORT_USAGE).build(),
            };
            let user_data = USER_DATA_SEND | ((slot as u64) << 8);
            // SAFETY: see above.
            unsafe { ring.submission().push(&entry.user_data(user_data)).map_err(|_| std::io::Error::other("SQ full"))? };
            let n = loop {
                ring.submit_and_wait(1)?;
                if let Some(n) = reap(&mut ring, &mut notif_pending, &mut sample, false)? {
                    break n;
                }
            };
            if n < len as usize {
                sample.short_sends += 1;
            }
            sent += n;
        }
    }
    while notif_pending.iter().any(|&p| p) {
        reap(&mut ring, &mut notif_pending, &mut sample, true)?;
    }
    let cpu_ns = thread_cpu_ns() - cpu_started;
    let wall_ns = started.elapsed().as_nanos() as f64;
    let got = reader.join().map_err(|_| std::io::Error::other("reader panicked"))??;
    if got != total {
        return Err(std::io::Error::other(format!("reader got {got} of {total} bytes")));
    }
    sample.cpu_ns_per_msg = cpu_ns as f64 / messages as f64;
    sample.wall_ns_per_msg = wall_ns / messages as f64;
    drop(ring);
    drop(region);
    Ok(sample)
}

/// Drains the completion queue (waiting for one completion when `wait`). Returns the byte
/// count of a send's result completion if one was seen; notifications clear their slot.
fn reap(ring: &mut IoUring, notif_pending: &mut [bool; SLOTS], sample: &mut Sample, wait: bool) -> std::io::Result<Option<usize>> {
    if wait {
        ring.submit_and_wait(1)?;
    }
    let mut sent = None;
    for cqe in ring.completion() {
        let slot = (cqe.user_data() >> 8) as usize % SLOTS;
        let flags = cqe.flags();
        if cqueue::notif(flags) {
            notif_pending[slot] = false;
            // IORING_NOTIF_USAGE_ZC_COPIED: the kernel copied after all (loopback always does).
            if u32::from_ne_bytes(cqe.result().to_ne_bytes()) & NOTIF_USAGE_ZC_COPIED != 0 {
                sample.zc_copied += 1;
            }
            continue;
        }
        if cqe.result() < 0 {
            return Err(std::io::Error::from_raw_os_error(-cqe.result()));
        }
        if cqueue::more(flags) {
            notif_pending[slot] = true;
        }
        sent = usize::try_from(cqe.result()).ok();
    }
    Ok(sent)
}
