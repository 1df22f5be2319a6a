//! The Tokio runtime that runs ClickHouse queries for every shard.
//!
//! Shards are glommio executors; the `clickhouse` crate needs Tokio. A shard spawns the
//! query here and awaits the join handle, which Tokio completes from its own thread
//! (glommio accepts such cross-thread wakes). One or two worker threads are plenty: a
//! query spends its time waiting on ClickHouse, not on CPU. Answers are encoded to JSON
//! here too, so a shard only copies bytes.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use clickhouse::Client;
use serde::Serialize;

use super::api::{AnalyticsRequest, Endpoint};
use super::{fans, live, matches, metrics, moments, polls, reactions, QueryError};
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

    /// Answers an analytics request as JSON bytes. Safe to await from any executor.
    ///
    /// # Errors
    /// The endpoint's errors; [`QueryError::Timeout`] past `clickhouse.request_timeout_ms`;
    /// [`QueryError::RuntimeGone`] if the task was cancelled by a shutdown.
    pub async fn answer(&self, request: AnalyticsRequest) -> Result<Bytes, QueryError> {
        let client = self.client.clone();
        let (max_buckets, timeout) = (self.max_buckets, self.timeout);
        let work = async move {
            let timeout_ms = timeout.as_millis() as u64;
            tokio::time::timeout(timeout, run(&client, &request, max_buckets))
                .await
                .map_err(|_| QueryError::Timeout { timeout_ms })?
        };
        self.runtime
            .spawn(work)
            .await
            .map_err(|_| QueryError::RuntimeGone)?
    }

    /// Runs a future to completion on this runtime from a non-async context (start-up
    /// tasks such as migrations).
    pub fn block_on<F: std::future::Future>(&self, fut: F) -> F::Output {
        self.runtime.block_on(fut)
    }
}

async fn run(
    client: &Client,
    request: &AnalyticsRequest,
    max_buckets: u64,
) -> Result<Bytes, QueryError> {
    let (id, params) = (request.match_id.as_str(), &request.params);
    match request.endpoint {
        Endpoint::Matches => encode(&matches::fetch(client, params).await?),
        Endpoint::Metrics => encode(&metrics::fetch(client, id, params, max_buckets).await?),
        Endpoint::Moments => encode(&moments::fetch(client, id, params, max_buckets).await?),
        Endpoint::Reactions => encode(&reactions::fetch(client, id, params).await?),
        Endpoint::Polls => encode(&polls::fetch(client, id, params).await?),
        Endpoint::Fans => encode(&fans::fetch(client, id, params).await?),
        Endpoint::Live => encode(&live::fetch(client, id).await?),
    }
}

fn encode<T: Serialize>(answer: &T) -> Result<Bytes, QueryError> {
    sonic_rs::to_vec(answer)
        .map(Bytes::from)
        .map_err(|err| QueryError::Encode {
            detail: err.to_string(),
        })
}
