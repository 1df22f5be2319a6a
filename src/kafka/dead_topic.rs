//! Reading the dead-letter topic back: `fanfinity dead list` shows what could not be
//! stored and why; `fanfinity dead replay` sends it (or a filtered part) back to the
//! events topic once the cause is fixed.
//!
//! Both read every partition from the beginning up to the end offsets seen at start, with
//! no consumer group, so they never disturb the sink and always see the whole topic.
//! Replay does not delete anything from the dead topic (Kafka cannot); a replayed event
//! that is stored counts once even if it is replayed again, because counting is by
//! `event_id`.

use std::time::Duration;

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::{Headers, Message};
use rdkafka::{ClientConfig, Offset, TopicPartitionList};
use serde::Serialize;

use super::dead_letter::SideTopicWriter;
use crate::app::config::KafkaConfig;

/// Why reading or replaying the dead topic failed.
#[derive(Debug, thiserror::Error)]
pub enum DeadTopicError {
    #[error("cannot read {topic}")]
    Read {
        topic: String,
        #[source]
        source: KafkaError,
    },
    #[error("cannot replay to {topic}: {detail}")]
    Replay { topic: String, detail: String },
}

/// One dead letter as `dead list` prints it (one JSON object per line).
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct DeadEntry {
    pub partition: i32,
    pub offset: i64,
    pub key: Option<String>,
    pub reason: Option<String>,
    pub source_topic: Option<String>,
    pub source_partition: Option<String>,
    pub source_offset: Option<String>,
    pub failed_at_ms: Option<String>,
    /// Inserts ClickHouse refused before the row was given up (absent for records that
    /// are not events).
    pub attempts: Option<String>,
    /// ClickHouse's reason on the first of those attempts.
    pub first_error: Option<String>,
    /// The original record, as text (lossy for bytes that are not UTF-8).
    pub payload: String,
    #[serde(skip)]
    pub raw_key: Option<Vec<u8>>,
    #[serde(skip)]
    pub raw_payload: Vec<u8>,
}

/// Which dead letters to act on.
#[derive(Debug, Default, Clone)]
pub struct DeadFilter {
    /// Only letters whose reason contains this text.
    pub reason_contains: Option<String>,
    /// Only letters with this key (the match id).
    pub key: Option<String>,
}

impl DeadFilter {
    fn matches(&self, entry: &DeadEntry) -> bool {
        let reason_ok = self.reason_contains.as_ref().is_none_or(|want| {
            entry
                .reason
                .as_deref()
                .is_some_and(|r| r.contains(want.as_str()))
        });
        let key_ok = self
            .key
            .as_ref()
            .is_none_or(|want| entry.key.as_deref() == Some(want));
        reason_ok && key_ok
    }
}

/// Reads every dead letter present when called that passes `filter`.
///
/// # Errors
/// The topic's metadata or offsets cannot be read.
pub fn read_dead(
    config: &KafkaConfig,
    filter: &DeadFilter,
) -> Result<Vec<DeadEntry>, DeadTopicError> {
    let topic = config.dead_topic.clone();
    let failed = |source| DeadTopicError::Read {
        topic: topic.clone(),
        source,
    };
    let timeout = Duration::from_millis(config.admin_timeout_ms);
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &config.brokers)
        .set("group.id", format!("{}-dead-reader", config.client_id))
        .set("enable.auto.commit", "false")
        .create()
        .map_err(failed)?;
    let metadata = consumer
        .fetch_metadata(Some(&topic), timeout)
        .map_err(failed)?;
    let partitions: Vec<i32> = metadata
        .topics()
        .iter()
        .filter(|t| t.name() == topic)
        .flat_map(|t| t.partitions().iter().map(|p| p.id()))
        .collect();

    let mut ends = Vec::new();
    let mut assignment = TopicPartitionList::new();
    for partition in partitions {
        let (low, high) = consumer
            .fetch_watermarks(&topic, partition, timeout)
            .map_err(failed)?;
        if high > low {
            ends.push((partition, high));
            assignment
                .add_partition_offset(&topic, partition, Offset::Offset(low))
                .map_err(failed)?;
        }
    }
    if ends.is_empty() {
        return Ok(Vec::new());
    }
    consumer.assign(&assignment).map_err(failed)?;

    let mut entries = Vec::new();
    let mut remaining = ends.clone();
    let deadline = std::time::Instant::now() + timeout * 4;
    while !remaining.is_empty() && std::time::Instant::now() < deadline {
        let Some(result) = consumer.poll(Duration::from_millis(200)) else {
            continue;
        };
        let msg = result.map_err(failed)?;
        let header = |name: &str| {
            msg.headers().and_then(|hs| {
                hs.iter()
                    .find(|h| h.key == name)
                    .and_then(|h| h.value)
                    .map(|v| String::from_utf8_lossy(v).into_owned())
            })
        };
        let entry = DeadEntry {
            partition: msg.partition(),
            offset: msg.offset(),
            key: msg.key().map(|k| String::from_utf8_lossy(k).into_owned()),
            reason: header("fanfinity-reason"),
            source_topic: header("fanfinity-source-topic"),
            source_partition: header("fanfinity-source-partition"),
            source_offset: header("fanfinity-source-offset"),
            failed_at_ms: header("fanfinity-failed-at-ms"),
            attempts: header("fanfinity-attempts"),
            first_error: header("fanfinity-first-error"),
            payload: String::from_utf8_lossy(msg.payload().unwrap_or_default()).into_owned(),
            raw_key: msg.key().map(<[u8]>::to_vec),
            raw_payload: msg.payload().unwrap_or_default().to_vec(),
        };
        if filter.matches(&entry) {
            entries.push(entry);
        }
        remaining.retain(|(p, end)| !(*p == msg.partition() && msg.offset() + 1 >= *end));
    }
    Ok(entries)
}

/// Produces `entries` back to the events topic with their original keys and bytes and
/// waits for every acknowledgement. Returns how many were replayed.
///
/// # Errors
/// A record that could not be enqueued, or a flush that did not finish in time.
pub fn replay(config: &KafkaConfig, entries: &[DeadEntry]) -> Result<usize, DeadTopicError> {
    let failed = |detail: String| DeadTopicError::Replay {
        topic: config.topic.clone(),
        detail,
    };
    let writer =
        SideTopicWriter::new(config, "dead-replay").map_err(|err| failed(err.to_string()))?;
    let records: Vec<(Option<Vec<u8>>, Vec<u8>)> = entries
        .iter()
        .map(|e| (e.raw_key.clone(), e.raw_payload.clone()))
        .collect();
    writer
        .send_raw(&config.topic, &records)
        .map_err(|err| failed(err.to_string()))?;
    Ok(entries.len())
}
