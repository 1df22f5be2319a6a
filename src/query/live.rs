//! `GET /v1/matches/{id}/live`: the newest 60 seconds of a match, per second.
//!
//! The window ends at the match's newest second of event time, but never after the
//! server's clock: a client whose clock runs ahead cannot drag the live view into the
//! future, and a replayed (past) match still shows its own newest minute.

use std::collections::BTreeMap;

use clickhouse::{Client, Row};
use serde::{Deserialize, Serialize};

use super::metrics::{fetch_timeline, unique_fans, TimelineBucket};
use super::params::BASE_BUCKET_SECS;
use super::sql::{add_type, failed, in_window, newest_sql, zero_by_type, NewestRow};
use super::window::{ceil, floor, Window, WindowJson};
use super::{now_ms, QueryError};

/// Seconds the live view covers.
pub const LIVE_SECS: u32 = 60;

/// The last minute of a match.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct MatchLive {
    pub match_id: String,
    pub window: WindowJson,
    pub bucket_seconds: u32,
    pub total_events: u64,
    /// Over the window widened to whole 10-second buckets.
    pub unique_fans: u64,
    pub by_type: BTreeMap<&'static str, u64>,
    /// Seconds with events only, oldest first.
    pub timeline: Vec<LiveSecond>,
    pub newest_received_at_ms: Option<i64>,
    pub generated_at_ms: i64,
}

/// Events in one second. No unique fans: they are kept per 10 seconds.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct LiveSecond {
    /// The second, epoch milliseconds.
    pub t: i64,
    pub events: u64,
    pub by_type: BTreeMap<&'static str, u64>,
}

impl From<TimelineBucket> for LiveSecond {
    fn from(b: TimelineBucket) -> Self {
        Self {
            t: b.t,
            events: b.events,
            by_type: b.by_type,
        }
    }
}

#[derive(Debug, Row, Deserialize)]
struct NewestSecondRow {
    last: u32,
    rows: u64,
}

/// Answers the live endpoint. Must run on a Tokio runtime.
///
/// # Errors
/// Unknown match, ClickHouse failing.
pub async fn fetch(client: &Client, match_id: &str) -> Result<MatchLive, QueryError> {
    let generated_at_ms = now_ms();
    let now_secs = u32::try_from(generated_at_ms / 1000).unwrap_or(u32::MAX - 3_600);
    let newest: NewestSecondRow = client
        .query(
            "SELECT toUInt32(maxIf(second, second <= toDateTime(?))) AS last, count() AS rows \
             FROM event_counts WHERE match_id = ?",
        )
        .bind(now_secs)
        .bind(match_id)
        .fetch_one()
        .await
        .map_err(failed)?;
    if newest.rows == 0 {
        return Err(QueryError::UnknownMatch {
            match_id: match_id.to_string(),
        });
    }
    // Only future events: show the minute up to now.
    let end = if newest.last == 0 {
        now_secs
    } else {
        newest.last
    } + 1;
    let window = Window {
        from: end.saturating_sub(LIVE_SECS),
        to: end,
    };
    let fans_window = Window {
        from: floor(window.from, BASE_BUCKET_SECS),
        to: ceil(window.to, BASE_BUCKET_SECS),
    };
    let newest_sql = newest_sql();
    let newest = async {
        in_window(client.query(&newest_sql), match_id, window)
            .fetch_one::<NewestRow>()
            .await
            .map_err(failed)
    };
    let (timeline, fans, newest) = tokio::try_join!(
        fetch_timeline(client, match_id, window, 1, false),
        unique_fans(client, match_id, fans_window),
        newest,
    )?;
    let mut by_type = zero_by_type();
    for bucket in &timeline {
        for (name, n) in &bucket.by_type {
            add_type(&mut by_type, name, *n);
        }
    }
    Ok(MatchLive {
        match_id: match_id.to_string(),
        window: window.json(),
        bucket_seconds: 1,
        total_events: timeline.iter().map(|b| b.events).sum(),
        unique_fans: fans,
        by_type,
        timeline: timeline.into_iter().map(LiveSecond::from).collect(),
        newest_received_at_ms: newest.newest(),
        generated_at_ms,
    })
}
