//! Arbitrary bytes as a `POST /v1/events` body, through the same decoding and validation
//! the handler runs, in both body formats.
//!
//! Asserts, beyond "no panic": every accepted event keeps the guarantees listed in
//! docs/input-policy.md ("What an accepted event guarantees downstream"), and survives
//! the trip to Kafka and back (`EventRecord::encode`, then the sink's
//! `EventRecord::decode`) unchanged. The input is also tried as the `ts` of an otherwise
//! valid event, once as a JSON string and once as a raw JSON token, so the RFC 3339 and
//! epoch-millisecond parsing is fuzzed directly instead of only when the fuzzer happens
//! to build a whole valid event around it.

#![no_main]

use fanfinity::event::{
    is_valid_match_id, EventRecord, MAX_PAYLOAD_BYTES, MAX_TEAM_CHARS, MAX_USER_ID_CHARS,
};
use fanfinity::ingest::decode::{decode_events, BodyFormat};
use fanfinity::ingest::validate::{MAX_TS_MS, MIN_TS_MS};
use libfuzzer_sys::fuzz_target;

/// `http.max_events_per_request`'s default.
const MAX_EVENTS: usize = 1000;

/// The server clock stamped on every event; any positive value would do, since
/// `EventRecord::decode` refuses a `received_at` of zero or less.
const RECEIVED_AT_MS: i64 = 1_700_000_000_000;

/// A valid event up to its `ts` value, which the input supplies.
const EVENT_BEFORE_TS: &str = r#"{"match_id":"m1","user_id":"u1","type":"cheer","ts":"#;

fuzz_target!(|data: &[u8]| {
    for format in [BodyFormat::Json, BodyFormat::Ndjson] {
        check_body(data, format);
    }

    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let _ = BodyFormat::from_content_type(Some(text));
    for ts in [json_string(text), text.to_string()] {
        let body = format!("{EVENT_BEFORE_TS}{ts}}}");
        check_body(body.as_bytes(), BodyFormat::Json);
    }
});

/// Decodes `body` and checks every event it accepted.
fn check_body(body: &[u8], format: BodyFormat) {
    let Ok(records) = decode_events(body, format, MAX_EVENTS, RECEIVED_AT_MS) else {
        return;
    };
    assert!(
        !records.is_empty() && records.len() <= MAX_EVENTS,
        "accepted {} events",
        records.len()
    );
    for record in &records {
        check_limits(record);
        let bytes = record.encode().expect("an accepted event encodes");
        let back = EventRecord::decode(&bytes).unwrap_or_else(|err| {
            panic!(
                "the sink refuses an event ingest accepted: {err}\nrecord: {}",
                String::from_utf8_lossy(&bytes)
            )
        });
        assert_eq!(&back, record, "the event changed on its way through Kafka");
    }
}

/// What an accepted event guarantees downstream (docs/input-policy.md).
fn check_limits(record: &EventRecord) {
    assert!(!record.event_id.is_nil(), "nil event_id accepted");
    assert!(
        is_valid_match_id(&record.match_id),
        "match_id {:?}",
        record.match_id
    );
    let user_chars = record.user_id.chars().count();
    assert!(
        (1..=MAX_USER_ID_CHARS).contains(&user_chars),
        "user_id of {user_chars} characters"
    );
    assert!(
        !record.user_id.chars().any(char::is_control),
        "control character in user_id {:?}",
        record.user_id
    );
    if let Some(team) = &record.team {
        let team_chars = team.chars().count();
        assert!(
            (1..=MAX_TEAM_CHARS).contains(&team_chars),
            "team of {team_chars} characters"
        );
        assert!(
            !team.chars().any(char::is_control),
            "control character in team {team:?}"
        );
    }
    if let Some(payload) = &record.payload {
        assert!(
            payload.len() <= MAX_PAYLOAD_BYTES,
            "payload of {} bytes",
            payload.len()
        );
        assert!(
            payload.starts_with('{'),
            "payload is not an object: {payload}"
        );
        assert!(
            !payload.bytes().any(|b| b < 0x20),
            "raw control byte in payload {payload:?}"
        );
    }
    if let Some(ts) = record.ts {
        assert!(
            (MIN_TS_MS..=MAX_TS_MS).contains(&ts),
            "ts {ts} outside the accepted window"
        );
    }
    assert_eq!(record.received_at, RECEIVED_AT_MS);
}

/// `text` as a JSON string literal.
fn json_string(text: &str) -> String {
    let mut out = String::with_capacity(text.len() + 2);
    out.push('"');
    for c in text.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if u32::from(c) < 0x20 => out.push_str(&format!("\\u{:04x}", u32::from(c))),
            c => out.push(c),
        }
    }
    out.push('"');
    out
}
