#!/usr/bin/env python3
"""The table benches/compare prints, from the loadtest JSON reports in one run's directory.

Report names: <server>-<shape>-ramp.json, <server>-<shape>-steady.json and
<server>-held.json, with server in fanfinity, baseline, noop and shape in single, batch;
meta.json holds the machine and settings. A missing report shows as n/a, so a partial run
still prints. Usage: compare_table.py DIR
"""

import json
import os
import sys

SERVERS = [("fanfinity", "fanfinity"), ("baseline", "baseline"), ("noop", "no-op")]
SHAPES = [("single", "1 event"), ("batch", "100 events")]


def load(directory, name):
    path = os.path.join(directory, name + ".json")
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def dig(report, *keys):
    """report[k1][k2]..., or None when any step is missing or null."""
    for key in keys:
        if not isinstance(report, dict) or report.get(key) is None:
            return None
        report = report[key]
    return report


def num(value, digits=0):
    if value is None:
        return "n/a"
    if digits == 0:
        return f"{value:,.0f}"
    return f"{value:,.{digits}f}"


def mib(value):
    return "n/a" if value is None else f"{value / (1024 * 1024):,.0f} MiB"


def ratio(a, b):
    if a is None or b is None or b == 0:
        return "n/a"
    return f"{a / b:.2f}x"


def max_held(ramp):
    """The ramp's max events/s held; >= when every step held (the limit lies above the
    ramp's --max-rate), < the first step's rate when none did."""
    value = dig(ramp, "ramp", "max_held_events_per_s")
    steps = dig(ramp, "ramp", "steps") or []
    if value is None or not steps:
        return num(value)
    if all(step.get("held") for step in steps):
        return "≥ " + num(value)
    if not any(step.get("held") for step in steps):
        return "< " + num(steps[0].get("target_events_per_s"))
    return num(value)


def non_202(report):
    """Requests answered with anything but 202, plus those that got no answer."""
    result = dig(report, "result")
    if result is None:
        return None
    sent = dig(result, "requests", "sent") or 0
    ok = dig(result, "requests", "by_status", "202") or 0
    return sent - ok


def main():
    directory = sys.argv[1]
    meta = load(directory, "meta") or {}
    wanted = meta.get("servers", "fanfinity baseline noop").split()
    shapes = meta.get("shapes", "single batch").split()
    rates = {"single": meta.get("single_rate", "?"), "batch": meta.get("batch_rate", "?")}
    bound = meta.get("p99_bound_ms", "50")
    held = int(meta.get("held_connections", "50000") or 50000)

    rows, values = [], {}
    for server, label in SERVERS:
        if server not in wanted:
            continue
        held_report = load(directory, f"{server}-held")
        rss = dig(held_report, "server", "rss_max_bytes")
        values[(server, "rss")] = rss
        for shape, shape_label in SHAPES:
            if shape not in shapes:
                continue
            ramp = load(directory, f"{server}-{shape}-ramp")
            steady = load(directory, f"{server}-{shape}-steady")
            cpu = dig(steady, "server", "cpu_us_per_event")
            values[(server, shape, "max")] = dig(ramp, "ramp", "max_held_events_per_s")
            values[(server, shape, "cpu")] = cpu
            rows.append(
                "| {} | {} | {} | {} | {} | {} | {} | {} |".format(
                    label,
                    shape_label,
                    max_held(ramp),
                    num(dig(steady, "result", "latency_ms", "p99"), 2),
                    num(dig(steady, "result", "achieved_events_per_s")),
                    num(cpu, 2),
                    num(non_202(steady)),
                    mib(rss),
                )
            )

    print(f"## fanfinity vs baseline vs no-op ({meta.get('date_utc', '?')})")
    print()
    print(
        f"Machine: {meta.get('nproc', '?')} CPUs ({meta.get('cpu', '?')}), "
        f"Linux {meta.get('kernel', '?')}; {meta.get('rustc', '?')}; "
        f"{meta.get('fanfinity', '?')} at {meta.get('git', '?')}; axum "
        f"{meta.get('crate_axum', '?')}, hyper {meta.get('crate_hyper', '?')}, tokio "
        f"{meta.get('crate_tokio', '?')}, glommio {meta.get('crate_glommio', '?')}, rdkafka "
        f"{meta.get('crate_rdkafka', '?')} (librdkafka via rdkafka-sys "
        f"{meta.get('crate_rdkafka-sys', '?')}); broker {meta.get('brokers', '?')}."
    )
    if meta.get("quick") == "1":
        print()
        print("**--quick smoke run: durations too short for a measurement.**")
    print()
    print(
        "- fanfinity: `fanfinity ingest` (glommio shards, 202 after Kafka acks), ingest "
        "only, no sink consumers, so it does the same work as the baseline; auth and rate "
        "limits off."
    )
    print(
        "- baseline: benches/baseline (tokio multi-thread + axum + serde_json + rdkafka "
        "FutureProducer, 202 after delivery), same producer settings."
    )
    print(
        "- no-op: `fanfinity noop-server`, fanfinity's shards and HTTP handling answering "
        "202 after reading the body, no decoding, no Kafka: the HTTP layer's ceiling."
    )
    print("- All three share the machine with the load generator and the broker.")
    print()
    print(
        f"| server | request | max events/s held (p99 < {bound} ms) "
        f"| p99 ms at fixed rate¹ | achieved events/s¹ | CPU µs per event¹ "
        f"| non-202 answers¹ | RSS at {held:,} connections² |"
    )
    print("|---|---|--:|--:|--:|--:|--:|--:|")
    for row in rows:
        print(row)
    print()
    print(
        f"¹ `loadtest steady` at {num(int(rates['single']))} events/s for single events and "
        f"{num(int(rates['batch']))} events/s for 100-event batches, "
        f"{meta.get('steady_s', '?')} s; CPU is loadtest's `cpu_us_per_event`: the server "
        "process's user + system CPU time over the measured window, per event."
    )
    print(
        "≥: every ramp step held, so the limit lies above the ramp's --max-rate; <: not "
        "even the first step held."
    )
    print(
        f"² Peak RSS of the server while {held:,} connections were open (opened first, then "
        "a low rate of single-event posts); measured once per server, shown on each row."
    )
    print()
    print("Ratios:")
    print()
    for shape, shape_label in SHAPES:
        if shape not in shapes:
            continue
        print(
            f"- max events/s held, {shape_label}: fanfinity / baseline "
            f"{ratio(values.get(('fanfinity', shape, 'max')), values.get(('baseline', shape, 'max')))}"
            f"; fanfinity / no-op "
            f"{ratio(values.get(('fanfinity', shape, 'max')), values.get(('noop', shape, 'max')))}"
        )
        print(
            f"- CPU per event, {shape_label}: baseline / fanfinity "
            f"{ratio(values.get(('baseline', shape, 'cpu')), values.get(('fanfinity', shape, 'cpu')))}"
        )
    print(
        f"- RSS at {held:,} connections: baseline / fanfinity "
        f"{ratio(values.get(('baseline', 'rss')), values.get(('fanfinity', 'rss')))}"
    )


if __name__ == "__main__":
    main()
