"""Two floods against one fresh node on loopback, each bounded in time (issue #12's figures).

    python -m tools.probe_bounds topics [--topics 100000] [--seconds 5] [-- NODE FLAGS...]
    python -m tools.probe_bounds loads [--seconds 20] [-- NODE FLAGS...]

`topics`: a separate process subscribes to N exact watch topics (and reads whatever the node
sends it); once the node has taken them in, one client appends one at a time: its append
latency, the node's RSS and what `status` says of the registry.

`loads`: one client starts loads of 1 MiB entries and never finishes them, while a second
client appends one at a time between chunks: chunks staged and refused, the node's peak RSS,
the data folder's size, then the folder's size after a restart (staged data of abandoned loads
must be gone).

Not part of the test suite: a measuring tool, like `ledger-bench`.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence

import zmq

from node.ledger import Ledger
from node.storage import MemoryKV
from protocol import codec
from protocol.client import Client
from protocol.entry import decode_entry
from protocol.errors import LedgerError
from tools.bench import start_node

SUBSCRIBER = """
import sys, zmq
from protocol import watch
ctx = zmq.Context()
s = ctx.socket(zmq.SUB)
s.setsockopt(zmq.LINGER, 0)
s.setsockopt(zmq.SNDHWM, 0)  # else SUB drops subscriptions past 1000 queued
s.connect(sys.argv[1])
for i in range(int(sys.argv[2])):
    s.setsockopt(zmq.SUBSCRIBE, watch.topic(f"t{i}"))
while True:
    s.recv_multipart()
"""


def folder_mib(d: str) -> int:
    return sum(os.path.getsize(os.path.join(d, f)) for f in os.listdir(d)) >> 20


def summary(lat: list[float]) -> str:
    lat = sorted(lat)
    return (f"appends={len(lat)} p50={statistics.median(lat):.2f}ms mean={statistics.mean(lat):.2f}ms "
            f"p99={lat[int(len(lat) * 0.99)]:.2f}ms max={lat[-1]:.0f}ms")


def topics(n_topics: int, seconds: float, flags: Sequence[str]) -> None:
    data = tempfile.mkdtemp(prefix="probe-topics-")
    node = start_node(data, *flags)[0]
    zctx = zmq.Context()
    sub = subprocess.Popen([sys.executable, "-c", SUBSCRIBER, node.pub, str(n_topics)])
    c = Client(node.address, timeout=10.0, zctx=zctx)
    try:
        t0 = time.monotonic()
        while time.monotonic() < t0 + 60:
            st = c.call("status")
            if st.get("watched_contexts", 0) + st.get("watch_topics_refused", 0) >= n_topics:
                break
            time.sleep(0.2)
        settle = time.monotonic() - t0
        lat: list[float] = []
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            t = time.perf_counter()
            c.append("bench", b"x" * 100, key="facts")
            lat.append((time.perf_counter() - t) * 1000)
        st = c.call("status")
        print(f"topics={n_topics} flags={list(flags)} {summary(lat)} rss={round(node.rss_mb())}MiB settle={settle:.1f}s "
              f"watched={st.get('watched_contexts')} refused={st.get('watch_topics_refused')} "
              f"heads={st.get('watch_heartbeats')}")
    finally:
        c.close()
        sub.terminate()
        sub.wait(10)
        node.stop()
        zctx.term()
        shutil.rmtree(data, ignore_errors=True)


def loads(seconds: float, flags: Sequence[str]) -> None:
    src = Ledger(MemoryKV(), node_id="src", sync_meta=False)
    entries = [decode_entry(src.append(codec.Append("flood", "", os.urandom(1 << 20), {})).blobs[0]).to_wire()
               for _ in range(64)]
    root = src.head("flood")["root"]
    data = tempfile.mkdtemp(prefix="probe-loads-")
    node = start_node(data, *flags)[0]
    zctx = zmq.Context()
    c = Client(node.address, timeout=30.0, zctx=zctx)
    w = Client(node.address, timeout=30.0, zctx=zctx)
    staged = refused = peak = n = 0
    codes: dict[str, int] = {}
    lat: list[float] = []
    try:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            n += 1
            for i in range(0, 64, 4):
                try:
                    c.call("load", retry=False, context="flood", load_id=f"L{n}", size=1000, root=root,
                           entries=entries[i:i + 4])
                    staged += 1
                except LedgerError as exc:
                    refused += 1
                    codes[exc.code] = codes.get(exc.code, 0) + 1
                    break
                for _ in range(3):
                    t = time.perf_counter()
                    w.append("other", b"x" * 100)
                    lat.append((time.perf_counter() - t) * 1000)
                peak = max(peak, round(node.rss_mb()))
                if time.monotonic() >= end:
                    break
        st = c.call("status")
        print(f"loads flags={list(flags)} {seconds:g}s: chunks staged={staged} refused={refused} {codes} "
              f"loads_in_progress={st['loads_in_progress']} staged_bytes={st.get('loads_staged_bytes', 'n/a')} "
              f"peak_rss={peak}MiB data={folder_mib(data)}MiB; second client {summary(lat)}")
    finally:
        c.close()
        w.close()
        node.stop()
    node = start_node(data, *flags)[0]
    print(f"  after a restart: data={folder_mib(data)}MiB")
    node.stop()
    zctx.term()
    shutil.rmtree(data, ignore_errors=True)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tools.probe_bounds", description=__doc__.split("\n")[0])
    p.add_argument("what", choices=("topics", "loads"))
    p.add_argument("--topics", type=int, default=100_000)
    p.add_argument("--seconds", type=float, default=None)
    args = list(sys.argv[1:] if argv is None else argv)
    flags: list[str] = []
    if "--" in args:  # the node's flags
        flags = args[args.index("--") + 1:]
        args = args[:args.index("--")]
    a = p.parse_args(args)
    if a.what == "topics":
        topics(a.topics, a.seconds or 5.0, flags)
    else:
        loads(a.seconds or 20.0, flags)
    return 0


if __name__ == "__main__":
    sys.exit(main())
