//! The aggregates of migration 2 stay equal to direct counts over the raw `events` table
//! when the sink sees the same event more than once: a batch inserted again with the same
//! Kafka positions, a client resend under a new offset, a repeat inside one batch, and a
//! whole topic consumed again by a fresh consumer group. Runs on the real local stack
//! (`make stack-up`); every database is `dedup_*` and dropped at the end.

#![cfg(feature = "stack-tests")]

mod common;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use common::*;
use fanfinity::app::config::ClickHouseConfig;
use fanfinity::sink::bisect::insert_around_refusals;
use fanfinity::sink::dedup::Dedup;
use fanfinity::sink::migrate;
use fanfinity::sink::row::EventRow;
use fanfinity::sink::status::SinkStatus;
use fanfinity::sink::writer::BatchWriter;
use serde_json::json;
use uuid::Uuid;

const LAND: Duration = Duration::from_secs(60);

/// Names private to one test, with the `dedup_` prefix.
fn dedup_names(test: &str) -> Names {
    let base = Names::new(test);
    let tag = base.database.trim_start_matches("t_").to_string();
    Names {
        prefix: format!("dedup.{tag}"),
        database: format!("dedup_{tag}"),
    }
}

/// Drops the test's database when the test ends, failed or not.
struct DropDatabase<'a>(&'a Names);

impl Drop for DropDatabase<'_> {
    fn drop(&mut self) {
        drop_database(self.0);
    }
}

/// A database of its own, migrated, and a writer into it.
fn migrated(names: &Names) -> (ClickHouseConfig, BatchWriter) {
    let config = ClickHouseConfig {
        url: clickhouse_url(),
        database: names.database.clone(),
        ..ClickHouseConfig::default()
    };
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    runtime
        .block_on(migrate::run(&config))
        .expect("migrations apply");
    let writer = BatchWriter::new(&config).expect("batch writer");
    (config, writer)
}

/// Builds rows of every kind the views read: reactions with emoji, poll votes, cheers.
struct Rows {
    match_id: String,
    next: u32,
}

impl Rows {
    fn new(match_id: &str) -> Self {
        Self {
            match_id: match_id.into(),
            next: 0,
        }
    }

    fn row(&mut self, partition: i32, offset: i64) -> EventRow {
        let n = self.next;
        self.next += 1;
        let now_ms = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as i64);
        let (event_type, payload) = match n % 3 {
            0 => (
                1,
                format!(r#"{{"emoji":"{}"}}"#, ["🔥", "⚽", "👏"][n as usize % 3]),
            ),
            1 => (4, format!(r#"{{"poll_id":"motm","option":"p{}"}}"#, n % 4)),
            _ => (2, String::new()),
        };
        EventRow {
            event_id: Uuid::new_v4(),
            match_id: self.match_id.clone(),
            user_id: format!("fan-{}", n % 7),
            event_type,
            team: ["ARG", "FRA", ""][n as usize % 3].into(),
            client_ts_ms: None,
            event_time: 1_671_376_980 + n % 45,
            received_at: (now_ms / 1000) as u32,
            received_at_ms: now_ms,
            payload,
            kafka_partition: partition,
            kafka_offset: offset,
        }
    }
}

/// One sink consumer's path: dedup, then insert around refusals (there are none).
fn sink(writer: &BatchWriter, dedup: &mut Dedup, status: &SinkStatus, rows: &[EventRow]) {
    let refused =
        insert_around_refusals(writer, dedup, status, rows, "test").expect("batch written");
    assert!(refused.is_empty(), "{refused:?}");
}

fn query(sql: &str) -> String {
    clickhouse(&format!("{sql} FORMAT TabSeparated"))
}

/// Each aggregate beside the same figure counted over the raw table: `(what, from the
/// aggregate, from events)`.
fn aggregates_and_direct_counts(db: &str) -> Vec<(&'static str, String, String)> {
    let bucket = "toDateTime(intDiv(toUInt32(event_time), 10) * 10)";
    vec![
        (
            "event_counts",
            query(&format!(
                "SELECT match_id, second, event_type, team, countMerge(events) \
                 FROM {db}.event_counts GROUP BY match_id, second, event_type, team \
                 ORDER BY match_id, second, event_type, team"
            )),
            query(&format!(
                "SELECT match_id, event_time, event_type, team, uniqExact(event_id) \
                 FROM {db}.events GROUP BY match_id, event_time, event_type, team \
                 ORDER BY match_id, event_time, event_type, team"
            )),
        ),
        (
            "event_counts total",
            query(&format!(
                "SELECT sum(n) FROM (SELECT countMerge(events) AS n FROM {db}.event_counts \
                 GROUP BY match_id, second, event_type, team)"
            )),
            query(&format!("SELECT uniqExact(event_id) FROM {db}.events")),
        ),
        (
            "fan_counts",
            query(&format!(
                "SELECT match_id, minute, user_id, sum(events) FROM {db}.fan_counts \
                 GROUP BY match_id, minute, user_id ORDER BY match_id, minute, user_id"
            )),
            query(&format!(
                "SELECT match_id, toStartOfMinute(event_time) AS minute, user_id, \
                 uniqExact(event_id) FROM {db}.events GROUP BY match_id, minute, user_id \
                 ORDER BY match_id, minute, user_id"
            )),
        ),
        (
            "reaction_counts",
            query(&format!(
                "SELECT match_id, bucket, emoji, sum(events) FROM {db}.reaction_counts \
                 GROUP BY match_id, bucket, emoji ORDER BY match_id, bucket, emoji"
            )),
            query(&format!(
                "SELECT match_id, {bucket} AS b, \
                 substringUTF8(visitParamExtractString(payload, 'emoji'), 1, 32) AS e, \
                 uniqExact(event_id) FROM {db}.events \
                 WHERE event_type = 'reaction' AND e != '' GROUP BY match_id, b, e \
                 ORDER BY match_id, b, e"
            )),
        ),
        (
            "poll_votes",
            query(&format!(
                "SELECT match_id, poll_id, option, bucket, sum(votes) FROM {db}.poll_votes \
                 GROUP BY match_id, poll_id, option, bucket \
                 ORDER BY match_id, poll_id, option, bucket"
            )),
            query(&format!(
                "SELECT match_id, \
                 substringUTF8(visitParamExtractString(payload, 'poll_id'), 1, 64) AS p, \
                 substringUTF8(if(visitParamExtractString(payload, 'option') != '', \
                 visitParamExtractString(payload, 'option'), \
                 visitParamExtractRaw(payload, 'option')), 1, 64) AS o, \
                 {bucket} AS b, uniqExact(event_id) FROM {db}.events \
                 WHERE event_type = 'poll_vote' AND p != '' GROUP BY match_id, p, o, b \
                 ORDER BY match_id, p, o, b"
            )),
        ),
        (
            "fan_buckets",
            query(&format!(
                "SELECT match_id, bucket, uniqHLL12Merge(fans) FROM {db}.fan_buckets \
                 GROUP BY match_id, bucket ORDER BY match_id, bucket"
            )),
            query(&format!(
                "SELECT match_id, {bucket} AS b, uniqHLL12(user_id) FROM {db}.events \
                 GROUP BY match_id, b ORDER BY match_id, b"
            )),
        ),
        (
            "raw rows",
            query(&format!("SELECT count() FROM {db}.events")),
            query(&format!("SELECT uniqExact(event_id) FROM {db}.events")),
        ),
    ]
}

/// Asserts every aggregate equals its direct count, before and after merging everything.
fn assert_aggregates_match(db: &str, events: u64) {
    for pass in ["before OPTIMIZE", "after OPTIMIZE FINAL"] {
        if pass.starts_with("after") {
            for table in STORED_TABLES {
                clickhouse(&format!("OPTIMIZE TABLE {db}.{table} FINAL"));
            }
        }
        for (what, aggregate, direct) in aggregates_and_direct_counts(db) {
            assert!(!direct.trim().is_empty(), "{what}: no rows ({pass})");
            assert_eq!(aggregate, direct, "{what} {pass}");
        }
        let unique = query(&format!("SELECT uniqExact(event_id) FROM {db}.events"));
        assert_eq!(unique.trim(), events.to_string(), "{pass}");
    }
}

/// Every aggregate, as text, to compare over time.
fn aggregates(db: &str) -> Vec<String> {
    aggregates_and_direct_counts(db)
        .into_iter()
        .map(|(_, aggregate, _)| aggregate)
        .collect()
}

#[test]
fn the_same_batch_twice_counts_once() {
    let names = dedup_names("samebatch");
    let _cleanup = DropDatabase(&names);
    let (_, writer) = migrated(&names);
    let status = SinkStatus::default();
    let mut rows = Rows::new("samebatch-m1");
    let batch: Vec<EventRow> = (0..60)
        .map(|i: i32| rows.row(i % 3, 100 + i64::from(i)))
        .collect();

    let mut dedup = Dedup::new("sink-0", 1_000);
    sink(&writer, &mut dedup, &status, &batch);
    // Redelivered after a crash before the commit: a fresh thread, same positions. Its
    // window is off, so only the ledger can catch it.
    let mut after_restart = Dedup::new("sink-0", 0);
    sink(&writer, &mut after_restart, &status, &batch);
    // And once more through the thread that inserted it (an ambiguous insert retried).
    sink(&writer, &mut dedup, &status, &batch);

    assert_aggregates_match(&names.database, 60);
    assert_eq!(
        status
            .rows_inserted
            .load(std::sync::atomic::Ordering::Relaxed),
        60
    );
    assert_eq!(
        status
            .duplicates_redelivered
            .load(std::sync::atomic::Ordering::Relaxed),
        120
    );
}

#[test]
fn a_client_resend_under_a_new_offset_counts_once() {
    let names = dedup_names("resend");
    let _cleanup = DropDatabase(&names);
    let (_, writer) = migrated(&names);
    let status = SinkStatus::default();
    let mut rows = Rows::new("resend-m1");
    let first: Vec<EventRow> = (0..30).map(|i| rows.row(0, i)).collect();
    let mut dedup = Dedup::new("sink-0", 1_000);
    sink(&writer, &mut dedup, &status, &first);

    // The client resends ten of them: same match and event ids, later offsets, mixed
    // with new events.
    let mut second: Vec<EventRow> = first[..10]
        .iter()
        .enumerate()
        .map(|(i, row)| EventRow {
            kafka_offset: 1_000 + i as i64,
            ..row.clone()
        })
        .collect();
    second.extend((0..5).map(|i| rows.row(0, 2_000 + i)));
    sink(&writer, &mut dedup, &status, &second);

    // After a restart the window is warmed from the ledger: a resend is still caught.
    let mut warmed = Dedup::new("sink-0", 1_000);
    let third: Vec<EventRow> = first[10..20]
        .iter()
        .enumerate()
        .map(|(i, row)| EventRow {
            kafka_offset: 3_000 + i as i64,
            ..row.clone()
        })
        .collect();
    sink(&writer, &mut warmed, &status, &third);
    assert_aggregates_match(&names.database, 35);
    assert_eq!(warmed.window_len(), 35, "warmed with every ledger row");

    let resent = status
        .duplicates_resent
        .load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(resent, 20);
}

#[test]
fn a_repeat_inside_a_batch_counts_once() {
    let names = dedup_names("inbatch");
    let _cleanup = DropDatabase(&names);
    let (_, writer) = migrated(&names);
    let status = SinkStatus::default();
    let mut rows = Rows::new("inbatch-m1");
    let mut batch: Vec<EventRow> = (0..20).map(|i| rows.row(1, i)).collect();
    // Three repeats of earlier events at later offsets of the same and another partition.
    for (n, source) in [3usize, 4, 17].into_iter().enumerate() {
        batch.push(EventRow {
            kafka_partition: (n % 2) as i32,
            kafka_offset: 500 + n as i64,
            ..batch[source].clone()
        });
    }
    // The window is off: only the in-batch check can catch them.
    let mut dedup = Dedup::new("sink-0", 0);
    sink(&writer, &mut dedup, &status, &batch);
    // The same batch retried (an ambiguous insert): the ledger drops the 20, the batch
    // check the 3.
    sink(&writer, &mut dedup, &status, &batch);

    assert_aggregates_match(&names.database, 20);
    let load = |c: &std::sync::atomic::AtomicU64| c.load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(load(&status.rows_inserted), 20);
    assert_eq!(load(&status.duplicates_resent), 6);
    assert_eq!(load(&status.duplicates_redelivered), 20);
}

/// The value of one metric line, e.g. `fanfinity_sink_rows_inserted_total`.
fn metric(server: &Server, line_start: &str) -> Option<u64> {
    let text = server.get("/metrics").text();
    text.lines()
        .find(|l| l.starts_with(line_start))
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse().ok())
}

#[test]
fn a_topic_consumed_again_by_a_fresh_group_changes_no_aggregate() {
    let names = dedup_names("regroup");
    let _cleanup = DropDatabase(&names);
    let m = "regroup-m1";
    let server = Server::start("serve", &names, &brokers(), &[]);
    let mut events: Vec<serde_json::Value> = (0..40)
        .map(|i| {
            let (kind, payload) = match i % 3 {
                0 => ("reaction", json!({"emoji": "🔥"})),
                1 => ("poll_vote", json!({"poll_id": "motm", "option": i % 4})),
                _ => ("cheer", json!({})),
            };
            json!({"event_id": new_id(), "match_id": m, "user_id": format!("fan-{}", i % 6),
                   "type": kind, "ts": 1_671_376_980_000i64 + i * 1_000, "payload": payload})
        })
        .collect();
    let resp = server.post("application/json", json!(events).to_string().as_bytes());
    assert_eq!(resp.status, 202, "{}", resp.text());
    wait_for_ids(&names, m, 40, LAND);

    // A client resends five events in a later request (new offsets).
    events.truncate(5);
    let resp = server.post("application/json", json!(events).to_string().as_bytes());
    assert_eq!(resp.status, 202, "{}", resp.text());
    eventually(LAND, "the resend dropped", || {
        metric(
            &server,
            "fanfinity_sink_duplicates_dropped_total{reason=\"resent\"}",
        )
        .filter(|n| *n == 5)
    });
    assert_aggregates_match(&names.database, 40);
    let before = aggregates(&names.database);
    drop(server);

    // A fresh group reads the whole topic again from the start: 45 records.
    let again = Server::start(
        "serve",
        &names,
        &brokers(),
        &[&format!(
            "consumer.group_id=\"{}.sink-again\"",
            names.prefix
        )],
    );
    eventually(LAND, "the topic read again and dropped", || {
        let redelivered = metric(
            &again,
            "fanfinity_sink_duplicates_dropped_total{reason=\"redelivered\"}",
        )?;
        let resent = metric(
            &again,
            "fanfinity_sink_duplicates_dropped_total{reason=\"resent\"}",
        )?;
        (redelivered == 40 && resent == 5).then_some(())
    });
    assert_eq!(
        metric(&again, "fanfinity_sink_rows_inserted_total"),
        Some(0)
    );
    assert_eq!(aggregates(&names.database), before);
    assert_aggregates_match(&names.database, 40);
    drop(again);
}
