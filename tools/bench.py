"""ledger-bench: the ledger side by side with a bare pyzmq server and Redis Streams.

Every system runs in its own process on loopback, started here on free ports,
and is driven from this process one scenario slice at a time, interleaved over
several rounds, so that a noisy machine moves all of them alike. The report
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
from protocol.errors import LedgerError

SCENARIOS = (
    "raw_echo_seq", "raw_echo_pipelined", "append_seq", "append_pipelined", "append_batch",
    "append_sync_pipelined", "get_one", "get_tail100", "redis_xadd_seq", "redis_xadd_pipelined",
    "redis_xadd_fsync_pipelined", "watch_latency", "append_pipelined_watched", "watch_fanout",
)
WATCH_SCENARIOS = ("watch_latency", "append_pipelined_watched")
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
    p = subprocess.Popen([sys.executable, "-m", "tools.bench", "_echo", port_file],
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 15
    while not os.path.exists(port_file):
        if p.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError("the echo server did not start")
        time.sleep(0.02)
    with open(port_file) as f:
        return Proc("echo", p, f"tcp://127.0.0.1:{f.read().strip()}")


def start_node(data: str, *flags: str) -> tuple[Proc, float]:
    """Start a ledger-node; returns it and the seconds until its ready line."""
    t0 = time.monotonic()
    p = subprocess.Popen(
        [sys.executable, "-m", "node.main", "--data", data, "--listen", "127.0.0.1:0",
         "--log-level", "warning", *flags],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
    )
    assert p.stdout is not None
    lines = []
    try:
        for raw in p.stdout:
            line = raw.decode(errors="replace").strip()
            lines.append(line)
            if line.startswith("ready router="):
                fields = dict(f.split("=", 1) for f in line.split()[1:] if "=" in f)
                # keep the pipe drained so the node never blocks on a full stdout
                _drain(p)
                return Proc("ledger", p, fields["router"], fields.get("pub", "")), time.monotonic() - t0
    except BaseException:
        Proc("ledger", p).stop()
        raise
    Proc("ledger", p).stop()
    raise RuntimeError("ledger-node did not start:\n" + "\n".join(lines))


def _drain(p: subprocess.Popen[bytes]) -> None:
    import threading

    def run() -> None:
        assert p.stdout is not None
        for _ in p.stdout:
            pass

    threading.Thread(target=run, daemon=True).start()


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
        out = {"context": self.context, "last": w.last_seq, "count": self.count, "errors": self.errors,
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
    n = len(contexts) * per
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
        client = Client(spec["address"], timeout=10.0, zctx=zctx)
        states: list[_WatcherState] = []
        by_sock: dict[Any, _WatcherState] = {}
        poller = zmq.Poller()
        for c in contexts:
            for _ in range(per):
                w = client.watch(c, after=spec.get("after"), pub_address=spec["pub"], **options)
                st = _WatcherState(w, c, c in record, w.last_seq + 1)
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
            popen = subprocess.Popen([sys.executable, "-m", "tools.bench", "_watchers", json.dumps(spec)],
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


def pipelined_submits(dealer: Dealer, frames: Sequence[bytes], window: int = WINDOW,
                      ) -> tuple[Sample, dict[tuple[str, int], int]]:
    """Dealer.pipelined, also noting when each entry's append was sent (monotonic ns).

    A pipelined appender reads its acknowledgements late (it is busy sending), often after
    the watchers have the entry: submission is the time a delivery latency can start from.
    """
    s = dealer.s
    mono = time.monotonic_ns
    unpackb = msgpack.unpackb
    sent_at: list[int] = []
    lat = []
    submits: dict[tuple[str, int], int] = {}
    n = len(frames)
    sent = got = 0
    t0 = mono()
    while got < n:
        while sent < n and sent - got < window:
            sent_at.append(mono())
            s.send(frames[sent])
            sent += 1
        reply = s.recv()
        lat.append((mono() - sent_at[got]) / 1e9)
        m = unpackb(reply)
        if not m.get("ok"):
            raise RuntimeError(f"request failed: {m}")
        submits[(m["entry"]["context"], m["entry"]["seq"])] = sent_at[got]  # replies come in request order
        got += 1
    return Sample(n, (mono() - t0) / 1e9, lat), submits


def watch_health(reports: Sequence[dict[str, Any]]) -> dict[str, int]:
    """Totals over watchers: ordering errors and what the Watch had to repair."""
    return {k: sum(int(w[k]) for w in reports) for k in ("errors", "refills", "duplicates", "dropped_ahead", "outages")}


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


QUICK = Sizes(rounds=3, seq=1500, pipelined=20_000, batches=30, sync_pipelined=10_000, gets=1500,
              memory_entries=1_000_000, memory_contexts=1000, watch_appends=2000, fanout_contexts=100,
              fanout_entries=50)
FULL = Sizes(rounds=7, seq=5000, pipelined=60_000, batches=100, sync_pipelined=30_000, gets=5000,
             memory_entries=1_000_000, memory_contexts=1000, watch_appends=5000, fanout_contexts=100,
             fanout_entries=100)
SMOKE = Sizes(rounds=1, seq=20, pipelined=200, batches=2, sync_pipelined=100, gets=20,
              memory_entries=2000, memory_contexts=10, watch_appends=50, fanout_contexts=100,
              fanout_entries=3)


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
]
WATCH_LATENCY_P99_US = 5000


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
                   watch_detail: dict[str, Any] | None = None,
                   ) -> tuple[dict[str, list[Sample]], dict[str, list[float]], list[str]]:
    """The interleaved rounds; what the watch scenarios saw besides timings goes to `watch_detail`."""
    notes: list[str] = []
    detail: dict[str, Any] = {} if watch_detail is None else watch_detail
    zctx: zmq.Context[Any] = zmq.Context()
    procs: list[Proc] = []
    helpers: list[Watchers] = []
    samples: dict[str, list[Sample]] = {}
    per_round: dict[str, list[float]] = {}
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
            this_round: dict[str, Sample] = {}
            for name, fn in order:
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
        for dealer in (e, d, sd):
            dealer.close()
        for r_ in (rc, rf):
            if r_ is not None:
                r_.close()
    finally:
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
            _, submits = pipelined_submits(d, frames)
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
                 watch: dict[str, Any] | None = None) -> dict[str, Any]:
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
    if memory:
        ratios["rss_mb_1m_entries"] = {"value": memory["rss_mb"], "target": "<= 300", "met": memory["rss_mb"] <= 300}
        ratios["restart_s_1m_entries"] = {"value": memory["restart_s"], "target": "<= 3",
                                          "met": memory["restart_s"] <= 3}
    return {"mode": mode, "results": results, "ratios": ratios, "memory": memory, "watch": watch or None,
            "environment": environment(), "notes": notes}


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
    workdir = ns.workdir or tempfile.mkdtemp(prefix="ledger-bench-")
    os.makedirs(workdir, exist_ok=True)
    watch: dict[str, Any] = {}

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
        if only is None or only & (set(SCENARIOS) - {"watch_fanout"}):
            samples, per_round, notes = run_throughput(sizes, workdir, ns.json, only, watch)
        if only is None or "watch_fanout" in only:
            samples["watch_fanout"], watch["watch_fanout"] = run_fanout(sizes, workdir, ns.json)
        memory = None if ns.no_memory or (only and "memory" not in only) else run_memory(sizes, workdir, ns.json)
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
    report = build_report(samples, per_round, memory, notes, mode_name, watch)
    if ns.json:
        print(json.dumps(report))
    else:
        print_table(report)
    if ns.plot:
        plot(report, ns.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
