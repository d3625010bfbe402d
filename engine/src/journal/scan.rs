//! The recovery scanner: walks one segment's bytes frame by frame and says where its valid data
//! ends and why, and which spans in the middle are damaged.
//!
//! Pure: a function over a byte slice, used by recovery (over the storage backend), by
//! `inspect`/`verify` (over `std::fs`) and by the benchmark. It decides nothing about truncation
//! or quarantine: that depends on whether the segment is the last one, which recovery knows.
//!
//! A frame continues the segment when its bounds and CRC check, its `segment_base` is this
//! segment's, its `first_position` is the next expected position, and its `prev_crc` is the
//! previous frame's CRC. At the first bytes that do not, the scanner looks ahead, block by
//! block, for a frame of this segment with a later position and a valid CRC: if there is one,
//! the bytes between are damage followed by valid data (corruption, never a tail); if there is
//! none, the segment's data ends there (cleanly on a zero block, torn otherwise).

use std::fmt;
use std::ops::Range;

use super::format::{check_frame, FrameError, FrameHeader, BLOCK_BYTES, FRAME_MAGIC};

/// Where a scan starts: just after the header, or at an index snapshot's point.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ScanStart {
    /// Byte offset in the segment (block-aligned).
    pub offset: u64,
    /// The position the frame at `offset` must start with.
    pub position: u64,
    /// The CRC the frame at `offset` must chain from.
    pub prev_crc: u32,
}

/// Why bytes at an offset do not continue the segment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    /// Not a valid frame at all.
    Frame(FrameError),
    /// A valid frame written for another segment (stale bytes).
    WrongSegment {
        /// The `segment_base` it carries.
        found_base: u64,
    },
    /// A valid frame whose first position is not the expected one.
    Position {
        /// What the chain expected.
        expected: u64,
        /// What the frame says.
        found: u64,
    },
    /// A valid frame that does not chain from the previous frame's CRC.
    Chain,
}

impl fmt::Display for StopReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Frame(e) => write!(f, "{e}"),
            Self::WrongSegment { found_base } => write!(f, "frame of segment {found_base}"),
            Self::Position { expected, found } => {
                write!(f, "position {found} where {expected} was expected")
            }
            Self::Chain => write!(f, "broken CRC chain"),
        }
    }
}

/// How a segment's data ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SegmentEnd {
    /// A seal frame at this offset: the writer closed the segment.
    Sealed {
        /// Offset of the seal frame.
        offset: u64,
    },
    /// Zeroed (preallocated, never written) space or the end of the file at this offset.
    Clean {
        /// Offset after the last valid frame.
        offset: u64,
    },
    /// Invalid bytes at this offset with no valid frame after them in this segment.
    Torn {
        /// Offset of the first invalid byte (block-aligned).
        offset: u64,
        /// What was wrong there.
        reason: StopReason,
    },
}

/// Damage followed by valid frames: these bytes and positions are lost.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DamageSpan {
    /// Damaged bytes in the segment.
    pub offsets: Range<u64>,
    /// Positions whose records were in them.
    pub lost_positions: Range<u64>,
    /// What was wrong at the start of the span.
    pub reason: StopReason,
}

/// The result of scanning one segment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SegmentScan {
    /// How the data ends.
    pub end: SegmentEnd,
    /// Damaged spans with valid frames after them, in order.
    pub damage: Vec<DamageSpan>,
    /// The position after the last valid record.
    pub next_position: u64,
    /// CRC of the last valid frame (the next frame's `prev_crc`).
    pub last_crc: u32,
    /// Offset after the last valid frame's padding (where the writer would continue).
    pub end_offset: u64,
    /// Valid frames seen (seal excluded).
    pub frames: u64,
    /// Records in them.
    pub records: u64,
}

/// Scans `data` (the segment file from offset 0) from `start`. `on_frame` sees every valid
/// non-seal frame in order, with its offset and bytes (unpadded).
pub fn scan_segment(
    data: &[u8],
    segment_base: u64,
    start: ScanStart,
    frame_bytes_max: usize,
    mut on_frame: impl FnMut(u64, &FrameHeader, &[u8]),
) -> SegmentScan {
    let mut off = start.offset as usize;
    let mut pos = start.position;
    let mut prev = start.prev_crc;
    let mut damage = Vec::new();
    let (mut frames, mut records) = (0u64, 0u64);
    let end = loop {
        if off >= data.len() {
            break SegmentEnd::Clean { offset: off as u64 };
        }
        let reason = match check_frame(&data[off..], frame_bytes_max) {
            Ok(fh) if fh.segment_base == segment_base && fh.first_position == pos && fh.prev_crc == prev => {
                if fh.is_seal() {
                    break SegmentEnd::Sealed { offset: off as u64 };
                }
                on_frame(off as u64, &fh, &data[off..off + fh.frame_len as usize]);
                frames += 1;
                records += u64::from(fh.record_count);
                pos = fh.end_position();
                prev = fh.crc;
                off += fh.padded_len();
                continue;
            }
            Ok(fh) if fh.segment_base != segment_base => StopReason::WrongSegment { found_base: fh.segment_base },
            Ok(fh) if fh.first_position != pos => StopReason::Position { expected: pos, found: fh.first_position },
            Ok(_) => StopReason::Chain,
            Err(e) => StopReason::Frame(e),
        };
        if let Some((at, fh)) = resync(data, off, segment_base, pos, frame_bytes_max) {
            damage.push(DamageSpan {
                offsets: off as u64..at as u64,
                lost_positions: pos..fh.first_position,
                reason,
            });
            pos = fh.first_position;
            prev = fh.prev_crc;
            off = at;
            continue;
        }
        break match reason {
            StopReason::Frame(FrameError::Zero) => SegmentEnd::Clean { offset: off as u64 },
            reason => SegmentEnd::Torn { offset: off as u64, reason },
        };
    };
    let end_offset = match end {
        SegmentEnd::Sealed { offset } | SegmentEnd::Clean { offset } | SegmentEnd::Torn { offset, .. } => offset,
    };
    SegmentScan { end, damage, next_position: pos, last_crc: prev, end_offset, frames, records }
}

/// The first block at or after `from` holding a valid frame of this segment with a position
/// after `pos` (so it cannot be a stale copy of what was expected).
fn resync(
    data: &[u8],
    from: usize,
    segment_base: u64,
    pos: u64,
    frame_bytes_max: usize,
) -> Option<(usize, FrameHeader)> {
    let magic = FRAME_MAGIC.to_le_bytes();
    let mut at = from;
    while at + 4 <= data.len() {
        if data[at..at + 4] == magic {
            if let Ok(fh) = check_frame(&data[at..], frame_bytes_max) {
                if fh.segment_base == segment_base && fh.first_position > pos {
                    return Some((at, fh));
                }
            }
        }
        at += BLOCK_BYTES;
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::journal::format::{encode_frame, Record, RecordKind, FRAME_FLAG_SEAL};

    const BASE: u64 = 100;

    /// A segment image: header block (zeros; the scanner does not read it) + `n` frames of 2
    /// records each + `tail_blocks` of zeros. Returns the image and the frame offsets.
    fn image(n: usize, tail_blocks: usize, seal: bool) -> (Vec<u8>, Vec<usize>) {
        let mut out = vec![0u8; BLOCK_BYTES];
        let mut offs = Vec::new();
        let mut prev = 7;
        let mut pos = BASE;
        for i in 0..n {
            offs.push(out.len());
            let p = vec![i as u8; 100 + i * 50];
            let recs = [
                Record { conversation: 1, seq: pos, timestamp_us: 0, kind: RecordKind::Message, payload: &p },
                Record { conversation: 2, seq: pos + 1, timestamp_us: 0, kind: RecordKind::ReadCursor, payload: b"c" },
            ];
            prev = encode_frame(&mut out, &recs, prev, BASE, pos, 0);
            pos += 2;
        }
        if seal {
            offs.push(out.len());
            encode_frame(&mut out, &[], prev, BASE, pos, FRAME_FLAG_SEAL);
        }
        out.resize(out.len() + tail_blocks * BLOCK_BYTES, 0);
        (out, offs)
    }

    fn start() -> ScanStart {
        ScanStart { offset: BLOCK_BYTES as u64, position: BASE, prev_crc: 7 }
    }

    #[test]
    fn clean_sealed_and_eof() {
        let (img, _) = image(5, 3, false);
        let s = scan_segment(&img, BASE, start(), 1 << 20, |_, _, _| {});
        assert_eq!((s.frames, s.records, s.next_position), (5, 10, BASE + 10));
        assert!(matches!(s.end, SegmentEnd::Clean { offset } if offset == 6 * BLOCK_BYTES as u64));
        assert!(s.damage.is_empty());
        let (img, offs) = image(5, 3, true);
        let s = scan_segment(&img, BASE, start(), 1 << 20, |_, _, _| {});
        assert_eq!(s.end, SegmentEnd::Sealed { offset: offs[5] as u64 });
        let (img, _) = image(4, 0, false);
        let s = scan_segment(&img, BASE, start(), 1 << 20, |_, _, _| {});
        assert!(matches!(s.end, SegmentEnd::Clean { .. }));
        assert_eq!(s.frames, 4);
    }

    #[test]
    fn torn_last_frame_is_a_tail() {
        let (mut img, offs) = image(5, 3, false);
        // The last frame was half written: its second half still zero.
        let last = offs[4];
        for b in &mut img[last + 60..last + BLOCK_BYTES] {
            *b = 0;
        }
        let s = scan_segment(&img, BASE, start(), 1 << 20, |_, _, _| {});
        assert_eq!(s.frames, 4);
        assert_eq!(s.next_position, BASE + 8);
        assert!(matches!(s.end, SegmentEnd::Torn { offset, .. } if offset == last as u64));
        assert!(s.damage.is_empty());
    }

    #[test]
    fn flipped_bit_mid_segment_is_damage_not_tail() {
        let (mut img, offs) = image(6, 3, false);
        img[offs[2] + 50] ^= 0x10;
        let mut seen = Vec::new();
        let s = scan_segment(&img, BASE, start(), 1 << 20, |_, fh, _| seen.push(fh.first_position));
        assert_eq!(seen, vec![BASE, BASE + 2, BASE + 6, BASE + 8, BASE + 10]);
        assert_eq!(s.damage.len(), 1);
        assert_eq!(s.damage[0].lost_positions, BASE + 4..BASE + 6);
        assert_eq!(s.damage[0].offsets, offs[2] as u64..offs[3] as u64);
        assert_eq!(s.damage[0].reason, StopReason::Frame(FrameError::BadCrc));
        assert!(matches!(s.end, SegmentEnd::Clean { .. }));
        assert_eq!(s.next_position, BASE + 12);
    }

    #[test]
    fn zeroed_frame_followed_by_valid_frames_is_damage() {
        // A lost write (interval mode: the later frame reached the disk, the earlier did not).
        let (mut img, offs) = image(4, 2, false);
        for b in &mut img[offs[1]..offs[2]] {
            *b = 0;
        }
        let s = scan_segment(&img, BASE, start(), 1 << 20, |_, _, _| {});
        assert_eq!(s.damage.len(), 1);
        assert_eq!(s.damage[0].lost_positions, BASE + 2..BASE + 4);
        assert_eq!(s.damage[0].reason, StopReason::Frame(FrameError::Zero));
    }

    #[test]
    fn stale_frame_of_another_segment_ends_cleanly_as_torn() {
        let (mut img, offs) = image(3, 2, false);
        let mut other = Vec::new();
        encode_frame(&mut other, &[], 1, 999, 5, 0);
        let at = offs[2] + BLOCK_BYTES;
        img[at..at + other.len()].copy_from_slice(&other);
        let s = scan_segment(&img, BASE, start(), 1 << 20, |_, _, _| {});
        assert_eq!(s.frames, 3);
        assert!(matches!(
            s.end,
            SegmentEnd::Torn { reason: StopReason::WrongSegment { found_base: 999 }, .. }
        ));
    }

    #[test]
    fn starting_mid_segment_checks_the_chain() {
        let (img, offs) = image(5, 1, false);
        let fh = check_frame(&img[offs[1]..], 1 << 20).unwrap();
        let from = ScanStart { offset: offs[2] as u64, position: BASE + 4, prev_crc: fh.crc };
        let s = scan_segment(&img, BASE, from, 1 << 20, |_, _, _| {});
        assert_eq!((s.frames, s.next_position), (3, BASE + 10));
        // A wrong chain value at the start is damage up to... nothing valid after chains from it
        // with a later position, so the whole rest reads as damage then valid frames.
        let bad = ScanStart { prev_crc: fh.crc ^ 1, ..from };
        let s = scan_segment(&img, BASE, bad, 1 << 20, |_, _, _| {});
        assert_eq!(s.damage.len(), 1);
        assert_eq!(s.damage[0].reason, StopReason::Chain);
    }
}
