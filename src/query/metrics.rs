//! `GET /v1/matches/{id}/metrics`: totals by type and team, unique fans, and the
//! timeline, read from `event_counts` and `fan_buckets`.

use std::collections::BTreeMap;

use clickhouse::{Client, Row};
use serde::{Deserialize, Serialize};

use super::params::QueryParams;
use super::sql::{add_type, failed, in_window, window_filter, zero_by_type, Text};
use super::window::{match_span, resolve, timeline_start, Window, WindowJson};
use super::{now_ms, QueryError};

/// Timeline bucket when the request names none.
pub const DEFAULT_BUCKET_SECS: u32 = 60;

/// Totals and a timeline for one match.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct MatchMetrics {
    pub match_id: String,
    pub window: WindowJson,
    pub bucket_seconds: u32,
    pub total_events: u64,
    pub unique_fans: u64,
    /// Every type, zero included.
    pub by_type: BTreeMap<&'static str, u64>,
    /// `""` holds events without a team.
    pub by_team: BTreeMap<String, u64>,
    /// Buckets with events only, oldest first.
    pub timeline: Vec<TimelineBucket>,
    /// The timeline holds only the newest `query.max_buckets` buckets of the window
    /// (the request named no `from` and the match is longer); totals cover it all.
    pub timeline_truncated: bool,
    pub newest_received_at_ms: Option<i64>,
    pub generated_at_ms: i64,
}

/// Events in one bucket of event time.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct TimelineBucket {
    /// Bucket start, epoch milliseconds.
    pub t: i64,
    pub events: u64,
    pub unique_fans: u64,
    pub by_type: BTreeMap<&'static str, u64>,
}

#[derive(Debug, Row, Deserialize)]
struct TotalsRow {
    event_type: String,
    team: Text,
    events: u64,
    newest_ms: i64,
}

#[derive(Debug, Row, Deserialize)]
struct BucketRow {
    t: u32,
    event_type: String,
    events: u64,
}

#[derive(Debug, Row, Deserialize)]
struct FansRow {
    t: u32,
    fans: u64,
}

#[derive(Debug, Row, Deserialize)]
struct FansTotalRow {
    fans: u64,
}

/// Answers the metrics endpoint. Must run on a Tokio runtime.
///
/// # Errors
/// Unknown match, a window over `max_buckets` buckets, ClickHouse failing.
pub async fn fetch(
    client: &Client,
    match_id: &str,
    params: &QueryParams,
    max_buckets: u64,
) -> Result<MatchMetrics, QueryError> {
    let generated_at_ms = now_ms();
    let bucket = params.bucket_secs.unwrap_or(DEFAULT_BUCKET_SECS);
    let span = match_span(client, match_id).await?;
    let window = resolve(params, span, bucket);
    let (timeline_from, timeline_truncated) = timeline_start(params, window, bucket, max_buckets)?;
    let timeline_window = Window {
        from: timeline_from,
        to: window.to,
    };
    let (totals, timeline, fans) = tokio::try_join!(
        totals(client, match_id, window),
        fetch_timeline(client, match_id, timeline_window, bucket, true),
        unique_fans(client, match_id, window),
    )?;
    let mut by_type = zero_by_type();
    let mut by_team = BTreeMap::new();
    let mut newest: Option<i64> = None;
    let mut total_events = 0;
    for row in totals {
        add_type(&mut by_type, &row.event_type, row.events);
        *by_team.entry(row.team.0).or_insert(0) += row.events;
        total_events += row.events;
        if row.events > 0 {
            newest = Some(newest.map_or(row.newest_ms, |n| n.max(row.newest_ms)));
        }
    }
    Ok(MatchMetrics {
        match_id: match_id.to_string(),
        window: window.json(),
        bucket_seconds: bucket,
        total_events,
        unique_fans: fans,
        by_type,
        by_team,
        timeline,
        timeline_truncated,
        newest_received_at_ms: newest,
        generated_at_ms,
    })
}

async fn totals(
    client: &Client,
    match_id: &str,
    window: Window,
) -> Result<Vec<TotalsRow>, QueryError> {
    let sql = format!(
        "SELECT toString(event_type) AS event_type, team, countMerge(events) AS events, \
         maxMerge(newest_ms) AS newest_ms FROM event_counts WHERE {} \
         GROUP BY event_type, team",
        window_filter("second")
    );
    in_window(client.query(&sql), match_id, window)
        .fetch_all()
        .await
        .map_err(failed)
}

/// Unique fans over a window whose bounds are multiples of 10 s.
pub async fn unique_fans(
    client: &Client,
    match_id: &str,
    window: Window,
) -> Result<u64, QueryError> {
    let sql = format!(
        "SELECT uniqHLL12Merge(fans) AS fans FROM fan_buckets WHERE {}",
        window_filter("bucket")
    );
    let row: FansTotalRow = in_window(client.query(&sql), match_id, window)
        .fetch_one()
        .await
        .map_err(failed)?;
    Ok(row.fans)
}

/// Events by type per `bucket` seconds over `window` (bounds multiples of `bucket`),
/// buckets with events only, oldest first; with `with_fans`, each bucket's unique fans
/// too (`bucket` must then be a multiple of 10 s, the resolution of `fan_buckets`;
/// otherwise `unique_fans` is 0).
///
/// # Errors
/// ClickHouse failing.
pub async fn fetch_timeline(
    client: &Client,
    match_id: &str,
    window: Window,
    bucket: u32,
    with_fans: bool,
) -> Result<Vec<TimelineBucket>, QueryError> {
    let counts_sql = format!(
        "SELECT toUInt32(intDiv(toUInt32(second), ?) * ?) AS t, \
         toString(event_type) AS event_type, countMerge(events) AS events \
         FROM event_counts WHERE {} GROUP BY t, event_type ORDER BY t",
        window_filter("second")
    );
    let fans_sql = format!(
        "SELECT toUInt32(intDiv(toUInt32(bucket), ?) * ?) AS t, \
         uniqHLL12Merge(fans) AS fans FROM fan_buckets WHERE {} GROUP BY t ORDER BY t",
        window_filter("bucket")
    );
    let counts = in_window(
        client.query(&counts_sql).bind(bucket).bind(bucket),
        match_id,
        window,
    )
    .fetch_all::<BucketRow>();
    let fans = async {
        if !with_fans {
            return Ok(Vec::new());
        }
        in_window(
            client.query(&fans_sql).bind(bucket).bind(bucket),
            match_id,
            window,
        )
        .fetch_all::<FansRow>()
        .await
    };
    let (counts, fans) = tokio::try_join!(counts, fans).map_err(failed)?;
    Ok(fold_timeline(counts, &fans))
}

/// Folds (bucket, type, count) rows, sorted by bucket, into one entry per bucket and
/// adds each bucket's unique fans.
fn fold_timeline(rows: Vec<BucketRow>, fans: &[FansRow]) -> Vec<TimelineBucket> {
    let fans: BTreeMap<u32, u64> = fans.iter().map(|f| (f.t, f.fans)).collect();
    let mut out: Vec<TimelineBucket> = Vec::new();
    for row in rows {
        let t = i64::from(row.t) * 1000;
        if out.last().map(|b| b.t) != Some(t) {
            out.push(TimelineBucket {
                t,
                events: 0,
                unique_fans: fans.get(&row.t).copied().unwrap_or(0),
                by_type: zero_by_type(),
            });
        }
        if let Some(bucket) = out.last_mut() {
            bucket.events += row.events;
            add_type(&mut bucket.by_type, &row.event_type, row.events);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timeline_folds_types_into_buckets_and_adds_fans() {
        let row = |t, event_type: &str, events| BucketRow {
            t,
            event_type: event_type.into(),
            events,
        };
        let rows = vec![
            row(60, "cheer", 2),
            row(60, "view", 1),
            row(120, "cheer", 5),
        ];
        let fans = [FansRow { t: 60, fans: 2 }, FansRow { t: 120, fans: 4 }];
        let tl = fold_timeline(rows, &fans);
        assert_eq!(tl.len(), 2);
        assert_eq!((tl[0].t, tl[0].events, tl[0].unique_fans), (60_000, 3, 2));
        assert_eq!(tl[0].by_type["view"], 1);
        assert_eq!((tl[1].by_type["cheer"], tl[1].by_type["chat"]), (5, 0));
        assert_eq!(tl[1].unique_fans, 4);
    }
}
