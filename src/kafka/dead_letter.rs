//! Writes records the sink cannot store to `fanfinity.events.dead`, with the reason.
//!
//! A dead letter keeps the original bytes and key, so an operator can read what arrived
//! and replay it, plus headers saying why and where it came from:
//! `fanfinity-reason`, `fanfinity-source-topic`, `fanfinity-source-partition`,
//! `fanfinity-source-offset`, `fanfinity-failed-at-ms`.
//!
//! Sending is synchronous from the consumer thread's point of view: the sink stores the
//! offsets of a batch only after every dead letter of that batch is acknowledged, so a
//! record is never both skipped and lost.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rdkafka::client::ClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::error::KafkaError;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{BaseRecord, DeliveryResult, Producer, ProducerContext, ThreadedProducer};

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

/// The sink's producer for the dead-letter topic.
pub struct DeadLetterWriter {
    producer: ThreadedProducer<DeadLetterContext>,
    outcomes: Arc<Outcomes>,
    topic: String,
    timeout: Duration,
}

impl DeadLetterWriter {
    /// An idempotent producer for `kafka.dead_topic`.
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
            timeout: Duration::from_millis(u64::from(config.message_timeout_ms) + 1000),
        })
    }

    /// The topic dead letters go to.
    pub fn topic(&self) -> &str {
        &self.topic
    }

    /// Writes every letter and waits until all are acknowledged.
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
            let headers = OwnedHeaders::new()
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
    /// As [`DeadLetterWriter::send_all`].
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
