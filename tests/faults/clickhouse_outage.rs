//! ClickHouse stopped for 30 s during load, then started.
//!
//! What it proves: ingest does not depend on ClickHouse (Kafka holds the events, so
//! clients keep hearing 202 and `/readyz` stays 200 while reporting the sink's error); the
//! sink retries the same batch with capped exponential backoff and stays in its consumer
//! group while it waits; and once ClickHouse is back every event answered 202 is stored,
//! each exactly once after merges.
//!
//! ClickHouse here is private to the test ([`PrivateClickHouse`]): stopping the shared
//! dev server would break every other test on the machine. Kafka is the shared broker.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU8, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use serde_json::json;

use crate::common::private_clickhouse::PrivateClickHouse;
use crate::common::*;

const MATCH: &str = "chdown-m1";
/// Two clients, each posting 20 events every 50 ms: about 800 events/s, steady enough to
/// keep the sink's batches coming during the whole outage on a 2-core machine.
const CLIENTS: usize = 2;
const EVENTS_PER_REQUEST: usize = 20;
const PACE: Duration = Duration::from_millis(50);
/// Load before the fault, long enough for the sink to have inserted batches.
const WARMUP: Duration = Duration::from_secs(3);
const OUTAGE: Duration = Duration::from_secs(30);
/// Load after ClickHouse is back, so the sink recovers while new events keep arriving.
const AFTER_RESTART: Duration = Duration::from_secs(2);
/// From the restart until every acknowledged event is stored. The sink's next attempt
/// comes at most `sink.retry_max_ms` (10 s, +20 % jitter) after the restart; storing
/// the ~45k rows then takes seconds.
const DRAIN_LIMIT: Duration = Duration::from_secs(120);
/// A client retries a refused batch with the same event ids, 100 ms apart, this often.
const ATTEMPTS_PER_BATCH: usize = 50;

/// `sink.retry_min_ms` and `sink.retry_max_ms` defaults: the waits the log must show.
const RETRY_MIN_MS: u64 = 200;
const RETRY_MAX_MS: u64 = 10_000;

/// When a request was sent, relative to the fault.
const BEFORE: u8 = 0;
const DURING: u8 = 1;
const AFTER: u8 = 2;

/// One HTTP attempt of a load client.
#[derive(Debug)]
struct Attempt {
    phase: u8,
    /// The status and the body's `error` code, or why no answer came.
    outcome: Result<(u16, Option<String>), String>,
}

impl Attempt {
    fn accepted(&self) -> bool {
        matches!(self.outcome, Ok((202, _)))
    }
}

/// What one load client did.
#[derive(Debug, Default)]
struct ClientReport {
    /// Ids answered 202.
    acked: Vec<String>,
    /// Ids of batches that never got a 202 in `ATTEMPTS_PER_BATCH` attempts.
    unacked: Vec<String>,
    attempts: Vec<Attempt>,
}

/// Sets the load's stop flag when dropped, so a failed assertion does not leave client
/// threads posting for the rest of the test binary's life.
struct StopOnDrop(Arc<AtomicBool>);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// A `/readyz` and `/metrics` reading taken during the outage.
struct Probe {
    at: Duration,
    readyz_status: u16,
    readyz: serde_json::Value,
    metrics: String,
}

#[test]
fn clickhouse_down_30s_under_load_keeps_answering_202_and_loses_nothing() {
    let names = Names::new("chdown");
    let mut ch = PrivateClickHouse::start(&names.database);
    let ch_url = format!("clickhouse.url=\"{}\"", ch.url());
    // Later --set pairs win (figment merges them in order), so this replaces the shared
    // ClickHouse URL that `Names::settings` puts first.
    let server = Server::start("serve", &names, &brokers(), &[&ch_url]);
    let db = names.database.clone();
    let scenario = Instant::now();

    eventually(
        Duration::from_secs(30),
        "the sink's table in the private ClickHouse",
        || {
            let sql = format!(
                "SELECT count() FROM system.tables WHERE database = '{db}' AND name = 'events' \
                 FORMAT TabSeparated"
            );
            (ch.query(&sql).trim() == "1").then_some(())
        },
    );
    let shared = clickhouse(&format!(
        "SELECT count() FROM system.databases WHERE name = '{db}' FORMAT TabSeparated"
    ));
    assert_eq!(
        shared.trim(),
        "0",
        "the shared ClickHouse got the test's database: the --set override did not win"
    );

    // Load for the whole scenario.
    let phase = Arc::new(AtomicU8::new(BEFORE));
    let stop = Arc::new(AtomicBool::new(false));
    let _stop_guard = StopOnDrop(Arc::clone(&stop));
    let clients: Vec<_> = (0..CLIENTS)
        .map(|c| start_client(server.addr(), c, Arc::clone(&phase), Arc::clone(&stop)))
        .collect();

    // Before the fault the sink is inserting and counts ClickHouse as up.
    std::thread::sleep(WARMUP);
    ch.wait_for_ids(&db, MATCH, 1, Duration::from_secs(30));
    let before = server.get("/metrics").text();
    assert_eq!(
        metric(&before, "fanfinity_clickhouse_up"),
        Some(1.0),
        "{before}"
    );
    let failures_before = metric(&before, "fanfinity_sink_insert_failures_total").unwrap_or(0.0);
    let consumers = metric(&before, "fanfinity_sink_consumers_running").unwrap_or(0.0);
    assert!(consumers >= 1.0, "{before}");
    let log_at_outage = std::fs::metadata(&server.log).map_or(0, |m| m.len());

    // The outage: stop ClickHouse and watch the node for 30 s under load. A stopping
    // 18.16 closes its listeners at once but keeps serving open keep-alive connections
    // (the sink's) for another 10-15 s, so the 30 s count from the process's exit.
    phase.store(DURING, Ordering::Relaxed);
    let stop_took = ch.stop();
    let outage_started = Instant::now();
    let mut probes = Vec::new();
    let mut query_answer = None;
    while outage_started.elapsed() < OUTAGE {
        let at = outage_started.elapsed();
        let readyz = server.get("/readyz");
        let metrics = server.get("/metrics").text();
        probes.push(Probe {
            at,
            readyz_status: readyz.status,
            readyz: readyz.json(),
            metrics,
        });
        if query_answer.is_none() && at > Duration::from_secs(5) {
            query_answer = Some(server.get(&format!("/v1/matches/{MATCH}/metrics")));
        }
        let next = at + Duration::from_secs(1);
        std::thread::sleep(next.saturating_sub(outage_started.elapsed()));
    }

    // ClickHouse back; a little more load, then stop it.
    phase.store(AFTER, Ordering::Relaxed);
    ch.restart();
    let outage = outage_started.elapsed();
    let restarted = Instant::now();
    std::thread::sleep(AFTER_RESTART);
    stop.store(true, Ordering::Relaxed);
    let reports: Vec<ClientReport> = clients
        .into_iter()
        .map(|h| h.join().expect("load client thread"))
        .collect();

    // Ingest during the outage. It never talks to ClickHouse, so every request should be
    // 202. A shared 2-core machine and a shared broker can still delay a delivery report
    // past `http.ack_timeout_ms` now and then, which has nothing to do with ClickHouse:
    // up to 1 % of attempts may be refused, but only with a Kafka-side 503 (the client
    // retries those), never anything else.
    let during: Vec<&Attempt> = reports
        .iter()
        .flat_map(|r| &r.attempts)
        .filter(|a| a.phase == DURING)
        .collect();
    let refused: Vec<&&Attempt> = during.iter().filter(|a| !a.accepted()).collect();
    assert!(
        during.len() > 200,
        "the load ran during the outage ({} attempts)",
        during.len()
    );
    assert!(
        refused.len() * 100 <= during.len(),
        "{} of {} requests during the outage were not 202: {:?}",
        refused.len(),
        during.len(),
        &refused[..refused.len().min(10)]
    );
    for attempt in &refused {
        let kafka_side = matches!(
            &attempt.outcome,
            Ok((503, Some(code)))
                if ["overloaded", "delivery_failed", "delivery_timeout", "kafka_unavailable"]
                    .contains(&code.as_str())
        );
        assert!(
            kafka_side,
            "a refusal during the outage that is not a Kafka-side 503: {attempt:?}"
        );
    }
    let unacked: usize = reports.iter().map(|r| r.unacked.len()).sum();
    assert_eq!(unacked, 0, "every batch got its 202 within its retries");

    // /readyz during the outage: always 200 with Kafka up; from 3 s in (a batch is due
    // every 500 ms and a refused connection fails at once) it reports ClickHouse down,
    // the batch being retried and the error. The consumer threads stay alive.
    for probe in &probes {
        assert_eq!(
            probe.readyz_status, 200,
            "/readyz at {:?} into the outage: {}",
            probe.at, probe.readyz
        );
        assert_eq!(probe.readyz["kafka"]["up"], true, "{}", probe.readyz);
        assert_eq!(
            metric(&probe.metrics, "fanfinity_sink_consumers_running"),
            Some(consumers),
            "the consumer threads at {:?} into the outage",
            probe.at
        );
        if probe.at >= Duration::from_secs(3) {
            let sink = &probe.readyz["sink"];
            assert_eq!(sink["clickhouse"], "down", "at {:?}: {sink}", probe.at);
            assert_eq!(sink["retrying"], true, "at {:?}: {sink}", probe.at);
            assert_eq!(sink["schema_error"], false, "at {:?}: {sink}", probe.at);
            assert!(
                sink["last_error"]
                    .as_str()
                    // The ledger check before each insert is usually what fails first.
                    .is_some_and(
                        |e| e.contains("clickhouse insert") || e.contains("clickhouse dedup query")
                    ),
                "at {:?} the sink's error is shown: {sink}",
                probe.at
            );
            assert_eq!(
                metric(&probe.metrics, "fanfinity_clickhouse_up"),
                Some(0.0),
                "at {:?}",
                probe.at
            );
        }
    }
    let last = probes.last().expect("at least one probe during the outage");
    let failures_during = metric(&last.metrics, "fanfinity_sink_insert_failures_total")
        .unwrap_or(0.0)
        - failures_before;
    assert!(
        failures_during >= 3.0,
        "/metrics counts the failed inserts ({failures_during} during the outage)"
    );

    // The metrics endpoint needs ClickHouse and says so.
    let answer = query_answer.expect("the metrics endpoint was asked during the outage");
    assert_eq!(answer.status, 503, "{}", answer.text());
    assert!(
        ["clickhouse_unavailable", "clickhouse_timeout"]
            .contains(&answer.json()["error"].as_str().unwrap_or_default()),
        "{}",
        answer.text()
    );
    assert!(answer.header("retry-after").is_some());

    // Every acknowledged event lands, exactly once after merges.
    let mut acked: Vec<String> = reports.iter().flat_map(|r| r.acked.clone()).collect();
    acked.sort();
    let drain_started = Instant::now();
    let stored = ch.wait_for_ids(&db, MATCH, acked.len(), DRAIN_LIMIT);
    let drained_after_restart = restarted.elapsed();
    let (missing, extra) = diff_sorted(&acked, &stored);
    assert!(
        missing.is_empty() && extra.is_empty(),
        "{} acknowledged ids missing (first: {:?}), {} stored ids never acknowledged \
         (first: {:?})",
        missing.len(),
        &missing[..missing.len().min(5)],
        extra.len(),
        &extra[..extra.len().min(5)]
    );
    let (rows, unique) = ch.count_and_unique(&db, MATCH);
    assert_eq!(
        unique as usize,
        acked.len(),
        "uniqExact(event_id) ({rows} rows)"
    );
    ch.query(&format!("OPTIMIZE TABLE {db}.events FINAL"));
    let (rows_merged, _) = ch.count_and_unique(&db, MATCH);
    assert_eq!(
        rows_merged as usize,
        acked.len(),
        "merges collapse redelivered copies ({rows} rows before)"
    );

    // Recovered: the sink reports ClickHouse up and clears its error.
    let readyz = eventually(
        Duration::from_secs(10),
        "/readyz to show the sink recovered",
        || {
            let body = server.get("/readyz").json();
            (body["sink"]["clickhouse"] == "up").then_some(body)
        },
    );
    assert_eq!(readyz["sink"]["retrying"], false, "{readyz}");
    assert!(readyz["sink"]["last_error"].is_null(), "{readyz}");
    let after = server.get("/metrics").text();
    assert_eq!(metric(&after, "fanfinity_clickhouse_up"), Some(1.0));
    let failures_total =
        metric(&after, "fanfinity_sink_insert_failures_total").unwrap_or(0.0) - failures_before;

    // The log, from the moment ClickHouse was stopped (read before the server stops: its
    // own shutdown revokes partitions):
    // - each failed attempt is logged with its wait, and each consumer's waits follow the
    //   backoff: 200 ms doubling to the 10 s cap (a wait of 200 ms again only starts a
    //   new batch's retries), and the cap is reached, since 200 + ... + 6400 ms is
    //   12.6 s < 30 s; a fixed 200 ms retry would instead log ~150 attempts, so at most
    //   30 are allowed;
    // - the consumer kept its partitions: no revoke or new assignment, no
    //   max.poll.interval.ms eviction.
    let log = std::fs::read(&server.log).expect("read the server log");
    let log = String::from_utf8_lossy(&log[(log_at_outage as usize).min(log.len())..]);
    let mut waits: BTreeMap<&str, Vec<u64>> = BTreeMap::new();
    for line in log
        .lines()
        .filter(|l| l.contains("batch write failed, retrying"))
    {
        let consumer = field(line, "consumer").unwrap_or("?");
        let wait = field(line, "retry_in_ms").and_then(|v| v.parse().ok());
        waits
            .entry(consumer)
            .or_default()
            .push(wait.unwrap_or_else(|| panic!("no retry_in_ms in {line}")));
    }
    // The main sink consumer holds rows during the outage; other writers (the retry-topic
    // consumer) have nothing to write, but if they do, each follows the same rule.
    let busiest = waits.values().map(Vec::len).max().unwrap_or(0);
    assert!(
        busiest >= 3,
        "the sink retried during the outage: {waits:?}"
    );
    for (consumer, waits) in &waits {
        assert!(
            waits.len() <= 30,
            "{consumer} retried with backoff, not in a tight loop: {waits:?}"
        );
        assert_eq!(waits[0], RETRY_MIN_MS, "{consumer}: {waits:?}");
        for pair in waits.windows(2) {
            let doubled = (pair[0] * 2).min(RETRY_MAX_MS);
            assert!(
                pair[1] == doubled || pair[1] == RETRY_MIN_MS,
                "{consumer}: backoff doubles up to its cap: {waits:?}"
            );
        }
        if waits.len() == busiest {
            assert_eq!(
                waits.iter().max(),
                Some(&RETRY_MAX_MS),
                "{consumer}: the backoff reached its cap: {waits:?}"
            );
        }
    }
    for evicted in [
        "partitions revoked",
        "partitions assigned",
        "max.poll.interval",
        "MAX_POLL_EXCEEDED",
        "consumer stopped",
    ] {
        let lines: Vec<&str> = log.lines().filter(|l| l.contains(evicted)).collect();
        assert!(
            lines.is_empty(),
            "the consumer left or lost its group during the outage ({evicted:?}): {lines:#?}"
        );
    }

    eprintln!(
        "clickhouse outage: {} events acknowledged by {} requests ({} during the outage, \
         {} refused); clickhouse stop took {stop_took:?}, outage {outage:?}; \
         {failures_total} failed inserts, waits {waits:?} ms; all stored {:?} after the \
         restart ({:?} waiting); {rows} rows before OPTIMIZE; scenario {:?}",
        acked.len(),
        reports.iter().map(|r| r.attempts.len()).sum::<usize>(),
        during.len(),
        refused.len(),
        drained_after_restart,
        drain_started.elapsed(),
        scenario.elapsed()
    );
    drop(server);
}

/// Starts one load client: a batch of numbered events with fresh ids every `PACE`, each
/// batch retried with the same ids until it is answered 202, as a well-behaved client
/// does, until `stop` is set. Attempts are tagged with the phase they were sent in.
fn start_client(
    addr: String,
    client: usize,
    phase: Arc<AtomicU8>,
    stop: Arc<AtomicBool>,
) -> JoinHandle<ClientReport> {
    std::thread::spawn(move || {
        let mut report = ClientReport::default();
        let mut next = Instant::now();
        let mut seq = 0u64;
        while !stop.load(Ordering::Relaxed) {
            std::thread::sleep(next.saturating_duration_since(Instant::now()));
            next = (next + PACE).max(Instant::now());

            let ids: Vec<String> = (0..EVENTS_PER_REQUEST).map(|_| new_id()).collect();
            let events: Vec<_> = ids
                .iter()
                .map(|id| {
                    seq += 1;
                    let mut e = event(id, MATCH, &format!("fan-{client}"), "cheer");
                    e["payload"] = json!({"client": client, "seq": seq});
                    e
                })
                .collect();
            let body = json!(events).to_string();
            if post_until_accepted(&addr, body.as_bytes(), &phase, &mut report.attempts) {
                report.acked.extend(ids);
            } else {
                report.unacked.extend(ids);
            }
        }
        report
    })
}

/// Posts `body` until it is answered 202 or `ATTEMPTS_PER_BATCH` attempts were made,
/// recording each attempt. Returns whether it was accepted.
fn post_until_accepted(
    addr: &str,
    body: &[u8],
    phase: &AtomicU8,
    attempts: &mut Vec<Attempt>,
) -> bool {
    let headers = [("Content-Type", "application/json")];
    for _ in 0..ATTEMPTS_PER_BATCH {
        let sent_in = phase.load(Ordering::Relaxed);
        let outcome = try_request(addr, "POST", "/v1/events", &headers, body)
            .map(|resp| {
                let code = serde_json::from_slice::<serde_json::Value>(&resp.body)
                    .ok()
                    .and_then(|v| v["error"].as_str().map(str::to_string));
                (resp.status, code)
            })
            .map_err(|err| err.to_string());
        let attempt = Attempt {
            phase: sent_in,
            outcome,
        };
        let accepted = attempt.accepted();
        attempts.push(attempt);
        if accepted {
            return true;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    false
}

/// The value of an unlabelled metric in Prometheus text.
fn metric(text: &str, name: &str) -> Option<f64> {
    text.lines().find_map(|line| {
        let (key, value) = line.split_once(' ')?;
        (key == name).then(|| value.trim().parse().ok()).flatten()
    })
}

/// The value of a `key=value` field in a text log line.
fn field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    line.split_whitespace()
        .find_map(|token| token.strip_prefix(key)?.strip_prefix('='))
}

/// Ids in `expected` but not in `actual`, and the other way round; both sorted.
fn diff_sorted<'a>(expected: &'a [String], actual: &'a [String]) -> (Vec<&'a str>, Vec<&'a str>) {
    let missing = expected
        .iter()
        .filter(|id| actual.binary_search(id).is_err())
        .map(String::as_str)
        .collect();
    let extra = actual
        .iter()
        .filter(|id| expected.binary_search(id).is_err())
        .map(String::as_str)
        .collect();
    (missing, extra)
}
