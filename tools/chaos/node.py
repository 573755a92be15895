"""One `ledger-node` child process: started on fixed ports, killed, paused and restarted in place.

A node restarts on the same ports and data folder, so a kill -9 and restart is
what a crash and a supervisor's restart would be. Ports come from a block below
the ephemeral range (`free_port_block`), so no client's reconnect takes a
killed node's port before it is back.
"""

from __future__ import annotations

import os
import random
import re
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import zmq

from protocol.client import Client
from protocol.keys import Identity
from tools import launch

from .common import PROG, ChaosError

# Fast failure detection so that faults of a second or two are seen as faults.
NODE_FLAGS = (
    "--heartbeat-ms", "100", "--suspect-after", "3", "--dead-after", "8",
    "--watch-heartbeat-ms", "250", "--replica-timeout-ms", "2000",
)
START_TIMEOUT = 30.0


def free_port_block(count: int) -> int:
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
        self.key: Identity | None = None  # with --secure: the node's key, and the harness's own
        self.client_key: Identity | None = None

    def client(self, zctx: zmq.Context[Any], **kw: Any) -> Client:
        """A reference client of this node (with the harness's key when the run has keys)."""
        if self.key is not None:
            kw.update(key=self.client_key, server_key=self.key.public_hex)
        return Client(self.address, zctx=zctx, **kw)

    @property
    def seed_address(self) -> str:
        """How other nodes name this one in --peers (with keys: NODE_ID@HOST:PORT)."""
        return f"{self.name}@{self.address}" if self.key is not None else self.address

    @property
    def address(self) -> str:
        return f"{self.host}:{self.port}"

    @property
    def pub(self) -> str:
        return f"tcp://{self.host}:{self.pub_port}"

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, peers: Sequence[str], abort: threading.Event | None = None) -> None:
        args = ["--id", self.name, "--data", str(self.data), "--listen", self.address,
                "--pub-port", str(self.pub_port), *self.flags]
        if peers:
            args += ["--peers", ",".join(peers)]
        cmd = launch.node_command(*args, netns=self.netns)
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
        try:
            launch.wait_ready_in_file(self.proc, self.log_path, offset, START_TIMEOUT, abort)
        except launch.NodeDidNotStart as exc:
            self.kill()
            raise ChaosError(f"node {self.name}: {exc}") from None

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
