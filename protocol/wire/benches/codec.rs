//! Encode and decode throughput of the wire codec, for DELIVER (the fan-out frame) and PUBLISH
//! (the ingress frame) with 64 B, 128 B, 1 KiB and 16 KiB payloads.
//!
//! Each measured iteration handles a batch of `FRAMES_PER_ITERATION` frames, so per-iteration
//! timer overhead stays small next to the work. Every case is measured twice, once in a
//! `*_bytes` group (criterion reports bytes/s of whole frames, header included) and once in a
//! `*_frames` group (criterion reports frames/s as elements/s).
//!
//! - encode: fields into one reused `BytesMut` (payload copied in, as it is into a send buffer).
//! - decode: frames out of a read buffer already holding the batch; payloads are sliced, not
//!   copied, so decode cost hardly grows with payload size. Filling the buffer is not timed.
//!
//! Run: `cargo bench -p switchboard-protocol --bench codec` (add
//! `-- --warm-up-time 1 --measurement-time 3` for a quick pass). Results depend on the machine;
//! quote them with its description and the commit.

// `criterion_group!` generates a public function that cannot carry a doc comment.
#![allow(missing_docs)]

use std::hint::black_box;

use bytes::{Bytes, BytesMut};
use criterion::{criterion_group, criterion_main, BatchSize, BenchmarkId, Criterion, Throughput};
use switchboard_protocol::{decode, Deliver, Frame, Limits, Publish, Text};

/// Frames handled per measured iteration.
const FRAMES_PER_ITERATION: usize = 64;
/// Payload sizes measured, in bytes.
const PAYLOAD_SIZES_BYTES: [usize; 4] = [64, 128, 1024, 16 * 1024];

fn deliver(payload_bytes: usize) -> Frame {
    Deliver {
        session: Text::from("tenant-acme:conv-0000042"),
        epoch: 3,
        seq: 1_000_042,
        timestamp_us: 1_735_689_600_000_000,
        trace_id: 0x0123_4567_89ab_cdef_fedc_ba98_7654_3210,
        sender: Text::from("customer-000009"),
        payload: Bytes::from(vec![b'x'; payload_bytes]),
    }
    .into()
}

fn publish(payload_bytes: usize) -> Frame {
    Publish {
        session: Text::from("tenant-acme:conv-0000042"),
        client_msg_id: 77,
        trace_id: 0x0123_4567_89ab_cdef_fedc_ba98_7654_3210,
        sender: Text::from("customer-000009"),
        payload: Bytes::from(vec![b'x'; payload_bytes]),
    }
    .into()
}

type MakeFrame = fn(usize) -> Frame;
const FRAMES: [(&str, MakeFrame); 2] = [("deliver", deliver), ("publish", publish)];

/// How a group counts throughput for one case.
#[derive(Clone, Copy)]
enum Unit {
    Bytes,
    Frames,
}

impl Unit {
    fn throughput(self, frame: &Frame) -> Throughput {
        match self {
            Unit::Bytes => Throughput::Bytes((frame.encoded_len() * FRAMES_PER_ITERATION) as u64),
            Unit::Frames => Throughput::Elements(FRAMES_PER_ITERATION as u64),
        }
    }

    fn suffix(self) -> &'static str {
        match self {
            Unit::Bytes => "bytes",
            Unit::Frames => "frames",
        }
    }
}

fn encode_group(c: &mut Criterion, unit: Unit) {
    let mut group = c.benchmark_group(format!("encode_{}", unit.suffix()));
    for (name, make) in FRAMES {
        for size in PAYLOAD_SIZES_BYTES {
            let frame = make(size);
            group.throughput(unit.throughput(&frame));
            let mut dst = BytesMut::with_capacity(frame.encoded_len() * FRAMES_PER_ITERATION);
            group.bench_with_input(BenchmarkId::new(name, size), &frame, |b, frame| {
                b.iter(|| {
                    dst.clear();
                    for correlation in 0..FRAMES_PER_ITERATION as u32 {
                        black_box(frame).encode(correlation, &mut dst).unwrap();
                    }
                    black_box(&dst);
                });
            });
        }
    }
    group.finish();
}

fn decode_group(c: &mut Criterion, unit: Unit) {
    let limits = Limits::default();
    let mut group = c.benchmark_group(format!("decode_{}", unit.suffix()));
    for (name, make) in FRAMES {
        for size in PAYLOAD_SIZES_BYTES {
            let frame = make(size);
            group.throughput(unit.throughput(&frame));
            let mut stream = BytesMut::with_capacity(frame.encoded_len() * FRAMES_PER_ITERATION);
            for correlation in 0..FRAMES_PER_ITERATION as u32 {
                frame.encode(correlation, &mut stream).unwrap();
            }
            group.bench_with_input(BenchmarkId::new(name, size), &stream, |b, stream| {
                b.iter_batched_ref(
                    || stream.clone(),
                    |src| {
                        let mut frames = 0;
                        while let Some(envelope) = decode(src, &limits).unwrap() {
                            black_box(envelope);
                            frames += 1;
                        }
                        assert_eq!(frames, FRAMES_PER_ITERATION);
                    },
                    // A 16 KiB batch is 1 MiB: bound how many copies are prepared at once.
                    BatchSize::NumIterations(16),
                );
            });
        }
    }
    group.finish();
}

fn codec(c: &mut Criterion) {
    for unit in [Unit::Bytes, Unit::Frames] {
        encode_group(c, unit);
        decode_group(c, unit);
    }
}

criterion_group!(benches, codec);
criterion_main!(benches);
