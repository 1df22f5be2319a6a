//! `GET /v1/matches`: the matches with events in a window, most events first.
//!
//! Reads `match_minutes`, sorted by minute first, so a window reads only its own minutes
//! (one row per match and minute, with its own fan sketch); the window is widened to
//! whole minutes.

use clickhouse::{Client, Row};
use serde::{Deserialize, Serialize};

use super::params::QueryParams;
use super::sql::failed;
use super::window::{ceil, floor, Window, WindowJson};
use super::{now_ms, QueryError};

/// Window when the request names no `from`: the last day.
const DEFAULT_SPAN_SECS: u32 = 86_400;
const DEFAULT_LIMIT: u32 = 100;
/// The resolution of `match_minutes`.
const MINUTE: u32 = 60;

/// Matches seen in a window.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct MatchList {
    pub window: WindowJson,
    pub matches: Vec<MatchSummary>,
    pub newest_received_at_ms: Option<i64>,
    pub generated_at_ms: i64,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct MatchSummary {
    pub match_id: String,
    pub events: u64,
    pub unique_fans: u64,
    pub first_event_ms: i64,
    pub last_event_ms: i64,
    pub newest_received_at_ms: i64,
}

#[derive(Debug, Row, Deserialize)]
struct MatchRow {
    match_id: String,
    events: u64,
    first: u32,
    last: u32,
    newest_ms: i64,
    fans: u64,
}

/// Answers the match list. Must run on a Tokio runtime.
///
/// # Errors
/// ClickHouse failing.
pub async fn fetch(client: &Client, params: &QueryParams) -> Result<MatchList, QueryError> {
    let generated_at_ms = now_ms();
    let now_secs = u32::try_from(generated_at_ms / 1000).unwrap_or(u32::MAX - 3_600);
    let to = params.to_secs.unwrap_or(now_secs + 1);
    let from = params
        .from_secs
        .unwrap_or_else(|| to.saturating_sub(DEFAULT_SPAN_SECS));
    let window = Window {
        from: floor(from, MINUTE),
        to: ceil(to, MINUTE).max(floor(from, MINUTE) + MINUTE),
    };
    let limit = params.limit.unwrap_or(DEFAULT_LIMIT);
    let rows: Vec<MatchRow> = client
        .query(
            "SELECT match_id, countMerge(events) AS events, \
             toUInt32(minMerge(first_event)) AS first, toUInt32(maxMerge(last_event)) AS last, \
             maxMerge(newest_ms) AS newest_ms, uniqHLL12Merge(fans) AS fans \
             FROM match_minutes WHERE minute >= toDateTime(?) AND minute < toDateTime(?) \
             GROUP BY match_id ORDER BY events DESC, match_id LIMIT ?",
        )
        .bind(window.from)
        .bind(window.to)
        .bind(limit)
        .fetch_all()
        .await
        .map_err(failed)?;
    let newest = rows.iter().map(|r| r.newest_ms).max();
    let matches = rows
        .into_iter()
        .map(|r| MatchSummary {
            unique_fans: r.fans,
            events: r.events,
            first_event_ms: i64::from(r.first) * 1000,
            last_event_ms: i64::from(r.last) * 1000,
            newest_received_at_ms: r.newest_ms,
            match_id: r.match_id,
        })
        .collect();
    Ok(MatchList {
        window: window.json(),
        matches,
        newest_received_at_ms: newest,
        generated_at_ms,
    })
}
