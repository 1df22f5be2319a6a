//! The ClickHouse row of one event, built from its Kafka record.

use clickhouse::Row;
use serde::Serialize;
use uuid::Uuid;

use crate::event::EventRecord;

/// Where a record came from in Kafka, stored with the row so an operator can trace a
/// row back to its message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KafkaPosition {
    pub partition: i32,
    pub offset: i64,
}

/// One row of `events`. Field names are the column names; order matches the insert.
#[derive(Debug, Clone, Row, Serialize, PartialEq)]
pub struct EventRow {
    #[serde(with = "clickhouse::serde::uuid")]
    pub event_id: Uuid,
    pub match_id: String,
    pub user_id: String,
    /// `Enum8` value; see [`crate::event::EventType`].
    pub event_type: i8,
    /// Empty when the client sent no team.
    pub team: String,
    pub client_ts_ms: Option<i64>,
    /// `DateTime` (seconds): the client's time when it fits the column, else the
    /// server's. Timelines are drawn on it.
    pub event_time: u32,
    /// `DateTime` (seconds) of `received_at_ms`; the partition key.
    pub received_at: u32,
    pub received_at_ms: i64,
    /// The payload object as JSON text; empty when absent.
    pub payload: String,
    pub kafka_partition: i32,
    pub kafka_offset: i64,
}

impl EventRow {
    /// Builds the row. `event_time` falls back to the server's time when the client's
    /// lies outside 1970-2099: a `DateTime` column ends in 2106, and ClickHouse 18.16
    /// misreads values near that end.
    pub fn from_record(record: EventRecord, position: KafkaPosition) -> Self {
        let received_secs = seconds(record.received_at).unwrap_or(0);
        let event_time = record.ts.and_then(seconds).unwrap_or(received_secs);
        Self {
            event_id: record.event_id,
            match_id: record.match_id,
            user_id: record.user_id,
            event_type: record.event_type as i8,
            team: record.team.unwrap_or_default(),
            client_ts_ms: record.ts,
            event_time,
            received_at: received_secs,
            received_at_ms: record.received_at,
            payload: record.payload.unwrap_or_default(),
            kafka_partition: position.partition,
            kafka_offset: position.offset,
        }
    }
}

/// 2100-01-01T00:00:00Z: the first second `event_time` does not take from a client.
const EVENT_TIME_END_SECS: u32 = 4_102_444_800;

fn seconds(ms: i64) -> Option<u32> {
    u32::try_from(ms.div_euclid(1000))
        .ok()
        .filter(|s| *s < EVENT_TIME_END_SECS)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::event::EventType;

    fn record(ts: Option<i64>) -> EventRecord {
        EventRecord {
            event_id: Uuid::now_v7(),
            match_id: "m".into(),
            user_id: "u".into(),
            event_type: EventType::PollVote,
            ts,
            team: None,
            payload: None,
            received_at: 1_700_000_000_123,
        }
    }

    #[test]
    fn event_time_is_client_time_when_it_fits() {
        let pos = KafkaPosition {
            partition: 2,
            offset: 9,
        };
        let row = EventRow::from_record(record(Some(1_671_376_980_999)), pos);
        assert_eq!(row.event_time, 1_671_376_980);
        assert_eq!(row.received_at, 1_700_000_000);
        assert_eq!(row.event_type, 4);
        assert_eq!((row.kafka_partition, row.kafka_offset), (2, 9));
    }

    #[test]
    fn event_time_falls_back_to_server_time() {
        let pos = KafkaPosition {
            partition: 0,
            offset: 0,
        };
        let far = EventRow::from_record(record(Some(253_402_300_799_999)), pos);
        assert_eq!(far.event_time, 1_700_000_000);
        let end_of_datetime = EventRow::from_record(record(Some(4_294_967_295_000)), pos);
        assert_eq!(end_of_datetime.event_time, 1_700_000_000);
        let none = EventRow::from_record(record(None), pos);
        assert_eq!(none.event_time, 1_700_000_000);
    }
}
