"""Floods a node with what one hostile client can make it hold, and measures a second client.

    python -m tools.flood unread [--gets 4000] [--seconds 10] [--node-flags "..."]
    python -m tools.flood idle [--connections 1100] [--seconds 10] [--node-nofile N] [--node-flags "..."]
    python -m tools.flood big [--frame-mib 16] [--seconds 10] [--node-flags "..."]
    python -m tools.flood watchers [--watchers 1000] [--seconds 10] [--node-nofile N] [--node-flags "..."]

`unread`: a DEALER sends `--gets` requests for ~1 MiB pages and never reads a reply (its own
receive queue is 1 message and a 4 KiB kernel buffer, so the node cannot park the replies in the
flooder's process); `idle`: `--connections` TCP connections are opened and stay idle; `big`: a
DEALER sends frames of `--frame-mib` MiB of junk, 8 in flight, as fast as the node answers (16 MiB
is the default request limit: a larger frame is dropped by ZeroMQ before it is buffered, and
the connection with it); `watchers`: a child process opens `--watchers` SUB sockets on the watch
socket, all subscribed to the context the second client appends to, and reads them. Meanwhile a
well-behaved client appends one at a time. Prints the node's RSS (start, peak, end), the second
client's append p50/p99, the node's CPU per append and its status counters, as JSON. Loopback only; bounded in count
and time. The node is started here (fresh data folder) with --node-flags.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from typing import Any

import zmq

from protocol import codec
from protocol.client import Client
from tools.bench import Proc, start_node

PAGE_CONTEXT = "flood-pages"
PAGE_ENTRIES = 1000
PAGE_PAYLOAD = 1000  # bytes: a page of 1,000 entries is a ~1.1 MiB get reply
GOOD_CONTEXT = "flood-good"

# The watchers' process: N SUB sockets subscribed to one context, read as fast as they come.
# Its first line of output is the number of subscriptions the node greeted (or refused), its
# last the messages received, after a line on stdin says stop.
WATCHERS = """
import sys, threading, zmq
from protocol import watch
pub, n, context = sys.argv[1], int(sys.argv[2]), sys.argv[3]
zctx = zmq.Context()
zctx.set(zmq.MAX_SOCKETS, n + 100)
socks = []
for _ in range(n):
    s = zctx.socket(zmq.SUB)
    s.setsockopt(zmq.LINGER, 0)
    s.setsockopt(zmq.SUBSCRIBE, watch.topic(context))
    s.connect(pub)
    socks.append(s)
poller = zmq.Poller()
for s in socks:
    poller.register(s, zmq.POLLIN)
stop = threading.Event()
threading.Thread(target=lambda: (sys.stdin.readline(), stop.set()), daemon=True).start()
greeted, got = set(), 0
while not stop.is_set():
    for s, _ in poller.poll(100):
        while True:
            try:
                s.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                break
            got += 1
            if s not in greeted:
                greeted.add(s)
                if len(greeted) == n:
                    print(n, flush=True)
print(got, flush=True)
for s in socks:
    s.close(linger=0)
zctx.term()
"""


class RssSampler(threading.Thread):
    def __init__(self, node: Proc) -> None:
        super().__init__(daemon=True)
        self.node = node
        self.peak = 0.0
        self.stopping = threading.Event()

    def run(self) -> None:
        while not self.stopping.wait(0.1):
            rss = self.node.rss_mb()
            if rss != rss:  # nan: the process is gone
                return
            self.peak = max(self.peak, rss)


def appender(address: str, seconds: float, lat: list[float]) -> None:
    with Client(address, timeout=30.0) as c:
        end = time.monotonic() + seconds
        i = 0
        while time.monotonic() < end:
            t0 = time.perf_counter()
            c.append(GOOD_CONTEXT, b"x" * 256, key="facts", dedup_id=f"g{i}".encode())
            lat.append(time.perf_counter() - t0)
            i += 1


def measure_appends(address: str, seconds: float, node: Proc | None = None) -> dict[str, Any]:
    lat: list[float] = []
    cpu0 = node.cpu_s() if node is not None else 0.0
    appender(address, seconds, lat)
    cpu = node.cpu_s() - cpu0 if node is not None else float("nan")
    lat.sort()
    return {
        "appends": len(lat),
        "node_cpu_us_per_append": round(cpu / len(lat) * 1e6) if lat and cpu == cpu else None,
        "p50_ms": round(statistics.median(lat) * 1000, 3) if lat else None,
        "p99_ms": round(lat[min(len(lat) - 1, int(len(lat) * 0.99))] * 1000, 3) if lat else None,
    }


def flood_unread(address: str, zctx: zmq.Context, gets: int, stop: threading.Event) -> int:
    s = zctx.socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    s.setsockopt(zmq.RCVHWM, 1)
    s.setsockopt(zmq.RCVBUF, 4096)
    s.setsockopt(zmq.SNDHWM, gets + 1)
    s.connect(address)
    sent = 0
    try:
        for i in range(gets):
            if stop.is_set():
                break
            s.send(codec.encode_request("get", i + 1, {"context": PAGE_CONTEXT, "after": 0,
                                                       "limit": PAGE_ENTRIES}))
            sent += 1
        stop.wait()  # hold the connection (never reading) until the measurement ends
    finally:
        s.close(linger=0)
    return sent


def flood_big(address: str, zctx: zmq.Context, frame_mib: float, stop: threading.Event,
              counts: dict[str, int]) -> None:
    s = zctx.socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    s.setsockopt(zmq.RCVTIMEO, 200)
    s.connect(address)
    frame = os.urandom(1 << 16) * int(frame_mib * 16)  # junk: it fails to decode at once
    in_flight = 0
    try:
        while not stop.is_set():
            while in_flight < 8:
                s.send(frame, copy=False)
                counts["sent"] += 1
                in_flight += 1
            try:
                s.recv()
                counts["answered"] += 1
                in_flight -= 1
            except zmq.Again:
                in_flight = 0  # dropped (over the limit: the node closed the connection)
    finally:
        s.close(linger=0)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.flood", description=__doc__.split("\n\n")[0])
    p.add_argument("what", choices=("unread", "idle", "big", "watchers"))
    p.add_argument("--watchers", type=int, default=1000)
    p.add_argument("--frame-mib", type=float, default=16.0)
    p.add_argument("--gets", type=int, default=4000)
    p.add_argument("--connections", type=int, default=1100)
    p.add_argument("--seconds", type=float, default=10.0)
    p.add_argument("--node-nofile", type=int, help="the node's open-files limit (soft and hard)")
    p.add_argument("--node-flags", default="", help="flags for the node, in one string")
    args = p.parse_args(argv)
    args.node_flags = shlex.split(args.node_flags)
    if not 1 <= args.gets <= 100_000 or not 1 <= args.connections <= 20_000 or not 1 <= args.seconds <= 120:
        p.error("bounds: --gets 1..100000, --connections 1..20000, --seconds 1..120")
    if not 1 <= args.watchers <= 8000:
        p.error("bounds: --watchers 1..8000")
    if not 0.0625 <= args.frame_mib <= 64:
        p.error("bounds: --frame-mib 0.0625..64")
    work = tempfile.mkdtemp(prefix="ledger-flood-")
    node, _ = start_node(os.path.join(work, "data"), *args.node_flags, nofile=args.node_nofile)
    zctx = zmq.Context()
    watchers: subprocess.Popen[str] | None = None
    out: dict[str, Any] = {"what": args.what, "node_flags": args.node_flags, "node_nofile": args.node_nofile}
    try:
        with Client(node.address, timeout=30.0) as c:
            for _ in range(PAGE_ENTRIES // 500):
                c.call("append_batch", context=PAGE_CONTEXT,
                       entries=[{"payload": b"p" * PAGE_PAYLOAD, "key": "facts"} for _ in range(500)])
        out["before"] = measure_appends(node.address, 2.0, node)
        out["rss_start_mib"] = round(node.rss_mb(), 1)
        sampler = RssSampler(node)
        sampler.start()
        stop = threading.Event()
        socks: list[socket.socket] = []
        flooder = None
        big_counts = {"sent": 0, "answered": 0}
        if args.what == "unread":
            flooder = threading.Thread(target=flood_unread, args=(node.address, zctx, args.gets, stop),
                                       daemon=True)
            flooder.start()
        elif args.what == "big":
            flooder = threading.Thread(target=flood_big, args=(node.address, zctx, args.frame_mib, stop,
                                                               big_counts), daemon=True)
            flooder.start()
        elif args.what == "watchers":
            # at nice 19: real watchers are other machines; here they share two cores with the node
            watchers = subprocess.Popen(["nice", "-n", "19", sys.executable, "-c", WATCHERS, node.pub, str(args.watchers), GOOD_CONTEXT],
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
            with Client(node.address, timeout=30.0) as c:
                c.append(GOOD_CONTEXT, b"greet")  # so that every watcher hears something
                deadline = time.monotonic() + 60
                while time.monotonic() < deadline:
                    st = c.call("status")
                    if st["watchers"] >= args.watchers:
                        break
                    time.sleep(0.2)
            out["watchers_subscribed"] = st["watchers"]
        else:
            host, port = node.address.split("://", 1)[1].rsplit(":", 1)
            for _ in range(args.connections):
                # plain TCP connections that never speak: idle clients at their cheapest
                socks.append(socket.create_connection((host, int(port))))
        time.sleep(1.0)
        out["during"] = measure_appends(node.address, args.seconds, node)
        out["rss_peak_mib"] = round(max(sampler.peak, node.rss_mb()), 1)
        out["rss_during_end_mib"] = round(node.rss_mb(), 1)
        with Client(node.address, timeout=30.0) as c:
            st = c.call("status")
        out["status"] = {k: v for k, v in st.items()
                         if k.startswith(("client", "max_client", "connections", "watchers", "max_watch"))}
        out["status"].pop("watchers_by_context", None)
        stop.set()
        if flooder is not None:
            flooder.join(10)
        if watchers is not None:
            assert watchers.stdin is not None and watchers.stdout is not None
            watchers.stdin.write("stop\n")
            watchers.stdin.flush()
            lines = watchers.stdout.read().split()
            watchers.wait(30)
            out["watcher_messages_received"] = int(lines[-1]) if lines else None
        if args.what == "big":
            out["big_frames"] = dict(big_counts, frame_mib=args.frame_mib)
        for s in socks:
            s.close()
        sampler.stopping.set()
        time.sleep(1.0)
        out["rss_after_mib"] = round(node.rss_mb(), 1)
    finally:
        if watchers is not None and watchers.poll() is None:
            watchers.kill()
            watchers.wait(10)
        node.stop()
        zctx.term()
        shutil.rmtree(work, ignore_errors=True)
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
