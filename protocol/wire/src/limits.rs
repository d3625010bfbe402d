//! Every length the decoder accepts has a maximum, named here with its unit last.

/// Largest frame body the protocol allows at all, in bytes (1 MiB). A server may announce a
/// smaller one in WELCOME; never a larger one.
pub const FRAME_BODY_BYTES_MAX: u32 = 1 << 20;
/// Longest identifier (session, participant, agent, queue, ticket, client name…), in bytes.
pub const ID_BYTES_MAX: usize = 128;
/// Longest auth token in HELLO, in bytes.
pub const TOKEN_BYTES_MAX: usize = 8192;
/// Longest human-readable text (error message, close reason, transfer note), in bytes.
pub const MESSAGE_BYTES_MAX: usize = 1024;
/// Most skills listed in one frame.
pub const SKILLS_MAX: usize = 16;

/// Limits a decoder enforces. The defaults are the protocol's own maxima; an engine lowers
/// `frame_body_bytes_max` to what its configuration allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// Largest accepted frame body in bytes; larger frames are refused from their header.
    pub frame_body_bytes_max: u32,
}

impl Default for Limits {
    fn default() -> Self {
        Limits { frame_body_bytes_max: FRAME_BODY_BYTES_MAX }
    }
}
