//! Where a shard's time goes on the publish path, stretch by stretch, when the engine is built
//! with `--features phase-timing` (off by default: it reads the TSC a few times per message).
//!
//! Whole-process CPU per delivery moves ±5 % from run to run on a shared VM, which hides any
//! change of a few percent; time summed per stretch over hundreds of thousands of messages on
//! the shard's own thread is steadier (still a few percent here) and says which stretch a
//! change moved. bench/RESULTS.md has the budget this produced and how to reproduce it.
//!
//! Each shard thread keeps its own totals; a shard logs them (`phase timing`, at info) when it
//! stops, with the cost of one timer reading measured on that thread: every stretch includes
//! about one reading of its own, and an enclosing stretch the readings of those inside it.
//! Times are wall time on the shard's thread (a stretch that awaits includes what ran
//! meanwhile; none of the publish path's awaits wait unless a mesh link is full). Without the
//! feature every function here is an empty inline and [`now`] returns 0.

/// A measured stretch of the publish path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Handling what one socket read of a connection brought: decoding and dispatching its
    /// frames (not the read itself).
    Handle,
    /// Decoding one frame from the read buffer (counted only when a frame came out).
    Decode,
    /// The owner's handling of one PUBLISH from a connection of its own shard (the three below
    /// and what lies between); publishes forwarded from other shards are not in it.
    Publish,
    /// Session lookup, deduplication, sequence number and the DELIVER frame encoded into
    /// history (with a journal: appended to it too). Every publish, duplicates included.
    Sequence,
    /// Copying the frame for fan-out and queueing it on every subscriber. Memory-only
    /// publishes: journaled ones fan out when the journal answers, which is not timed.
    Fanout,
    /// Building and queueing the PUBACK (memory-only publishes, as `Fanout`).
    Ack,
    /// One turn of the sender: reap completions, then one submission for every connection
    /// with output (the send syscalls' kernel work included). Turns with nothing to send count
    /// too.
    Flush,
}

#[cfg_attr(not(feature = "phase-timing"), allow(dead_code))]
impl Phase {
    const ALL: [Phase; 7] = [Phase::Handle, Phase::Decode, Phase::Publish, Phase::Sequence, Phase::Fanout, Phase::Ack, Phase::Flush];

    fn name(self) -> &'static str {
        match self {
            Phase::Handle => "handle",
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

    pub fn lap(phase: Phase, since: u64) -> u64 {
        with(|t| {
            let end = t.clock.raw();
            let sum = &mut t.sums[phase as usize];
            sum.0 += end.saturating_sub(since);
            sum.1 += 1;
            end
        })
    }

    /// Mean cost of one reading as the call sites make it (a `now` and a `lap`), in ns.
    fn reading_cost_ns() -> u64 {
        const ROUNDS: u64 = 100_000;
        let (start, saved) = with(|t| (t.clock.raw(), t.sums[Phase::Handle as usize]));
        for _ in 0..ROUNDS {
            let mark = now();
            lap(Phase::Handle, mark);
        }
        with(|t| {
            t.sums[Phase::Handle as usize] = saved;
            t.clock.delta_as_nanos(start, t.clock.raw()) / (2 * ROUNDS)
        })
    }

    pub fn report(shard: usize) {
        let reading_ns = reading_cost_ns();
        let line = with(|t| {
            let mut line = String::new();
            for phase in Phase::ALL {
                let (ticks, count) = t.sums[phase as usize];
                let mean_ns = t.clock.delta_as_nanos(0, ticks).checked_div(count).unwrap_or(0);
                let _ = write!(line, " {} n={count} mean={mean_ns}ns;", phase.name());
            }
            line
        });
        tracing::info!(shard, "phase timing:{line} one timer reading ~{reading_ns}ns");
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
    pub fn lap(_phase: Phase, _since: u64) -> u64 {
        0
    }

    #[inline]
    pub fn report(_shard: usize) {}
}

/// A start mark for [`lap`] (0 without the feature).
#[inline]
pub fn now() -> u64 {
    imp::now()
}

/// Adds the time since `since` (from [`now`] or an earlier `lap`) to `phase`; returns the end
/// mark, so the next stretch can start where this one ended with one clock reading.
#[inline]
pub fn lap(phase: Phase, since: u64) -> u64 {
    imp::lap(phase, since)
}

/// Logs this thread's totals for shard `shard` (nothing without the feature).
pub fn report(shard: usize) {
    imp::report(shard);
}
