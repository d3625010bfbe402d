//! One process-wide time base. Every timestamp in a payload and in the generator is
//! nanoseconds since [`base`], so any thread in the process can compute a latency.

use std::sync::OnceLock;
use std::time::{Duration, Instant};

static BASE: OnceLock<Instant> = OnceLock::new();

/// The process-wide base instant (set on first use).
pub fn base() -> Instant {
    *BASE.get_or_init(Instant::now)
}

/// Nanoseconds since [`base`].
pub fn now_ns() -> u64 {
    base().elapsed().as_nanos() as u64
}

/// The instant `ns` nanoseconds after [`base`].
pub fn at(ns: u64) -> Instant {
    base() + Duration::from_nanos(ns)
}

/// Sleep until `ns` (no-op if that time has passed).
pub fn sleep_until(ns: u64) {
    let now = now_ns();
    if ns > now {
        std::thread::sleep(Duration::from_nanos(ns - now));
    }
}

/// Ask the kernel for 1 ns timer slack on the calling thread, so sleeps on a pacing tick
/// wake close to their deadline instead of up to the default 50 µs late.
pub fn tight_timer_slack() {
    // SAFETY: PR_SET_TIMERSLACK takes an unsigned long and affects only the calling thread.
    unsafe {
        libc::prctl(libc::PR_SET_TIMERSLACK, 1 as libc::c_ulong, 0, 0, 0);
    }
}
