//! `GET /v1/matches/{id}/fans`: the most engaged fans, from `fan_counts` (events per fan
//! per minute). The window is widened to whole minutes, the table's resolution.

use clickhouse::{Client, Row};
use serde::{Deserialize, Serialize};

use super::params::QueryParams;
use super::sql::{failed, in_window, newest_sql, window_filter, NewestRow};
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
    pub user_id: String,
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
    let span = match_span(client, match_id).await?;
    let window = resolve(params, span, 60);
    let sql = format!(
        "SELECT user_id, sum(events) AS events FROM fan_counts WHERE {} \
         GROUP BY user_id ORDER BY events DESC, user_id LIMIT ?",
        window_filter("minute")
    );
    let newest_sql = newest_sql();
    let limit = params.limit.unwrap_or(DEFAULT_LIMIT);
    let top = in_window(client.query(&sql), match_id, window)
        .bind(limit)
        .fetch_all::<FanCount>();
    let newest = in_window(client.query(&newest_sql), match_id, window).fetch_one::<NewestRow>();
    let (fans, newest) = tokio::try_join!(top, newest).map_err(failed)?;
    Ok(MatchFans {
        match_id: match_id.to_string(),
        window: window.json(),
        fans,
        newest_received_at_ms: newest.newest(),
        generated_at_ms: now_ms(),
    })
}
