//! Per-match metrics answered from ClickHouse.
//!
//! The `clickhouse` crate needs Tokio, and the ingest shards run glommio, so queries run
//! on a small Tokio runtime owned by this module ([`runtime::QueryRuntime`]); a shard
//! hands the query over and awaits the result without blocking its executor. Every count
//! is `uniqExact(event_id)`, so rows the at-least-once sink wrote twice count once.

pub mod metrics;
pub mod params;
pub mod runtime;

use http::StatusCode;

/// Why a metrics query failed.
#[derive(Debug, thiserror::Error)]
pub enum QueryError {
    #[error("invalid parameter {param}: {reason}")]
    BadParam { param: &'static str, reason: String },
    #[error("no events recorded for match {match_id}")]
    UnknownMatch { match_id: String },
    #[error("clickhouse query failed: {detail}")]
    ClickHouse { detail: String },
    #[error("clickhouse query timed out after {timeout_ms} ms")]
    Timeout { timeout_ms: u64 },
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
            QueryError::RuntimeGone => (StatusCode::SERVICE_UNAVAILABLE, "shutting_down"),
        }
    }
}
