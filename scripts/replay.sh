#!/usr/bin/env bash
# Replays a recorded match through a fanfinity server that this script starts and stops:
# build, start `fanfinity serve` in the background (log: target/replay-server.log), wait
# for /readyz, run the loadtest replay, then a 10-second open-model smoke run (`loadtest
# steady --verify`, report in target/smoke-steady.json), stop the server with SIGTERM,
# and exit with the first failing status. Expects the local stack to be up
# (`make stack-up`).
#
# Settings are REPLAY_*, not FANFINITY_*: the server takes every FANFINITY_* variable as
# configuration and refuses unknown keys.
#
# Usage: scripts/replay.sh [MATCH_FILE]   (default: loadtest/matches/wc2022-final.json)
set -euo pipefail

ROOT=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")/.." && pwd)
MATCH=${1:-loadtest/matches/wc2022-final.json}
SERVER_BIN=${REPLAY_SERVER_BIN:-$ROOT/target/release/fanfinity}
SERVER_LOG=$ROOT/target/replay-server.log
READY_TIMEOUT_S=${REPLAY_READY_TIMEOUT_S:-60}
# The server drains in-flight requests and flushes the producer before it exits.
STOP_TIMEOUT_S=${REPLAY_STOP_TIMEOUT_S:-30}
# Seconds of the open-model smoke run after the replay (0: skip it).
SMOKE_SECONDS=${REPLAY_SMOKE_SECONDS:-10}
CARGO=${CARGO:-cargo}

SERVER_PID=
BASE_URL=
READY_URL=

log() { printf 'replay: %s\n' "$*"; }
die() { printf 'replay: error: %s\n' "$*" >&2; exit 1; }

show_server_log() {
    [[ -f $SERVER_LOG ]] || return 0
    printf -- '--- last 40 lines of %s ---\n' "$SERVER_LOG" >&2
    tail -n 40 "$SERVER_LOG" >&2
}

# Returns the server's exit status, or 0 when it was not running.
stop_server() {
    local pid=$SERVER_PID deadline=$((SECONDS + STOP_TIMEOUT_S)) status=0
    [[ -n $pid ]] || return 0
    SERVER_PID=
BASE_URL=
READY_URL=
    kill -TERM "$pid" 2>/dev/null || true
    while kill -0 "$pid" 2>/dev/null && ((SECONDS < deadline)); do
        sleep 0.2
    done
    if kill -0 "$pid" 2>/dev/null; then
        log "server still running ${STOP_TIMEOUT_S}s after SIGTERM, sending SIGKILL"
        kill -KILL "$pid" 2>/dev/null || true
    fi
    wait "$pid" 2>/dev/null || status=$?
    return "$status"
}

# Also on Ctrl-C or an error above: never leave a server holding the port.
trap 'stop_server || true' EXIT

http_status() {
    curl -s -o /dev/null -w '%{http_code}' --max-time 2 "$1" 2>/dev/null || true
}

wait_ready() {
    local deadline=$((SECONDS + READY_TIMEOUT_S))
    while ((SECONDS < deadline)); do
        [[ $(http_status "$READY_URL") == 200 ]] && return 0
        if ! kill -0 "$SERVER_PID" 2>/dev/null; then
            show_server_log
            die "server exited before it was ready"
        fi
        sleep 0.5
    done
    show_server_log
    die "server not ready after ${READY_TIMEOUT_S}s ($READY_URL)"
}

# The server's address as a loopback URL, from the listen address it is configured with
# (a wildcard listener is reached through 127.0.0.1).
set_server_urls() {
    local listen=${FANFINITY_HTTP__LISTEN:?stack.sh env sets it} host port
    host=${listen%:*}
    port=${listen##*:}
    case "$host" in
        0.0.0.0 | "[::]" | "") host=127.0.0.1 ;;
    esac
    BASE_URL=http://$host:$port
    READY_URL=$BASE_URL/readyz
}

# The public development keys of scripts/dev.toml (also in the README).
DEV_INGEST_KEY=ffk_de0e010000000001_111111111111111111111111111111111111111111111111
DEV_READ_KEY=ffk_de0e020000000002_222222222222222222222222222222222222222222222222

main() {
    cd "$ROOT"
    [[ -f $MATCH ]] || die "no match file at $MATCH"

    # Points the server at the local stack unless the caller set FANFINITY_* already.
    eval "$("$ROOT/scripts/stack.sh" env)"
    set_server_urls
    # glommio locks memory per executor; see stack.sh's raise_memlock.
    ulimit -l unlimited 2>/dev/null || ulimit -S -l "$(ulimit -H -l)" 2>/dev/null || true

    if [[ -z ${REPLAY_SERVER_BIN:-} ]]; then
        "$CARGO" build --release --bin fanfinity
    fi
    [[ -x $SERVER_BIN ]] || die "no server binary at $SERVER_BIN"
    # Replaying into a server we did not start would measure the wrong thing.
    [[ $(http_status "$READY_URL") == 000 ]] \
        || die "something already answers at $READY_URL; stop it first"

    log "starting $SERVER_BIN serve (log: $SERVER_LOG)"
    # The public development keys (scripts/dev.toml): the replay sends them, so it
    # measures ingest with the key check on, as deployed.
    "$SERVER_BIN" serve --config "$ROOT/scripts/dev.toml" >"$SERVER_LOG" 2>&1 </dev/null &
    SERVER_PID=$!
    wait_ready
    log "server ready (pid $SERVER_PID), replaying $MATCH"

    local replay_status=0 server_status=0
    # --url and --clickhouse-url repeat loadtest's defaults unless the stack was moved.
    "$CARGO" run --release -p loadtest -- replay --match "$MATCH" \
        --url "$BASE_URL" --clickhouse-url "$FANFINITY_CLICKHOUSE__URL" \
        --ingest-key "$DEV_INGEST_KEY" --read-key "$DEV_READ_KEY" || replay_status=$?

    # The open-model smoke: 10 s of `loadtest steady` with the checks a performance run
    # relies on (verification, server CPU and RSS, 202-to-visible probes), so a broken
    # profile fails CI instead of the next benchmark session. Not a benchmark: the rate
    # is far below what the machine holds.
    local smoke_status=0
    if ((SMOKE_SECONDS > 0)); then
        log "open-model smoke: loadtest steady for ${SMOKE_SECONDS}s"
        "$CARGO" run --release -p loadtest -- steady --url "$BASE_URL" \
            --rate 2000 --duration "$SMOKE_SECONDS" --batch 20 --connections 50 \
            --verify --clickhouse-url "$FANFINITY_CLICKHOUSE__URL" \
            --watch-pid "$SERVER_PID" --probe-visibility \
            --ingest-key "$DEV_INGEST_KEY" --read-key "$DEV_READ_KEY" \
            --json-report "$ROOT/target/smoke-steady.json" || smoke_status=$?
        log "open-model smoke finished with status $smoke_status"
    fi

    stop_server || server_status=$?
    if ((server_status != 0)); then
        log "warning: server exited with status $server_status after SIGTERM"
    fi
    if ((replay_status != 0 || smoke_status != 0 || server_status != 0)); then
        show_server_log
    fi
    log "replay finished with status $replay_status"
    if ((replay_status != 0)); then
        exit "$replay_status"
    fi
    exit "$smoke_status"
}

main "$@"
