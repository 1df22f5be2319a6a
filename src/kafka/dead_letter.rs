//! Writes the sink's side topics: `fanfinity.events.retry` (rows ClickHouse refused,
//! awaiting another attempt, see [`super::retry_letter`]) and `fanfinity.events.dead`
//! (records that cannot be stored, with the reason).
//!
//! A dead letter keeps the original bytes and key, so an operator can read what arrived
//! and replay it, plus headers saying why and where it came from:
//! `fanfinity-reason`, `fanfinity-source-topic`, `fanfinity-source-partition`,
//! `fanfinity-source-offset`, `fanfinity-failed-at-ms`, and for rows ClickHouse refused,
//! `fanfinity-attempts` and `fanfinity-first-error`.
//!
//! Sending is synchronous from the consumer thread's point of view: the sink stores the
//! offsets of a batch only after every letter of that batch is acknowledged, so a record
//! is never both skipped and lost.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rdkafka::client::ClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::error::KafkaError;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{BaseRecord, DeliveryResult, Producer, ProducerContext, ThreadedProducer};

use super::retry_letter::RetryLetter;
use crate::app::config::KafkaConfig;

/// Why dead letters could not be written.
#[derive(Debug, thiserror::Error)]
pub enum DeadLetterError {
    #[error("cannot create the dead-letter producer")]
    Create(#[source] KafkaError),
    #[error("{failed} of {sent} dead letters to {topic} were not acknowledged: {reason}")]
    NotAcknowledged {
        topic: String,
        sent: usize,
        failed: usize,
        reason: String,
    },
}

/// One record that cannot be stored.
#[derive(Debug, Clone)]
pub struct DeadLetter {
    pub key: Option<Vec<u8>>,
    pub payload: Vec<u8>,
    pub reason: String,
    pub source_topic: String,
    pub source_partition: i32,
    pub source_offset: i64,
    /// Inserts ClickHouse refused before the row was given up (0: never inserted, the
    /// record is not an event).
    pub attempts: u32,
    /// ClickHouse's reason the first time, when it refused the row more than once.
    pub first_error: Option<String>,
}

impl DeadLetter {
    /// The dead letter for a record no attempt can store (not an event, or a retry
    /// record without readable headers): its own bytes and position, with `reason`.
    pub fn unreadable(msg: &impl rdkafka::message::Message, reason: String) -> Self {
        Self {
            key: msg.key().map(<[u8]>::to_vec),
            payload: msg.payload().unwrap_or_default().to_vec(),
            reason,
            source_topic: msg.topic().to_string(),
            source_partition: msg.partition(),
            source_offset: msg.offset(),
            attempts: 0,
            first_error: None,
        }
    }

    /// The dead letter for a retried row given up after `attempts` refusals, with
    /// `reason` (the last refusal, or why the row could not be tried again).
    pub fn from_retry(letter: RetryLetter, attempts: u32, reason: String) -> Self {
        Self {
            reason,
            key: letter.key,
            payload: letter.payload,
            source_topic: letter.source_topic,
            source_partition: letter.source_partition,
            source_offset: letter.source_offset,
            attempts,
            first_error: Some(letter.first_error),
        }
    }
}

#[derive(Default)]
struct Outcomes {
    failed: AtomicUsize,
    first_error: Mutex<Option<String>>,
}

struct DeadLetterContext {
    outcomes: Arc<Outcomes>,
}

impl ClientContext for DeadLetterContext {}

impl ProducerContext for DeadLetterContext {
    type DeliveryOpaque = ();

    fn delivery(&self, result: &DeliveryResult<'_>, _: ()) {
        if let Err((err, _)) = result {
            self.outcomes.failed.fetch_add(1, Ordering::Relaxed);
            if let Ok(mut slot) = self.outcomes.first_error.lock() {
                slot.get_or_insert_with(|| err.to_string());
            }
        }
    }
}

/// The sink's producer for the retry and dead-letter topics.
pub struct SideTopicWriter {
    producer: ThreadedProducer<DeadLetterContext>,
    outcomes: Arc<Outcomes>,
    topic: String,
    retry_topic: String,
    timeout: Duration,
}

impl SideTopicWriter {
    /// An idempotent producer for `kafka.dead_topic` and `kafka.retry_topic`.
    ///
    /// # Errors
    /// [`DeadLetterError::Create`] when librdkafka refuses the configuration.
    pub fn new(config: &KafkaConfig, client_suffix: &str) -> Result<Self, DeadLetterError> {
        let outcomes = Arc::new(Outcomes::default());
        let producer = ClientConfig::new()
            .set("bootstrap.servers", &config.brokers)
            .set("client.id", format!("{}-{client_suffix}", config.client_id))
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("message.timeout.ms", config.message_timeout_ms.to_string())
            .create_with_context(DeadLetterContext {
                outcomes: Arc::clone(&outcomes),
            })
            .map_err(DeadLetterError::Create)?;
        Ok(Self {
            producer,
            outcomes,
            topic: config.dead_topic.clone(),
            retry_topic: config.retry_topic.clone(),
            timeout: Duration::from_millis(u64::from(config.message_timeout_ms) + 1000),
        })
    }

    /// The topic dead letters go to.
    pub fn topic(&self) -> &str {
        &self.topic
    }

    /// The topic retry letters go to.
    pub fn retry_topic(&self) -> &str {
        &self.retry_topic
    }

    /// Writes every retry letter and waits until all are acknowledged.
    ///
    /// # Errors
    /// As [`SideTopicWriter::send_all`].
    pub fn send_retries(&self, letters: &[RetryLetter]) -> Result<(), DeadLetterError> {
        self.send_confirmed(&self.retry_topic, letters.len(), |i| {
            let letter = &letters[i];
            (
                letter.key.as_deref(),
                letter.payload.as_slice(),
                Some(letter.headers()),
            )
        })
    }

    /// Writes every dead letter and waits until all are acknowledged.
    ///
    /// # Errors
    /// [`DeadLetterError::NotAcknowledged`] if any letter was refused, could not be
    /// enqueued or was not acknowledged in time; the caller keeps the batch and retries.
    pub fn send_all(&self, letters: &[DeadLetter]) -> Result<(), DeadLetterError> {
        let failed_at = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis())
            .to_string();
        self.send_confirmed(&self.topic, letters.len(), |i| {
            let letter = &letters[i];
            let mut headers = OwnedHeaders::new()
                .insert(header("fanfinity-reason", &letter.reason))
                .insert(header("fanfinity-source-topic", &letter.source_topic))
                .insert(header(
                    "fanfinity-source-partition",
                    &letter.source_partition.to_string(),
                ))
                .insert(header(
                    "fanfinity-source-offset",
                    &letter.source_offset.to_string(),
                ))
                .insert(header("fanfinity-failed-at-ms", &failed_at));
            if letter.attempts > 0 {
                headers =
                    headers.insert(header("fanfinity-attempts", &letter.attempts.to_string()));
            }
            if let Some(first) = &letter.first_error {
                headers = headers.insert(header("fanfinity-first-error", first));
            }
            (
                letter.key.as_deref(),
                letter.payload.as_slice(),
                Some(headers),
            )
        })
    }

    /// Writes records as they are (key and bytes, no headers) to `topic` and waits for
    /// every acknowledgement: how `fanfinity dead replay` returns letters to the events
    /// topic.
    ///
    /// # Errors
    /// As [`SideTopicWriter::send_all`].
    pub fn send_raw(
        &self,
        topic: &str,
        records: &[(Option<Vec<u8>>, Vec<u8>)],
    ) -> Result<(), DeadLetterError> {
        self.send_confirmed(topic, records.len(), |i| {
            let (key, payload) = &records[i];
            (key.as_deref(), payload.as_slice(), None)
        })
    }

    /// Sends `count` records built by `record(i)` and waits for all acknowledgements.
    fn send_confirmed<'a>(
        &self,
        topic: &str,
        count: usize,
        record: impl Fn(usize) -> (Option<&'a [u8]>, &'a [u8], Option<OwnedHeaders>),
    ) -> Result<(), DeadLetterError> {
        if count == 0 {
            return Ok(());
        }
        self.outcomes.failed.store(0, Ordering::Relaxed);
        if let Ok(mut slot) = self.outcomes.first_error.lock() {
            *slot = None;
        }
        let mut unsent = 0;
        for i in 0..count {
            let (key, payload, headers) = record(i);
            let mut base = BaseRecord::to(topic).payload(payload);
            if let Some(key) = key {
                base = base.key(key);
            }
            if let Some(headers) = headers {
                base = base.headers(headers);
            }
            if let Err((err, _)) = self.producer.send(base) {
                unsent += 1;
                if let Ok(mut slot) = self.outcomes.first_error.lock() {
                    slot.get_or_insert_with(|| err.to_string());
                }
            }
        }
        let flushed = self.producer.flush(self.timeout);
        let failed = unsent + self.outcomes.failed.load(Ordering::Relaxed);
        if failed == 0 && flushed.is_ok() {
            return Ok(());
        }
        let reason = self
            .outcomes
            .first_error
            .lock()
            .ok()
            .and_then(|e| e.clone())
            .or_else(|| flushed.err().map(|e| e.to_string()))
            .unwrap_or_default();
        Err(DeadLetterError::NotAcknowledged {
            topic: topic.to_string(),
            sent: count,
            failed: failed.max(1),
            reason,
        })
    }
}

fn header<'a>(key: &'a str, value: &'a str) -> Header<'a, &'a str> {
    Header {
        key,
        value: Some(value),
    }
}
