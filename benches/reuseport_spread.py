#!/usr/bin/env python3
"""How SO_REUSEPORT spreads a few long-lived connections across fanfinity's shards.

A load balancer in front of fanfinity opens a handful of keep-alive connections and keeps
them for hours. The kernel picks a shard per connection by hashing its addresses and ports,
so with few connections a shard can end up with most of them, and its core with most of
the work. This script measures that: for each connection count K it opens K keep-alive
connections (each proven open by one GET /healthz), reads every shard's
`fanfinity_http_open_connections` from the admin listener (whose own connections are not
counted there), closes them, and repeats. It prints, per K, how often the busiest shard
held more than its fair share, and the mean and worst busiest-shard share.

Usage (loopback only; the server must run with http.admin_listen set):
    benches/reuseport_spread.py --url http://127.0.0.1:8080 --admin http://127.0.0.1:9090 \
        --counts 2,4,8,16,64 --trials 40

Bounded: trials x counts connections, each closed before the next trial.
"""

import argparse
import http.client
import json
import re
import sys
import time
import urllib.parse

GAUGE = re.compile(r'^fanfinity_http_open_connections\{shard="(\d+)"\} (\d+)$', re.M)


def host_port(url):
    parts = urllib.parse.urlsplit(url)
    if parts.hostname not in ("127.0.0.1", "localhost", "::1"):
        sys.exit(f"refusing non-loopback target {url}")
    return parts.hostname, parts.port or 80


def shard_counts(admin):
    host, port = admin
    conn = http.client.HTTPConnection(host, port, timeout=5)
    try:
        conn.request("GET", "/metrics")
        text = conn.getresponse().read().decode()
    finally:
        conn.close()
    return {int(s): int(n) for s, n in GAUGE.findall(text)}


def wait_for(admin, expected, timeout=2.0):
    """Polls until the gauges add up to `expected` (connections close asynchronously)."""
    deadline = time.monotonic() + timeout
    while True:
        counts = shard_counts(admin)
        if sum(counts.values()) == expected or time.monotonic() > deadline:
            return counts
        time.sleep(0.02)


def trial(target, admin, k):
    host, port = target
    conns = []
    try:
        for _ in range(k):
            c = http.client.HTTPConnection(host, port, timeout=5)
            c.request("GET", "/healthz")
            c.getresponse().read()
            conns.append(c)
        return wait_for(admin, k)
    finally:
        for c in conns:
            c.close()
        wait_for(admin, 0)


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--url", default="http://127.0.0.1:8080")
    p.add_argument("--admin", default="http://127.0.0.1:9090")
    p.add_argument("--counts", default="2,4,8,16,64")
    p.add_argument("--trials", type=int, default=40)
    p.add_argument("--json", help="also write the results as JSON here")
    args = p.parse_args()
    target, admin = host_port(args.url), host_port(args.admin)
    shards = len(shard_counts(admin))
    if shards < 2:
        sys.exit(f"the server reports {shards} shard(s); nothing to spread")

    rows = []
    print(f"{shards} shards, {args.trials} trials per count")
    print("connections | fair share | trials with busiest > fair | mean busiest share | worst busiest share | trials with an idle shard")
    for k in [int(x) for x in args.counts.split(",")]:
        fair = -(-k // shards)  # ceil
        over = idle = 0
        shares = []
        for _ in range(args.trials):
            counts = trial(target, admin, k)
            busiest = max(counts.values())
            shares.append(busiest / k)
            over += busiest > fair
            idle += min(counts.values()) == 0
        row = {
            "connections": k,
            "fair_share": fair,
            "trials": args.trials,
            "busiest_over_fair": over,
            "mean_busiest_share": sum(shares) / len(shares),
            "worst_busiest_share": max(shares),
            "idle_shard_trials": idle,
        }
        rows.append(row)
        print(
            f"{k:11} | {fair:10} | {over:3} of {args.trials:<3}"
            f"               | {row['mean_busiest_share']:18.2f} | {row['worst_busiest_share']:19.2f}"
            f" | {idle:3} of {args.trials}"
        )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"shards": shards, "rows": rows}, f, indent=2)


if __name__ == "__main__":
    main()
