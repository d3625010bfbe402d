//! One test per way a byte stream can be refused, and per way an encoder refuses a frame.
//!
//! Frames here are built byte by byte (not through the encoder) so that each test states
//! exactly which byte is wrong. Every refused input is also checked to be left in the buffer
//! untouched: a decode error is terminal (ERROR, then close), and the bytes that caused it stay
//! available to whoever logs them.

use bytes::{BufMut, Bytes, BytesMut};
use switchboard_protocol::limits::{FRAME_BODY_BYTES_MAX, ID_BYTES_MAX, MESSAGE_BYTES_MAX, SKILLS_MAX, TOKEN_BYTES_MAX};
use switchboard_protocol::{
    decode, AgentStatus, DecodeError, ErrorCode, Frame, FrameType, Hello, Limits, OpenConversation, Publish, Text, Unsubscribe, HEADER_BYTES, MAGIC,
    PROTOCOL_VERSION,
};

/// A header with the given type byte and body length; magic, version, flags and reserved valid.
fn header(type_byte: u8, body_bytes: u32, correlation: u32) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_BYTES);
    out.extend_from_slice(&MAGIC);
    out.push(PROTOCOL_VERSION);
    out.push(type_byte);
    out.extend_from_slice(&0u16.to_le_bytes());
    out.extend_from_slice(&0u16.to_le_bytes());
    out.extend_from_slice(&body_bytes.to_le_bytes());
    out.extend_from_slice(&correlation.to_le_bytes());
    out
}

/// A whole frame whose header length matches `body` exactly.
fn raw_frame(frame_type: FrameType, body: &[u8]) -> Vec<u8> {
    let mut out = header(frame_type as u8, body.len() as u32, 9);
    out.extend_from_slice(body);
    out
}

/// Builds a body from fields, in wire order.
#[derive(Default)]
struct Body(Vec<u8>);

impl Body {
    fn u8(mut self, value: u8) -> Body {
        self.0.push(value);
        self
    }
    fn u16(mut self, value: u16) -> Body {
        self.0.extend_from_slice(&value.to_le_bytes());
        self
    }
    fn u32(mut self, value: u32) -> Body {
        self.0.extend_from_slice(&value.to_le_bytes());
        self
    }
    fn u64(mut self, value: u64) -> Body {
        self.0.extend_from_slice(&value.to_le_bytes());
        self
    }
    fn u128(mut self, value: u128) -> Body {
        self.0.extend_from_slice(&value.to_le_bytes());
        self
    }
    fn raw(mut self, bytes: &[u8]) -> Body {
        self.0.extend_from_slice(bytes);
        self
    }
    /// An id: u8 length then the bytes (which need not be UTF-8 here).
    fn id(self, bytes: &[u8]) -> Body {
        self.u8(bytes.len() as u8).raw(bytes)
    }
    /// A u16-length text.
    fn text16(self, bytes: &[u8]) -> Body {
        self.u16(bytes.len() as u16).raw(bytes)
    }
    fn payload(self, bytes: &[u8]) -> Body {
        self.u32(bytes.len() as u32).raw(bytes)
    }
    fn frame(&self, frame_type: FrameType) -> Vec<u8> {
        raw_frame(frame_type, &self.0)
    }
}

fn limits() -> Limits {
    Limits::default()
}

/// Decodes `bytes`, expects an error, and checks nothing was consumed.
fn decode_err_with(bytes: &[u8], limits: Limits) -> DecodeError {
    let mut src = BytesMut::from(bytes);
    let error = match decode(&mut src, &limits) {
        Err(error) => error,
        Ok(result) => panic!("expected a decode error for {bytes:02x?}, got {result:?}"),
    };
    assert_eq!(&src[..], bytes, "a refused input must be left in the buffer as it was");
    error
}

fn decode_err(bytes: &[u8]) -> DecodeError {
    decode_err_with(bytes, limits())
}

/// Decodes `bytes`, expects "need more bytes", and checks nothing was consumed.
fn decode_incomplete(bytes: &[u8], limits: Limits) {
    let mut src = BytesMut::from(bytes);
    assert_eq!(decode(&mut src, &limits), Ok(None), "expected an incomplete frame for {bytes:02x?}");
    assert_eq!(&src[..], bytes);
}

/// Decodes one whole valid frame.
fn decode_ok(bytes: &[u8]) -> Frame {
    let mut src = BytesMut::from(bytes);
    let envelope = decode(&mut src, &limits()).expect("valid").expect("complete");
    assert!(src.is_empty());
    envelope.frame
}

// ---- header ----------------------------------------------------------------------------------

#[test]
fn bad_magic_is_refused_on_the_first_byte_alone() {
    assert_eq!(decode_err(b"X"), DecodeError::BadMagic);
    assert_eq!(decode_err(&[0x00]), DecodeError::BadMagic);
    // "B" first: the magic bytes in the wrong order.
    assert_eq!(decode_err(&[0x42, 0x53]), DecodeError::BadMagic);
}

#[test]
fn bad_magic_is_refused_on_the_second_byte() {
    decode_incomplete(b"S", limits());
    assert_eq!(decode_err(b"SX"), DecodeError::BadMagic);
}

#[test]
fn bad_magic_in_a_whole_frame() {
    let mut bytes = Body::default().u64(1).frame(FrameType::Ping);
    bytes[1] = b'b';
    assert_eq!(decode_err(&bytes), DecodeError::BadMagic);
}

#[test]
fn unsupported_version_is_refused_on_the_third_byte() {
    assert_eq!(decode_err(&[0x53, 0x42, 0x02]), DecodeError::UnsupportedVersion(2));
    assert_eq!(decode_err(&[0x53, 0x42, 0x00]), DecodeError::UnsupportedVersion(0));
    let mut bytes = Body::default().u64(1).frame(FrameType::Ping);
    bytes[2] = 0xff;
    assert_eq!(decode_err(&bytes), DecodeError::UnsupportedVersion(0xff));
}

#[test]
fn unknown_frame_type_is_refused_on_the_fourth_byte() {
    let known: Vec<u8> = FrameType::ALL.iter().map(|t| *t as u8).collect();
    for type_byte in 0..=u8::MAX {
        if known.contains(&type_byte) {
            continue;
        }
        assert_eq!(decode_err(&[0x53, 0x42, 0x01, type_byte]), DecodeError::UnknownFrameType(type_byte));
        assert_eq!(decode_err(&header(type_byte, 0, 1)), DecodeError::UnknownFrameType(type_byte));
    }
}

#[test]
fn every_known_frame_type_passes_the_header_check() {
    for frame_type in FrameType::ALL {
        decode_incomplete(&[0x53, 0x42, 0x01, *frame_type as u8], limits());
        assert_eq!(FrameType::from_u8(*frame_type as u8), Some(*frame_type));
    }
}

#[test]
fn flags_set_are_refused() {
    for bit in 0..16 {
        let mut bytes = header(FrameType::Success as u8, 0, 1);
        bytes[4..6].copy_from_slice(&(1u16 << bit).to_le_bytes());
        assert_eq!(decode_err(&bytes), DecodeError::ReservedBitsSet, "flag bit {bit}");
    }
}

#[test]
fn reserved_header_bits_set_are_refused() {
    for bit in 0..16 {
        let mut bytes = header(FrameType::Success as u8, 0, 1);
        bytes[6..8].copy_from_slice(&(1u16 << bit).to_le_bytes());
        assert_eq!(decode_err(&bytes), DecodeError::ReservedBitsSet, "reserved bit {bit}");
    }
}

#[test]
fn oversize_is_refused_from_the_header_alone() {
    let bytes = header(FrameType::Publish as u8, FRAME_BODY_BYTES_MAX + 1, 1);
    assert_eq!(decode_err(&bytes), DecodeError::FrameTooLarge { body_bytes: FRAME_BODY_BYTES_MAX + 1, max_bytes: FRAME_BODY_BYTES_MAX });
    let bytes = header(FrameType::Publish as u8, u32::MAX, 1);
    assert_eq!(decode_err(&bytes), DecodeError::FrameTooLarge { body_bytes: u32::MAX, max_bytes: FRAME_BODY_BYTES_MAX });
}

#[test]
fn oversize_respects_a_lowered_limit() {
    let small = Limits { frame_body_bytes_max: 64 };
    let bytes = header(FrameType::Publish as u8, 65, 1);
    assert_eq!(decode_err_with(&bytes, small), DecodeError::FrameTooLarge { body_bytes: 65, max_bytes: 64 });
    // Exactly at the limit is fine: the decoder waits for the body.
    decode_incomplete(&header(FrameType::Publish as u8, 64, 1), small);
}

#[test]
fn a_frame_at_the_protocol_limit_waits_for_its_body() {
    decode_incomplete(&header(FrameType::Publish as u8, FRAME_BODY_BYTES_MAX, 1), limits());
}

#[test]
fn every_strict_prefix_of_a_valid_frame_is_incomplete() {
    let bytes = Body::default().id(b"s").u64(1).u64(2).u64(3).u128(4).id(b"p").payload(b"hello").frame(FrameType::Deliver);
    decode_ok(&bytes);
    for end in 0..bytes.len() {
        decode_incomplete(&bytes[..end], limits());
    }
}

// ---- body: truncation and lying lengths ------------------------------------------------------

#[test]
fn truncated_fixed_width_field() {
    // PING needs an 8-byte nonce; the header says the body is 4 bytes and it is.
    let bytes = Body::default().u32(7).frame(FrameType::Ping);
    assert_eq!(decode_err(&bytes), DecodeError::Truncated { field: "nonce" });
}

#[test]
fn empty_body_where_fields_are_required() {
    assert_eq!(decode_err(&raw_frame(FrameType::Hello, &[])), DecodeError::Truncated { field: "version_max" });
    assert_eq!(decode_err(&raw_frame(FrameType::Subscribe, &[])), DecodeError::Truncated { field: "session" });
}

#[test]
fn id_length_lies() {
    // The session id claims 10 bytes; the body holds 3.
    let bytes = Body::default().u8(10).raw(b"abc").frame(FrameType::Unsubscribe);
    assert_eq!(decode_err(&bytes), DecodeError::Truncated { field: "session" });
}

#[test]
fn message_length_lies() {
    let bytes = Body::default().u16(1).u16(200).raw(b"short").frame(FrameType::Error);
    assert_eq!(decode_err(&bytes), DecodeError::Truncated { field: "message" });
}

#[test]
fn payload_length_lies() {
    let bytes = Body::default().id(b"s").u64(0).u128(0).id(b"p").u32(100).raw(&[0; 10]).frame(FrameType::Publish);
    assert_eq!(decode_err(&bytes), DecodeError::Truncated { field: "payload" });
}

#[test]
fn payload_length_of_four_gibibytes_is_truncation_not_an_allocation() {
    let bytes = Body::default().id(b"s").u64(0).u128(0).id(b"p").u32(u32::MAX).frame(FrameType::Publish);
    assert_eq!(decode_err(&bytes), DecodeError::Truncated { field: "payload" });
}

#[test]
fn truncated_resume_position() {
    // mode and epoch, but no seq.
    let bytes = Body::default().id(b"s").u8(1).u64(3).frame(FrameType::Subscribe);
    assert_eq!(decode_err(&bytes), DecodeError::Truncated { field: "from" });
}

#[test]
fn truncated_nested_limits() {
    // WELCOME with only the first two of six ServerLimits fields.
    let bytes = Body::default().u16(1).u32(0).id(b"srv").u64(1).id(b"t").u32(1024).u32(512).frame(FrameType::Welcome);
    assert_eq!(decode_err(&bytes), DecodeError::Truncated { field: "subscriptions_max" });
}

#[test]
fn skills_count_lies() {
    // Three skills announced, one present.
    let bytes = Body::default().id(b"agent").u8(1).u16(3).u16(0).u8(3).id(b"billing").frame(FrameType::AgentStatus);
    assert_eq!(decode_err(&bytes), DecodeError::Truncated { field: "skills" });
}

#[test]
fn trailing_bytes_after_the_last_field() {
    let bytes = Body::default().u64(1).u8(0).frame(FrameType::Ping);
    assert_eq!(decode_err(&bytes), DecodeError::TrailingBytes { count: 1 });
    let bytes = raw_frame(FrameType::Success, &[0, 0, 0]);
    assert_eq!(decode_err(&bytes), DecodeError::TrailingBytes { count: 3 });
}

#[test]
fn header_length_shorter_than_the_bytes_sent_leaves_the_rest_as_the_next_frame() {
    // The header says 8 bytes; 9 follow. The first frame decodes; the ninth byte (0x00) then
    // starts the next frame and is refused as bad magic.
    let mut bytes = Body::default().u64(5).frame(FrameType::Ping);
    bytes.push(0x00);
    let mut src = BytesMut::from(&bytes[..]);
    let envelope = decode(&mut src, &limits()).unwrap().unwrap();
    assert_eq!(envelope.frame, Frame::Ping(switchboard_protocol::Ping { nonce: 5 }));
    assert_eq!(decode(&mut src, &limits()), Err(DecodeError::BadMagic));
    assert_eq!(&src[..], &[0x00]);
}

// ---- body: text ------------------------------------------------------------------------------

#[test]
fn invalid_utf8_in_an_id() {
    for bad in [&[0xff][..], &[0xc3, 0x28], &[0xed, 0xa0, 0x80], &[0xc0, 0xaf], &[b'a', 0xe2, 0x82]] {
        let bytes = Body::default().id(bad).frame(FrameType::Unsubscribe);
        assert_eq!(decode_err(&bytes), DecodeError::InvalidUtf8 { field: "session" }, "{bad:02x?}");
    }
}

#[test]
fn invalid_utf8_in_a_skill() {
    let bytes = Body::default().id(b"agent").u8(1).u16(3).u16(0).u8(2).id(b"ok").id(&[0xfe]).frame(FrameType::AgentStatus);
    assert_eq!(decode_err(&bytes), DecodeError::InvalidUtf8 { field: "skills" });
}

#[test]
fn invalid_utf8_in_a_message() {
    let bytes = Body::default().u16(1).text16(&[b'b', b'a', b'd', 0xc3, 0x28]).frame(FrameType::Error);
    assert_eq!(decode_err(&bytes), DecodeError::InvalidUtf8 { field: "message" });
}

#[test]
fn invalid_utf8_in_a_token() {
    let bytes = Body::default().u16(1).u16(1).u32(0).id(b"c").text16(&[0x80]).frame(FrameType::Hello);
    assert_eq!(decode_err(&bytes), DecodeError::InvalidUtf8 { field: "token" });
}

#[test]
fn payloads_are_not_text() {
    // Opaque payloads may hold any bytes, including invalid UTF-8.
    let bytes = Body::default().id(b"s").u64(0).u128(0).id(b"p").payload(&[0xff, 0xfe, 0x00]).frame(FrameType::Publish);
    let Frame::Publish(publish) = decode_ok(&bytes) else { panic!("not a PUBLISH") };
    assert_eq!(publish.payload, Bytes::from_static(&[0xff, 0xfe, 0x00]));
}

#[test]
fn id_of_exactly_128_bytes_is_accepted() {
    let id = vec![b'a'; ID_BYTES_MAX];
    let bytes = Body::default().id(&id).frame(FrameType::Unsubscribe);
    let Frame::Unsubscribe(unsubscribe) = decode_ok(&bytes) else { panic!("not an UNSUBSCRIBE") };
    assert_eq!(unsubscribe.session.len(), ID_BYTES_MAX);
}

#[test]
fn id_longer_than_128_bytes_is_refused_even_when_present() {
    for len in [129usize, 200, 255] {
        let id = vec![b'a'; len];
        let bytes = Body::default().id(&id).frame(FrameType::Unsubscribe);
        assert_eq!(decode_err(&bytes), DecodeError::FieldTooLong { field: "session", len, max: ID_BYTES_MAX });
    }
}

#[test]
fn message_longer_than_1024_bytes_is_refused() {
    let text = vec![b'm'; MESSAGE_BYTES_MAX + 1];
    let bytes = Body::default().u16(1).text16(&text).frame(FrameType::Error);
    assert_eq!(decode_err(&bytes), DecodeError::FieldTooLong { field: "message", len: MESSAGE_BYTES_MAX + 1, max: MESSAGE_BYTES_MAX });
}

#[test]
fn token_longer_than_8192_bytes_is_refused() {
    let token = vec![b't'; TOKEN_BYTES_MAX + 1];
    let bytes = Body::default().u16(1).u16(1).u32(0).id(b"c").text16(&token).frame(FrameType::Hello);
    assert_eq!(decode_err(&bytes), DecodeError::FieldTooLong { field: "token", len: TOKEN_BYTES_MAX + 1, max: TOKEN_BYTES_MAX });
}

#[test]
fn more_than_16_skills_are_refused() {
    let mut body = Body::default().id(b"agent").u8(1).u16(3).u16(0).u8(SKILLS_MAX as u8 + 1);
    for _ in 0..=SKILLS_MAX {
        body = body.id(b"s");
    }
    assert_eq!(decode_err(&body.frame(FrameType::AgentStatus)), DecodeError::FieldTooLong { field: "skills", len: SKILLS_MAX + 1, max: SKILLS_MAX });
    // The count alone is enough to refuse: no skill bytes follow.
    let bytes = Body::default().id(b"s").id(b"c").u8(0).u8(255).frame(FrameType::OpenConversation);
    assert_eq!(decode_err(&bytes), DecodeError::FieldTooLong { field: "skills", len: 255, max: SKILLS_MAX });
}

// ---- body: enumerations and booleans ---------------------------------------------------------

fn invalid(field: &'static str, value: u64) -> DecodeError {
    DecodeError::InvalidValue { field, value }
}

#[test]
fn invalid_goaway_reason() {
    for reason in [0u8, 7, 255] {
        let bytes = Body::default().u8(reason).u32(0).text16(b"").frame(FrameType::GoAway);
        assert_eq!(decode_err(&bytes), invalid("reason", reason.into()));
    }
}

#[test]
fn invalid_durability() {
    let bytes = Body::default().id(b"s").u64(1).u64(1).u64(1).u8(0).u8(3).frame(FrameType::PubAck);
    assert_eq!(decode_err(&bytes), invalid("durability", 3));
}

#[test]
fn invalid_conversation_event_kind() {
    for kind in [0u8, 10] {
        let bytes = Body::default()
            .id(b"s")
            .u64(1)
            .u64(1)
            .u64(1)
            .u8(kind)
            .id(b"")
            .id(b"")
            .u32(0)
            .u32(0)
            .id(b"")
            .text16(b"")
            .frame(FrameType::ConversationEvent);
        assert_eq!(decode_err(&bytes), invalid("kind", kind.into()));
    }
}

#[test]
fn invalid_agent_presence() {
    for presence in [0u8, 4] {
        let bytes = Body::default().id(b"a").u8(presence).u16(1).u16(0).u8(0).frame(FrameType::AgentStatus);
        assert_eq!(decode_err(&bytes), invalid("presence", presence.into()));
    }
}

#[test]
fn invalid_ticket_op() {
    for op in [0u8, 8] {
        let bytes = Body::default().id(b"t").u8(op).u64(0).id(b"").id(b"").u128(0).payload(b"").frame(FrameType::TicketCommand);
        assert_eq!(decode_err(&bytes), invalid("op", op.into()));
    }
}

#[test]
fn invalid_ticket_state() {
    for state in [0u8, 6] {
        let bytes = Body::default().id(b"t").u64(1).u8(state).u8(0).id(b"").id(b"").u64(0).u128(0).payload(b"").frame(FrameType::TicketEvent);
        assert_eq!(decode_err(&bytes), invalid("state", state.into()));
    }
}

#[test]
fn invalid_transfer_kind() {
    for kind in [0u8, 3] {
        let bytes = Body::default().id(b"s").u8(kind).id(b"x").text16(b"").frame(FrameType::Transfer);
        assert_eq!(decode_err(&bytes), invalid("kind", kind.into()));
    }
}

#[test]
fn bool_value_2_is_refused() {
    let bytes = Body::default().id(b"s").u64(1).u64(0).u64(1).u8(2).frame(FrameType::Subscribed);
    assert_eq!(decode_err(&bytes), invalid("recovered", 2));
    let bytes = Body::default().id(b"s").id(b"p").u8(2).frame(FrameType::Typing);
    assert_eq!(decode_err(&bytes), invalid("active", 2));
    let bytes = Body::default().id(b"s").id(b"a").u8(0xff).frame(FrameType::OfferResponse);
    assert_eq!(decode_err(&bytes), invalid("accept", 0xff));
    let bytes = Body::default().id(b"s").u64(0).u64(1).u64(1).u8(7).u8(0).frame(FrameType::PubAck);
    assert_eq!(decode_err(&bytes), invalid("duplicate", 7));
}

#[test]
fn resume_from_with_an_invalid_mode() {
    for mode in [3u8, 255] {
        let bytes = Body::default().id(b"s").u8(mode).u64(0).u64(0).frame(FrameType::Subscribe);
        assert_eq!(decode_err(&bytes), invalid("from", mode.into()));
    }
}

#[test]
fn resume_from_with_non_zero_unused_fields() {
    // Live (0) and Earliest (2) carry no position: epoch and seq must both be 0.
    for (mode, epoch, seq) in [(0u8, 1u64, 0u64), (0, 0, 1), (2, 5, 0), (2, 0, u64::MAX)] {
        let bytes = Body::default().id(b"s").u8(mode).u64(epoch).u64(seq).frame(FrameType::Subscribe);
        assert_eq!(decode_err(&bytes), invalid("from", mode.into()), "mode {mode} epoch {epoch} seq {seq}");
    }
    // After (1) uses both, and any values are valid, zeros included.
    let bytes = Body::default().id(b"s").u8(1).u64(0).u64(0).frame(FrameType::Subscribe);
    decode_ok(&bytes);
}

#[test]
fn unknown_error_codes_decode_and_keep_their_value() {
    let bytes = Body::default().u16(999).text16(b"newer server").frame(FrameType::Error);
    let Frame::Error(error) = decode_ok(&bytes) else { panic!("not an ERROR") };
    assert_eq!(ErrorCode::from_u16(error.code), ErrorCode::Unknown(999));
    assert_eq!(ErrorCode::Unknown(999).as_u16(), 999);
}

// ---- error codes -----------------------------------------------------------------------------

#[test]
fn decode_errors_map_to_their_error_codes() {
    let cases = [
        (DecodeError::BadMagic, ErrorCode::Malformed),
        (DecodeError::UnsupportedVersion(2), ErrorCode::UnsupportedVersion),
        (DecodeError::UnknownFrameType(0x99), ErrorCode::UnknownFrameType),
        (DecodeError::ReservedBitsSet, ErrorCode::Malformed),
        (DecodeError::FrameTooLarge { body_bytes: 2, max_bytes: 1 }, ErrorCode::FrameTooLarge),
        (DecodeError::Truncated { field: "f" }, ErrorCode::Malformed),
        (DecodeError::InvalidUtf8 { field: "f" }, ErrorCode::Malformed),
        (DecodeError::FieldTooLong { field: "f", len: 2, max: 1 }, ErrorCode::Malformed),
        (DecodeError::InvalidValue { field: "f", value: 9 }, ErrorCode::Malformed),
        (DecodeError::TrailingBytes { count: 1 }, ErrorCode::Malformed),
    ];
    for (error, code) in cases {
        assert_eq!(error.code(), code, "{error}");
        assert!(!error.to_string().is_empty());
    }
}

#[test]
fn error_codes_have_the_documented_wire_values() {
    let expected = [
        (ErrorCode::Malformed, 1),
        (ErrorCode::UnsupportedVersion, 2),
        (ErrorCode::UnknownFrameType, 3),
        (ErrorCode::FrameTooLarge, 4),
        (ErrorCode::HandshakeRequired, 5),
        (ErrorCode::AuthFailed, 6),
        (ErrorCode::Forbidden, 7),
        (ErrorCode::RateLimited, 8),
        (ErrorCode::LimitExceeded, 9),
        (ErrorCode::NotFound, 10),
        (ErrorCode::InvalidState, 11),
        (ErrorCode::Conflict, 12),
        (ErrorCode::Unavailable, 13),
        (ErrorCode::BadRequest, 14),
        (ErrorCode::Internal, 15),
        (ErrorCode::NotImplemented, 16),
    ];
    assert_eq!(ErrorCode::ALL.len(), expected.len());
    for (code, value) in expected {
        assert_eq!(code.as_u16(), value);
        assert_eq!(ErrorCode::from_u16(value), code);
    }
    assert_eq!(ErrorCode::from_u16(0), ErrorCode::Unknown(0));
    assert_eq!(ErrorCode::from_u16(17), ErrorCode::Unknown(17));
}

#[test]
fn refused_inputs_decoded_through_real_frames_give_the_expected_codes() {
    // End to end: bytes in, ErrorCode out, as a server would answer.
    let cases: [(Vec<u8>, ErrorCode); 5] = [
        (b"GET / HTTP/1.1\r\n".to_vec(), ErrorCode::Malformed),
        (vec![0x53, 0x42, 0x07], ErrorCode::UnsupportedVersion),
        (vec![0x53, 0x42, 0x01, 0x7f], ErrorCode::UnknownFrameType),
        (header(FrameType::Publish as u8, FRAME_BODY_BYTES_MAX + 1, 1), ErrorCode::FrameTooLarge),
        (Body::default().u32(1).frame(FrameType::Ping), ErrorCode::Malformed),
    ];
    for (bytes, code) in cases {
        assert_eq!(decode_err(&bytes).code(), code);
    }
}

// ---- encoder ---------------------------------------------------------------------------------

/// Encodes, expects an error naming `field`, and checks nothing was written.
fn encode_err(frame: &Frame, field: &str, len: usize, max: usize) {
    let mut dst = BytesMut::new();
    let error = frame.encode(1, &mut dst).expect_err("must be refused");
    assert_eq!((error.field, error.len, error.max), (field, len, max));
    assert!(dst.is_empty(), "a refused frame must not be partly written");
    assert!(frame.to_bytes(1).is_err());
}

fn publish(session: Text, payload: Bytes) -> Frame {
    Frame::Publish(Publish { session, client_msg_id: 0, trace_id: 0, sender: Text::from("p"), payload })
}

#[test]
fn encoder_refuses_an_id_longer_than_128_bytes() {
    encode_err(&Frame::Unsubscribe(Unsubscribe { session: Text::from("é".repeat(65)) }), "session", 130, ID_BYTES_MAX);
    let ok = Frame::Unsubscribe(Unsubscribe { session: Text::from("x".repeat(ID_BYTES_MAX)) });
    assert!(ok.to_bytes(1).is_ok());
}

#[test]
fn encoder_refuses_a_long_token_and_client_name() {
    let hello = |client_name: usize, token: usize| {
        Frame::Hello(Hello {
            version_max: 1,
            version_min: 1,
            features: 0,
            client_name: Text::from("c".repeat(client_name)),
            token: Text::from("t".repeat(token)),
        })
    };
    encode_err(&hello(1, TOKEN_BYTES_MAX + 1), "token", TOKEN_BYTES_MAX + 1, TOKEN_BYTES_MAX);
    encode_err(&hello(ID_BYTES_MAX + 1, 0), "client_name", ID_BYTES_MAX + 1, ID_BYTES_MAX);
    assert!(hello(ID_BYTES_MAX, TOKEN_BYTES_MAX).to_bytes(1).is_ok());
}

#[test]
fn encoder_refuses_too_many_skills_and_long_skills() {
    let open = |skills: Vec<Text>| {
        Frame::OpenConversation(OpenConversation { session: Text::from("s"), customer: Text::from("c"), priority: 0, skills, context: Bytes::new() })
    };
    encode_err(&open(vec![Text::from("k"); SKILLS_MAX + 1]), "skills", SKILLS_MAX + 1, SKILLS_MAX);
    encode_err(&open(vec![Text::from("k".repeat(ID_BYTES_MAX + 1))]), "skills", ID_BYTES_MAX + 1, ID_BYTES_MAX);
    let status = Frame::AgentStatus(AgentStatus {
        agent: Text::from("a"),
        presence: switchboard_protocol::AgentPresence::Online,
        capacity: 1,
        load: 0,
        skills: vec![Text::from("k"); SKILLS_MAX + 1],
    });
    encode_err(&status, "skills", SKILLS_MAX + 1, SKILLS_MAX);
}

#[test]
fn encoder_refuses_a_long_message() {
    let frame = Frame::Error(switchboard_protocol::ErrorFrame { code: 1, message: Text::from("m".repeat(MESSAGE_BYTES_MAX + 1)) });
    encode_err(&frame, "message", MESSAGE_BYTES_MAX + 1, MESSAGE_BYTES_MAX);
}

#[test]
fn encoder_refuses_a_body_over_one_mebibyte() {
    let max = FRAME_BODY_BYTES_MAX as usize;
    // The payload alone is over the limit.
    encode_err(&publish(Text::from("s"), Bytes::from(vec![0; max + 1])), "payload", max + 1, max);
    // The payload fits on its own but the body does not: s(2) + id(8) + trace(16) + p(2) + len(4).
    let fields_bytes = 2 + 8 + 16 + 2 + 4;
    encode_err(&publish(Text::from("s"), Bytes::from(vec![0; max])), "frame body", max + fields_bytes, max);
    // Exactly at the limit is fine, and decodes.
    let frame = publish(Text::from("s"), Bytes::from(vec![7; max - fields_bytes]));
    let bytes = frame.to_bytes(3).unwrap();
    assert_eq!(bytes.len(), HEADER_BYTES + max);
    assert_eq!(decode_ok(&bytes), frame);
}

#[test]
fn encoded_len_matches_the_bytes_written() {
    let frame = publish(Text::from("séssion"), Bytes::from_static(b"payload"));
    let mut dst = BytesMut::new();
    dst.put_slice(b"prefix");
    frame.encode(5, &mut dst).unwrap();
    assert_eq!(dst.len(), 6 + frame.encoded_len());
}
