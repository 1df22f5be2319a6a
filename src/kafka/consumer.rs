//! Sink consumer threads: drain `fanfinity.events` into ClickHouse in batches.
//!
//! Each thread is one member of the consumer group, pinned to a core, with its own
//! [`BatchWriter`]. The loop is: poll, add the record to the batch, and flush when the
//! batch reaches `sink.max_batch_rows` rows or its oldest row is `sink.flush_interval_ms`
//! old. Offsets are stored only after the insert holding them succeeded, and committed by
//! librdkafka's auto-commit, on revoke and at close: at-least-once delivery, made
//! harmless by counting each `event_id` once.
//!
//! While an insert fails, the thread pauses its partitions and keeps polling between
//! attempts, so it stays in the group (no `max.poll.interval.ms` eviction) and its
//! memory stays bounded by what was already fetched.
//!
//! Records that are not valid events, and rows ClickHouse refuses for their content
//! (found by splitting the batch until the refused rows stand alone), are written to the
//! dead-letter topic with the reason; the rest of the batch is inserted. Offsets are
//! stored only once both the insert and the dead letters are acknowledged. Schema and
//! permission errors pause the sink without dropping anything (see `sink::classify`).
//!
//! # Limitations
//! NOTE(#3): rows refused for their content go straight to the dead-letter topic; the
//! retry topic and its consumer (re-attempts with backoff before dead-lettering) are not
//! built yet.

use std::cell::Cell;
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rdkafka::client::ClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance};
use rdkafka::error::KafkaError;
use rdkafka::message::{BorrowedMessage, Message};
use rdkafka::statistics::Statistics;
use rdkafka::{Offset, TopicPartitionList};
use tracing::{debug, error, info, warn};

use crate::app::config::Config;
use crate::event::EventRecord;
use crate::kafka::dead_letter::{DeadLetter, DeadLetterError, DeadLetterWriter};
use crate::sink::classify::{classify, FailureKind};
use crate::sink::row::{EventRow, KafkaPosition};
use crate::sink::status::SinkStatus;
use crate::sink::writer::BatchWriter;
use crate::sink::SinkError;

/// Why a consumer thread could not start or stopped.
#[derive(Debug, thiserror::Error)]
pub enum ConsumeError {
    #[error("cannot create kafka consumer {consumer}")]
    Create {
        consumer: usize,
        #[source]
        source: KafkaError,
    },
    #[error("cannot subscribe consumer {consumer} to {topic}")]
    Subscribe {
        consumer: usize,
        topic: String,
        #[source]
        source: KafkaError,
    },
    #[error(transparent)]
    Sink(#[from] SinkError),
    #[error(transparent)]
    DeadLetter(#[from] DeadLetterError),
    #[error("cannot spawn consumer thread {consumer}")]
    Spawn {
        consumer: usize,
        #[source]
        source: std::io::Error,
    },
}

/// librdkafka callbacks for a sink consumer: lag from statistics, commit on revoke.
struct SinkContext {
    consumer: usize,
    status: Arc<SinkStatus>,
}

impl ClientContext for SinkContext {
    fn stats(&self, stats: Statistics) {
        let lag = stats.topics.iter().flat_map(|(topic, t)| {
            t.partitions
                .values()
                .filter(|p| p.partition >= 0 && p.consumer_lag >= 0)
                .map(move |p| ((topic.clone(), p.partition), p.consumer_lag))
        });
        self.status.set_lag(lag);
    }

    fn error(&self, err: KafkaError, reason: &str) {
        warn!(consumer = self.consumer, error = %err, reason, "kafka consumer error");
    }
}

impl ConsumerContext for SinkContext {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Revoke(partitions) = rebalance {
            // Stored offsets only ever cover inserted rows, so committing them is safe.
            match consumer.commit_consumer_state(CommitMode::Sync) {
                Ok(()) => info!(
                    consumer = self.consumer,
                    partitions = partitions.count(),
                    "partitions revoked, stored offsets committed"
                ),
                Err(err) => debug!(consumer = self.consumer, error = %err,
                    "nothing committed on revoke"),
            }
        }
    }

    fn post_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Assign(partitions) = rebalance {
            info!(
                consumer = self.consumer,
                partitions = partitions.count(),
                "partitions assigned"
            );
        }
    }
}

/// Where a row came from, kept until its batch is written so a refused row can be
/// dead-lettered with its original bytes.
struct RowSource {
    key: Option<Vec<u8>>,
    payload: Vec<u8>,
    partition: i32,
    offset: i64,
}

/// Rows waiting for the next insert, with the next offset to commit per partition.
#[derive(Default)]
struct Batch {
    rows: Vec<EventRow>,
    /// Parallel to `rows`.
    sources: Vec<RowSource>,
    /// Records to write to the dead-letter topic before the offsets may move.
    dead: Vec<DeadLetter>,
    next_offsets: BTreeMap<(String, i32), i64>,
    oldest: Option<Instant>,
}

impl Batch {
    fn note_offset(&mut self, msg: &BorrowedMessage<'_>) {
        self.next_offsets
            .insert((msg.topic().to_string(), msg.partition()), msg.offset() + 1);
        self.oldest.get_or_insert_with(Instant::now);
    }

    fn is_due(&self, max_rows: usize, max_age: Duration) -> bool {
        self.rows.len() >= max_rows || self.oldest.is_some_and(|t| t.elapsed() >= max_age)
    }

    fn is_empty(&self) -> bool {
        self.next_offsets.is_empty()
    }
}

/// A running consumer thread.
pub struct ConsumerHandle {
    pub id: usize,
    thread: JoinHandle<()>,
}

impl ConsumerHandle {
    /// Waits for the thread to finish its last batch and close.
    pub fn join(self) {
        if self.thread.join().is_err() {
            error!(consumer = self.id, "consumer thread panicked");
        }
    }
}

/// Starts `consumer.threads` consumer threads. They run until `stop` is set, then flush
/// their batch (retrying until `drain_deadline` after the stop), commit and close.
///
/// # Errors
/// A consumer that cannot be created or subscribed, or a thread that cannot start.
pub fn spawn_consumers(
    config: &Config,
    status: Arc<SinkStatus>,
    stop: Arc<AtomicBool>,
    drain_deadline: Duration,
) -> Result<Vec<ConsumerHandle>, ConsumeError> {
    let cores = consumer_cores(config);
    let mut handles = Vec::new();
    for id in 0..config.consumer.threads {
        let consumer = create_consumer(config, id, Arc::clone(&status))?;
        let writer = BatchWriter::new(&config.clickhouse)?;
        let core = cores.get(id % cores.len().max(1)).copied();
        let dead_letters = DeadLetterWriter::new(&config.kafka, &format!("sink-{id}-dead"))?;
        let worker = Worker {
            id,
            consumer,
            writer,
            dead_letters,
            topic: config.kafka.topic.clone(),
            last_schema_log: Cell::new(None),
            status: Arc::clone(&status),
            stop: Arc::clone(&stop),
            max_rows: config.sink.max_batch_rows,
            max_age: Duration::from_millis(config.sink.flush_interval_ms),
            retry_min: Duration::from_millis(config.sink.retry_min_ms),
            retry_max: Duration::from_millis(config.sink.retry_max_ms),
            drain_deadline,
        };
        let thread = std::thread::Builder::new()
            .name(format!("sink-{id}"))
            .spawn(move || {
                if let Some(core) = core {
                    let pinned = core_affinity::set_for_current(core_affinity::CoreId { id: core });
                    info!(consumer = id, core, pinned, "consumer thread started");
                }
                worker.run();
            })
            .map_err(|source| ConsumeError::Spawn {
                consumer: id,
                source,
            })?;
        handles.push(ConsumerHandle { id, thread });
    }
    Ok(handles)
}

/// Cores for consumer threads: the configured list, else the last online cores (shared
/// with shards on small machines, which the OS scheduler tolerates at these rates).
fn consumer_cores(config: &Config) -> Vec<usize> {
    if !config.consumer.cores.is_empty() {
        return config.consumer.cores.clone();
    }
    let online = core_affinity::get_core_ids().unwrap_or_default();
    online
        .iter()
        .rev()
        .take(config.consumer.threads.max(1))
        .map(|c| c.id)
        .collect()
}

fn create_consumer(
    config: &Config,
    id: usize,
    status: Arc<SinkStatus>,
) -> Result<BaseConsumer<SinkContext>, ConsumeError> {
    let consumer: BaseConsumer<SinkContext> = ClientConfig::new()
        .set("bootstrap.servers", &config.kafka.brokers)
        .set("group.id", &config.consumer.group_id)
        .set("client.id", format!("{}-sink-{id}", config.kafka.client_id))
        .set("enable.auto.commit", "true")
        .set("auto.commit.interval.ms", "1000")
        .set("enable.auto.offset.store", "false")
        .set("auto.offset.reset", &config.consumer.auto_offset_reset)
        .set(
            "session.timeout.ms",
            config.consumer.session_timeout_ms.to_string(),
        )
        .set(
            "max.poll.interval.ms",
            config.consumer.max_poll_interval_ms.to_string(),
        )
        .set("statistics.interval.ms", "5000")
        .create_with_context(SinkContext {
            consumer: id,
            status,
        })
        .map_err(|source| ConsumeError::Create {
            consumer: id,
            source,
        })?;
    consumer
        .subscribe(&[&config.kafka.topic])
        .map_err(|source| ConsumeError::Subscribe {
            consumer: id,
            topic: config.kafka.topic.clone(),
            source,
        })?;
    Ok(consumer)
}

struct Worker {
    id: usize,
    consumer: BaseConsumer<SinkContext>,
    writer: BatchWriter,
    dead_letters: DeadLetterWriter,
    /// The events topic, named in dead letters.
    topic: String,
    last_schema_log: Cell<Option<Instant>>,
    status: Arc<SinkStatus>,
    stop: Arc<AtomicBool>,
    max_rows: usize,
    max_age: Duration,
    retry_min: Duration,
    retry_max: Duration,
    drain_deadline: Duration,
}

impl Worker {
    fn run(self) {
        self.status
            .consumers_running
            .fetch_add(1, Ordering::Relaxed);
        let mut batch = Batch::default();

        while !self.stop.load(Ordering::Relaxed) {
            if let Some(result) = self.consumer.poll(Duration::from_millis(100)) {
                match result {
                    Ok(msg) => self.add(&mut batch, &msg),
                    Err(err) => warn!(consumer = self.id, error = %err, "poll failed"),
                }
            }
            if batch.is_due(self.max_rows, self.max_age) {
                self.flush(&mut batch, None);
            }
        }

        let deadline = Instant::now() + self.drain_deadline;
        if !batch.is_empty() {
            self.flush(&mut batch, Some(deadline));
        }
        if !batch.is_empty() {
            error!(
                consumer = self.id,
                batch_rows = batch.rows.len(),
                "stopping with an uninserted batch; its offsets stay uncommitted and \
                 the rows will be consumed again"
            );
        }
        match self.consumer.commit_consumer_state(CommitMode::Sync) {
            Ok(()) => info!(consumer = self.id, "offsets committed at close"),
            Err(err) => debug!(consumer = self.id, error = %err, "nothing to commit at close"),
        }
        self.status
            .consumers_running
            .fetch_sub(1, Ordering::Relaxed);
        info!(consumer = self.id, "consumer stopped");
    }

    fn add(&self, batch: &mut Batch, msg: &BorrowedMessage<'_>) {
        batch.note_offset(msg);
        let payload = msg.payload().unwrap_or_default();
        let key = msg.key().map(<[u8]>::to_vec);
        match EventRecord::decode(payload) {
            Ok(record) => {
                let position = KafkaPosition {
                    partition: msg.partition(),
                    offset: msg.offset(),
                };
                batch.rows.push(EventRow::from_record(record, position));
                batch.sources.push(RowSource {
                    key,
                    payload: payload.to_vec(),
                    partition: msg.partition(),
                    offset: msg.offset(),
                });
            }
            Err(err) => {
                self.status.invalid_records.fetch_add(1, Ordering::Relaxed);
                let reason = format!("not a valid event: {err}");
                warn!(
                    consumer = self.id,
                    topic = msg.topic(),
                    partition = msg.partition(),
                    offset = msg.offset(),
                    reason,
                    "dead-lettering a record that is not an event"
                );
                batch.dead.push(DeadLetter {
                    key,
                    payload: payload.to_vec(),
                    reason,
                    source_topic: msg.topic().to_string(),
                    source_partition: msg.partition(),
                    source_offset: msg.offset(),
                });
            }
        }
    }

    /// Writes the batch (retrying with capped exponential backoff while partitions are
    /// paused), then stores its offsets. With a deadline (shutdown) it gives up when the
    /// deadline passes and leaves the batch in place.
    fn flush(&self, batch: &mut Batch, deadline: Option<Instant>) {
        let mut backoff = self.retry_min;
        let mut paused: Option<TopicPartitionList> = None;
        while let Err((kind, error)) = self.write(batch) {
            self.status
                .insert_failed(&error, kind == FailureKind::Schema);
            if kind == FailureKind::Schema && self.schema_log_due() {
                error!(
                    consumer = self.id,
                    batch_rows = batch.rows.len(),
                    error,
                    "clickhouse refuses the sink's table or grant; paused until fixed, \
                     nothing is dropped"
                );
            } else {
                warn!(consumer = self.id, batch_rows = batch.rows.len(),
                    retry_in_ms = backoff.as_millis() as u64, kind = ?kind, error,
                    "batch write failed, retrying");
            }
            if deadline.is_some_and(|d| Instant::now() + backoff > d) {
                self.resume(paused.take());
                return;
            }
            if paused.is_none() {
                paused = self.pause();
            }
            self.wait_polling(batch, backoff);
            backoff = next_backoff(backoff, self.retry_max);
        }
        self.resume(paused.take());
        self.store_offsets(batch);
        *batch = Batch::default();
    }

    /// One attempt at writing the batch: rows first (rows refused for their content are
    /// moved to the dead letters), then the dead letters. Parts already written are
    /// cleared from the batch, so a retry only redoes what is left.
    fn write(&self, batch: &mut Batch) -> Result<(), (FailureKind, String)> {
        if !batch.rows.is_empty() {
            let mut refused = Vec::new();
            self.insert_splitting(&batch.rows, 0, &mut refused)
                .map_err(|err| (classify(&err), format!("{err}: {}", source_chain(&err))))?;
            for (index, reason) in refused.into_iter().rev() {
                batch.rows.remove(index);
                let source = batch.sources.remove(index);
                warn!(
                    consumer = self.id,
                    partition = source.partition,
                    offset = source.offset,
                    reason,
                    "clickhouse refused a row, dead-lettering it"
                );
                batch.dead.push(DeadLetter {
                    key: source.key,
                    payload: source.payload,
                    reason: format!("clickhouse refused the row: {reason}"),
                    source_topic: self.topic.clone(),
                    source_partition: source.partition,
                    source_offset: source.offset,
                });
            }
            batch.rows.clear();
            batch.sources.clear();
        }
        if !batch.dead.is_empty() {
            self.dead_letters
                .send_all(&batch.dead)
                .map_err(|err| (FailureKind::Transient, err.to_string()))?;
            self.status
                .dead_letters
                .fetch_add(batch.dead.len() as u64, Ordering::Relaxed);
            info!(
                consumer = self.id,
                dead_letters = batch.dead.len(),
                topic = self.dead_letters.topic(),
                "dead letters written"
            );
            batch.dead.clear();
        }
        Ok(())
    }

    /// Inserts `rows`; when ClickHouse refuses them for their content, splits them in
    /// halves until the refused rows stand alone and records their indexes (offset by
    /// `base`) with the reason. One bad row costs about 2 log2(n) extra inserts.
    ///
    /// # Errors
    /// Any failure that is not about content: the caller retries the whole batch, and
    /// the halves already inserted are inserted again, which the dedup absorbs.
    fn insert_splitting(
        &self,
        rows: &[EventRow],
        base: usize,
        refused: &mut Vec<(usize, String)>,
    ) -> Result<(), SinkError> {
        match self.writer.insert(rows) {
            Ok(elapsed) => {
                self.status
                    .insert_succeeded(rows.len(), elapsed.as_micros() as u64);
                debug!(
                    consumer = self.id,
                    batch_rows = rows.len(),
                    elapsed_ms = elapsed.as_millis() as u64,
                    "batch inserted"
                );
                Ok(())
            }
            Err(err) if classify(&err) == FailureKind::Content => {
                if rows.len() == 1 {
                    refused.push((base, source_chain(&err)));
                    return Ok(());
                }
                let mid = rows.len() / 2;
                self.insert_splitting(&rows[..mid], base, refused)?;
                self.insert_splitting(&rows[mid..], base + mid, refused)
            }
            Err(err) => Err(err),
        }
    }

    /// Whether a schema error should be logged at error level now (once a minute).
    fn schema_log_due(&self) -> bool {
        let due = self
            .last_schema_log
            .get()
            .is_none_or(|t| t.elapsed() >= Duration::from_secs(60));
        if due {
            self.last_schema_log.set(Some(Instant::now()));
        }
        due
    }

    /// Sleeps for `wait` while still polling, so the group keeps this member. Records
    /// already fetched before the pause may still arrive; they join the batch.
    fn wait_polling(&self, batch: &mut Batch, wait: Duration) {
        let until = Instant::now() + jitter(wait);
        while Instant::now() < until {
            if let Some(Ok(msg)) = self.consumer.poll(Duration::from_millis(50)) {
                self.add(batch, &msg);
            }
            if self.stop.load(Ordering::Relaxed) && batch.rows.is_empty() {
                return;
            }
        }
    }

    fn pause(&self) -> Option<TopicPartitionList> {
        let assignment = self.consumer.assignment().ok()?;
        match self.consumer.pause(&assignment) {
            Ok(()) => Some(assignment),
            Err(err) => {
                warn!(consumer = self.id, error = %err, "cannot pause partitions");
                None
            }
        }
    }

    fn resume(&self, paused: Option<TopicPartitionList>) {
        if let Some(partitions) = paused {
            if let Err(err) = self.consumer.resume(&partitions) {
                warn!(consumer = self.id, error = %err, "cannot resume partitions");
            }
        }
    }

    fn store_offsets(&self, batch: &Batch) {
        let mut tpl = TopicPartitionList::new();
        for ((topic, partition), next) in &batch.next_offsets {
            if let Err(err) = tpl.add_partition_offset(topic, *partition, Offset::Offset(*next)) {
                warn!(consumer = self.id, topic, partition, error = %err, "bad offset");
            }
        }
        // A partition revoked while the batch was pending is refused here; its new owner
        // re-reads those records, which the event_id dedup absorbs.
        if let Err(err) = self.consumer.store_offsets(&tpl) {
            warn!(consumer = self.id, error = %err,
                "cannot store offsets; records will be re-read");
        }
    }
}

fn next_backoff(current: Duration, max: Duration) -> Duration {
    (current * 2).min(max)
}

/// Up to 20% random jitter so consumers that failed together do not retry together.
fn jitter(wait: Duration) -> Duration {
    wait.mul_f64(1.0 + fastrand::f64() * 0.2)
}

/// The error's causes joined, for one log field.
fn source_chain(err: &dyn std::error::Error) -> String {
    let mut parts = Vec::new();
    let mut source = err.source();
    while let Some(cause) = source {
        parts.push(cause.to_string());
        source = cause.source();
    }
    parts.join(": ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_the_cap() {
        let max = Duration::from_millis(1000);
        let mut b = Duration::from_millis(200);
        let mut seen = vec![];
        for _ in 0..5 {
            seen.push(b.as_millis());
            b = next_backoff(b, max);
        }
        assert_eq!(seen, vec![200, 400, 800, 1000, 1000]);
    }

    #[test]
    fn jitter_stays_within_twenty_percent() {
        let base = Duration::from_millis(1000);
        for _ in 0..100 {
            let j = jitter(base);
            assert!(j >= base && j <= base.mul_f64(1.2), "{j:?}");
        }
    }

    #[test]
    fn batch_is_due_on_rows_or_age() {
        let mut batch = Batch::default();
        assert!(!batch.is_due(2, Duration::from_secs(60)));
        batch.oldest = Some(Instant::now() - Duration::from_secs(2));
        assert!(batch.is_due(2, Duration::from_secs(1)));
    }
}
