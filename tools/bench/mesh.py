"""`BenchMesh`: ledger-node processes forming a mesh on loopback, for the mesh scenarios."""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import zmq

from protocol.client import Client
from protocol.errors import NotFound

from .procs import Proc, start_node

MESH_HEARTBEAT_MS = 500  # the node's default, passed explicitly so that the report can say so
LAG_CONTEXT = "replication-lag"
REPLICATED_CONTEXT = "bench"  # append_pipelined_replicated's context, as append_pipelined's
CATCHUP_CONTEXT = "catch-up"
POLL_S = 0.005  # how often a catch-up is checked (a `head` request to the follower)


def hostport(address: str) -> str:
    return address.split("://", 1)[1]


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
