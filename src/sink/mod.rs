//! The ClickHouse side: schema migrations, row encoding and batched inserts.
//!
//! Consuming from Kafka is `kafka::consumer`'s job; this module receives decoded events,
//! turns them into rows and writes them. Inserts are at-least-once (a batch may be
//! inserted again after a crash before its offsets were committed); the table and the
//! queries make a repeated `event_id` count once (see `migrations/0001_events.sql`).

pub mod backoff;
pub mod bisect;
pub mod classify;
pub mod clickhouse;
pub mod migrate;
pub mod row;
pub mod status;
pub mod writer;

/// Why a sink operation failed.
#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    #[error("clickhouse insert of {rows} rows into {table} failed")]
    Insert {
        table: String,
        rows: usize,
        #[source]
        source: ::clickhouse::error::Error,
    },
    #[error("clickhouse insert of {rows} rows into {table} timed out after {timeout_ms} ms")]
    InsertTimeout {
        table: String,
        rows: usize,
        timeout_ms: u64,
    },
    #[error("migration {version} ({name}) failed")]
    Migration {
        version: u32,
        name: &'static str,
        #[source]
        source: ::clickhouse::error::Error,
    },
    #[error("clickhouse statement failed: {context}")]
    Statement {
        context: String,
        #[source]
        source: ::clickhouse::error::Error,
    },
    #[error("cannot start the sink's runtime")]
    Runtime(#[source] std::io::Error),
}
