//! The per-shard timer wheel against a `BinaryHeap` with lazy deletion (the seed system's
//! "timer min-heap"), for one million timers:
//! - `insert_cancel`: insert 1M timers due within an hour, then cancel them all (offer timers
//!   are mostly cancelled by an answer);
//! - `insert_fire`: insert 1M timers due within a minute, then advance time 1 ms at a time,
//!   as a shard loop does, until all have fired.
//!
//! Deadlines come from a seeded splitmix64, so every run measures the same work. Criterion
//! reports the time per 1M-timer round (low / estimate / high) and timers per second; the
//! machine and commit go with the numbers in the report that quotes them.

// criterion_group! generates an undocumented public function.
#![allow(missing_docs)]

use std::cmp::Reverse;
use std::collections::BinaryHeap;

use criterion::{criterion_group, criterion_main, BatchSize, Criterion, Throughput};
use switchboard::timer::{Fired, TimerWheel};

const TIMERS: usize = 1_000_000;
const START_MS: u64 = 1_700_000_000_000;

fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9e37_79b9_7f4a_7c15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

fn deadlines(span_ms: u64) -> Vec<u64> {
    let mut state = 42;
    (0..TIMERS).map(|_| START_MS + 1 + splitmix64(&mut state) % span_ms).collect()
}

/// The heap model: a min-heap of (deadline, id) and a cancelled flag per id. Cancel is O(1)
/// (a flag); the entry stays in the heap until it reaches the top.
struct LazyHeap {
    heap: BinaryHeap<Reverse<(u64, u32)>>,
    cancelled: Vec<bool>,
}

impl LazyHeap {
    fn new() -> LazyHeap {
        LazyHeap { heap: BinaryHeap::with_capacity(TIMERS), cancelled: Vec::with_capacity(TIMERS) }
    }
    fn insert(&mut self, deadline_ms: u64) -> u32 {
        let id = self.cancelled.len() as u32;
        self.cancelled.push(false);
        self.heap.push(Reverse((deadline_ms, id)));
        id
    }
    fn cancel(&mut self, id: u32) {
        self.cancelled[id as usize] = true;
    }
    fn advance(&mut self, now_ms: u64, fired: &mut Vec<u32>) {
        while let Some(&Reverse((deadline, id))) = self.heap.peek() {
            if deadline > now_ms {
                break;
            }
            self.heap.pop();
            if !self.cancelled[id as usize] {
                fired.push(id);
            }
        }
    }
}

fn insert_cancel(c: &mut Criterion) {
    let deadlines = deadlines(3_600_000);
    let mut group = c.benchmark_group("insert_cancel_1M");
    group.sample_size(10);
    group.throughput(Throughput::Elements(TIMERS as u64));
    group.bench_function("wheel", |b| {
        b.iter_batched(
            || (TimerWheel::<u32>::new(TIMERS, START_MS), Vec::with_capacity(TIMERS)),
            |(mut wheel, mut ids)| {
                for (n, &deadline) in deadlines.iter().enumerate() {
                    ids.push(wheel.insert(deadline, n as u32).unwrap());
                }
                for &id in &ids {
                    std::hint::black_box(wheel.cancel(id));
                }
                assert!(wheel.is_empty());
                (wheel, ids)
            },
            BatchSize::PerIteration,
        );
    });
    group.bench_function("binary_heap_lazy", |b| {
        b.iter_batched(
            || (LazyHeap::new(), Vec::with_capacity(TIMERS)),
            |(mut heap, mut ids)| {
                for &deadline in &deadlines {
                    ids.push(heap.insert(deadline));
                }
                for &id in &ids {
                    heap.cancel(id);
                }
                (heap, ids)
            },
            BatchSize::PerIteration,
        );
    });
    group.finish();
}

fn insert_fire(c: &mut Criterion) {
    let span_ms = 60_000;
    let deadlines = deadlines(span_ms);
    let mut group = c.benchmark_group("insert_fire_1M");
    group.sample_size(10);
    group.throughput(Throughput::Elements(TIMERS as u64));
    group.bench_function("wheel", |b| {
        b.iter_batched(
            || (TimerWheel::<u32>::new(TIMERS, START_MS), Vec::<Fired<u32>>::with_capacity(4_096)),
            |(mut wheel, mut fired)| {
                for (n, &deadline) in deadlines.iter().enumerate() {
                    wheel.insert(deadline, n as u32).unwrap();
                }
                let mut total = 0;
                for now in START_MS + 1..=START_MS + span_ms {
                    fired.clear();
                    total += wheel.advance(now, &mut fired);
                    std::hint::black_box(&fired);
                }
                assert_eq!(total, TIMERS);
                (wheel, fired)
            },
            BatchSize::PerIteration,
        );
    });
    group.bench_function("binary_heap_lazy", |b| {
        b.iter_batched(
            || (LazyHeap::new(), Vec::<u32>::with_capacity(4_096)),
            |(mut heap, mut fired)| {
                for &deadline in &deadlines {
                    heap.insert(deadline);
                }
                let mut total = 0;
                for now in START_MS + 1..=START_MS + span_ms {
                    fired.clear();
                    heap.advance(now, &mut fired);
                    total += fired.len();
                    std::hint::black_box(&fired);
                }
                assert_eq!(total, TIMERS);
                (heap, fired)
            },
            BatchSize::PerIteration,
        );
    });
    group.finish();
}

criterion_group!(benches, insert_cancel, insert_fire);
criterion_main!(benches);
