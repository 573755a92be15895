"""Watch against real nodes: exactly-once through catch-up and live, topics, registry, restarts, stalls."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
import zmq

from node.config import Config, ConfigError
from node.config import parse as parse_config
from node.ledger import Ledger
from node.server import Server
from node.storage import MemoryKV
from protocol import watch
from protocol.client import Client, Watch
from protocol.entry import Entry
from protocol.errors import BadRequest, IntegrityError, TooLarge, Unavailable

pytestmark = pytest.mark.timeout(120)


def collect(w: Watch, n: int, timeout: float = 30.0) -> list[Entry]:
    """The next n entries of a watch, in a thread so a hang fails instead of blocking."""
    got: list[Entry] = []
    err: list[BaseException] = []

    def run() -> None:
        try:
            for e in w:
                got.append(e)
                if len(got) >= n:
                    return
        except BaseException as exc:  # surfaced to the test below
            err.append(exc)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(timeout)
    if err:
        raise err[0]
    assert not t.is_alive(), f"watch delivered {len(got)} of {n} entries within {timeout} s"
    return got


def wait_for(cond: Callable[[], bool], timeout: float = 10.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.02)


def appender(address: str, context: str, n: int, zctx: zmq.Context, **kw: Any) -> threading.Thread:
    def run() -> None:
        with Client(address, zctx=zctx, timeout=20) as c:
            for _ in c.append_many(context, (f"e{i}".encode() for i in range(n)), **kw):
                pass

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


def test_catch_up_then_live_exactly_once_while_appends_race(node, zctx):
    with Client(node.address, zctx=zctx) as c:
        for _ in c.append_many("race", (b"pre" for _ in range(700))):
            pass
        t = appender(node.address, "race", 5000, zctx, window=50)  # racing the subscription
        with c.watch("race", after=0) as w:
            got = collect(w, 5700)
            t.join(30)
            assert [e.seq for e in got] == list(range(1, 5701))
            stored = list(c.iter_entries("race"))
            assert [e.hash for e in got] == [e.hash for e in stored]
            assert w.cursor.delivered == 5700


def test_after_none_delivers_only_new_entries_and_after_n_the_rest(client):
    for i in range(5):
        client.append("fresh", f"old{i}")
    with client.watch("fresh") as w:
        client.append("fresh", "new")
        (e,) = collect(w, 1)
        assert (e.seq, e.payload) == (6, b"new")
    with client.watch("fresh", after=3) as w:
        assert [e.seq for e in collect(w, 3)] == [4, 5, 6]
    with client.watch("not-yet") as w:  # a context that does not exist yet
        client.append("not-yet", "first")
        assert [e.seq for e in collect(w, 1)] == [1]


def test_watching_a_busy_context_from_now_on_starts_cleanly_every_time(client, zctx):
    # A greeting (published size) older than the head read right after it once
    # looked like lost entries; it must not.
    t = appender(client.address, "busy", 20_000, zctx, window=20)
    try:
        for _ in range(20):
            with client.watch("busy") as w:
                start = w.last_seq
                got = [e.seq for e in collect(w, 20)]
                assert got == list(range(start + 1, start + 21))
    finally:
        t.join(60)


def test_watching_after_the_end_of_a_context_is_a_clear_error(client):
    client.append("short", "only")
    with pytest.raises(BadRequest, match="has 1 entries; cannot watch after #5"):
        client.watch("short", after=5)
    wait_for(lambda: client.status()["watchers"] == 0, what="the refused watch to close its subscription")


def test_topics_are_exact_and_quiet_contexts_get_heads(node_factory, zctx):
    n = node_factory("--watch-heartbeat-ms", "100")
    sub = zctx.socket(zmq.SUB)
    sub.setsockopt(zmq.LINGER, 0)
    sub.connect(n.pub)
    sub.setsockopt(zmq.SUBSCRIBE, watch.topic("c1"))
    try:
        with Client(n.address, zctx=zctx) as c:
            greeting = watch.decode_message(sub.recv_multipart()) if sub.poll(5000) else None
            assert isinstance(greeting, watch.HeadMsg) and greeting.size == 0 and greeting.heartbeat_ms == 100
            for name in ("c10", "c1", "c", "c1\x00", "c1x", "c1"):
                c.append(name, name)
            seen: list[watch.WatchMsg] = []
            deadline = time.monotonic() + 1.0
            while time.monotonic() < deadline:
                if sub.poll(50):
                    seen.append(watch.decode_message(sub.recv_multipart()))
        entries = [e for m in seen if isinstance(m, watch.EntriesMsg) for e in m.entries]
        assert [(e.context, e.seq) for e in entries] == [("c1", 1), ("c1", 2)]
        heads = [m for m in seen if isinstance(m, watch.HeadMsg)]
        # quiet for a second at 100 ms heartbeats: several heads, all with the full size
        assert len(heads) >= 3 and all(h.context == "c1" and h.size == 2 for h in heads[1:])
    finally:
        sub.close(linger=0)


def test_key_filter_applies_to_catch_up_and_live(client):
    for i in range(20):
        client.append("keyed", f"a{i}", key="facts" if i % 3 == 0 else "traces")
    with client.watch("keyed", after=0, key="facts") as w:
        first = collect(w, 7)
        assert [e.seq for e in first] == [1, 4, 7, 10, 13, 16, 19]
        for i in range(20, 40):
            client.append("keyed", f"b{i}", key="facts" if i % 3 == 0 else "traces")
        live = collect(w, 7)
        assert [e.seq for e in live] == [22, 25, 28, 31, 34, 37, 40]
        assert {e.key for e in first + live} == {"facts"}


def test_registry_counts_watchers_per_context_in_head_and_status(client):
    ws = [client.watch("reg-a") for _ in range(3)] + [client.watch("reg-b")]
    try:
        client.append("reg-a", "x")
        client.append("reg-b", "y")
        assert client.head("reg-a").watchers == 3
        assert client.head("reg-b").watchers == 1
        st = client.status()
        assert st["watchers"] == 4 and st["watched_contexts"] == 2
        assert st["watchers_by_context"] == {"reg-a": 3, "reg-b": 1}
        ws[0].close()
        ws[1].close()
        wait_for(lambda: client.head("reg-a").watchers == 1, what="unsubscriptions of closed watchers")
        assert client.status()["watchers"] == 2
    finally:
        for w in ws:
            w.close()


def test_watch_survives_kill_9_and_restart_of_its_node(node_factory, zctx):
    n = node_factory("--durability", "sync", "--watch-heartbeat-ms", "100").pin_ports()
    events: list[tuple[str, str]] = []
    with Client(n.address, zctx=zctx, timeout=2) as wc, Client(n.address, zctx=zctx, timeout=2) as c:
        for i in range(200):
            c.append("survive", f"a{i}", dedup_id=f"a{i}")
        w = wc.watch("survive", after=0, on_event=lambda k, t: events.append((k, t)))
        with w:
            assert [e.seq for e in collect(w, 200)] == list(range(1, 201))
            n.kill()
            n.start()
            for i in range(300):
                c.append("survive", f"b{i}", dedup_id=f"b{i}")
            got = collect(w, 300, timeout=60)
        assert [e.seq for e in got] == list(range(201, 501))
        assert [e.payload for e in got] == [f"b{i}".encode() for i in range(300)]
        assert any(k in ("lost", "restarted") for k, _ in events), events


def test_watch_refuses_to_continue_when_the_node_lost_what_it_delivered(node_factory, zctx):
    # async durability with a minute-long flush: a kill -9 loses every acknowledged append
    n = node_factory("--flush-ms", "60000", "--watch-heartbeat-ms", "100").pin_ports()
    with Client(n.address, zctx=zctx, timeout=2) as c:
        c.append("lossy", "durable")
        c.call("status")
        n.stop()  # a clean stop writes it
        n.start()
        with c.watch("lossy", after=0) as w:
            for i in range(5):
                c.append("lossy", f"volatile{i}")
            assert [e.seq for e in collect(w, 6)] == list(range(1, 7))
            n.kill()
            n.start()
            c.append("lossy", "a different #2")
            with pytest.raises(IntegrityError, match="lost|changed"):
                collect(w, 1, timeout=30)


def test_stalled_watcher_never_blocks_appends_and_refills_when_it_reads_again(node_factory, zctx):
    n = node_factory("--watch-queue", "10")
    with Client(n.address, zctx=zctx, timeout=10) as client:
        stalled = client.watch("stall", after=0, rcvhwm=10)
        active = client.watch("stall", after=0)
        try:
            got_active: list[Entry] = []
            reader = threading.Thread(target=lambda: got_active.extend(collect(active, 4000, timeout=90)), daemon=True)
            reader.start()
            payload = b"p" * 8192  # 32 MB in all: more than the kernel's socket buffers hold
            t0 = time.monotonic()
            acked = []
            with Client(n.address, zctx=zctx, timeout=10) as writer:
                for _ in range(4000):
                    acked.append(writer.append("stall", payload).seq)
            assert acked == list(range(1, 4001))
            assert time.monotonic() - t0 < 60  # a hang, not a speed check: the bench measures speed
            reader.join(90)
            assert [e.seq for e in got_active] == acked
            got = collect(stalled, 4000)  # it reads again: what the node dropped is refilled by seq
            assert [e.seq for e in got] == acked
            assert stalled.refills >= 1 and stalled.cursor.delivered == 4000
        finally:
            stalled.close()
            active.close()


def test_many_watchers_over_many_contexts_each_get_everything_in_order(client, zctx):
    contexts = [f"fan{i}" for i in range(20)]
    watches = [client.watch(name, after=0) for name in contexts for _ in range(10)]
    try:
        for name in contexts:
            client.append_batch(name, [f"{name}:{i}" for i in range(50)])
        t = appender(client.address, "fan0", 500, zctx)
        poller = zmq.Poller()
        for w in watches:
            poller.register(w.socket, zmq.POLLIN)
        want = {name: 50 for name in contexts}
        want["fan0"] = 550
        got: dict[int, list[int]] = {i: [] for i in range(len(watches))}
        deadline = time.monotonic() + 60
        while any(len(got[i]) < want[w.context] for i, w in enumerate(watches)):
            assert time.monotonic() < deadline, "watchers did not receive everything"
            poller.poll(200)
            for i, w in enumerate(watches):
                got[i].extend(e.seq for e in w.drain())
        t.join(30)
        for i, w in enumerate(watches):
            assert got[i] == list(range(1, want[w.context] + 1)), w.context
        assert client.status()["watchers"] == 200
    finally:
        for w in watches:
            w.close()


def test_garbage_on_the_watch_socket_does_not_hurt_the_node(node, client, zctx):
    xsub = zctx.socket(zmq.XSUB)
    xsub.setsockopt(zmq.LINGER, 0)
    xsub.connect(node.pub)
    try:
        for junk in (b"", b"\x07junk", b"\x00", b"\x01\xff\xff", b"\x00\x00\x05ab", b"\x02" * 1000):
            xsub.send(junk)
        with socket_garbage(node.pub):
            pass
        with client.watch("after-junk", after=0) as w:
            client.append("after-junk", "ok")
            assert [e.payload for e in collect(w, 1)] == [b"ok"]
        assert client.status()["publish_errors"] == 0
    finally:
        xsub.close(linger=0)


class socket_garbage:
    """A raw TCP connection to `address` that sends bytes that are not ZMTP."""

    def __init__(self, address: str) -> None:
        import socket

        host, _, port = address.split("://", 1)[1].rpartition(":")
        self.s = socket.create_connection((host, int(port)), timeout=5)
        self.s.sendall(os.urandom(4096))

    def __enter__(self) -> socket_garbage:
        return self

    def __exit__(self, *exc: object) -> None:
        self.s.close()


def test_bad_watch_heartbeat_flag_is_a_clear_error():
    p = subprocess.run([sys.executable, "-m", "node.main", "--data", ":memory:", "--listen", "127.0.0.1:0",
                        "--watch-heartbeat-ms", "5"], capture_output=True, text=True, timeout=20)
    assert p.returncode == 2
    assert "--watch-heartbeat-ms must be an integer from 10 to 60000" in p.stderr
    p = subprocess.run([sys.executable, "-m", "node.main", "--data", ":memory:", "--listen", "127.0.0.1:0",
                        "--watch-queue", "none"], capture_output=True, text=True, timeout=20)
    assert p.returncode == 2 and "--watch-queue must be an integer" in p.stderr


def test_unreachable_node_ends_a_watch_after_max_outage(node_factory, zctx):
    n = node_factory("--watch-heartbeat-ms", "100")
    with Client(n.address, zctx=zctx, timeout=0.5) as c:
        c.append("gone", "x")
        with c.watch("gone", after=0, max_outage=1.0) as w:
            assert len(collect(w, 1)) == 1
            n.kill()
            t0 = time.monotonic()
            with pytest.raises(Unavailable, match="did not come back"):
                collect(w, 1, timeout=30)
            # about max_outage after the node's last word, not several ping timeouts more
            assert time.monotonic() - t0 < 3.2


# -- a fault while publishing one context stays in that context -----------------------


def test_a_publish_fault_in_one_context_leaves_other_watchers_and_appends_alone(zctx):
    cfg = Config(node_id="fault", data=":memory:", host="127.0.0.1", port=0, pub_port=0, durability="async",
                 flush_ms=5, max_payload=1 << 20, hot_bytes=8 << 20, log_level="info", watch_heartbeat_ms=100)
    server = Server(cfg, Ledger(MemoryKV(), node_id="fault", sync_meta=False), zctx=zctx)
    real = server.publisher.encode_entries

    def faulty(ctx: Any, blobs: list[bytes]) -> bytes:
        if ctx.name == "bad":
            raise RuntimeError("injected publish fault")
        return real(ctx, blobs)

    server.publisher.encode_entries = faulty  # type: ignore[method-assign]
    t = threading.Thread(target=server.run, daemon=True)
    t.start()
    try:
        with Client(server.router_address, zctx=zctx) as c:
            with c.watch("good", after=0) as good, c.watch("bad", after=0) as bad:
                for i in range(300):
                    c.append("bad", f"b{i}")
                    c.append("good", f"g{i}")
                assert [e.seq for e in collect(good, 300)] == list(range(1, 301))
                assert good.refills <= 1  # live: only the catch-up read
                # the faulty context's watchers still get everything, by refill from heads
                assert [e.seq for e in collect(bad, 300)] == list(range(1, 301))
                st = c.status()
                assert st["publish_errors"] > 0 and st["publish_errors_by_context"].keys() == {"bad"}
                assert c.head("bad").size == 300 and c.verify_context("bad")["ok"]
    finally:
        server.stop()
        t.join(10)


class GatedKV(MemoryKV):
    """A store whose writes wait for `gate`: a disk that has not fsynced yet."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = threading.Event()

    def prepare(self, puts: Any, sync: bool = False) -> Callable[[], None]:
        commit = super().prepare(puts, sync)

        def gated() -> None:
            self.gate.wait(30)
            commit()
        return gated


def test_sync_mode_publishes_only_entries_on_disk(zctx):
    cfg = Config(node_id="gated", data=":memory:", host="127.0.0.1", port=0, pub_port=0, durability="sync",
                 flush_ms=5, max_payload=1 << 20, hot_bytes=8 << 20, log_level="info", watch_heartbeat_ms=50)
    kv = GatedKV()
    server = Server(cfg, Ledger(kv, node_id="gated", sync_meta=False), zctx=zctx)
    t = threading.Thread(target=server.run, daemon=True)
    t.start()
    sub = zctx.socket(zmq.SUB)
    sub.setsockopt(zmq.LINGER, 0)
    sub.connect(server.pub_address)
    sub.setsockopt(zmq.SUBSCRIBE, watch.topic("gated"))
    try:
        assert sub.poll(5000)  # the greeting
        assert watch.decode_message(sub.recv_multipart()) == watch.HeadMsg(
            "gated", 0, 0, watch_empty_root(), "gated", server.publisher.boot, 50, 1)
        with Client(server.router_address, zctx=zctx, timeout=10) as c:
            rid = c.submit("append", context="gated", payload=b"x")  # its reply waits for the disk
            seen = []
            deadline = time.monotonic() + 0.5
            while time.monotonic() < deadline:
                if sub.poll(50):
                    seen.append(watch.decode_message(sub.recv_multipart()))
            # heads went out meanwhile, none counting the entry, and no entry was published
            assert seen and all(isinstance(m, watch.HeadMsg) and m.size == 0 for m in seen)
            kv.gate.set()
            assert c.result(rid)["entry"]["seq"] == 1
            deadline = time.monotonic() + 5
            entries: list[Entry] = []
            while not entries and time.monotonic() < deadline:
                if sub.poll(100):
                    m = watch.decode_message(sub.recv_multipart())
                    if isinstance(m, watch.EntriesMsg):
                        entries.extend(m.entries)
            assert [e.seq for e in entries] == [1]
    finally:
        kv.gate.set()
        sub.close(linger=0)
        server.stop()
        t.join(10)


def test_sync_mode_head_describes_one_prefix(zctx):
    """A head's size, root and lamport are of one entry (SPEC 16.3): in sync mode its size stops at
    what is on disk, so its lamport must be that entry's, not the last appended one's (issue #18)."""
    cfg = Config(node_id="gated", data=":memory:", host="127.0.0.1", port=0, pub_port=0, durability="sync",
                 flush_ms=5, max_payload=1 << 20, hot_bytes=8 << 20, log_level="info", watch_heartbeat_ms=50)
    kv = GatedKV()
    kv.gate.set()
    server = Server(cfg, Ledger(kv, node_id="gated", sync_meta=False), zctx=zctx)
    t = threading.Thread(target=server.run, daemon=True)
    t.start()
    sub = zctx.socket(zmq.SUB)
    sub.setsockopt(zmq.LINGER, 0)
    sub.connect(server.pub_address)
    sub.setsockopt(zmq.SUBSCRIBE, watch.topic("one"))
    try:
        assert sub.poll(5000)  # the greeting
        watch.decode_message(sub.recv_multipart())
        with Client(server.router_address, zctx=zctx, timeout=10) as c:
            first = c.append_batch("one", [b"a"] * 10)  # on disk
            kv.gate.clear()  # the next batch waits for its fsync
            rid = c.submit("append_batch", context="one", entries=[{"payload": b"b"}] * 10)
            heads: list[watch.HeadMsg] = []
            deadline = time.monotonic() + 0.5
            while time.monotonic() < deadline:
                if sub.poll(50):
                    m = watch.decode_message(sub.recv_multipart())
                    if isinstance(m, watch.HeadMsg):
                        heads.append(m)
            assert heads and {h.size for h in heads} == {10}
            assert {h.lamport for h in heads} == {first[-1].lamport}  # not entry 20's
            kv.gate.set()
            assert c.result(rid)["last_seq"] == 20
            assert {h.root for h in heads} == {c.consistency("one", 10).first_root}
    finally:
        kv.gate.set()
        sub.close(linger=0)
        server.stop()
        t.join(10)


def test_sync_node_heads_match_the_entry_at_their_size(node_factory, zctx):
    """Against a real `--durability sync` node: every head (greetings of watchers that subscribe
    while batches are being appended, and heartbeats) names the lamport and root of the entry at
    its size, as `get` and `consistency` read them."""
    n = node_factory("--durability", "sync", "--watch-heartbeat-ms", "10")
    heads: list[watch.HeadMsg] = []
    subs: list[zmq.Socket] = []
    try:
        with Client(n.address, zctx=zctx, timeout=10) as c:
            pending = []
            for _ in range(60):
                pending.append(c.submit("append_batch", context="pfx", entries=[{"payload": b"p" * 64}] * 10))
                sub = zctx.socket(zmq.SUB)  # a new watcher: its greeting is sent as it subscribes
                sub.setsockopt(zmq.LINGER, 0)
                subs.append(sub)
                sub.connect(n.pub)
                sub.setsockopt(zmq.SUBSCRIBE, watch.topic("pfx"))
                if sub.poll(5000):
                    heads.append(watch.decode_message(sub.recv_multipart()))  # type: ignore[arg-type]
            for rid in pending:
                c.result(rid)
            for sub in subs:
                while sub.poll(0):
                    m = watch.decode_message(sub.recv_multipart())
                    if isinstance(m, watch.HeadMsg):
                        heads.append(m)
            # how many greetings land between an append and its fsync depends on the machine's load;
            # test_sync_mode_head_describes_one_prefix holds the fsync open and always catches one
            heads = [h for h in heads if isinstance(h, watch.HeadMsg) and h.size > 0]
            assert heads
            for h in heads:
                (e,) = c.get("pfx", after=h.size - 1, limit=1).entries
                assert (e.seq, e.lamport) == (h.size, h.lamport)
                assert h.root == c.consistency("pfx", h.size).first_root
    finally:
        for sub in subs:
            sub.close(linger=0)


def watch_empty_root() -> bytes:
    from protocol.merkle import EMPTY_ROOT

    return EMPTY_ROOT


# -- the CLI -------------------------------------------------------------------------


def test_cli_watch_prints_entries_as_json_and_stops_after_count(node, client, capsys):
    from tools import cli

    for i in range(3):
        client.append("cli-w", f"p{i}", key="facts")
    rc = cli.main(["--node", node.address.split("://")[1], "--json", "watch", "cli-w", "--after", "1",
                   "--count", "2"])
    out = capsys.readouterr().out.splitlines()
    assert rc == 0
    assert [json.loads(line)["seq"] for line in out] == [2, 3]
    assert {json.loads(line)["key"] for line in out} == {"facts"}


def test_cli_watch_follows_a_restarted_node_and_exits_130_on_ctrl_c(node_factory, zctx):
    n = node_factory("--durability", "sync", "--watch-heartbeat-ms", "100").pin_ports()
    host_port = n.address.split("://")[1]
    proc = subprocess.Popen([sys.executable, "-m", "tools.cli", "--node", host_port, "--timeout", "1", "watch",
                             "follow", "--after", "0"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    lines: list[str] = []

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        with Client(n.address, zctx=zctx, timeout=2) as c:
            for i in range(3):
                c.append("follow", f"before{i}")
            wait_for(lambda: len(lines) == 3, 20, "the first entries")
            n.kill()
            n.start()
            for i in range(3):
                c.append("follow", f"after{i}")
            wait_for(lambda: len(lines) == 6, 30, "entries after the restart")
        proc.send_signal(signal.SIGINT)
        rc = proc.wait(20)
        assert rc == 130
        assert [line.split()[0] for line in lines] == [f"follow#{i}" for i in range(1, 7)]
        assert [line.split()[-1] for line in lines] == [f"before{i}" for i in range(3)] + [f"after{i}" for i in range(3)]
        assert proc.stderr is not None
        err = proc.stderr.read()
        assert "not answering" in err or "restarted" in err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


@pytest.mark.parametrize("context, key, says", [("", None, "context must not be empty"),
                                                 ("x" * 257, None, "context must be 1..256 bytes"),
                                                 ("ok", "k" * 257, "key must be 0..256 bytes")])
def test_a_watch_of_a_bad_name_fails_at_once(zctx, context, key, says):
    # Nothing listens at this address: a watch that got as far as the network would wait for a
    # greeting and then fail as Unavailable; a bad name must be refused before any of that.
    with Client("127.0.0.1:9", zctx=zctx, timeout=30) as c:
        with pytest.raises(BadRequest, match=says):
            c.watch(context, key=key, pub_address="tcp://127.0.0.1:9")


def test_a_watch_past_max_watch_topics_is_told_so_and_still_gets_every_entry(node_factory, zctx):
    n = node_factory("--max-watch-topics", "1", "--watch-heartbeat-ms", "200")
    c = Client(n.address, timeout=5.0, zctx=zctx)
    events: list[tuple[str, str]] = []
    try:
        with c.watch("first", after=0) as w1, c.watch("second", after=0, on_event=lambda k, t: events.append((k, t))) as w2:
            assert not w1.limited and w2.limited
            assert [k for k, _ in events] == ["limited"]
            for i in range(5):
                c.append("first", f"f{i}")
                c.append("second", f"s{i}")
            assert [e.payload for e in collect(w1, 5)] == [f"f{i}".encode() for i in range(5)]
            # nothing live comes for it: it polls, and misses nothing
            assert [e.payload for e in collect(w2, 5)] == [f"s{i}".encode() for i in range(5)]
            st = c.call("status")
            assert (st["watched_contexts"], st["watch_topics_refused"], st["max_watch_topics"]) == (1, 1, 1)
    finally:
        c.close()


def test_a_watch_past_max_watchers_per_context_is_refused_alone_polls_and_a_leaver_frees_its_place(
        node_factory, zctx):
    n = node_factory("--max-watchers-per-context", "2", "--watch-heartbeat-ms", "200")
    c = Client(n.address, timeout=5.0, zctx=zctx)
    events: list[tuple[str, str]] = []
    try:
        with c.watch("crowd", after=0) as w1, c.watch("crowd", after=0) as w2, \
                c.watch("crowd", after=0, on_event=lambda k, t: events.append((k, t))) as w3:
            assert not w1.limited and not w2.limited and w3.limited
            assert [k for k, _ in events] == ["limited"]
            for i in range(20):
                c.append("crowd", f"e{i}")
            want = [f"e{i}".encode() for i in range(20)]
            for w in (w1, w2, w3):  # every entry once, in order: the first two live, the third by polling
                assert [e.payload for e in collect(w, 20)] == want
            assert (w1.refills, w2.refills) == (0, 0) and w3.refills > 0
            st = c.call("status")
            assert (st["max_watchers_per_context"], st["watchers_refused"]) == (2, 1)
            # the refused watch gave its place back
            wait_for(lambda: c.call("status")["watchers_by_context"].get("crowd") == 2, what="the unsubscription")
            w1.close()  # one leaves: the next is accepted and gets what follows live
            wait_for(lambda: c.call("status")["watchers_by_context"].get("crowd") == 1, what="w1's leaving")
            with c.watch("crowd", after=20) as w4:
                assert not w4.limited
                for i in range(20, 30):
                    c.append("crowd", f"e{i}")
                assert [e.payload for e in collect(w4, 10)] == [f"e{i}".encode() for i in range(20, 30)]
                assert w4.refills == 0
                assert [e.seq for e in collect(w3, 10)] == list(range(21, 31))
            assert c.call("status")["watchers_refused"] == 1
    finally:
        c.close()


@pytest.mark.parametrize("greeting, refused", [
    ("plain", False),  # accepted: a refusal heard later is another watcher's (SPEC 16.3)
    ("refusal topic", True),  # this revision: the refusal goes under topic || FF
    ("own topic", True),  # a node before it: the limited head under the context's topic
])
def test_only_the_answer_to_its_own_subscription_makes_a_watch_limited(node, zctx, greeting, refused):
    fake = zctx.socket(zmq.XPUB)  # the watch socket of a node the test plays, for the heads
    fake.setsockopt(zmq.LINGER, 0)
    fake.setsockopt(zmq.XPUB_VERBOSER, 1)
    port = fake.bind_to_random_port("tcp://127.0.0.1")
    t = watch.topic("told")
    empty = Ledger(MemoryKV(), node_id="fake", sync_meta=False).empty_root

    def head(limited: bool) -> bytes:
        return watch.encode_head("told", 0, 0, empty, "fake", "boot", 200, 1, limited=limited)

    def answer() -> None:
        assert fake.poll(10_000) and fake.recv() == b"\x01" + t
        if greeting == "plain":
            fake.send_multipart([t, head(False)])
            fake.send_multipart([watch.limited_topic("told"), head(True)])
            fake.send_multipart([t, head(True)])
        elif greeting == "refusal topic":
            fake.send_multipart([watch.limited_topic("told"), head(False)])
        else:
            fake.send_multipart([t, head(True)])

    th = threading.Thread(target=answer, daemon=True)
    th.start()
    events: list[str] = []
    try:
        with Client(node.address, timeout=5.0, zctx=zctx) as c, \
                c.watch("told", after=0, pub_address=f"tcp://127.0.0.1:{port}",
                        on_event=lambda k, _t: events.append(k)) as w:
            th.join(10)
            time.sleep(0.3)
            assert w.drain() == []
            assert w.limited is refused and events.count("limited") == int(refused)
            if refused:  # it gave its place back at once
                assert fake.poll(5000) and fake.recv() == b"\x00" + t
    finally:
        th.join(10)
        fake.close(linger=0)


def test_max_watchers_per_context_flag_is_checked():
    for bad in ("0", "-1", "x", "1000001"):
        with pytest.raises(ConfigError, match="--max-watchers-per-context"):
            parse_config(["--max-watchers-per-context", bad], {})
    assert parse_config([], {"LEDGER_MAX_WATCHERS_PER_CONTEXT": "7"}).max_watchers_per_context == 7
    assert parse_config([], {}).max_watchers_per_context == 1000


def test_load_bounds_are_flags_and_show_in_status(node_factory, zctx, tmp_path):
    src = Client(node_factory(name="src").address, timeout=5.0, zctx=zctx)
    c = Client(node_factory("--max-loads", "1", "--max-staged-bytes", "64K", name="dst").address,
               timeout=5.0, zctx=zctx)
    try:
        for _ in range(3):
            src.append("ctx", b"x" * 30_000)
        snap = tmp_path / "ctx.snap"
        with open(snap, "wb") as f:
            src.snapshot("ctx", f)
        entries = src.call("get", context="ctx", after=0)["entries"]
        base = {"context": "ctx", "size": 3, "root": src.head("ctx").root}
        assert c.call("load", retry=False, load_id="A", entries=entries[:1], **base)["done"] is False
        with pytest.raises(Unavailable):  # a second load at once
            c.call("load", retry=False, load_id="B", entries=entries[:1], **base)
        with pytest.raises(TooLarge):  # 3 x 30 KB do not fit in 64 KiB
            c.call("load", retry=False, load_id="A", entries=entries[1:3], final=True, **base)
        st = c.call("status")
        assert (st["loads_in_progress"], st["loads_refused"], st["max_loads"], st["max_staged_bytes"]) == (1, 2, 1, 64 << 10)
        assert 30_000 < st["loads_staged_bytes"] < 31_000
        c.call("load", retry=False, load_id="A", abort=True, **base)
        with open(snap, "rb") as f, pytest.raises(TooLarge):
            c.load("ctx", f)  # the reference client gets the same answer (and aborts its load)
        st = c.call("status")
        assert (st["loads_in_progress"], st["loads_staged_bytes"]) == (0, 0)
    finally:
        src.close()
        c.close()
