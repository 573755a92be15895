"""`ledger-chaos`: a seeded chaos run against a real mesh of `ledger-node` processes.

Theory of operation
-------------------
One `random.Random(seed)` makes every random choice: first the whole fault
schedule (`plan_faults`), then one seed per workload thread. The schedule is
fixed before the first node starts, as offsets from the start of the fault
phase, so the same seed replays the same faults whatever the nodes do (the
workload replays its choices too, as far as the outcomes it sees are the same).

A run:

1. Start N nodes with `--durability sync` (acknowledged means fsynced, so it
   survives kill -9), or `--durability async` (the default of ledger-node:
   acknowledged means in RAM, on disk within `--flush-ms`), and fast heartbeats:
   on loopback on free ports, or, with `--partitions`, each in its own network
   namespace joined by a bridge.
2. Create every context at a chosen writer (spread over the nodes) and wait
   until every node holds all of them. The workload never creates a context,
   so a fork can only come from a bug, never from two nodes creating one name.
3. For `--duration` seconds: writers append with a dedup_id, retries and a
   causal token (`after_lamport` = the largest lamport they observed), readers
   read, one watcher per context follows it from seq 0, and the nemesis runs
   the schedule: kill -9 and restart on the same ports and data folder,
   SIGSTOP/SIGCONT, and iptables partitions.
4. Heal everything (restart, SIGCONT, flush the rules), wait until every node
   has the same (size, root) for every context, let the watchers catch up,
   read the final logs and check them against the history.

Every operation is recorded with its invoke and completion times and an
outcome: `ok`; `fail` (the node answered that it did not apply it:
UNAVAILABLE because the writer is down, NOT_WRITER, ...); `unknown` (no answer
in time: it may or may not have been applied, which the dedup_id makes safe to
retry). The checker (`check_history`, pure) reports lost acknowledged writes,
duplicates, order and causality violations, reads and watches that disagree
with the final log, and writes that every attempt saw fail yet exist.

Each mode has its promise. In sync mode nothing acknowledged may be missing. In
async mode an acknowledged append may be missing only if its context's writer was
killed within the flush interval (plus a second of slack) after acknowledging it;
what the replicas had of such a lost tail is set aside as a fork (readable with
`get fork=`), and a read or a watcher that saw it is judged against those
set-aside histories. A watcher whose node switches to the writer's history
(IntegrityError) starts again from seq 0, as an application would. Everything
else (no duplicates, order, causality, convergence, no fork but a writer's lost
tail) holds as in sync mode.

Exit codes: 0 every check holds; 1 a check failed; 2 usage or environment
(a node that will not start, partitions without root/ip/iptables); 130
interrupted. Every node is stopped in all cases (SIGCONT first if paused) and
the network namespaces are removed; node logs stay in the work folder.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import zmq

from protocol.client import Client
from protocol.entry import Entry
from protocol.errors import IntegrityError, LedgerError, Timeout, Unavailable

PROG = "ledger-chaos"
EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
KINDS = ("kill", "pause", "partition")
READY = re.compile(r"^ready router=(\S+) pub=(\S+) id=(\S+)$", re.MULTILINE)
# Fast failure detection so that faults of a second or two are seen as faults.
NODE_FLAGS = (
    "--heartbeat-ms", "100", "--suspect-after", "3", "--dead-after", "8",
    "--watch-heartbeat-ms", "250", "--replica-timeout-ms", "2000",
)
OP_TIMEOUT = 1.0          # a client's wait for one answer; past it the operation is unknown
WRITE_GIVE_UP = 4.0       # a writer retries one dedup_id this long, then moves on
START_TIMEOUT = 30.0
NS_PORT = 7400            # in a namespace every node has its own port space
STALE_S = 10.0            # async mode: how long after its writer's kill a replica may still serve a lost tail
CRASH_SLACK_S = 1.0       # async mode: past flush_ms, how late a flush may still be on a loaded machine
MAX_PROBLEMS = 50         # problems listed in the report (all are counted)


class ChaosError(Exception):
    """The run cannot go on: a node that will not start, a missing tool."""


# -- the schedule ------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Fault:
    """One planned fault: `at` seconds into the fault phase, for `duration` seconds.

    kill/pause name one node; a partition names one side (the other side is
    every other node)."""

    at: float
    kind: str
    nodes: tuple[str, ...]
    duration: float

    def to_json(self) -> dict[str, Any]:
        return {"at": self.at, "kind": self.kind, "nodes": list(self.nodes), "duration": self.duration}


def plan_faults(rng: random.Random, names: Sequence[str], duration: float, partitions: bool = False) -> list[Fault]:
    """The fault schedule, drawn from `rng` alone (so a seed replays it exactly).

    Every kind comes at least once, early and in a random order, when the run is
    long enough. A node has one fault at a time, with half a second of rest after
    it; at most N-1 nodes are down or paused together; one partition at a time.
    """
    kinds = ["kill", "pause"] + (["partition"] if partitions and len(names) >= 2 else [])
    owed = list(kinds)
    rng.shuffle(owed)
    cap = max(1, len(names) - 1)
    busy = dict.fromkeys(names, 0.0)
    split_busy = 0.0
    out: list[Fault] = []
    longest = max(0.6, min(3.0, duration / 4))
    t = round(rng.uniform(0.3, 1.0), 3)
    while t < duration - 0.3:
        kind = owed[0] if owed else rng.choice(kinds)
        d = round(rng.uniform(0.5, longest), 3)
        if kind == "partition":
            if split_busy <= t:
                order = sorted(names)
                rng.shuffle(order)
                side = tuple(sorted(order[: rng.randint(1, len(names) // 2)]))
                out.append(Fault(t, kind, side, d))
                split_busy = t + d + 0.5
                if owed and owed[0] == kind:
                    owed.pop(0)
        else:
            free = [n for n in names if busy[n] <= t]
            down = sum(1 for n in names if busy[n] > t)
            if free and down < cap:
                n = rng.choice(free)
                out.append(Fault(t, kind, (n,), d))
                busy[n] = t + d + 0.5
                if owed and owed[0] == kind:
                    owed.pop(0)
        t = round(t + rng.uniform(0.3, 2.5), 3)  # about one fault at a time on average, with quiet spells
    return out


@dataclass(frozen=True, slots=True)
class Plan:
    """Everything the seed decides before the run starts."""

    seed: int
    faults: list[Fault]
    worker_seeds: dict[str, int]
    context_writers: dict[str, str]
    watcher_nodes: dict[str, str]


def node_names(n: int) -> list[str]:
    return [f"n{i}" for i in range(1, n + 1)]


def make_plan(seed: int, nodes: int, duration: float, partitions: bool, contexts: int,
              writers: int, readers: int) -> Plan:
    rng = random.Random(seed)
    names = node_names(nodes)
    faults = plan_faults(rng, names, duration, partitions)
    workers = [f"w{i}" for i in range(1, writers + 1)] + [f"r{i}" for i in range(1, readers + 1)]
    worker_seeds = {w: rng.getrandbits(64) for w in workers}
    ctx_names = [f"chaos-{i}" for i in range(contexts)]
    context_writers = {c: names[i % len(names)] for i, c in enumerate(ctx_names)}
    watcher_nodes = {c: rng.choice(names) for c in ctx_names}
    return Plan(seed, faults, worker_seeds, context_writers, watcher_nodes)


# -- nodes ---------------------------------------------------------------------------


def _free_port_block(count: int) -> int:
    """A base port with `count` consecutive free ports below the ephemeral range.

    Ports there are never handed to outgoing connections, so a killed node's
    port cannot be taken by a client's reconnect before it restarts."""
    sysrand = random.SystemRandom()
    for _ in range(200):
        base = sysrand.randrange(20_000, 32_000 - count)
        socks = []
        try:
            for p in range(base, base + count):
                s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                socks.append(s)
                s.bind(("127.0.0.1", p))
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise ChaosError("found no block of free ports on 127.0.0.1")


class NodeProc:
    """One `ledger-node` child: started, killed, paused and restarted in place.

    Its stdout and stderr go to `<workdir>/<name>.log`, appended across
    restarts with a marker line before each start."""

    def __init__(self, name: str, workdir: Path, host: str, port: int, pub_port: int,
                 flags: Sequence[str], netns: str | None = None) -> None:
        self.name = name
        self.data = workdir / name
        self.log_path = workdir / f"{name}.log"
        self.host = host
        self.port = port
        self.pub_port = pub_port
        self.flags = list(flags)
        self.netns = netns
        self.proc: subprocess.Popen[bytes] | None = None
        self.paused = False
        self.expect_exit = False   # we killed or are stopping it: an exit is not a crash
        self.starts = 0

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def pub(self) -> str:
        return f"tcp://{self.host}:{self.pub_port}"

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, peers: Sequence[str], abort: threading.Event | None = None) -> None:
        cmd = ["ip", "netns", "exec", self.netns] if self.netns else []
        cmd += [sys.executable, "-m", "node.main", "--id", self.name, "--data", str(self.data),
                "--listen", self.address, "--pub-port", str(self.pub_port), *self.flags]
        if peers:
            cmd += ["--peers", ",".join(peers)]
        self.starts += 1
        with open(self.log_path, "ab") as log:
            stamp = time.strftime("%H:%M:%S")
            log.write(f"=== {PROG}: start #{self.starts} of {self.name} at {stamp}: {' '.join(cmd)}\n".encode())
            log.flush()
            offset = log.tell()
            env = dict(os.environ, PYTHONUNBUFFERED="1")
            # A session of its own: a Ctrl-C at the terminal reaches the harness,
            # which stops the nodes itself (SIGCONT first for paused ones).
            self.proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                         env=env, start_new_session=True)
        self.paused = False
        self.expect_exit = False
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            text = self._log_from(offset)
            if READY.search(text):
                return
            rc = self.proc.poll()
            if rc is not None or time.monotonic() > deadline or (abort is not None and abort.is_set()):
                self.kill()
                tail = "\n".join(text.splitlines()[-8:])
                why = f"exited with code {rc}" if rc is not None else "did not become ready"
                raise ChaosError(f"node {self.name} {why} (log {self.log_path}):\n{tail}")
            time.sleep(0.05)

    def _log_from(self, offset: int) -> str:
        with open(self.log_path, "rb") as f:
            f.seek(offset)
            return f.read().decode(errors="replace")

    def kill(self) -> None:
        """kill -9, as a crash would (SIGKILL ends a stopped process too)."""
        self.expect_exit = True
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self.paused = False

    def pause(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGSTOP)
            self.paused = True

    def resume(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGCONT)
        self.paused = False

    def stop(self, timeout: float = 15.0) -> int | None:
        """SIGCONT if paused, SIGTERM, then SIGKILL if it hangs; returns the exit code."""
        if self.proc is None:
            return None
        self.expect_exit = True
        if self.proc.poll() is None:
            if self.paused:
                self.resume()
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        return self.proc.returncode

    def log_lines(self, pattern: str) -> list[str]:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return []
        return [line for line in text.splitlines() if re.search(pattern, line)]


# -- partitions --------------------------------------------------------------------------


def partition_support() -> str | None:
    """None when partitions can run here, else why not (for one clear message)."""
    if os.geteuid() != 0:
        return "network partitions need root (network namespaces and iptables)"
    missing = [t for t in ("ip", "iptables") if shutil.which(t) is None]
    if missing:
        return f"network partitions need {' and '.join(missing)} (iproute2, iptables) on the PATH"
    probe = f"lcprobe{os.getpid()}"
    r = subprocess.run(["ip", "netns", "add", probe], capture_output=True, text=True)
    if r.returncode != 0:
        return f"cannot create a network namespace: {r.stderr.strip()}"
    try:
        r = subprocess.run(["ip", "netns", "exec", probe, "iptables", "-w", "-S"], capture_output=True, text=True)
        if r.returncode != 0:
            return f"iptables does not work in a network namespace: {r.stderr.strip()}"
    finally:
        subprocess.run(["ip", "netns", "del", probe], capture_output=True)
    return None


class Netns:
    """Each node in its own network namespace, joined by a bridge in the harness's.

    Node i listens on 10.213.K.i; the bridge holds .254, so the harness (and
    its clients) reach every node whatever the partition: a partition cuts
    node-to-node traffic only, with iptables DROP rules inside the namespaces
    of both sides (no REJECT: a partition looks like silence, not an error).
    Nothing is routed anywhere but this /24, which exists only here."""

    def __init__(self, count: int) -> None:
        pid = os.getpid()
        self.tag = f"lc{pid}"
        self.bridge = f"{self.tag}br"
        self.names = [f"ledger-chaos-{pid}-n{i}" for i in range(1, count + 1)]
        self.subnet = self._free_subnet(pid)
        self.ips = [f"{self.subnet}.{i}" for i in range(1, count + 1)]
        self.created: list[str] = []
        self.bridge_up = False

    @staticmethod
    def _free_subnet(pid: int) -> str:
        used = subprocess.run(["ip", "-o", "-4", "addr", "show"], capture_output=True, text=True).stdout
        for k in range(250):
            cand = f"10.213.{(pid + k) % 250 + 1}"
            if f" {cand}." not in used:
                return cand
        raise ChaosError("no free 10.213.x.0/24 subnet for the namespaces")

    @staticmethod
    def _ip(*args: str) -> None:
        r = subprocess.run(["ip", *args], capture_output=True, text=True)
        if r.returncode != 0:
            raise ChaosError(f"ip {' '.join(args)}: {r.stderr.strip()}")

    def setup(self) -> None:
        self._ip("link", "add", self.bridge, "type", "bridge")
        self.bridge_up = True
        self._ip("addr", "add", f"{self.subnet}.254/24", "dev", self.bridge)
        self._ip("link", "set", self.bridge, "up")
        for i, (ns, ip) in enumerate(zip(self.names, self.ips, strict=True), start=1):
            self._ip("netns", "add", ns)
            self.created.append(ns)
            host_end = f"{self.tag}v{i}"
            self._ip("link", "add", host_end, "type", "veth", "peer", "name", "eth0", "netns", ns)
            self._ip("link", "set", host_end, "master", self.bridge)
            self._ip("link", "set", host_end, "up")
            self._ip("-n", ns, "addr", "add", f"{ip}/24", "dev", "eth0")
            self._ip("-n", ns, "link", "set", "eth0", "up")
            self._ip("-n", ns, "link", "set", "lo", "up")

    def _iptables(self, ns: str, *args: str) -> None:
        r = subprocess.run(["ip", "netns", "exec", ns, "iptables", "-w", *args], capture_output=True, text=True)
        if r.returncode != 0:
            raise ChaosError(f"iptables {' '.join(args)} in {ns}: {r.stderr.strip()}")

    def cut(self, side: Iterable[int]) -> None:
        """Drop all traffic between the nodes of `side` (indexes) and every other node."""
        a = set(side)
        b = [i for i in range(len(self.names)) if i not in a]
        for i in a:
            for j in b:
                for x, y in ((i, j), (j, i)):
                    self._iptables(self.names[x], "-A", "INPUT", "-s", self.ips[y], "-j", "DROP")
                    self._iptables(self.names[x], "-A", "OUTPUT", "-d", self.ips[y], "-j", "DROP")

    def heal(self) -> None:
        for ns in self.names:
            self._iptables(ns, "-F")

    def teardown(self) -> list[str]:
        errors = []
        # Delete the veth pairs first: a namespace that is gone from `ip netns` can
        # linger in the kernel a while, its veths (and their host ends) with it.
        for i in range(1, len(self.created) + 1):
            subprocess.run(["ip", "link", "del", f"{self.tag}v{i}"], capture_output=True)
        for ns in self.created:
            r = subprocess.run(["ip", "netns", "del", ns], capture_output=True, text=True)
            if r.returncode != 0:
                errors.append(f"ip netns del {ns}: {r.stderr.strip()}")
        self.created = []
        if self.bridge_up:
            r = subprocess.run(["ip", "link", "del", self.bridge], capture_output=True, text=True)
            if r.returncode != 0:
                errors.append(f"ip link del {self.bridge}: {r.stderr.strip()}")
            self.bridge_up = False
        return errors


# -- the history -----------------------------------------------------------------------


class History:
    """Every operation: who, what, where, invoke and completion times, outcome.

    Times are seconds since the fault phase started (setup is negative)."""

    def __init__(self) -> None:
        self.ops: list[dict[str, Any]] = []
        self.t0 = time.monotonic()
        self._lock = threading.Lock()

    def now(self) -> float:
        return round(time.monotonic() - self.t0, 4)

    def invoke(self, process: str, f: str, context: str, node: str, **fields: Any) -> dict[str, Any]:
        op = {"process": process, "f": f, "context": context, "node": node, "invoke": self.now(),
              "type": "invoke", **fields}
        with self._lock:
            op["index"] = len(self.ops)
            self.ops.append(op)
        return op

    def complete(self, op: dict[str, Any], outcome: str, **fields: Any) -> None:
        op.update(fields)
        op["complete"] = self.now()
        op["type"] = outcome


def error_code(exc: LedgerError) -> str:
    """The error's code, with a timeout told apart from an UNAVAILABLE answer."""
    return "TIMEOUT" if isinstance(exc, Timeout) else exc.code


def classify(exc: LedgerError) -> str:
    """fail: the node said it did not apply it; unknown: it may have."""
    if isinstance(exc, Timeout):
        return "unknown"
    if isinstance(exc, Unavailable) and "required" in exc.details:
        return "unknown"  # replicas=N timed out: appended, not acknowledged at the level asked
    return "fail"


# -- the checker (pure) -------------------------------------------------------------------


def check_history(ops: Sequence[Mapping[str, Any]], logs: Mapping[str, Sequence[Entry]],
                  watches: Sequence[Mapping[str, Any]], *, durability: str = "sync", flush_s: float = 0.0,
                  kills: Sequence[tuple[str, float]] = (), writers: Mapping[str, str] | None = None,
                  aside: Mapping[str, Mapping[str, str]] | None = None) -> dict[str, Any]:
    """Check a recorded history against the final logs (one per context).

    `ops`: History records; appends carry `dedup` (kept in the entry's metadata
    `d`), `after_lamport`, and when ok `seq`, `lamport`, `hash` (hex); gets
    carry `entries` [[seq, hash hex], ...]. `watches`: {"name", "context",
    "delivered": [[seq, hash hex], ...], "errors": [...], and in async mode
    "earlier": the deliveries of watches ended by a switch of history}.
    In async mode (`durability`), `kills` [(node, t)], `writers` (context ->
    its writer node) and `aside` (context -> {hash hex: dedup} of every history
    set aside on any node) judge what a writer's crash may take: an acknowledged
    append missing from the final log is allowed when its writer was killed
    between its invocation and `flush_s` (+ CRASH_SLACK_S) after its
    acknowledgement, and a read or watch of an entry not in the final log is
    allowed when a replica kept it aside.
    Returns counts and a list of problems, each one sentence.
    """
    lenient = durability == "async"
    kept_aside = aside or {}

    def crashed_with(op: Mapping[str, Any]) -> bool:
        w = (writers or {}).get(op["context"])
        return any(n == w and op["invoke"] <= t <= op["complete"] + flush_s + CRASH_SLACK_S for n, t in kills)

    def aside_holds(ctx: str, h: str) -> bool:
        return lenient and h in kept_aside.get(ctx, {})

    def lost_tail(ctx: str, h: str, t: float | None) -> bool:
        """An entry served once that no node holds now: in async mode, allowed only as part of
        a tail its writer lost, which needs a kill of that writer (at most STALE_S before the
        read: a replica serves the lost tail until it has compared with the restarted writer).
        Counted either way, so a run shows how often it happened."""
        if not lenient:
            return False
        if aside_holds(ctx, h):
            return True
        w = (writers or {}).get(ctx)
        if any(n == w and (t is None or tt >= t - STALE_S) for n, tt in kills):
            counts["served_then_lost"] += 1
            return True
        return False
    problems: list[str] = []
    counts: Counter[str] = Counter()

    def problem(kind: str, text: str) -> None:
        counts[kind] += 1
        if len(problems) < MAX_PROBLEMS:
            problems.append(text)

    index: dict[str, dict[str, list[Entry]]] = {}
    for ctx, log in logs.items():
        by_dedup: dict[str, list[Entry]] = defaultdict(list)
        payloads: Counter[bytes] = Counter()
        prev_lamport = 0
        for i, e in enumerate(log, start=1):
            if e.seq != i:
                problem("order", f"{ctx}: entry {i} of the final log has seq {e.seq} (seq must be dense from 1)")
            if e.lamport <= prev_lamport:
                problem("causality", f"{ctx}#{e.seq}: lamport {e.lamport} is not above the previous entry's "
                        f"{prev_lamport}")
            prev_lamport = max(prev_lamport, e.lamport)
            d = e.metadata.get("d")
            if d is not None:
                by_dedup[d].append(e)
            payloads[e.payload] += 1
        index[ctx] = by_dedup
        for d, es in by_dedup.items():
            if len(es) > 1:
                problem("duplicates", f"{ctx}: dedup_id {d} appears {len(es)} times (seqs {[e.seq for e in es]})")
        for p, n in payloads.items():
            if n > 1 and not any(len(es) > 1 and es[0].payload == p for es in by_dedup.values()):
                problem("duplicates", f"{ctx}: payload {p[:40]!r} appears {n} times")

    appends = [op for op in ops if op.get("f") == "append"]
    attempts: dict[tuple[str, str], list[Mapping[str, Any]]] = defaultdict(list)
    for op in appends:
        attempts[(op["context"], op["dedup"])].append(op)

    acked = [op for op in appends if op.get("type") == "ok"]
    for op in acked:
        ctx, d = op["context"], op["dedup"]
        found = index.get(ctx, {}).get(d)
        if not found and lenient and crashed_with(op):
            counts["lost_in_crash"] += 1  # async durability's promise allows it
            if aside_holds(ctx, op["hash"]):
                counts["lost_in_crash_set_aside"] += 1
            continue
        if not found:
            problem("lost_acked", f"{ctx}: acknowledged append {d} (seq {op['seq']}, by {op['process']} at "
                    f"{op['node']}, t={op['complete']}) is not in the final log")
            continue
        e = found[0]
        if e.seq != op["seq"] or e.hash.hex() != op["hash"]:
            problem("lost_acked", f"{ctx}: acknowledged append {d} was seq {op['seq']} hash {op['hash'][:16]}, "
                    f"the final log has it as seq {e.seq} hash {e.hash.hex()[:16]}")
        after = op.get("after_lamport") or 0
        if op["lamport"] <= after:
            problem("causality", f"{ctx}#{op['seq']}: append {d} got lamport {op['lamport']}, not above the "
                    f"{after} its client had observed and passed")

    # A client's sequential appends: once one is acknowledged, every later
    # acknowledged append has a higher lamport (its token carried the first
    # one's), and within a context a higher seq.
    by_process: dict[str, list[Mapping[str, Any]]] = defaultdict(list)
    for op in acked:
        if lenient and not index.get(op["context"], {}).get(op["dedup"]):
            continue  # lost with its writer's tail (allowed above): its seq was given again
        by_process[op["process"]].append(op)
    for proc, its in by_process.items():
        its.sort(key=lambda o: o["invoke"])
        last_in_ctx: dict[str, Mapping[str, Any]] = {}
        prev: Mapping[str, Any] | None = None
        for op in its:
            if prev is not None and prev["dedup"] != op["dedup"] and op["lamport"] <= prev["lamport"]:
                problem("causality", f"{proc}: append {op['dedup']} got lamport {op['lamport']} after its earlier "
                        f"{prev['dedup']} was acknowledged with {prev['lamport']}")
            before = last_in_ctx.get(op["context"])
            if before is not None and before["dedup"] != op["dedup"] and op["seq"] <= before["seq"]:
                problem("order", f"{op['context']}: {proc}'s append {op['dedup']} (seq {op['seq']}) was invoked after "
                        f"its {before['dedup']} (seq {before['seq']}) was acknowledged")
            last_in_ctx[op["context"]] = op
            prev = op

    # Writes every attempt of which the node refused, yet there they are.
    for (ctx, d), ats in attempts.items():
        if all(a.get("type") == "fail" for a in ats) and index.get(ctx, {}).get(d):
            problem("phantom_writes", f"{ctx}: append {d} was refused on every attempt "
                    f"({', '.join(str(a.get('error')) for a in ats)}) but is in the final log")

    for op in ops:
        if op.get("f") == "get" and op.get("type") == "ok":
            log = logs.get(op["context"], [])
            for seq, h in op.get("entries", []):
                if (seq > len(log) or log[seq - 1].hash.hex() != h) and not lost_tail(op["context"], h, op["invoke"]):
                    problem("read_violations", f"{op['context']}#{seq}: {op['process']} read hash {h[:16]} at "
                            f"{op['node']} (t={op['invoke']}), which the final log does not hold")
                    break
        if op.get("type") == "fail" and op.get("error") in ("INTERNAL", "INTEGRITY", "BAD_REQUEST"):
            problem("unexpected_errors", f"{op['process']} {op['f']} {op['context']} at {op['node']} "
                    f"(t={op['invoke']}): {op['error']} {op.get('message', '')}")

    for w in watches:
        log = logs.get(w["context"], [])
        want = [[e.seq, e.hash.hex()] for e in log]
        got = [list(x) for x in w["delivered"]]
        for err in w.get("errors", []):
            problem("watch_violations", f"watcher {w['name']} of {w['context']}: {err}")
        for seg in w.get("earlier", []):
            # a watch ended by a switch of history: consecutive from 1, every entry in the final
            # log under its seq or in a history kept aside (the writer's lost tail)
            seqs = [s for s, _ in seg]
            bad = next((f"entry #{s} ({h[:16]}) is neither in the final log nor set aside" for s, h in seg
                        if not ((s <= len(log) and log[s - 1].hash.hex() == h) or lost_tail(w["context"], h, None))),
                       None)
            if seqs != list(range(1, len(seqs) + 1)):
                bad = f"delivered seqs {seqs[:5]}... are not 1, 2, 3, ..."
            if bad:
                problem("watch_violations", f"watcher {w['name']} of {w['context']} before a history switch: {bad}")
        if got != want:
            seqs = [s for s, _ in got]
            dup = len(seqs) - len(set(seqs))
            first_bad = next((i for i, (a, b) in enumerate(zip(got, want, strict=False)) if a != b), None)
            why = (f"{dup} duplicate(s)" if dup else
                   f"differs from the final log at position {first_bad + 1}" if first_bad is not None else
                   f"saw {len(got)} of {len(want)} entries")
            problem("watch_violations", f"watcher {w['name']} of {w['context']} at {w.get('node')}: {why}")

    names = ("lost_acked", "duplicates", "order", "causality", "phantom_writes", "read_violations",
             "watch_violations", "unexpected_errors")
    result: dict[str, Any] = {n if n != "order" and n != "causality" else f"{n}_violations": counts[n] for n in names}
    result["acked"] = len({(op["context"], op["dedup"]) for op in acked})
    result["lost_in_crash"] = counts["lost_in_crash"]
    result["lost_in_crash_set_aside"] = counts["lost_in_crash_set_aside"]
    result["served_then_lost"] = counts["served_then_lost"]
    outcomes: Counter[str] = Counter()
    for (_, _), ats in attempts.items():
        kinds = {a.get("type") for a in ats}
        outcomes["ok" if "ok" in kinds else "unknown" if "unknown" in kinds else "fail"] += 1
    result["writes_failed"] = outcomes["fail"]
    result["writes_unknown"] = outcomes["unknown"]
    result["attempts"] = len(appends)
    result["reads"] = sum(1 for op in ops if op.get("f") in ("get", "head") and op.get("type") == "ok")
    result["problems"] = problems
    return result


# -- the run ------------------------------------------------------------------------------


@dataclass
class Options:
    nodes: int = 3
    duration: float = 20.0
    seed: int = 0
    partitions: bool = False
    json: bool = False
    plot: str | None = None
    contexts: int = 4
    writers: int = 3
    readers: int = 2
    replicas: int = 0
    durability: str = "sync"
    flush_ms: int = 500
    converge_timeout: float = 60.0
    workdir: str | None = None
    keep_data: bool = False
    verbose: bool = False


class Run:
    """One chaos run: the cluster, the workload threads, the nemesis, the final check."""

    def __init__(self, opts: Options, plan: Plan, workdir: Path, say: Callable[[str], None]) -> None:
        self.opts = opts
        self.plan = plan
        self.workdir = workdir
        self.say = say
        self.history = History()
        self.zctx: zmq.Context[Any] = zmq.Context()
        self.stop_work = threading.Event()      # writers and readers
        self.stop_watch = threading.Event()     # watchers
        self.abort = threading.Event()          # everything, now (errors, Ctrl-C)
        self.phase_start = time.monotonic()
        self.contexts = list(plan.context_writers)
        self.sizes: dict[str, int] = dict.fromkeys(self.contexts, 0)
        self.watch_targets: dict[str, int] = {}
        self.watches: list[dict[str, Any]] = []
        self.executed: list[dict[str, Any]] = []
        self.crashes: list[str] = []
        self.harness_errors: list[str] = []
        self.threads: list[threading.Thread] = []
        self.nemesis_thread: threading.Thread | None = None
        self.netns: Netns | None = None
        self.nodes: list[NodeProc] = []
        self.heal_s: float | None = None

    # -- cluster --------------------------------------------------------------------

    def node(self, name: str) -> NodeProc:
        return next(n for n in self.nodes if n.name == name)

    def peers_of(self, node: NodeProc) -> list[str]:
        return [m.address for m in self.nodes if m is not node]

    def start_cluster(self) -> None:
        flags = [*NODE_FLAGS, "--durability", self.opts.durability]
        if self.opts.durability == "async":
            flags += ["--flush-ms", str(self.opts.flush_ms)]
        names = node_names(self.opts.nodes)
        if self.opts.partitions:
            self.netns = Netns(self.opts.nodes)
            self.netns.setup()
            for name, ns, ip in zip(names, self.netns.names, self.netns.ips, strict=True):
                self.nodes.append(NodeProc(name, self.workdir, ip, NS_PORT, NS_PORT + 1, flags, ns))
        else:
            base = _free_port_block(2 * self.opts.nodes)
            for i, name in enumerate(names):
                self.nodes.append(NodeProc(name, self.workdir, "127.0.0.1", base + 2 * i, base + 2 * i + 1, flags))
        for i, n in enumerate(self.nodes):
            n.data.mkdir(parents=True, exist_ok=True)
            n.start([self.nodes[0].address] if i else [], self.abort)
            self.say(f"node {n.name}: requests {n.address}  watch {n.pub}  log {n.log_path}")

    def restart(self, node: NodeProc) -> None:
        for attempt in range(3):
            if self.abort.is_set():
                return
            try:
                node.start(self.peers_of(node), self.abort)
                return
            except ChaosError as exc:
                if self.abort.is_set() or attempt == 2:
                    self.harness_errors.append(f"restart of {node.name} failed: {exc}")
                    return
                time.sleep(1.0)

    def shutdown(self) -> list[str]:
        """Stop every node (SIGCONT first if paused), then remove the namespaces."""
        errors = []
        for n in self.nodes:
            try:
                n.stop()
            except Exception as exc:  # keep stopping the others
                errors.append(f"stopping {n.name}: {exc}")
        if self.netns is not None:
            errors += self.netns.teardown()
        return errors

    # -- setup ------------------------------------------------------------------------

    def create_contexts(self) -> None:
        """Each context's first entry at its chosen writer, then wait until all nodes hold all."""
        token = 0
        for ctx, writer in self.plan.context_writers.items():
            node = self.node(writer)
            with Client(node.address, timeout=5.0, retries=3, zctx=self.zctx) as c:
                op = self.history.invoke("setup", "append", ctx, writer, dedup=f"setup-{ctx}", after_lamport=token)
                e = c.append(ctx, f"setup:{ctx}".encode(), key="chaos", metadata={"d": f"setup-{ctx}", "p": "setup"},
                             dedup_id=f"setup-{ctx}", after_lamport=token or None)
                token = e.lamport
                self.history.complete(op, "ok", seq=e.seq, lamport=e.lamport, hash=e.hash.hex(), writer=e.writer)
                if e.writer != writer:
                    raise ChaosError(f"context {ctx} already had writer {e.writer}")
                self.sizes[ctx] = e.seq
        ok, _, _ = self.wait_converged(30.0)
        if not ok:
            raise ChaosError("the mesh did not replicate the new contexts to every node within 30 s "
                             f"(logs in {self.workdir})")

    # -- workload -----------------------------------------------------------------------

    def _client(self, cache: dict[str, Client], node: NodeProc) -> Client:
        c = cache.get(node.name)
        if c is None:
            c = Client(node.address, timeout=OP_TIMEOUT, retries=0, zctx=self.zctx)
            cache[node.name] = c
        return c

    def _guard(self, name: str, body: Callable[[], None]) -> Callable[[], None]:
        def run() -> None:
            try:
                body()
            except Exception:
                self.harness_errors.append(f"{name}: {traceback.format_exc()}")
        return run

    def writer(self, name: str, seed: int) -> None:
        rng = random.Random(seed)
        h = self.history
        clients: dict[str, Client] = {}
        observed = 0
        k = 0
        try:
            while not self.stop_work.is_set():
                if rng.random() < 0.15:  # learn a lamport from elsewhere: the next append carries it
                    node, ctx = rng.choice(self.nodes), rng.choice(self.contexts)
                    op = h.invoke(name, "head", ctx, node.name)
                    try:
                        hd = self._client(clients, node).head(ctx)
                    except LedgerError as exc:
                        h.complete(op, classify(exc), error=error_code(exc), message=exc.message[:200])
                    else:
                        h.complete(op, "ok", size=hd.size, lamport=hd.lamport)
                        observed = max(observed, hd.lamport)
                ctx = rng.choice(self.contexts)
                k += 1
                dedup = f"{name}-{k}"
                payload = f"{name}:{k}:".encode() + b"x" * rng.randrange(0, 200)
                give_up = time.monotonic() + WRITE_GIVE_UP
                attempt = 0
                while True:
                    node = rng.choice(self.nodes)
                    op = h.invoke(name, "append", ctx, node.name, dedup=dedup, attempt=attempt, after_lamport=observed)
                    try:
                        e = self._client(clients, node).append(
                            ctx, payload, key="chaos", metadata={"d": dedup, "p": name}, dedup_id=dedup,
                            after_lamport=observed or None, replicas=self.opts.replicas or None)
                    except LedgerError as exc:
                        h.complete(op, classify(exc), error=error_code(exc), message=exc.message[:200])
                    else:
                        h.complete(op, "ok", seq=e.seq, lamport=e.lamport, hash=e.hash.hex(), writer=e.writer)
                        observed = max(observed, e.lamport)
                        self.sizes[ctx] = max(self.sizes[ctx], e.seq)
                        break
                    attempt += 1
                    if self.stop_work.is_set() or time.monotonic() > give_up:
                        break
                    self.stop_work.wait(min(0.4, 0.05 * 2 ** attempt))
                self.stop_work.wait(rng.uniform(0, 0.01))
        finally:
            for c in clients.values():
                c.close()

    def reader(self, name: str, seed: int) -> None:
        rng = random.Random(seed)
        h = self.history
        clients: dict[str, Client] = {}
        try:
            while not self.stop_work.is_set():
                node, ctx = rng.choice(self.nodes), rng.choice(self.contexts)
                c = self._client(clients, node)
                if rng.random() < 0.3:
                    op = h.invoke(name, "head", ctx, node.name)
                    try:
                        hd = c.head(ctx)
                    except LedgerError as exc:
                        h.complete(op, classify(exc), error=error_code(exc), message=exc.message[:200])
                    else:
                        h.complete(op, "ok", size=hd.size, root=hd.root.hex(), lamport=hd.lamport)
                else:
                    after = rng.randrange(0, self.sizes[ctx] + 1)
                    op = h.invoke(name, "get", ctx, node.name, after=after)
                    try:
                        page = c.get(ctx, after=after, limit=20)
                    except LedgerError as exc:
                        h.complete(op, classify(exc), error=error_code(exc), message=exc.message[:200])
                    else:
                        h.complete(op, "ok", entries=[[e.seq, e.hash.hex()] for e in page.entries])
                self.stop_work.wait(rng.uniform(0, 0.02))
        finally:
            for c in clients.values():
                c.close()

    def watcher(self, ctx: str, node: NodeProc) -> None:
        rec: dict[str, Any] = {"name": f"watch-{ctx}", "context": ctx, "node": node.name, "delivered": [],
                               "errors": [], "outages": 0, "earlier": [], "switches": []}
        self.watches.append(rec)
        delivered: list[list[Any]] = rec["delivered"]
        c = Client(node.address, timeout=OP_TIMEOUT, retries=0, zctx=self.zctx)
        w = None
        try:
            while not self.stop_watch.is_set():
                target = self.watch_targets.get(ctx)
                # (Past the final log's length, it is on a history its node has just replaced,
                # async mode: go on until the watch says so, within the caller's deadline.)
                if target is not None and len(delivered) == target:
                    break
                if w is None:
                    try:
                        w = c.watch(ctx, after=delivered[-1][0] if delivered else 0, pub_address=node.pub)
                    except IntegrityError as exc:
                        if self._switched(rec, exc):
                            delivered = rec["delivered"]
                            continue
                        rec["errors"].append(f"{exc.code}: {exc.message}")
                        break
                    except LedgerError:
                        rec["outages"] += 1
                        self.stop_watch.wait(0.2)
                        continue
                sock = w.socket
                if sock is not None:
                    sock.poll(200, zmq.POLLIN)
                try:
                    got = w.drain()
                except IntegrityError as exc:
                    if self._switched(rec, exc):
                        w.close()
                        w = None
                        delivered = rec["delivered"]
                        continue
                    rec["errors"].append(f"{exc.code}: {exc.message}")
                    break
                except LedgerError:
                    rec["outages"] += 1
                    self.stop_watch.wait(0.1)
                    continue
                delivered.extend([e.seq, e.hash.hex()] for e in got)
        finally:
            if w is not None:
                w.close()
            c.close()

    def _switched(self, rec: dict[str, Any], exc: IntegrityError) -> bool:
        """In async mode, a node that switched to its writer's history after a lost tail: the
        watcher keeps what it saw (checked against the set-aside histories) and starts over."""
        if self.opts.durability != "async" or len(rec["earlier"]) >= 100:
            return False
        rec["earlier"].append(rec["delivered"])
        rec["delivered"] = []
        rec["switches"].append(f"{exc.code}: {exc.message}")
        return True

    # -- the nemesis ---------------------------------------------------------------------

    def _begin(self, f: Fault) -> None:
        if f.kind == "kill":
            self.node(f.nodes[0]).kill()
        elif f.kind == "pause":
            self.node(f.nodes[0]).pause()
        elif f.kind == "partition":
            assert self.netns is not None
            self.netns.cut(i for i, n in enumerate(self.nodes) if n.name in f.nodes)

    def _end(self, f: Fault) -> None:
        if f.kind == "kill":
            self.restart(self.node(f.nodes[0]))
        elif f.kind == "pause":
            self.node(f.nodes[0]).resume()
        elif f.kind == "partition":
            assert self.netns is not None
            self.netns.heal()

    def _watch_for_crashes(self) -> None:
        for n in self.nodes:
            if n.proc is not None and not n.expect_exit and n.proc.poll() is not None:
                rc = n.proc.returncode
                tail = " | ".join(n.log_lines(r"ERROR|Traceback|Error")[-5:])
                self.crashes.append(f"{n.name} exited by itself with code {rc} at t={self.history.now()} "
                                    f"(log {n.log_path}): {tail}")
                self.say(f"node {n.name} CRASHED (exit code {rc}); restarting it")
                n.expect_exit = True
                self.restart(n)

    def nemesis(self) -> None:
        duration = self.opts.duration
        actions = sorted([(f.at, 1, i, "begin") for i, f in enumerate(self.plan.faults)]
                         + [(f.at + f.duration, 0, i, "end") for i, f in enumerate(self.plan.faults)])
        for at, _, i, what in actions:
            f = self.plan.faults[i]
            when = self.phase_start + min(at, duration)
            while not self.abort.is_set() and time.monotonic() < when:
                self._watch_for_crashes()
                time.sleep(min(0.05, max(0.0, when - time.monotonic())))
            if self.abort.is_set():
                return
            if what == "begin":
                rec = {"index": i, "kind": f.kind, "nodes": list(f.nodes), "planned_at": f.at,
                       "began": self.history.now(), "ended": None}
                self.executed.append(rec)
                self._begin(f)
                if self.opts.verbose:
                    self.say(f"t={rec['began']:6.2f} {f.kind} {','.join(f.nodes)} for {f.duration:.2f} s")
            else:
                self._end(f)
                rec = next(r for r in self.executed if r["index"] == i)
                rec["ended"] = self.history.now()
        while not self.abort.is_set() and time.monotonic() < self.phase_start + duration:
            self._watch_for_crashes()
            time.sleep(0.05)
        self._watch_for_crashes()

    # -- convergence and the final state --------------------------------------------------

    def heads(self, clients: dict[str, Client]) -> dict[str, dict[str, Any]]:
        out: dict[str, dict[str, Any]] = {}
        for ctx in self.contexts:
            out[ctx] = {}
            for n in self.nodes:
                try:
                    hd = self._client(clients, n).head(ctx)
                    out[ctx][n.name] = (hd.size, hd.root.hex())
                except LedgerError as exc:
                    out[ctx][n.name] = exc.code
        return out

    def wait_converged(self, bound: float, since: float | None = None) -> tuple[bool, float | None, dict[str, Any]]:
        """Until every node has the same (size, root) for every context, or `bound` seconds
        after `since` (default now); returns whether they did, how long after `since`, the heads."""
        start = time.monotonic() if since is None else since
        clients: dict[str, Client] = {}
        try:
            while True:
                hs = self.heads(clients)
                if all(len(set(v.values())) == 1 and not isinstance(next(iter(v.values())), str)
                       for v in hs.values()):
                    return True, round(time.monotonic() - start, 3), hs
                if time.monotonic() - start > bound or self.abort.is_set():
                    return False, None, hs
                time.sleep(0.1)
        finally:
            for c in clients.values():
                c.close()

    def final_logs(self) -> dict[str, list[Entry]]:
        """Each context's log as its writer holds it, every hash and the root re-checked."""
        logs: dict[str, list[Entry]] = {}
        for ctx, writer in self.plan.context_writers.items():
            node = self.node(writer)
            with Client(node.address, timeout=10.0, retries=3, zctx=self.zctx) as c:
                logs[ctx] = list(c.iter_entries(ctx))
                c.verify_context(ctx)
        return logs

    def forks(self) -> tuple[list[str], dict[str, dict[str, str]]]:
        """Forks that break the mode's promise (any, in sync mode; in async mode all but a writer's
        lost tail, where its own history is served), and every history set aside, per context:
        entry hash (hex) -> dedup id."""
        bad: list[str] = []
        aside: dict[str, dict[str, str]] = defaultdict(dict)
        for n in self.nodes:
            with Client(n.address, timeout=5.0, retries=2, zctx=self.zctx) as c:
                for f in c.status().get("forks", []):
                    lost_tail = f.get("local_writer") == f.get("peer_writer") == f.get("served_writer")
                    if self.opts.durability != "async" or not lost_tail:
                        bad.append(f"{n.name}: {f}")
                    for i in range(1, int(f.get("histories_set_aside", 1)) + 1):
                        try:
                            for e in c.iter_entries(f["context"], fork=f["local_writer"], fork_index=i):
                                aside[f["context"]][e.hash.hex()] = e.metadata.get("d", "")
                        except LedgerError:
                            break  # NOT_FOUND: no (more) history of that writer set aside here
        return bad, dict(aside)

    def close_zmq(self) -> None:
        done = threading.Event()

        def term() -> None:
            self.zctx.term()
            done.set()

        threading.Thread(target=term, daemon=True).start()
        if not done.wait(10):
            self.harness_errors.append("a ZeroMQ socket of the harness was left open")


def run(opts: Options, out: IO[str], err: IO[str]) -> dict[str, Any]:
    """One chaos run; returns the report (`ok` says whether every check held)."""
    plan = make_plan(opts.seed, opts.nodes, opts.duration, opts.partitions, opts.contexts, opts.writers,
                     opts.readers)
    human = err if opts.json else out

    def say(text: str) -> None:
        human.write(f"{PROG}: {text}\n")
        human.flush()

    replay = f"{PROG} --nodes {opts.nodes} --duration {opts.duration:g} --seed {opts.seed}"
    replay += " --partitions" if opts.partitions else ""
    if opts.durability != "sync":
        replay += f" --durability {opts.durability} --flush-ms {opts.flush_ms}"
    defaults = Options()
    for flag in ("contexts", "writers", "readers", "replicas"):
        if getattr(opts, flag) != getattr(defaults, flag):
            replay += f" --{flag} {getattr(opts, flag)}"
    say(f"seed {opts.seed} (replay: {replay})")
    if opts.workdir:
        workdir = Path(opts.workdir)
        workdir.mkdir(parents=True, exist_ok=True)
    else:
        workdir = Path(tempfile.mkdtemp(prefix="ledger-chaos-"))
    say(f"work folder {workdir} (node logs n1.log ..., history.jsonl, report.json)")
    say(f"{len(plan.faults)} faults planned over {opts.duration:g} s: " + ", ".join(
        f"{v} {k}" for k, v in sorted(Counter(f.kind for f in plan.faults).items())))
    r = Run(opts, plan, workdir, say)
    report: dict[str, Any] = {"seed": opts.seed, "nodes": opts.nodes, "duration": opts.duration,
                              "partitions": opts.partitions, "workdir": str(workdir)}
    try:
        r.start_cluster()
        r.create_contexts()
        r.history.t0 = r.phase_start = time.monotonic()
        for ctx, name in plan.watcher_nodes.items():
            body = functools.partial(r.watcher, ctx, r.node(name))
            r.threads.append(threading.Thread(target=r._guard(f"watcher {ctx}", body), name=f"watch-{ctx}",
                                              daemon=True))
        for w, s in plan.worker_seeds.items():
            body = functools.partial(r.writer if w.startswith("w") else r.reader, w, s)
            r.threads.append(threading.Thread(target=r._guard(w, body), name=w, daemon=True))
        nemesis = r.nemesis_thread = threading.Thread(target=r._guard("nemesis", r.nemesis), name="nemesis",
                                                      daemon=True)
        for t in r.threads:
            t.start()
        nemesis.start()
        say(f"workload: {opts.writers} writers, {opts.readers} readers, {len(plan.watcher_nodes)} watchers over "
            f"{len(r.contexts)} contexts; faults for {opts.duration:g} s")
        r.stop_work.wait(opts.duration)
        r.stop_work.set()
        nemesis.join()  # it has ended every fault by now: restarted, SIGCONTed, rules flushed
        # Heal whatever is left (a node that crashed and would not restart), then
        # measure convergence from here.
        for n in r.nodes:
            if not n.running():
                r.restart(n)
            elif n.paused:
                n.resume()
        if r.netns is not None:
            r.netns.heal()
        healed = time.monotonic()
        r.heal_s = r.history.now()
        for t in r.threads:
            if t.name.startswith(("w", "r")) and not t.name.startswith("watch-"):
                t.join()
        say(f"healed at t={r.heal_s:.1f} s; waiting up to {opts.converge_timeout:g} s for convergence")
        converged, conv_s, heads = r.wait_converged(opts.converge_timeout, since=healed)
        logs = r.final_logs()
        r.watch_targets.update({ctx: len(log) for ctx, log in logs.items()})
        deadline = time.monotonic() + 20.0
        for t in r.threads:
            if t.name.startswith("watch-"):
                t.join(max(0.1, deadline - time.monotonic()))
        r.stop_watch.set()
        for t in r.threads:
            t.join(5.0)
        forks, aside = r.forks()
        kills = [(e["nodes"][0], e["began"]) for e in r.executed if e["kind"] == "kill"]
        result = check_history(r.history.ops, logs, r.watches, durability=opts.durability,
                               flush_s=opts.flush_ms / 1000.0, kills=kills, writers=plan.context_writers,
                               aside=aside)
        problems: list[str] = list(result.pop("problems"))
        if not converged:
            problems.append(f"not converged {opts.converge_timeout:g} s after healing: {json.dumps(heads)}")
        problems += [f"fork: {f}" for f in forks]
        problems += [f"crash: {c}" for c in r.crashes]
        problems += [f"harness: {e}" for e in r.harness_errors]
        for n in r.nodes:
            problems += [f"{n.name} log: {line}" for line in n.log_lines(r"Traceback|CRITICAL")[:5]]
        counts = Counter(e["kind"] for e in r.executed)
        report.update({
            "faults": {k: counts.get(k, 0) for k in KINDS},
            "acked": result["acked"],
            "durability": opts.durability,
            "lost_acked": result["lost_acked"],
            "lost_in_crash": result["lost_in_crash"],
            "lost_in_crash_set_aside": result["lost_in_crash_set_aside"],
            "set_aside_entries": sum(len(v) for v in aside.values()),
            "served_then_lost": result["served_then_lost"],
            "watch_restarts": sum(len(w["switches"]) for w in r.watches),
            "duplicates": result["duplicates"],
            "order_violations": result["order_violations"],
            "causality_violations": result["causality_violations"],
            "read_violations": result["read_violations"],
            "watch_violations": result["watch_violations"],
            "phantom_writes": result["phantom_writes"],
            "unexpected_errors": result["unexpected_errors"],
            "writes_failed": result["writes_failed"],
            "writes_unknown": result["writes_unknown"],
            "append_attempts": result["attempts"],
            "reads": result["reads"],
            "watchers": len(r.watches),
            "watched_entries": sum(len(w["delivered"]) for w in r.watches),
            "entries": {ctx: len(log) for ctx, log in logs.items()},
            "crashes": len(r.crashes),
            "forks": len(forks),
            "converged": converged,
            "convergence_s": conv_s,
            "heal_at_s": r.heal_s,
            "schedule": [f.to_json() for f in plan.faults],
            "executed": r.executed,
        })
        report["problems"] = problems[:MAX_PROBLEMS]
        report["ok"] = not problems
        return report
    finally:
        r.abort.set()
        r.stop_work.set()
        r.stop_watch.set()
        if r.nemesis_thread is not None:
            r.nemesis_thread.join(START_TIMEOUT + 5)  # it may be starting a node: let it finish or give up
        for t in r.threads:
            t.join(5.0)
        r.close_zmq()
        errors = r.shutdown()
        if errors:
            say("cleanup: " + "; ".join(errors))
        with open(workdir / "history.jsonl", "w") as f:
            for op in r.history.ops:
                f.write(json.dumps(op, separators=(",", ":")) + "\n")
        if "ok" in report:
            (workdir / "report.json").write_text(json.dumps(report, indent=1) + "\n")
            if report["ok"] and not opts.keep_data:
                for n in r.nodes:
                    shutil.rmtree(n.data, ignore_errors=True)
            if opts.plot:
                plot(report, r.history.ops, opts.plot)


# -- output ----------------------------------------------------------------------------------


def summary_lines(rep: Mapping[str, Any]) -> list[str]:
    f = rep["faults"]
    conv = (f"yes, {rep['convergence_s']:.2f} s after healing" if rep["converged"] else "NO")
    lines = [
        f"faults: {f['kill']} kill, {f['pause']} pause, {f['partition']} partition",
        f"writes: {rep['acked']} acknowledged, {rep['writes_failed']} failed, {rep['writes_unknown']} unknown "
        f"({rep['append_attempts']} attempts); {rep['reads']} reads; {rep['watchers']} watchers saw "
        f"{rep['watched_entries']} entries",
        f"durability {rep['durability']}: acknowledged appends lost with a writer's unflushed tail "
        f"{rep['lost_in_crash']} (allowed in async mode; {rep['lost_in_crash_set_aside']} of them kept aside "
        f"by a replica), entries set aside {rep['set_aside_entries']}, reads of a lost tail no node holds any more "
        f"{rep['served_then_lost']}, watcher restarts {rep['watch_restarts']}",
        f"checks: lost acknowledged {rep['lost_acked']}, duplicates {rep['duplicates']}, order "
        f"{rep['order_violations']}, causality {rep['causality_violations']}, reads {rep['read_violations']}, "
        f"watchers {rep['watch_violations']}, phantom {rep['phantom_writes']}, crashes {rep['crashes']}, "
        f"forks {rep['forks']}",
        f"converged: {conv}",
    ]
    lines += [f"problem: {p}" for p in rep["problems"]]
    lines.append(f"PASS (seed {rep['seed']})" if rep["ok"] else f"FAIL (seed {rep['seed']}; logs and history in {rep['workdir']})")
    return lines


def plot(rep: Mapping[str, Any], ops: Sequence[Mapping[str, Any]], path: str) -> None:
    """Acknowledged, failed and unknown appends per half second, with the faults as bands."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    end = max([rep["heal_at_s"] or rep["duration"], *(op.get("complete") or 0 for op in ops)])
    nbins = int(end / 0.5) + 1
    series = {k: [0] * nbins for k in ("ok", "fail", "unknown")}
    for op in ops:
        if op.get("f") == "append" and op.get("complete") is not None and op["complete"] >= 0:
            series[op["type"]][int(op["complete"] / 0.5)] += 1
    fig, ax = plt.subplots(figsize=(12, 4.5))
    xs = [i * 0.5 for i in range(nbins)]
    for k, color in (("ok", "tab:green"), ("fail", "tab:orange"), ("unknown", "tab:red")):
        ax.plot(xs, series[k], label=f"append {k}", color=color, drawstyle="steps-post")
    colors = {"kill": "tab:red", "pause": "tab:blue", "partition": "tab:purple"}
    top = max(max(s) for s in series.values()) or 1
    names = node_names(rep["nodes"])
    for e in rep["executed"]:
        end_t = e["ended"] if e["ended"] is not None else rep["heal_at_s"]
        row = names.index(e["nodes"][0]) if e["kind"] != "partition" else len(names)
        y0 = top * (1.05 + 0.08 * row)
        ax.plot([e["began"], end_t], [y0, y0], color=colors[e["kind"]], linewidth=5, solid_capstyle="butt")
    for k, c in colors.items():
        ax.plot([], [], color=c, linewidth=5, label=k)
    if rep["heal_at_s"] is not None:
        ax.axvline(rep["heal_at_s"], color="black", linestyle="--", linewidth=1, label="healed")
    ax.set_xlabel("seconds into the fault phase")
    ax.set_ylabel("appends per 0.5 s (fault rows above: " + ", ".join(names) + ", partitions)")
    ax.set_title(f"ledger-chaos seed {rep['seed']}: {rep['acked']} acknowledged, {rep['lost_acked']} lost, "
                 + (f"converged in {rep['convergence_s']:.2f} s" if rep["converged"] else "NOT converged"))
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -- command line ----------------------------------------------------------------------------


def _positive(kind: type) -> Callable[[str], Any]:
    def conv(text: str) -> Any:
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if not v > 0:
            raise argparse.ArgumentTypeError(f"must be positive, got {text!r}")
        return v
    return conv


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Start a mesh of ledger-node processes, drive a workload, inject faults (kill -9 and restart, "
        "SIGSTOP/SIGCONT, optionally network partitions), heal, and check the history: no acknowledged write "
        "lost, no duplicate, order and causality kept, watchers complete, every node converged. Exit 0 only "
        "when every check holds. The same --seed replays the same fault schedule.",
    )
    p.add_argument("--nodes", type=_positive(int), default=3, help="ledger-node processes (default 3)")
    p.add_argument("--duration", type=_positive(float), default=20.0,
                   help="seconds of workload and faults, before healing (default 20)")
    p.add_argument("--seed", type=int, default=None, help="seed of every random choice (default: a random one, "
                   "printed)")
    p.add_argument("--partitions", action="store_true",
                   help="also partition the network (each node in a network namespace; needs root, ip, iptables)")
    p.add_argument("--json", action="store_true", help="print the report as one JSON object (progress on stderr)")
    p.add_argument("--plot", metavar="FILE.png", help="draw appends over time and the faults (needs matplotlib)")
    p.add_argument("--contexts", type=_positive(int), default=4, help="contexts written (default 4)")
    p.add_argument("--writers", type=_positive(int), default=3, help="appending clients (default 3)")
    p.add_argument("--readers", type=int, default=2, help="reading clients (default 2)")
    p.add_argument("--replicas", type=int, default=0,
                   help="appends ask for replicas=N (default 0: sync durability alone makes an ack durable)")
    p.add_argument("--durability", choices=("sync", "async"), default="sync",
                   help="the nodes' durability (default sync; async is ledger-node's default: an acknowledged "
                   "append may be lost with its writer's unflushed tail, which the checker then allows)")
    p.add_argument("--flush-ms", type=_positive(int), default=500,
                   help="with --durability async: the nodes' flush interval (default 500)")
    p.add_argument("--converge-timeout", type=_positive(float), default=60.0,
                   help="seconds after healing within which every node must hold the same logs (default 60)")
    p.add_argument("--workdir", help="folder for node data, logs, history and report (default: a new temp folder)")
    p.add_argument("--keep-data", action="store_true", help="keep the nodes' data folders after a passing run")
    p.add_argument("-v", "--verbose", action="store_true", help="print each fault as it is injected")
    return p


def parse_args(argv: Sequence[str] | None = None) -> Options:
    a = build_parser().parse_args(argv)
    if a.readers < 0 or a.replicas < 0:
        build_parser().error("--readers and --replicas must be 0 or more")
    if a.partitions and a.nodes < 2:
        build_parser().error("--partitions needs at least 2 nodes")
    if a.nodes > 32:
        build_parser().error("--nodes must be at most 32")
    seed = a.seed if a.seed is not None else random.SystemRandom().randrange(1 << 32)
    return Options(nodes=a.nodes, duration=a.duration, seed=seed, partitions=a.partitions, json=a.json,
                   plot=a.plot, contexts=a.contexts, writers=a.writers, readers=a.readers, replicas=a.replicas,
                   durability=a.durability, flush_ms=a.flush_ms, converge_timeout=a.converge_timeout, workdir=a.workdir, keep_data=a.keep_data, verbose=a.verbose)


def execute(opts: Options, out: IO[str] | None = None, err: IO[str] | None = None) -> int:
    """Run with parsed options; returns the exit code."""
    out = out or sys.stdout
    err = err or sys.stderr
    if opts.partitions:
        why = partition_support()
        if why is not None:
            err.write(f"{PROG}: error: --partitions is not possible here: {why}. Run as root on Linux with "
                      "iproute2 and iptables installed, or leave out --partitions.\n")
            return EXIT_USAGE
    if opts.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            err.write(f"{PROG}: error: --plot needs matplotlib (pip install 'converge-ledger[plot]')\n")
            return EXIT_USAGE
    old: dict[int, Any] = {}

    def on_term(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    if threading.current_thread() is threading.main_thread():
        old[signal.SIGTERM] = signal.signal(signal.SIGTERM, on_term)
    try:
        report = run(opts, out, err)
    except KeyboardInterrupt:
        err.write(f"{PROG}: interrupted; every node was stopped (seed {opts.seed}; logs in the work folder above)\n")
        return EXIT_INTERRUPTED
    except ChaosError as exc:
        err.write(f"{PROG}: error: {exc}\n")
        return EXIT_USAGE
    finally:
        for sig, h in old.items():
            signal.signal(sig, h)
    if opts.json:
        out.write(json.dumps(report, separators=(",", ":")) + "\n")
    else:
        for line in summary_lines(report):
            out.write(line + "\n")
    out.flush()
    return EXIT_OK if report["ok"] else EXIT_FAILED


def main(argv: Sequence[str] | None = None) -> int:
    return execute(parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
