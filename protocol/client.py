"""The reference Python client of protocol v1 (the one module of `protocol` with sockets).

Synchronous, with timeouts, pipelining (`submit` many requests, then
`result` each) and retries that are safe: reads are retried freely; appends
are retried only when they carry a `dedup_id`, which makes a retry return the
original entry instead of appending twice. Every error reply raises the
exception class of its code (`protocol.errors`). What the node proves (entry
hashes, inclusion and consistency proofs, snapshot roots) is verified here
before it is returned.
"""

from __future__ import annotations

import collections
import dataclasses
import heapq
import itertools
import os
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import IO, Any

import msgpack
import zmq

from protocol import codec, heads, merkle, watch
from protocol.entry import MAX_CONTEXT_BYTES, MAX_KEY_BYTES, Entry, check_name, entry_from_wire
from protocol.errors import (
    BadRequest,
    IntegrityError,
    LedgerError,
    NotFound,
    NotWriter,
    RemoteProtocolError,
    Timeout,
    TooLarge,
    Unavailable,
    error_for,
)
from protocol.heads import SignedHead
from protocol.keys import Identity, curve_public, parse_public_key
from protocol.snapshot import SnapshotVerifier, encode_header, read_snapshot

DEFAULT_TIMEOUT = 5.0
DEFAULT_WINDOW = 1000
MAX_REDIRECTS = 2
LOAD_CHUNK_BYTES = 4 << 20


def normalize_address(address: str) -> str:
    """'host:port' or 'tcp://host:port' -> 'tcp://host:port'."""
    if "://" in address:
        return address
    host, sep, port = address.rpartition(":")
    if not sep or not (port.isascii() and port.isdigit()):
        raise ValueError(f"node address must be HOST:PORT, got {address!r}")
    return f"tcp://{host or '127.0.0.1'}:{port}"


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


class Client:
    """A connection to one node. Not thread-safe (neither are ZeroMQ sockets)."""

    def __init__(
        self,
        address: str = "127.0.0.1:7400",
        *,
        timeout: float = DEFAULT_TIMEOUT,
        retries: int = 1,
        verify: bool = True,
        zctx: zmq.Context[Any] | None = None,
        key: Identity | None = None,
        server_key: bytes | str | None = None,
    ) -> None:
        """`key` and `server_key`: for a node with keys (SPEC 13), this client's identity (its
        public key in the node's client allowlist) and the node's public key (hex or 32 bytes,
        from its `status` or the operator), which the node must prove: CURVE on every socket."""
        self.address = normalize_address(address)
        if (key is None) != (server_key is None):
            raise BadRequest("a client with keys needs both its own key and the node's public key (server_key)")
        self.key = key
        self.server_key = parse_public_key(server_key) if isinstance(server_key, str) else server_key
        self.timeout = timeout
        self.retries = retries
        self.verify = verify
        self._zctx = zctx or zmq.Context.instance()
        self._sock: zmq.Socket[Any] | None = None
        self._next_id = int.from_bytes(os.urandom(3), "big") << 20
        self._stash: dict[Any, dict[str, Any]] = {}
        self._sent: dict[Any, bytes] = {}
        self._writers: dict[str, Client] = {}
        self._redirect: Client | None = None
        self.last_replicated: int | None = None  # other nodes holding the last replicas=N append
        self._connect()

    # -- plumbing ----------------------------------------------------------------

    def _connect(self) -> None:
        s = self._zctx.socket(zmq.DEALER)
        s.setsockopt(zmq.LINGER, 0)
        if "[" in self.address:
            s.setsockopt(zmq.IPV6, 1)
        s.setsockopt(zmq.SNDHWM, 100_000)
        s.setsockopt(zmq.RCVHWM, 100_000)
        self._curve(s)
        s.connect(self.address)
        self._sock = s

    def _curve(self, s: zmq.Socket[Any]) -> None:
        """Make `s` a CURVE client of the node (a client with keys)."""
        if self.key is None or self.server_key is None:
            return
        public, secret = self.key.curve_keypair()
        s.setsockopt(zmq.CURVE_PUBLICKEY, public)
        s.setsockopt(zmq.CURVE_SECRETKEY, secret)
        s.setsockopt(zmq.CURVE_SERVERKEY, curve_public(self.server_key))

    def _reconnect(self) -> None:
        # Lazy Pirate: a fresh socket drops whatever the old one still queued.
        if self._sock is not None:
            self._sock.close(linger=0)
        self._connect()

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close(linger=0)
            self._sock = None
        for c in self._writers.values():
            c.close()
        self._writers.clear()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def submit(self, op: str, **fields: Any) -> int:
        """Send a request without waiting; returns its id for `result`."""
        rid = self._next_id
        self._next_id += 1
        frame = codec.encode_request(op, rid, {k: v for k, v in fields.items() if v is not None})
        self._sent[rid] = frame
        assert self._sock is not None, "client is closed"
        self._sock.send(frame)
        return rid

    def result(self, rid: int, timeout: float | None = None) -> dict[str, Any]:
        """Wait for the reply to `rid`; raise its error, or Timeout."""
        reply = self._wait(rid, self.timeout if timeout is None else timeout)
        self._sent.pop(rid, None)
        if not reply.get("ok"):
            err = reply.get("error") or {}
            details = {k: v for k, v in err.items() if k not in ("code", "message")}
            raise error_for(str(err.get("code", "INTERNAL")), str(err.get("message", "")), details)
        return reply

    def _wait(self, rid: int, timeout: float) -> dict[str, Any]:
        if rid in self._stash:
            return self._stash.pop(rid)
        sock = self._sock
        assert sock is not None, "client is closed"
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not sock.poll(int(left * 1000) + 1, zmq.POLLIN):
                if time.monotonic() >= deadline:
                    raise Timeout(
                        f"no answer from {self.address} within {timeout:g} s (is ledger-node running there?)",
                        {"address": self.address},
                    )
                continue
            frames = sock.recv_multipart()
            try:
                reply = codec.decode_reply(frames[-1])
            except RemoteProtocolError:
                continue  # not a reply we can read: ignore it
            got = reply.get("id")
            if got == rid:
                return reply
            if got in self._sent:
                self._stash[got] = reply

    def _ready(self, rid: int) -> bool:
        """Whether the reply to `rid` has arrived (reads what is queued, never waits)."""
        sock = self._sock
        while rid not in self._stash and sock is not None and sock.poll(0, zmq.POLLIN):
            frames = sock.recv_multipart()
            try:
                reply = codec.decode_reply(frames[-1])
            except RemoteProtocolError:
                continue
            if reply.get("id") in self._sent:
                self._stash[reply["id"]] = reply
        return rid in self._stash

    def call(self, op: str, *, retry: bool = True, **fields: Any) -> dict[str, Any]:
        """One request and its reply, retried on timeout when `retry` is safe."""
        attempts = 1 + (self.retries if retry else 0)
        for attempt in range(attempts):
            rid = self.submit(op, **fields)
            try:
                return self.result(rid)
            except Timeout:
                self._sent.pop(rid, None)
                self._reconnect()
                if attempt + 1 >= attempts:
                    if not retry:
                        raise Timeout(
                            f"no answer from {self.address} within {self.timeout:g} s; the {op} may or "
                            "may not have been applied (pass dedup_id to make retries safe)",
                            {"address": self.address},
                        ) from None
                    raise
        raise AssertionError("unreachable")

    def _entry(self, m: Any) -> Entry:
        try:
            e = entry_from_wire(m)
        except RemoteProtocolError as exc:
            raise IntegrityError(f"node sent a malformed entry: {exc.message}") from None
        if self.verify:
            e.verify()
        return e

    # -- operations ------------------------------------------------------------------

    def ping(self) -> str:
        return str(self.call("ping")["node_id"])

    def append(
        self,
        context: str,
        payload: bytes | str,
        *,
        key: str = "",
        metadata: Mapping[str, str] | None = None,
        dedup_id: bytes | str | None = None,
        expect_seq: int | None = None,
        after_lamport: int | None = None,
        replicas: int | None = None,
    ) -> Entry:
        """Append one entry. With `replicas=N` the node answers once N other nodes hold
        it (`last_replicated` says how many), or raises Unavailable with `replicated`
        in its details when they do not within the node's replica timeout."""
        if isinstance(payload, str):
            payload = payload.encode()
        r = self._follow(
            "append", retry=dedup_id is not None, context=context, key=key, payload=payload,
            metadata=dict(metadata) if metadata else None, dedup_id=dedup_id,
            expect_seq=expect_seq, after_lamport=after_lamport, replicas=replicas,
        )
        self.last_replicated = r.get("replicated")
        return self._entry(r["entry"])

    def append_batch(
        self,
        context: str,
        items: Iterable[tuple[str, bytes | str, Mapping[str, str] | None] | bytes | str],
        *,
        dedup_id: bytes | str | None = None,
        expect_seq: int | None = None,
        after_lamport: int | None = None,
        replicas: int | None = None,
    ) -> list[Entry]:
        """Append many entries atomically. Items are payloads or (key, payload, metadata)."""
        entries: list[dict[str, Any]] = []
        for it in items:
            if isinstance(it, (bytes, str)):
                entries.append({"key": "", "payload": it})
            else:
                k, p, md = it
                entries.append({"key": k, "payload": p, "metadata": dict(md) if md else None})
        r = self._follow(
            "append_batch", retry=dedup_id is not None, context=context, entries=entries,
            dedup_id=dedup_id, expect_seq=expect_seq, after_lamport=after_lamport, replicas=replicas,
        )
        self.last_replicated = r.get("replicated")
        return [self._entry(m) for m in r["entries"]]

    def append_many(
        self,
        context: str,
        payloads: Iterable[bytes | str],
        *,
        key: str = "",
        metadata: Mapping[str, str] | None = None,
        window: int = DEFAULT_WINDOW,
        dedup_prefix: str | None = None,
    ) -> Iterator[Entry]:
        """Pipelined appends, up to `window` in flight; yields entries in order.

        At a node that is not the context's writer, everything not yet
        acknowledged (none of it was applied) goes to the writer instead."""
        md = dict(metadata) if metadata else None

        def items() -> Iterator[tuple[bytes, str | None]]:
            for i, p in enumerate(payloads):
                yield (p.encode() if isinstance(p, str) else p), (f"{dedup_prefix}:{i}" if dedup_prefix else None)

        return self._append_many(context, items(), key, md, window, 0)

    def _append_many(self, context: str, items: Iterator[tuple[bytes, str | None]], key: str,
                     md: dict[str, str] | None, window: int, hops: int) -> Iterator[Entry]:
        inflight: collections.deque[tuple[int, bytes, str | None]] = collections.deque()

        def take() -> Entry:
            rid, p, dd = inflight[0]
            try:
                e = self._entry(self.result(rid)["entry"])
            except NotWriter as exc:
                if hops >= MAX_REDIRECTS or not exc.details.get("address"):
                    raise
                self._redirect = self._writer_client(str(exc.details["address"]), exc.details.get("key"))
                raise
            inflight.popleft()
            return e

        try:
            for p, dd in items:
                inflight.append((self.submit("append", context=context, key=key, payload=p, metadata=md,
                                             dedup_id=dd), p, dd))
                if len(inflight) >= window:
                    yield take()
                # Hand back what is already acknowledged, so a slow producer
                # (`tail -f | ledger append --lines`) sees progress at once.
                while inflight and self._ready(inflight[0][0]):
                    yield take()
            while inflight:
                yield take()
        except NotWriter:
            writer = self._redirect
            assert writer is not None
            for rid, _, _ in inflight:
                self._sent.pop(rid, None)
                self._stash.pop(rid, None)
            rest = itertools.chain([(p, dd) for _, p, dd in inflight], items)
            yield from writer._append_many(context, rest, key, md, window, hops + 1)

    def _writer_client(self, address: str, key: Any = None) -> Client:
        """A client of the writer node a NOT_WRITER reply named (kept for later appends); with keys,
        the writer's public key comes from that reply (`key`), sent by the node this client authenticated."""
        c = self._writers.get(address)
        if c is None:
            server_key = None
            if self.key is not None:
                if not isinstance(key, str):
                    raise Unavailable(f"the writer at {address} has no known key; cannot authenticate it")
                server_key = key
            c = Client(address, timeout=self.timeout, retries=self.retries, verify=self.verify, zctx=self._zctx,
                       key=self.key if server_key is not None else None, server_key=server_key)
            self._writers[address] = c
        return c

    def _follow(self, op: str, retry: bool, **fields: Any) -> dict[str, Any]:
        """`call`, following NOT_WRITER to the context's writer (appends)."""
        client: Client = self
        writer = None
        for _ in range(MAX_REDIRECTS + 1):
            try:
                return client.call(op, retry=retry, **fields)
            except NotWriter as exc:
                address = exc.details.get("address")
                if not address:
                    raise
                writer = exc.details.get("writer")
                client = self._writer_client(str(address), exc.details.get("key"))
            except Timeout as exc:
                if client is self:
                    raise
                raise Timeout(
                    f"{self.address} sent this append to the writer of {fields.get('context')!r}, {writer!r}, at "
                    f"{client.address}, which did not answer within {client.timeout:g} s (it may be down)",
                    exc.details,
                ) from None
        raise Unavailable(f"too many NOT_WRITER redirects for {fields.get('context')!r}")

    def get(self, context: str, *, key: str | None = None, after: int = 0, limit: int | None = None,
            fork: str | None = None, fork_index: int | None = None) -> GetResult:
        """Entries with seq > `after`; with `fork`, of the history by that writer a fork set aside
        (with `fork_index`, the n-th of them from 1; by default the latest)."""
        r = self.call("get", context=context, key=key, after=after, limit=limit, fork=fork, fork_index=fork_index)
        return GetResult([self._entry(m) for m in r["entries"]], r["last_seq"], r["more"], r["next_after"])

    def iter_entries(self, context: str, *, key: str | None = None, after: int = 0, fork: str | None = None,
                     fork_index: int | None = None) -> Iterator[Entry]:
        """Every entry after `after` (as of the time each page is read), paging; with `fork`, of a
        history set aside (see `get`)."""
        while True:
            page = self.get(context, key=key, after=after, limit=codec.MAX_GET_LIMIT, fork=fork,
                            fork_index=fork_index)
            yield from page.entries
            if not page.more:
                return
            after = page.next_after

    def _first_after_lamport(self, context: str, after_lamport: int) -> int:
        """The `after` (a seq) from which a context's entries have lamport > after_lamport.

        Lamport values grow with seq within a context (its writer's clock only
        moves forward), so a binary search reads O(log n) single entries."""
        try:
            size = self.head(context).size
        except NotFound:
            return 0
        lo, hi = 0, size  # entries <= lo have lamport <= N (lo = 0: none known); answer in [lo, hi]
        while lo < hi:
            mid = (lo + hi + 1) // 2
            page = self.get(context, after=mid - 1, limit=1)
            if not page.entries:
                hi = mid - 1
            elif page.entries[0].lamport <= after_lamport:
                lo = mid
            else:
                hi = mid - 1
        return lo

    def merged(self, contexts: Iterable[str], *, after_lamport: int = 0) -> Iterator[Entry]:
        """Entries of several contexts in one causal order: (lamport, writer, context, seq).

        If entry A was seen before B was appended (and B's append carried A's
        lamport, or happened where A had arrived), A comes first. Only entries
        with lamport > `after_lamport`; each context is read page by page."""
        streams = []
        for name in dict.fromkeys(contexts):
            start = self._first_after_lamport(name, after_lamport) if after_lamport else 0
            streams.append(self.iter_entries(name, after=start))
        return heapq.merge(*streams, key=lambda e: (e.lamport, e.writer, e.context, e.seq))

    def head(self, context: str, *, writer_key: bytes | str | None = None) -> Head:
        """The context's head. With `writer_key` (the writer's public key, pinned by the caller), it is
        checked against a head signed with that key (SPEC 13.6): IntegrityError unless the node holds
        one for this context whose root is the node's root at that size; `verified` says up to which
        size (entries past it, if the node holds more, are not yet covered by a signature it has)."""
        r = self.call("head", context=context)
        signed = _signed_of(r)
        h = Head(r["context"], r["size"], r["root"], r["lamport"], r["writer"], r.get("watchers", 0), r.get("fork"),
                 r.get("damaged"), signed)
        if writer_key is None:
            return h
        key = parse_public_key(writer_key, "writer key") if isinstance(writer_key, str) else writer_key
        if signed is None:
            raise IntegrityError(f"{self.address} has no head of {context!r} signed by its writer {h.writer!r} (a "
                                 "replica keeps its writer's signed heads only in a mesh with keys: ask the writer)",
                                 {"context": context, "writer": h.writer})
        if signed.context != context or not signed.verify(key):
            raise IntegrityError(f"the head of {context!r} at {self.address} is not signed by the writer key "
                                 f"{key.hex()}", {"context": context, "signed_by": signed.key.hex()})
        if signed.size > h.size or (signed.size == h.size and signed.root != h.root):
            raise IntegrityError(f"{self.address}'s head of {context!r} ({h.size} entries) contradicts the head "
                                 f"its writer signed ({signed.size} entries)", {"context": context})
        if signed.size < h.size:
            self.consistency(context, signed.size, h.size, first_root=signed.root)  # IntegrityError unless a prefix
        return dataclasses.replace(h, verified=signed.size)

    def pub_address(self) -> str:
        """The node's watch (PUB) address, reached through the host this client uses."""
        pub = str(self.status()["pub"])
        port = pub.rpartition(":")[2]
        host = self.address.split("://", 1)[1].rpartition(":")[0]
        return f"tcp://{host}:{port}"

    def watch(
        self,
        context: str,
        after: int | None = None,
        key: str | None = None,
        **options: Any,
    ) -> Watch:
        """Entries of `context` in seq order, exactly once, live.

        `after=None`: only entries appended from now on; `after=N`: every entry
        with seq > N, then live. `key` filters both phases. Options:
        `pub_address`, `max_outage` (seconds to wait for a node that stopped
        answering before raising Unavailable; default forever), `on_event`
        (called with (kind, text) on outages, restarts and warnings).
        """
        return Watch(self, context, after, key, **options)

    def contexts(self) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        after = None
        while True:
            r = self.call("contexts", after=after, limit=codec.MAX_CONTEXTS_LIMIT)
            out.extend(r["contexts"])
            if not r["more"] or not r["contexts"]:
                return out
            after = r["next_after"]

    def status(self) -> dict[str, Any]:
        r = self.call("status")
        return {k: v for k, v in r.items() if k not in ("v", "id", "ok")}

    def proof(self, context: str, seq: int, size: int | None = None, *, check_entry: bool = True,
              writer_key: bytes | str | None = None) -> InclusionProof:
        """An inclusion proof of entry `seq`, verified.

        With `check_entry` (the default) the entry itself is fetched too and must
        re-hash to the proven leaf with this very seq: a proof over hashes alone
        shows that *some* leaf is in the tree, the entry check shows which one.
        With `writer_key`, the proof is against the head the writer signed (SPEC 13.6).
        """
        if seq < 1:
            raise BadRequest("seq starts at 1")
        signed = None
        if writer_key is not None:
            signed = self.head(context, writer_key=writer_key).signed
            assert signed is not None
            if seq > signed.size:
                raise IntegrityError(f"entry #{seq} of {context!r} is past the head its writer signed (#{signed.size})")
            size = signed.size
        r = self.call("proof", context=context, seq=seq, size=size)
        p = InclusionProof(r["context"], r["seq"], r["size"], r["leaf"], list(r["path"]), r["root"])
        if (p.context, p.seq) != (context, seq) or (size is not None and p.size != size):
            raise IntegrityError("the node proved something other than what was asked")
        merkle.verify_inclusion(p.leaf, p.seq - 1, p.size, p.path, p.root)
        if signed is not None and p.root != signed.root:
            raise IntegrityError(f"the node's proof of {context!r}#{seq} is not against the root its writer signed")
        if check_entry:
            r2 = self.call("get", context=context, after=seq - 1, limit=1)
            entries = r2["entries"]
            if not entries:
                raise IntegrityError(f"the node proved seq {seq} but does not serve it")
            e = entry_from_wire(entries[0]) if not self.verify else self._entry(entries[0])
            e.verify()
            if e.seq != seq or e.context != context or e.hash != p.leaf:
                raise IntegrityError(f"entry #{seq} does not hash to the proven leaf")
        return p

    def consistency(
        self, context: str, first: int, second: int | None = None, *, first_root: bytes | None = None
    ) -> ConsistencyProof:
        r = self.call("consistency", context=context, first=first, second=second)
        p = ConsistencyProof(r["context"], r["first"], r["second"], r["first_root"], r["second_root"], list(r["proof"]))
        if first_root is not None and first_root != p.first_root:
            raise IntegrityError(f"the node's root at size {first} is not the one you know")
        merkle.verify_consistency(p.first, p.second, p.first_root, p.second_root, p.proof)
        return p

    def snapshot(self, context: str, out: IO[bytes], *, size: int | None = None) -> dict[str, Any]:
        """Write a verified snapshot of `context` (at `size`, default now) to `out`."""
        r = self.call("snapshot", context=context, size=size, after=0, limit=codec.MAX_GET_LIMIT)
        size, root = r["size"], r["root"]
        verifier = SnapshotVerifier(context, size, root)
        signed = _signed_of(r)
        if signed is not None and ((signed.context, signed.size, signed.root) != (context, size, root)
                                   or not signed.verify()):
            signed = None  # (a later head with a proof, or a bad one: not what the file can carry)
        out.write(encode_header(context, size, root, signed))
        pk = msgpack.Packer(use_bin_type=True)
        while True:
            for m in r["entries"]:
                e = self._entry(m)
                verifier.add(e)
                out.write(pk.pack(m))
            if not r["more"]:
                break
            r = self.call("snapshot", context=context, size=size, after=r["next_after"], limit=codec.MAX_GET_LIMIT)
            if r["root"] != root:
                raise IntegrityError("the node changed its root for a fixed size during the snapshot")
        verifier.finish()
        return {"context": context, "size": size, "root": root}

    def load(self, context: str, src: IO[bytes], *, fail_if_exists: bool = False,
             chunk_bytes: int = LOAD_CHUNK_BYTES) -> Head:
        """Load a snapshot file; the node re-verifies everything before it writes."""
        header, entries = read_snapshot(src)
        if header["context"] != context:
            raise BadRequest(
                f"the snapshot is of context {header['context']!r}, not {context!r} "
                "(entries are hashed with their context name and cannot be renamed)"
            )
        load_id = os.urandom(8).hex()
        base = {"context": context, "load_id": load_id, "size": header["size"], "root": header["root"],
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
                    self.call("load", retry=False, entries=chunk, final=False, **base)
                    chunk, nbytes = [], 0
                chunk.append(e.to_wire())
                nbytes += len(e.payload) + 512
            verifier.finish()
        except BaseException:
            if sent:  # do not leave staged chunks on the node until they expire
                try:
                    self.call("load", retry=False, abort=True, **base)
                except LedgerError:
                    pass
            raise
        r = self.call("load", retry=False, entries=chunk, final=True, signed=header.get("signed"), **base)
        return Head(r["context"], r["size"], r["root"], r["lamport"], r["writer"])

    def check_entries(self, context: str, entries: list[Entry], writer_key: bytes | str) -> int:
        """Check `entries` (read from this node) against the head their writer signed with
        `writer_key`: each is proven to be the leaf at its seq under the signed root (SPEC 13.6), the
        proofs asked for all at once. IntegrityError when one is not, or lies past the signed size.
        Returns the signed size."""
        signed = self.head(context, writer_key=writer_key).signed
        assert signed is not None
        past = [e.seq for e in entries if e.seq > signed.size]
        if past:
            raise IntegrityError(f"entries of {context!r} from #{past[0]} on are past the head its writer signed "
                                 f"that this node holds (#{signed.size})", {"context": context})
        asked = [(e, self.submit("proof", context=context, seq=e.seq, size=signed.size)) for e in entries]
        for e, rid in asked:
            r = self.result(rid)
            if r["root"] != signed.root or r["leaf"] != e.hash or r["seq"] != e.seq:
                raise IntegrityError(f"{context!r}#{e.seq} is not the entry its writer signed", {"seq": e.seq})
            merkle.verify_inclusion(r["leaf"], e.seq - 1, signed.size, list(r["path"]), signed.root)
        return signed.size

    def verify_context(self, context: str, *, writer_key: bytes | str | None = None) -> dict[str, Any]:
        """Download a context at its current size, re-hash everything, recompute the root. With
        `writer_key`, also check the entries against the head their writer signed (SPEC 13.6): the
        root recomputed at the signed size must be the signed root (`signed_size` in the result)."""
        signed = self.head(context, writer_key=writer_key).signed if writer_key is not None else None
        first = self.call("snapshot", context=context, after=0, limit=codec.MAX_GET_LIMIT)
        size, root = first["size"], first["root"]
        verifier = SnapshotVerifier(context, size, root)
        signed_root = merkle.EMPTY_ROOT if signed is not None and signed.size == 0 else None
        r = first
        while True:
            # the next page is asked for before this one is checked: the node reads it meanwhile
            # (on 2 cores, 1M entries: 7.3 s one page at a time, the node's reading and the
            # client's hashing taking turns)
            ahead = (self.submit("snapshot", context=context, size=size, after=r["next_after"],
                                 limit=codec.MAX_GET_LIMIT) if r["more"] else None)
            for m in r["entries"]:
                try:
                    e = entry_from_wire(m)
                except RemoteProtocolError as exc:
                    raise IntegrityError(f"node sent a malformed entry: {exc.message}") from None
                verifier.add(e)
                if signed is not None and e.seq == signed.size:
                    signed_root = verifier.frontier.root()
            if ahead is None:
                break
            try:
                r = self.result(ahead)
            except Timeout:  # asked again the usual way (with the client's retries)
                r = self.call("snapshot", context=context, size=size, after=verifier.frontier.size,
                              limit=codec.MAX_GET_LIMIT)
        verifier.finish()
        out = {"context": context, "size": size, "root": root, "ok": True}
        if signed is not None:
            if signed_root != signed.root:
                raise IntegrityError(f"the entries of {context!r} do not give the root their writer signed at "
                                     f"size {signed.size}", {"context": context, "size": signed.size})
            out["signed_size"] = signed.size
        return out


def _signed_of(reply: Mapping[str, Any]) -> SignedHead | None:
    """The signed head a `head` or `snapshot` reply carries, if any (SPEC 13.6)."""
    if reply.get("signed") is None:
        return None
    try:
        return heads.from_map(reply["signed"])
    except RemoteProtocolError as exc:
        raise IntegrityError(f"the node sent a malformed signed head: {exc.message}") from None


class Watch:
    """A live, exactly-once, in-order stream of one context's entries (see `Client.watch`).

    Iterate it for entries; `close()` (or leaving a `with` block) releases its
    socket. It subscribes first, waits until the node confirms the
    subscription, catches up over the request socket, then delivers live
    entries, refilling by seq whatever PUB/SUB dropped. If the node stops
    answering it keeps trying (forever, unless `max_outage` is set) and resumes
    after the last entry it delivered.
    """

    def __init__(
        self,
        client: Client,
        context: str,
        after: int | None = None,
        key: str | None = None,
        *,
        pub_address: str | None = None,
        max_outage: float | None = None,
        on_event: Callable[[str, str], None] | None = None,
        rcvhwm: int = 100_000,
        writer_key: bytes | str | None = None,
    ) -> None:
        try:  # a bad name is an error now, not after waiting for a greeting that cannot come
            check_name("context", context, MAX_CONTEXT_BYTES)
            if key is not None:
                check_name("key", key, MAX_KEY_BYTES, min_bytes=0)
        except RemoteProtocolError as exc:
            raise BadRequest(exc.message) from None
        self.client = client
        self.context = context
        self.key = key
        # with a writer key, every entry is proven under the head its writer signed (SPEC 13.6)
        # before it is handed out (`_checked`: up to which seq), an inclusion proof each
        self.writer_key = writer_key
        self._checked = 0
        self.max_outage = max_outage
        self.on_event = on_event or (lambda kind, text: None)
        self.heartbeat_s = 1.0
        self.boot: str | None = None
        self.limited = False  # the node refused our subscription (its watch limit): we poll
        self.refills = 0
        self.outages = 0
        self._heard = time.monotonic()  # the last time the node said anything
        self._ready: collections.deque[Entry] = collections.deque()
        self._early: list[watch.WatchMsg] = []
        self._sub: zmq.Socket[Any] | None = None
        self._topic = watch.topic(context)
        if pub_address is None:
            pub_address = client.pub_address()
        self.pub_address = normalize_address(pub_address)
        sub = client._zctx.socket(zmq.SUB)
        sub.setsockopt(zmq.LINGER, 0)
        sub.setsockopt(zmq.RCVHWM, rcvhwm)
        if "[" in self.pub_address:
            sub.setsockopt(zmq.IPV6, 1)
        client._curve(sub)
        sub.connect(self.pub_address)
        sub.setsockopt(zmq.SUBSCRIBE, self._topic)
        self._sub = sub
        try:
            self._confirm_subscription()
            try:
                size = client.head(context).size
            except NotFound:
                size = 0
            if after is None:
                after = size
            elif after > size:
                raise BadRequest(
                    f"context {context!r} has {size} entries; cannot watch after #{after}, beyond its end",
                    {"context": context, "size": size},
                )
            self.cursor = watch.WatchCursor(context, after, key)
            for m in self._early:
                self._on_message(m)
            self._early = []
        except BaseException:
            self.close()
            raise

    @property
    def last_seq(self) -> int:
        """Every entry up to this seq has been delivered (or skipped by the key filter)."""
        return self.cursor.last

    def close(self) -> None:
        if self._sub is not None:
            self._sub.close(linger=0)
            self._sub = None

    def __enter__(self) -> Watch:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __iter__(self) -> Watch:
        return self

    # -- the stream ----------------------------------------------------------------

    def _confirm_subscription(self) -> None:
        """Wait for the node's greeting: from then on, live delivery is complete."""
        sub = self._sub
        assert sub is not None
        deadline = time.monotonic() + self.client.timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                # No greeting (an older node, or the PUB port is unreachable): go on;
                # completeness then rests on seq gaps and heads, as always.
                self.on_event("warning", f"no greeting on {self.pub_address}; watching without it")
                return
            if not sub.poll(int(left * 1000) + 1, zmq.POLLIN):
                continue
            m = self._decode(sub.recv_multipart())
            if m is None:
                continue
            self._early.append(m)
            if isinstance(m, watch.HeadMsg):
                self._note_head(m, greeting=True)
                return

    def _decode(self, frames: list[bytes]) -> watch.WatchMsg | None:
        try:
            m = watch.decode_message(frames)
        except RemoteProtocolError as exc:
            self.on_event("warning", f"ignored a malformed watch message: {exc.message}")
            return None
        if isinstance(m, watch.EntriesMsg) and self.client.verify:
            for e in m.entries:
                e.verify()
        return m

    def _note_head(self, m: watch.HeadMsg, greeting: bool = False) -> bool:
        """Record a head's heartbeat and boot; True when the node restarted since the last one."""
        if m.heartbeat_ms:
            self.heartbeat_s = m.heartbeat_ms / 1000.0
        # Only the answer to our subscription says whether it was refused (SPEC 16.5); a
        # `limited` head later is another watcher's refusal that reached us too.
        if m.limited and greeting and not self.limited:
            self.limited = True
            self.on_event("limited", f"node at {self.pub_address} is at its watch limit (--max-watch-topics or "
                          f"--max-watchers-per-context; see its status) and will not publish "
                          f"{self.context!r} to this watch; polling it every {self.heartbeat_s:g} s instead")
            if self._sub is not None:
                # nothing live comes to a refused subscription: give the node its place back
                self._sub.setsockopt(zmq.UNSUBSCRIBE, self._topic)
        restarted = self.boot is not None and m.boot != self.boot
        self.boot = m.boot
        return restarted

    def _on_message(self, m: watch.WatchMsg) -> None:
        if isinstance(m, watch.EntriesMsg):
            self._ready.extend(self.cursor.on_entries(m.entries))
            return
        if self._note_head(m):
            self.on_event("restarted", f"node restarted (now {m.node_id}); resuming after #{self.cursor.last}")
            self._check_continuity()
            self.cursor.new_stream()
        self.cursor.on_head(m.size)

    def _refill(self) -> None:
        c = self.client
        cur = self.cursor
        while True:
            page = c.get(self.context, key=self.key, after=cur.refill_after(), limit=codec.MAX_GET_LIMIT)
            self._ready.extend(cur.on_page(page.entries, page.next_after, page.last_seq, page.more))
            self.refills += 1
            if not page.more or self._ready:
                return

    def _check_continuity(self) -> None:
        """After a restart or an outage: the node must still hold what was delivered."""
        cur = self.cursor
        if cur.last == 0:
            return
        try:
            head_size = self.client.head(self.context).size
        except NotFound:
            head_size = 0
        cur.check_size(head_size)  # raises if the node holds fewer entries than were delivered
        if cur.last_hash is not None:
            page = self.client.get(self.context, after=cur.last - 1, limit=1)
            if not page.entries or page.entries[0].hash != cur.last_hash:
                raise IntegrityError(
                    f"entry {self.context!r}#{cur.last} on the node is not the one this watch delivered; "
                    "the node's history changed (lost writes under async durability?)",
                    {"context": self.context, "seq": cur.last},
                )

    def _ping(self, timeout: float) -> bool:
        """One ping, waiting at most `timeout`; True when the node answered."""
        c = self.client
        rid = c.submit("ping")
        try:
            c.result(rid, timeout=max(0.05, timeout))
            return True
        except (Timeout, Unavailable):
            c._sent.pop(rid, None)
            c._reconnect()
            return False

    def _left(self) -> float:
        """Seconds left before `max_outage` runs out, counted from the last word of the node."""
        if self.max_outage is None:
            return self.client.timeout
        return self.max_outage - (time.monotonic() - self._heard)

    def _outage(self, why: str) -> None:
        """The node is not answering: wait until it does, then resume where we were."""
        self.outages += 1
        self.on_event("lost", f"node at {self.client.address} is not answering ({why}); retrying")
        while True:
            left = self._left()
            if self.max_outage is not None and left <= 0:
                raise Unavailable(
                    f"node at {self.client.address} did not come back within {self.max_outage:g} s",
                    {"address": self.client.address},
                )
            if self._ping(min(self.client.timeout, left)):
                break
        self._heard = time.monotonic()
        self._check_continuity()
        self.on_event("back", f"node at {self.client.address} is back; resuming after #{self.cursor.last}")

    def _read_queued(self, sub: zmq.Socket[Any], most: int = 1000) -> None:
        for _ in range(most):
            try:
                frames = sub.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            m = self._decode(frames)
            if m is not None:
                self._on_message(m)

    @property
    def socket(self) -> zmq.Socket[Any] | None:
        """The SUB socket, for a caller that multiplexes many watches in one poller."""
        return self._sub

    def drain(self) -> list[Entry]:
        """Without waiting for new messages: every entry deliverable now, in order.

        For callers that poll `socket` themselves (many watches in one thread).
        Gaps are refilled over the request socket, which may take a round trip.
        """
        sub = self._sub
        if sub is None:
            return []
        self._read_queued(sub, most=100_000)
        if self.cursor.needs_refill():
            while True:
                self._refill()
                if not self.cursor.needs_refill():
                    break
        out = list(self._ready)
        self._ready.clear()
        return out

    def __next__(self) -> Entry:
        ready = self._ready
        while not ready:
            sub = self._sub
            if sub is None:
                raise StopIteration
            try:
                if self.cursor.needs_refill():
                    self._refill()
                    continue
                silence = max(3 * self.heartbeat_s, 1.0) + 0.5
                if self.limited:
                    silence = self.heartbeat_s  # nothing live comes: poll (SPEC 16.5)
                if self.max_outage is not None:
                    silence = max(0.05, min(silence, self._left()))
                if sub.poll(int(silence * 1000), zmq.POLLIN):
                    self._heard = time.monotonic()
                    self._read_queued(sub)
                    continue
                # Silence for three heartbeats: a dead node, or a lost subscription.
                # (A limited watch polls: the refill's own timeout tells of a dead node.)
                if not self.limited and not self._ping(min(self.client.timeout, self._left())):
                    self._outage("no heartbeat")
                self._heard = time.monotonic()
                self._refill()
            except Timeout as exc:
                self._outage(exc.message)
        if self.writer_key is not None and ready[0].seq > self._checked:
            # what is ready, proven under the head its writer signed before any of it is handed out
            batch = list(ready)
            self.client.check_entries(self.context, batch, self.writer_key)
            self._checked = batch[-1].seq
        return ready.popleft()
