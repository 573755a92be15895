"""The mesh under test: its nodes' processes (and namespaces), and what the harness reads from them.

Nodes run with `--durability sync` (acknowledged means fsynced, so it survives
kill -9) or `--durability async` (the default of ledger-node: acknowledged means
in RAM, on disk within `--flush-ms`), and fast heartbeats: on loopback on free
ports, or, with `--partitions`, each in its own network namespace joined by a
bridge (`tools.chaos.netns`). After the faults the cluster is asked until every
node has the same (size, root) for every context, then for the final logs (from
each context's writer, every hash and root re-checked) and for every fork the
nodes report, with the histories they set aside.
"""

from __future__ import annotations

import threading
import time
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import zmq

from node.identity import KEY_FILE, write_key_file
from protocol.client import Client
from protocol.entry import Entry
from protocol.errors import LedgerError
from protocol.keys import Identity

from .common import ChaosError, Options
from .netns import NS_PORT, Netns
from .node import NODE_FLAGS, NodeProc, free_port_block
from .plan import node_names

OP_TIMEOUT = 1.0          # a client's wait for one answer; past it the operation is unknown


def client_for(cache: dict[str, Client], node: NodeProc, zctx: zmq.Context[Any]) -> Client:
    """One short-timeout, no-retry client per node, kept in `cache` (a thread's own)."""
    c = cache.get(node.name)
    if c is None:
        c = node.client(zctx, timeout=OP_TIMEOUT, retries=0)
        cache[node.name] = c
    return c


@dataclass(eq=False)
class Cluster:
    """The node processes of one run. A failed restart is recorded in `harness_errors`, not raised:
    the run goes on and reports it."""

    opts: Options
    workdir: Path
    say: Callable[[str], None]
    zctx: zmq.Context[Any]
    abort: threading.Event
    harness_errors: list[str]
    netns: Netns | None = None
    nodes: list[NodeProc] = field(default_factory=list)
    intruder_key: Identity | None = None

    def node(self, name: str) -> NodeProc:
        return next(n for n in self.nodes if n.name == name)

    def peers_of(self, node: NodeProc) -> list[str]:
        return [m.seed_address for m in self.nodes if m is not node]

    def start(self) -> None:
        flags = [*NODE_FLAGS, "--durability", self.opts.durability]
        if self.opts.durability == "async":
            flags += ["--flush-ms", str(self.opts.flush_ms)]
        names = node_names(self.opts.nodes)
        if self.opts.partitions:
            self.netns = Netns(self.opts.nodes)
            self.netns.setup()
            # each node on its own namespace's address, not loopback: until the mesh has keys, that
            # takes --insecure (a private bridge no one else reaches)
            for name, ns, ip in zip(names, self.netns.names, self.netns.ips, strict=True):
                self.nodes.append(NodeProc(name, self.workdir, ip, NS_PORT, NS_PORT + 1,
                                           flags if self.opts.secure else [*flags, "--insecure"], ns))
        else:
            base = free_port_block(2 * self.opts.nodes)
            for i, name in enumerate(names):
                self.nodes.append(NodeProc(name, self.workdir, "127.0.0.1", base + 2 * i, base + 2 * i + 1, flags))
        for n in self.nodes:
            n.data.mkdir(parents=True, exist_ok=True)
        if self.opts.secure:
            self._keys()
        for i, n in enumerate(self.nodes):
            n.start([self.nodes[0].seed_address] if i else [], self.abort)
            self.say(f"node {n.name}: requests {n.address}  watch {n.pub}  log {n.log_path}")

    def _keys(self) -> None:
        """--secure: a key per node (in its data folder), the peer allowlist, and one admin key
        for every client of the harness."""
        client = Identity.generate()
        self.intruder_key = Identity.generate()  # allowlisted to write: a client turned hostile (--intruder)
        peers, clients = self.workdir / "peers.txt", self.workdir / "clients.txt"
        for n in self.nodes:
            n.key, n.client_key = Identity.generate(), client
            write_key_file(str(n.data / KEY_FILE), n.key)
        peers.write_text("".join(f"{n.name} {n.key.public_hex}\n" for n in self.nodes if n.key))
        clients.write_text(f"{client.public_hex} admin\n{self.intruder_key.public_hex} write\n")
        for n in self.nodes:
            n.flags += ["--peer-keys", str(peers), "--client-keys", str(clients)]

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

    def heal(self) -> None:
        """End whatever fault is left (a node that crashed and would not restart, a pause, a cut)."""
        for n in self.nodes:
            if not n.running():
                self.restart(n)
            elif n.paused:
                n.resume()
        if self.netns is not None:
            self.netns.heal()

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

    # -- convergence and the final state --------------------------------------------------

    def heads(self, contexts: list[str], clients: dict[str, Client]) -> dict[str, dict[str, Any]]:
        out: dict[str, dict[str, Any]] = {}
        for ctx in contexts:
            out[ctx] = {}
            for n in self.nodes:
                try:
                    hd = client_for(clients, n, self.zctx).head(ctx)
                    out[ctx][n.name] = (hd.size, hd.root.hex())
                except LedgerError as exc:
                    out[ctx][n.name] = exc.code
        return out

    def wait_converged(self, contexts: list[str], bound: float, since: float | None = None,
                       on_wait: Callable[[int, float], None] | None = None,
                       ) -> tuple[bool, float | None, dict[str, Any]]:
        """Until every node has the same (size, root) for every context, or `bound` seconds
        after `since` (default now); returns whether they did, how long after `since`, the heads.
        `on_wait(contexts that agree, seconds since `since`)` after each look that found some
        not agreeing yet."""
        start = time.monotonic() if since is None else since
        clients: dict[str, Client] = {}
        try:
            while True:
                hs = self.heads(contexts, clients)
                agreed = sum(len(set(v.values())) == 1 and not isinstance(next(iter(v.values())), str)
                             for v in hs.values())
                if agreed == len(hs):
                    return True, round(time.monotonic() - start, 3), hs
                if on_wait is not None:
                    on_wait(agreed, time.monotonic() - start)
                if time.monotonic() - start > bound or self.abort.is_set():
                    return False, None, hs
                time.sleep(0.1)
        finally:
            for c in clients.values():
                c.close()

    def final_logs(self, context_writers: dict[str, str]) -> dict[str, list[Entry]]:
        """Each context's log as its writer holds it, every hash and the root re-checked."""
        logs: dict[str, list[Entry]] = {}
        for ctx, writer in context_writers.items():
            node = self.node(writer)
            with node.client(self.zctx, timeout=10.0, retries=3) as c:
                logs[ctx] = list(c.iter_entries(ctx))
                c.verify_context(ctx)
        return logs

    def context_names(self) -> dict[str, list[str]]:
        """Every context each node serves (for the intruder check)."""
        out: dict[str, list[str]] = {}
        for n in self.nodes:
            with n.client(self.zctx, timeout=5.0, retries=2) as c:
                out[n.name] = [str(x["name"]) for x in c.contexts()]
        return out

    def forks(self) -> tuple[list[tuple[str, dict[str, Any]]], dict[str, dict[str, str]]]:
        """Every fork the nodes report, as (node, its status record), and every history set aside,
        per context: entry hash (hex) -> dedup id. `checks.check_forks` judges the forks."""
        reported: list[tuple[str, dict[str, Any]]] = []
        aside: dict[str, dict[str, str]] = defaultdict(dict)
        for n in self.nodes:
            with n.client(self.zctx, timeout=5.0, retries=2) as c:
                for f in c.status().get("forks", []):
                    reported.append((n.name, f))
                    for i in range(1, int(f.get("histories_set_aside", 1)) + 1):
                        try:
                            for e in c.iter_entries(f["context"], fork=f["local_writer"], fork_index=i):
                                aside[f["context"]][e.hash.hex()] = e.metadata.get("d", "")
                        except LedgerError:
                            break  # NOT_FOUND: no (more) history of that writer set aside here
        return reported, dict(aside)
