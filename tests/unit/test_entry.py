"""protocol.entry: the leaf hash layout, Entry.verify, and the wire form's validation."""

from __future__ import annotations

import hashlib
import struct
from typing import Any

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol import entry as E
from protocol.entry import Entry, decode_entry, entry_from_wire, leaf_hash, leaf_hash_raw
from protocol.errors import BAD_REQUEST, INTEGRITY, IntegrityError, RemoteProtocolError
from protocol.lamport import MAX_LAMPORT

pytestmark = pytest.mark.timeout(60)

FAST = settings(max_examples=60, deadline=None, database=None)

BASE: dict[str, Any] = dict(
    context="orders/eu",
    seq=7,
    key="facts",
    payload=b"\x00\x01payload",
    metadata={"b": "2", "a": "1"},
    lamport=42,
    ts_ns=1_700_000_000_123_456_789,
    writer="node-a",
)


def spec_leaf_hash(context, seq, key, payload, metadata, lamport, ts_ns, writer, prefix=b"\x00") -> bytes:
    """The layout of the module docstring, written out independently."""

    def lp(b: bytes) -> bytes:
        return struct.pack(">I", len(b)) + b

    out = prefix + struct.pack(">Q", seq) + struct.pack(">Q", lamport) + struct.pack(">Q", ts_ns)
    out += lp(context.encode("utf-8")) + lp(writer.encode("utf-8")) + lp(key.encode("utf-8"))
    pairs = sorted((k.encode("utf-8"), v.encode("utf-8")) for k, v in metadata.items())
    out += struct.pack(">I", len(pairs))
    for k, v in pairs:
        out += lp(k) + lp(v)
    out += lp(payload)
    return hashlib.sha256(out).digest()


def make_entry(**changes: Any) -> Entry:
    fields = dict(BASE, **changes)
    return Entry(**fields, hash=leaf_hash(**fields))


# -- leaf_hash ----------------------------------------------------------------------


def test_leaf_hash_follows_the_documented_layout():
    assert leaf_hash(**BASE) == spec_leaf_hash(**BASE)


names = st.text(max_size=12)
meta = st.dictionaries(st.text(max_size=6), st.text(max_size=6), max_size=5)
u64 = st.integers(min_value=0, max_value=2**64 - 1)


@FAST
@given(names, u64, names, st.binary(max_size=64), meta, u64, u64, names)
def test_leaf_hash_matches_the_layout_for_any_fields(context, seq, key, payload, metadata, lamport, ts_ns, writer):
    args = (context, seq, key, payload, metadata, lamport, ts_ns, writer)
    expected = spec_leaf_hash(*args)
    assert leaf_hash(*args) == expected
    assert leaf_hash_raw(context.encode(), seq, key.encode(), payload, metadata, lamport, ts_ns,
                         writer.encode()) == expected


CHANGES = [
    ("context", "orders/eu2"),
    ("context", "Orders/eu"),
    ("seq", 8),
    ("key", "intents"),
    ("key", ""),
    ("payload", b"\x00\x01payloae"),
    ("payload", b""),
    ("metadata", {"b": "2", "a": "1", "c": ""}),
    ("metadata", {"b": "2", "a": "x"}),
    ("metadata", {"b": "2", "A": "1"}),
    ("metadata", {}),
    ("lamport", 43),
    ("ts_ns", 1_700_000_000_123_456_788),
    ("writer", "node-b"),
]


@pytest.mark.parametrize("field, value", CHANGES, ids=[f"{f}={v!r}" for f, v in CHANGES])
def test_leaf_hash_changes_when_any_one_field_changes(field, value):
    assert leaf_hash(**dict(BASE, **{field: value})) != leaf_hash(**BASE)


def test_every_field_is_covered_by_the_changes_above():
    assert {f for f, _ in CHANGES} == set(BASE)


def test_metadata_order_does_not_matter():
    forward = {"a": "1", "b": "2", "zz": "3", "é": "4"}
    backward = dict(reversed(list(forward.items())))
    assert list(forward) != list(backward)
    assert leaf_hash(**dict(BASE, metadata=forward)) == leaf_hash(**dict(BASE, metadata=backward))


def test_non_ascii_metadata_keys_sort_by_their_utf8_bytes():
    md = {"\uffff": "a", "\U00010000": "b", "a": "c"}
    assert leaf_hash(**dict(BASE, metadata=md)) == spec_leaf_hash(**dict(BASE, metadata=md))


@pytest.mark.parametrize(
    "a, b",
    [
        (dict(context="ab", writer="c"), dict(context="a", writer="bc")),
        (dict(writer="ab", key="c"), dict(writer="a", key="bc")),
        (dict(key="ab", payload=b"c"), dict(key="a", payload=b"bc")),
        (dict(metadata={"ab": "c"}), dict(metadata={"a": "bc"})),
        (dict(metadata={"a": "b", "c": "d"}), dict(metadata={"a": "b\x00\x00\x00\x01c"})),
        (dict(seq=1, lamport=2), dict(seq=2, lamport=1)),
        (dict(lamport=5, ts_ns=6), dict(lamport=6, ts_ns=5)),
    ],
)
def test_length_prefixes_keep_field_boundaries_unambiguous(a, b):
    assert leaf_hash(**dict(BASE, **a)) != leaf_hash(**dict(BASE, **b))


def test_leaf_hash_is_domain_separated():
    # Without the 0x00 prefix, or with the inner-node prefix 0x01, the hash differs.
    h = leaf_hash(**BASE)
    assert E.LEAF_PREFIX == b"\x00"
    assert h != spec_leaf_hash(**BASE, prefix=b"")
    assert h != spec_leaf_hash(**BASE, prefix=b"\x01")


def test_same_content_different_seq_gives_different_leaves():
    hashes = {leaf_hash(**dict(BASE, seq=s)) for s in range(1, 50)}
    assert len(hashes) == 49


# -- Entry ----------------------------------------------------------------------------


def test_entry_verify_accepts_its_own_hash():
    e = make_entry()
    e.verify()
    assert e.computed_hash() == e.hash == leaf_hash(**BASE)


@pytest.mark.parametrize("field, value", CHANGES, ids=[f"{f}={v!r}" for f, v in CHANGES])
def test_entry_verify_rejects_any_tampered_field(field, value):
    good = make_entry()
    fields = {f: getattr(good, f) for f in E.ENTRY_FIELDS}
    fields[field] = value
    with pytest.raises(IntegrityError):
        Entry(**fields).verify()


def test_entry_verify_rejects_a_tampered_or_missing_hash():
    good = make_entry()
    for h in (b"", b"\x00" * 32, bytes([good.hash[0] ^ 1]) + good.hash[1:], good.hash[:31]):
        with pytest.raises(IntegrityError):
            Entry(**{f: getattr(good, f) for f in E.ENTRY_FIELDS[:-1]}, hash=h).verify()


def test_entry_is_frozen():
    e = make_entry()
    with pytest.raises(AttributeError):
        e.seq = 9  # type: ignore[misc]


def test_wire_round_trip_and_encoding():
    e = make_entry(context="ctx ünïcødé", metadata={"k": "v", "k2": ""})
    assert set(e.to_wire()) == set(E.ENTRY_FIELDS)
    back = decode_entry(e.encode())
    assert back == e
    back.verify()
    m = msgpack.unpackb(e.encode(), raw=False)
    assert m == e.to_wire()
    # binary stays binary on the wire (use_bin_type), strings stay strings
    assert isinstance(m["payload"], bytes) and isinstance(m["hash"], bytes) and isinstance(m["context"], str)


@FAST
@given(names.filter(lambda s: 1 <= len(s.encode()) <= 256), st.integers(1, 2**64 - 1), names, st.binary(max_size=64),
       meta.filter(lambda d: all(d)), st.integers(0, MAX_LAMPORT), u64,
       names.filter(lambda s: 1 <= len(s.encode()) <= 64))
def test_any_valid_entry_round_trips(context, seq, key, payload, metadata, lamport, ts_ns, writer):
    e = make_entry(context=context, seq=seq, key=key, payload=payload, metadata=metadata, lamport=lamport,
                   ts_ns=ts_ns, writer=writer)
    back = decode_entry(e.encode())
    assert back == e
    back.verify()


# -- entry_from_wire: every field checked -----------------------------------------


def wire(**changes: Any) -> dict[str, Any]:
    m = make_entry().to_wire()
    m.update(changes)
    return m


def expect_bad(m: object) -> RemoteProtocolError:
    with pytest.raises(RemoteProtocolError) as info:
        entry_from_wire(m)
    assert info.value.code == BAD_REQUEST
    return info.value


@pytest.mark.parametrize("missing", E.ENTRY_FIELDS)
def test_entry_from_wire_rejects_a_missing_field(missing):
    m = wire()
    del m[missing]
    err = expect_bad(m)
    assert missing in err.message


BAD_VALUES = [
    ("context", 5), ("context", b"ctx"), ("context", ""), ("context", "x" * 257), ("context", None),
    ("context", "bad\udcff"),
    ("seq", 0), ("seq", -1), ("seq", 2**64), ("seq", "1"), ("seq", 1.0), ("seq", True), ("seq", None),
    ("key", 3), ("key", b"k"), ("key", "k" * 257), ("key", None),
    ("payload", "text"), ("payload", 1), ("payload", None), ("payload", [1]),
    ("metadata", [("a", "b")]), ("metadata", "a=b"), ("metadata", {"a": 1}), ("metadata", {1: "a"}),
    ("metadata", {"": "a"}), ("metadata", {"a": b"b"}), ("metadata", {f"k{i}": "v" for i in range(65)}),
    ("metadata", {"a": "v" * 4097}),
    ("lamport", -1), ("lamport", 2**64), ("lamport", "1"), ("lamport", None), ("lamport", False),
    ("ts_ns", -5), ("ts_ns", 1.5), ("ts_ns", None),
    ("writer", ""), ("writer", 7), ("writer", "w" * 65), ("writer", None),
    ("hash", b"\x00" * 31), ("hash", b"\x00" * 33), ("hash", "00" * 32), ("hash", None),
]


@pytest.mark.parametrize("field, value", BAD_VALUES, ids=[f"{f}-{i}" for i, (f, _) in enumerate(BAD_VALUES)])
def test_entry_from_wire_rejects_mistyped_or_out_of_range_fields(field, value):
    expect_bad(wire(**{field: value}))


@pytest.mark.parametrize("lamport", [MAX_LAMPORT + 1, 2**64 - 2, 2**64 - 1])
def test_an_entry_with_a_lamport_above_the_ceiling_is_refused_as_integrity(lamport):
    # a well-formed entry (from a load, a pull or a push) that would poison the clock (issue #12)
    for m in (wire(lamport=lamport), wire(lamport=lamport, metadata={"a": "é"})):  # fast path, full checks
        with pytest.raises(RemoteProtocolError) as info:
            entry_from_wire(m)
        assert info.value.code == INTEGRITY and "ceiling" in info.value.message


@pytest.mark.parametrize("m", [None, [], "entry", b"\x81", 5, [("context", "c")]])
def test_entry_from_wire_rejects_non_maps(m):
    expect_bad(m)


def test_entry_from_wire_accepts_limits_and_ignores_nothing_it_needs():
    m = wire(context="c" * 256, key="k" * 256, writer="w" * 64, seq=2**64 - 1, lamport=MAX_LAMPORT,
             metadata={f"k{i}": "v" * 4096 for i in range(64)}, payload=b"")
    e = entry_from_wire(m)
    assert e.seq == 2**64 - 1 and e.payload == b"" and len(e.metadata) == 64
    # The hash is not verified by entry_from_wire: that is Entry.verify's job.
    with pytest.raises(IntegrityError):
        e.verify()


@pytest.mark.parametrize(
    "blob", [b"", b"\xc1", b"\x93\x01\x02", b"\x85\xa7context", msgpack.packb([1, 2]), msgpack.packb({1: 2}),
             b"\xa3\xff\xfe\xfd"]
)
def test_decode_entry_rejects_junk_with_remote_protocol_error(blob):
    with pytest.raises(RemoteProtocolError):
        decode_entry(blob)


@FAST
@given(st.binary(max_size=200))
def test_decode_entry_raises_only_remote_protocol_error(blob):
    try:
        decode_entry(blob)
    except RemoteProtocolError:
        pass


def test_decode_entry_rejects_invalid_utf8_in_strings():
    good = make_entry(context="AAAA").encode()
    bad = good.replace(b"\xa4AAAA", b"\xa4\xff\xfeAA")
    assert bad != good
    with pytest.raises(RemoteProtocolError):
        decode_entry(bad)


# -- entry_from_wire's fast path (plain ASCII names, no metadata) --------------------------------
# The fast path must accept exactly what the full checks accept and build the same Entry;
# anything it does not take falls through to the full checks and their error messages.

PLAIN = dict(metadata={})


@pytest.mark.parametrize("field, value", [(f, v) for f, v in BAD_VALUES if f != "metadata"],
                         ids=[f"{f}-{i}" for i, (f, _) in enumerate(BAD_VALUES) if f != "metadata"])
def test_the_fast_path_rejects_what_the_full_checks_reject(field, value):
    err = expect_bad(wire(**PLAIN, **{field: value}))
    with pytest.raises(RemoteProtocolError) as full:
        E._entry_from_wire_checked(wire(**PLAIN, **{field: value}))
    assert err.message == full.value.message


def test_the_fast_path_builds_an_entry_equal_to_the_constructor():
    e = make_entry(metadata={})
    back = entry_from_wire(e.to_wire())
    assert back == e and type(back) is Entry
    back.verify()
    with pytest.raises(AttributeError):
        back.seq = 8  # type: ignore[misc]  # still frozen


names = st.text(min_size=1, max_size=12)


@FAST
@given(context=names, key=st.text(max_size=12), writer=names, seq=st.integers(0, 2**64),
       lamport=st.integers(-1, 2**64), metadata=st.sampled_from([{}, {"a": "b"}, None, [], {"é": "x"}]),
       payload=st.sampled_from([b"", b"p", "p", None]), h=st.sampled_from([b"h" * 32, b"h" * 31, None]),
       extra=st.booleans())
def test_the_fast_path_and_the_full_checks_agree(context, key, writer, seq, lamport, metadata, payload, h, extra):
    m: dict[str, Any] = dict(context=context, seq=seq, key=key, payload=payload, metadata=metadata,
                             lamport=lamport, ts_ns=5, writer=writer, hash=h)
    if extra:
        m["extra"] = 1  # unknown fields are ignored by both
    try:
        want: Entry | str = E._entry_from_wire_checked(m)
    except RemoteProtocolError as exc:
        want = exc.message
    try:
        got: Entry | str = entry_from_wire(m)
    except RemoteProtocolError as exc:
        got = exc.message
    assert got == want


@FAST
@given(context=st.text(min_size=1, max_size=20), key=st.text(max_size=20), writer=st.text(min_size=1, max_size=20),
       seq=st.integers(1, 2**64 - 1), lamport=st.integers(0, 2**64 - 1), ts_ns=st.integers(0, 2**64 - 1),
       payload=st.binary(max_size=50), metadata=st.dictionaries(st.text(min_size=1, max_size=5), st.text(max_size=5),
                                                                 max_size=4))
def test_leaf_hash_named_is_the_documented_leaf_hash(context, key, writer, seq, lamport, ts_ns, payload, metadata):
    names = E.leaf_names(context.encode(), writer.encode())
    got = E.leaf_hash_named(names, seq, key.encode(), payload, metadata, lamport, ts_ns)
    assert got == spec_leaf_hash(context, seq, key, payload, metadata, lamport, ts_ns, writer)
