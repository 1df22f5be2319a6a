//! After the replay: did every acknowledged event land, and does the query API agree?
//!
//! ClickHouse is asked over its plain HTTP interface (SQL in a POST body, `TabSeparated`
//! out, no compression: 18.16 answers compressed requests with empty bodies). The SQL is
//! kept old-style for 18.16. The match id goes into a string literal; it is checked against
//! the API's match-id charset before the run and escaped here anyway.
//!
//! The check polls, bounded by `--verify-timeout`, because the sink writes to ClickHouse
//! a little after Kafka acknowledges.

use std::collections::{BTreeMap, HashSet};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use bytes::Bytes;
use hyper::{Method, StatusCode};
use serde::{Deserialize, Serialize};
use uuid::Uuid;

use crate::client::request;
use crate::match_file::{Moment, MomentKind};
use crate::target::Target;

/// Pause between polls.
const POLL_INTERVAL: Duration = Duration::from_secs(1);

/// Bound on one ClickHouse or metrics request.
const QUERY_TIMEOUT: Duration = Duration::from_secs(30);

/// Largest answer read: a million ids as text are about 37 MiB.
const MAX_ANSWER_BYTES: usize = 256 << 20;

/// A goal's bucket (or the next one) must hold at least this many times the median
/// bucket to count as a peak.
pub const PEAK_RATIO: f64 = 3.0;

/// How many missing ids the report quotes.
const MISSING_SAMPLE: usize = 5;

/// What to check and where.
pub struct VerifyPlan {
    pub server: Arc<Target>,
    pub clickhouse: Arc<Target>,
    /// Database holding the `events` table; checked to be a plain identifier.
    pub database: String,
    pub match_id: String,
    /// Epoch ms of match minute 0.
    pub kickoff_ms: i64,
    pub end_minute: f64,
    pub moments: Vec<Moment>,
    pub timeout: Duration,
}

/// ClickHouse's view of the match.
#[derive(Debug, Clone, Serialize)]
pub struct ClickhouseCheck {
    /// `count()`: rows, duplicates included (fine before a ReplacingMergeTree merges).
    pub rows: u64,
    /// `uniqExact(event_id)`.
    pub distinct_ids: u64,
    /// Accepted by the server but absent: must be 0.
    pub missing: u64,
    pub missing_sample: Vec<String>,
    /// Present but never acknowledged (given up after a timeout, say): not a failure.
    pub unacknowledged_present: u64,
    /// Present but never sent by this run: another writer used the match id.
    pub foreign: u64,
}

/// The metrics endpoint's view of the match.
#[derive(Debug, Clone, Serialize)]
pub struct MetricsCheck {
    pub total_events: u64,
    /// Accepted events plus the unacknowledged ones ClickHouse holds anyway.
    pub expected_total: u64,
    pub unique_fans: u64,
    pub by_type: BTreeMap<String, u64>,
    pub bucket_seconds: u64,
    pub newest_received_at_ms: Option<i64>,
}

/// One match-minute bucket of the timeline.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct TimelineRow {
    pub minute: i64,
    pub events: u64,
}

/// How a goal minute stands out.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct GoalPeak {
    pub minute: u32,
    pub kind: String,
    /// The larger of the goal minute's bucket and the next one.
    pub peak_events: u64,
    /// `peak_events` over the median bucket.
    pub ratio: f64,
    pub is_peak: bool,
}

/// The outcome of the verification.
#[derive(Debug, Clone, Serialize)]
pub struct Verification {
    pub waited_s: f64,
    pub accepted: u64,
    pub clickhouse: Option<ClickhouseCheck>,
    pub metrics: Option<MetricsCheck>,
    pub timeline: Vec<TimelineRow>,
    pub median_bucket: f64,
    pub goal_peaks: Vec<GoalPeak>,
    /// Labels of the match file's moments by minute, for the chart.
    #[serde(skip)]
    pub moment_labels: BTreeMap<i64, String>,
    /// Errors of the last poll that failed to reach ClickHouse or the metrics endpoint.
    pub errors: Vec<String>,
}

impl Verification {
    /// Reasons the run fails verification (empty when it passes).
    pub fn failures(&self) -> Vec<String> {
        let mut failures = Vec::new();
        match &self.clickhouse {
            None => failures.push("ClickHouse could not be queried".to_string()),
            Some(ch) if ch.missing > 0 => failures.push(format!(
                "{} accepted events are missing from ClickHouse",
                ch.missing
            )),
            Some(_) => {}
        }
        match &self.metrics {
            None => failures.push("the metrics endpoint could not be read".to_string()),
            Some(m) if m.total_events != m.expected_total => failures.push(format!(
                "metrics total_events is {} but {} events were accepted{}",
                m.total_events,
                self.accepted,
                if m.expected_total != self.accepted {
                    format!(" (expected {} with unacknowledged ones)", m.expected_total)
                } else {
                    String::new()
                }
            )),
            Some(_) => {}
        }
        failures
    }

    /// Observations that do not fail the run: goal minutes that are no peak.
    pub fn warnings(&self) -> Vec<String> {
        self.goal_peaks
            .iter()
            .filter(|p| !p.is_peak)
            .map(|p| {
                format!(
                    "goal minute {} holds {:.1}x the median bucket, under {PEAK_RATIO}x",
                    p.minute, p.ratio
                )
            })
            .collect()
    }
}

/// `s` as a ClickHouse string literal.
pub fn sql_string(s: &str) -> String {
    let mut out = String::with_capacity(s.len() + 2);
    out.push('\'');
    for c in s.chars() {
        match c {
            '\\' => out.push_str("\\\\"),
            '\'' => out.push_str("\\'"),
            _ => out.push(c),
        }
    }
    out.push('\'');
    out
}

/// Whether `name` can be spliced into SQL as a database name.
pub fn valid_database(name: &str) -> bool {
    let mut chars = name.chars();
    let first_ok = chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_');
    first_ok && name.len() <= 64 && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

fn counts_sql(database: &str, match_id: &str) -> String {
    format!(
        "SELECT count(), uniqExact(event_id) FROM {database}.events WHERE match_id = {} \
         FORMAT TabSeparated",
        sql_string(match_id)
    )
}

fn ids_sql(database: &str, match_id: &str) -> String {
    format!(
        "SELECT DISTINCT toString(event_id) FROM {database}.events WHERE match_id = {} \
         FORMAT TabSeparated",
        sql_string(match_id)
    )
}

/// Parses `count()\tuniqExact()` output.
fn parse_counts(text: &str) -> Result<(u64, u64)> {
    let line = text.lines().next().unwrap_or("").trim();
    let mut fields = line.split('\t');
    let mut next = |what: &str| -> Result<u64> {
        fields
            .next()
            .with_context(|| format!("no {what} in {line:?}"))?
            .parse::<u64>()
            .with_context(|| format!("bad {what} in {line:?}"))
    };
    Ok((next("count()")?, next("uniqExact()")?))
}

fn parse_ids(text: &str) -> Result<HashSet<Uuid>> {
    text.lines()
        .filter(|l| !l.is_empty())
        .map(|l| Uuid::parse_str(l.trim()).with_context(|| format!("bad event id {l:?}")))
        .collect()
}

/// Runs one SQL statement and returns the answer's text.
async fn clickhouse_query(target: &Arc<Target>, sql: String) -> Result<String> {
    let answer = request(
        target,
        Method::POST,
        "/",
        Bytes::from(sql),
        QUERY_TIMEOUT,
        MAX_ANSWER_BYTES,
    )
    .await
    .with_context(|| format!("querying ClickHouse at {}", target.url))?;
    let text = String::from_utf8_lossy(&answer.body).into_owned();
    if answer.status != StatusCode::OK {
        let excerpt: String = text.chars().take(300).collect();
        bail!("ClickHouse answered {}: {}", answer.status, excerpt.trim());
    }
    Ok(text)
}

/// Compares ClickHouse's ids with the accepted and submitted sets.
fn compare_ids(
    present: &HashSet<Uuid>,
    accepted: &HashSet<Uuid>,
    submitted: &HashSet<Uuid>,
    rows: u64,
) -> ClickhouseCheck {
    let mut missing: Vec<&Uuid> = accepted.difference(present).collect();
    missing.sort();
    let unacknowledged = present
        .iter()
        .filter(|id| !accepted.contains(id) && submitted.contains(id))
        .count() as u64;
    let foreign = present.iter().filter(|id| !submitted.contains(id)).count() as u64;
    ClickhouseCheck {
        rows,
        distinct_ids: present.len() as u64,
        missing: missing.len() as u64,
        missing_sample: missing
            .iter()
            .take(MISSING_SAMPLE)
            .map(|id| id.to_string())
            .collect(),
        unacknowledged_present: unacknowledged,
        foreign,
    }
}

/// The metrics endpoint's answer (only the fields checked).
#[derive(Debug, Deserialize)]
struct MetricsAnswer {
    total_events: u64,
    #[serde(default)]
    unique_fans: u64,
    #[serde(default)]
    by_type: BTreeMap<String, u64>,
    #[serde(default)]
    bucket_seconds: u64,
    #[serde(default)]
    timeline: Vec<MetricsBucket>,
    #[serde(default)]
    newest_received_at_ms: Option<i64>,
}

#[derive(Debug, Deserialize)]
struct MetricsBucket {
    t: i64,
    events: u64,
}

async fn fetch_metrics(plan: &VerifyPlan) -> Result<MetricsAnswer> {
    let from = plan.kickoff_ms;
    let to = plan.kickoff_ms + (plan.end_minute.ceil() as i64 + 1) * 60_000;
    // The match id's charset is safe in a path segment, so it needs no escaping.
    let path = format!(
        "/v1/matches/{}/metrics?from={from}&to={to}&bucket=60s",
        plan.match_id
    );
    let answer = request(
        &plan.server,
        Method::GET,
        &path,
        Bytes::new(),
        QUERY_TIMEOUT,
        MAX_ANSWER_BYTES,
    )
    .await
    .with_context(|| format!("GET {path}"))?;
    if answer.status != StatusCode::OK {
        let text: String = String::from_utf8_lossy(&answer.body)
            .chars()
            .take(300)
            .collect();
        bail!("GET {path} answered {}: {}", answer.status, text.trim());
    }
    serde_json::from_slice(&answer.body).with_context(|| format!("parsing the answer to {path}"))
}

/// Events per match minute, with empty minutes filled in, from minute 0 to the end.
fn timeline_rows(answer: &MetricsAnswer, kickoff_ms: i64, end_minute: f64) -> Vec<TimelineRow> {
    let last = end_minute.ceil() as i64 - 1;
    let mut by_minute: BTreeMap<i64, u64> = (0..=last).map(|m| (m, 0)).collect();
    for bucket in &answer.timeline {
        let minute = (bucket.t - kickoff_ms).div_euclid(60_000);
        *by_minute.entry(minute).or_default() += bucket.events;
    }
    by_minute
        .into_iter()
        .map(|(minute, events)| TimelineRow { minute, events })
        .collect()
}

/// Median events per bucket (0 for an empty timeline).
pub fn median(rows: &[TimelineRow]) -> f64 {
    let mut counts: Vec<u64> = rows.iter().map(|r| r.events).collect();
    counts.sort_unstable();
    match counts.len() {
        0 => 0.0,
        n if n % 2 == 1 => counts[n / 2] as f64,
        n => (counts[n / 2 - 1] + counts[n / 2]) as f64 / 2.0,
    }
}

/// For each goal moment: its bucket or the next, against the median bucket.
pub fn goal_peaks(rows: &[TimelineRow], moments: &[Moment]) -> Vec<GoalPeak> {
    let median = median(rows).max(1.0);
    let events_at = |minute: i64| {
        rows.iter()
            .find(|r| r.minute == minute)
            .map_or(0, |r| r.events)
    };
    moments
        .iter()
        .filter(|m| m.kind.is_goal())
        .map(|m| {
            let minute = i64::from(m.minute);
            let peak_events = events_at(minute).max(events_at(minute + 1));
            let ratio = peak_events as f64 / median;
            GoalPeak {
                minute: m.minute,
                kind: m.kind.as_str().to_string(),
                peak_events,
                ratio,
                is_peak: ratio >= PEAK_RATIO,
            }
        })
        .collect()
}

/// A short label per minute for the chart, e.g. `goal ARG 1-0`.
fn moment_labels(moments: &[Moment]) -> BTreeMap<i64, String> {
    let mut labels: BTreeMap<i64, String> = BTreeMap::new();
    for m in moments {
        let mut label = m.kind.as_str().to_string();
        if let Some(team) = &m.team {
            label = format!("{label} {team}");
        }
        if let (MomentKind::Goal, Some(score)) = (m.kind, &m.score) {
            label = format!("{label} {score}");
        }
        if let Some(detail) = &m.detail {
            label = format!("{label}, {detail}");
        }
        // Stoppage time reads better as the clock showed it (90+7').
        let plain_clock = format!("{}'", m.minute);
        if let Some(clock) = m.clock.as_ref().filter(|c| **c != plain_clock) {
            label = format!("{label} [{clock}]");
        }
        labels
            .entry(i64::from(m.minute))
            .and_modify(|l| *l = format!("{l}; {label}"))
            .or_insert(label);
    }
    labels
}

/// Polls ClickHouse and the metrics endpoint until they hold every accepted event and
/// agree on the total, or `plan.timeout` passes.
pub async fn verify(
    plan: &VerifyPlan,
    accepted: &HashSet<Uuid>,
    submitted: &HashSet<Uuid>,
) -> Verification {
    let started = Instant::now();
    let deadline = started + plan.timeout;
    let mut clickhouse: Option<ClickhouseCheck> = None;
    let mut metrics: Option<MetricsAnswer> = None;
    let mut expected_total = accepted.len() as u64;
    let mut errors: Vec<String>;

    loop {
        let last_round = Instant::now() >= deadline;
        errors = Vec::new();

        // ClickHouse: the cheap count first, the full id list once it can be complete.
        let counts = clickhouse_query(&plan.clickhouse, counts_sql(&plan.database, &plan.match_id));
        match counts.await.and_then(|text| parse_counts(&text)) {
            Ok((rows, distinct)) if distinct >= accepted.len() as u64 || last_round => {
                let sql = ids_sql(&plan.database, &plan.match_id);
                let ids = clickhouse_query(&plan.clickhouse, sql).await;
                match ids.and_then(|text| parse_ids(&text)) {
                    Ok(present) => {
                        let check = compare_ids(&present, accepted, submitted, rows);
                        expected_total = accepted.len() as u64 + check.unacknowledged_present;
                        clickhouse = Some(check);
                    }
                    Err(e) => errors.push(format!("{e:#}")),
                }
            }
            Ok((rows, distinct)) => {
                // Not all there yet; remember the counts in case this is the last word.
                let partial = ClickhouseCheck {
                    rows,
                    distinct_ids: distinct,
                    missing: accepted.len() as u64 - distinct,
                    missing_sample: Vec::new(),
                    unacknowledged_present: 0,
                    foreign: 0,
                };
                clickhouse = Some(partial);
            }
            Err(e) => errors.push(format!("{e:#}")),
        }

        // The metrics endpoint, once ClickHouse is complete.
        let complete = clickhouse.as_ref().is_some_and(|c| c.missing == 0);
        if complete || last_round {
            match fetch_metrics(plan).await {
                Ok(answer) => metrics = Some(answer),
                Err(e) => errors.push(format!("{e:#}")),
            }
        }
        let agrees = metrics
            .as_ref()
            .is_some_and(|m| m.total_events == expected_total);
        if (complete && agrees) || last_round {
            break;
        }

        let left = deadline.saturating_duration_since(Instant::now());
        tokio::time::sleep(POLL_INTERVAL.min(left)).await;
    }

    let timeline = metrics
        .as_ref()
        .map(|m| timeline_rows(m, plan.kickoff_ms, plan.end_minute))
        .unwrap_or_default();
    Verification {
        waited_s: started.elapsed().as_secs_f64(),
        accepted: accepted.len() as u64,
        clickhouse,
        metrics: metrics.map(|m| MetricsCheck {
            total_events: m.total_events,
            expected_total,
            unique_fans: m.unique_fans,
            by_type: m.by_type,
            bucket_seconds: m.bucket_seconds,
            newest_received_at_ms: m.newest_received_at_ms,
        }),
        median_bucket: median(&timeline),
        goal_peaks: goal_peaks(&timeline, &plan.moments),
        moment_labels: moment_labels(&plan.moments),
        timeline,
        errors,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rows(counts: &[u64]) -> Vec<TimelineRow> {
        counts
            .iter()
            .enumerate()
            .map(|(m, &events)| TimelineRow {
                minute: m as i64,
                events,
            })
            .collect()
    }

    fn goal(minute: u32) -> Moment {
        Moment {
            minute,
            kind: MomentKind::Goal,
            team: Some("ARG".into()),
            clock: None,
            detail: None,
            score: Some("1-0".into()),
        }
    }

    #[test]
    fn string_literals_are_escaped() {
        assert_eq!(sql_string("wc2022-final"), "'wc2022-final'");
        assert_eq!(sql_string("a'b\\c"), r"'a\'b\\c'");
    }

    #[test]
    fn queries_are_old_style_tab_separated() {
        let sql = counts_sql("fanfinity", "m-r1");
        assert_eq!(
            sql,
            "SELECT count(), uniqExact(event_id) FROM fanfinity.events \
             WHERE match_id = 'm-r1' FORMAT TabSeparated"
        );
        assert!(ids_sql("fanfinity", "m").starts_with("SELECT DISTINCT toString(event_id)"));
    }

    #[test]
    fn database_names_are_plain_identifiers() {
        assert!(valid_database("fanfinity"));
        assert!(valid_database("_test_1"));
        assert!(!valid_database("fan finity"));
        assert!(!valid_database("db; DROP TABLE x"));
        assert!(!valid_database("1db"));
        assert!(!valid_database(""));
    }

    #[test]
    fn parses_clickhouse_answers() {
        assert_eq!(parse_counts("12\t10\n").expect("valid"), (12, 10));
        assert!(parse_counts("").is_err());
        assert!(parse_counts("12\n").is_err());
        let id = Uuid::now_v7();
        let ids = parse_ids(&format!("{id}\n\n")).expect("valid");
        assert!(ids.contains(&id));
        assert!(parse_ids("not-a-uuid\n").is_err());
    }

    #[test]
    fn separates_missing_unacknowledged_and_foreign_ids() {
        let [a, b, c, d, e] = [(); 5].map(|_| Uuid::now_v7());
        let accepted = HashSet::from([a, b]);
        let submitted = HashSet::from([a, b, c, d]);
        let present = HashSet::from([a, c, e]);
        let check = compare_ids(&present, &accepted, &submitted, 4);
        assert_eq!(check.missing, 1);
        assert_eq!(check.missing_sample, vec![b.to_string()]);
        assert_eq!(check.unacknowledged_present, 1);
        assert_eq!(check.foreign, 1);
        assert_eq!((check.rows, check.distinct_ids), (4, 3));
    }

    #[test]
    fn goal_minute_or_the_next_must_be_three_times_the_median() {
        let timeline = rows(&[10, 10, 10, 200, 40, 10, 10, 25, 10, 10]);
        assert_eq!(median(&timeline), 10.0);
        let peaks = goal_peaks(&timeline, &[goal(2), goal(6), goal(9)]);
        assert_eq!(peaks[0].peak_events, 200);
        assert_eq!(peaks[0].ratio, 20.0);
        assert!(peaks[0].is_peak);
        assert_eq!(peaks[1].ratio, 2.5);
        assert!(!peaks[1].is_peak);
        assert_eq!(peaks[2].peak_events, 10);
    }

    #[test]
    fn timeline_fills_empty_minutes_and_maps_buckets_to_minutes() {
        let kickoff = 1_700_000_040_000;
        let answer = MetricsAnswer {
            total_events: 7,
            unique_fans: 3,
            by_type: BTreeMap::new(),
            bucket_seconds: 60,
            timeline: vec![
                MetricsBucket {
                    t: kickoff,
                    events: 3,
                },
                MetricsBucket {
                    t: kickoff + 2 * 60_000,
                    events: 4,
                },
            ],
            newest_received_at_ms: None,
        };
        let rows = timeline_rows(&answer, kickoff, 3.0);
        let counts: Vec<(i64, u64)> = rows.iter().map(|r| (r.minute, r.events)).collect();
        assert_eq!(counts, vec![(0, 3), (1, 0), (2, 4)]);
    }

    #[test]
    fn metrics_total_must_match_the_accepted_count() {
        let v = Verification {
            waited_s: 1.0,
            accepted: 100,
            clickhouse: None,
            metrics: Some(MetricsCheck {
                total_events: 98,
                expected_total: 100,
                unique_fans: 10,
                by_type: BTreeMap::new(),
                bucket_seconds: 60,
                newest_received_at_ms: None,
            }),
            timeline: Vec::new(),
            median_bucket: 0.0,
            goal_peaks: Vec::new(),
            moment_labels: BTreeMap::new(),
            errors: Vec::new(),
        };
        let failures = v.failures();
        assert_eq!(failures.len(), 2);
        assert_eq!(failures[0], "ClickHouse could not be queried");
        assert_eq!(
            failures[1],
            "metrics total_events is 98 but 100 events were accepted"
        );
    }
}
