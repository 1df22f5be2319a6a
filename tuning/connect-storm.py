#!/usr/bin/env python3
"""A reconnect storm: opens N connections to 127.0.0.1:PORT at once, reports connect times.

A SYN the kernel drops because the listener's accept queue is full is resent after about
1 s, so connects over 0.9 s count accept-queue overflows as clients feel them. Compare
with `nstat -z TcpExtListenOverflows`. Loopback only; raise `ulimit -n` above N first.
Usage: tuning/connect-storm.py PORT N   (tuning/README.md, "Kernel and network")
"""
import selectors
import socket
import sys
import time

port, count = int(sys.argv[1]), int(sys.argv[2])
selector = selectors.DefaultSelector()
started = time.monotonic()
sockets = []
for _ in range(count):
    sock = socket.socket()
    sock.setblocking(False)
    try:
        sock.connect(("127.0.0.1", port))
    except BlockingIOError:
        pass
    selector.register(sock, selectors.EVENT_WRITE)
    sockets.append(sock)
sent = time.monotonic() - started

times, failed = [], 0
while len(times) + failed < count and time.monotonic() - started < 20:
    for key, _ in selector.select(timeout=1):
        sock = key.fileobj
        selector.unregister(sock)
        if sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == 0:
            times.append(time.monotonic() - started)
        else:
            failed += 1
times.sort()
pending = count - len(times) - failed


def at(q):
    return times[min(len(times) - 1, int(q * len(times)))] * 1000 if times else float("nan")


print(
    f"connects {count} sent_in_ms {sent * 1000:.0f} ok {len(times)} failed {failed} "
    f"pending {pending} p50_ms {at(0.5):.1f} p99_ms {at(0.99):.1f} max_ms {at(1.0):.1f} "
    f"over_900ms {sum(1 for t in times if t > 0.9)}"
)
for sock in sockets:
    sock.close()
