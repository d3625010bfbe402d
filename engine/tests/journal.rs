//! The durable journal (issue 6): round trips, group commit, recovery after every kind of
//! damage the issue names (through the in-memory storage's fault injection), a seeded crash
//! loop, retention, and a real-disk round trip with the glommio direct-I/O backend.

// Short names (s = storage, j = journal, t = ticket, p = payload) keep the scenarios readable;
// the disk test is one story told start to end.
#![allow(clippy::many_single_char_names, clippy::too_many_lines)]

use std::cell::RefCell;
use std::future::Future;
use std::pin::Pin;
use std::rc::Rc;
use std::task::{Context, Poll};

use futures_lite::future::{block_on, or, yield_now};
use switchboard::journal::{
    inspect, verify, Crash, DmaStorage, Durability, Health, Journal, JournalConfig, JournalError, MemStorage, Record,
    RecordKind, Storage,
};

const SHARD: u32 = 3;

/// Small segments so that a few thousand records roll many of them.
fn small() -> JournalConfig {
    JournalConfig {
        segment_bytes: 64 * 1024,
        frame_bytes_max: 8192,
        write_bytes_max: 16 * 1024,
        pending_bytes_max: 4 << 20,
        retention_messages_max: 100_000,
        retention_state_max: 100,
        shard_bytes_max: 1 << 30,
        ..JournalConfig::default()
    }
}

fn payload(conv: u64, seq: u64) -> Vec<u8> {
    format!("conversation {conv} message {seq};").repeat(1 + (seq % 7) as usize).into_bytes()
}

fn msg(conv: u64, seq: u64, p: &[u8]) -> Record<'_> {
    Record { conversation: conv, seq, timestamp_us: 1_000_000 + seq, kind: RecordKind::Message, payload: p }
}

/// Runs `body` with the committer running beside it.
fn run<S: Storage, T>(j: &Journal<S>, body: impl Future<Output = T>) -> T {
    block_on(or(body, async {
        let _ = j.run_committer().await;
        futures_lite::future::pending::<T>().await
    }))
}

/// Polls all futures concurrently until every one is done.
async fn join_all<F: Future>(futs: Vec<F>) -> Vec<F::Output> {
    let mut futs: Vec<Pin<Box<F>>> = futs.into_iter().map(Box::pin).collect();
    let mut out: Vec<Option<F::Output>> = futs.iter().map(|_| None).collect();
    std::future::poll_fn(move |cx: &mut Context<'_>| {
        let mut done = true;
        for (f, o) in futs.iter_mut().zip(out.iter_mut()) {
            if o.is_none() {
                match f.as_mut().poll(cx) {
                    Poll::Ready(v) => *o = Some(v),
                    Poll::Pending => done = false,
                }
            }
        }
        if done {
            Poll::Ready(out.iter_mut().map(|o| o.take().expect("done")).collect())
        } else {
            Poll::Pending
        }
    })
    .await
}

fn open(s: &MemStorage, cfg: &JournalConfig) -> (Journal<MemStorage>, switchboard::journal::RecoveryReport) {
    block_on(Journal::open(s.clone(), SHARD, cfg.clone())).expect("open")
}

/// Appends and acknowledges `seqs` of `conv` one commit each.
fn append_acked(j: &Journal<MemStorage>, conv: u64, seqs: std::ops::Range<u64>) {
    run(j, async {
        for seq in seqs {
            let p = payload(conv, seq);
            let t = j.append(&msg(conv, seq, &p), Durability::Sync).unwrap();
            j.acked(t).await.unwrap();
        }
    });
}

/// Reads every retained message of `conv` and checks they are exactly `seqs`, with payloads.
fn assert_messages(j: &Journal<MemStorage>, conv: u64, seqs: &[u64]) {
    let read = block_on(j.read_messages(conv, 0, usize::MAX)).unwrap();
    assert_eq!(read.damaged_frames, 0);
    let got: Vec<u64> = read.records.iter().map(|r| r.seq).collect();
    assert_eq!(got, seqs, "conversation {conv}");
    for r in &read.records {
        assert_eq!(&r.payload[..], &payload(conv, r.seq)[..]);
        assert_eq!(r.kind, RecordKind::Message);
    }
}

#[test]
fn round_trip_across_frames_and_segment_rolls() {
    let s = MemStorage::new();
    let cfg = small();
    let (j, rep) = open(&s, &cfg);
    assert_eq!((rep.epoch, rep.previous_epoch, rep.next_position), (1, None, 0));
    // 3000 records in 30 conversations, acknowledged in groups of 50 (one frame-group each).
    run(&j, async {
        for round in 0..60u64 {
            let mut tickets = Vec::new();
            for i in 0..50u64 {
                let n = round * 50 + i;
                let (conv, seq) = (n % 30, n / 30);
                let p = payload(conv, seq);
                tickets.push(j.append(&msg(conv, seq, &p), Durability::Sync).unwrap());
            }
            for t in tickets {
                j.acked(t).await.unwrap();
            }
        }
    });
    let segs = j.segments();
    assert!(segs.len() >= 8, "expected many segment rolls, got {}", segs.len());
    let all: Vec<u64> = (0..100).collect();
    for conv in 0..30 {
        assert_messages(&j, conv, &all);
    }
    run(&j, j.close()).unwrap();
    assert!(matches!(j.append(&msg(1, 1, b"x"), Durability::Sync), Err(JournalError::Closed)));

    // Clean reopen: same epoch, snapshot used, nothing replayed, same contents.
    let (j2, rep) = open(&s, &cfg);
    assert!(rep.clean_shutdown && !rep.acked_may_be_missing, "{rep}");
    assert_eq!((rep.epoch, rep.next_position, rep.records_replayed), (1, 3000, 0));
    assert!(rep.snapshot_used.is_some());
    for conv in 0..30 {
        assert_messages(&j2, conv, &all);
    }
    // Appends continue at the next position, in a new segment or the old one.
    append_acked(&j2, 5, 100..101);
    assert_eq!(j2.next_position(), 3001);
}

#[test]
fn group_commit_needs_fewer_syncs_than_appends() {
    // Direct: 100 appends, one commit, one fdatasync.
    let s = MemStorage::new();
    let (j, _) = open(&s, &small());
    let before = s.stats().fdatasyncs;
    let tickets: Vec<_> = (0..100).map(|i| j.append(&msg(1, i, b"hello"), Durability::Sync).unwrap()).collect();
    assert_eq!(block_on(j.commit_once()).unwrap(), 100);
    assert_eq!(s.stats().fdatasyncs - before, 1);
    for t in tickets {
        block_on(j.acked(t)).unwrap();
    }

    // Concurrent: 64 appenders each append+await 20 times while each fdatasync takes a while.
    let s = MemStorage::new();
    s.set_fdatasync_polls(5);
    let (j, _) = open(&s, &small());
    let before = s.stats().fdatasyncs;
    let results = run(&j, async {
        let appenders: Vec<_> = (0..64u64)
            .map(|conv| {
                let j = j.clone();
                async move {
                    for seq in 0..20 {
                        let p = payload(conv, seq);
                        let t = j.append(&msg(conv, seq, &p), Durability::Sync).unwrap();
                        j.acked(t).await.unwrap();
                        yield_now().await;
                    }
                }
            })
            .collect();
        join_all(appenders).await
    });
    assert_eq!(results.len(), 64);
    let syncs = s.stats().fdatasyncs - before;
    let appends = 64 * 20;
    assert!(syncs * 10 < appends, "{syncs} fdatasyncs for {appends} appends: group commit is not grouping");
    assert_eq!(j.stats().appends, appends);
    for conv in [0, 31, 63] {
        assert_messages(&j, conv, &(0..20).collect::<Vec<_>>());
    }
}

/// Writes the pending records but leaves their fdatasync in flight (never completing), as a
/// crash would find them.
fn write_without_sync(s: &MemStorage, j: &Journal<MemStorage>) {
    s.set_fdatasync_polls(u32::MAX);
    block_on(or(
        async {
            let _ = j.commit_once().await;
        },
        async {
            for _ in 0..3 {
                yield_now().await;
            }
        },
    ));
}

#[test]
fn torn_last_frame_is_cut_and_the_epoch_kept() {
    let s = MemStorage::new();
    let cfg = small();
    let (j, _) = open(&s, &cfg);
    append_acked(&j, 7, 0..50);
    let big = vec![0xAB; 5000];
    let t = j.append(&msg(7, 50, &big), Durability::Sync).unwrap();
    write_without_sync(&s, &j);
    assert!(block_on(or(async { Some(j.acked(t).await) }, async { None })).is_none(), "not acknowledged");

    let crashed = s.crash(Crash::TearLastWrite { keep_bytes: 1000 });
    let (j2, rep) = open(&crashed, &cfg);
    let tail = rep.truncated_tail.clone().expect("a torn tail");
    assert!(tail.bytes_zeroed > 0);
    assert!(rep.damage.is_empty(), "{rep}");
    assert!(!rep.acked_may_be_missing);
    assert_eq!((rep.epoch, rep.next_position), (1, 50));
    assert_messages(&j2, 7, &(0..50).collect::<Vec<_>>());
    // The journal goes on from the cut, and a further crash+open finds it intact.
    append_acked(&j2, 7, 50..60);
    let (j3, rep) = open(&crashed.crash(Crash::DropUnsynced), &cfg);
    assert!(rep.truncated_tail.is_none() && rep.damage.is_empty(), "{rep}");
    assert_eq!(rep.epoch, 1);
    assert_messages(&j3, 7, &(0..60).collect::<Vec<_>>());
}

#[test]
fn flipped_bits_mid_segment_quarantine_and_bump_the_epoch_once() {
    let s = MemStorage::new();
    let cfg = small();
    let (j, _) = open(&s, &cfg);
    // Ten frames of ten records each, each frame in its own 4 KiB block.
    for f in 0..10u64 {
        let tickets: Vec<_> = (0..10)
            .map(|i| {
                let seq = f * 10 + i;
                j.append(&msg(1, seq, &payload(1, seq)), Durability::Sync).unwrap()
            })
            .collect();
        assert_eq!(block_on(j.commit_once()).unwrap(), 10);
        for t in tickets {
            block_on(j.acked(t)).unwrap();
        }
    }
    let seg = format!("{:020}.seg", 0);
    // Frame 3 (positions 30..40) sits at 4096 * (1 + 3).
    s.flip_bit(&seg, 4096 * 4 + 200, 2);

    let (j2, rep) = open(&s.crash(Crash::KeepWritten), &cfg);
    assert_eq!(rep.damage.len(), 1, "{rep}");
    let d = &rep.damage[0];
    assert_eq!((d.segment, d.lost_positions.clone(), d.already_reported), (0, 30..40, false));
    assert!(d.reason.contains("checksum"), "{}", d.reason);
    assert!(rep.truncated_tail.is_none());
    assert!(rep.acked_may_be_missing);
    assert_eq!((rep.previous_epoch, rep.epoch, rep.next_position), (Some(1), 2, 100));
    let expected: Vec<u64> = (0..30).chain(40..100).collect();
    assert_messages(&j2, 1, &expected);
    let read = block_on(j2.read_messages(1, 0, usize::MAX)).unwrap();
    assert!(!read.complete_from(0) || read.first_retained_seq == Some(0));
    // Quarantined: never written again; the bump lives in a new segment's header.
    assert!(j2.storage().names().contains(&format!("{:020}.quarantine", 0)));
    assert_eq!(j2.segments(), vec![0, 100]);
    append_acked(&j2, 1, 100..105);

    // Reopen: the same damage is known, the epoch stays 2.
    let (j3, rep) = open(&j2.storage().crash(Crash::DropUnsynced), &cfg);
    assert_eq!(rep.damage.len(), 1);
    assert!(rep.damage[0].already_reported, "{rep}");
    assert!(!rep.acked_may_be_missing);
    assert_eq!(rep.epoch, 2);
    assert_messages(&j3, 1, &(0..30).chain(40..105).collect::<Vec<_>>());
}

#[test]
fn missing_or_corrupt_snapshot_means_full_replay_with_the_same_result() {
    let s = MemStorage::new();
    let cfg = small();
    let (j, _) = open(&s, &cfg);
    append_acked(&j, 1, 0..300);
    let first = run(&j, j.write_snapshot()).unwrap();
    append_acked(&j, 2, 0..300);
    let second = run(&j, j.write_snapshot()).unwrap();
    append_acked(&j, 1, 300..400);
    assert_eq!((first, second), (300, 600));
    let (c1, c2): (Vec<u64>, Vec<u64>) = ((0..400).collect(), (0..300).collect());

    let snap = |p: u64| format!("{p:020}.idx");
    let base = s.crash(Crash::DropUnsynced);
    let (j_snap, rep) = open(&base.crash(Crash::KeepWritten), &cfg);
    assert_eq!((rep.snapshot_used, rep.records_replayed), (Some(600), 100), "{rep}");
    assert!(!rep.acked_may_be_missing && rep.epoch == 1);
    assert_messages(&j_snap, 1, &c1);
    assert_messages(&j_snap, 2, &c2);

    // The newest snapshot is corrupt: the older one is used.
    let corrupt = base.crash(Crash::KeepWritten);
    corrupt.flip_bit(&snap(600), 40, 0);
    let (j_old, rep) = open(&corrupt, &cfg);
    assert_eq!(rep.snapshot_used, Some(300), "{rep}");
    assert_eq!(rep.snapshots_rejected.len(), 1);
    assert_eq!(rep.records_replayed, 400);
    assert_messages(&j_old, 1, &c1);
    assert_messages(&j_old, 2, &c2);

    // No snapshot at all: everything is replayed.
    let none = base.crash(Crash::KeepWritten);
    none.delete(&snap(600));
    none.delete(&snap(300));
    let (j_full, rep) = open(&none, &cfg);
    assert_eq!((rep.snapshot_used, rep.records_replayed), (None, 700), "{rep}");
    assert!(!rep.acked_may_be_missing && rep.epoch == 1);
    assert_messages(&j_full, 1, &c1);
    assert_messages(&j_full, 2, &c2);
    assert_eq!(j_full.conversation_heads().len(), 2);
}

#[test]
fn failed_fdatasync_fails_the_journal_and_acks_nothing_unsynced() {
    let s = MemStorage::new();
    let cfg = small();
    let (j, _) = open(&s, &cfg);
    append_acked(&j, 4, 0..20);
    s.fail_fdatasync_after(0);
    let results = run(&j, async {
        let tickets: Vec<_> =
            (20..25).map(|seq| j.append(&msg(4, seq, &payload(4, seq)), Durability::Sync).unwrap()).collect();
        let mut out = Vec::new();
        for t in tickets {
            out.push(j.acked(t).await);
        }
        out
    });
    for r in &results {
        assert!(matches!(r, Err(JournalError::Failed(why)) if why.contains("fdatasync")), "{r:?}");
    }
    assert!(matches!(j.health(), Health::Failed(_)));
    assert!(matches!(j.append(&msg(4, 25, b"x"), Durability::Sync), Err(JournalError::Failed(_))));
    // The committer stops too.
    assert!(matches!(block_on(j.run_committer()), Err(JournalError::Failed(_))));

    // Power loss now: everything acknowledged is there; nothing else was acknowledged.
    let (j2, rep) = open(&s.crash(Crash::DropUnsynced), &cfg);
    assert!(!rep.acked_may_be_missing, "{rep}");
    assert_eq!(rep.next_position, 20);
    assert_messages(&j2, 4, &(0..20).collect::<Vec<_>>());
    assert_eq!(j2.health(), Health::Healthy);
}

#[test]
fn enospc_refuses_clearly_and_loses_nothing_acknowledged() {
    let s = MemStorage::new();
    let cfg = small();
    // Room for two segments and a few small files, not a third segment.
    s.set_capacity_bytes(Some(2 * cfg.segment_bytes + 3 * 4096));
    let (j, _) = open(&s, &cfg);
    let acked = RefCell::new(Vec::new());
    let errors = RefCell::new(Vec::new());
    run(&j, async {
        for seq in 0..2000u64 {
            let p = payload(9, seq);
            match j.append(&msg(9, seq, &p), Durability::Sync) {
                Ok(t) => match j.acked(t).await {
                    Ok(()) => acked.borrow_mut().push(seq),
                    Err(e) => errors.borrow_mut().push(e),
                },
                Err(e) => {
                    errors.borrow_mut().push(e);
                    break;
                }
            }
        }
    });
    let acked = acked.into_inner();
    let errors = errors.into_inner();
    assert!(!acked.is_empty());
    assert!(errors.iter().all(|e| *e == JournalError::NoSpace), "{errors:?}");
    assert!(!errors.is_empty(), "the device should have filled");
    assert_eq!(j.health(), Health::NoSpace);
    assert_eq!(errors[0].to_string(), "journal device is full: record not written");

    // A power loss now: every acknowledged record is there, in order.
    let (j2, rep) = open(&s.crash(Crash::DropUnsynced), &cfg);
    assert!(!rep.acked_may_be_missing, "{rep}");
    assert_messages(&j2, 9, &acked);

    // Or space comes back: the same journal goes on where it stopped.
    s.set_capacity_bytes(None);
    j.resume_after_no_space();
    let next = *acked.last().unwrap() + 1;
    run(&j, async {
        let p = payload(9, next);
        let t = j.append(&msg(9, next, &p), Durability::Sync).unwrap();
        j.acked(t).await.unwrap();
    });
    let mut all = acked.clone();
    all.push(next);
    assert_messages(&j, 9, &all);
}

#[test]
fn limits_refuse_with_named_errors() {
    let s = MemStorage::new();
    let cfg = JournalConfig { pending_bytes_max: 8192, ..small() };
    let (j, _) = open(&s, &cfg);
    let huge = vec![0u8; 9000];
    assert!(matches!(j.append(&msg(1, 1, &huge), Durability::Sync), Err(JournalError::TooLarge { .. })));
    assert_eq!(j.append(&msg(1, 1, b"x"), Durability::Interval), Err(JournalError::IntervalNotAllowed));
    let p = vec![0u8; 3000];
    let _t1 = j.append(&msg(1, 1, &p), Durability::Sync).unwrap();
    let _t2 = j.append(&msg(1, 2, &p), Durability::Sync).unwrap();
    assert!(matches!(j.append(&msg(1, 3, &p), Durability::Sync), Err(JournalError::Backpressure { .. })));
    assert_eq!(j.stats().backpressure, 1);
    // Another shard's directory is refused.
    block_on(j.commit_once()).unwrap();
    let err = block_on(Journal::open(s.clone(), SHARD + 1, cfg)).unwrap_err();
    assert_eq!(err, JournalError::ForeignShard { expected: SHARD + 1, found: SHARD });
}

#[test]
fn interval_mode_acks_before_sync_and_recovery_assumes_the_worst_unless_clean() {
    let s = MemStorage::new();
    let cfg = JournalConfig { interval_allowed: true, interval_bytes: 1 << 30, ..small() };
    let (j, _) = open(&s, &cfg);
    // Acknowledged after the write, before any fdatasync.
    for seq in 0..10u64 {
        let p = payload(2, seq);
        let t = j.append(&msg(2, seq, &p), Durability::Interval).unwrap();
        s.set_fdatasync_polls(u32::MAX);
        block_on(or(
            async {
                let _ = j.commit_once().await;
            },
            async {
                yield_now().await;
            },
        ));
        block_on(j.acked(t)).unwrap();
        assert!(j.synced_position() <= seq);
    }
    // Power loss: acknowledged records were never synced. The journal cannot see what was lost,
    // so it bumps the epoch.
    let (_, rep) = open(&s.crash(Crash::DropUnsynced), &cfg);
    assert!(rep.early_ack_possible && !rep.clean_shutdown && rep.acked_may_be_missing, "{rep}");
    assert_eq!(rep.epoch, 2);

    // A clean close keeps the epoch.
    let s = MemStorage::new();
    let (j, _) = open(&s, &cfg);
    run(&j, async {
        for seq in 0..10u64 {
            let p = payload(2, seq);
            let t = j.append(&msg(2, seq, &p), Durability::Interval).unwrap();
            j.acked(t).await.unwrap();
        }
        j.close().await.unwrap();
    });
    let (j2, rep) = open(&s, &cfg);
    assert!(rep.clean_shutdown && !rep.acked_may_be_missing, "{rep}");
    assert_eq!(rep.epoch, 1);
    assert_messages(&j2, 2, &(0..10).collect::<Vec<_>>());
    // ... and the clean marker is consumed: a crash after this open is unclean again.
    let (_, rep) = open(&j2.storage().crash(Crash::DropUnsynced), &cfg);
    assert!(!rep.clean_shutdown && rep.acked_may_be_missing);
}

#[test]
fn retention_deletes_only_unpinned_segments_oldest_first() {
    let s = MemStorage::new();
    let cfg = JournalConfig { retention_messages_max: 50, retention_age_ms: 1, ..small() };
    let (j, _) = open(&s, &cfg);
    // A quiet conversation writes once, at the start.
    append_acked(&j, 100, 0..1);
    // A chatty one fills many segments.
    append_acked(&j, 1, 0..2000);
    let before = j.segments();
    assert!(before.len() > 5);
    // Chatty keeps its last 50; the quiet one pins segment 0, so nothing can go (oldest first).
    let out = run(&j, j.apply_retention(1_001_000)).unwrap();
    assert_eq!(out.segments_deleted, 0);
    assert_messages(&j, 1, &(1950..2000).collect::<Vec<_>>());
    // Once the quiet conversation ages out (age limit 1 ms; chatty's last 50 are newer), every segment nothing points into goes.
    let out = run(&j, j.apply_retention(1_002_000)).unwrap();
    assert!(out.segments_deleted > 0);
    assert_eq!(out.entries_evicted, 1);
    let after = j.segments();
    assert!(after.len() < before.len() && !after.is_empty());
    assert_messages(&j, 1, &(1950..2000).collect::<Vec<_>>());
    assert!(block_on(j.read_messages(100, 0, 10)).unwrap().records.is_empty());
    // Recovery after deletion starts from the first remaining segment.
    let (j2, rep) = open(&s.crash(Crash::DropUnsynced), &cfg);
    assert!(rep.damage.is_empty() && !rep.acked_may_be_missing, "{rep}");
    assert_eq!(rep.first_position, after[0]);
    assert_messages(&j2, 1, &(1950..2000).collect::<Vec<_>>());

    // The per-shard byte limit deletes the oldest segments whatever they hold.
    let s = MemStorage::new();
    let cfg = JournalConfig { shard_bytes_max: 4 * 64 * 1024, ..small() };
    let (j, _) = open(&s, &cfg);
    append_acked(&j, 1, 0..3000);
    let out = run(&j, j.apply_retention(0)).unwrap();
    assert!(out.segments_deleted > 0);
    assert!(j.segments().len() <= 4);
    let read = block_on(j.read_messages(1, 0, usize::MAX)).unwrap();
    assert!(!read.complete_from(0));
    assert_eq!(read.records.last().unwrap().seq, 2999);
}

/// Tiny deterministic generator (xorshift64*), so any failing seed replays.
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

#[test]
fn seeded_crashes_never_lose_an_acknowledged_record() {
    let (mut tails_cut, mut acked_total) = (0, 0);
    for seed in 1..=40u64 {
        let mut rng = Rng(seed * 0x9E37_79B9);
        let cfg = small();
        let mut s = MemStorage::new();
        let mut acked: Vec<Vec<u64>> = vec![Vec::new(); 4];
        let mut next_seq = [0u64; 4];
        let mut epoch = 1;
        for round in 0..4 {
            let (j, rep) = open(&s, &cfg);
            assert!(rep.damage.is_empty(), "seed {seed} round {round}: {rep}");
            assert!(!rep.acked_may_be_missing, "seed {seed} round {round}: {rep}");
            assert_eq!(rep.epoch, epoch);
            epoch = rep.epoch;
            tails_cut += usize::from(rep.truncated_tail.is_some());
            // Every acknowledged record is present, once, in order; unacknowledged ones may be
            // present too (written, crash before the ack), but only after the acknowledged.
            for conv in 0..4u64 {
                let read = block_on(j.read_messages(conv, 0, usize::MAX)).unwrap();
                let got: Vec<u64> = read.records.iter().map(|r| r.seq).collect();
                assert!(got.starts_with(&acked[conv as usize]), "seed {seed} conv {conv}: {got:?}");
                assert!(got.windows(2).all(|w| w[1] == w[0] + 1), "seed {seed} conv {conv}: {got:?}");
                next_seq[conv as usize] = got.last().map_or(0, |l| l + 1);
                acked[conv as usize] = got;
            }
            s.set_fdatasync_polls(rng.below(4) as u32);
            let acked_now = Rc::new(RefCell::new(Vec::new()));
            let budget = 20 + rng.below(400);
            let appenders: Vec<_> = (0..4u64)
                .map(|conv| {
                    let j = j.clone();
                    let acked_now = acked_now.clone();
                    let start = next_seq[conv as usize];
                    let n = rng.below(200);
                    async move {
                        for seq in start..start + n {
                            let p = payload(conv, seq);
                            let t = j.append(&msg(conv, seq, &p), Durability::Sync).unwrap();
                            j.acked(t).await.unwrap();
                            acked_now.borrow_mut().push((conv, seq));
                        }
                    }
                })
                .collect();
            // Crash after `budget` polls, wherever the work is.
            block_on(or(
                async {
                    or(join_all(appenders), async {
                        let _ = j.run_committer().await;
                        futures_lite::future::pending().await
                    })
                    .await;
                },
                async {
                    for _ in 0..budget {
                        yield_now().await;
                    }
                },
            ));
            acked_total += acked_now.borrow().len();
            for (conv, seq) in acked_now.borrow().iter() {
                let a = &mut acked[*conv as usize];
                if a.last().is_none_or(|l| l < seq) {
                    a.push(*seq);
                }
            }
            let how = match rng.below(3) {
                0 => Crash::KeepWritten,
                1 => Crash::DropUnsynced,
                _ => Crash::TearLastWrite { keep_bytes: rng.below(8192) as usize },
            };
            s = s.crash(how);
        }
    }
    // The loop must have exercised what it claims to.
    assert!(tails_cut > 0, "no crash tore a frame");
    assert!(acked_total > 1000, "only {acked_total} acknowledged records");
}

/// A read cursor record: the seq is the cursor, the payload names the participant.
fn cursor(conv: u64, seq: u64, ts: u64, who: &[u8]) -> Record<'_> {
    Record { conversation: conv, seq, timestamp_us: ts, kind: RecordKind::ReadCursor, payload: who }
}

/// Appends `records` as one commit and waits for their acknowledgement.
fn append_records_acked(j: &Journal<MemStorage>, records: &[Record<'_>]) {
    run(j, async {
        let tickets: Vec<_> = records.iter().map(|r| j.append(r, Durability::Sync).unwrap()).collect();
        for t in tickets {
            j.acked(t).await.unwrap();
        }
    });
}

/// (seq, timestamp, kind, payload): a record as a reader sees it, whatever its position.
type Seen = (u64, u64, u8, Vec<u8>);

/// Every retained record of `convs`: messages in seq order, state records sorted (their ring
/// order among equal timestamps is not part of the contract).
fn contents<S: Storage>(j: &Journal<S>, convs: &[u64]) -> Vec<(u64, Vec<Seen>, Vec<Seen>)> {
    let seen = |r: &switchboard::journal::StoredRecord| (r.seq, r.timestamp_us, r.kind as u8, r.payload.to_vec());
    convs
        .iter()
        .map(|&c| {
            let m = block_on(j.read_messages(c, 0, usize::MAX)).unwrap();
            let s = block_on(j.read_state(c)).unwrap();
            assert_eq!((m.damaged_frames, s.damaged_frames), (0, 0), "conversation {c}");
            let mut state: Vec<Seen> = s.records.iter().map(seen).collect();
            state.sort();
            (c, m.records.iter().map(seen).collect(), state)
        })
        .collect()
}

/// Quiet conversations 100..100+`quiet` write a few messages and two read cursors at the same
/// seq (two participants) at the start; conversation 1 then writes `chatty` messages, one
/// commit each, so the quiet records end up alone in old segments.
fn quiet_and_chatty(j: &Journal<MemStorage>, quiet: u64, chatty: u64) -> Vec<u64> {
    for c in 100..100 + quiet {
        append_acked(j, c, 0..3);
        append_records_acked(j, &[cursor(c, 2, 5_000_000 + c, b"agent"), cursor(c, 2, 5_000_000 + c, b"customer")]);
    }
    append_acked(j, 1, 0..chatty);
    std::iter::once(1).chain(100..100 + quiet).collect()
}

#[test]
fn compaction_moves_quiet_conversations_forward_and_retention_deletes_their_segments() {
    let s = MemStorage::new();
    let cfg = JournalConfig { retention_messages_max: 50, ..small() };
    let (j, _) = open(&s, &cfg);
    let convs = quiet_and_chatty(&j, 3, 2000);
    let before = contents(&j, &convs);
    assert_eq!(before[1].1.len(), 3);
    assert_eq!(before[1].2.len(), 2, "two participants' cursors at one seq are two records");
    let entries = j.retained_entries();
    let segs = j.segments();
    assert!(segs.len() > 20);
    // The quiet conversations pin the first segment, so retention can delete nothing.
    assert_eq!(run(&j, j.apply_retention(0)).unwrap().segments_deleted, 0);
    assert_eq!(j.segment_pins(segs[0]), 15);

    let out = run(&j, j.compact(u64::MAX)).unwrap();
    assert!(!out.budget_exhausted && !out.yielded_to_appends && !out.already_running, "{out:?}");
    assert_eq!((out.records_unreadable, out.records_skipped), (0, 0));
    assert!(out.records_copied >= 15 && out.segments_cleared == out.segments_chosen, "{out:?}");
    assert!(out.bytes_written > 0 && out.bytes_read >= out.bytes_written, "{out:?}");
    assert_eq!(j.stats().compaction_moves, out.records_copied);
    assert_eq!(j.stats().compaction_copies, out.records_copied);
    assert_eq!(j.segment_pins(segs[0]), 0);
    // Same records, same count, read back from their new places.
    assert_eq!(contents(&j, &convs), before);
    assert_eq!(j.retained_entries(), entries);
    let read = block_on(j.read_messages(100, 0, usize::MAX)).unwrap();
    assert!(read.records.iter().all(|r| r.position >= *segs.last().unwrap()), "copied into the active segment");

    // Every old segment was sparse (the chatty tail is 50 small records), so all of them were
    // cleared; retention keeps only the newest few (too young to compact, holding the tail).
    let ret = run(&j, j.apply_retention(0)).unwrap();
    let left = j.segments();
    assert!(left.len() <= 5 && ret.segments_deleted as usize >= segs.len() - 5, "{left:?}");
    assert_eq!(contents(&j, &convs), before);

    // After a power loss: the snapshot retention wrote points at the copies.
    let crashed = s.crash(Crash::DropUnsynced);
    let (j2, rep) = open(&crashed, &cfg);
    assert!(rep.damage.is_empty() && !rep.acked_may_be_missing && rep.snapshot_used.is_some(), "{rep}");
    assert_eq!(rep.first_position, j.segments()[0]);
    assert_eq!(contents(&j2, &convs), before);
    assert_eq!(j2.retained_entries(), entries);
    // Without any snapshot: a full replay of what is left finds the same.
    let bare = crashed.crash(Crash::KeepWritten);
    for n in bare.names().iter().filter(|n| std::path::Path::new(n).extension().is_some_and(|x| x == "idx")) {
        bare.delete(n);
    }
    let (j3, rep) = open(&bare, &cfg);
    assert_eq!(rep.snapshot_used, None);
    assert_eq!(contents(&j3, &convs), before);
    assert_eq!(j3.retained_entries(), entries);
    // Appends go on as before.
    append_acked(&j3, 1, 2000..2001);
    assert_eq!(block_on(j3.read_messages(1, 2000, 10)).unwrap().records.len(), 1);
}

#[test]
fn compaction_budget_bounds_the_bytes_moved_per_call() {
    let s = MemStorage::new();
    let cfg = JournalConfig { retention_messages_max: 20, ..small() };
    let (j, _) = open(&s, &cfg);
    // Ten quiet conversations, six messages each, one frame per message, spread over the
    // first segments between bursts of a chatty one.
    for round in 0..60u64 {
        append_acked(&j, 100 + round % 10, round / 10..round / 10 + 1);
        append_acked(&j, 1, round * 5..round * 5 + 5);
    }
    append_acked(&j, 1, 300..600);
    let convs: Vec<u64> = std::iter::once(1).chain(100..110).collect();
    let before = contents(&j, &convs);
    let first = j.segments()[0];
    assert!(j.segment_pins(first) > 0);

    // A budget smaller than one frame moves nothing.
    let out = run(&j, j.compact(100)).unwrap();
    assert!(out.budget_exhausted && out.records_copied == 0 && out.bytes_read == 0, "{out:?}");

    let budget = 4096;
    let mut calls = 0;
    let (mut read, mut written) = (0, 0);
    loop {
        let out = run(&j, j.compact(budget)).unwrap();
        assert!(out.bytes_read + out.bytes_written <= budget, "call {calls}: {out:?}");
        if out.records_copied == 0 {
            assert!(!out.budget_exhausted, "no progress within the budget: {out:?}");
            break;
        }
        assert!(out.budget_exhausted || out.segments_cleared == out.segments_chosen, "{out:?}");
        read += out.bytes_read;
        written += out.bytes_written;
        calls += 1;
        assert!(calls < 1000);
        assert_eq!(contents(&j, &convs), before, "after call {calls}");
    }
    assert!(calls >= 5, "{calls} calls moved {read} + {written} bytes");
    assert_eq!(j.segment_pins(first), 0);
    let deleted = run(&j, j.apply_retention(0)).unwrap().segments_deleted;
    assert!(deleted > 0);
    assert_eq!(contents(&j, &convs), before);
    let (j2, rep) = open(&s.crash(Crash::DropUnsynced), &cfg);
    assert!(rep.damage.is_empty() && !rep.acked_may_be_missing, "{rep}");
    assert_eq!(contents(&j2, &convs), before);

    // A compact live limit of 0 turns the compactor off.
    let s = MemStorage::new();
    let (j, _) = open(&s, &JournalConfig { retention_messages_max: 20, compact_live_percent_max: 0, ..small() });
    quiet_and_chatty(&j, 2, 400);
    assert_eq!(run(&j, j.compact(u64::MAX)).unwrap().segments_chosen, 0);
}

#[test]
fn snapshot_and_retention_while_copies_are_unsynced_lose_nothing() {
    let s = MemStorage::new();
    let cfg = JournalConfig { retention_messages_max: 20, ..small() };
    let (j, _) = open(&s, &cfg);
    let convs = quiet_and_chatty(&j, 3, 400);
    let want = contents(&j, &convs);
    let entries = j.retained_entries();
    let first = j.segments()[0];
    // The copies are written, and their fdatasync never returns...
    s.set_fdatasync_polls(u32::MAX);
    block_on(or(
        async {
            let compact = async {
                let _ = j.compact(u64::MAX).await;
            };
            let committer = async {
                let _ = j.run_committer().await;
            };
            or(compact, committer).await;
        },
        async {
            for _ in 0..10 {
                yield_now().await;
            }
        },
    ));
    let st = j.stats();
    assert!(st.compaction_copies > 0 && st.compaction_moves == 0, "{st:?}");
    assert!(j.next_position() > j.synced_position());
    // ... while the shard's maintenance writes a snapshot and runs retention (their own
    // fdatasyncs complete).
    s.set_fdatasync_polls(0);
    block_on(j.write_snapshot()).unwrap();
    block_on(j.apply_retention(0)).unwrap();
    assert!(j.segments().contains(&first), "the originals' segment must stay until the copies are durable");
    assert_eq!(contents(&j, &convs), want);
    // Power loss: the copies are gone, the originals serve.
    let (j2, rep) = open(&s.crash(Crash::DropUnsynced), &cfg);
    assert!(rep.damage.is_empty() && !rep.acked_may_be_missing, "{rep}");
    assert_eq!(contents(&j2, &convs), want);
    assert_eq!(j2.retained_entries(), entries);
    // Process kill: the copies survive beside the originals; replay keeps one entry each.
    let (j3, rep) = open(&s.crash(Crash::KeepWritten), &cfg);
    assert!(rep.damage.is_empty() && !rep.acked_may_be_missing, "{rep}");
    assert!(rep.records_replayed >= st.compaction_copies, "{rep}");
    assert_eq!(contents(&j3, &convs), want);
    assert_eq!(j3.retained_entries(), entries);
    assert_eq!(j3.segment_pins(first), 0, "replay moved the entries to the copies");
}

#[test]
fn compaction_leaves_unreadable_records_in_place_and_skips_their_segment() {
    let s = MemStorage::new();
    let cfg = JournalConfig { retention_messages_max: 20, ..small() };
    let (j, _) = open(&s, &cfg);
    let convs = quiet_and_chatty(&j, 2, 400);
    // Conversation 100's first message is the first frame of segment 0: bit rot in it.
    s.flip_bit(&format!("{:020}.seg", 0), 4096 + 60, 1);
    let out = run(&j, j.compact(u64::MAX)).unwrap();
    assert_eq!(out.records_unreadable, 1, "{out:?}");
    assert!(out.records_copied >= 9, "{out:?}");
    assert_eq!(j.segment_pins(0), 1, "the unreadable record is not copied, its entry stays");
    let read = block_on(j.read_messages(100, 0, usize::MAX)).unwrap();
    assert_eq!((read.damaged_frames, read.records.len()), (1, 2));
    // The damaged segment is not read again in this run.
    let again = run(&j, j.compact(u64::MAX)).unwrap();
    assert_eq!((again.bytes_read, again.records_unreadable), (0, 0), "{again:?}");
    // The other quiet conversation moved whole.
    assert_eq!(convs[2], 101);
    let other = &contents(&j, &[101])[0];
    assert_eq!((other.1.len(), other.2.len()), (3, 2));
}

#[test]
fn seeded_crashes_during_compaction_lose_nothing_and_duplicate_nothing() {
    let cfg = JournalConfig { retention_messages_max: 20, retention_state_max: 8, ..small() };
    let (mut mid_copy, mut mid_retention, mut completed) = (0, 0, 0);
    for seed in 1..=60u64 {
        let mut rng = Rng(seed * 0x9E37_79B9 + 7);
        let s = MemStorage::new();
        let (j, _) = open(&s, &cfg);
        let convs = quiet_and_chatty(&j, 4, 300 + rng.below(300));
        if rng.below(2) == 0 {
            // An older snapshot that points at the originals (or none at all).
            run(&j, j.write_snapshot()).unwrap();
        }
        let want = contents(&j, &convs);
        let entries = j.retained_entries();
        // Slow fdatasyncs, so crashes land while copies are written but not yet durable.
        s.set_fdatasync_polls(4 + rng.below(8) as u32);
        let phase = Rc::new(RefCell::new(0u8));
        let budget = rng.below(24);
        let snapshot_every = 1 + rng.below(6);
        // Compaction then retention, with the committer, and snapshots written in between as
        // the shard's maintenance would; the process dies after `budget` polls.
        block_on(or(
            async {
                let work = async {
                    j.compact(u64::MAX).await.unwrap();
                    *phase.borrow_mut() = 1;
                    j.apply_retention(0).await.unwrap();
                    *phase.borrow_mut() = 2;
                };
                let snapshots = async {
                    loop {
                        for _ in 0..snapshot_every {
                            yield_now().await;
                        }
                        let _ = j.write_snapshot().await;
                    }
                };
                let committer = async {
                    let _ = j.run_committer().await;
                    futures_lite::future::pending::<()>().await;
                };
                or(work, or(snapshots, committer)).await;
            },
            async {
                for _ in 0..budget {
                    yield_now().await;
                }
            },
        ));
        let st = j.stats();
        match *phase.borrow() {
            0 if st.compaction_copies > st.compaction_moves => mid_copy += 1,
            1 => mid_retention += 1,
            2 => completed += 1,
            _ => {}
        }
        let how = match rng.below(3) {
            0 => Crash::KeepWritten,
            1 => Crash::DropUnsynced,
            _ => Crash::TearLastWrite { keep_bytes: rng.below(8192) as usize },
        };
        let crashed = s.crash(how);
        let (j2, rep) = open(&crashed, &cfg);
        assert!(rep.damage.is_empty() && !rep.acked_may_be_missing && rep.epoch == 1, "seed {seed}: {rep}");
        assert_eq!(contents(&j2, &convs), want, "seed {seed} ({how:?}, phase {})", phase.borrow());
        assert_eq!(j2.retained_entries(), entries, "seed {seed}");
        // The recovered journal compacts and retains to the end, and says the same again.
        let out = run(&j2, j2.compact(u64::MAX)).unwrap();
        assert_eq!(out.records_unreadable, 0);
        run(&j2, j2.apply_retention(0)).unwrap();
        assert!(j2.segments().len() <= 5, "seed {seed}: {:?}", j2.segments());
        assert_eq!(contents(&j2, &convs), want, "seed {seed} after a second compaction");
        let (j3, rep) = open(&crashed.crash(Crash::DropUnsynced), &cfg);
        assert!(rep.damage.is_empty() && !rep.acked_may_be_missing, "seed {seed}: {rep}");
        assert_eq!(contents(&j3, &convs), want, "seed {seed} after a second crash");
        assert_eq!(j3.retained_entries(), entries);
    }
    // The loop must have crashed where it claims to.
    eprintln!("crashed with copies unsettled {mid_copy}, during retention {mid_retention}, after {completed}");
    assert!(mid_copy > 0 && mid_retention + completed > 0, "{mid_copy} / {mid_retention} / {completed}");
}

/// A temp dir under the system temp dir, removed on drop.
struct TempDir(std::path::PathBuf);
impl TempDir {
    fn new(tag: &str) -> Self {
        let p = std::env::temp_dir().join(format!("switchboard-journal-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        Self(p)
    }
}
impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

#[test]
fn real_disk_round_trip_with_direct_io() {
    let dir = TempDir::new("disk");
    let cfg = JournalConfig {
        segment_bytes: 256 * 1024,
        frame_bytes_max: 64 * 1024,
        write_bytes_max: 128 * 1024,
        retention_messages_max: 1000,
        ..JournalConfig::default()
    };
    let path = dir.0.clone();
    let (c1, path1) = (cfg.clone(), path.clone());
    // Write with 16 concurrent appenders, close cleanly.
    let written: Vec<Vec<(u64, Vec<u8>)>> = glommio::LocalExecutorBuilder::new(glommio::Placement::Unbound)
        .spawn(move || async move {
            let (j, rep) = Journal::open(DmaStorage::new(&path1).unwrap(), SHARD, c1).await.unwrap();
            assert_eq!(rep.epoch, 1);
            let committer = glommio::spawn_local({
                let j = j.clone();
                async move { j.run_committer().await }
            });
            let tasks: Vec<_> = (0..16u64)
                .map(|conv| {
                    let j = j.clone();
                    glommio::spawn_local(async move {
                        let mut mine = Vec::new();
                        for seq in 0..200u64 {
                            let p = payload(conv, seq);
                            let t = j.append(&msg(conv, seq, &p), Durability::Sync).unwrap();
                            j.acked(t).await.unwrap();
                            mine.push((seq, p));
                        }
                        mine
                    })
                })
                .collect();
            let mut all = Vec::new();
            for t in tasks {
                all.push(t.await);
            }
            let st = j.stats();
            assert!(st.fdatasyncs < st.appends, "group commit on disk: {st:?}");
            assert!(j.segments().len() > 3, "rolled segments");
            j.close().await.unwrap();
            committer.await.unwrap();
            all
        })
        .unwrap()
        .join()
        .unwrap();
    // Reopen in a fresh executor: identical contents, clean, same epoch.
    let (c2, path2) = (cfg.clone(), path.clone());
    let reread = glommio::LocalExecutorBuilder::new(glommio::Placement::Unbound)
        .spawn(move || async move {
            let (j, rep) = Journal::open(DmaStorage::new(&path2).unwrap(), SHARD, c2).await.unwrap();
            assert!(rep.clean_shutdown && !rep.acked_may_be_missing && rep.damage.is_empty(), "{rep}");
            assert_eq!((rep.epoch, rep.next_position), (1, 16 * 200));
            let mut all: Vec<Vec<(u64, Vec<u8>)>> = Vec::new();
            for conv in 0..16u64 {
                let read = j.read_messages(conv, 0, usize::MAX).await.unwrap();
                all.push(read.records.into_iter().map(|r| (r.seq, r.payload.to_vec())).collect());
            }
            all
        })
        .unwrap()
        .join()
        .unwrap();
    assert_eq!(reread.len(), written.len());
    for (conv, (got, want)) in reread.iter().zip(&written).enumerate() {
        assert!(got == want, "conversation {conv}: {} records read back, {} written", got.len(), want.len());
    }

    // Append more and stop without close (as a kill -9 would): the next open is unclean but,
    // in sync mode with nothing lost, keeps the epoch.
    let (c3, path3) = (cfg.clone(), path.clone());
    glommio::LocalExecutorBuilder::new(glommio::Placement::Unbound)
        .spawn(move || async move {
            let (j, _) = Journal::open(DmaStorage::new(&path3).unwrap(), SHARD, c3.clone()).await.unwrap();
            // Detached: it stays parked when this journal handle is dropped, like a dead process.
            let committer = glommio::spawn_local({
                let j = j.clone();
                async move { j.run_committer().await }
            })
            .detach();
            for seq in 200..210u64 {
                let p = payload(0, seq);
                let t = j.append(&msg(0, seq, &p), Durability::Sync).unwrap();
                j.acked(t).await.unwrap();
            }
            drop(committer);
            drop(j);
            let (j, rep) = Journal::open(DmaStorage::new(&path3).unwrap(), SHARD, c3).await.unwrap();
            assert!(!rep.clean_shutdown && !rep.acked_may_be_missing && rep.damage.is_empty(), "{rep}");
            assert_eq!((rep.epoch, rep.next_position), (1, 16 * 200 + 10));
            let read = j.read_messages(0, 195, 100).await.unwrap();
            assert_eq!(read.records.iter().map(|r| r.seq).collect::<Vec<_>>(), (195..210).collect::<Vec<_>>());
            // Nothing pending, so close needs no committer.
            j.close().await.unwrap();
        })
        .unwrap()
        .join()
        .unwrap();

    // The operator's view.
    let report = verify(&path).unwrap();
    assert!(report.is_ok(), "{report}");
    assert_eq!(report.segments.iter().map(|s| s.records).sum::<u64>(), 16 * 200 + 10);
    assert!(report.snapshots.iter().all(|s| s.bad_entries == Some(0)));
    let text = report.to_string();
    assert!(text.contains("sealed") && text.ends_with("OK\n"), "{text}");
    // Bit rot in a closed segment: verify says where.
    let first = path.join(&report.segments[0].name);
    let mut bytes = std::fs::read(&first).unwrap();
    bytes[4096 + 100] ^= 0x01;
    std::fs::write(&first, &bytes).unwrap();
    let report = inspect(&path).unwrap();
    assert!(!report.is_ok());
    assert!(report.problems[0].contains("damage at offsets 4096.."), "{report}");
}

/// Every retained message and state record of `convs`, read from disk.
async fn read_all(j: &Journal<DmaStorage>, convs: &[u64]) -> Vec<(u64, Vec<u8>)> {
    let mut out = Vec::new();
    for &c in convs {
        let m = j.read_messages(c, 0, usize::MAX).await.unwrap();
        let s = j.read_state(c).await.unwrap();
        assert_eq!((m.damaged_frames, s.damaged_frames), (0, 0));
        out.extend(m.records.iter().chain(&s.records).map(|r| (r.seq, r.payload.to_vec())));
    }
    out
}

#[test]
fn real_disk_compaction_then_reopen() {
    let dir = TempDir::new("compact");
    let cfg = JournalConfig {
        segment_bytes: 256 * 1024,
        frame_bytes_max: 64 * 1024,
        write_bytes_max: 128 * 1024,
        retention_messages_max: 30,
        ..JournalConfig::default()
    };
    let convs: Vec<u64> = std::iter::once(1).chain(100..108).collect();
    let (c1, path1, convs1) = (cfg.clone(), dir.0.clone(), convs.clone());
    let (want, deleted) = glommio::LocalExecutorBuilder::new(glommio::Placement::Unbound)
        .spawn(move || async move {
            let (j, _) = Journal::open(DmaStorage::new(&path1).unwrap(), SHARD, c1).await.unwrap();
            let committer = glommio::spawn_local({
                let j = j.clone();
                async move { j.run_committer().await }
            });
            for c in 100..108u64 {
                for seq in 0..4 {
                    let p = payload(c, seq);
                    let t = j.append(&msg(c, seq, &p), Durability::Sync).unwrap();
                    j.acked(t).await.unwrap();
                }
                let t = j.append(&cursor(c, 3, 7_000_000 + c, b"agent"), Durability::Sync).unwrap();
                j.acked(t).await.unwrap();
            }
            for seq in 0..3000u64 {
                let p = payload(1, seq);
                let t = j.append(&msg(1, seq, &p), Durability::Sync).unwrap();
                if seq % 8 == 7 {
                    j.acked(t).await.unwrap();
                }
            }
            j.flush().await.unwrap();
            let want = read_all(&j, &convs1).await;
            let segs = j.segments().len();
            let out = j.compact(u64::MAX).await.unwrap();
            assert!(out.records_copied >= 40 && out.segments_cleared > 0, "{out:?}");
            assert_eq!(read_all(&j, &convs1).await, want);
            let ret = j.apply_retention(0).await.unwrap();
            assert!(j.segments().len() <= 5 && ret.segments_deleted as usize + 5 >= segs, "{segs} -> {:?}", j.segments());
            assert_eq!(read_all(&j, &convs1).await, want);
            j.close().await.unwrap();
            committer.await.unwrap();
            (want, ret.segments_deleted)
        })
        .unwrap()
        .join()
        .unwrap();
    assert!(deleted > 0);
    let (c2, path2, convs2) = (cfg.clone(), dir.0.clone(), convs.clone());
    let got = glommio::LocalExecutorBuilder::new(glommio::Placement::Unbound)
        .spawn(move || async move {
            let (j, rep) = Journal::open(DmaStorage::new(&path2).unwrap(), SHARD, c2).await.unwrap();
            assert!(rep.clean_shutdown && rep.damage.is_empty() && !rep.acked_may_be_missing, "{rep}");
            read_all(&j, &convs2).await
        })
        .unwrap()
        .join()
        .unwrap();
    assert_eq!(got, want);
    // The operator's view: every snapshot entry points at its record, moved or not.
    let report = verify(&dir.0).unwrap();
    assert!(report.is_ok(), "{report}");
    assert!(report.snapshots.iter().all(|s| s.bad_entries == Some(0)), "{report}");
}
