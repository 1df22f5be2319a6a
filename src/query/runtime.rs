//! The Tokio runtime that runs ClickHouse queries for every shard.
//!
//! Shards are glommio executors; the `clickhouse` crate needs Tokio. A shard spawns the
//! query here and awaits the join handle, which Tokio completes from its own thread
//! (glommio accepts such cross-thread wakes). One or two worker threads are plenty: a
//! query spends its time waiting on ClickHouse, not on CPU.

use std::sync::Arc;
use std::time::Duration;

use clickhouse::Client;

use super::metrics::{fetch_match_metrics, MatchMetrics};
use super::params::MetricsParams;
use super::QueryError;
use crate::app::config::Config;

/// Runs queries off the shards.
pub struct QueryRuntime {
    runtime: tokio::runtime::Runtime,
    client: Client,
    max_buckets: u64,
    timeout: Duration,
}

impl QueryRuntime {
    /// Starts `query.threads` Tokio workers.
    ///
    /// # Errors
    /// Tokio failing to start its threads.
    pub fn start(config: &Config) -> std::io::Result<Arc<Self>> {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(config.query.threads)
            .thread_name("query")
            .enable_all()
            .build()?;
        Ok(Arc::new(Self {
            runtime,
            // ClickHouse stops the query itself at the deadline, so an abandoned request
            // does not keep scanning after the client got its 503.
            client: crate::sink::clickhouse::client(&config.clickhouse).with_setting(
                "max_execution_time",
                config
                    .clickhouse
                    .request_timeout_ms
                    .div_ceil(1000)
                    .to_string(),
            ),
            max_buckets: config.query.max_buckets,
            timeout: Duration::from_millis(config.clickhouse.request_timeout_ms),
        }))
    }

    /// Answers a metrics request. Safe to await from any executor.
    ///
    /// # Errors
    /// See [`fetch_match_metrics`]; [`QueryError::RuntimeGone`] if the task was cancelled
    /// by a shutdown.
    pub async fn match_metrics(&self, params: MetricsParams) -> Result<MatchMetrics, QueryError> {
        let client = self.client.clone();
        let (max_buckets, timeout) = (self.max_buckets, self.timeout);
        self.runtime
            .spawn(async move { fetch_match_metrics(&client, &params, max_buckets, timeout).await })
            .await
            .map_err(|_| QueryError::RuntimeGone)?
    }

    /// Runs a future to completion on this runtime from a non-async context (start-up
    /// tasks such as migrations).
    pub fn block_on<F: std::future::Future>(&self, fut: F) -> F::Output {
        self.runtime.block_on(fut)
    }
}
