"""Floods a node with what one hostile client can make it hold, and measures a second client.

    python -m tools.flood unread [--gets 4000] [--seconds 10] [--node-flags "..."]
    python -m tools.flood idle [--connections 1100] [--seconds 10] [--node-nofile N] [--node-flags "..."]
    python -m tools.flood big [--frame-mib 16] [--seconds 10] [--node-flags "..."]
    python -m tools.flood topics [--topics 100000] [--seconds 10] [--node-flags "..."]
    python -m tools.flood loads [--seconds 10] [--node-flags "..."]
    python -m tools.flood watchers [--watchers 1000] [--seconds 10] [--node-nofile N] [--node-flags "..."]
    ledger-bench --only flood_unread,flood_idle,flood_big,flood_topics,flood_loads   (the same, with targets)

`unread`: a DEALER sends `--gets` requests for ~1 MiB pages and never reads a reply (its own
receive queue is 1 message and a 4 KiB kernel buffer, so the node cannot park the replies in the
flooder's process); `idle`: `--connections` DEALER sockets connect and stay silent; `big`: a
DEALER sends frames of `--frame-mib` MiB of junk, 8 in flight, as fast as the node answers (16 MiB
is the default request limit: a larger frame is dropped by ZeroMQ before it is buffered, and
the connection with it); `topics`: a SUB socket subscribes to `--topics` exact watch topics and
reads whatever the node sends it; `loads`: a client starts loads of 1 MiB entries (4 a chunk)
and never finishes them, a new load each time one is refused; `watchers`: `--watchers` SUB
sockets all watch the context the second client appends to, and read what comes (at nice 19:
real watchers are other machines, here they share two cores with the node), so every append
fans out to all of them (up to `--max-watchers-per-context`; the rest are refused).

The node is started here (fresh data folder, --node-flags), the flood runs in a process of its
own (`python -m tools.flood _flood KIND OPTIONS ADDRESS PUB`), and meanwhile a well-behaved
client appends one 256-byte entry at a time, before the flood and during it. Prints the node's
RSS (start, peak, one second after the flood), the second client's append p50/p99, what the
flooder did and the node's status counters, as JSON. Loopback only; bounded in count and time.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import zmq

from protocol import codec
from protocol import watch as wire
from protocol.client import Client
from protocol.errors import LedgerError
from tools import launch
from tools.bench import Proc, _raise_fd_limit, start_node

PAGE_CONTEXT = "flood-pages"
PAGE_ENTRIES = 1000
PAGE_PAYLOAD = 1000  # bytes: a page of 1,000 entries is a ~1.1 MiB get reply
LOAD_ENTRIES = 64  # 1 MiB entries per load, staged 4 a chunk
LOAD_CHUNK = 4
KINDS = ("unread", "idle", "big", "topics", "loads", "watchers")
GOOD_CONTEXT = "flood-good"  # what the second client appends to


@dataclass(frozen=True)
class Opts:
    """How hard each flood pushes and for how long the second client is timed."""

    seconds: float = 10.0
    gets: int = 4000
    connections: int = 1100
    frame_mib: float = 16.0
    in_flight: int = 8  # big: junk frames sent before waiting for an answer
    topics: int = 100_000
    watchers: int = 1000
    node_flags: tuple[str, ...] = ()
    node_nofile: int | None = None
    before_seconds: float = 2.0


# -- the floods (each runs in the flooder process) ---------------------------------------------
#
# A flood gets the node's addresses, the options, an event set when it must stop, a dict of
# counts it fills, and `ready` to call once the flood is under way; it returns when stopped.

Flood = Callable[[str, str, Opts, threading.Event, dict[str, Any], Callable[[], None]], None]


def _dealer(zctx: zmq.Context[Any], address: str) -> zmq.Socket[Any]:
    s = zctx.socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    s.connect(address)
    return s


def flood_unread(address: str, pub: str, o: Opts, stop: threading.Event, counts: dict[str, Any],
                 ready: Callable[[], None]) -> None:
    zctx: zmq.Context[Any] = zmq.Context()
    s = zctx.socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    s.setsockopt(zmq.RCVHWM, 1)
    s.setsockopt(zmq.RCVBUF, 4096)
    s.setsockopt(zmq.SNDHWM, o.gets + 1)
    s.connect(address)
    counts["sent"] = 0
    try:
        for i in range(o.gets):
            s.send(codec.encode_request("get", i + 1, {"context": PAGE_CONTEXT, "after": 0, "limit": PAGE_ENTRIES}))
            counts["sent"] += 1
        ready()
        stop.wait()  # hold the connection (never reading) until the measurement ends
    finally:
        s.close(linger=0)
        zctx.term()


def flood_big(address: str, pub: str, o: Opts, stop: threading.Event, counts: dict[str, Any],
              ready: Callable[[], None]) -> None:
    zctx: zmq.Context[Any] = zmq.Context()
    s = _dealer(zctx, address)
    s.setsockopt(zmq.RCVTIMEO, 200)
    s.setsockopt(zmq.SNDHWM, o.in_flight + 1)
    frame = os.urandom(1 << 16) * int(o.frame_mib * 16)  # junk: it fails to decode at once
    counts.update(sent=0, answered=0, frame_mib=o.frame_mib)
    in_flight = 0
    ready()
    try:
        while not stop.is_set():
            while in_flight < o.in_flight:
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
        zctx.term()


def flood_idle(address: str, pub: str, o: Opts, stop: threading.Event, counts: dict[str, Any],
               ready: Callable[[], None]) -> None:
    # DEALER sockets that complete ZeroMQ's handshake and then never send: idle clients as a
    # real client library leaves them (a bare TCP connection is closed by the node after 5 s)
    _raise_fd_limit(3 * o.connections + 64)
    zctx: zmq.Context[Any] = zmq.Context()
    zctx.set(zmq.MAX_SOCKETS, o.connections + 64)
    socks = []
    try:
        for _ in range(o.connections):
            socks.append(_dealer(zctx, address))
        counts["opened"] = len(socks)
        ready()
        stop.wait()
    finally:
        for s in socks:
            s.close(linger=0)
        zctx.term()


def flood_topics(address: str, pub: str, o: Opts, stop: threading.Event, counts: dict[str, Any],
                 ready: Callable[[], None]) -> None:
    zctx: zmq.Context[Any] = zmq.Context()
    s = zctx.socket(zmq.SUB)
    s.setsockopt(zmq.LINGER, 0)
    s.setsockopt(zmq.SNDHWM, 0)  # else SUB drops subscriptions past 1000 queued
    s.connect(pub)
    for i in range(o.topics):
        s.setsockopt(zmq.SUBSCRIBE, wire.topic(f"t{i}"))
    counts.update(subscribed=o.topics, received=0)
    ready()
    try:
        while not stop.is_set():
            if s.poll(100):
                s.recv_multipart()
                counts["received"] += 1
    finally:
        s.close(linger=0)
        zctx.term()


def flood_watchers(address: str, pub: str, o: Opts, stop: threading.Event, counts: dict[str, Any],
                   ready: Callable[[], None]) -> None:
    os.nice(19)
    _raise_fd_limit(2 * o.watchers + 64)
    zctx: zmq.Context[Any] = zmq.Context()
    zctx.set(zmq.MAX_SOCKETS, o.watchers + 64)
    socks = []
    poller = zmq.Poller()
    counts.update(subscribed=0, greeted=0, received=0)
    try:
        for _ in range(o.watchers):
            s = zctx.socket(zmq.SUB)
            s.setsockopt(zmq.LINGER, 0)
            s.setsockopt(zmq.SUBSCRIBE, wire.topic(GOOD_CONTEXT))
            s.connect(pub)
            socks.append(s)
            poller.register(s, zmq.POLLIN)
        counts["subscribed"] = len(socks)
        ready()
        greeted: set[Any] = set()
        while not stop.is_set():
            for s, _ in poller.poll(100):
                while True:
                    try:
                        s.recv_multipart(zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    counts["received"] += 1
                    greeted.add(s)
        counts["greeted"] = len(greeted)  # watchers that got at least one message (a greeting, or a refusal)
    finally:
        for s in socks:
            s.close(linger=0)
        zctx.term()


def load_entries(n: int) -> tuple[list[dict[str, Any]], bytes]:
    """`n` entries of 1 MiB of a context "flood" as a writer made them (wire form), and their root."""
    from node.ledger import Ledger
    from node.storage import MemoryKV
    from protocol.entry import decode_entry

    src = Ledger(MemoryKV(), node_id="src", sync_meta=False)
    entries = [decode_entry(src.append(codec.Append("flood", "", os.urandom(1 << 20), {})).blobs[0]).to_wire()
               for _ in range(n)]
    return entries, src.head("flood")["root"]


def flood_loads(address: str, pub: str, o: Opts, stop: threading.Event, counts: dict[str, Any],
                ready: Callable[[], None]) -> None:
    entries, root = load_entries(LOAD_ENTRIES)
    counts.update(loads=0, staged=0, refused=0, codes={})
    ready()
    with Client(address, timeout=30.0) as c:
        while not stop.is_set():
            counts["loads"] += 1
            for i in range(0, LOAD_ENTRIES, LOAD_CHUNK):
                try:
                    c.call("load", retry=False, context="flood", load_id=f"L{counts['loads']}", size=1000,
                           root=root, entries=entries[i:i + LOAD_CHUNK])
                    counts["staged"] += 1
                except LedgerError as exc:  # the bounds at work: a new load, at once
                    counts["refused"] += 1
                    counts["codes"][exc.code] = counts["codes"].get(exc.code, 0) + 1
                    break
                if stop.is_set():
                    break


FLOODS: dict[str, Flood] = {"unread": flood_unread, "idle": flood_idle, "big": flood_big,
                            "topics": flood_topics, "loads": flood_loads, "watchers": flood_watchers}


def flooder_main(kind: str, opts_json: str, address: str, pub: str) -> int:
    """The flooder process: one JSON line when the flood is under way, one with its counts once
    stdin has a line or closes (the measurer is done, or gone)."""
    o = Opts(**json.loads(opts_json))
    stop = threading.Event()
    counts: dict[str, Any] = {}

    def ready() -> None:
        print(json.dumps({"ready": True}), flush=True)

    def watch_stdin() -> None:
        sys.stdin.readline()
        stop.set()

    threading.Thread(target=watch_stdin, daemon=True).start()
    FLOODS[kind](address, pub, o, stop, counts, ready)
    print(json.dumps(counts), flush=True)
    return 0


class Flooder:
    """A flood in its own process, so that its work is never timed with the second client's."""

    def __init__(self, kind: str, o: Opts, node: Proc, timeout: float = 120.0) -> None:
        opts = json.dumps(asdict(o))
        self.popen = subprocess.Popen(launch.tool_command("tools.flood", "_flood", kind, opts, node.address, node.pub),
                                      stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        line = self._line(timeout)
        if not line.get("ready"):
            self.stop()
            raise RuntimeError(f"the {kind} flooder did not start")

    def _line(self, timeout: float) -> dict[str, Any]:
        out: list[bytes] = []
        t = threading.Thread(target=lambda: out.append(self.popen.stdout.readline()), daemon=True)  # type: ignore[union-attr]
        t.start()
        t.join(timeout)
        return json.loads(out[0]) if out and out[0].strip() else {}

    def stop(self) -> dict[str, Any]:
        """Stop the flood; what the flooder did (empty if it could not say)."""
        counts: dict[str, Any] = {}
        try:
            assert self.popen.stdin is not None
            self.popen.stdin.write(b"stop\n")
            self.popen.stdin.close()
            counts = self._line(30.0)
        except (OSError, ValueError):
            pass
        try:
            self.popen.wait(10)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait(10)
        return counts


# -- the measurement (in the measuring process) -----------------------------------------------

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


def measure_appends(address: str, seconds: float, node: Proc | None = None) -> dict[str, Any]:
    """A well-behaved client: one 256-byte append at a time, for `seconds` (and the node's CPU
    per append meanwhile, given the node)."""
    lat: list[float] = []
    error = None
    cpu0 = node.cpu_s() if node is not None else float("nan")
    with Client(address, timeout=max(5.0, seconds), retries=0) as c:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            t0 = time.perf_counter()
            try:
                c.append(GOOD_CONTEXT, b"x" * 256, key="facts", dedup_id=f"g{len(lat)}".encode())
            except LedgerError as exc:  # not served at all (locked out): that is the figure
                error = str(exc)
                break
            lat.append(time.perf_counter() - t0)
    cpu = node.cpu_s() - cpu0 if node is not None else float("nan")
    lat.sort()
    return {
        "error": error,
        "appends": len(lat),
        "node_cpu_us_per_append": round(cpu / len(lat) * 1e6) if lat and cpu == cpu else None,
        "p50_ms": round(statistics.median(lat) * 1000, 3) if lat else None,
        "p99_ms": round(lat[min(len(lat) - 1, int(len(lat) * 0.99))] * 1000, 3) if lat else None,
    }


def _folder_mib(d: str) -> float:
    return round(sum(os.path.getsize(os.path.join(d, f)) for f in os.listdir(d)) / (1 << 20), 1)


def _prepare(kind: str, c: Client) -> None:
    if kind == "unread":
        for _ in range(PAGE_ENTRIES // 500):
            c.call("append_batch", context=PAGE_CONTEXT,
                   entries=[{"payload": b"p" * PAGE_PAYLOAD, "key": "facts"} for _ in range(500)])


def _taken_in(kind: str, o: Opts, c: Client, timeout: float = 60.0) -> float:
    """Seconds until the node has taken the flood in (the topics subscribed, the connections
    accepted or refused), before timing."""
    t0 = time.monotonic()
    if kind in ("topics", "idle", "watchers"):
        while time.monotonic() < t0 + timeout:
            st = c.call("status")
            if kind == "watchers" and st.get("watchers", 0) + st.get("watchers_refused", 0) >= o.watchers:
                break
            if kind == "topics" and st.get("watched_contexts", 0) + st.get("watch_topics_refused", 0) >= o.topics:
                break
            if kind == "idle" and st["connections_peak"] + st["connections_refused"] >= o.connections:
                break
            time.sleep(0.2)
    else:
        time.sleep(1.0)
    return round(time.monotonic() - t0, 2)


RSS_SLACK_MIB = 64  # ZeroMQ's connection buffers, the write buffer, the interpreter's free lists
P50_MS, P99_MS = 5.0, 50.0  # issue #12: the second client's appends under any one flood


def rss_bound_mib(start_mib: float, status: dict[str, Any]) -> float:
    """What one hostile client may add to a node's RSS (README, "Limits"): the hot tail filling up,
    its unread replies, one request being read by ZeroMQ and one being decoded, the requests held
    while storage is behind (up to the write buffer again), and some slack."""
    held = (status.get("hot_limit", 64 << 20) + status["max_client_queue"] + 2 * status["max_request"]
            + (status.get("config") or {}).get("write-buffer", 16 << 20))
    return round(start_mib + held / (1 << 20) + RSS_SLACK_MIB, 1)


def verdict(out: dict[str, Any]) -> dict[str, Any]:
    """The issue's targets against one flood's figures."""
    d = out["during"]
    return {
        "p50_ms": {"value": d["p50_ms"], "target": f"<= {P50_MS:g}", "met": d["p50_ms"] is not None
                   and d["p50_ms"] <= P50_MS},
        "p99_ms": {"value": d["p99_ms"], "target": f"<= {P99_MS:g}", "met": d["p99_ms"] is not None
                   and d["p99_ms"] <= P99_MS},
        "rss_peak_mib": {"value": out["rss_peak_mib"], "target": f"<= {out['rss_bound_mib']}",
                         "met": out["rss_peak_mib"] <= out["rss_bound_mib"]},
        "node_alive": {"value": out["node_alive"], "target": "yes", "met": out["node_alive"]},
    }


STATUS_KEYS = ("client", "max_client", "connections", "watch", "watched", "max_watch", "loads", "max_request", "hot_")


def measure(kind: str, o: Opts, workdir: str | None = None) -> dict[str, Any]:
    """One flood against a fresh node: the second client before and during it, the node's RSS."""
    if kind not in FLOODS:
        raise ValueError(f"unknown flood {kind!r}")
    work = tempfile.mkdtemp(prefix=f"flood-{kind}-", dir=workdir)
    data = os.path.join(work, "data")
    node, _ = start_node(data, *o.node_flags, nofile=o.node_nofile)
    out: dict[str, Any] = {"what": kind, "node_flags": list(o.node_flags), "node_nofile": o.node_nofile}
    flooder: Flooder | None = None
    sampler = RssSampler(node)
    try:
        with Client(node.address, timeout=30.0) as c:
            _prepare(kind, c)
            out["before"] = measure_appends(node.address, o.before_seconds)
            out["rss_start_mib"] = round(node.rss_mb(), 1)
            sampler.start()
            flooder = Flooder(kind, o, node)
            out["settle_s"] = _taken_in(kind, o, c)
            out["during"] = measure_appends(node.address, o.seconds, node)
            out["rss_peak_mib"] = round(max(sampler.peak, node.rss_mb()), 1)
            out["rss_during_end_mib"] = round(node.rss_mb(), 1)
            st = c.call("status")
            out["rss_bound_mib"] = rss_bound_mib(out["rss_start_mib"], st)
            out["status"] = {k: v for k, v in st.items()
                             if k.startswith(STATUS_KEYS) and k != "watchers_by_context"}
            out["flood"] = flooder.stop()
            flooder = None
            sampler.stopping.set()
            time.sleep(1.0)
            out["rss_after_mib"] = round(node.rss_mb(), 1)
            try:
                c.call("ping", retry=False)
                out["node_alive"] = node.popen.poll() is None
            except LedgerError:
                out["node_alive"] = False
        if kind == "loads":
            out["data_mib"] = _folder_mib(data)
            node.stop()
            node, _ = start_node(data, *o.node_flags, nofile=o.node_nofile)
            out["data_mib_after_restart"] = _folder_mib(data)  # staged data of abandoned loads is gone
    finally:
        sampler.stopping.set()
        if flooder is not None:
            flooder.stop()
        node.stop()
        shutil.rmtree(work, ignore_errors=True)
    b, d = out["before"], out["during"]
    if b["p50_ms"] and d["p50_ms"]:
        out["p50_ratio"] = round(d["p50_ms"] / b["p50_ms"], 2)
        out["p99_ratio"] = round(d["p99_ms"] / b["p99_ms"], 2)
    out["targets"] = verdict(out)
    return out


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["_flood"]:
        return flooder_main(*args[1:5])
    p = argparse.ArgumentParser(prog="python -m tools.flood", description=__doc__.split("\n\n")[0])
    p.add_argument("what", choices=KINDS)
    p.add_argument("--frame-mib", type=float, default=Opts.frame_mib)
    p.add_argument("--in-flight", type=int, default=Opts.in_flight, help="big: frames sent ahead of answers")
    p.add_argument("--gets", type=int, default=Opts.gets)
    p.add_argument("--connections", type=int, default=Opts.connections)
    p.add_argument("--topics", type=int, default=Opts.topics)
    p.add_argument("--watchers", type=int, default=Opts.watchers)
    p.add_argument("--seconds", type=float, default=Opts.seconds)
    p.add_argument("--node-nofile", type=int, help="the node's open-files limit (soft and hard)")
    p.add_argument("--node-flags", default="", help="flags for the node, in one string")
    a = p.parse_args(args)
    if not 1 <= a.gets <= 100_000 or not 1 <= a.connections <= 20_000 or not 1 <= a.seconds <= 120:
        p.error("bounds: --gets 1..100000, --connections 1..20000, --seconds 1..120")
    if not 0.0625 <= a.frame_mib <= 64 or not 1 <= a.topics <= 1_000_000 or not 1 <= a.in_flight <= 10_000:
        p.error("bounds: --frame-mib 0.0625..64, --topics 1..1000000, --in-flight 1..10000")
    if not 1 <= a.watchers <= 8000:
        p.error("bounds: --watchers 1..8000")
    o = Opts(seconds=a.seconds, in_flight=a.in_flight, gets=a.gets, connections=a.connections, frame_mib=a.frame_mib, topics=a.topics,
             watchers=a.watchers, node_flags=tuple(shlex.split(a.node_flags)), node_nofile=a.node_nofile)
    print(json.dumps(measure(a.what, o), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
