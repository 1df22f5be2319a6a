//! The event as it travels through Kafka: one JSON record per accepted event.
//!
//! Ingest writes [`EventRecord`] after validation; the sink reads it back with
//! [`EventRecord::decode`]. Other producers may write to the topic too, so decoding
//! checks everything again instead of trusting the bytes. Validation of what clients
//! send lives in `ingest::validate`; this module only owns the shared record shape.

use serde::{Deserialize, Serialize};
use uuid::Uuid;

/// What a fan did. The wire names are the `type` values clients send; the numbers are
/// the ClickHouse `Enum8` values and must never be reused for another meaning.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
#[repr(i8)]
pub enum EventType {
    Reaction = 1,
    Cheer = 2,
    GoalCelebration = 3,
    PollVote = 4,
    Chat = 5,
    Share = 6,
    View = 7,
}

impl EventType {
    /// Every type, in Enum8 order.
    pub const ALL: [EventType; 7] = [
        EventType::Reaction,
        EventType::Cheer,
        EventType::GoalCelebration,
        EventType::PollVote,
        EventType::Chat,
        EventType::Share,
        EventType::View,
    ];

    /// The name clients send and queries return.
    pub fn as_str(self) -> &'static str {
        match self {
            EventType::Reaction => "reaction",
            EventType::Cheer => "cheer",
            EventType::GoalCelebration => "goal_celebration",
            EventType::PollVote => "poll_vote",
            EventType::Chat => "chat",
            EventType::Share => "share",
            EventType::View => "view",
        }
    }

    /// Parses a client-sent name; `None` for anything else.
    pub fn parse(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|t| t.as_str() == name)
    }
}

/// Longest `match_id`, in bytes (all allowed characters are ASCII).
pub const MAX_MATCH_ID_LEN: usize = 64;
/// Longest `user_id`, in characters.
pub const MAX_USER_ID_CHARS: usize = 128;
/// Longest `team`, in characters.
pub const MAX_TEAM_CHARS: usize = 64;
/// Largest serialized `payload`, in bytes.
pub const MAX_PAYLOAD_BYTES: usize = 4096;

/// Whether `id` is a valid match id: 1-64 characters of `[A-Za-z0-9_.:-]`. The match id
/// is the Kafka key and the ClickHouse sort key, and appears in URLs, so it is kept to a
/// character set that needs no escaping anywhere.
pub fn is_valid_match_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= MAX_MATCH_ID_LEN
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b':' | b'-'))
}

/// One accepted event, as written to `fanfinity.events` (JSON, keyed by `match_id`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EventRecord {
    pub event_id: Uuid,
    pub match_id: String,
    pub user_id: String,
    #[serde(rename = "type")]
    pub event_type: EventType,
    /// Client time in epoch milliseconds, UTC, when the client sent one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ts: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub team: Option<String>,
    /// The client's payload object as compact JSON text, kept verbatim.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub payload: Option<String>,
    /// Server time in epoch milliseconds when ingest accepted the event.
    pub received_at: i64,
}

/// Why a record read from Kafka is not a valid event.
#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    #[error("record is not a valid event: {0}")]
    Malformed(#[from] sonic_rs::Error),
    #[error("record field {field} is invalid")]
    Invalid { field: &'static str },
}

impl EventRecord {
    /// Serializes the record for Kafka.
    ///
    /// # Errors
    /// Only if serialization itself fails, which the field types rule out in practice.
    pub fn encode(&self) -> Result<Vec<u8>, sonic_rs::Error> {
        sonic_rs::to_vec(self)
    }

    /// Reads a record from Kafka and checks the fields ingest guarantees, because the
    /// topic may also be written by other producers.
    ///
    /// # Errors
    /// Bytes that are not a record, or a record whose fields break the ingest rules.
    pub fn decode(bytes: &[u8]) -> Result<Self, RecordError> {
        let record: EventRecord = sonic_rs::from_slice(bytes)?;
        if !is_valid_match_id(&record.match_id) {
            return Err(RecordError::Invalid { field: "match_id" });
        }
        let user_chars = record.user_id.chars().count();
        if user_chars == 0 || user_chars > MAX_USER_ID_CHARS {
            return Err(RecordError::Invalid { field: "user_id" });
        }
        if record
            .team
            .as_ref()
            .is_some_and(|t| t.chars().count() > MAX_TEAM_CHARS)
        {
            return Err(RecordError::Invalid { field: "team" });
        }
        if record
            .payload
            .as_ref()
            .is_some_and(|p| p.len() > MAX_PAYLOAD_BYTES)
        {
            return Err(RecordError::Invalid { field: "payload" });
        }
        if record.received_at <= 0 {
            return Err(RecordError::Invalid {
                field: "received_at",
            });
        }
        Ok(record)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> EventRecord {
        EventRecord {
            event_id: Uuid::now_v7(),
            match_id: "wc2022-final".into(),
            user_id: "fan-1".into(),
            event_type: EventType::GoalCelebration,
            ts: Some(1_671_375_780_000),
            team: Some("ARG".into()),
            payload: Some(r#"{"emoji":"⚽"}"#.into()),
            received_at: 1_671_375_781_000,
        }
    }

    #[test]
    fn record_round_trips_through_json() {
        let record = sample();
        let bytes = record.encode().expect("encode");
        assert_eq!(EventRecord::decode(&bytes).expect("decode"), record);
    }

    #[test]
    fn type_names_round_trip() {
        for t in EventType::ALL {
            assert_eq!(EventType::parse(t.as_str()), Some(t));
        }
        assert_eq!(EventType::parse("Cheer"), None);
    }

    #[test]
    fn decode_refuses_bad_match_id_from_foreign_producer() {
        let mut record = sample();
        record.match_id = "bad id with spaces".into();
        let bytes = record.encode().expect("encode");
        assert!(matches!(
            EventRecord::decode(&bytes),
            Err(RecordError::Invalid { field: "match_id" })
        ));
    }

    #[test]
    fn decode_refuses_non_json() {
        assert!(EventRecord::decode(b"\x00\x01not json").is_err());
    }

    #[test]
    fn match_id_charset() {
        assert!(is_valid_match_id("wc2022:final_arg-fra.1"));
        assert!(!is_valid_match_id(""));
        assert!(!is_valid_match_id("a/b"));
        assert!(!is_valid_match_id(&"x".repeat(65)));
    }
}
