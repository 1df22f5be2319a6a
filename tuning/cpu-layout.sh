#!/usr/bin/env bash
# Splits this host's CPUs between the fanfinity shards and everything else, and steers a
# NIC's interrupts off the shard cores. tuning/README.md ("CPU placement") explains why.
#
# By default it only reads /sys and /proc and prints the layout: the fanfinity settings,
# a CPUAffinity= line for the systemd unit, and the IRQ affinity it would set. Nothing is
# changed unless --apply is given, and --apply changes only the NIC's IRQ affinity
# (/proc/irq/N/smp_affinity_list, as root); it never touches sysctls, kernel arguments,
# irqbalance or fanfinity's configuration.
#
# Layout, over the online CPUs in ascending order:
#   housekeeping   the OS, NIC interrupts, librdkafka's threads, the query runtime
#   consumers      one core per sink consumer thread (consumer.cores)
#   broker         cores left to a Kafka broker or ClickHouse on the same host, if any
#   shards         every remaining CPU, one shard each, contiguous from http.first_core
#                  (shard i runs on CPU first_core + i)
#
# Usage: tuning/cpu-layout.sh [--nic IFACE] [--housekeeping N] [--consumers N]
#                             [--broker N] [--apply]
#        CPU_LAYOUT_ONLINE=0-31 tuning/cpu-layout.sh   (preview another host's CPUs)
set -euo pipefail

NIC=
HOUSEKEEPING=
CONSUMERS=
BROKER=0
APPLY=0

usage() {
    awk 'NR > 1 && /^#/ { sub(/^# ?/, ""); print; next } NR > 1 { exit }' "$0"
    exit "${1:-0}"
}

die() {
    printf 'cpu-layout: error: %s\n' "$*" >&2
    exit 1
}

while (($#)); do
    case $1 in
    --nic) NIC=${2:?--nic needs an interface name}; shift 2 ;;
    --housekeeping) HOUSEKEEPING=${2:?--housekeeping needs a count}; shift 2 ;;
    --consumers) CONSUMERS=${2:?--consumers needs a count}; shift 2 ;;
    --broker) BROKER=${2:?--broker needs a count}; shift 2 ;;
    --apply) APPLY=1; shift ;;
    -h | --help) usage 0 ;;
    *) printf 'cpu-layout: unknown argument %s\n' "$1" >&2; usage 2 ;;
    esac
done

for count in "$BROKER" ${HOUSEKEEPING:+"$HOUSEKEEPING"} ${CONSUMERS:+"$CONSUMERS"}; do
    [[ $count =~ ^[0-9]+$ ]] || die "counts must be whole numbers, got '$count'"
done

# Expands a kernel CPU list ("0-3,6,8-11") into one CPU per line.
expand_cpu_list() {
    local part
    tr ',' '\n' <<<"$1" | while read -r part; do
        [[ -n $part ]] || continue
        if [[ $part == *-* ]]; then
            seq "${part%-*}" "${part#*-}"
        else
            echo "$part"
        fi
    done
}

# Joins CPUs (one per line on stdin) into a kernel CPU list with ranges.
compress_cpu_list() {
    awk 'NR == 1 { start = $1; prev = $1; next }
         $1 == prev + 1 { prev = $1; next }
         { printf "%s%s,", start, (prev > start ? "-" prev : ""); start = $1; prev = $1 }
         END { if (NR) printf "%s%s\n", start, (prev > start ? "-" prev : "") }'
}

# CPU_LAYOUT_ONLINE previews another host's layout (e.g. CPU_LAYOUT_ONLINE=0-31).
ONLINE_LIST=${CPU_LAYOUT_ONLINE:-$(cat /sys/devices/system/cpu/online)}
mapfile -t CPUS < <(expand_cpu_list "$ONLINE_LIST")
TOTAL=${#CPUS[@]}

# Defaults by size: tiny hosts share everything; from 4 CPUs on, one housekeeping core
# and one consumer core; from 16 on, two consumer cores.
if [[ -z $HOUSEKEEPING ]]; then
    if ((TOTAL >= 4)); then HOUSEKEEPING=1; else HOUSEKEEPING=0; fi
fi
if [[ -z $CONSUMERS ]]; then
    if ((TOTAL >= 16)); then CONSUMERS=2; elif ((TOTAL >= 4)); then CONSUMERS=1; else CONSUMERS=0; fi
fi

RESERVED=$((HOUSEKEEPING + CONSUMERS + BROKER))
if ((RESERVED >= TOTAL)); then
    die "$TOTAL CPUs online ($ONLINE_LIST): nothing left for shards after reserving $RESERVED"
fi

HK_CPUS=("${CPUS[@]:0:HOUSEKEEPING}")
CONSUMER_CPUS=("${CPUS[@]:HOUSEKEEPING:CONSUMERS}")
BROKER_CPUS=("${CPUS[@]:HOUSEKEEPING+CONSUMERS:BROKER}")
SHARD_CPUS=("${CPUS[@]:RESERVED}")
FIRST_CORE=${SHARD_CPUS[0]}
SHARDS=${#SHARD_CPUS[@]}

# Shards are placed contiguously from first_core, so a hole in the online list (an
# offline CPU) inside the shard range would put a shard on a CPU that is not there.
if ((SHARD_CPUS[SHARDS - 1] - FIRST_CORE + 1 != SHARDS)); then
    die "online CPUs $ONLINE_LIST have a gap inside the shard range; pass --housekeeping/--consumers so the shards get a contiguous block"
fi

list_of() {
    if (($#)); then printf '%s\n' "$@" | compress_cpu_list; else echo "-"; fi
}

# Interrupts go to the housekeeping cores; without any, to the consumer cores; on a tiny
# host there is nowhere else and they stay where they are.
if ((HOUSEKEEPING > 0)); then
    IRQ_CPUS=$(list_of "${HK_CPUS[@]}")
elif ((CONSUMERS > 0)); then
    IRQ_CPUS=$(list_of "${CONSUMER_CPUS[@]}")
else
    IRQ_CPUS=
fi
# librdkafka's threads and the query runtime inherit the main thread's affinity, which
# the unit's CPUAffinity= sets; shards and consumers pin themselves past it.
if ((HOUSEKEEPING + CONSUMERS > 0)); then
    UNIT_CPUS=$(list_of "${HK_CPUS[@]}" "${CONSUMER_CPUS[@]}")
else
    UNIT_CPUS=
fi

echo "# fanfinity CPU layout for $(hostname) ($TOTAL CPUs online: $ONLINE_LIST)"
echo "# housekeeping: $(list_of "${HK_CPUS[@]}")  consumers: $(list_of "${CONSUMER_CPUS[@]}")" \
    " broker: $(list_of "${BROKER_CPUS[@]}")  shards: $(list_of "${SHARD_CPUS[@]}")"
echo
echo "# fanfinity.toml"
echo "[http]"
echo "first_core = $FIRST_CORE"
echo "shards = $SHARDS"
if ((CONSUMERS > 0)); then
    echo "[consumer]"
    echo "threads = $CONSUMERS"
    echo "cores = [$(printf '%s\n' "${CONSUMER_CPUS[@]}" | paste -sd, - | sed 's/,/, /g')]"
fi
echo
if ((BROKER > 0)); then
    echo "# broker CPUs $(list_of "${BROKER_CPUS[@]}"): pin the broker there yourself (CPUAffinity= of its unit)"
fi
if [[ -n $UNIT_CPUS ]]; then
    echo "# systemd unit, [Service] section: keeps librdkafka's and the query threads off the shards"
    echo "CPUAffinity=$UNIT_CPUS"
else
    echo "# too few CPUs to keep librdkafka's threads off the shards: leave CPUAffinity= unset"
fi

# Hyper-threads of one core share its execution units: two shards on siblings each get
# much less than a core. Report sibling pairs inside the shard range.
shared=()
for cpu in "${SHARD_CPUS[@]}"; do
    siblings=/sys/devices/system/cpu/cpu$cpu/topology/thread_siblings_list
    [[ -r $siblings ]] || continue
    for sibling in $(expand_cpu_list "$(cat "$siblings")"); do
        if ((sibling > cpu && sibling >= FIRST_CORE)); then
            shared+=("$cpu+$sibling")
        fi
    done
done
if ((${#shared[@]})); then
    echo
    echo "# note: shard CPUs that are hyper-thread siblings of each other: ${shared[*]}"
    echo "#       for one shard per physical core, lower http.shards or turn SMT off"
fi

[[ -n $NIC ]] || { echo; echo "# no --nic given: IRQ affinity not planned"; exit 0; }

[[ -d /sys/class/net/$NIC ]] || die "no network interface $NIC"
echo
numa=$(cat "/sys/class/net/$NIC/device/numa_node" 2>/dev/null || echo -1)
echo "# NIC $NIC, NUMA node $numa (-1: unknown or single node)"

# The NIC's MSI/MSI-X vectors; drivers that name their IRQs after the interface are
# found in /proc/interrupts instead.
IRQS=()
if [[ -d /sys/class/net/$NIC/device/msi_irqs ]]; then
    mapfile -t IRQS < <(ls "/sys/class/net/$NIC/device/msi_irqs" | sort -n)
fi
if ((${#IRQS[@]} == 0)); then
    mapfile -t IRQS < <(awk -v nic="$NIC" '$NF ~ nic { sub(":", "", $1); print $1 }' /proc/interrupts)
fi
if ((${#IRQS[@]} == 0)); then
    echo "# no IRQs found for $NIC (virtual NIC without MSI vectors?): nothing to steer"
    exit 0
fi
if [[ -z $IRQ_CPUS ]]; then
    echo "# no housekeeping or consumer cores on $TOTAL CPUs: IRQs stay where they are"
    exit 0
fi

if pgrep -x irqbalance >/dev/null 2>&1; then
    echo "# irqbalance is running and will move these IRQs back. Either stop it, or ban the"
    echo "# shard CPUs in /etc/default/irqbalance and restart it:"
    echo "#   IRQBALANCE_BANNED_CPULIST=$(list_of "${SHARD_CPUS[@]}")"
fi

for irq in "${IRQS[@]}"; do
    path=/proc/irq/$irq/smp_affinity_list
    [[ -e $path ]] || continue
    current=$(cat "$path" 2>/dev/null || echo "?")
    if ((APPLY)); then
        if echo "$IRQ_CPUS" >"$path" 2>/dev/null; then
            echo "irq $irq: $current -> $(cat "$path")"
        else
            echo "irq $irq: cannot set (managed IRQ, or not root); left at $current" >&2
        fi
    else
        echo "echo $IRQ_CPUS > $path   # now $current"
    fi
done
((APPLY)) || echo "# dry run: nothing changed; rerun with --apply (as root) to set these"
