//! Finds the rows ClickHouse refuses inside a batch, so one bad event never holds back
//! the rest of its batch or partition.
//!
//! An INSERT is all or nothing, and ClickHouse's error names neither the row nor its
//! index. When an insert is refused for its content (see [`super::classify`]), the batch
//! is split in halves and each half inserted on its own, recursively, until every refused
//! row stands alone. One bad row among `n` costs about `2 log2(n)` extra inserts; the
//! halves that succeed are written once each.

use tracing::debug;

use super::classify::{classify, FailureKind};
use super::row::EventRow;
use super::status::SinkStatus;
use super::writer::BatchWriter;
use super::SinkError;

/// A row ClickHouse refused, by its index in the batch, with ClickHouse's reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refused {
    pub index: usize,
    pub reason: String,
}

/// Inserts `rows`, splitting around the rows refused for their content, and returns
/// those (in index order). Every other row is in ClickHouse when this returns `Ok`.
///
/// # Errors
/// The first failure that is not about content (ClickHouse unreachable, schema, timeout).
/// Some halves may already be inserted; the caller retries the whole batch and the
/// `event_id` dedup absorbs the repeats.
pub fn insert_around_refusals(
    writer: &BatchWriter,
    status: &SinkStatus,
    rows: &[EventRow],
    consumer: &str,
) -> Result<Vec<Refused>, SinkError> {
    let mut refused = Vec::new();
    if !rows.is_empty() {
        insert_part(writer, status, rows, 0, consumer, &mut refused)?;
    }
    Ok(refused)
}

fn insert_part(
    writer: &BatchWriter,
    status: &SinkStatus,
    rows: &[EventRow],
    base: usize,
    consumer: &str,
    refused: &mut Vec<Refused>,
) -> Result<(), SinkError> {
    match writer.insert(rows) {
        Ok(elapsed) => {
            status.insert_succeeded(rows.len(), elapsed.as_micros() as u64);
            debug!(
                consumer,
                batch_rows = rows.len(),
                elapsed_ms = elapsed.as_millis() as u64,
                "batch inserted"
            );
            Ok(())
        }
        Err(err) if classify(&err) == FailureKind::Content => {
            if rows.len() == 1 {
                refused.push(Refused {
                    index: base,
                    reason: error_chain(&err),
                });
                return Ok(());
            }
            let mid = rows.len() / 2;
            insert_part(writer, status, &rows[..mid], base, consumer, refused)?;
            insert_part(writer, status, &rows[mid..], base + mid, consumer, refused)
        }
        Err(err) => Err(err),
    }
}

/// The error's causes joined with ": ", for one log field or header. The top-level
/// message ("insert of 1 rows failed") is left out: the causes carry ClickHouse's reason.
pub fn error_chain(err: &dyn std::error::Error) -> String {
    let mut parts = Vec::new();
    let mut source = err.source();
    while let Some(cause) = source {
        parts.push(cause.to_string());
        source = cause.source();
    }
    if parts.is_empty() {
        err.to_string()
    } else {
        parts.join(": ")
    }
}
