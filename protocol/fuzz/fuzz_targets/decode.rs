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
//!   one-shot decode of the same bytes);
//! - the borrowed DELIVER and PUBLISH decoders (`peek_frame` + `DeliverRef::decode_body` /
//!   `PublishRef::decode_body`) agree with `decode` on every prefix: same outcome, same error,
//!   same fields.

#![no_main]

use bytes::{BufMut, BytesMut};
use libfuzzer_sys::fuzz_target;
use switchboard_protocol::{decode, peek_frame, DecodeError, DeliverRef, Envelope, Frame, FrameType, Limits, PublishRef};

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
            let borrowed = borrowed_deliver(&before, limits);
            let publish = borrowed_publish(&before, limits);
            let decoded = decode(&mut src, limits);
            check_borrowed(&decoded, &borrowed);
            check_publish(&decoded, &publish);
            match decoded {
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

/// What `peek_frame` + `DeliverRef::decode_body` make of the front of `src` (a DELIVER's
/// fields copied out; `Ok(Some(None))` for a complete frame of another type).
type Borrowed = Result<Option<Option<(u32, String, u64, u64, u64, u128, String, Vec<u8>)>>, DecodeError>;

fn borrowed_deliver(src: &[u8], limits: &Limits) -> Borrowed {
    let Some((header, body)) = peek_frame(src, limits)? else { return Ok(None) };
    if header.frame_type != FrameType::Deliver {
        return Ok(Some(None));
    }
    let d = DeliverRef::decode_body(body)?;
    Ok(Some(Some((header.correlation, d.session.to_owned(), d.epoch, d.seq, d.timestamp_us, d.trace_id, d.sender.to_owned(), d.payload.to_vec()))))
}

/// The borrowed DELIVER decoder agrees with `decode`: same outcome, same error, same fields.
fn check_borrowed(decoded: &Result<Option<Envelope>, DecodeError>, borrowed: &Borrowed) {
    match (decoded, borrowed) {
        (Ok(None), Ok(None)) => {}
        (Ok(Some(envelope)), Ok(Some(Some(fields)))) => {
            let Frame::Deliver(d) = &envelope.frame else { panic!("borrowed decoded a DELIVER, decode a {:?}", envelope.frame) };
            let owned = (envelope.correlation, d.session.as_str().to_owned(), d.epoch, d.seq, d.timestamp_us, d.trace_id, d.sender.as_str().to_owned(), d.payload.to_vec());
            assert_eq!(&owned, fields, "borrowed DELIVER fields differ");
        }
        (Ok(Some(envelope)), Ok(Some(None))) => assert!(!matches!(envelope.frame, Frame::Deliver(_))),
        // A header error is the same error both ways; a body error only for DELIVER.
        (Err(a), Err(b)) => assert_eq!(a, b, "borrowed decoder gave another error"),
        (Err(_), Ok(Some(None))) => {}
        (a, b) => panic!("decode gave {a:?}, the borrowed decoder {b:?}"),
    }
}

/// What `peek_frame` + `PublishRef::decode_body` make of the front of `src` (a PUBLISH's
/// fields copied out; `Ok(Some(None))` for a complete frame of another type).
type BorrowedPublish = Result<Option<Option<(u32, String, u64, u128, String, Vec<u8>)>>, DecodeError>;

fn borrowed_publish(src: &[u8], limits: &Limits) -> BorrowedPublish {
    let Some((header, body)) = peek_frame(src, limits)? else { return Ok(None) };
    if header.frame_type != FrameType::Publish {
        return Ok(Some(None));
    }
    let p = PublishRef::decode_body(body)?;
    Ok(Some(Some((header.correlation, p.session.to_owned(), p.client_msg_id, p.trace_id, p.sender.to_owned(), p.payload.to_vec()))))
}

/// The borrowed PUBLISH decoder agrees with `decode`: same outcome, same error, same fields.
fn check_publish(decoded: &Result<Option<Envelope>, DecodeError>, borrowed: &BorrowedPublish) {
    match (decoded, borrowed) {
        (Ok(None), Ok(None)) => {}
        (Ok(Some(envelope)), Ok(Some(Some(fields)))) => {
            let Frame::Publish(p) = &envelope.frame else { panic!("borrowed decoded a PUBLISH, decode a {:?}", envelope.frame) };
            let owned = (envelope.correlation, p.session.as_str().to_owned(), p.client_msg_id, p.trace_id, p.sender.as_str().to_owned(), p.payload.to_vec());
            assert_eq!(&owned, fields, "borrowed PUBLISH fields differ");
        }
        (Ok(Some(envelope)), Ok(Some(None))) => assert!(!matches!(envelope.frame, Frame::Publish(_))),
        (Err(a), Err(b)) => assert_eq!(a, b, "borrowed decoder gave another error"),
        (Err(_), Ok(Some(None))) => {}
        (a, b) => panic!("decode gave {a:?}, the borrowed PUBLISH decoder {b:?}"),
    }
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
