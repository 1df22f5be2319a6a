//! Turns a request body into validated events: one JSON object, a JSON array of objects,
//! or NDJSON (one object per line).
//!
//! Parsing is sonic-rs's; this module decides the body's shape, enforces the per-request
//! event limit and gathers the field errors of every event into one answer.

use sonic_rs::{JsonContainerTrait, JsonValueTrait, Value};

use super::error::IngestError;
use super::validate::{validate_event, FieldError};
use crate::event::EventRecord;

/// How the body is framed, from its `Content-Type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyFormat {
    /// `application/json`: one object or an array of objects.
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
        if media.eq_ignore_ascii_case("application/json") {
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

fn parse_json(body: &[u8]) -> Result<Vec<Value>, IngestError> {
    let value: Value = sonic_rs::from_slice(body).map_err(|err| IngestError::MalformedJson {
        detail: err.to_string(),
    })?;
    if let Some(array) = value.as_array() {
        Ok(array.iter().cloned().collect())
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
        assert!(BodyFormat::from_content_type(Some("text/xml")).is_err());
        assert!(BodyFormat::from_content_type(None).is_err());
    }
}
