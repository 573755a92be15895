"""`ledger cluster`: a mesh of `ledger-node` processes on loopback, in one command.

Node 1 starts first; every other node is seeded with node 1's address and
learns the rest by gossip. Each node's addresses are printed, then one line
`ready nodes=ADDR,ADDR,...`. Ctrl-C (or SIGTERM) stops every node it started,
each with SIGTERM (they flush and exit), then SIGKILL for any that hang.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import IO

READY = re.compile(r"^ready router=(\S+) pub=(\S+) id=(\S+)$")
START_TIMEOUT = 30.0


class ClusterError(Exception):
    pass


@dataclass
class Member:
    name: str
    proc: subprocess.Popen[str]
    lines: list[str] = field(default_factory=list)
    router: str = ""
    pub: str = ""
    node_id: str = ""
    ready: threading.Event = field(default_factory=threading.Event)

    def read(self, echo: IO[str] | None) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            line = line.rstrip("\n")
            self.lines.append(line)
            m = READY.match(line)
            if m:
                self.router, self.pub, self.node_id = m.groups()
                self.ready.set()
            elif echo is not None and self.ready.is_set() and (" WARNING " in line or " ERROR " in line):
                echo.write(f"[{self.name}] {line}\n")
                echo.flush()


def _hostport(address: str) -> str:
    return address.split("://", 1)[1]


def start_member(name: str, data: str, listen: str, peers: list[str], extra: Sequence[str],
                 echo: IO[str] | None) -> Member:
    cmd = [sys.executable, "-m", "node.main", "--id", name, "--data", data, "--listen", listen, *extra]
    if peers:
        cmd += ["--peers", ",".join(peers)]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
    m = Member(name, proc)
    threading.Thread(target=m.read, args=(echo,), daemon=True).start()
    deadline = time.monotonic() + START_TIMEOUT
    while not m.ready.wait(0.05):
        if proc.poll() is not None or time.monotonic() > deadline:
            stop_members([m])
            tail = "\n".join(m.lines[-40:])  # a usage error is ~30 lines: show it whole
            raise ClusterError(f"node {name} did not start:\n{tail}")
    return m


def stop_members(members: list[Member], timeout: float = 20.0) -> None:
    for m in members:
        if m.proc.poll() is None:
            m.proc.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for m in members:
        try:
            m.proc.wait(max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            m.proc.kill()
            m.proc.wait(5)


def run_cluster(nodes: int, data: str | None, host: str, base_port: int, extra: Sequence[str],
                out: IO[str], stop: threading.Event | None = None) -> int:
    """Start the mesh, print its addresses, wait for `stop` (or a signal), stop it. Returns 0."""
    if not 1 <= nodes <= 64:
        raise ClusterError(f"--nodes must be from 1 to 64, got {nodes}")
    tmp = None
    if data is None:
        tmp = tempfile.TemporaryDirectory(prefix="ledger-cluster-")
        data = tmp.name
    os.makedirs(data, exist_ok=True)
    stop = stop or threading.Event()
    members: list[Member] = []
    old_handlers = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            old_handlers[sig] = signal.signal(sig, lambda *_: stop.set())
    try:
        for i in range(1, nodes + 1):
            port = 0 if base_port == 0 else base_port + 10 * (i - 1)
            seeds = [_hostport(members[0].router)] if members else []
            m = start_member(f"n{i}", os.path.join(data, f"n{i}"), f"{host}:{port}", seeds, extra, out)
            members.append(m)
            out.write(f"node {m.node_id}: requests {m.router}  watch {m.pub}  data {os.path.join(data, m.name)}\n")
            out.flush()
        out.write(f"ready nodes={','.join(_hostport(m.router) for m in members)}\n")
        out.write("(Ctrl-C stops every node)\n" if tmp is None else
                  "(throw-away data; Ctrl-C stops every node and deletes it)\n")
        out.flush()
        reported: set[str] = set()
        while not stop.wait(0.2):
            for m in members:
                rc = m.proc.poll()
                if rc is not None and m.name not in reported:
                    reported.add(m.name)
                    out.write(f"node {m.name} exited with code {rc}; the others keep running\n")
                    out.flush()
        return 0
    finally:
        stop_members(members)
        for sig, h in old_handlers.items():
            signal.signal(sig, h)
        if members:
            out.write(f"stopped {len(members)} node(s)\n")
            out.flush()
        if tmp is not None:
            tmp.cleanup()
