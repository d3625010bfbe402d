//! Fuzzes the incremental decoder: arbitrary bytes, delivered in arbitrary chunks.
//!
//! Input layout: byte 0 seeds the chunk sizes and picks the frame-body limit; the rest is the
//! stream. For every input it checks what `decode` promises:
//! - it never panics;
//! - `Ok(None)` and `Err` consume nothing;
//! - `Ok(Some)` consumes exactly one frame, and the frame's encoded length is what it consumed;
//! - the encoding is canonical: every decoded frame encodes back to the very bytes it came
//!   from, and those bytes decode again to the same frame;
//! - splitting the stream differently never changes what is decoded (checked against a
//!   one-shot decode of the same bytes).

#![no_main]

use bytes::{BufMut, BytesMut};
use libfuzzer_sys::fuzz_target;
use switchboard_protocol::{decode, DecodeError, Envelope, Limits};

/// A tiny deterministic generator for chunk sizes (xorshift32).
struct Chunks(u32);

impl Chunks {
    fn next(&mut self, max: usize) -> usize {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 17;
        self.0 ^= self.0 << 5;
        1 + (self.0 as usize % max)
    }
}

/// Decodes `stream` fed in chunks; returns the frames, the error that stopped it (if any) and
/// the bytes consumed.
fn run(stream: &[u8], chunks: &mut Option<Chunks>, limits: &Limits) -> (Vec<Envelope>, Option<DecodeError>, usize) {
    let mut src = BytesMut::new();
    let mut frames = Vec::new();
    let mut offset = 0;
    let mut consumed = 0;
    while offset < stream.len() {
        let size = match chunks {
            Some(chunks) => chunks.next(64).min(stream.len() - offset),
            None => stream.len() - offset,
        };
        src.put_slice(&stream[offset..offset + size]);
        offset += size;
        loop {
            let before = src.clone();
            match decode(&mut src, limits) {
                Ok(Some(envelope)) => {
                    let frame_bytes = before.len() - src.len();
                    assert_eq!(frame_bytes, envelope.frame.encoded_len(), "consumed != encoded_len");
                    let original = &stream[consumed..consumed + frame_bytes];
                    let encoded = envelope.frame.to_bytes(envelope.correlation).expect("a decoded frame encodes");
                    assert_eq!(&encoded[..], original, "encoding is not canonical");
                    let mut again = BytesMut::from(&encoded[..]);
                    let redecoded = decode(&mut again, limits).expect("re-decode").expect("complete");
                    assert_eq!(redecoded, envelope, "re-decoded frame differs");
                    assert!(again.is_empty());
                    consumed += frame_bytes;
                    frames.push(envelope);
                }
                Ok(None) => {
                    assert_eq!(src, before, "Ok(None) consumed bytes");
                    break;
                }
                Err(error) => {
                    assert_eq!(src, before, "Err consumed bytes");
                    // Every error maps to a code a server can send.
                    let _ = error.code();
                    return (frames, Some(error), consumed);
                }
            }
        }
    }
    (frames, None, consumed)
}

fuzz_target!(|data: &[u8]| {
    let Some((&seed, stream)) = data.split_first() else { return };
    // Low bit: a small announced limit (exercises FrameTooLarge on short inputs) or the default.
    let limits = if seed & 1 == 1 { Limits { frame_body_bytes_max: 64 } } else { Limits::default() };
    let mut chunks = Some(Chunks(u32::from(seed).wrapping_mul(2_654_435_761) | 1));
    let (frames, error, consumed) = run(stream, &mut chunks, &limits);
    let (whole_frames, whole_error, whole_consumed) = run(stream, &mut None, &limits);
    assert_eq!(frames, whole_frames, "chunking changed the frames");
    assert_eq!(error, whole_error, "chunking changed the error");
    assert_eq!(consumed, whole_consumed);
});
