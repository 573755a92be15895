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

SCENARIOS = (
    "raw_echo_seq", "raw_echo_pipelined", "append_seq", "append_pipelined", "append_batch",
    "append_sync_pipelined", "get_one", "get_tail100", "redis_xadd_seq", "redis_xadd_pipelined",
    "redis_xadd_fsync_pipelined",
)
PAYLOAD_SIZE = 256
WINDOW = 1000
BATCH = 1000


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

    def rss_mb(self) -> float:
        try:
            with open(f"/proc/{self.popen.pid}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        return int(line.split()[1]) / 1024
        except OSError:
            pass
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
    for raw in p.stdout:
        line = raw.decode(errors="replace").strip()
        lines.append(line)
        if line.startswith("ready router="):
            addr = line.split()[1].split("=", 1)[1]
            # keep the pipe drained so the node never blocks on a full stdout
            _drain(p)
            return Proc("ledger", p, addr), time.monotonic() - t0
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


QUICK = Sizes(rounds=3, seq=1500, pipelined=20_000, batches=30, sync_pipelined=10_000, gets=1500,
              memory_entries=1_000_000, memory_contexts=1000)
FULL = Sizes(rounds=7, seq=5000, pipelined=60_000, batches=100, sync_pipelined=30_000, gets=5000,
             memory_entries=1_000_000, memory_contexts=1000)
SMOKE = Sizes(rounds=1, seq=20, pipelined=200, batches=2, sync_pipelined=100, gets=20,
              memory_entries=2000, memory_contexts=10)


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
]


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


def run_throughput(sizes: Sizes, workdir: str, quiet: bool, only: set[str] | None) -> tuple[dict[str, list[Sample]], dict[str, list[float]], list[str]]:
    notes: list[str] = []
    zctx: zmq.Context[Any] = zmq.Context()
    procs: list[Proc] = []
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
        if only:
            scenarios = [s for s in scenarios if s[0] in only]
        # warm-up: connections, caches, lazy imports
        e.seq(e.frames(50, echo_req))
        d.seq(d.frames(50, append_req))
        for r in range(sizes.rounds):
            order = scenarios[:]
            random.Random(r).shuffle(order)  # no scenario always runs first or last
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
        for dealer in (e, d, sd):
            dealer.close()
        for r_ in (rc, rf):
            if r_ is not None:
                r_.close()
    finally:
        for p in procs:
            p.stop()
        zctx.term()
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
        frames = []
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


def build_report(samples: dict[str, list[Sample]], per_round: dict[str, list[float]],
                 memory: dict[str, Any] | None, notes: list[str], mode: str) -> dict[str, Any]:
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
    if memory:
        ratios["rss_mb_1m_entries"] = {"value": memory["rss_mb"], "target": "<= 300", "met": memory["rss_mb"] <= 300}
        ratios["restart_s_1m_entries"] = {"value": memory["restart_s"], "target": "<= 3",
                                          "met": memory["restart_s"] <= 3}
    return {"mode": mode, "results": results, "ratios": ratios, "memory": memory,
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
    print()
    print(f"{'figure':55s} {'value':>10s}  target")
    for name, r in report["ratios"].items():
        mark = "ok " if r["met"] else "MISS"
        print(f"{name:55s} {r['value']:>10}  {r['target']:8s} {mark}")
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
    try:
        samples, per_round, notes = run_throughput(sizes, workdir, ns.json, only)
        memory = None if ns.no_memory or (only and "memory" not in only) else run_memory(sizes, workdir, ns.json)
    except KeyboardInterrupt:
        print("ledger-bench: interrupted", file=sys.stderr)
        return 130
    except RuntimeError as exc:
        print(f"ledger-bench: error: {exc}", file=sys.stderr)
        return 1
    finally:
        if not ns.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    report = build_report(samples, per_round, memory, notes, mode_name)
    if ns.json:
        print(json.dumps(report))
    else:
        print_table(report)
    if ns.plot:
        plot(report, ns.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
