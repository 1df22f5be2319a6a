#!/usr/bin/env python3
"""Runs fanfinity's migrations and the analytics API's query shapes on ClickHouse 24.x.

No ClickHouse 24 server can be installed on the development machines (Debian ships 18.16
and there is no Docker engine), so this uses chDB, ClickHouse embedded in a Python wheel
(PyPI `chdb`; 2.1.1 is ClickHouse 24.8.4). It applies src/sink/migrations/*.sql to an
empty database, inserts 1,000 events through the materialized views, and runs one query
of each shape src/query/ sends (with the bound values written in), failing on the first
error. The shapes are copied by hand: keep them in step when a query changes.

Usage: scripts/check_sql_clickhouse24.sh   (makes target/chdb-venv; the wheel is ~575 MB)
"""
import os
import sys

from chdb import session

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
os.chdir(ROOT)
s = session.Session(os.path.join(ROOT, "target", "chdb-check-db"))
print(s.query("SELECT version()", "CSV"))
def run(sql):
    r = s.query(sql, "TSV")
    return str(r)
run("DROP DATABASE IF EXISTS fan")
run("CREATE DATABASE fan")
for f in ["src/sink/migrations/0001_events.sql","src/sink/migrations/0002_aggregates.sql","src/sink/migrations/0003_match_and_fan_totals.sql"]:
    text = "\n".join(l for l in open(f).read().splitlines() if not l.strip().startswith("--"))
    for st in [x.strip().rstrip(";").strip() for x in text.split(";\n") if x.strip()]:
        run(st.replace("{db}","fan"))
run("""INSERT INTO fan.events (event_id, match_id, user_id, event_type, team, client_ts_ms, event_time, received_at, received_at_ms, payload, kafka_partition, kafka_offset)
SELECT generateUUIDv4(), 'm1', concat('u', toString(number % 50)), CAST(1 + number % 7 AS Enum8('reaction' = 1, 'cheer' = 2, 'goal_celebration' = 3, 'poll_vote' = 4, 'chat' = 5, 'share' = 6, 'view' = 7)), if(number % 2 = 0, 'ARG', ''), NULL,
 toDateTime(1671375600 + number), toDateTime(1671375600 + number), (1671375600 + number) * 1000,
 multiIf(number % 7 = 0, '{"emoji":"🔥"}', number % 7 = 3, '{"poll_id":"motm","option":2}', '{}'), 0, number FROM numbers(1000)""")
W = "match_id = 'm1' AND {c} >= toDateTime(1671375600) AND {c} < toDateTime(1671376800)"
qs = [
 "SELECT toUInt32(min(second)) AS first, toUInt32(max(second)) AS last, count() AS rows FROM fan.event_counts WHERE match_id = 'm1'",
 f"SELECT toString(event_type) AS event_type, team, countMerge(events) AS events, maxMerge(newest_ms) AS newest_ms FROM fan.event_counts WHERE {W.format(c='second')} GROUP BY event_type, team",
 f"SELECT toUInt32(intDiv(toUInt32(second), 60) * 60) AS t, toString(event_type) AS event_type, countMerge(events) AS events FROM fan.event_counts WHERE {W.format(c='second')} GROUP BY t, event_type ORDER BY t",
 f"SELECT toUInt32(intDiv(toUInt32(bucket), 60) * 60) AS t, uniqHLL12Merge(fans) AS fans FROM fan.fan_buckets WHERE {W.format(c='bucket')} GROUP BY t ORDER BY t",
 f"SELECT uniqHLL12Merge(fans) AS fans FROM fan.fan_buckets WHERE {W.format(c='bucket')}",
 f"SELECT maxMerge(newest_ms) AS newest_ms, countMerge(events) AS events FROM fan.event_counts WHERE {W.format(c='second')}",
 f"SELECT emoji, sum(events) AS count FROM fan.reaction_counts WHERE {W.format(c='bucket')} GROUP BY emoji ORDER BY count DESC, emoji LIMIT 10",
 f"SELECT sum(events) AS total FROM fan.reaction_counts WHERE {W.format(c='bucket')}",
 f"SELECT poll_id, sum(votes) AS total FROM fan.poll_votes WHERE {W.format(c='bucket')} GROUP BY poll_id ORDER BY total DESC, poll_id LIMIT 100",
 f"SELECT poll_id, option, sum(votes) AS votes FROM fan.poll_votes WHERE {W.format(c='bucket')} AND has(['motm'], poll_id) GROUP BY poll_id, option ORDER BY votes DESC, option LIMIT 50 BY poll_id",
 "SELECT user_id, sum(events) AS events FROM fan.fan_totals WHERE match_id = 'm1' GROUP BY user_id ORDER BY events DESC, user_id LIMIT 5",
 f"SELECT user_id, sum(events) AS events FROM fan.fan_counts WHERE {W.format(c='minute')} GROUP BY user_id ORDER BY events DESC, user_id LIMIT 5",
 "SELECT toUInt32(maxIf(second, second <= toDateTime(1796432160))) AS last, count() AS rows FROM fan.event_counts WHERE match_id = 'm1'",
 "SELECT match_id, countMerge(events) AS events, toUInt32(minMerge(first_event)) AS first, toUInt32(maxMerge(last_event)) AS last, maxMerge(newest_ms) AS newest_ms, uniqHLL12Merge(fans) AS fans FROM fan.match_minutes WHERE minute >= toDateTime(1671375600) AND minute < toDateTime(1671376800) GROUP BY match_id ORDER BY events DESC, match_id LIMIT 100",
 "SELECT kafka_offset FROM fan.event_ledger WHERE kafka_partition = 0 AND kafka_offset >= 10 AND kafka_offset <= 20",
]
for q in qs:
    out = run(q)
    if not out.strip():
        sys.exit(f"no rows from: {q}")
    print("ok:", q[:90])
print("all migrations and", len(qs), "query shapes ran on ClickHouse", s.query("SELECT version()", "TSV"))
