//! Sink consumer threads: drain `fanfinity.events` into ClickHouse in batches.
//!
//! Each thread is one member of the consumer group, pinned to a core, with its own
//! [`BatchWriter`]. The loop is: poll, add the record to the batch, and flush when the
//! batch reaches `sink.max_batch_rows` rows or its oldest row is `sink.flush_interval_ms`
//! old. Offsets are stored only after the insert holding them succeeded, and committed by
//! librdkafka's auto-commit, on revoke and at close: at-least-once delivery. Because the
//! aggregates count every inserted row, each insert first goes through `sink::dedup`
//! (the thread's [`Dedup`]): rows whose Kafka position is already in `event_ledger`, repeats
//! in the batch and recent resends of an event are dropped, and their offsets stored as
//! if inserted (they are in ClickHouse). A failed dedup query is retried like a failed
//! insert. What still counts twice in the aggregates: a resend older than
//! `sink.dedup_window`, an insert still running in ClickHouse when its retry reads the
//! ledger, and a zombie member inserting after a rebalance gave its partitions away.
//!
//! While an insert fails, the thread pauses its partitions and keeps polling between
//! attempts, so it stays in the group (no `max.poll.interval.ms` eviction) and its
//! memory stays bounded by what was already fetched.
//!
//! Records that are not valid events go to the dead-letter topic with the reason. Rows
//! ClickHouse refuses for their content (found by splitting the batch until the refused
//! rows stand alone, see `sink::bisect`) go to the retry topic, where
//! [`super::retry_consumer`] gives them `sink.retry_topic_attempts` more tries before
//! dead-lettering them; the rest of the batch is inserted. Offsets are stored only once
//! the insert and every retry and dead letter are acknowledged. Schema and permission
//! errors pause the sink without dropping anything (see `sink::classify`).

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

use super::dead_letter::{DeadLetter, DeadLetterError, SideTopicWriter};
use super::retry_consumer::RetryWorker;
use super::retry_letter::{delay_after, now_ms, RetryLetter};
use crate::app::config::Config;
use crate::event::EventRecord;
use crate::sink::backoff::{jitter, next_backoff};
use crate::sink::bisect::{error_chain, insert_around_refusals};
use crate::sink::classify::{classify, FailureKind};
use crate::sink::dedup::Dedup;
use crate::sink::row::{EventRow, KafkaPosition};
use crate::sink::status::SinkStatus;
use crate::sink::writer::BatchWriter;
use crate::sink::SinkError;

/// Why a consumer thread could not start or stopped.
#[derive(Debug, thiserror::Error)]
pub enum ConsumeError {
    #[error("cannot create kafka consumer {consumer}")]
    Create {
        consumer: String,
        #[source]
        source: Box<KafkaError>,
    },
    #[error("cannot subscribe consumer {consumer} to {topic}")]
    Subscribe {
        consumer: String,
        topic: String,
        #[source]
        source: Box<KafkaError>,
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
pub(super) struct SinkContext {
    /// `sink-0`, `sink-1`, ... or `retry`: the `consumer` field of its logs.
    consumer: String,
    status: Arc<SinkStatus>,
    /// Bumped after every rebalance, so a worker holding records can drop those of
    /// partitions it no longer owns.
    pub(super) rebalances: std::sync::atomic::AtomicU64,
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
        warn!(consumer = %self.consumer, error = %err, reason, "kafka consumer error");
    }
}

impl ConsumerContext for SinkContext {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Revoke(partitions) = rebalance {
            // Stored offsets only ever cover inserted rows, so committing them is safe.
            match consumer.commit_consumer_state(CommitMode::Sync) {
                Ok(()) => info!(
                    consumer = %self.consumer,
                    partitions = partitions.count(),
                    "partitions revoked, stored offsets committed"
                ),
                Err(err) => debug!(consumer = %self.consumer, error = %err,
                    "nothing committed on revoke"),
            }
        }
    }

    fn post_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        self.rebalances.fetch_add(1, Ordering::Relaxed);
        if let Rebalance::Assign(partitions) = rebalance {
            info!(
                consumer = %self.consumer,
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
    /// Refused rows to write to the retry topic before the offsets may move.
    retries: Vec<RetryLetter>,
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
    /// `sink-0`, ... or `retry`: the `consumer` field of the thread's logs.
    pub name: String,
    thread: JoinHandle<()>,
}

impl ConsumerHandle {
    /// Waits for the thread to finish its last batch and close.
    pub fn join(self) {
        if self.thread.join().is_err() {
            error!(consumer = %self.name, "consumer thread panicked");
        }
    }
}

/// Starts `consumer.threads` consumer threads and the retry-topic consumer. They run
/// until `stop` is set, then flush their batch (retrying until `drain_deadline` after
/// the stop), commit and close.
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
        let name = format!("sink-{id}");
        let consumer = create_consumer(
            config,
            &name,
            &config.consumer.group_id,
            &config.kafka.topic,
            Arc::clone(&status),
        )?;
        let writer = BatchWriter::new(&config.clickhouse)?;
        let core = cores.get(id % cores.len().max(1)).copied();
        let letters = SideTopicWriter::new(&config.kafka, &format!("{name}-letters"))?;
        let worker = Worker {
            dedup: Dedup::new(&name, config.sink.dedup_window),
            seen_rebalances: 0,
            name: name.clone(),
            consumer,
            writer,
            letters,
            topic: config.kafka.topic.clone(),
            retry_attempts: config.sink.retry_topic_attempts,
            retry_delay: Duration::from_millis(config.sink.retry_topic_delay_ms),
            retry_delay_max: Duration::from_millis(config.sink.retry_topic_delay_max_ms),
            last_schema_log: Cell::new(None),
            drain_until: std::cell::OnceCell::new(),
            status: Arc::clone(&status),
            stop: Arc::clone(&stop),
            max_rows: config.sink.max_batch_rows,
            max_age: Duration::from_millis(config.sink.flush_interval_ms),
            retry_min: Duration::from_millis(config.sink.retry_min_ms),
            retry_max: Duration::from_millis(config.sink.retry_max_ms),
            drain_deadline,
        };
        let thread_name = name.clone();
        let thread = std::thread::Builder::new()
            .name(name.clone())
            .spawn(move || {
                if let Some(core) = core {
                    let pinned = core_affinity::set_for_current(core_affinity::CoreId { id: core });
                    info!(consumer = %thread_name, core, pinned, "consumer thread started");
                }
                worker.run();
            })
            .map_err(|source| ConsumeError::Spawn {
                consumer: id,
                source,
            })?;
        handles.push(ConsumerHandle { name, thread });
    }
    let retry = RetryWorker::new(config, Arc::clone(&status), stop, drain_deadline)?;
    let core = cores.first().copied();
    let id = handles.len();
    let thread = std::thread::Builder::new()
        .name("sink-retry".into())
        .spawn(move || {
            if let Some(core) = core {
                let pinned = core_affinity::set_for_current(core_affinity::CoreId { id: core });
                info!(
                    consumer = "retry",
                    core, pinned, "retry consumer thread started"
                );
            }
            retry.run();
        })
        .map_err(|source| ConsumeError::Spawn {
            consumer: id,
            source,
        })?;
    handles.push(ConsumerHandle {
        name: "retry".into(),
        thread,
    });
    Ok(handles)
}

/// The consumer group of the retry-topic consumers: the sink's group with `.retry`
/// appended, so joining it never rebalances the main sink.
pub(super) fn retry_group(config: &Config) -> String {
    format!("{}.retry", config.consumer.group_id)
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

/// A consumer in `group` subscribed to `topic` that stores offsets only when told to.
pub(super) fn create_consumer(
    config: &Config,
    name: &str,
    group: &str,
    topic: &str,
    status: Arc<SinkStatus>,
) -> Result<BaseConsumer<SinkContext>, ConsumeError> {
    let consumer: BaseConsumer<SinkContext> = ClientConfig::new()
        .set("bootstrap.servers", &config.kafka.brokers)
        .set("group.id", group)
        .set("client.id", format!("{}-{name}", config.kafka.client_id))
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
            consumer: name.to_string(),
            status,
            rebalances: std::sync::atomic::AtomicU64::new(0),
        })
        .map_err(|source| ConsumeError::Create {
            consumer: name.to_string(),
            source: Box::new(source),
        })?;
    consumer
        .subscribe(&[topic])
        .map_err(|source| ConsumeError::Subscribe {
            consumer: name.to_string(),
            topic: topic.to_string(),
            source: Box::new(source),
        })?;
    Ok(consumer)
}

struct Worker {
    /// `sink-0`, `sink-1`, ...: the `consumer` field of its logs.
    name: String,
    consumer: BaseConsumer<SinkContext>,
    writer: BatchWriter,
    /// Drops rows already in ClickHouse before each insert.
    dedup: Dedup,
    /// Rebalances seen by `dedup`: after one, partitions are warmed again.
    seen_rebalances: u64,
    letters: SideTopicWriter,
    /// The events topic, named in retry and dead letters.
    topic: String,
    /// `sink.retry_topic_attempts`: 0 sends refused rows straight to the dead topic.
    retry_attempts: u32,
    retry_delay: Duration,
    retry_delay_max: Duration,
    last_schema_log: Cell<Option<Instant>>,
    /// Set when the stop is first seen: the end of the drain.
    drain_until: std::cell::OnceCell<Instant>,
    status: Arc<SinkStatus>,
    stop: Arc<AtomicBool>,
    max_rows: usize,
    max_age: Duration,
    retry_min: Duration,
    retry_max: Duration,
    drain_deadline: Duration,
}

impl Worker {
    fn run(mut self) {
        self.status
            .consumers_running
            .fetch_add(1, Ordering::Relaxed);
        let mut batch = Batch::default();

        while !self.stop.load(Ordering::Relaxed) {
            if let Some(result) = self.consumer.poll(Duration::from_millis(100)) {
                match result {
                    Ok(msg) => self.add(&mut batch, &msg),
                    Err(err) => warn!(consumer = %self.name, error = %err, "poll failed"),
                }
            }
            if batch.is_due(self.max_rows, self.max_age) {
                self.flush(&mut batch);
            }
        }

        if !batch.is_empty() {
            self.flush(&mut batch);
        }
        if !batch.is_empty() {
            error!(
                consumer = %self.name,
                batch_rows = batch.rows.len(),
                "stopping with an uninserted batch; its offsets stay uncommitted and \
                 the rows will be consumed again"
            );
        }
        match self.consumer.commit_consumer_state(CommitMode::Sync) {
            Ok(()) => info!(consumer = %self.name, "offsets committed at close"),
            Err(err) => debug!(consumer = %self.name, error = %err, "nothing to commit at close"),
        }
        self.status
            .consumers_running
            .fetch_sub(1, Ordering::Relaxed);
        info!(consumer = %self.name, "consumer stopped");
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
                    consumer = %self.name,
                    topic = msg.topic(),
                    partition = msg.partition(),
                    offset = msg.offset(),
                    reason,
                    "dead-lettering a record that is not an event"
                );
                batch.dead.push(DeadLetter::unreadable(msg, reason));
            }
        }
    }

    /// Writes the batch (retrying with capped exponential backoff while partitions are
    /// paused), then stores its offsets. Once a stop is requested it keeps trying until
    /// the drain deadline only, then leaves the batch in place (uncommitted).
    fn flush(&mut self, batch: &mut Batch) {
        let mut backoff = self.retry_min;
        let mut paused: Option<TopicPartitionList> = None;
        let mut failed_attempts = 0u32;
        let started = Instant::now();
        while let Err((kind, error)) = self.write(batch) {
            failed_attempts += 1;
            let failure = WriteFailure {
                consumer: &self.consumer.context().consumer,
                kind,
                error: &error,
                rows: batch.rows.len(),
                retry_in: backoff,
            };
            report_write_failure(&failure, &self.status, &self.last_schema_log);
            // A stop during a long outage must not hang shutdown: from then on the
            // drain deadline applies, and what is not written stays uncommitted.
            let deadline = self.stop.load(Ordering::Relaxed).then(|| {
                *self
                    .drain_until
                    .get_or_init(|| Instant::now() + self.drain_deadline)
            });
            if deadline.is_some_and(|d| Instant::now() + backoff > d) {
                resume(&self.consumer, paused.take());
                return;
            }
            if paused.is_none() {
                paused = pause_all(&self.consumer);
            }
            self.wait_polling(batch, backoff);
            backoff = next_backoff(backoff, self.retry_max);
        }
        if failed_attempts > 0 {
            info!(consumer = %self.name, failed_attempts,
                stalled_ms = started.elapsed().as_millis() as u64,
                "batch written after retries, sink resumed");
        }
        resume(&self.consumer, paused.take());
        store_next_offsets(&self.consumer, &batch.next_offsets);
        *batch = Batch::default();
    }

    /// One attempt at writing the batch: rows first (rows refused for their content are
    /// moved to the retry or dead letters), then the letters. Parts already written are
    /// cleared from the batch, so a retry only redoes what is left.
    fn write(&mut self, batch: &mut Batch) -> Result<(), (FailureKind, String)> {
        let rebalances = self.consumer.context().rebalances.load(Ordering::Relaxed);
        if rebalances != self.seen_rebalances {
            self.seen_rebalances = rebalances;
            self.dedup.forget_warmth();
        }
        if !batch.rows.is_empty() {
            let refused = insert_around_refusals(
                &self.writer,
                &mut self.dedup,
                &self.status,
                &batch.rows,
                &self.name,
            )
            .map_err(|err| (classify(&err), format!("{err}: {}", error_chain(&err))))?;
            for refusal in refused.into_iter().rev() {
                let source = batch.sources.swap_remove(refusal.index);
                warn!(
                    consumer = %self.name,
                    partition = source.partition,
                    offset = source.offset,
                    reason = refusal.reason,
                    to_retry = self.retry_attempts > 0,
                    "clickhouse refused a row, setting it aside"
                );
                self.set_aside(batch, source, &refusal.reason);
            }
            batch.rows.clear();
            batch.sources.clear();
        }
        send_letters(
            &self.letters,
            &self.status,
            &self.name,
            &mut batch.retries,
            &mut batch.dead,
        )
    }

    /// Queues a refused row for the retry topic, or for the dead topic when retries are
    /// off.
    fn set_aside(&self, batch: &mut Batch, source: RowSource, reason: &str) {
        if self.retry_attempts == 0 {
            batch.dead.push(DeadLetter {
                key: source.key,
                payload: source.payload,
                reason: format!("clickhouse refused the row: {reason}"),
                source_topic: self.topic.clone(),
                source_partition: source.partition,
                source_offset: source.offset,
                attempts: 1,
                first_error: None,
            });
            return;
        }
        let delay = delay_after(1, self.retry_delay, self.retry_delay_max);
        batch.retries.push(RetryLetter::first(
            source.key,
            source.payload,
            reason,
            &self.topic,
            source.partition,
            source.offset,
            now_ms(),
            delay,
        ));
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
}

/// Writes the retry and dead letters a write produced, waits for every acknowledgement,
/// counts them, and clears each list once it is acknowledged (so a repeat after a
/// failure only resends what is left).
pub(super) fn send_letters(
    letters: &SideTopicWriter,
    status: &SinkStatus,
    consumer: &str,
    retries: &mut Vec<RetryLetter>,
    dead: &mut Vec<DeadLetter>,
) -> Result<(), (FailureKind, String)> {
    if !retries.is_empty() {
        letters
            .send_retries(retries)
            .map_err(|err| (FailureKind::Transient, err.to_string()))?;
        status
            .retry_letters
            .fetch_add(retries.len() as u64, Ordering::Relaxed);
        info!(
            consumer,
            retry_letters = retries.len(),
            topic = letters.retry_topic(),
            "refused rows written to the retry topic"
        );
        retries.clear();
    }
    if !dead.is_empty() {
        letters
            .send_all(dead)
            .map_err(|err| (FailureKind::Transient, err.to_string()))?;
        status
            .dead_letters
            .fetch_add(dead.len() as u64, Ordering::Relaxed);
        info!(
            consumer,
            dead_letters = dead.len(),
            topic = letters.topic(),
            "dead letters written"
        );
        dead.clear();
    }
    Ok(())
}

/// Records a failed write in the sink status and logs it: schema errors at error level
/// once a minute (they need an operator), everything else as a warning per attempt.
pub(super) fn report_write_failure(
    failure: &WriteFailure<'_>,
    status: &SinkStatus,
    last_schema_log: &Cell<Option<Instant>>,
) {
    let schema = failure.kind == FailureKind::Schema;
    status.insert_failed(failure.error, schema);
    let log_due = last_schema_log
        .get()
        .is_none_or(|t| t.elapsed() >= Duration::from_secs(60));
    if schema && log_due {
        last_schema_log.set(Some(Instant::now()));
        error!(
            consumer = failure.consumer,
            batch_rows = failure.rows,
            error = failure.error,
            "clickhouse refuses the sink's table or grant; paused until fixed, \
             nothing is dropped"
        );
    } else {
        warn!(consumer = failure.consumer, batch_rows = failure.rows,
            retry_in_ms = failure.retry_in.as_millis() as u64, kind = ?failure.kind,
            error = failure.error, "batch write failed, retrying");
    }
}

/// One failed write attempt, as [`report_write_failure`] logs it.
pub(super) struct WriteFailure<'a> {
    pub consumer: &'a str,
    pub kind: FailureKind,
    pub error: &'a str,
    pub rows: usize,
    pub retry_in: Duration,
}

/// Pauses every assigned partition (no more fetching while a write is retried) and
/// returns them for [`resume`].
pub(super) fn pause_all(consumer: &BaseConsumer<SinkContext>) -> Option<TopicPartitionList> {
    let assignment = consumer.assignment().ok()?;
    match consumer.pause(&assignment) {
        Ok(()) => Some(assignment),
        Err(err) => {
            warn!(consumer = %consumer.context().consumer, error = %err,
                "cannot pause partitions");
            None
        }
    }
}

pub(super) fn resume(consumer: &BaseConsumer<SinkContext>, paused: Option<TopicPartitionList>) {
    if let Some(partitions) = paused {
        if let Err(err) = consumer.resume(&partitions) {
            warn!(consumer = %consumer.context().consumer, error = %err,
                "cannot resume partitions");
        }
    }
}

/// Stores the next offset to commit per (topic, partition); auto-commit sends them.
pub(super) fn store_next_offsets(
    consumer: &BaseConsumer<SinkContext>,
    next_offsets: &BTreeMap<(String, i32), i64>,
) {
    let name = &consumer.context().consumer;
    let mut tpl = TopicPartitionList::new();
    for ((topic, partition), next) in next_offsets {
        if let Err(err) = tpl.add_partition_offset(topic, *partition, Offset::Offset(*next)) {
            warn!(consumer = %name, topic, partition, error = %err, "bad offset");
        }
    }
    // A partition revoked while the batch was pending is refused here; its new owner
    // re-reads those records and drops them by the ledger (`sink::dedup`).
    if let Err(err) = consumer.store_offsets(&tpl) {
        warn!(consumer = %name, error = %err, "cannot store offsets; records will be re-read");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batch_is_due_on_rows_or_age() {
        let mut batch = Batch::default();
        assert!(!batch.is_due(2, Duration::from_secs(60)));
        batch.oldest = Some(Instant::now() - Duration::from_secs(2));
        assert!(batch.is_due(2, Duration::from_secs(1)));
    }
}
