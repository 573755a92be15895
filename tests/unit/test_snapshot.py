"""protocol.snapshot: the stream format, its reader and the incremental verifier."""

from __future__ import annotations

import io
from collections.abc import Iterable
from dataclasses import replace

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol import snapshot as S
from protocol.entry import Entry, leaf_hash
from protocol.errors import IntegrityError
from protocol.merkle import Frontier

pytestmark = pytest.mark.timeout(60)

CTX = "orders"


def make_entries(n: int, context: str = CTX) -> list[Entry]:
    out = []
    for seq in range(1, n + 1):
        f = dict(context=context, seq=seq, key="facts", payload=b"payload %d" % seq, metadata={"i": str(seq)},
                 lamport=10 * seq, ts_ns=1_700_000_000 + seq, writer="n1")
        out.append(Entry(**f, hash=leaf_hash(**f)))
    return out


def root_of(entries: Iterable[Entry]) -> bytes:
    f = Frontier()
    for e in entries:
        f.append(e.hash)
    return f.root()


def stream(entries: list[Entry], context: str = CTX, size: int | None = None, root: bytes | None = None) -> bytes:
    size = len(entries) if size is None else size
    root = root_of(entries) if root is None else root
    return S.encode_header(context, size, root) + b"".join(e.encode() for e in entries)


def load(blob: bytes, context: str | None = None) -> SnapshotResult:
    """Read and verify a snapshot the way the client and the node do (for the header's
    context unless the caller expects a given one)."""
    header, entries = S.read_snapshot(io.BytesIO(blob))
    v = S.SnapshotVerifier(context or header["context"], header["size"], header["root"])
    got = []
    for e in entries:
        v.add(e)
        got.append(e)
    v.finish()
    return SnapshotResult(header, got, v.max_lamport)


class SnapshotResult:
    def __init__(self, header: dict, entries: list[Entry], max_lamport: int) -> None:
        self.header = header
        self.entries = entries
        self.max_lamport = max_lamport


# -- good streams ----------------------------------------------------------------------


@pytest.mark.parametrize("n", [0, 1, 2, 3, 7, 8, 33])
def test_a_good_stream_is_accepted(n):
    es = make_entries(n)
    r = load(stream(es))
    assert r.entries == es
    assert r.header == {"format": S.FORMAT, "version": S.VERSION, "context": CTX, "size": n, "root": root_of(es)}
    assert r.max_lamport == (10 * n if n else 0)


def test_header_is_a_plain_msgpack_map():
    h = msgpack.unpackb(S.encode_header("c", 3, b"\x01" * 32), raw=False)
    assert h == {"format": "converge-ledger-snapshot", "version": 1, "context": "c", "size": 3, "root": b"\x01" * 32}


def test_verifier_counts_and_tracks_max_lamport():
    es = make_entries(4)
    v = S.SnapshotVerifier(CTX, 4, root_of(es))
    for i, e in enumerate(es):
        assert v.count == i
        v.add(e)
    assert v.count == 4 and v.max_lamport == 40
    v.finish()


# -- the verifier rejects every kind of bad stream --------------------------------------


def expect_rejected(blob: bytes, context: str | None = None) -> IntegrityError:
    with pytest.raises(IntegrityError) as info:
        load(blob, context)
    return info.value


def test_truncated_stream_missing_entries():
    es = make_entries(5)
    err = expect_rejected(S.encode_header(CTX, 5, root_of(es)) + b"".join(e.encode() for e in es[:4]))
    assert "truncated" in str(err)


def test_extra_entry():
    es = make_entries(6)
    expect_rejected(S.encode_header(CTX, 5, root_of(es[:5])) + b"".join(e.encode() for e in es))


def test_extra_junk_object_after_the_entries():
    es = make_entries(3)
    expect_rejected(stream(es) + msgpack.packb(5))
    expect_rejected(stream(es) + msgpack.packb({"not": "an entry"}))


@pytest.mark.parametrize("order", [[1, 0, 2], [0, 2, 1], [2, 1, 0], [0, 0, 1, 2], [0, 1, 1, 2]])
def test_reordered_or_repeated_entries(order):
    es = make_entries(3)
    expect_rejected(S.encode_header(CTX, len(order), root_of(es)) + b"".join(es[i].encode() for i in order))


def test_stream_not_starting_at_seq_1():
    es = make_entries(4)
    expect_rejected(S.encode_header(CTX, 3, root_of(es[1:])) + b"".join(e.encode() for e in es[1:]))


def test_wrong_context():
    es = make_entries(3)
    # the stream is internally consistent but for another context
    expect_rejected(stream(es), context="other")
    # an entry of another context in the middle (its own hash is valid)
    mixed = es[:1] + make_entries(2, "other")[1:] + es[2:]
    expect_rejected(stream(mixed, root=root_of(mixed)))


@pytest.mark.parametrize("field, value", [
    ("payload", b"payload X"), ("key", "intents"), ("metadata", {"i": "9"}), ("lamport", 1), ("ts_ns", 0),
    ("writer", "n2"),
])
def test_tampered_entry(field, value):
    es = make_entries(3)
    bad = es[:1] + [replace(es[1], **{field: value})] + es[2:]
    err = expect_rejected(stream(bad, root=root_of(es)))
    assert "hash" in str(err)


def test_tampered_entry_with_rehashed_leaf_fails_the_root():
    es = make_entries(3)
    t = replace(es[1], payload=b"forged")
    t = replace(t, hash=t.computed_hash())
    err = expect_rejected(stream([es[0], t, es[2]], root=root_of(es)))
    assert "root" in str(err)


def test_wrong_root_or_size():
    es = make_entries(3)
    expect_rejected(stream(es, root=bytes(32)))
    expect_rejected(stream(es, root=root_of(es[:2])))
    expect_rejected(stream(es, size=4))
    expect_rejected(stream(es[:2], size=2, root=root_of(es)))


def test_the_duplicated_last_entry_mutation_is_rejected():
    # CVE-2012-2459 on a snapshot: repeat the last entry and claim size 4 with the root
    # of 3. Whether as a copy (seq 3 twice) or re-numbered, it cannot pass.
    es = make_entries(3)
    expect_rejected(S.encode_header(CTX, 4, root_of(es)) + b"".join(e.encode() for e in es + es[-1:]))
    renumbered = replace(es[-1], seq=4)
    expect_rejected(S.encode_header(CTX, 4, root_of(es)) + b"".join(e.encode() for e in es + [renumbered]))


def test_verifier_rejects_before_finish_and_stays_unaccepting():
    es = make_entries(3)
    v = S.SnapshotVerifier(CTX, 3, root_of(es))
    v.add(es[0])
    with pytest.raises(IntegrityError):
        v.finish()  # truncated
    with pytest.raises(IntegrityError):
        v.add(es[2])  # skips seq 2


# -- read_snapshot on bad bytes -----------------------------------------------------------


def read_all(blob: bytes) -> list[Entry]:
    _, entries = S.read_snapshot(io.BytesIO(blob))
    return list(entries)


@pytest.mark.parametrize("blob", [
    b"", b"\xc1", b"\x00", b"garbage bytes", msgpack.packb([1, 2, 3]), msgpack.packb("converge-ledger-snapshot"),
    msgpack.packb({"format": "other", "version": 1, "context": "c", "size": 0, "root": bytes(32)}),
    msgpack.packb({"format": S.FORMAT, "version": 2, "context": "c", "size": 0, "root": bytes(32)}),
    msgpack.packb({"format": S.FORMAT, "version": 1, "context": "c", "size": -1, "root": bytes(32)}),
    msgpack.packb({"format": S.FORMAT, "version": 1, "context": "c", "size": "3", "root": bytes(32)}),
    msgpack.packb({"format": S.FORMAT, "version": 1, "context": "c", "size": 0, "root": bytes(31)}),
    msgpack.packb({"format": S.FORMAT, "version": 1, "context": 5, "size": 0, "root": bytes(32)}),
    msgpack.packb({"format": S.FORMAT, "version": 1, "size": 0, "root": bytes(32)}),
], ids=lambda b: b[:12].hex() or "empty")
def test_read_snapshot_rejects_a_bad_header(blob):
    with pytest.raises(IntegrityError):
        read_all(blob)


@pytest.mark.parametrize("n", [1, 3])
def test_read_snapshot_rejects_every_truncation(n):
    blob = stream(make_entries(n))
    header_len = len(S.encode_header(CTX, n, bytes(32)))
    boundaries = {header_len + sum(len(e.encode()) for e in make_entries(n)[:k]) for k in range(n + 1)}
    for cut in range(len(blob)):
        if cut in boundaries:
            # cut between entries: the reader cannot tell, the verifier's count does
            continue
        with pytest.raises(IntegrityError):
            read_all(blob[:cut])
    for cut in boundaries - {len(blob)}:
        with pytest.raises(IntegrityError):
            load(blob[:cut])


@pytest.mark.parametrize("junk", [b"\x92", b"\x85\xa7context", b"\xc1", b"\xff\xff", b"\xa3\xff\xfe\xfd",
                                  msgpack.packb({1: 2}), msgpack.packb([1])])
def test_read_snapshot_rejects_trailing_junk(junk):
    blob = stream(make_entries(3))
    with pytest.raises(IntegrityError):
        read_all(blob + junk)
    with pytest.raises(IntegrityError):
        load(blob + junk)


def test_read_snapshot_rejects_a_malformed_entry():
    es = make_entries(2)
    m = es[1].to_wire()
    m["seq"] = "two"
    blob = S.encode_header(CTX, 2, root_of(es)) + es[0].encode() + msgpack.packb(m, use_bin_type=True)
    with pytest.raises(IntegrityError):
        read_all(blob)


def test_read_snapshot_streams_in_small_reads():
    # A stream that hands out a few bytes per read (a pipe) reads the same.
    es = make_entries(20)
    blob = stream(es)

    class Trickle(io.RawIOBase):
        def __init__(self, data: bytes) -> None:
            self.data = data
            self.pos = 0

        def readable(self) -> bool:
            return True

        def readinto(self, b) -> int:  # type: ignore[no-untyped-def]
            n = min(len(b), 7, len(self.data) - self.pos)
            b[:n] = self.data[self.pos : self.pos + n]
            self.pos += n
            return n

    header, entries = S.read_snapshot(Trickle(blob))
    assert list(entries) == es and header["size"] == 20
    with pytest.raises(IntegrityError):
        list(S.read_snapshot(Trickle(blob + b"\x92"))[1])
    with pytest.raises(IntegrityError):
        list(S.read_snapshot(Trickle(blob[:-3]))[1])


@settings(max_examples=200, deadline=None, database=None)
@given(st.binary(max_size=300))
def test_read_snapshot_raises_only_integrity_error(blob):
    try:
        read_all(blob)
    except IntegrityError:
        pass


@settings(max_examples=100, deadline=None, database=None)
@given(st.integers(0, 10_000), st.integers(0, 255))
def test_any_single_byte_change_is_rejected(pos, value):
    es = make_entries(4)
    blob = bytearray(stream(es))
    pos %= len(blob)
    if blob[pos] == value:
        return
    blob[pos] = value
    try:
        r = load(bytes(blob))
    except IntegrityError:
        return
    # The only accepted change is one that keeps every entry and the root intact
    # (e.g. a msgpack re-encoding of an equal value, which a byte flip cannot make).
    pytest.fail(f"byte {pos} set to {value:#x} was accepted: {r.entries}")


def test_a_snapshot_header_may_carry_its_writers_signed_head_which_must_be_of_that_head():
    import io

    import msgpack

    from protocol.heads import sign_head
    from protocol.keys import Identity
    from protocol.snapshot import encode_header, read_snapshot

    w = Identity.generate()
    root = b"r" * 32
    h, _ = read_snapshot(io.BytesIO(encode_header("notes", 3, root, sign_head(w, "notes", 3, root))))
    assert h["signed"]["key"] == w.public
    for other in (sign_head(w, "notes", 2, root), sign_head(w, "other", 3, root), sign_head(w, "notes", 3, b"x" * 32)):
        with pytest.raises(IntegrityError, match="not of the snapshot's context, size and root"):
            read_snapshot(io.BytesIO(encode_header("notes", 3, root, other)))
    bad = msgpack.packb({"format": "converge-ledger-snapshot", "version": 1, "context": "notes", "size": 3,
                         "root": root, "signed": {"size": "three"}}, use_bin_type=True)
    with pytest.raises(IntegrityError, match="malformed signed head"):
        read_snapshot(io.BytesIO(bad))
