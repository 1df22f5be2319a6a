//! `loadtest steady`, `spike` and `ramp`: their flags, their rate schedules, and the run
//! that wires the open-model engine, the watchers and the reports together.
//!
//! A run has five steps: check flags and target (and raise the fd limit, pre-open the
//! connections), warm up unmeasured, run the profile's measured phases, drain what is in
//! flight, then report and verify. Every step is bounded: sending and draining by
//! `--duration-limit`, each attempt by `--request-timeout`, retries by `--max-attempts`,
//! verification by `--verify-timeout`.

use std::collections::HashSet;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{ensure, Context, Result};

use serde::Serialize;
use tokio::sync::watch;
use uuid::Uuid;

use crate::body_template::{BodyFormat, BodyTemplate, DEFAULT_EVENT_BYTES};
use crate::client;
use crate::conn_pool::{auto_source_ips, loopback_sources, ConnPool};
use crate::events::valid_match_id;
use crate::fd_limit::{self, SPARE_DESCRIPTORS};
use crate::open_model::{Engine, EngineSettings, RateUnit};
use crate::open_report::{self, GeneratorReport, OpenReport, RampReport, VerificationReport};
use crate::open_stats::{OpenStats, PhaseResult};
use crate::proc_watch::{self, ServerUsage, Watch};
use crate::ramp_plan::{step_held, RampPlan, StepOutcome};
use crate::target::Target;
use crate::verify::{self, valid_database, VerifyPlan};
use crate::visibility::{self, Probes, VisibilityReport};

/// Most connections one run may hold: 50k is the goal, with room; past ~250k the
/// 127.0.0.x source addresses (254 x 28k ports) and memory both run short.
pub const MAX_CONNECTIONS: usize = 250_000;

/// Parses seconds (fractions allowed) within (0, 86400].
fn positive_seconds(text: &str) -> Result<f64, String> {
    let secs: f64 = text
        .parse()
        .map_err(|_| format!("{text:?} is not a number of seconds"))?;
    if !(secs > 0.0 && secs <= 86_400.0) {
        return Err(format!("{secs} s is outside (0, 86400]"));
    }
    Ok(secs)
}

/// Parses seconds within [0, 86400].
fn seconds(text: &str) -> Result<f64, String> {
    if text.trim() == "0" {
        return Ok(0.0);
    }
    positive_seconds(text)
}

/// Flags all three profiles share.
#[derive(Debug, Clone, clap::Args, Serialize)]
pub struct CommonArgs {
    /// Base URL of the server (loopback only unless --allow-remote).
    #[arg(long, default_value = "http://127.0.0.1:8080")]
    pub url: String,
    /// What the rate flags count.
    #[arg(long, value_enum, default_value_t = RateUnit::Events)]
    pub rate_unit: RateUnit,
    /// Events per request.
    #[arg(long, default_value_t = 1)]
    pub batch: usize,
    /// Body framing: json (one object for --batch 1, else an array) or ndjson.
    #[arg(long, value_enum, default_value_t = BodyFormat::Json)]
    pub format: BodyFormat,
    /// Approximate serialized size of one event; the payload is padded to reach it.
    #[arg(long, default_value_t = DEFAULT_EVENT_BYTES)]
    pub event_bytes: usize,
    /// Keep-alive connections, used in turn.
    #[arg(long, default_value_t = 64)]
    pub connections: usize,
    /// Open every connection before the clock starts; exit 2 if any cannot be opened.
    #[arg(long)]
    pub open_connections_first: bool,
    /// Connects per second while pre-opening.
    #[arg(long, default_value_t = 5000.0)]
    pub connect_rate: f64,
    /// Source addresses 127.0.0.1..127.0.0.K for a loopback target (default:
    /// ceil(connections / 20000)).
    #[arg(long)]
    pub source_ips: Option<usize>,
    /// Tokio worker threads (default: all cores).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Seconds sent at the start rate before measuring.
    #[arg(long, default_value = "2", value_parser = seconds)]
    pub warmup: f64,
    /// Attempts per request; default 1 for steady and ramp (a 503 counts as a 503), 5 for
    /// spike (429/5xx/errors retried with the same ids, honouring Retry-After).
    #[arg(long)]
    pub max_attempts: Option<u32>,
    /// Match id of every event (default lt-<profile>-<unix seconds>).
    #[arg(long)]
    pub match_id: Option<String>,
    /// Write the report as JSON to this file.
    #[arg(long)]
    pub json_report: Option<PathBuf>,
    /// Afterwards check ClickHouse and the metrics endpoint: every acknowledged id
    /// present, none counted twice.
    #[arg(long)]
    pub verify: bool,
    /// ClickHouse HTTP interface for --verify.
    #[arg(long, default_value = "http://127.0.0.1:18123")]
    pub clickhouse_url: String,
    /// ClickHouse database holding the `events` table.
    #[arg(long, default_value = "fanfinity")]
    pub clickhouse_db: String,
    /// How long --verify waits for events to land, in seconds.
    #[arg(long, default_value = "120", value_parser = positive_seconds)]
    pub verify_timeout: f64,
    /// Sample this process's CPU and memory over the measured window.
    #[arg(long)]
    pub watch_pid: Option<u32>,
    /// Measure the time from 202 to visible in the metrics endpoint.
    #[arg(long)]
    pub probe_visibility: bool,
    /// Ingest key (X-Fanfinity-Key) for posts.
    #[arg(long)]
    #[serde(skip)]
    pub ingest_key: Option<String>,
    /// Read key (X-Fanfinity-Key) for the metrics endpoint.
    #[arg(long)]
    #[serde(skip)]
    pub read_key: Option<String>,
    /// Allow targets other than this machine. Never point it at a host you do not own.
    #[arg(long)]
    pub allow_remote: bool,
    /// Seed of the retry jitter (default: from the clock). Event ids stay unique.
    #[arg(long)]
    pub seed: Option<u64>,
    /// Bound on one attempt, connect to last byte, in seconds.
    #[arg(long, default_value = "10", value_parser = positive_seconds)]
    pub request_timeout: f64,
    /// Safety cap on warm-up, sending and draining, in seconds.
    #[arg(long, default_value = "900", value_parser = positive_seconds)]
    pub duration_limit: f64,
    /// How long to wait for GET /readyz to answer 200, in seconds (0: don't ask).
    #[arg(long, default_value = "30", value_parser = seconds)]
    pub ready_timeout: f64,
    /// steady and spike fail (exit 1) when more than this fraction of the measured
    /// events was not accepted in the end (429, 5xx, timeouts, connection errors after
    /// the last attempt); a ramp judges each step on its own. 1 turns the check off.
    #[arg(long, default_value_t = 0.01)]
    pub max_failed_fraction: f64,
}

/// `loadtest steady`.
#[derive(Debug, Clone, clap::Args, Serialize)]
pub struct SteadyArgs {
    #[command(flatten)]
    #[serde(flatten)]
    pub common: CommonArgs,
    /// Target rate (in --rate-unit per second).
    #[arg(long)]
    pub rate: f64,
    /// Measured seconds.
    #[arg(long, value_parser = positive_seconds)]
    pub duration: f64,
}

/// `loadtest spike`.
#[derive(Debug, Clone, clap::Args, Serialize)]
pub struct SpikeArgs {
    #[command(flatten)]
    #[serde(flatten)]
    pub common: CommonArgs,
    /// Base rate (in --rate-unit per second).
    #[arg(long)]
    pub rate: f64,
    /// The spike's rate is multiplier x rate.
    #[arg(long)]
    pub multiplier: f64,
    /// Seconds of base rate before the spike.
    #[arg(long, value_parser = seconds)]
    pub spike_after: f64,
    /// Seconds the spike lasts.
    #[arg(long, value_parser = positive_seconds)]
    pub spike_for: f64,
    /// Measured seconds in all (base + spike + after).
    #[arg(long, value_parser = positive_seconds)]
    pub duration: f64,
}

/// `loadtest ramp`.
#[derive(Debug, Clone, clap::Args, Serialize)]
pub struct RampArgs {
    #[command(flatten)]
    #[serde(flatten)]
    pub common: CommonArgs,
    /// Rate of the first step (in --rate-unit per second).
    #[arg(long)]
    pub start_rate: f64,
    /// Each step's rate is the previous one's times this.
    #[arg(long, default_value_t = 1.25)]
    pub step_factor: f64,
    /// Seconds per step.
    #[arg(long, default_value = "10", value_parser = positive_seconds)]
    pub step_duration: f64,
    /// A step holds only with p99 at or under this.
    #[arg(long, default_value_t = 50.0)]
    pub p99_bound_ms: f64,
    /// Highest rate tried.
    #[arg(long)]
    pub max_rate: f64,
}

/// The three profiles.
#[derive(Debug, Clone)]
pub enum Profile {
    Steady(SteadyArgs),
    Spike(SpikeArgs),
    Ramp(RampArgs),
}

impl Profile {
    pub fn name(&self) -> &'static str {
        match self {
            Profile::Steady(_) => "steady",
            Profile::Spike(_) => "spike",
            Profile::Ramp(_) => "ramp",
        }
    }

    pub fn common(&self) -> &CommonArgs {
        match self {
            Profile::Steady(a) => &a.common,
            Profile::Spike(a) => &a.common,
            Profile::Ramp(a) => &a.common,
        }
    }

    /// Attempts per request: `--max-attempts`, or 5 for spike and 1 otherwise.
    pub fn max_attempts(&self) -> u32 {
        let default = match self {
            Profile::Spike(_) => 5,
            _ => 1,
        };
        self.common().max_attempts.unwrap_or(default)
    }

    /// The rate the run starts (and warms up) at.
    fn start_rate(&self) -> f64 {
        match self {
            Profile::Steady(a) => a.rate,
            Profile::Spike(a) => a.rate,
            Profile::Ramp(a) => a.start_rate,
        }
    }

    /// The flags as the JSON report's `settings`.
    fn settings_json(&self) -> serde_json::Value {
        let mut value = match self {
            Profile::Steady(a) => serde_json::to_value(a),
            Profile::Spike(a) => serde_json::to_value(a),
            Profile::Ramp(a) => serde_json::to_value(a),
        }
        .unwrap_or(serde_json::Value::Null);
        if let Some(map) = value.as_object_mut() {
            map.insert("max_attempts".into(), self.max_attempts().into());
        }
        value
    }

    fn check(&self) -> Result<()> {
        let c = self.common();
        let rate_ok = |r: f64| r > 0.0 && r <= 10_000_000.0;
        ensure!(
            rate_ok(self.start_rate()),
            "the rate must be in (0, 10000000]"
        );
        ensure!((1..=1000).contains(&c.batch), "--batch must be 1..=1000");
        ensure!(
            c.event_bytes <= 64 << 10,
            "--event-bytes must be at most 65536"
        );
        ensure!(
            (1..=MAX_CONNECTIONS).contains(&c.connections),
            "--connections must be 1..={MAX_CONNECTIONS}"
        );
        ensure!(c.connect_rate > 0.0, "--connect-rate must be positive");
        ensure!(
            c.source_ips.is_none_or(|k| (1..=254).contains(&k)),
            "--source-ips must be 1..=254"
        );
        ensure!(
            (0.0..=1.0).contains(&c.max_failed_fraction),
            "--max-failed-fraction must be in [0, 1]"
        );
        ensure!(
            c.threads.is_none_or(|t| (1..=1024).contains(&t)),
            "--threads must be 1..=1024"
        );
        ensure!(
            (1..=100).contains(&self.max_attempts()),
            "--max-attempts must be 1..=100"
        );
        ensure!(
            valid_database(&c.clickhouse_db),
            "--clickhouse-db {:?} is not a plain identifier",
            c.clickhouse_db
        );
        match self {
            Profile::Steady(_) => {}
            Profile::Spike(a) => {
                ensure!(
                    a.multiplier > 0.0 && rate_ok(a.rate * a.multiplier),
                    "--multiplier x --rate must be in (0, 10000000]"
                );
                ensure!(
                    a.spike_after + a.spike_for <= a.duration,
                    "--spike-after + --spike-for must fit in --duration"
                );
            }
            Profile::Ramp(a) => {
                ensure!(
                    a.step_factor > 1.0 && a.step_factor <= 10.0,
                    "--step-factor must be in (1, 10]"
                );
                ensure!(
                    rate_ok(a.max_rate) && a.max_rate >= a.start_rate,
                    "--max-rate must be >= --start-rate and <= 10000000"
                );
                ensure!(a.p99_bound_ms > 0.0, "--p99-bound-ms must be positive");
            }
        }
        Ok(())
    }
}

/// What a run ended with.
#[derive(Debug)]
pub struct OpenOutcome {
    pub result: PhaseResult,
    /// Why the run fails; empty when it passes.
    pub failures: Vec<String>,
    #[cfg_attr(
        not(test),
        expect(dead_code, reason = "read by tests; the binary prints it")
    )]
    pub report: serde_json::Value,
}

/// Resolves on the first Ctrl-C (SIGINT) or SIGTERM, naming it; never, if neither can be
/// listened for.
pub async fn stop_signal() -> &'static str {
    use tokio::signal::unix::{signal, SignalKind};
    match signal(SignalKind::terminate()) {
        Ok(mut term) => tokio::select! {
            _ = tokio::signal::ctrl_c() => "SIGINT",
            _ = term.recv() => "SIGTERM",
        },
        Err(_) => match tokio::signal::ctrl_c().await {
            Ok(()) => "SIGINT",
            Err(_) => std::future::pending().await,
        },
    }
}

fn unix_now() -> Duration {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
}

async fn wait_ready(server: &Arc<Target>, timeout: f64) -> Result<()> {
    // 0 (or less): the caller knows the server is up.
    if timeout <= 0.0 {
        return Ok(());
    }
    client::wait_ready(server, Duration::from_secs_f64(timeout)).await
}

/// The source addresses to bind: 127.0.0.1..K for a loopback IPv4 target, none otherwise.
fn plan_sources(target: &Target, c: &CommonArgs) -> Result<Vec<IpAddr>> {
    let loopback_v4 = matches!(target.addr.ip(), IpAddr::V4(ip) if ip.is_loopback());
    if !loopback_v4 {
        ensure!(
            c.source_ips.is_none(),
            "--source-ips only works for a 127.x.x.x target"
        );
        return Ok(Vec::new());
    }
    let k = c
        .source_ips
        .unwrap_or_else(|| auto_source_ips(c.connections));
    Ok(loopback_sources(k))
}

/// Own CPU seconds and VmRSS, for the generator's footprint.
fn own_usage() -> Option<proc_watch::ProcSample> {
    proc_watch::sample(std::process::id()).ok()
}

/// Samples the watched server and this process once a second until stopped.
fn spawn_sampler(
    server: Option<Arc<Mutex<Watch>>>,
    own_rss_max: Arc<Mutex<u64>>,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tick.tick().await;
            if let Some(w) = &server {
                w.lock().unwrap_or_else(|p| p.into_inner()).tick();
            }
            if let Some(s) = own_usage() {
                let mut max = own_rss_max.lock().unwrap_or_else(|p| p.into_inner());
                *max = (*max).max(s.rss_bytes);
            }
        }
    })
}

/// The measured phases of steady and spike: (name, rate, seconds).
fn fixed_phases(profile: &Profile) -> Vec<(&'static str, f64, f64)> {
    match profile {
        Profile::Steady(a) => vec![("steady", a.rate, a.duration)],
        Profile::Spike(a) => {
            let after = a.duration - a.spike_after - a.spike_for;
            vec![
                ("base", a.rate, a.spike_after),
                ("spike", a.rate * a.multiplier, a.spike_for),
                ("after", a.rate, after),
            ]
            .into_iter()
            .filter(|(_, _, secs)| *secs > 0.0)
            .collect()
        }
        Profile::Ramp(_) => Vec::new(),
    }
}

/// Runs the ramp's steps; returns its report.
async fn run_ramp(
    a: &RampArgs,
    engine: &Engine,
    template: &mut BodyTemplate,
    stop_at: Instant,
    drain_for: Duration,
) -> RampReport {
    let mut plan = RampPlan::new(a.start_rate, a.step_factor, a.max_rate);
    let mut steps = Vec::new();
    let length = Duration::from_secs_f64(a.step_duration);
    let mut n = 0;
    while let Some(rate) = plan.next_rate() {
        if Instant::now() + length > stop_at {
            eprintln!("ramp: --duration-limit reached before the step at {rate:.0}/s");
            break;
        }
        let kind = if plan.bisecting() { "bisect" } else { "climb" };
        let phase = engine
            .run_phase(template, &format!("step{n}"), rate, length, true, stop_at)
            .await;
        engine.drain_phase(phase, Instant::now() + drain_for).await;
        let Some(tally) = engine.stats.phase(phase) else {
            break;
        };
        let r = tally.result();
        let held = step_held(
            r.target_events_per_s,
            r.achieved_events_per_s,
            r.latency_ms.p99,
            a.p99_bound_ms,
            r.failed_attempts + tally.outstanding,
            r.requests.sent,
        );
        eprintln!(
            "ramp {kind} step at {:.0} events/s: achieved {:.0}, p99 {:.2} ms, {} failed: {}",
            r.target_events_per_s,
            r.achieved_events_per_s,
            r.latency_ms.p99,
            r.failed_attempts,
            if held { "held" } else { "not held" }
        );
        steps.push(StepOutcome {
            target_events_per_s: r.target_events_per_s,
            achieved_events_per_s: r.achieved_events_per_s,
            p99_ms: r.latency_ms.p99,
            errors: r.failed_attempts,
            requests: r.requests.sent,
            held,
            kind,
        });
        plan.record(held);
        // Each step starts on a quiet server; the gap is not part of any step.
        engine.restart_schedule();
        n += 1;
    }
    let max_held = plan
        .max_held()
        .map_or(0.0, |r| engine.events_per_s(r, template.batch()));
    RampReport {
        p99_bound_ms: a.p99_bound_ms,
        max_held_events_per_s: max_held,
        steps,
    }
}

/// Runs a profile end to end.
///
/// # Errors
/// When the run cannot be carried out: bad flags, a target that is not allowed or not
/// ready, a descriptor limit too low, connections that cannot be pre-opened, a report
/// that cannot be written.
pub async fn run(profile: Profile) -> Result<OpenOutcome> {
    profile.check()?;
    let c = profile.common().clone();
    let started_unix = unix_now();

    // Targets, match id, limits, readiness.
    let resolved = Target::resolve(&c.url, c.allow_remote).await?;
    let server = Arc::new(resolved.with_key(c.ingest_key.clone()));
    let reader = Arc::new(resolved.with_key(c.read_key.clone()));
    let clickhouse = if c.verify {
        Some(Arc::new(
            Target::resolve(&c.clickhouse_url, c.allow_remote).await?,
        ))
    } else {
        None
    };
    let match_id = c
        .match_id
        .clone()
        .unwrap_or_else(|| format!("lt-{}-{}", profile.name(), started_unix.as_secs()));
    ensure!(
        valid_match_id(&match_id),
        "match id {match_id:?} is not 1-64 characters of [A-Za-z0-9_.:-]"
    );
    if let Some(pid) = c.watch_pid {
        proc_watch::check_pid(pid)?;
    }
    let fd_limit = fd_limit::raise_for(c.connections as u64 + SPARE_DESCRIPTORS)
        .context("raising the open-file limit for --connections")?;
    let sources = plan_sources(&server, &c)?;
    wait_ready(&server, c.ready_timeout).await?;

    // Connections.
    let pool = Arc::new(ConnPool::new(server.addr, c.connections, sources.clone()));
    let mut preopen_s = None;
    let mut rss_after_open = None;
    if c.open_connections_first {
        eprintln!(
            "opening {} connections from {} source address(es) at {}/s",
            c.connections,
            sources.len().max(1),
            c.connect_rate
        );
        let took = pool
            .open_all(c.connect_rate, &server.authority)
            .await
            .context("--open-connections-first")?;
        preopen_s = Some(took.as_secs_f64());
        rss_after_open = own_usage().map(|s| s.rss_bytes);
        eprintln!(
            "opened {} connections in {:.1} s; loadtest rss {:.1} MiB",
            pool.open_idle(),
            took.as_secs_f64(),
            rss_after_open.unwrap_or(0) as f64 / (1 << 20) as f64
        );
    }

    // The engine and its helpers.
    let own_before = own_usage();
    let started = Instant::now();
    let limit = started + Duration::from_secs_f64(c.duration_limit);
    let stats = Arc::new(OpenStats::new(started));
    let seed = c.seed.unwrap_or(started_unix.as_nanos() as u64);
    let settings = EngineSettings {
        max_attempts: profile.max_attempts(),
        request_timeout: Duration::from_secs_f64(c.request_timeout),
        rate_unit: c.rate_unit,
        format: c.format,
        keep_ids: c.verify,
        deadline: limit,
        seed,
    };
    let engine = Arc::new(Engine::new(
        Arc::clone(&server),
        Arc::clone(&pool),
        Arc::clone(&stats),
        settings,
    ));
    let mut template = BodyTemplate::new(&match_id, c.format, c.batch, c.event_bytes);
    let (stop_progress, progress) = crate::report::spawn_progress({
        let stats = Arc::clone(&stats);
        move || open_report::progress_line(&stats.progress())
    });
    let sweep = engine.spawn_idle_sweep();
    let own_rss_max = Arc::new(Mutex::new(rss_after_open.unwrap_or(0)));
    // A retried request may take every attempt's timeout plus backoff.
    let drain_for = Duration::from_secs_f64(c.request_timeout) * profile.max_attempts()
        + Duration::from_secs(1);
    eprintln!(
        "{} to {} as {match_id}: {} connections, batch {}, {}, max attempts {}",
        profile.name(),
        server.url,
        c.connections,
        c.batch,
        c.format.content_type(),
        profile.max_attempts()
    );

    // Warm-up, unmeasured.
    if c.warmup > 0.0 {
        let warm = Duration::from_secs_f64(c.warmup);
        engine
            .run_phase(
                &mut template,
                "warmup",
                profile.start_rate(),
                warm,
                false,
                limit,
            )
            .await;
    }

    // The measured window.
    let window_started = Instant::now();
    let server_watch = match c.watch_pid {
        Some(pid) => Some(Arc::new(Mutex::new(Watch::start(pid)?))),
        None => None,
    };
    let sampler = spawn_sampler(server_watch.clone(), Arc::clone(&own_rss_max));
    let probes = Probes::default();
    let (probe_stop_tx, probe_stop_rx) = watch::channel(false);
    let probe_task = c.probe_visibility.then(|| {
        let tag = format!("lt-probe-{}", started_unix.as_secs());
        visibility::spawn_probes(
            Arc::clone(&engine),
            Arc::clone(&reader),
            tag,
            probe_stop_rx,
            probes.clone(),
        )
    });

    let schedule = async {
        match &profile {
            Profile::Ramp(a) => Some(run_ramp(a, &engine, &mut template, limit, drain_for).await),
            _ => {
                for (name, rate, secs) in fixed_phases(&profile) {
                    let length = Duration::from_secs_f64(secs);
                    engine
                        .run_phase(&mut template, name, rate, length, true, limit)
                        .await;
                }
                None
            }
        }
    };
    // Ctrl-C or SIGTERM stops the sending; what was sent is drained, reported and
    // written to the JSON report like any run, which then fails as interrupted.
    let (ramp, interrupted) = tokio::select! {
        ramp = schedule => (ramp, None),
        signal = stop_signal() => (None, Some(signal)),
    };
    if let Some(signal) = interrupted {
        eprintln!("{signal}: stopped sending; draining and reporting what was sent");
    }

    // Drain, then close the window.
    let _ = probe_stop_tx.send(true);
    let abandoned = engine
        .drain_all((Instant::now() + drain_for).min(limit.max(Instant::now())))
        .await;
    let window = window_started.elapsed();
    sampler.abort();
    sweep.abort();
    if let Some(task) = probe_task {
        let _ = task.await;
    }
    let _ = stop_progress.send(true);
    let _ = progress.await;

    // Numbers.
    let total = stats.measured_total(profile.name());
    let result = total.result();
    let phases: Vec<PhaseResult> = stats
        .phases()
        .iter()
        .filter(|p| p.measured)
        .map(|p| p.result())
        .collect();
    let server_usage: Option<ServerUsage> = server_watch.map(|w| {
        let mut w = w.lock().unwrap_or_else(|p| p.into_inner()).clone();
        w.tick();
        w.usage(result.events.accepted, window)
    });
    let visibility: Option<VisibilityReport> = c.probe_visibility.then(|| probes.report());
    let own_after = own_usage();
    let generator = GeneratorReport {
        connections: c.connections,
        source_ips: sources.iter().map(IpAddr::to_string).collect(),
        preopen_s,
        rss_after_open_bytes: rss_after_open,
        rss_max_bytes: own_after
            .map_or(0, |s| s.rss_bytes)
            .max(*own_rss_max.lock().unwrap_or_else(|p| p.into_inner())),
        cpu_seconds: match (own_before, own_after) {
            (Some(a), Some(b)) => b.cpu_seconds - a.cpu_seconds,
            _ => 0.0,
        },
        fd_limit,
        abandoned_requests: abandoned,
    };

    let shown_phases = if matches!(profile, Profile::Spike(_)) {
        &phases[..]
    } else {
        &[]
    };
    print!("{}", open_report::render_result(&result, shown_phases));
    if let Some(r) = &ramp {
        print!("{}", open_report::render_ramp(r));
    }
    print!(
        "{}",
        open_report::render_extras(server_usage.as_ref(), visibility.as_ref(), &generator)
    );

    // Verification.
    let verification = match clickhouse {
        Some(clickhouse) => {
            let (submitted, accepted) = stats.take_ids();
            let accepted: HashSet<Uuid> = accepted.into_iter().collect();
            let submitted: HashSet<Uuid> = submitted.into_iter().collect();
            // Events carry ts = send time: ask for whole minutes around the run.
            let from_ms = started_unix.as_millis() as i64;
            let kickoff_ms = from_ms - from_ms.rem_euclid(60_000) - 60_000;
            let run_minutes = (unix_now().as_millis() as i64 - kickoff_ms) as f64 / 60_000.0;
            let plan = VerifyPlan {
                server: Arc::clone(&reader),
                clickhouse,
                database: c.clickhouse_db.clone(),
                match_id: match_id.clone(),
                kickoff_ms,
                end_minute: run_minutes.ceil() + 1.0,
                moments: Vec::new(),
                timeout: Duration::from_secs_f64(c.verify_timeout),
            };
            let checks = verify::verify(&plan, &accepted, &submitted).await;
            let mut failures = checks.failures();
            if result.ack_mismatches > 0 {
                failures.push(format!(
                    "{} 2xx answers did not acknowledge every event of their request",
                    result.ack_mismatches
                ));
            }
            print!("{}", crate::report::render_verification(&checks));
            Some(VerificationReport {
                checks,
                passed: failures.is_empty(),
                failures,
            })
        }
        None => None,
    };

    // Verdict.
    let mut failures = Vec::new();
    if result.events.accepted == 0 {
        failures.push("no event was accepted".to_string());
    }
    let client_errors: u64 = result
        .requests
        .by_status
        .iter()
        .filter(|(k, _)| k.starts_with('4') && k.as_str() != "429")
        .map(|(_, v)| v)
        .sum();
    if client_errors > 0 {
        failures.push(format!("{client_errors} requests were refused with 4xx"));
    }
    if let Some(v) = &verification {
        failures.extend(v.failures.iter().cloned());
    } else if result.ack_mismatches > 0 {
        eprintln!(
            "note: {} 2xx answers did not acknowledge every event (fails only with --verify)",
            result.ack_mismatches
        );
    }
    if let Some(r) = &ramp {
        if r.max_held_events_per_s <= 0.0 {
            failures.push("no ramp step held".to_string());
        }
    }
    if let Some(signal) = interrupted {
        failures.push(format!("interrupted by {signal}"));
    }
    if abandoned > 0 {
        println!(
            "unanswered: {abandoned} requests had no final answer when the run stopped \
             (--duration-limit or the drain after it); they are not in the latency figures"
        );
        failures.push(format!(
            "{abandoned} requests were still unanswered when the run stopped"
        ));
    }
    if !matches!(profile, Profile::Ramp(_)) {
        // By final outcome: a 503 retried into a 202 (spike) is not a failure.
        let sent = result.events.sent;
        let missing = sent.saturating_sub(result.events.accepted);
        let fraction = if sent == 0 {
            0.0
        } else {
            missing as f64 / sent as f64
        };
        if fraction > c.max_failed_fraction {
            failures.push(format!(
                "{missing} of {sent} events were not accepted ({:.1} %, over \
                 --max-failed-fraction {})",
                fraction * 100.0,
                c.max_failed_fraction
            ));
        }
    }
    if failures.is_empty() {
        println!("\nPASSED");
    } else {
        println!("\nFAILED: {}", failures.join("; "));
    }

    let report = OpenReport {
        profile: profile.name(),
        match_id,
        settings: profile.settings_json(),
        result: result.clone(),
        phases: matches!(profile, Profile::Spike(_)).then_some(phases),
        ramp,
        server: server_usage,
        visibility_ms: visibility,
        verification,
        generator,
        passed: failures.is_empty(),
        failures: failures.clone(),
    };
    let report = serde_json::to_value(&report).context("serializing the JSON report")?;
    if let Some(path) = &c.json_report {
        crate::report::write_json_report(path, &report)?;
    }
    Ok(OpenOutcome {
        result,
        failures,
        report,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mock_server::{MockConfig, MockServer};
    use clap::Parser;
    use serde_json::Value;

    #[derive(Parser)]
    enum TestCli {
        Steady(SteadyArgs),
        Spike(SpikeArgs),
        Ramp(RampArgs),
    }

    fn profile(line: &str) -> Profile {
        let argv = std::iter::once("loadtest").chain(line.split_whitespace());
        match TestCli::try_parse_from(argv).expect("valid flags") {
            TestCli::Steady(a) => Profile::Steady(a),
            TestCli::Spike(a) => Profile::Spike(a),
            TestCli::Ramp(a) => Profile::Ramp(a),
        }
    }

    fn temp_path(name: &str) -> PathBuf {
        std::env::temp_dir().join(format!("loadtest-open-{name}-{}.json", std::process::id()))
    }

    async fn run_against(mock: &MockServer, line: &str) -> OpenOutcome {
        let url = mock.url();
        let full = format!("{line} --url {url} --clickhouse-url {url} --verify-timeout 5");
        run(profile(&full)).await.expect("the run completes")
    }

    fn field<'a>(v: &'a Value, path: &str) -> &'a Value {
        path.split('.').fold(v, |v, key| &v[key])
    }

    #[test]
    fn defaults_match_the_brief() {
        let p = profile("steady --rate 10 --duration 1");
        let c = p.common();
        assert_eq!(
            (c.connections, c.batch, c.event_bytes),
            (64, 1, DEFAULT_EVENT_BYTES)
        );
        assert_eq!(
            (c.rate_unit, c.format),
            (RateUnit::Events, BodyFormat::Json)
        );
        assert_eq!((c.warmup, c.connect_rate), (2.0, 5000.0));
        assert_eq!(c.clickhouse_url, "http://127.0.0.1:18123");
        assert_eq!(c.clickhouse_db, "fanfinity");
        assert_eq!(p.max_attempts(), 1);
        let spike = "spike --rate 1 --multiplier 2 --spike-after 1 --spike-for 1 --duration 3";
        assert_eq!(profile(spike).max_attempts(), 5);
        let Profile::Ramp(r) = profile("ramp --start-rate 10 --max-rate 100") else {
            panic!("ramp parses as ramp");
        };
        assert_eq!(
            (r.step_factor, r.step_duration, r.p99_bound_ms),
            (1.25, 10.0, 50.0)
        );
    }

    #[test]
    fn refuses_nonsense_flags() {
        for line in [
            "steady --rate 0 --duration 1",
            "steady --rate 10 --duration 1 --batch 0",
            "steady --rate 10 --duration 1 --connections 0",
            "steady --rate 10 --duration 1 --source-ips 300",
            "spike --rate 1 --multiplier 2 --spike-after 2 --spike-for 2 --duration 3",
            "ramp --start-rate 10 --max-rate 5",
            "ramp --start-rate 10 --max-rate 50 --step-factor 1",
        ] {
            assert!(profile(line).check().is_err(), "{line}");
        }
    }

    #[test]
    fn spike_phases_split_the_duration() {
        let p =
            profile("spike --rate 100 --multiplier 4 --spike-after 2 --spike-for 1 --duration 5");
        assert_eq!(
            fixed_phases(&p),
            [
                ("base", 100.0, 2.0),
                ("spike", 400.0, 1.0),
                ("after", 100.0, 2.0)
            ]
        );
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn steady_run_verifies_and_writes_the_fixed_schema() {
        let mock = MockServer::start(MockConfig::default()).await;
        let path = temp_path("steady");
        let line = format!(
            "steady --rate 200 --duration 1.5 --warmup 0.5 --connections 8 --verify \
             --match-id lt-steady-test --json-report {} --watch-pid {}",
            path.display(),
            std::process::id()
        );
        let outcome = run_against(&mock, &line).await;
        assert!(outcome.failures.is_empty(), "{:?}", outcome.failures);

        let text = std::fs::read_to_string(&path).expect("report written");
        let _ = std::fs::remove_file(&path);
        let report: Value = serde_json::from_str(&text).expect("report is JSON");
        assert_eq!(
            report["result"]["events"],
            outcome.report["result"]["events"]
        );
        assert_eq!(report["profile"], "steady");
        assert_eq!(field(&report, "settings.rate"), 200.0);
        for key in [
            "result.measured_s",
            "result.requests.sent",
            "result.requests.by_status.202",
            "result.events.sent",
            "result.events.accepted",
            "result.events.rejected",
            "result.events.given_up",
            "result.ack_mismatches",
            "result.achieved_events_per_s",
            "result.achieved_requests_per_s",
            "result.latency_ms.count",
            "result.latency_ms.p50",
            "result.latency_ms.p90",
            "result.latency_ms.p99",
            "result.latency_ms.p999",
            "result.latency_ms.max",
            "server.pid",
            "server.cpu_seconds",
            "server.cpu_us_per_event",
            "server.rss_max_bytes",
            "server.rss_end_bytes",
            "verification.passed",
        ] {
            assert!(!field(&report, key).is_null(), "{key} missing");
        }
        assert!(report.get("phases").is_none() && report.get("ramp").is_none());
        assert_eq!(field(&report, "verification.passed"), true);
        assert!(
            field(&report, "settings.ingest_key").is_null(),
            "keys stay out of reports"
        );

        // 1.5 s at 200/s is 300 measured events; the 100 of the warm-up are not counted.
        let r = &outcome.result;
        assert!((295..=305).contains(&r.events.sent), "{}", r.events.sent);
        assert_eq!(r.events.accepted, r.events.sent);
        assert_eq!(r.ack_mismatches, 0);
        assert_eq!(mock.state().distinct_ids(), 400);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn spike_retries_503s_with_the_same_ids_and_reports_phases() {
        let config = MockConfig {
            unavailable_every: 7,
            ..MockConfig::default()
        };
        let mock = MockServer::start(config).await;
        let line = "spike --rate 60 --multiplier 3 --spike-after 0.5 --spike-for 0.5 \
                    --duration 1.5 --warmup 0 --batch 5 --rate-unit requests --format ndjson \
                    --verify --match-id lt-spike-test";
        let outcome = run_against(&mock, line).await;
        assert!(outcome.failures.is_empty(), "{:?}", outcome.failures);

        let r = &outcome.result;
        assert!(r.requests.by_status.get("503").is_some_and(|n| *n > 0));
        assert_eq!(r.events.given_up, 0);
        assert_eq!(r.events.accepted, r.events.sent);
        // 0.5 s x 60 + 0.5 s x 180 + 0.5 s x 60 requests of 5 events.
        assert!((740..=760).contains(&r.events.sent), "{}", r.events.sent);
        let phases = outcome.report["phases"]
            .as_array()
            .expect("spike has phases");
        let names: Vec<&str> = phases.iter().filter_map(|p| p["name"].as_str()).collect();
        assert_eq!(names, ["base", "spike", "after"]);
        assert_eq!(phases[1]["target_events_per_s"], 900.0);
        assert_eq!(mock.state().redelivered, 0);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn steady_counts_a_503_as_a_503_without_retrying() {
        let config = MockConfig {
            unavailable_every: 4,
            ..MockConfig::default()
        };
        let mock = MockServer::start(config).await;
        let outcome = run_against(&mock, "steady --rate 100 --duration 1 --warmup 0").await;
        let r = &outcome.result;
        let unavailable = r.requests.by_status.get("503").copied().unwrap_or(0);
        assert!(unavailable >= 20, "{unavailable}");
        assert_eq!(r.events.given_up, unavailable);
        assert_eq!(r.requests.sent, r.events.sent);
        // A quarter of the events lost is far over the default 1 %: the run fails.
        assert!(
            outcome
                .failures
                .iter()
                .any(|f| f.contains("were not accepted") && f.contains("--max-failed-fraction")),
            "{:?}",
            outcome.failures
        );
        let tolerant = "steady --rate 100 --duration 1 --warmup 0 --max-failed-fraction 1";
        let outcome = run_against(&mock, tolerant).await;
        assert!(outcome.failures.is_empty(), "{:?}", outcome.failures);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn ramp_climbs_to_max_rate_on_a_healthy_server() {
        let mock = MockServer::start(MockConfig::default()).await;
        let line = "ramp --start-rate 50 --step-factor 2 --step-duration 0.5 --max-rate 300 \
                    --p99-bound-ms 2000 --warmup 0";
        let outcome = run_against(&mock, line).await;
        assert!(outcome.failures.is_empty(), "{:?}", outcome.failures);
        let ramp = &outcome.report["ramp"];
        assert_eq!(ramp["max_held_events_per_s"], 300.0);
        let targets: Vec<f64> = ramp["steps"]
            .as_array()
            .expect("steps")
            .iter()
            .filter_map(|s| s["target_events_per_s"].as_f64())
            .collect();
        assert_eq!(targets, [50.0, 100.0, 200.0, 300.0]);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn ramp_fails_when_no_step_holds() {
        let config = MockConfig {
            unavailable_every: 2,
            ..MockConfig::default()
        };
        let mock = MockServer::start(config).await;
        let line = "ramp --start-rate 50 --step-duration 0.5 --max-rate 100 --warmup 0";
        let outcome = run_against(&mock, line).await;
        assert_eq!(outcome.failures, ["no ramp step held"]);
        assert_eq!(outcome.report["ramp"]["max_held_events_per_s"], 0.0);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn opens_every_connection_first_and_probes_visibility() {
        let mock = MockServer::start(MockConfig::default()).await;
        let line = "steady --rate 50 --duration 1 --warmup 0 --connections 300 \
                    --open-connections-first --source-ips 2 --probe-visibility";
        let outcome = run_against(&mock, line).await;
        assert!(outcome.failures.is_empty(), "{:?}", outcome.failures);
        let generator = &outcome.report["generator"];
        assert_eq!(
            generator["source_ips"],
            serde_json::json!(["127.0.0.1", "127.0.0.2"])
        );
        assert!(generator["rss_after_open_bytes"]
            .as_u64()
            .is_some_and(|b| b > 0));
        let v = &outcome.report["visibility_ms"];
        assert!(v["probes"].as_u64().is_some_and(|n| n >= 2), "{v}");
        assert_eq!(v["seen"], v["probes"]);
        assert_eq!(v["unseen"], 0);
    }

    #[tokio::test]
    async fn cannot_run_when_connections_cannot_be_opened() {
        // Nothing listens on port 9 of 127.0.0.1.
        let line = "steady --url http://127.0.0.1:9 --rate 10 --duration 1 --connections 4 \
                    --open-connections-first --ready-timeout 0";
        let err = run(profile(line)).await.expect_err("connect refused");
        assert!(
            format!("{err:#}").contains("--open-connections-first"),
            "{err:#}"
        );
    }
}
