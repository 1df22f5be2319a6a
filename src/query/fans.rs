//! `GET /v1/matches/{id}/fans`: the most engaged fans. A request without `from`/`to`
//! reads `fan_totals` (one row per fan and match); a window reads `fan_counts` (one row
//! per fan and minute), widened to whole minutes, its resolution. The whole match is the
//! view dashboards poll, and per-minute rows for it cost nearly as much as raw events.

use clickhouse::{Client, Row};
use serde::{Deserialize, Serialize};

use super::params::QueryParams;
use super::sql::{failed, in_window, newest_sql, window_filter, NewestRow, Text};
use super::window::{match_span, resolve, WindowJson};
use super::{now_ms, QueryError};

const DEFAULT_LIMIT: u32 = 10;

/// The top fans of a match.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct MatchFans {
    pub match_id: String,
    /// Whole minutes.
    pub window: WindowJson,
    /// Most events first; ties by user id.
    pub fans: Vec<FanCount>,
    pub newest_received_at_ms: Option<i64>,
    pub generated_at_ms: i64,
}

#[derive(Debug, Clone, Serialize, Deserialize, Row, PartialEq)]
pub struct FanCount {
    pub user_id: Text,
    pub events: u64,
}

/// Answers the fans endpoint. Must run on a Tokio runtime.
///
/// # Errors
/// Unknown match, ClickHouse failing.
pub async fn fetch(
    client: &Client,
    match_id: &str,
    params: &QueryParams,
) -> Result<MatchFans, QueryError> {
    let generated_at_ms = now_ms();
    let span = match_span(client, match_id).await?;
    let window = resolve(params, span, 60);
    let whole_match = params.from_secs.is_none() && params.to_secs.is_none();
    let sql = if whole_match {
        "SELECT user_id, sum(events) AS events FROM fan_totals WHERE match_id = ? \
         GROUP BY user_id ORDER BY events DESC, user_id LIMIT ?"
            .to_string()
    } else {
        format!(
            "SELECT user_id, sum(events) AS events FROM fan_counts WHERE {} \
             GROUP BY user_id ORDER BY events DESC, user_id LIMIT ?",
            window_filter("minute")
        )
    };
    let newest_sql = newest_sql();
    let limit = params.limit.unwrap_or(DEFAULT_LIMIT);
    let top = if whole_match {
        client.query(&sql).bind(match_id)
    } else {
        in_window(client.query(&sql), match_id, window)
    }
    .bind(limit)
    .fetch_all::<FanCount>();
    let newest = in_window(client.query(&newest_sql), match_id, window).fetch_one::<NewestRow>();
    let (fans, newest) = tokio::try_join!(top, newest).map_err(failed)?;
    Ok(MatchFans {
        match_id: match_id.to_string(),
        window: window.json(),
        fans,
        newest_received_at_ms: newest.newest(),
        generated_at_ms,
    })
}
