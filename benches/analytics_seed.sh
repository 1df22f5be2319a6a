#!/usr/bin/env bash
# Seeds ClickHouse for the analytics benchmark (docs/analytics.md, docs/loadtest.md `poll`).
#
# Everything goes through `clickhouse-client` as `INSERT INTO <db>.events SELECT ... FROM
# numbers(offset, count)`, so the materialized views of migration 0002 fire exactly as they
# do for the sink's inserts and fill event_counts, fan_buckets, reaction_counts,
# poll_votes, fan_counts and event_ledger. Rows are generated inside ClickHouse (nothing
# crosses the client), in chunks of --chunk rows (default 1M, one INSERT each), so the
# server's memory stays bounded whatever --events is.
#
# What it writes:
#   * one big match (--match, default final-10m): --events events (default 10M) over 95
#     minutes of event time: a flat base rate plus 4 goal spikes of 60 s at 12x, 25x, 30x
#     and 18x. Rows are numbered in event-time order (the way the sink inserts them), and a
#     piecewise-linear map turns a row number into its second, so the per-second rate is
#     exactly flat outside the spikes and exactly N x base inside.
#     Types: base mix view 33 %, reaction 26 %, chat 15 %, cheer 12 %, poll_vote 7 %,
#     share 5 %, goal_celebration 2 %; spike mix goal_celebration 38 %, reaction 27 %,
#     cheer 20 %, chat 7 %, share 4 %, view 3 %, poll_vote 1 %.
#     Teams ARG / FRA (50/50 outside spikes, 75 % the scorer inside one), 8 % no team ('').
#     Fans: fan-<u>, u = floor(200000 * x^2) with x uniform: ~200k distinct at 10M events,
#     skewed (fan-0 alone sends ~0.2 %, the top 1 % of fans ~10 % of the events).
#     reaction payloads {"emoji":"…"} from 12 emoji (skewed, 🔥 most); poll_vote payloads
#     {"poll_id":"…","option":"…"} for 3 polls (motm, next_goal, final_score); chat
#     {"text":"…"}, share {"channel":"…"}, the rest {}.
#   * --matches background matches bg-000 .. bg-NNN (default 100) of --bg-events events
#     each (default 20,000), flat rate over 95 minutes, kickoffs spread over the last day.
#   * kafka_partition = -1 (never a real Kafka partition) and kafka_offset = a distinct
#     row number, so event_ledger stays consistent; event_id = generateUUIDv4().
#
# Kickoff (--kickoff, unix seconds) defaults to now - 95 min, so the big match ends at
# seeding time; the background matches kick off 0..19 h before it.
#
# Works on ClickHouse 18.16 and 24.x: numbers(offset, count), cityHash64, intDiv,
# multiIf, arrays of literals, CAST to Enum8, generateUUIDv4 and concat only. Run on
# 18.16.1 and on 24.8.4 (chdb 2.1.1) with identical counts. CLICKHOUSE_CLIENT overrides
# the client command (default clickhouse-client; it gets --host, --port, --query).
#
# Usage:
#   benches/analytics_seed.sh --database bench [--host 127.0.0.1] [--port 9000]
#       [--events 10000000] [--matches 100] [--bg-events 20000] [--match final-10m]
#       [--chunk 1000000] [--kickoff UNIX_SECONDS]
#       [--migrate-with target/release/fanfinity --http-port 8123]
#
# With --migrate-with, runs `<bin> --set clickhouse.url=http://HOST:HTTP_PORT
# --set clickhouse.database=DB migrate` first; without it, assumes DB is migrated (and
# checks that events and event_counts exist). Refuses to add to a match that already has
# events (the aggregates would double); drop the database or pick another --match.
set -euo pipefail

HOST=127.0.0.1
PORT=9000
HTTP_PORT=8123
DB=""
EVENTS=10000000
MATCHES=100
BG_EVENTS=20000
MATCH=final-10m
CHUNK=1000000
KICKOFF=""
MIGRATE_WITH=""

usage() { sed -n '2,/^set -euo/p' "$0" | sed '$d; s/^# \{0,1\}//'; }
die() { echo "analytics_seed: error: $*" >&2; exit 2; }

while [ $# -gt 0 ]; do
    case "$1" in
        --host) HOST="$2"; shift 2 ;;
        --port) PORT="$2"; shift 2 ;;
        --http-port) HTTP_PORT="$2"; shift 2 ;;
        --database) DB="$2"; shift 2 ;;
        --events) EVENTS="$2"; shift 2 ;;
        --matches) MATCHES="$2"; shift 2 ;;
        --bg-events) BG_EVENTS="$2"; shift 2 ;;
        --match) MATCH="$2"; shift 2 ;;
        --chunk) CHUNK="$2"; shift 2 ;;
        --kickoff) KICKOFF="$2"; shift 2 ;;
        --migrate-with) MIGRATE_WITH="$2"; shift 2 ;;
        -h|--help) usage; exit 0 ;;
        *) die "unknown argument $1 (see --help)" ;;
    esac
done

[ -n "$DB" ] || die "--database is required"
[[ "$DB" =~ ^[A-Za-z_][A-Za-z0-9_]*$ ]] || die "--database must be an identifier"
[[ "$MATCH" =~ ^[A-Za-z0-9_.:-]{1,64}$ ]] || die "--match must be 1-64 of [A-Za-z0-9_.:-]"
for v in EVENTS MATCHES BG_EVENTS CHUNK PORT HTTP_PORT; do
    [[ "${!v}" =~ ^[0-9]+$ ]] || die "--$(echo "$v" | tr 'A-Z_' 'a-z-') must be a whole number"
done
[ "$EVENTS" -ge 1000 ] || die "--events must be at least 1000"
[ "$MATCHES" -le 1000 ] || die "--matches must be at most 1000 (bg-000 .. bg-999)"
[ "$CHUNK" -ge 1000 ] || die "--chunk must be at least 1000"
if [ -z "$KICKOFF" ]; then
    KICKOFF=$(( ($(date +%s) - 95 * 60) / 60 * 60 ))
fi
[[ "$KICKOFF" =~ ^[0-9]+$ ]] || die "--kickoff must be unix seconds"

# CLICKHOUSE_CLIENT overrides the client command (e.g. "clickhouse client" for a single
# binary install, or a wrapper); it gets --host, --port and --query.
read -r -a CLIENT <<<"${CLICKHOUSE_CLIENT:-clickhouse-client}"
CH=("${CLIENT[@]}" --host "$HOST" --port "$PORT")
ch() { "${CH[@]}" --query "$1"; }
now_ms() { date +%s%3N; }

echo "analytics_seed: ClickHouse $(ch 'SELECT version()') at $HOST:$PORT, database $DB"

# Schema.
if [ -n "$MIGRATE_WITH" ]; then
    echo "analytics_seed: running $MIGRATE_WITH migrate (http://$HOST:$HTTP_PORT, database $DB)"
    "$MIGRATE_WITH" --set "clickhouse.url=http://$HOST:$HTTP_PORT" \
        --set "clickhouse.database=$DB" migrate
else
    echo "analytics_seed: assuming $DB is migrated (no --migrate-with)"
fi
tables=$(ch "SELECT count() FROM system.tables WHERE database = '$DB' AND name IN ('events', 'event_counts')")
[ "$tables" = 2 ] || die "$DB.events / $DB.event_counts missing: migrate first (--migrate-with BIN)"
existing=$(ch "SELECT count() FROM $DB.events WHERE match_id = '$MATCH'")
[ "$existing" = 0 ] || die "$DB.events already holds $existing events of $MATCH; the aggregates would count them twice. Drop the database or use another --match"

# Shared generators. `n` is the row number; hashes of it (with a salt each) give the
# independent uniform draws, so a run is reproducible apart from event ids.
ENUM="Enum8('reaction' = 1, 'cheer' = 2, 'goal_celebration' = 3, 'poll_vote' = 4, 'chat' = 5, 'share' = 6, 'view' = 7)"
EMOJI="['🔥', '⚽', '👏', '😱', '❤️', '😂', '🙌', '😡', '🎉', '👀', '💪', '😭']"
POLLS="['motm', 'next_goal', 'final_score']"
POLL_OPTIONS="[['messi', 'mbappe', 'di_maria', 'martinez'], ['ARG', 'FRA', 'none'], ['3-3', '3-2', '2-3', 'other']]"
CHANNELS="['whatsapp', 'x', 'instagram', 'copy_link']"
CHATS="['what a goal', 'come on!', 'ref??', 'unbelievable', 'vamos', 'allez les bleus']"
# code: the event type's enum value; spike: 1 inside a goal spike.
TYPE_CODE="if(spike = 0,
    multiIf(r_type < 330, 7, r_type < 590, 1, r_type < 740, 5, r_type < 860, 2, r_type < 930, 4, r_type < 980, 6, 3),
    multiIf(r_type < 380, 3, r_type < 650, 1, r_type < 850, 2, r_type < 920, 5, r_type < 960, 6, r_type < 990, 7, 4))"
PAYLOAD="multiIf(
    code = 1, concat('{\"emoji\":\"', $EMOJI[toUInt32(floor(12 * x_emoji * x_emoji)) + 1], '\"}'),
    code = 4, concat('{\"poll_id\":\"', $POLLS[poll], '\",\"option\":\"',
                     $POLL_OPTIONS[poll][least(length($POLL_OPTIONS[poll]),
                         multiIf(r_option < 50, 1, r_option < 80, 2, r_option < 95, 3, 4))], '\"}'),
    code = 5, concat('{\"text\":\"', $CHATS[r_option % 6 + 1], '\"}'),
    code = 6, concat('{\"channel\":\"', $CHANNELS[r_option % 4 + 1], '\"}'),
    '{}')"
# The inner select: per-row draws. $1: the row-number source, $2: extra columns.
draws() {
    cat <<SQL
SELECT n,
       cityHash64(n, 1) % 1000 AS r_type,
       cityHash64(n, 2) % 100 AS r_team,
       (cityHash64(n, 3) % 1000000) / 1000000 AS x_fan,
       (cityHash64(n, 4) % 1000000) / 1000000 AS x_emoji,
       cityHash64(n, 5) % 3 + 1 AS poll,
       cityHash64(n, 6) % 100 AS r_option,
       cityHash64(n, 7) AS r_time,
       $2
FROM (SELECT number AS n FROM $1)
SQL
}
# The outer select into events; expects match_id, team, user_id, sec, code in scope.
insert_events() {
    cat <<SQL
INSERT INTO $DB.events
    (event_id, match_id, user_id, event_type, team, client_ts_ms, event_time,
     received_at, received_at_ms, payload, kafka_partition, kafka_offset)
SELECT generateUUIDv4(), match_id, user_id, CAST(code AS $ENUM), team, client_ts_ms,
       toDateTime(intDiv(client_ts_ms, 1000)), toDateTime(intDiv(received_at_ms, 1000)),
       received_at_ms, $PAYLOAD, toInt32(-1), toInt64(n + $2)
FROM (
    SELECT *, $TYPE_CODE AS code,
           toInt64(kickoff + sec) * 1000 + toInt64(r_time % 1000) AS client_ts_ms,
           client_ts_ms + 40 + toInt64(intDiv(r_time, 1000) % 1500) AS received_at_ms
    FROM ($1)
)
SQL
}

# The big match's timeline: segments of (seconds, rate multiplier, goal number, scorer).
DURATION=5700
SEGMENTS=()   # "start_s duration_s multiplier goal"
GOALS=("1380 12 1" "3060 25 2" "4680 30 3" "5430 18 4")   # second, multiplier, goal
SCORERS="['ARG', 'FRA', 'ARG', 'FRA']"
OTHERS="['FRA', 'ARG', 'FRA', 'ARG']"
t=0
for g in "${GOALS[@]}"; do
    read -r at mult goal <<<"$g"
    SEGMENTS+=("$t $((at - t)) 1 0" "$at 60 $mult $goal")
    t=$((at + 60))
done
SEGMENTS+=("$t $((DURATION - t)) 1 0")
weight=0
for s in "${SEGMENTS[@]}"; do read -r _ d m _ <<<"$s"; weight=$((weight + d * m)); done
# Row ranges: each segment gets rows in proportion to its weight; the last the rest.
SEC_EXPR="multiIf("
GOAL_EXPR="multiIf("
first=0
i=0
for s in "${SEGMENTS[@]}"; do
    read -r start d m goal <<<"$s"
    i=$((i + 1))
    if [ "$i" -eq "${#SEGMENTS[@]}" ]; then
        rows=$((EVENTS - first))
        SEC_EXPR+="$start + intDiv((n - $first) * $d, $rows))"
        GOAL_EXPR+="$goal)"
    else
        rows=$((EVENTS * d * m / weight))
        end=$((first + rows))
        SEC_EXPR+="n < $end, $start + intDiv((n - $first) * $d, $((rows > 0 ? rows : 1))), "
        GOAL_EXPR+="n < $end, $goal, "
        first=$end
    fi
done
base_rate=$(awk -v n="$EVENTS" -v w="$weight" 'BEGIN { printf "%.0f", n / w }')
echo "analytics_seed: $MATCH: $EVENTS events, kickoff $KICKOFF ($(date -u -d "@$KICKOFF" +%FT%TZ)), 95 min, base ~$base_rate events/s, goals at minutes 23, 51, 78, 90:30 (x12, x25, x30, x18)"

BIG_COLUMNS="'$MATCH' AS match_id, toUInt32($KICKOFF) AS kickoff,
       $SEC_EXPR AS sec,
       $GOAL_EXPR AS goal,
       goal > 0 AS spike,
       concat('fan-', toString(toUInt32(floor(200000 * x_fan * x_fan)))) AS user_id,
       multiIf(r_team < 8, '', goal = 0, if(r_team < 54, 'ARG', 'FRA'),
               r_team < 31, $OTHERS[goal], $SCORERS[goal]) AS team"
BG_COLUMNS="concat('bg-', substring(toString(1000 + intDiv(n, $BG_EVENTS)), 2, 3)) AS match_id,
       toUInt32($KICKOFF - (intDiv(n, $BG_EVENTS) % 20) * 3600) AS kickoff,
       intDiv((n % $BG_EVENTS) * $DURATION, $BG_EVENTS) AS sec,
       0 AS spike,
       concat('bg-fan-', toString(toUInt32(floor(5000 * x_fan * x_fan)))) AS user_id,
       multiIf(r_team < 8, '', r_team < 54, 'HOME', 'AWAY') AS team"

# Inserts rows [0, total) in chunks; $1 label, $2 total, $3 columns, $4 kafka_offset base.
run_chunks() {
    local label=$1 total=$2 columns=$3 offset_base=$4 off=0 count started took
    local all_started
    all_started=$(now_ms)
    while [ "$off" -lt "$total" ]; do
        count=$((total - off < CHUNK ? total - off : CHUNK))
        started=$(now_ms)
        ch "$(insert_events "$(draws "numbers($off, $count)" "$columns")" "$offset_base")"
        took=$(( $(now_ms) - started ))
        off=$((off + count))
        printf 'analytics_seed: %s: %d / %d rows, chunk %.1f s (%.0f rows/s)\n' "$label" "$off" \
            "$total" "$(awk -v t="$took" 'BEGIN { print t / 1000 }')" \
            "$(awk -v c="$count" -v t="$took" 'BEGIN { print c * 1000 / (t > 0 ? t : 1) }')"
    done
    took=$(( $(now_ms) - all_started ))
    printf 'analytics_seed: %s: %d rows in %.1f s (%.0f rows/s)\n' "$label" "$total" \
        "$(awk -v t="$took" 'BEGIN { print t / 1000 }')" \
        "$(awk -v c="$total" -v t="$took" 'BEGIN { print c * 1000 / (t > 0 ? t : 1) }')"
}

seed_started=$(now_ms)
run_chunks "$MATCH" "$EVENTS" "$BIG_COLUMNS" 0
bg_total=$((MATCHES * BG_EVENTS))
if [ "$bg_total" -gt 0 ]; then
    echo "analytics_seed: $MATCHES background matches bg-000 .. of $BG_EVENTS events each"
    run_chunks "background" "$bg_total" "$BG_COLUMNS" "$EVENTS"
fi
seed_took=$(( $(now_ms) - seed_started ))
printf 'analytics_seed: inserted %d events in %.1f s\n' "$((EVENTS + bg_total))" \
    "$(awk -v t="$seed_took" 'BEGIN { print t / 1000 }')"

# Verification: the raw table and the aggregate must agree on the big match.
raw=$(ch "SELECT count() FROM $DB.events WHERE match_id = '$MATCH'")
agg=$(ch "SELECT countMerge(events) FROM $DB.event_counts WHERE match_id = '$MATCH'")
echo "analytics_seed: $MATCH: events count() = $raw, event_counts sum(countMerge) = $agg"
echo "analytics_seed: $MATCH by type: $(ch "SELECT groupArray(concat(toString(event_type), ' ', toString(c))) FROM (SELECT event_type, count() AS c FROM $DB.events WHERE match_id = '$MATCH' GROUP BY event_type ORDER BY c DESC)")"
echo "analytics_seed: $MATCH fans: $(ch "SELECT uniqExact(user_id) FROM $DB.events WHERE match_id = '$MATCH'") distinct, busiest minute $(ch "SELECT max(c) FROM (SELECT toStartOfMinute(event_time) AS m, count() AS c FROM $DB.events WHERE match_id = '$MATCH' GROUP BY m)") events"
echo "analytics_seed: on disk ($DB, active parts):"
ch "SELECT table, sum(rows) AS rows, count() AS parts,
           formatReadableSize(sum(bytes_on_disk)) AS on_disk,
           formatReadableSize(sum(data_uncompressed_bytes)) AS uncompressed
    FROM system.parts WHERE database = '$DB' AND active
    GROUP BY table ORDER BY sum(bytes_on_disk) DESC FORMAT PrettyCompactMonoBlock"
if [ "$raw" != "$EVENTS" ] || [ "$agg" != "$EVENTS" ]; then
    echo "analytics_seed: MISMATCH: expected $EVENTS in both" >&2
    exit 1
fi
echo "analytics_seed: OK"
