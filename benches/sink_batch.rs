//! How ClickHouse insert throughput and latency depend on the sink's batch size.
//!
//! Inserts realistic `events` rows through the sink's own [`BatchWriter`] into a real
//! ClickHouse, one batch size at a time, and prints a Markdown table: rows/s over the
//! time spent in inserts, median and p99 latency of one insert, and the active parts the
//! table holds right after the last insert. It backs `sink.max_batch_rows` and
//! `sink.flush_interval_ms`; the results live in `docs/benchmarks.md`.
//!
//! Before each insert it also runs the sink's dedup check (`sink::dedup`: the ledger
//! range query per partition and the recent window, default size) on the batch, timed
//! apart from the insert, against a ledger that grows as the run goes: the "check"
//! columns are what dedup adds to each insert. "Redelivered check" is the ledger check
//! alone (window off) of the last batch once it is in the ledger: a batch read again.
//!
//! ```sh
//! BENCH_CLICKHOUSE_URL=http://127.0.0.1:18123 cargo bench --bench sink_batch
//! ```
//!
//! Without `BENCH_CLICKHOUSE_URL` it prints why and exits 0, so `cargo bench` works on a
//! machine without ClickHouse. Optional: `BENCH_SINK_ROWS_PER_SIZE` (default 400000) and
//! `BENCH_SINK_BATCH_ROWS` (comma-separated sizes, default 1000,5000,20000,50000,100000),
//! `BENCH_SINK_DB_PREFIX` (default `bench_sink`, for runs that must keep to their own
//! database names).
//! No variable starts with `FANFINITY_`: that prefix configures fanfinity itself.
//!
//! Each size gets a fresh database `bench_sink_<pid>_<batch rows>`, created by the sink's
//! migrations and dropped afterwards, so one size's parts and merges never count against
//! the next. One writer inserts batches back to back, as one consumer thread does when it
//! is behind; rows are built before each insert and not timed.
//!
//! # Limitations
//! Rows of one run all fall into one `toYYYYMM` partition, so each insert is one part; a
//! batch that straddles a month boundary in production writes two. With 400k rows per size
//! the largest sizes give only a few samples, so their p99 is their worst insert.

use std::env;
use std::process::ExitCode;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, Context, Result};
use clickhouse::Client;
use fanfinity::app::config::ClickHouseConfig;
use fanfinity::app::config::SinkConfig;
use fanfinity::sink::dedup::Dedup;
use fanfinity::sink::row::EventRow;
use fanfinity::sink::writer::BatchWriter;
use fanfinity::sink::{clickhouse as sink_clickhouse, migrate};
use uuid::Uuid;

const DEFAULT_ROWS_PER_SIZE: usize = 400_000;
const DEFAULT_BATCH_ROWS: [usize; 5] = [1_000, 5_000, 20_000, 50_000, 100_000];
/// A size still inserting after this long is cut short and reported as such, so a slow
/// or throttling server cannot keep the bench running for long.
const SIZE_DEADLINE: Duration = Duration::from_secs(120);
/// Distinct fans the user ids are drawn from.
const FANS: usize = 100_000;
/// Matches played at the same time; the `match_id` leads the table's sort key.
const MATCH_IDS: [&str; 8] = [
    "wc2026-r16-1-arg-aus",
    "wc2026-r16-2-fra-pol",
    "wc2026-r16-3-eng-sen",
    "wc2026-r16-4-bra-kor",
    "wc2026-r16-5-ned-usa",
    "wc2026-r16-6-jpn-cro",
    "wc2026-r16-7-mar-esp",
    "wc2026-r16-8-por-sui",
];
const SCREENS: [&str; 4] = ["live", "stats", "lineups", "timeline"];
const KAFKA_PARTITIONS: i32 = 3;

fn main() -> ExitCode {
    let Some(url) = env::var("BENCH_CLICKHOUSE_URL")
        .ok()
        .filter(|u| !u.is_empty())
    else {
        println!("sink_batch: BENCH_CLICKHOUSE_URL is not set, skipping");
        return ExitCode::SUCCESS;
    };
    match run(&url) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("sink_batch: {err:#}");
            ExitCode::FAILURE
        }
    }
}

/// What one batch size measured.
struct SizeResult {
    batch_rows: usize,
    rows: usize,
    inserts: usize,
    insert_time: Duration,
    latencies: Vec<Duration>,
    /// Dedup check (ledger queries, window lookups and updates) per batch.
    checks: Vec<Duration>,
    /// Ledger check of the last batch, all of it already in the ledger.
    redelivered_check: Duration,
    active_parts: u64,
    /// Why the size stopped early, if it did.
    stopped: Option<String>,
}

fn run(url: &str) -> Result<()> {
    let rows_per_size = env_usize("BENCH_SINK_ROWS_PER_SIZE")?.unwrap_or(DEFAULT_ROWS_PER_SIZE);
    let sizes = match env::var("BENCH_SINK_BATCH_ROWS") {
        Ok(list) => parse_sizes(&list)?,
        Err(_) => DEFAULT_BATCH_ROWS.to_vec(),
    };
    let db_prefix = env::var("BENCH_SINK_DB_PREFIX").unwrap_or_else(|_| "bench_sink".into());
    if db_prefix.is_empty()
        || !db_prefix
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_')
    {
        bail!("BENCH_SINK_DB_PREFIX={db_prefix:?} must be letters, digits and _");
    }
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .context("start tokio runtime")?;
    let base = ClickHouseConfig {
        url: url.to_string(),
        ..ClickHouseConfig::default()
    };
    let server = sink_clickhouse::server_client(&base);
    let version: String = runtime
        .block_on(server.query("SELECT version()").fetch_one())
        .with_context(|| format!("ask {url} for its version"))?;
    println!(
        "sink_batch: clickhouse {version} at {url}, {rows_per_size} rows per size, \
         {} cores",
        std::thread::available_parallelism().map_or(0, |n| n.get())
    );

    let mut generator = RowGenerator::new(0x5eed);
    let mut results = Vec::with_capacity(sizes.len());
    for &batch_rows in &sizes {
        let config = ClickHouseConfig {
            database: format!("{db_prefix}_{}_{batch_rows}", std::process::id()),
            ..base.clone()
        };
        let measured = measure(&runtime, &config, batch_rows, rows_per_size, &mut generator);
        let dropped = runtime
            .block_on(execute(
                &server,
                &format!("DROP DATABASE IF EXISTS {}", config.database),
            ))
            .with_context(|| format!("drop database {}", config.database));
        let result = measured?;
        dropped?;
        eprintln!(
            "sink_batch: {batch_rows} rows per batch done ({} inserts)",
            result.inserts
        );
        results.push(result);
    }

    print_table(&results);
    Ok(())
}

/// Inserts `total_rows` in batches of `batch_rows` into a fresh database.
fn measure(
    runtime: &tokio::runtime::Runtime,
    config: &ClickHouseConfig,
    batch_rows: usize,
    total_rows: usize,
    generator: &mut RowGenerator,
) -> Result<SizeResult> {
    runtime
        .block_on(migrate::run(config))
        .with_context(|| format!("migrate database {}", config.database))?;
    let writer = BatchWriter::new(config).context("create batch writer")?;

    let batches = total_rows.div_ceil(batch_rows);
    let mut result = SizeResult {
        batch_rows,
        rows: 0,
        inserts: 0,
        insert_time: Duration::ZERO,
        latencies: Vec::with_capacity(batches),
        checks: Vec::with_capacity(batches),
        redelivered_check: Duration::ZERO,
        active_parts: 0,
        stopped: None,
    };
    let mut dedup = Dedup::new("bench", SinkConfig::default().dedup_window);
    let started = Instant::now();
    let mut rows = Vec::with_capacity(batch_rows);
    for batch in 0..batches {
        if started.elapsed() > SIZE_DEADLINE {
            result.stopped = Some(format!("deadline after {batch} of {batches} batches"));
            break;
        }
        let len = batch_rows.min(total_rows - batch * batch_rows);
        generator.fill(&mut rows, len);

        let all: Vec<usize> = (0..len).collect();
        let check_started = Instant::now();
        match dedup.unseen(&writer, &rows, &all) {
            Ok((keep, _)) if keep.len() == len => {}
            Ok((keep, _)) => bail!("dedup dropped {} new rows", len - keep.len()),
            Err(err) => {
                result.stopped = Some(format!("check {batch} failed: {}", error_chain(&err)));
                break;
            }
        }
        let mut check = check_started.elapsed();

        match writer.insert(&rows) {
            Ok(elapsed) => {
                let remember_started = Instant::now();
                dedup.remember(&rows, &all);
                check += remember_started.elapsed();
                result.checks.push(check);
                result.rows += len;
                result.inserts += 1;
                result.insert_time += elapsed;
                result.latencies.push(elapsed);
            }
            Err(err) => {
                result.stopped = Some(format!("batch {batch} failed: {}", error_chain(&err)));
                break;
            }
        }
    }

    if result.stopped.is_none() && !rows.is_empty() {
        let all: Vec<usize> = (0..rows.len()).collect();
        let mut ledger_only = Dedup::new("bench-redelivered", 0);
        let check_started = Instant::now();
        let (keep, _) = ledger_only
            .unseen(&writer, &rows, &all)
            .map_err(|err| anyhow::anyhow!("redelivered check: {}", error_chain(&err)))?;
        result.redelivered_check = check_started.elapsed();
        if !keep.is_empty() {
            bail!("{} rows of a redelivered batch were kept", keep.len());
        }
    }

    let parts_sql = format!(
        "SELECT count() FROM system.parts \
         WHERE database = '{}' AND table = 'events' AND active",
        config.database
    );
    let server = sink_clickhouse::server_client(config);
    result.active_parts = runtime
        .block_on(server.query(&parts_sql).fetch_one::<u64>())
        .context("count active parts")?;
    Ok(result)
}

fn print_table(results: &[SizeResult]) {
    println!();
    println!(
        "| batch rows | inserts | rows/s | median insert ms | p99 insert ms | active parts \
         | median check ms | p99 check ms | redelivered check ms |"
    );
    println!("|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
    for r in results {
        let rows_per_sec = r.rows as f64 / r.insert_time.as_secs_f64().max(1e-9);
        let mut sorted = r.latencies.clone();
        sorted.sort_unstable();
        let mut checks = r.checks.clone();
        checks.sort_unstable();
        println!(
            "| {} | {} | {:.0} | {:.1} | {:.1} | {} | {:.2} | {:.2} | {:.2} |",
            r.batch_rows,
            r.inserts,
            rows_per_sec,
            millis(percentile(&sorted, 0.50)),
            millis(percentile(&sorted, 0.99)),
            r.active_parts,
            millis(percentile(&checks, 0.50)),
            millis(percentile(&checks, 0.99)),
            millis(r.redelivered_check),
        );
    }
    for r in results {
        if let Some(why) = &r.stopped {
            println!("\n{} rows per batch stopped early: {why}", r.batch_rows);
        }
    }
}

/// Builds rows shaped like the replay's: several live matches, a large crowd of fans
/// with UUID user ids, every event type, JSON payloads of 40-80 bytes.
struct RowGenerator {
    rng: fastrand::Rng,
    user_ids: Vec<String>,
    next_offset: [i64; KAFKA_PARTITIONS as usize],
}

impl RowGenerator {
    fn new(seed: u64) -> Self {
        let mut rng = fastrand::Rng::with_seed(seed);
        let user_ids = (0..FANS)
            .map(|_| {
                let mut bytes = [0u8; 16];
                rng.fill(&mut bytes);
                uuid::Builder::from_random_bytes(bytes)
                    .into_uuid()
                    .to_string()
            })
            .collect();
        Self {
            rng,
            user_ids,
            next_offset: [0; KAFKA_PARTITIONS as usize],
        }
    }

    /// Replaces `rows` with `len` new rows received now.
    fn fill(&mut self, rows: &mut Vec<EventRow>, len: usize) {
        let now_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as i64);
        rows.clear();
        rows.extend((0..len).map(|_| self.row(now_ms)));
    }

    fn row(&mut self, received_at_ms: i64) -> EventRow {
        let rng = &mut self.rng;
        let match_index = rng.usize(..MATCH_IDS.len());
        let fan = rng.usize(..FANS);
        let team = match rng.u8(..10) {
            0 => String::new(),
            n if n % 2 == 0 => "HOME".to_string(),
            _ => "AWAY".to_string(),
        };
        let client_ts_ms = received_at_ms - rng.i64(20..2_000);
        let partition = (match_index as i32) % KAFKA_PARTITIONS;
        let offset = &mut self.next_offset[partition as usize];
        *offset += 1;
        EventRow {
            event_id: Uuid::now_v7(),
            match_id: MATCH_IDS[match_index].to_string(),
            user_id: self.user_ids[fan].clone(),
            event_type: rng.i8(1..=7),
            team,
            client_ts_ms: Some(client_ts_ms),
            event_time: (client_ts_ms / 1000) as u32,
            received_at: (received_at_ms / 1000) as u32,
            received_at_ms,
            payload: payload(rng),
            kafka_partition: partition,
            kafka_offset: *offset,
        }
    }
}

/// A JSON object of 40 to 80 bytes, padded with a note of random letters.
fn payload(rng: &mut fastrand::Rng) -> String {
    let target = rng.usize(40..=80);
    let head = format!(
        r#"{{"minute":{},"screen":"{}","note":""#,
        rng.u8(0..=120),
        SCREENS[rng.usize(..SCREENS.len())]
    );
    let note_len = target.saturating_sub(head.len() + 2);
    let mut text = head;
    text.extend((0..note_len).map(|_| rng.lowercase()));
    text.push_str("\"}");
    text
}

async fn execute(client: &Client, sql: &str) -> clickhouse::error::Result<()> {
    client.query(sql).execute().await
}

/// Nearest-rank percentile of sorted samples; zero when there are none.
fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let rank = (p * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn millis(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn env_usize(name: &str) -> Result<Option<usize>> {
    match env::var(name) {
        Ok(value) => match value.trim().parse() {
            Ok(0) | Err(_) => bail!("{name}={value:?} is not a positive integer"),
            Ok(n) => Ok(Some(n)),
        },
        Err(_) => Ok(None),
    }
}

fn parse_sizes(list: &str) -> Result<Vec<usize>> {
    list.split(',')
        .map(|s| match s.trim().parse::<usize>() {
            Ok(n) if n > 0 => Ok(n),
            _ => bail!("BENCH_SINK_BATCH_ROWS has {s:?}, expected positive integers"),
        })
        .collect()
}

fn error_chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}
