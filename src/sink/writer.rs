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
    /// # Errors
    /// [`SinkError::Insert`] or [`SinkError::InsertTimeout`]; either way nothing may be
    /// assumed about the rows and the caller retries the whole batch (duplicates are
    /// harmless, see the module docs of [`crate::sink`]).
    pub fn insert(&self, rows: &[EventRow]) -> Result<Duration, SinkError> {
        let started = Instant::now();
        let attempt = async {
            let mut insert = self.client.insert::<EventRow>(EVENTS_TABLE).await?;
            for row in rows {
                insert.write(row).await?;
            }
            insert.end().await
        };
        let outcome = self
            .runtime
            .block_on(async { tokio::time::timeout(self.timeout, attempt).await });
        match outcome {
            Ok(Ok(())) => Ok(started.elapsed()),
            Ok(Err(source)) => Err(SinkError::Insert {
                table: EVENTS_TABLE.into(),
                rows: rows.len(),
                source,
            }),
            Err(_) => Err(SinkError::InsertTimeout {
                table: EVENTS_TABLE.into(),
                rows: rows.len(),
                timeout_ms: self.timeout.as_millis() as u64,
            }),
        }
    }
}
