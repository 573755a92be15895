"""What the two reference clients share, without I/O: the synchronous `Client` (protocol/client.py)
and the asyncio `AsyncClient` (protocol/aioclient.py) differ only in how they wait.

Theory of operation. A request is encoded by `encode`; its reply is matched to it by a
`ReplyBook` (by `id`; a reply with a nil `id`, which a node sends when it could not read the
request's, goes to the oldest request still waiting, since version 1 answers in order, SPEC 4.2
and 5.2), checked by `check` (an error reply raises its class) and turned into results here
(`entry_of` re-hashes an entry, `head_of`, `get_result_of`). An operation that takes several
requests (a head checked against its writer's signature, a proof with its entry, a snapshot page
by page) is written once as a *flow*: a generator that yields what it needs (`Call` one request
and its reply, with the client's retries; `Submit` a request without waiting, which gives a
handle; `Result` of a handle) and is sent each answer back, or has the error thrown in. Each client
drives flows with its own kind of waiting (`Client._run` blocks, `AsyncClient._run` awaits), so a
proof is checked by the same lines in both. `Link` reads what a socket monitor says about the
connection, so that a client can tell "nothing listening" from "no answer yet". Nothing here reads
a clock: deadlines are the drivers'.
"""

from __future__ import annotations

import collections
import dataclasses
import os
from collections.abc import Callable, Generator, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import IO, Any, TypeVar

import msgpack

from protocol import codec, heads, merkle, watch
from protocol.entry import MAX_CONTEXT_BYTES, MAX_KEY_BYTES, Entry, check_name, entry_from_wire
from protocol.errors import (
    BadRequest,
    IntegrityError,
    LedgerError,
    NotFound,
    RemoteProtocolError,
    Timeout,
    TooLarge,
    Unavailable,
    Unreachable,
    error_for,
)
from protocol.heads import SignedHead
from protocol.keys import Identity, parse_public_key
from protocol.snapshot import SnapshotVerifier, encode_header, read_snapshot

DEFAULT_TIMEOUT = 5.0
DEFAULT_WINDOW = 1000
MAX_REDIRECTS = 2
LOAD_CHUNK_BYTES = 4 << 20
DEFAULT_ADDRESS = "127.0.0.1:7400"

T = TypeVar("T")


def normalize_address(address: str) -> str:
    """'host:port' or 'tcp://host:port' -> 'tcp://host:port'."""
    if "://" in address:
        return address
    host, sep, port = address.rpartition(":")
    if not sep or not (port.isascii() and port.isdigit()):
        raise ValueError(f"node address must be HOST:PORT, got {address!r}")
    return f"tcp://{host or '127.0.0.1'}:{port}"


def addresses_of(address: str | Sequence[str]) -> list[str]:
    """One address, a comma-separated list of them, or a sequence: the node addresses a client may
    use, normalized, duplicates dropped, in the order given (the first is tried first)."""
    items = address.split(",") if isinstance(address, str) else list(address)
    out = [normalize_address(a.strip()) for a in items if a.strip()]
    if not out:
        raise ValueError("a client needs at least one node address")
    return list(dict.fromkeys(out))


@dataclass(frozen=True, slots=True)
class Head:
    context: str
    size: int
    root: bytes
    lamport: int
    writer: str
    watchers: int = 0
    fork: dict[str, Any] | None = None  # when the context is forked (SPEC 17.4)
    damaged: dict[str, Any] | None = None  # came back from disk shorter or different (README, integrity)
    signed: SignedHead | None = None  # the latest head its writer signed that the node has (SPEC 13.6)
    verified: int | None = None  # with `writer_key`: the size up to which the writer's signature covers it


@dataclass(frozen=True, slots=True)
class GetResult:
    entries: list[Entry]
    last_seq: int
    more: bool
    next_after: int


@dataclass(frozen=True, slots=True)
class InclusionProof:
    context: str
    seq: int
    size: int
    leaf: bytes
    path: list[bytes]
    root: bytes


@dataclass(frozen=True, slots=True)
class ConsistencyProof:
    context: str
    first: int
    second: int
    first_root: bytes
    second_root: bytes
    proof: list[bytes]


# -- requests and replies --------------------------------------------------------------


def encode(op: str, rid: int, fields: Mapping[str, Any]) -> bytes:
    """A request frame; fields that are None are left out (the node's defaults apply)."""
    return codec.encode_request(op, rid, {k: v for k, v in fields.items() if v is not None})


def check(reply: dict[str, Any]) -> dict[str, Any]:
    """The reply, or its error raised as the exception class of its code."""
    if not reply.get("ok"):
        err = reply.get("error") or {}
        details = {k: v for k, v in err.items() if k not in ("code", "message")}
        raise error_for(str(err.get("code", "INTERNAL")), str(err.get("message", "")), details)
    return reply


class ReplyBook:
    """The requests sent on one connection and not yet answered, in the order they were sent,
    each with what its client keeps for it (a future, a deadline; or nothing)."""

    def __init__(self) -> None:
        self._waiting: dict[Any, Any] = {}  # insertion-ordered: the oldest first

    def sent(self, rid: Any, value: Any = None) -> None:
        self._waiting[rid] = value

    def forget(self, rid: Any) -> Any:
        """Stop waiting for `rid` (timed out, or answered elsewhere); what was kept for it."""
        return self._waiting.pop(rid, None)

    def clear(self) -> list[tuple[Any, Any]]:
        """Forget every request (a new connection); returns them with what was kept, oldest first."""
        out = list(self._waiting.items())
        self._waiting.clear()
        return out

    def items(self) -> list[tuple[Any, Any]]:
        return list(self._waiting.items())

    def get(self, rid: Any) -> Any:
        """What is kept for `rid` while it waits (None once answered or forgotten)."""
        return self._waiting.get(rid)

    def __contains__(self, rid: object) -> bool:
        return rid in self._waiting

    def __len__(self) -> int:
        return len(self._waiting)

    def match(self, frame: bytes) -> tuple[Any, dict[str, Any], Any] | None:
        """The request a reply frame answers, the reply, and what was kept for the request; None
        for a frame that is not a reply or answers nothing this connection waits for (a late
        reply to a forgotten request)."""
        try:
            reply = codec.decode_reply(frame)
        except RemoteProtocolError:
            return None
        rid = reply.get("id")
        waiting = self._waiting
        if rid is None:
            # The node could not read the request's id (SPEC 5.2): replies come in order (4.2).
            if not waiting:
                return None
            rid = next(iter(waiting))
        elif rid not in waiting:
            return None
        return rid, reply, waiting.pop(rid)


class Link:
    """A connection's state as its socket monitor reports it.

    `unreachable` once a connection attempt was refused (nothing listens there) with no
    connection up; ZeroMQ tries again every ~0.1-0.2 s, so a waiting request can fail then instead
    of at its timeout. A driver counts only refusals that came while it waited (`refused = 0`
    first): one from before a node came back says nothing about it now. `ever_up`: whether a
    connection was ever made, so that a request sent on this socket may have reached a node.

    The handshake tells a node's request port from a port where something else listens (SPEC
    3.1: requests go to the ROUTER; the watch port is a PUB, one above it by default). ZeroMQ
    refuses to pair socket types that do not talk to each other (a DEALER and a PUB): with no
    keys, libzmq 4.3 then closes the connection during the handshake without reporting why (no
    HANDSHAKE_FAILED event before the "down") and never reconnects; a newer libzmq may report
    it as invalid metadata ("mismatch"). With keys (CURVE) the PUB closes first, which the client
    only sees as handshakes failing with no detail ("failed"), like a node at its connection
    limit. Either way `probe_due` asks the driver to look once, with a SUB, whether a PUB is
    there (`is_pub`), and `verdict` then says what to report: "watch" (a PUB: a node's watch
    port) or "other" (some other kind of ZeroMQ socket), or None (go on waiting)."""

    REFUSALS = 1
    FAILED_HANDSHAKES = 2  # with keys: this many handshakes dropped with no detail before a probe

    def __init__(self) -> None:
        self.up = False
        self.ever_up = False
        self.refused = 0
        # a connection just dropped: ZeroMQ reports the reconnection it schedules like a refused
        # attempt, which says nothing about whether something listens (a node with keys drops a
        # keyless client's connection after every handshake)
        self.dropped = False
        self.shaking = False   # connected, and no word yet on the handshake
        self.shook = False     # a handshake succeeded: a node's request port (or a DEALER's peer)
        self.mismatch = False  # the peer's socket type does not talk to ours
        self.failed = 0        # handshakes that failed with no detail
        self.rejected = False  # a handshake refused over keys: not a question of ports
        self.probed = False
        self.verdict: str | None = None

    @property
    def probe_due(self) -> bool:
        """Whether the driver should look (once) whether a PUB listens there; it then calls
        `on_probe` with what it found."""
        return (not self.probed and not self.shook and not self.rejected
                and (self.mismatch or self.failed >= self.FAILED_HANDSHAKES))

    def on_probe(self, is_pub: bool) -> None:
        self.probed = True
        if is_pub:
            self.verdict = "watch"
        elif self.mismatch:
            self.verdict = "other"

    def on_event(self, kind: str) -> None:
        """`kind`: "up" (connected), "down" (disconnected) or "refused" (a connect attempt failed,
        or a reconnection scheduled after "down"); "handshake" (it succeeded), "mismatch" (it
        failed on the socket types), "failed" (it failed with no detail), "rejected" (it failed on
        keys)."""
        if kind == "up":
            self.up = self.ever_up = True
            self.refused = 0
            self.dropped = False
            self.shaking = True
        elif kind in ("handshake", "mismatch", "failed", "rejected"):
            self.shaking = False
            if kind == "handshake":
                self.shook = True
            elif kind == "mismatch":
                self.mismatch = True
            elif kind == "failed":
                self.failed += 1
            else:
                self.rejected = True
        elif kind == "down":
            if self.shaking:  # closed during the handshake without a word: socket types (above)
                self.mismatch = True
            self.shaking = False
            self.up = False
            self.dropped = True
        elif kind == "refused" and not self.up:
            if self.dropped:
                self.dropped = False  # the retry the drop scheduled, not a refusal
            else:
                self.refused += 1

    @property
    def unreachable(self) -> bool:
        return not self.up and self.refused >= self.REFUSALS


class ClientCore:
    """What both clients keep and decide without I/O: the node addresses (and the one in use),
    keys, timeout, retries, verification, request ids, and the clients of writers that
    NOT_WRITER replies named."""

    def __init__(self, address: str | Sequence[str], timeout: float, retries: int, verify: bool,
                 key: Identity | None, server_key: bytes | str | None) -> None:
        self.addresses = addresses_of(address)
        self.address = self.addresses[0]
        if (key is None) != (server_key is None):
            raise BadRequest("a client with keys needs both its own key and the node's public key (server_key)")
        self.key = key
        self.server_key = parse_public_key(server_key) if isinstance(server_key, str) else server_key
        self.timeout = timeout
        self.retries = retries
        self.verify = verify
        self.last_replicated: int | None = None  # other nodes holding the last replicas=N append
        self._closed = False
        self._next_id = int.from_bytes(os.urandom(3), "big") << 20
        self._writers: dict[str, Any] = {}
        self._zctx: Any = None  # the ZeroMQ context the writers' clients share (the client's own)

    def _new_id(self) -> int:
        rid = self._next_id
        self._next_id += 1
        return rid

    def _rotate(self) -> None:
        """Use the next address of the list from now on (the first after the last)."""
        self.address = self.addresses[(self.addresses.index(self.address) + 1) % len(self.addresses)]

    def _writer_client(self, address: str, key: Any = None) -> Any:
        """A client (of this client's kind) of the writer node a NOT_WRITER reply named, kept for
        later appends; with keys, the writer's public key comes from that reply (`key`), sent by
        the node this client authenticated."""
        c = self._writers.get(address)
        if c is None:
            server_key = None
            if self.key is not None:
                if not isinstance(key, str):
                    raise Unavailable(f"the writer at {address} has no known key; cannot authenticate it")
                server_key = key
            c = type(self)(address, timeout=self.timeout, retries=self.retries, verify=self.verify,  # type: ignore[call-arg]
                           zctx=self._zctx, key=self.key if server_key is not None else None,
                           server_key=server_key)
            self._writers[address] = c
        return c


# -- results --------------------------------------------------------------------------


def entry_of(m: Any, verify: bool = True) -> Entry:
    """An entry from the wire, re-hashed (`verify`); IntegrityError for a malformed or false one."""
    try:
        e = entry_from_wire(m)
    except RemoteProtocolError as exc:
        raise IntegrityError(f"node sent a malformed entry: {exc.message}") from None
    if verify:
        e.verify()
    return e


def signed_of(reply: Mapping[str, Any]) -> SignedHead | None:
    """The signed head a `head` or `snapshot` reply carries, if any (SPEC 13.6)."""
    if reply.get("signed") is None:
        return None
    try:
        return heads.from_map(reply["signed"])
    except RemoteProtocolError as exc:
        raise IntegrityError(f"the node sent a malformed signed head: {exc.message}") from None


def get_result_of(r: Mapping[str, Any], verify: bool) -> GetResult:
    return GetResult([entry_of(m, verify) for m in r["entries"]], r["last_seq"], r["more"], r["next_after"])


def status_of(r: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in r.items() if k not in ("v", "id", "ok")}


def pub_address_of(status: Mapping[str, Any], address: str) -> str:
    """The node's watch (PUB) address, reached through the host this client uses."""
    port = str(status["pub"]).rpartition(":")[2]
    host = address.split("://", 1)[1].rpartition(":")[0]
    return f"tcp://{host}:{port}"


def append_items(items: Iterable[tuple[str, bytes | str, Mapping[str, str] | None] | bytes | str]) -> list[dict[str, Any]]:
    """`append_batch` items (payloads, or (key, payload, metadata)) as the request's entries."""
    entries: list[dict[str, Any]] = []
    for it in items:
        if isinstance(it, (bytes, str)):
            entries.append({"key": "", "payload": it})
        else:
            k, p, md = it
            entries.append({"key": k, "payload": p, "metadata": dict(md) if md else None})
    return entries


def not_a_request_port(address: str, verdict: str) -> Unreachable:
    """What a client says when `address` is a ZeroMQ socket of another kind than a node's request
    socket (`Link.verdict`): at once, instead of waiting for a timeout."""
    host, _, port = address.partition("://")[2].rpartition(":")
    below = f"{host}:{int(port) - 1}" if port.isdigit() and int(port) > 1 else None
    if verdict == "watch":
        text = (f"{address} is a node's watch (PUB) port, not its request port: clients send requests to the "
                "port ledger-node listens on (--listen, its `ready router=...` line)")
        if below is not None:
            text += f", by default the one below the watch port: try {below}"
    else:
        text = (f"{address} is a ZeroMQ socket of another kind, not a node's request port (the socket types "
                "do not talk to each other): is it the port ledger-node listens on (--listen)?")
    return Unreachable(text, {"address": address, "addresses": [address], "reason": f"{verdict}_port",
                              "request_port_guess": below})


def unreachable_of(errors: Sequence[Unreachable]) -> Unreachable:
    """One error for the addresses a call could not reach (nothing listening, or another kind of
    socket at some of them), in the order they were tried."""
    if len(errors) == 1:
        return errors[0]
    addresses = list(dict.fromkeys(str(e.details.get("address")) for e in errors))
    if not any(e.details.get("reason") for e in errors):
        return Unreachable(f"nothing listening at {', '.join(addresses)} (connection refused)",
                           {"address": addresses[0], "addresses": addresses})
    seen: set[str] = set()
    parts = []
    for e in errors:
        address = str(e.details.get("address"))
        if address not in seen:
            seen.add(address)
            parts.append(e.message if e.details.get("reason") else f"nothing listening at {address} "
                         "(connection refused)")
    return Unreachable("; ".join(parts), {"address": addresses[0], "addresses": addresses})


def timeout_text(address: str, op: str, waited: float, attempts: int, retry: bool) -> str:
    """What a Timeout says: the time really waited, over how many attempts."""
    text = f"no answer from {address} in {waited:.1f} s"
    if attempts > 1:
        text += f" ({attempts} attempts)"
    text += " (is ledger-node running there?)"
    if not retry and op in ("append", "append_batch", "load"):
        text += f"; the {op} may or may not have been applied (pass dedup_id to make retries safe)"
    return text


# -- flows: operations of several requests, written once for both clients --------------


@dataclass(frozen=True, slots=True)
class Call:
    """Send one request and wait for its reply (retried by the client when `retry`)."""

    op: str
    fields: dict[str, Any]
    retry: bool = True


@dataclass(frozen=True, slots=True)
class Submit:
    """Send one request without waiting; the flow is sent back a handle for `Result`."""

    op: str
    fields: dict[str, Any]


@dataclass(frozen=True, slots=True)
class Result:
    """Wait for the reply to a `Submit`'s handle (no retry)."""

    handle: Any


@dataclass(frozen=True, slots=True)
class Clock:
    """The driver's monotonic clock, in seconds (flows read no clock of their own)."""


@dataclass(frozen=True, slots=True)
class Receive:
    """Wait up to `seconds` for watch messages; the answer is those queued by then (lists of
    frames), [] when none came."""

    seconds: float


@dataclass(frozen=True, slots=True)
class Ping:
    """Ping the node, waiting at most `seconds`; True when it answered (when not, the driver has
    put a fresh connection in place)."""

    seconds: float


@dataclass(frozen=True, slots=True)
class Sleep:
    seconds: float


@dataclass(frozen=True, slots=True)
class Unsubscribe:
    """Drop the watch socket's subscription (the node refused it, SPEC 16.5)."""


CLOCK = Clock()
# what a long operation calls after each page or chunk: (entries done, entries in all); it runs in
# the caller's thread (or event loop) between two requests, so it must be quick
ProgressFn = Callable[[int, int], None]
Step = Call | Submit | Result | Clock | Receive | Ping | Sleep | Unsubscribe
Flow = Generator[Step, Any, T]


def call(op: str, retry: bool = True, **fields: Any) -> Call:
    return Call(op, fields, retry)


def head_flow(context: str, writer_key: bytes | str | None, address: str, verify: bool) -> Flow[Head]:
    """The context's head; with `writer_key`, checked against a head signed with that key."""
    r = yield call("head", context=context)
    signed = signed_of(r)
    h = Head(r["context"], r["size"], r["root"], r["lamport"], r["writer"], r.get("watchers", 0), r.get("fork"),
             r.get("damaged"), signed)
    if writer_key is None:
        return h
    key = parse_public_key(writer_key, "writer key") if isinstance(writer_key, str) else writer_key
    if signed is None:
        raise IntegrityError(f"{address} has no head of {context!r} signed by its writer {h.writer!r} (a "
                             "replica keeps its writer's signed heads only in a mesh with keys: ask the writer)",
                             {"context": context, "writer": h.writer})
    if signed.context != context or not signed.verify(key):
        raise IntegrityError(f"the head of {context!r} at {address} is not signed by the writer key "
                             f"{key.hex()}", {"context": context, "signed_by": signed.key.hex()})
    if signed.size > h.size or (signed.size == h.size and signed.root != h.root):
        raise IntegrityError(f"{address}'s head of {context!r} ({h.size} entries) contradicts the head "
                             f"its writer signed ({signed.size} entries)", {"context": context})
    if signed.size < h.size:
        yield from consistency_flow(context, signed.size, h.size, signed.root)  # IntegrityError unless a prefix
    return dataclasses.replace(h, verified=signed.size)


def size_flow(context: str) -> Flow[int]:
    """A context's size; 0 for one the node does not have."""
    try:
        r = yield call("head", context=context)
    except NotFound:
        return 0
    return int(r["size"])


def consistency_flow(context: str, first: int, second: int | None, first_root: bytes | None) -> Flow[ConsistencyProof]:
    r = yield call("consistency", context=context, first=first, second=second)
    p = ConsistencyProof(r["context"], r["first"], r["second"], r["first_root"], r["second_root"], list(r["proof"]))
    if first_root is not None and first_root != p.first_root:
        raise IntegrityError(f"the node's root at size {first} is not the one you know")
    merkle.verify_consistency(p.first, p.second, p.first_root, p.second_root, p.proof)
    return p


def contexts_flow() -> Flow[list[dict[str, Any]]]:
    out: list[dict[str, Any]] = []
    after = None
    while True:
        r = yield call("contexts", after=after, limit=codec.MAX_CONTEXTS_LIMIT)
        out.extend(r["contexts"])
        if not r["more"] or not r["contexts"]:
            return out
        after = r["next_after"]


def proof_flow(context: str, seq: int, size: int | None, check_entry: bool, writer_key: bytes | str | None,
               address: str, verify: bool) -> Flow[InclusionProof]:
    """An inclusion proof of entry `seq`, verified (see `Client.proof`)."""
    if seq < 1:
        raise BadRequest("seq starts at 1")
    signed = None
    if writer_key is not None:
        signed = (yield from head_flow(context, writer_key, address, verify)).signed
        assert signed is not None
        if seq > signed.size:
            raise IntegrityError(f"entry #{seq} of {context!r} is past the head its writer signed (#{signed.size})")
        size = signed.size
    r = yield call("proof", context=context, seq=seq, size=size)
    p = InclusionProof(r["context"], r["seq"], r["size"], r["leaf"], list(r["path"]), r["root"])
    if (p.context, p.seq) != (context, seq) or (size is not None and p.size != size):
        raise IntegrityError("the node proved something other than what was asked")
    merkle.verify_inclusion(p.leaf, p.seq - 1, p.size, p.path, p.root)
    if signed is not None and p.root != signed.root:
        raise IntegrityError(f"the node's proof of {context!r}#{seq} is not against the root its writer signed")
    if check_entry:
        r2 = yield call("get", context=context, after=seq - 1, limit=1)
        entries = r2["entries"]
        if not entries:
            raise IntegrityError(f"the node proved seq {seq} but does not serve it")
        e = entry_of(entries[0], True)
        if e.seq != seq or e.context != context or e.hash != p.leaf:
            raise IntegrityError(f"entry #{seq} does not hash to the proven leaf")
    return p


def check_entries_flow(context: str, entries: list[Entry], writer_key: bytes | str, address: str,
                       verify: bool) -> Flow[int]:
    """Check `entries` against the head their writer signed (see `Client.check_entries`)."""
    signed = (yield from head_flow(context, writer_key, address, verify)).signed
    assert signed is not None
    past = [e.seq for e in entries if e.seq > signed.size]
    if past:
        raise IntegrityError(f"entries of {context!r} from #{past[0]} on are past the head its writer signed "
                             f"that this node holds (#{signed.size})", {"context": context})
    asked = []
    for e in entries:  # the proofs asked for all at once
        asked.append((e, (yield Submit("proof", {"context": context, "seq": e.seq, "size": signed.size}))))
    for e, handle in asked:
        r = yield Result(handle)
        if r["root"] != signed.root or r["leaf"] != e.hash or r["seq"] != e.seq:
            raise IntegrityError(f"{context!r}#{e.seq} is not the entry its writer signed", {"seq": e.seq})
        merkle.verify_inclusion(r["leaf"], e.seq - 1, signed.size, list(r["path"]), signed.root)
    return signed.size


def first_after_lamport_flow(context: str, after_lamport: int) -> Flow[int]:
    """The `after` (a seq) from which a context's entries have lamport > after_lamport.

    Lamport values grow with seq within a context (its writer's clock only
    moves forward), so a binary search reads O(log n) single entries."""
    size = yield from size_flow(context)
    lo, hi = 0, size  # entries <= lo have lamport <= N (lo = 0: none known); answer in [lo, hi]
    while lo < hi:
        mid = (lo + hi + 1) // 2
        r = yield call("get", context=context, after=mid - 1, limit=1)
        if not r["entries"]:
            hi = mid - 1
        elif entry_of(r["entries"][0]).lamport <= after_lamport:
            lo = mid
        else:
            hi = mid - 1
    return lo


def merge_key(e: Entry) -> tuple[int, str, str, int]:
    """The causal order of `merged`: (lamport, writer, context, seq)."""
    return (e.lamport, e.writer, e.context, e.seq)


def snapshot_flow(context: str, out: IO[bytes], size: int | None, verify: bool,
                  on_progress: ProgressFn | None = None) -> Flow[dict[str, Any]]:
    """Write a verified snapshot of `context` (at `size`, default now) to `out`; `on_progress(done,
    size)` after each page."""
    r = yield call("snapshot", context=context, size=size, after=0, limit=codec.MAX_GET_LIMIT)
    size, root = r["size"], r["root"]
    verifier = SnapshotVerifier(context, size, root)
    signed = signed_of(r)
    if signed is not None and ((signed.context, signed.size, signed.root) != (context, size, root)
                               or not signed.verify()):
        signed = None  # (a later head with a proof, or a bad one: not what the file can carry)
    out.write(encode_header(context, size, root, signed))
    pk = msgpack.Packer(use_bin_type=True)
    while True:
        for m in r["entries"]:
            verifier.add(entry_of(m, verify))
            out.write(pk.pack(m))
        if on_progress is not None:
            on_progress(verifier.frontier.size, size)
        if not r["more"]:
            break
        r = yield call("snapshot", context=context, size=size, after=r["next_after"], limit=codec.MAX_GET_LIMIT)
        if r["root"] != root:
            raise IntegrityError("the node changed its root for a fixed size during the snapshot")
    verifier.finish()
    return {"context": context, "size": size, "root": root}


def load_flow(context: str, src: IO[bytes], fail_if_exists: bool, chunk_bytes: int,
              on_progress: ProgressFn | None = None) -> Flow[Head]:
    """Load a snapshot file; the node re-verifies everything before it writes. `on_progress(sent,
    size)` after each chunk the node took."""
    header, entries = read_snapshot(src)
    if header["context"] != context:
        raise BadRequest(
            f"the snapshot is of context {header['context']!r}, not {context!r} "
            "(entries are hashed with their context name and cannot be renamed)"
        )
    base = {"context": context, "load_id": os.urandom(8).hex(), "size": header["size"], "root": header["root"],
            "fail_if_exists": fail_if_exists}
    verifier = SnapshotVerifier(context, header["size"], header["root"])
    chunk: list[dict[str, Any]] = []
    nbytes = 0
    sent = False
    try:
        for e in entries:
            verifier.add(e)  # fail early here; the node checks again
            if len(e.payload) > chunk_bytes:
                raise TooLarge(f"entry #{e.seq} is larger than a load chunk")
            if chunk and nbytes + len(e.payload) + 512 > chunk_bytes:
                sent = True
                yield call("load", False, entries=chunk, final=False, **base)
                if on_progress is not None:
                    on_progress(chunk[-1]["seq"], header["size"])
                chunk, nbytes = [], 0
            chunk.append(e.to_wire())
            nbytes += len(e.payload) + 512
        verifier.finish()
    except BaseException:
        if sent:  # do not leave staged chunks on the node until they expire
            try:
                yield call("load", False, abort=True, **base)
            except LedgerError:
                pass
        raise
    r = yield call("load", False, entries=chunk, final=True, signed=header.get("signed"), **base)
    if on_progress is not None:
        on_progress(header["size"], header["size"])
    return Head(r["context"], r["size"], r["root"], r["lamport"], r["writer"])


def verify_context_flow(context: str, writer_key: bytes | str | None, address: str,
                        verify: bool, on_progress: ProgressFn | None = None) -> Flow[dict[str, Any]]:
    """Download a context at its current size, re-hash everything, recompute the root (see
    `Client.verify_context`); `on_progress(checked, size)` after each page."""
    signed = (yield from head_flow(context, writer_key, address, verify)).signed if writer_key is not None else None
    first = yield call("snapshot", context=context, after=0, limit=codec.MAX_GET_LIMIT)
    size, root = first["size"], first["root"]
    verifier = SnapshotVerifier(context, size, root)
    signed_root = merkle.EMPTY_ROOT if signed is not None and signed.size == 0 else None
    r = first
    while True:
        # the next page is asked for before this one is checked: the node reads it meanwhile
        # (on 2 cores, 1M entries: 7.3 s one page at a time, the node's reading and the
        # client's hashing taking turns)
        ahead = ((yield Submit("snapshot", {"context": context, "size": size, "after": r["next_after"],
                                            "limit": codec.MAX_GET_LIMIT})) if r["more"] else None)
        for m in r["entries"]:
            e = entry_of(m, False)  # (the verifier re-hashes it)
            verifier.add(e)
            if signed is not None and e.seq == signed.size:
                signed_root = verifier.frontier.root()
        if on_progress is not None:
            on_progress(verifier.frontier.size, size)
        if ahead is None:
            break
        try:
            r = yield Result(ahead)
        except Timeout:  # asked again the usual way (with the client's retries)
            r = yield call("snapshot", context=context, size=size, after=verifier.frontier.size,
                           limit=codec.MAX_GET_LIMIT)
    verifier.finish()
    out = {"context": context, "size": size, "root": root, "ok": True}
    if signed is not None:
        if signed_root != signed.root:
            raise IntegrityError(f"the entries of {context!r} do not give the root their writer signed at "
                                 f"size {signed.size}", {"context": context, "size": signed.size})
        out["signed_size"] = signed.size
    return out


def refill_flow(context: str, key: str | None, cursor: watch.WatchCursor, verify: bool) -> Flow[list[Entry]]:
    """A watch's gap refilled by seq (SPEC 16.4): the entries it may now hand out, in order."""
    out: list[Entry] = []
    while True:
        r = yield call("get", context=context, key=key, after=cursor.refill_after(), limit=codec.MAX_GET_LIMIT)
        page = get_result_of(r, verify)
        out.extend(cursor.on_page(page.entries, page.next_after, page.last_seq, page.more))
        if not page.more or out:
            return out


def continuity_flow(context: str, cursor: watch.WatchCursor) -> Flow[None]:
    """After a restart or an outage: the node must still hold what a watch delivered (SPEC 16.4, 7)."""
    if cursor.last == 0:
        return
    cursor.check_size((yield from size_flow(context)))  # raises if the node holds fewer entries than delivered
    if cursor.last_hash is not None:
        r = yield call("get", context=context, after=cursor.last - 1, limit=1)
        if not r["entries"] or entry_of(r["entries"][0]).hash != cursor.last_hash:
            raise IntegrityError(
                f"entry {context!r}#{cursor.last} on the node is not the one this watch delivered; "
                "the node's history changed (lost writes under async durability?)",
                {"context": context, "seq": cursor.last},
            )


class WatchState:
    """What a watch knows and decides without I/O, for both clients' watches (`Watch`, `AsyncWatch`):
    the cursor (refill by seq, duplicates dropped), the node's heartbeat and boot, whether the node
    refused the subscription (then the watch polls), the entries ready to hand out."""

    def __init__(self, context: str, key: str | None, writer_key: bytes | str | None,
                 max_outage: float | None, timeout: float | None,
                 on_event: Callable[[str, str], None] | None, pub_address: str) -> None:
        try:  # a bad name is an error now, not after waiting for a greeting that cannot come
            check_name("context", context, MAX_CONTEXT_BYTES)
            if key is not None:
                check_name("key", key, MAX_KEY_BYTES, min_bytes=0)
        except RemoteProtocolError as exc:
            raise BadRequest(exc.message) from None
        if timeout is not None and not timeout > 0:
            raise BadRequest("a watch's timeout must be a positive number of seconds")
        self.context = context
        self.key = key
        # with a writer key, every entry is proven under the head its writer signed (SPEC 13.6)
        # before it is handed out (`checked`: up to which seq), an inclusion proof each
        self.writer_key = writer_key
        self.checked = 0
        self.max_outage = max_outage
        self.timeout = timeout  # seconds to wait for the next entry before Timeout (None: forever)
        self.on_event = on_event or (lambda kind, text: None)
        self.pub_address = normalize_address(pub_address)
        self.topic = watch.topic(context)
        self.heartbeat_s = 1.0
        self.boot: str | None = None
        self.limited = False  # the node refused our subscription (its watch limit): we poll
        self.refills = 0
        self.outages = 0
        self.ready: collections.deque[Entry] = collections.deque()
        self.early: list[watch.WatchMsg] = []
        self.heard = 0.0  # when the node last said anything (the driver's clock)
        self.cursor = watch.WatchCursor(context, 0, key)  # replaced by `start` once the size is known

    def start(self, after: int | None, size: int) -> None:
        """The catch-up point, once the greeting came (or not) and the context's size is known."""
        if after is None:
            after = size
        elif after > size:
            raise BadRequest(
                f"context {self.context!r} has {size} entries; cannot watch after #{after}, beyond its end",
                {"context": self.context, "size": size},
            )
        self.cursor = watch.WatchCursor(self.context, after, self.key)

    def decode(self, frames: list[bytes], verify: bool) -> watch.WatchMsg | None:
        try:
            m = watch.decode_message(frames)
        except RemoteProtocolError as exc:
            self.on_event("warning", f"ignored a malformed watch message: {exc.message}")
            return None
        if isinstance(m, watch.EntriesMsg) and verify:
            for e in m.entries:
                e.verify()
        return m

    def note_head(self, m: watch.HeadMsg, greeting: bool = False) -> bool:
        """Record a head's heartbeat and boot; True when the node restarted since the last one.
        Sets `limited` when the greeting says the node refused the subscription."""
        if m.heartbeat_ms:
            self.heartbeat_s = m.heartbeat_ms / 1000.0
        # Only the answer to our subscription says whether it was refused (SPEC 16.5); a
        # `limited` head later is another watcher's refusal that reached us too.
        if m.limited and greeting and not self.limited:
            self.limited = True
            self.on_event("limited", f"node at {self.pub_address} is at its watch limit (--max-watch-topics or "
                          f"--max-watchers-per-context; see its status) and will not publish "
                          f"{self.context!r} to this watch; polling it every {self.heartbeat_s:g} s instead")
        restarted = self.boot is not None and m.boot != self.boot
        self.boot = m.boot
        return restarted

    def on_message(self, m: watch.WatchMsg) -> bool:
        """Take a message in; True when the node restarted: the driver then runs `continuity_flow`
        and `resume(m)`."""
        if isinstance(m, watch.EntriesMsg):
            self.ready.extend(self.cursor.on_entries(m.entries))
            return False
        if self.note_head(m):
            self.on_event("restarted", f"node restarted (now {m.node_id}); resuming after #{self.cursor.last}")
            return True
        self.cursor.on_head(m.size)
        return False

    def resume(self, m: watch.HeadMsg) -> None:
        self.cursor.new_stream()
        self.cursor.on_head(m.size)

    def silence(self, left: float | None) -> float:
        """How long to wait for a message before probing the node (`left`: of `max_outage`)."""
        silence = max(3 * self.heartbeat_s, 1.0) + 0.5
        if self.limited:
            silence = self.heartbeat_s  # nothing live comes: poll (SPEC 16.5)
        if left is not None:
            silence = max(0.05, min(silence, left))
        return silence

    def left(self, now: float, wait: float) -> float:
        """Seconds left before `max_outage` runs out, counted from the last word of the node
        (`wait`, a request's timeout, when there is no `max_outage`)."""
        if self.max_outage is None:
            return wait
        return self.max_outage - (now - self.heard)

    # -- flows: what both watches do, with the waiting left to their drivers ----------------

    def take_flow(self, messages: list[list[bytes]], verify: bool) -> Flow[None]:
        """Take in messages read from the watch socket."""
        for frames in messages:
            m = self.decode(frames, verify)
            if m is not None and self.on_message(m):
                assert isinstance(m, watch.HeadMsg)
                yield from continuity_flow(self.context, self.cursor)
                self.resume(m)

    def refill_flow(self, verify: bool) -> Flow[None]:
        self.ready.extend((yield from refill_flow(self.context, self.key, self.cursor, verify)))
        self.refills += 1

    def start_flow(self, after: int | None, verify: bool, wait: float) -> Flow[None]:
        """Subscribed: wait up to `wait` for the node's greeting (from then on, live delivery is
        complete), then set the catch-up point (SPEC 16.4)."""
        deadline = (yield CLOCK) + wait
        greeted = False
        while not greeted:
            left = deadline - (yield CLOCK)
            if left <= 0:
                # No greeting (an older node, or the PUB port is unreachable): go on;
                # completeness then rests on seq gaps and heads, as always.
                self.on_event("warning", f"no greeting on {self.pub_address}; watching without it")
                break
            for frames in (yield Receive(left)):
                m = self.decode(frames, verify)
                if m is None:
                    continue
                self.early.append(m)
                if isinstance(m, watch.HeadMsg) and not greeted:
                    greeted = True
                    self.note_head(m, greeting=True)
                    if self.limited:
                        yield Unsubscribe()  # nothing live comes to a refused subscription: give the place back
        self.heard = yield CLOCK
        self.start(after, (yield from size_flow(self.context)))
        early, self.early = self.early, []
        for m in early:
            if self.on_message(m):
                assert isinstance(m, watch.HeadMsg)
                yield from continuity_flow(self.context, self.cursor)
                self.resume(m)

    def outage_flow(self, why: str, wait: float, address: str) -> Flow[None]:
        """The node is not answering: ping it until it does (or `max_outage` runs out), then
        check that it still holds what was delivered."""
        self.outages += 1
        self.on_event("lost", f"node at {address} is not answering ({why}); retrying")
        while True:
            now = yield CLOCK
            left = self.left(now, wait)
            if self.max_outage is not None and left <= 0:
                raise Unavailable(f"node at {address} did not come back within {self.max_outage:g} s",
                                  {"address": address})
            if (yield Ping(min(wait, left))):
                break
            # nothing listening fails at once: do not spin on a node that is down
            later = yield CLOCK
            yield Sleep(max(0.0, min(0.2 - (later - now), self.left(later, wait))))
        self.heard = yield CLOCK
        yield from continuity_flow(self.context, self.cursor)
        self.on_event("back", f"node at {address} is back; resuming after #{self.cursor.last}")

    def next_flow(self, verify: bool, wait: float, address: str) -> Flow[Entry]:
        """The next entry: live, refilled by seq, through outages (SPEC 16.4); `wait` is the
        client's timeout, `address` its node's."""
        began = yield CLOCK
        while not self.ready:
            now = yield CLOCK
            waited = now - began
            if self.timeout is not None and waited >= self.timeout:
                raise self.idle_timeout(waited)
            try:
                if self.cursor.needs_refill():
                    yield from self.refill_flow(verify)
                    continue
                silence = self.silence(self.left(now, wait) if self.max_outage is not None else None)
                if self.timeout is not None:
                    silence = min(silence, self.timeout - waited)
                messages = yield Receive(silence)
                if messages:
                    self.heard = yield CLOCK
                    yield from self.take_flow(messages, verify)
                    continue
                now = yield CLOCK
                if self.timeout is not None and now - began >= self.timeout:
                    continue  # (raised above)
                # Silence for three heartbeats: a dead node, or a lost subscription.
                # (A limited watch polls: the refill's own timeout tells of a dead node.)
                if not self.limited and not (yield Ping(min(wait, self.left(now, wait)))):
                    yield from self.outage_flow("no heartbeat", wait, address)
                self.heard = yield CLOCK
                yield from self.refill_flow(verify)
            except Timeout as exc:
                yield from self.outage_flow(exc.message, wait, address)
        if self.writer_key is not None and self.ready[0].seq > self.checked:
            # what is ready, proven under the head its writer signed before any of it is handed out
            batch = list(self.ready)
            yield from check_entries_flow(self.context, batch, self.writer_key, address, verify)
            self.checked = batch[-1].seq
        return self.ready.popleft()

    def idle_timeout(self, waited: float) -> Timeout:
        return Timeout(f"no entry of {self.context!r} within {waited:.1f} s (the watch's timeout)",
                       {"context": self.context, "waited": round(waited, 3), "last_seq": self.cursor.last})
