"""Protocol v1 messages: request types, decoding with validation, reply encoding.

Theory of operation
-------------------
A request is one msgpack map: {"v": 1, "id": ..., "op": "<name>", ...fields}.
`decode_request` turns bytes into one of the frozen request dataclasses below
or raises `RemoteProtocolError` (the only error it raises on bad input; the
node turns it into an error reply that echoes `id` when it could be read).
Unknown fields are ignored so that later minor additions stay compatible; a
higher `v` than we speak is refused with UNSUPPORTED_VERSION.

Replies are maps {"v": 1, "id": ..., "ok": true, ...} or
{"v": 1, "id": ..., "ok": false, "error": {"code", "message", ...}}.
Entries in replies are spliced in already encoded (`encode_reply(raw=...)`),
so the node never re-encodes a stored entry.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import msgpack

from protocol import heads
from protocol.address import parse_address
from protocol.digest import NBUCKETS, SUB
from protocol.entry import (
    MAX_CONTEXT_BYTES,
    MAX_KEY_BYTES,
    MAX_WRITER_BYTES,
    Entry,
    check_metadata,
    check_name,
    entry_from_wire,
)
from protocol.errors import (
    BAD_REQUEST,
    TOO_LARGE,
    UNKNOWN_OP,
    UNSUPPORTED_VERSION,
    RemoteProtocolError,
)
from protocol.heads import SignedHead
from protocol.lamport import MAX_LAMPORT

PROTOCOL_VERSION = 1
SUPPORTED_VERSIONS = (1,)

MAX_ID_BYTES = 64
MAX_DEDUP_BYTES = 128
MAX_GET_LIMIT = 10_000
DEFAULT_GET_LIMIT = 1_000
MAX_BATCH = 100_000
MAX_CONTEXTS_LIMIT = 10_000
MAX_REPLICAS = 64
MAX_FORK_INDEX = 1 << 32
U64 = 1 << 64

RequestId = int | str | bytes | None


class Append(NamedTuple):
    # NamedTuple rather than a frozen dataclass (immutable all the same): a frozen
    # dataclass costs about 1 us more to build, and this one is built per append.
    context: str
    key: str
    payload: bytes
    metadata: dict[str, str]
    dedup_id: bytes | None = None
    expect_seq: int | None = None
    after_lamport: int | None = None
    replicas: int | None = None


class BatchItem(NamedTuple):
    # The decoder's fast path makes plain (key, payload, metadata) tuples, which compare
    # equal to these: a NamedTuple's constructor is a Python function, run once per entry.
    key: str
    payload: bytes
    metadata: dict[str, str]


@dataclass(frozen=True, slots=True)
class AppendBatch:
    context: str
    items: tuple[BatchItem, ...]
    dedup_id: bytes | None = None
    expect_seq: int | None = None
    after_lamport: int | None = None
    replicas: int | None = None
    # the payloads' total size when the decoder already summed it; -1: not known
    payload_bytes: int = field(default=-1, compare=False)


class Get(NamedTuple):
    # a NamedTuple, like Append (immutable all the same): built for every read, and a frozen
    # dataclass costs ~0.1 us more per field
    context: str
    key: str | None = None
    after: int = 0
    limit: int = DEFAULT_GET_LIMIT
    fork: str | None = None  # read the history of this writer that a fork set aside
    fork_index: int | None = None  # which one, 1 = the first set aside (default: the latest)


@dataclass(frozen=True, slots=True)
class Head:
    context: str


@dataclass(frozen=True, slots=True)
class Contexts:
    after: str | None = None
    limit: int = 1_000


@dataclass(frozen=True, slots=True)
class Status:
    pass


@dataclass(frozen=True, slots=True)
class Ping:
    pass


@dataclass(frozen=True, slots=True)
class Snapshot:
    context: str
    size: int | None = None
    after: int = 0
    limit: int = DEFAULT_GET_LIMIT
    # each entry as a bin holding its stored bytes, not as a map (SPEC 17.2): what a node pulling
    # asks for, to store them as they come (a peer that does not know the field sends maps)
    packed: bool = False


@dataclass(frozen=True, slots=True)
class Load:
    context: str
    load_id: str
    size: int
    root: bytes
    entries: tuple[Entry, ...]
    final: bool = False
    fail_if_exists: bool = False
    abort: bool = False
    signed: SignedHead | None = None  # the snapshot's head signed by its writer (SPEC 6.9, 13.6)


@dataclass(frozen=True, slots=True)
class Proof:
    context: str
    seq: int
    size: int | None = None


@dataclass(frozen=True, slots=True)
class Consistency:
    context: str
    first: int
    second: int | None = None


@dataclass(frozen=True, slots=True)
class Heartbeat:
    """Node to node: who I am, where I listen, whom I know, a digest of my contexts."""

    node_id: str
    address: str
    pub: str | None
    boot: str
    lamport: int
    entries: int
    peers: tuple[tuple[str, str], ...]
    digest: bytes
    cluster: str = "ledger"
    # gossiped peers whose address did not parse (SPEC 17.6): skipped, not a reason to refuse the
    # heartbeat; the count and the first one's error, for the node to log and count
    bad_peers: int = 0
    bad_peer_error: str = ""
    # contexts the sender writes whose acks it asks for again (SPEC 17.5): a retried `replicas`
    # append answered from its dedup_id after the sender forgot what its replicas acknowledged
    want_acks: tuple[str, ...] = ()

    def as_map(self) -> dict[str, Any]:
        return {"node_id": self.node_id, "address": self.address, "pub": self.pub, "boot": self.boot,
                "lamport": self.lamport, "entries": self.entries, "peers": [list(p) for p in self.peers],
                "digest": self.digest, "cluster": self.cluster}


@dataclass(frozen=True, slots=True)
class SyncHeads:
    """Node to node: the heads of my contexts in these digest buckets."""

    buckets: tuple[int, ...]
    nbuckets: int
    after: str | None = None


@dataclass(frozen=True, slots=True)
class Snapshots:
    """Node to node: pull chunks of several contexts in one request (SPEC 17.2). Each chunk is
    a `Snapshot` with `size` the chunk's end and `limit` = size - after; `signed` false: the
    puller checks no signatures (a node without keys), so none are made for it."""

    chunks: tuple[Snapshot, ...]
    signed: bool = True
    packed: bool = False  # as for `Snapshot`, for every chunk


@dataclass(frozen=True, slots=True)
class SyncDigest:
    """Node to node: the fine digests (digest.SUB values each) of these top buckets."""

    buckets: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class Ack:
    """Node to node: these contexts of yours are held here up to these sizes."""

    node_id: str
    acks: tuple[tuple[str, int], ...]


Request = (Append | AppendBatch | Get | Head | Contexts | Status | Ping | Snapshot | Load | Proof | Consistency
           | Heartbeat | SyncHeads | SyncDigest | Snapshots | Ack)


class Envelope(NamedTuple):
    """A decoded request: its id (echoed in the reply), its op and its body."""

    id: RequestId
    op: str
    request: Request


def _bad(msg: str, details: dict[str, Any] | None = None) -> RemoteProtocolError:
    return RemoteProtocolError(BAD_REQUEST, msg, details)


def _context(m: Mapping[str, Any]) -> str:
    if "context" not in m:
        raise _bad("missing field 'context'")
    return check_name("context", m["context"], MAX_CONTEXT_BYTES)


def _opt_uint(m: Mapping[str, Any], name: str, default: int | None = None, maximum: int = U64 - 1) -> int | None:
    v = m.get(name)
    if v is None:
        return default
    if type(v) is not int or v < 0 or v > maximum:
        if maximum == U64 - 1:
            raise _bad(f"{name} must be an unsigned 64-bit integer")
        raise _bad(f"{name} must be an integer from 0 to {maximum}", {"field": name, "max": maximum})
    return v


def _limit(m: Mapping[str, Any], default: int, maximum: int) -> int:
    v = m.get("limit")
    if v is None:
        return default
    if type(v) is not int or not 1 <= v <= maximum:
        raise _bad(f"limit must be an integer from 1 to {maximum}")
    return v


def _payload(v: object, max_payload: int) -> bytes:
    if isinstance(v, bytes):
        b = v
    elif isinstance(v, str):
        try:
            b = v.encode()
        except UnicodeEncodeError:
            raise _bad("payload string is not valid UTF-8 (send binary instead)") from None
    elif v is None:
        b = b""
    else:
        raise _bad(f"payload must be binary, got {type(v).__name__}")
    if len(b) > max_payload:
        raise RemoteProtocolError(
            TOO_LARGE,
            f"payload is {len(b)} bytes, the limit is {max_payload}",
            {"limit": max_payload},
        )
    return b


def _key(v: object) -> str:
    if v is None:
        return ""
    return check_name("key", v, MAX_KEY_BYTES, min_bytes=0)


def _dedup(m: Mapping[str, Any]) -> bytes | None:
    v = m.get("dedup_id")
    if v is None:
        return None
    if isinstance(v, str):
        try:
            v = v.encode()
        except UnicodeEncodeError:
            raise _bad("dedup_id is not valid UTF-8") from None
    if not isinstance(v, bytes) or not 1 <= len(v) <= MAX_DEDUP_BYTES:
        raise _bad(f"dedup_id must be 1..{MAX_DEDUP_BYTES} bytes (string or binary)")
    return v


def _bool(m: Mapping[str, Any], name: str) -> bool:
    v = m.get(name, False)
    if v is None:
        return False
    if not isinstance(v, bool):
        raise _bad(f"{name} must be true or false")
    return v


def _parse_append(m: Mapping[str, Any], max_payload: int) -> Append:
    # Fast path for the common, plainly valid append (ASCII names, binary
    # payload, no options); anything else takes the full validation below.
    c = m.get("context")
    k = m.get("key", "")
    p = m.get("payload")
    md = m.get("metadata")
    if (
        type(c) is str and 0 < len(c) <= MAX_CONTEXT_BYTES and c.isascii()
        and type(k) is str and len(k) <= MAX_KEY_BYTES and k.isascii()
        and type(p) is bytes and len(p) <= max_payload
        and (md is None or (type(md) is dict and not md)) and m.get("dedup_id") is None
        and m.get("expect_seq") is None and m.get("after_lamport") is None and m.get("replicas") is None
    ):
        return Append(c, k, p, {})
    return Append(
        context=_context(m),
        key=_key(m.get("key")),
        payload=_payload(m.get("payload"), max_payload),
        metadata=check_metadata(m.get("metadata")),
        dedup_id=_dedup(m),
        expect_seq=_opt_uint(m, "expect_seq"),
        after_lamport=_opt_uint(m, "after_lamport", maximum=MAX_LAMPORT),
        replicas=_replicas(m),
    )


def _replicas(m: Mapping[str, Any]) -> int | None:
    v = m.get("replicas")
    if v is None or v == 0:
        return None
    if type(v) is not int or not 0 <= v <= MAX_REPLICAS:
        raise _bad(f"replicas must be an integer from 0 to {MAX_REPLICAS}")
    return v


def _parse_batch(m: Mapping[str, Any], max_payload: int) -> AppendBatch:
    raw = m.get("entries")
    if not isinstance(raw, list) or not raw:
        raise _bad("entries must be a non-empty array of {key, payload, metadata} maps")
    if len(raw) > MAX_BATCH:
        raise RemoteProtocolError(TOO_LARGE, f"a batch holds at most {MAX_BATCH} entries")
    items: list[Any] = []
    add = items.append
    total = 0
    for i, it in enumerate(raw):
        if type(it) is not dict:
            raise _bad(f"entries[{i}] must be a map")
        k = it.get("key", "")
        p = it.get("payload")
        md = it.get("metadata")
        if (type(k) is str and len(k) <= MAX_KEY_BYTES and k.isascii() and type(p) is bytes
                and len(p) <= max_payload and (md is None or (type(md) is dict and not md))):
            add((k, p, {}))  # fast path: plainly valid
            total += len(p)
            continue
        try:
            p = _payload(it.get("payload"), max_payload)
            item = BatchItem(_key(it.get("key")), p, check_metadata(it.get("metadata")))
        except RemoteProtocolError as e:
            raise RemoteProtocolError(e.code, f"entries[{i}]: {e.message}", e.details) from None
        total += len(p)
        items.append(item)
    # Every key a str (SPEC 5.1): a bin b"key" read as an unknown key would be dropped silently.
    # One pass in C over all the items' keys (~20 ns an item; a check per item cost twice that).
    if any(type(x) is not str for x in set().union(*raw)):
        for i, it in enumerate(raw):
            for x in it:
                if type(x) is not str:
                    raise _bad(f"entries[{i}]: map keys must be strings, got {type(x).__name__} key {x!r:.40}")
    return AppendBatch(
        context=_context(m),
        items=tuple(items),
        dedup_id=_dedup(m),
        expect_seq=_opt_uint(m, "expect_seq"),
        after_lamport=_opt_uint(m, "after_lamport", maximum=MAX_LAMPORT),
        replicas=_replicas(m),
        payload_bytes=total,
    )


def _parse_get(m: Mapping[str, Any], max_payload: int) -> Get:
    k = m.get("key")
    return Get(
        context=_context(m),
        key=None if k is None else _key(k),
        after=_opt_uint(m, "after", 0) or 0,
        limit=_limit(m, DEFAULT_GET_LIMIT, MAX_GET_LIMIT),
        fork=None if m.get("fork") is None else check_name("fork", m.get("fork"), MAX_ID_BYTES),
        fork_index=None if m.get("fork_index") is None else _fork_index(m),
    )


def _fork_index(m: Mapping[str, Any]) -> int | None:
    v = m.get("fork_index")
    if v is None:
        return None
    if type(v) is not int or not 1 <= v <= MAX_FORK_INDEX:
        raise _bad(f"fork_index must be an integer from 1 to {MAX_FORK_INDEX}")
    if m.get("fork") is None:
        raise _bad("fork_index needs fork (the writer whose set-aside history to read)")
    return v


def _parse_head(m: Mapping[str, Any], max_payload: int) -> Head:
    return Head(_context(m))


def _parse_contexts(m: Mapping[str, Any], max_payload: int) -> Contexts:
    a = m.get("after")
    return Contexts(
        after=None if a is None else check_name("after", a, MAX_CONTEXT_BYTES),
        limit=_limit(m, 1_000, MAX_CONTEXTS_LIMIT),
    )


def _parse_status(m: Mapping[str, Any], max_payload: int) -> Status:
    return Status()


def _parse_ping(m: Mapping[str, Any], max_payload: int) -> Ping:
    return Ping()


def _parse_snapshot(m: Mapping[str, Any], max_payload: int) -> Snapshot:
    return Snapshot(
        context=_context(m),
        size=_opt_uint(m, "size"),
        after=_opt_uint(m, "after", 0) or 0,
        limit=_limit(m, DEFAULT_GET_LIMIT, MAX_GET_LIMIT),
        packed=_flag(m, "packed", False),
    )


def _flag(m: Mapping[str, Any], name: str, default: bool) -> bool:
    v = m.get(name, default)
    if type(v) is not bool:
        raise _bad(f"{name} must be a boolean")
    return v


def _parse_load(m: Mapping[str, Any], max_payload: int) -> Load:
    load_id = check_name("load_id", m.get("load_id"), MAX_ID_BYTES)
    size = _opt_uint(m, "size")
    if size is None:
        raise _bad("missing field 'size'")
    root = m.get("root")
    if not isinstance(root, bytes) or len(root) != 32:
        raise _bad("root must be 32 bytes of binary")
    raw = m.get("entries", [])
    if not isinstance(raw, list):
        raise _bad("entries must be an array of entry maps")
    entries = []
    for i, e in enumerate(raw):
        try:
            entries.append(entry_from_wire(e))
        except RemoteProtocolError as err:
            raise RemoteProtocolError(err.code, f"entries[{i}]: {err.message}", err.details) from None
    return Load(
        context=_context(m),
        load_id=load_id,
        size=size,
        root=root,
        entries=tuple(entries),
        final=_bool(m, "final"),
        abort=_bool(m, "abort"),
        fail_if_exists=_bool(m, "fail_if_exists"),
        signed=heads.from_map(m["signed"]) if m.get("signed") is not None else None,
    )


def _parse_proof(m: Mapping[str, Any], max_payload: int) -> Proof:
    seq = _opt_uint(m, "seq")
    if seq is None or seq < 1:
        raise _bad("seq must be an integer of at least 1")
    return Proof(_context(m), seq, _opt_uint(m, "size"))


def _parse_consistency(m: Mapping[str, Any], max_payload: int) -> Consistency:
    first = _opt_uint(m, "first")
    if first is None:
        raise _bad("missing field 'first'")
    return Consistency(_context(m), first, _opt_uint(m, "second"))


MAX_PEERS = 1_000
MAX_DIGEST_BYTES = 1 << 16
MAX_DIGEST_BUCKETS = 16  # top buckets per `sync_digest` (a reply of 2 KiB each)
MAX_PULL_CHUNKS = 64  # contexts per `snapshots` request
MAX_PULL_ENTRIES = MAX_GET_LIMIT  # entries asked by one `snapshots` request, all chunks together
MAX_WANT_ACKS = 64  # contexts whose acks one heartbeat asks for again


def _parse_heartbeat(m: Mapping[str, Any], max_payload: int) -> Heartbeat:
    peers_raw = m.get("peers") or []
    if not isinstance(peers_raw, list) or len(peers_raw) > MAX_PEERS:
        raise _bad(f"peers must be an array of at most {MAX_PEERS} [node_id, address] pairs")
    peers = []
    bad_peers = 0
    bad_peer_error = ""
    for p in peers_raw:
        if not isinstance(p, list) or len(p) != 2:
            raise _bad("peers must hold [node_id, address] pairs")
        nid = check_name("peer node_id", p[0], MAX_ID_BYTES)
        try:
            peers.append((nid, parse_address(p[1], "peer address")))
        except RemoteProtocolError as exc:
            bad_peers += 1
            bad_peer_error = bad_peer_error or exc.message
    pub = m.get("pub")
    digest = m.get("digest", b"")
    if not isinstance(digest, bytes) or len(digest) > MAX_DIGEST_BYTES:
        raise _bad(f"digest must be at most {MAX_DIGEST_BYTES} bytes of binary")
    want = m.get("want_acks")
    if want is None:
        want = []
    elif not isinstance(want, list) or len(want) > MAX_WANT_ACKS:
        raise _bad(f"want_acks must be an array of at most {MAX_WANT_ACKS} context names")
    return Heartbeat(
        node_id=check_name("node_id", m.get("node_id"), MAX_ID_BYTES),
        address=parse_address(m.get("address"), "address"),
        pub=None if pub is None else parse_address(pub, "pub"),
        boot=check_name("boot", m.get("boot", "") or "-", MAX_ID_BYTES),
        # a clock above the ceiling is refused whole: observing it would poison ours (SPEC 9.1)
        lamport=_opt_uint(m, "lamport", 0, maximum=MAX_LAMPORT) or 0,
        entries=_opt_uint(m, "entries", 0) or 0,
        peers=tuple(peers),
        digest=digest,
        cluster=check_name("cluster", m.get("cluster") or "ledger", MAX_ID_BYTES),
        bad_peers=bad_peers,
        bad_peer_error=bad_peer_error,
        want_acks=tuple(check_name("want_acks item", c, MAX_CONTEXT_BYTES) for c in want),
    )


def _parse_sync_heads(m: Mapping[str, Any], max_payload: int) -> SyncHeads:
    n = m.get("nbuckets")
    if type(n) is not int or not 1 <= n <= 65536:
        raise _bad("nbuckets must be an integer from 1 to 65536")
    raw = m.get("buckets")
    if not isinstance(raw, list) or len(raw) > n or not all(type(b) is int and 0 <= b < n for b in raw):
        raise _bad("buckets must be an array of bucket numbers below nbuckets")
    a = m.get("after")
    return SyncHeads(tuple(raw), n, None if a is None else check_name("after", a, MAX_CONTEXT_BYTES))


def _parse_snapshots(m: Mapping[str, Any], max_payload: int) -> Snapshots:
    raw = m.get("chunks")
    if not isinstance(raw, list) or not 1 <= len(raw) <= MAX_PULL_CHUNKS:
        raise _bad(f"chunks must be an array of 1 to {MAX_PULL_CHUNKS} [context, after, size] items")
    chunks = []
    seen: set[str] = set()
    total = 0
    for c in raw:
        if not isinstance(c, list) or len(c) != 3:
            raise _bad("each chunk must be [context, after, size]")
        name = check_name("context", c[0], MAX_CONTEXT_BYTES)
        after, size = c[1], c[2]
        if type(after) is not int or type(size) is not int or not 0 <= after < size < U64:
            raise _bad(f"chunk of {name!r}: after and size must be integers with 0 <= after < size < 2^64")
        if name in seen:
            raise _bad(f"chunk of {name!r}: a context may be asked once per request")
        seen.add(name)
        total += size - after
        chunks.append(Snapshot(name, size, after, size - after))
    if total > MAX_PULL_ENTRIES:
        raise _bad(f"chunks ask for {total} entries; at most {MAX_PULL_ENTRIES} per request")
    return Snapshots(tuple(chunks), _flag(m, "signed", True), _flag(m, "packed", False))


def _parse_sync_digest(m: Mapping[str, Any], max_payload: int) -> SyncDigest:
    raw = m.get("buckets")
    if (not isinstance(raw, list) or not 1 <= len(raw) <= MAX_DIGEST_BUCKETS
            or not all(type(b) is int and 0 <= b < NBUCKETS for b in raw) or len(set(raw)) != len(raw)):
        raise _bad(f"buckets must be an array of 1 to {MAX_DIGEST_BUCKETS} distinct bucket numbers below {NBUCKETS}")
    return SyncDigest(tuple(raw))


def _parse_ack(m: Mapping[str, Any], max_payload: int) -> Ack:
    raw = m.get("acks")
    if not isinstance(raw, list) or len(raw) > MAX_CONTEXTS_LIMIT:
        raise _bad(f"acks must be an array of at most {MAX_CONTEXTS_LIMIT} [context, size] pairs")
    acks = []
    for a in raw:
        if not isinstance(a, list) or len(a) != 2 or type(a[1]) is not int or not 0 <= a[1] < U64:
            raise _bad("acks must hold [context, size] pairs")
        acks.append((check_name("context", a[0], MAX_CONTEXT_BYTES), a[1]))
    return Ack(check_name("node_id", m.get("node_id"), MAX_ID_BYTES), tuple(acks))


PARSERS: dict[str, Callable[[Mapping[str, Any], int], Request]] = {
    "append": _parse_append,
    "append_batch": _parse_batch,
    "get": _parse_get,
    "head": _parse_head,
    "contexts": _parse_contexts,
    "status": _parse_status,
    "ping": _parse_ping,
    "snapshot": _parse_snapshot,
    "load": _parse_load,
    "proof": _parse_proof,
    "consistency": _parse_consistency,
    "heartbeat": _parse_heartbeat,
    "sync_heads": _parse_sync_heads,
    "sync_digest": _parse_sync_digest,
    "snapshots": _parse_snapshots,
    "ack": _parse_ack,
}

OPS = tuple(PARSERS)


def _check_id(v: object) -> RequestId:
    if v is None:
        return None
    if type(v) is int:
        if not -(1 << 63) <= v < U64:
            raise _bad("id must fit in 64 bits")
        return v
    if isinstance(v, str):
        try:
            v.encode()
        except UnicodeEncodeError:
            raise _bad("id is not valid UTF-8") from None
    if isinstance(v, (str, bytes)):
        if len(v) > MAX_ID_BYTES:
            raise _bad(f"id must be at most {MAX_ID_BYTES} bytes")
        return v
    raise _bad("id must be an integer, a string or binary")


def peek_id(m: object) -> RequestId:
    """The request id, if one can be read, for addressing an error reply."""
    if isinstance(m, dict):
        try:
            return _check_id(m.get("id"))
        except RemoteProtocolError:
            return None
    return None


# A request this large is looked at before it is decoded: junk that cannot be a map is refused at
# its first byte (msgpack would decode a first object and then copy the rest into its ExtraData
# error: as long again as receiving the frame, for nothing).
CHECK_FIRST_BYTE_FROM = 64 << 10


def _starts_a_map(b: int) -> bool:
    return 0x80 <= b <= 0x8F or b == 0xDE or b == 0xDF  # fixmap, map 16, map 32


def unpack_request(frame: bytes | memoryview) -> dict[str, Any]:
    """Bytes (or anything with the buffer protocol: the node passes a zmq.Frame) to a map, or
    RemoteProtocolError."""
    if len(frame) >= CHECK_FIRST_BYTE_FROM:
        first = memoryview(frame)[0]
        if not _starts_a_map(first):
            raise _bad(f"request must be a msgpack map (first byte 0x{first:02x})")
    try:
        m = msgpack.unpackb(frame, raw=False, unicode_errors="surrogateescape", strict_map_key=False)
    except Exception as exc:  # msgpack raises ValueError, ExtraData, FormatError, ...
        raise _bad(f"request is not a msgpack map ({type(exc).__name__})") from None
    if not isinstance(m, dict):
        raise _bad(f"request must be a msgpack map, got {type(m).__name__}")
    return m


def parse_request(m: dict[str, Any], max_payload: int) -> Envelope:
    """A decoded map to an Envelope, validating every field."""
    rid = _check_id(m.get("id"))
    for k in m:
        if type(k) is not str:
            # a bin "expect_seq" would otherwise be an unknown key, ignored: an append without its check
            raise _bad(f"request map keys must be strings, got {type(k).__name__} key {k!r:.40}")
    v = m.get("v")
    if type(v) is not int:
        raise _bad("missing or non-integer protocol version 'v'")
    if v not in SUPPORTED_VERSIONS:
        raise RemoteProtocolError(
            UNSUPPORTED_VERSION,
            f"protocol version {v} is not supported; this node speaks {list(SUPPORTED_VERSIONS)}",
            {"supported": list(SUPPORTED_VERSIONS)},
        )
    op = m.get("op")
    if not isinstance(op, str):
        raise _bad("missing or non-string field 'op'")
    parser = PARSERS.get(op)
    if parser is None:
        raise RemoteProtocolError(
            UNKNOWN_OP, f"unknown op {op!r}; known ops: {', '.join(OPS)}", {"ops": list(OPS)}
        )
    return Envelope(rid, op, parser(m, max_payload))


def decode_request(frame: bytes | memoryview, max_payload: int) -> Envelope:
    return parse_request(unpack_request(frame), max_payload)


# -- replies ---------------------------------------------------------------

_OK_PREFIX = b"\xa1v\x01\xa2ok\xc3\xa2id"  # "v": 1, "ok": true, "id" (its value follows)
_pack = msgpack.Packer(use_bin_type=True, autoreset=True).pack


def _map_header(n: int) -> bytes:
    return bytes((0x80 | n,)) if n < 16 else b"\xde" + n.to_bytes(2, "big")


def array_header(n: int) -> bytes:
    """The msgpack header of an array of n items (to splice pre-encoded items after it)."""
    if n < 16:
        return bytes((0x90 | n,))
    if n < 0x10000:
        return b"\xdc" + n.to_bytes(2, "big")
    return b"\xdd" + n.to_bytes(4, "big")


def encode_reply(
    rid: RequestId, fields: Mapping[str, Any], raw: Mapping[str, bytes | Sequence[bytes]] | None = None
) -> bytes:
    """An ok reply. `raw` values are pre-encoded msgpack (a bytes object is
    one value, a list of bytes objects becomes an array of them)."""
    n = 3 + len(fields) + (len(raw) if raw else 0)
    return _encode_map([_map_header(n), _OK_PREFIX, _pack(rid)], fields, raw)


def encode_map(fields: Mapping[str, Any], raw: Mapping[str, bytes | Sequence[bytes]] | None = None) -> bytes:
    """A map as `encode_reply` builds one, without the reply's `ok` and `id` (a `snapshots` chunk)."""
    return _encode_map([_map_header(len(fields) + (len(raw) if raw else 0))], fields, raw)


def _encode_map(out: list[bytes], fields: Mapping[str, Any], raw: Mapping[str, bytes | Sequence[bytes]] | None) -> bytes:
    for k, v in fields.items():
        out.append(_pack(k))
        out.append(_pack(v))
    if raw:
        for k, rv in raw.items():
            out.append(_pack(k))
            if isinstance(rv, bytes):
                out.append(rv)
            else:
                out.append(array_header(len(rv)))
                out.extend(rv)
    return b"".join(out)


_APPEND_REPLY_HEAD = _map_header(4) + _OK_PREFIX
_GET_REPLY_HEAD = _map_header(7) + _OK_PREFIX


def encode_get_reply(rid: RequestId, last_seq: int, more: bool, next_after: int, blobs: Sequence[bytes]) -> bytes:
    """`encode_reply(rid, {"last_seq", "more", "next_after"}, {"entries": blobs})`, byte for byte,
    specialised: it answers every read."""
    return b"".join((
        _GET_REPLY_HEAD, _pack(rid), b"\xa8last_seq", _pack(last_seq), b"\xa4more", b"\xc3" if more else b"\xc2",
        b"\xaanext_after", _pack(next_after), b"\xa7entries", array_header(len(blobs)), *blobs,
    ))


def encode_entry_reply(rid: RequestId, entry: bytes) -> bytes:
    """`encode_reply(rid, {}, {"entry": entry})`, specialised: it answers every append."""
    return b"".join((_APPEND_REPLY_HEAD, _pack(rid), b"\xa5entry", entry))


def encode_error(rid: RequestId, code: str, message: str, details: Mapping[str, Any] | None = None) -> bytes:
    err: dict[str, Any] = {"code": code, "message": message}
    if details:
        for k, v in details.items():
            if k not in err:
                err[k] = v
    try:
        out: bytes = msgpack.packb({"v": PROTOCOL_VERSION, "id": rid, "ok": False, "error": err}, use_bin_type=True)
        return out
    except (UnicodeEncodeError, TypeError, ValueError, OverflowError):
        # Something echoed from bad input cannot be encoded: answer without it.
        safe = message.encode("utf-8", "backslashreplace").decode("utf-8")
        fallback: bytes = msgpack.packb(
            {"v": PROTOCOL_VERSION, "id": None, "ok": False, "error": {"code": code, "message": safe}},
            use_bin_type=True,
        )
        return fallback


def encode_request(op: str, rid: RequestId, fields: Mapping[str, Any]) -> bytes:
    m: dict[str, Any] = {"v": PROTOCOL_VERSION, "id": rid, "op": op}
    m.update(fields)
    out: bytes = msgpack.packb(m, use_bin_type=True)
    return out


# -- node-to-node replies ----------------------------------------------------------------
#
# A peer's reply is input like any other (SPEC 17.6): these turn the reply maps of `sync_heads`,
# `head` and `snapshot` into typed records, or raise RemoteProtocolError. The checks are the
# protocol's bounds; whether the content is *true* (a root, a writer) is the mesh's to judge.


class HeadItem(NamedTuple):
    """One context in a `sync_heads` page: [name, size, root, writer, lamport]."""

    name: str
    size: int
    root: bytes
    writer: str


@dataclass(frozen=True, slots=True)
class HeadsPage:
    heads: tuple[HeadItem, ...]
    more: bool
    malformed: int  # items skipped for a wrong shape or type (the rest of the page is used)


def _name_ok(v: object, max_bytes: int) -> bool:
    """`check_name`'s test (1..max_bytes of UTF-8), as a bool."""
    if type(v) is not str:
        return False
    if v.isascii():
        return 0 < len(v) <= max_bytes
    try:
        return 0 < len(v.encode()) <= max_bytes
    except UnicodeEncodeError:
        return False


def parse_heads_reply(m: Mapping[str, Any]) -> HeadsPage:
    """A `sync_heads` reply. A malformed item (a name or writer no context can have among them) is
    skipped, not the page: one bad context of a peer must not hold back the repair of its others."""
    heads = m.get("heads")
    if not isinstance(heads, list):
        raise _bad("sync_heads reply without heads")
    out = []
    for h in heads:
        if (isinstance(h, list) and len(h) == 5 and _name_ok(h[0], MAX_CONTEXT_BYTES) and type(h[1]) is int
                and 0 <= h[1] < U64 and type(h[2]) is bytes and len(h[2]) == 32
                and _name_ok(h[3], MAX_WRITER_BYTES)):
            out.append(HeadItem(h[0], h[1], h[2], h[3]))
    return HeadsPage(tuple(out), m.get("more") is True, len(heads) - len(out))


def parse_digest_reply(m: Mapping[str, Any], count: int) -> list[list[int]]:
    """A `sync_digest` reply for `count` top buckets: per bucket, its SUB fine values."""
    raw = m.get("digests")
    if (not isinstance(raw, list) or len(raw) != count
            or not all(type(d) is bytes and len(d) == 8 * SUB for d in raw)):
        raise _bad(f"sync_digest reply without {count} digests of {8 * SUB} bytes")
    return [[int.from_bytes(d[i:i + 8], "big") for i in range(0, len(d), 8)] for d in raw]


@dataclass(frozen=True, slots=True)
class HeadInfo:
    """A `head` reply as a peer uses it: None fields are absent or of a wrong type."""

    size: int
    root: bytes
    writer: str
    damaged: bool  # the peer's copy came back from its disk shorter or different (6.4)


def parse_head_reply(m: Mapping[str, Any]) -> HeadInfo:
    size, root, writer = m.get("size"), m.get("root"), m.get("writer")
    if not (type(size) is int and 0 <= size < U64 and type(root) is bytes and len(root) == 32
            and type(writer) is str):
        raise _bad("head reply without a well-formed size, root and writer")
    return HeadInfo(size, root, writer, m.get("damaged") is not None)


@dataclass(frozen=True, slots=True)
class Chunk:
    """A `snapshot` page a peer sent: its entries (every field checked, hashes not verified)
    and its root at the page's `size`."""

    entries: tuple[Entry, ...]
    root: bytes


def parse_chunks_reply(m: Mapping[str, Any], asked: int) -> list[Mapping[str, Any]]:
    """A `snapshots` reply: one map per chunk asked, in order; fewer when the reply was full (the
    rest is asked again). Each is a `snapshot` reply's fields or {"context", "error"}."""
    raw = m.get("chunks")
    if not isinstance(raw, list) or len(raw) > asked or not all(isinstance(c, dict) for c in raw):
        raise _bad(f"snapshots reply without an array of at most {asked} chunk maps")
    return raw


def chunk_parts(m: Mapping[str, Any]) -> tuple[list[Any], bytes]:
    """A `snapshot` reply's (or `snapshots` chunk's) entries, not checked yet, and its root."""
    raw, root = m.get("entries"), m.get("root")
    if not isinstance(raw, list) or type(root) is not bytes or len(root) != 32:
        raise _bad("snapshot reply without entries or root")
    return raw, root


def packed_array(blobs: Sequence[bytes]) -> bytes:
    """Stored entries as a msgpack array of bins (a `packed` pull reply's entries, SPEC 17.2):
    what msgpack packs a list of bytes into, with its shortest headers."""
    out: bytes = _pack(list(blobs))
    return out


def unpack_entries(raw: list[Any]) -> list[Any]:
    """A pull reply's entries with those sent packed (bins) decoded into maps, for the checks of
    `entry_from_wire`; maps (from a node that does not pack) as they are."""
    out = []
    for i, e in enumerate(raw):
        if type(e) is bytes:
            try:
                e = msgpack.unpackb(e, raw=False, strict_map_key=False)
            except Exception as exc:
                raise _bad(f"entries[{i}]: a packed entry that is not one msgpack value ({type(exc).__name__})") from None
        out.append(e)
    return out


def parse_chunk_reply(m: Mapping[str, Any]) -> Chunk:
    raw, root = chunk_parts(m)
    raw = unpack_entries(raw)
    return Chunk(tuple(entry_from_wire(e) for e in raw), root)


def decode_reply(frame: bytes) -> dict[str, Any]:
    """A reply frame to a map (client side). Raises RemoteProtocolError on junk."""
    try:
        m = msgpack.unpackb(frame, raw=False, strict_map_key=False)
    except Exception as exc:
        raise _bad(f"reply is not valid msgpack ({type(exc).__name__})") from None
    if not isinstance(m, dict) or "ok" not in m:
        raise _bad("reply is not a protocol v1 reply map")
    return m
