//! The header every published message carries, so any subscriber in the process can compute
//! end-to-end latency and per-session order without asking the publisher.
//!
//! Layout (little endian): session `u32`, per-session publish counter `u64`, intended send time
//! `u64` (ns since [`crate::clock::base`]); the rest is padding up to `--payload` bytes.

/// Bytes taken by the header; the smallest `--payload` accepted.
pub const HEADER_LEN: usize = 20;

/// The decoded header of one message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// Session index (NATS subject / Redis channel `s.{session}`).
    pub session: u32,
    /// Per-session publish counter, from 0.
    pub seq: u64,
    /// Intended send time, ns since the process-wide clock base.
    pub sent_ns: u64,
}

/// A zero header followed by padding, `len` bytes in all.
pub fn template(len: usize) -> Result<Vec<u8>, String> {
    if len < HEADER_LEN {
        return Err(format!(
            "--payload {len} is too small: each message carries a {HEADER_LEN}-byte header \
             (session, counter, send time); use at least {HEADER_LEN}"
        ));
    }
    let mut v = vec![b'.'; len];
    v[..HEADER_LEN].fill(0);
    Ok(v)
}

/// Write `h` into the first [`HEADER_LEN`] bytes of `buf`.
pub fn write(buf: &mut [u8], h: Header) {
    buf[0..4].copy_from_slice(&h.session.to_le_bytes());
    buf[4..12].copy_from_slice(&h.seq.to_le_bytes());
    buf[12..20].copy_from_slice(&h.sent_ns.to_le_bytes());
}

/// Read the header of a delivered payload; `None` if it is too short.
pub fn read(buf: &[u8]) -> Option<Header> {
    if buf.len() < HEADER_LEN {
        return None;
    }
    Some(Header {
        session: u32::from_le_bytes(buf[0..4].try_into().ok()?),
        seq: u64::from_le_bytes(buf[4..12].try_into().ok()?),
        sent_ns: u64::from_le_bytes(buf[12..20].try_into().ok()?),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roundtrip_and_padding() {
        let mut b = template(32).unwrap();
        let h = Header { session: 7, seq: 1 << 40, sent_ns: 123_456_789 };
        write(&mut b, h);
        assert_eq!(read(&b), Some(h));
        assert_eq!(&b[20..], &[b'.'; 12]);
        assert!(template(19).is_err());
        assert_eq!(read(&b[..19]), None);
    }
}
