//! Versioned schema migrations, applied in order and recorded in `schema_migrations`.
//!
//! The SQL lives in `migrations/NNNN_name.sql` beside this file and is compiled in, so a
//! binary always carries the schema it expects. `{db}` in a file is replaced by the
//! configured database name (validated as `[A-Za-z0-9_]+` at boot). Every statement is
//! idempotent (`IF NOT EXISTS`), so two instances migrating at once do no harm.

use clickhouse::{Client, Row};
use serde::Deserialize;
use tracing::info;

use super::SinkError;
use crate::app::config::ClickHouseConfig;

/// One migration file.
struct Migration {
    version: u32,
    name: &'static str,
    sql: &'static str,
}

/// Every migration, in order. Never edit an applied one; add a new file.
const MIGRATIONS: &[Migration] = &[
    Migration {
        version: 1,
        name: "events",
        sql: include_str!("migrations/0001_events.sql"),
    },
    Migration {
        version: 2,
        name: "aggregates",
        sql: include_str!("migrations/0002_aggregates.sql"),
    },
    Migration {
        version: 3,
        name: "match_and_fan_totals",
        sql: include_str!("migrations/0003_match_and_fan_totals.sql"),
    },
];

#[derive(Debug, Row, Deserialize)]
struct Applied {
    version: u32,
}

/// What [`run`] did.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct MigrationReport {
    pub applied: Vec<u32>,
    pub already_applied: Vec<u32>,
}

/// Creates the database and applies every migration not yet recorded.
///
/// # Errors
/// The first statement ClickHouse refuses, naming the migration.
pub async fn run(config: &ClickHouseConfig) -> Result<MigrationReport, SinkError> {
    let db = &config.database;
    let server = super::clickhouse::server_client(config);
    execute(
        &server,
        &format!("CREATE DATABASE IF NOT EXISTS {db}"),
        "create database",
    )
    .await?;
    execute(
        &server,
        &format!(
            "CREATE TABLE IF NOT EXISTS {db}.schema_migrations \
             (version UInt32, name String, applied_at DateTime DEFAULT now()) \
             ENGINE = MergeTree() ORDER BY version"
        ),
        "create schema_migrations",
    )
    .await?;

    let applied: Vec<u32> = server
        .query(&format!("SELECT version FROM {db}.schema_migrations"))
        .fetch_all::<Applied>()
        .await
        .map_err(|source| SinkError::Statement {
            context: "read schema_migrations".into(),
            source,
        })?
        .into_iter()
        .map(|a| a.version)
        .collect();

    let mut report = MigrationReport::default();
    for migration in MIGRATIONS {
        if applied.contains(&migration.version) {
            report.already_applied.push(migration.version);
            continue;
        }
        for statement in statements(migration.sql, db) {
            server
                .query(&statement)
                .execute()
                .await
                .map_err(|source| SinkError::Migration {
                    version: migration.version,
                    name: migration.name,
                    source,
                })?;
        }
        let record = format!(
            "INSERT INTO {db}.schema_migrations (version, name) VALUES ({}, '{}')",
            migration.version, migration.name
        );
        execute(&server, &record, "record migration").await?;
        info!(version = migration.version, name = migration.name, database = %db,
            "migration applied");
        report.applied.push(migration.version);
    }
    Ok(report)
}

async fn execute(client: &Client, sql: &str, context: &str) -> Result<(), SinkError> {
    client
        .query(sql)
        .execute()
        .await
        .map_err(|source| SinkError::Statement {
            context: context.to_string(),
            source,
        })
}

/// Splits a file into statements on `;` at line ends, drops `--` comment lines and fills
/// in the database name. The `clickhouse` crate treats `?` as a bind marker, so the
/// migration files must not contain one.
fn statements(sql: &str, db: &str) -> Vec<String> {
    let without_comments: String = sql
        .lines()
        .filter(|line| !line.trim_start().starts_with("--"))
        .collect::<Vec<_>>()
        .join("\n");
    without_comments
        .split(";\n")
        .map(|s| s.trim().trim_end_matches(';').trim())
        .filter(|s| !s.is_empty())
        .map(|s| s.replace("{db}", db))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn migrations_are_ordered_and_unique() {
        let versions: Vec<u32> = MIGRATIONS.iter().map(|m| m.version).collect();
        let mut sorted = versions.clone();
        sorted.sort_unstable();
        sorted.dedup();
        assert_eq!(versions, sorted);
    }

    #[test]
    fn statements_fill_the_database_and_drop_comments() {
        let parts = statements("-- note\nCREATE TABLE {db}.a (x UInt8);\nSELECT 1\n", "fan");
        assert_eq!(parts, vec!["CREATE TABLE fan.a (x UInt8)", "SELECT 1"]);
    }

    #[test]
    fn migration_sql_avoids_types_clickhouse_18_lacks() {
        for m in MIGRATIONS {
            for banned in ["DateTime64", "LowCardinality", "JSON", "?"] {
                let code: String = m
                    .sql
                    .lines()
                    .filter(|l| !l.trim_start().starts_with("--"))
                    .collect();
                assert!(!code.contains(banned), "{} uses {banned}", m.name);
            }
        }
    }
}
