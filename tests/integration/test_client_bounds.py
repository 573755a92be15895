"""What one client can make a real node hold: unread replies, connections, subscription frames."""

from __future__ import annotations

import resource
import socket
import subprocess
import sys
import time
from typing import Any

import pytest
import zmq

from node.clients import RESERVED_FDS
from protocol import codec
from protocol.client import Client

PAGE_ENTRIES = 200
PAGE_PAYLOAD = 1000  # a get of the whole context is a ~230 KiB reply


def wait_for(pred: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.05)


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def stalled_dealer(zctx: zmq.Context, address: str) -> zmq.Socket:
    """A client that sends and never reads: one message of receive queue, a tiny kernel buffer."""
    s = zctx.socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    s.setsockopt(zmq.RCVHWM, 1)
    s.setsockopt(zmq.RCVBUF, 4096)
    s.setsockopt(zmq.SNDHWM, 100_000)
    s.connect(address)
    return s


@pytest.mark.timeout(120)
def test_a_client_that_does_not_read_is_cut_off_and_others_are_served(node_factory, zctx) -> None:
    node = node_factory("--max-client-queue", "1MiB")
    assert node.proc is not None
    with Client(node.address, timeout=10.0, zctx=zctx) as c:
        c.call("append_batch", context="pages",
               entries=[{"payload": b"p" * PAGE_PAYLOAD} for _ in range(PAGE_ENTRIES)])
        rss_before = rss_mib(node.proc.pid)
        flood = stalled_dealer(zctx, node.address)
        gets = 3000  # ~690 MiB of replies if the node queued them all
        try:
            for i in range(gets):
                flood.send(codec.encode_request("get", i, {"context": "pages", "after": 0, "limit": 1000}))
            wait_for(lambda: c.call("status")["client_replies_dropped"] > gets // 2, 60, "replies dropped")
            # the well-behaved client is served meanwhile
            assert c.append("other", b"still served").seq == 1
            assert len(c.get("pages", after=0, limit=1000).entries) == PAGE_ENTRIES
            st = c.call("status")
            assert st["max_client_queue"] == 1 << 20
            assert st["client_cutoffs"] >= 1 and st["clients_cut_off"] == 1
            # held: the limit plus at most one page (a page always goes when nothing is held)
            assert st["client_queue_bytes"] <= (1 << 20) + 300_000
            assert rss_mib(node.proc.pid) - rss_before < 150, "the node queued the unread replies"

            # the flooder reads what it was sent: once that is done it is served again
            flood.setsockopt(zmq.RCVTIMEO, 1000)
            got = 0
            try:
                while True:
                    flood.recv_multipart()
                    got += 1
            except zmq.Again:
                pass
            assert 0 < got < gets
            flood.setsockopt(zmq.RCVTIMEO, 200)
            deadline = time.monotonic() + 20
            answered = False
            while not answered and time.monotonic() < deadline:
                flood.send(codec.encode_request("ping", "p", {}))
                try:
                    while True:
                        reply = codec.decode_reply(flood.recv_multipart()[-1])
                        if reply.get("id") == "p":
                            answered = True
                            break
                except zmq.Again:
                    pass
            assert answered, "a cut-off client that read its replies was never served again"
        finally:
            flood.close(linger=0)
        wait_for(lambda: c.call("status")["clients_cut_off"] == 0, 10, "the cut-off to be forgotten")


@pytest.mark.timeout(60)
def test_connections_past_max_clients_are_refused_and_an_allowed_client_is_served(node_factory, zctx) -> None:
    node = node_factory("--max-clients", "4")
    host, port = node.address.split("://", 1)[1].rsplit(":", 1)
    with Client(node.address, timeout=10.0, zctx=zctx) as c:
        c.call("ping")
        idle = [socket.create_connection((host, int(port))) for _ in range(10)]
        try:
            wait_for(lambda: c.call("status")["connections_refused"] >= 7, 30, "refusals")
            st = c.call("status")
            assert st["max_clients"] == 4
            assert st["connections"]["router"] <= 4
            assert c.append("ctx", b"allowed").seq == 1
            # a refused connection is closed by the node (after ZeroMQ's greeting, maybe)
            closed = 0
            for s in idle:
                s.settimeout(0.5)
                try:
                    while s.recv(4096):
                        pass
                    closed += 1
                except ConnectionError:
                    closed += 1
                except TimeoutError:
                    pass
            assert closed >= 7
        finally:
            for s in idle:
                s.close()


@pytest.mark.timeout(60)
@pytest.mark.parametrize("args, message", [
    (["--max-client-queue", "1K"], "--max-client-queue must be from 64KiB"),
    (["--max-client-queue", "lots"], "--max-client-queue: not a size"),
    (["--max-clients", "0"], "--max-clients must be an integer"),
    (["--max-clients", "\u00b2"], "--max-clients must be an integer"),
])
def test_bad_bound_flags_are_one_line_errors(args: list[str], message: str, tmp_path) -> None:
    r = subprocess.run([sys.executable, "-m", "node.main", "--data", str(tmp_path / "d"), *args],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 2 and message in r.stderr and "Traceback" not in r.stderr, r.stderr


@pytest.mark.timeout(60)
def test_the_bound_flags_and_their_defaults_show_in_status(node_factory, zctx) -> None:
    with Client(node_factory().address, timeout=10.0, zctx=zctx) as c:
        # the accepted-connection event may reach the loop after the first request
        wait_for(lambda: c.call("status")["connections"]["router"] >= 1, 10, "the connection counted")
        st = c.call("status")
    assert st["max_client_queue"] == 64 << 20
    assert 16 <= st["max_clients"] <= 4096
    assert st["connections_refused"] == 0
    assert st["client_replies_dropped"] == 0 and st["clients_cut_off"] == 0
    n = node_factory(env={"LEDGER_MAX_CLIENT_QUEUE": "2MiB", "LEDGER_MAX_CLIENTS": "100"}, name="n2")
    with Client(n.address, timeout=10.0, zctx=zctx) as c:
        st = c.call("status")
    assert (st["max_client_queue"], st["max_clients"]) == (2 << 20, 100)


@pytest.mark.timeout(60)
def test_max_clients_larger_than_the_descriptor_limit_is_refused_at_start(node_factory) -> None:
    node = node_factory("--max-clients", "1000000", start=False)
    with pytest.raises(RuntimeError, match="open-files limit"):
        node.start()


@pytest.mark.timeout(180)
def test_sync_appends_work_with_a_low_descriptor_limit_and_many_idle_connections(
        node_factory, zctx, monkeypatch) -> None:
    """1,100 idle connections at a 1,024 limit: LevelDB still opens its files (a memtable
    switch and a compaction), so sync appends are acknowledged; the surplus is refused."""
    real_popen = subprocess.Popen

    def low_limit() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (1024, 1024))

    def popen(*args: Any, **kwargs: Any) -> Any:
        kwargs["preexec_fn"] = low_limit
        return real_popen(*args, **kwargs)

    monkeypatch.setattr(subprocess, "Popen", popen)
    node = node_factory("--durability", "sync")
    monkeypatch.setattr(subprocess, "Popen", real_popen)
    host, port = node.address.split("://", 1)[1].rsplit(":", 1)
    with Client(node.address, timeout=20.0, zctx=zctx) as c:
        c.call("ping")
        idle = []
        try:
            for _ in range(1100):
                idle.append(socket.create_connection((host, int(port))))
            mib = b"m" * (1 << 20)
            for i in range(12):  # 48 MiB: past LevelDB's 32 MiB memtable, so it opens new files
                c.call("append_batch", context="big", entries=[{"payload": mib} for _ in range(4)],
                       dedup_id=f"b{i}")
            assert "Too many open files" not in node.output()
            st = c.call("status")
            assert c.head("big").size == 48
            assert st["max_clients"] == 1024 - RESERVED_FDS
            assert st["connections_refused"] > 0
        finally:
            for s in idle:
                s.close()


@pytest.mark.timeout(60)
def test_an_oversized_subscription_ends_its_connection(node_factory, zctx) -> None:
    node = node_factory()
    big = zctx.socket(zmq.SUB)
    small = zctx.socket(zmq.SUB)
    try:
        for s in (big, small):
            s.setsockopt(zmq.LINGER, 0)
        big.setsockopt(zmq.SUBSCRIBE, b"x" * 4096)
        big.connect(node.pub)
        time.sleep(0.3)  # the big one first
        small.setsockopt(zmq.SUBSCRIBE, b"zz")  # not a context topic: counted as a wildcard
        small.connect(node.pub)
        with Client(node.address, timeout=10.0, zctx=zctx) as c:
            wait_for(lambda: c.call("status")["wildcard_subscriptions"] >= 1, 10, "the small subscription")
            time.sleep(0.5)
            assert c.call("status")["wildcard_subscriptions"] == 1
    finally:
        big.close(linger=0)
        small.close(linger=0)
