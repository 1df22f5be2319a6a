-- Aggregates maintained at insert time, so the analytics API reads a few thousand rows
-- per match instead of every event (see docs/analytics.md).
--
-- Counts in these tables are only right if every (match_id, event_id) reaches `events`
-- once: a materialized view sees each INSERT, duplicates included. The sink guarantees
-- that before inserting (sink::dedup): it drops records whose Kafka position is already
-- in `event_ledger` (a redelivered batch) and event ids it inserted recently (a client
-- resend). Unique fans are HyperLogLog states (uniqHLL12), which a repeat cannot change.
--
-- Runs unchanged on ClickHouse 18.16 and 24.x: no DateTime64, LowCardinality, JSON type
-- or SimpleAggregateFunction. Payload fields are read with visitParamExtract*, which 18.16
-- has (JSONExtract came later): it finds the first "key": in the payload text.

-- Which Kafka positions of fanfinity.events are already in `events`; the sink reads it
-- before every insert. Retried rows carry the position they were first read at, so the
-- retry consumer checks the same ledger.
CREATE TABLE IF NOT EXISTS {db}.event_ledger
(
    kafka_partition Int32,
    kafka_offset    Int64,
    match_id        String,
    event_id        UUID,
    received_at     DateTime
)
ENGINE = ReplacingMergeTree()
PARTITION BY toYYYYMM(received_at)
ORDER BY (kafka_partition, kafka_offset);

-- Events per second of event time, by type and team: totals, timelines, moments, live.
CREATE TABLE IF NOT EXISTS {db}.event_counts
(
    match_id    String,
    second      DateTime,
    event_type  Enum8('reaction' = 1, 'cheer' = 2, 'goal_celebration' = 3,
                      'poll_vote' = 4, 'chat' = 5, 'share' = 6, 'view' = 7),
    team        String,
    events      AggregateFunction(count),
    newest_ms   AggregateFunction(max, Int64)
)
ENGINE = AggregatingMergeTree()
PARTITION BY toYYYYMM(second)
ORDER BY (match_id, second, event_type, team);

-- Unique fans per 10-second bucket of event time (HyperLogLog, 4,096 registers).
CREATE TABLE IF NOT EXISTS {db}.fan_buckets
(
    match_id String,
    bucket   DateTime,
    fans     AggregateFunction(uniqHLL12, String)
)
ENGINE = AggregatingMergeTree()
PARTITION BY toYYYYMM(bucket)
ORDER BY (match_id, bucket);

-- Reactions per 10-second bucket by emoji: `payload.emoji` of `reaction` events; events
-- without one, or with one over 64 bytes, are left out. Not cut to length: 18.16's
-- substringUTF8 splits 4-byte characters (every emoji), and one broken string would fail
-- every answer that reads it.
CREATE TABLE IF NOT EXISTS {db}.reaction_counts
(
    match_id String,
    bucket   DateTime,
    emoji    String,
    events   UInt64
)
ENGINE = SummingMergeTree()
PARTITION BY toYYYYMM(bucket)
ORDER BY (match_id, bucket, emoji);

-- Poll votes per 10-second bucket: `payload.poll_id` and `payload.option` (a string or a
-- number) of `poll_vote` events; votes without a poll id, or with a poll id or option
-- over 64 bytes, are left out (not cut, for the reason above).
CREATE TABLE IF NOT EXISTS {db}.poll_votes
(
    match_id String,
    poll_id  String,
    option   String,
    bucket   DateTime,
    votes    UInt64
)
ENGINE = SummingMergeTree()
PARTITION BY toYYYYMM(bucket)
ORDER BY (match_id, poll_id, option, bucket);

-- Events per fan per minute of event time: the most engaged fans.
CREATE TABLE IF NOT EXISTS {db}.fan_counts
(
    match_id String,
    minute   DateTime,
    user_id  String,
    events   UInt64
)
ENGINE = SummingMergeTree()
PARTITION BY toYYYYMM(minute)
ORDER BY (match_id, minute, user_id);

CREATE MATERIALIZED VIEW IF NOT EXISTS {db}.event_ledger_mv TO {db}.event_ledger AS
SELECT kafka_partition, kafka_offset, match_id, event_id, received_at
FROM {db}.events;

CREATE MATERIALIZED VIEW IF NOT EXISTS {db}.event_counts_mv TO {db}.event_counts AS
SELECT match_id, event_time AS second, event_type, team,
       countState() AS events, maxState(received_at_ms) AS newest_ms
FROM {db}.events
GROUP BY match_id, second, event_type, team;

CREATE MATERIALIZED VIEW IF NOT EXISTS {db}.fan_buckets_mv TO {db}.fan_buckets AS
SELECT match_id, toDateTime(intDiv(toUInt32(event_time), 10) * 10) AS bucket,
       uniqHLL12State(user_id) AS fans
FROM {db}.events
GROUP BY match_id, bucket;

CREATE MATERIALIZED VIEW IF NOT EXISTS {db}.reaction_counts_mv TO {db}.reaction_counts AS
SELECT match_id, toDateTime(intDiv(toUInt32(event_time), 10) * 10) AS bucket,
       visitParamExtractString(payload, 'emoji') AS emoji,
       toUInt64(count()) AS events
FROM {db}.events
WHERE event_type = 'reaction' AND emoji != '' AND length(emoji) <= 64
GROUP BY match_id, bucket, emoji;

CREATE MATERIALIZED VIEW IF NOT EXISTS {db}.poll_votes_mv TO {db}.poll_votes AS
SELECT match_id,
       visitParamExtractString(payload, 'poll_id') AS poll_id,
       if(visitParamExtractString(payload, 'option') != '',
          visitParamExtractString(payload, 'option'),
          visitParamExtractRaw(payload, 'option')) AS option,
       toDateTime(intDiv(toUInt32(event_time), 10) * 10) AS bucket,
       toUInt64(count()) AS votes
FROM {db}.events
WHERE event_type = 'poll_vote' AND poll_id != '' AND length(poll_id) <= 64
      AND length(option) <= 64
GROUP BY match_id, poll_id, option, bucket;

CREATE MATERIALIZED VIEW IF NOT EXISTS {db}.fan_counts_mv TO {db}.fan_counts AS
SELECT match_id, toStartOfMinute(event_time) AS minute, user_id,
       toUInt64(count()) AS events
FROM {db}.events
GROUP BY match_id, minute, user_id;
