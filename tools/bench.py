"""ledger-bench: the ledger side by side with a bare pyzmq server and Redis Streams.

Every system runs in its own process on loopback, started here on free ports,
and is driven from this process one scenario slice at a time, interleaved over
several rounds, so that a noisy machine moves all of them alike. Before each
slice it waits (at most 3 s) until the machine is quiet, so no slice is timed
while the previous one's leftovers (compactions, flushes) share the cores. The report
gives each scenario's median throughput and latency percentiles, and the
ratios the targets are stated in (medians of per-round ratios).

Scenarios (256-byte payloads):
  raw_echo_seq, raw_echo_pipelined   a bare ROUTER doing msgpack decode, one SHA-256,
                                     msgpack reply: the transport's limit for a Python node
  append_seq, append_pipelined       the ledger, one request in flight / 1,000 in flight
  append_batch                       batches of 1,000 entries (entries per second)
  append_sync_pipelined              the ledger in --durability sync, 1,000 in flight
  get_one, get_tail100               random single-entry reads among recent entries; last 100
  redis_xadd_seq, redis_xadd_pipelined, redis_xadd_fsync_pipelined
                                     Redis Streams through redis-py (when redis-server is on PATH)
  memory                             node RSS with 1,000,000 entries in 1,000 contexts, and the
                                     time from start to serving them again after a restart
  watch_latency                      appends paced at 1,000/s, 10 watchers (Client.watch) in another
                                     process: time from the append's acknowledgement at the appender
                                     to each watcher's receipt (ops = deliveries, entry x watcher)
  append_pipelined_watched           append_pipelined into a context with 1 stalled watcher (a SUB
                                     socket that never reads, small RCVHWM) and 10 active watchers
  watch_fanout                       1,000 watchers over 100 contexts (10 each) on a node of its own;
                                     every watcher must get every entry of its context once, in
                                     order (ops = deliveries per second, latency = submit to receipt)
  replication_lag                    a 3-node mesh (--heartbeat-ms 500); the writer gets pipelined
                                     appends (1,000 in flight); a Client.watch on each follower, in a
                                     helper process, notes when the follower has each entry: lag = that
                                     minus the append's acknowledgement at the appender (ops = entries
                                     held by both followers per second, first append to last receipt)
  append_pipelined_replicated        append_pipelined on that mesh's writer (2 followers), run next
                                     to append_pipelined in every round
  catch_up                           a follower of another 3-node mesh is killed (-9), misses
                                     200,000 entries (append_batch), is restarted: entries per second
                                     from its restart until its head equals the writer's
  heartbeat_bytes_10k                (a figure, not a scenario) the heartbeat's size on a 2-node mesh
                                     with 10,000 contexts in sync

Floods (issue #12; only when named, e.g. --only flood for all five; tools/flood.py): each on a
node of its own, one hostile client in a process of its own while a well-behaved client appends
one 256-byte entry at a time; its p50/p99 before and during the flood, the node's RSS (start,
peak, after) against the targets p50 <= 5 ms, p99 <= 50 ms, RSS under README's bound:
  flood_unread                       4,000 gets of ~1.1 MiB pages, never read
  flood_idle                         1,100 idle connections (DEALERs that never send)
  flood_big                          junk frames just under the 16 MiB request limit, 8 in flight
  flood_topics                       100,000 watch topics on one SUB socket
  flood_loads                        loads of 1 MiB entries started and never finished
  flood_watchers                     1,000 watchers of the context the second client appends to
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import msgpack
import zmq

from protocol import watch as wire
from protocol.client import Client, Watch
from protocol.errors import LedgerError, NotFound
from tools import launch

SCENARIOS = (
    "raw_echo_seq", "raw_echo_pipelined", "append_seq", "append_pipelined", "append_batch",
    "append_sync_pipelined", "get_one", "get_tail100", "redis_xadd_seq", "redis_xadd_pipelined",
    "redis_xadd_fsync_pipelined", "watch_latency", "append_pipelined_watched", "watch_fanout",
    "replication_lag", "append_pipelined_replicated", "catch_up",
)
WATCH_SCENARIOS = ("watch_latency", "append_pipelined_watched")
MESH_SCENARIOS = ("replication_lag", "append_pipelined_replicated")  # on one 3-node mesh, in the rounds
# what --only accepts besides SCENARIOS: figures that are not a throughput scenario
OTHER_FIGURES = ("memory", "heartbeat_bytes_10k")
FLOOD_FIGURES = ("flood_unread", "flood_idle", "flood_big", "flood_topics", "flood_loads", "flood_watchers")  # --only flood: all
PAYLOAD_SIZE = 256
WINDOW = 1000
BATCH = 1000
WATCH_RATE = 1000  # appends per second in watch_latency
WATCHERS_PER_CONTEXT = 10
LATENCY_CONTEXT = "watch-latency"
WATCHED_CONTEXT = "watched"
STALLED_RCVHWM = 10  # messages the stalled watcher's SUB socket queues before ZeroMQ stops reading
STALLED_RCVBUF = 4096  # bytes of kernel receive buffer, so the stall reaches the node quickly
FANOUT_PROCS = 2  # processes the fan-out watchers are split over (one poller each)


# -- the bare pyzmq baseline server ------------------------------------------------

def echo_server(port_file: str) -> None:
    """The least any node must do per request: decode, hash once, reply."""
    ctx = zmq.Context()
    s = ctx.socket(zmq.ROUTER)
    s.setsockopt(zmq.LINGER, 0)
    s.setsockopt(zmq.SNDHWM, 10_000)
    s.setsockopt(zmq.RCVHWM, 10_000)
    port = s.bind_to_random_port("tcp://127.0.0.1")
    with open(port_file + ".tmp", "w") as f:
        f.write(str(port))
    os.replace(port_file + ".tmp", port_file)
    unpackb = msgpack.unpackb
    packb = msgpack.packb
    sha = hashlib.sha256
    while True:
        ident, body = s.recv_multipart()
        m = unpackb(body)
        h = sha(m["payload"]).digest()
        s.send_multipart([ident, packb({"v": 1, "id": m["id"], "ok": True, "hash": h})])


# -- processes ---------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    address: str = ""
    pub: str = ""  # a ledger-node's watch (XPUB) address

    def rss_mb(self) -> float:
        try:
            with open(f"/proc/{self.popen.pid}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        return int(line.split()[1]) / 1024
        except OSError:
            pass
        return float("nan")

    def cpu_s(self) -> float:
        """User + system CPU seconds the process has used so far (all its threads)."""
        try:
            with open(f"/proc/{self.popen.pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        except (OSError, IndexError, ValueError):
            return float("nan")

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(30)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(10)


def start_echo(workdir: str) -> Proc:
    port_file = os.path.join(workdir, "echo.port")
    p = subprocess.Popen(launch.tool_command("tools.bench", "_echo", port_file),
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 15
    while not os.path.exists(port_file):
        if p.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError("the echo server did not start")
        time.sleep(0.02)
    with open(port_file) as f:
        return Proc("echo", p, f"tcp://127.0.0.1:{f.read().strip()}")


def start_node(data: str, *flags: str, listen: str = "127.0.0.1:0", log_path: str | None = None,
               name: str = "ledger", nofile: int | None = None, timeout: float = 60.0) -> tuple[Proc, float]:
    """Start a ledger-node (tools/launch.py); returns it and the seconds until its ready line.

    Its output after the ready line is discarded, or appended to `log_path`. `nofile` sets
    the node's open-files limit (soft and hard)."""
    t0 = time.monotonic()

    def limit() -> None:
        import resource

        if nofile is not None:
            resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))

    try:
        p, _out, ready = launch.start(["--data", data, "--listen", listen, "--log-level", "warning", *flags],
                                      timeout=timeout, keep=False, text=False, log_path=log_path,
                                      preexec_fn=limit if nofile else None)
    except launch.NodeDidNotStart as exc:
        raise RuntimeError(f"{name} did not start: {exc}") from None
    return Proc(name, p, ready.router, ready.pub), time.monotonic() - t0


def start_redis(workdir: str, fsync: bool) -> Proc | None:
    exe = shutil.which("redis-server")
    if exe is None:
        return None
    port = free_port()
    d = tempfile.mkdtemp(prefix="redis-", dir=workdir)
    args = [exe, "--port", str(port), "--bind", "127.0.0.1", "--dir", d, "--save", "",
            "--protected-mode", "yes", "--daemonize", "no", "--logfile", ""]
    args += ["--appendonly", "yes", "--appendfsync", "always"] if fsync else ["--appendonly", "no"]
    p = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    import redis

    r = redis.Redis(host="127.0.0.1", port=port)
    deadline = time.monotonic() + 15
    while True:
        try:
            r.ping()
            break
        except redis.exceptions.ConnectionError:
            if p.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("redis-server did not start") from None
            time.sleep(0.05)
    r.close()
    return Proc("redis-fsync" if fsync else "redis", p, f"{port}")


# -- drivers -------------------------------------------------------------------------

@dataclass
class Sample:
    ops: int
    seconds: float
    latencies: list[float] = field(default_factory=list)  # seconds per request

    @property
    def ops_per_s(self) -> float:
        return self.ops / self.seconds if self.seconds > 0 else 0.0


class Dealer:
    """A bare DEALER driver, the same for the echo server and the ledger."""

    def __init__(self, zctx: zmq.Context[Any], address: str) -> None:
        self.s = zctx.socket(zmq.DEALER)
        self.s.setsockopt(zmq.LINGER, 0)
        self.s.setsockopt(zmq.SNDHWM, 100_000)
        self.s.setsockopt(zmq.RCVHWM, 100_000)
        self.s.setsockopt(zmq.RCVTIMEO, 30_000)
        self.s.connect(address)
        self.next_id = 1

    def close(self) -> None:
        self.s.close(linger=0)

    def frames(self, n: int, make: Callable[[int], dict[str, Any]]) -> list[bytes]:
        out = []
        for _ in range(n):
            m = make(self.next_id)
            m["v"] = 1
            m["id"] = self.next_id
            self.next_id += 1
            out.append(msgpack.packb(m, use_bin_type=True))
        return out

    def request(self, m: dict[str, Any]) -> bytes:
        """One request, its raw reply (RuntimeError unless ok)."""
        (frame,) = self.frames(1, lambda i: dict(m))
        self.s.send(frame)
        reply: bytes = self.s.recv()
        if b"\xa2ok\xc3" not in reply:
            raise RuntimeError(f"request failed: {msgpack.unpackb(reply)}")
        return reply

    def seq(self, frames: Sequence[bytes], check: bool = True) -> Sample:
        s = self.s
        lat = []
        pc = time.perf_counter
        t0 = pc()
        for f in frames:
            t = pc()
            s.send(f)
            reply = s.recv()
            lat.append(pc() - t)
            if check and b"\xa2ok\xc3" not in reply:
                raise RuntimeError(f"request failed: {msgpack.unpackb(reply)}")
        return Sample(len(frames), pc() - t0, lat)

    def pipelined(self, frames: Sequence[bytes], window: int = WINDOW, count_per_reply: int = 1) -> Sample:
        s = self.s
        pc = time.perf_counter
        sent_at: list[float] = []
        lat = []
        n = len(frames)
        sent = got = 0
        t0 = pc()
        while got < n:
            while sent < n and sent - got < window:
                sent_at.append(pc())
                s.send(frames[sent])
                sent += 1
            reply = s.recv()
            lat.append(pc() - sent_at[got])
            got += 1
            if b"\xa2ok\xc3" not in reply:
                raise RuntimeError(f"request failed: {msgpack.unpackb(reply)}")
        return Sample(n * count_per_reply, pc() - t0, lat)


def redis_seq(r: Any, n: int, payload: bytes) -> Sample:
    lat = []
    pc = time.perf_counter
    t0 = pc()
    for _ in range(n):
        t = pc()
        r.xadd("bench", {"payload": payload})
        lat.append(pc() - t)
    return Sample(n, pc() - t0, lat)


def redis_pipelined(r: Any, n: int, payload: bytes) -> Sample:
    pc = time.perf_counter
    lat = []
    t0 = pc()
    done = 0
    while done < n:
        k = min(WINDOW, n - done)
        t = pc()
        pipe = r.pipeline(transaction=False)
        for _ in range(k):
            pipe.xadd("bench", {"payload": payload})
        pipe.execute()
        lat.append((pc() - t) / k)
        done += k
    return Sample(n, pc() - t0, lat)


# -- watchers (helper processes) -----------------------------------------------------------
#
# `python -m tools.bench _watchers SPEC` runs watchers in a process of their own, so that
# their reading never runs in (and is never timed as part of) the appender's process. SPEC (JSON):
#   address, pub            the node's request and watch addresses
#   nodes                   instead: [{"address", "pub", "label"}, ...]: the same watchers on each of
#                           these nodes (a mesh's followers), still one poller; reports name the node
#   contexts, per_context   `per_context` watchers (Client.watch) of each context, one poller
#   stalled                 instead: plain SUB sockets that read the node's greeting and then
#                           never read again (small RCVHWM and kernel buffer)
#   record                  contexts whose receipt times (seq, monotonic ns) are sent back
#   rcvhwm                  the watchers' RCVHWM (default: Watch's own)
# The helper prints one JSON line when every watcher is subscribed, then answers JSON lines
# on stdin: {"cmd": "wait", "until": {context: seq}, "timeout": s} -> once every watcher of
# those contexts has delivered up to seq (or on timeout) one JSON line with what each watcher
# delivered since the last answer. It exits when stdin closes (its parent is gone, or is done
# with it) or, unless stalled, on {"cmd": "quit"}.


@dataclass
class _WatcherState:
    watch: Watch
    context: str
    record: bool
    next_seq: int  # the seq this watcher must deliver next: anything else is an error
    node: str = ""  # the node watched, when the helper watches several
    errors: int = 0
    count: int = 0
    first_ns: int = 0
    last_ns: int = 0
    times: list[tuple[int, int]] = field(default_factory=list)

    def took(self, entries: Sequence[Any], now: int) -> None:
        for e in entries:
            if e.seq != self.next_seq or e.context != self.context:
                self.errors += 1
            self.next_seq = e.seq + 1
            if self.record:
                self.times.append((e.seq, now))
        if entries:
            self.count += len(entries)
            self.first_ns = self.first_ns or now
            self.last_ns = now

    def report(self) -> dict[str, Any]:
        w = self.watch
        out = {"context": self.context, "node": self.node, "last": w.last_seq, "count": self.count, "errors": self.errors,
               "first_ns": self.first_ns, "last_ns": self.last_ns, "times": self.times,
               "refills": w.refills, "duplicates": w.cursor.duplicates, "dropped_ahead": w.cursor.dropped_ahead,
               "outages": w.outages}
        self.count, self.first_ns, self.last_ns, self.times = 0, 0, 0, []
        return out


def _raise_fd_limit(want: int) -> None:
    """Sockets are file descriptors (a SUB socket: its TCP connection and a mailbox)."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < want:
        new = want if hard == resource.RLIM_INFINITY else min(want, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))


def _say(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj, separators=(",", ":")) + "\n")
    sys.stdout.flush()


def watchers_main(spec_json: str) -> int:
    spec = json.loads(spec_json)
    contexts: list[str] = spec["contexts"]
    per = int(spec.get("per_context", WATCHERS_PER_CONTEXT))
    nodes: list[dict[str, str]] = spec.get("nodes") or [{"address": spec["address"], "pub": spec["pub"], "label": ""}]
    n = len(contexts) * per * len(nodes)
    _raise_fd_limit(4 * n + 256)
    zctx: zmq.Context[Any] = zmq.Context()
    zctx.set(zmq.MAX_SOCKETS, n + 64)
    stdin_fd = sys.stdin.fileno()
    try:
        if spec.get("stalled"):
            subs = []
            for c in contexts:
                for _ in range(per):
                    s = zctx.socket(zmq.SUB)
                    s.setsockopt(zmq.LINGER, 0)
                    s.setsockopt(zmq.RCVHWM, STALLED_RCVHWM)
                    s.setsockopt(zmq.RCVBUF, STALLED_RCVBUF)
                    s.connect(spec["pub"])
                    s.setsockopt(zmq.SUBSCRIBE, wire.topic(c))
                    if not s.poll(15_000, zmq.POLLIN):  # the greeting: the node counts this watcher
                        raise RuntimeError(f"no greeting for the stalled watcher of {c!r}")
                    s.recv_multipart()
                    subs.append(s)  # ... and never read again
            _say({"ready": True, "watchers": len(subs)})
            while os.read(stdin_fd, 65536):  # until the parent closes our stdin
                pass
            for s in subs:
                s.close(linger=0)
            return 0
        record = set(spec.get("record", ()))
        options: dict[str, Any] = {"rcvhwm": int(spec["rcvhwm"])} if spec.get("rcvhwm") else {}
        states: list[_WatcherState] = []
        by_sock: dict[Any, _WatcherState] = {}
        poller = zmq.Poller()
        for node in nodes:
            client = Client(node["address"], timeout=10.0, zctx=zctx)
            for c in contexts:
                for _ in range(per):
                    w = client.watch(c, after=spec.get("after"), pub_address=node["pub"], **options)
                    st = _WatcherState(w, c, c in record, w.last_seq + 1, node.get("label", ""))
                    states.append(st)
                    by_sock[w.socket] = st
                    poller.register(w.socket, zmq.POLLIN)
        poller.register(stdin_fd, zmq.POLLIN)
        _say({"ready": True, "watchers": len(states)})
        buf = b""
        until: dict[str, int] | None = None
        deadline = started = 0.0
        mono = time.monotonic_ns
        while True:
            for sock, _ in poller.poll(50):
                if sock == stdin_fd:
                    chunk = os.read(stdin_fd, 65536)
                    if not chunk:
                        return 0
                    buf += chunk
                    while b"\n" in buf:
                        line, buf = buf.split(b"\n", 1)
                        cmd = json.loads(line)
                        if cmd["cmd"] == "quit":
                            return 0
                        until = {str(k): int(v) for k, v in cmd["until"].items()}
                        started = time.monotonic()
                        deadline = started + float(cmd.get("timeout", 60))
                    continue
                st = by_sock[sock]
                got = st.watch.drain()
                st.took(got, mono())
            if until is not None:
                done = all(st.watch.last_seq >= until[st.context] for st in states if st.context in until)
                if done or time.monotonic() > deadline:
                    _say({"done": done, "elapsed_s": time.monotonic() - started,
                          "watchers": [st.report() for st in states if st.context in until]})
                    until = None
    finally:
        zctx.destroy(linger=0)


class Watchers:
    """A `_watchers` helper process, seen from the benchmark."""

    def __init__(self, workdir: str, name: str, spec: dict[str, Any], ready_timeout: float = 120.0) -> None:
        import queue
        import threading

        self.name = name
        self.contexts = set(spec.get("contexts", ()))
        self.log_path = os.path.join(workdir, f"{name}.log")
        with open(self.log_path, "wb") as err:
            popen = subprocess.Popen(launch.tool_command("tools.bench", "_watchers", json.dumps(spec)),
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err)
        self.proc = Proc(name, popen)
        self._timeout = 60.0
        self._lines: queue.Queue[bytes] = queue.Queue()

        def read() -> None:
            assert popen.stdout is not None
            for line in popen.stdout:
                self._lines.put(line)
            self._lines.put(b"")

        threading.Thread(target=read, daemon=True).start()
        try:
            self.ready = self._reply(ready_timeout)
        except BaseException:
            self.stop(graceful=False)
            raise

    def _reply(self, timeout: float) -> dict[str, Any]:
        import queue

        try:
            line = self._lines.get(timeout=timeout)
        except queue.Empty:
            raise RuntimeError(f"the {self.name} helper did not answer within {timeout:g} s") from None
        if not line:
            with open(self.log_path, errors="replace") as f:
                tail = f.read()[-2000:]
            raise RuntimeError(f"the {self.name} helper exited:\n{tail}")
        out: dict[str, Any] = json.loads(line)
        return out

    def request(self, until: dict[str, int], timeout: float) -> None:
        """Ask for what each watcher of those contexts delivered since the last answer, once all reach `until`."""
        stdin = self.proc.popen.stdin
        assert stdin is not None
        stdin.write(json.dumps({"cmd": "wait", "until": until, "timeout": timeout}).encode() + b"\n")
        stdin.flush()
        self._timeout = timeout

    def answer(self) -> dict[str, Any]:
        return self._reply(self._timeout + 30)

    def wait(self, until: dict[str, int], timeout: float) -> dict[str, Any]:
        self.request(until, timeout)
        return self.answer()

    def stop(self, graceful: bool = True) -> None:
        """Close its stdin (it exits at once when idle), then SIGTERM if it is still there."""
        stdin = self.proc.popen.stdin
        if stdin is not None and not stdin.closed:
            try:
                stdin.close()
            except OSError:
                pass
        if graceful:
            try:
                self.proc.popen.wait(2)
            except subprocess.TimeoutExpired:
                pass
        self.proc.stop()
        if self.proc.popen.stdout is not None:
            self.proc.popen.stdout.close()


def wait_watchers_counted(client: Client, watchers: int, contexts: int, timeout: float = 15.0) -> None:
    """Until the node's watch registry counts `watchers` watchers over `contexts` contexts."""
    deadline = time.monotonic() + timeout
    while True:
        st = client.status()
        got = (st.get("watchers"), st.get("watched_contexts"))
        if got == (watchers, contexts):
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"the node counts (watchers, contexts) = {got}, expected {(watchers, contexts)}")
        time.sleep(0.05)


def join_latencies(reports: Sequence[dict[str, Any]], since: dict[tuple[str, int], int]) -> list[float]:
    """Each watcher's receipt of (context, seq) minus `since[(context, seq)]` (an acknowledgement or
    a submission; both CLOCK_MONOTONIC ns, the same clock in every process), in seconds."""
    lat = []
    for w in reports:
        c = w["context"]
        for seq, t in w["times"]:
            a = since.get((c, seq))
            if a is not None:
                lat.append((t - a) / 1e9)
    return lat


def paced_appends(dealer: Dealer, context: str, n: int, rate: float, payload: bytes,
                  ) -> tuple[float, dict[tuple[str, int], int]]:
    """`n` appends, one at a time, started on a fixed schedule of `rate` per second.

    Returns the seconds taken and each entry's acknowledgement time (monotonic ns) by seq.
    """
    frames = dealer.frames(n, lambda i: {"op": "append", "context": context, "key": "k", "payload": payload})
    s = dealer.s
    mono = time.monotonic_ns
    unpackb = msgpack.unpackb
    acks: dict[tuple[str, int], int] = {}
    step = 1e9 / rate
    t0 = mono()
    for i, f in enumerate(frames):
        wait = t0 + int(i * step) - mono()
        if wait > 0:
            time.sleep(wait / 1e9)
        s.send(f)
        reply = s.recv()
        t = mono()
        m = unpackb(reply)
        if not m.get("ok"):
            raise RuntimeError(f"append failed: {m}")
        acks[(context, m["entry"]["seq"])] = t
    return (mono() - t0) / 1e9, acks


def pipelined_timed(dealer: Dealer, frames: Sequence[bytes], window: int = WINDOW, at: str = "ack",
                    ) -> tuple[Sample, dict[tuple[str, int], int]]:
    """Dealer.pipelined, also noting per entry (monotonic ns) when its append was sent
    (`at="submit"`) or when its acknowledgement was read (`at="ack"`).

    A pipelined appender reads its acknowledgements late (it is busy sending), often after
    the watchers have the entry: submission is the time a delivery latency can start from.
    """
    s = dealer.s
    mono = time.monotonic_ns
    unpackb = msgpack.unpackb
    sent_at: list[int] = []
    lat = []
    times: dict[tuple[str, int], int] = {}
    n = len(frames)
    sent = got = 0
    t0 = mono()
    while got < n:
        while sent < n and sent - got < window:
            sent_at.append(mono())
            s.send(frames[sent])
            sent += 1
        reply = s.recv()
        t = mono()
        lat.append((t - sent_at[got]) / 1e9)
        m = unpackb(reply)
        if not m.get("ok"):
            raise RuntimeError(f"request failed: {m}")
        # replies come in request order
        times[(m["entry"]["context"], m["entry"]["seq"])] = sent_at[got] if at == "submit" else t
        got += 1
    return Sample(n, (mono() - t0) / 1e9, lat), times


def watch_health(reports: Sequence[dict[str, Any]]) -> dict[str, int]:
    """Totals over watchers: ordering errors and what the Watch had to repair."""
    return {k: sum(int(w[k]) for w in reports) for k in ("errors", "refills", "duplicates", "dropped_ahead", "outages")}


# -- meshes --------------------------------------------------------------------------------

MESH_HEARTBEAT_MS = 500  # the node's default, passed explicitly so that the report can say so
LAG_CONTEXT = "replication-lag"
REPLICATED_CONTEXT = "bench"  # append_pipelined_replicated's context, as append_pipelined's
CATCHUP_CONTEXT = "catch-up"
POLL_S = 0.005  # how often a catch-up is checked (a `head` request to the follower)


def hostport(address: str) -> str:
    return address.split("://", 1)[1]


def machine_cpu() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine so far, all cores (/proc/stat)."""
    try:
        with open("/proc/stat") as f:
            # user nice system idle iowait irq softirq steal (guest time is already in user/nice)
            vals = [int(x) for x in f.readline().split()[1:9]]
    except (OSError, ValueError):
        return float("nan"), float("nan")
    tick = os.sysconf("SC_CLK_TCK")
    idle = vals[3] + (vals[4] if len(vals) > 4 else 0)
    return (sum(vals) - idle) / tick, sum(vals) / tick


SETTLE_BUSY_CORES = 0.3  # the machine counts as quiet below this many busy cores ...
SETTLE_SAMPLE_S = 0.1  # ... over a sample this long
SETTLE_MAX_S = 3.0  # and a scenario waits at most this long for it


def settle(max_s: float = SETTLE_MAX_S) -> float:
    """Wait until the machine is quiet, so a scenario is not timed while another one's
    leftovers (LevelDB compactions, a flush, a watcher catching up) share the cores.
    Returns the seconds waited; after `max_s` it goes on anyway."""
    t0 = t1 = time.monotonic()
    busy0, _ = machine_cpu()
    if busy0 != busy0:  # no /proc/stat: nothing to wait for
        return 0.0
    while True:
        time.sleep(SETTLE_SAMPLE_S)
        busy1, _ = machine_cpu()
        t2 = time.monotonic()
        if (busy1 - busy0) / max(t2 - t1, 1e-3) < SETTLE_BUSY_CORES or t2 - t0 >= max_s:
            return t2 - t0
        busy0, t1 = busy1, t2


@dataclass
class MeshMember:
    node_id: str
    data: str
    log_path: str
    seeds: list[str]
    proc: Proc
    ready_s: float


class BenchMesh:
    """ledger-node processes on loopback forming a mesh, started as tests/integration/test_mesh.py
    does: node 1 first, every other node seeded with the previous node's address only (gossip does
    the rest), each with its own `--id` and data folder. Node 1 is the writer of every context the
    benchmark appends to. Their WARNING/ERROR lines go to `<id>.log` in the work folder."""

    def __init__(self, workdir: str, name: str, size: int, zctx: zmq.Context[Any],
                 heartbeat_ms: int = MESH_HEARTBEAT_MS) -> None:
        self.zctx = zctx
        self.flags = ["--heartbeat-ms", str(heartbeat_ms)]
        self.heartbeat_s = heartbeat_ms / 1000.0
        self.members: list[MeshMember] = []
        self._clients: dict[int, Client] = {}
        try:
            for i in range(size):
                node_id = f"{name}-{i + 1}"
                data, log_path = os.path.join(workdir, node_id), os.path.join(workdir, f"{node_id}.log")
                seeds = [hostport(self.members[-1].proc.address)] if self.members else []
                proc, ready_s = self._launch(node_id, data, log_path, seeds)
                self.members.append(MeshMember(node_id, data, log_path, seeds, proc, ready_s))
        except BaseException:
            self.stop()
            raise

    def _launch(self, node_id: str, data: str, log_path: str, seeds: list[str], listen: str = "127.0.0.1:0",
                *extra: str) -> tuple[Proc, float]:
        flags = ["--id", node_id, *self.flags, *extra]
        if seeds:
            flags += ["--peers", ",".join(seeds)]
        return start_node(data, *flags, listen=listen, log_path=log_path, name=node_id)

    @property
    def writer(self) -> MeshMember:
        return self.members[0]

    def client(self, i: int) -> Client:
        c = self._clients.get(i)
        if c is None:
            c = self._clients[i] = Client(self.members[i].proc.address, zctx=self.zctx, timeout=10.0)
        return c

    def _forget_client(self, i: int) -> None:
        c = self._clients.pop(i, None)
        if c is not None:
            c.close()

    def status(self, i: int) -> dict[str, Any]:
        return self.client(i).status()

    def head(self, i: int, context: str) -> tuple[int, bytes] | None:
        try:
            h = self.client(i).head(context)
        except NotFound:
            return None
        return h.size, h.root

    def wait(self, cond: Callable[[], bool], what: str, timeout: float = 60.0, every: float = 0.02) -> float:
        """Poll `cond` until it holds; the seconds that took. RuntimeError on timeout."""
        t0 = time.monotonic()
        while not cond():
            if time.monotonic() - t0 > timeout:
                raise RuntimeError(f"mesh: timed out after {timeout:g} s waiting for {what}")
            time.sleep(every)
        return time.monotonic() - t0

    def formed(self) -> bool:
        ids = {m.node_id for m in self.members}
        for i, m in enumerate(self.members):
            peers = self.status(i)["peers"]
            alive = {p["id"] for p in peers if p["state"] == "alive" and p.get("pub")}
            if alive != ids - {m.node_id}:
                return False
        return True

    def wait_formed(self, timeout: float = 30.0) -> float:
        return self.wait(self.formed, "every node to know every other as alive", timeout, every=0.05)

    def holds(self, context: str, size: int, members: Sequence[int] | None = None) -> bool:
        """Whether those members (default: all) hold `context` at exactly the writer's head, of `size`."""
        want = self.head(0, context)
        if want is None or want[0] != size:
            return False
        return all(self.head(i, context) == want for i in (members or range(len(self.members))))

    def wait_holds(self, context: str, size: int, members: Sequence[int] | None = None,
                   timeout: float = 120.0) -> float:
        return self.wait(lambda: self.holds(context, size, members), f"{context!r} at {size} on every node", timeout)

    def wait_flushed(self, i: int, timeout: float = 30.0) -> float:
        return self.wait(lambda: self.status(i)["pending_writes"] == 0, f"{self.members[i].node_id} to flush",
                         timeout)

    def kill(self, i: int) -> None:
        """kill -9, as a crash would."""
        self._forget_client(i)
        p = self.members[i].proc.popen
        if p.poll() is None:
            p.kill()
            p.wait(10)

    def restart(self, i: int) -> float:
        """Start member i again on its own ports and data; the seconds to its ready line."""
        self._forget_client(i)
        m = self.members[i]
        port = m.proc.address.rpartition(":")[2]
        pub_port = m.proc.pub.rpartition(":")[2]
        m.proc, m.ready_s = self._launch(m.node_id, m.data, m.log_path, m.seeds, f"127.0.0.1:{port}",
                                         "--pub-port", pub_port)
        return m.ready_s

    def log_problems(self, limit: int = 20) -> list[str]:
        """WARNING/ERROR lines the members logged (their log level is warning)."""
        out = []
        for m in self.members:
            try:
                with open(m.log_path, errors="replace") as f:
                    out += [f"{m.node_id}: {line.strip()}" for line in f if " WARNING " in line or " ERROR " in line]
            except OSError:
                pass
        return out[:limit]

    def stop(self) -> None:
        for i in list(self._clients):
            self._forget_client(i)
        for m in self.members:
            m.proc.stop()


class MeshScenarios:
    """replication_lag and append_pipelined_replicated, on one 3-node mesh (a writer, 2 followers).

    Both drive the writer with pipelined appends (WINDOW in flight) from this process, on a DEALER
    of their own. replication_lag appends to LAG_CONTEXT, which one `_watchers` helper process
    watches on both followers (one Client.watch on each): it records when each follower's watcher
    received each seq, this process when the appender read each acknowledgement, both on
    CLOCK_MONOTONIC; the lag is their difference, so nothing is added to the writer's work.
    append_pipelined_replicated is append_pipelined on the writer (no watcher of its context
    anywhere); after each sample it waits, untimed, until both followers hold everything, so no
    scenario starts while they still apply entries.
    """

    def __init__(self, sizes: Sizes, workdir: str, zctx: zmq.Context[Any], payload: bytes, standalone: Proc,
                 notes: list[str], quiet: bool) -> None:
        self.sizes = sizes
        self.workdir = workdir
        self.zctx = zctx
        self.payload = payload
        self.standalone = standalone
        self.notes = notes
        self.quiet = quiet
        self.mesh: BenchMesh | None = None
        self.watchers: Watchers | None = None
        self.dealer: Dealer | None = None
        self.size = {LAG_CONTEXT: 0, REPLICATED_CONTEXT: 0}
        self.lag_by_follower: dict[str, list[float]] = {}
        self.before_ack = 0  # receipts at a follower before the appender had read the acknowledgement
        self.lag_missing = 0
        self.lag_rate: list[float] = []
        self.lag_by_tenth: list[list[float]] = [[] for _ in range(10)]  # by position in the round's burst
        self.followers_done_s: list[float] = []
        self.cpu: dict[str, dict[str, list[float]]] = {}
        self.detail: dict[str, Any] = {}

    def _req(self, context: str) -> Callable[[int], dict[str, Any]]:
        payload = self.payload
        return lambda i: {"op": "append", "context": context, "key": "k", "payload": payload}

    def start(self) -> None:
        t = time.monotonic()
        self.mesh = mesh = BenchMesh(self.workdir, "mesh", 3, self.zctx)
        mesh.wait_formed()
        self.dealer = d = Dealer(self.zctx, mesh.writer.proc.address)
        # warm-up: the writer creates both contexts; both followers hold them before anything is timed
        for c in (LAG_CONTEXT, REPLICATED_CONTEXT):
            d.seq(d.frames(50, self._req(c)))
            self.size[c] = 50
            mesh.wait_holds(c, 50)
        followers = mesh.members[1:]
        self.watchers = Watchers(self.workdir, "lag-watchers", {
            "nodes": [{"address": m.proc.address, "pub": m.proc.pub, "label": m.node_id} for m in followers],
            "contexts": [LAG_CONTEXT], "per_context": 1, "record": [LAG_CONTEXT]})
        for i in range(1, len(mesh.members)):
            wait_watchers_counted(mesh.client(i), 1, 1)
        self.detail["setup_s"] = round(time.monotonic() - t, 2)
        log(f"mesh: 3 nodes formed, lag watchers on {len(followers)} followers in {self.detail['setup_s']} s",
            self.quiet)

    def _cpu(self) -> list[float]:
        assert self.mesh is not None
        return [m.proc.cpu_s() for m in self.mesh.members]

    def measure_standalone(self, fn: Callable[[], Sample]) -> Callable[[], Sample]:
        """`fn` (append_pipelined on the standalone node), noting the node's CPU per append."""
        def run() -> Sample:
            before, mb = self.standalone.cpu_s(), machine_cpu()[0]
            sample = fn()
            c = self.cpu.setdefault("append_pipelined", {})
            c.setdefault("node_cpu_us_per_append", []).append((self.standalone.cpu_s() - before) / sample.ops * 1e6)
            c.setdefault("machine_busy_cores", []).append((machine_cpu()[0] - mb) / sample.seconds)
            return sample
        return run

    def replication_lag(self) -> Sample:
        assert self.dealer is not None and self.watchers is not None
        d, n = self.dealer, self.sizes.pipelined
        frames = d.frames(n, self._req(LAG_CONTEXT))
        first_seq = self.size[LAG_CONTEXT] + 1
        cpu0, m0, w0 = self._cpu(), machine_cpu()[0], self.watchers.proc.cpu_s()
        t0 = time.monotonic_ns()
        appended, acks = pipelined_timed(d, frames, at="ack")
        self.lag_rate.append(appended.ops_per_s)
        self.size[LAG_CONTEXT] += n
        rep = self.watchers.wait({LAG_CONTEXT: self.size[LAG_CONTEXT]}, timeout=120)
        wall = (time.monotonic_ns() - t0) / 1e9
        cpu1, m1, w1 = self._cpu(), machine_cpu()[0], self.watchers.proc.cpu_s()
        c = self.cpu.setdefault("replication_lag", {})
        c.setdefault("writer_cpu_cores", []).append((cpu1[0] - cpu0[0]) / wall)
        c.setdefault("followers_cpu_cores", []).append((sum(cpu1[1:]) - sum(cpu0[1:])) / wall)
        c.setdefault("watchers_cpu_cores", []).append((w1 - w0) / wall)
        c.setdefault("machine_busy_cores", []).append((m1 - m0) / wall)
        reports = rep["watchers"]
        got = sum(int(w["count"]) for w in reports)
        health = watch_health(reports)
        if not rep["done"] or got != n * len(reports) or health["errors"]:
            self.lag_missing += n * len(reports) - got
            self.notes.append(f"replication_lag: the followers' watchers delivered {got} of {n * len(reports)} "
                              f"entries (caught up: {rep['done']}, ordering errors: {health['errors']})")
        lat: list[float] = []
        for w in reports:
            mine = self.lag_by_follower.setdefault(str(w["node"]), [])
            for seq, t in w["times"]:
                a = acks.get((LAG_CONTEXT, seq))
                if a is None:
                    continue
                x = (t - a) / 1e9
                if x < 0:  # the follower had it before the (busy) appender read its acknowledgement
                    self.before_ack += 1
                    x = 0.0
                lat.append(x)
                mine.append(x)
                self.lag_by_tenth[min(9, (seq - first_seq) * 10 // n)].append(x)
        last_ns = max((int(w["last_ns"]) for w in reports if w["last_ns"]), default=t0 + 1)
        return Sample(n, (last_ns - t0) / 1e9, lat)

    def append_pipelined_replicated(self) -> Sample:
        assert self.dealer is not None and self.mesh is not None
        d, n, mesh = self.dealer, self.sizes.pipelined, self.mesh
        frames = d.frames(n, self._req(REPLICATED_CONTEXT))
        before, mb = self._cpu(), machine_cpu()[0]
        sample = d.pipelined(frames)
        timed, mt = self._cpu(), machine_cpu()[0]
        self.size[REPLICATED_CONTEXT] += n
        t = time.monotonic()  # from the last acknowledgement until both followers hold it all
        mesh.wait_holds(REPLICATED_CONTEXT, self.size[REPLICATED_CONTEXT], timeout=120)
        self.followers_done_s.append(time.monotonic() - t)
        end = self._cpu()
        c = self.cpu.setdefault("append_pipelined_replicated", {})
        c.setdefault("writer_cpu_us_per_append", []).append((timed[0] - before[0]) / n * 1e6)
        c.setdefault("machine_busy_cores", []).append((mt - mb) / sample.seconds)
        c.setdefault("followers_cpu_cores", []).append((sum(timed[1:]) - sum(before[1:])) / sample.seconds)
        # each follower's whole cost per entry, until it held everything
        c.setdefault("follower_cpu_us_per_entry", []).extend(
            (e - b) / n * 1e6 for e, b in zip(end[1:], before[1:], strict=True))
        c.setdefault("writer_cpu_us_per_append_until_replicated", []).append((end[0] - before[0]) / n * 1e6)
        return sample

    def report(self) -> dict[str, Any]:
        assert self.mesh is not None
        mesh = self.mesh
        out = dict(self.detail)
        lag: dict[str, Any] = {"followers": len(mesh.members) - 1, "window": WINDOW,
                               "received_before_ack": self.before_ack, "missing": self.lag_missing}
        if self.lag_rate:
            lag["append_rate_per_s_median"] = round(statistics.median(self.lag_rate), 1)
        for f, xs in self.lag_by_follower.items():
            lag[f] = {"p50_ms": round(pct(xs, 0.5) * 1e3, 2), "p99_ms": round(pct(xs, 0.99) * 1e3, 2),
                      "max_ms": round(max(xs, default=float("nan")) * 1e3, 2), "n": len(xs)}
        if self.lag_rate:
            # a lag that grows from the first tenth of a burst to the last is a backlog at the followers
            lag["p50_ms_by_tenth_of_burst"] = [round(pct(xs, 0.5) * 1e3, 1) for xs in self.lag_by_tenth]
            out["replication_lag"] = lag
        rep: dict[str, Any] = {}
        if self.followers_done_s:
            rep["followers_done_after_s_median"] = round(statistics.median(self.followers_done_s), 3)
            rep["followers_done_after_s_per_round"] = [round(x, 3) for x in self.followers_done_s]
        if rep:
            out["append_pipelined_replicated"] = rep
        for name, c in self.cpu.items():
            d = out.setdefault(name, {})
            for k, v in c.items():
                d[k] = round(statistics.median(v), 2)
        solo = out.get("append_pipelined", {}).get("node_cpu_us_per_append")
        writer = out.get("append_pipelined_replicated", {}).get("writer_cpu_us_per_append")
        if solo and writer:
            # what the ratio could reach if the writer had a core to itself and the followers others
            out["append_pipelined_replicated"]["writer_bound_ratio"] = round(solo / writer, 3)
        nodes = []
        for i, m in enumerate(mesh.members):
            st = mesh.status(i)
            r = st.get("replication", {})
            nodes.append({"id": m.node_id, "role": "writer" if i == 0 else "follower",
                          "entries": st.get("entries"), "pushed_entries": r.get("pushed_entries"),
                          "pulled_entries": r.get("pulled_entries"), "pulled_bytes": r.get("pulled_bytes"),
                          "published_messages": st.get("published_messages"), "forks": len(st.get("forks", [])),
                          "backpressure_waits": st.get("backpressure_waits"),
                          "write_batches": st.get("write_batches"), "gap_pulls": r.get("gap_pulls"),
                          "held_push_entries": r.get("held_push_entries"),
                          "rss_mb": round(m.proc.rss_mb(), 1)})
        out["nodes"] = nodes
        problems = mesh.log_problems()
        if problems:
            out["node_log_problems"] = problems
            self.notes.append(f"mesh nodes logged {len(problems)} warning(s)/error(s): see mesh.node_log_problems")
        return out

    def stop(self) -> None:
        if self.watchers is not None:
            self.watchers.stop()
        if self.dealer is not None:
            self.dealer.close()
        if self.mesh is not None:
            self.mesh.stop()


def run_catch_up(sizes: Sizes, workdir: str, quiet: bool) -> tuple[list[Sample], dict[str, Any]]:
    """A follower of a 3-node mesh is killed (-9) and misses `catch_up_entries` entries of one context.

    Each round: wait until the follower has everything on disk, kill -9 it, append the entries to
    the writer in batches of BATCH (pipelined, 4 in flight), wait (untimed) until the other follower
    holds them too, restart the killed one on its own ports and data, and time from the restart (the
    process's start) until its head (size and root) equals the writer's. A sample's ops are the
    missing entries and its one latency is that time; `first_entry_s` is when its head first moved
    (the repair starts at the next heartbeat from a peer). The follower's status then says how the
    entries came: `pulled_entries` should be the missing count, `pulled_bytes` about that many entries.
    """
    zctx: zmq.Context[Any] = zmq.Context()
    payload = os.urandom(PAYLOAD_SIZE)
    samples: list[Sample] = []
    rounds: list[dict[str, Any]] = []
    notes: list[str] = []
    mesh: BenchMesh | None = None
    d: Dealer | None = None
    n = max(BATCH, sizes.catch_up_entries // BATCH * BATCH)
    try:
        mesh = BenchMesh(workdir, "catchup", 3, zctx)
        mesh.wait_formed()
        d = Dealer(zctx, mesh.writer.proc.address)

        def batch(i: int) -> dict[str, Any]:
            return {"op": "append_batch", "context": CATCHUP_CONTEXT,
                    "entries": [{"key": "k", "payload": payload}] * BATCH}

        d.seq(d.frames(1, batch))
        size = BATCH
        mesh.wait_holds(CATCHUP_CONTEXT, size)
        # what one entry costs in a pull reply (a snapshot page of BATCH entries): pulled_bytes
        # well above missing x this means the same entries were pulled more than once
        page = d.request({"op": "snapshot", "context": CATCHUP_CONTEXT, "after": 0, "limit": BATCH})
        entry_bytes = len(page) / BATCH
        victim = 1
        for r in range(sizes.rounds):
            # everything it holds is on disk: the kill takes nothing it had acknowledged to the writer
            mesh.wait_holds(CATCHUP_CONTEXT, size)
            mesh.wait_flushed(victim)
            had = mesh.head(victim, CATCHUP_CONTEXT)
            assert had is not None
            mesh.kill(victim)
            t = time.monotonic()
            d.pipelined(d.frames(n // BATCH, batch), window=4, count_per_reply=BATCH)
            append_s = time.monotonic() - t
            size += n
            others = [i for i in range(len(mesh.members)) if i != victim]
            mesh.wait_holds(CATCHUP_CONTEXT, size, others)
            want = mesh.head(0, CATCHUP_CONTEXT)
            cpu0 = {i: m.proc.cpu_s() for i, m in enumerate(mesh.members) if i != victim}
            t0 = time.monotonic()
            ready_s = mesh.restart(victim)
            first = 0.0
            while True:
                h = mesh.head(victim, CATCHUP_CONTEXT)
                now = time.monotonic() - t0
                if h == want:
                    break
                if not first and h is not None and h[0] > had[0]:
                    first = now
                if now > 300:
                    raise RuntimeError(f"catch_up: the restarted follower holds {h and h[0]} of {size} entries "
                                       "after 300 s")
                time.sleep(POLL_S)
            catchup_s = time.monotonic() - t0
            # CPU per caught-up entry: the restarted follower (since its start) and each other node
            cpu = {m.node_id: round(((m.proc.cpu_s() - cpu0[i]) if i != victim else m.proc.cpu_s()) / n * 1e6, 1)
                   for i, m in enumerate(mesh.members)}
            first = first or catchup_s
            st = mesh.status(victim)
            rep = st["replication"]
            samples.append(Sample(n, catchup_s, [catchup_s]))
            by_peer = {p["id"] or p["address"]: p["pulled_entries"] for p in st["peers"]}
            rounds.append({
                "missing": n, "append_s": round(append_s, 2), "ready_s": round(ready_s, 3),
                "first_entry_s": round(first, 3), "catch_up_s": round(catchup_s, 3),
                "entries_per_s": round(n / catchup_s, 1),
                # the rate once entries flow (the first chunk's arrival is when the head first moves)
                "entries_per_s_after_first": round(n / (catchup_s - first), 1) if catchup_s > first else None,
                "pulled_entries": rep["pulled_entries"], "pushed_entries": rep["pushed_entries"],
                "pulled_bytes": rep["pulled_bytes"], "pulled_bytes_per_entry": round(rep["pulled_bytes"] / n, 1),
                "pulled_bytes_vs_missing": round(rep["pulled_bytes"] / (n * entry_bytes), 2),
                "pulled_from": by_peer, "cpu_us_per_entry": cpu,
            })
            if abs(rep["pulled_entries"] + rep["pushed_entries"] - n) > n // 100:
                notes.append(f"catch_up round {r + 1}: the follower pulled {rep['pulled_entries']} and was pushed "
                             f"{rep['pushed_entries']} entries, missing {n}")
            log(f"catch_up round {r + 1}/{sizes.rounds}: {n:,} entries in {catchup_s:.2f} s "
                f"({n / catchup_s:,.0f}/s; first entry after {first:.2f} s, ready after {ready_s:.2f} s), "
                f"pulled {rep['pulled_entries']:,} entries / {rep['pulled_bytes']:,} bytes from {by_peer}", quiet)
        detail: dict[str, Any] = {"context": CATCHUP_CONTEXT, "nodes": len(mesh.members), "missing_per_round": n,
                                  "heartbeat_ms": MESH_HEARTBEAT_MS, "entry_bytes_in_a_pull": round(entry_bytes, 1),
                                  "rounds": rounds, "equal_heads": True, "notes": notes}
        for k in ("catch_up_s", "first_entry_s", "ready_s", "entries_per_s_after_first", "pulled_bytes_per_entry",
                  "pulled_bytes_vs_missing"):
            vals = [x[k] for x in rounds if x[k] is not None]
            detail[f"{k}_median"] = round(statistics.median(vals), 3) if vals else None
        problems = mesh.log_problems(limit=100)
        if problems:
            # the killed follower is dead to its peers while it is down: expected; anything else is not
            victim_id = mesh.members[victim].node_id
            unexpected = [x for x in problems if f" peer {victim_id} " not in x]
            detail["node_log_problems"] = (unexpected + [x for x in problems if x not in unexpected])[:20]
            detail["live_peers_declared_dead"] = sum(1 for x in unexpected if " is dead " in x)
            if unexpected:
                notes.append(f"catch_up: the mesh nodes logged {len(unexpected)} warning(s)/error(s) not about the "
                             "killed follower (live peers declared dead: "
                             f"{detail['live_peers_declared_dead']}): see mesh.catch_up.node_log_problems")
        return samples, detail
    finally:
        if d is not None:
            d.close()
        if mesh is not None:
            mesh.stop()
        zctx.destroy(linger=0)


def run_heartbeat(sizes: Sizes, workdir: str, quiet: bool) -> dict[str, Any]:
    """The heartbeat's size with `heartbeat_contexts` contexts in sync on a 2-node mesh.

    The writer gets one append to each of that many distinct contexts (pipelined, WINDOW in flight);
    once the follower holds as many contexts and entries as the writer and a sample of heads
    match, the two nodes' `replication.heartbeat_bytes` (the last heartbeat each sent) is read, and
    over a few more heartbeat intervals the reply and pull bytes that moved (in sync: nothing but
    heartbeats and their replies).
    """
    zctx: zmq.Context[Any] = zmq.Context()
    payload = os.urandom(PAYLOAD_SIZE)
    mesh: BenchMesh | None = None
    d: Dealer | None = None
    n = sizes.heartbeat_contexts
    try:
        mesh = BenchMesh(workdir, "hb", 2, zctx)
        mesh.wait_formed()
        d = Dealer(zctx, mesh.writer.proc.address)
        contexts = [f"hb-{i:05d}" for i in range(n)]
        t = time.monotonic()
        d.pipelined(d.frames(n, round_robin(contexts, d.next_id, payload)))
        fill_s = time.monotonic() - t

        def same_counts() -> bool:
            a, b = mesh.status(0), mesh.status(1)
            return bool(a["contexts"] == b["contexts"] == n and a["entries"] == b["entries"])

        converge_s = mesh.wait(same_counts, f"the follower to hold {n} contexts", timeout=300, every=0.1)
        probe = random.Random(5).sample(contexts, min(50, n))
        mesh.wait(lambda: all(mesh.head(0, c) == mesh.head(1, c) for c in probe), "equal heads", timeout=60)
        # in sync: let every node send a few heartbeats of the synced state, then look at what moved
        time.sleep(2 * mesh.heartbeat_s)
        before = [mesh.status(i) for i in range(2)]
        time.sleep(4 * mesh.heartbeat_s)
        after = [mesh.status(i) for i in range(2)]
        per_node = []
        for m, b, a in zip(mesh.members, before, after, strict=True):
            rb, ra = b["replication"], a["replication"]
            beats = ra["heartbeats_sent"] - rb["heartbeats_sent"]
            per_node.append({
                "id": m.node_id, "heartbeat_bytes": ra["heartbeat_bytes"], "heartbeats_in_window": beats,
                "reply_bytes_per_heartbeat": round((ra["reply_bytes"] - rb["reply_bytes"]) / max(beats, 1), 1),
                "pulled_bytes_in_window": ra["pulled_bytes"] - rb["pulled_bytes"],
                "pushed_entries": ra["pushed_entries"], "pulled_entries": ra["pulled_entries"],
            })
        hb = max(x["heartbeat_bytes"] for x in per_node)
        detail: dict[str, Any] = {
            "contexts": n, "nodes": 2, "heartbeat_ms": MESH_HEARTBEAT_MS, "heartbeat_bytes": hb,
            "fill_s": round(fill_s, 2), "converge_s": round(converge_s, 2), "per_node": per_node,
        }
        log(f"heartbeat_bytes_10k: {n:,} contexts filled in {fill_s:.2f} s, follower in sync after "
            f"{converge_s:.2f} s more; heartbeat {hb} bytes", quiet)
        problems = mesh.log_problems()
        if problems:
            detail["node_log_problems"] = problems
            detail["notes"] = [f"heartbeat_bytes_10k: the mesh nodes logged {len(problems)} warning(s)/error(s): "
                               "see mesh.heartbeat.node_log_problems"]
        return detail
    finally:
        if d is not None:
            d.close()
        if mesh is not None:
            mesh.stop()
        zctx.destroy(linger=0)


# -- the run -----------------------------------------------------------------------------

@dataclass
class Sizes:
    rounds: int
    seq: int
    pipelined: int
    batches: int
    sync_pipelined: int
    gets: int
    memory_entries: int
    memory_contexts: int
    watch_appends: int  # appends per round in watch_latency (at WATCH_RATE per second)
    fanout_contexts: int  # watch_fanout: WATCHERS_PER_CONTEXT watchers of each
    fanout_entries: int  # entries appended to each context per fan-out round
    catch_up_entries: int  # entries a killed follower misses per catch_up round (a multiple of BATCH)
    heartbeat_contexts: int  # contexts in sync when heartbeat_bytes_10k reads the heartbeat size
    flood_seconds: float = 10.0  # the second client timed during each flood
    flood_gets: int = 4000  # flood_unread
    flood_connections: int = 1100  # flood_idle
    flood_frame_mib: float = 15.9  # flood_big: just under the 16 MiB request limit (a larger frame is dropped)
    flood_topics: int = 100_000  # flood_topics
    flood_watchers: int = 1000  # flood_watchers (the default --max-watchers-per-context)


QUICK = Sizes(rounds=3, seq=1500, pipelined=20_000, batches=30, sync_pipelined=10_000, gets=1500,
              memory_entries=1_000_000, memory_contexts=1000, watch_appends=2000, fanout_contexts=100,
              fanout_entries=50, catch_up_entries=200_000, heartbeat_contexts=10_000, flood_seconds=5.0)
FULL = Sizes(rounds=7, seq=5000, pipelined=60_000, batches=100, sync_pipelined=30_000, gets=5000,
             memory_entries=1_000_000, memory_contexts=1000, watch_appends=5000, fanout_contexts=100,
             fanout_entries=100, catch_up_entries=200_000, heartbeat_contexts=10_000)
SMOKE = Sizes(rounds=1, seq=20, pipelined=200, batches=2, sync_pipelined=100, gets=20,
              memory_entries=2000, memory_contexts=10, watch_appends=50, fanout_contexts=100,
              fanout_entries=3, catch_up_entries=2000, heartbeat_contexts=200, flood_seconds=1.0,
              flood_gets=50, flood_connections=20, flood_frame_mib=0.25, flood_topics=200, flood_watchers=20)


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    v = sorted(values)
    i = min(len(v) - 1, max(0, int(round(q * (len(v) - 1)))))
    return v[i]


def summarize(samples: list[Sample]) -> dict[str, Any]:
    lat = [x for s in samples for x in s.latencies]
    return {
        "ops_per_s": round(statistics.median(s.ops_per_s for s in samples), 1),
        "p50_us": round(pct(lat, 0.50) * 1e6, 1),
        "p99_us": round(pct(lat, 0.99) * 1e6, 1),
        "n": sum(s.ops for s in samples),
    }


RATIOS: list[tuple[str, str, str, str, str, float]] = [
    # name, numerator scenario, field, denominator scenario, direction, target
    ("append_seq_p50_vs_raw_echo_seq_p50", "append_seq", "p50_us", "raw_echo_seq", "<=", 1.3),
    ("append_seq_vs_redis_xadd_seq", "append_seq", "ops_per_s", "redis_xadd_seq", ">=", 0.9),
    ("append_pipelined_vs_raw_echo_pipelined", "append_pipelined", "ops_per_s", "raw_echo_pipelined", ">=", 0.6),
    ("append_batch_vs_redis_xadd_pipelined", "append_batch", "ops_per_s", "redis_xadd_pipelined", ">=", 2.0),
    ("append_sync_pipelined_vs_redis_xadd_fsync_pipelined", "append_sync_pipelined", "ops_per_s",
     "redis_xadd_fsync_pipelined", ">=", 1.0),
    ("get_one_p50_vs_raw_echo_seq_p50", "get_one", "p50_us", "raw_echo_seq", "<=", 1.3),
    ("append_pipelined_watched_vs_append_pipelined", "append_pipelined_watched", "ops_per_s", "append_pipelined",
     ">=", 0.9),
    ("append_pipelined_replicated_vs_append_pipelined", "append_pipelined_replicated", "ops_per_s",
     "append_pipelined", ">=", 0.8),
]
WATCH_LATENCY_P99_US = 5000
REPLICATION_LAG_P99_MS = 100
CATCH_UP_ENTRIES_PER_S = 100_000
HEARTBEAT_BYTES_MAX = 2048


def environment() -> dict[str, Any]:
    import plyvel

    env: dict[str, Any] = {
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "pyzmq": zmq.__version__,
        "libzmq": zmq.zmq_version(),
        "msgpack": ".".join(map(str, msgpack.version)),
        "plyvel": plyvel.__version__,
    }
    try:
        from node import __version__

        env["ledger"] = __version__
    except ImportError:
        pass
    exe = shutil.which("redis-server")
    if exe:
        out = subprocess.run([exe, "--version"], capture_output=True, text=True).stdout
        env["redis_server"] = out.strip()
    return env


def log(msg: str, quiet: bool) -> None:
    if not quiet:
        print(msg, file=sys.stderr, flush=True)


def pair_up(order: list[tuple[str, Callable[[], Sample]]], a: str, b: str, first: bool) -> None:
    """Move `b` next to `a` (after it when `first`, else before): a ratio of the two then
    compares runs seconds apart, not whatever else ran between them on a shared machine."""
    names = [n for n, _ in order]
    if a not in names or b not in names:
        return
    item = order.pop(names.index(b))
    i = [n for n, _ in order].index(a)
    order.insert(i + 1 if first else i, item)


def run_throughput(sizes: Sizes, workdir: str, quiet: bool, only: set[str] | None,
                   watch_detail: dict[str, Any] | None = None, mesh_detail: dict[str, Any] | None = None,
                   ) -> tuple[dict[str, list[Sample]], dict[str, list[float]], list[str]]:
    """The interleaved rounds; what the watch and mesh scenarios saw besides timings goes to
    `watch_detail` and `mesh_detail`."""
    notes: list[str] = []
    detail: dict[str, Any] = {} if watch_detail is None else watch_detail
    zctx: zmq.Context[Any] = zmq.Context()
    procs: list[Proc] = []
    helpers: list[Watchers] = []
    mesh: MeshScenarios | None = None
    samples: dict[str, list[Sample]] = {}
    per_round: dict[str, list[float]] = {}
    settle_s: dict[str, float] = {}
    payload = os.urandom(PAYLOAD_SIZE)
    rng = random.Random(1)
    try:
        echo = start_echo(workdir)
        procs.append(echo)
        node, _ = start_node(os.path.join(workdir, "async"))
        procs.append(node)
        snode, _ = start_node(os.path.join(workdir, "sync"), "--durability", "sync")
        procs.append(snode)
        redis_plain = redis_fsync = None
        try:
            import redis  # noqa: F401
            has_redis_py = True
        except ImportError:
            has_redis_py = False
        if shutil.which("redis-server") and has_redis_py:
            redis_plain = start_redis(workdir, fsync=False)
            redis_fsync = start_redis(workdir, fsync=True)
            procs += [p for p in (redis_plain, redis_fsync) if p]
        elif not shutil.which("redis-server"):
            notes.append("redis-server not on PATH: Redis scenarios skipped (apt-get install redis-server)")
        else:
            notes.append("redis-py not installed: Redis scenarios skipped (pip install redis)")
        e = Dealer(zctx, echo.address)
        d = Dealer(zctx, node.address)
        sd = Dealer(zctx, snode.address)
        rc = rf = None
        if redis_plain and redis_fsync:
            import redis

            rc = redis.Redis(host="127.0.0.1", port=int(redis_plain.address))
            rf = redis.Redis(host="127.0.0.1", port=int(redis_fsync.address))

        def echo_req(i: int) -> dict[str, Any]:
            return {"op": "append", "context": "bench", "key": "k", "payload": payload}

        def append_req(i: int) -> dict[str, Any]:
            return {"op": "append", "context": "bench", "key": "k", "payload": payload}

        def batch_req(i: int) -> dict[str, Any]:
            return {"op": "append_batch", "context": "batch",
                    "entries": [{"key": "k", "payload": payload} for _ in range(BATCH)]}

        # entries to read back
        pre = d.frames(max(20, sizes.gets // 10), lambda i: {"op": "append_batch", "context": "reads",
                                                              "entries": [{"key": "k", "payload": payload}] * 100})
        d.pipelined(pre, window=10)
        reads_size = len(pre) * 100
        recent = max(1, min(reads_size, 1000))

        def get_one(i: int) -> dict[str, Any]:
            return {"op": "get", "context": "reads", "after": reads_size - rng.randrange(recent) - 1, "limit": 1}

        def get_tail(i: int) -> dict[str, Any]:
            return {"op": "get", "context": "reads", "after": reads_size - 100, "limit": 100}

        # -- watch: 10 watchers of each of two contexts in one helper process, and one stalled
        # watcher of WATCHED_CONTEXT in another; append_pipelined's context has none.
        watch_on = only is None or bool(only & set(WATCH_SCENARIOS))
        watchers: Watchers | None = None
        wclient: Client | None = None
        watched_size = [0]
        catchup_s: list[float] = []
        rss = {"before": node.rss_mb(), "max": 0.0}

        def watched_req(i: int) -> dict[str, Any]:
            return {"op": "append", "context": WATCHED_CONTEXT, "key": "k", "payload": payload}

        def check_watch(name: str, rep: dict[str, Any], expected: int) -> None:
            got = sum(int(w["count"]) for w in rep["watchers"])
            health = watch_health(rep["watchers"])
            detail.setdefault(name, {}).update(health)  # cumulative counts, as of the last round
            if not rep["done"] or got != expected or health["errors"]:
                notes.append(f"{name}: watchers delivered {got} of {expected} entries (caught up: {rep['done']}, "
                             f"ordering errors: {health['errors']}) after waiting {rep['elapsed_s']:.1f} s")

        def watch_latency() -> Sample:
            assert watchers is not None
            seconds, acks = paced_appends(d, LATENCY_CONTEXT, sizes.watch_appends, WATCH_RATE, payload)
            rep = watchers.wait({LATENCY_CONTEXT: max(seq for _, seq in acks)}, timeout=60)
            check_watch("watch_latency", rep, len(acks) * WATCHERS_PER_CONTEXT)
            lat = join_latencies(rep["watchers"], acks)
            detail.setdefault("watch_latency", {})["append_rate_per_s"] = round(len(acks) / seconds, 1)
            return Sample(len(lat), seconds, lat)

        cpu: dict[str, dict[str, list[float]]] = {}

        def cpu_used(name: str, fn: Callable[[], Sample]) -> Callable[[], Sample]:
            """`fn`, noting the CPU the node and the watchers' process used while it was timed."""
            def run() -> Sample:
                assert watchers is not None
                before = (node.cpu_s(), watchers.proc.cpu_s())
                sample = fn()
                c = cpu.setdefault(name, {"node": [], "watchers": []})
                c["node"].append((node.cpu_s() - before[0]) / sample.ops * 1e6)
                c["watchers"].append((watchers.proc.cpu_s() - before[1]) / sample.seconds)
                return sample
            return run

        def pipelined_watched() -> Sample:
            assert watchers is not None
            sample = cpu_used("append_pipelined_watched", lambda: d.pipelined(d.frames(sizes.pipelined, watched_req)))()
            watched_size[0] += sizes.pipelined
            rss["max"] = max(rss["max"], node.rss_mb())
            t = time.monotonic()  # from the last acknowledgement until all 10 watchers have it
            rep = watchers.wait({WATCHED_CONTEXT: watched_size[0]}, timeout=120)
            catchup_s.append(time.monotonic() - t)
            check_watch("append_pipelined_watched", rep, sizes.pipelined * WATCHERS_PER_CONTEXT)
            return sample

        if watch_on:
            stalled = Watchers(workdir, "stalled-watcher", {"address": node.address, "pub": node.pub,
                                                            "contexts": [WATCHED_CONTEXT], "per_context": 1,
                                                            "stalled": True})
            helpers.append(stalled)
            procs.append(stalled.proc)
            watchers = Watchers(workdir, "watchers", {"address": node.address, "pub": node.pub,
                                                     "contexts": [LATENCY_CONTEXT, WATCHED_CONTEXT],
                                                     "per_context": WATCHERS_PER_CONTEXT,
                                                     "record": [LATENCY_CONTEXT]})
            helpers.append(watchers)
            procs.append(watchers.proc)
            wclient = Client(node.address, zctx=zctx, timeout=10.0)
            wait_watchers_counted(wclient, 2 * WATCHERS_PER_CONTEXT + 1, 2)

        scenarios: list[tuple[str, Callable[[], Sample]]] = [
            ("raw_echo_seq", lambda: e.seq(e.frames(sizes.seq, echo_req))),
            ("append_seq", lambda: d.seq(d.frames(sizes.seq, append_req))),
            ("raw_echo_pipelined", lambda: e.pipelined(e.frames(sizes.pipelined, echo_req))),
            ("append_pipelined", lambda: d.pipelined(d.frames(sizes.pipelined, append_req))),
            ("append_batch", lambda: d.pipelined(d.frames(sizes.batches, batch_req), window=4, count_per_reply=BATCH)),
            ("append_sync_pipelined", lambda: sd.pipelined(sd.frames(sizes.sync_pipelined, append_req))),
            ("get_one", lambda: d.seq(d.frames(sizes.gets, get_one))),
            ("get_tail100", lambda: d.seq(d.frames(sizes.gets, get_tail))),
        ]
        if rc is not None and rf is not None:
            scenarios += [
                ("redis_xadd_seq", lambda: redis_seq(rc, sizes.seq, payload)),
                ("redis_xadd_pipelined", lambda: redis_pipelined(rc, sizes.pipelined, payload)),
                ("redis_xadd_fsync_pipelined", lambda: redis_pipelined(rf, sizes.sync_pipelined, payload)),
            ]
        if watch_on:
            scenarios = [(n, cpu_used(n, fn) if n == "append_pipelined" else fn) for n, fn in scenarios]
            scenarios += [("watch_latency", watch_latency), ("append_pipelined_watched", pipelined_watched)]
        if only is None or only & set(MESH_SCENARIOS):
            mesh = MeshScenarios(sizes, workdir, zctx, payload, node, notes, quiet)
            mesh.start()
            scenarios = [(n, mesh.measure_standalone(fn) if n == "append_pipelined" else fn) for n, fn in scenarios]
            scenarios += [("replication_lag", mesh.replication_lag),
                          ("append_pipelined_replicated", mesh.append_pipelined_replicated)]
        if only:
            scenarios = [s for s in scenarios if s[0] in only]
        # warm-up: connections, caches, lazy imports
        e.seq(e.frames(50, echo_req))
        d.seq(d.frames(50, append_req))
        if watchers is not None:
            d.seq(d.frames(50, lambda i: {"op": "append", "context": LATENCY_CONTEXT, "key": "k", "payload": payload}))
            d.seq(d.frames(50, watched_req))
            watched_size[0] += 50
            watchers.wait({LATENCY_CONTEXT: 50, WATCHED_CONTEXT: 50}, timeout=30)
        for r in range(sizes.rounds):
            order = scenarios[:]
            random.Random(r).shuffle(order)  # no scenario always runs first or last
            pair_up(order, "append_pipelined", "append_pipelined_watched", first=r % 2 == 0)
            # on append_pipelined's other side, so that both stay next to it
            pair_up(order, "append_pipelined", "append_pipelined_replicated", first=r % 2 == 1)
            this_round: dict[str, Sample] = {}
            for name, fn in order:
                waited = settle()
                settle_s[name] = settle_s.get(name, 0.0) + waited
                s = fn()
                this_round[name] = s
                samples.setdefault(name, []).append(s)
            log(f"round {r + 1}/{sizes.rounds}: " + ", ".join(
                f"{n} {this_round[n].ops_per_s:,.0f}/s" for n, _ in scenarios), quiet)
            summary = {n: summarize([s]) for n, s in this_round.items()}
            for name, num, fld, den, _dirn, _t in RATIOS:
                if num in summary and den in summary and summary[den][fld]:
                    per_round.setdefault(name, []).append(summary[num][fld] / summary[den][fld])
        if watchers is not None and wclient is not None:
            st = wclient.status()
            detail["node"] = {
                "watchers_at_end": st.get("watchers"),  # the stalled one still counted: 21
                "published_entries": st.get("published_entries"),
                "published_messages": st.get("published_messages"),
                "publish_errors": st.get("publish_errors"),
                "rss_mb_before_watch_rounds": round(rss["before"], 1),
                "rss_mb_max_after_watched_rounds": round(rss["max"], 1),
            }
            for name, c in cpu.items():
                # node: CPU microseconds per append (its own cost, whatever else runs);
                # watchers: cores the watchers' process kept busy while the appends were timed
                detail.setdefault(name, {}).update({
                    "node_cpu_us_per_append": round(statistics.median(c["node"]), 1),
                    "watchers_cpu_cores": round(statistics.median(c["watchers"]), 2)})
            if catchup_s:
                detail.setdefault("append_pipelined_watched", {})["catchup_s_median"] = round(
                    statistics.median(catchup_s), 3)
                detail["append_pipelined_watched"]["catchup_s_per_round"] = [round(x, 3) for x in catchup_s]
            wclient.close()
        slow = {n: round(w, 1) for n, w in settle_s.items() if w >= SETTLE_MAX_S * sizes.rounds / 2}
        if slow:
            notes.append(f"the machine did not quiet down before these scenarios (seconds waited, "
                         f"{SETTLE_MAX_S:g} s at most per round): {slow}")
        if mesh is not None and mesh_detail is not None:
            mesh_detail.update(mesh.report())
        for dealer in (e, d, sd):
            dealer.close()
        for r_ in (rc, rf):
            if r_ is not None:
                r_.close()
    finally:
        if mesh is not None:
            mesh.stop()
        for h in helpers:
            h.stop()
        for p in procs:
            p.stop()
        zctx.destroy(linger=0)  # closes whatever an error left open; term() would wait for it
    return samples, per_round, notes


def run_memory(sizes: Sizes, workdir: str, quiet: bool) -> dict[str, Any]:
    """RSS with many entries in many contexts, then restart-to-serving time."""
    data = os.path.join(workdir, "memory")
    zctx: zmq.Context[Any] = zmq.Context()
    payload = os.urandom(PAYLOAD_SIZE)
    per_ctx = sizes.memory_entries // sizes.memory_contexts
    node, _ = start_node(data)
    try:
        d = Dealer(zctx, node.address)
        t0 = time.monotonic()
        step = min(per_ctx, BATCH)
        frames: list[bytes] = []
        for c in range(sizes.memory_contexts):
            for _ in range(0, per_ctx, step):
                frames.append(msgpack.packb({"v": 1, "id": len(frames) + 1, "op": "append_batch",
                                             "context": f"ctx-{c:05d}",
                                             "entries": [{"key": "k", "payload": payload}] * step},
                                            use_bin_type=True))
        for i in range(0, len(frames), 50):
            d.pipelined(frames[i:i + 50], window=8, count_per_reply=step)
            if not quiet and i % 200 == 0:
                print(f"\rmemory: {min(i + 50, len(frames)) * step:,} / {sizes.memory_entries:,} entries",
                      end="", file=sys.stderr, flush=True)
        fill_s = time.monotonic() - t0
        if not quiet:
            print(file=sys.stderr)
        time.sleep(0.5)
        rss = node.rss_mb()
        d.close()
    finally:
        node.stop()
    node2, ready_s = start_node(data)
    try:
        d = Dealer(zctx, node2.address)
        t = time.monotonic()
        d.seq(d.frames(1, lambda i: {"op": "get", "context": "ctx-00000", "after": per_ctx - 1, "limit": 1}))
        first_read_s = time.monotonic() - t
        rss_after = node2.rss_mb()
        d.close()
    finally:
        node2.stop()
        zctx.term()
    return {
        "entries": sizes.memory_entries,
        "contexts": sizes.memory_contexts,
        "fill_s": round(fill_s, 2),
        "rss_mb": round(rss, 1),
        "restart_s": round(ready_s + first_read_s, 3),
        "rss_after_restart_mb": round(rss_after, 1),
    }


def run_floods(sizes: Sizes, names: Sequence[str], workdir: str, quiet: bool) -> dict[str, Any]:
    """Each flood of `names` on a node of its own (tools/flood.py), one after the other."""
    from tools import flood

    o = flood.Opts(seconds=sizes.flood_seconds, gets=sizes.flood_gets, connections=sizes.flood_connections,
                   frame_mib=sizes.flood_frame_mib, topics=sizes.flood_topics, watchers=sizes.flood_watchers,
                   before_seconds=min(2.0, sizes.flood_seconds))
    out = {}
    for name in names:
        kind = name.removeprefix("flood_")
        settle()
        log(f"{name}: {sizes.flood_seconds:g} s under the flood", quiet)
        out[name] = flood.measure(kind, o, workdir)
    return out


def round_robin(contexts: Sequence[str], first_id: int, payload: bytes) -> Callable[[int], dict[str, Any]]:
    """Append requests over `contexts` in turn (Dealer.frames passes request ids from `first_id`)."""
    def make(i: int) -> dict[str, Any]:
        return {"op": "append", "context": contexts[(i - first_id) % len(contexts)], "key": "k", "payload": payload}
    return make


def run_fanout(sizes: Sizes, workdir: str, quiet: bool) -> tuple[list[Sample], dict[str, Any]]:
    """1,000 watchers over 100 contexts on a node of its own, a few rounds of appends to all of them.

    Each round appends `fanout_entries` entries to every context (pipelined, round-robin over
    the contexts) and waits until every watcher has delivered them. A round's sample counts
    deliveries (entry x watcher) from the first append sent to the last delivery; its latencies
    run from each append's submission to each watcher's receipt. Complete: every watcher
    delivered exactly the entries of its context, each once, in seq order, in every round.
    """
    contexts = [f"fan-{i:03d}" for i in range(sizes.fanout_contexts)]
    n_watchers = len(contexts) * WATCHERS_PER_CONTEXT
    payload = os.urandom(PAYLOAD_SIZE)
    zctx: zmq.Context[Any] = zmq.Context()
    helpers: list[Watchers] = []
    samples: list[Sample] = []
    detail: dict[str, Any] = {"watchers": n_watchers, "contexts": len(contexts),
                              "entries_per_context_per_round": sizes.fanout_entries, "processes": FANOUT_PROCS}
    node, _ = start_node(os.path.join(workdir, "fanout"))
    try:
        t = time.monotonic()
        for i in range(FANOUT_PROCS):
            group = contexts[i::FANOUT_PROCS]
            if group:
                helpers.append(Watchers(workdir, f"fanout-watchers-{i}", {
                    "address": node.address, "pub": node.pub, "contexts": group,
                    "per_context": WATCHERS_PER_CONTEXT, "after": 0, "record": group}))
        client = Client(node.address, zctx=zctx, timeout=10.0)
        wait_watchers_counted(client, n_watchers, len(contexts))
        detail["setup_s"] = round(time.monotonic() - t, 2)
        log(f"watch_fanout: {n_watchers} watchers of {len(contexts)} contexts subscribed in {detail['setup_s']} s",
            quiet)
        d = Dealer(zctx, node.address)
        complete = True
        delivered = 0
        for r in range(sizes.rounds):
            frames = d.frames(len(contexts) * sizes.fanout_entries, round_robin(contexts, d.next_id, payload))
            t0 = time.monotonic_ns()
            _, submits = pipelined_timed(d, frames, at="submit")
            until = {c: (r + 1) * sizes.fanout_entries for c in contexts}
            for h in helpers:
                h.request({c: until[c] for c in contexts if c in h.contexts}, timeout=120)
            reports: list[dict[str, Any]] = []
            done = True
            for h in helpers:
                a = h.answer()
                done = done and bool(a["done"])
                reports += a["watchers"]
            got = sum(int(w["count"]) for w in reports)
            health = watch_health(reports)
            ok = (done and len(reports) == n_watchers and got == n_watchers * sizes.fanout_entries
                  and health["errors"] == 0 and all(w["last"] == until[w["context"]] for w in reports))
            complete = complete and ok
            delivered += got
            last_ns = max((int(w["last_ns"]) for w in reports if w["last_ns"]), default=t0)
            samples.append(Sample(got, max(last_ns - t0, 1) / 1e9, join_latencies(reports, submits)))
            detail.update(health)  # cumulative over the rounds
            log(f"watch_fanout round {r + 1}/{sizes.rounds}: {got:,} deliveries at "
                f"{samples[-1].ops_per_s:,.0f}/s, complete: {ok}", quiet)
        detail["complete"] = complete
        detail["deliveries"] = delivered
        detail["per_round_ops_per_s"] = [round(x.ops_per_s, 1) for x in samples]
        d.close()
        client.close()
    finally:
        for h in helpers:
            h.stop()
        node.stop()
        zctx.destroy(linger=0)
    return samples, detail


def build_report(samples: dict[str, list[Sample]], per_round: dict[str, list[float]],
                 memory: dict[str, Any] | None, notes: list[str], mode: str,
                 watch: dict[str, Any] | None = None, mesh: dict[str, Any] | None = None,
                 floods: dict[str, Any] | None = None) -> dict[str, Any]:
    order = [n for n in SCENARIOS if n in samples]
    results = {name: summarize(samples[name]) for name in order}
    ratios: dict[str, Any] = {}
    for name, _num, _fld, _den, dirn, target in RATIOS:
        vals = per_round.get(name)
        if not vals:
            continue
        v = statistics.median(vals)
        ok = v <= target if dirn == "<=" else v >= target
        ratios[name] = {"value": round(v, 3), "target": f"{dirn} {target}", "met": ok,
                        "per_round": [round(x, 3) for x in vals]}
    if "get_one" in results:
        p99 = results["get_one"]["p99_us"]
        ratios["get_one_p99_us"] = {"value": p99, "target": "< 1000", "met": p99 < 1000}
    if "watch_latency" in results:
        p99 = results["watch_latency"]["p99_us"]
        ratios["watch_latency_p99_us"] = {"value": p99, "target": f"<= {WATCH_LATENCY_P99_US}",
                                          "met": p99 <= WATCH_LATENCY_P99_US}
    if watch and "watch_fanout" in watch:
        ok = bool(watch["watch_fanout"]["complete"])
        ratios["watch_fanout_complete"] = {"value": ok, "target": "all", "met": ok}
    if "replication_lag" in results:
        ms = round(results["replication_lag"]["p99_us"] / 1000, 2)
        ratios["replication_lag_p99_ms"] = {"value": ms, "target": f"<= {REPLICATION_LAG_P99_MS}",
                                            "met": ms <= REPLICATION_LAG_P99_MS}
    if "catch_up" in results:
        v = results["catch_up"]["ops_per_s"]
        ratios["catch_up_entries_per_s"] = {"value": v, "target": f">= {CATCH_UP_ENTRIES_PER_S}",
                                            "met": v >= CATCH_UP_ENTRIES_PER_S,
                                            "per_round": [round(x.ops_per_s, 1) for x in samples["catch_up"]]}
    if mesh and "heartbeat" in mesh:
        b = mesh["heartbeat"]["heartbeat_bytes"]
        ratios["heartbeat_bytes_10k_contexts"] = {"value": b, "target": f"<= {HEARTBEAT_BYTES_MAX}",
                                                  "met": b <= HEARTBEAT_BYTES_MAX}
    if memory:
        ratios["rss_mb_1m_entries"] = {"value": memory["rss_mb"], "target": "<= 300", "met": memory["rss_mb"] <= 300}
        ratios["restart_s_1m_entries"] = {"value": memory["restart_s"], "target": "<= 3",
                                          "met": memory["restart_s"] <= 3}
    for name, f in (floods or {}).items():
        for fig, r in f["targets"].items():
            ratios[f"{name}_{fig}"] = r
    return {"mode": mode, "results": results, "ratios": ratios, "memory": memory, "watch": watch or None,
            "mesh": mesh or None, "floods": floods or None, "environment": environment(), "notes": notes}


def print_table(report: dict[str, Any]) -> None:
    res = report["results"]
    print(f"ledger-bench ({report['mode']}), {report['environment']['cpus']} CPUs, "
          f"Python {report['environment']['python']}, libzmq {report['environment']['libzmq']}")
    print(f"{'scenario':30s} {'ops/s':>12s} {'p50 us':>10s} {'p99 us':>10s} {'n':>10s}")
    for name, r in res.items():
        print(f"{name:30s} {r['ops_per_s']:>12,.0f} {r['p50_us']:>10,.1f} {r['p99_us']:>10,.1f} {r['n']:>10,}")
    if report["memory"]:
        m = report["memory"]
        print(f"memory: {m['entries']:,} entries in {m['contexts']:,} contexts: RSS {m['rss_mb']:.0f} MB "
              f"(filled in {m['fill_s']:.1f} s); restart to serving {m['restart_s']:.2f} s")
    for name, w in (report.get("watch") or {}).items():
        print(f"{name}: " + ", ".join(f"{k} {v}" for k, v in w.items()))
    for name, w in (report.get("mesh") or {}).items():
        if name == "nodes":
            print("mesh nodes: " + "; ".join(f"{n['id']} ({n['role']}) {n['entries']:,} entries, pushed "
                                             f"{n['pushed_entries']:,}, pulled {n['pulled_entries']:,}" for n in w))
        elif name == "node_log_problems":
            print(f"mesh: {len(w)} warning(s)/error(s) logged by the nodes (in the JSON report)")
        elif isinstance(w, dict):
            print(f"mesh {name}: " + ", ".join(f"{k} {v}" for k, v in w.items()
                                              if k not in ("rounds", "per_node", "node_log_problems")))
        else:
            print(f"mesh {name}: {w}")
    for name, f in (report.get("floods") or {}).items():
        b, d = f["before"], f["during"]
        print(f"{name}: second client's append p50/p99 {b['p50_ms']}/{b['p99_ms']} ms before, "
              f"{d['p50_ms']}/{d['p99_ms']} ms during ({d['appends']:,} appends; x{f.get('p50_ratio')}/"
              f"x{f.get('p99_ratio')}); node RSS {f['rss_start_mib']:.0f} / {f['rss_peak_mib']:.0f} / "
              f"{f['rss_after_mib']:.0f} MiB (start / peak / after), bound {f['rss_bound_mib']:.0f}; "
              f"flooder {f['flood']}")
    print()
    print(f"{'figure':55s} {'value':>10s}  target")
    for name, r in report["ratios"].items():
        mark = "ok " if r["met"] else "MISS"
        print(f"{name:55s} {r['value']!s:>10}  {r['target']:8s} {mark}")
    for n in report["notes"]:
        print(f"note: {n}")


def plot(report: dict[str, Any], path: str) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit("ledger-bench: --plot needs matplotlib (pip install 'converge-ledger[plot]')") from None
    items = [(k, v) for k, v in report["ratios"].items() if k.endswith(("_p50", "_seq", "_pipelined"))
             or "_vs_" in k]
    names = [k.replace("_vs_", "\nvs ") for k, _ in items]
    values = [v["value"] for _, v in items]
    targets = [float(v["target"].split()[1]) for _, v in items]
    colors = ["tab:green" if v["met"] else "tab:red" for _, v in items]
    fig, ax = plt.subplots(figsize=(11, 5))
    ax.bar(range(len(values)), values, color=colors)
    ax.scatter(range(len(values)), targets, marker="_", s=900, color="black", label="target", zorder=3)
    ax.set_xticks(range(len(values)))
    ax.set_xticklabels(names, fontsize=7)
    ax.set_ylabel("ratio")
    ax.set_title(f"ledger-bench ({report['mode']}): ratios against baselines (green: target met)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["_echo"]:
        echo_server(args[1])
        return 0
    if args[:1] == ["_watchers"]:
        return watchers_main(args[1])
    p = argparse.ArgumentParser(prog="ledger-bench", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n".join(__doc__.split("\n\n")[1:]))
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="a full pass in about two minutes")
    mode.add_argument("--smoke", action="store_true", help="tiny counts: proves the tool works (CI)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    p.add_argument("--plot", metavar="FILE.png", help="bar chart of the ratios (needs matplotlib)")
    p.add_argument("--only", metavar="NAMES", help="comma-separated scenario names to run")
    p.add_argument("--no-memory", action="store_true", help="skip the 1,000,000-entry memory/restart run")
    p.add_argument("--workdir", help="where nodes keep their data (default: a temporary folder)")
    ns = p.parse_args(args)
    sizes = SMOKE if ns.smoke else QUICK if ns.quick else FULL
    mode_name = "smoke" if ns.smoke else "quick" if ns.quick else "full"
    only = set(ns.only.split(",")) if ns.only else None
    if only and "flood" in only:
        only = (only - {"flood"}) | set(FLOOD_FIGURES)
    known = set(SCENARIOS) | set(OTHER_FIGURES) | set(FLOOD_FIGURES)
    if only and only - known:
        p.error(f"--only: unknown {', '.join(sorted(only - known))} "
                f"(known: {', '.join(SCENARIOS + OTHER_FIGURES + FLOOD_FIGURES)}, flood)")
    workdir = ns.workdir or tempfile.mkdtemp(prefix="ledger-bench-")
    os.makedirs(workdir, exist_ok=True)
    watch: dict[str, Any] = {}
    mesh: dict[str, Any] = {}

    def on_term(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt  # unwind, so that every process started so far is stopped

    try:
        old_term = signal.signal(signal.SIGTERM, on_term)
    except ValueError:  # not the main thread: leave signals alone
        old_term = None
    try:
        samples: dict[str, list[Sample]] = {}
        per_round: dict[str, list[float]] = {}
        notes: list[str] = []
        if only is None or only & (set(SCENARIOS) - {"watch_fanout", "catch_up"}):
            samples, per_round, notes = run_throughput(sizes, workdir, ns.json, only, watch, mesh)
        if only is None or "watch_fanout" in only:
            samples["watch_fanout"], watch["watch_fanout"] = run_fanout(sizes, workdir, ns.json)
        if only is None or "catch_up" in only:
            samples["catch_up"], mesh["catch_up"] = run_catch_up(sizes, workdir, ns.json)
            notes += mesh["catch_up"].pop("notes")
        if only is None or "heartbeat_bytes_10k" in only:
            mesh["heartbeat"] = run_heartbeat(sizes, workdir, ns.json)
            notes += mesh["heartbeat"].pop("notes", [])
        memory = None if ns.no_memory or (only and "memory" not in only) else run_memory(sizes, workdir, ns.json)
        floods = run_floods(sizes, [n for n in FLOOD_FIGURES if n in (only or ())], workdir, ns.json)
    except KeyboardInterrupt:
        print("ledger-bench: interrupted", file=sys.stderr)
        return 130
    except (RuntimeError, LedgerError) as exc:
        print(f"ledger-bench: error: {exc}", file=sys.stderr)
        return 1
    finally:
        if old_term is not None:
            signal.signal(signal.SIGTERM, old_term)
        if not ns.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    report = build_report(samples, per_round, memory, notes, mode_name, watch, mesh, floods)
    if ns.json:
        print(json.dumps(report))
    else:
        print_table(report)
    if ns.plot:
        plot(report, ns.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
