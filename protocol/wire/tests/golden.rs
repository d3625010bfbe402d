//! Golden byte vectors: `tests/golden.txt` (valid frames) and `tests/golden_invalid.txt`
//! (inputs a decoder must refuse), shared with implementations in other languages.
//!
//! Each valid vector is decoded and compared with the frame built here in code, then encoded
//! again and compared byte for byte. Each invalid vector must be refused with the listed
//! error code, without consuming anything.
//!
//! The files are generated from the lists below, once: `GOLDEN_REGENERATE=1 cargo test -p
//! switchboard-protocol --test golden` rewrites them. Without that variable the test only reads
//! them, so a codec change that moves a byte fails here instead of silently changing the files
//! other teams test against.

use std::fmt::Write as _;
use std::path::PathBuf;

use bytes::{Bytes, BytesMut};
use switchboard_protocol::limits::{ID_BYTES_MAX, SKILLS_MAX};
use switchboard_protocol::{
    decode, AgentPresence, AgentStatus, CloseConversation, ConversationEvent, ConversationEventKind, Deliver, Durability, ErrorCode, ErrorFrame,
    Frame, FrameType, GoAway, GoAwayReason, Hello, Limits, OfferResponse, OpenConversation, Ping, Pong, PubAck, Publish, ReadCursor, ResumeFrom,
    ServerLimits, Subscribe, Subscribed, Success, Text, TicketCommand, TicketEvent, TicketOp, TicketState, Transfer, TransferKind, TransferTarget,
    Typing, Unsubscribe, Welcome,
};

const TRACE: u128 = 0x0123_4567_89ab_cdef_fedc_ba98_7654_3210;

fn t(value: &'static str) -> Text {
    Text::from_static(value)
}

fn b(value: &'static [u8]) -> Bytes {
    Bytes::from_static(value)
}

/// Every valid vector: name, correlation id, frame. Names are stable; append, never rename.
#[allow(clippy::too_many_lines)]
fn valid_vectors() -> Vec<(&'static str, u32, Frame)> {
    let limits = ServerLimits {
        frame_body_bytes_max: 65_536,
        payload_bytes_max: 16_384,
        subscriptions_max: 1_000,
        history_messages_max: 10_000,
        keepalive_ms: 30_000,
        outbound_bytes_max: 4_194_304,
    };
    vec![
        ("hello_no_token", 1, Hello { version_max: 1, version_min: 1, features: 0, client_name: t("gw-go/1.4.2"), token: t("") }.into()),
        (
            "hello_version_range_and_token",
            1,
            Hello {
                version_max: 3,
                version_min: 1,
                features: 0x0000_0005,
                client_name: t("gateway-α"),
                token: t("eyJhbGciOiJIUzI1NiJ9.eyJ0ZW5hbnQiOiJhY21lIn0.c2ln"),
            }
            .into(),
        ),
        (
            "welcome",
            1,
            Welcome { version: 1, features: 0, server_name: t("switchboard/0.1.0"), connection_id: 0x0102_0304_0506_0708, tenant: t("acme"), limits }
                .into(),
        ),
        ("ping", 2, Ping { nonce: 0xdead_beef_0000_0001 }.into()),
        ("pong", 2, Pong { nonce: 0xdead_beef_0000_0001 }.into()),
        ("pong_unsolicited_zero_nonce", 0, Pong { nonce: 0 }.into()),
        ("error_not_found", 7, ErrorFrame { code: ErrorCode::NotFound.as_u16(), message: t("no session conv-404") }.into()),
        ("error_connection_malformed", 0, ErrorFrame { code: ErrorCode::Malformed.as_u16(), message: t("bad magic") }.into()),
        ("error_unknown_code_empty_message", 3, ErrorFrame { code: 0xbeef, message: t("") }.into()),
        ("goaway_shutdown", 0, GoAway { reason: GoAwayReason::Shutdown, reconnect_after_ms: 0, message: t("restarting") }.into()),
        (
            "goaway_slow_consumer",
            0,
            GoAway { reason: GoAwayReason::SlowConsumer, reconnect_after_ms: 250, message: t("outbound buffer full") }.into(),
        ),
        ("goaway_overloaded", 0, GoAway { reason: GoAwayReason::Overloaded, reconnect_after_ms: 5_000, message: t("") }.into()),
        ("ok", 9, Success {}.into()),
        ("subscribe_live", 10, Subscribe { session: t("conv-1"), from: ResumeFrom::Live }.into()),
        ("subscribe_after", 11, Subscribe { session: t("conv-1"), from: ResumeFrom::After { epoch: 3, seq: 41 } }.into()),
        ("subscribe_earliest", 12, Subscribe { session: t("conv-1"), from: ResumeFrom::Earliest }.into()),
        ("subscribed_recovered", 11, Subscribed { session: t("conv-1"), epoch: 3, head_seq: 45, replay_from_seq: 42, recovered: true }.into()),
        ("subscribed_not_recovered", 11, Subscribed { session: t("conv-1"), epoch: 4, head_seq: 2, replay_from_seq: 1, recovered: false }.into()),
        ("unsubscribe", 13, Unsubscribe { session: t("conv-1") }.into()),
        ("publish", 14, Publish { session: t("conv-1"), client_msg_id: 77, trace_id: TRACE, sender: t("customer-9"), payload: b(b"hello") }.into()),
        (
            "publish_unicode_empty_payload",
            15,
            Publish { session: t("会话-1"), client_msg_id: 0, trace_id: 0, sender: t("agent-ü"), payload: Bytes::new() }.into(),
        ),
        (
            "puback_memory",
            14,
            PubAck { session: t("conv-1"), client_msg_id: 77, epoch: 3, seq: 46, duplicate: false, durability: Durability::Memory }.into(),
        ),
        (
            "puback_sync_duplicate",
            15,
            PubAck { session: t("conv-1"), client_msg_id: 77, epoch: 3, seq: 46, duplicate: true, durability: Durability::Sync }.into(),
        ),
        (
            "deliver",
            0,
            Deliver {
                session: t("conv-1"),
                epoch: 3,
                seq: 46,
                timestamp_us: 1_735_689_600_000_000,
                trace_id: TRACE,
                sender: t("customer-9"),
                payload: b(b"hello"),
            }
            .into(),
        ),
        (
            "deliver_binary_payload",
            0,
            Deliver {
                session: t("conv-2"),
                epoch: 1,
                seq: 1,
                timestamp_us: 1,
                trace_id: 0,
                sender: t(""),
                payload: b(&[0x00, 0xff, 0x53, 0x42, 0x01, 0x80]),
            }
            .into(),
        ),
        ("read_cursor", 16, ReadCursor { session: t("conv-1"), participant: t("agent-7"), seq: 46 }.into()),
        ("typing_active", 0, Typing { session: t("conv-1"), participant: t("customer-9"), active: true }.into()),
        ("typing_stopped", 0, Typing { session: t("conv-1"), participant: t("customer-9"), active: false }.into()),
        (
            "open_conversation",
            20,
            OpenConversation {
                session: t("conv-9"),
                customer: t("customer-9"),
                priority: 200,
                skills: vec![t("billing"), t("es")],
                context: b(br#"{"page":"/pricing"}"#),
            }
            .into(),
        ),
        (
            "open_conversation_no_skills",
            21,
            OpenConversation { session: t("conv-10"), customer: t("c"), priority: 0, skills: vec![], context: Bytes::new() }.into(),
        ),
        (
            "conversation_event_queued",
            0,
            ConversationEvent {
                session: t("conv-9"),
                epoch: 1,
                seq: 1,
                timestamp_us: 1_735_689_600_000_000,
                kind: ConversationEventKind::Queued,
                agent: t(""),
                queue: t("billing"),
                position: 3,
                estimated_wait_ms: 90_000,
                group: t("B"),
                reason: t(""),
            }
            .into(),
        ),
        (
            "conversation_event_assigned",
            0,
            ConversationEvent {
                session: t("conv-9"),
                epoch: 1,
                seq: 4,
                timestamp_us: 1_735_689_660_000_000,
                kind: ConversationEventKind::Assigned,
                agent: t("agent-7"),
                queue: t("billing"),
                position: 0,
                estimated_wait_ms: 0,
                group: t("B"),
                reason: t(""),
            }
            .into(),
        ),
        (
            "conversation_event_closed",
            0,
            ConversationEvent {
                session: t("conv-9"),
                epoch: 1,
                seq: 30,
                timestamp_us: 1_735_690_000_000_000,
                kind: ConversationEventKind::Closed,
                agent: t("agent-7"),
                queue: t(""),
                position: 0,
                estimated_wait_ms: 0,
                group: t(""),
                reason: t("resolved by agent"),
            }
            .into(),
        ),
        (
            "agent_status_online",
            22,
            AgentStatus { agent: t("agent-7"), presence: AgentPresence::Online, capacity: 4, load: 1, skills: vec![t("billing")] }.into(),
        ),
        (
            "agent_status_offline_no_skills",
            0,
            AgentStatus { agent: t("agent-8"), presence: AgentPresence::Offline, capacity: 0, load: 0, skills: vec![] }.into(),
        ),
        ("offer_response_accept", 23, OfferResponse { session: t("conv-9"), agent: t("agent-7"), accept: true }.into()),
        ("offer_response_decline", 24, OfferResponse { session: t("conv-9"), agent: t("agent-7"), accept: false }.into()),
        (
            "transfer_to_agent",
            25,
            Transfer {
                session: t("conv-9"),
                target: TransferTarget { kind: TransferKind::Agent, name: t("agent-3") },
                note: t("VIP, speaks Spanish"),
            }
            .into(),
        ),
        (
            "transfer_to_queue",
            26,
            Transfer { session: t("conv-9"), target: TransferTarget { kind: TransferKind::Queue, name: t("tier-2") }, note: t("") }.into(),
        ),
        ("close_conversation", 27, CloseConversation { session: t("conv-9"), reason: t("customer left") }.into()),
        (
            "ticket_command_create",
            30,
            TicketCommand {
                ticket: t("T-1001"),
                op: TicketOp::Create,
                expected_version: 0,
                session: t("conv-9"),
                assignee: t(""),
                trace_id: TRACE,
                payload: b(br#"{"subject":"refund"}"#),
            }
            .into(),
        ),
        (
            "ticket_command_assign",
            31,
            TicketCommand {
                ticket: t("T-1001"),
                op: TicketOp::Assign,
                expected_version: 1,
                session: t(""),
                assignee: t("agent-7"),
                trace_id: 0,
                payload: Bytes::new(),
            }
            .into(),
        ),
        (
            "ticket_event_accepted",
            30,
            TicketEvent {
                ticket: t("T-1001"),
                version: 1,
                state: TicketState::Accepted,
                escalation_level: 0,
                session: t("conv-9"),
                assignee: t(""),
                sla_deadline_us: 1_735_693_200_000_000,
                trace_id: TRACE,
                payload: b(br#"{"subject":"refund"}"#),
            }
            .into(),
        ),
        (
            "ticket_event_escalated_in_progress",
            0,
            TicketEvent {
                ticket: t("T-1001"),
                version: 5,
                state: TicketState::InProgress,
                escalation_level: 2,
                session: t("conv-9"),
                assignee: t("agent-3"),
                sla_deadline_us: 0,
                trace_id: 0,
                payload: Bytes::new(),
            }
            .into(),
        ),
        ("unsubscribe_max_length_id", u32::MAX, Unsubscribe { session: Text::from("z".repeat(ID_BYTES_MAX)) }.into()),
        (
            "agent_status_max_skills",
            40,
            AgentStatus {
                agent: t("agent-9"),
                presence: AgentPresence::Away,
                capacity: u16::MAX,
                load: u16::MAX,
                skills: (0..SKILLS_MAX).map(|i| Text::from(format!("skill-{i:02}"))).collect(),
            }
            .into(),
        ),
    ]
}

/// Every invalid vector: name, the ERROR code a server answers with, and the bytes.
fn invalid_vectors() -> Vec<(&'static str, ErrorCode, Vec<u8>)> {
    fn frame(type_byte: u8, body: &[u8]) -> Vec<u8> {
        let mut out = vec![0x53, 0x42, 0x01, type_byte, 0, 0, 0, 0];
        out.extend_from_slice(&(body.len() as u32).to_le_bytes());
        out.extend_from_slice(&1u32.to_le_bytes());
        out.extend_from_slice(body);
        out
    }
    fn with(mut bytes: Vec<u8>, index: usize, value: u8) -> Vec<u8> {
        bytes[index] = value;
        bytes
    }
    let ping = frame(0x03, &[1, 0, 0, 0, 0, 0, 0, 0]);
    let mut oversize = frame(0x13, &[]);
    oversize[8..12].copy_from_slice(&((1u32 << 20) + 1).to_le_bytes());
    vec![
        ("bad_magic_first_byte", ErrorCode::Malformed, b"G".to_vec()),
        ("bad_magic_second_byte", ErrorCode::Malformed, b"SX".to_vec()),
        ("unsupported_version_2", ErrorCode::UnsupportedVersion, vec![0x53, 0x42, 0x02]),
        ("unknown_frame_type_0x08", ErrorCode::UnknownFrameType, vec![0x53, 0x42, 0x01, 0x08]),
        ("flags_set", ErrorCode::Malformed, with(ping.clone(), 4, 1)),
        ("reserved_set", ErrorCode::Malformed, with(ping.clone(), 7, 0x80)),
        ("oversize_header_only", ErrorCode::FrameTooLarge, oversize[..16].to_vec()),
        ("truncated_ping_nonce", ErrorCode::Malformed, frame(0x03, &[1, 0, 0, 0])),
        ("trailing_byte_after_ping", ErrorCode::Malformed, frame(0x03, &[1, 0, 0, 0, 0, 0, 0, 0, 0])),
        ("id_length_lies", ErrorCode::Malformed, frame(0x12, &[10, b'a', b'b', b'c'])),
        ("id_too_long_129", ErrorCode::Malformed, frame(0x12, &[&[129u8][..], &[b'a'; 129]].concat())),
        ("id_invalid_utf8", ErrorCode::Malformed, frame(0x12, &[2, 0xc3, 0x28])),
        ("message_invalid_utf8", ErrorCode::Malformed, frame(0x05, &[1, 0, 1, 0, 0xff])),
        (
            "payload_length_lies",
            ErrorCode::Malformed,
            frame(0x13, &[&[1u8, b's'][..], &[0; 8], &[0; 16], &[1, b'p'], &[0xff, 0xff, 0xff, 0xff]].concat()),
        ),
        ("skills_count_17", ErrorCode::Malformed, frame(0x20, &[1, b's', 1, b'c', 0, 17])),
        ("goaway_reason_0", ErrorCode::Malformed, frame(0x06, &[0, 0, 0, 0, 0, 0, 0])),
        ("bool_value_2", ErrorCode::Malformed, frame(0x17, &[1, b's', 1, b'p', 2])),
        ("resume_mode_3", ErrorCode::Malformed, frame(0x10, &[&[1u8, b's', 3][..], &[0; 16]].concat())),
        ("resume_live_with_epoch", ErrorCode::Malformed, frame(0x10, &[&[1u8, b's', 0][..], &[1, 0, 0, 0, 0, 0, 0, 0], &[0; 8]].concat())),
    ]
}

fn path(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests").join(name)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().fold(String::with_capacity(bytes.len() * 2), |mut out, byte| {
        let _ = write!(out, "{byte:02x}");
        out
    })
}

fn unhex(text: &str) -> Vec<u8> {
    assert!(text.len() % 2 == 0, "odd number of hex digits");
    (0..text.len()).step_by(2).map(|i| u8::from_str_radix(&text[i..i + 2], 16).expect("hex digit")).collect()
}

const VALID_PREAMBLE: &str = "\
# Switchboard protocol v1 golden vectors: valid frames.
# Generated by protocol/wire/tests/golden.rs (GOLDEN_REGENERATE=1); see protocol/PROTOCOL.md.
# One frame per line: name | correlation id (decimal) | the whole frame, header included, in hex.
# A conforming decoder decodes each to exactly one frame with that correlation id and no bytes
# left over; a conforming encoder given the same fields produces the same bytes.
";

const INVALID_PREAMBLE: &str = "\
# Switchboard protocol v1 golden vectors: inputs a decoder must refuse.
# Generated by protocol/wire/tests/golden.rs (GOLDEN_REGENERATE=1); see protocol/PROTOCOL.md.
# One input per line: name | ERROR code a server answers with (decimal) | the bytes in hex.
# Each input is refused as soon as the listed bytes have arrived: none of them needs more.
";

fn regenerate() -> bool {
    std::env::var_os("GOLDEN_REGENERATE").is_some_and(|value| value == "1")
}

fn write_if_asked(file: &str, preamble: &str, lines: &[String]) {
    if regenerate() {
        let mut text = preamble.to_string();
        for line in lines {
            text.push_str(line);
            text.push('\n');
        }
        std::fs::write(path(file), text).expect("write golden file");
    }
}

/// Reads a golden file into (name, number, bytes) rows, skipping comments and blank lines.
fn read_rows(file: &str) -> Vec<(String, u32, Vec<u8>)> {
    let text = std::fs::read_to_string(path(file)).unwrap_or_else(|error| panic!("read tests/{file}: {error}"));
    text.lines()
        .filter(|line| !line.trim().is_empty() && !line.starts_with('#'))
        .map(|line| {
            let parts: Vec<&str> = line.split('|').map(str::trim).collect();
            assert_eq!(parts.len(), 3, "malformed line in {file}: {line}");
            (parts[0].to_string(), parts[1].parse().expect("decimal number"), unhex(parts[2]))
        })
        .collect()
}

#[test]
fn every_valid_golden_vector_decodes_to_its_frame_and_encodes_back() {
    let vectors = valid_vectors();
    let lines: Vec<String> = vectors
        .iter()
        .map(|(name, correlation, frame)| format!("{name} | {correlation} | {}", hex(&frame.to_bytes(*correlation).unwrap())))
        .collect();
    write_if_asked("golden.txt", VALID_PREAMBLE, &lines);

    let rows = read_rows("golden.txt");
    let file_names: Vec<&str> = rows.iter().map(|row| row.0.as_str()).collect();
    let code_names: Vec<&str> = vectors.iter().map(|vector| vector.0).collect();
    assert_eq!(file_names, code_names, "golden.txt and the vectors in golden.rs list different frames");

    for ((name, correlation, bytes), (_, expected_correlation, expected)) in rows.iter().zip(&vectors) {
        assert_eq!(correlation, expected_correlation, "{name}: correlation id");
        let mut src = BytesMut::from(&bytes[..]);
        let envelope =
            decode(&mut src, &Limits::default()).unwrap_or_else(|error| panic!("{name}: {error}")).unwrap_or_else(|| panic!("{name}: incomplete"));
        assert!(src.is_empty(), "{name}: {} bytes left over", src.len());
        assert_eq!(envelope.correlation, *correlation, "{name}: decoded correlation id");
        assert_eq!(&envelope.frame, expected, "{name}: decoded frame");
        assert_eq!(expected.encoded_len(), bytes.len(), "{name}: encoded_len");
        let encoded = expected.to_bytes(*correlation).unwrap();
        assert_eq!(hex(&encoded), hex(bytes), "{name}: re-encoded bytes");
    }
}

#[test]
fn golden_vectors_cover_every_frame_type_and_enum_value() {
    let frames: Vec<Frame> = valid_vectors().into_iter().map(|vector| vector.2).collect();
    for frame_type in FrameType::ALL {
        assert!(frames.iter().any(|frame| frame.frame_type() == *frame_type), "no golden vector for {frame_type:?}");
    }
    let resumes: Vec<ResumeFrom> = frames.iter().filter_map(|frame| if let Frame::Subscribe(s) = frame { Some(s.from) } else { None }).collect();
    assert!(resumes.contains(&ResumeFrom::Live) && resumes.contains(&ResumeFrom::Earliest));
    assert!(resumes.iter().any(|resume| matches!(resume, ResumeFrom::After { .. })));
    let kinds: Vec<TransferKind> =
        frames.iter().filter_map(|frame| if let Frame::Transfer(x) = frame { Some(x.target.kind) } else { None }).collect();
    assert_eq!(kinds.len(), TransferKind::ALL.len());
}

#[test]
fn every_invalid_golden_vector_is_refused_with_its_code() {
    let vectors = invalid_vectors();
    let lines: Vec<String> = vectors.iter().map(|(name, code, bytes)| format!("{name} | {} | {}", code.as_u16(), hex(bytes))).collect();
    write_if_asked("golden_invalid.txt", INVALID_PREAMBLE, &lines);

    let rows = read_rows("golden_invalid.txt");
    let file_names: Vec<&str> = rows.iter().map(|row| row.0.as_str()).collect();
    let code_names: Vec<&str> = vectors.iter().map(|vector| vector.0).collect();
    assert_eq!(file_names, code_names, "golden_invalid.txt and golden.rs list different inputs");

    for ((name, code, bytes), (_, _, expected_bytes)) in rows.iter().zip(&vectors) {
        assert_eq!(bytes, expected_bytes, "{name}: bytes differ from golden.rs");
        let mut src = BytesMut::from(&bytes[..]);
        let error = decode(&mut src, &Limits::default()).expect_err(name);
        assert_eq!(error.code(), ErrorCode::from_u16(*code as u16), "{name}: {error}");
        assert_eq!(&src[..], &bytes[..], "{name}: refused input was consumed");
    }
}
