"""SPEC.md sentences an outside implementer tripped on (issue #18), each against a real node.

A JavaScript client written from the spec alone found places where two careful implementations
could differ; each is now one testable sentence, pinned here on the wire (raw DEALER sockets
where the reference client would hide the bytes)."""

from __future__ import annotations

import io
import re

import msgpack
import pytest
import zmq

from protocol import merkle
from protocol.address import parse_address
from protocol.client import Client
from protocol.errors import BadRequest, Conflict, Unavailable
from protocol.snapshot import read_snapshot

pytestmark = pytest.mark.timeout(120)


def dealer(zctx: zmq.Context, address: str) -> zmq.Socket:
    s = zctx.socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    s.setsockopt(zmq.RCVTIMEO, 5000)
    s.connect(address)
    return s


def roundtrip(s: zmq.Socket, *frames: bytes) -> list[bytes]:
    s.send_multipart(list(frames))
    return s.recv_multipart()


def test_a_badly_framed_request_gets_one_frame_with_a_nil_id(node, zctx):
    """4.1: whatever the frames before the body, the reply is one frame (no delimiter echoed),
    a BAD_REQUEST error whose `id` is nil even when the body names one."""
    s = dealer(zctx, node.address)
    body = msgpack.packb({"v": 1, "id": 7, "op": "ping"})
    try:
        for frames in ([b"", b"", body], [b"x", body], [b"", b"junk", body], [b"a", b"b", b"c"]):
            reply = roundtrip(s, *frames)
            assert len(reply) == 1, frames
            m = msgpack.unpackb(reply[0], raw=False)
            assert (m["v"], m["id"], m["ok"], m["error"]["code"]) == (1, None, False, "BAD_REQUEST")
        assert msgpack.unpackb(roundtrip(s, b"", body)[1], raw=False)["id"] == 7  # REQ framing: served
    finally:
        s.close(linger=0)


@pytest.mark.parametrize("rid, encoded", [
    (-5, b"\xfb"),  # negative fixint
    (-(2**63), b"\xd3\x80\x00\x00\x00\x00\x00\x00\x00"),  # int 64
    (2**64 - 1, b"\xcf\xff\xff\xff\xff\xff\xff\xff\xff"),  # uint 64
    (2**32, b"\xcf\x00\x00\x00\x01\x00\x00\x00\x00"),
])
def test_integer_ids_signed_and_unsigned_are_echoed_by_value(node, zctx, rid, encoded):
    """5.2: an integer id is any msgpack integer, -2^63..2^64-1; the reply carries the same value
    in the smallest msgpack encoding for it (an int 64 of 5 comes back as fixint 5)."""
    s = dealer(zctx, node.address)
    try:
        reply = roundtrip(s, msgpack.packb({"v": 1, "id": rid, "op": "ping"}))[0]
        assert msgpack.unpackb(reply, raw=False)["id"] == rid
        assert b"\xa2id" + encoded in reply
        wide = b"\x83\xa1v\x01\xa2op\xa4ping\xa2id\xd3" + (5).to_bytes(8, "big")  # int 64 holding 5
        reply = roundtrip(s, wide)[0]
        assert b"\xa2id\x05" in reply and msgpack.unpackb(reply, raw=False)["id"] == 5
    finally:
        s.close(linger=0)


def test_a_float_id_or_float_number_is_refused(node, zctx):
    """Notes for implementers: a u64 sent as a msgpack float is not an integer."""
    s = dealer(zctx, node.address)
    try:
        for body in ({"v": 1, "id": 1.0, "op": "ping"},
                     {"v": 1, "id": 3, "op": "get", "context": "c", "after": float(2**40)}):
            m = msgpack.unpackb(roundtrip(s, msgpack.packb(body))[0], raw=False)
            assert m["ok"] is False and m["error"]["code"] == "BAD_REQUEST"
    finally:
        s.close(linger=0)


@pytest.mark.parametrize("body", [
    {"v": 1, "id": 5, "op": "append", "context": "k", "payload": b"x", 1: "one"},
    {"v": 1, "id": 5, "op": "append", "context": "k", "payload": b"x", b"expect_seq": 99},
    {"v": 1, "id": 5, "op": "append_batch", "context": "k", "entries": [{b"payload": b"lost"}]},
    {"v": 1, "id": 5, "op": "append_batch", "context": "k", "entries": [{"payload": b"x", 2: 3}]},
])
def test_map_keys_that_are_not_strings_are_bad_request_and_change_nothing(node, zctx, body):
    """5.1: every key of a body map, and of an append_batch item, is a str: any other is
    BAD_REQUEST (a bin "expect_seq" would otherwise be ignored, the append done unchecked)."""
    s = dealer(zctx, node.address)
    try:
        m = msgpack.unpackb(roundtrip(s, msgpack.packb(body, use_bin_type=True))[0], raw=False)
        assert (m["id"], m["ok"], m["error"]["code"]) == (5, False, "BAD_REQUEST")
        assert "keys must be strings" in m["error"]["message"]
    finally:
        s.close(linger=0)
    with Client(node.address, zctx=zctx) as c:
        assert c.call("get", context="k")["last_seq"] == 0


def test_status_addresses_are_endpoints_and_others_are_host_port(node_factory, zctx):
    """6.6, 17.6: `router` and `pub` in status are ZeroMQ endpoints, tcp://host:port; `advertise`
    and every peer address are bare host:port of the 17.6 grammar."""
    n = node_factory("--advertise", "127.0.0.1:7999")
    with Client(n.address, zctx=zctx) as c:
        st = c.status()
    assert st["router"] == n.address and st["pub"] == n.pub
    for ep in (st["router"], st["pub"]):
        assert re.fullmatch(r"tcp://127\.0\.0\.1:[0-9]{1,5}", ep), ep
        parse_address(ep.removeprefix("tcp://"), "endpoint")
    assert st["advertise"] == "127.0.0.1:7999" and parse_address(st["advertise"], "advertise")
    assert "://" not in st["advertise"]


def test_next_after_when_more_is_false_is_the_larger_of_after_and_last_seq(client):
    """6.3: with `more` false, `next_after` = max(after, last_seq), with or without a key filter
    (a key-filtered watcher moves its `last` there, 16.4 step 5)."""
    for i in range(6):
        client.append("na", f"p{i}", key="odd" if i % 2 else "even")
    cases = [({}, 6), ({"key": "odd"}, 6), ({"key": "none"}, 6), ({"after": 4, "key": "even"}, 6),
             ({"after": 6}, 6), ({"after": 9}, 9), ({"after": 9, "key": "odd"}, 9)]
    for fields, next_after in cases:
        r = client.call("get", context="na", **fields)
        assert (r["more"], r["last_seq"], r["next_after"]) == (False, 6, next_after), fields
    r = client.call("get", context="absent", after=3)
    assert (r["more"], r["last_seq"], r["next_after"], r["entries"]) == (False, 0, 3, [])
    r = client.call("get", context="na", limit=2)
    assert (r["more"], r["next_after"]) == (True, 2)


def test_load_received_counts_entries_and_the_first_chunk_starts_at_seq_1(node_factory, zctx):
    """6.9: `received` is the entries the load holds so far; a chunk of an unknown load_id that
    does not start at seq 1 is BAD_REQUEST (an unknown load), not INTEGRITY."""
    src, dst = node_factory(name="src"), node_factory(name="dst")
    with Client(src.address, zctx=zctx) as a, Client(dst.address, zctx=zctx) as b:
        a.append_batch("ld", [f"e{i}" for i in range(6)])
        entries = a.call("get", context="ld")["entries"]
        base = {"context": "ld", "size": 6, "root": a.head("ld").root}
        with pytest.raises(BadRequest, match="unknown"):
            b.call("load", retry=False, load_id="L", entries=entries[2:4], **base)
        r = b.call("load", retry=False, load_id="L", entries=entries[:2], **base)
        assert (r["done"], r["received"]) == (False, 2)
        r = b.call("load", retry=False, load_id="L", entries=entries[2:5], **base)
        assert (r["done"], r["received"]) == (False, 5)
        r = b.call("load", retry=False, load_id="L", entries=entries[5:], final=True, **base)
        assert (r["done"], r["size"], r["writer"]) == (True, 6, src.node_id)


def test_load_of_an_older_snapshot_is_harmless_and_a_snapshot_of_another_writer_stays_its(node_factory, zctx):
    """6.9: loading an older, shorter snapshot of the same history changes nothing and answers
    the context's head; the loaded context is written by the writer its entries name."""
    src, dst = node_factory(name="src"), node_factory(name="dst")
    with Client(src.address, zctx=zctx) as a, Client(dst.address, zctx=zctx) as b:
        a.append_batch("old", [f"e{i}" for i in range(4)])
        small = io.BytesIO()
        a.snapshot("old", small)
        a.append_batch("old", [f"f{i}" for i in range(4)])
        big = io.BytesIO()
        a.snapshot("old", big)
        h = b.load("old", io.BytesIO(big.getvalue()))
        assert (h.size, h.writer) == (8, src.node_id)
        again = b.load("old", io.BytesIO(small.getvalue()))
        assert (again.size, again.root) == (8, h.root)
        assert b.verify_context("old")["ok"]
        small_again = io.BytesIO()
        b.snapshot("old", small_again, size=4)  # a loaded context's entries re-check on reads
        mine, theirs = (read_snapshot(io.BytesIO(f.getvalue())) for f in (small_again, small))
        assert mine[0]["root"] == theirs[0]["root"] and list(mine[1]) == list(theirs[1])


def test_load_of_another_writers_snapshot_refuses_appends_and_empty_snapshots_create_a_context(node_factory, zctx):
    """6.9: appends to a context loaded from another writer's snapshot go to that writer (here
    unknown: UNAVAILABLE); an empty snapshot creates an empty context of the loading node."""
    src, dst = node_factory(name="src"), node_factory(name="dst")
    with Client(src.address, zctx=zctx) as a, Client(dst.address, zctx=zctx) as b:
        a.append_batch("w", ["one", "two"])
        buf = io.BytesIO()
        a.snapshot("w", buf)
        assert b.load("w", io.BytesIO(buf.getvalue())).writer == src.node_id
        with pytest.raises(Unavailable) as info:
            b.call("append", retry=False, context="w", payload=b"x")
        assert info.value.details["writer"] == src.node_id
        assert b.head("w").size == 2
        r = b.call("load", retry=False, context="e", load_id="E", size=0, root=merkle.EMPTY_ROOT, final=True)
        assert (r["done"], r["size"], r["writer"]) == (True, 0, dst.node_id)
        assert b.append("e", "first").seq == 1


def test_conflict_for_another_cluster_carries_cluster(node, zctx):
    """11: CONFLICT's extras include `cluster` (a heartbeat from another mesh)."""
    s = dealer(zctx, node.address)
    try:
        hb = {"v": 1, "id": 1, "op": "heartbeat", "node_id": "stranger", "cluster": "elsewhere",
              "address": "127.0.0.1:9", "pub": "127.0.0.1:10", "boot": "b", "lamport": 1, "entries": 0,
              "peers": [], "digest": bytes(1024)}
        m = msgpack.unpackb(roundtrip(s, msgpack.packb(hb, use_bin_type=True))[0], raw=False)
        assert m["error"]["code"] == "CONFLICT" and m["error"]["cluster"] == "ledger"
    finally:
        s.close(linger=0)
    with Client(node.address, zctx=zctx) as c, pytest.raises(Conflict):
        c.call("append", context="x", payload=b"a", expect_seq=5)


def test_nil_id_replies_come_in_request_order_among_pipelined_replies(node, zctx):
    """5.2: a reply with a nil id answers the oldest outstanding request (no held appends here)."""
    s = dealer(zctx, node.address)
    try:
        s.send(msgpack.packb({"v": 1, "id": 1, "op": "ping"}))
        s.send(b"\x93\x01\x02\x03")  # not a map: nil id
        s.send(msgpack.packb({"v": 1, "id": 2.5, "op": "ping"}))  # a bad id: nil id
        s.send(msgpack.packb({"v": 1, "id": 3, "op": "append", "context": "o", "payload": b"x"}))
        s.send_multipart([b"x", b"y"])  # badly framed: nil id
        s.send(msgpack.packb({"v": 1, "id": 4, "op": "ping"}))
        ids = [msgpack.unpackb(s.recv(), raw=False)["id"] for _ in range(6)]
        assert ids == [1, None, None, 3, None, 4]
    finally:
        s.close(linger=0)


def test_proto_metadata_keys_and_utf8_byte_order(client):
    """14.1: `__proto__` is a legal metadata key, kept and hashed like any other; context names
    page by UTF-8 bytes (U+1F642 after U+FF5E, unlike a UTF-16 sort)."""
    e = client.append("\uff5e", b"p", metadata={"__proto__": "x", "constructor": "y"})
    e.verify()
    assert e.metadata == {"__proto__": "x", "constructor": "y"}
    (got,) = client.get("\uff5e").entries
    assert got.hash == e.hash and got.metadata == e.metadata
    client.append("\U0001f642", b"q")
    names = [c["name"] for c in client.contexts()]
    assert names == sorted(names, key=str.encode) == ["\uff5e", "\U0001f642"]
    assert sorted(names, key=lambda n: n.encode("utf-16-be")) != names  # what a UTF-16 sort would give
