//! `GET /v1/matches/{id}/polls`: poll results, from `poll_votes` (`payload.poll_id` and
//! `payload.option` of `poll_vote` events, per 10 seconds). Every vote event counts: a
//! fan who votes twice counts twice, as the events say.

use std::collections::BTreeMap;

use clickhouse::{Client, Row};
use serde::{Deserialize, Serialize};

use super::params::{QueryParams, BASE_BUCKET_SECS};
use super::sql::{failed, in_window, newest_sql, window_filter, NewestRow, Text};
use super::window::{match_span, resolve, WindowJson};
use super::{now_ms, QueryError};

/// Polls listed, most votes first; a hostile client can invent poll ids, so both lists
/// are capped.
const MAX_POLLS: u32 = 100;
/// Options listed per poll, most votes first.
const MAX_OPTIONS: u32 = 50;

/// The poll results of a match.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct MatchPolls {
    pub match_id: String,
    pub window: WindowJson,
    pub polls: Vec<PollResult>,
    pub newest_received_at_ms: Option<i64>,
    pub generated_at_ms: i64,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct PollResult {
    pub poll_id: Text,
    /// Every vote of the poll, listed options or not.
    pub total_votes: u64,
    pub options: Vec<OptionVotes>,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct OptionVotes {
    pub option: Text,
    pub votes: u64,
    /// Of the poll's total, rounded to 3 decimals.
    pub share: f64,
}

#[derive(Debug, Row, Deserialize)]
struct PollRow {
    poll_id: Text,
    total: u64,
}

#[derive(Debug, Row, Deserialize)]
struct OptionRow {
    poll_id: Text,
    option: Text,
    votes: u64,
}

/// Answers the polls endpoint. Must run on a Tokio runtime.
///
/// # Errors
/// Unknown match, ClickHouse failing.
pub async fn fetch(
    client: &Client,
    match_id: &str,
    params: &QueryParams,
) -> Result<MatchPolls, QueryError> {
    let generated_at_ms = now_ms();
    let span = match_span(client, match_id).await?;
    let window = resolve(params, span, BASE_BUCKET_SECS);
    let filter = window_filter("bucket");
    let polls_sql = format!(
        "SELECT poll_id, sum(votes) AS total FROM poll_votes WHERE {filter} \
         GROUP BY poll_id ORDER BY total DESC, poll_id LIMIT {MAX_POLLS}"
    );
    let newest_sql = newest_sql();
    let polls = in_window(client.query(&polls_sql), match_id, window).fetch_all::<PollRow>();
    let newest = in_window(client.query(&newest_sql), match_id, window).fetch_one::<NewestRow>();
    let (polls, newest) = tokio::try_join!(polls, newest).map_err(failed)?;

    let options = if polls.is_empty() {
        Vec::new()
    } else {
        let ids: Vec<&str> = polls.iter().map(|p| p.poll_id.0.as_str()).collect();
        let options_sql = format!(
            "SELECT poll_id, option, sum(votes) AS votes FROM poll_votes \
             WHERE {filter} AND has(?, poll_id) GROUP BY poll_id, option \
             ORDER BY votes DESC, option LIMIT {MAX_OPTIONS} BY poll_id"
        );
        in_window(client.query(&options_sql), match_id, window)
            .bind(ids)
            .fetch_all::<OptionRow>()
            .await
            .map_err(failed)?
    };
    Ok(MatchPolls {
        match_id: match_id.to_string(),
        window: window.json(),
        polls: assemble(polls, options),
        newest_received_at_ms: newest.newest(),
        generated_at_ms,
    })
}

/// Puts each poll's options (already in order) under it, polls in `polls` order.
fn assemble(polls: Vec<PollRow>, options: Vec<OptionRow>) -> Vec<PollResult> {
    let mut by_poll: BTreeMap<Text, Vec<OptionRow>> = BTreeMap::new();
    for row in options {
        by_poll.entry(row.poll_id.clone()).or_default().push(row);
    }
    polls
        .into_iter()
        .map(|poll| {
            let total = poll.total;
            let options = by_poll
                .remove(&poll.poll_id)
                .unwrap_or_default()
                .into_iter()
                .map(|o| OptionVotes {
                    share: (o.votes as f64 / total.max(1) as f64 * 1000.0).round() / 1000.0,
                    option: o.option,
                    votes: o.votes,
                })
                .collect();
            PollResult {
                poll_id: poll.poll_id,
                total_votes: total,
                options,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn options_go_under_their_poll_with_shares() {
        let polls = vec![
            PollRow {
                poll_id: "motm".into(),
                total: 3,
            },
            PollRow {
                poll_id: "next-goal".into(),
                total: 1,
            },
        ];
        let option = |poll: &str, option: &str, votes| OptionRow {
            poll_id: poll.into(),
            option: option.into(),
            votes,
        };
        let options = vec![
            option("next-goal", "ARG", 1),
            option("motm", "messi", 2),
            option("motm", "mbappe", 1),
        ];
        let out = assemble(polls, options);
        assert_eq!(out[0].poll_id.0, "motm");
        assert_eq!(out[0].options[0].option.0, "messi");
        assert_eq!(out[0].options[0].share, 0.667);
        assert_eq!(out[1].options[0].share, 1.0);
    }
}
