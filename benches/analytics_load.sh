#!/usr/bin/env bash
# The analytics target of issue 6: 200 clients polling the API about a 10-million-event
# match (with 100 other matches in the tables) while ingest posts into that match at half
# the rate `fanfinity serve` sustains here. Starts its own `fanfinity serve` on loopback,
# runs `loadtest steady` (ingest) and `loadtest poll` (the pollers) at once, stops
# everything, and leaves the poll report in target/analytics-poll.json and the ingest
# report in target/analytics-ingest.json.
#
# Expects the local stack up (scripts/stack.sh up) and the database seeded with
# benches/analytics_seed.sh (this script seeds it when the big match is missing).
#
# Settings (not FANFINITY_*: the server reads those as configuration):
#   BENCH_DB (bench_analytics), BENCH_MATCH (final-10m), BENCH_CH_TCP_PORT (19000),
#   BENCH_CH_HTTP_PORT (18123), BENCH_KAFKA (127.0.0.1:19092), BENCH_PORT (18480),
#   BENCH_INGEST_RATE events/s (25000: half the 50,000/s benches/spike holds with zero
#   loss here), BENCH_CLIENTS (200), BENCH_DURATION seconds (60), BENCH_INTERVAL (1s),
#   BENCH_MAX_P99_MS (50: the run fails above it).
set -euo pipefail

ROOT=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")/.." && pwd)
cd "$ROOT"
DB=${BENCH_DB:-bench_analytics}
MATCH=${BENCH_MATCH:-final-10m}
CH_TCP=${BENCH_CH_TCP_PORT:-19000}
CH_HTTP=${BENCH_CH_HTTP_PORT:-18123}
KAFKA=${BENCH_KAFKA:-127.0.0.1:19092}
PORT=${BENCH_PORT:-18480}
RATE=${BENCH_INGEST_RATE:-25000}
CLIENTS=${BENCH_CLIENTS:-200}
DURATION=${BENCH_DURATION:-60}
INTERVAL=${BENCH_INTERVAL:-1s}
MAX_P99=${BENCH_MAX_P99_MS:-50}
BIN=target/release/fanfinity
LOADTEST=target/release/loadtest
LOG=target/analytics-server.log

say() { printf 'analytics-load: %s\n' "$*"; }

cargo build --release -q -p fanfinity -p loadtest

events=$(clickhouse-client --port "$CH_TCP" --query \
    "SELECT count() FROM system.tables WHERE database = '$DB' AND name = 'events'")
if [[ $events == 1 ]]; then
    events=$(clickhouse-client --port "$CH_TCP" --query \
        "SELECT count() FROM $DB.events WHERE match_id = '$MATCH'")
fi
if [[ $events == 0 ]]; then
    say "seeding $DB (10M events for $MATCH, 100 other matches)"
    benches/analytics_seed.sh --database "$DB" --port "$CH_TCP" --match "$MATCH" \
        --migrate-with "$BIN" --http-port "$CH_HTTP"
else
    say "$DB already holds $events events of $MATCH"
fi

SERVER_PID=
INGEST_PID=
cleanup() {
    [[ -n $INGEST_PID ]] && kill "$INGEST_PID" 2>/dev/null || true
    if [[ -n $SERVER_PID ]]; then
        kill -TERM "$SERVER_PID" 2>/dev/null || true
        wait "$SERVER_PID" 2>/dev/null || true
    fi
}
trap cleanup EXIT

say "starting fanfinity serve on 127.0.0.1:$PORT (log $LOG)"
"$BIN" serve \
    --set "http.listen=\"127.0.0.1:$PORT\"" \
    --set "kafka.brokers=\"$KAFKA\"" \
    --set "clickhouse.url=\"http://127.0.0.1:$CH_HTTP\"" \
    --set "clickhouse.database=\"$DB\"" \
    --set "consumer.group_id=\"bench-analytics\"" \
    --set auth.enabled=false \
    --set limits.per_ip_requests_per_sec=100000 \
    >"$LOG" 2>&1 &
SERVER_PID=$!
for _ in $(seq 1 60); do
    curl -fsS "127.0.0.1:$PORT/readyz" >/dev/null 2>&1 && break
    sleep 1
done
curl -fsS "127.0.0.1:$PORT/readyz" >/dev/null || { say "server not ready"; tail -n 30 "$LOG"; exit 1; }

say "ingest: $RATE events/s in batches of 100 into $MATCH for $((DURATION + 25)) s"
"$LOADTEST" steady --url "http://127.0.0.1:$PORT" --rate "$RATE" --batch 100 \
    --duration "$((DURATION + 25))" --match-id "$MATCH" \
    --json-report target/analytics-ingest.json >target/analytics-ingest.log 2>&1 &
INGEST_PID=$!
sleep 10

base="/v1/matches/$MATCH"
status=0
"$LOADTEST" poll --target "http://127.0.0.1:$PORT" --clients "$CLIENTS" \
    --duration "${DURATION}s" --warmup 5s --interval "$INTERVAL" \
    --path "$base/metrics?bucket=1m" --path "$base/live" \
    --path "$base/moments?bucket=1m&limit=5" --path "$base/reactions?limit=8" \
    --path "$base/polls" --path "$base/fans?limit=10" --path "/v1/matches" \
    --max-p99-ms "$MAX_P99" --json-report target/analytics-poll.json || status=$?

wait "$INGEST_PID" || { say "ingest run failed (target/analytics-ingest.log)"; status=1; }
INGEST_PID=
tail -n 25 target/analytics-ingest.log
exit "$status"
