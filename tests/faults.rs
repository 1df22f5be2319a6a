//! Fault tests: inject one fault, let the system recover, and check that ClickHouse holds
//! every acknowledged event exactly once and that what cannot be stored is kept, with the
//! reason, in the dead-letter topic. Real services only (`make stack-up`).

#![cfg(feature = "stack-tests")]

mod common;

// Longer scenarios, one file each under tests/faults/.
#[path = "faults/clickhouse_outage.rs"]
mod clickhouse_outage;
#[path = "faults/sigterm_under_load.rs"]
mod sigterm_under_load;

use std::time::Duration;

use common::*;
use serde_json::json;

const LAND: Duration = Duration::from_secs(60);

fn post_ok(server: &Server, events: &[serde_json::Value]) {
    let resp = server.post("application/json", json!(events).to_string().as_bytes());
    assert_eq!(resp.status, 202, "{}", resp.text());
}

fn count_and_unique(names: &Names, match_id: &str) -> (u64, u64) {
    let text = clickhouse(&format!(
        "SELECT count(), uniqExact(event_id) FROM {}.events WHERE match_id = '{match_id}' \
         FORMAT TabSeparated",
        names.database
    ));
    let mut parts = text
        .split_whitespace()
        .map(|p| p.parse::<u64>().unwrap_or(u64::MAX));
    (parts.next().unwrap_or(0), parts.next().unwrap_or(0))
}

#[test]
fn poison_messages_on_the_topic_are_dead_lettered_and_the_rest_is_stored() {
    let names = Names::new("poison");
    let server = Server::start("serve", &names, &brokers(), &[]);
    let m = "poison-m1";
    let topic = format!("{}.events", names.prefix);

    let before: Vec<String> = (0..20).map(|_| new_id()).collect();
    post_ok(
        &server,
        &before
            .iter()
            .map(|id| event(id, m, "fan", "cheer"))
            .collect::<Vec<_>>(),
    );
    let wrong_schema = json!({"match_id": m, "user_id": "x"}).to_string();
    produce_raw(
        &brokers(),
        &topic,
        &[(m, b"\x00not json at all"), (m, wrong_schema.as_bytes())],
    );
    let after: Vec<String> = (0..20).map(|_| new_id()).collect();
    post_ok(
        &server,
        &after
            .iter()
            .map(|id| event(id, m, "fan", "view"))
            .collect::<Vec<_>>(),
    );

    let mut expected: Vec<String> = before.into_iter().chain(after).collect();
    expected.sort();
    let stored = wait_for_ids(&names, m, 40, LAND);
    assert_eq!(
        stored, expected,
        "the partition moved past the poison, nothing else lost"
    );

    let dead = read_topic(&brokers(), &format!("{topic}.dead"), 2, LAND);
    assert_eq!(dead.len(), 2, "both poison records dead-lettered");
    assert_eq!(dead[0].payload, b"\x00not json at all");
    assert_eq!(dead[1].payload, wrong_schema.as_bytes());
    for letter in &dead {
        assert!(letter
            .header("fanfinity-reason")
            .is_some_and(|r| r.contains("not a valid event")));
        assert_eq!(
            letter.header("fanfinity-source-topic"),
            Some(topic.as_str())
        );
        assert!(letter.header("fanfinity-source-offset").is_some());
        assert_eq!(letter.key.as_deref(), Some(m.as_bytes()));
    }
    let metrics = server.get("/metrics").text();
    assert!(
        metrics.contains("fanfinity_sink_dead_letters_total 2"),
        "{metrics}"
    );
    drop(server);
    drop_database(&names);
}

/// Starts a server, lets the sink create the table, then makes ClickHouse refuse every
/// row whose user is `poison-pill` (a `throwIf` default), and posts 50 events of which
/// the 18th is such a row. Returns the server, the 50 ids and the warm-up id.
fn post_with_one_refused_row(
    names: &Names,
    m: &str,
    extra: &[&str],
) -> (Server, Vec<String>, String) {
    let server = Server::start("serve", names, &brokers(), extra);
    let warmup = new_id();
    post_ok(&server, &[event(&warmup, m, "fan-0", "view")]);
    wait_for_ids(names, m, 1, LAND);
    clickhouse(&format!(
        "ALTER TABLE {}.events ADD COLUMN poison UInt8 DEFAULT throwIf(user_id = 'poison-pill')",
        names.database
    ));
    let ids: Vec<String> = (0..50).map(|_| new_id()).collect();
    let mut events: Vec<_> = ids.iter().map(|id| event(id, m, "fan", "cheer")).collect();
    events[17]["user_id"] = json!("poison-pill");
    post_ok(&server, &events);
    (server, ids, warmup)
}

fn cure_poison(names: &Names) {
    clickhouse(&format!(
        "ALTER TABLE {}.events DROP COLUMN poison",
        names.database
    ));
}

/// Runs a one-shot `fanfinity` subcommand (e.g. `dead list`) with the test's names and
/// returns its standard output; panics with stderr if it fails.
fn run_cli(names: &Names, args: &[&str]) -> String {
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_fanfinity"));
    command.args(args);
    for set in names.settings(&brokers()) {
        command.arg("--set").arg(set);
    }
    let out = command.output().expect("run fanfinity");
    assert!(
        out.status.success(),
        "fanfinity {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn a_refused_row_waits_on_the_retry_topic_and_is_stored_once_the_cause_is_fixed() {
    let names = Names::new("retried");
    let m = "retried-m1";
    let (server, ids, warmup) = post_with_one_refused_row(
        &names,
        m,
        &[
            "sink.retry_topic_delay_ms=3000",
            "sink.retry_topic_delay_max_ms=3000",
        ],
    );
    let topic = format!("{}.events", names.prefix);

    // The other 49 are stored at once: one bad row holds nothing back. The bisection
    // found the bad row before the last half went in, so the refusal has happened; fix
    // the cause now, well before the first retry is due.
    wait_for_ids(&names, m, 50, LAND);
    cure_poison(&names);
    let retry = read_topic(&brokers(), &format!("{topic}.retry"), 1, LAND);
    assert_eq!(retry.len(), 1);
    let letter = &retry[0];
    let record: serde_json::Value = serde_json::from_slice(&letter.payload).expect("original");
    assert_eq!(record["event_id"], ids[17].as_str());
    assert_eq!(
        letter.key.as_deref(),
        Some(m.as_bytes()),
        "keyed by match id"
    );
    assert_eq!(letter.header("fanfinity-attempt"), Some("1"));
    assert_eq!(
        letter.header("fanfinity-source-topic"),
        Some(topic.as_str())
    );
    assert!(letter.header("fanfinity-source-offset").is_some());
    assert!(letter.header("fanfinity-source-partition").is_some());
    let first = letter.header("fanfinity-first-error").unwrap_or_default();
    assert!(
        first.contains("395") || first.contains("throwIf"),
        "{first}"
    );
    let number = |name: &str| -> i64 {
        letter
            .header(name)
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    };
    let wait = number("fanfinity-next-attempt-at-ms") - number("fanfinity-failed-at-ms");
    assert!(
        (2_900..=3_100).contains(&wait),
        "due 3 s after the refusal: {wait}"
    );

    // Fixed before the next attempt: the retry consumer stores it, nothing goes dead.
    let mut expected: Vec<String> = ids.iter().cloned().chain([warmup]).collect();
    expected.sort();
    assert_eq!(wait_for_ids(&names, m, 51, LAND), expected);
    let dead = read_topic(
        &brokers(),
        &format!("{topic}.dead"),
        1,
        Duration::from_secs(3),
    );
    assert!(dead.is_empty(), "{dead:?}");
    let metrics = server.get("/metrics").text();
    assert!(
        metrics.contains("fanfinity_sink_retried_rows_stored_total 1"),
        "{metrics}"
    );
    assert_eq!(count_and_unique(&names, m), (51, 51));
    drop(server);
    drop_database(&names);
}

#[test]
fn a_row_refused_on_every_attempt_is_dead_lettered_with_its_history_and_replayable() {
    let names = Names::new("exhausted");
    let m = "exhausted-m1";
    let (server, ids, _) = post_with_one_refused_row(
        &names,
        m,
        &[
            "sink.retry_topic_attempts=2",
            "sink.retry_topic_delay_ms=300",
            "sink.retry_topic_delay_max_ms=600",
        ],
    );
    let topic = format!("{}.events", names.prefix);
    wait_for_ids(&names, m, 50, LAND);

    // Refused by the main sink, then twice from the retry topic: dead after 3.
    let dead = read_topic(&brokers(), &format!("{topic}.dead"), 1, LAND);
    assert_eq!(dead.len(), 1);
    let letter = &dead[0];
    let record: serde_json::Value = serde_json::from_slice(&letter.payload).expect("original");
    assert_eq!(record["event_id"], ids[17].as_str());
    assert_eq!(letter.header("fanfinity-attempts"), Some("3"));
    assert_eq!(
        letter.header("fanfinity-source-topic"),
        Some(topic.as_str())
    );
    let reason = letter.header("fanfinity-reason").unwrap_or_default();
    assert!(reason.contains("3 times"), "{reason}");
    assert!(
        reason.contains("395") || reason.contains("throwIf"),
        "{reason}"
    );
    assert!(letter.header("fanfinity-first-error").is_some());
    let hops = read_topic(&brokers(), &format!("{topic}.retry"), 2, LAND);
    let attempts: Vec<_> = hops.iter().map(|h| h.header("fanfinity-attempt")).collect();
    assert_eq!(attempts, vec![Some("1"), Some("2")]);

    // An operator lists it, fixes the cause and replays it: stored, once.
    let listed = run_cli(&names, &["dead", "list", "--match", m]);
    let entries: Vec<serde_json::Value> = listed
        .lines()
        .map(|l| serde_json::from_str(l).expect("one JSON object per line"))
        .collect();
    assert_eq!(entries.len(), 1, "{listed}");
    assert_eq!(entries[0]["attempts"], "3");
    assert!(entries[0]["payload"]
        .as_str()
        .unwrap_or_default()
        .contains(&ids[17]));
    cure_poison(&names);
    let replayed = run_cli(&names, &["dead", "replay", "--match", m]);
    assert!(replayed.contains("replayed 1"), "{replayed}");
    wait_for_ids(&names, m, 51, LAND);
    assert_eq!(count_and_unique(&names, m), (51, 51));
    drop(server);
    drop_database(&names);
}

#[test]
fn an_event_posted_three_times_counts_once() {
    let names = Names::new("thrice");
    let server = Server::start("serve", &names, &brokers(), &[]);
    let m = "thrice-m1";
    let id = new_id();
    for _ in 0..3 {
        post_ok(&server, &[event(&id, m, "fan", "goal_celebration")]);
    }
    // The sink drops the two resends before inserting (sink::dedup): the aggregates
    // count every inserted row.
    eventually(LAND, "the two resends to be dropped", || {
        let metrics = server.get("/metrics").text();
        metrics
            .contains("fanfinity_sink_duplicates_dropped_total{reason=\"resent\"} 2")
            .then_some(())
    });
    assert_eq!(count_and_unique(&names, m), (1, 1), "one row, no copies");
    let metrics = server.get(&format!("/v1/matches/{m}/metrics")).json();
    assert_eq!(metrics["total_events"], 1);
    assert_eq!(metrics["by_type"]["goal_celebration"], 1);

    clickhouse(&format!("OPTIMIZE TABLE {}.events FINAL", names.database));
    assert_eq!(
        count_and_unique(&names, m),
        (1, 1),
        "still one row after a merge"
    );
    drop(server);
    drop_database(&names);
}

/// Posts `batches` batches of `size` numbered events from one thread, as fast as answers
/// come, and returns the ids answered 202. Stops early when `stop` is set; refused or
/// failed requests are not retried (their ids are simply not acknowledged).
fn post_until(
    addr: String,
    match_id: &'static str,
    batches: usize,
    size: usize,
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
) -> std::thread::JoinHandle<Vec<String>> {
    std::thread::spawn(move || {
        let mut acked = Vec::new();
        for _ in 0..batches {
            if stop.load(std::sync::atomic::Ordering::Relaxed) {
                break;
            }
            let ids: Vec<String> = (0..size).map(|_| new_id()).collect();
            let body = json!(ids
                .iter()
                .map(|id| event(id, match_id, "fan", "cheer"))
                .collect::<Vec<_>>());
            let headers = [("Content-Type", "application/json")];
            match try_request(
                &addr,
                "POST",
                "/v1/events",
                &headers,
                body.to_string().as_bytes(),
            ) {
                Ok(resp) if resp.status == 202 => acked.extend(ids),
                _ => std::thread::sleep(Duration::from_millis(20)),
            }
        }
        acked
    })
}

#[test]
fn kill_9_of_fanfinity_mid_load_loses_no_acknowledged_event() {
    let names = Names::new("kill9");
    let mut server = Server::start("serve", &names, &brokers(), &[]);
    let m = "kill9-m1";
    let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let load: Vec<_> = (0..2)
        .map(|_| post_until(server.addr(), m, 400, 20, stop.clone()))
        .collect();

    // Kill it while requests are in flight and the sink holds an uncommitted batch.
    std::thread::sleep(Duration::from_millis(1500));
    server.kill9();
    stop.store(true, std::sync::atomic::Ordering::Relaxed);
    let mut acked: Vec<String> = load
        .into_iter()
        .flat_map(|h| h.join().expect("load thread"))
        .collect();
    assert!(
        acked.len() > 100,
        "the load ran before the kill ({} acked)",
        acked.len()
    );

    server.spawn();
    server.wait_ready(Duration::from_secs(60));
    acked.sort();
    let stored = eventually(LAND, "every acknowledged event after the restart", || {
        let stored = stored_ids(&names.database, m);
        acked
            .iter()
            .all(|id| stored.binary_search(id).is_ok())
            .then_some(stored)
    });
    // Events whose 202 was lost with the process may also be stored; none may be missing.
    assert!(stored.len() >= acked.len());
    let (_, unique) = count_and_unique(&names, m);
    assert_eq!(unique as usize, stored.len(), "each id counted once");
    drop(server);
    drop_database(&names);
}

#[test]
fn consumer_killed_right_after_an_insert_counts_each_event_once() {
    let names = Names::new("insertcommit");
    let ingest = Server::start("ingest", &names, &brokers(), &[]);
    // A long flush interval makes the whole batch one insert; auto-commit follows within
    // a second, and the kill lands inside that window.
    let mut consumer = Server::start(
        "consume",
        &names,
        &brokers(),
        &["sink.flush_interval_ms=3000"],
    );
    let m = "insertcommit-m1";
    let ids: Vec<String> = (0..300).map(|_| new_id()).collect();
    post_ok(
        &ingest,
        &ids.iter()
            .map(|id| event(id, m, "fan", "share"))
            .collect::<Vec<_>>(),
    );

    wait_for_ids(&names, m, 1, LAND);
    consumer.kill9();
    consumer.spawn();

    let mut expected = ids.clone();
    expected.sort();
    let stored = wait_for_ids(&names, m, 300, LAND);
    assert_eq!(stored, expected);
    // The redelivered batch may be stored twice until merged; it counts once.
    std::thread::sleep(Duration::from_secs(5));
    let (rows, unique) = count_and_unique(&names, m);
    assert_eq!(unique, 300, "{rows} rows");
    clickhouse(&format!("OPTIMIZE TABLE {}.events FINAL", names.database));
    assert_eq!(count_and_unique(&names, m), (300, 300));
    drop(consumer);
    drop(ingest);
    drop_database(&names);
}

#[test]
fn a_shard_at_its_in_flight_limit_answers_503_at_once_and_recovers() {
    use std::io::{Read, Write};
    let names = Names::new("inflight");
    let server = Server::start(
        "ingest",
        &names,
        &brokers(),
        &["http.shards=1", "http.max_inflight_requests=1"],
    );
    let m = "inflight-m1";
    let body = json!([event(&new_id(), m, "fan", "cheer")]).to_string();

    // A slow client holds the shard's only permit by sending half its body.
    let mut slow = std::net::TcpStream::connect(server.addr()).expect("connect");
    let head = format!(
        "POST /v1/events HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    slow.write_all(head.as_bytes()).expect("send head");
    slow.write_all(&body.as_bytes()[..body.len() / 2])
        .expect("send half");
    std::thread::sleep(Duration::from_millis(300));

    let started = std::time::Instant::now();
    let refused = server.post("application/json", body.as_bytes());
    assert_eq!(refused.status, 503, "{}", refused.text());
    assert_eq!(refused.json()["error"], "overloaded");
    assert!(refused.header("retry-after").is_some());
    assert!(
        started.elapsed() < Duration::from_millis(500),
        "{:?}",
        started.elapsed()
    );

    slow.write_all(&body.as_bytes()[body.len() / 2..])
        .expect("send rest");
    let mut raw = Vec::new();
    slow.read_to_end(&mut raw).expect("read answer");
    assert_eq!(parse_response(&raw).expect("answer").status, 202);

    let again = server.post("application/json", body.as_bytes());
    assert_eq!(again.status, 202, "the permit came back: {}", again.text());
    drop(server);
    drop_database(&names);
}

/// Posts numbered batches like a well-behaved client: a 503 or a failed request is retried
/// with the same event ids until it gets 202 (bounded), pausing `pace` between batches.
/// Returns the ids answered 202 and how many attempts were refused.
fn post_retrying(
    addr: String,
    match_id: &'static str,
    batches: usize,
    size: usize,
    pace: Duration,
) -> std::thread::JoinHandle<(Vec<String>, usize)> {
    std::thread::spawn(move || {
        let mut acked = Vec::new();
        let mut refused = 0;
        // Bounded: a broker that never comes back fails the test in 2 minutes.
        let deadline = std::time::Instant::now() + Duration::from_secs(120);
        for _ in 0..batches {
            if std::time::Instant::now() > deadline {
                break;
            }
            std::thread::sleep(pace);
            let ids: Vec<String> = (0..size).map(|_| new_id()).collect();
            let body = json!(ids
                .iter()
                .map(|id| event(id, match_id, "fan", "cheer"))
                .collect::<Vec<_>>())
            .to_string();
            let headers = [("Content-Type", "application/json")];
            for _attempt in 0..200 {
                if std::time::Instant::now() > deadline {
                    break;
                }
                match try_request(&addr, "POST", "/v1/events", &headers, body.as_bytes()) {
                    Ok(resp) if resp.status == 202 => {
                        acked.extend(ids.iter().cloned());
                        break;
                    }
                    _ => {
                        refused += 1;
                        std::thread::sleep(Duration::from_millis(100));
                    }
                }
            }
        }
        (acked, refused)
    })
}

#[test]
fn durable_broker_killed_under_load_loses_no_acknowledged_event() {
    let names = Names::new("durable");
    let port = free_port();
    let brokers = format!("127.0.0.1:{port}");
    let mut broker = PrivateBroker::durable(port, &names.database);
    let server = Server::start("serve", &names, &brokers, &[]);
    let m = "durable-m1";

    // Let every producer of the process (ingest, and the sink's retry and dead-letter
    // writers, which start with the sink) get its producer id first: Tansu 0.6.0's
    // sqlite store panics ("more or less than one row" in its idempotence check) when an
    // id handed out just before a kill -9 is used after the restart, and then refuses
    // every request. That is the broker's bug, not the fault under test.
    // Known shortcoming: the same store can also panic in its group coordinator after the
    // restart ("more or less than one row" in `update_group`, on a heartbeat of the sink's
    // consumer group), and then refuses every produce: seen once in 3 CI runs on
    // 2026-12-05 (this test then fails with most batches unacknowledged). No warm-up
    // avoids it; the broker's log is kept in target/test-logs/tansu-<port>.log.
    let warmup = new_id();
    post_ok(&server, &[event(&warmup, m, "fan", "view")]);
    wait_for_ids(&names, m, 1, LAND);

    // About 8 s of load; the broker is down from second 2 to second 5.
    let pace = Duration::from_millis(40);
    let load: Vec<_> = (0..2)
        .map(|_| post_retrying(server.addr(), m, 150, 20, pace))
        .collect();
    std::thread::sleep(Duration::from_secs(2));
    broker.kill9();
    std::thread::sleep(Duration::from_secs(3));
    broker.start();

    let results: Vec<_> = load.into_iter().map(|h| h.join().expect("load")).collect();
    let refused: usize = results.iter().map(|(_, r)| r).sum();
    let mut acked: Vec<String> = results.into_iter().flat_map(|(ids, _)| ids).collect();
    acked.push(warmup);
    assert!(refused > 0, "the outage hit the load");
    assert_eq!(
        acked.len(),
        2 * 150 * 20 + 1,
        "every batch got its 202 after the broker returned"
    );
    acked.sort();
    let stored = wait_for_ids(&names, m, acked.len(), Duration::from_secs(120));
    assert_eq!(
        stored, acked,
        "each acknowledged event stored, nothing else"
    );
    let (_, unique) = count_and_unique(&names, m);
    assert_eq!(unique as usize, acked.len());
    drop(server);
    drop_database(&names);
}
