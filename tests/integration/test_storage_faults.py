"""Storage write faults in a live node: STORAGE replies at once, reads go on, nothing
acknowledged is lost, and the node recovers by itself once the disk has room.

In-process servers over a fault-injecting KV (tests.unit.test_storage_faults.FaultyKV),
and real `ledger-node` processes on a small tmpfs that the test fills up (as root only:
mounting needs it; `.ci/run` runs as root).
"""

from __future__ import annotations

import contextlib
import errno
import logging
import os
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from node.config import Config
from node.ledger import Ledger
from node.server import Server
from node.storage import MemoryKV
from protocol import codec, merkle
from protocol.client import Client
from protocol.entry import decode_entry
from protocol.errors import StorageError
from tests.unit.test_storage_faults import FaultyKV

pytestmark = pytest.mark.timeout(120)


def config(durability: str, **kw: int) -> Config:
    return Config(node_id="sf", data=":memory:", host="127.0.0.1", port=0, pub_port=0, durability=durability,
                  flush_ms=kw.pop("flush_ms", 5), max_payload=1 << 20, hot_bytes=8 << 20, log_level="info", **kw)


@contextlib.contextmanager
def serving(cfg: Config, kv: FaultyKV, zctx) -> Iterator[Server]:  # type: ignore[no-untyped-def]
    server = Server(cfg, Ledger(kv, node_id="sf", sync_meta=False), zctx=zctx)
    t = threading.Thread(target=server.run, daemon=True)
    t.start()
    try:
        yield server
    finally:
        server.stop()
        t.join(30)
        assert not t.is_alive()


def wait_storage(c: Client, state: str, timeout: float = 20.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        s = c.status()["storage"]
        if s["state"] == state or time.monotonic() > deadline:
            assert s["state"] == state, s
            return s
        time.sleep(0.05)


def stored(kv: FaultyKV, name: str) -> list[bytes]:
    """Payloads of `name` that a node restarted on `kv` serves."""
    led = Ledger(kv, node_id="sf", sync_meta=False)
    ctx = led.contexts.get(name)
    if ctx is None:
        return []
    blobs, _size, _more, _next = led.get(codec.Get(name, after=0, limit=100_000))
    return [decode_entry(b).payload for b in blobs]


def test_sync_mode_answers_storage_at_once_serves_reads_and_recovers(zctx):
    kv = FaultyKV()
    with serving(config("sync"), kv, zctx) as server, Client(server.router_address, zctx=zctx, timeout=5) as c:
        acked = [c.append("c", f"ok-{i}", dedup_id=f"d{i}").payload for i in range(3)]
        kv.room = False
        kv.broken = True  # the disk fills up
        t0 = time.monotonic()
        with pytest.raises(StorageError, match="not acknowledged") as exc:
            c.append("c", "held-then-refused", dedup_id="d3")  # its reply was held for the fsync
        assert time.monotonic() - t0 < 1.0
        assert exc.value.details["seq"] == 4
        with pytest.raises(StorageError, match="takes no writes"):
            c.append("c", "refused")
        with pytest.raises(StorageError):
            c.append_batch("c", ["r1", "r2"])
        with pytest.raises(StorageError):
            c.append("new-context", "refused")
        # reads, heads and status are served meanwhile
        assert [e.payload for e in c.iter_entries("c")][:3] == acked
        assert c.head("c").size == 4
        s = c.status()["storage"]
        assert s["state"] == "failed" and "No space left" in s["error"] and s["write_errors"] >= 1
        assert "new-context" not in [x["name"] for x in c.call("contexts")["contexts"]]
        kv.room = True  # space freed
        s = wait_storage(c, "ok")
        assert s["recoveries"] == 1
        # the retry with the same dedup_id finds the entry the recovery wrote: no duplicate
        assert c.append("c", "held-then-refused", dedup_id="d3").seq == 4
        acked += [b"held-then-refused", c.append("c", "after").payload]
    assert stored(kv, "c") == acked


def test_async_mode_backpressure_does_not_hang_readers_and_nothing_acked_is_lost(zctx):
    # a tiny write buffer: the failed flush is forced by back-pressure, which used to wait
    # forever for a flusher retrying on the broken handle while every reader hung
    kv = FaultyKV()
    with serving(config("async", flush_ms=60_000, write_buffer=8 << 10), kv, zctx) as server, \
            Client(server.router_address, zctx=zctx, timeout=5) as c:
        acked = [c.append("c", "first").payload]  # (its lamport reservation is on disk)
        kv.room = False
        kv.broken = True
        with pytest.raises(StorageError):
            for i in range(10_000):
                acked.append(c.append("c", f"async-{i}".encode() * 10).payload)  # acknowledged in RAM
        assert len(acked) > 10
        assert [e.payload for e in c.iter_entries("c")] == acked  # served from RAM
        assert c.status()["storage"]["state"] == "failed"
        assert c.status()["pending_writes"] > 0
        kv.room = True
        wait_storage(c, "ok")
        acked.append(c.append("c", "after").payload)
    assert stored(kv, "c") == acked


class GatedFaultyKV(FaultyKV):
    """The flusher's writes wait for `gate`; `break_direct` fails only the loop thread's own writes."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = threading.Event()
        self.gate.set()
        self.break_direct = False

    def write(self, puts, deletes=(), sync: bool = False) -> None:  # type: ignore[no-untyped-def]
        if self.break_direct and threading.current_thread().name != "ledger-flusher":
            self.broken = True
            self.break_direct = False
        super().write(puts, deletes, sync)

    def prepare(self, puts, sync: bool = False):  # type: ignore[no-untyped-def]
        items = list(puts)

        if self.broken:
            return lambda: FaultyKV.write(self, items, sync=sync)

        def commit() -> None:  # reached the disk before the fault; only its completion waits
            MemoryKV.write(self, items, sync=sync)
            self.gate.wait(30)
        return commit


def payload(i: int) -> bytes:
    """The i-th append's payload in `behind`: 11 of 64 B (4.8 KiB buffered with their encoding and
    RAM overhead, below the 8 KiB write buffer however the loop's turns split them), a 12th of
    3 KiB that takes the buffer past it, then 1 KiB each."""
    return b"%04d" % i * (16 if i < 12 else 768 if i == 12 else 256)


def behind(server: Server, kv: GatedFaultyKV, zctx):  # type: ignore[no-untyped-def]
    """A writer's DEALER, after 12 appends answered from RAM while the store's writes wait
    (`kv.gate`), the 12th taking the buffer past the 8 KiB write buffer, so its next five (13 to
    17) are held. (The first version sent twelve of 1 KiB, which all had to be read in one turn
    of the loop: on a slow machine a turn read fewer and the buffer filled before the 12th.)"""
    import zmq

    kv.gate.clear()
    w = zctx.socket(zmq.DEALER)
    w.setsockopt(zmq.LINGER, 0)
    w.connect(server.router_address)
    for i in range(1, 13):
        w.send(codec.encode_request("append", i, {"context": "c", "payload": payload(i)}))
    for i in range(1, 13):
        assert w.poll(10_000) and codec.decode_reply(w.recv())["id"] == i
    for i in range(13, 18):
        w.send(codec.encode_request("append", i, {"context": "c", "payload": payload(i)}))
    return w


def held_replies(w, n: int = 5) -> list[dict]:  # type: ignore[no-untyped-def]
    """The replies to the `n` held appends of `behind`'s DEALER, in the order they come."""
    replies: list[dict] = []
    while len(replies) < n:
        assert w.poll(10_000), f"{len(replies)} of {n} held appends answered"
        replies.append(codec.decode_reply(w.recv()))
    return replies


def wait_held(reader: Client, n: int) -> dict:
    deadline = time.monotonic() + 10
    while True:
        st = reader.status()  # answered while the writes wait: what this is about
        if st["held_requests"] >= n:
            return st
        assert time.monotonic() < deadline, f"{st['held_requests']} writes held, not {n}"
        time.sleep(0.01)


def test_while_a_write_stalls_reads_are_answered_and_the_writes_held_then_served_in_order(zctx):
    # a LevelDB write stall (a compaction of seconds) used to stop every request, reads too
    kv = GatedFaultyKV()
    with serving(config("async", write_buffer=8 << 10), kv, zctx) as server, \
            Client(server.router_address, zctx=zctx, timeout=5) as reader:
        w = behind(server, kv, zctx)
        try:
            wait_held(reader, 5)
            assert reader.head("c").size == 12 and len(list(reader.iter_entries("c"))) == 12
            assert not w.poll(100)  # the held appends are not answered while the write waits
            kv.gate.set()
            replies = held_replies(w)
        finally:
            kv.gate.set()
            w.close()
        assert [r["id"] for r in replies] == list(range(13, 18)) and all(r["ok"] for r in replies)
        assert [r["entry"]["seq"] for r in replies] == list(range(13, 18))
        st = reader.status()
        assert st["held_requests"] == 0 and st["held_requests_total"] == 5 and st["held_turns"] > 0


def test_writes_held_when_the_disk_fills_up_are_answered_storage_and_reads_go_on(zctx):
    kv = GatedFaultyKV()
    with serving(config("async", write_buffer=8 << 10), kv, zctx) as server, \
            Client(server.router_address, zctx=zctx, timeout=5) as reader:
        w = behind(server, kv, zctx)
        try:
            wait_held(reader, 5)
            kv.room = False
            kv.broken = True  # the next write fails: the disk is full
            kv.gate.set()
            replies = held_replies(w)
        finally:
            kv.gate.set()
            w.close()
        assert [r["id"] for r in replies] == list(range(13, 18))
        # served in order: acknowledged (in RAM, async) until the failed write is known, STORAGE after;
        # nothing held is lost or answered twice
        acked = [r["id"] for r in replies if r["ok"]]
        refused = [r for r in replies if not r["ok"]]
        assert acked == list(range(13, 13 + len(acked)))  # (which depends on when the failure is known)
        assert all(r["error"]["code"] == "STORAGE" for r in refused)
        deadline = time.monotonic() + 10
        while reader.status()["storage"]["state"] != "failed":  # (the acked ones' write fails)
            assert time.monotonic() < deadline
            time.sleep(0.02)
        assert reader.head("c").size == 12 + len(acked)  # reads go on
        kv.room = True
        wait_storage(reader, "ok")
    assert stored(kv, "c") == [payload(i) for i in range(1, 13 + len(acked))]  # every acknowledged one


def test_requests_held_when_the_node_stops_are_answered_unavailable_and_what_was_acked_kept(zctx):
    kv = GatedFaultyKV()
    server = Server(config("async", write_buffer=8 << 10), Ledger(kv, node_id="sf", sync_meta=False), zctx=zctx)
    t = threading.Thread(target=server.run, daemon=True)
    t.start()
    w = None
    try:
        with Client(server.router_address, zctx=zctx, timeout=5) as reader:
            w = behind(server, kv, zctx)
            wait_held(reader, 5)
        server.stop()
        threading.Timer(0.3, kv.gate.set).start()  # the write in flight finishes; the stop goes on
        t.join(30)
        assert not t.is_alive()
        replies = []
        while w.poll(2000):
            replies.append(codec.decode_reply(w.recv()))
    finally:
        kv.gate.set()
        if w is not None:
            w.close()
    assert [r["id"] for r in replies] == list(range(13, 18))
    assert all(r["error"]["code"] == "UNAVAILABLE" and "not served" in r["error"]["message"] for r in replies)
    assert stored(kv, "c") == [payload(i) for i in range(1, 13)]  # every acknowledged one, none else


def test_a_failed_write_on_the_loop_thread_refuses_what_waits_behind_it(zctx):
    # sync mode: X is being written, Y waits for the next batch; then a write the loop
    # thread does itself (an empty load creates its context on disk at once) fails. X's
    # batch was already handed off and lands; Y's will not be written before a recovery.
    kv = GatedFaultyKV()
    with serving(config("sync"), kv, zctx) as server, Client(server.router_address, zctx=zctx, timeout=5) as c:
        c.append("c", "first")
        kv.gate.clear()
        server_gate = kv.gate
        try:
            _loop_thread_fault(c, kv)
        finally:
            server_gate.set()


def _loop_thread_fault(c: Client, kv: GatedFaultyKV) -> None:
    if True:
        x = c.submit("append", context="c", payload=b"X")
        time.sleep(0.2)
        y = c.submit("append", context="c", payload=b"Y")
        kv.room = False
        kv.break_direct = True
        with pytest.raises(StorageError):
            c.call("load", retry=False, context="empty", load_id="l1", size=0, root=merkle.EMPTY_ROOT,
                   fail_if_exists=False, entries=[], final=True)
        with pytest.raises(StorageError):
            c.append("c", "refused")
        kv.gate.set()
        assert c.result(x)["entry"]["seq"] == 2  # on disk: acknowledged
        t0 = time.monotonic()
        with pytest.raises(StorageError):
            c.result(y)
        assert time.monotonic() - t0 < 1.0
        assert "empty" not in [i["name"] for i in c.call("contexts")["contexts"]]


def test_replica_holds_get_storage_too(zctx):
    kv = FaultyKV()
    cfg = config("sync", replica_timeout_ms=60_000)
    with serving(cfg, kv, zctx) as server, Client(server.router_address, zctx=zctx, timeout=5) as c:
        c.append("c", "first")
        # pretend one peer is alive, so the append is held for it (no peer ever acks)
        server.mesh.live_peers = lambda: 1  # type: ignore[method-assign]
        kv.room = False
        kv.broken = True
        t0 = time.monotonic()
        with pytest.raises(StorageError) as exc:
            c.append("c", "held for a replica and the disk", replicas=1)
        assert time.monotonic() - t0 < 1.0
        assert exc.value.details["seq"] == 2


def test_sigterm_while_storage_is_broken_tries_once_more_then_reports_the_loss(zctx, caplog):
    caplog.set_level(logging.INFO)
    kv = FaultyKV()
    with serving(config("async", flush_ms=10), kv, zctx) as server, \
            Client(server.router_address, zctx=zctx, timeout=5) as c:
        c.append("c", "on disk")
        wait_flushed(c)
        kv.room = False
        kv.broken = True
        # one request: five appends one by one raced the failing flush (10 ms) under load, and
        # an append after it is refused (CI saw that once)
        c.append_batch("c", [f"in RAM {i}" for i in range(5)])
        wait_storage(c, "failed")
    # shutdown tried once more (the reopen failed: still no room) and said what was lost
    text = caplog.text
    assert "trying once more to write 5 entries held in RAM" in text
    assert "LOST 5 ACKNOWLEDGED ENTRIES" in text and "'c'#2..6" in text
    assert stored(kv, "c") == [b"on disk"]


def test_sigterm_while_storage_is_broken_writes_if_the_last_try_works(zctx, caplog):
    caplog.set_level(logging.INFO)
    kv = FaultyKV()
    acked = []
    with serving(config("async", flush_ms=10), kv, zctx) as server, \
            Client(server.router_address, zctx=zctx, timeout=5) as c:
        acked = [c.append("c", "first").payload]
        kv.room = False
        kv.broken = True
        # five acknowledged in RAM by one request (five appends one by one: on a slow machine the
        # failed flush of the first ones was known before the last, which were refused STORAGE)
        acked += [e.payload for e in c.append_batch("c", [f"in RAM {i}" for i in range(5)])]
        wait_storage(c, "failed")
        # the disk has room again, but the node's own recovery does not see it (its probe
        # asks for more than is free, say): the stop's last try must write
        kv.probe_ok = False
        kv.room = True
    assert "LOST" not in caplog.text and "nothing was lost" in caplog.text
    assert stored(kv, "c") == acked


def wait_flushed(c: Client, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while c.status()["pending_writes"] and time.monotonic() < deadline:
        time.sleep(0.01)


# -- a real full disk ------------------------------------------------------------------


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 16 MiB tmpfs mounted for this test (root only), unmounted at teardown."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs to fill up needs root (.ci/run runs as root)")
    mnt = tmp_path / "disk"
    mnt.mkdir()
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mnt)],
                       capture_output=True, text=True, check=False)
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {r.stderr.strip() or r.returncode}")
    try:
        yield mnt
    finally:
        if subprocess.run(["umount", str(mnt)], capture_output=True, check=False).returncode != 0:
            subprocess.run(["umount", "-l", str(mnt)], capture_output=True, check=False)


def fill(disk: Path) -> Path:
    """Write a filler file until the disk is full; deleting it frees the space again."""
    filler = disk / "filler"
    chunk = b"\0" * (64 << 10)
    with open(filler, "wb", buffering=0) as f:
        try:
            while True:
                f.write(chunk)
        except OSError as exc:
            assert exc.errno == errno.ENOSPC
        with contextlib.suppress(OSError):
            while True:
                f.write(b"\0" * 512)
    return filler


@pytest.mark.parametrize("durability", ["sync", "async"])
def test_a_full_disk_refuses_writes_keeps_reads_and_loses_nothing(durability, small_disk, node_factory, zctx):
    # a small hot tail: the first entries are read back from LevelDB, through the failed handle
    n = node_factory("--durability", durability, "--flush-ms", "20", "--hot-bytes", "16k", data=small_disk / "data")
    with Client(n.address, zctx=zctx, timeout=5, retries=0) as c:
        acked: list[bytes] = [c.append("c", f"before-{i}".encode() * 40).payload for i in range(40)]
        wait_flushed(c)
        assert c.status()["hot_bytes"] <= 16 << 10 < 40 * (240 + 320)  # some left RAM
        filler = fill(small_disk)
        payload = b"x" * 2000
        refused_after = None
        for i in range(5000):
            t0 = time.monotonic()
            try:
                acked.append(c.append("c", payload + b"%d" % i, dedup_id=f"f{i}").payload)
            except StorageError:
                refused_after = time.monotonic() - t0
                break
            if durability == "async" and i % 50 == 49:
                time.sleep(0.05)  # let flushes run into the full disk
        assert refused_after is not None, "the node never refused a write on a full disk"
        assert refused_after < 1.0
        with pytest.raises(StorageError):
            c.append("c", "refused")
        # reads keep being served: everything acknowledged is there
        assert [e.payload for e in c.iter_entries("c")][:len(acked)] == acked
        s = c.status()["storage"]
        assert s["state"] == "failed" and "No space left" in s["error"], s
        filler.unlink()  # space freed: the node recovers by itself
        s = wait_storage(c, "ok", timeout=30)
        assert s["recoveries"] >= 1
        acked.append(c.append("c", "after recovery").payload)
        size = c.head("c").size
        wait_flushed(c)  # async mode: a crash may lose the flush interval, not more
    n.kill()  # a crash after recovery
    n.start()
    with Client(n.address, zctx=zctx, timeout=5) as c:
        got = [e.payload for e in c.iter_entries("c")]
        assert c.head("c").size == size
        assert set(acked) <= set(got) and got[-1] == b"after recovery"
        assert c.status()["storage"]["state"] == "ok"


def test_sigterm_on_a_full_disk_then_restart_keeps_every_acked_async_entry(small_disk, node_factory, zctx):
    n = node_factory("--durability", "async", "--flush-ms", "20", data=small_disk / "data")
    with Client(n.address, zctx=zctx, timeout=5, retries=0) as c:
        acked = [c.append("c", f"before-{i}").payload for i in range(20)]
        filler = fill(small_disk)
        with contextlib.suppress(StorageError):
            for i in range(5000):
                acked.append(c.append("c", b"y" * 2000 + b"%d" % i).payload)
                if i % 50 == 49:
                    time.sleep(0.05)
        wait_storage(c, "failed")
    filler.unlink()  # room again, and the stop may come before the node's own recovery
    assert n.stop() == 0
    assert "LOST" not in n.output()
    n.start()
    with Client(n.address, zctx=zctx, timeout=5) as c:
        assert [e.payload for e in c.iter_entries("c")] == acked
