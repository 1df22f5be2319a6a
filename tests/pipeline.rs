//! End-to-end tests of the whole pipeline on the real local stack: HTTP -> Kafka
//! (Tansu) -> ClickHouse -> metrics endpoint. Run with `make test` (the stack must be
//! up: `make stack-up`).

#![cfg(feature = "stack-tests")]

mod common;

use std::time::{Duration, Instant};

use common::*;
use serde_json::json;

const LAND: Duration = Duration::from_secs(60);

#[test]
fn single_array_and_ndjson_posts_land_with_every_field() {
    let names = Names::new("fields");
    let server = Server::start("serve", &names, &brokers(), &[]);
    let m = "fields-m1";

    let single_id = new_id();
    let single = json!({
        "event_id": single_id, "match_id": m, "user_id": "fan-1", "type": "reaction",
        "ts": "2022-12-18T18:23:00+03:00", "team": "ARG", "payload": {"emoji": "🔥"}
    });
    let resp = server.post("application/json", single.to_string().as_bytes());
    assert_eq!(resp.status, 202, "{}", resp.text());
    assert_eq!(resp.json()["accepted"], 1);
    assert_eq!(resp.json()["event_ids"][0], single_id.as_str());

    let array = json!([event(&new_id(), m, "fan-2", "cheer"), {
        "match_id": m, "user_id": "fan-3", "type": "poll_vote", "ts": 1671376980000i64,
        "payload": {"poll_id": "motm", "option": "messi"}
    }]);
    let resp = server.post("application/json", array.to_string().as_bytes());
    assert_eq!(resp.status, 202, "{}", resp.text());
    let assigned = resp.json()["event_ids"][1]
        .as_str()
        .expect("server id")
        .to_string();
    assert_eq!(
        uuid::Uuid::parse_str(&assigned)
            .expect("uuid")
            .get_version_num(),
        7
    );

    let ndjson = format!(
        "{}\n{}\n",
        event(&new_id(), m, "fan-4", "share"),
        event(&new_id(), m, "fan-5", "view")
    );
    let resp = server.post("application/x-ndjson", ndjson.as_bytes());
    assert_eq!(resp.status, 202, "{}", resp.text());
    assert_eq!(resp.json()["accepted"], 2);

    let ids = wait_for_ids(&names, m, 5, LAND);
    assert_eq!(ids.len(), 5);
    assert!(ids.contains(&assigned));

    let row = clickhouse(&format!(
        "SELECT match_id, user_id, toString(event_type), team, client_ts_ms, \
         toUnixTimestamp(event_time), payload, received_at_ms > 0 \
         FROM {}.events WHERE event_id = toUUID('{single_id}') FORMAT TabSeparated",
        names.database
    ));
    let fields: Vec<&str> = row.trim_end().split('\t').collect();
    assert_eq!(
        fields,
        vec![
            m,
            "fan-1",
            "reaction",
            "ARG",
            "1671376980000",
            "1671376980",
            r#"{"emoji":"🔥"}"#,
            "1"
        ]
    );
    drop(server);
    drop_database(&names);
}

#[test]
fn one_invalid_event_rejects_the_whole_batch() {
    let names = Names::new("allornothing");
    let server = Server::start("serve", &names, &brokers(), &[]);
    let m = "aon-m1";

    let good: Vec<String> = (0..3).map(|_| new_id()).collect();
    let batch = json!([
        event(&good[0], m, "fan-1", "cheer"),
        {"event_id": good[1], "match_id": "bad match id", "user_id": "fan-2", "type": "cheer"},
        event(&good[2], m, "fan-3", "nonsense"),
    ]);
    let resp = server.post("application/json", batch.to_string().as_bytes());
    assert_eq!(resp.status, 400);
    let body = resp.json();
    assert_eq!(body["error"], "invalid_events");
    assert_eq!(body["invalid_events"], 2);
    let listed: Vec<(u64, String)> = body["details"]
        .as_array()
        .expect("details")
        .iter()
        .map(|d| {
            (
                d["index"].as_u64().unwrap_or(99),
                d["field"].as_str().unwrap_or("").to_string(),
            )
        })
        .collect();
    assert_eq!(
        listed,
        vec![(1, "match_id".to_string()), (2, "type".to_string())]
    );

    // A later valid event proves the sink ran past where the batch would have been.
    let marker = new_id();
    let resp = server.post(
        "application/json",
        event(&marker, m, "fan-9", "view").to_string().as_bytes(),
    );
    assert_eq!(resp.status, 202);
    let ids = wait_for_ids(&names, m, 1, LAND);
    assert_eq!(ids, vec![marker], "only the marker may be stored");
    drop(server);
    drop_database(&names);
}

#[test]
fn errors_are_precise_4xx_with_json_bodies() {
    let names = Names::new("errors");
    let server = Server::start("ingest", &names, &brokers(), &["http.max_body_bytes=2000"]);

    let too_big = vec![b' '; 5000];
    let cases: Vec<(u16, &str, Response)> = vec![
        (
            413,
            "payload_too_large",
            server.post("application/json", &too_big),
        ),
        (
            415,
            "unsupported_media_type",
            server.post("text/xml", b"<e/>"),
        ),
        (
            415,
            "unsupported_media_type",
            request(&server.addr(), "POST", "/v1/events", &[], b"{}"),
        ),
        (
            400,
            "malformed_json",
            server.post("application/json", b"{\"match_id\": "),
        ),
        (
            400,
            "malformed_json",
            server.post("application/x-ndjson", b"{}\n{nope}\n"),
        ),
        (400, "empty_body", server.post("application/json", b"")),
        (400, "no_events", server.post("application/json", b"[]")),
        (404, "not_found", server.get("/v2/nothing")),
        (405, "method_not_allowed", server.get("/v1/events")),
        (
            400,
            "invalid_parameter",
            server.get("/v1/matches/m1/metrics?bucket=7x"),
        ),
    ];
    for (status, code, resp) in cases {
        assert_eq!(resp.status, status, "{code}: {}", resp.text());
        assert_eq!(resp.header("content-type"), Some("application/json"));
        let body = resp.json();
        assert_eq!(body["error"], code, "{}", resp.text());
        assert!(body["message"].as_str().is_some_and(|m| !m.is_empty()));
    }
    drop(server);
    drop_database(&names);
}

#[test]
fn metrics_endpoint_matches_the_events_posted() {
    let names = Names::new("metrics");
    let server = Server::start("serve", &names, &brokers(), &[]);
    let m = "metrics-m1";
    let kickoff_ms: i64 = 1_671_375_600_000; // 2022-12-18T15:00:00Z

    // Minute 0: 3 cheers by 2 fans. Minute 23: 5 goal celebrations by 5 fans, 1 view.
    let mut events = vec![];
    for (minute, kind, user) in [
        (0, "cheer", "a"),
        (0, "cheer", "a"),
        (0, "cheer", "b"),
        (23, "goal_celebration", "a"),
        (23, "goal_celebration", "c"),
        (23, "goal_celebration", "d"),
        (23, "goal_celebration", "e"),
        (23, "goal_celebration", "f"),
        (23, "view", "a"),
    ] {
        let mut e = event(&new_id(), m, user, kind);
        e["ts"] = json!(kickoff_ms + minute * 60_000 + 5_000);
        events.push(e);
    }
    let resp = server.post("application/json", json!(events).to_string().as_bytes());
    assert_eq!(resp.status, 202, "{}", resp.text());

    // The same event sent again (a client retry) must not count twice: the sink drops
    // it before the insert (sink::dedup), so the aggregates never see it.
    wait_for_ids(&names, m, 9, LAND);
    let again = server.post(
        "application/json",
        json!([events[0]]).to_string().as_bytes(),
    );
    assert_eq!(again.status, 202);
    eventually(LAND, "the retried copy to be dropped", || {
        let metrics = server.get("/metrics").text();
        metrics
            .contains("fanfinity_sink_duplicates_dropped_total{reason=\"resent\"} 1")
            .then_some(())
    });
    let rows = clickhouse(&format!(
        "SELECT count() FROM {}.events WHERE match_id = '{m}' FORMAT TabSeparated",
        names.database
    ));
    assert_eq!(rows.trim(), "9");

    let body = server
        .get(&format!("/v1/matches/{m}/metrics?bucket=60s"))
        .json();
    assert_eq!(body["total_events"], 9);
    assert_eq!(body["unique_fans"], 6);
    assert_eq!(body["by_type"]["cheer"], 3);
    assert_eq!(body["by_type"]["goal_celebration"], 5);
    assert_eq!(body["by_type"]["view"], 1);
    assert_eq!(body["by_type"]["chat"], 0);
    let timeline = body["timeline"].as_array().expect("timeline");
    assert_eq!(timeline.len(), 2);
    assert_eq!(timeline[0]["t"], kickoff_ms);
    assert_eq!(timeline[0]["events"], 3);
    assert_eq!(timeline[1]["t"], kickoff_ms + 23 * 60_000);
    assert_eq!(timeline[1]["events"], 6);
    assert!(body["newest_received_at_ms"]
        .as_i64()
        .is_some_and(|t| t > kickoff_ms));

    // A window holding only minute 23.
    let from = kickoff_ms + 10 * 60_000;
    let windowed = server
        .get(&format!(
            "/v1/matches/{m}/metrics?from={from}&to=2022-12-18T16:00:00Z&bucket=1m"
        ))
        .json();
    assert_eq!(windowed["total_events"], 6);
    assert_eq!(windowed["by_type"]["cheer"], 0);

    let unknown = server.get("/v1/matches/no-such-match/metrics");
    assert_eq!(unknown.status, 404);
    assert_eq!(unknown.json()["error"], "unknown_match");
    drop(server);
    drop_database(&names);
}

#[test]
fn consumer_restart_resumes_without_loss() {
    let names = Names::new("restart");
    let ingest = Server::start("ingest", &names, &brokers(), &[]);
    let mut consumer = Server::start("consume", &names, &brokers(), &[]);
    let m = "restart-m1";

    let post_batch = |n: usize| -> Vec<String> {
        let ids: Vec<String> = (0..n).map(|_| new_id()).collect();
        let events: Vec<_> = ids.iter().map(|id| event(id, m, "fan", "cheer")).collect();
        let resp = ingest.post("application/json", json!(events).to_string().as_bytes());
        assert_eq!(resp.status, 202, "{}", resp.text());
        ids
    };

    let mut sent = post_batch(200);
    wait_for_ids(&names, m, 200, LAND);

    consumer.kill9();
    sent.extend(post_batch(300));
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(
        stored_ids(&names.database, m).len(),
        200,
        "nothing is consumed while down"
    );

    consumer.spawn();
    sent.extend(post_batch(100));
    let stored = wait_for_ids(&names, m, 600, LAND);
    sent.sort();
    assert_eq!(stored, sent, "every acknowledged event, once");
    drop(consumer);
    drop(ingest);
    drop_database(&names);
}

#[test]
fn answers_503_while_the_broker_is_down_and_recovers() {
    let names = Names::new("brokerdown");
    let port = free_port();
    let brokers = format!("127.0.0.1:{port}");
    let mut broker = PrivateBroker::memory(port);
    let server = Server::start("ingest", &names, &brokers, &[]);
    let m = "down-m1";
    let one = || event(&new_id(), m, "fan", "cheer").to_string();

    let resp = server.post("application/json", one().as_bytes());
    assert_eq!(resp.status, 202, "{}", resp.text());

    broker.kill9();
    // Within a bounded time every answer is a 503 with Retry-After, never a 202.
    let refused = eventually(
        Duration::from_secs(30),
        "a 503 after the broker stopped",
        || {
            let started = Instant::now();
            let resp = server.post("application/json", one().as_bytes());
            assert!(
                started.elapsed() < Duration::from_secs(8),
                "answer took {:?}",
                started.elapsed()
            );
            (resp.status == 503).then_some(resp)
        },
    );
    assert!(refused.header("retry-after").is_some());
    assert!(matches!(
        refused.json()["error"].as_str(),
        Some("kafka_unavailable" | "delivery_failed" | "delivery_timeout")
    ));
    eventually(Duration::from_secs(15), "/readyz to fail", || {
        (server.get("/readyz").status == 503).then_some(())
    });
    let fast = Instant::now();
    let resp = server.post("application/json", one().as_bytes());
    assert_eq!(resp.status, 503);
    assert!(
        fast.elapsed() < Duration::from_millis(200),
        "known-down answer took {:?}",
        fast.elapsed()
    );

    // The memory broker lost its topics with its process: recreate them, as an operator
    // would with `fanfinity topics create`.
    broker.start();
    let mut args = vec!["topics".to_string(), "create".to_string()];
    for set in names.settings(&brokers) {
        args.push("--set".into());
        args.push(set);
    }
    let status = std::process::Command::new(env!("CARGO_BIN_EXE_fanfinity"))
        .args(&args)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .status()
        .expect("run fanfinity topics create");
    assert!(status.success());

    eventually(
        Duration::from_secs(60),
        "a 202 after the broker returned",
        || (server.post("application/json", one().as_bytes()).status == 202).then_some(()),
    );
    server.wait_ready(Duration::from_secs(30));
    drop(server);
    drop_database(&names);
}
