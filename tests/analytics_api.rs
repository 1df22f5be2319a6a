//! Every number the analytics API answers, checked against a direct count over the raw
//! `events` table (`FINAL`: one row per `(match_id, event_id)`), on the real stack:
//! as ingested, after a forced merge of every table, and after the whole topic was
//! delivered to the sink a second time (a fresh consumer group reading from the start).
//!
//! Unique fans are HyperLogLog states, so they are compared with `uniqHLL12` over the
//! raw rows (the same sketch: merging per-bucket states gives the same registers) and
//! with the exact count within 5 %.

#![cfg(feature = "stack-tests")]

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::*;
use fanfinity::event::EventType;
use serde_json::{json, Value};

const LAND: Duration = Duration::from_secs(90);
/// 2022-12-18T15:00:00Z.
const KICKOFF_MS: i64 = 1_671_375_600_000;
/// Every event type, as clients send them.
fn types() -> Vec<&'static str> {
    EventType::ALL.iter().map(|t| t.as_str()).collect()
}
const EMOJI: [&str; 4] = ["🔥", "⚽", "😭", "🐐"];

/// A match: 30 quiet minutes with every type, a goal at minute 23 (a spike of
/// celebrations), reactions, two polls, three team values; plus a resent event.
fn match_events(m: &str) -> Vec<Value> {
    let mut events = Vec::new();
    for i in 0..420_i64 {
        let minute = i % 30;
        let kind = types()[(i % 7) as usize];
        let user = format!("fan-{}", (i * 7) % 53);
        let mut e = event(&new_id(), m, &user, kind);
        e["ts"] = json!(KICKOFF_MS + minute * 60_000 + (i % 60) * 1_000);
        // Every third event names no team: stored as "".
        if i % 3 != 2 {
            e["team"] = json!(["ARG", "FRA"][(i % 3) as usize]);
        }
        if kind == "reaction" {
            e["payload"] = json!({"emoji": EMOJI[(i % 4) as usize], "intensity": 3});
        }
        if kind == "poll_vote" {
            let poll = if i % 2 == 0 { "motm" } else { "next-goal" };
            let option = ["messi", "mbappe", "di-maria"][(i % 3) as usize];
            e["payload"] = json!({"poll_id": poll, "option": option});
        }
        events.push(e);
    }
    // Emoji that ClickHouse 18.16's substringUTF8 would cut mid-character (nine 4-byte
    // characters after an ASCII one), and one over the 64-byte limit (left out).
    for (i, emoji) in ["a🔥🔥🔥🔥🔥🔥🔥🔥🔥", &"🔥".repeat(17)]
        .into_iter()
        .enumerate()
    {
        let mut e = event(&new_id(), m, "fan-emoji", "reaction");
        e["ts"] = json!(KICKOFF_MS + 60_000 + i as i64 * 1_000);
        e["payload"] = json!({ "emoji": emoji });
        events.push(e);
    }
    for i in 0..150_i64 {
        let mut e = event(&new_id(), m, &format!("fan-{}", i % 97), "goal_celebration");
        e["ts"] = json!(KICKOFF_MS + 23 * 60_000 + (i % 50) * 1_000);
        e["team"] = json!("ARG");
        events.push(e);
    }
    events
}

struct Check<'a> {
    server: &'a Server,
    db: &'a str,
    m: &'a str,
}

impl Check<'_> {
    fn api(&self, path: &str) -> Value {
        let resp = self.server.get(path);
        assert_eq!(resp.status, 200, "{path}: {}", resp.text());
        resp.json()
    }

    /// Rows of a raw-table query as tab-separated fields.
    fn raw(&self, select: &str, filter: &str, tail: &str) -> Vec<Vec<String>> {
        let sql = format!(
            "SELECT {select} FROM {}.events FINAL WHERE match_id = '{}' {filter} {tail} \
             FORMAT TabSeparated",
            self.db, self.m
        );
        clickhouse(&sql)
            .lines()
            .map(|l| l.split('\t').map(str::to_string).collect())
            .collect()
    }

    fn raw_u64(&self, select: &str, filter: &str) -> u64 {
        self.raw(select, filter, "")[0][0].parse().expect("number")
    }

    /// Event-time filter for an answer's `window`.
    fn window(answer: &Value) -> String {
        let w = &answer["window"];
        format!(
            "AND event_time >= toDateTime({}) AND event_time < toDateTime({})",
            w["from_ms"].as_i64().expect("from") / 1000,
            w["to_ms"].as_i64().expect("to") / 1000
        )
    }

    fn by_type(&self, filter: &str) -> BTreeMap<String, u64> {
        let mut map: BTreeMap<String, u64> = types().iter().map(|t| (t.to_string(), 0)).collect();
        for row in self.raw(
            "toString(event_type), count()",
            filter,
            "GROUP BY event_type",
        ) {
            map.insert(row[0].clone(), row[1].parse().expect("count"));
        }
        map
    }

    fn assert_fans(&self, answered: &Value, filter: &str, what: &str) {
        let answered = answered.as_u64().expect("fans");
        let sketch = self.raw_u64("uniqHLL12(user_id)", filter);
        let exact = self.raw_u64("uniqExact(user_id)", filter);
        assert_eq!(answered, sketch, "{what}: HLL over raw rows");
        let error = (answered as f64 - exact as f64).abs() / (exact.max(1) as f64);
        assert!(error <= 0.05, "{what}: {answered} vs exact {exact}");
    }

    fn metrics(&self, query: &str) {
        let a = self.api(&format!("/v1/matches/{}/metrics?{query}", self.m));
        let f = Self::window(&a);
        assert_eq!(a["total_events"], self.raw_u64("count()", &f), "{query}");
        assert_eq!(a["by_type"], json!(self.by_type(&f)), "{query}");
        let teams: BTreeMap<String, u64> = self
            .raw("team, count()", &f, "GROUP BY team")
            .into_iter()
            .map(|r| (r[0].clone(), r[1].parse().expect("count")))
            .collect();
        assert_eq!(a["by_team"], json!(teams), "{query}");
        self.assert_fans(&a["unique_fans"], &f, "metrics unique_fans");
        let bucket = a["bucket_seconds"].as_i64().expect("bucket");
        let timeline = a["timeline"].as_array().expect("timeline");
        let raw_buckets = self.raw(
            &format!("intDiv(toUInt32(event_time), {bucket}) * {bucket} AS t, count()"),
            &f,
            "GROUP BY t ORDER BY t",
        );
        assert_eq!(timeline.len(), raw_buckets.len(), "{query}: buckets");
        for (b, raw) in timeline.iter().zip(&raw_buckets) {
            let t: i64 = raw[0].parse().expect("t");
            assert_eq!(b["t"], t * 1000);
            assert_eq!(b["events"], raw[1].parse::<u64>().expect("n"));
            let bf = format!(
                "AND event_time >= toDateTime({t}) AND event_time < toDateTime({})",
                t + bucket
            );
            assert_eq!(b["by_type"], json!(self.by_type(&bf)), "bucket {t}");
            self.assert_fans(&b["unique_fans"], &bf, "bucket unique_fans");
        }
    }

    fn moments(&self) {
        let a = self.api(&format!("/v1/matches/{}/moments?bucket=1m&limit=3", self.m));
        let moments = a["moments"].as_array().expect("moments");
        assert_eq!(moments.len(), 3);
        assert_eq!(moments[0]["t"], KICKOFF_MS + 23 * 60_000, "the goal tops");
        assert_eq!(moments[0]["dominant_type"], "goal_celebration");
        for m in moments {
            let t = m["t"].as_i64().expect("t") / 1000;
            let f = format!(
                "AND event_time >= toDateTime({t}) AND event_time < toDateTime({})",
                t + 60
            );
            assert_eq!(m["events"], self.raw_u64("count()", &f));
            assert_eq!(m["by_type"], json!(self.by_type(&f)));
        }
    }

    fn reactions(&self) {
        let a = self.api(&format!("/v1/matches/{}/reactions?limit=100", self.m));
        let f = format!(
            "{} AND event_type = 'reaction' AND visitParamExtractString(payload, 'emoji') != '' \
             AND length(visitParamExtractString(payload, 'emoji')) <= 64",
            Self::window(&a)
        );
        assert_eq!(a["total_reactions"], self.raw_u64("count()", &f));
        let top: Vec<Value> = self
            .raw(
                "visitParamExtractString(payload, 'emoji') AS e, count() AS n",
                &f,
                "GROUP BY e ORDER BY n DESC, e LIMIT 100",
            )
            .into_iter()
            .map(|r| json!({"emoji": r[0], "count": r[1].parse::<u64>().expect("n")}))
            .collect();
        assert_eq!(a["reactions"], json!(top));
    }

    fn polls(&self) {
        let a = self.api(&format!("/v1/matches/{}/polls", self.m));
        let f = format!("{} AND event_type = 'poll_vote'", Self::window(&a));
        let polls = a["polls"].as_array().expect("polls");
        assert_eq!(polls.len(), 2);
        for poll in polls {
            let id = poll["poll_id"].as_str().expect("id");
            let pf = format!("{f} AND visitParamExtractString(payload, 'poll_id') = '{id}'");
            assert_eq!(poll["total_votes"], self.raw_u64("count()", &pf), "{id}");
            for option in poll["options"].as_array().expect("options") {
                let o = option["option"].as_str().expect("option");
                let of = format!("{pf} AND visitParamExtractString(payload, 'option') = '{o}'");
                assert_eq!(option["votes"], self.raw_u64("count()", &of), "{id}/{o}");
            }
        }
    }

    fn fans(&self) {
        // The whole match (from `fan_totals`), then a window (from `fan_counts`).
        let a = self.api(&format!("/v1/matches/{}/fans?limit=5", self.m));
        let top: Vec<Value> = self
            .raw(
                "user_id, count() AS n",
                "",
                "GROUP BY user_id ORDER BY n DESC, user_id LIMIT 5",
            )
            .into_iter()
            .map(|r| json!({"user_id": r[0], "events": r[1].parse::<u64>().expect("n")}))
            .collect();
        assert_eq!(a["fans"], json!(top));
        let from = KICKOFF_MS + 20 * 60_000 + 30_000;
        let a = self.api(&format!("/v1/matches/{}/fans?limit=5&from={from}", self.m));
        assert_eq!(
            a["window"]["from_ms"],
            KICKOFF_MS + 20 * 60_000,
            "whole minutes"
        );
        let top: Vec<Value> = self
            .raw(
                "user_id, count() AS n",
                &Self::window(&a),
                "GROUP BY user_id ORDER BY n DESC, user_id LIMIT 5",
            )
            .into_iter()
            .map(|r| json!({"user_id": r[0], "events": r[1].parse::<u64>().expect("n")}))
            .collect();
        assert_eq!(a["fans"], json!(top));
    }

    fn live(&self) {
        let a = self.api(&format!("/v1/matches/{}/live", self.m));
        let f = Self::window(&a);
        assert_eq!(
            a["window"]["to_ms"].as_i64().expect("to")
                - a["window"]["from_ms"].as_i64().expect("from"),
            60_000
        );
        assert_eq!(a["total_events"], self.raw_u64("count()", &f));
        assert_eq!(a["by_type"], json!(self.by_type(&f)));
        let seconds = self.raw(
            "toUInt32(event_time) AS t, count()",
            &f,
            "GROUP BY t ORDER BY t",
        );
        let timeline = a["timeline"].as_array().expect("timeline");
        assert_eq!(timeline.len(), seconds.len());
        for (b, raw) in timeline.iter().zip(&seconds) {
            assert_eq!(b["t"], raw[0].parse::<i64>().expect("t") * 1000);
            assert_eq!(b["events"], raw[1].parse::<u64>().expect("n"));
        }
    }

    fn matches(&self, other: &str) {
        let to = KICKOFF_MS + 3_600_000;
        let a = self.api(&format!("/v1/matches?from={KICKOFF_MS}&to={to}"));
        let listed = a["matches"].as_array().expect("matches");
        let mine = listed
            .iter()
            .find(|x| x["match_id"] == self.m)
            .expect("the match is listed");
        assert_eq!(mine["events"], self.raw_u64("count()", ""));
        assert_eq!(mine["first_event_ms"], KICKOFF_MS);
        self.assert_fans(&mine["unique_fans"], "", "match list unique_fans");
        assert_eq!(listed[0]["match_id"], self.m, "most events first");
        assert!(listed.iter().any(|x| x["match_id"] == other));
    }

    fn everything(&self, other: &str) {
        self.metrics("bucket=1m");
        self.metrics("bucket=10s&from=1671376803000&to=2022-12-18T15:25:05Z");
        self.metrics("bucket=5m");
        self.moments();
        self.reactions();
        self.polls();
        self.fans();
        self.live();
        self.matches(other);
    }
}

#[test]
fn every_number_matches_the_raw_events_before_and_after_merges_and_redelivery() {
    let names = Names::new("analytics");
    // No cache: each answer must reflect the tables at the moment of the check.
    let mut server = Server::start("serve", &names, &brokers(), &["query.cache_ttl_ms=0"]);
    let (m, other) = ("an-m1", "an-m2");

    let events = match_events(m);
    for chunk in events.chunks(100) {
        let resp = server.post("application/json", json!(chunk).to_string().as_bytes());
        assert_eq!(resp.status, 202, "{}", resp.text());
    }
    // A client resending an event it already sent (its first answer got lost).
    let resp = server.post(
        "application/json",
        json!([events[5]]).to_string().as_bytes(),
    );
    assert_eq!(resp.status, 202);
    let mut small = event(&new_id(), other, "fan-x", "cheer");
    small["ts"] = json!(KICKOFF_MS + 60_000);
    assert_eq!(
        server
            .post("application/json", small.to_string().as_bytes())
            .status,
        202
    );

    let stored = events.len() as u64;
    wait_for_ids(&names, m, events.len(), LAND);
    eventually(LAND, "the aggregates to catch up", || {
        let body = server.get(&format!("/v1/matches/{m}/metrics")).json();
        (body["total_events"] == stored).then_some(())
    });
    wait_for_ids(&names, other, 1, LAND);

    let check = Check {
        server: &server,
        db: &names.database,
        m,
    };
    check.everything(other);

    for table in STORED_TABLES {
        clickhouse(&format!("OPTIMIZE TABLE {}.{table} FINAL", names.database));
    }
    check.everything(other);

    // Redelivery: a new consumer group reads the whole topic again from the start.
    server.terminate(Duration::from_secs(30));
    let group = format!("consumer.group_id=\"{}.again\"", names.prefix);
    let server = Server::start(
        "serve",
        &names,
        &brokers(),
        &[
            "query.cache_ttl_ms=0",
            "consumer.auto_offset_reset=\"earliest\"",
            &group,
        ],
    );
    let records = stored + 2; // the resent copy and the other match's event
    eventually(
        LAND,
        "the redelivered records to be read and dropped",
        || {
            let text = server.get("/metrics").text();
            let dropped: f64 = text
                .lines()
                .filter(|l| l.starts_with("fanfinity_sink_duplicates_dropped_total"))
                .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
                .sum();
            (dropped as u64 >= records).then_some(())
        },
    );
    let check = Check {
        server: &server,
        db: &names.database,
        m,
    };
    check.everything(other);
    assert_eq!(
        clickhouse(&format!(
            "SELECT count() FROM {}.events FORMAT TabSeparated",
            names.database
        ))
        .trim(),
        (stored + 1).to_string(),
        "nothing was inserted again"
    );
    drop(server);
    drop_database(&names);
}
