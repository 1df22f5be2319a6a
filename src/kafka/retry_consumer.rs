//! The retry-topic consumer: gives rows ClickHouse refused for their content more
//! attempts, with growing delays, before dead-lettering them.
//!
//! One thread per process, in its own consumer group (the sink's group + `.retry`). It
//! reads `fanfinity.events.retry` into a FIFO in arrival order and waits until the
//! record at the head is due (`fanfinity-next-attempt-at-ms`), then inserts every due
//! record at the head as one batch, split around refusals like the main sink. For each
//! row refused again it writes either a new retry letter (attempt + 1, next delay) or,
//! once `sink.retry_topic_attempts` are used up, a dead letter with the first and last
//! reason. Offsets are stored only after the insert and those letters are acknowledged;
//! since the FIFO is handled from the head, the handled records of each partition are
//! always a prefix of what was read, and the stored offset covers exactly them.
//!
//! While a write fails for reasons that are not the rows' (ClickHouse down, schema), the
//! batch is retried in place with backoff, as in the main sink.
//!
//! # Trade-offs
//! - Head-of-line waiting: a record is never tried before the one read before it, even
//!   if its own delay is shorter (a third attempt waiting behind a first). It waits at
//!   most `sink.retry_topic_delay_max_ms` extra; in exchange the offsets stay a plain
//!   prefix and nothing is held out of order.
//! - What is read but not yet due is held in memory, up to [`MAX_WAITING`] records or
//!   [`MAX_WAITING_BYTES`]; past either, the partitions are paused until the head
//!   drains (plus what librdkafka had already fetched, at most its
//!   `queued.max.messages.kbytes`). Records held at a crash or shutdown were never committed and are read
//!   again by the next owner.
//! - A crash after the writes but before the offset commit repeats an attempt: the row's
//!   insert is dropped by the ledger check (retried rows keep their events-topic
//!   partition and offset, see `sink::dedup`), but it may get one extra retry or dead
//!   letter.
//! - The recent window of this thread is warmed once per events partition and sees only
//!   its own inserts: a resend of a retried event inserted meanwhile by a main sink
//!   thread (the refusal healed) counts twice in the aggregates, as does an insert still
//!   running in ClickHouse when its retry reads the ledger.

use std::cell::Cell;
use std::collections::{BTreeMap, HashSet, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::message::{BorrowedMessage, Message};
use rdkafka::TopicPartitionList;
use tracing::{debug, info, warn};

use super::consumer::{
    create_consumer, pause_all, report_write_failure, resume, retry_group, send_letters,
    store_next_offsets, ConsumeError, SinkContext, WriteFailure,
};
use super::dead_letter::{DeadLetter, SideTopicWriter};
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

/// Records held while waiting for their due time before the partitions are paused.
pub const MAX_WAITING: usize = 10_000;
/// Bytes of payload held while waiting before the partitions are paused.
pub const MAX_WAITING_BYTES: usize = 32 * 1024 * 1024;

/// The name in this thread's logs (`consumer` field).
const NAME: &str = "retry";

/// One record read from the retry topic.
struct Held {
    partition: i32,
    offset: i64,
    /// `Err` when the record is not a readable retry letter: it goes to the dead topic.
    letter: Result<RetryLetter, DeadLetter>,
}

impl Held {
    fn due_in_ms(&self, now: i64) -> u64 {
        match &self.letter {
            Ok(letter) => letter.wait_ms(now),
            Err(_) => 0,
        }
    }

    fn bytes(&self) -> usize {
        match &self.letter {
            Ok(letter) => letter.payload.len(),
            Err(dead) => dead.payload.len(),
        }
    }
}

/// What one pass over the due records has still to write.
#[derive(Default)]
struct Attempt {
    /// Due letters whose rows are not inserted yet.
    letters: Vec<RetryLetter>,
    rows: Vec<EventRow>,
    retries: Vec<RetryLetter>,
    dead: Vec<DeadLetter>,
    next_offsets: BTreeMap<(String, i32), i64>,
}

/// The retry-topic consumer thread's state.
pub struct RetryWorker {
    consumer: BaseConsumer<SinkContext>,
    writer: BatchWriter,
    /// Drops rows already in ClickHouse before each insert, by their events-topic
    /// position and event id.
    dedup: Dedup,
    letters: SideTopicWriter,
    status: Arc<SinkStatus>,
    stop: Arc<AtomicBool>,
    topic: String,
    max_attempts: u32,
    delay: Duration,
    delay_max: Duration,
    max_rows: usize,
    retry_min: Duration,
    retry_max: Duration,
    drain_deadline: Duration,
    held: VecDeque<Held>,
    held_bytes: usize,
    paused: Option<TopicPartitionList>,
    seen_rebalances: u64,
    last_schema_log: Cell<Option<Instant>>,
}

impl RetryWorker {
    /// Creates the consumer (subscribed to `kafka.retry_topic`), its ClickHouse writer
    /// and its letter producer.
    ///
    /// # Errors
    /// As [`super::consumer::spawn_consumers`].
    pub fn new(
        config: &Config,
        status: Arc<SinkStatus>,
        stop: Arc<AtomicBool>,
        drain_deadline: Duration,
    ) -> Result<Self, ConsumeError> {
        let consumer = create_consumer(
            config,
            NAME,
            &retry_group(config),
            &config.kafka.retry_topic,
            Arc::clone(&status),
        )?;
        Ok(Self {
            consumer,
            writer: BatchWriter::new(&config.clickhouse)?,
            dedup: Dedup::new(NAME, config.sink.dedup_window),
            letters: SideTopicWriter::new(&config.kafka, "retry-letters")?,
            status,
            stop,
            topic: config.kafka.retry_topic.clone(),
            max_attempts: config.sink.retry_topic_attempts,
            delay: Duration::from_millis(config.sink.retry_topic_delay_ms),
            delay_max: Duration::from_millis(config.sink.retry_topic_delay_max_ms),
            max_rows: config.sink.max_batch_rows,
            retry_min: Duration::from_millis(config.sink.retry_min_ms),
            retry_max: Duration::from_millis(config.sink.retry_max_ms),
            drain_deadline,
            held: VecDeque::new(),
            held_bytes: 0,
            paused: None,
            seen_rebalances: 0,
            last_schema_log: Cell::new(None),
        })
    }

    /// Runs until `stop` is set; then finishes a due batch it is writing (within the
    /// drain deadline), commits and closes. Records held but not due are left to the
    /// next start.
    pub fn run(mut self) {
        self.status
            .consumers_running
            .fetch_add(1, Ordering::Relaxed);
        while !self.stop.load(Ordering::Relaxed) {
            let wait = self
                .held
                .front()
                .map_or(100, |h| h.due_in_ms(now_ms()).min(100));
            self.hold_next(Duration::from_millis(wait.max(1)));
            self.forget_revoked();
            self.apply_memory_bound();
            let mut attempt = self.take_due();
            if !attempt.next_offsets.is_empty() {
                self.finish(&mut attempt);
            }
        }
        if !self.held.is_empty() {
            info!(
                consumer = NAME,
                held = self.held.len(),
                "stopping with retry records not yet due; they stay uncommitted"
            );
        }
        match self.consumer.commit_consumer_state(CommitMode::Sync) {
            Ok(()) => info!(consumer = NAME, "offsets committed at close"),
            Err(err) => debug!(consumer = NAME, error = %err, "nothing to commit at close"),
        }
        self.status
            .consumers_running
            .fetch_sub(1, Ordering::Relaxed);
        info!(consumer = NAME, "retry consumer stopped");
    }

    fn hold_next(&mut self, wait: Duration) {
        if let Some(result) = self.consumer.poll(wait) {
            match result {
                Ok(msg) => hold(&mut self.held, &mut self.held_bytes, &msg),
                Err(err) => warn!(consumer = NAME, error = %err, "poll failed"),
            }
        }
        self.status
            .retry_waiting
            .store(self.held.len() as u64, Ordering::Relaxed);
    }

    /// After a rebalance, drops held records of partitions this member lost: their new
    /// owner reads them from the committed offset.
    fn forget_revoked(&mut self) {
        let rebalances = self.consumer.context().rebalances.load(Ordering::Relaxed);
        if rebalances == self.seen_rebalances {
            return;
        }
        self.seen_rebalances = rebalances;
        let owned: HashSet<i32> = self
            .consumer
            .assignment()
            .map(|tpl| tpl.elements().iter().map(|e| e.partition()).collect())
            .unwrap_or_default();
        let before = self.held.len();
        self.held.retain(|h| owned.contains(&h.partition));
        self.held_bytes = self.held.iter().map(Held::bytes).sum();
        if self.held.len() != before {
            info!(
                consumer = NAME,
                dropped = before - self.held.len(),
                "dropped held retry records of revoked partitions"
            );
        }
        // A pause does not survive a rebalance's new assignment; decide again.
        self.paused = None;
    }

    /// Pauses fetching while too much is held; resumes once half of it is gone.
    fn apply_memory_bound(&mut self) {
        let full = self.held.len() >= MAX_WAITING || self.held_bytes >= MAX_WAITING_BYTES;
        let low = self.held.len() < MAX_WAITING / 2 && self.held_bytes < MAX_WAITING_BYTES / 2;
        if full && self.paused.is_none() {
            info!(
                consumer = NAME,
                held = self.held.len(),
                held_bytes = self.held_bytes,
                "holding the limit of retry records; pausing the retry topic"
            );
            self.paused = pause_all(&self.consumer);
        } else if low && self.paused.is_some() {
            resume(&self.consumer, self.paused.take());
        }
    }

    /// Takes the due records at the head of the FIFO (at most a batch).
    fn take_due(&mut self) -> Attempt {
        let now = now_ms();
        let mut attempt = Attempt::default();
        while attempt.letters.len() < self.max_rows
            && self.held.front().is_some_and(|h| h.due_in_ms(now) == 0)
        {
            let Some(held) = self.held.pop_front() else {
                break;
            };
            self.held_bytes = self.held_bytes.saturating_sub(held.bytes());
            attempt
                .next_offsets
                .insert((self.topic.clone(), held.partition), held.offset + 1);
            match held.letter {
                Ok(letter) => match EventRecord::decode(&letter.payload) {
                    Ok(record) => {
                        let position = KafkaPosition {
                            partition: letter.source_partition,
                            offset: letter.source_offset,
                        };
                        attempt.rows.push(EventRow::from_record(record, position));
                        attempt.letters.push(letter);
                    }
                    Err(err) => {
                        let attempts = letter.attempt;
                        let reason = format!("not a valid event: {err}");
                        attempt
                            .dead
                            .push(DeadLetter::from_retry(letter, attempts, reason));
                    }
                },
                Err(dead) => attempt.dead.push(dead),
            }
        }
        self.status
            .retry_waiting
            .store(self.held.len() as u64, Ordering::Relaxed);
        attempt
    }

    /// Writes the attempt, retrying in place while ClickHouse or Kafka fail, then stores
    /// its offsets. Once a stop is requested it keeps trying for `drain_deadline` only;
    /// then the records stay uncommitted and are read again on the next start.
    fn finish(&mut self, attempt: &mut Attempt) {
        let mut deadline: Option<Instant> = None;
        let mut backoff = self.retry_min;
        let mut paused: Option<TopicPartitionList> = None;
        while let Err((kind, error)) = self.write(attempt) {
            let failure = WriteFailure {
                consumer: NAME,
                kind,
                error: &error,
                rows: attempt.rows.len(),
                retry_in: backoff,
            };
            report_write_failure(&failure, &self.status, &self.last_schema_log);
            if deadline.is_none() && self.stop.load(Ordering::Relaxed) {
                deadline = Some(Instant::now() + self.drain_deadline);
            }
            if deadline.is_some_and(|d| Instant::now() + backoff > d) {
                resume(&self.consumer, paused.take());
                return;
            }
            if paused.is_none() && self.paused.is_none() {
                paused = pause_all(&self.consumer);
            }
            self.wait_polling(jitter(backoff));
            backoff = next_backoff(backoff, self.retry_max);
        }
        resume(&self.consumer, paused.take());
        store_next_offsets(&self.consumer, &attempt.next_offsets);
    }

    /// One try at the attempt: rows first, then the new retry letters and dead letters.
    /// What succeeded is cleared, so a repeat only redoes the rest.
    fn write(&mut self, attempt: &mut Attempt) -> Result<(), (FailureKind, String)> {
        if !attempt.rows.is_empty() {
            let refused = insert_around_refusals(
                &self.writer,
                &mut self.dedup,
                &self.status,
                &attempt.rows,
                NAME,
            )
            .map_err(|err| (classify(&err), format!("{err}: {}", error_chain(&err))))?;
            let stored = attempt.rows.len() - refused.len();
            self.status
                .retried_rows_stored
                .fetch_add(stored as u64, Ordering::Relaxed);
            if stored > 0 {
                info!(consumer = NAME, rows = stored, "retried rows stored");
            }
            let mut refused = refused.into_iter().peekable();
            let now = now_ms();
            for (index, letter) in std::mem::take(&mut attempt.letters).into_iter().enumerate() {
                let Some(refusal) = refused.next_if(|r| r.index == index) else {
                    continue;
                };
                self.refused_again(attempt, letter, &refusal.reason, now);
            }
            attempt.rows.clear();
        }
        send_letters(
            &self.letters,
            &self.status,
            NAME,
            &mut attempt.retries,
            &mut attempt.dead,
        )
    }

    /// Routes a row refused once more: another retry letter, or a dead letter when its
    /// attempts are used up.
    fn refused_again(&self, attempt: &mut Attempt, letter: RetryLetter, reason: &str, now: i64) {
        let refusals = letter.attempt.saturating_add(1);
        if refusals > self.max_attempts {
            warn!(
                consumer = NAME,
                source_partition = letter.source_partition,
                source_offset = letter.source_offset,
                attempts = refusals,
                reason,
                "clickhouse refused a row on its last attempt, dead-lettering it"
            );
            let last = format!("clickhouse refused the row {refusals} times, last: {reason}");
            attempt
                .dead
                .push(DeadLetter::from_retry(letter, refusals, last));
        } else {
            let delay = delay_after(refusals, self.delay, self.delay_max);
            warn!(
                consumer = NAME,
                source_partition = letter.source_partition,
                source_offset = letter.source_offset,
                attempts = refusals,
                retry_in_ms = delay.as_millis() as u64,
                reason,
                "clickhouse refused a retried row again"
            );
            attempt
                .retries
                .push(letter.refused_again(reason, now, delay));
        }
    }

    /// Sleeps for `wait` while still polling, so the group keeps this member.
    fn wait_polling(&mut self, wait: Duration) {
        let until = Instant::now() + wait;
        while Instant::now() < until {
            self.hold_next(Duration::from_millis(50));
        }
    }
}

/// Reads a retry-topic record into the FIFO; one that is not a readable retry letter is
/// held as the dead letter it becomes.
fn hold(held: &mut VecDeque<Held>, held_bytes: &mut usize, msg: &BorrowedMessage<'_>) {
    let payload = msg.payload().unwrap_or_default();
    let letter = RetryLetter::from_record(msg.key(), payload, msg.headers()).map_err(|reason| {
        warn!(
            consumer = NAME,
            partition = msg.partition(),
            offset = msg.offset(),
            reason,
            "unreadable retry record, dead-lettering it"
        );
        DeadLetter::unreadable(msg, reason)
    });
    let record = Held {
        partition: msg.partition(),
        offset: msg.offset(),
        letter,
    };
    *held_bytes += record.bytes();
    held.push_back(record);
}
