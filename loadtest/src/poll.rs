//! `loadtest poll`: a closed-loop query poller for the analytics API (docs/analytics.md).
//!
//! `--clients` keep-alive connections are opened first (`ConnPool::open_all`); then each
//! client loops: GET its next path (round robin over `--path`, client `i` starting at path
//! `i mod P`), wait for the whole answer, record the latency from send to last byte, and
//! sleep until its next `--interval` tick. Client `i`'s ticks are offset by
//! `interval x i / clients`, so the clients spread over the interval instead of firing
//! together; a tick missed because an answer was slow is skipped, not made up (closed
//! loop: a slow server lowers the request rate, see docs/loadtest.md).
//!
//! Counted per path and overall: requests by status, latency (hdrhistogram, 1 µs .. 1 h),
//! and the age of each answer (arrival time minus its `generated_at_ms`, when the body has
//! one), which shows how stale the server's answer cache is.
//!
//! The connection handling, request heads, answer parsing, target checks, descriptor limit
//! and signal handling are the open-model profiles' (`conn_pool`, `wire`, `target`,
//! `fd_limit`, `profiles::stop_signal`); the table rows use `report::LatencyMs`.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{ensure, Context, Result};
use hdrhistogram::Histogram;
use serde::Serialize;

use crate::client;
use crate::conn_pool::{auto_source_ips, loopback_sources, ConnPool, Slot};
use crate::fd_limit::{self, FdLimit, SPARE_DESCRIPTORS};
use crate::open_stats::latency_histogram;
use crate::profiles::{stop_signal, MAX_CONNECTIONS};
use crate::report::{count, LatencyMs};
use crate::target::Target;
use crate::wire;

/// Longest `--duration`, `--warmup` or `--interval`: one day.
const MAX_SECONDS: f64 = 86_400.0;

/// Most `--path` flags.
const MAX_PATHS: usize = 64;

/// Parses a duration: `60`, `60s`, `1.5s`, `500ms`, `2m`, `1h`; bare numbers are seconds.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let t = text.trim();
    let (number, scale) = if let Some(n) = t.strip_suffix("ms") {
        (n, 0.001)
    } else if let Some(n) = t.strip_suffix('s') {
        (n, 1.0)
    } else if let Some(n) = t.strip_suffix('m') {
        (n, 60.0)
    } else if let Some(n) = t.strip_suffix('h') {
        (n, 3600.0)
    } else {
        (t, 1.0)
    };
    let value: f64 = number
        .trim()
        .parse()
        .map_err(|_| format!("{text:?} is not a duration (60, 60s, 500ms, 2m, 1h)"))?;
    let secs = value * scale;
    if !(0.0..=MAX_SECONDS).contains(&secs) {
        return Err(format!("{text:?} is outside 0 .. 24 h"));
    }
    Ok(Duration::from_secs_f64(secs))
}

fn positive_duration(text: &str) -> Result<Duration, String> {
    let d = parse_duration(text)?;
    if d.is_zero() {
        return Err(format!("{text:?} must be more than zero"));
    }
    Ok(d)
}

fn request_path(text: &str) -> Result<String, String> {
    if !text.starts_with('/') || text.bytes().any(|b| b.is_ascii_whitespace() || b < 0x20) {
        return Err(format!(
            "{text:?}: a path starts with / and has no spaces (a query string may follow)"
        ));
    }
    Ok(text.to_string())
}

fn fraction(text: &str) -> Result<f64, String> {
    let f: f64 = text
        .parse()
        .map_err(|_| format!("{text:?} is not a number"))?;
    if !(0.0..=1.0).contains(&f) {
        return Err(format!("{f} is outside [0, 1]"));
    }
    Ok(f)
}

/// Flags of `loadtest poll`.
#[derive(Debug, Clone, clap::Args, Serialize)]
pub struct PollArgs {
    /// The server; loopback only unless --allow-remote.
    #[arg(long, visible_alias = "url", default_value = "http://127.0.0.1:8080")]
    pub target: String,
    /// A path (and query) to GET; repeat for several, polled round robin.
    #[arg(long = "path", required = true, value_parser = request_path)]
    pub paths: Vec<String>,
    /// Keep-alive connections, one per client, all opened before the clock starts.
    #[arg(long, default_value_t = 200)]
    pub clients: usize,
    /// Measured time (after --warmup): 60, 60s, 2m, ...
    #[arg(long, default_value = "60s", value_parser = positive_duration)]
    #[serde(serialize_with = "secs")]
    pub duration: Duration,
    /// Each client's period: it sends at most one request per interval (0: back to back).
    #[arg(long, default_value = "1s", value_parser = parse_duration)]
    #[serde(serialize_with = "secs")]
    pub interval: Duration,
    /// Unmeasured time first (fills the server's caches): 0, 5s, ...
    #[arg(long, default_value = "0", value_parser = parse_duration)]
    #[serde(serialize_with = "secs")]
    pub warmup: Duration,
    /// Sent as `X-Fanfinity-Key`; never written to reports.
    #[arg(long)]
    #[serde(skip)]
    pub key: Option<String>,
    /// Write the JSON report here.
    #[arg(long)]
    pub json_report: Option<PathBuf>,
    /// Fail when the p99 of all requests, or of any path, is above this many milliseconds.
    #[arg(long)]
    pub max_p99_ms: Option<f64>,
    /// Fail when more than this fraction of the measured requests got no 2xx answer
    /// (other statuses, timeouts, connection errors).
    #[arg(long, default_value = "0", value_parser = fraction)]
    pub max_failed_fraction: f64,
    /// Bound on one request, send to last byte.
    #[arg(long, default_value = "10s", value_parser = positive_duration)]
    #[serde(serialize_with = "secs")]
    pub request_timeout: Duration,
    /// Connections opened per second before the run.
    #[arg(long, default_value_t = 5000.0)]
    pub connect_rate: f64,
    /// Bind connections round robin to 127.0.0.1 .. 127.0.0.K (default ceil(clients / 20k)).
    #[arg(long)]
    pub source_ips: Option<usize>,
    /// Tokio worker threads (default: all cores).
    #[arg(long)]
    pub threads: Option<usize>,
    /// Wait up to this long for `GET /readyz` 200 first (0: don't ask).
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    #[serde(serialize_with = "secs")]
    pub ready_timeout: Duration,
    /// Allow a non-loopback target (never aim it at a host you do not own).
    #[arg(long)]
    pub allow_remote: bool,
}

fn secs<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.serialize_f64(d.as_secs_f64())
}

impl PollArgs {
    fn check(&self) -> Result<()> {
        ensure!(
            (1..=MAX_CONNECTIONS).contains(&self.clients),
            "--clients must be 1..={MAX_CONNECTIONS}"
        );
        ensure!(
            self.paths.len() <= MAX_PATHS,
            "at most {MAX_PATHS} --path flags"
        );
        ensure!(
            self.connect_rate >= 1.0,
            "--connect-rate must be at least 1"
        );
        if let Some(p99) = self.max_p99_ms {
            ensure!(p99 > 0.0, "--max-p99-ms must be more than 0");
        }
        if let Some(k) = self.source_ips {
            ensure!((1..=254).contains(&k), "--source-ips must be 1..=254");
        }
        if let Some(t) = self.threads {
            ensure!((1..=1024).contains(&t), "--threads must be 1..=1024");
        }
        Ok(())
    }
}

/// When the request after one that ended at `now` is due: the first tick of
/// `first + k x interval` (k = 0, 1, ...) at or after `now`, or `now` itself for a zero
/// interval (back to back). Ticks missed while waiting for an answer are skipped.
pub fn next_tick(first: Duration, interval: Duration, now: Duration) -> Duration {
    if interval.is_zero() || now <= first {
        return if interval.is_zero() {
            now.max(first)
        } else {
            first
        };
    }
    let since = (now - first).as_nanos();
    let step = interval.as_nanos();
    let k = since.div_ceil(step);
    first + Duration::from_nanos(u64::try_from(k * step).unwrap_or(u64::MAX))
}

/// Client `i` of `clients`: its first tick, spread evenly over one interval.
pub fn first_tick(i: usize, clients: usize, interval: Duration) -> Duration {
    interval.mul_f64(i as f64 / clients.max(1) as f64)
}

/// The `generated_at_ms` of a JSON answer, found without parsing the whole body: the last
/// `"generated_at_ms":` followed by an integer (the analytics answers put it at the end,
/// at the top level; the nested objects have no such key).
pub fn generated_at_ms(body: &[u8]) -> Option<i64> {
    const KEY: &[u8] = b"\"generated_at_ms\"";
    let at = body.windows(KEY.len()).rposition(|w| w == KEY)?;
    let rest = &body[at + KEY.len()..];
    let rest = &rest[rest.iter().position(|b| !b.is_ascii_whitespace())?..];
    let rest = rest.strip_prefix(b":")?;
    let start = rest.iter().position(|b| !b.is_ascii_whitespace())?;
    let rest = &rest[start..];
    let end = rest
        .iter()
        .position(|b| !(b.is_ascii_digit() || *b == b'-'))
        .unwrap_or(rest.len());
    std::str::from_utf8(&rest[..end]).ok()?.parse().ok()
}

fn unix_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// Counters of one path.
#[derive(Debug, Clone)]
pub struct PathTally {
    pub path: String,
    pub requests: u64,
    /// By HTTP status, or `timeout`, `connect_error`, `io_error`.
    pub by_status: BTreeMap<String, u64>,
    /// Requests without a 2xx answer.
    pub failed: u64,
    /// Microseconds from send to last byte, every request that got an answer or failed.
    pub latency: Histogram<u64>,
    /// Milliseconds from `generated_at_ms` to the answer's arrival.
    pub age: Histogram<u64>,
}

impl PathTally {
    pub fn new(path: &str) -> PathTally {
        PathTally {
            path: path.to_string(),
            requests: 0,
            by_status: BTreeMap::new(),
            failed: 0,
            latency: latency_histogram(),
            age: latency_histogram(),
        }
    }

    /// One request ended with `key` after `latency`; `age_ms` when its body had a
    /// `generated_at_ms`.
    pub fn record(&mut self, key: &str, latency: Duration, age_ms: Option<i64>) {
        self.requests += 1;
        if !key.starts_with('2') {
            self.failed += 1;
        }
        match self.by_status.get_mut(key) {
            Some(n) => *n += 1,
            None => {
                self.by_status.insert(key.to_string(), 1);
            }
        }
        let us = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX);
        self.latency.saturating_record(us.max(1));
        if let Some(age) = age_ms {
            // Same machine, but the server's clock may round differently: never below 0.
            // The histogram's lowest value is 1, so ages are stored +1 ms.
            self.age.saturating_record(age.max(0) as u64 + 1);
        }
    }

    pub fn absorb(&mut self, other: &PathTally) {
        self.requests += other.requests;
        self.failed += other.failed;
        for (k, v) in &other.by_status {
            *self.by_status.entry(k.clone()).or_default() += v;
        }
        // Same bounds on both sides, so adding cannot fail.
        let _ = self.latency.add(&other.latency);
        let _ = self.age.add(&other.age);
    }

    /// The path's numbers over `measured_s` seconds.
    pub fn result(&self, measured_s: f64) -> PathResult {
        let l = &self.latency;
        let ms = |q: f64| l.value_at_quantile(q) as f64 / 1000.0;
        let empty = l.is_empty();
        let latency_ms = LatencyMs {
            count: l.len(),
            p50: if empty { 0.0 } else { ms(0.5) },
            p90: if empty { 0.0 } else { ms(0.9) },
            p99: if empty { 0.0 } else { ms(0.99) },
            p999: if empty { 0.0 } else { ms(0.999) },
            max: if empty { 0.0 } else { l.max() as f64 / 1000.0 },
        };
        let age_ms = (!self.age.is_empty()).then(|| AgeMs {
            answers: self.age.len(),
            p50: self.age.value_at_quantile(0.5).saturating_sub(1),
            max: self.age.max().saturating_sub(1),
        });
        PathResult {
            path: self.path.clone(),
            requests: self.requests,
            by_status: self.by_status.clone(),
            non_2xx: self
                .by_status
                .iter()
                .filter(|(k, _)| !k.starts_with('2'))
                .fold(BTreeMap::new(), |mut m, (k, v)| {
                    m.insert(k.clone(), *v);
                    m
                }),
            failed: self.failed,
            requests_per_s: if measured_s > 0.0 {
                self.requests as f64 / measured_s
            } else {
                0.0
            },
            latency_ms,
            age_ms,
        }
    }
}

/// How old answers were when they arrived, from their `generated_at_ms` (ms).
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct AgeMs {
    /// Answers that carried `generated_at_ms`.
    pub answers: u64,
    pub p50: u64,
    pub max: u64,
}

/// One path's (or all paths') numbers, as the JSON report has them.
#[derive(Debug, Clone, Serialize, PartialEq)]
pub struct PathResult {
    pub path: String,
    pub requests: u64,
    pub by_status: BTreeMap<String, u64>,
    /// The part of `by_status` that is not 2xx.
    pub non_2xx: BTreeMap<String, u64>,
    pub failed: u64,
    pub requests_per_s: f64,
    pub latency_ms: LatencyMs,
    /// Absent when no answer carried `generated_at_ms`.
    pub age_ms: Option<AgeMs>,
}

/// Why a run fails, from its numbers; empty when it passes.
pub fn judge(
    all: &PathResult,
    paths: &[PathResult],
    max_failed_fraction: f64,
    max_p99_ms: Option<f64>,
) -> Vec<String> {
    let mut failures = Vec::new();
    if all.requests == 0 {
        failures.push("no request was measured".to_string());
        return failures;
    }
    let failed_fraction = all.failed as f64 / all.requests as f64;
    if failed_fraction > max_failed_fraction {
        let what: Vec<String> = all
            .non_2xx
            .iter()
            .map(|(k, v)| format!("{k} x{v}"))
            .collect();
        failures.push(format!(
            "{} of {} requests got no 2xx answer ({}; {:.2} % > --max-failed-fraction {})",
            all.failed,
            all.requests,
            what.join(", "),
            failed_fraction * 100.0,
            max_failed_fraction
        ));
    }
    if let Some(bound) = max_p99_ms {
        for r in std::iter::once(all).chain(paths) {
            if r.latency_ms.p99 > bound {
                failures.push(format!(
                    "p99 of {} is {:.2} ms > --max-p99-ms {bound}",
                    r.path, r.latency_ms.p99
                ));
            }
        }
    }
    failures
}

/// The shared counters: per path, plus a window for the progress line.
struct Tallies {
    paths: Vec<PathTally>,
    window: PathTally,
    window_started: Instant,
}

struct PollStats {
    started: Instant,
    inner: Mutex<Tallies>,
}

impl PollStats {
    fn lock(&self) -> MutexGuard<'_, Tallies> {
        // A panicked holder leaves counters still worth reporting.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn record(&self, path: usize, measured: bool, key: &str, latency: Duration, age: Option<i64>) {
        let mut t = self.lock();
        t.window.record(key, latency, age);
        if measured {
            if let Some(p) = t.paths.get_mut(path) {
                p.record(key, latency, age);
            }
        }
    }

    fn progress_line(&self, warmup_ends: Instant) -> String {
        let now = Instant::now();
        let mut t = self.lock();
        let window = now
            .saturating_duration_since(t.window_started)
            .as_secs_f64();
        let w = t.window.result(window);
        let line = format!(
            "[{:>5.0}s] {:<7} {:>8.0} req/s  2xx {}  other {}  p50 {:.1} ms  p99 {:.1} ms  age p50 {}",
            now.saturating_duration_since(self.started).as_secs_f64(),
            if now < warmup_ends { "warmup" } else { "poll" },
            w.requests_per_s,
            count(w.requests - w.failed),
            count(w.failed),
            w.latency_ms.p50,
            w.latency_ms.p99,
            w.age_ms
                .map_or_else(|| "-".to_string(), |a| format!("{} ms", a.p50)),
        );
        t.window = PathTally::new("window");
        t.window_started = now;
        line
    }
}

/// What every client shares.
struct Ctx {
    pool: Arc<ConnPool>,
    stats: Arc<PollStats>,
    /// One complete request per path.
    requests: Vec<Vec<u8>>,
    clients: usize,
    interval: Duration,
    timeout: Duration,
    /// The clock's zero: ticks are offsets from it.
    start: Instant,
    measure_from: Instant,
    end: Instant,
    /// Requests sent and not yet answered (what an interrupted run leaves uncounted).
    in_flight: AtomicU64,
}

/// One client: its own connection, its own ticks, until the end of the run.
async fn client_loop(ctx: Arc<Ctx>, index: usize, mut slot: Slot) {
    let paths = ctx.requests.len();
    let mut path = index % paths;
    let first = first_tick(index, ctx.clients, ctx.interval);
    let mut due = first;
    loop {
        let at = ctx.start + due;
        if at >= ctx.end {
            break;
        }
        tokio::time::sleep_until(at.into()).await;
        let sent = Instant::now();
        let measured = sent >= ctx.measure_from;
        ctx.in_flight.fetch_add(1, Ordering::Relaxed);
        let outcome = match ctx.pool.connection(&mut slot).await {
            Ok(conn) => {
                match tokio::time::timeout(ctx.timeout, conn.exchange(&ctx.requests[path])).await {
                    Ok(r) => r,
                    Err(_) => Err(client::SendError::Timeout(ctx.timeout)),
                }
            }
            Err(e) => Err(e),
        };
        let latency = sent.elapsed();
        ctx.in_flight.fetch_sub(1, Ordering::Relaxed);
        let (key, age) = match outcome {
            Ok((answer, reusable)) => {
                if !reusable {
                    slot.connection = None;
                }
                let age = generated_at_ms(&answer.body).map(|g| unix_ms() - g);
                (answer.status.as_u16().to_string(), age)
            }
            Err(e) => {
                // A failed or timed-out connection may still get an answer: drop it.
                slot.connection = None;
                (e.status_key().to_string(), None)
            }
        };
        ctx.stats.record(path, measured, &key, latency, age);
        path = (path + 1) % paths;
        due = next_tick(first, ctx.interval, ctx.start.elapsed());
    }
}

/// What `main` needs from a run.
pub struct PollOutcome {
    pub all: PathResult,
    pub failures: Vec<String>,
    #[cfg_attr(
        not(test),
        expect(dead_code, reason = "read by tests; the binary prints it")
    )]
    pub report: serde_json::Value,
}

/// The generator's side of the run.
#[derive(Debug, Clone, Serialize)]
struct PollGenerator {
    clients: usize,
    source_ips: Vec<String>,
    preopen_s: f64,
    fd_limit: FdLimit,
    /// Requests still in flight when the run stopped (Ctrl-C); not counted anywhere.
    abandoned_requests: u64,
}

#[derive(Debug, Clone, Serialize)]
struct PollReport<'a> {
    profile: &'static str,
    settings: &'a PollArgs,
    measured_s: f64,
    result: &'a PathResult,
    paths: &'a [PathResult],
    generator: PollGenerator,
    passed: bool,
    failures: &'a [String],
}

/// The end-of-run table.
pub fn render(all: &PathResult, paths: &[PathResult], measured_s: f64) -> String {
    let mut out = String::new();
    let _ = writeln!(out, "\n== poll ({measured_s:.1} s measured)");
    let _ = writeln!(
        out,
        "{:<48} {:>9} {:>8} {} {:>8} {:>9} {:>9}",
        "path",
        "requests",
        "req/s",
        LatencyMs::header(8),
        "failed",
        "age p50",
        "age max"
    );
    let row = |out: &mut String, r: &PathResult| {
        let l = &r.latency_ms;
        let mut name = r.path.clone();
        if name.chars().count() > 48 {
            name = name.chars().take(47).collect::<String>() + "…";
        }
        let (age_p50, age_max) = r.age_ms.as_ref().map_or_else(
            || ("-".to_string(), "-".to_string()),
            |a| (format!("{} ms", a.p50), format!("{} ms", a.max)),
        );
        let _ = writeln!(
            out,
            "{:<48} {:>9} {:>8.0} {} {:>8} {:>9} {:>9}",
            name,
            r.requests,
            r.requests_per_s,
            l.cells(8),
            r.failed,
            age_p50,
            age_max
        );
    };
    for p in paths {
        row(&mut out, p);
    }
    row(&mut out, all);
    for r in paths.iter().chain(std::iter::once(all)) {
        if !r.non_2xx.is_empty() {
            let what: Vec<String> = r
                .non_2xx
                .iter()
                .map(|(k, v)| format!("{k} {}", count(*v)))
                .collect();
            let _ = writeln!(out, "not 2xx, {}: {}", r.path, what.join(", "));
        }
    }
    out
}

/// Runs `loadtest poll`.
///
/// # Errors
/// When it cannot run: bad flags, target not allowed or not ready, descriptor limit, a
/// connection that cannot be opened, or the report cannot be written.
pub async fn run(args: PollArgs) -> Result<PollOutcome> {
    args.check()?;
    let target = Target::resolve(&args.target, args.allow_remote)
        .await?
        .with_key(args.key.clone());
    let target = Arc::new(target);
    let fd_limit = fd_limit::raise_for(args.clients as u64 + SPARE_DESCRIPTORS)
        .context("raising the open-file limit for --clients")?;
    let loopback_v4 = matches!(target.addr.ip(), std::net::IpAddr::V4(ip) if ip.is_loopback());
    let sources = if loopback_v4 {
        loopback_sources(
            args.source_ips
                .unwrap_or_else(|| auto_source_ips(args.clients)),
        )
    } else {
        ensure!(
            args.source_ips.is_none(),
            "--source-ips only works for a 127.x.x.x target"
        );
        Vec::new()
    };
    if !args.ready_timeout.is_zero() {
        client::wait_ready(&target, args.ready_timeout).await?;
    }

    let pool = Arc::new(ConnPool::new(target.addr, args.clients, sources.clone()));
    eprintln!(
        "opening {} connections from {} source address(es)",
        args.clients,
        sources.len().max(1)
    );
    let preopen = pool
        .open_all(args.connect_rate, &target.authority)
        .await
        .context("opening the clients' connections")?;

    let requests: Vec<Vec<u8>> = args
        .paths
        .iter()
        .map(|p| {
            wire::request_head(
                "GET",
                &target.path(p),
                &target.authority,
                "application/json",
                target.api_key.as_deref(),
                0,
            )
        })
        .collect();
    let start = Instant::now();
    let measure_from = start + args.warmup;
    let end = measure_from + args.duration;
    let stats = Arc::new(PollStats {
        started: start,
        inner: Mutex::new(Tallies {
            paths: args.paths.iter().map(|p| PathTally::new(p)).collect(),
            window: PathTally::new("window"),
            window_started: start,
        }),
    });
    let ctx = Arc::new(Ctx {
        pool: Arc::clone(&pool),
        stats: Arc::clone(&stats),
        requests,
        clients: args.clients,
        interval: args.interval,
        timeout: args.request_timeout,
        start,
        measure_from,
        end,
        in_flight: AtomicU64::new(0),
    });
    eprintln!(
        "poll {} with {} clients every {}s for {}s (+{}s warm-up) over {} path(s)",
        target.url,
        args.clients,
        args.interval.as_secs_f64(),
        args.duration.as_secs_f64(),
        args.warmup.as_secs_f64(),
        args.paths.len()
    );
    let (stop_progress, progress) = crate::report::spawn_progress({
        let stats = Arc::clone(&stats);
        move || stats.progress_line(measure_from)
    });
    let mut tasks = tokio::task::JoinSet::new();
    for index in 0..args.clients {
        let taken = pool.take().await;
        let ctx = Arc::clone(&ctx);
        // The slot (and its connection) is the client's for the whole run; the pool only
        // opened the connections.
        let slot = taken.slot;
        tasks.spawn(client_loop(ctx, index, slot));
    }

    // The run ends at `end`, plus the last requests' answers (bounded by the timeout), or
    // at Ctrl-C / SIGTERM, which drops the requests in flight and reports the rest.
    let all_done = async { while tasks.join_next().await.is_some() {} };
    let bound =
        tokio::time::sleep_until((end + args.request_timeout + Duration::from_secs(1)).into());
    let interrupted = tokio::select! {
        () = all_done => None,
        () = bound => Some("the drain bound"),
        signal = stop_signal() => Some(signal),
    };
    let stopped = Instant::now();
    let abandoned = ctx.in_flight.load(Ordering::Relaxed);
    tasks.abort_all();
    let _ = stop_progress.send(true);
    let _ = progress.await;
    if let Some(why) = interrupted {
        eprintln!("{why}: stopped; reporting what was answered");
    }

    let measured_s = stopped
        .min(end)
        .saturating_duration_since(measure_from)
        .as_secs_f64();
    let tallies = stats.lock().paths.clone();
    let mut total = PathTally::new("all");
    for t in &tallies {
        total.absorb(t);
    }
    let all = total.result(measured_s);
    let paths: Vec<PathResult> = tallies.iter().map(|t| t.result(measured_s)).collect();
    print!("{}", render(&all, &paths, measured_s));

    let mut failures = judge(&all, &paths, args.max_failed_fraction, args.max_p99_ms);
    if let Some(why) = interrupted {
        if abandoned > 0 {
            eprintln!("{abandoned} requests in flight were dropped, not counted");
        }
        if why == "the drain bound" {
            failures.push(format!(
                "{abandoned} requests were still unanswered after the run (not counted)"
            ));
        } else {
            failures.push(format!("interrupted by {why}"));
        }
    }
    if failures.is_empty() {
        println!("\nPASSED");
    } else {
        println!("\nFAILED: {}", failures.join("; "));
    }

    let report = PollReport {
        profile: "poll",
        settings: &args,
        measured_s,
        result: &all,
        paths: &paths,
        generator: PollGenerator {
            clients: args.clients,
            source_ips: sources.iter().map(ToString::to_string).collect(),
            preopen_s: preopen.as_secs_f64(),
            fd_limit,
            abandoned_requests: abandoned,
        },
        passed: failures.is_empty(),
        failures: &failures,
    };
    let report = serde_json::to_value(&report).context("serializing the JSON report")?;
    if let Some(path) = &args.json_report {
        crate::report::write_json_report(path, &report)?;
    }
    Ok(PollOutcome {
        all,
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
        Poll(PollArgs),
    }

    fn args(line: &str) -> PollArgs {
        let words = std::iter::once("loadtest").chain(line.split_whitespace());
        match TestCli::try_parse_from(words).expect("valid flags") {
            TestCli::Poll(a) => a,
        }
    }

    #[test]
    fn parses_durations_with_and_without_units() {
        let ok = |t: &str| parse_duration(t).expect("valid");
        assert_eq!(ok("60"), Duration::from_secs(60));
        assert_eq!(ok("60s"), Duration::from_secs(60));
        assert_eq!(ok("1.5s"), Duration::from_millis(1500));
        assert_eq!(ok("250ms"), Duration::from_millis(250));
        assert_eq!(ok("2m"), Duration::from_secs(120));
        assert_eq!(ok("1h"), Duration::from_secs(3600));
        assert_eq!(ok("0"), Duration::ZERO);
        for bad in ["", "s", "-1s", "1d", "25h", "abc", "1 s x"] {
            assert!(parse_duration(bad).is_err(), "{bad:?} accepted");
        }
        assert!(positive_duration("0s").is_err());
    }

    #[test]
    fn defaults_and_flags() {
        let a = args("poll --path /v1/matches/m1/live");
        assert_eq!(a.target, "http://127.0.0.1:8080");
        assert_eq!(a.clients, 200);
        assert_eq!(a.duration, Duration::from_secs(60));
        assert_eq!(a.interval, Duration::from_secs(1));
        assert_eq!(a.warmup, Duration::ZERO);
        assert_eq!(a.max_failed_fraction, 0.0);
        assert_eq!(a.max_p99_ms, None);
        let a = args(
            "poll --target http://127.0.0.1:1 --clients 3 --duration 2s --interval 0 \
             --path /a?x=1 --path /b --key k --warmup 5s --max-p99-ms 50",
        );
        assert_eq!(a.paths, ["/a?x=1", "/b"]);
        assert_eq!(a.interval, Duration::ZERO);
        assert_eq!(a.key.as_deref(), Some("k"));
        // The key never reaches a report.
        let settings = serde_json::to_string(&a).expect("serializable");
        assert!(!settings.contains("\"key\""), "{settings}");
        assert!(settings.contains("\"interval\":0.0"), "{settings}");

        let refused = |line: &str| {
            let words = std::iter::once("loadtest").chain(line.split_whitespace());
            TestCli::try_parse_from(words).is_err()
        };
        assert!(refused("poll"));
        assert!(refused("poll --path v1/no-slash"));
        assert!(refused("poll --path /a --max-failed-fraction 2"));
        assert!(refused("poll --path /a --duration 0"));
        assert!(args("poll --path /a --clients 0").check().is_err());
    }

    #[test]
    fn ticks_are_spread_and_missed_ones_skipped() {
        let s = Duration::from_secs;
        let ms = Duration::from_millis;
        assert_eq!(first_tick(0, 4, s(1)), ms(0));
        assert_eq!(first_tick(3, 4, s(1)), ms(750));
        assert_eq!(first_tick(5, 5, Duration::ZERO), ms(0));
        // An answer inside the interval: the next tick.
        assert_eq!(next_tick(ms(250), s(1), ms(300)), ms(1250));
        // Exactly on a tick: that tick.
        assert_eq!(next_tick(ms(250), s(1), ms(1250)), ms(1250));
        // An answer 2.5 intervals late: the missed ticks are skipped.
        assert_eq!(next_tick(ms(250), s(1), ms(3500)), ms(4250));
        // Before the first tick: the first tick.
        assert_eq!(next_tick(ms(250), s(1), ms(10)), ms(250));
        // Interval 0: right away.
        assert_eq!(next_tick(ms(0), Duration::ZERO, ms(1234)), ms(1234));
    }

    #[test]
    fn finds_generated_at_ms() {
        let body = br#"{"match_id":"m","timeline":[{"t":1}],"newest_received_at_ms":5,"generated_at_ms":1796420817123}"#;
        assert_eq!(generated_at_ms(body), Some(1_796_420_817_123));
        assert_eq!(generated_at_ms(b"{\"generated_at_ms\" :  42 }"), Some(42));
        assert_eq!(generated_at_ms(br#"{"generated_at_ms":null}"#), None);
        assert_eq!(generated_at_ms(br#"{"total_events":3}"#), None);
        assert_eq!(generated_at_ms(b""), None);
    }

    #[test]
    fn tallies_merge_and_judge() {
        let mut a = PathTally::new("/a");
        let mut b = PathTally::new("/b");
        for i in 1..=98 {
            a.record("200", Duration::from_millis(i), Some(40));
        }
        a.record("503", Duration::from_millis(99), None);
        a.record("timeout", Duration::from_millis(100), None);
        b.record("200", Duration::from_millis(2), Some(900));
        let mut all = PathTally::new("all");
        all.absorb(&a);
        all.absorb(&b);
        let (ra, rb, r) = (a.result(10.0), b.result(10.0), all.result(10.0));
        assert_eq!(r.requests, 101);
        assert_eq!(r.failed, 2);
        assert_eq!(r.by_status.get("200"), Some(&99));
        assert_eq!(
            r.non_2xx,
            BTreeMap::from([("503".to_string(), 1), ("timeout".to_string(), 1)])
        );
        assert!((r.requests_per_s - 10.1).abs() < 1e-9);
        assert!((ra.latency_ms.max - 100.0).abs() < 0.1);
        assert!((ra.latency_ms.p50 - 50.0).abs() < 0.1);
        let age = r.age_ms.as_ref().expect("ages");
        assert_eq!((age.answers, age.p50, age.max), (99, 40, 900));
        assert_eq!(rb.age_ms.as_ref().expect("age").max, 900);

        assert_eq!(
            judge(&r, &[ra.clone(), rb.clone()], 0.02, None),
            Vec::<String>::new()
        );
        let f = judge(&r, &[ra.clone(), rb.clone()], 0.0, None);
        assert_eq!(f.len(), 1);
        assert!(
            f[0].contains("2 of 101") && f[0].contains("503 x1"),
            "{f:?}"
        );
        // p99 of /a is ~99 ms, of /b 2 ms.
        let f = judge(&r, &[ra, rb], 1.0, Some(50.0));
        assert_eq!(f.len(), 2, "{f:?}");
        assert!(f.iter().any(|m| m.contains("p99 of /a")));
        assert!(judge(&PathTally::new("all").result(1.0), &[], 1.0, None)[0].contains("no request"));
    }

    fn field<'a>(v: &'a Value, path: &str) -> &'a Value {
        path.split('.').fold(v, |v, k| match k.parse::<usize>() {
            Ok(i) => &v[i],
            Err(_) => &v[k],
        })
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn polls_a_mock_round_robin_and_reports_per_path() {
        let mock = MockServer::start(MockConfig::default()).await;
        let report = std::env::temp_dir().join(format!("poll-{}.json", std::process::id()));
        let line = format!(
            "poll --target {} --clients 4 --duration 1s --interval 100ms --warmup 200ms \
             --path /v1/matches/m1/metrics?bucket=1m --path /v1/matches/m1/nothing \
             --max-failed-fraction 0.6 --ready-timeout 5s --key secret --json-report {}",
            mock.url(),
            report.display()
        );
        let outcome = run(args(&line)).await.expect("runs");
        assert!(outcome.failures.is_empty(), "{:?}", outcome.failures);
        // 4 clients x 10 ticks in the measured second, half on each path.
        let all = &outcome.all;
        assert!((36..=44).contains(&all.requests), "{all:?}");
        let v = &outcome.report;
        let metrics = field(v, "paths.0");
        let missing = field(v, "paths.1");
        assert_eq!(metrics["path"], "/v1/matches/m1/metrics?bucket=1m");
        let (m, n) = (
            metrics["requests"].as_u64().expect("count"),
            missing["requests"].as_u64().expect("count"),
        );
        assert!(m.abs_diff(n) <= 4, "round robin: {m} vs {n}");
        assert_eq!(metrics["by_status"]["200"].as_u64(), Some(m));
        assert_eq!(missing["non_2xx"]["404"].as_u64(), Some(n));
        // The mock stamps metrics answers with generated_at_ms; 404s have none.
        assert_eq!(field(metrics, "age_ms.answers").as_u64(), Some(m));
        assert!(field(metrics, "age_ms.max").as_u64().expect("age") < 1000);
        assert!(missing["age_ms"].is_null());
        assert_eq!(v["passed"], true);
        assert_eq!(field(v, "generator.clients"), 4);
        let written = std::fs::read_to_string(&report).expect("report written");
        assert!(!written.contains("secret"));
        let _ = std::fs::remove_file(&report);
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn fails_on_non_2xx_and_on_p99() {
        let mock = MockServer::start(MockConfig::default()).await;
        let line = format!(
            "poll --target {} --clients 2 --duration 300ms --interval 0 \
             --path /v1/matches/m1/metrics --path /nope --max-p99-ms 0.000001",
            mock.url()
        );
        let outcome = run(args(&line)).await.expect("runs");
        let f = outcome.failures.join("; ");
        assert!(f.contains("no 2xx answer") && f.contains("404"), "{f}");
        assert!(f.contains("p99 of all"), "{f}");
        // Back to back: far more than one request per client.
        assert!(outcome.all.requests > 20, "{:?}", outcome.all);
    }

    #[tokio::test]
    async fn cannot_run_when_the_target_is_down() {
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        drop(listener);
        let line = format!("poll --target http://{addr} --clients 2 --ready-timeout 0 --path /a");
        assert!(run(args(&line)).await.is_err());
        let remote = "poll --target http://192.0.2.1:80 --path /a";
        assert!(run(args(remote)).await.is_err());
    }
}
