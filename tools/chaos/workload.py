"""The workload: the clients that append, read and watch while the faults run, recording every operation.

Every context is created first, at a chosen writer (spread over the nodes), and
the run waits until every node holds all of them: the workload never creates a
context, so a fork can only come from a bug, never from two nodes creating one
name. Then writers append with a dedup_id, retries and a causal token
(`after_lamport` = the largest lamport they observed), readers read, and one
watcher per context follows it from seq 0. In async mode a watcher whose node
switches to the writer's history (IntegrityError) starts again from seq 0, as an
application would, and keeps what it saw for the checks.
"""

from __future__ import annotations

import random
import threading
import time
from pathlib import Path
from typing import Any

import zmq

from protocol.client import Client
from protocol.errors import IntegrityError, LedgerError

from .cluster import OP_TIMEOUT, Cluster, client_for
from .common import ChaosError, Options
from .history import History, classify, error_code
from .node import NodeProc
from .plan import Plan

WRITE_GIVE_UP = 4.0       # a writer retries one dedup_id this long, then moves on


class Workload:
    """The clients' threads' bodies, and what they share: the history, the contexts' known sizes
    (readers read below them), the watchers' records and, once the final logs are read, how many
    entries each watcher waits for."""

    def __init__(self, opts: Options, plan: Plan, cluster: Cluster, history: History, zctx: zmq.Context[Any],
                 workdir: Path) -> None:
        self.opts = opts
        self.plan = plan
        self.cluster = cluster
        self.history = history
        self.zctx = zctx
        self.workdir = workdir
        self.stop_work = threading.Event()      # writers and readers
        self.stop_watch = threading.Event()     # watchers
        self.contexts = list(plan.context_writers)
        self.sizes: dict[str, int] = dict.fromkeys(self.contexts, 0)
        self.watch_targets: dict[str, int] = {}
        self.watches: list[dict[str, Any]] = []

    def create_contexts(self) -> None:
        """Each context's first entry at its chosen writer, then wait until all nodes hold all."""
        token = 0
        for ctx, writer in self.plan.context_writers.items():
            node = self.cluster.node(writer)
            with node.client(self.zctx, timeout=5.0, retries=3) as c:
                op = self.history.invoke("setup", "append", ctx, writer, dedup=f"setup-{ctx}", after_lamport=token)
                e = c.append(ctx, f"setup:{ctx}".encode(), key="chaos", metadata={"d": f"setup-{ctx}", "p": "setup"},
                             dedup_id=f"setup-{ctx}", after_lamport=token or None)
                token = e.lamport
                self.history.complete(op, "ok", seq=e.seq, lamport=e.lamport, hash=e.hash.hex(), writer=e.writer)
                if e.writer != writer:
                    raise ChaosError(f"context {ctx} already had writer {e.writer}")
                self.sizes[ctx] = e.seq
        ok, _, _ = self.cluster.wait_converged(self.contexts, 30.0)
        if not ok:
            raise ChaosError("the mesh did not replicate the new contexts to every node within 30 s "
                             f"(logs in {self.workdir})")

    def writer(self, name: str, seed: int) -> None:
        rng = random.Random(seed)
        h = self.history
        clients: dict[str, Client] = {}
        observed = 0
        k = 0
        try:
            while not self.stop_work.is_set():
                if rng.random() < 0.15:  # learn a lamport from elsewhere: the next append carries it
                    node, ctx = rng.choice(self.cluster.nodes), rng.choice(self.contexts)
                    op = h.invoke(name, "head", ctx, node.name)
                    try:
                        hd = client_for(clients, node, self.zctx).head(ctx)
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
                    node = rng.choice(self.cluster.nodes)
                    op = h.invoke(name, "append", ctx, node.name, dedup=dedup, attempt=attempt, after_lamport=observed)
                    try:
                        e = client_for(clients, node, self.zctx).append(
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
                node, ctx = rng.choice(self.cluster.nodes), rng.choice(self.contexts)
                c = client_for(clients, node, self.zctx)
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
        c = node.client(self.zctx, timeout=OP_TIMEOUT, retries=0)
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
