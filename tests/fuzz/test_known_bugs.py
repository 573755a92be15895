"""The bugs the fuzz suite found and does not generate yet: one minimal reproduction each.

Each is marked xfail(strict): when a fix lands its test passes, the strict mark
turns that into a failure, and whoever fixed it removes the mark here and widens
the matching constant in tests/fuzz/gen.py so the fuzzer covers it from then on.
"""

from __future__ import annotations

import time

import pytest
import zmq

from node.config import Config
from node.ledger import Ledger
from node.server import Server
from node.storage import MemoryKV
from protocol import codec, watch
from protocol.digest import NBUCKETS

pytestmark = pytest.mark.timeout(60)


def server_and_replies(zctx: zmq.Context) -> tuple[Server, list[list[bytes]]]:
    cfg = Config(node_id="kb", data=":memory:", host="127.0.0.1", port=0, pub_port=0, durability="async",
                 flush_ms=5, max_payload=1 << 20, hot_bytes=8 << 20, log_level="info")
    server = Server(cfg, Ledger(MemoryKV(), node_id="kb", sync_meta=False), zctx=zctx)
    out: list[list[bytes]] = []
    server._send = out.append  # type: ignore[method-assign]
    return server, out


def ask(server: Server, out: list[list[bytes]], op: str, **fields: object) -> dict:
    server.handle([b"c", codec.encode_request(op, 1, fields)])
    return codec.decode_reply(out[-1][-1])


def close(server: Server) -> None:
    for s in (server.router, server.pub, server._wake_rx, server.flusher._wake, server.peer_sub,
              *server.peer_socks.values()):
        s.close(linger=0)


@pytest.mark.xfail(strict=True, reason="Lamport ceiling (issue #12, the lead): then widen gen.LAMPORT_SAFE_MAX")
@pytest.mark.parametrize("op, fields", [
    ("append", {"context": "c", "payload": b"x", "after_lamport": (1 << 64) - 2}),
    ("heartbeat", {"node_id": "p", "address": "127.0.0.1:1", "lamport": (1 << 64) - 1}),
])
def test_a_lamport_near_2_64_does_not_poison_later_appends(zctx, op, fields):
    server, out = server_and_replies(zctx)
    try:
        ask(server, out, op, **fields)
        r = ask(server, out, "append", context="c", payload=b"y")
        assert r["ok"] or r["error"]["code"] != "INTERNAL", r
    finally:
        close(server)


@pytest.mark.xfail(strict=True, reason="peer address validation (issue #12, mesh input): then set "
                   "gen.PEER_ADDRESSES_SAFE = False")
def test_a_heartbeat_with_a_bad_address_does_not_break_the_mesh_tick():
    zctx = zmq.Context()  # destroyed below: the failed connect leaks its socket
    server, out = server_and_replies(zctx)
    try:
        r = ask(server, out, "heartbeat", node_id="p", address="garbage")
        server.mesh.tick(time.monotonic() + 1)  # in the node's loop, this ZMQError ends the process
        assert r["ok"] or r["error"]["code"] == "BAD_REQUEST", r
    finally:
        close(server)
        zctx.destroy(linger=0)


@pytest.mark.xfail(strict=True, reason="Mesh.on_reply must check that `error` is a map: then set "
                   "gen.REPLY_ERRORS_ARE_MAPS = False")
def test_a_failed_peer_reply_whose_error_is_not_a_map_is_ignored(zctx):
    server, out = server_and_replies(zctx)
    try:
        mesh = server.mesh
        mesh.transport = type("T", (), {"request": lambda *a: 7, "subscribe": lambda *a: None,
                                        "unsubscribe": lambda *a: None})()
        ask(server, out, "heartbeat", node_id="p", address="127.0.0.1:1", digest=b"\x01" * 8 * NBUCKETS)
        assert mesh.pending, "the heartbeat's digest should have started a sync_heads"
        rid = next(iter(mesh.pending))
        mesh.on_reply("127.0.0.1:1", {"v": 1, "id": rid, "ok": False, "error": 2}, time.monotonic())
    finally:
        close(server)


@pytest.mark.xfail(strict=True, reason="libzmq aborts on SUB disconnect mid-message (zeromq/libzmq#2163): then "
                   "set gen.LIVE_PUB_STABLE = False")
def test_a_peer_changing_its_id_while_its_pub_streams_does_not_abort_the_node(node_factory, zctx):
    node = node_factory("--id", "kb", "--heartbeat-ms", "50")
    pub = zctx.socket(zmq.PUB)
    pub.setsockopt(zmq.LINGER, 0)
    port = pub.bind_to_random_port("tcp://127.0.0.1")
    d = zctx.socket(zmq.DEALER)
    d.setsockopt(zmq.LINGER, 0)
    d.connect(node.address)
    try:
        for i in range(400):
            # the same address and pub, another node id each time: the node unsubscribes and subscribes
            d.send(codec.encode_request("heartbeat", i, {"node_id": f"peer{i % 2}", "address": "127.0.0.1:1",
                                                          "pub": f"127.0.0.1:{port}", "boot": "b"}))
            for _ in range(20):
                pub.send_multipart([watch.repl_topic("c"), b"x"])  # any two-frame message
            if not d.poll(3000):
                break
            d.recv_multipart()
        assert node.proc.poll() is None, node.output()[-500:]
    finally:
        d.close(linger=0)
        pub.close(linger=0)
