//! The SQL behind `GET /v1/matches/{match_id}/metrics` and the JSON it answers with.

use std::collections::BTreeMap;
use std::time::Duration;

use clickhouse::query::Query;
use clickhouse::{Client, Row};
use serde::{Deserialize, Serialize};

use super::params::MetricsParams;
use super::QueryError;
use crate::event::EventType;

/// Totals, counts by type and a timeline for one match.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct MatchMetrics {
    pub match_id: String,
    pub from_ms: Option<i64>,
    pub to_ms: Option<i64>,
    pub bucket_seconds: u32,
    pub total_events: u64,
    pub unique_fans: u64,
    /// Every type, zero included, so clients need no defaults.
    pub by_type: BTreeMap<&'static str, u64>,
    pub timeline: Vec<TimelineBucket>,
    /// Start of the timeline, epoch ms. Equals the window start unless the request named
    /// no `from` and the whole match needs more than `query.max_buckets` buckets: then the
    /// timeline holds the newest buckets only and `timeline_truncated` is true (totals and
    /// `by_type` still cover the whole window).
    pub timeline_from_ms: Option<i64>,
    pub timeline_truncated: bool,
    /// Freshness: the newest `received_at` included in these numbers.
    pub newest_received_at_ms: Option<i64>,
}

/// Events in one bucket of event time.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct TimelineBucket {
    /// Bucket start, epoch milliseconds.
    pub t: i64,
    pub events: u64,
    pub by_type: BTreeMap<&'static str, u64>,
}

#[derive(Debug, Row, Deserialize)]
struct TotalsRow {
    events: u64,
    fans: u64,
    first: u32,
    last: u32,
    newest_ms: i64,
}

#[derive(Debug, Row, Deserialize)]
struct TypeRow {
    event_type: String,
    events: u64,
}

#[derive(Debug, Row, Deserialize)]
struct BucketRow {
    t: u32,
    event_type: String,
    events: u64,
}

#[derive(Debug, Row, Deserialize)]
struct ExistsRow {
    found: u64,
}

const WHERE: &str = "match_id = ? AND event_time >= toDateTime(?) AND event_time < toDateTime(?)";

/// Runs the three queries for one match. Must run on a Tokio runtime.
///
/// # Errors
/// [`QueryError::UnknownMatch`] when the match has no events at all, a bucket count over
/// `max_buckets`, or ClickHouse failing or timing out.
pub async fn fetch_match_metrics(
    client: &Client,
    params: &MetricsParams,
    max_buckets: u64,
    timeout: Duration,
) -> Result<MatchMetrics, QueryError> {
    if let (Some(from), Some(to)) = (params.from_secs, params.to_secs) {
        // Refuse an explicit window before ClickHouse does any work for it.
        params.check_bucket_count(from, to.saturating_sub(1), max_buckets)?;
    }
    let timeout_ms = timeout.as_millis() as u64;
    tokio::time::timeout(timeout, fetch(client, params, max_buckets))
        .await
        .map_err(|_| QueryError::Timeout { timeout_ms })?
}

async fn fetch(
    client: &Client,
    params: &MetricsParams,
    max_buckets: u64,
) -> Result<MatchMetrics, QueryError> {
    let from = params.from_secs.unwrap_or(0);
    let to = params.to_secs.unwrap_or(u32::MAX);
    let failed = |err: clickhouse::error::Error| QueryError::ClickHouse {
        detail: err.to_string(),
    };

    let totals_sql = format!(
        "SELECT uniqExact(event_id) AS events, uniqExact(user_id) AS fans, \
         toUInt32(min(event_time)) AS first, toUInt32(max(event_time)) AS last, \
         max(received_at_ms) AS newest_ms FROM events WHERE {WHERE}"
    );
    let totals: TotalsRow = in_window(client.query(&totals_sql), params, from, to)
        .fetch_one()
        .await
        .map_err(failed)?;

    if totals.events == 0 {
        let exists: ExistsRow = client
            .query("SELECT count() AS found FROM events WHERE match_id = ?")
            .bind(&params.match_id)
            .fetch_one()
            .await
            .map_err(failed)?;
        if exists.found == 0 {
            return Err(QueryError::UnknownMatch {
                match_id: params.match_id.clone(),
            });
        }
    }
    let (timeline_from, timeline_truncated) =
        timeline_start(params, totals.first, totals.last, max_buckets)?;

    let types_sql = format!(
        "SELECT toString(event_type) AS event_type, uniqExact(event_id) AS events \
         FROM events WHERE {WHERE} GROUP BY event_type"
    );
    let types: Vec<TypeRow> = in_window(client.query(&types_sql), params, from, to)
        .fetch_all()
        .await
        .map_err(failed)?;

    let buckets_sql = format!(
        "SELECT toUInt32(intDiv(toUInt32(event_time), ?) * ?) AS t, \
         toString(event_type) AS event_type, uniqExact(event_id) AS events \
         FROM events WHERE {WHERE} GROUP BY t, event_type ORDER BY t"
    );
    let bucketed = client
        .query(&buckets_sql)
        .bind(params.bucket_secs)
        .bind(params.bucket_secs);
    let buckets: Vec<BucketRow> = in_window(bucketed, params, timeline_from.max(from), to)
        .fetch_all()
        .await
        .map_err(failed)?;

    let mut by_type = zero_by_type();
    for row in types {
        if let Some(slot) = type_slot(&mut by_type, &row.event_type) {
            *slot += row.events;
        }
    }
    Ok(MatchMetrics {
        match_id: params.match_id.clone(),
        from_ms: params.from_secs.map(|s| i64::from(s) * 1000),
        to_ms: params.to_secs.map(|s| i64::from(s) * 1000),
        bucket_seconds: params.bucket_secs,
        total_events: totals.events,
        unique_fans: totals.fans,
        by_type,
        timeline: timeline(buckets),
        timeline_from_ms: (totals.events > 0).then_some(i64::from(timeline_from) * 1000),
        timeline_truncated,
        newest_received_at_ms: (totals.events > 0).then_some(totals.newest_ms),
    })
}

/// Where the timeline starts: the window's start, or, when the request named no `from`
/// and the events span more than `max_buckets` buckets, the newest `max_buckets` buckets
/// (one stray client clock must not make the default view unanswerable).
///
/// # Errors
/// An explicit `from` whose window needs too many buckets.
fn timeline_start(
    params: &MetricsParams,
    first: u32,
    last: u32,
    max_buckets: u64,
) -> Result<(u32, bool), QueryError> {
    let end = params.to_secs.map_or(last, |t| t.saturating_sub(1));
    match params.from_secs {
        Some(from) => {
            params.check_bucket_count(from, end, max_buckets)?;
            Ok((from, false))
        }
        None if params.check_bucket_count(first, end, max_buckets).is_ok() => Ok((first, false)),
        None => {
            let bucket = u64::from(params.bucket_secs);
            let newest_bucket = u64::from(end) / bucket * bucket;
            let start = newest_bucket.saturating_sub((max_buckets - 1) * bucket);
            Ok((u32::try_from(start).unwrap_or(first), true))
        }
    }
}

/// Binds the three values of [`WHERE`]: match id and the event-time window.
fn in_window(query: Query, params: &MetricsParams, from: u32, to: u32) -> Query {
    query.bind(params.match_id.as_str()).bind(from).bind(to)
}

fn zero_by_type() -> BTreeMap<&'static str, u64> {
    EventType::ALL.iter().map(|t| (t.as_str(), 0)).collect()
}

fn type_slot<'a>(map: &'a mut BTreeMap<&'static str, u64>, name: &str) -> Option<&'a mut u64> {
    EventType::parse(name).and_then(|t| map.get_mut(t.as_str()))
}

/// Folds (bucket, type, count) rows, sorted by bucket, into one entry per bucket.
fn timeline(rows: Vec<BucketRow>) -> Vec<TimelineBucket> {
    let mut out: Vec<TimelineBucket> = Vec::new();
    for row in rows {
        let t = i64::from(row.t) * 1000;
        if out.last().map(|b| b.t) != Some(t) {
            out.push(TimelineBucket {
                t,
                events: 0,
                by_type: zero_by_type(),
            });
        }
        if let Some(bucket) = out.last_mut() {
            bucket.events += row.events;
            if let Some(slot) = type_slot(&mut bucket.by_type, &row.event_type) {
                *slot += row.events;
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_timeline_keeps_the_newest_buckets_when_the_span_is_too_long() {
        let params = MetricsParams::parse("m", Some("bucket=60s")).expect("valid");
        // One event in 1970, the rest now: the newest 10 buckets are kept.
        let (start, truncated) = timeline_start(&params, 0, 1_700_000_059, 10).expect("ok");
        assert!(truncated);
        assert_eq!(start, 1_700_000_040 - 9 * 60);
        let (start, truncated) =
            timeline_start(&params, 1_700_000_000, 1_700_000_059, 10).expect("ok");
        assert_eq!((start, truncated), (1_700_000_000, false));
        let explicit = MetricsParams::parse("m", Some("from=0&bucket=60s")).expect("valid");
        assert!(timeline_start(&explicit, 0, 1_700_000_059, 10).is_err());
    }

    #[test]
    fn timeline_folds_types_into_buckets() {
        let rows = vec![
            BucketRow {
                t: 60,
                event_type: "cheer".into(),
                events: 2,
            },
            BucketRow {
                t: 60,
                event_type: "view".into(),
                events: 1,
            },
            BucketRow {
                t: 120,
                event_type: "cheer".into(),
                events: 5,
            },
        ];
        let tl = timeline(rows);
        assert_eq!(tl.len(), 2);
        assert_eq!((tl[0].t, tl[0].events), (60_000, 3));
        assert_eq!(tl[0].by_type["view"], 1);
        assert_eq!(tl[1].by_type["cheer"], 5);
        assert_eq!(tl[1].by_type["chat"], 0);
    }
}
