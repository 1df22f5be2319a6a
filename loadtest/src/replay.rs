//! `loadtest replay`: plays a match's crowd against the server, then verifies the result.
//!
//! The run has four steps: check the flags and the target, pace batches on the clock
//! while the pool sends them, drain what is still in flight, then report and verify.
//! Every step is bounded: the sending and draining by `--duration-limit`, each request by
//! `--request-timeout`, retries by `--max-attempts`, the verification by
//! `--verify-timeout`.

use std::collections::HashSet;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{ensure, Context, Result};
use bytes::Bytes;
use time::format_description::well_known::Rfc3339;
use time::OffsetDateTime;
use uuid::Uuid;

use crate::client::{self, Batch, Pool, PoolSettings};
use crate::events::{valid_match_id, Crowd, EventFactory};
use crate::match_file::MatchFile;
use crate::report::{self, JsonReport, RunInfo, Settings, Summary};
use crate::schedule::{real_duration, Pacer, RateCurve};
use crate::stats::Stats;
use crate::target::Target;
use crate::verify::{self, valid_database, Verification, VerifyPlan};

/// How far before now the default kickoff lies, so the whole match is in the recent past.
const DEFAULT_KICKOFF_AGO: Duration = Duration::from_secs(3 * 3600);

/// Parses a number of seconds (fractions allowed) into a duration of up to a day.
fn parse_seconds(text: &str) -> Result<Duration, String> {
    let secs: f64 = text
        .parse()
        .map_err(|_| format!("{text:?} is not a number of seconds"))?;
    if !(secs > 0.0 && secs <= 86_400.0) {
        return Err(format!("{secs} s is outside (0, 86400]"));
    }
    Ok(Duration::from_secs_f64(secs))
}

/// Flags of `loadtest replay`.
#[derive(Debug, Clone, clap::Args)]
pub struct ReplayArgs {
    /// Base URL of the fanfinity server (loopback only unless --allow-remote).
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    pub url: String,
    /// API key with the ingest role, sent with every post (none: the server runs with
    /// auth off).
    #[arg(long)]
    pub ingest_key: Option<String>,
    /// API key with the read role, for the metrics-endpoint checks of the verification.
    #[arg(long)]
    pub read_key: Option<String>,

    /// Match file with periods and key moments.
    #[arg(long = "match", default_value = "loadtest/matches/wc2022-final.json")]
    pub match_file: PathBuf,

    /// Match id to send; defaults to the file's match_id plus "-r<unix seconds>".
    #[arg(long)]
    pub match_id: Option<String>,

    /// Kickoff (match minute 0) as RFC 3339; defaults to now - 3 h, on a whole minute.
    #[arg(long)]
    pub kickoff: Option<String>,

    /// Number of simulated fans (user ids fan-0 .. fan-<n-1>, split home/away).
    #[arg(long, default_value_t = 5000)]
    pub fans: u32,

    /// Events per request.
    #[arg(long, default_value_t = 25)]
    pub batch: usize,

    /// Events per second of real time in open play; moments multiply it.
    #[arg(long, default_value_t = 400.0)]
    pub base_rate: f64,

    /// Match minutes per real minute (60: one match minute per second).
    #[arg(long, default_value_t = 60.0)]
    pub speed: f64,

    /// Keep-alive HTTP/1.1 connections to the server.
    #[arg(long, default_value_t = 32)]
    pub connections: usize,

    /// Attempts per batch (503s and connection errors are retried) before giving up.
    #[arg(long, default_value_t = 20)]
    pub max_attempts: u32,

    /// Bound on one request, in seconds.
    #[arg(long, default_value = "30", value_parser = parse_seconds)]
    pub request_timeout: Duration,

    /// Safety cap on sending plus draining, in seconds; the replay stops there.
    #[arg(long, default_value = "600", value_parser = parse_seconds)]
    pub duration_limit: Duration,

    /// How long to wait for GET /readyz to answer 200 before starting, in seconds.
    #[arg(long, default_value = "30", value_parser = parse_seconds)]
    pub ready_timeout: Duration,

    /// ClickHouse HTTP interface used by the verification (loopback only unless
    /// --allow-remote).
    #[arg(long, default_value = "http://127.0.0.1:18123")]
    pub clickhouse_url: String,

    /// ClickHouse database holding the `events` table.
    #[arg(long, default_value = "fanfinity")]
    pub clickhouse_db: String,

    /// Skip the verification against ClickHouse and the metrics endpoint.
    #[arg(long)]
    pub no_verify: bool,

    /// How long the verification may wait for events to land, in seconds.
    #[arg(long, default_value = "120", value_parser = parse_seconds)]
    pub verify_timeout: Duration,

    /// Also write the summary and verification as JSON to this file.
    #[arg(long)]
    pub json_report: Option<PathBuf>,

    /// Allow targets other than this machine. Never point it at a host you do not own.
    #[arg(long)]
    pub allow_remote: bool,

    /// Seed for who sends what (default: from the clock). Event ids stay unique.
    #[arg(long)]
    pub seed: Option<u64>,
}

impl ReplayArgs {
    fn check(&self) -> Result<()> {
        ensure!(
            (1..=10_000_000).contains(&self.fans),
            "--fans must be 1..=10000000"
        );
        ensure!((1..=1000).contains(&self.batch), "--batch must be 1..=1000");
        ensure!(
            self.base_rate > 0.0 && self.base_rate <= 1_000_000.0,
            "--base-rate must be in (0, 1000000]"
        );
        ensure!(
            self.speed > 0.0 && self.speed <= 100_000.0,
            "--speed must be in (0, 100000]"
        );
        ensure!(
            (1..=1024).contains(&self.connections),
            "--connections must be 1..=1024"
        );
        ensure!(
            (1..=100).contains(&self.max_attempts),
            "--max-attempts must be 1..=100"
        );
        ensure!(
            valid_database(&self.clickhouse_db),
            "--clickhouse-db {:?} is not a plain identifier",
            self.clickhouse_db
        );
        Ok(())
    }
}

/// What a replay ended with.
#[derive(Debug)]
pub struct Outcome {
    pub summary: Summary,
    #[cfg_attr(
        not(test),
        expect(dead_code, reason = "read by tests; the binary prints it instead")
    )]
    pub verification: Option<Verification>,
    /// Why the run fails; empty when it passes.
    pub failures: Vec<String>,
}

fn unix_ms(at: SystemTime) -> i64 {
    at.duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

/// Kickoff in epoch ms: `--kickoff`, or now - 3 h rounded down to a whole minute so that
/// match minutes line up with the metrics endpoint's 60 s buckets.
fn kickoff_ms(flag: Option<&str>, now: SystemTime) -> Result<i64> {
    match flag {
        Some(text) => {
            let at = OffsetDateTime::parse(text, &Rfc3339)
                .with_context(|| format!("--kickoff {text:?} is not RFC 3339"))?;
            Ok((at.unix_timestamp_nanos() / 1_000_000) as i64)
        }
        None => {
            let ms = unix_ms(now - DEFAULT_KICKOFF_AGO);
            Ok(ms - ms.rem_euclid(60_000))
        }
    }
}

fn rfc3339(ms: i64) -> String {
    OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .ok()
        .and_then(|t| t.format(&Rfc3339).ok())
        .unwrap_or_else(|| format!("{ms} ms"))
}

/// Everything the pacing loop needs.
struct Pacing<'a> {
    file: &'a MatchFile,
    curve: &'a RateCurve,
    args: &'a ReplayArgs,
    factory: EventFactory,
    started: Instant,
    deadline: Instant,
}

/// Sends batches on the curve's schedule until the match ends or the deadline. Returns
/// whether the deadline cut it short.
async fn pace(mut p: Pacing<'_>, pool: &Pool, stats: &Stats) -> Result<bool> {
    for planned in Pacer::new(p.curve, p.args.speed, p.args.batch) {
        let due = p.started + planned.due;
        if due >= p.deadline {
            return Ok(true);
        }
        tokio::time::sleep_until(due.into()).await;

        let events = p.factory.batch(&planned, p.curve, p.args.batch);
        let ids: Vec<Uuid> = events.iter().map(|e| e.event_id).collect();
        let body = serde_json::to_vec(&events).context("serializing a batch")?;
        let period = p
            .file
            .period_at(planned.minute_to)
            .map_or("break", |period| period.name.as_str());
        stats.record_submitted(&ids, planned.minute_to, planned.point.events_per_s, period);

        // Open model: a full queue delays the batch, and the delay counts as latency.
        let batch = Batch {
            ids,
            body: Bytes::from(body),
            due,
            attempts: 0,
        };
        match tokio::time::timeout_at(p.deadline.into(), pool.submit(batch)).await {
            Ok(submitted) => submitted?,
            Err(_) => return Ok(true),
        }
    }
    Ok(false)
}

/// Runs a replay and prints its report.
///
/// # Errors
/// For bad flags, an unreadable match file, a refused or unresolvable target, a server
/// that never gets ready, or an unwritable `--json-report`. A run that completes but
/// fails its checks is an `Ok` with `failures`.
pub async fn run(args: ReplayArgs) -> Result<Outcome> {
    // Flags, targets and match file: refuse before sending anything.
    args.check()?;
    let resolved = Target::resolve(&args.url, args.allow_remote).await?;
    let server = Arc::new(resolved.with_key(args.ingest_key.clone()));
    let reader = Arc::new(resolved.with_key(args.read_key.clone()));
    let clickhouse = if args.no_verify {
        None
    } else {
        Some(Arc::new(
            Target::resolve(&args.clickhouse_url, args.allow_remote).await?,
        ))
    };
    let file = MatchFile::load(&args.match_file)?;
    let now = SystemTime::now();
    let match_id = match &args.match_id {
        Some(id) => id.clone(),
        None => format!("{}-r{}", file.match_id, unix_ms(now) / 1000),
    };
    ensure!(
        valid_match_id(&match_id),
        "match id {match_id:?} is not 1-64 characters of [A-Za-z0-9_.:-]; pick one with --match-id"
    );
    let kickoff = kickoff_ms(args.kickoff.as_deref(), now)?;
    client::wait_ready(&server, args.ready_timeout).await?;

    let curve = RateCurve::new(&file, args.base_rate);
    let planned = real_duration(curve.end_minute(), args.speed);
    let seed = args.seed.unwrap_or_else(|| unix_ms(now) as u64);
    if kickoff.rem_euclid(60_000) != 0 {
        eprintln!("note: --kickoff is not on a whole minute; goal minutes will straddle buckets");
    }
    if planned > args.duration_limit {
        eprintln!(
            "note: the match takes {:.0} s at speed {}; --duration-limit stops it at {:.0} s",
            planned.as_secs_f64(),
            args.speed,
            args.duration_limit.as_secs_f64()
        );
    }
    eprintln!(
        "replaying {:?} as {match_id} to {} (kickoff {}, {} match minutes, {:.0} s, seed {seed})",
        if file.title.is_empty() {
            &file.match_id
        } else {
            &file.title
        },
        server.url,
        rfc3339(kickoff),
        curve.end_minute(),
        planned.as_secs_f64()
    );

    // Send on the clock, then drain.
    let started = Instant::now();
    let deadline = started + args.duration_limit;
    let stats = Arc::new(Stats::new(started));
    let settings = PoolSettings {
        connections: args.connections,
        max_attempts: args.max_attempts,
        request_timeout: args.request_timeout,
        deadline,
        seed,
    };
    let pool = Pool::start(Arc::clone(&server), settings, Arc::clone(&stats));
    let (stop_progress, progress) = report::spawn_progress({
        let stats = Arc::clone(&stats);
        move || report::progress_line(&stats.progress())
    });
    let crowd = Crowd::new(args.fans, &file.home, &file.away);
    let pacing = Pacing {
        file: &file,
        curve: &curve,
        args: &args,
        factory: EventFactory::new(&match_id, kickoff, crowd, seed),
        started,
        deadline,
    };
    let paced = pace(pacing, &pool, &stats).await;
    let abandoned = pool.drain().await;
    let elapsed = started.elapsed();
    let _ = stop_progress.send(true);
    let _ = progress.await;
    let cut_short = paced?;

    // Report what was sent.
    let (summary, accepted, submitted) = {
        let tally = stats.lock();
        let info = RunInfo {
            match_id: match_id.clone(),
            kickoff: rfc3339(kickoff),
            end_minute: curve.end_minute(),
            settings: Settings {
                url: server.url.clone(),
                match_file: args.match_file.display().to_string(),
                fans: args.fans,
                batch: args.batch,
                base_rate: args.base_rate,
                speed: args.speed,
                connections: args.connections,
                max_attempts: args.max_attempts,
                seed,
            },
            planned,
            elapsed,
            stopped_by_duration_limit: cut_short || abandoned > 0,
            abandoned_batches: abandoned,
        };
        let accepted: HashSet<Uuid> = tally.accepted_ids.iter().copied().collect();
        let submitted: HashSet<Uuid> = tally.submitted_ids.iter().copied().collect();
        (Summary::build(&tally, info), accepted, submitted)
    };
    print!("{}", report::render_summary(&summary));

    // Verify what landed.
    let verification = match clickhouse {
        Some(clickhouse) => {
            let plan = VerifyPlan {
                server: Arc::clone(&reader),
                clickhouse,
                database: args.clickhouse_db.clone(),
                match_id: match_id.clone(),
                kickoff_ms: kickoff,
                end_minute: curve.end_minute(),
                moments: file.moments.clone(),
                timeout: args.verify_timeout,
            };
            let v = verify::verify(&plan, &accepted, &submitted).await;
            print!("{}", report::render_verification(&v));
            Some(v)
        }
        None => None,
    };

    // Verdict and JSON.
    let mut failures = Vec::new();
    let client_errors = summary.client_errors();
    if client_errors > 0 {
        let codes: Vec<&str> = summary
            .rejections_by_error
            .keys()
            .map(String::as_str)
            .collect();
        failures.push(format!(
            "{client_errors} requests were answered 4xx ({})",
            codes.join(", ")
        ));
    }
    if summary.events.accepted == 0 {
        failures.push("no event was accepted".to_string());
    }
    let mut warnings = Vec::new();
    if let Some(v) = &verification {
        failures.extend(v.failures());
        warnings.extend(v.warnings());
    }
    print!("{}", report::render_verdict(&failures, &warnings));

    if let Some(path) = &args.json_report {
        let report = JsonReport {
            passed: failures.is_empty(),
            failures: &failures,
            summary: &summary,
            verification: verification.as_ref(),
        };
        crate::report::write_json_report(path, &report)?;
    }

    Ok(Outcome {
        summary,
        verification,
        failures,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mock_server::{MockConfig, MockServer};
    use clap::Parser;

    /// A 46-minute match: quick to replay at speed 600 (under 5 s).
    const MINI_MATCH: &str = r#"{
        "match_id": "mini-final", "home": "ARG", "away": "FRA",
        "periods": [
            {"name": "first_half", "start_minute": 0, "end_minute": 20},
            {"name": "half_time", "start_minute": 20, "end_minute": 25},
            {"name": "second_half", "start_minute": 25, "end_minute": 45}
        ],
        "moments": [
            {"minute": 5, "kind": "substitution", "team": "FRA"},
            {"minute": 8, "kind": "goal", "team": "ARG", "score": "1-0"},
            {"minute": 14, "kind": "penalty_awarded", "team": "FRA"},
            {"minute": 15, "kind": "goal", "team": "FRA", "score": "1-1"},
            {"minute": 32, "kind": "big_save", "team": "ARG"},
            {"minute": 38, "kind": "goal", "team": "ARG", "score": "2-1"},
            {"minute": 45, "kind": "final_whistle", "team": "ARG"}
        ]
    }"#;

    #[derive(Parser)]
    struct TestCli {
        #[command(flatten)]
        args: ReplayArgs,
    }

    /// Parses whitespace-separated flags (no flag value here contains a space).
    fn args(flags: &str) -> ReplayArgs {
        let argv = std::iter::once("replay").chain(flags.split_whitespace());
        TestCli::try_parse_from(argv).expect("valid flags").args
    }

    fn temp_path(name: &str) -> PathBuf {
        std::env::temp_dir().join(format!("loadtest-{name}-{}", std::process::id()))
    }

    /// Replays `match_json` (the mini match by default) against `mock`, which also stands
    /// in for ClickHouse, as match `name`.
    async fn replay(mock: &MockServer, name: &str, flags: &str, match_json: &str) -> Outcome {
        let path = temp_path(&format!("{name}.json"));
        std::fs::write(&path, match_json).expect("temp dir is writable");
        let url = mock.url();
        let all = format!(
            "--url {url} --clickhouse-url {url} --match {} --match-id {name} {flags}",
            path.display()
        );
        let outcome = run(args(&all)).await.expect("replay runs");
        let _ = std::fs::remove_file(path);
        outcome
    }

    #[test]
    fn defaults_match_the_brief() {
        let a = args("");
        assert_eq!(a.url, "http://127.0.0.1:8080");
        let sizes = (a.fans, a.batch, a.connections, a.max_attempts);
        assert_eq!(sizes, (5000, 25, 32, 20));
        assert_eq!((a.base_rate, a.speed), (400.0, 60.0));
        assert_eq!(a.duration_limit, Duration::from_secs(600));
        assert_eq!(a.verify_timeout, Duration::from_secs(120));
        assert_eq!(a.clickhouse_url, "http://127.0.0.1:18123");
        assert_eq!(a.clickhouse_db, "fanfinity");
        assert!(!a.no_verify && !a.allow_remote);
    }

    #[test]
    fn refuses_nonsense_flags() {
        assert!(args("--batch 0").check().is_err());
        assert!(args("--clickhouse-db x;y").check().is_err());
        assert!(TestCli::try_parse_from(["replay", "--duration-limit", "-1"]).is_err());
    }

    #[test]
    fn default_kickoff_is_three_hours_ago_on_a_whole_minute() {
        let now = UNIX_EPOCH + Duration::from_millis(1_700_000_123_456);
        let kickoff = kickoff_ms(None, now).expect("no flag");
        assert_eq!(kickoff % 60_000, 0);
        let ago = 1_700_000_123_456 - kickoff;
        assert!((3 * 3_600_000..3 * 3_600_000 + 60_000).contains(&ago));

        let given = kickoff_ms(Some("2022-12-18T15:00:00Z"), now).expect("valid");
        assert_eq!(given, 1_671_375_600_000);
        assert!(kickoff_ms(Some("yesterday"), now).is_err());
    }

    #[tokio::test]
    async fn refuses_a_remote_url_before_sending() {
        let err = run(args("--url http://10.1.2.3:8080 --no-verify"))
            .await
            .expect_err("remote host is refused");
        assert!(format!("{err:#}").contains("--allow-remote"));
        let err = run(args("--clickhouse-url http://192.168.0.9:8123"))
            .await
            .expect_err("remote ClickHouse is refused");
        assert!(format!("{err:#}").contains("--allow-remote"));
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn replays_against_a_mock_that_sheds_load_and_retries_the_same_ids() {
        let config = MockConfig {
            unavailable_every: 7,
            drop_every: 41,
            ..MockConfig::default()
        };
        let mock = MockServer::start(config).await;
        let outcome = replay(&mock, "mini-retry", "--speed 600 --no-verify", MINI_MATCH).await;

        let s = &outcome.summary;
        assert!(outcome.failures.is_empty(), "{:?}", outcome.failures);
        assert!(s.events.accepted > 5_000, "{:?}", s.events);
        assert_eq!(s.events.accepted, s.events.submitted);
        assert_eq!((s.events.rejected, s.events.given_up), (0, 0));
        assert!(s.requests_by_status.get("503").copied().unwrap_or(0) > 0);
        assert!(s.requests_by_status.get("io_error").copied().unwrap_or(0) > 0);
        assert!(s.batches.retries > 0);
        assert_eq!(s.batches.ack_mismatches, 0);

        // The server saw every accepted id, and retries reused ids rather than minting more.
        let state = mock.state();
        assert_eq!(state.distinct_ids(), s.events.accepted as usize);
        assert_eq!(state.invalid_events, 0);
        assert!(
            state.redelivered > 0,
            "a dropped connection leads to a resend"
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn verifies_against_mock_clickhouse_and_metrics() {
        let config = MockConfig {
            unavailable_every: 11,
            drop_every: 53,
            ..MockConfig::default()
        };
        let mock = MockServer::start(config).await;
        let report = temp_path("report.json");
        let flags = format!(
            "--speed 600 --verify-timeout 10 --json-report {}",
            report.display()
        );
        let outcome = replay(&mock, "mini-verify", &flags, MINI_MATCH).await;

        assert!(outcome.failures.is_empty(), "{:?}", outcome.failures);
        let v = outcome.verification.expect("verification ran");
        let ch = v.clickhouse.expect("clickhouse checked");
        assert_eq!(ch.missing, 0);
        assert_eq!(ch.distinct_ids, outcome.summary.events.accepted);
        assert!(
            ch.rows > ch.distinct_ids,
            "resent batches are duplicate rows"
        );
        let metrics = v.metrics.expect("metrics read");
        assert_eq!(metrics.total_events, outcome.summary.events.accepted);

        let minutes: Vec<u32> = v.goal_peaks.iter().map(|p| p.minute).collect();
        assert_eq!(minutes, vec![8, 15, 38]);
        let clear = v.goal_peaks.iter().all(|p| p.is_peak && p.ratio > 10.0);
        assert!(clear, "{:?}", v.goal_peaks);

        let written = std::fs::read(&report).expect("report written");
        let json: serde_json::Value = serde_json::from_slice(&written).expect("report is JSON");
        assert_eq!(json["passed"], true);
        assert_eq!(json["verification"]["clickhouse"]["missing"], 0);
        let _ = std::fs::remove_file(report);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn fails_when_the_server_loses_acknowledged_events() {
        let config = MockConfig {
            lose_every: 50,
            ..MockConfig::default()
        };
        let mock = MockServer::start(config).await;
        let flags = "--speed 600 --base-rate 200 --verify-timeout 3";
        let outcome = replay(&mock, "mini-lose", flags, MINI_MATCH).await;

        let lost = mock.state().lost_events as u64;
        assert!(lost > 0);
        let ch = outcome
            .verification
            .and_then(|v| v.clickhouse)
            .expect("checked");
        assert_eq!(ch.missing, lost);
        let failed = |what: &str| outcome.failures.iter().any(|f| f.contains(what));
        assert!(failed("missing from ClickHouse"), "{:?}", outcome.failures);
        assert!(failed("metrics total_events"), "{:?}", outcome.failures);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn gives_up_after_max_attempts_when_always_overloaded() {
        let config = MockConfig {
            unavailable_every: 1,
            ..MockConfig::default()
        };
        let mock = MockServer::start(config).await;
        let flags = "--speed 6000 --base-rate 50 --batch 5 --max-attempts 2 --no-verify";
        let outcome = replay(&mock, "mini-overload", flags, MINI_MATCH).await;

        let s = &outcome.summary;
        assert_eq!(s.events.accepted, 0);
        assert_eq!(s.events.given_up, s.events.submitted);
        let answered_503 = s.requests_by_status.get("503").copied();
        assert_eq!(answered_503, Some(2 * s.batches.submitted));
        assert_eq!(outcome.failures, vec!["no event was accepted".to_string()]);
    }

    /// The whole 172-minute final against the mock, with verification: about 20 s.
    /// `LOADTEST_MATCH` names the file (default: `matches/wc2022-final.json` here).
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    #[ignore = "slow: replays the full final; run with --ignored --nocapture to see the report"]
    async fn replays_the_full_final_against_the_mock() {
        let default = concat!(env!("CARGO_MANIFEST_DIR"), "/matches/wc2022-final.json");
        let path = std::env::var("LOADTEST_MATCH").unwrap_or_else(|_| default.to_string());
        let text = std::fs::read_to_string(&path).expect("match file readable");
        let config = MockConfig {
            unavailable_every: 9,
            drop_every: 97,
            ..MockConfig::default()
        };
        let mock = MockServer::start(config).await;
        let outcome = replay(&mock, "wc2022-final-mock", "--speed 600", &text).await;
        assert!(outcome.failures.is_empty(), "{:?}", outcome.failures);
    }
}
