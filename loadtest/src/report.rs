//! What a replay tells people: the progress line, the end-of-run summary, the verification
//! (with its timeline chart) and the verdict. Only formatting lives here; the numbers come
//! from `stats.rs` and `verify.rs`.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::time::Duration;

use serde::Serialize;
use tokio::sync::watch;

use crate::stats::{Progress, Tally};
use crate::verify::Verification;

/// Width of the longest bar of the timeline chart, in characters.
const CHART_WIDTH: usize = 50;

/// The flags a run was made with, echoed in reports.
#[derive(Debug, Clone, Serialize)]
pub struct Settings {
    pub url: String,
    pub match_file: String,
    pub fans: u32,
    pub batch: usize,
    pub base_rate: f64,
    pub speed: f64,
    pub connections: usize,
    pub max_attempts: u32,
    pub seed: u64,
}

/// Facts about a run that the tally does not hold.
#[derive(Debug, Clone)]
pub struct RunInfo {
    pub match_id: String,
    pub kickoff: String,
    pub end_minute: f64,
    pub settings: Settings,
    pub planned: Duration,
    pub elapsed: Duration,
    pub stopped_by_duration_limit: bool,
    pub abandoned_batches: u64,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct EventCounts {
    pub submitted: u64,
    pub sent: u64,
    pub accepted: u64,
    pub rejected: u64,
    pub given_up: u64,
    /// Submitted but not at an end when the duration limit struck.
    pub abandoned: u64,
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct BatchCounts {
    pub submitted: u64,
    pub accepted: u64,
    pub rejected: u64,
    pub given_up: u64,
    pub abandoned: u64,
    pub retries: u64,
    pub ack_mismatches: u64,
}

/// Latency from a batch's intended send time to its final answer, in milliseconds.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct LatencyMs {
    pub count: u64,
    pub p50: f64,
    pub p90: f64,
    pub p99: f64,
    pub p999: f64,
    pub max: f64,
}

impl LatencyMs {
    /// The header of the five latency columns of an end-of-run table, each `width` wide.
    pub fn header(width: usize) -> String {
        ["p50 ms", "p90 ms", "p99 ms", "p99.9 ms", "max ms"]
            .map(|h| format!("{h:>width$}"))
            .join(" ")
    }

    /// This latency's five columns, matching [`LatencyMs::header`].
    pub fn cells(&self, width: usize) -> String {
        [self.p50, self.p90, self.p99, self.p999, self.max]
            .map(|v| format!("{v:>width$.2}"))
            .join(" ")
    }
}

#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct Throughput {
    /// Accepted events over the whole run time.
    pub overall_events_per_s: f64,
    /// Accepted events in the busiest wall-clock second.
    pub peak_events_per_s: u64,
    /// That second, counted from the start.
    pub peak_second: u64,
}

/// The end-of-run summary (also the `summary` of `--json-report`).
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    pub match_id: String,
    pub kickoff: String,
    pub end_minute: f64,
    pub settings: Settings,
    pub planned_duration_s: f64,
    pub duration_s: f64,
    pub stopped_by_duration_limit: bool,
    pub events: EventCounts,
    pub batches: BatchCounts,
    pub requests_total: u64,
    pub requests_by_status: BTreeMap<String, u64>,
    pub rejections_by_error: BTreeMap<String, u64>,
    pub rejection_samples: Vec<String>,
    pub latency_ms: LatencyMs,
    pub throughput: Throughput,
}

impl Summary {
    pub fn build(t: &Tally, info: RunInfo) -> Summary {
        let ms = |q: f64| t.latency.value_at_quantile(q) as f64 / 1000.0;
        let latency_ms = LatencyMs {
            count: t.latency.len(),
            p50: ms(0.50),
            p90: ms(0.90),
            p99: ms(0.99),
            p999: ms(0.999),
            max: t.latency.max() as f64 / 1000.0,
        };

        let (peak_second, peak) = t
            .accepted_per_second
            .iter()
            .enumerate()
            .max_by_key(|&(_, n)| *n)
            .map_or((0, 0), |(s, &n)| (s as u64, n));
        let secs = info.elapsed.as_secs_f64();
        let throughput = Throughput {
            overall_events_per_s: if secs > 0.0 {
                t.events_accepted as f64 / secs
            } else {
                0.0
            },
            peak_events_per_s: peak,
            peak_second,
        };

        let ended = t.events_accepted + t.events_rejected + t.events_given_up;
        Summary {
            match_id: info.match_id,
            kickoff: info.kickoff,
            end_minute: info.end_minute,
            settings: info.settings,
            planned_duration_s: info.planned.as_secs_f64(),
            duration_s: secs,
            stopped_by_duration_limit: info.stopped_by_duration_limit,
            events: EventCounts {
                submitted: t.events_submitted,
                sent: t.events_sent,
                accepted: t.events_accepted,
                rejected: t.events_rejected,
                given_up: t.events_given_up,
                abandoned: t.events_submitted.saturating_sub(ended),
            },
            batches: BatchCounts {
                submitted: t.batches_submitted,
                accepted: t.batches_accepted,
                rejected: t.batches_rejected,
                given_up: t.batches_given_up,
                abandoned: info.abandoned_batches,
                retries: t.retries,
                ack_mismatches: t.ack_mismatches,
            },
            requests_total: t.attempts_by_status.values().sum(),
            requests_by_status: t.attempts_by_status.clone(),
            rejections_by_error: t.rejections_by_error.clone(),
            rejection_samples: t.rejection_samples.clone(),
            latency_ms,
            throughput,
        }
    }

    /// Attempts answered with a 4xx status.
    pub fn client_errors(&self) -> u64 {
        self.requests_by_status
            .iter()
            .filter(|(k, _)| k.starts_with('4'))
            .map(|(_, v)| v)
            .sum()
    }
}

/// Everything `--json-report` writes.
#[derive(Debug, Serialize)]
pub struct JsonReport<'a> {
    pub passed: bool,
    pub failures: &'a [String],
    pub summary: &'a Summary,
    pub verification: Option<&'a Verification>,
}

/// `12345678` as `12,345,678`.
/// Writes a run's JSON report (pretty-printed) to `path`.
///
/// # Errors
/// Serialization or the write failing, naming the file.
pub fn write_json_report<T: Serialize>(path: &std::path::Path, report: &T) -> anyhow::Result<()> {
    use anyhow::Context as _;
    let json = serde_json::to_vec_pretty(report).context("serializing the JSON report")?;
    std::fs::write(path, json)
        .with_context(|| format!("writing the JSON report to {}", path.display()))
}

pub fn count(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// A latency in milliseconds, with more precision when it is small.
fn millis(ms: f64) -> String {
    if ms < 10.0 {
        format!("{ms:.2}")
    } else if ms < 1000.0 {
        format!("{ms:.1}")
    } else {
        count(ms.round() as u64)
    }
}

/// Prints `line()` to stderr once a second until told to stop (the live progress view
/// of every subcommand).
pub fn spawn_progress(
    line: impl Fn() -> String + Send + 'static,
) -> (watch::Sender<bool>, tokio::task::JoinHandle<()>) {
    let (stop, mut stopped) = watch::channel(false);
    let task = tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        tick.tick().await;
        loop {
            tokio::select! {
                _ = stopped.wait_for(|s| *s) => break,
                _ = tick.tick() => eprintln!("{}", line()),
            }
        }
    });
    (stop, task)
}

/// The one-line progress report printed every second.
pub fn progress_line(p: &Progress) -> String {
    let p99 = p
        .window_p99_ms
        .map_or_else(|| "-".to_string(), |ms| format!("{} ms", millis(ms)));
    format!(
        "[{:>4}s] minute {:>6.1} {:<12} target {:>7} ev/s | sent {:>9} ev | 202 {:>7} | \
         4xx {} | 5xx {} | conn {} | p99 {}",
        p.elapsed.as_secs(),
        p.minute,
        p.period,
        count(p.target_rate.round() as u64),
        count(p.events_sent),
        count(p.accepted_answers),
        count(p.client_errors),
        count(p.server_errors),
        count(p.connection_errors),
        p99,
    )
}

/// The summary printed to stdout at the end of the sending phase.
pub fn render_summary(s: &Summary) -> String {
    let mut out = String::new();
    let e = &s.events;
    let b = &s.batches;
    let l = &s.latency_ms;
    let statuses: Vec<String> = s
        .requests_by_status
        .iter()
        .map(|(k, v)| format!("{k} {}", count(*v)))
        .collect();

    // Writing to a String cannot fail.
    let _ = writeln!(out, "== replay summary ==");
    let _ = writeln!(
        out,
        "match       {} (kickoff {}, {} match minutes)",
        s.match_id, s.kickoff, s.end_minute
    );
    let _ = writeln!(
        out,
        "target      {} over {} connections, batches of {}, {} fans, base {} ev/s, speed {}x",
        s.settings.url,
        s.settings.connections,
        s.settings.batch,
        count(u64::from(s.settings.fans)),
        s.settings.base_rate,
        s.settings.speed
    );
    let limit_note = if s.stopped_by_duration_limit {
        " - cut short by --duration-limit"
    } else {
        ""
    };
    let _ = writeln!(
        out,
        "duration    {:.1} s (planned {:.1} s){limit_note}",
        s.duration_s, s.planned_duration_s
    );
    let _ = writeln!(
        out,
        "events      sent {}  accepted {}  rejected {}  given up {}  abandoned {}",
        count(e.sent),
        count(e.accepted),
        count(e.rejected),
        count(e.given_up),
        count(e.abandoned)
    );
    let _ = writeln!(
        out,
        "batches     {} submitted, {} retries, {} given up, {} ack mismatches",
        count(b.submitted),
        count(b.retries),
        count(b.given_up),
        count(b.ack_mismatches)
    );
    let _ = writeln!(
        out,
        "requests    {}: {}",
        count(s.requests_total),
        statuses.join(" | ")
    );
    for sample in &s.rejection_samples {
        let _ = writeln!(out, "  4xx       {sample}");
    }
    let _ = writeln!(
        out,
        "latency ms  p50 {}  p90 {}  p99 {}  p99.9 {}  max {}  \
         (intended send -> final answer, {} batches)",
        millis(l.p50),
        millis(l.p90),
        millis(l.p99),
        millis(l.p999),
        millis(l.max),
        count(l.count)
    );
    let _ = writeln!(
        out,
        "throughput  {} events/s overall, {} events/s at the peak second (second {})",
        count(s.throughput.overall_events_per_s.round() as u64),
        count(s.throughput.peak_events_per_s),
        s.throughput.peak_second
    );
    out
}

/// A text chart of events per match-minute bucket; `marks` labels minutes (moments).
pub fn render_timeline(rows: &[(i64, u64)], marks: &BTreeMap<i64, String>) -> String {
    let mut out = String::new();
    let highest = rows.iter().map(|&(_, n)| n).max().unwrap_or(0).max(1);
    for &(minute, events) in rows {
        let len = (events as f64 / highest as f64 * CHART_WIDTH as f64).round() as usize;
        let bar = "#".repeat(len);
        let mark = marks.get(&minute).map_or("", String::as_str);
        let line = format!(
            "{minute:>4}' |{bar:<width$}| {:>9}  {mark}",
            count(events),
            width = CHART_WIDTH
        );
        let _ = writeln!(out, "{}", line.trim_end());
    }
    out
}

/// The verification's part of the stdout report.
pub fn render_verification(v: &Verification) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "== verification ({:.1} s) ==", v.waited_s);

    match &v.clickhouse {
        Some(ch) => {
            let _ = writeln!(
                out,
                "clickhouse  {} rows, {} distinct event ids (duplicates before merge: {})",
                count(ch.rows),
                count(ch.distinct_ids),
                count(ch.rows.saturating_sub(ch.distinct_ids))
            );
            let _ = writeln!(
                out,
                "            missing (accepted, absent) {}  present but never acknowledged {}  \
                 never sent {}",
                count(ch.missing),
                count(ch.unacknowledged_present),
                count(ch.foreign)
            );
            if !ch.missing_sample.is_empty() {
                let _ = writeln!(
                    out,
                    "            e.g. missing {}",
                    ch.missing_sample.join(", ")
                );
            }
        }
        None => {
            let _ = writeln!(out, "clickhouse  not checked");
        }
    }

    match &v.metrics {
        Some(m) => {
            let by_type: Vec<String> = m
                .by_type
                .iter()
                .map(|(k, n)| format!("{k} {}", count(*n)))
                .collect();
            let _ = writeln!(
                out,
                "metrics     total_events {} (expected {}), unique_fans {}",
                count(m.total_events),
                count(m.expected_total),
                count(m.unique_fans)
            );
            let _ = writeln!(out, "            {}", by_type.join(", "));
        }
        None => {
            let _ = writeln!(out, "metrics     not read");
        }
    }
    for error in &v.errors {
        let _ = writeln!(out, "error       {error}");
    }

    if !v.timeline.is_empty() {
        let rows: Vec<(i64, u64)> = v.timeline.iter().map(|r| (r.minute, r.events)).collect();
        let _ = writeln!(
            out,
            "timeline (events per match minute, by event time; median bucket {:.0})",
            v.median_bucket
        );
        out.push_str(&render_timeline(&rows, &v.moment_labels));
    }

    for peak in &v.goal_peaks {
        let verdict = if peak.is_peak { "ok" } else { "NOT A PEAK" };
        let _ = writeln!(
            out,
            "goal peak   minute {:>3} {:<13} {:>9} events, {:>5.1}x the median  {verdict}",
            peak.minute,
            peak.kind,
            count(peak.peak_events),
            peak.ratio
        );
    }
    out
}

/// The closing verdict line(s).
pub fn render_verdict(failures: &[String], warnings: &[String]) -> String {
    let mut out = String::new();
    for w in warnings {
        let _ = writeln!(out, "warning: {w}");
    }
    if failures.is_empty() {
        let _ = writeln!(out, "verdict: PASS");
    } else {
        let _ = writeln!(out, "verdict: FAIL");
        for f in failures {
            let _ = writeln!(out, "  - {f}");
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stats::{BatchEnd, Stats};
    use std::time::Instant;
    use uuid::Uuid;

    fn settings() -> Settings {
        Settings {
            url: "http://127.0.0.1:8080".into(),
            match_file: "m.json".into(),
            fans: 5000,
            batch: 25,
            base_rate: 400.0,
            speed: 60.0,
            connections: 32,
            max_attempts: 20,
            seed: 1,
        }
    }

    fn summary() -> Summary {
        let stats = Stats::new(Instant::now());
        let ids: Vec<Uuid> = (0..25).map(|_| Uuid::now_v7()).collect();
        stats.record_submitted(&ids, 1.0, 400.0, "first_half");
        stats.record_attempt("503", 1, 25);
        stats.record_attempt("202", 2, 25);
        let accepted = BatchEnd::Accepted { acked: Some(25) };
        stats.record_end(&ids, accepted, Duration::from_micros(1500));
        let info = RunInfo {
            match_id: "m-r1".into(),
            kickoff: "2026-01-01T12:00:00Z".into(),
            end_minute: 172.0,
            settings: settings(),
            planned: Duration::from_secs(172),
            elapsed: Duration::from_secs(2),
            stopped_by_duration_limit: false,
            abandoned_batches: 0,
        };
        let tally = stats.lock();
        Summary::build(&tally, info)
    }

    #[test]
    fn counts_get_thousands_separators() {
        assert_eq!(count(0), "0");
        assert_eq!(count(999), "999");
        assert_eq!(count(1000), "1,000");
        assert_eq!(count(12_345_678), "12,345,678");
    }

    #[test]
    fn summary_shows_counts_statuses_and_latency() {
        let s = summary();
        assert_eq!(s.events.accepted, 25);
        assert_eq!(s.events.abandoned, 0);
        assert_eq!(s.requests_total, 2);
        assert_eq!(s.throughput.overall_events_per_s, 12.5);

        let text = render_summary(&s);
        assert!(text.contains("events      sent 25  accepted 25  rejected 0  given up 0"));
        assert!(text.contains("requests    2: 202 1 | 503 1"));
        assert!(text.contains("latency ms  p50 1.50"), "{text}");
        assert!(text.contains("duration    2.0 s (planned 172.0 s)\n"));
    }

    #[test]
    fn summary_serializes_for_the_json_report() {
        let s = summary();
        let report = JsonReport {
            passed: true,
            failures: &[],
            summary: &s,
            verification: None,
        };
        let json = serde_json::to_value(&report).expect("serializes");
        assert_eq!(json["summary"]["events"]["accepted"], 25);
        assert_eq!(json["summary"]["requests_by_status"]["503"], 1);
        assert_eq!(json["summary"]["latency_ms"]["count"], 1);
    }

    #[test]
    fn progress_line_is_one_line() {
        let p = Progress {
            elapsed: Duration::from_secs(23),
            minute: 23.4,
            period: "first_half".into(),
            target_rate: 16000.0,
            events_sent: 123_456,
            events_accepted: 123_000,
            accepted_answers: 4_900,
            client_errors: 0,
            server_errors: 12,
            connection_errors: 1,
            window_p99_ms: Some(3.25),
        };
        let line = progress_line(&p);
        assert!(!line.contains('\n'));
        assert!(
            line.starts_with("[  23s] minute   23.4 first_half"),
            "{line}"
        );
        assert!(line.contains("target  16,000 ev/s"));
        assert!(line.contains("5xx 12"));
        assert!(line.ends_with("p99 3.25 ms"));
    }

    #[test]
    fn timeline_bars_scale_to_the_highest_bucket() {
        let rows = [(22, 400), (23, 16_000), (24, 6_300)];
        let marks = BTreeMap::from([(23, "goal ARG 1-0".to_string())]);
        let chart = render_timeline(&rows, &marks);
        let lines: Vec<&str> = chart.lines().collect();
        assert_eq!(lines.len(), 3);
        assert!(lines[0].starts_with("  22' |# "), "{}", lines[0]);
        assert!(lines[1].contains(&"#".repeat(CHART_WIDTH)));
        assert!(lines[1].ends_with("16,000  goal ARG 1-0"));
        assert_eq!(lines[2].matches('#').count(), 20);
        assert!(lines[2].ends_with("6,300"));
    }

    #[test]
    fn verdict_lists_each_failure() {
        assert_eq!(render_verdict(&[], &[]), "verdict: PASS\n");
        let text = render_verdict(&["3 accepted events missing".into()], &["w".into()]);
        assert_eq!(
            text,
            "warning: w\nverdict: FAIL\n  - 3 accepted events missing\n"
        );
    }
}
