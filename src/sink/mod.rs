//! The ClickHouse side: schema migrations, row encoding and batched inserts.
//!
//! Consuming from Kafka is `kafka::consumer`'s job; this module receives decoded events,
//! turns them into rows and writes them. Kafka delivery is at-least-once (a batch may be
//! read again after a crash before its offsets were committed, an insert that timed out
//! may have landed), but the aggregates of `migrations/0002_aggregates.sql` count every
//! inserted row, so [`dedup`] drops, before every insert, rows whose Kafka position is
//! already in `event_ledger`, repeats inside the batch and resends of an event this
//! thread inserted recently. What still counts twice in the aggregates (the raw table,
//! a ReplacingMergeTree, collapses it on merge): a resend older than `sink.dedup_window`,
//! an insert still running in ClickHouse when its retry reads the ledger, and a zombie
//! consumer inserting after a rebalance gave its partitions away.

pub mod backoff;
pub mod bisect;
pub mod classify;
pub mod clickhouse;
pub mod dedup;
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
    #[error("clickhouse dedup query for partition {partition} failed ({what})")]
    Dedup {
        what: &'static str,
        partition: i32,
        #[source]
        source: ::clickhouse::error::Error,
    },
    #[error(
        "clickhouse dedup query for partition {partition} ({what}) timed out after \
         {timeout_ms} ms"
    )]
    DedupTimeout {
        what: &'static str,
        partition: i32,
        timeout_ms: u64,
    },
    #[error("cannot start the sink's runtime")]
    Runtime(#[source] std::io::Error),
}
