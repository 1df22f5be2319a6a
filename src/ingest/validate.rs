//! Field-by-field validation of client events into [`EventRecord`]s.
//!
//! A request is all-or-nothing, so validation collects every problem of every event
//! before answering: a client fixing a batch sees all of its mistakes at once.
//! Unknown fields are ignored so that newer clients keep working against older servers.
//!
//! What an accepted event guarantees to Kafka and ClickHouse: every string is valid UTF-8
//! (the parser refuses invalid bytes and lone surrogates); `match_id` is 1-64 ASCII
//! characters of `[A-Za-z0-9_.:-]`; `user_id` and `team` hold no control characters (no
//! NUL, no C0 or C1 codes), so they are safe in any String column, log line or CSV;
//! `payload` is compact JSON text, in which any control character the client sent is
//! escaped (`\u0000`), never raw; `ts`, when present, lies in 2000-2099 UTC, inside
//! ClickHouse's `DateTime`; `received_at` is always this server's clock. A client field
//! named `received_at` is ignored like any unknown field.

use serde::Serialize;
use sonic_rs::{JsonValueTrait, Value};
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;
use uuid::Uuid;

use crate::event::{
    is_valid_match_id, EventRecord, EventType, MAX_PAYLOAD_BYTES, MAX_TEAM_CHARS, MAX_USER_ID_CHARS,
};

/// One problem with one field of one event, as listed in a 400 answer.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct FieldError {
    /// Position of the event in the request (0-based; the line for NDJSON, counting only
    /// non-blank lines).
    pub index: usize,
    pub field: &'static str,
    pub reason: String,
}

/// Earliest client timestamp accepted: 2000-01-01T00:00:00Z. No fan app event predates
/// it, and every epoch-seconds value until the year 31,000 lies below it as
/// milliseconds, so a client sending seconds is told so instead of having its events
/// filed under January 1970.
pub const MIN_TS_MS: i64 = 946_684_800_000;

/// Latest client timestamp accepted: 2099-12-31T23:59:59.999Z, the end of the window the
/// sink uses as event time. Microseconds or nanoseconds sent as milliseconds land far
/// past it and are refused.
pub const MAX_TS_MS: i64 = 4_102_444_799_999;

/// Why a `ts` outside the window is refused; shared by both forms.
const TS_RANGE: &str = "must lie between 2000-01-01T00:00:00Z and 2099-12-31T23:59:59.999Z \
                        (epoch milliseconds, not seconds)";

/// Validates one decoded JSON value as an event.
///
/// `received_at_ms` is the server's clock, stamped on every event of the request.
///
/// # Errors
/// Every field problem found, in field order.
pub fn validate_event(
    index: usize,
    value: &Value,
    received_at_ms: i64,
) -> Result<EventRecord, Vec<FieldError>> {
    let mut errors = Vec::new();
    let mut fail = |field: &'static str, reason: &str| {
        errors.push(FieldError {
            index,
            field,
            reason: reason.to_string(),
        })
    };

    if !value.is_object() {
        fail("event", "must be a JSON object");
        return Err(errors);
    }

    let event_id = match value.get("event_id") {
        None => Some(Uuid::now_v7()),
        Some(v) if v.is_null() => Some(Uuid::now_v7()),
        Some(v) => match v.as_str().map(Uuid::try_parse) {
            Some(Ok(id)) if !id.is_nil() => Some(id),
            Some(Ok(_)) => {
                fail("event_id", "must not be the nil UUID");
                None
            }
            _ => {
                fail("event_id", "must be a UUID string");
                None
            }
        },
    };

    let match_id = match value.get("match_id").and_then(|v| v.as_str()) {
        Some(id) if is_valid_match_id(id) => Some(id.to_string()),
        Some(_) => {
            fail("match_id", "must be 1-64 characters of [A-Za-z0-9_.:-]");
            None
        }
        None => {
            fail("match_id", "is required and must be a string");
            None
        }
    };

    let user_id = match value.get("user_id").and_then(|v| v.as_str()) {
        Some(id) if id.chars().any(char::is_control) => {
            fail("user_id", "must not contain control characters");
            None
        }
        Some(id) if !id.is_empty() && id.chars().count() <= MAX_USER_ID_CHARS => {
            Some(id.to_string())
        }
        Some(_) => {
            fail("user_id", "must be 1-128 characters");
            None
        }
        None => {
            fail("user_id", "is required and must be a string");
            None
        }
    };

    let event_type = match value.get("type").and_then(|v| v.as_str()) {
        Some(name) => {
            let parsed = EventType::parse(name);
            if parsed.is_none() {
                fail(
                    "type",
                    "must be one of reaction, cheer, goal_celebration, poll_vote, chat, \
                     share, view",
                );
            }
            parsed
        }
        None => {
            fail("type", "is required and must be a string");
            None
        }
    };

    let ts = match value.get("ts") {
        None => Ok(None),
        Some(v) if v.is_null() => Ok(None),
        Some(v) => parse_ts(v).map(Some),
    };
    let ts = ts.unwrap_or_else(|reason| {
        fail("ts", reason);
        None
    });

    let team = match value.get("team") {
        None => None,
        Some(v) if v.is_null() => None,
        Some(v) => match v.as_str() {
            Some(t) if t.chars().any(char::is_control) => {
                fail("team", "must not contain control characters");
                None
            }
            Some(t) if !t.is_empty() && t.chars().count() <= MAX_TEAM_CHARS => Some(t.to_string()),
            _ => {
                fail("team", "must be a string of 1-64 characters");
                None
            }
        },
    };

    let payload = match value.get("payload") {
        None => None,
        Some(v) if v.is_null() => None,
        Some(v) if v.is_object() => match sonic_rs::to_string(v) {
            Ok(text) if text.len() <= MAX_PAYLOAD_BYTES => Some(text),
            Ok(_) => {
                fail("payload", "must be at most 4096 bytes when serialized");
                None
            }
            Err(_) => {
                fail("payload", "cannot be serialized");
                None
            }
        },
        Some(_) => {
            fail("payload", "must be a JSON object");
            None
        }
    };

    match (event_id, match_id, user_id, event_type) {
        (Some(event_id), Some(match_id), Some(user_id), Some(event_type)) if errors.is_empty() => {
            Ok(EventRecord {
                event_id,
                match_id,
                user_id,
                event_type,
                ts,
                team,
                payload,
                received_at: received_at_ms,
            })
        }
        _ => Err(errors),
    }
}

/// Reads `ts` as epoch milliseconds (an integer) or an RFC 3339 string with a zone (`Z`
/// or an offset), normalized to UTC epoch milliseconds; fractions of a millisecond are
/// dropped. Either form must lie in [`MIN_TS_MS`]..=[`MAX_TS_MS`]. Refused, never
/// guessed or clamped: a time without a zone (whose zone would be a guess), fractional
/// epoch numbers, numeric strings, impossible dates (month 13), the empty string. A
/// refused `ts` fails its event like any other field; `null` means absent.
fn parse_ts(value: &Value) -> Result<i64, &'static str> {
    if let Some(text) = value.as_str() {
        let parsed = OffsetDateTime::parse(text, &Rfc3339).map_err(|_| {
            "must be an RFC 3339 timestamp with a zone (Z or +hh:mm), or epoch milliseconds"
        })?;
        let ms = parsed.unix_timestamp_nanos().div_euclid(1_000_000);
        return i64::try_from(ms)
            .ok()
            .filter(|ms| (MIN_TS_MS..=MAX_TS_MS).contains(ms))
            .ok_or(TS_RANGE);
    }
    if value.is_number() {
        return match value.as_i64() {
            Some(ms) if (MIN_TS_MS..=MAX_TS_MS).contains(&ms) => Ok(ms),
            Some(_) => Err(TS_RANGE),
            None if value.is_f64() => Err("epoch milliseconds must be an integer"),
            None => Err(TS_RANGE),
        };
    }
    Err("must be an RFC 3339 string or epoch milliseconds")
}

#[cfg(test)]
mod tests {
    use super::*;

    const NOW: i64 = 1_700_000_000_000;

    fn check(json: &str) -> Result<EventRecord, Vec<FieldError>> {
        let value: Value = sonic_rs::from_str(json).expect("test json parses");
        validate_event(0, &value, NOW)
    }

    fn fields(errors: Vec<FieldError>) -> Vec<&'static str> {
        errors.into_iter().map(|e| e.field).collect()
    }

    #[test]
    fn accepts_minimal_event_and_assigns_uuid_v7() {
        let record = check(r#"{"match_id":"m1","user_id":"u1","type":"cheer"}"#).expect("valid");
        assert_eq!(record.event_id.get_version_num(), 7);
        assert_eq!(record.received_at, NOW);
        assert_eq!(record.ts, None);
    }

    #[test]
    fn keeps_client_event_id() {
        let record = check(
            r#"{"event_id":"0b5e2d4c-6f7a-4b8c-9d0e-1f2a3b4c5d6e","match_id":"m1",
                "user_id":"u1","type":"view"}"#,
        )
        .expect("valid");
        assert_eq!(
            record.event_id.to_string(),
            "0b5e2d4c-6f7a-4b8c-9d0e-1f2a3b4c5d6e"
        );
    }

    #[test]
    fn rejects_event_without_match_id() {
        let errors = check(r#"{"user_id":"u1","type":"cheer"}"#).unwrap_err();
        assert_eq!(fields(errors), vec!["match_id"]);
    }

    #[test]
    fn lists_every_bad_field() {
        let errors = check(
            r#"{"event_id":"nope","match_id":"a b","user_id":"","type":"boo",
                "ts":"yesterday","team":5,"payload":[1]}"#,
        )
        .unwrap_err();
        assert_eq!(
            fields(errors),
            vec!["event_id", "match_id", "user_id", "type", "ts", "team", "payload"]
        );
    }

    #[test]
    fn normalizes_rfc3339_with_offset_to_utc_ms() {
        let record = check(
            r#"{"match_id":"m","user_id":"u","type":"cheer","ts":"2022-12-18T18:23:00+03:00"}"#,
        )
        .expect("valid");
        assert_eq!(record.ts, Some(1_671_377_000_000 - 20_000));
    }

    #[test]
    fn accepts_epoch_ms_and_refuses_fractions() {
        let ok = check(r#"{"match_id":"m","user_id":"u","type":"cheer","ts":1671376980000}"#);
        assert_eq!(ok.expect("valid").ts, Some(1_671_376_980_000));
        let err = check(r#"{"match_id":"m","user_id":"u","type":"cheer","ts":1.5}"#);
        assert_eq!(fields(err.unwrap_err()), vec!["ts"]);
    }

    #[test]
    fn refuses_payload_over_4_kib() {
        let big = "x".repeat(MAX_PAYLOAD_BYTES);
        let json = format!(
            r#"{{"match_id":"m","user_id":"u","type":"chat","payload":{{"text":"{big}"}}}}"#
        );
        assert_eq!(fields(check(&json).unwrap_err()), vec!["payload"]);
    }

    #[test]
    fn keeps_payload_as_compact_json() {
        let record = check(
            r#"{"match_id":"m","user_id":"u","type":"reaction","payload": { "emoji" : "🔥" }}"#,
        )
        .expect("valid");
        assert_eq!(record.payload.as_deref(), Some(r#"{"emoji":"🔥"}"#));
    }

    #[test]
    fn refuses_non_object_event() {
        assert_eq!(fields(check("42").unwrap_err()), vec!["event"]);
    }

    fn ts(raw: &str) -> Result<Option<i64>, Vec<&'static str>> {
        check(&format!(
            r#"{{"match_id":"m","user_id":"u","type":"cheer","ts":{raw}}}"#
        ))
        .map(|r| r.ts)
        .map_err(fields)
    }

    #[test]
    fn normalizes_every_zoned_form_to_utc_ms() {
        let at = Some(1_671_377_000_000);
        assert_eq!(ts(r#""2022-12-18T15:23:20Z""#), Ok(at));
        assert_eq!(ts(r#""2022-12-18t15:23:20z""#), Ok(at));
        // RFC 3339 (5.6, note) lets applications use a space for the `T`.
        assert_eq!(ts(r#""2022-12-18 15:23:20Z""#), Ok(at));
        assert_eq!(ts(r#""2022-12-18T10:53:20-04:30""#), Ok(at));
        assert_eq!(
            ts(r#""2022-12-18T15:23:20.999999999Z""#),
            Ok(Some(1_671_377_000_999))
        );
        assert_eq!(
            ts(r#""2022-12-18T15:23:20.5+00:00""#),
            Ok(Some(1_671_377_000_500))
        );
        assert_eq!(ts("1671377000000"), Ok(at));
        assert_eq!(ts("null"), Ok(None));
    }

    #[test]
    fn refuses_times_it_would_have_to_guess() {
        for raw in [
            r#""2022-12-18T15:23:20""#,
            r#""2022-13-01T00:00:00Z""#,
            r#""2022-02-30T00:00:00Z""#,
            r#""""#,
            r#""1671377000000""#,
            "1671377000",
            "1671377000000.5",
            "1671377000000000",
            r#""1999-12-31T23:59:59.999Z""#,
            r#""2100-01-01T00:00:00Z""#,
            r#""9999-12-31T23:59:59Z""#,
            "0",
            "-1",
            "true",
            "{}",
        ] {
            assert_eq!(ts(raw), Err(vec!["ts"]), "{raw} was accepted");
        }
        assert_eq!(ts("946684800000"), Ok(Some(MIN_TS_MS)));
        assert_eq!(ts(r#""2099-12-31T23:59:59.999Z""#), Ok(Some(MAX_TS_MS)));
    }

    #[test]
    fn refuses_control_characters_in_ids_and_keeps_them_escaped_in_payload() {
        let errors =
            check(r#"{"match_id":"m","user_id":"fan\u0000","type":"cheer","team":"A\u0085"}"#)
                .unwrap_err();
        assert_eq!(fields(errors), vec!["user_id", "team"]);
        let record = check(
            r#"{"match_id":"m","user_id":"fan \ud83d\ude00","type":"chat",
                "payload":{"text":"a\u0000b"}}"#,
        )
        .expect("valid");
        assert_eq!(record.user_id, "fan \u{1F600}");
        assert_eq!(record.payload.as_deref(), Some(r#"{"text":"a\u0000b"}"#));
    }

    #[test]
    fn ignores_a_client_received_at() {
        let record = check(r#"{"match_id":"m","user_id":"u","type":"cheer","received_at":5}"#)
            .expect("valid");
        assert_eq!(record.received_at, NOW);
    }
}
