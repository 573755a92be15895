"""protocol.codec: every op parses, every bad input is a RemoteProtocolError with the right code.

The decoder's contract (as in h11): untrusted bytes either decode or raise
RemoteProtocolError; any other exception is a bug. The fuzz tests at the end
feed it random bytes, random msgpack values, random request-shaped maps and
mutated valid requests.
"""

from __future__ import annotations

from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protocol import codec
from protocol.entry import Entry, leaf_hash
from protocol.errors import (
    ALL_CODES,
    BAD_REQUEST,
    TOO_LARGE,
    UNKNOWN_OP,
    UNSUPPORTED_VERSION,
    RemoteProtocolError,
)

pytestmark = pytest.mark.timeout(60)

FUZZ = settings(max_examples=300, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])

MAX = 1024  # max_payload for these tests
ROOT = bytes(range(32))


def pack(m: Any) -> bytes:
    return msgpack.packb(m, use_bin_type=True)


def req(op: str, rid: codec.RequestId = 1, **fields: Any) -> bytes:
    return codec.encode_request(op, rid, fields)


def decode(frame: bytes, max_payload: int = MAX) -> codec.Envelope:
    return codec.decode_request(frame, max_payload)


def expect(frame: bytes, code: str = BAD_REQUEST, max_payload: int = MAX) -> RemoteProtocolError:
    with pytest.raises(RemoteProtocolError) as info:
        codec.decode_request(frame, max_payload)
    assert info.value.code == code, info.value.message
    return info.value


def make_entry(seq: int, context: str = "ctx") -> Entry:
    f = dict(context=context, seq=seq, key="facts", payload=b"p%d" % seq, metadata={"m": "v"}, lamport=seq,
             ts_ns=1000 + seq, writer="n1")
    return Entry(**f, hash=leaf_hash(**f))


# -- every op parses ---------------------------------------------------------------


def test_append_parses_with_every_field():
    env = decode(req("append", rid="r-1", context="c1", key="facts", payload=b"hello", metadata={"a": "b"},
                     dedup_id=b"d1", expect_seq=4, after_lamport=99))
    assert env.id == "r-1" and env.op == "append"
    assert env.request == codec.Append("c1", "facts", b"hello", {"a": "b"}, b"d1", 4, 99)


def test_append_minimal_and_defaults():
    assert decode(req("append", context="c1", payload=b"x")).request == codec.Append("c1", "", b"x", {})
    # no payload at all is an empty payload; a string payload is its UTF-8
    assert decode(req("append", context="c1")).request.payload == b""
    assert decode(req("append", context="c1", payload="héllo")).request.payload == "héllo".encode()
    assert decode(req("append", context="c1", payload=None, key=None, metadata=None)).request == codec.Append(
        "c1", "", b"", {}
    )
    # a string dedup_id is its UTF-8
    assert decode(req("append", context="c1", dedup_id="dé")).request.dedup_id == "dé".encode()


def test_append_fast_and_slow_paths_agree():
    plain = decode(req("append", context="c1", key="k", payload=b"x")).request
    via_slow = decode(req("append", context="c1", key="k", payload=b"x", metadata={}, expect_seq=None)).request
    unicode_ctx = decode(req("append", context="cé", key="k", payload=b"x")).request
    assert plain == via_slow == codec.Append("c1", "k", b"x", {})
    assert unicode_ctx == codec.Append("cé", "k", b"x", {})


def test_append_batch_parses():
    env = decode(req("append_batch", context="c1",
                     entries=[{"key": "a", "payload": b"1"}, {"payload": b"2", "metadata": {"x": "y"}}, {}],
                     dedup_id="d", expect_seq=0, after_lamport=5))
    assert env.request == codec.AppendBatch(
        "c1",
        (codec.BatchItem("a", b"1", {}), codec.BatchItem("", b"2", {"x": "y"}), codec.BatchItem("", b"", {})),
        b"d", 0, 5,
    )
    assert env.request.payload_bytes == 2  # summed while decoding, for the batch size check


def test_get_parses_with_defaults_and_fields():
    assert decode(req("get", context="c")).request == codec.Get("c", None, 0, codec.DEFAULT_GET_LIMIT)
    assert decode(req("get", context="c", key="facts", after=10, limit=5)).request == codec.Get("c", "facts", 10, 5)
    assert decode(req("get", context="c", key="")).request.key == ""
    assert decode(req("get", context="c", limit=codec.MAX_GET_LIMIT)).request.limit == codec.MAX_GET_LIMIT


def test_the_other_ops_parse():
    assert decode(req("head", context="c")).request == codec.Head("c")
    assert decode(req("contexts")).request == codec.Contexts(None, 1000)
    assert decode(req("contexts", after="b", limit=3)).request == codec.Contexts("b", 3)
    assert decode(req("status")).request == codec.Status()
    assert decode(req("ping", rid=None)).request == codec.Ping()
    assert decode(req("snapshot", context="c")).request == codec.Snapshot("c", None, 0, codec.DEFAULT_GET_LIMIT)
    assert decode(req("snapshot", context="c", size=10, after=3, limit=2)).request == codec.Snapshot("c", 10, 3, 2)
    assert decode(req("proof", context="c", seq=3)).request == codec.Proof("c", 3, None)
    assert decode(req("proof", context="c", seq=3, size=9)).request == codec.Proof("c", 3, 9)
    assert decode(req("consistency", context="c", first=0)).request == codec.Consistency("c", 0, None)
    assert decode(req("consistency", context="c", first=2, second=5)).request == codec.Consistency("c", 2, 5)


def test_load_parses_entries():
    es = [make_entry(1), make_entry(2)]
    env = decode(req("load", context="ctx", load_id="L1", size=2, root=ROOT, entries=[e.to_wire() for e in es],
                     final=True, fail_if_exists=True))
    assert env.request == codec.Load("ctx", "L1", 2, ROOT, tuple(es), True, True)
    assert decode(req("load", context="ctx", load_id="L1", size=0, root=ROOT)).request.entries == ()


def test_mesh_ops_parse_and_reject_bad_fields():
    hb = decode(req("heartbeat", node_id="n1", address="127.0.0.1:7400", pub="127.0.0.1:7401", boot="b",
                    lamport=5, entries=9, peers=[["n2", "127.0.0.1:7500"]], digest=b"\x00" * 16)).request
    assert hb == codec.Heartbeat("n1", "127.0.0.1:7400", "127.0.0.1:7401", "b", 5, 9,
                                 (("n2", "127.0.0.1:7500"),), b"\x00" * 16)
    assert decode(req("sync_heads", buckets=[0, 3], nbuckets=8)).request == codec.SyncHeads((0, 3), 8, None)
    assert decode(req("sync_digest", buckets=[127, 0])).request == codec.SyncDigest((127, 0))
    assert decode(req("snapshots", chunks=[["a", 0, 10], ["b", 5, 6]])).request == codec.Snapshots(
        (codec.Snapshot("a", 10, 0, 10), codec.Snapshot("b", 6, 5, 1)), True)
    assert not decode(req("snapshots", chunks=[["a", 0, 1]], signed=False)).request.signed
    assert decode(req("snapshots", chunks=[["a", 0, 1]], packed=True)).request.packed
    assert not decode(req("snapshots", chunks=[["a", 0, 1]])).request.packed  # (maps unless asked)
    assert decode(req("snapshot", context="a", packed=True)).request == codec.Snapshot("a", None, 0, codec.DEFAULT_GET_LIMIT, True)
    assert decode(req("ack", node_id="n", acks=[["c", 3]])).request == codec.Ack("n", (("c", 3),))
    assert decode(req("append", context="c", payload=b"x", replicas=2)).request.replicas == 2
    for bad in (
        req("heartbeat", address="a:1"),  # no node_id
        req("heartbeat", node_id="n1", address="a:1", peers=[["n2"]]),
        req("heartbeat", node_id="n1", address="a:1", peers=[["n2", "x"]] * 1001),
        req("heartbeat", node_id="n1", address="a:1", digest="text"),
        req("heartbeat", node_id="n1", address="a:1", lamport=-1),
        req("sync_heads", buckets=[8], nbuckets=8),
        req("sync_heads", buckets=[0], nbuckets=0),
        req("sync_heads", buckets="all", nbuckets=8),
        req("sync_digest", buckets=[]),  # nothing to ask for
        req("sync_digest", buckets=[128]),  # not a top bucket
        req("sync_digest", buckets=[-1]),
        req("sync_digest", buckets=[3, 3]),  # twice: twice the reply for nothing
        req("sync_digest", buckets=list(range(codec.MAX_DIGEST_BUCKETS + 1))),
        req("sync_digest", buckets=[1.0]),
        req("snapshots", chunks=[]),
        req("snapshots", chunks=[["a", 0, 1]] * 2),  # a context twice
        req("snapshots", chunks=[[f"c{i}", 0, 1] for i in range(codec.MAX_PULL_CHUNKS + 1)]),
        req("snapshots", chunks=[["a", 5, 5]]),  # nothing asked
        req("snapshots", chunks=[["a", -1, 5]]),
        req("snapshots", chunks=[["a", 0, 2**64 - 1]]),  # below 2^64, as every u64
        req("snapshots", chunks=[["a", 0]]),
        req("snapshots", chunks=[["", 0, 1]]),
        req("snapshots", chunks=[["a", 0, 6000], ["b", 0, 6000]]),  # past MAX_PULL_ENTRIES together
        req("snapshots", chunks=[["a", 0, 1]], signed="yes"),
        req("snapshots", chunks=[["a", 0, 1]], packed=1),
        req("snapshots", chunks=[["a", 0, 1]], packed=None),
        req("snapshot", context="a", packed="true"),
        req("ack", node_id="n", acks=[["c"]]),
        req("ack", node_id="n", acks=[["c", -1]]),
        req("append", context="c", replicas=65),
        req("append", context="c", replicas="2"),
    ):
        with pytest.raises(RemoteProtocolError):
            decode(bad)


@pytest.mark.parametrize("n", [0, 1, 255, 256, 65535, 65536, 70000])
def test_packed_entries_are_one_bin_each_in_the_shortest_header(n):
    blobs = [b"x" * n, b"", b"y" * (n // 2)]
    out = codec.packed_array(blobs)
    assert msgpack.unpackb(out) == blobs
    assert out == msgpack.packb(blobs, use_bin_type=True)  # (what any msgpack library writes)
    assert codec.packed_array([]) == b"\x90"


def test_packed_entries_are_decoded_for_the_python_path_and_junk_is_a_bad_reply():
    e = make_entry(1)
    assert codec.unpack_entries([e.encode(), e.to_wire()]) == [e.to_wire(), e.to_wire()]  # (maps as they are)
    assert codec.parse_chunk_reply({"entries": [e.encode()], "root": ROOT}).entries == (e,)
    for junk in (b"", b"\xc1", e.encode()[:-1], e.encode() + b"\x00", b"\xa1x\xa1y"):
        with pytest.raises(RemoteProtocolError, match=r"entries\[1\]: a packed entry that is not one msgpack value"):
            codec.unpack_entries([e.encode(), junk])
    with pytest.raises(RemoteProtocolError, match="an entry must be a map"):
        codec.parse_chunk_reply({"entries": [msgpack.packb([1, 2])], "root": ROOT})


def test_every_op_is_covered():
    covered = {"append", "append_batch", "get", "head", "contexts", "status", "ping", "snapshot", "load", "proof",
               "consistency", "heartbeat", "sync_heads", "sync_digest", "snapshots", "ack"}
    assert set(codec.OPS) == covered


def test_unknown_fields_are_ignored():
    assert decode(req("head", context="c", future_field=[1, {"x": 2}])).request == codec.Head("c")


@pytest.mark.parametrize("rid", [None, 0, -1, 2**64 - 1, -(2**63), "", "x" * 64, b"", b"\x00" * 64, "ïd"])
def test_valid_ids_are_echoed(rid):
    env = decode(req("ping", rid=rid))
    assert env.id == rid
    assert codec.peek_id(codec.unpack_request(req("ping", rid=rid))) == rid


# -- framing and envelope errors -------------------------------------------------------


@pytest.mark.parametrize("frame", [b"", b"\xc1", b"\x81", b"\x82\xa1v\x01", b"\xdf\xff\xff\xff\xff", b"\x92\x01",
                                   b"\xd9\x05ab", b"\xff" * 40, b"\x81\xa1v\x01\x00extra"])
def test_garbage_bytes(frame):
    expect(frame)


@pytest.mark.parametrize("value", [[1, 2], "a string", 5, None, True, b"bin", 1.5])
def test_non_map_request(value):
    err = expect(pack(value))
    assert "map" in err.message


def test_large_junk_is_refused_at_its_first_byte_without_decoding(monkeypatch):
    junk = b"\x05" + bytes(codec.CHECK_FIRST_BYTE_FROM)  # an int, then junk: msgpack would copy it all
    calls = []
    monkeypatch.setattr(codec.msgpack, "unpackb", lambda *a, **k: calls.append(a))
    for frame in (junk, memoryview(junk)):
        err = expect(frame)
        assert "map" in err.message and "0x05" in err.message
    assert calls == []


def test_large_requests_decode_from_a_buffer_and_small_junk_as_before():
    req = pack({"v": 1, "id": 7, "op": "append", "context": "c", "payload": bytes(1 << 20)})
    env = codec.decode_request(memoryview(req), 4 << 20)
    assert env.id == 7 and env.request.payload == bytes(1 << 20)
    small = b"\x05" + bytes(100)  # under the threshold: decoded, refused by msgpack
    assert "ExtraData" in expect(small).message


def test_protocol_version():
    for v in (2, 0, -1, 2**32):
        err = expect(pack({"v": v, "id": 1, "op": "ping"}), UNSUPPORTED_VERSION)
        assert err.details == {"supported": [1]}
    for v in (None, "1", 1.0, True, [1]):
        expect(pack({"v": v, "id": 1, "op": "ping"}))
    expect(pack({"id": 1, "op": "ping"}))  # missing v


def test_unknown_and_missing_op():
    err = expect(req("frobnicate"), UNKNOWN_OP)
    assert set(err.details["ops"]) == set(codec.OPS)
    expect(req("APPEND"), UNKNOWN_OP)
    expect(req(""), UNKNOWN_OP)
    expect(pack({"v": 1, "id": 1}))  # missing op
    expect(pack({"v": 1, "id": 1, "op": 5}))
    expect(pack({"v": 1, "id": 1, "op": b"append"}))


@pytest.mark.parametrize("rid", [1.5, [1], {"a": 1}, True, "x" * 65, b"\x00" * 65])
def test_bad_id_types(rid):
    expect(pack({"v": 1, "id": rid, "op": "ping"}))
    assert codec.peek_id({"v": 1, "id": rid}) is None


def test_ids_out_of_64_bit_range_and_invalid_utf8():
    for rid in (2**64, -(2**63) - 1):
        with pytest.raises(RemoteProtocolError) as info:
            codec.parse_request({"v": 1, "id": rid, "op": "ping"}, MAX)
        assert info.value.code == BAD_REQUEST
    frame = pack({"v": 1, "id": "IDID", "op": "ping"}).replace(b"\xa4IDID", b"\xa4\xff\xfe\x80I")
    expect(frame)
    assert codec.peek_id(codec.unpack_request(frame)) is None


def test_peek_id_of_non_maps_is_none():
    for m in (None, [1], "x", 3):
        assert codec.peek_id(m) is None


# -- field validation ------------------------------------------------------------------

CONTEXT_OPS = ["append", "get", "head", "snapshot", "proof", "consistency"]
EXTRA = {"proof": {"seq": 1}, "consistency": {"first": 0}}


@pytest.mark.parametrize("op", CONTEXT_OPS + ["append_batch", "load"])
def test_missing_context(op):
    fields = dict(EXTRA.get(op, {}))
    if op == "append_batch":
        fields["entries"] = [{}]
    if op == "load":
        fields.update(load_id="L", size=0, root=ROOT)
    err = expect(req(op, **fields))
    assert "context" in err.message


@pytest.mark.parametrize("op", CONTEXT_OPS)
@pytest.mark.parametrize("context", ["", "x" * 257, "é" * 129, 5, b"ctx", ["c"], None, True])
def test_bad_context(op, context):
    fields = dict(EXTRA.get(op, {}), context=context)
    expect(req(op, **fields))


@pytest.mark.parametrize("op", CONTEXT_OPS)
def test_context_length_is_counted_in_utf8_bytes(op):
    fields = dict(EXTRA.get(op, {}))
    assert decode(req(op, context="x" * 256, **fields)).request.context == "x" * 256
    assert decode(req(op, context="é" * 128, **fields)).request.context == "é" * 128  # 256 bytes
    expect(req(op, context="x" * 255 + "é", **fields))  # 257 bytes, 256 characters


@pytest.mark.parametrize("op", CONTEXT_OPS)
def test_non_utf8_context(op):
    # msgpack str whose bytes are not UTF-8: built by hand, no encoder produces it
    good = req(op, context="CTXT", **EXTRA.get(op, {}))
    frame = good.replace(b"\xa4CTXT", b"\xa4C\xff\xfeT")
    assert frame != good
    err = expect(frame)
    assert "UTF-8" in err.message


@pytest.mark.parametrize("op", ["get", "snapshot", "contexts"])
@pytest.mark.parametrize("limit", [0, -1, 10_001, 2**63, 2**64 - 1, -(2**63), "10", 1.0, True, [5]])
def test_bad_limit(op, limit):
    expect(req(op, context="c", limit=limit))


@pytest.mark.parametrize("field", ["after", "expect_seq", "after_lamport"])
@pytest.mark.parametrize("value", [-1, "5", 1.5, True, [1], b"1", -(2**63)])
def test_bad_unsigned_fields(field, value):
    op = "get" if field == "after" else "append"
    expect(req(op, context="c", **{field: value}))


@pytest.mark.parametrize("op, fields", [
    ("snapshot", {"size": -1}), ("snapshot", {"after": "x"}), ("proof", {"seq": 0}), ("proof", {"seq": -3}),
    ("proof", {}), ("proof", {"seq": "1"}), ("proof", {"seq": 1, "size": -1}), ("consistency", {}),
    ("consistency", {"first": -1}), ("consistency", {"first": 1, "second": "2"}), ("contexts", {"after": ""}),
    ("contexts", {"after": 5}), ("contexts", {"after": "x" * 257}),
])
def test_bad_op_specific_fields(op, fields):
    expect(req(op, context="c", **fields))


def test_payload_over_max_is_too_large():
    assert decode(req("append", context="c", payload=b"x" * MAX)).request.payload == b"x" * MAX
    err = expect(req("append", context="c", payload=b"x" * (MAX + 1)), TOO_LARGE)
    assert err.details == {"limit": MAX}
    # a string payload is measured in UTF-8 bytes
    assert len(decode(req("append", context="c", payload="é" * (MAX // 2))).request.payload) == MAX
    expect(req("append", context="c", payload="é" * (MAX // 2 + 1)), TOO_LARGE)
    # the limit is the caller's
    expect(req("append", context="c", payload=b"x" * 11), TOO_LARGE, max_payload=10)


def test_batch_item_payload_over_max_is_too_large_and_names_the_item():
    err = expect(req("append_batch", context="c", entries=[{"payload": b"ok"}, {"payload": b"x" * (MAX + 1)}]),
                 TOO_LARGE)
    assert "entries[1]" in err.message and err.details == {"limit": MAX}


@pytest.mark.parametrize("payload", [5, 1.5, [b"x"], {"a": b"b"}, True])
def test_bad_payload_type(payload):
    expect(req("append", context="c", payload=payload))
    expect(req("append_batch", context="c", entries=[{"payload": payload}]))


def test_non_utf8_string_payload():
    frame = req("append", context="c", payload="PAYL").replace(b"\xa4PAYL", b"\xa4P\xffYL")
    expect(frame)


BAD_METADATA = [
    [("a", "b")], "a=b", 5, b"meta", {"a": 1}, {"a": None}, {"a": b"b"}, {1: "a"}, {b"a": "b"}, {"": "v"},
    {"k" * 257: "v"}, {"k": "v" * 4097}, {f"k{i}": "v" for i in range(65)},
]


@pytest.mark.parametrize("metadata", BAD_METADATA, ids=[str(i) for i in range(len(BAD_METADATA))])
def test_bad_metadata(metadata):
    expect(req("append", context="c", metadata=metadata))
    expect(req("append_batch", context="c", entries=[{"metadata": metadata}]))


def test_metadata_limits_are_inclusive():
    md = {f"k{i:03d}" + "x" * 252: "v" * 4096 for i in range(64)}
    assert decode(req("append", context="c", metadata=md)).request.metadata == md
    assert decode(req("append", context="c", metadata={"k": ""})).request.metadata == {"k": ""}


def test_non_utf8_metadata_key():
    frame = req("append", context="c", metadata={"MKEY": "v"}).replace(b"\xa4MKEY", b"\xa4MK\xc3\x28")
    expect(frame)


@pytest.mark.parametrize("dedup", ["", b"", "d" * 129, b"d" * 129, 5, [b"d"], 1.5, True])
def test_bad_dedup_id(dedup):
    expect(req("append", context="c", dedup_id=dedup))
    expect(req("append_batch", context="c", entries=[{}], dedup_id=dedup))


def test_dedup_id_limits():
    assert decode(req("append", context="c", dedup_id=b"d" * 128)).request.dedup_id == b"d" * 128
    frame = req("append", context="c", dedup_id="DDUP").replace(b"\xa4DDUP", b"\xa4D\xffUP")
    expect(frame)


@pytest.mark.parametrize("key", [5, b"k", "k" * 257, ["k"]])
def test_bad_key(key):
    expect(req("append", context="c", key=key))
    expect(req("get", context="c", key=key))
    expect(req("append_batch", context="c", entries=[{"key": key}]))


@pytest.mark.parametrize("entries", [None, [], {}, "e", [1], [None], [[]], [{"payload": 5}]])
def test_bad_batch_entries(entries):
    expect(req("append_batch", context="c", entries=entries))


def test_batch_too_many_entries_is_too_large():
    expect(req("append_batch", context="c", entries=[{}] * (codec.MAX_BATCH + 1)), TOO_LARGE)


LOAD_OK = dict(context="ctx", load_id="L1", size=1, root=ROOT)


@pytest.mark.parametrize("change", [
    {"load_id": None}, {"load_id": ""}, {"load_id": "x" * 65}, {"load_id": 5}, {"load_id": b"L"},
    {"load_id": "é" * 33},  # 33 characters but 66 bytes of UTF-8
    {"size": None}, {"size": -1}, {"size": "1"},
    {"root": None}, {"root": ROOT[:31]}, {"root": ROOT + b"\x00"}, {"root": ROOT.hex()},
    {"entries": "x"}, {"entries": {"a": 1}}, {"entries": [{"context": "ctx"}]}, {"entries": [5]},
    {"final": "yes"}, {"final": 1}, {"fail_if_exists": 0},
])
def test_bad_load_fields(change):
    fields = {k: v for k, v in dict(LOAD_OK, **change).items() if v is not None}
    expect(req("load", **fields))


def test_bad_load_entry_names_its_index():
    bad = make_entry(2).to_wire()
    bad["seq"] = 0
    err = expect(req("load", **LOAD_OK, entries=[make_entry(1).to_wire(), bad]))
    assert "entries[1]" in err.message


# -- replies ---------------------------------------------------------------------------


def unpack(frame: bytes) -> Any:
    return msgpack.unpackb(frame, raw=False, strict_map_key=False)


def test_encode_reply_with_spliced_entries():
    es = [make_entry(i) for i in range(1, 4)]
    frame = codec.encode_reply(7, {"size": 3, "root": ROOT, "more": False},
                               {"entries": [e.encode() for e in es], "entry": es[0].encode()})
    m = unpack(frame)
    assert m == {"v": 1, "ok": True, "id": 7, "size": 3, "root": ROOT, "more": False,
                 "entries": [e.to_wire() for e in es], "entry": es[0].to_wire()}
    assert codec.decode_reply(frame) == m


@pytest.mark.parametrize("count", [0, 1, 15, 16, 65535, 65536])
def test_encode_reply_array_and_map_headers_of_every_width(count):
    items = [codec._pack(i % 100) for i in range(count)]
    fields = {f"f{i}": i for i in range(count % 20)}
    m = unpack(codec.encode_reply("id", fields, {"items": items}))
    assert m["items"] == [i % 100 for i in range(count)]
    assert m == {"v": 1, "ok": True, "id": "id", **fields, "items": m["items"]}
    assert len(m) == 4 + len(fields)


def test_encode_reply_without_raw_and_with_every_id_kind():
    for rid in (None, 0, 2**64 - 1, -5, "x", b"\x00\xff"):
        assert unpack(codec.encode_reply(rid, {"pong": True})) == {"v": 1, "ok": True, "id": rid, "pong": True}


def test_encode_entry_reply_is_the_general_reply_specialised():
    blob = make_entry(1).encode()
    for rid in (None, 1, "r", b"r"):
        assert codec.encode_entry_reply(rid, blob) == codec.encode_reply(rid, {}, {"entry": blob})
    assert unpack(codec.encode_entry_reply(9, blob)) == {"v": 1, "ok": True, "id": 9, "entry": make_entry(1).to_wire()}


def test_encode_error():
    m = unpack(codec.encode_error(3, TOO_LARGE, "too big", {"limit": 10, "code": "IGNORED"}))
    assert m == {"v": 1, "id": 3, "ok": False, "error": {"code": TOO_LARGE, "message": "too big", "limit": 10}}
    assert codec.decode_reply(codec.encode_error(None, BAD_REQUEST, "x")) == {
        "v": 1, "id": None, "ok": False, "error": {"code": BAD_REQUEST, "message": "x"}}


def test_encode_error_survives_unencodable_echoes():
    m = unpack(codec.encode_error("bad\udcff", BAD_REQUEST, "msg \udcfe", {"x": object()}))
    assert m["ok"] is False and m["id"] is None and m["error"]["code"] == BAD_REQUEST
    assert m["error"]["message"].startswith("msg ")


@pytest.mark.parametrize("frame", [b"", b"\xc1", pack([1]), pack({"v": 1}), pack("ok")])
def test_decode_reply_rejects_junk(frame):
    with pytest.raises(RemoteProtocolError):
        codec.decode_reply(frame)


def test_request_round_trip_for_every_op():
    frames = {
        "append": req("append", context="c", payload=b"x"),
        "append_batch": req("append_batch", context="c", entries=[{}]),
        "get": req("get", context="c"),
        "head": req("head", context="c"),
        "contexts": req("contexts"),
        "status": req("status"),
        "ping": req("ping"),
        "snapshot": req("snapshot", context="c"),
        "load": req("load", **LOAD_OK),
        "proof": req("proof", context="c", seq=1),
        "consistency": req("consistency", context="c", first=0),
        "heartbeat": req("heartbeat", node_id="n", address="h:1"),
        "sync_heads": req("sync_heads", buckets=[], nbuckets=1),
        "sync_digest": req("sync_digest", buckets=[5]),
        "snapshots": req("snapshots", chunks=[["c", 0, 3]]),
        "ack": req("ack", node_id="n", acks=[["c", 3]]),
    }
    assert set(frames) == set(REQUEST_TYPES) == set(codec.OPS)
    for op, frame in frames.items():
        env = decode(frame)
        assert env.op == op and env.id == 1
        assert type(env.request) is REQUEST_TYPES[op]


# -- fuzz: nothing but RemoteProtocolError ever comes out ---------------------------------


REQUEST_TYPES = {
    "append": codec.Append, "append_batch": codec.AppendBatch, "get": codec.Get, "head": codec.Head,
    "contexts": codec.Contexts, "status": codec.Status, "ping": codec.Ping, "snapshot": codec.Snapshot,
    "load": codec.Load, "proof": codec.Proof, "consistency": codec.Consistency,
    "heartbeat": codec.Heartbeat, "sync_heads": codec.SyncHeads, "sync_digest": codec.SyncDigest,
    "snapshots": codec.Snapshots, "ack": codec.Ack,
}


def decode_or_protocol_error(frame: bytes) -> None:
    try:
        env = codec.decode_request(frame, MAX)
    except RemoteProtocolError as e:
        assert e.code in ALL_CODES
        assert isinstance(e.message, str) and e.message
        # whatever we say back must be encodable
        codec.decode_reply(codec.encode_error(None, e.code, e.message, e.details))
        return
    assert isinstance(env.request, REQUEST_TYPES[env.op])


# A string that the fuzz tests below turn into a msgpack str of invalid UTF-8 after
# packing (same length, so the framing stays valid): no encoder would produce it.
BAD_UTF8_MARK = "BADUTF8!"
BAD_UTF8_BYTES = b"\xff\xfe\xc3\x28\xa0\xa1\xe2\x28"


def spoil_utf8(frame: bytes) -> bytes:
    return frame.replace(b"\xa8" + BAD_UTF8_MARK.encode(), b"\xa8" + BAD_UTF8_BYTES)


scalars = (
    st.none() | st.booleans() | st.integers(min_value=-(2**63), max_value=2**64 - 1) | st.floats()
    | st.text(max_size=20) | st.binary(max_size=20)
    | st.builds(msgpack.ExtType, st.integers(min_value=0, max_value=127), st.binary(max_size=8))
    | st.sampled_from([0, 1, -1, 2**64 - 1, "", "c", "x" * 257, b"", ROOT, {}, [], BAD_UTF8_MARK])
)
values = st.recursive(
    scalars,
    lambda children: st.lists(children, max_size=5)
    | st.dictionaries(st.text(max_size=8) | st.integers(-5, 5) | st.binary(max_size=4) | st.just(BAD_UTF8_MARK),
                      children, max_size=5),
    max_leaves=20,
)
FIELD_NAMES = ["context", "key", "payload", "metadata", "dedup_id", "expect_seq", "after_lamport", "entries",
               "after", "limit", "size", "load_id", "root", "final", "fail_if_exists", "seq", "first", "second"]
request_maps = st.fixed_dictionaries(
    {"v": st.sampled_from([1, 1, 1, 2, 0, None, "1"]), "op": st.sampled_from(list(codec.OPS) + ["nope", 5])},
    optional={"id": values},
).flatmap(
    lambda base: st.dictionaries(st.sampled_from(FIELD_NAMES), values, max_size=8).map(lambda f: {**f, **base})
)


@FUZZ
@given(st.binary(max_size=300))
def test_fuzz_random_bytes(frame):
    decode_or_protocol_error(frame)


@FUZZ
@given(values)
def test_fuzz_random_msgpack_values(value):
    decode_or_protocol_error(pack(value))


@settings(FUZZ, max_examples=150)
@given(request_maps)
def test_fuzz_request_shaped_maps(m):
    decode_or_protocol_error(pack(m))


@settings(FUZZ, max_examples=150)
@given(request_maps)
def test_fuzz_request_shaped_maps_with_invalid_utf8_strings(m):
    decode_or_protocol_error(spoil_utf8(pack(m)))


@pytest.mark.parametrize("op, field, code", [
    ("ping", "id", BAD_REQUEST), ("append", "id", BAD_REQUEST), ("append", "op", UNKNOWN_OP),
    ("append", "context", BAD_REQUEST), ("get", "context", BAD_REQUEST), ("load", "context", BAD_REQUEST),
    ("append", "key", BAD_REQUEST), ("get", "key", BAD_REQUEST), ("append", "dedup_id", BAD_REQUEST),
    ("append", "payload", BAD_REQUEST), ("contexts", "after", BAD_REQUEST), ("append", "metadata", BAD_REQUEST),
])
def test_invalid_utf8_in_a_string_field(op, field, code):
    m: dict[str, Any] = {"v": 1, "id": 1, "op": op, "context": "c", "load_id": "L", "size": 0, "root": ROOT}
    m[field] = {BAD_UTF8_MARK: "v"} if field == "metadata" else BAD_UTF8_MARK
    frame = spoil_utf8(pack(m))
    assert BAD_UTF8_BYTES in frame
    expect(frame, code)


VALID_FRAMES = [
    req("append", context="c", key="k", payload=b"hello", metadata={"a": "b"}, dedup_id="d", expect_seq=3),
    req("append", rid="id-1", context="ctx", key="k", payload=b"p"),
    req("append_batch", context="c", entries=[{"key": "a", "payload": b"1"}, {"metadata": {"x": "y"}}]),
    req("get", rid="r", context="c", key="k", after=1, limit=10),
    req("load", **LOAD_OK, entries=[make_entry(1, "ctx").to_wire()], final=True),
    req("consistency", context="c", first=1, second=2),
]


@FUZZ
@given(st.sampled_from(VALID_FRAMES), st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255),
                                                         st.sampled_from(["set", "insert", "delete"])),
                                               min_size=1, max_size=4))
def test_fuzz_mutated_valid_requests(frame, edits):
    b = bytearray(frame)
    for pos, byte, kind in edits:
        pos %= len(b) + 1
        if kind == "insert":
            b.insert(pos, byte)
        elif pos < len(b):
            if kind == "set":
                b[pos] = byte
            else:
                del b[pos]
    decode_or_protocol_error(bytes(b))


@pytest.mark.parametrize("rid", [None, 0, 7, 2**40, "req-1", b"\x00id"])
@pytest.mark.parametrize("last_seq, more, next_after, n", [(0, False, 0, 0), (5, True, 3, 1), (2**33, False, 2**33, 20)])
def test_the_get_reply_fast_path_is_the_generic_reply_byte_for_byte(rid, last_seq, more, next_after, n):
    blobs = [msgpack.packb({"seq": i}) for i in range(n)]
    assert codec.encode_get_reply(rid, last_seq, more, next_after, blobs) == codec.encode_reply(
        rid, {"last_seq": last_seq, "more": more, "next_after": next_after}, {"entries": blobs})
