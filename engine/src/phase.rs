//! Where a shard's time goes on the publish path, phase by phase, when the engine is built with
//! `--features phase-timing` (off by default: it reads the TSC a few times per message).
//!
//! Whole-process CPU per delivery moves ±5 % from run to run on a shared VM, which hides any
//! change of a few percent. Time spent inside one phase, summed over hundreds of thousands of
//! messages on the shard's own thread, is steady to about 1 %, so it shows what a change to
//! that phase did. bench/RESULTS.md has the budget this produced and how to reproduce it.
//!
//! Each shard thread keeps its own totals; a shard logs them (`phase timing`, at info) when it
//! stops. Without the feature every function here is an empty inline and [`now`] returns 0.

/// A measured stretch of the publish path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Everything done with one socket read of a connection: decode and dispatch its frames.
    Read,
    /// Decoding one frame from the read buffer.
    Decode,
    /// The owner's whole handling of one PUBLISH (the four below and what lies between).
    Publish,
    /// Session lookup, deduplication, sequence number and the DELIVER frame encoded into history.
    Sequence,
    /// Copying the frame for fan-out and queueing it on every subscriber.
    Fanout,
    /// Building and queueing the PUBACK.
    Ack,
    /// One turn of the sender: reap completions, one submission for every connection with
    /// output (the send syscalls' kernel work included).
    Flush,
}

#[cfg_attr(not(feature = "phase-timing"), allow(dead_code))]
impl Phase {
    const ALL: [Phase; 7] = [Phase::Read, Phase::Decode, Phase::Publish, Phase::Sequence, Phase::Fanout, Phase::Ack, Phase::Flush];

    fn name(self) -> &'static str {
        match self {
            Phase::Read => "read",
            Phase::Decode => "decode",
            Phase::Publish => "publish",
            Phase::Sequence => "sequence",
            Phase::Fanout => "fanout",
            Phase::Ack => "ack",
            Phase::Flush => "flush",
        }
    }
}

#[cfg(feature = "phase-timing")]
mod imp {
    use super::Phase;
    use std::cell::RefCell;
    use std::fmt::Write as _;

    struct Totals {
        clock: quanta::Clock,
        /// Per phase: summed raw clock ticks, and how many stretches.
        sums: [(u64, u64); Phase::ALL.len()],
    }

    thread_local! {
        static TOTALS: RefCell<Option<Totals>> = const { RefCell::new(None) };
    }

    fn with<R>(f: impl FnOnce(&mut Totals) -> R) -> R {
        TOTALS.with(|t| {
            let mut t = t.borrow_mut();
            let totals = t.get_or_insert_with(|| Totals { clock: quanta::Clock::new(), sums: [(0, 0); Phase::ALL.len()] });
            f(totals)
        })
    }

    pub fn now() -> u64 {
        with(|t| t.clock.raw())
    }

    pub fn add(phase: Phase, since: u64) {
        with(|t| {
            let end = t.clock.raw();
            let sum = &mut t.sums[phase as usize];
            sum.0 += end.saturating_sub(since);
            sum.1 += 1;
        });
    }

    pub fn report(shard: usize) {
        let line = with(|t| {
            let mut line = String::new();
            for phase in Phase::ALL {
                let (ticks, count) = t.sums[phase as usize];
                let ns = t.clock.delta_as_nanos(0, ticks);
                let _ = write!(line, " {}: {} x {} ns;", phase.name(), count, ns.checked_div(count).unwrap_or(0));
            }
            line
        });
        tracing::info!(shard, "phase timing (stretches x mean):{line}");
    }
}

#[cfg(not(feature = "phase-timing"))]
mod imp {
    use super::Phase;

    #[inline]
    pub fn now() -> u64 {
        0
    }

    #[inline]
    pub fn add(_phase: Phase, _since: u64) {}

    #[inline]
    pub fn report(_shard: usize) {}
}

/// A start mark for [`add`] (0 without the feature).
#[inline]
pub fn now() -> u64 {
    imp::now()
}

/// Adds the time since `since` (from [`now`]) to `phase`.
#[inline]
pub fn add(phase: Phase, since: u64) {
    imp::add(phase, since);
}

/// Logs this thread's totals for shard `shard` (nothing without the feature).
pub fn report(shard: usize) {
    imp::report(shard);
}
