//! The shard buffer pool against the heap, for the buffer of one fan-out message.
//!
//! `share_3/<size>` is the life of one message fanned out to three subscribers:
//! - `pool`: `BufferPool::lease(size)`, copy the encoded bytes in, `freeze`, three clones (one
//!   per subscriber queue), drop all four;
//! - `vec_bytes`: `Vec::with_capacity(size)`, copy the bytes in, `Bytes::from(vec)`, three
//!   clones, drop all four (what a fan-out without a pool would do; the first clone of a
//!   `Bytes` made from a `Vec` allocates its shared header, so that is two allocations).
//!
//! `alloc_only/<size>` is the bare acquire and release: `lease(size)` + drop against
//! `Vec::with_capacity(size)` + drop.
//!
//! Sizes: 128 B (a typical chat frame, the pool's 256 B class), 2 KiB and 16 KiB (exactly one
//! slot of those classes). In a loop the pool hands back the slot just freed (its free list is
//! LIFO), and the allocator its just-freed chunk, so both are measured cache-warm: this is
//! the per-message overhead, not the cost of a cold miss.

// `criterion_group!` generates a public function that cannot carry a doc comment.
#![allow(missing_docs)]

use std::hint::black_box;

use bytes::Bytes;
use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use switchboard::pool::{BufferPool, PoolConfig, SizeClass};

const SIZES: [usize; 3] = [128, 2 << 10, 16 << 10];

fn pool() -> BufferPool {
    BufferPool::new(&PoolConfig {
        classes: vec![
            SizeClass { slot_bytes: 256, slots: 1024 },
            SizeClass { slot_bytes: 2 << 10, slots: 256 },
            SizeClass { slot_bytes: 16 << 10, slots: 64 },
        ],
        // The benchmark must not depend on RLIMIT_MEMLOCK; prefaulting keeps page faults out.
        mlock: false,
        prefault: true,
    })
    .expect("pool")
}

fn share_3(c: &mut Criterion) {
    let pool = pool();
    let mut g = c.benchmark_group("pool/share_3");
    g.throughput(Throughput::Elements(1));
    for size in SIZES {
        let encoded: Vec<u8> = (0..size).map(|i| i as u8).collect();
        g.bench_with_input(BenchmarkId::new("pool", size), &encoded, |b, encoded| {
            b.iter(|| {
                let mut lease = pool.lease(encoded.len()).expect("free slot");
                lease.as_mut_slice()[..encoded.len()].copy_from_slice(encoded);
                let lease = lease.freeze(encoded.len());
                let clones = [lease.clone(), lease.clone(), lease.clone()];
                black_box(&clones);
                drop(black_box(lease));
                drop(clones);
            });
        });
        g.bench_with_input(BenchmarkId::new("vec_bytes", size), &encoded, |b, encoded| {
            b.iter(|| {
                let mut v = Vec::with_capacity(encoded.len());
                v.extend_from_slice(encoded);
                let bytes = Bytes::from(v);
                let clones = [bytes.clone(), bytes.clone(), bytes.clone()];
                black_box(&clones);
                drop(black_box(bytes));
                drop(clones);
            });
        });
    }
    g.finish();
    let leaked: usize = pool.stats().classes.iter().map(|c| c.in_use).sum();
    assert_eq!(leaked, 0, "every lease went back to the pool");
}

fn alloc_only(c: &mut Criterion) {
    let pool = pool();
    let mut g = c.benchmark_group("pool/alloc_only");
    g.throughput(Throughput::Elements(1));
    for size in SIZES {
        g.bench_with_input(BenchmarkId::new("pool", size), &size, |b, &size| {
            b.iter(|| drop(black_box(pool.lease(black_box(size)).expect("free slot"))));
        });
        g.bench_with_input(BenchmarkId::new("vec", size), &size, |b, &size| {
            b.iter(|| drop(black_box(Vec::<u8>::with_capacity(black_box(size)))));
        });
    }
    g.finish();
}

criterion_group!(benches, share_3, alloc_only);
criterion_main!(benches);
