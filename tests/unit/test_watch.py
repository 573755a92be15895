"""protocol.watch: exact-match topics, the published bodies, and the watcher's cursor.

Pure tests: no sockets, no processes. The decoder's contract is h11's: untrusted
frames either decode or raise RemoteProtocolError, so the seeded fuzz test at
the end of the decoding section allows nothing else. The cursor is checked case
by case and then against a model log published over a lossy, duplicating,
slightly reordering stream (seeded; replay with LEDGER_FUZZ_SEED=<seed>).
"""

from __future__ import annotations

import dataclasses
import os
import random
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from itertools import pairwise
from typing import Any

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol import watch
from protocol.entry import Entry, packed_str
from protocol.errors import BAD_REQUEST, INTEGRITY, IntegrityError, RemoteProtocolError
from protocol.watch import (
    MAX_AHEAD,
    RECENT,
    EntriesMsg,
    HeadMsg,
    WatchCursor,
    context_of_topic,
    decode_message,
    encode_entries,
    encode_head,
    topic,
)

pytestmark = pytest.mark.timeout(60)

SEED = int(os.environ.get("LEDGER_FUZZ_SEED", random.SystemRandom().randrange(1 << 32)))

CTX = "ctx"
ROOT = bytes(range(32))
NAMES = ["c1", "c10", "c100", "a", "a\x00b", "a\x00", "ab", "\x00", "\x01", "é", "e\u0301", "日本", "日本語",
         "🦆", "x" * 255, "x" * 256, "y" * 256, "x" * 254 + "é"]


def entry(seq: int, context: str = CTX, key: str = "k", payload: bytes | None = None,
          metadata: dict[str, str] | None = None) -> Entry:
    """A real entry with a valid leaf hash."""
    e = Entry(context, seq, key, b"p%d" % seq if payload is None else payload, metadata or {}, seq, 1000 + seq,
              "w1", hash=b"")
    return dataclasses.replace(e, hash=e.computed_hash())


def entries(first: int, last: int, context: str = CTX, key: str = "k") -> list[Entry]:
    return [entry(s, context, key) for s in range(first, last + 1)]


def entries_frames(es: Sequence[Entry], context: str = CTX) -> list[bytes]:
    return [topic(context), encode_entries(packed_str(context), [e.encode() for e in es])]


def head_fields(**over: Any) -> dict[str, Any]:
    m: dict[str, Any] = {"context": CTX, "size": 5, "lamport": 9, "root": ROOT, "node_id": "n1", "boot": "b1",
                         "heartbeat_ms": 1000, "watchers": 2}
    m.update(over)
    return m


def head_frames(**over: Any) -> list[bytes]:
    f = head_fields(**over)
    return [topic(f["context"]), encode_head(**f)]


def pack(m: Any) -> bytes:
    out: bytes = msgpack.packb(m, use_bin_type=True)
    return out


def entries_map(es: Iterable[Entry], context: str = CTX) -> dict[str, Any]:
    return {"v": 1, "type": "entries", "context": context, "entries": [e.to_wire() for e in es]}


def head_map(**over: Any) -> dict[str, Any]:
    return {"v": 1, "type": "head", **head_fields(**over)}


def expect_bad(frames: Sequence[bytes]) -> RemoteProtocolError:
    with pytest.raises(RemoteProtocolError) as info:
        decode_message(frames)
    assert info.value.code == BAD_REQUEST, info.value.message
    return info.value


# -- topics -----------------------------------------------------------------------


def test_topic_layout() -> None:
    assert topic("c1") == b"\x00\x02c1"
    assert topic("é") == b"\x00\x02\xc3\xa9"
    assert topic("x" * 256) == b"\x01\x00" + b"x" * 256


def test_no_topic_is_a_prefix_of_another_contexts_topic() -> None:
    # The raw names are prefixes of each other; the topics must not be.
    assert b"c10".startswith(b"c1") and b"a\x00b".startswith(b"a")
    topics = {n: topic(n) for n in NAMES}
    assert len(set(topics.values())) == len(NAMES)
    for a in NAMES:
        for b in NAMES:
            if a != b:
                assert not topics[b].startswith(topics[a]), (a, b)


@settings(max_examples=300, deadline=None, database=None)
@given(st.text(min_size=1, max_size=40), st.text(min_size=1, max_size=40))
def test_topics_are_prefix_free(a: str, b: str) -> None:
    if a != b:
        assert not topic(b).startswith(topic(a))
    assert context_of_topic(topic(a)) == a


@pytest.mark.parametrize("name", NAMES)
def test_context_of_topic_round_trips(name: str) -> None:
    assert context_of_topic(topic(name)) == name


@pytest.mark.parametrize("t", [
    b"", b"\x00", b"\x00\x00", b"\x00\x01", b"\x01", b"c1",
    topic("c10")[:1], topic("c10")[:2], topic("c10")[:3], topic("c10")[:4],  # wildcard prefixes
    topic("c1") + b"0", b"\x00\x03c1", b"\x00\x01c1", b"\x01\x02c1",  # wrong length
    b"\x00\x02\xff\xfe", b"\x00\x01\x80", b"\x00\x02\xc3", b"\x00\x03\xed\xa0\x80",  # invalid UTF-8, a surrogate
])
def test_context_of_topic_rejects_what_is_not_an_exact_topic(t: bytes) -> None:
    assert context_of_topic(t) is None


# -- encoding and decoding ------------------------------------------------------------


@pytest.mark.parametrize("name", ["c1", "a\x00b", "日本語", "x" * 256])
@pytest.mark.parametrize("n", [0, 1, 2, 15, 16, 17, 100])
def test_entries_round_trip(name: str, n: int) -> None:
    es = [entry(s, name, key=f"k{s % 3}", metadata={"m": str(s)} if s % 2 else None) for s in range(7, 7 + n)]
    frames = entries_frames(es, name)
    assert frames[1] == pack(entries_map(es, name))  # spliced, yet byte-identical to msgpack
    m = decode_message(frames)
    assert m == EntriesMsg(name, tuple(es))
    assert all(isinstance(e, Entry) for e in m.entries)


@pytest.mark.parametrize("n", [0, 1, 15, 16, 17, 0xFFFF, 0x10000, 70_000])
def test_entries_array_header_is_msgpacks(n: int) -> None:
    # Same blob repeated: only the framing is under test here.
    e = entry(1)
    assert encode_entries(packed_str(CTX), [e.encode()] * n) == pack(entries_map([e] * n))


def test_seventy_thousand_entries_round_trip() -> None:
    # array32 framing end to end; placeholder hashes keep it fast (the decoder does not verify them)
    started = time.perf_counter()
    es = [Entry(CTX, s, "", b"", {}, s, 0, "w", hash=bytes(32)) for s in range(1, 70_001)]
    frames = entries_frames(es)
    assert frames[1].startswith(pack(entries_map([]))[:-1] + b"\xdd" + (70_000).to_bytes(4, "big"))
    assert frames[1] == pack(entries_map(es))
    m = decode_message(frames)
    assert isinstance(m, EntriesMsg) and m.entries == tuple(es)
    assert time.perf_counter() - started < 5  # ~1 s; a quadratic regression would show


@pytest.mark.parametrize("over", [
    {}, {"context": "a\x00b"}, {"context": "日本語"}, {"context": "x" * 256},
    {"size": 0, "lamport": 0, "heartbeat_ms": 0, "watchers": 0, "node_id": "", "boot": ""},
    {"size": 2**64 - 1, "lamport": 2**64 - 1, "heartbeat_ms": 2**64 - 1, "watchers": 2**64 - 1},
])
def test_head_round_trip(over: dict[str, Any]) -> None:
    f = head_fields(**over)
    frames = head_frames(**over)
    assert msgpack.unpackb(frames[1]) == {"v": 1, "type": "head", **f}
    assert decode_message(frames) == HeadMsg(**f)


def test_unknown_fields_are_ignored() -> None:
    m = entries_map(entries(1, 2))
    m["later"] = {"x": [1, 2]}
    assert decode_message([topic(CTX), pack(m)]) == EntriesMsg(CTX, tuple(entries(1, 2)))
    h = head_map()
    h[7] = "integer key"
    assert isinstance(decode_message([topic(CTX), pack(h)]), HeadMsg)


def test_entry_hashes_are_not_verified_by_the_decoder() -> None:
    e = dataclasses.replace(entry(1), payload=b"tampered")
    (got,) = decode_message(entries_frames([e])).entries  # type: ignore[union-attr]
    assert got == e and got.hash != got.computed_hash()


def test_a_head_under_the_refusal_topic_is_limited_and_nothing_else_travels_there() -> None:
    """SPEC 16.1/16.3: topic || FF carries only `head`s, each a refusal whatever its body says."""
    lt = watch.limited_topic(CTX)
    assert lt == topic(CTX) + b"\xff" and lt.startswith(topic(CTX)) and watch.is_limited_topic(lt)
    assert not watch.is_limited_topic(topic(CTX)) and not watch.is_limited_topic(watch.repl_topic(CTX))
    assert watch.context_of_topic(lt) is None  # never counted as a watcher of anything
    m = decode_message([lt, head_frames()[1]])
    assert isinstance(m, HeadMsg) and m.limited and m.context == CTX
    assert decode_message([lt, encode_head(**head_fields(), limited=True)]) == m
    assert not decode_message(head_frames()).limited  # under the context's own topic it says what it says
    expect_bad([lt, entries_frames(entries(1, 1))[1]])
    expect_bad([watch.limited_topic("other"), head_frames()[1]])  # its context must be the topic's


# -- decoding rejects -----------------------------------------------------------------


@pytest.mark.parametrize("frames", [
    [], [topic(CTX)], [entries_frames(entries(1, 1))[1]],
    [*entries_frames(entries(1, 1)), b""], [*head_frames(), b"extra"], [b"", b"", b""],
])
def test_wrong_frame_count(frames: list[bytes]) -> None:
    expect_bad(frames)


@pytest.mark.parametrize("t", [b"", b"\x00", b"\x00\x00", topic(CTX)[:3], topic(CTX) + b"x", b"\x00\x02\xff\xfe",
                               CTX.encode(), b"\x00\x04" + CTX.encode()])
def test_topic_that_is_not_a_context_topic(t: bytes) -> None:
    expect_bad([t, entries_frames(entries(1, 1))[1]])
    expect_bad([t, head_frames()[1]])


@pytest.mark.parametrize("body", [
    b"", b"\xc1", b"\x84", b"\x84\xa1v", entries_frames(entries(1, 3))[1][:-1], head_frames()[1][:-5],
    entries_frames(entries(1, 1))[1] + b"\x00",  # trailing bytes
    head_frames()[1] * 2,
    pack(head_map()).replace(b"n1", b"\xff\xfe"),  # invalid UTF-8 in a string
    pack(head_map(context="ab")).replace(b"\xa2ab", b"\xa2\xc3\x28"),
])
def test_body_that_is_not_msgpack(body: bytes) -> None:
    expect_bad([topic(CTX), body])


@pytest.mark.parametrize("doc", [None, 1, "entries", b"bin", [1, 2], [entries_map(entries(1, 1))], 2.5, True])
def test_body_that_is_not_a_map(doc: Any) -> None:
    expect_bad([topic(CTX), pack(doc)])


@pytest.mark.parametrize("v", [0, 2, -1, 2**64 - 1, "1", None, b"\x01", [1], {"v": 1}, "missing"])
@pytest.mark.parametrize("kind", ["entries", "head"])
def test_wrong_or_missing_version(v: Any, kind: str) -> None:
    m = entries_map(entries(1, 1)) if kind == "entries" else head_map()
    if v == "missing":
        del m["v"]
    else:
        m["v"] = v
    expect_bad([topic(CTX), pack(m)])


@pytest.mark.parametrize("v", [True, 1.0])
def test_version_must_be_an_integer(v: Any) -> None:
    m = head_map()
    m["v"] = v
    expect_bad([topic(CTX), pack(m)])


@pytest.mark.parametrize("context", ["missing", None, "", 5, b"ctx", ["ctx"], "x" * 257, "Ctx", "ctx ", "c"])
@pytest.mark.parametrize("kind", ["entries", "head"])
def test_body_context_missing_invalid_or_not_the_topics(context: Any, kind: str) -> None:
    m = entries_map([]) if kind == "entries" else head_map()
    if context == "missing":
        del m["context"]
    else:
        m["context"] = context
    expect_bad([topic(CTX), pack(m)])


def test_body_of_another_context_under_a_prefix_topic() -> None:
    # The frames of c10 arriving under c1's topic (and vice versa) are refused.
    expect_bad([topic("c1"), entries_frames(entries(1, 1, "c10"), "c10")[1]])
    expect_bad([topic("c10"), entries_frames(entries(1, 1, "c1"), "c1")[1]])
    expect_bad([topic("c1"), head_frames(context="c10")[1]])


@pytest.mark.parametrize("seqs", [[1, 3], [2, 1], [1, 1], [5, 6, 8], [5, 6, 7, 6], [3, 2, 1]])
def test_entries_not_consecutive(seqs: list[int]) -> None:
    expect_bad([topic(CTX), pack(entries_map([entry(s) for s in seqs]))])


@pytest.mark.parametrize("other", ["c", "ctx2", "CTX", "x" * 256])
def test_entry_of_another_context(other: str) -> None:
    expect_bad([topic(CTX), pack(entries_map([entry(1), entry(2, other)]))])
    expect_bad([topic(CTX), pack(entries_map([entry(1, other)]))])


@pytest.mark.parametrize("entries_value", ["missing", None, {}, "e", b"", 3, {"0": entry(1).to_wire()}])
def test_entries_not_an_array(entries_value: Any) -> None:
    m = entries_map([])
    if entries_value == "missing":
        del m["entries"]
    else:
        m["entries"] = entries_value
    expect_bad([topic(CTX), pack(m)])


MALFORMED_ENTRY = [
    ("not a map", None), ("not a map", [1]), ("not a map", "e"),
    ("seq", "missing"), ("seq", 0), ("seq", -1), ("seq", "1"), ("seq", True), ("seq", 1.0),
    ("hash", "missing"), ("hash", b"\x00" * 31), ("hash", b"\x00" * 33), ("hash", "h" * 32), ("hash", None),
    ("payload", "missing"), ("payload", "text"), ("payload", None),
    ("key", "missing"), ("key", 1), ("key", "k" * 257),
    ("writer", ""), ("writer", "w" * 65), ("writer", None),
    ("metadata", "missing"), ("metadata", [1]), ("metadata", {"k": 1}), ("metadata", {1: "v"}),
    ("metadata", {"": "v"}), ("metadata", {f"k{i}": "v" for i in range(65)}),
    ("lamport", -1), ("lamport", "1"), ("ts_ns", None), ("ts_ns", 2.5),
    ("context", "missing"), ("context", ""), ("context", 7),
]


@pytest.mark.parametrize("field, value", MALFORMED_ENTRY)
def test_malformed_entry(field: str, value: Any) -> None:
    m = entries_map(entries(1, 2))
    if field == "not a map":
        m["entries"][1] = value
    elif value == "missing":
        del m["entries"][1][field]
    else:
        m["entries"][1][field] = value
    expect_bad([topic(CTX), pack(m)])


@pytest.mark.parametrize("field, value", [
    ("root", "missing"), ("root", None), ("root", b""), ("root", ROOT[:31]), ("root", ROOT + b"\x00"),
    ("root", ROOT.hex()[:32]), ("root", list(ROOT)),
    ("node_id", "missing"), ("node_id", 1), ("node_id", b"n1"), ("node_id", None),
    ("boot", "missing"), ("boot", 1), ("boot", b"b1"), ("boot", ["b"]),
    *[(f, v) for f in ("size", "lamport", "heartbeat_ms", "watchers")
      for v in ("missing", None, -1, -(2**63), "5", True, False, 5.0, b"\x05", [5])],
])
def test_malformed_head(field: str, value: Any) -> None:
    m = head_map()
    if value == "missing":
        del m[field]
    else:
        m[field] = value
    expect_bad([topic(CTX), pack(m)])


@pytest.mark.parametrize("kind", ["missing", None, "nope", "ENTRIES", "Head", "", 1, b"head", ["head"]])
def test_unknown_type(kind: Any) -> None:
    for m in (head_map(), entries_map(entries(1, 1))):
        if kind == "missing":
            del m["type"]
        else:
            m["type"] = kind
        expect_bad([topic(CTX), pack(m)])


JUNK: list[Any] = [None, True, False, -1, 0, 1, 2**64 - 1, -(2**63), 0.5, "", "x" * 300, "ctx", b"", b"\xff" * 32,
                   [], {}, [1, 2], {"a": 1}, {1: 2}, [None], "head", "entries", msgpack.ExtType(5, b"x")]


def valid_frames() -> list[list[bytes]]:
    es = [entry(s, key=f"k{s % 2}", metadata={"m": "v"} if s % 3 == 0 else None) for s in range(4, 24)]
    return [
        entries_frames(es[:1]), entries_frames(es[:3]), entries_frames(es), entries_frames([]),
        entries_frames(entries(1, 2, "c10"), "c10"), entries_frames(entries(1, 1, "日本"), "日本"),
        head_frames(), head_frames(context="c1", size=0), head_frames(context="x" * 256, size=2**64 - 1),
    ]


def mutate(rng: random.Random, frames: list[bytes]) -> list[bytes]:
    t, body = frames
    kind = rng.randrange(10)
    if kind == 0:
        return [t, rng.randbytes(rng.randrange(0, 300))]
    if kind == 1:  # overwrite a few bytes
        b = bytearray(body)
        for _ in range(rng.randrange(1, 5)):
            b[rng.randrange(len(b))] = rng.randrange(256)
        return [t, bytes(b)]
    if kind == 2:  # truncate or extend
        cut = rng.randrange(len(body) + 1)
        return [t, body[:cut] if rng.random() < 0.7 else body + rng.randbytes(rng.randrange(1, 8))]
    if kind == 3:  # insert or delete bytes
        b = bytearray(body)
        for _ in range(rng.randrange(1, 4)):
            pos = rng.randrange(len(b) + 1)
            if rng.random() < 0.5:
                b[pos:pos] = rng.randbytes(rng.randrange(1, 4))
            else:
                del b[pos:pos + rng.randrange(1, 4)]
        return [t, bytes(b)]
    if kind == 4:  # a field of the body, or of one of its entries, replaced with junk
        m = msgpack.unpackb(body)
        target = m
        if m.get("entries") and rng.random() < 0.6:
            target = rng.choice(m["entries"])
        target[rng.choice([*target, "extra"])] = rng.choice(JUNK)
        return [t, pack(m)]
    if kind == 5:  # a field dropped
        m = msgpack.unpackb(body)
        del m[rng.choice(list(m))]
        return [t, pack(m)]
    if kind == 6:  # a broken topic
        choices = [b"", rng.randbytes(rng.randrange(1, 6)), t[:rng.randrange(len(t))], t + b"x",
                   bytes([t[0] ^ 1]) + t[1:], t[:2] + rng.randbytes(len(t) - 2), topic("c1"), topic("ctx2")]
        return [rng.choice(choices), body]
    if kind == 7:  # the wrong number of frames
        n = rng.choice([0, 1, 3, 4])
        return [rng.choice([t, body, b""]) for _ in range(n)]
    if kind == 8:  # a random msgpack value as the body
        return [t, pack(rng.choice(JUNK))]
    # entries swapped, dropped or duplicated inside a valid body
    m = msgpack.unpackb(body)
    if m.get("entries"):
        es = m["entries"]
        i, j = rng.randrange(len(es)), rng.randrange(len(es))
        es[i], es[j] = es[j], es[i]
        if rng.random() < 0.5:
            es.insert(i, es[j])
    return [t, pack(m)]


def check_decoded(frames: list[bytes], m: watch.WatchMsg) -> None:
    """What the decoder returns satisfies what it promises."""
    assert m.context == context_of_topic(frames[0])
    if isinstance(m, EntriesMsg):
        assert all(e.context == m.context for e in m.entries)
        assert all(b.seq == a.seq + 1 for a, b in pairwise(m.entries))
    else:
        assert len(m.root) == 32 and isinstance(m.node_id, str) and isinstance(m.boot, str)


def test_fuzz_only_remote_protocol_error_escapes() -> None:
    print(f"watch fuzz seed {SEED} (replay with LEDGER_FUZZ_SEED={SEED})")
    rng = random.Random(SEED)
    valid = valid_frames()
    decoded = rejected = 0
    for i in range(5000):
        frames = mutate(rng, list(rng.choice(valid)))
        try:
            m = decode_message(frames)
        except RemoteProtocolError as exc:
            assert exc.code in (BAD_REQUEST, INTEGRITY)  # INTEGRITY: a lamport above the ceiling
            rejected += 1
            continue
        except Exception as exc:  # anything else is a decoder bug
            pytest.fail(f"seed {SEED} case {i}: {type(exc).__name__}: {exc} decoding {frames!r}")
        check_decoded(frames, m)
        decoded += 1
    assert rejected > 1000 and decoded > 50, (SEED, rejected, decoded)


# -- the cursor: live delivery ----------------------------------------------------------


def seqs(es: Iterable[Entry]) -> list[int]:
    return [e.seq for e in es]


def test_new_cursor() -> None:
    c = WatchCursor(CTX, 5)
    assert (c.last, c.known_size, c.key, c.max_ahead) == (5, 5, None, MAX_AHEAD)
    assert (c.delivered, c.duplicates, c.dropped_ahead, c.ahead, c.last_hash) == (0, 0, 0, {}, None)
    assert not c.needs_refill() and c.refill_after() == 5


def test_in_order_delivery() -> None:
    c = WatchCursor(CTX, 0)
    es = entries(1, 5)
    assert c.on_entries(es[:2]) == es[:2]
    assert c.on_entries([]) == []
    assert c.on_entries(es[2:]) == es[2:]
    assert (c.last, c.known_size, c.delivered, c.duplicates, c.last_hash) == (5, 5, 5, 0, es[4].hash)
    assert not c.needs_refill() and c.refill_after() == 4  # one back: the page shows #5 is still #5


def test_resuming_after_a_seq_drops_what_came_before() -> None:
    c = WatchCursor(CTX, 5)
    assert seqs(c.on_entries(entries(3, 7))) == [6, 7]
    assert (c.last, c.duplicates, c.delivered) == (7, 3, 2)


def test_duplicates_are_dropped_and_counted() -> None:
    c = WatchCursor(CTX, 0)
    es = entries(1, 4)
    c.on_entries(es)
    assert c.on_entries(es[1:3]) == []
    assert c.on_entries([es[0]]) == []
    assert (c.last, c.delivered, c.duplicates) == (4, 4, 3)


def test_entries_ahead_of_a_gap_are_held_then_released_in_order() -> None:
    c = WatchCursor(CTX, 0)
    es = entries(1, 6)
    assert c.on_entries([es[0]]) == [es[0]]
    assert c.on_entries([es[3], es[4]]) == []
    assert c.on_entries([es[2]]) == []  # still a gap at 2
    assert sorted(c.ahead) == [3, 4, 5] and c.last == 1 and c.known_size == 5 and c.needs_refill()
    assert c.on_entries([es[3]]) == [] and c.duplicates == 1  # already held
    assert c.on_entries([es[1]]) == es[1:5]
    assert c.ahead == {} and c.last == 5 and not c.needs_refill()
    assert c.on_entries([es[5]]) == [es[5]]
    assert (c.delivered, c.last_hash) == (6, es[5].hash)


def test_a_message_that_fills_the_gap_and_goes_on() -> None:
    c = WatchCursor(CTX, 0)
    es = entries(1, 8)
    c.on_entries(es[4:6])  # 5, 6 held
    assert c.on_entries(es[:5]) == es[:6]  # 1..4, 5 (a duplicate of a held one: already released)
    assert c.on_entries(es[6:]) == es[6:]
    assert c.last == 8 and c.ahead == {} and c.delivered == 8


def test_two_gaps_release_in_two_steps() -> None:
    c = WatchCursor(CTX, 0)
    es = entries(1, 7)
    c.on_entries([es[1], es[2], es[5], es[6]])
    assert seqs(c.on_entries([es[0]])) == [1, 2, 3]
    assert sorted(c.ahead) == [6, 7] and c.needs_refill()
    # 5 is held, then 4 fills the second gap within the same message
    assert seqs(c.on_entries([es[4], es[3]])) == [4, 5, 6, 7]
    assert (c.last, c.ahead, c.delivered, c.duplicates) == (7, {}, 7, 0)


def test_needs_refill_exactly_when_known_size_is_ahead_of_last() -> None:
    c = WatchCursor(CTX, 3)
    for size, want in [(3, False), (4, True)]:
        c.on_head(size)
        assert c.needs_refill() is want and c.needs_refill() == (c.known_size > c.last)
    c.on_entries([entry(4)])
    assert not c.needs_refill()
    c.on_entries([entry(6)])
    assert c.needs_refill() and c.known_size == 6


def test_a_head_below_what_the_same_stream_announced_is_another_history() -> None:
    # A replica that switched to its writer's history after the writer lost a tail: its boot is
    # the same, its stream now announces fewer entries than before (SPEC 16.4 step 7, 17.4).
    c = WatchCursor(CTX, 0)
    c.on_entries(entries(1, 6))
    c.on_head(6)
    with pytest.raises(IntegrityError, match="announced 6 entries .* and now 3"):
        c.on_head(3)
    c2 = WatchCursor(CTX, 0)
    c2.on_head(5)  # a head over the stream may say more than this cursor has read
    with pytest.raises(IntegrityError):
        c2.on_head(4)
    # after a restart of the node (a new boot), its stream starts over; continuity is then
    # checked over the request socket (check_size)
    c3 = WatchCursor(CTX, 0)
    c3.on_entries(entries(1, 4))
    c3.new_stream()
    c3.on_head(2)
    assert c3.known_size == 4 and c3.last == 4


def test_a_republished_entry_under_a_delivered_seq_with_another_hash_is_another_history() -> None:
    # A replica that switched histories re-publishes the writer's entries from #1; a busy context
    # sends no heads, so the entries themselves must show it (not only the one at `last`).
    c = WatchCursor(CTX, 0)
    old = entries(1, 10)
    c.on_entries(old)
    assert c.on_entries(old[:6]) == [] and c.duplicates == 6  # the same entries again: duplicates
    new = old[:6] + [entry(7, payload=b"other")]
    with pytest.raises(IntegrityError, match="#7 differs"):
        c.on_entries(new)
    # only the last RECENT are kept: memory stays bounded for a long watch
    c2 = WatchCursor(CTX, 0)
    for lo in range(1, 3 * RECENT, 100):
        c2.on_entries(entries(lo, lo + 99))
    assert len(c2.recent) <= 2 * RECENT and max(c2.recent) == c2.last


def test_head_at_or_above_last_is_fine() -> None:
    c = WatchCursor(CTX, 0)
    c.on_head(0)
    c.on_entries(entries(1, 3))
    c.on_head(3)
    c.on_head(2**64 - 1)
    assert c.known_size == 2**64 - 1 and c.last == 3


@pytest.mark.parametrize("after, size", [(1, 0), (5, 4), (3, 0)])
def test_fresh_size_below_last_is_a_rollback(after: int, size: int) -> None:
    c = WatchCursor(CTX, after)
    with pytest.raises(IntegrityError) as info:
        c.check_size(size)
    assert info.value.code == INTEGRITY
    assert info.value.details == {"context": CTX, "size": size, "delivered_seq": after}
    assert (c.last, c.known_size) == (after, after)


def test_fresh_size_below_delivered_entries_is_a_rollback() -> None:
    c = WatchCursor(CTX, 0)
    c.on_entries(entries(1, 4))
    with pytest.raises(IntegrityError):
        c.check_size(3)
    with pytest.raises(IntegrityError):
        c.on_page([], next_after=3, size=3)


def test_a_stale_published_head_below_last_is_not_a_rollback() -> None:
    # Heads come over the watch socket, pages over the request socket: a head
    # queued before a refill may arrive after it, smaller than `last`.
    c = WatchCursor(CTX, 0)
    c.on_entries([entry(1)])
    c.on_entries([entry(3)])
    assert seqs(c.on_page(entries(2, 5), next_after=5, size=5)) == [2, 3, 4, 5]
    c.on_head(3)
    assert (c.last, c.known_size, c.needs_refill()) == (5, 5, False)


def test_final_page_voids_held_entries_beyond_the_nodes_size() -> None:
    c = WatchCursor(CTX, 0)
    c.on_entries([entry(1), entry(4)])  # #4 from before a node lost its tail
    assert seqs(c.on_page([entry(2)], next_after=2, size=2)) == [2]
    assert c.ahead == {} and (c.last, c.known_size) == (2, 2)


def test_key_filter_live() -> None:
    c = WatchCursor(CTX, 0, key="a")
    a1, b2, a3, b4 = entry(1, key="a"), entry(2, key="b"), entry(3, key="a"), entry(4, key="b")
    assert c.on_entries([a1, b2]) == [a1]
    assert (c.last, c.last_hash) == (2, b2.hash)
    assert c.on_entries([b4]) == [] and c.last == 2 and c.needs_refill()  # held behind a gap
    assert c.on_entries([a3]) == [a3]
    assert (c.last, c.delivered, c.ahead, c.needs_refill()) == (4, 2, {}, False)


def test_key_filter_live_that_matches_nothing() -> None:
    c = WatchCursor(CTX, 0, key="zzz")
    assert c.on_entries(entries(1, 5)) == []
    assert (c.last, c.delivered, c.needs_refill()) == (5, 0, False)


def test_max_ahead_drops_extra_entries_and_a_refill_delivers_them_once() -> None:
    c = WatchCursor(CTX, 0, max_ahead=2)
    es = entries(1, 8)
    c.on_entries([es[0]])
    assert c.on_entries(es[2:6]) == []  # 3, 4 held; 5, 6 dropped
    assert sorted(c.ahead) == [3, 4] and c.dropped_ahead == 2 and c.known_size == 6
    assert c.on_entries([es[1]]) == es[1:4]
    assert c.last == 4 and c.needs_refill()
    assert c.on_page(es[4:6], next_after=6, size=6) == es[4:6]
    assert c.on_entries(es[4:8]) == es[6:8] and c.duplicates == 2
    assert c.delivered == 8


def test_max_ahead_zero_holds_nothing() -> None:
    c = WatchCursor(CTX, 0, max_ahead=0)
    assert c.on_entries(entries(2, 4)) == []
    assert c.ahead == {} and c.dropped_ahead == 3 and c.needs_refill()
    assert seqs(c.on_page(entries(1, 4), 4, 4)) == [1, 2, 3, 4]


def test_max_ahead_then_a_refill_covering_held_and_dropped_entries() -> None:
    c = WatchCursor(CTX, 0, max_ahead=3)
    es = entries(1, 10)
    c.on_entries(es[1:10])
    assert sorted(c.ahead) == [2, 3, 4] and c.dropped_ahead == 6
    assert c.on_page(es, next_after=10, size=10) == es
    assert c.ahead == {} and c.duplicates == 3 and c.delivered == 10 and not c.needs_refill()


# -- the cursor: refills ---------------------------------------------------------------------


def test_a_refill_shows_whether_the_last_delivered_entry_is_still_there() -> None:
    # A writer that lost #5..#6 in a crash and wrote others under those seqs: the refill after
    # #6 starts at #6 and shows it changed, instead of splicing the new #7 onto the old history.
    c = WatchCursor(CTX, 0)
    old = entries(1, 6)
    c.on_entries(old)
    new = old[:4] + [entry(s, payload=b"new") for s in range(5, 9)]
    c.on_head(8)
    assert c.refill_after() == 5
    with pytest.raises(IntegrityError, match="#6 differs"):
        c.on_page(new[5:], next_after=8, size=8)
    assert c.last == 6 and c.delivered == 6  # nothing of the other history delivered
    # unchanged: the overlap is dropped, the rest delivered, and asked once per position
    c2 = WatchCursor(CTX, 0)
    c2.on_entries(old[:3])
    c2.on_head(6)
    assert c2.on_page(old[2:3], next_after=3, size=6, more=True) == []  # only the overlap fitted
    assert c2.refill_after() == 3 and c2.on_page(old[3:6], next_after=6, size=6) == old[3:6]


def test_refill_fills_the_gap_and_releases_what_was_held() -> None:
    c = WatchCursor(CTX, 0)
    es = entries(1, 6)
    c.on_entries([es[0], es[3], es[4]])
    assert c.refill_after() == 0  # from #1, which was delivered: a page without it is fine too
    assert c.on_page(es[1:3], next_after=3, size=5, more=True) == es[1:5]
    assert (c.last, c.ahead, c.needs_refill()) == (5, {}, False)
    assert c.on_entries([es[5]]) == [es[5]]


def test_refill_overlapping_held_entries_delivers_each_once() -> None:
    c = WatchCursor(CTX, 0)
    es = entries(1, 6)
    c.on_entries([es[2], es[3], es[5]])
    assert c.on_page(es[:4], next_after=4, size=6, more=True) == es[:4]
    assert sorted(c.ahead) == [6] and c.duplicates == 2 and c.needs_refill()
    assert c.on_page([es[4]], next_after=5, size=6) == es[4:6]
    assert (c.last, c.ahead, c.delivered, c.needs_refill()) == (6, {}, 6, False)


def test_refill_in_pages() -> None:
    c = WatchCursor(CTX, 2)
    es = entries(1, 9)
    c.on_head(9)
    out: list[Entry] = []
    for lo, hi, more in [(3, 5, True), (6, 8, True), (9, 9, False)]:
        # one entry back once the cursor knows the hash of what it delivered last
        assert c.needs_refill() and c.refill_after() == (lo - 1 if lo == 3 else lo - 2)
        out += c.on_page(es[lo - 1:hi], next_after=hi, size=9, more=more)
    assert out == es[2:] and not c.needs_refill() and c.last_hash == es[8].hash


def test_empty_final_page_when_up_to_date() -> None:
    c = WatchCursor(CTX, 4)
    assert c.on_page([], next_after=4, size=4) == []
    assert (c.last, c.known_size, c.needs_refill()) == (4, 4, False)


def test_more_pages_do_not_reset_known_size_final_pages_set_it() -> None:
    c = WatchCursor(CTX, 0)
    c.on_head(10)
    c.on_page(entries(1, 2), next_after=2, size=8, more=True)
    assert c.known_size == 10 and c.needs_refill()
    c.on_page(entries(3, 4), next_after=4, size=12, more=True)
    assert c.known_size == 12
    c.on_page(entries(5, 8), next_after=8, size=8, more=False)
    assert c.known_size == 8 and c.last == 8 and not c.needs_refill()


def test_refill_with_key_filter_skips_by_next_after() -> None:
    c = WatchCursor(CTX, 0, key="a")
    a2, a4 = entry(2, key="a"), entry(4, key="a")
    c.on_head(7)
    assert c.on_page([a2, a4], next_after=6, size=7, more=True) == [a2, a4]
    assert (c.last, c.last_hash, c.needs_refill(), c.refill_after()) == (6, None, True, 6)
    assert c.on_page([], next_after=7, size=7) == []
    assert (c.last, c.last_hash, c.needs_refill(), c.delivered) == (7, None, False, 2)


def test_refill_with_key_filter_ending_on_a_returned_entry_keeps_its_hash() -> None:
    c = WatchCursor(CTX, 0, key="a")
    a3 = entry(3, key="a")
    assert c.on_page([a3], next_after=3, size=5, more=True) == [a3]
    assert (c.last, c.last_hash) == (3, a3.hash)


def test_refill_with_key_filter_releases_held_entries_and_drops_covered_ones() -> None:
    c = WatchCursor(CTX, 0, key="a")
    a1, a3, b4, a5, a6 = entry(1, key="a"), entry(3, key="a"), entry(4, key="b"), entry(5, key="a"), entry(6, key="a")
    c.on_entries([a1])
    c.on_entries([a3, b4, a6])  # 2 (a "b") and 5 were lost
    assert c.on_page([a3], next_after=3, size=6, more=True) == [a3]  # then 4 (b, not delivered)
    assert c.last == 4 and sorted(c.ahead) == [6] and c.needs_refill()
    assert c.on_page([a5, a6], next_after=6, size=6) == [a5, a6]
    assert (c.last, c.ahead, c.delivered, c.needs_refill()) == (6, {}, 4, False)


def test_page_entries_beyond_size_are_a_rollback() -> None:
    c = WatchCursor(CTX, 0)
    with pytest.raises(IntegrityError):
        c.on_page(entries(1, 3), next_after=3, size=2)


def test_page_next_after_beyond_size_is_a_rollback() -> None:
    c = WatchCursor(CTX, 0, key="a")
    with pytest.raises(IntegrityError):
        c.on_page([], next_after=9, size=5)


@pytest.mark.parametrize("after, page, key", [
    (3, [entry(3)], None),  # already delivered
    (3, [entry(2)], None),
    (0, [entry(2), entry(1)], None),  # out of order
    (0, [entry(1), entry(1)], None),
    (0, [entry(1, "ctx2")], None),  # another context
    (0, [entry(1), entry(2, "c")], None),
    (0, [entry(2)], None),  # skipped #1 without a key filter
    (0, [entry(1), entry(3)], None),
    (5, [entry(7)], None),
    (0, [entry(1, key="b")], "a"),  # wrong key
    (0, [entry(1, key="a"), entry(3, key="")], "a"),
    (0, [entry(3, key="a"), entry(2, key="a")], "a"),  # out of order with a key filter
    (0, [entry(1, "other", key="a")], "a"),
])
def test_page_rejects(after: int, page: list[Entry], key: str | None) -> None:
    c = WatchCursor(CTX, after, key)
    with pytest.raises(IntegrityError) as info:
        c.on_page(page, next_after=max(seqs(page)), size=10)
    assert info.value.code == INTEGRITY


def test_page_with_entries_beyond_its_next_after_is_rejected() -> None:
    c = WatchCursor(CTX, 0)
    with pytest.raises(IntegrityError):
        c.on_page(entries(1, 3), next_after=2, size=3)


@pytest.mark.parametrize("page, next_after", [([], 3), ([entry(1)], 3)])
def test_page_without_key_filter_cannot_skip_by_next_after(page: list[Entry], next_after: int) -> None:
    c = WatchCursor(CTX, 0)
    with pytest.raises(IntegrityError, match="examined up to"):
        c.on_page(page, next_after=next_after, size=3)
    assert c.last == 0


# -- the cursor against a model log ------------------------------------------------------


def model_get(log: Sequence[Entry], size: int, after: int, key: str | None, limit: int,
              max_scan: int) -> tuple[list[Entry], int, bool, int]:
    """The node's `get` (node.ledger.Ledger.get): (entries, size, more, next_after)."""
    if after >= size:
        return [], size, False, after
    out: list[Entry] = []
    last_seen = after
    examined = 0
    for e in log[after:size]:
        examined += 1
        last_seen = e.seq
        if key is not None and e.key != key:
            if examined >= max_scan:
                break
            continue
        out.append(e)
        if len(out) >= limit or examined >= max_scan:
            break
    return out, size, last_seen < size, last_seen


def run_model(seed: int) -> Counter[str]:
    """One seeded run; returns what happened in it (so the test can check the model exercised the cursor)."""
    rng = random.Random(seed)
    n = rng.randrange(0, 60)
    log = [entry(s, key=rng.choice("abc"), payload=rng.randbytes(rng.randrange(3))) for s in range(1, n + 1)]
    blobs = [e.encode() for e in log]
    size = rng.randrange(0, n + 1)  # the node's size when the watcher subscribes
    after = rng.randrange(0, size + 1)
    key = rng.choice([None, None, "a", "b", "zzz"])
    cursor = WatchCursor(CTX, after, key, max_ahead=rng.choice([0, 1, 3, MAX_AHEAD]))
    limit, max_scan = rng.randrange(1, 8), rng.randrange(1, 12)
    p_drop, p_dup, window = rng.choice([0.0, 0.2, 0.5]), rng.choice([0.0, 0.1, 0.3]), rng.choice([1, 2, 4])
    t, cp = topic(CTX), packed_str(CTX)
    in_flight: list[list[bytes]] = []
    got: list[Entry] = []
    stats: Counter[str] = Counter()
    where = f"seed {seed} (replay with LEDGER_FUZZ_SEED={seed}): n={n} after={after} key={key!r}"

    def feed(frames: list[bytes]) -> None:
        stats["messages"] += 1
        m = decode_message(frames)
        if isinstance(m, EntriesMsg):
            got.extend(cursor.on_entries(m.entries))
        else:
            cursor.on_head(m.size)

    def head_now() -> list[bytes]:
        return [t, encode_head(CTX, size, size, ROOT, "n1", "boot", 1000, 1)]

    def refill() -> None:
        page, last_seq, more, next_after = model_get(log, size, cursor.refill_after(), key, limit, max_scan)
        got.extend(cursor.on_page(page, next_after, last_seq, more))
        stats["refills"] += 1
        stats["pages with more"] += more

    def check() -> None:
        assert cursor.needs_refill() == (cursor.known_size > cursor.last), where
        assert after <= cursor.last <= size and cursor.known_size <= size, where
        assert all(s > cursor.last + 1 for s in cursor.ahead) and len(cursor.ahead) <= cursor.max_ahead, where
        assert all(a.seq < b.seq for a, b in pairwise(got)), where

    if rng.random() < 0.8:
        feed(head_now())  # the greeting
    while size < n or in_flight:
        r = rng.random()
        if size < n and r < 0.35:  # the node appends a batch and publishes it in chunks
            k = rng.randint(1, min(8, n - size))
            chunk: list[bytes] = []
            for s in range(size + 1, size + k + 1):
                chunk.append(blobs[s - 1])
                if s == size + k or rng.random() < 0.4:
                    if rng.random() >= p_drop:
                        in_flight.append([t, encode_entries(cp, chunk)])
                        if rng.random() < p_dup:
                            in_flight.append([t, encode_entries(cp, chunk)])
                    chunk = []
            size += k
        elif r < 0.45:
            feed(head_now())
        elif in_flight:
            feed(in_flight.pop(rng.randrange(min(window, len(in_flight)))))
        if cursor.needs_refill() and rng.random() < 0.5:
            refill()
        check()
    feed(head_now())
    for _ in range(2 * n + 2):  # a page of one entry may hold only the overlap (refill_after)
        if not cursor.needs_refill():
            break
        refill()
        check()
    assert not cursor.needs_refill(), where
    want = [e for e in log if e.seq > after and (key is None or e.key == key)]
    assert seqs(got) == seqs(want), where
    assert got == want and cursor.delivered == len(want) and cursor.last == n, where
    stats.update(delivered=cursor.delivered, duplicates=cursor.duplicates, dropped_ahead=cursor.dropped_ahead,
                 key_filtered=key is not None)
    return stats


def test_model_log_over_a_lossy_stream() -> None:
    print(f"watch model seeds {SEED}..{SEED + 399} (replay with LEDGER_FUZZ_SEED=<seed>)")
    started = time.perf_counter()
    stats: Counter[str] = Counter()
    for i in range(400):
        stats += run_model(SEED + i)
    print(dict(stats))
    assert stats["messages"] > 3500 and stats["delivered"] > 2500 and stats["refills"] > 1000, stats
    assert stats["pages with more"] > 100 and stats["duplicates"] > 100 and stats["dropped_ahead"] > 100, stats
    assert stats["key_filtered"] > 100, stats
    assert time.perf_counter() - started < 5


def test_a_switch_to_another_history_is_an_error_not_a_silent_splice() -> None:
    # a fork moved the node to another writer's history: entries of another writer
    c = WatchCursor(CTX, 0)
    c.on_entries(entries(1, 2))
    other = Entry(CTX, 3, "", b"x", {}, 9, 9, "another-writer", b"")
    other = dataclasses.replace(other, hash=other.computed_hash())
    with pytest.raises(IntegrityError, match="another history"):
        c.on_entries([other])
    with pytest.raises(IntegrityError, match="another history"):
        WatchCursor(CTX, 0).on_page(entries(1, 2) + [other], next_after=3, size=3)


def test_a_different_entry_under_the_last_delivered_seq_is_an_error() -> None:
    c = WatchCursor(CTX, 0)
    c.on_entries(entries(1, 3))
    again = dataclasses.replace(entry(3), payload=b"rewritten")
    again = dataclasses.replace(again, hash=again.computed_hash())
    with pytest.raises(IntegrityError, match="differs from the entry delivered"):
        c.on_entries([again])
    c.on_entries([entry(3)])  # the same entry again is a plain duplicate
    assert c.duplicates == 1


def test_peek_reads_context_first_seq_and_count_from_headers_only() -> None:
    from protocol.watch import peek_entries

    body = encode_entries(packed_str(CTX), [e.encode() for e in entries(5, 9)])
    assert peek_entries([topic(CTX), body]) == (CTX, 5, 5)
    head = encode_head(CTX, 3, 1, bytes(32), "n", "b", 1000, 0)
    assert peek_entries([topic(CTX), head]) is None  # not entries: decode in full
    assert peek_entries([topic(CTX), encode_entries(packed_str(CTX), [])]) is None
    assert peek_entries([b"", body]) is None and peek_entries([topic(CTX)]) is None


def test_peek_never_raises_and_agrees_with_the_full_decode_on_mutated_messages() -> None:
    import random as _random

    from protocol.watch import peek_entries

    seed = int(os.environ.get("LEDGER_FUZZ_SEED", _random.randrange(1 << 30)))
    rng = _random.Random(seed)
    base = encode_entries(packed_str(CTX), [e.encode() for e in entries(1, 3)])
    for _ in range(3000):
        b = bytearray(base)
        for _ in range(rng.randrange(1, 4)):
            b[rng.randrange(len(b))] = rng.randrange(256)
        if rng.random() < 0.2:
            b = b[: rng.randrange(len(b))]
        frames = [topic(CTX), bytes(b)]
        got = peek_entries(frames)
        if got is None:
            continue
        try:
            m = decode_message(frames)
        except RemoteProtocolError:
            continue  # the peek is only a hint; the full decode still judges the message
        if isinstance(m, EntriesMsg) and m.entries:
            assert got == (m.context, m.entries[0].seq, len(m.entries)), f"seed {seed}"
