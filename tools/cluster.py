"""`ledger cluster`: a mesh of `ledger-node` processes on this machine, in one command.

With `--keys` (and always when `--host` is not loopback) it sets up keys by itself: a key per
node, the peer allowlist binding n1..nN to them, and one admin client key it prints the path of.

Node 1 starts first; every other node is seeded with node 1's address and
learns the rest by gossip. Each node's addresses are printed, then one line
`ready nodes=ADDR,ADDR,...`. Ctrl-C (or SIGTERM) stops every node it started,
each with SIGTERM (they flush and exit), then SIGKILL for any that hang.
"""

from __future__ import annotations

import os
import signal
import subprocess
import tempfile
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import IO

from node.config import is_loopback
from node.identity import KEY_FILE, IdentityError, read_key_file, write_key_file
from protocol.keys import Identity
from tools import launch

START_TIMEOUT = 30.0


class ClusterError(Exception):
    pass


@dataclass
class Member:
    name: str
    proc: subprocess.Popen[str]
    out: launch.Output
    router: str = ""
    pub: str = ""
    node_id: str = ""

    @property
    def lines(self) -> list[str]:
        return self.out.lines


def _hostport(address: str) -> str:
    return address.split("://", 1)[1]


def start_member(name: str, data: str, listen: str, peers: list[str], extra: Sequence[str],
                 echo: IO[str] | None) -> Member:
    args = ["--id", name, "--data", data, "--listen", listen, *extra]
    if peers:
        args += ["--peers", ",".join(peers)]
    ready = threading.Event()

    def on_line(line: str) -> None:
        # once it serves, its warnings and errors are shown on the console
        if echo is not None and ready.is_set() and (" WARNING " in line or " ERROR " in line):
            echo.write(f"[{name}] {line}\n")
            echo.flush()

    try:
        proc, out, info = launch.start(args, timeout=START_TIMEOUT, on_line=on_line)
    except launch.NodeDidNotStart as exc:
        tail = "\n".join(exc.lines[-40:])  # a usage error is ~30 lines: show it whole
        raise ClusterError(f"node {name} did not start:\n{tail}") from None
    ready.set()
    return Member(name, proc, out, info.router, info.pub, info.node_id)


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


def setup_keys(data: str, nodes: int) -> tuple[list[str], Identity, list[Identity]]:
    """Keys for a cluster in `data` (kept when they exist: a restart with the same --data is the
    same mesh): each node's DATA/nI/node.key, `peers.txt` binding n1..nN to them, and one admin
    client key `client.key` listed in `clients.txt`. Returns the node flags, the client's key and
    the nodes' keys."""
    idents = []
    for i in range(1, nodes + 1):
        folder = os.path.join(data, f"n{i}")
        os.makedirs(folder, exist_ok=True)
        idents.append(_key(os.path.join(folder, KEY_FILE)))
    client = _key(os.path.join(data, "client.key"))
    peers, clients = os.path.join(data, "peers.txt"), os.path.join(data, "clients.txt")
    with open(peers, "w") as f:
        f.write("# written by `ledger cluster`: NODE_ID PUBLIC_KEY\n")
        f.writelines(f"n{i} {k.public_hex}\n" for i, k in enumerate(idents, 1))
    with open(clients, "w") as f:
        f.write(f"# written by `ledger cluster`: PUBLIC_KEY ROLE\n{client.public_hex} admin\n")
    return ["--peer-keys", peers, "--client-keys", clients], client, idents


def _key(path: str) -> Identity:
    try:
        if os.path.exists(path):
            return read_key_file(path)
        ident = Identity.generate()
        write_key_file(path, ident)
        return ident
    except IdentityError as exc:
        raise ClusterError(str(exc)) from None


def run_cluster(nodes: int, data: str | None, host: str, base_port: int, extra: Sequence[str],
                out: IO[str], stop: threading.Event | None = None, keys: bool = False) -> int:
    """Start the mesh, print its addresses, wait for `stop` (or a signal), stop it. Returns 0.
    With `keys` (or a `host` that is not loopback), every node and one admin client get keys."""
    if not 1 <= nodes <= 64:
        raise ClusterError(f"--nodes must be from 1 to 64, got {nodes}")
    tmp = None
    if data is None:
        tmp = tempfile.TemporaryDirectory(prefix="ledger-cluster-")
        data = tmp.name
    os.makedirs(data, exist_ok=True)
    keys = keys or not is_loopback(host)
    client: Identity | None = None
    idents: list[Identity] = []
    if keys:
        key_flags, client, idents = setup_keys(data, nodes)
        extra = [*key_flags, *extra]
        if host in ("0.0.0.0", "::"):
            raise ClusterError(f"--host {host}: give the address the nodes are reached at (they advertise it)")
    stop = stop or threading.Event()
    members: list[Member] = []
    old_handlers = {}
    if threading.current_thread() is threading.main_thread():
        for sig in (signal.SIGINT, signal.SIGTERM):
            old_handlers[sig] = signal.signal(sig, lambda *_: stop.set())
    try:
        for i in range(1, nodes + 1):
            port = 0 if base_port == 0 else base_port + 10 * (i - 1)
            seeds = [("n1@" if keys else "") + _hostport(members[0].router)] if members else []
            m = start_member(f"n{i}", os.path.join(data, f"n{i}"), f"{host}:{port}", seeds, extra, out)
            members.append(m)
            key = f"  key {idents[i - 1].public_hex}" if keys else ""
            out.write(f"node {m.node_id}: requests {m.router}  watch {m.pub}  data {os.path.join(data, m.name)}{key}\n")
            out.flush()
        if client is not None:
            out.write(f"keys: CURVE on every socket; admin client key {os.path.join(data, 'client.key')}, e.g.\n"
                      f"  ledger --node {_hostport(members[0].router)} --key-file {os.path.join(data, 'client.key')}"
                      f" --server-key {idents[0].public_hex} status\n")
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
