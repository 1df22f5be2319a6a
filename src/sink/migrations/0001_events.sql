-- Raw events, one row per accepted event (possibly more than one per event_id until
-- merges run: the sink is at-least-once). ReplacingMergeTree on (match_id, event_id)
-- collapses redelivered rows on merge; every query counts uniqExact(event_id), so the
-- answer is right before the merge too. A redelivered message carries the same
-- received_at, so its copies share a partition and do collapse.
-- Runs unchanged on ClickHouse 18.16 and 24.x: no DateTime64, LowCardinality or JSON.
CREATE TABLE IF NOT EXISTS {db}.events
(
    event_id        UUID,
    match_id        String,
    user_id         String,
    event_type      Enum8('reaction' = 1, 'cheer' = 2, 'goal_celebration' = 3,
                          'poll_vote' = 4, 'chat' = 5, 'share' = 6, 'view' = 7),
    team            String,
    client_ts_ms    Nullable(Int64),
    event_time      DateTime,
    received_at     DateTime,
    received_at_ms  Int64,
    payload         String,
    kafka_partition Int32,
    kafka_offset    Int64,
    inserted_at     DateTime DEFAULT now()
)
ENGINE = ReplacingMergeTree()
PARTITION BY toYYYYMM(received_at)
ORDER BY (match_id, event_id)
