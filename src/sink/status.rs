//! What the sink is doing, shared by its consumer threads, `/readyz` and `/metrics`.
//!
//! ClickHouse being down is reported here but never fails ingest readiness: Kafka holds
//! the events until the sink catches up.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Mutex;

use serde::Serialize;

use crate::metrics::histogram::Recorder;

/// ClickHouse as last seen by an insert.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ClickHouseState {
    /// No insert attempted yet.
    Unknown,
    Up,
    Down,
}

/// The part of the status `/readyz` shows.
#[derive(Debug, Clone, Serialize)]
pub struct SinkReport {
    pub consumers_running: usize,
    pub clickhouse: ClickHouseState,
    /// True while a batch is being retried.
    pub retrying: bool,
    /// True while ClickHouse refuses the table or the grant (no row is at fault).
    pub schema_error: bool,
    /// The error of the last failed insert, cleared by the next successful one.
    pub last_error: Option<String>,
    pub rows_inserted: u64,
    pub consumer_lag: i64,
}

#[derive(Debug)]
struct Health {
    clickhouse: ClickHouseState,
    retrying: bool,
    schema_error: bool,
    last_error: Option<String>,
}

/// Shared sink state and counters.
#[derive(Debug)]
pub struct SinkStatus {
    health: Mutex<Health>,
    pub consumers_running: AtomicUsize,
    pub rows_inserted: AtomicU64,
    pub batches_inserted: AtomicU64,
    pub insert_failures: AtomicU64,
    /// Records on the topic that are not valid events (dead-lettered).
    pub invalid_records: AtomicU64,
    /// Records written to the dead-letter topic.
    pub dead_letters: AtomicU64,
    /// Rows ClickHouse refused, written to the retry topic.
    pub retry_letters: AtomicU64,
    /// Rows from the retry topic stored on a later attempt.
    pub retried_rows_stored: AtomicU64,
    /// Retry-topic records read and waiting for their due time.
    pub retry_waiting: AtomicU64,
    /// Rows not inserted because their Kafka position was already in the ledger.
    pub duplicates_redelivered: AtomicU64,
    /// Rows not inserted because their event was earlier in the batch or recently
    /// inserted under another offset.
    pub duplicates_resent: AtomicU64,
    pub batch_rows: Mutex<Recorder>,
    pub insert_us: Mutex<Recorder>,
    /// Consumer lag per (topic, partition), from librdkafka statistics.
    pub lag: Mutex<BTreeMap<(String, i32), i64>>,
}

impl Default for SinkStatus {
    fn default() -> Self {
        Self {
            health: Mutex::new(Health {
                clickhouse: ClickHouseState::Unknown,
                retrying: false,
                schema_error: false,
                last_error: None,
            }),
            consumers_running: AtomicUsize::new(0),
            rows_inserted: AtomicU64::new(0),
            batches_inserted: AtomicU64::new(0),
            insert_failures: AtomicU64::new(0),
            invalid_records: AtomicU64::new(0),
            dead_letters: AtomicU64::new(0),
            retry_letters: AtomicU64::new(0),
            retried_rows_stored: AtomicU64::new(0),
            retry_waiting: AtomicU64::new(0),
            duplicates_redelivered: AtomicU64::new(0),
            duplicates_resent: AtomicU64::new(0),
            batch_rows: Mutex::new(Recorder::new(10_000_000)),
            insert_us: Mutex::new(Recorder::default()),
            lag: Mutex::new(BTreeMap::new()),
        }
    }
}

impl SinkStatus {
    /// Records a successful insert of `rows` rows that took `elapsed_us`.
    pub fn insert_succeeded(&self, rows: usize, elapsed_us: u64) {
        self.rows_inserted.fetch_add(rows as u64, Ordering::Relaxed);
        self.batches_inserted.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut h) = self.batch_rows.lock() {
            h.record(rows as u64);
        }
        if let Ok(mut h) = self.insert_us.lock() {
            h.record(elapsed_us);
        }
        if let Ok(mut health) = self.health.lock() {
            health.clickhouse = ClickHouseState::Up;
            health.retrying = false;
            health.schema_error = false;
            health.last_error = None;
        }
    }

    /// Records a failed write that will be retried; `schema` when ClickHouse refused the
    /// table or grant rather than being unreachable.
    pub fn insert_failed(&self, error: &str, schema: bool) {
        self.insert_failures.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut health) = self.health.lock() {
            health.clickhouse = ClickHouseState::Down;
            health.retrying = true;
            health.schema_error = schema;
            health.last_error = Some(error.to_string());
        }
    }

    /// Replaces the lag figures of the partitions one consumer reported.
    pub fn set_lag(&self, reported: impl IntoIterator<Item = ((String, i32), i64)>) {
        if let Ok(mut lag) = self.lag.lock() {
            for (key, value) in reported {
                lag.insert(key, value.max(0));
            }
        }
    }

    /// Total lag across partitions.
    pub fn total_lag(&self) -> i64 {
        self.lag.lock().map(|l| l.values().sum()).unwrap_or(0)
    }

    /// Snapshot for `/readyz`.
    pub fn report(&self) -> SinkReport {
        let (clickhouse, retrying, schema_error, last_error) = self
            .health
            .lock()
            .map(|h| {
                (
                    h.clickhouse,
                    h.retrying,
                    h.schema_error,
                    h.last_error.clone(),
                )
            })
            .unwrap_or((ClickHouseState::Unknown, false, false, None));
        SinkReport {
            consumers_running: self.consumers_running.load(Ordering::Relaxed),
            clickhouse,
            retrying,
            schema_error,
            last_error,
            rows_inserted: self.rows_inserted.load(Ordering::Relaxed),
            consumer_lag: self.total_lag(),
        }
    }
}
