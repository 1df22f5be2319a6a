//! `GET /v1/matches/{id}/reactions`: the most used reaction emoji, from
//! `reaction_counts` (`payload.emoji` of `reaction` events, per 10 seconds).

use clickhouse::{Client, Row};
use serde::{Deserialize, Serialize};

use super::params::{QueryParams, BASE_BUCKET_SECS};
use super::sql::{failed, in_window, newest_sql, window_filter, NewestRow, Text};
use super::window::{match_span, resolve, WindowJson};
use super::{now_ms, QueryError};

const DEFAULT_LIMIT: u32 = 10;

/// The top reactions of a match.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct MatchReactions {
    pub match_id: String,
    pub window: WindowJson,
    /// Reactions that carried an emoji, all of them (not only the listed ones).
    pub total_reactions: u64,
    /// Most used first; ties by emoji.
    pub reactions: Vec<ReactionCount>,
    pub newest_received_at_ms: Option<i64>,
    pub generated_at_ms: i64,
}

#[derive(Debug, Clone, Serialize, Deserialize, Row, PartialEq)]
pub struct ReactionCount {
    pub emoji: Text,
    pub count: u64,
}

#[derive(Debug, Row, Deserialize)]
struct TotalRow {
    total: u64,
}

/// Answers the reactions endpoint. Must run on a Tokio runtime.
///
/// # Errors
/// Unknown match, ClickHouse failing.
pub async fn fetch(
    client: &Client,
    match_id: &str,
    params: &QueryParams,
) -> Result<MatchReactions, QueryError> {
    let generated_at_ms = now_ms();
    let span = match_span(client, match_id).await?;
    let window = resolve(params, span, BASE_BUCKET_SECS);
    let filter = window_filter("bucket");
    let top_sql = format!(
        "SELECT emoji, sum(events) AS count FROM reaction_counts WHERE {filter} \
         GROUP BY emoji ORDER BY count DESC, emoji LIMIT ?"
    );
    let total_sql = format!("SELECT sum(events) AS total FROM reaction_counts WHERE {filter}");
    let limit = params.limit.unwrap_or(DEFAULT_LIMIT);
    let newest_sql = newest_sql();
    let top = in_window(client.query(&top_sql), match_id, window)
        .bind(limit)
        .fetch_all::<ReactionCount>();
    let total = in_window(client.query(&total_sql), match_id, window).fetch_one::<TotalRow>();
    let newest = in_window(client.query(&newest_sql), match_id, window).fetch_one::<NewestRow>();
    let (reactions, total, newest) = tokio::try_join!(top, total, newest).map_err(failed)?;
    Ok(MatchReactions {
        match_id: match_id.to_string(),
        window: window.json(),
        total_reactions: total.total,
        reactions,
        newest_received_at_ms: newest.newest(),
        generated_at_ms,
    })
}
