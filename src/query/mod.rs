//! The analytics API: per-match metrics answered from ClickHouse aggregates.
//!
//! The `clickhouse` crate needs Tokio, and the ingest shards run glommio, so queries run
//! on a small Tokio runtime owned by this module ([`runtime::QueryRuntime`]); a shard
//! hands the query over and awaits the result without blocking its executor, through
//! its own [`cache::AnswerCache`]. Every endpoint reads the aggregate tables of
//! migration 2 (`sink/migrations/0002_aggregates.sql`), never raw events; see
//! docs/analytics.md for what each number means.

pub mod api;
pub mod cache;
pub mod fans;
pub mod live;
pub mod matches;
pub mod metrics;
pub mod moments;
pub mod params;
pub mod polls;
pub mod reactions;
pub mod runtime;
pub mod sql;
pub mod window;

use std::time::{SystemTime, UNIX_EPOCH};

use http::StatusCode;

/// Why an analytics query failed. `Clone` because one failed computation answers every
/// request that waited for it.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum QueryError {
    #[error("invalid parameter {param}: {reason}")]
    BadParam { param: &'static str, reason: String },
    #[error("no events recorded for match {match_id}")]
    UnknownMatch { match_id: String },
    #[error("clickhouse query failed: {detail}")]
    ClickHouse { detail: String },
    #[error("clickhouse query timed out after {timeout_ms} ms")]
    Timeout { timeout_ms: u64 },
    #[error("cannot encode the answer: {detail}")]
    Encode { detail: String },
    #[error("query runtime is not running")]
    RuntimeGone,
}

impl QueryError {
    /// The HTTP status and error code for this failure.
    pub fn status_and_code(&self) -> (StatusCode, &'static str) {
        match self {
            QueryError::BadParam { .. } => (StatusCode::BAD_REQUEST, "invalid_parameter"),
            QueryError::UnknownMatch { .. } => (StatusCode::NOT_FOUND, "unknown_match"),
            QueryError::ClickHouse { .. } => {
                (StatusCode::SERVICE_UNAVAILABLE, "clickhouse_unavailable")
            }
            QueryError::Timeout { .. } => (StatusCode::SERVICE_UNAVAILABLE, "clickhouse_timeout"),
            QueryError::Encode { .. } => (StatusCode::INTERNAL_SERVER_ERROR, "internal"),
            QueryError::RuntimeGone => (StatusCode::SERVICE_UNAVAILABLE, "shutting_down"),
        }
    }
}

/// Wall-clock time in epoch milliseconds (0 if the clock is before 1970).
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}
