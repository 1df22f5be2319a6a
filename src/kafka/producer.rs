//! The one rdkafka producer every shard shares, and the acknowledgement a request awaits.
//!
//! Shards call [`EventProducer::send_batch`] directly: librdkafka's produce call is
//! thread-safe and only appends to its internal queue, so no channel or extra thread sits
//! between a shard and the producer (ADR-002 has the measurement behind that choice).
//! librdkafka's own background thread delivers the reports; the report for the last
//! record of a request wakes the request's task on its shard.
//!
//! A watchdog replaces the producer when it is stuck: librdkafka reports a fatal error,
//! or deliveries keep failing although a broker is up (seen when a broker lost its
//! producer-id state, e.g. Tansu's memory store after a restart: the idempotent producer
//! then retries with an id the broker no longer knows until every record times out).
//! Records still in the old producer are purged and their requests answered 503.
//!
//! This module does not decide HTTP answers; it reports [`ProduceError`]s and the caller
//! maps them.

use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicI64, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock, Weak};
use std::task::{Context, Poll};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use atomic_waker::AtomicWaker;
use rdkafka::client::ClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::producer::{BaseRecord, DeliveryResult, Producer, ProducerContext, ThreadedProducer};
use rdkafka::statistics::Statistics;
use tracing::{error, info, warn};

use crate::app::config::KafkaConfig;

/// Why events were not (or not known to be) written to Kafka. Every variant is
/// retryable by the client: the request was not acknowledged.
#[derive(Debug, Clone, thiserror::Error)]
pub enum ProduceError {
    #[error("no kafka broker is reachable")]
    Unavailable,
    #[error("producer queue is full ({queued} queued, limit {limit})")]
    QueueFull { queued: usize, limit: usize },
    #[error("kafka refused or lost {failed} of the request's records: {reason}")]
    DeliveryFailed { failed: usize, reason: String },
    #[error("kafka did not acknowledge the request within {timeout_ms} ms")]
    Timeout { timeout_ms: u64 },
    #[error("could not create the kafka producer")]
    Create(#[source] KafkaError),
}

/// What the process knows about Kafka right now, shared by the producer's callbacks,
/// `/readyz` and `/metrics`.
#[derive(Debug, Default)]
pub struct KafkaHealth {
    /// False after librdkafka reported all brokers down; true again once its statistics
    /// show a broker in state `UP`.
    up: AtomicBool,
    last_error: Mutex<Option<String>>,
    /// Epoch ms of the first delivery failure since the last success; 0 when healthy.
    failing_since_ms: AtomicI64,
    /// librdkafka raised a fatal error: the producer instance is unusable.
    fatal: AtomicBool,
    /// Times the watchdog replaced the producer.
    pub resets: AtomicU64,
}

impl KafkaHealth {
    /// Whether at least one broker is reachable.
    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Relaxed)
    }

    /// The last error librdkafka reported, for `/readyz`.
    pub fn last_error(&self) -> Option<String> {
        self.last_error.lock().ok().and_then(|e| e.clone())
    }

    fn note_delivery(&self, ok: bool) {
        if ok {
            if self.failing_since_ms.load(Ordering::Relaxed) != 0 {
                self.failing_since_ms.store(0, Ordering::Relaxed);
            }
        } else {
            let _ = self.failing_since_ms.compare_exchange(
                0,
                epoch_ms(),
                Ordering::Relaxed,
                Ordering::Relaxed,
            );
        }
    }

    /// Whether the producer should be replaced: fatal, or failing for longer than
    /// `stuck_after` while a broker is up.
    fn is_stuck(&self, stuck_after: Duration) -> bool {
        if self.fatal.load(Ordering::Relaxed) {
            return true;
        }
        let since = self.failing_since_ms.load(Ordering::Relaxed);
        since != 0 && self.is_up() && epoch_ms() - since > stuck_after.as_millis() as i64
    }

    fn set_error(&self, message: String) {
        if let Ok(mut slot) = self.last_error.lock() {
            *slot = Some(message);
        }
    }
}

/// Delivery bookkeeping for one HTTP request: how many of its records are still
/// unacknowledged, the first failure, and the task to wake when the count reaches zero.
#[derive(Debug)]
pub struct RequestAck {
    remaining: AtomicUsize,
    failed: AtomicUsize,
    first_error: Mutex<Option<String>>,
    waker: AtomicWaker,
}

impl RequestAck {
    fn new(records: usize) -> Arc<Self> {
        Arc::new(Self {
            remaining: AtomicUsize::new(records),
            failed: AtomicUsize::new(0),
            first_error: Mutex::new(None),
            waker: AtomicWaker::new(),
        })
    }

    /// Records one delivery report; the last one wakes the waiting request.
    fn report(&self, outcome: Result<(), String>) {
        if let Err(reason) = outcome {
            self.failed.fetch_add(1, Ordering::Relaxed);
            if let Ok(mut slot) = self.first_error.lock() {
                slot.get_or_insert(reason);
            }
        }
        if self.remaining.fetch_sub(1, Ordering::AcqRel) == 1 {
            self.waker.wake();
        }
    }

    /// Counts records that were never enqueued as failed, so the future still resolves.
    fn abandon(&self, records: usize, reason: String) {
        for _ in 0..records {
            self.report(Err(reason.clone()));
        }
    }
}

/// Resolves when Kafka has answered for every record of a request.
#[derive(Debug)]
pub struct AckFuture {
    ack: Arc<RequestAck>,
}

impl Future for AckFuture {
    type Output = Result<(), ProduceError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let ack = &self.ack;
        if ack.remaining.load(Ordering::Acquire) != 0 {
            ack.waker.register(cx.waker());
            // A report may have landed between the check and the registration.
            if ack.remaining.load(Ordering::Acquire) != 0 {
                return Poll::Pending;
            }
        }
        let failed = ack.failed.load(Ordering::Relaxed);
        if failed == 0 {
            return Poll::Ready(Ok(()));
        }
        let reason = ack
            .first_error
            .lock()
            .ok()
            .and_then(|e| e.clone())
            .unwrap_or_default();
        Poll::Ready(Err(ProduceError::DeliveryFailed { failed, reason }))
    }
}

/// librdkafka callbacks: delivery reports, errors and statistics.
pub struct DeliveryContext {
    health: Arc<KafkaHealth>,
}

impl ClientContext for DeliveryContext {
    fn stats(&self, stats: Statistics) {
        let any_up = stats.brokers.values().any(|b| b.state == "UP");
        let was_up = self.health.up.swap(any_up, Ordering::Relaxed);
        if any_up && !was_up {
            if let Ok(mut slot) = self.health.last_error.lock() {
                *slot = None;
            }
            info!(
                brokers = stats.brokers.len(),
                "kafka reachable, accepting events"
            );
        } else if !any_up && was_up {
            warn!("no kafka broker is up, refusing events with 503");
        }
    }

    fn error(&self, err: KafkaError, reason: &str) {
        if err.rdkafka_error_code() == Some(RDKafkaErrorCode::Fatal) {
            self.health.fatal.store(true, Ordering::Relaxed);
        }
        if err.rdkafka_error_code() == Some(RDKafkaErrorCode::AllBrokersDown) {
            if self.health.up.swap(false, Ordering::Relaxed) {
                warn!(error = %err, reason, "all kafka brokers down, refusing events with 503");
            }
        } else {
            error!(error = %err, reason, "kafka client error");
        }
        self.health.set_error(format!("{err}: {reason}"));
    }
}

impl ProducerContext for DeliveryContext {
    type DeliveryOpaque = Arc<RequestAck>;

    fn delivery(&self, result: &DeliveryResult<'_>, ack: Arc<RequestAck>) {
        self.health.note_delivery(result.is_ok());
        ack.report(
            result
                .as_ref()
                .map(|_| ())
                .map_err(|(err, _)| err.to_string()),
        );
    }
}

/// One record to produce: the partition key and the encoded event.
#[derive(Debug)]
pub struct OutgoingRecord {
    pub key: String,
    pub payload: Vec<u8>,
}

type Inner = ThreadedProducer<DeliveryContext>;

/// The process-wide producer for `fanfinity.events`.
pub struct EventProducer {
    current: RwLock<Arc<Inner>>,
    client_config: ClientConfig,
    topic: String,
    health: Arc<KafkaHealth>,
    /// Queue depth at which new requests are refused and `/readyz` fails.
    ready_limit: usize,
    /// How long deliveries may fail with a broker up before the producer is replaced.
    stuck_after: Duration,
}

impl EventProducer {
    /// Creates the idempotent producer (`acks=all`) from config.
    ///
    /// # Errors
    /// [`ProduceError::Create`] when librdkafka refuses the configuration.
    pub fn new(config: &KafkaConfig) -> Result<Self, ProduceError> {
        let health = Arc::new(KafkaHealth::default());
        let mut client_config = ClientConfig::new();
        client_config
            .set("bootstrap.servers", &config.brokers)
            .set("client.id", &config.client_id)
            .set("enable.idempotence", "true")
            .set("acks", "all")
            .set("compression.type", &config.compression)
            .set("linger.ms", config.linger_ms.to_string())
            .set("batch.size", config.batch_size_bytes.to_string())
            .set("message.timeout.ms", config.message_timeout_ms.to_string())
            .set(
                "queue.buffering.max.messages",
                config.queue_max_messages.to_string(),
            )
            .set(
                "queue.buffering.max.kbytes",
                config.queue_max_kbytes.to_string(),
            )
            .set("statistics.interval.ms", "1000");
        let inner = build(&client_config, &health)?;
        let ready_limit =
            (f64::from(config.queue_max_messages) * config.queue_ready_fraction) as usize;
        Ok(Self {
            current: RwLock::new(Arc::new(inner)),
            client_config,
            topic: config.topic.clone(),
            health,
            ready_limit: ready_limit.max(1),
            stuck_after: Duration::from_millis(u64::from(config.message_timeout_ms) * 2),
        })
    }

    fn inner(&self) -> Arc<Inner> {
        match self.current.read() {
            Ok(guard) => Arc::clone(&guard),
            Err(poisoned) => Arc::clone(&poisoned.into_inner()),
        }
    }

    /// Starts the watchdog thread; it ends when the producer is dropped.
    ///
    /// # Errors
    /// The thread cannot be spawned.
    pub fn spawn_watchdog(self: &Arc<Self>) -> std::io::Result<JoinHandle<()>> {
        let weak: Weak<Self> = Arc::downgrade(self);
        std::thread::Builder::new()
            .name("producer-watchdog".into())
            .spawn(move || {
                let mut last_reset: Option<std::time::Instant> = None;
                loop {
                    std::thread::sleep(Duration::from_millis(250));
                    let Some(producer) = weak.upgrade() else {
                        return;
                    };
                    let cooled = last_reset.is_none_or(|t| t.elapsed() > producer.stuck_after);
                    if cooled && producer.health.is_stuck(producer.stuck_after) {
                        producer.reset();
                        last_reset = Some(std::time::Instant::now());
                    }
                }
            })
    }

    /// Replaces the librdkafka producer with a fresh one (new producer id). Records in the
    /// old one are purged; their requests get 503 and clients retry with the same ids.
    fn reset(&self) {
        let fatal = self.health.fatal.load(Ordering::Relaxed);
        match build(&self.client_config, &self.health) {
            Ok(fresh) => {
                let old = match self.current.write() {
                    Ok(mut guard) => std::mem::replace(&mut *guard, Arc::new(fresh)),
                    Err(_) => return,
                };
                self.health.fatal.store(false, Ordering::Relaxed);
                self.health.failing_since_ms.store(0, Ordering::Relaxed);
                self.health.resets.fetch_add(1, Ordering::Relaxed);
                warn!(topic = %self.topic, fatal, in_flight = old.in_flight_count(),
                    "kafka producer stuck, replaced it; its queued records are answered 503");
                drop(old);
            }
            Err(err) => error!(error = %err, "cannot replace the stuck kafka producer"),
        }
    }

    /// Shared view of Kafka's state for readiness and metrics.
    pub fn health(&self) -> Arc<KafkaHealth> {
        Arc::clone(&self.health)
    }

    /// Asks a broker for the topic's metadata and marks Kafka reachable if one answers,
    /// so the first requests after start-up do not wait for a statistics report.
    ///
    /// # Errors
    /// The metadata request's failure.
    pub fn probe(&self, timeout: Duration) -> Result<(), KafkaError> {
        self.inner()
            .client()
            .fetch_metadata(Some(&self.topic), timeout)?;
        self.health.up.store(true, Ordering::Relaxed);
        Ok(())
    }

    /// Records queued in the producer or awaiting acknowledgement.
    pub fn queue_depth(&self) -> usize {
        self.inner().in_flight_count().max(0) as usize
    }

    /// Queue depth at which new requests are refused.
    pub fn ready_limit(&self) -> usize {
        self.ready_limit
    }

    /// Whether a request of `records` events may be enqueued now: a broker is up and the
    /// queue has room below the readiness threshold.
    ///
    /// # Errors
    /// [`ProduceError::Unavailable`] or [`ProduceError::QueueFull`].
    pub fn check_capacity(&self, records: usize) -> Result<(), ProduceError> {
        if !self.health.is_up() {
            return Err(ProduceError::Unavailable);
        }
        let queued = self.queue_depth();
        if queued + records > self.ready_limit {
            return Err(ProduceError::QueueFull {
                queued,
                limit: self.ready_limit,
            });
        }
        Ok(())
    }

    /// Enqueues every record of one request and returns the future of their delivery.
    ///
    /// Capacity is checked first so a request is normally enqueued whole or not at all.
    /// If librdkafka still refuses a record midway (its queue filled between the check and
    /// the call), the rest are not enqueued and the future resolves to an error; records
    /// already enqueued may still be written, which is why clients retry with the same
    /// `event_id`s and the sink counts each id once.
    ///
    /// # Errors
    /// Refusals found before anything was enqueued are returned directly.
    pub fn send_batch(&self, records: &[OutgoingRecord]) -> Result<AckFuture, ProduceError> {
        self.check_capacity(records.len())?;
        let ack = RequestAck::new(records.len());
        let producer = self.inner();
        for (sent, record) in records.iter().enumerate() {
            let base = BaseRecord::with_opaque_to(&self.topic, Arc::clone(&ack))
                .key(record.key.as_bytes())
                .payload(&record.payload);
            if let Err((err, _)) = producer.send(base) {
                let unsent = records.len() - sent;
                ack.abandon(unsent, err.to_string());
                if sent == 0 {
                    return Err(match err.rdkafka_error_code() {
                        Some(RDKafkaErrorCode::QueueFull) => ProduceError::QueueFull {
                            queued: self.queue_depth(),
                            limit: self.ready_limit,
                        },
                        _ => ProduceError::DeliveryFailed {
                            failed: unsent,
                            reason: err.to_string(),
                        },
                    });
                }
                warn!(topic = %self.topic, sent, unsent, error = %err,
                    "enqueue failed midway through a request");
                break;
            }
        }
        Ok(AckFuture { ack })
    }

    /// Waits up to `timeout` for queued records to be delivered. Called once at shutdown
    /// so no acknowledged-in-flight record is dropped with the producer.
    ///
    /// # Errors
    /// The records still queued when the time ran out.
    pub fn flush(&self, timeout: Duration) -> Result<(), KafkaError> {
        self.inner().flush(timeout)
    }
}

fn build(config: &ClientConfig, health: &Arc<KafkaHealth>) -> Result<Inner, ProduceError> {
    config
        .create_with_context(DeliveryContext {
            health: Arc::clone(health),
        })
        .map_err(ProduceError::Create)
}

fn epoch_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::task::Wake;

    struct CountingWaker(AtomicUsize);
    impl Wake for CountingWaker {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn poll_once(
        fut: &mut AckFuture,
        waker: &Arc<CountingWaker>,
    ) -> Poll<Result<(), ProduceError>> {
        let waker = std::task::Waker::from(Arc::clone(waker));
        let mut cx = Context::from_waker(&waker);
        Pin::new(fut).poll(&mut cx)
    }

    #[test]
    fn ack_resolves_after_last_report_and_wakes_once() {
        let ack = RequestAck::new(3);
        let mut fut = AckFuture {
            ack: Arc::clone(&ack),
        };
        let waker = Arc::new(CountingWaker(AtomicUsize::new(0)));
        assert!(poll_once(&mut fut, &waker).is_pending());
        ack.report(Ok(()));
        ack.report(Ok(()));
        assert_eq!(waker.0.load(Ordering::Relaxed), 0);
        ack.report(Ok(()));
        assert_eq!(waker.0.load(Ordering::Relaxed), 1);
        assert!(matches!(poll_once(&mut fut, &waker), Poll::Ready(Ok(()))));
    }

    #[test]
    fn one_failed_record_fails_the_request() {
        let ack = RequestAck::new(2);
        let mut fut = AckFuture {
            ack: Arc::clone(&ack),
        };
        ack.report(Ok(()));
        ack.report(Err("broker: message timed out".into()));
        let waker = Arc::new(CountingWaker(AtomicUsize::new(0)));
        match poll_once(&mut fut, &waker) {
            Poll::Ready(Err(ProduceError::DeliveryFailed { failed, reason })) => {
                assert_eq!(failed, 1);
                assert!(reason.contains("timed out"));
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn abandoned_records_resolve_the_future() {
        let ack = RequestAck::new(4);
        let mut fut = AckFuture {
            ack: Arc::clone(&ack),
        };
        ack.report(Ok(()));
        ack.abandon(3, "queue full".into());
        let waker = Arc::new(CountingWaker(AtomicUsize::new(0)));
        assert!(matches!(
            poll_once(&mut fut, &waker),
            Poll::Ready(Err(ProduceError::DeliveryFailed { failed: 3, .. }))
        ));
    }
}
