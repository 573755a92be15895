"""Entries: the data model, their leaf hash and their wire form.

The leaf hash is defined over a fixed binary layout rather than over msgpack,
so that any language can recompute it without a canonical msgpack encoder:

    SHA-256( 0x00
             || u64be(seq) || u64be(lamport) || u64be(ts_ns)
             || lp(context) || lp(writer) || lp(key)
             || u32be(number of metadata pairs)
             || lp(k1) || lp(v1) || ...   pairs sorted by the UTF-8 bytes of k
             || lp(payload) )

where lp(x) is u32be(len(x)) || x and strings are UTF-8.
"""

from __future__ import annotations

import hashlib
import struct
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import msgpack

from protocol.errors import BAD_REQUEST, INTEGRITY, IntegrityError, RemoteProtocolError
from protocol.lamport import MAX_LAMPORT

LEAF_PREFIX = b"\x00"

MAX_CONTEXT_BYTES = 256
MAX_KEY_BYTES = 256
MAX_WRITER_BYTES = 64
MAX_META_PAIRS = 64
MAX_META_KEY_BYTES = 256
MAX_META_VALUE_BYTES = 4096

ENTRY_FIELDS = ("context", "seq", "key", "payload", "metadata", "lamport", "ts_ns", "writer", "hash")

_head = struct.Struct(">QQQ")
_u32 = struct.Struct(">I")
_sha256 = hashlib.sha256


_u32p = _u32.pack


def leaf_hash(
    context: str,
    seq: int,
    key: str,
    payload: bytes,
    metadata: Mapping[str, str],
    lamport: int,
    ts_ns: int,
    writer: str,
) -> bytes:
    """The Merkle leaf of an entry: commits to every field, seq included."""
    return leaf_hash_raw(context.encode(), seq, key.encode(), payload, metadata, lamport, ts_ns, writer.encode())


def leaf_hash_raw(
    c: bytes,
    seq: int,
    k: bytes,
    payload: bytes,
    metadata: Mapping[str, str],
    lamport: int,
    ts_ns: int,
    w: bytes,
) -> bytes:
    """`leaf_hash` with context, key and writer already UTF-8 encoded (hot path)."""
    if metadata:
        pairs = sorted((mk.encode(), mv.encode()) for mk, mv in metadata.items())
        meta = b"".join(_u32p(len(mk)) + mk + _u32p(len(mv)) + mv for mk, mv in pairs)
    else:
        meta = b""
    # One join instead of many small writes: this runs on every append.
    return _sha256(b"".join((
        LEAF_PREFIX, _head.pack(seq, lamport, ts_ns),
        _u32p(len(c)), c, _u32p(len(w)), w, _u32p(len(k)), k,
        _u32p(len(metadata)), meta, _u32p(len(payload)), payload,
    ))).digest()


def leaf_names(c: bytes, w: bytes) -> bytes:
    """lp(context) || lp(writer): the part of the leaf layout that is the same for every entry of
    one context (a node keeps it per context)."""
    return _u32p(len(c)) + c + _u32p(len(w)) + w


_NO_META = b"\x00\x00\x00\x00"
_headp = _head.pack


def leaf_hash_named(names: bytes, seq: int, k: bytes, payload: bytes, metadata: Mapping[str, str],
                    lamport: int, ts_ns: int) -> bytes:
    """`leaf_hash_raw` with `names` = `leaf_names(context, writer)` (the node's hot path)."""
    if metadata:
        pairs = sorted((mk.encode(), mv.encode()) for mk, mv in metadata.items())
        meta = _u32p(len(pairs)) + b"".join(_u32p(len(mk)) + mk + _u32p(len(mv)) + mv for mk, mv in pairs)
    else:
        meta = _NO_META
    return _sha256(b"".join((
        LEAF_PREFIX, _headp(seq, lamport, ts_ns), names, _u32p(len(k)), k, meta, _u32p(len(payload)), payload,
    ))).digest()


# leaf_names of recently seen (context, writer) pairs: a watcher or replica verifies many
# entries of few contexts. Bounded; cleared when full.
_NAMES: dict[tuple[str, str], bytes] = {}
_NAMES_MAX = 4096


def _names_of(context: str, writer: str) -> bytes:
    k = (context, writer)
    names = _NAMES.get(k)
    if names is None:
        names = leaf_names(context.encode(), writer.encode())
        if len(_NAMES) >= _NAMES_MAX:
            _NAMES.clear()
        _NAMES[k] = names
    return names


@dataclass(frozen=True, slots=True)
class Entry:
    """One stored record. Never changed once written."""

    context: str
    seq: int
    key: str
    payload: bytes
    metadata: dict[str, str] = field(default_factory=dict)
    lamport: int = 0
    ts_ns: int = 0
    writer: str = ""
    hash: bytes = b""

    def computed_hash(self) -> bytes:
        return leaf_hash_named(_names_of(self.context, self.writer), self.seq, self.key.encode(), self.payload,
                               self.metadata, self.lamport, self.ts_ns)

    def verify(self) -> None:
        """Raise IntegrityError unless `hash` is the leaf hash of the fields."""
        if self.computed_hash() != self.hash:
            raise IntegrityError(f"entry {self.context!r}#{self.seq} does not match its hash")

    def to_wire(self) -> dict[str, Any]:
        return {
            "context": self.context,
            "seq": self.seq,
            "key": self.key,
            "payload": self.payload,
            "metadata": self.metadata,
            "lamport": self.lamport,
            "ts_ns": self.ts_ns,
            "writer": self.writer,
            "hash": self.hash,
        }

    def encode(self) -> bytes:
        return encode_entry_map(self.to_wire())


_packer_opts: dict[str, Any] = {"use_bin_type": True}
_pack = msgpack.Packer(use_bin_type=True).pack


def packed_str(s: str) -> bytes:
    """A string as msgpack, for `encode_entry_parts` (encode names once, not per entry)."""
    out: bytes = _pack(s)
    return out


def encode_entry_parts(
    context_packed: bytes,
    seq: int,
    key: str,
    payload: bytes,
    metadata: Mapping[str, str],
    lamport: int,
    ts_ns: int,
    writer_packed: bytes,
    h: bytes,
) -> bytes:
    """The wire map of an entry, byte-identical to `Entry.encode()`, built from
    pre-packed names: it runs once per stored entry."""
    return b"".join((
        b"\x89\xa7context", context_packed,
        b"\xa3seq", _pack(seq),
        b"\xa3key", _pack(key),
        b"\xa7payload", _pack(payload),
        b"\xa8metadata", _pack(metadata) if metadata else b"\x80",
        b"\xa7lamport", _pack(lamport),
        b"\xa5ts_ns", _pack(ts_ns),
        b"\xa6writer", writer_packed,
        b"\xa4hash\xc4\x20", h,
    ))


def encode_entry_map(m: Mapping[str, Any]) -> bytes:
    out: bytes = msgpack.packb(m, **_packer_opts)
    return out


def _bad(msg: str) -> RemoteProtocolError:
    return RemoteProtocolError(BAD_REQUEST, msg)


def check_name(what: str, value: object, max_bytes: int, min_bytes: int = 1) -> str:
    """Validate a UTF-8 string field; returns it or raises RemoteProtocolError."""
    if not isinstance(value, str):
        raise _bad(f"{what} must be a string, got {type(value).__name__}")
    try:
        n = len(value.encode())
    except UnicodeEncodeError:
        raise _bad(f"{what} is not valid UTF-8") from None
    if n < min_bytes or n > max_bytes:
        if min_bytes == 1 and n == 0:
            raise _bad(f"{what} must not be empty")
        raise _bad(f"{what} must be {min_bytes}..{max_bytes} bytes of UTF-8, got {n}")
    return value


def check_metadata(value: object) -> dict[str, str]:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise _bad(f"metadata must be a map of strings, got {type(value).__name__}")
    if len(value) > MAX_META_PAIRS:
        raise _bad(f"metadata has {len(value)} pairs, at most {MAX_META_PAIRS} allowed")
    for k, v in value.items():
        check_name("metadata key", k, MAX_META_KEY_BYTES)
        check_name(f"metadata value of {k!r}", v, MAX_META_VALUE_BYTES, min_bytes=0)
    return value


def _uint(what: str, value: object) -> int:
    if type(value) is not int or value < 0 or value >= 1 << 64:
        raise _bad(f"{what} must be an unsigned 64-bit integer")
    return value


def _lamport(value: object) -> int:
    v = _uint("entry lamport", value)
    if v > MAX_LAMPORT:
        # a well-formed entry that breaks the clock's bound: data no node may accept (SPEC 9.1)
        raise RemoteProtocolError(INTEGRITY, f"entry lamport {v} is above the ceiling {MAX_LAMPORT}",
                                  {"max_lamport": MAX_LAMPORT})
    return v


# Building a frozen dataclass through its __init__ costs ~1 us (one
# object.__setattr__ per field); setting the slots through their descriptors
# costs half that. Entries are built once per received entry (replicas, watchers).
_new = object.__new__
_SET = tuple(Entry.__dict__[f].__set__ for f in ENTRY_FIELDS)


def make_entry(
    context: str, seq: int, key: str, payload: bytes, metadata: dict[str, str],
    lamport: int, ts_ns: int, writer: str, h: bytes,
) -> Entry:
    """`Entry(...)` from fields already checked (hot path)."""
    e: Entry = _new(Entry)
    sc, ss, sk, sp, sm, sl, st, sw, sh = _SET
    sc(e, context)
    ss(e, seq)
    sk(e, key)
    sp(e, payload)
    sm(e, metadata)
    sl(e, lamport)
    st(e, ts_ns)
    sw(e, writer)
    sh(e, h)
    return e


_U64 = 1 << 64


def entry_from_wire(m: object) -> Entry:
    """An Entry from its wire map, every field checked (hash not verified)."""
    # The common case in a few type checks; anything unusual (a missing or
    # mistyped field, non-ASCII names, metadata) goes through the full checks,
    # which also word the error.
    if type(m) is dict and len(m) >= 9:
        try:
            c = m["context"]
            seq = m["seq"]
            k = m["key"]
            payload = m["payload"]
            md = m["metadata"]
            lamport = m["lamport"]
            ts = m["ts_ns"]
            w = m["writer"]
            h = m["hash"]
        except KeyError:
            return _entry_from_wire_checked(m)
        if (
            type(payload) is bytes and type(h) is bytes and len(h) == 32
            and type(seq) is int and 0 < seq < _U64
            and type(lamport) is int and 0 <= lamport <= MAX_LAMPORT
            and type(ts) is int and 0 <= ts < _U64
            and type(c) is str and 0 < len(c) <= MAX_CONTEXT_BYTES and c.isascii()
            and type(k) is str and len(k) <= MAX_KEY_BYTES and k.isascii()
            and type(w) is str and 0 < len(w) <= MAX_WRITER_BYTES and w.isascii()
            and type(md) is dict and not md
        ):
            return make_entry(c, seq, k, payload, md, lamport, ts, w, h)
    return _entry_from_wire_checked(m)


def _entry_from_wire_checked(m: object) -> Entry:
    if not isinstance(m, dict):
        raise _bad("an entry must be a map")
    missing = [f for f in ENTRY_FIELDS if f not in m]
    if missing:
        raise _bad(f"entry is missing {', '.join(missing)}")
    payload = m["payload"]
    if not isinstance(payload, bytes):
        raise _bad("entry payload must be binary")
    h = m["hash"]
    if not isinstance(h, bytes) or len(h) != 32:
        raise _bad("entry hash must be 32 bytes of binary")
    seq = _uint("entry seq", m["seq"])
    if seq < 1:
        raise _bad("entry seq starts at 1")
    return make_entry(
        check_name("context", m["context"], MAX_CONTEXT_BYTES),
        seq,
        check_name("key", m["key"], MAX_KEY_BYTES, min_bytes=0),
        payload,
        check_metadata(m["metadata"]),
        _lamport(m["lamport"]),
        _uint("entry ts_ns", m["ts_ns"]),
        check_name("writer", m["writer"], MAX_WRITER_BYTES),
        h,
    )


def decode_entry(blob: bytes) -> Entry:
    """Decode one encoded entry (as stored or as sent in a reply)."""
    try:
        m = msgpack.unpackb(blob, raw=False, unicode_errors="surrogateescape")
    except Exception as exc:  # msgpack raises several types for junk
        raise _bad(f"entry is not valid msgpack: {exc}") from None
    return entry_from_wire(m)
