//! Finds the rows ClickHouse refuses inside a batch, so one bad event never holds back
//! the rest of its batch or partition.
//!
//! An INSERT is all or nothing, and ClickHouse's error names neither the row nor its
//! index. When an insert is refused for its content (see [`super::classify`]), the batch
//! is split in halves and each half inserted on its own, recursively, until every refused
//! row stands alone. One bad row among `n` costs about `2 log2(n)` extra inserts; the
//! halves that succeed are written once each.
//!
//! Every insert here, each half included, goes through [`super::dedup`] first: the
//! materialized views behind the aggregates count each inserted row, so "duplicates are
//! harmless" no longer holds. That costs one ledger query per partition per insert.

use tracing::debug;

use super::classify::{classify, FailureKind};
use super::dedup::{first_occurrences, Dedup};
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

/// Inserts the rows of `rows` that are not already in ClickHouse, splitting around the
/// rows refused for their content, and returns those (in index order). Every other row
/// is in ClickHouse when this returns `Ok`: inserted now, or dropped by [`Dedup`]
/// because it already was (repeats in the batch, positions in the ledger, recent
/// resends). Each insert, each half of a split included, is checked by [`Dedup`] just
/// before it runs, because the aggregates count every inserted row.
///
/// # Errors
/// The first failure that is not about content (ClickHouse unreachable, schema, timeout,
/// a dedup query that failed). Some halves may already be inserted; the caller retries
/// the whole batch and the ledger check drops what landed.
pub fn insert_around_refusals(
    writer: &BatchWriter,
    dedup: &mut Dedup,
    status: &SinkStatus,
    rows: &[EventRow],
    consumer: &str,
) -> Result<Vec<Refused>, SinkError> {
    let mut refused = Vec::new();
    if rows.is_empty() {
        return Ok(refused);
    }
    let (firsts, repeats) = first_occurrences(rows);
    let mut part = Part {
        writer,
        dedup,
        status,
        rows,
        consumer,
    };
    part.insert(&firsts, &mut refused)?;
    // Counted only once the whole batch is written: a batch retried after a failure
    // would find its repeats again.
    repeats.report(status, consumer);
    Ok(refused)
}

/// What every level of the split shares.
struct Part<'a> {
    writer: &'a BatchWriter,
    dedup: &'a mut Dedup,
    status: &'a SinkStatus,
    rows: &'a [EventRow],
    consumer: &'a str,
}

impl Part<'_> {
    /// Inserts the rows at `indices` (ascending) that dedup keeps, splitting on content
    /// refusals.
    fn insert(&mut self, indices: &[usize], refused: &mut Vec<Refused>) -> Result<(), SinkError> {
        let (keep, dropped) = self.dedup.unseen(self.writer, self.rows, indices)?;
        // Dropped rows are in ClickHouse already, whatever happens to the others.
        dropped.report(self.status, self.consumer);
        if keep.len() < indices.len() {
            let gone: Vec<usize> = indices
                .iter()
                .copied()
                .filter(|i| keep.binary_search(i).is_err())
                .collect();
            self.dedup.remember(self.rows, &gone);
        }
        if keep.is_empty() {
            return Ok(());
        }
        let picked = keep.iter().map(|&i| &self.rows[i]);
        match self.writer.insert_rows(picked, keep.len()) {
            Ok(elapsed) => {
                self.status
                    .insert_succeeded(keep.len(), elapsed.as_micros() as u64);
                self.dedup.remember(self.rows, &keep);
                debug!(
                    consumer = self.consumer,
                    batch_rows = keep.len(),
                    elapsed_ms = elapsed.as_millis() as u64,
                    "batch inserted"
                );
                Ok(())
            }
            Err(err) if classify(&err) == FailureKind::Content => {
                if let [index] = keep[..] {
                    refused.push(Refused {
                        index,
                        reason: error_chain(&err),
                    });
                    return Ok(());
                }
                let mid = keep.len() / 2;
                self.insert(&keep[..mid], refused)?;
                self.insert(&keep[mid..], refused)
            }
            Err(err) => Err(err),
        }
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
