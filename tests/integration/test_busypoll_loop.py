"""The busy-poll window in a live loop (an in-process Server): replies held for the disk."""

from __future__ import annotations

import threading
import time

import pytest

from node.config import Config
from node.ledger import Ledger
from node.server import Server
from node.storage import MemoryKV
from protocol.client import Client
from tests.integration.test_watch import GatedKV

pytestmark = pytest.mark.timeout(60)


def config(durability: str, busy_poll_us: int, flush_ms: int = 5) -> Config:
    return Config(node_id="bp", data=":memory:", host="127.0.0.1", port=0, pub_port=0, durability=durability,
                  flush_ms=flush_ms, max_payload=1 << 20, hot_bytes=8 << 20, log_level="info",
                  busy_poll_us=busy_poll_us)


class TimedKV(MemoryKV):
    """Notes when the loop hands a write off to the flusher."""

    def __init__(self) -> None:
        super().__init__()
        self.handoffs: list[float] = []

    def prepare(self, puts, sync: bool = False):  # type: ignore[no-untyped-def]
        self.handoffs.append(time.perf_counter())
        return super().prepare(puts, sync)


def test_a_spinning_loop_hands_writes_off_on_time(zctx):
    # A window (built here past the flag's 10 ms limit) far longer than the flush deadline
    # (--flush-ms 2: a write is due 1 ms after the append). The client stays silent, so
    # only the loop's own deadline can end the spin: the write must not wait for the window.
    kv = TimedKV()
    server = Server(config("async", 200_000, flush_ms=2), Ledger(kv, node_id="bp", sync_meta=False), zctx=zctx)
    t = threading.Thread(target=server.run, daemon=True)
    t.start()
    try:
        with Client(server.router_address, zctx=zctx, timeout=10) as c:
            for i in range(3):
                n = len(kv.handoffs)
                acked = time.perf_counter()
                c.append("due", f"e{i}")
                time.sleep(0.3)  # past the window: the bug would hand off at its end
                assert len(kv.handoffs) == n + 1
                assert kv.handoffs[n] - acked < 0.05, (i, kv.handoffs[n] - acked)
    finally:
        server.stop()
        t.join(10)


def test_a_reply_held_for_the_disk_opens_the_window_when_it_goes_out(zctx):
    # In sync mode the reply leaves when the write is done, often after the window opened
    # at the request has closed. The client's next request follows the reply, so the window
    # must open then.
    kv = GatedKV()
    server = Server(config("sync", 10_000), Ledger(kv, node_id="bp", sync_meta=False), zctx=zctx)
    t = threading.Thread(target=server.run, daemon=True)
    t.start()
    try:
        with Client(server.router_address, zctx=zctx, timeout=10) as c:
            rid = c.submit("append", context="held", payload=b"x")  # its reply waits for the disk
            time.sleep(0.1)  # longer than the window
            before_release = time.perf_counter()
            kv.gate.set()
            assert c.result(rid)["entry"]["seq"] == 1
            assert server.busy.last >= before_release  # the window counts from the reply
            for i in range(50):  # back to back after each reply: caught by the spin
                c.append("held", f"e{i}")
            # (some are read in the same loop turn as the one before: neither hit nor miss)
            assert server.busy.hits >= 10 and server.busy.misses <= 5, server.busy.status()
    finally:
        kv.gate.set()
        server.stop()
        t.join(10)
