-- Two aggregates for the answers that were still slow on a 10-million-event match with
-- only migration 2 (docs/benchmarks.md, "Analytics"): the whole-match top fans read
-- every (minute, fan) row of `fan_counts`, and the match list read every second of every
-- match in the window from `event_counts`. Same dedup contract as migration 2: the sink
-- inserts each (match_id, event_id) once.

-- Events per fan over the whole match: top fans without a window.
CREATE TABLE IF NOT EXISTS {db}.fan_totals
(
    match_id String,
    user_id  String,
    events   UInt64
)
ENGINE = SummingMergeTree()
ORDER BY (match_id, user_id);

-- Per minute of event time and match, sorted by time first: the match list for a window
-- reads only that window's minutes. Its own fan sketches, because merging `fan_buckets`
-- (one sketch per 10 s) for 100 matches took 0.4 s.
CREATE TABLE IF NOT EXISTS {db}.match_minutes
(
    minute      DateTime,
    match_id    String,
    events      AggregateFunction(count),
    first_event AggregateFunction(min, DateTime),
    last_event  AggregateFunction(max, DateTime),
    newest_ms   AggregateFunction(max, Int64),
    fans        AggregateFunction(uniqHLL12, String)
)
ENGINE = AggregatingMergeTree()
PARTITION BY toYYYYMM(minute)
ORDER BY (minute, match_id);

CREATE MATERIALIZED VIEW IF NOT EXISTS {db}.fan_totals_mv TO {db}.fan_totals AS
SELECT match_id, user_id, toUInt64(count()) AS events
FROM {db}.events
GROUP BY match_id, user_id;

CREATE MATERIALIZED VIEW IF NOT EXISTS {db}.match_minutes_mv TO {db}.match_minutes AS
SELECT toStartOfMinute(event_time) AS minute, match_id,
       countState() AS events, minState(event_time) AS first_event,
       maxState(event_time) AS last_event, maxState(received_at_ms) AS newest_ms,
       uniqHLL12State(user_id) AS fans
FROM {db}.events
GROUP BY minute, match_id;
