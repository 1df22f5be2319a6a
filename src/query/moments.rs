//! `GET /v1/matches/{id}/moments`: the buckets where engagement jumped above the match's
//! running baseline — what a goal does to the crowd.
//!
//! A bucket's baseline is the mean events per bucket over the [`BASELINE_BUCKETS`]
//! buckets before it (empty ones count as zero; fewer at the start of the match, none
//! before its first bucket, which therefore cannot be a moment). Its score is
//! `events / max(baseline, 1)`. The mean, not a median, because a goal is exactly the
//! bucket that should stand out, and the buckets right after it ride its tail: a mean
//! that includes the spike lets the crowd's return to normal fall out of the top list.

use std::collections::BTreeMap;

use clickhouse::Client;
use serde::Serialize;

use super::metrics::{fetch_timeline, TimelineBucket, DEFAULT_BUCKET_SECS};
use super::params::QueryParams;
use super::sql::{failed, in_window, newest_sql, NewestRow};
use super::window::{floor, match_span, resolve, timeline_start, Window, WindowJson};
use super::{now_ms, QueryError};

/// Buckets of history behind each baseline.
pub const BASELINE_BUCKETS: u32 = 10;
/// Moments listed when the request names no `limit`.
const DEFAULT_LIMIT: u32 = 10;

/// The top moments of a match.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct MatchMoments {
    pub match_id: String,
    pub window: WindowJson,
    pub bucket_seconds: u32,
    pub baseline_buckets: u32,
    /// Highest score first.
    pub moments: Vec<Moment>,
    /// Only the newest `query.max_buckets` buckets were scored (the request named no
    /// `from` and the window is longer), as in the metrics answer.
    pub timeline_truncated: bool,
    pub newest_received_at_ms: Option<i64>,
    pub generated_at_ms: i64,
}

/// One bucket that stood out.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Moment {
    /// Bucket start, epoch milliseconds.
    pub t: i64,
    pub events: u64,
    /// Mean events per bucket over the buckets before it.
    pub baseline: f64,
    pub score: f64,
    /// The type with the most events in the bucket, and its share of them.
    pub dominant_type: &'static str,
    pub dominant_share: f64,
    pub by_type: BTreeMap<&'static str, u64>,
}

/// Answers the moments endpoint. Must run on a Tokio runtime.
///
/// # Errors
/// Unknown match, a window over `max_buckets` buckets, ClickHouse failing.
pub async fn fetch(
    client: &Client,
    match_id: &str,
    params: &QueryParams,
    max_buckets: u64,
) -> Result<MatchMoments, QueryError> {
    let generated_at_ms = now_ms();
    let bucket = params.bucket_secs.unwrap_or(DEFAULT_BUCKET_SECS);
    let span = match_span(client, match_id).await?;
    let window = resolve(params, span, bucket);
    let (from, timeline_truncated) = timeline_start(params, window, bucket, max_buckets)?;
    // History for the first buckets' baselines, but never before the match began.
    let history = from
        .saturating_sub(BASELINE_BUCKETS * bucket)
        .max(floor(span.first, bucket));
    let read = Window {
        from: history.min(from),
        to: window.to,
    };
    let newest = in_window(client.query(&newest_sql()), match_id, window).fetch_one::<NewestRow>();
    let (timeline, newest) = tokio::try_join!(
        fetch_timeline(client, match_id, read, bucket, false),
        async { newest.await.map_err(failed) },
    )?;
    let limit = params.limit.unwrap_or(DEFAULT_LIMIT) as usize;
    Ok(MatchMoments {
        match_id: match_id.to_string(),
        window: window.json(),
        bucket_seconds: bucket,
        baseline_buckets: BASELINE_BUCKETS,
        moments: top_moments(&timeline, read.from, from, bucket, limit),
        timeline_truncated,
        newest_received_at_ms: newest.newest(),
        generated_at_ms,
    })
}

/// Scores every bucket from `from` on against the buckets before it, starting the
/// history at `history_from` (the match's first bucket or the window's lookback), and
/// returns the `limit` best. `timeline` lists buckets with events only, oldest first.
fn top_moments(
    timeline: &[TimelineBucket],
    history_from: u32,
    from: u32,
    bucket: u32,
    limit: usize,
) -> Vec<Moment> {
    let by_t: BTreeMap<i64, &TimelineBucket> = timeline.iter().map(|b| (b.t, b)).collect();
    let Some(last) = timeline.last().map(|b| b.t) else {
        return Vec::new();
    };
    let step = i64::from(bucket) * 1000;
    let mut recent: std::collections::VecDeque<u64> = std::collections::VecDeque::new();
    let mut moments = Vec::new();
    let mut t = i64::from(history_from) * 1000;
    while t <= last {
        let events = by_t.get(&t).map_or(0, |b| b.events);
        if t >= i64::from(from) * 1000 && events > 0 && !recent.is_empty() {
            if let Some(b) = by_t.get(&t) {
                let baseline = recent.iter().sum::<u64>() as f64 / recent.len() as f64;
                moments.push(moment(b, baseline));
            }
        }
        recent.push_back(events);
        if recent.len() > BASELINE_BUCKETS as usize {
            recent.pop_front();
        }
        t += step;
    }
    moments.sort_by(|a, b| {
        b.score
            .total_cmp(&a.score)
            .then(b.events.cmp(&a.events))
            .then(a.t.cmp(&b.t))
    });
    moments.truncate(limit);
    moments
}

fn moment(b: &TimelineBucket, baseline: f64) -> Moment {
    let (dominant_type, dominant) = b
        .by_type
        .iter()
        .max_by(|x, y| x.1.cmp(y.1).then(y.0.cmp(x.0)))
        .map_or(("", 0), |(k, v)| (*k, *v));
    Moment {
        t: b.t,
        events: b.events,
        baseline: round3(baseline),
        score: round3(b.events as f64 / baseline.max(1.0)),
        dominant_type,
        dominant_share: round3(dominant as f64 / b.events.max(1) as f64),
        by_type: b.by_type.clone(),
    }
}

fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::query::sql::zero_by_type;

    fn bucket(t_secs: i64, cheers: u64, goals: u64) -> TimelineBucket {
        let mut by_type = zero_by_type();
        by_type.insert("cheer", cheers);
        by_type.insert("goal_celebration", goals);
        TimelineBucket {
            t: t_secs * 1000,
            events: cheers + goals,
            unique_fans: 1,
            by_type,
        }
    }

    #[test]
    fn a_spike_over_a_flat_baseline_tops_the_list() {
        let mut tl: Vec<TimelineBucket> = (0..20).map(|i| bucket(i * 60, 10, 0)).collect();
        tl[12] = bucket(12 * 60, 40, 160);
        let top = top_moments(&tl, 0, 0, 60, 3);
        assert_eq!(top[0].t, 12 * 60 * 1000);
        assert_eq!(top[0].baseline, 10.0);
        assert_eq!(top[0].score, 20.0);
        assert_eq!(top[0].dominant_type, "goal_celebration");
        assert_eq!(top[0].dominant_share, 0.8);
        // The first bucket has no history and is never a moment.
        assert!(top.iter().all(|m| m.t != 0));
    }

    #[test]
    fn gaps_count_as_zero_and_the_window_start_is_respected() {
        let tl = vec![bucket(0, 10, 0), bucket(600, 5, 0), bucket(660, 50, 0)];
        // 600 s: one bucket of 10 and nine empty ones before it: baseline 1. 660 s: the
        // 10 has left the history, the 5 joined it: baseline 0.5, scored against 1.
        let top = top_moments(&tl, 0, 600, 60, 10);
        assert_eq!(top.len(), 2);
        assert_eq!(
            (top[0].t, top[0].baseline, top[0].score),
            (660_000, 0.5, 50.0)
        );
        assert_eq!(
            (top[1].t, top[1].baseline, top[1].score),
            (600_000, 1.0, 5.0)
        );
        assert!(top_moments(&[], 0, 0, 60, 5).is_empty());
    }
}
