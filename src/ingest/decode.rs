//! Turns a request body into validated events: one JSON object, a JSON array of objects,
//! or NDJSON (one object per line).
//!
//! Parsing is sonic-rs's; this module decides the body's shape, bounds its nesting,
//! enforces the per-request event limit, gathers the field errors of every event into one
//! answer, and checks that each accepted event fits in one Kafka record.
//!
//! What sonic-rs refuses on its own, each as 400 `malformed_json` (tested below): invalid
//! UTF-8, lone UTF-16 surrogate escapes (`"\ud800"`), `NaN`, `Infinity`, leading zeros,
//! trailing commas, and anything after the value. So every string that reaches
//! validation is valid UTF-8.

use sonic_rs::{JsonValueTrait, Value};

use super::error::IngestError;
use super::validate::{validate_event, FieldError};
use crate::event::EventRecord;
use crate::kafka::producer::OutgoingRecord;

/// How the body is framed, from its `Content-Type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyFormat {
    /// `application/json`, or `text/plain` (what `navigator.sendBeacon` sends for a
    /// string, and a type browsers post cross-origin without a preflight): one object or
    /// an array of objects.
    Json,
    /// `application/x-ndjson` (or `application/ndjson`): one object per line; blank lines
    /// are skipped.
    Ndjson,
}

impl BodyFormat {
    /// Reads the media type, ignoring parameters such as `charset=utf-8`.
    ///
    /// # Errors
    /// [`IngestError::UnsupportedMediaType`] for anything else, including no header.
    pub fn from_content_type(header: Option<&str>) -> Result<Self, IngestError> {
        let raw = header.unwrap_or("");
        let media = raw.split(';').next().unwrap_or("").trim();
        if media.eq_ignore_ascii_case("application/json")
            || media.eq_ignore_ascii_case("text/plain")
        {
            Ok(BodyFormat::Json)
        } else if media.eq_ignore_ascii_case("application/x-ndjson")
            || media.eq_ignore_ascii_case("application/ndjson")
        {
            Ok(BodyFormat::Ndjson)
        } else {
            Err(IngestError::UnsupportedMediaType {
                content_type: raw.to_string(),
            })
        }
    }
}

/// Parses and validates a whole body. All-or-nothing: any invalid event fails the
/// request, listing every problem found.
///
/// # Errors
/// [`IngestError::EmptyBody`], [`IngestError::MalformedJson`], [`IngestError::NoEvents`],
/// [`IngestError::TooManyEvents`] or [`IngestError::InvalidEvents`].
pub fn decode_events(
    body: &[u8],
    format: BodyFormat,
    max_events: usize,
    received_at_ms: i64,
) -> Result<Vec<EventRecord>, IngestError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Err(IngestError::EmptyBody);
    }
    if body.starts_with(&GZIP_MAGIC) {
        return Err(IngestError::MalformedJson {
            detail: "the body is gzip data; send it with Content-Encoding: gzip".into(),
        });
    }
    check_nesting(body)?;
    let values = match format {
        BodyFormat::Json => parse_json(body)?,
        BodyFormat::Ndjson => parse_ndjson(body, max_events)?,
    };
    if values.is_empty() {
        return Err(IngestError::NoEvents);
    }
    if values.len() > max_events {
        return Err(IngestError::TooManyEvents {
            count: values.len(),
            limit: max_events,
        });
    }

    let total = values.len();
    let mut records = Vec::with_capacity(total);
    let mut errors: Vec<FieldError> = Vec::new();
    let mut invalid = 0;
    for (index, value) in values.iter().enumerate() {
        match validate_event(index, value, received_at_ms) {
            Ok(record) => records.push(record),
            Err(mut found) => {
                invalid += 1;
                errors.append(&mut found);
            }
        }
    }
    if invalid > 0 {
        return Err(IngestError::InvalidEvents {
            invalid,
            total,
            errors,
        });
    }
    Ok(records)
}

/// The first two bytes of every gzip member (RFC 1952).
const GZIP_MAGIC: [u8; 2] = [0x1f, 0x8b];

/// Deepest nesting of arrays and objects accepted, counting the outer array of a batch.
/// An event needs 3 (batch, event, payload), leaving 13 levels inside `payload`.
/// sonic-rs itself stops at 254 levels, but its DOM parser recurses once per level and
/// shards run on ordinary thread stacks; this bound keeps that recursion small in any
/// build, and answers a body of 100,000 `[` after one linear pass.
pub const MAX_NESTING_DEPTH: usize = 16;

/// Refuses a body nested deeper than [`MAX_NESTING_DEPTH`] before it is parsed.
///
/// Brackets inside strings do not count. A raw newline ends any string (JSON forbids one
/// inside a string), so each NDJSON line is counted on its own, and a malformed line
/// cannot hide the depth of the next one; it is refused by the parser anyway.
fn check_nesting(body: &[u8]) -> Result<(), IngestError> {
    let mut depth = 0usize;
    let mut in_string = false;
    let mut escaped = false;
    for &byte in body {
        if in_string {
            match byte {
                _ if escaped => escaped = false,
                b'\\' => escaped = true,
                b'"' | b'\n' => in_string = false,
                _ => {}
            }
            continue;
        }
        match byte {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                if depth > MAX_NESTING_DEPTH {
                    return Err(IngestError::MalformedJson {
                        detail: format!("nested deeper than {MAX_NESTING_DEPTH} levels"),
                    });
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    Ok(())
}

/// librdkafka's worst-case per-record overhead in a v2 record batch
/// (`RD_KAFKAP_MESSAGE_V2_MAX_OVERHEAD`: length, attributes, timestamp and offset deltas,
/// key and value lengths, header count). librdkafka adds it to key and value before
/// comparing with `message.max.bytes`, so this check matches its own.
pub const KAFKA_RECORD_OVERHEAD_BYTES: usize = 36;

/// Refuses an event whose Kafka record would be refused by the producer, so the client
/// hears 413 naming the event instead of a 503 it would retry forever.
///
/// # Errors
/// [`IngestError::EventTooLarge`] with the event's index and record size.
pub fn check_record_size(
    index: usize,
    key: &str,
    payload: &[u8],
    max_message_bytes: usize,
) -> Result<(), IngestError> {
    let record_bytes = KAFKA_RECORD_OVERHEAD_BYTES + key.len() + payload.len();
    if record_bytes > max_message_bytes {
        return Err(IngestError::EventTooLarge {
            index,
            record_bytes,
            limit_bytes: max_message_bytes,
        });
    }
    Ok(())
}

/// A request's Kafka records, in order: each event encoded once, keyed by its match id
/// (so a match's events stay in one partition, in order), and refused with 413 when
/// Kafka would refuse it (see [`check_record_size`]). The handler's step between
/// decoding and producing; public so `benches/kafka_record.rs` times this very code.
///
/// # Errors
/// [`IngestError::EventTooLarge`] for the first event over the limit, and
/// [`IngestError::MalformedJson`] if an event cannot be encoded (not expected: it was
/// decoded from JSON).
pub fn outgoing_records(
    records: &[EventRecord],
    max_message_bytes: usize,
) -> Result<Vec<OutgoingRecord>, IngestError> {
    let mut outgoing = Vec::with_capacity(records.len());
    for (index, record) in records.iter().enumerate() {
        let payload = record.encode().map_err(|err| IngestError::MalformedJson {
            detail: format!("cannot encode event: {err}"),
        })?;
        check_record_size(index, &record.match_id, &payload, max_message_bytes)?;
        outgoing.push(OutgoingRecord {
            key: record.match_id.clone(),
            payload,
        });
    }
    Ok(outgoing)
}

fn parse_json(body: &[u8]) -> Result<Vec<Value>, IngestError> {
    let value: Value = sonic_rs::from_slice(body).map_err(|err| IngestError::MalformedJson {
        detail: err.to_string(),
    })?;
    if value.is_array() {
        // Taken, not cloned: a 100-event array is most of what a shard parses.
        Ok(value
            .into_array()
            .map(|a| a.into_iter().collect())
            .unwrap_or_default())
    } else if value.is_object() {
        Ok(vec![value])
    } else {
        Err(IngestError::MalformedJson {
            detail: "body must be a JSON object or an array of objects".into(),
        })
    }
}

fn parse_ndjson(body: &[u8], max_events: usize) -> Result<Vec<Value>, IngestError> {
    let mut values = Vec::new();
    for (line_no, line) in body.split(|b| *b == b'\n').enumerate() {
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        // Stop parsing once the limit is passed; the count is all the answer needs.
        if values.len() == max_events {
            return Err(IngestError::TooManyEvents {
                count: max_events + 1,
                limit: max_events,
            });
        }
        let value: Value =
            sonic_rs::from_slice(line).map_err(|err| IngestError::MalformedJson {
                detail: format!("line {}: {err}", line_no + 1),
            })?;
        values.push(value);
    }
    Ok(values)
}

#[cfg(test)]
mod tests {
    use super::*;

    const EVENT: &str = r#"{"match_id":"m1","user_id":"u1","type":"cheer"}"#;

    fn decode(body: &str, format: BodyFormat) -> Result<Vec<EventRecord>, IngestError> {
        decode_events(body.as_bytes(), format, 10, 1)
    }

    #[test]
    fn reads_single_object_array_and_ndjson() {
        assert_eq!(decode(EVENT, BodyFormat::Json).expect("object").len(), 1);
        let array = format!("[{EVENT},{EVENT}]");
        assert_eq!(decode(&array, BodyFormat::Json).expect("array").len(), 2);
        let ndjson = format!("{EVENT}\n\n{EVENT}\r\n{EVENT}\n");
        assert_eq!(
            decode(&ndjson, BodyFormat::Ndjson).expect("ndjson").len(),
            3
        );
    }

    #[test]
    fn one_bad_event_fails_the_whole_batch() {
        let body = format!(r#"[{EVENT},{{"user_id":"u"}},{EVENT}]"#);
        match decode(&body, BodyFormat::Json) {
            Err(IngestError::InvalidEvents {
                invalid,
                total,
                errors,
            }) => {
                assert_eq!((invalid, total), (1, 3));
                assert!(errors.iter().all(|e| e.index == 1));
                let fields: Vec<_> = errors.iter().map(|e| e.field).collect();
                assert_eq!(fields, vec!["match_id", "type"]);
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn malformed_json_and_empty_bodies() {
        assert!(matches!(
            decode("{", BodyFormat::Json),
            Err(IngestError::MalformedJson { .. })
        ));
        assert!(matches!(
            decode("  \n", BodyFormat::Json),
            Err(IngestError::EmptyBody)
        ));
        assert!(matches!(
            decode("[]", BodyFormat::Json),
            Err(IngestError::NoEvents)
        ));
        assert!(matches!(
            decode("\"x\"", BodyFormat::Json),
            Err(IngestError::MalformedJson { .. })
        ));
        let err = decode(&format!("{EVENT}\n{{oops\n"), BodyFormat::Ndjson).unwrap_err();
        assert!(err.to_string().contains("line 2"), "{err}");
    }

    #[test]
    fn refuses_more_events_than_the_limit() {
        let array = format!("[{}]", [EVENT; 11].join(","));
        assert!(matches!(
            decode(&array, BodyFormat::Json),
            Err(IngestError::TooManyEvents {
                count: 11,
                limit: 10
            })
        ));
        let ndjson = [EVENT; 11].join("\n");
        assert!(matches!(
            decode(&ndjson, BodyFormat::Ndjson),
            Err(IngestError::TooManyEvents { .. })
        ));
    }

    #[test]
    fn content_type_parameters_are_ignored() {
        assert_eq!(
            BodyFormat::from_content_type(Some("application/json; charset=utf-8")).expect("json"),
            BodyFormat::Json
        );
        assert_eq!(
            BodyFormat::from_content_type(Some("text/plain;charset=UTF-8")).expect("beacon"),
            BodyFormat::Json
        );
        assert_eq!(
            BodyFormat::from_content_type(Some("application/ndjson")).expect("ndjson"),
            BodyFormat::Ndjson
        );
        assert!(BodyFormat::from_content_type(Some("text/xml")).is_err());
        assert!(BodyFormat::from_content_type(None).is_err());
    }

    fn malformed(body: &[u8], format: BodyFormat) -> String {
        match decode_events(body, format, 10, 1) {
            Err(IngestError::MalformedJson { detail }) => detail,
            other => panic!("{:?} gave {other:?}", String::from_utf8_lossy(body)),
        }
    }

    #[test]
    fn refuses_what_json_does_not_allow() {
        let with = |field: &str| {
            format!(
                r#"{{"match_id":"m1","user_id":"u1","type":"cheer","payload":{{"x":{field}}}}}"#
            )
        };
        for bad in [
            with(r#""\ud800""#),
            with(r#""\udc00\ud800""#),
            with("NaN"),
            with("Infinity"),
            with("-Infinity"),
            with("01"),
            with("[1,2,]"),
            format!("[{EVENT},]"),
            format!("{EVENT} trailing"),
        ] {
            malformed(bad.as_bytes(), BodyFormat::Json);
        }
        let mut invalid_utf8 = with(r#""x""#).into_bytes();
        let quote = invalid_utf8.len() - 4;
        invalid_utf8.insert(quote, 0xff);
        malformed(&invalid_utf8, BodyFormat::Json);
        malformed(&invalid_utf8, BodyFormat::Ndjson);
    }

    #[test]
    fn refuses_deep_nesting_before_parsing() {
        let deep = "[".repeat(100_000);
        assert!(malformed(deep.as_bytes(), BodyFormat::Json).contains("nested deeper"));
        let closed = format!("{}{}", "[".repeat(17), "]".repeat(17));
        assert!(malformed(closed.as_bytes(), BodyFormat::Ndjson).contains("nested deeper"));
        // Brackets in strings, escaped quotes included, do not count.
        let quoted = "[".repeat(40);
        let event = format!(
            r#"{{"match_id":"m1","user_id":"u\"{quoted}","type":"cheer","payload":{{"a":{{"b":[[1]]}}}}}}"#
        );
        assert_eq!(
            decode(&event, BodyFormat::Json)
                .expect("brackets in a string")
                .len(),
            1
        );
        let sixteen = format!(
            r#"[{{"match_id":"m1","user_id":"u","type":"cheer","payload":{{"a":{}1{}}}}}]"#,
            "[".repeat(13),
            "]".repeat(13)
        );
        assert_eq!(
            decode(&sixteen, BodyFormat::Json).expect("16 levels").len(),
            1
        );
    }

    #[test]
    fn names_gzip_sent_without_its_header() {
        let detail = malformed(&[0x1f, 0x8b, 8, 0, 0, 0, 0, 0, 0, 3], BodyFormat::Json);
        assert!(detail.contains("Content-Encoding"), "{detail}");
    }

    #[test]
    fn refuses_a_record_over_the_kafka_limit() {
        assert!(check_record_size(0, "m1", &[b'x'; 962], 1000).is_ok());
        match check_record_size(3, "m1", &[b'x'; 963], 1000) {
            Err(IngestError::EventTooLarge {
                index: 3,
                record_bytes: 1001,
                limit_bytes: 1000,
            }) => {}
            other => panic!("{other:?}"),
        }
    }
}
