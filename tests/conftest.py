"""Shared fixtures: real `ledger-node` processes on free loopback ports, cleaned up.

Nodes listen on 127.0.0.1 port 0 (the node binds a free port and prints it in
its ready line), so tests never race for fixed ports. Every process started
here is stopped (SIGTERM, then SIGKILL) at teardown, and every client closed.
"""

from __future__ import annotations

import os
import signal
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import zmq

from tools import launch


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--runslow", action="store_true", default=False, help="run tests marked slow")
    parser.addoption("--fuzz-long", action="store_true", default=False,
                     help="fuzz suite: 1,000,000 messages instead of 17,000 (same as LEDGER_FUZZ_LONG=1)")


def pytest_configure(config: pytest.Config) -> None:
    # read by tests/fuzz when their modules are imported (after this)
    if config.getoption("--fuzz-long", default=False):
        os.environ["LEDGER_FUZZ_LONG"] = "1"
    # A suite started in the background by a shell without job control (`bash .ci/run &`) inherits
    # SIGINT ignored, and so would every process it starts: the tests that press Ctrl-C on a CLI
    # would hang. Children of a process with a handler of its own get the default disposition.
    if signal.getsignal(signal.SIGINT) == signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--runslow"):
        return
    skip = pytest.mark.skip(reason="slow: run with --runslow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


class NodeProcess:
    """A `ledger-node` child process and what it printed."""

    def __init__(self, data: Path, *args: str, env: dict[str, str] | None = None) -> None:
        self.data = data
        self.args = list(args)
        self.env = env
        self.proc: subprocess.Popen[str] | None = None
        self.lines: list[str] = []
        self.address = ""
        self.pub = ""
        self.node_id = ""

    def start(self, timeout: float = 15.0) -> NodeProcess:
        args = ["--data", str(self.data), *self.args]
        if not any(a.startswith("--listen") for a in self.args):
            args += ["--listen", "127.0.0.1:0"]
        self.proc = None
        self.lines = []
        try:
            self.proc, out, ready = launch.start(args, timeout=timeout, env=self.env)
        except launch.NodeDidNotStart as exc:
            self.lines = exc.lines
            raise
        self.lines = out.lines
        self.address, self.pub, self.node_id = ready.router, ready.pub, ready.node_id
        return self

    def pin_ports(self) -> NodeProcess:
        """Make the next start() listen on the ports this run got (a restart "in place")."""
        host_port = self.address.split("://", 1)[1]
        pub_port = self.pub.rpartition(":")[2]
        self.args = [a for a in self.args if not a.startswith(("--listen", "--pub-port"))]
        self.args += [f"--listen={host_port}", f"--pub-port={pub_port}"]
        return self

    def output(self) -> str:
        return "\n".join(self.lines)

    def stop(self, timeout: float = 20.0) -> int:
        """SIGTERM and wait; returns the exit code."""
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            rc = self.proc.wait(5)
        self.proc = None
        return rc

    def kill(self) -> None:
        """kill -9, as a crash would."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self.proc = None


@pytest.fixture
def zctx() -> Iterator[zmq.Context]:
    """A private ZeroMQ context that must terminate at teardown (a leaked socket fails)."""
    ctx = zmq.Context()
    yield ctx
    done = threading.Event()

    def term() -> None:
        ctx.term()
        done.set()

    t = threading.Thread(target=term, daemon=True)
    t.start()
    if not done.wait(10):
        pytest.fail("a ZeroMQ socket was left open (context.term() hung)")


@pytest.fixture
def node_factory(tmp_path: Path) -> Iterator:
    """Start nodes: `node_factory(*flags, data=None, name='n1')`; all stopped at teardown."""
    started: list[NodeProcess] = []

    def make(*args: str, data: Path | None = None, name: str = "n1", env: dict[str, str] | None = None,
             start: bool = True) -> NodeProcess:
        n = NodeProcess(data or tmp_path / name, *args, env=env)
        started.append(n)
        return n.start() if start else n

    yield make
    for n in started:
        n.kill()


@pytest.fixture
def node(node_factory) -> NodeProcess:
    """One running node with default flags on a free port."""
    return node_factory()


@pytest.fixture
def client(node: NodeProcess, zctx: zmq.Context) -> Iterator:
    from protocol.client import Client

    c = Client(node.address, timeout=5.0, zctx=zctx)
    yield c
    c.close()
