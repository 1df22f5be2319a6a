//! Inserts batches of rows into `events`, one blocking call per batch.
//!
//! The `clickhouse` crate is async on Tokio; each consumer thread owns a small
//! current-thread runtime and blocks on it, so inserts never touch the ingest shards'
//! executors and no runtime is shared across consumer threads.

use std::time::{Duration, Instant};

use clickhouse::Client;

use super::row::EventRow;
use super::SinkError;
use crate::app::config::ClickHouseConfig;

/// Table the sink writes.
pub const EVENTS_TABLE: &str = "events";

/// A consumer thread's connection to ClickHouse.
pub struct BatchWriter {
    client: Client,
    runtime: tokio::runtime::Runtime,
    timeout: Duration,
}

impl BatchWriter {
    /// Builds the client and the thread's runtime.
    ///
    /// # Errors
    /// [`SinkError::Runtime`] if Tokio cannot start.
    pub fn new(config: &ClickHouseConfig) -> Result<Self, SinkError> {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(SinkError::Runtime)?;
        Ok(Self {
            client: super::clickhouse::client(config),
            runtime,
            timeout: Duration::from_millis(config.request_timeout_ms),
        })
    }

    /// Inserts `rows` as one INSERT (one part in ClickHouse). Returns how long it took.
    ///
    /// Callers insert through [`crate::sink::bisect`], which runs [`crate::sink::dedup`]
    /// first: the aggregates fed by materialized views count every inserted row.
    ///
    /// # Errors
    /// [`SinkError::Insert`] or [`SinkError::InsertTimeout`]; either way nothing may be
    /// assumed about the rows (an insert that timed out may still land). The caller
    /// retries the whole batch, and the ledger check drops what did land.
    pub fn insert(&self, rows: &[EventRow]) -> Result<Duration, SinkError> {
        self.insert_rows(rows.iter(), rows.len())
    }

    /// As [`Self::insert`], for rows picked out of a batch (what dedup kept) without
    /// copying them.
    ///
    /// # Errors
    /// As [`Self::insert`].
    pub fn insert_rows<'a>(
        &self,
        rows: impl Iterator<Item = &'a EventRow>,
        count: usize,
    ) -> Result<Duration, SinkError> {
        let started = Instant::now();
        let attempt = async {
            let mut insert = self.client.insert::<EventRow>(EVENTS_TABLE).await?;
            for row in rows {
                insert.write(row).await?;
            }
            insert.end().await
        };
        match self.run_bounded(attempt) {
            Some(Ok(())) => Ok(started.elapsed()),
            Some(Err(source)) => Err(SinkError::Insert {
                table: EVENTS_TABLE.into(),
                rows: count,
                source,
            }),
            None => Err(SinkError::InsertTimeout {
                table: EVENTS_TABLE.into(),
                rows: count,
                timeout_ms: self.timeout_ms(),
            }),
        }
    }

    /// The client, for the dedup queries that must reach the same server and database.
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// Runs `work` on this thread's runtime, cut off after `clickhouse.request_timeout_ms`
    /// (`None`), so no ClickHouse call can hang a consumer thread.
    pub fn run_bounded<F: std::future::Future>(&self, work: F) -> Option<F::Output> {
        self.runtime
            .block_on(async { tokio::time::timeout(self.timeout, work).await })
            .ok()
    }

    /// `clickhouse.request_timeout_ms`, for error messages.
    pub fn timeout_ms(&self) -> u64 {
        self.timeout.as_millis() as u64
    }
}
