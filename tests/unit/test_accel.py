"""node/_accel.c, the C path of a pull's per-entry work (`node.ledger.wire_parts`): it must compute
what the Python path computes, byte for byte, and hand back to it (None) every entry that is not
the plain case, so that the Python path words the error. Without the module (no C compiler where
the project was installed) `wire_parts` is always None and the node runs the Python path only."""

from __future__ import annotations

import copy
from typing import Any

import msgpack
import pytest

from node import ledger as ledger_mod
from node.ledger import Ledger, WireParts, packed_parts, wire_parts
from node import storage as node_storage
from node.storage import MemoryKV
from protocol import codec, merkle
from protocol.entry import encode_entry_parts, entry_from_wire, leaf_hash_named, leaf_names, packed_str
from protocol.errors import IntegrityError, RemoteProtocolError
from protocol.lamport import MAX_LAMPORT

pytestmark = pytest.mark.skipif(not ledger_mod.ACCELERATED, reason="node._accel is not built here (no C compiler)")

U64 = (1 << 64) - 1


@pytest.fixture(params=[True, False], ids=["sha256-in-c", "sha256-by-hashlib"])
def hashing(request: Any, monkeypatch: Any) -> Any:
    """Both ways of the C code: SHA-256 done in it (OpenSSL's, found at import) or by hashlib."""
    accel = ledger_mod._accel
    on = accel.set_hashing(request.param)
    if request.param and not on:
        pytest.skip("no libcrypto with SHA256() in this process")
    monkeypatch.setattr(ledger_mod, "HASHING_IN_C", on)
    monkeypatch.setattr(merkle.Frontier, "accel_extend", accel.frontier_extend if on else None)
    monkeypatch.setattr(merkle.Frontier, "accel_root", accel.frontier_root if on else None)
    yield on
    accel.set_hashing(True)  # (as at import)


def wire(context: str, writer: str, seq: int, key: str = "k", payload: bytes = b"p", lamport: int = 1,
         ts_ns: int = 5, metadata: dict[str, str] | None = None) -> dict[str, Any]:
    """An entry's wire map, as msgpack decodes it, with its true leaf hash."""
    md = metadata or {}
    h = leaf_hash_named(leaf_names(context.encode(), writer.encode()), seq, key.encode(), payload, md, lamport, ts_ns)
    return {"context": context, "seq": seq, "key": key, "payload": payload, "metadata": md, "lamport": lamport,
            "ts_ns": ts_ns, "writer": writer, "hash": h}


def round_trip(maps: list[dict[str, Any]]) -> list[Any]:
    """As a reply carries them: packed and decoded again."""
    out: list[Any] = msgpack.unpackb(msgpack.packb(maps, use_bin_type=True), raw=False)
    return out


# sizes at every boundary of msgpack's encodings (fixint/uint8/16/32/64, fixstr/str8/16, bin8/16/32)
INTS = [0, 1, 127, 128, 255, 256, 65535, 65536, (1 << 32) - 1, 1 << 32, MAX_LAMPORT]
KEYS = ["", "k", "a" * 31, "a" * 32, "a" * 255, "a" * 256]
PAYLOADS = [b"", b"x", b"y" * 255, b"y" * 256, b"z" * 65535, b"z" * 65536, b"w" * 70000]


def test_the_c_path_encodes_and_hashes_byte_for_byte_as_the_python_path():
    maps = []
    seq = 0
    for i, (k, p) in enumerate([(k, p) for k in KEYS for p in PAYLOADS]):
        seq += 1
        maps.append(wire("ctx", "w1", seq, k, p, lamport=INTS[i % len(INTS)], ts_ns=[*INTS, U64][(i * 7) % 12]))
    raw = round_trip(maps)
    parts = wire_parts("ctx", raw, 1)
    assert isinstance(parts, WireParts) and len(parts) == len(maps)
    cp, wp = packed_str("ctx"), packed_str("w1")
    entries = [entry_from_wire(m) for m in raw]
    assert parts.blobs == [encode_entry_parts(cp, e.seq, e.key, e.payload, e.metadata, e.lamport, e.ts_ns, wp, e.hash)
                           for e in entries]
    assert parts.blobs == [e.encode() for e in entries]  # (the canonical map of SPEC 5)
    assert parts.hashes == [e.hash for e in entries] and parts.keys == [e.key for e in entries]
    assert parts.max_lamport == max(e.lamport for e in entries) and parts.last_lamport == entries[-1].lamport
    assert (parts.writer, parts.first, parts.context) == ("w1", 1, "ctx")


def test_a_seq_past_2_63_takes_the_c_path_and_a_name_to_check_as_utf8_or_no_context_s_name_does_not():
    raw = round_trip([wire("ctx", "w1", (1 << 63) + i) for i in range(3)])
    parts = wire_parts("ctx", raw, 1 << 63)
    assert parts is not None and parts.blobs == [entry_from_wire(m).encode() for m in raw]
    for name in ("ctx-é", "", "c" * 257):  # (a peer's heads name the contexts pulled: Python checks them)
        raw = round_trip([{**wire("x", "w1", 1), "context": name}])
        assert wire_parts(name, raw, 1) is None
    with pytest.raises(RemoteProtocolError, match="context must be 1..256 bytes"):
        entry_from_wire(raw[0])


def applied_state(led: Ledger, name: str) -> tuple[Any, ...]:
    ctx = led.contexts[name]
    stored = {k: v for k, v in led.pending.items() if k[:1] in (b"E", b"N")}  # (not `C`: its created_ns)
    assert len(stored) >= ctx.size
    return (stored, ctx.size, ctx.frontier.root(), ctx.last_lamport, led.clock.value, dict(ctx.tail),
            led.entries_total, led.hot_bytes)


@pytest.mark.parametrize("way", ["maps", "packed"])
@pytest.mark.parametrize("chunks", [[5], [1, 4], [3, 3, 2]])
@pytest.mark.usefixtures("hashing")
def test_applying_through_the_c_path_leaves_the_ledger_as_the_pure_python_path_does(chunks, way, monkeypatch):
    n = sum(chunks)
    maps = [wire("c", "w1", s, f"k{s}", bytes([s]) * s, lamport=10 * s, ts_ns=s) for s in range(1, n + 1)]
    roots = []
    f = merkle.Frontier()
    for m in maps:
        f.append(m["hash"])
        roots.append(f.root())
    fast, slow = (Ledger(MemoryKV(), node_id="me", sync_meta=False) for _ in range(2))
    accel, hooks = ledger_mod._accel, (merkle.Frontier.accel_extend, merkle.Frontier.accel_root)
    at = 0
    for k in chunks:
        chunk, root = maps[at:at + k], roots[at + k - 1]
        parts = wire_parts("c", round_trip(chunk), at + 1) if way == "maps" else packed_parts("c", packed(chunk), at + 1)
        assert parts is not None
        assert fast.apply_replicated("c", parts, root) is not None
        # the same entries through the Python path only (as on a node without the module)
        monkeypatch.setattr(ledger_mod, "_accel", None)
        monkeypatch.setattr(merkle.Frontier, "accel_extend", None)
        monkeypatch.setattr(merkle.Frontier, "accel_root", None)
        assert slow.apply_replicated("c", [entry_from_wire(m) for m in round_trip(chunk)], root) is not None
        monkeypatch.setattr(ledger_mod, "_accel", accel)
        merkle.Frontier.accel_extend, merkle.Frontier.accel_root = hooks
        at += k
    assert applied_state(fast, "c") == applied_state(slow, "c")


def test_parts_that_do_not_extend_the_replica_are_refused_like_entries():
    led = Ledger(MemoryKV(), node_id="me", sync_meta=False)
    parts = wire_parts("c", round_trip([wire("c", "w1", 2)]), 2)
    assert parts is not None
    with pytest.raises(IntegrityError, match="do not extend"):
        led.apply_replicated("c", parts)
    parts = wire_parts("c", round_trip([wire("c", "w1", 1)]), 1)
    assert parts is not None
    with pytest.raises(IntegrityError, match="do not extend 'd'"):
        led.apply_replicated("d", parts)
    assert "c" not in led.contexts and "d" not in led.contexts


def _set(field: str, value: Any):
    def change(m: dict[str, Any]) -> None:
        m[field] = value
    return change


def _drop(field: str):
    def change(m: dict[str, Any]) -> None:
        del m[field]
    return change


UNUSUAL = {
    # (what the Python path then does: its fast path or its checked path; here only: not the C path)
    "metadata": _set("metadata", {"a": "b"}),
    "non-ASCII key": _set("key", "clé"),
    "key of 257 bytes": _set("key", "a" * 257),
    "missing hash": _drop("hash"),
    "missing metadata": _drop("metadata"),
    "seq out of turn": _set("seq", 7),
    "seq a bool": _set("seq", True),
    "seq a float": _set("seq", 2.0),
    "seq negative": _set("seq", -1),
    "lamport above the ceiling": _set("lamport", MAX_LAMPORT + 1),
    "lamport negative": _set("lamport", -1),
    "lamport a str": _set("lamport", "1"),
    "ts_ns 2^64": _set("ts_ns", 1 << 64),
    "ts_ns huge": _set("ts_ns", 1 << 200),
    "payload a str": _set("payload", "p"),
    "payload a bytearray": _set("payload", bytearray(b"p")),
    "hash of 31 bytes": _set("hash", b"h" * 31),
    "hash of another entry": _set("hash", b"h" * 32),
    "another context": _set("context", "other"),
    "another writer": _set("writer", "w2"),
    "writer not a str": _set("writer", 5),
    "key not a str": _set("key", b"k"),
    "metadata a list": _set("metadata", []),
    "a str subclass": _set("key", type("S", (str,), {})("k")),
}


@pytest.mark.parametrize("where", [0, 2])
@pytest.mark.parametrize("what", sorted(UNUSUAL))
def test_any_unusual_entry_sends_the_whole_chunk_to_the_python_path(what, where):
    raw = round_trip([wire("c", "w1", s) for s in range(1, 4)])
    UNUSUAL[what](raw[where])
    assert wire_parts("c", raw, 1) is None


def test_the_python_path_then_words_the_error_or_applies_what_is_sound():
    raw = round_trip([wire("c", "w1", s) for s in range(1, 4)])
    bad = copy.deepcopy(raw)
    bad[1]["hash"] = b"h" * 32
    assert wire_parts("c", bad, 1) is None
    led = Ledger(MemoryKV(), node_id="me", sync_meta=False)
    with pytest.raises(IntegrityError, match="'c'#2 does not match its hash"):
        led.apply_replicated("c", [entry_from_wire(m) for m in bad])
    odd = copy.deepcopy(raw)
    odd[2]["seq"] = True
    with pytest.raises(RemoteProtocolError, match="seq must be an unsigned 64-bit integer"):
        codec.parse_chunk_reply({"entries": odd, "root": b"r" * 32})
    meta = round_trip([wire("c", "w1", 1, metadata={"a": "b"})])
    assert wire_parts("c", meta, 1) is None
    assert led.apply_replicated("c", [entry_from_wire(m) for m in meta]) is not None  # sound: applied


def test_not_a_list_or_an_empty_one_or_a_first_map_without_a_plain_writer_is_not_the_c_path():
    assert wire_parts("c", [], 1) is None
    assert wire_parts("c", ["junk"], 1) is None
    for w in ("", "é", "w" * 65, None):
        m = wire("c", "w1", 1)
        m["writer"] = w
        assert wire_parts("c", [m], 1) is None
    with pytest.raises(TypeError):
        ledger_mod._accel.replica_parts((), 1, "c", "w", b"", b"", b"")  # a tuple, not a list


def test_without_the_module_the_python_path_does_everything(monkeypatch):
    monkeypatch.setattr(ledger_mod, "_accel", None)
    assert wire_parts("c", round_trip([wire("c", "w1", 1)]), 1) is None


# -- entries sent packed (SPEC 17.2): each a bin of the entry's stored bytes, stored as it came ----

def packed(maps: list[dict[str, Any]]) -> list[bytes]:
    """As a `packed` reply carries them, decoded: the canonical bytes of each entry (names and
    keys unchecked: a peer may send any)."""
    return [encode_entry_parts(packed_str(m["context"]), m["seq"], m["key"], m["payload"], m["metadata"], m["lamport"],
                               m["ts_ns"], packed_str(m["writer"]), m["hash"]) for m in maps]


@pytest.mark.usefixtures("hashing")
def test_packed_entries_are_checked_in_c_and_kept_as_they_came_at_every_encoding_boundary():
    maps = []
    seq = 0
    for i, (k, p) in enumerate([(k, p) for k in KEYS for p in PAYLOADS]):
        seq += 1
        maps.append(wire("ctx", "w" * (1 + i % 64), 1, k, p))  # (writers of 1..64 bytes: checked alone below)
    maps = [wire("ctx", "w1", s, m["key"], m["payload"], lamport=INTS[s % len(INTS)], ts_ns=[*INTS, U64][(s * 7) % 12])
            for s, m in enumerate(maps, 1)]
    blobs = packed(maps)
    parts = packed_parts("ctx", blobs, 1)
    from_maps = wire_parts("ctx", round_trip(maps), 1)
    assert isinstance(parts, WireParts) and from_maps is not None
    assert parts.blobs is blobs  # (not copied, not encoded again)
    for f in WireParts.__slots__:
        assert getattr(parts, f) == getattr(from_maps, f), f
    for w in ("w", "w" * 31, "w" * 32, "w" * 64):
        one = packed([wire("c" * 256, w, 7)])
        got = packed_parts("c" * 256, one, 7)
        assert got is not None and got.writer == w
    assert packed_parts("c", packed([wire("c", "w1", (1 << 64) - 1)]), (1 << 64) - 1) is not None


def _respell(old: bytes, new: bytes):
    """A blob with one spelling replaced: the same value in another encoding, or another value."""
    def change(blob: bytes) -> bytes:
        assert old in blob
        return blob.replace(old, new, 1)
    return change


PACKED_UNUSUAL = {
    # a longer encoding than the shortest: the same entry, but not the bytes this node stores
    "seq as a uint64": _respell(b"\xa3seq\x02", b"\xa3seq\xcf" + (2).to_bytes(8, "big")),
    "seq as a uint8": _respell(b"\xa3seq\x02", b"\xa3seq\xcc\x02"),
    "lamport as a uint16": _respell(b"\xa7lamport\x01", b"\xa7lamport\xcd\x00\x01"),
    "ts_ns as a uint32": _respell(b"\xa5ts_ns\x05", b"\xa5ts_ns\xce\x00\x00\x00\x05"),
    "key as a str8": _respell(b"\xa3key\xa1k", b"\xa3key\xd9\x01k"),
    "payload as a bin16": _respell(b"\xa7payload\xc4\x01p", b"\xa7payload\xc5\x00\x01p"),
    "writer as a str8": _respell(b"\xa6writer\xa2w1", b"\xa6writer\xd9\x02w1"),
    "context as a str8": _respell(b"\xa7context\xa1c", b"\xa7context\xd9\x01c"),
    # what the Python path must decide or word
    "metadata": lambda b: entry_from_wire(wire("c", "w1", 2, metadata={"a": "b"})).encode(),
    "non-ASCII key": lambda b: entry_from_wire(wire("c", "w1", 2, key="clé")).encode(),
    "key of 257 bytes": lambda b: packed([wire("c", "w1", 2, key="a" * 257)])[0],
    "lamport above the ceiling": _respell(b"\xa7lamport\x01", b"\xa7lamport\xcf" + (MAX_LAMPORT + 1).to_bytes(8, "big")),
    "seq out of turn": _respell(b"\xa3seq\x02", b"\xa3seq\x07"),
    "another context": _respell(b"\xa7context\xa1c", b"\xa7context\xa1d"),
    "another writer": _respell(b"\xa6writer\xa2w1", b"\xa6writer\xa2w2"),
    "hash of another entry": lambda b: b[:-32] + b"h" * 32,
    "cut short": lambda b: b[:-1],
    "a byte more": lambda b: b + b"\0",
    "empty": lambda b: b"",
    "keys in another order": lambda b: msgpack.packb(dict(reversed(list(msgpack.unpackb(b, raw=False).items()))),
                                                     use_bin_type=True),
    "a map, not a bin": lambda b: msgpack.unpackb(b, raw=False),
    "a bytearray": lambda b: bytearray(b),
}


def _canonical(context: str, writer: str, seq: int, key: str = "k", payload: bytes = b"p", lamport: int = 1,
               ts_ns: int = 5) -> bytes:
    """An entry's canonical bytes with its true hash, whatever its fields (no checks)."""
    return packed([wire(context, writer, seq, key, payload, lamport, ts_ns)])[0]


def _rehashed(blob: bytes, old: bytes, new: bytes) -> bytes:
    """`blob` with one spelling replaced (the same value in a longer form): its hash still true."""
    assert old in blob
    return blob.replace(old, new, 1)


TRUE_HASH_UNUSUAL = {
    # each with its true leaf hash: only the C code's own checks can refuse it
    "lamport above the ceiling": lambda: _canonical("c", "w1", 1, lamport=MAX_LAMPORT + 1),
    "writer empty": lambda: _canonical("c", "", 1),
    "writer of 65 bytes": lambda: _canonical("c", "w" * 65, 1),
    "writer not ASCII": lambda: _canonical("c", "wé", 1),
    "key of 257 bytes": lambda: _canonical("c", "w1", 1, key="k" * 257),
    "payload as a bin32": lambda: _rehashed(_canonical("c", "w1", 1), b"\xa7payload\xc4\x01p",
                                            b"\xa7payload\xc6\x00\x00\x00\x01p"),
    "payload as a bin16 of 255 bytes": lambda: _rehashed(_canonical("c", "w1", 1, payload=b"q" * 255),
                                                         b"\xa7payload\xc4\xff", b"\xa7payload\xc5\x00\xff"),
    "key as a str32": lambda: _rehashed(_canonical("c", "w1", 1), b"\xa3key\xa1k", b"\xa3key\xdb\x00\x00\x00\x01k"),
    "key as a str16": lambda: _rehashed(_canonical("c", "w1", 1), b"\xa3key\xa1k", b"\xa3key\xda\x00\x01k"),
    "writer as a str32": lambda: _rehashed(_canonical("c", "w1", 1), b"\xa6writer\xa2w1",
                                           b"\xa6writer\xdb\x00\x00\x00\x02w1"),
    "seq as a uint32": lambda: _rehashed(_canonical("c", "w1", 1), b"\xa3seq\x01", b"\xa3seq\xce\x00\x00\x00\x01"),
}


@pytest.mark.usefixtures("hashing")
@pytest.mark.parametrize("what", sorted(TRUE_HASH_UNUSUAL))
def test_a_packed_entry_with_its_true_hash_that_python_would_refuse_or_store_otherwise_is_not_taken(what):
    blob = TRUE_HASH_UNUSUAL[what]()
    writer = msgpack.unpackb(blob, raw=False)["writer"]
    assert packed_parts("c", [blob], 1) is None
    ledger_mod._accel.set_hashing(False)  # (and not by its hash: by its form)
    try:
        assert ledger_mod._accel.packed_parts([blob], 1, "c") is None, writer
    finally:
        ledger_mod._accel.set_hashing(ledger_mod.HASHING_IN_C)


@pytest.mark.usefixtures("hashing")
@pytest.mark.parametrize("what", sorted(PACKED_UNUSUAL))
def test_any_packed_entry_not_exactly_as_stored_sends_the_chunk_to_the_python_path(what):
    blobs = packed([wire("c", "w1", s) for s in range(1, 4)])
    blobs[1] = PACKED_UNUSUAL[what](blobs[1])
    assert packed_parts("c", blobs, 1) is None


def test_the_python_path_stores_packed_entries_in_a_longer_encoding_as_their_canonical_bytes():
    maps = [wire("c", "w1", s) for s in range(1, 4)]
    blobs = packed(maps)
    long = [PACKED_UNUSUAL["seq as a uint64"](blobs[1]) if i == 1 else b for i, b in enumerate(blobs)]
    assert packed_parts("c", long, 1) is None
    led = Ledger(MemoryKV(), node_id="me", sync_meta=False)
    ctx = led.apply_replicated("c", [entry_from_wire(m) for m in codec.unpack_entries(long)])
    assert ctx is not None and [led.entry_blob(ctx, s) for s in (1, 2, 3)] == blobs  # (not as they came)


@pytest.mark.usefixtures("hashing")
def test_a_packed_entry_that_does_not_hold_is_refused_by_the_python_path():
    blobs = packed([wire("c", "w1", s) for s in range(1, 4)])
    blobs[2] = blobs[2][:-32] + b"h" * 32
    assert packed_parts("c", blobs, 1) is None
    led = Ledger(MemoryKV(), node_id="me", sync_meta=False)
    with pytest.raises(IntegrityError, match="'c'#3 does not match its hash"):
        led.apply_replicated("c", [entry_from_wire(m) for m in codec.unpack_entries(blobs)])
    assert "c" not in led.contexts


def test_whatever_packed_bytes_the_c_path_takes_are_the_canonical_bytes_of_a_sound_entry():
    """A seeded fuzz: bytes flipped, cut, inserted into packed entries. Whenever the C code takes a
    chunk (before the hashes are compared), each blob is exactly the canonical encoding of the entry
    msgpack reads from it, the entry names the context and the writer the C code reports, and the
    pre-image, hash, key and lamports it gives are the Python path's."""
    import random

    ledger_mod._accel.set_hashing(False)  # (the pre-images back, hashes not compared: structure only)
    try:
        _fuzz_packed(random.Random(20261208))
    finally:
        ledger_mod._accel.set_hashing(True)


def _fuzz_packed(rng: Any) -> None:
    import hashlib

    base = packed([wire("c", "w1", s, "k" * (s * 9), b"p" * (s * 70), lamport=s * 300, ts_ns=s << 20)
                   for s in range(1, 4)])
    taken = 0
    for _ in range(3000):
        blobs = list(base)
        i = rng.randrange(3)
        b = bytearray(blobs[i])
        for _ in range(rng.randint(1, 3)):
            at = rng.randrange(len(b) + 1)
            op = rng.random()
            if op < 0.6 and at < len(b):
                b[at] = rng.randrange(256)
            elif op < 0.8:
                b[at:at] = bytes([rng.randrange(256)])
            elif at < len(b):
                del b[at]
        blobs[i] = bytes(b)
        out = ledger_mod._accel.packed_parts(blobs, 1, "c")  # (its structural checks: no hashing)
        if out is None:
            continue
        taken += 1
        pre, hashes, keys, max_lamport, last_lamport, writer = out
        entries = [entry_from_wire(msgpack.unpackb(blob, raw=False)) for blob in blobs]
        for seq, (e, blob) in enumerate(zip(entries, blobs, strict=True), 1):
            assert e.encode() == blob and e.seq == seq and e.context == "c" and e.writer == writer
            assert (hashes[seq - 1], keys[seq - 1]) == (e.hash, e.key)
            assert hashlib.sha256(pre[seq - 1]).digest() == leaf_hash_named(
                leaf_names(b"c", writer.encode()), seq, e.key.encode(), e.payload, {}, e.lamport, e.ts_ns)
        assert (max_lamport, last_lamport) == (max(e.lamport for e in entries), entries[-1].lamport)
    assert taken >= 500, taken  # (a changed payload, lamport, key... is sound in structure: ~700 here)


def test_packed_parts_of_no_entries_or_a_name_no_context_can_have_or_a_first_seq_of_0_are_not_the_c_path(monkeypatch):
    one = packed([wire("c", "w1", 1)])
    assert packed_parts("c", [], 1) is None
    assert packed_parts("c", one, 0) is None
    for name in ("", "c" * 257, "é"):
        assert packed_parts(name, packed([{**wire("x", "w1", 1), "context": name}]), 1) is None
    for w in ("", "é", "w" * 65):
        assert packed_parts("c", packed([{**wire("c", "w1", 1), "writer": w}]), 1) is None
    with pytest.raises(TypeError):
        ledger_mod._accel.packed_parts(tuple(one), 1, "c")  # a tuple, not a list
    monkeypatch.setattr(ledger_mod, "_accel", None)
    assert packed_parts("c", one, 1) is None


# -- the Merkle frontier extended in C (SHA-256 found at import) ------------------------------------

def _leaves(n: int, salt: int = 0) -> list[bytes]:
    import hashlib

    return [hashlib.sha256(b"leaf %d %d" % (salt, i)).digest() for i in range(n)]


def _in_c(on: bool) -> None:
    accel = ledger_mod._accel
    merkle.Frontier.accel_extend = accel.frontier_extend if on else None
    merkle.Frontier.accel_root = accel.frontier_root if on else None


@pytest.fixture
def frontier_hooks() -> Any:
    """The Frontier's hooks as the node set them at import, put back after the test."""
    if not ledger_mod._accel.set_hashing(True):
        pytest.skip("no libcrypto with SHA256_Init() in this process")
    saved = merkle.Frontier.accel_extend, merkle.Frontier.accel_root
    yield
    merkle.Frontier.accel_extend, merkle.Frontier.accel_root = saved


@pytest.mark.usefixtures("frontier_hooks")
@pytest.mark.parametrize("keep_from", [1, 2, 5])
def test_the_frontier_extended_in_c_is_the_python_frontier_node_for_node(keep_from):
    fast, slow = merkle.Frontier(), merkle.Frontier()
    for i, n in enumerate([0, 1, 1, 2, 3, 5, 8, 13, 64, 1, 255, 256, 1000]):
        leaves = _leaves(n, i)
        _in_c(True)
        got = fast.extend(leaves, keep_from)
        fast_root = fast.root()
        _in_c(False)
        assert got == slow.extend(leaves, keep_from)
        assert (fast.size, fast.nodes, fast_root) == (slow.size, slow.nodes, slow.root())


@pytest.mark.usefixtures("frontier_hooks")
def test_the_root_taken_in_c_is_the_python_root_at_every_size_up_to_3000():
    f = merkle.Frontier()
    accel = ledger_mod._accel
    assert accel.frontier_root([], 0) is None  # (the empty root: Python's)
    for i in range(3000):
        f.extend(_leaves(1, i), 1)
        assert accel.frontier_root(f.nodes, f.size) == merkle.root_at(f.size, f.get), f.size
    assert accel.frontier_root(f.nodes[:3], f.size) is None  # (nodes missing: Python's)
    assert accel.frontier_root([*f.nodes[:-1], b"x"], f.size) is None


@pytest.mark.usefixtures("frontier_hooks")
def test_the_root_in_c_near_2_64_is_python_s_and_odd_arguments_are_left_to_python():
    accel = ledger_mod._accel
    for n in ((1 << 64) - 1, (1 << 64) - 2, 1 << 63, (1 << 63) + 5):
        nodes = [bytes([i]) * 32 for i in range(64)]
        assert accel.frontier_root(nodes, n) == merkle.root_at(n, merkle.Frontier(n, list(nodes)).get), n
    nodes = [bytes([i]) * 32 for i in range(64)]
    assert accel.frontier_extend(nodes, (1 << 64) - 1, _leaves(1), 1) is None  # (past 2^64 - 1)
    assert accel.frontier_extend(nodes, 0, tuple(_leaves(2)), 1) is None  # (a tuple: Python's)
    assert accel.frontier_extend(nodes, 0, _leaves(2), 1 << 40) is None
    assert accel.frontier_extend(tuple(nodes), 0, _leaves(2), 1) is None
    f = merkle.Frontier()
    _in_c(True)
    assert f.extend(tuple(_leaves(3)), 1) == merkle.Frontier().extend(_leaves(3), 1) and f.size == 3


def test_the_c_frontier_keeps_no_references_it_should_not():
    import sys

    if not ledger_mod._accel.set_hashing(True):
        pytest.skip("no libcrypto with SHA256_Init() in this process")
    accel = ledger_mod._accel
    leaves = _leaves(7)
    nodes: list[bytes] = []
    before = [sys.getrefcount(x) for x in leaves]
    size = 0
    for _ in range(200):
        accel.frontier_extend(nodes, size, leaves, 1)
        size += len(leaves)
    assert [sys.getrefcount(x) for x in leaves] == before
    assert [sys.getrefcount(nodes[i]) for i in range(len(nodes))] == [2] * len(nodes)  # (the list's, the call's)
    assert len(nodes) == size.bit_length()


@pytest.mark.usefixtures("frontier_hooks")
def test_a_frontier_the_c_code_cannot_extend_is_left_to_python_unchanged():
    accel = ledger_mod._accel
    _in_c(False)
    f = merkle.Frontier()
    f.extend(_leaves(5), 1)
    nodes = list(f.nodes)
    for bad_nodes, size, leaves, keep in [
        ([*nodes[:-1], b"x" * 31], 5, _leaves(3), 1),  # a node not of 32 bytes
        (nodes, 5, [b"x" * 33], 1),  # a leaf not of 32 bytes
        (nodes, 5, [bytearray(32)], 1),
        (nodes[:1], 7, _leaves(1), 1),  # fewer nodes than the size has levels
        (nodes, -1, _leaves(1), 1),
        (nodes, 5, _leaves(1), 0),  # keep_from 0: level 0 is the caller's
        ([b"x" * 32] * 65, 5, _leaves(1), 1),
    ]:
        before = list(bad_nodes)
        assert accel.frontier_extend(bad_nodes, size, leaves, keep) is None
        assert bad_nodes == before
    g = merkle.Frontier(f.size, list(f.nodes))
    _in_c(True)
    assert g.extend(_leaves(1), 0) == f.copy().extend(_leaves(1), 0)  # (keep_from 0: done in Python)
    accel.set_hashing(False)
    try:
        assert accel.frontier_extend(nodes, 5, _leaves(1), 1) is None  # (without SHA-256: Python's)
        assert accel.frontier_root(nodes, 5) is None
        g = merkle.Frontier(f.size, list(f.nodes))
        assert g.extend(_leaves(2), 1) == f.copy().extend(_leaves(2), 1)
    finally:
        accel.set_hashing(True)


# -- staging applied entries (the pending write, the hot tail) in C ---------------------------------

def _staged(stage: Any, cid: int, first: int, keys: list[Any], blobs: list[Any]) -> tuple[Any, ...]:
    import collections

    pending: dict[bytes, bytes] = {b"x": b"kept"}
    tail: dict[int, tuple[str, bytes]] = {}
    hot: collections.deque[tuple[int, int, int]] = collections.deque()
    out = stage(pending, tail, hot.append, cid, first, keys, blobs, 320)
    return out, pending, tail, list(hot)


def test_entries_are_staged_in_c_exactly_as_the_python_loop_stages_them():
    keys = ["", "k", "clé", "k" * 256]
    blobs = [b"", b"a", b"b" * 300, b"c" * 70000]
    for cid, first in ((1, 1), (0, 1), ((1 << 32) - 1, (1 << 64) - 4), (7, 1 << 40)):
        got = _staged(ledger_mod._accel.stage, cid, first, keys, blobs)
        assert got == _staged(ledger_mod._stage_py, cid, first, keys, blobs), (cid, first)
        assert got[1][node_storage.entry_key(cid, first)] == b""
    assert _staged(ledger_mod._accel.stage, 1, 1, [], []) == (0, {b"x": b"kept"}, {}, [])


@pytest.mark.parametrize("cid, first, keys, blobs", [
    (1 << 32, 1, ["k"], [b"a"]),  # (an id past u32: the key would not be the storage's)
    (-1, 1, ["k"], [b"a"]),
    (1, 0, ["k"], [b"a"]),
    (1, (1 << 64) - 1, ["k", "k"], [b"a", b"b"]),  # (a seq past 2^64 - 1)
    (1, 1, ["k"], [bytearray(b"a")]),
    (1, 1, ("k",), [b"a"]),
    (1, 1, ["k", "k"], [b"a"]),
])
def test_staging_anything_but_the_plain_case_is_left_to_python_with_nothing_changed(cid, first, keys, blobs):
    assert _staged(ledger_mod._accel.stage, cid, first, keys, blobs) == (None, {b"x": b"kept"}, {}, [])


# -- the source's side: entries read from storage checked against their hash (Ledger.verified) ----

def stored(seq: int, key: str = "k", payload: bytes = b"p", lamport: int = 1, ts_ns: int = 5,
           metadata: dict[str, str] | None = None) -> bytes:
    return entry_from_wire(wire("c", "w1", seq, key, payload, lamport, ts_ns, metadata)).encode()


NAMES = leaf_names(b"c", b"w1")


def preimage(blob: bytes, seq: int, context: str = "c", writer: str = "w1") -> bytes | None:
    out: bytes | None = ledger_mod._accel.stored_preimage(blob, seq, leaf_names(context.encode(), writer.encode()),
                                                          packed_str(context), packed_str(writer))
    return out


def test_a_stored_entry_s_preimage_is_read_in_c_at_every_encoding_boundary():
    import hashlib

    i = 0
    for k in KEYS:
        for p in PAYLOADS:
            i += 1
            seq, lamport, ts = INTS[i % len(INTS)] or 1, INTS[(i * 3) % len(INTS)], [*INTS, U64][(i * 7) % 12]
            blob = stored(seq, k, p, lamport, ts)
            pre = preimage(blob, seq)
            assert pre is not None and hashlib.sha256(pre).digest() == blob[-32:], (k[:3], len(p), seq)


STORED_UNUSUAL = {
    "metadata": lambda: stored(1, metadata={"a": "b"}),
    "non-ASCII key": lambda: stored(1, key="clé"),
    "another seq": lambda: stored(2),
    "cut short": lambda: stored(1)[:-1],
    "a byte more": lambda: stored(1) + b"\0",
    "empty": lambda: b"",
    "junk": lambda: b"\xc1" * 40,
    "keys in another order": lambda: msgpack.packb(dict(reversed(list(
        msgpack.unpackb(stored(1), raw=False).items()))), use_bin_type=True),
    "lamport negative": lambda: stored(1).replace(b"\xa7lamport\x01", b"\xa7lamport\xff"),
    "payload as a str": lambda: stored(1).replace(b"\xa7payload\xc4\x01p", b"\xa7payload\xa1p"),
    "another context (one byte flipped)": lambda: stored(1).replace(b"\xa7context\xa1c", b"\xa7context\xa1\xe3"),
    "another writer (valid UTF-8)": lambda: stored(1).replace(b"\xa6writer\xa2w1", b"\xa6writer\xa2w2"),
    "another writer (a bit flipped)": lambda: stored(1).replace(b"\xa6writer\xa2w1", b"\xa6writer\xa2\xf71"),
}


@pytest.mark.parametrize("what", sorted(STORED_UNUSUAL))
@pytest.mark.usefixtures("hashing")
def test_a_stored_entry_not_in_the_canonical_plain_form_is_left_to_python(what, monkeypatch):
    blob = STORED_UNUSUAL[what]()
    assert preimage(blob, 1) is None
    # and the decision is Python's, the same with the module or without it
    decisions = []
    for accel in (ledger_mod._accel, None):
        monkeypatch.setattr(ledger_mod, "_accel", accel)
        led = Ledger(MemoryKV(), node_id="w1", sync_meta=False)  # (the writer the blobs here name)
        led.append(codec.Append("c", "k", b"p", {}))
        ctx = led.contexts["c"]
        try:
            decisions.append(led.verified(ctx, 1, blob) == blob)
        except IntegrityError:
            decisions.append(False)
    assert decisions[0] == decisions[1]
    if what.startswith("another"):  # (the names in the entry are checked too, not only the hash)
        assert decisions == [False, False]


@pytest.mark.usefixtures("hashing")
def test_a_uint_in_a_longer_form_than_needed_is_read_in_c_as_python_reads_it():
    blob = stored(1).replace(b"\xa3seq\x01", b"\xa3seq\xcf" + (1).to_bytes(8, "big"))
    led = Ledger(MemoryKV(), node_id="w1", sync_meta=False)
    led.append(codec.Append("c", "k", b"p", {}))
    ctx = led.contexts["c"]
    assert preimage(blob, 1) is not None and led.verified(ctx, 1, blob) == blob


@pytest.mark.usefixtures("hashing")
def test_a_flipped_byte_in_storage_is_still_refused_and_the_python_path_still_decides_the_rest():
    led = Ledger(MemoryKV(), node_id="me", sync_meta=False)
    for i in range(3):
        led.append(codec.Append("c", "k", b"payload-%d" % i, {"a": "b"} if i == 2 else {}))
    ctx = led.contexts["c"]
    blobs = [led.entry_blob(ctx, s) for s in (1, 2, 3)]
    assert [led.verified(ctx, s, b) for s, b in zip((1, 2, 3), blobs, strict=True)] == blobs  # (3: metadata, Python)
    flipped = blobs[0].replace(b"payload-0", b"payload-X")
    with pytest.raises(IntegrityError, match="damaged"):
        led.verified(ctx, 1, flipped)
    with pytest.raises(IntegrityError, match="damaged"):
        led.verified(ctx, 2, blobs[0])  # another entry's bytes
    assert led.integrity_errors == 2


def test_ledger_pure_python_turns_the_c_code_off_and_status_says_which():
    import subprocess
    import sys

    from tests.unit.test_core import make_core

    code = "import node.ledger as l; print(l.ACCELERATED, l._accel is None, l.HASHING_IN_C)"
    env = {"PATH": "/usr/bin:/bin", "PYTHONPATH": str(__import__("pathlib").Path(__file__).parents[2])}
    out = [subprocess.run([sys.executable, "-c", code], env={**env, **extra}, capture_output=True, text=True,
                          timeout=60, check=True).stdout.split() for extra in ({}, {"LEDGER_PURE_PYTHON": "1"})]
    assert out[0][:2] == ["True", "False"] and out[1] == ["False", "True", "False"]
    core, _ = make_core()
    st = core.status_fields(100.0)
    assert st["accelerated"] is True and st["accelerated_sha256"] is ledger_mod.HASHING_IN_C


def test_sha256_in_c_is_found_where_python_s_hashlib_uses_openssl():
    pytest.importorskip("_hashlib")  # (CPython's OpenSSL binding)
    with open("/proc/self/maps") as f:
        if "libcrypto.so" not in f.read():
            pytest.skip("OpenSSL is linked into this Python statically: no libcrypto to find")
    assert ledger_mod.HASHING_IN_C is True
