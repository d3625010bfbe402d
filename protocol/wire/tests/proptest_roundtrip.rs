//! Property tests: every frame type survives encode → decode unchanged, a stream of frames cut
//! into arbitrary chunks decodes to the same sequence, and no input makes the decoder panic or
//! consume bytes it did not return as a frame.
//!
//! Field values range over everything valid: empty and maximum-length ids, messages and tokens,
//! multi-byte UTF-8, 0..=16 skills, every enum value, extreme integers. A failing case is
//! replayed with the seed proptest prints (and stores under `proptest-regressions/`).

use bytes::{BufMut, Bytes, BytesMut};
use proptest::collection::vec;
use proptest::prelude::*;
use proptest::strategy::Union;
use switchboard_protocol::limits::{ID_BYTES_MAX, MESSAGE_BYTES_MAX, SKILLS_MAX, TOKEN_BYTES_MAX};
use switchboard_protocol::{
    decode, AgentPresence, AgentStatus, CloseConversation, ConversationEvent, ConversationEventKind, DecodeError, Deliver, Durability, Envelope,
    ErrorFrame, Frame, FrameType, GoAway, GoAwayReason, Hello, Limits, OfferResponse, OpenConversation, Ping, Pong, PubAck, Publish, ReadCursor,
    ResumeFrom, ServerLimits, Subscribe, Subscribed, Success, Text, TicketCommand, TicketEvent, TicketOp, TicketState, Transfer, TransferKind,
    TransferTarget, Typing, Unsubscribe, Welcome,
};

// ---- field strategies ------------------------------------------------------------------------

/// Cuts `value` to at most `max_bytes` bytes at a character boundary.
fn truncate_to(mut value: String, max_bytes: usize) -> String {
    if value.len() > max_bytes {
        let mut end = max_bytes;
        while !value.is_char_boundary(end) {
            end -= 1;
        }
        value.truncate(end);
    }
    value
}

/// UTF-8 text of at most `max_bytes` bytes: empty, exactly at the limit (one- and multi-byte
/// characters), short arbitrary unicode, and long arbitrary unicode cut to fit.
fn text(max_bytes: usize) -> BoxedStrategy<Text> {
    // "é" is 2 bytes and "€" 3: padding with "a" lands exactly on the limit either way.
    let at_limit_2 = "é".repeat(max_bytes / 2) + &"a".repeat(max_bytes % 2);
    let at_limit_3 = "€".repeat(max_bytes / 3) + &"a".repeat(max_bytes % 3);
    prop_oneof![
        1 => Just(String::new()),
        1 => Just("a".repeat(max_bytes)),
        1 => Just(at_limit_2),
        1 => Just(at_limit_3),
        6 => any::<String>().prop_map(move |s| truncate_to(s, max_bytes)),
        2 => vec(any::<char>(), 0..=max_bytes.min(512)).prop_map(move |chars| truncate_to(chars.into_iter().collect(), max_bytes)),
    ]
    .prop_map(Text::from)
    .boxed()
}

fn id() -> BoxedStrategy<Text> {
    text(ID_BYTES_MAX)
}

fn message() -> BoxedStrategy<Text> {
    text(MESSAGE_BYTES_MAX)
}

fn token() -> BoxedStrategy<Text> {
    text(TOKEN_BYTES_MAX)
}

fn skills() -> BoxedStrategy<Vec<Text>> {
    prop_oneof![vec(id(), 0..=SKILLS_MAX), Just(vec![Text::from("s".repeat(ID_BYTES_MAX)); SKILLS_MAX])].boxed()
}

/// Opaque bytes: mostly small, sometimes a few KiB, sometimes empty.
fn payload() -> BoxedStrategy<Bytes> {
    prop_oneof![
        1 => Just(Bytes::new()),
        6 => vec(any::<u8>(), 0..256).prop_map(Bytes::from),
        1 => vec(any::<u8>(), 0..16_384).prop_map(Bytes::from),
    ]
    .boxed()
}

fn one_of<T: Copy + std::fmt::Debug + 'static>(all: &'static [T]) -> impl Strategy<Value = T> {
    proptest::sample::select(all)
}

fn resume() -> impl Strategy<Value = ResumeFrom> {
    prop_oneof![
        Just(ResumeFrom::Live),
        Just(ResumeFrom::Earliest),
        (any::<u64>(), any::<u64>()).prop_map(|(epoch, seq)| ResumeFrom::After { epoch, seq }),
    ]
}

fn server_limits() -> impl Strategy<Value = ServerLimits> {
    any::<[u32; 6]>().prop_map(|v| ServerLimits {
        frame_body_bytes_max: v[0],
        payload_bytes_max: v[1],
        subscriptions_max: v[2],
        history_messages_max: v[3],
        keepalive_ms: v[4],
        outbound_bytes_max: v[5],
    })
}

// ---- frame strategies: one per frame type ----------------------------------------------------

fn hello() -> impl Strategy<Value = Frame> {
    (any::<u16>(), any::<u16>(), any::<u32>(), id(), token())
        .prop_map(|(version_max, version_min, features, client_name, token)| Hello { version_max, version_min, features, client_name, token }.into())
}

fn welcome() -> impl Strategy<Value = Frame> {
    (any::<u16>(), any::<u32>(), id(), any::<u64>(), id(), server_limits()).prop_map(
        |(version, features, server_name, connection_id, tenant, limits)| {
            Welcome { version, features, server_name, connection_id, tenant, limits }.into()
        },
    )
}

fn ping() -> impl Strategy<Value = Frame> {
    any::<u64>().prop_map(|nonce| Ping { nonce }.into())
}

fn pong() -> impl Strategy<Value = Frame> {
    any::<u64>().prop_map(|nonce| Pong { nonce }.into())
}

fn error() -> impl Strategy<Value = Frame> {
    (any::<u16>(), message()).prop_map(|(code, message)| ErrorFrame { code, message }.into())
}

fn go_away() -> impl Strategy<Value = Frame> {
    (one_of(GoAwayReason::ALL), any::<u32>(), message())
        .prop_map(|(reason, reconnect_after_ms, message)| GoAway { reason, reconnect_after_ms, message }.into())
}

fn success() -> impl Strategy<Value = Frame> {
    Just(Success {}.into())
}

fn subscribe() -> impl Strategy<Value = Frame> {
    (id(), resume()).prop_map(|(session, from)| Subscribe { session, from }.into())
}

fn subscribed() -> impl Strategy<Value = Frame> {
    (id(), any::<u64>(), any::<u64>(), any::<u64>(), any::<bool>())
        .prop_map(|(session, epoch, head_seq, replay_from_seq, recovered)| Subscribed { session, epoch, head_seq, replay_from_seq, recovered }.into())
}

fn unsubscribe() -> impl Strategy<Value = Frame> {
    id().prop_map(|session| Unsubscribe { session }.into())
}

fn publish() -> impl Strategy<Value = Frame> {
    (id(), any::<u64>(), any::<u128>(), id(), payload())
        .prop_map(|(session, client_msg_id, trace_id, sender, payload)| Publish { session, client_msg_id, trace_id, sender, payload }.into())
}

fn pub_ack() -> impl Strategy<Value = Frame> {
    (id(), any::<u64>(), any::<u64>(), any::<u64>(), any::<bool>(), one_of(Durability::ALL)).prop_map(
        |(session, client_msg_id, epoch, seq, duplicate, durability)| PubAck { session, client_msg_id, epoch, seq, duplicate, durability }.into(),
    )
}

fn deliver() -> impl Strategy<Value = Frame> {
    (id(), any::<u64>(), any::<u64>(), any::<u64>(), any::<u128>(), id(), payload()).prop_map(
        |(session, epoch, seq, timestamp_us, trace_id, sender, payload)| {
            Deliver { session, epoch, seq, timestamp_us, trace_id, sender, payload }.into()
        },
    )
}

fn read_cursor() -> impl Strategy<Value = Frame> {
    (id(), id(), any::<u64>()).prop_map(|(session, participant, seq)| ReadCursor { session, participant, seq }.into())
}

fn typing() -> impl Strategy<Value = Frame> {
    (id(), id(), any::<bool>()).prop_map(|(session, participant, active)| Typing { session, participant, active }.into())
}

fn open_conversation() -> impl Strategy<Value = Frame> {
    (id(), id(), any::<u8>(), skills(), payload())
        .prop_map(|(session, customer, priority, skills, context)| OpenConversation { session, customer, priority, skills, context }.into())
}

fn conversation_event() -> impl Strategy<Value = Frame> {
    ((id(), any::<u64>(), any::<u64>(), any::<u64>(), one_of(ConversationEventKind::ALL)), (id(), id(), any::<u32>(), any::<u32>(), id(), message()))
        .prop_map(|((session, epoch, seq, timestamp_us, kind), (agent, queue, position, estimated_wait_ms, group, reason))| {
            ConversationEvent { session, epoch, seq, timestamp_us, kind, agent, queue, position, estimated_wait_ms, group, reason }.into()
        })
}

fn agent_status() -> impl Strategy<Value = Frame> {
    (id(), one_of(AgentPresence::ALL), any::<u16>(), any::<u16>(), skills())
        .prop_map(|(agent, presence, capacity, load, skills)| AgentStatus { agent, presence, capacity, load, skills }.into())
}

fn offer_response() -> impl Strategy<Value = Frame> {
    (id(), id(), any::<bool>()).prop_map(|(session, agent, accept)| OfferResponse { session, agent, accept }.into())
}

fn transfer() -> impl Strategy<Value = Frame> {
    (id(), one_of(TransferKind::ALL), id(), message())
        .prop_map(|(session, kind, name, note)| Transfer { session, target: TransferTarget { kind, name }, note }.into())
}

fn close_conversation() -> impl Strategy<Value = Frame> {
    (id(), message()).prop_map(|(session, reason)| CloseConversation { session, reason }.into())
}

fn ticket_command() -> impl Strategy<Value = Frame> {
    (id(), one_of(TicketOp::ALL), any::<u64>(), id(), id(), any::<u128>(), payload()).prop_map(
        |(ticket, op, expected_version, session, assignee, trace_id, payload)| {
            TicketCommand { ticket, op, expected_version, session, assignee, trace_id, payload }.into()
        },
    )
}

fn ticket_event() -> impl Strategy<Value = Frame> {
    ((id(), any::<u64>(), one_of(TicketState::ALL), any::<u8>(), id()), (id(), any::<u64>(), any::<u128>(), payload())).prop_map(
        |((ticket, version, state, escalation_level, session), (assignee, sla_deadline_us, trace_id, payload))| {
            TicketEvent { ticket, version, state, escalation_level, session, assignee, sla_deadline_us, trace_id, payload }.into()
        },
    )
}

/// Every frame type with its strategy. `strategies_cover_every_frame_type` keeps it complete.
fn strategies() -> Vec<(FrameType, BoxedStrategy<Frame>)> {
    vec![
        (FrameType::Hello, hello().boxed()),
        (FrameType::Welcome, welcome().boxed()),
        (FrameType::Ping, ping().boxed()),
        (FrameType::Pong, pong().boxed()),
        (FrameType::Error, error().boxed()),
        (FrameType::GoAway, go_away().boxed()),
        (FrameType::Success, success().boxed()),
        (FrameType::Subscribe, subscribe().boxed()),
        (FrameType::Subscribed, subscribed().boxed()),
        (FrameType::Unsubscribe, unsubscribe().boxed()),
        (FrameType::Publish, publish().boxed()),
        (FrameType::PubAck, pub_ack().boxed()),
        (FrameType::Deliver, deliver().boxed()),
        (FrameType::ReadCursor, read_cursor().boxed()),
        (FrameType::Typing, typing().boxed()),
        (FrameType::OpenConversation, open_conversation().boxed()),
        (FrameType::ConversationEvent, conversation_event().boxed()),
        (FrameType::AgentStatus, agent_status().boxed()),
        (FrameType::OfferResponse, offer_response().boxed()),
        (FrameType::Transfer, transfer().boxed()),
        (FrameType::CloseConversation, close_conversation().boxed()),
        (FrameType::TicketCommand, ticket_command().boxed()),
        (FrameType::TicketEvent, ticket_event().boxed()),
    ]
}

fn any_frame() -> impl Strategy<Value = Frame> {
    Union::new(strategies().into_iter().map(|(_, strategy)| strategy))
}

fn any_envelope() -> impl Strategy<Value = Envelope> {
    (any::<u32>(), any_frame()).prop_map(|(correlation, frame)| Envelope { correlation, frame })
}

// ---- properties ------------------------------------------------------------------------------

/// Encodes, checks the length, decodes, and checks the result is the same frame with nothing
/// left over. Returns the bytes.
fn assert_round_trip(correlation: u32, frame: &Frame) -> Result<Bytes, TestCaseError> {
    let bytes = frame.to_bytes(correlation).map_err(|error| TestCaseError::fail(error.to_string()))?;
    prop_assert_eq!(bytes.len(), frame.encoded_len());
    prop_assert_eq!(bytes[3], frame.frame_type() as u8);
    let mut src = BytesMut::from(&bytes[..]);
    let decoded = decode(&mut src, &Limits::default());
    prop_assert_eq!(decoded, Ok(Some(Envelope { correlation, frame: frame.clone() })));
    prop_assert!(src.is_empty());
    Ok(bytes)
}

#[test]
fn strategies_cover_every_frame_type() {
    let covered: Vec<FrameType> = strategies().into_iter().map(|(frame_type, _)| frame_type).collect();
    assert_eq!(covered, FrameType::ALL, "add a strategy for the new frame type");
}

#[test]
fn each_strategy_yields_its_own_frame_type() {
    use proptest::strategy::ValueTree;
    use proptest::test_runner::TestRunner;
    let mut runner = TestRunner::deterministic();
    for (frame_type, strategy) in strategies() {
        for _ in 0..16 {
            let frame = strategy.new_tree(&mut runner).unwrap().current();
            assert_eq!(frame.frame_type(), frame_type);
        }
    }
}

macro_rules! round_trip_per_type {
    ($($test:ident: $strategy:expr,)*) => {
        proptest! {
            #![proptest_config(ProptestConfig { cases: 128, ..ProptestConfig::default() })]
            $(
                #[test]
                fn $test(correlation in any::<u32>(), frame in $strategy) {
                    assert_round_trip(correlation, &frame)?;
                }
            )*
        }
    };
}

round_trip_per_type! {
    hello_round_trips: hello(),
    welcome_round_trips: welcome(),
    ping_round_trips: ping(),
    pong_round_trips: pong(),
    error_round_trips: error(),
    go_away_round_trips: go_away(),
    success_round_trips: success(),
    subscribe_round_trips: subscribe(),
    subscribed_round_trips: subscribed(),
    unsubscribe_round_trips: unsubscribe(),
    publish_round_trips: publish(),
    pub_ack_round_trips: pub_ack(),
    deliver_round_trips: deliver(),
    read_cursor_round_trips: read_cursor(),
    typing_round_trips: typing(),
    open_conversation_round_trips: open_conversation(),
    conversation_event_round_trips: conversation_event(),
    agent_status_round_trips: agent_status(),
    offer_response_round_trips: offer_response(),
    transfer_round_trips: transfer(),
    close_conversation_round_trips: close_conversation(),
    ticket_command_round_trips: ticket_command(),
    ticket_event_round_trips: ticket_event(),
}

/// Feeds `stream` to a decoder in chunks of the given sizes (cycled), decoding after every
/// chunk until it needs more. Checks that "need more" and errors leave the buffer untouched.
fn decode_in_chunks(stream: &[u8], chunk_sizes: &[usize], limits: Limits) -> (Vec<Envelope>, Option<DecodeError>, usize) {
    let mut src = BytesMut::new();
    let mut decoded = Vec::new();
    let mut offset = 0;
    let mut sizes = chunk_sizes.iter().cycle();
    let mut consumed = 0;
    while offset < stream.len() {
        let size = (*sizes.next().unwrap()).max(1).min(stream.len() - offset);
        src.put_slice(&stream[offset..offset + size]);
        offset += size;
        loop {
            let before = src.clone();
            match decode(&mut src, &limits) {
                Ok(Some(envelope)) => {
                    consumed += envelope.frame.encoded_len();
                    assert_eq!(before.len() - src.len(), envelope.frame.encoded_len(), "consumed exactly one frame");
                    decoded.push(envelope);
                }
                Ok(None) => {
                    assert_eq!(src, before, "Ok(None) must not consume");
                    break;
                }
                Err(error) => {
                    assert_eq!(src, before, "Err must not consume");
                    return (decoded, Some(error), consumed);
                }
            }
        }
    }
    (decoded, None, consumed)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    #[test]
    fn any_frame_round_trips(correlation in any::<u32>(), frame in any_frame()) {
        assert_round_trip(correlation, &frame)?;
    }

    #[test]
    fn encoding_into_an_existing_buffer_appends_exactly_the_frame(prefix in vec(any::<u8>(), 0..64), frame in any_frame()) {
        let mut dst = BytesMut::from(&prefix[..]);
        frame.encode(7, &mut dst).unwrap();
        prop_assert_eq!(&dst[..prefix.len()], &prefix[..]);
        prop_assert_eq!(&dst[prefix.len()..], &frame.to_bytes(7).unwrap()[..]);
    }

    #[test]
    fn a_stream_split_at_random_boundaries_decodes_to_the_same_frames(
        envelopes in vec(any_envelope(), 1..24),
        chunk_sizes in vec(prop_oneof![1usize..4, 1usize..64, 1usize..4096], 1..32),
    ) {
        let mut stream = BytesMut::new();
        for envelope in &envelopes {
            envelope.frame.encode(envelope.correlation, &mut stream).unwrap();
        }
        let (decoded, error, consumed) = decode_in_chunks(&stream, &chunk_sizes, Limits::default());
        prop_assert_eq!(error, None);
        prop_assert_eq!(consumed, stream.len());
        prop_assert_eq!(decoded, envelopes);
    }

    #[test]
    fn decoding_arbitrary_bytes_never_panics_or_consumes_on_failure(
        bytes in vec(any::<u8>(), 0..512),
        chunk_sizes in vec(1usize..64, 1..8),
    ) {
        decode_in_chunks(&bytes, &chunk_sizes, Limits::default());
        decode_in_chunks(&bytes, &chunk_sizes, Limits { frame_body_bytes_max: 16 });
    }

    /// Arbitrary bytes rarely pass the header check; corrupting valid frames reaches the body
    /// decoders. Whatever decodes must encode back to the same bytes (the encoding is canonical).
    #[test]
    fn corrupted_frames_never_panic_and_what_decodes_is_canonical(
        envelope in any_envelope(),
        flips in vec((any::<prop::sample::Index>(), any::<u8>()), 1..4),
        cut in any::<prop::sample::Index>(),
        truncate in any::<bool>(),
    ) {
        let mut bytes = envelope.frame.to_bytes(envelope.correlation).unwrap().to_vec();
        for (index, value) in flips {
            let at = index.index(bytes.len());
            bytes[at] = value;
        }
        if truncate {
            bytes.truncate(cut.index(bytes.len() + 1));
        }
        let (decoded, _, consumed) = decode_in_chunks(&bytes, &[bytes.len().max(1)], Limits::default());
        let mut reencoded = Vec::new();
        for envelope in &decoded {
            reencoded.extend_from_slice(&envelope.frame.to_bytes(envelope.correlation).unwrap());
        }
        prop_assert_eq!(&reencoded[..], &bytes[..consumed]);
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// The borrowed DELIVER encoder writes the same bytes as the frame it stands for.
    #[test]
    fn deliver_ref_encodes_like_deliver(correlation in any::<u32>(), frame in deliver()) {
        let Frame::Deliver(deliver) = &frame else { unreachable!("deliver() makes DELIVER frames") };
        let borrowed = switchboard_protocol::DeliverRef {
            session: deliver.session.as_str(),
            epoch: deliver.epoch,
            seq: deliver.seq,
            timestamp_us: deliver.timestamp_us,
            trace_id: deliver.trace_id,
            sender: deliver.sender.as_str(),
            payload: &deliver.payload,
        };
        let mut ours = Vec::new();
        borrowed.encode(correlation, &mut ours).unwrap();
        prop_assert_eq!(borrowed.encoded_len(), ours.len());
        prop_assert_eq!(&ours[..], &frame.to_bytes(correlation).unwrap()[..]);
    }
}

// ---- the borrowed DELIVER decoder ------------------------------------------------------------

/// `frame` (header and body) decoded both ways: `decode` and `peek_frame` +
/// `DeliverRef::decode_body` must agree on the outcome, the error and every field.
fn borrowed_decode_agrees(frame: &[u8]) -> Result<(), TestCaseError> {
    let limits = Limits::default();
    let owned = decode(&mut BytesMut::from(frame), &limits);
    let borrowed = switchboard_protocol::peek_frame(frame, &limits)
        .and_then(|peeked| peeked.map(|(header, body)| switchboard_protocol::DeliverRef::decode_body(body).map(|d| (header.correlation, d))).transpose());
    match (owned, borrowed) {
        // Arbitrary bytes can form a complete frame of another type: the borrowed decoder is
        // for DELIVER bodies only.
        (Ok(Some(Envelope { frame, .. })), _) if !matches!(frame, Frame::Deliver(_)) => {}
        (Ok(Some(Envelope { correlation, frame: Frame::Deliver(deliver) })), Ok(Some((ref_correlation, d)))) => {
            prop_assert_eq!(correlation, ref_correlation);
            prop_assert_eq!(
                (deliver.session.as_str(), deliver.epoch, deliver.seq, deliver.timestamp_us, deliver.trace_id, deliver.sender.as_str(), &deliver.payload[..]),
                (d.session, d.epoch, d.seq, d.timestamp_us, d.trace_id, d.sender, d.payload)
            );
        }
        (Ok(None), Ok(None)) => {}
        (Err(owned), Err(borrowed)) => prop_assert_eq!(owned, borrowed),
        (owned, borrowed) => prop_assert!(false, "decode gave {owned:?}, the borrowed decoder {borrowed:?}"),
    }
    Ok(())
}

/// `frame` encoded, its body with one byte changed, cut short and bytes appended (each as
/// chosen), under a new header from `header(body_bytes, correlation)` whose length follows the
/// body.
fn altered(
    frame: &Frame,
    correlation: u32,
    header: fn(usize, u32) -> Vec<u8>,
    change: Option<(prop::sample::Index, u8)>,
    cut: Option<prop::sample::Index>,
    extra: &[u8],
) -> Vec<u8> {
    let encoded = frame.to_bytes(correlation).unwrap();
    let mut body = encoded[switchboard_protocol::HEADER_BYTES..].to_vec();
    if let Some((at, byte)) = change {
        let at = at.index(body.len());
        body[at] = byte;
    }
    if let Some(at) = cut {
        body.truncate(at.index(body.len() + 1));
    }
    body.extend_from_slice(extra);
    let mut whole = header(body.len(), correlation);
    whole.extend_from_slice(&body);
    whole
}

/// Prefixes of `whole` around the header's end and the body's.
fn prefixes(whole: &[u8]) -> impl Iterator<Item = &[u8]> {
    [0, 1, switchboard_protocol::HEADER_BYTES - 1, switchboard_protocol::HEADER_BYTES, whole.len() - 1].into_iter().map(|len| &whole[..len.min(whole.len())])
}

/// `agrees` on `whole` and on each of its [`prefixes`] (incomplete frames are `None` both ways).
fn agrees_with_prefixes(whole: &[u8], agrees: fn(&[u8]) -> Result<(), TestCaseError>) -> Result<(), TestCaseError> {
    agrees(whole)?;
    for prefix in prefixes(whole) {
        agrees(prefix)?;
    }
    Ok(())
}

/// A DELIVER header for a body of `body_bytes`.
fn deliver_header(body_bytes: usize, correlation: u32) -> Vec<u8> {
    let mut header = Vec::new();
    header.put_slice(&switchboard_protocol::MAGIC);
    header.put_u8(switchboard_protocol::PROTOCOL_VERSION);
    header.put_u8(FrameType::Deliver as u8);
    header.put_u32_le(0);
    header.put_u32_le(body_bytes as u32);
    header.put_u32_le(correlation);
    header
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    /// Valid DELIVER frames, and the same with one byte changed, the body cut short or bytes
    /// appended (the header's length follows the body): both decoders agree on all of them.
    #[test]
    fn deliver_ref_decodes_like_decode(
        correlation in any::<u32>(),
        frame in deliver(),
        change in any::<Option<(prop::sample::Index, u8)>>(),
        cut in any::<Option<prop::sample::Index>>(),
        extra in vec(any::<u8>(), 0..3),
    ) {
        let whole = altered(&frame, correlation, deliver_header, change, cut, &extra);
        agrees_with_prefixes(&whole, borrowed_decode_agrees)?;
    }

    /// Arbitrary bodies under a DELIVER header, and arbitrary bytes as a whole frame.
    #[test]
    fn deliver_ref_agrees_on_arbitrary_bytes(body in vec(any::<u8>(), 0..200), raw in vec(any::<u8>(), 0..64)) {
        let mut whole = deliver_header(body.len(), 7);
        whole.extend_from_slice(&body);
        borrowed_decode_agrees(&whole)?;
        borrowed_decode_agrees(&raw)?;
    }
}

// ---- the borrowed PUBLISH decoder and PUBACK encoder ----------------------------------------

/// `frame` decoded both ways: `decode` and `peek_frame` + `PublishRef::decode_body` must agree
/// on the outcome, the error and every field.
fn borrowed_publish_agrees(frame: &[u8]) -> Result<(), TestCaseError> {
    let limits = Limits::default();
    let owned = decode(&mut BytesMut::from(frame), &limits);
    let borrowed = switchboard_protocol::peek_frame(frame, &limits)
        .and_then(|peeked| peeked.map(|(header, body)| switchboard_protocol::PublishRef::decode_body(body).map(|p| (header.correlation, p))).transpose());
    match (owned, borrowed) {
        (Ok(Some(Envelope { frame, .. })), _) if !matches!(frame, Frame::Publish(_)) => {}
        (Ok(Some(Envelope { correlation, frame: Frame::Publish(publish) })), Ok(Some((ref_correlation, p)))) => {
            prop_assert_eq!(correlation, ref_correlation);
            prop_assert_eq!(
                (publish.session.as_str(), publish.client_msg_id, publish.trace_id, publish.sender.as_str(), &publish.payload[..]),
                (p.session, p.client_msg_id, p.trace_id, p.sender, p.payload)
            );
        }
        (Ok(None), Ok(None)) => {}
        (Err(owned), Err(borrowed)) => prop_assert_eq!(owned, borrowed),
        (owned, borrowed) => prop_assert!(false, "decode gave {owned:?}, the borrowed decoder {borrowed:?}"),
    }
    Ok(())
}

/// A PUBLISH header for a body of `body_bytes`.
fn publish_header(body_bytes: usize, correlation: u32) -> Vec<u8> {
    let mut header = deliver_header(body_bytes, correlation);
    header[switchboard_protocol::MAGIC.len() + 1] = FrameType::Publish as u8;
    header
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, ..ProptestConfig::default() })]

    /// Valid PUBLISH frames, and the same with one byte changed, the body cut short or bytes
    /// appended: both decoders agree on all of them, and on every prefix.
    #[test]
    fn publish_ref_decodes_like_decode(
        correlation in any::<u32>(),
        frame in publish(),
        change in any::<Option<(prop::sample::Index, u8)>>(),
        cut in any::<Option<prop::sample::Index>>(),
        extra in vec(any::<u8>(), 0..3),
    ) {
        let whole = altered(&frame, correlation, publish_header, change, cut, &extra);
        agrees_with_prefixes(&whole, borrowed_publish_agrees)?;
    }

    /// Arbitrary bodies under a PUBLISH header.
    #[test]
    fn publish_ref_agrees_on_arbitrary_bytes(body in vec(any::<u8>(), 0..200)) {
        let mut whole = publish_header(body.len(), 9);
        whole.extend_from_slice(&body);
        borrowed_publish_agrees(&whole)?;
    }

    /// The borrowed PUBACK encoder writes the same bytes as the frame it stands for.
    #[test]
    fn pub_ack_ref_encodes_like_pub_ack(correlation in any::<u32>(), frame in pub_ack()) {
        let Frame::PubAck(ack) = &frame else { unreachable!("pub_ack() makes PUBACK frames") };
        let borrowed = switchboard_protocol::PubAckRef {
            session: ack.session.as_str(),
            client_msg_id: ack.client_msg_id,
            epoch: ack.epoch,
            seq: ack.seq,
            duplicate: ack.duplicate,
            durability: ack.durability,
        };
        let mut ours = Vec::new();
        borrowed.encode(correlation, &mut ours).unwrap();
        prop_assert_eq!(borrowed.encoded_len(), ours.len());
        prop_assert_eq!(&ours[..], &frame.to_bytes(correlation).unwrap()[..]);
    }
}
