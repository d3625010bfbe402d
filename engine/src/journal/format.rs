//! The journal's bytes on disk: segment header, group-commit frames, records, the seal.
//!
//! Pure functions over byte slices: no I/O, no clock, no allocation on the decode path. Every
//! length is checked against a maximum before it is trusted; a frame is checked whole (bounds,
//! CRC, records) before any record in it is handed out. Little-endian throughout.
//!
//! ```text
//! segment file (preallocated, `segment_bytes` long)
//! ┌──────────────┬─────────┬─────┬─────────┬─────┬─ … ─┬──────┬──────────── zeros ──┐
//! │ header block │ frame 0 │ pad │ frame 1 │ pad │     │ seal │                     │
//! └──────────────┴─────────┴─────┴─────────┴─────┴─ … ─┴──────┴─────────────────────┘
//!   4096 B         every frame starts on a 4096 B boundary (`O_DIRECT`) and is zero-padded
//!
//! frame header (40 B)                      record (32 B header + payload, unpadded)
//!  0 magic u32 "SBJF"                        0 conversation id u64
//!  4 frame_len u32 (header+records)          8 conversation seq u64
//!  8 crc u32  (CRC32C of [0,8) ++ [12,len))  16 timestamp_us u64
//! 12 prev_crc u32 (chain; header crc first)  24 kind u8, 3 B zero
//! 16 segment_base u64                        28 payload_len u32
//! 24 first_position u64                      32 payload
//! 32 record_count u32
//! 36 flags u32 (SEAL)
//! ```
//!
//! Why each field: `segment_base` and the chain (`prev_crc`) tell stale bytes (a reused or
//! garbage block with a valid-looking CRC) from the next frame; `first_position` lets recovery
//! name exactly which positions a damaged span lost. Padding each frame to the block (rather
//! than rewriting a shared tail block) means a torn write can never damage a frame that was
//! already acknowledged; the cost is at most one block per fdatasync at low load.

use std::fmt;

/// Every write offset and length is a multiple of this (`O_DIRECT` alignment on this machine's
/// disks; 512 B devices also accept it).
pub const BLOCK_BYTES: usize = 4096;
/// The segment header occupies the whole first block.
pub const SEGMENT_HEADER_BYTES: usize = BLOCK_BYTES;
/// Bytes of the header that carry fields (the rest of the block is zero).
const SEGMENT_HEADER_FIELDS_BYTES: usize = 60;
/// "SBJSEG" + format generation.
pub const SEGMENT_MAGIC: [u8; 8] = *b"SBJSEG\x00\x01";
/// On-disk format version in segment headers and snapshots.
pub const FORMAT_VERSION: u16 = 1;
/// "SBJF", little-endian.
pub const FRAME_MAGIC: u32 = u32::from_le_bytes(*b"SBJF");
/// Fixed frame header size.
pub const FRAME_HEADER_BYTES: usize = 40;
/// Fixed record header size.
pub const RECORD_HEADER_BYTES: usize = 32;
/// Frame flag: this frame seals the segment (footer); nothing follows it.
pub const FRAME_FLAG_SEAL: u32 = 1;
/// Segment-header flag: records in this segment may have been acknowledged before their
/// fdatasync (`interval` durability was allowed when it was written).
pub const SEGMENT_FLAG_EARLY_ACK: u16 = 1;
/// Hard ceiling for any frame, whatever the configuration says (bounds recovery's trust in
/// a length field).
pub const FRAME_BYTES_LIMIT: usize = 16 << 20;

/// CRC32C (Castagnoli) of `data`.
pub fn crc32c(data: &[u8]) -> u32 {
    crc32c::crc32c(data)
}

/// Rounds `n` up to the block size.
pub const fn align_up(n: usize) -> usize {
    (n + BLOCK_BYTES - 1) & !(BLOCK_BYTES - 1)
}

fn u16_at(b: &[u8], at: usize) -> u16 {
    u16::from_le_bytes([b[at], b[at + 1]])
}
fn u32_at(b: &[u8], at: usize) -> u32 {
    u32::from_le_bytes(b[at..at + 4].try_into().expect("4 bytes"))
}
fn u64_at(b: &[u8], at: usize) -> u64 {
    u64::from_le_bytes(b[at..at + 8].try_into().expect("8 bytes"))
}

/// What a record is. The payload is opaque to the journal; the kind decides which index ring
/// keeps it (messages in the message ring, the rest in the state ring).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum RecordKind {
    /// A published message.
    Message = 1,
    /// A conversation event (queued, assigned, transferred, closed, ...).
    ConversationEvent = 2,
    /// A participant's read cursor.
    ReadCursor = 3,
}

impl RecordKind {
    /// Decodes a kind byte; `None` for unknown kinds.
    pub fn from_u8(b: u8) -> Option<Self> {
        match b {
            1 => Some(Self::Message),
            2 => Some(Self::ConversationEvent),
            3 => Some(Self::ReadCursor),
            _ => None,
        }
    }
}

/// A record as the shard hands it to the journal (borrowed payload; copied once into the
/// frame being built).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Record<'a> {
    /// Conversation (session) id.
    pub conversation: u64,
    /// Sequence number within the conversation.
    pub seq: u64,
    /// When the shard accepted it, microseconds since the Unix epoch.
    pub timestamp_us: u64,
    /// What it is.
    pub kind: RecordKind,
    /// Opaque bytes.
    pub payload: &'a [u8],
}

impl Record<'_> {
    /// Bytes this record takes inside a frame.
    pub fn encoded_bytes(&self) -> usize {
        RECORD_HEADER_BYTES + self.payload.len()
    }
}

/// Appends a record's encoding to `out`.
pub fn encode_record(out: &mut Vec<u8>, r: &Record<'_>) {
    out.extend_from_slice(&r.conversation.to_le_bytes());
    out.extend_from_slice(&r.seq.to_le_bytes());
    out.extend_from_slice(&r.timestamp_us.to_le_bytes());
    out.extend_from_slice(&[r.kind as u8, 0, 0, 0]);
    out.extend_from_slice(&(r.payload.len() as u32).to_le_bytes());
    out.extend_from_slice(r.payload);
}

/// Decodes the record at `at` in a frame already checked by [`check_frame`].
pub fn record_at(frame: &[u8], at: usize) -> Option<(Record<'_>, usize)> {
    let h = frame.get(at..at + RECORD_HEADER_BYTES)?;
    let kind = RecordKind::from_u8(h[24])?;
    let len = u32_at(h, 28) as usize;
    let payload = frame.get(at + RECORD_HEADER_BYTES..at + RECORD_HEADER_BYTES + len)?;
    Some((
        Record {
            conversation: u64_at(h, 0),
            seq: u64_at(h, 8),
            timestamp_us: u64_at(h, 16),
            kind,
            payload,
        },
        at + RECORD_HEADER_BYTES + len,
    ))
}

/// A segment's header block.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SegmentHeader {
    /// Format version.
    pub version: u16,
    /// `SEGMENT_FLAG_*`.
    pub flags: u16,
    /// The shard that owns the journal.
    pub shard: u32,
    /// The journal epoch when this segment was created.
    pub epoch: u64,
    /// Position of the first record in this segment.
    pub base_position: u64,
    /// Preallocated file length.
    pub segment_bytes: u64,
    /// Creation time, microseconds since the Unix epoch (for operators).
    pub created_us: u64,
    /// Largest frame the writer could produce (recovery's length bound).
    pub frame_bytes_max: u32,
}

impl SegmentHeader {
    /// Encodes into a full block; the CRC is over the field bytes.
    pub fn encode(&self) -> Vec<u8> {
        let mut b = vec![0u8; SEGMENT_HEADER_BYTES];
        b[0..8].copy_from_slice(&SEGMENT_MAGIC);
        b[8..10].copy_from_slice(&self.version.to_le_bytes());
        b[10..12].copy_from_slice(&self.flags.to_le_bytes());
        b[12..16].copy_from_slice(&self.shard.to_le_bytes());
        b[16..24].copy_from_slice(&self.epoch.to_le_bytes());
        b[24..32].copy_from_slice(&self.base_position.to_le_bytes());
        b[32..40].copy_from_slice(&self.segment_bytes.to_le_bytes());
        b[40..48].copy_from_slice(&self.created_us.to_le_bytes());
        b[48..52].copy_from_slice(&self.frame_bytes_max.to_le_bytes());
        // 52..56 reserved (zero)
        let crc = crc32c(&b[0..56]);
        b[56..SEGMENT_HEADER_FIELDS_BYTES].copy_from_slice(&crc.to_le_bytes());
        b
    }

    /// The header CRC (the first frame's `prev_crc`).
    pub fn crc(&self) -> u32 {
        let b = self.encode();
        u32_at(&b, 56)
    }

    /// Decodes and checks a header block.
    pub fn decode(b: &[u8]) -> Result<Self, HeaderError> {
        if b.len() < SEGMENT_HEADER_FIELDS_BYTES {
            return Err(HeaderError::Short);
        }
        if b[0..8] != SEGMENT_MAGIC {
            return Err(HeaderError::BadMagic);
        }
        if crc32c(&b[0..56]) != u32_at(b, 56) {
            return Err(HeaderError::BadCrc);
        }
        let h = Self {
            version: u16_at(b, 8),
            flags: u16_at(b, 10),
            shard: u32_at(b, 12),
            epoch: u64_at(b, 16),
            base_position: u64_at(b, 24),
            segment_bytes: u64_at(b, 32),
            created_us: u64_at(b, 40),
            frame_bytes_max: u32_at(b, 48),
        };
        if h.version != FORMAT_VERSION {
            return Err(HeaderError::Version(h.version));
        }
        let frame_max = h.frame_bytes_max as usize;
        if !(FRAME_HEADER_BYTES..=FRAME_BYTES_LIMIT).contains(&frame_max)
            || h.segment_bytes < (SEGMENT_HEADER_BYTES + 2 * BLOCK_BYTES) as u64
            || h.segment_bytes % BLOCK_BYTES as u64 != 0
        {
            return Err(HeaderError::BadLimits);
        }
        Ok(h)
    }
}

/// Why a segment header was rejected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HeaderError {
    /// Fewer bytes than a header.
    Short,
    /// Not a segment (or zeroed).
    BadMagic,
    /// Checksum mismatch.
    BadCrc,
    /// A version this build does not read.
    Version(u16),
    /// Sizes out of bounds.
    BadLimits,
}

impl fmt::Display for HeaderError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Short => write!(f, "short header"),
            Self::BadMagic => write!(f, "bad header magic"),
            Self::BadCrc => write!(f, "bad header checksum"),
            Self::Version(v) => write!(f, "unsupported format version {v}"),
            Self::BadLimits => write!(f, "header sizes out of bounds"),
        }
    }
}

/// A checked frame's header fields.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FrameHeader {
    /// Header + records, excluding padding.
    pub frame_len: u32,
    /// This frame's CRC (the next frame's `prev_crc`).
    pub crc: u32,
    /// The previous frame's CRC (or the segment header's).
    pub prev_crc: u32,
    /// Base position of the segment the frame was written for.
    pub segment_base: u64,
    /// Position of the first record.
    pub first_position: u64,
    /// Records in the frame.
    pub record_count: u32,
    /// `FRAME_FLAG_*`.
    pub flags: u32,
}

impl FrameHeader {
    /// Bytes the frame occupies on disk, padding included.
    pub fn padded_len(&self) -> usize {
        align_up(self.frame_len as usize)
    }
    /// True for the segment's seal (footer).
    pub fn is_seal(&self) -> bool {
        self.flags & FRAME_FLAG_SEAL != 0
    }
    /// The position after this frame's last record.
    pub fn end_position(&self) -> u64 {
        self.first_position + u64::from(self.record_count)
    }
}

/// Why the bytes at an offset are not a valid frame.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FrameError {
    /// The header is all zero: the end of written data (preallocated space).
    Zero,
    /// Fewer bytes than the header or the frame claims.
    Truncated,
    /// Nonzero bytes without the frame magic.
    BadMagic,
    /// A length below the header size or above the bound.
    BadLength,
    /// The checksum does not match.
    BadCrc,
    /// The checksum matches but the records do not parse to the frame length and count.
    BadRecords,
}

impl fmt::Display for FrameError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Self::Zero => "zeroed block",
            Self::Truncated => "truncated frame",
            Self::BadMagic => "bad frame magic",
            Self::BadLength => "frame length out of bounds",
            Self::BadCrc => "bad frame checksum",
            Self::BadRecords => "records do not parse",
        })
    }
}

/// Checks the frame starting at `buf[0]`: bounds, CRC, and that its records parse exactly.
pub fn check_frame(buf: &[u8], frame_bytes_max: usize) -> Result<FrameHeader, FrameError> {
    let Some(h) = buf.get(..FRAME_HEADER_BYTES) else {
        return if buf.iter().all(|&b| b == 0) {
            Err(FrameError::Zero)
        } else {
            Err(FrameError::Truncated)
        };
    };
    if u32_at(h, 0) != FRAME_MAGIC {
        return if h.iter().all(|&b| b == 0) {
            Err(FrameError::Zero)
        } else {
            Err(FrameError::BadMagic)
        };
    }
    let len = u32_at(h, 4) as usize;
    if len < FRAME_HEADER_BYTES || len > frame_bytes_max.min(FRAME_BYTES_LIMIT) {
        return Err(FrameError::BadLength);
    }
    let Some(frame) = buf.get(..len) else {
        return Err(FrameError::Truncated);
    };
    let crc = crc32c::crc32c_append(crc32c(&frame[12..]), &frame[0..8]);
    if crc != u32_at(h, 8) {
        return Err(FrameError::BadCrc);
    }
    let fh = FrameHeader {
        frame_len: len as u32,
        crc,
        prev_crc: u32_at(h, 12),
        segment_base: u64_at(h, 16),
        first_position: u64_at(h, 24),
        record_count: u32_at(h, 32),
        flags: u32_at(h, 36),
    };
    let mut at = FRAME_HEADER_BYTES;
    for _ in 0..fh.record_count {
        match record_at(frame, at) {
            Some((_, next)) => at = next,
            None => return Err(FrameError::BadRecords),
        }
    }
    if at != len {
        return Err(FrameError::BadRecords);
    }
    Ok(fh)
}

/// Fills in the header of a frame whose records are already at `frame[FRAME_HEADER_BYTES..]`,
/// computes its CRC and returns it. `frame.len()` is the frame length (no padding).
pub fn seal_frame_header(
    frame: &mut [u8],
    prev_crc: u32,
    segment_base: u64,
    first_position: u64,
    record_count: u32,
    flags: u32,
) -> u32 {
    let len = frame.len();
    debug_assert!(len >= FRAME_HEADER_BYTES);
    frame[0..4].copy_from_slice(&FRAME_MAGIC.to_le_bytes());
    frame[4..8].copy_from_slice(&(len as u32).to_le_bytes());
    frame[12..16].copy_from_slice(&prev_crc.to_le_bytes());
    frame[16..24].copy_from_slice(&segment_base.to_le_bytes());
    frame[24..32].copy_from_slice(&first_position.to_le_bytes());
    frame[32..36].copy_from_slice(&record_count.to_le_bytes());
    frame[36..40].copy_from_slice(&flags.to_le_bytes());
    let crc = crc32c::crc32c_append(crc32c(&frame[12..]), &frame[0..8]);
    frame[8..12].copy_from_slice(&crc.to_le_bytes());
    crc
}

/// Encodes a complete frame (header, records, padding to the block) onto `out`; returns its
/// CRC. Used by tests, the seal and the benchmark; the writer builds frames in place.
pub fn encode_frame(
    out: &mut Vec<u8>,
    records: &[Record<'_>],
    prev_crc: u32,
    segment_base: u64,
    first_position: u64,
    flags: u32,
) -> u32 {
    let start = out.len();
    out.resize(start + FRAME_HEADER_BYTES, 0);
    for r in records {
        encode_record(out, r);
    }
    let end = out.len();
    let crc = seal_frame_header(
        &mut out[start..end],
        prev_crc,
        segment_base,
        first_position,
        records.len() as u32,
        flags,
    );
    out.resize(start + align_up(end - start), 0);
    crc
}

/// Iterates the records of a checked frame, with each record's offset inside the frame.
pub fn frame_records<'a>(frame: &'a [u8], fh: &FrameHeader) -> FrameRecords<'a> {
    FrameRecords {
        frame: &frame[..fh.frame_len as usize],
        at: FRAME_HEADER_BYTES,
        left: fh.record_count,
    }
}

/// Iterator returned by [`frame_records`].
#[derive(Debug)]
pub struct FrameRecords<'a> {
    frame: &'a [u8],
    at: usize,
    left: u32,
}

impl<'a> Iterator for FrameRecords<'a> {
    type Item = (u32, Record<'a>);
    fn next(&mut self) -> Option<Self::Item> {
        if self.left == 0 {
            return None;
        }
        let (r, next) = record_at(self.frame, self.at)?;
        let off = self.at as u32;
        self.at = next;
        self.left -= 1;
        Some((off, r))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rec(conv: u64, seq: u64, payload: &[u8]) -> Record<'_> {
        Record { conversation: conv, seq, timestamp_us: 1000 + seq, kind: RecordKind::Message, payload }
    }

    #[test]
    fn frame_round_trip_and_padding() {
        let mut out = Vec::new();
        let recs = [rec(7, 1, b"hello"), rec(8, 1, b""), rec(7, 2, &[9u8; 300])];
        let crc = encode_frame(&mut out, &recs, 0xabcd, 4096, 10, 0);
        assert_eq!(out.len(), BLOCK_BYTES);
        let fh = check_frame(&out, 1 << 20).unwrap();
        assert_eq!(fh.crc, crc);
        assert_eq!((fh.prev_crc, fh.segment_base, fh.first_position, fh.record_count), (0xabcd, 4096, 10, 3));
        let got: Vec<_> = frame_records(&out, &fh).map(|(_, r)| r).collect();
        assert_eq!(got, recs);
    }

    #[test]
    fn every_single_bit_flip_is_detected() {
        let mut out = Vec::new();
        encode_frame(&mut out, &[rec(1, 1, b"abcdefgh"), rec(2, 5, b"xyz")], 1, 0, 0, 0);
        let len = check_frame(&out, 1 << 20).unwrap().frame_len as usize;
        for byte in 0..len {
            for bit in 0..8 {
                let mut b = out.clone();
                b[byte] ^= 1 << bit;
                assert!(check_frame(&b, 1 << 20).is_err(), "flip at {byte}:{bit} undetected");
            }
        }
    }

    #[test]
    fn zero_truncated_and_length_bounds() {
        assert_eq!(check_frame(&[0u8; 64], 1 << 20), Err(FrameError::Zero));
        assert_eq!(check_frame(&[0u8; 10], 1 << 20), Err(FrameError::Zero));
        let mut out = Vec::new();
        encode_frame(&mut out, &[rec(1, 1, &[1u8; 100])], 1, 0, 0, 0);
        assert_eq!(check_frame(&out[..100], 1 << 20), Err(FrameError::Truncated));
        assert_eq!(check_frame(&out, 64), Err(FrameError::BadLength));
        let mut bad = out.clone();
        bad[4..8].copy_from_slice(&u32::MAX.to_le_bytes());
        assert_eq!(check_frame(&bad, 1 << 20), Err(FrameError::BadLength));
    }

    #[test]
    fn header_round_trip_and_rejects() {
        let h = SegmentHeader {
            version: FORMAT_VERSION,
            flags: SEGMENT_FLAG_EARLY_ACK,
            shard: 3,
            epoch: 9,
            base_position: 1234,
            segment_bytes: 1 << 20,
            created_us: 5,
            frame_bytes_max: 65536,
        };
        let b = h.encode();
        assert_eq!(SegmentHeader::decode(&b), Ok(h));
        let mut bad = b.clone();
        bad[20] ^= 1;
        assert_eq!(SegmentHeader::decode(&bad), Err(HeaderError::BadCrc));
        assert_eq!(SegmentHeader::decode(&[0u8; 4096]), Err(HeaderError::BadMagic));
    }
}
