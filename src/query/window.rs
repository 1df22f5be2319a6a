//! The event-time window an answer covers: the request's `from`/`to`, or the whole
//! match, widened to whole buckets.
//!
//! Widening instead of clipping keeps every number exact: the aggregates are stored per
//! second, 10 seconds or minute, and a partial bucket could only be answered from raw
//! events. Every answer names the window it used.

use clickhouse::{Client, Row};
use serde::{Deserialize, Serialize};

use super::params::{bad, QueryParams};
use super::sql::failed;
use super::QueryError;

/// A half-open window `[from, to)` of event time, epoch seconds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Window {
    pub from: u32,
    pub to: u32,
}

/// How a window appears in answers.
#[derive(Debug, Clone, Copy, Serialize, PartialEq, Eq)]
pub struct WindowJson {
    pub from_ms: i64,
    pub to_ms: i64,
}

impl Window {
    /// The window in epoch milliseconds, for answers.
    pub fn json(self) -> WindowJson {
        WindowJson {
            from_ms: i64::from(self.from) * 1000,
            to_ms: i64::from(self.to) * 1000,
        }
    }

    /// Number of `bucket`-second buckets the window spans.
    pub fn buckets(self, bucket: u32) -> u64 {
        u64::from(self.to - self.from).div_ceil(u64::from(bucket))
    }
}

/// First and last second with events of one match.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MatchSpan {
    pub first: u32,
    pub last: u32,
}

#[derive(Debug, Row, Deserialize)]
struct SpanRow {
    first: u32,
    last: u32,
    rows: u64,
}

/// Reads the match's span from `event_counts` (a prefix read of its sort key).
///
/// # Errors
/// [`QueryError::UnknownMatch`] when the match has no events; ClickHouse failures.
pub async fn match_span(client: &Client, match_id: &str) -> Result<MatchSpan, QueryError> {
    let row: SpanRow = client
        .query(
            "SELECT toUInt32(min(second)) AS first, toUInt32(max(second)) AS last, \
             count() AS rows FROM event_counts WHERE match_id = ?",
        )
        .bind(match_id)
        .fetch_one()
        .await
        .map_err(failed)?;
    if row.rows == 0 {
        return Err(QueryError::UnknownMatch {
            match_id: match_id.to_string(),
        });
    }
    Ok(MatchSpan {
        first: row.first,
        last: row.last,
    })
}

/// The window for `params` over a match spanning `span`, widened to multiples of
/// `align` seconds. A missing `from` is the match's first second and a missing `to` the
/// end of its last, but neither is taken past the other bound: a `to` before the match
/// began gives an empty window ending at `to`, never one reaching after it.
pub fn resolve(params: &QueryParams, span: MatchSpan, align: u32) -> Window {
    let (from, to) = match (params.from_secs, params.to_secs) {
        (Some(from), Some(to)) => (from, to),
        (Some(from), None) => (from, span.last.saturating_add(1).max(from + 1)),
        (None, Some(to)) => (span.first.min(to.saturating_sub(1)), to),
        (None, None) => (span.first, span.last.saturating_add(1)),
    };
    let from = floor(from, align);
    Window {
        from,
        to: ceil(to, align).max(from + align),
    }
}

/// Where a timeline starts: the window's start, or, when the request named no `from`
/// and the window needs more than `max_buckets` buckets, the newest `max_buckets`
/// buckets (one stray client clock must not make the default view unanswerable).
/// Returns the start and whether the timeline was cut.
///
/// # Errors
/// An explicit `from` whose window needs more than `max_buckets` buckets.
pub fn timeline_start(
    params: &QueryParams,
    window: Window,
    bucket: u32,
    max_buckets: u64,
) -> Result<(u32, bool), QueryError> {
    let needed = window.buckets(bucket);
    if needed <= max_buckets {
        return Ok((window.from, false));
    }
    if params.from_secs.is_some() {
        return Err(bad(
            "bucket",
            &format!("window needs {needed} buckets, more than {max_buckets}; use a larger bucket"),
        ));
    }
    let keep = max_buckets.saturating_mul(u64::from(bucket));
    let start = u64::from(window.to).saturating_sub(keep);
    Ok((u32::try_from(start).unwrap_or(window.from), true))
}

/// Rounds `secs` down to a multiple of `align`.
pub fn floor(secs: u32, align: u32) -> u32 {
    secs - secs % align
}

/// Rounds `secs` up to a multiple of `align`, saturating at the last multiple.
pub fn ceil(secs: u32, align: u32) -> u32 {
    match secs % align {
        0 => secs,
        rest => secs
            .checked_add(align - rest)
            .unwrap_or_else(|| floor(u32::MAX, align)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SPAN: MatchSpan = MatchSpan {
        first: 1_671_375_605,
        last: 1_671_381_003,
    };

    #[test]
    fn whole_match_is_widened_to_whole_buckets() {
        let w = resolve(&QueryParams::default(), SPAN, 60);
        assert_eq!((w.from, w.to), (1_671_375_600, 1_671_381_060));
        let w = resolve(&QueryParams::default(), SPAN, 10);
        assert_eq!((w.from, w.to), (1_671_375_600, 1_671_381_010));
        assert_eq!(w.json().from_ms, 1_671_375_600_000);
    }

    #[test]
    fn explicit_bounds_win_and_are_widened() {
        let params = QueryParams {
            from_secs: Some(1_000_003),
            to_secs: Some(1_000_004),
            ..QueryParams::default()
        };
        let w = resolve(&params, SPAN, 10);
        assert_eq!((w.from, w.to), (1_000_000, 1_000_010));
        assert_eq!(w.buckets(10), 1);
    }

    #[test]
    fn a_default_bound_never_crosses_an_explicit_one() {
        let before = QueryParams {
            to_secs: Some(1_000_005),
            ..QueryParams::default()
        };
        let w = resolve(&before, SPAN, 10);
        assert_eq!((w.from, w.to), (1_000_000, 1_000_010));
        let after = QueryParams {
            from_secs: Some(1_700_000_003),
            ..QueryParams::default()
        };
        let w = resolve(&after, SPAN, 60);
        assert_eq!((w.from, w.to), (1_699_999_980, 1_700_000_040));
    }

    #[test]
    fn long_default_timelines_keep_the_newest_buckets() {
        let w = Window { from: 0, to: 6_000 };
        let (start, cut) = timeline_start(&QueryParams::default(), w, 60, 10).expect("ok");
        assert_eq!((start, cut), (5_400, true));
        let (start, cut) = timeline_start(&QueryParams::default(), w, 600, 10).expect("ok");
        assert_eq!((start, cut), (0, false));
        let explicit = QueryParams {
            from_secs: Some(0),
            ..QueryParams::default()
        };
        assert!(timeline_start(&explicit, w, 60, 10).is_err());
    }

    #[test]
    fn ceil_saturates() {
        assert_eq!(ceil(u32::MAX, 10), floor(u32::MAX, 10));
        assert_eq!(ceil(11, 10), 20);
        assert_eq!(ceil(20, 10), 20);
    }
}
