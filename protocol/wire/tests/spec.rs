//! Checks that `protocol/PROTOCOL.md` says what the code does.
//!
//! It reads the specification's tables (frame types, frame layouts, enumerations, error codes,
//! limits) and compares them with the crate. Frame layouts are checked against real bytes: each
//! golden vector's body is walked with the layout the document gives (field by field, with the
//! document's field types), which must end exactly at the end of the body; and cutting the body
//! where the document says a field starts must make the decoder report that very field as
//! truncated. So a field missing, misnamed, mistyped or out of order in the document fails here.

use std::collections::BTreeMap;
use std::path::PathBuf;

use bytes::BytesMut;
use switchboard_protocol::limits::{FRAME_BODY_BYTES_MAX, ID_BYTES_MAX, MESSAGE_BYTES_MAX, SKILLS_MAX, TOKEN_BYTES_MAX};
use switchboard_protocol::{
    decode, AgentPresence, ConversationEventKind, DecodeError, Durability, ErrorCode, FrameType, GoAwayReason, Limits, TicketOp, TicketState,
    TransferKind, HEADER_BYTES,
};

/// One table row of the document, with the section and heading it sits under.
struct Row {
    section: u32,
    heading: String,
    cells: Vec<String>,
}

fn spec_text() -> String {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../PROTOCOL.md");
    std::fs::read_to_string(&path).unwrap_or_else(|error| panic!("read {}: {error}", path.display()))
}

/// Every table body row (not header, not separator) of the document.
fn rows() -> Vec<Row> {
    let mut section = 0;
    let mut heading = String::new();
    let mut out = Vec::new();
    let mut in_code = false;
    for line in spec_text().lines() {
        if line.starts_with("```") {
            in_code = !in_code;
        }
        if in_code {
            continue;
        }
        if let Some(title) = line.strip_prefix("## ") {
            section = title.split('.').next().and_then(|n| n.trim().parse().ok()).unwrap_or(0);
            heading.clear();
        } else if let Some(title) = line.strip_prefix("### ") {
            heading = title.trim().to_string();
        } else if line.starts_with('|') && !line.starts_with("|--") {
            let cells: Vec<String> = line.trim().trim_matches('|').split('|').map(|cell| cell.trim().trim_matches('`').to_string()).collect();
            out.push(Row { section, heading: heading.clone(), cells });
        }
    }
    out
}

/// The document's name for a frame type: `HELLO`, `READ_CURSOR`, … (three are not plain
/// upper-snake-case forms of the Rust name).
fn doc_name(frame_type: FrameType) -> String {
    match frame_type {
        FrameType::Success => "OK".to_string(),
        FrameType::GoAway => "GOAWAY".to_string(),
        FrameType::PubAck => "PUBACK".to_string(),
        other => {
            let mut out = String::new();
            for (index, ch) in format!("{other:?}").chars().enumerate() {
                if ch.is_uppercase() && index > 0 {
                    out.push('_');
                }
                out.push(ch.to_ascii_uppercase());
            }
            out
        }
    }
}

#[test]
fn frame_type_table_lists_every_frame_type_and_no_other() {
    let documented: Vec<(String, String)> = rows()
        .into_iter()
        .filter(|row| row.section == 4 && row.cells[0].starts_with("0x"))
        .map(|row| (row.cells[0].clone(), row.cells[1].clone()))
        .collect();
    let expected: Vec<(String, String)> = FrameType::ALL.iter().map(|t| (format!("0x{:02x}", *t as u8), doc_name(*t))).collect();
    assert_eq!(documented, expected);
}

/// Field layouts from section 5: heading (`0x01 HELLO`, `ServerLimits`) → [(name, type)].
fn layouts() -> BTreeMap<String, Vec<(String, String)>> {
    let mut out: BTreeMap<String, Vec<(String, String)>> = BTreeMap::new();
    for row in rows().into_iter().filter(|row| row.section == 5) {
        if row.cells[0].parse::<u32>().is_ok() {
            assert_eq!(row.cells.len(), 4, "field rows have 4 cells: {:?}", row.cells);
            let fields = out.entry(row.heading.clone()).or_default();
            assert_eq!(row.cells[0], (fields.len() + 1).to_string(), "field numbers in {} are not 1, 2, 3…", row.heading);
            fields.push((row.cells[1].clone(), row.cells[2].clone()));
        } else if row.cells[0] == "#" {
            // A table header: a frame with no fields (OK) still has one.
            out.entry(row.heading.clone()).or_default();
        }
    }
    out
}

fn layout_of(frame_type: FrameType) -> Vec<(String, String)> {
    let heading = format!("0x{:02x} {}", frame_type as u8, doc_name(frame_type));
    layouts().remove(&heading).unwrap_or_else(|| panic!("PROTOCOL.md has no field table under `### {heading}`"))
}

#[test]
fn every_frame_type_has_a_layout_section() {
    let layouts = layouts();
    for frame_type in FrameType::ALL {
        let heading = format!("0x{:02x} {}", *frame_type as u8, doc_name(*frame_type));
        assert!(layouts.contains_key(&heading), "no layout for {heading}");
    }
    assert!(layouts.contains_key("ServerLimits") && layouts.contains_key("TransferTarget"));
}

/// Walks `body` from `offset` with a layout from the document, pushing (leaf field, offset) for
/// every field start. Returns the offset after the last field.
fn walk(body: &[u8], mut offset: usize, layout: &[(String, String)], starts: &mut Vec<(String, usize)>) -> usize {
    let enums = enum_tables();
    let u8_at = |at: usize| usize::from(body[at]);
    let u16_at = |at: usize| usize::from(u16::from_le_bytes([body[at], body[at + 1]]));
    for (name, kind) in layout {
        match kind.as_str() {
            "ServerLimits" | "TransferTarget" => {
                offset = walk(body, offset, &layouts()[kind.as_str()], starts);
                continue;
            }
            _ => starts.push((name.clone(), offset)),
        }
        offset += match kind.as_str() {
            "u8" | "bool" => 1,
            "u16" => 2,
            "u32" => 4,
            "u64" => 8,
            "u128" => 16,
            "ResumeFrom" => 17,
            "id" => 1 + u8_at(offset),
            "message" | "token" => 2 + u16_at(offset),
            "payload" => 4 + u32::from_le_bytes(body[offset..offset + 4].try_into().unwrap()) as usize,
            "skills" => {
                let count = u8_at(offset);
                let mut at = offset + 1;
                for _ in 0..count {
                    at += 1 + u8_at(at);
                }
                at - offset
            }
            other if enums.contains_key(other) => 1,
            other => panic!("PROTOCOL.md uses an unknown field type `{other}` for `{name}`"),
        };
    }
    offset
}

fn golden_frames() -> Vec<(String, Vec<u8>)> {
    let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/golden.txt");
    let text = std::fs::read_to_string(path).expect("read golden.txt");
    text.lines()
        .filter(|line| !line.trim().is_empty() && !line.starts_with('#'))
        .map(|line| {
            let parts: Vec<&str> = line.split('|').map(str::trim).collect();
            let hex = parts[2];
            let bytes = (0..hex.len()).step_by(2).map(|i| u8::from_str_radix(&hex[i..i + 2], 16).unwrap()).collect();
            (parts[0].to_string(), bytes)
        })
        .collect()
}

#[test]
fn documented_layouts_match_the_golden_bytes_field_by_field() {
    let mut seen = Vec::new();
    for (name, bytes) in golden_frames() {
        let frame_type = FrameType::from_u8(bytes[3]).unwrap();
        seen.push(frame_type);
        let body = &bytes[HEADER_BYTES..];
        let mut starts = Vec::new();
        let end = walk(body, 0, &layout_of(frame_type), &mut starts);
        assert_eq!(end, body.len(), "{name}: the documented layout of {frame_type:?} covers {end} of {} body bytes", body.len());

        // Cut the body where each field starts: the decoder must name that field as truncated.
        for (field, start) in starts {
            let mut cut = bytes[..HEADER_BYTES + start].to_vec();
            cut[8..12].copy_from_slice(&(start as u32).to_le_bytes());
            let mut src = BytesMut::from(&cut[..]);
            match decode(&mut src, &Limits::default()) {
                Err(DecodeError::Truncated { field: reported }) => {
                    assert_eq!(reported, field, "{name}: PROTOCOL.md has `{field}` at body offset {start}, the code has `{reported}`");
                }
                other => panic!("{name}: cut before `{field}` at {start}: expected Truncated, got {other:?}"),
            }
        }
    }
    for frame_type in FrameType::ALL {
        assert!(seen.contains(frame_type), "no golden vector checks the layout of {frame_type:?}");
    }
}

/// Enumeration tables from section 6: name → [(value, variant)].
fn enum_tables() -> BTreeMap<String, Vec<(u8, String)>> {
    let mut out: BTreeMap<String, Vec<(u8, String)>> = BTreeMap::new();
    for row in rows().into_iter().filter(|row| row.section == 6) {
        if let Ok(value) = row.cells[0].parse::<u8>() {
            out.entry(row.heading.clone()).or_default().push((value, row.cells[1].clone()));
        }
    }
    out
}

fn variants<T: std::fmt::Debug + Copy>(all: &[T], value: impl Fn(T) -> u8) -> Vec<(u8, String)> {
    all.iter().map(|v| (value(*v), format!("{v:?}"))).collect()
}

#[test]
fn enumeration_tables_match_the_code() {
    let tables = enum_tables();
    let expected: Vec<(&str, Vec<(u8, String)>)> = vec![
        ("GoAwayReason", variants(GoAwayReason::ALL, |v| v as u8)),
        ("Durability", variants(Durability::ALL, |v| v as u8)),
        ("ConversationEventKind", variants(ConversationEventKind::ALL, |v| v as u8)),
        ("AgentPresence", variants(AgentPresence::ALL, |v| v as u8)),
        ("TicketOp", variants(TicketOp::ALL, |v| v as u8)),
        ("TicketState", variants(TicketState::ALL, |v| v as u8)),
        ("TransferKind", variants(TransferKind::ALL, |v| v as u8)),
    ];
    assert_eq!(tables.len(), expected.len(), "PROTOCOL.md documents enums {:?}", tables.keys().collect::<Vec<_>>());
    for (name, values) in expected {
        assert_eq!(tables.get(name), Some(&values), "enumeration {name}");
    }
}

#[test]
fn error_code_table_matches_the_code() {
    let documented: Vec<(u16, String, String)> = rows()
        .into_iter()
        .filter(|row| row.section == 9 && row.cells.len() == 4)
        .filter_map(|row| Some((row.cells[0].parse().ok()?, row.cells[1].clone(), row.cells[2].clone())))
        .collect();
    let expected: Vec<(u16, String)> = ErrorCode::ALL.iter().map(|code| (code.as_u16(), format!("{code:?}"))).collect();
    let names: Vec<(u16, String)> = documented.iter().map(|(value, name, _)| (*value, name.clone())).collect();
    assert_eq!(names, expected);
    // Every code a decode error maps to closes the connection.
    for code in [ErrorCode::Malformed, ErrorCode::UnsupportedVersion, ErrorCode::UnknownFrameType, ErrorCode::FrameTooLarge] {
        let row = documented.iter().find(|(value, _, _)| *value == code.as_u16()).unwrap();
        assert_eq!(row.2, "closes", "{code:?}");
    }
}

#[test]
fn limits_table_matches_the_code() {
    let documented: BTreeMap<String, String> = rows()
        .into_iter()
        .filter(|row| row.section == 10 && row.cells.len() == 4 && row.cells[0].ends_with("_MAX"))
        .map(|row| (row.cells[0].clone(), row.cells[1].clone()))
        .collect();
    let expected: BTreeMap<String, String> = [
        ("FRAME_BODY_BYTES_MAX", FRAME_BODY_BYTES_MAX as usize),
        ("ID_BYTES_MAX", ID_BYTES_MAX),
        ("MESSAGE_BYTES_MAX", MESSAGE_BYTES_MAX),
        ("TOKEN_BYTES_MAX", TOKEN_BYTES_MAX),
        ("SKILLS_MAX", SKILLS_MAX),
    ]
    .into_iter()
    .map(|(name, value)| (name.to_string(), value.to_string()))
    .collect();
    assert_eq!(documented, expected);
}

#[test]
fn header_table_matches_the_constants() {
    let text = spec_text();
    assert!(text.contains("| 0 | 2 | magic | `0x53 0x42` (ASCII \"SB\") |"));
    assert!(text.contains("| 2 | 1 | version | protocol version of this frame's layout: `1` |"));
    assert_eq!(switchboard_protocol::MAGIC, [0x53, 0x42]);
    assert_eq!(switchboard_protocol::PROTOCOL_VERSION, 1);
    let offsets: Vec<(usize, usize)> = rows()
        .into_iter()
        .filter(|row| row.section == 2 && row.cells.len() == 4)
        .filter_map(|row| Some((row.cells[0].parse().ok()?, row.cells[1].parse().ok()?)))
        .collect();
    assert_eq!(offsets, vec![(0, 2), (2, 1), (3, 1), (4, 2), (6, 2), (8, 4), (12, 4)]);
    assert_eq!(offsets.iter().map(|(_, size)| size).sum::<usize>(), HEADER_BYTES);
}
