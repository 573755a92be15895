"""The reference Python client of protocol v1 (with protocol/aioclient.py, the modules of
`protocol` with sockets).

Synchronous, with timeouts, pipelining (`submit` many requests, then
`result` each) and retries that are safe: reads are retried freely; appends
are retried only when they carry a `dedup_id`, which makes a retry return the
original entry instead of appending twice. Every error reply raises the
exception class of its code (`protocol.errors`). What the node proves (entry
hashes, inclusion and consistency proofs, snapshot roots) is verified here
before it is returned, by the same code as the asyncio client's (`protocol.calls`).

A client may be given several node addresses: it uses the first that answers, moves to the next
when one does not (reads, appends with a `dedup_id`, and any request when nothing was listening,
so that it reached no node), and follows NOT_WRITER to a context's writer. A call takes at most
`timeout` seconds in all, its retries and redirects included; "nothing listening" (connection
refused, seen by ZeroMQ's socket monitor) fails in a fraction of a second.
"""

from __future__ import annotations

import collections
import heapq
import itertools
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import IO, Any, TypeVar

import zmq
from zmq.utils.monitor import parse_monitor_message

from protocol import calls, codec
from protocol.calls import (  # noqa: F401  (names this module has always offered)
    DEFAULT_ADDRESS,
    DEFAULT_TIMEOUT,
    DEFAULT_WINDOW,
    LOAD_CHUNK_BYTES,
    MAX_REDIRECTS,
    Call,
    ConsistencyProof,
    Flow,
    GetResult,
    Head,
    InclusionProof,
    Link,
    ReplyBook,
    Result,
    Step,
    Submit,
    normalize_address,
)
from protocol.entry import Entry
from protocol.errors import ClientClosed, LedgerError, NotWriter, Timeout, Unavailable, Unreachable
from protocol.keys import Identity, curve_public

T = TypeVar("T")

# What ZeroMQ's socket monitor reports, as `calls.Link` reads it.
MONITOR_EVENTS = {zmq.EVENT_CONNECTED: "up", zmq.EVENT_DISCONNECTED: "down", zmq.EVENT_CONNECT_RETRIED: "refused",
                  zmq.EVENT_HANDSHAKE_SUCCEEDED: "handshake", zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL: "failed",
                  zmq.EVENT_HANDSHAKE_FAILED_AUTH: "rejected", zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL: "rejected"}
MONITOR_MASK = (zmq.EVENT_CONNECTED | zmq.EVENT_DISCONNECTED | zmq.EVENT_CONNECT_RETRIED | zmq.EVENT_HANDSHAKE_SUCCEEDED
                | zmq.EVENT_HANDSHAKE_FAILED_NO_DETAIL | zmq.EVENT_HANDSHAKE_FAILED_AUTH
                | zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL)
# a protocol failure that is about the socket types (the peer's metadata), not the keys
MISMATCH_ERRORS = {zmq.PROTOCOL_ERROR_ZMTP_INVALID_METADATA}
SEND_HWM = 100_000  # requests a DEALER queues (pipelining) before a send would wait
# How often a wait with no reply looks at the monitor (a reply in time never does).
LINK_CHECK_S = 0.05
# How long a look with a SUB for a PUB at the address may take (calls.Link.probe_due): one
# handshake, a millisecond on a LAN
PROBE_S = 0.5


def set_curve(s: zmq.Socket[Any], key: Identity | None, server_key: bytes | None) -> None:
    """Make `s` a CURVE client of the node (a client with keys)."""
    if key is None or server_key is None:
        return
    public, secret = key.curve_keypair()
    s.setsockopt(zmq.CURVE_PUBLICKEY, public)
    s.setsockopt(zmq.CURVE_SECRETKEY, secret)
    s.setsockopt(zmq.CURVE_SERVERKEY, curve_public(server_key))


def open_dealer(zctx: zmq.Context[Any], address: str, key: Identity | None,
                server_key: bytes | None) -> tuple[zmq.Socket[Any], zmq.Socket[Any]]:
    """A DEALER connected to `address`, and the PAIR its monitor events come on (closed by
    `close_dealer`). Works for a plain and a `zmq.asyncio` context alike."""
    s = zctx.socket(zmq.DEALER)
    s.setsockopt(zmq.LINGER, 0)
    if "[" in address:
        s.setsockopt(zmq.IPV6, 1)
    s.setsockopt(zmq.SNDHWM, SEND_HWM)
    s.setsockopt(zmq.RCVHWM, 100_000)
    set_curve(s, key, server_key)
    monitor = s.get_monitor_socket(MONITOR_MASK)
    monitor.setsockopt(zmq.LINGER, 0)
    s.connect(address)
    return s, monitor


def close_dealer(s: zmq.Socket[Any], monitor: zmq.Socket[Any] | None) -> None:
    if monitor is not None:
        try:
            s.disable_monitor()
        except zmq.ZMQError:
            pass
        monitor.close(linger=0)
    s.close(linger=0)


def monitor_kind(frames: list[bytes]) -> str | None:
    """What one monitor message means for a `Link` ("up", "down", "refused", "handshake",
    "failed", "rejected", "mismatch"), or None."""
    try:
        event = parse_monitor_message(frames)
        if event["event"] == zmq.EVENT_HANDSHAKE_FAILED_PROTOCOL and event["value"] in MISMATCH_ERRORS:
            return "mismatch"
        return MONITOR_EVENTS.get(event["event"])
    except (ValueError, KeyError, IndexError, TypeError):
        return None


def open_probe(zctx: zmq.Context[Any], address: str, key: Identity | None,
               server_key: bytes | None) -> tuple[zmq.Socket[Any], zmq.Socket[Any]]:
    """A SUB connected to `address` (subscribed to nothing), and its monitor: its handshake
    succeeds only with a PUB (or XPUB), such as a node's watch socket (closed by `close_dealer`)."""
    s = zctx.socket(zmq.SUB)
    s.setsockopt(zmq.LINGER, 0)
    if "[" in address:
        s.setsockopt(zmq.IPV6, 1)
    set_curve(s, key, server_key)
    monitor = s.get_monitor_socket(zmq.EVENT_HANDSHAKE_SUCCEEDED)
    monitor.setsockopt(zmq.LINGER, 0)
    s.connect(address)
    return s, monitor


def probe_answered(monitor: zmq.Socket[Any]) -> bool:
    """Whether the probe's handshake succeeded (reads what its monitor queued, never waits)."""
    while True:
        try:
            frames = monitor.recv_multipart(zmq.NOBLOCK)
        except zmq.Again:
            return False
        try:
            if parse_monitor_message(frames)["event"] == zmq.EVENT_HANDSHAKE_SUCCEEDED:
                return True
        except (ValueError, KeyError, IndexError, TypeError):
            continue


def is_pub(zctx: zmq.Context[Any], address: str, key: Identity | None, server_key: bytes | None,
           wait: float) -> bool:
    """Whether a PUB socket answers at `address` within `wait` seconds (see `open_probe`)."""
    s, monitor = open_probe(zctx, address, key, server_key)
    try:
        deadline = time.monotonic() + wait
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            if monitor.poll(int(left * 1000) + 1, zmq.POLLIN) and probe_answered(monitor):
                return True
    finally:
        close_dealer(s, monitor)


def unreachable(addresses: list[str]) -> Unreachable:
    return Unreachable(f"nothing listening at {', '.join(addresses)} (connection refused)",
                       {"address": addresses[0], "addresses": addresses})


class Client(calls.ClientCore):
    """A connection to a node (one at a time, of the ones given). Not thread-safe (neither are
    ZeroMQ sockets)."""

    def __init__(
        self,
        address: str | Sequence[str] = DEFAULT_ADDRESS,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        retries: int = 1,
        verify: bool = True,
        zctx: zmq.Context[Any] | None = None,
        key: Identity | None = None,
        server_key: bytes | str | None = None,
    ) -> None:
        """`address`: "HOST:PORT", several of them (a list, or one string with commas), tried in
        that order. `timeout`: seconds a call may take in all, its `retries` included.
        `key` and `server_key`: for a node with keys (SPEC 13), this client's identity (its
        public key in the node's client allowlist) and the node's public key (hex or 32 bytes,
        from its `status` or the operator), which the node must prove: CURVE on every socket."""
        super().__init__(address, timeout, retries, verify, key, server_key)
        self._zctx = zctx or zmq.Context.instance()
        self._sock: zmq.Socket[Any] | None = None
        self._monitor: zmq.Socket[Any] | None = None
        self._link = Link()
        self._book = ReplyBook()
        self._stash: dict[Any, dict[str, Any]] = {}
        self._redirect: Client | None = None
        self._connect()

    # -- plumbing ----------------------------------------------------------------

    def _connect(self) -> None:
        self._sock, self._monitor = open_dealer(self._zctx, self.address, self.key, self.server_key)
        self._link = Link()

    def _curve(self, s: zmq.Socket[Any]) -> None:
        set_curve(s, self.key, self.server_key)

    def _reconnect(self, next_address: bool = False) -> None:
        # Lazy Pirate: a fresh socket drops whatever the old one still queued.
        self._socket()
        if self._sock is not None:
            close_dealer(self._sock, self._monitor)
            self._sock = self._monitor = None
        self._book.clear()
        self._stash.clear()
        if next_address:
            self._rotate()
        self._connect()

    def _socket(self) -> zmq.Socket[Any]:
        if self._closed or self._sock is None:
            raise ClientClosed("this client is closed (make a new one)")
        return self._sock

    def close(self) -> None:
        self._closed = True
        if self._sock is not None:
            close_dealer(self._sock, self._monitor)
            self._sock = self._monitor = None
        for c in self._writers.values():
            c.close()
        self._writers.clear()

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def submit(self, op: str, **fields: Any) -> int:
        """Send a request without waiting; returns its id for `result`."""
        sock = self._socket()
        rid = self._new_id()
        frame = calls.encode(op, rid, fields)
        self._book.sent(rid)
        try:
            sock.send(frame, zmq.NOBLOCK)
        except zmq.Again:
            if len(self._book) <= SEND_HWM:
                # not a full queue: no connection takes it now (the one there was dropped during
                # its handshake: keys that do not match, a watch port); a blocking send would
                # wait forever, as ZeroMQ does not reconnect then. It waits, as if lost, for its
                # timeout or for what the link finds out (`_wait`).
                return rid
            if not sock.poll(int(self.timeout * 1000), zmq.POLLOUT):
                self._book.forget(rid)
                raise Unavailable(f"more than {SEND_HWM:,} requests queued for {self.address}") from None
            sock.send(frame, zmq.NOBLOCK)
        return rid

    def _forget(self, rid: int) -> None:
        self._book.forget(rid)
        self._stash.pop(rid, None)

    def result(self, rid: int, timeout: float | None = None) -> dict[str, Any]:
        """Wait for the reply to `rid`; raise its error, or Timeout (Unreachable when nothing listens)."""
        return calls.check(self._wait(rid, self.timeout if timeout is None else timeout))

    def _take(self, sock: zmq.Socket[Any], flags: int = 0) -> None:
        """Read one message (raises zmq.Again with NOBLOCK when there is none) and file its reply."""
        frames = sock.recv_multipart(flags)
        got = self._book.match(frames[-1])
        if got is not None:
            self._stash[got[0]] = got[1]

    def _refused(self) -> bool:
        """Whether the monitor has seen a connection refused since `_fresh_link` (nothing listens)."""
        monitor = self._monitor
        while monitor is not None:
            try:
                kind = monitor_kind(monitor.recv_multipart(zmq.NOBLOCK))
            except zmq.Again:
                break
            if kind is not None:
                self._link.on_event(kind)
        return self._link.unreachable

    def _fresh_link(self) -> None:
        """Apply what the monitor queued, then count refusals from now on (an old refusal, from
        before a node came back, says nothing about it now)."""
        self._refused()
        self._link.refused = 0

    def _wait(self, rid: int, timeout: float) -> dict[str, Any]:
        if rid in self._stash:
            return self._stash.pop(rid)
        sock = self._socket()
        start = time.monotonic()
        deadline = start + timeout
        fresh = False
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                self._book.forget(rid)
                waited = time.monotonic() - start
                raise Timeout(calls.timeout_text(self.address, "", waited, 1, True),
                              {"address": self.address, "waited": round(waited, 3)})
            if sock.poll(int(min(left, LINK_CHECK_S) * 1000) + 1, zmq.POLLIN):
                self._take(sock)
                if rid in self._stash:
                    return self._stash.pop(rid)
                continue
            if not fresh:
                self._fresh_link()
                fresh = True
            elif self._refused():
                self._book.forget(rid)
                raise unreachable([self.address])
            link = self._link
            if link.probe_due:  # something answers there, but not as a node's request port may
                link.on_probe(is_pub(self._zctx, self.address, self.key, self.server_key,
                                     max(0.0, min(PROBE_S, deadline - time.monotonic()))))
            if link.verdict is not None:
                self._book.forget(rid)
                raise calls.not_a_request_port(self.address, link.verdict)

    def _ready(self, rid: int) -> bool:
        """Whether the reply to `rid` has arrived (reads what is queued, never waits)."""
        sock = self._sock
        while rid not in self._stash and sock is not None and sock.poll(0, zmq.POLLIN):
            self._take(sock)
        return rid in self._stash

    def call(self, op: str, *, retry: bool = True, **fields: Any) -> dict[str, Any]:
        """One request and its reply, in at most `timeout` seconds: retried (on a fresh
        connection, at the next address when there are several) when `retry` is safe."""
        return self._call(op, fields, retry, time.monotonic() + self.timeout)

    def _call(self, op: str, fields: dict[str, Any], retry: bool, deadline: float) -> dict[str, Any]:
        start = time.monotonic()
        attempts_left = 1 + (self.retries if retry else 0)
        attempts = 0
        refused: list[Unreachable] = []
        while True:
            rid = self.submit(op, **fields)
            attempts += 1
            try:
                return self.result(rid, timeout=max(0.0, (deadline - time.monotonic()) / attempts_left))
            except Unreachable as exc:
                self._forget(rid)
                refused.append(exc)
                # a request sent where no connection was ever made, or where the handshake failed,
                # reached no node: any may have it
                movable = retry or not self._link.ever_up or self._link.verdict is not None
                self._reconnect(next_address=True)
                if not movable or len(refused) >= len(self.addresses) or time.monotonic() >= deadline:
                    raise calls.unreachable_of(refused) from None
            except Timeout:
                self._forget(rid)
                address = self.address
                self._reconnect(next_address=retry)
                attempts_left -= 1
                if attempts_left <= 0 or time.monotonic() >= deadline:
                    waited = time.monotonic() - start
                    raise Timeout(calls.timeout_text(address, op, waited, attempts, retry),
                                  {"address": address, "waited": round(waited, 3)}) from None

    def _run(self, flow: Flow[T], do: Callable[[Step], Any] | None = None) -> T:
        """Drive a flow of `protocol.calls` to its result (`do`: what answers its steps)."""
        do = do or self._do
        try:
            step = next(flow)
            while True:
                error: LedgerError | None = None
                try:
                    answer = do(step)
                except LedgerError as exc:
                    error = exc
                step = flow.throw(error) if error is not None else flow.send(answer)
        except StopIteration as stop:
            return stop.value  # type: ignore[no-any-return]

    def _do(self, step: Step) -> Any:
        if isinstance(step, Call):
            return self.call(step.op, retry=step.retry, **step.fields)
        if isinstance(step, Submit):
            return self.submit(step.op, **step.fields)
        if isinstance(step, Result):
            return self.result(step.handle)
        raise TypeError(f"a client does not answer {step!r}")

    def _entry(self, m: Any) -> Entry:
        return calls.entry_of(m, self.verify)

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
        r = self._follow(
            "append_batch", retry=dedup_id is not None, context=context, entries=calls.append_items(items),
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
                self._forget(rid)
            rest = itertools.chain([(p, dd) for _, p, dd in inflight], items)
            yield from writer._append_many(context, rest, key, md, window, hops + 1)

    def _follow(self, op: str, retry: bool, **fields: Any) -> dict[str, Any]:
        """`call`, following NOT_WRITER to the context's writer (appends), all in one `timeout`."""
        deadline = time.monotonic() + self.timeout
        client: Client = self
        writer = None
        for _ in range(MAX_REDIRECTS + 1):
            try:
                return client._call(op, fields, retry, deadline)
            except NotWriter as exc:
                address = exc.details.get("address")
                if not address:
                    raise
                writer = exc.details.get("writer")
                client = self._writer_client(str(address), exc.details.get("key"))
            except Timeout as exc:
                if client is self:
                    raise
                raise type(exc)(
                    f"{self.address} sent this {op} to the writer of {fields.get('context')!r}, {writer!r}, at "
                    f"{client.address}: {exc.message} (it may be down)", exc.details,
                ) from None
        raise Unavailable(f"too many NOT_WRITER redirects for {fields.get('context')!r}")

    def get(self, context: str, *, key: str | None = None, after: int = 0, limit: int | None = None,
            fork: str | None = None, fork_index: int | None = None) -> GetResult:
        """Entries with seq > `after`; with `fork`, of the history by that writer a fork set aside
        (with `fork_index`, the n-th of them from 1; by default the latest)."""
        r = self.call("get", context=context, key=key, after=after, limit=limit, fork=fork, fork_index=fork_index)
        return calls.get_result_of(r, self.verify)

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
        return self._run(calls.first_after_lamport_flow(context, after_lamport))

    def merged(self, contexts: Iterable[str], *, after_lamport: int = 0) -> Iterator[Entry]:
        """Entries of several contexts in one causal order: (lamport, writer, context, seq).

        If entry A was seen before B was appended (and B's append carried A's
        lamport, or happened where A had arrived), A comes first. Only entries
        with lamport > `after_lamport`; each context is read page by page."""
        streams = []
        for name in dict.fromkeys(contexts):
            start = self._first_after_lamport(name, after_lamport) if after_lamport else 0
            streams.append(self.iter_entries(name, after=start))
        return heapq.merge(*streams, key=calls.merge_key)

    def head(self, context: str, *, writer_key: bytes | str | None = None) -> Head:
        """The context's head. With `writer_key` (the writer's public key, pinned by the caller), it is
        checked against a head signed with that key (SPEC 13.6): IntegrityError unless the node holds
        one for this context whose root is the node's root at that size; `verified` says up to which
        size (entries past it, if the node holds more, are not yet covered by a signature it has)."""
        return self._run(calls.head_flow(context, writer_key, self.address, self.verify))

    def pub_address(self) -> str:
        """The node's watch (PUB) address, reached through the host this client uses."""
        return calls.pub_address_of(self.status(), self.address)

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
        answering before raising Unavailable; default forever), `timeout`
        (seconds to wait for the next entry before raising Timeout; default
        forever), `on_event` (called with (kind, text) on outages, restarts and
        warnings).
        """
        return Watch(self, context, after, key, **options)

    def contexts(self) -> list[dict[str, Any]]:
        return self._run(calls.contexts_flow())

    def status(self) -> dict[str, Any]:
        return calls.status_of(self.call("status"))

    def proof(self, context: str, seq: int, size: int | None = None, *, check_entry: bool = True,
              writer_key: bytes | str | None = None) -> InclusionProof:
        """An inclusion proof of entry `seq`, verified.

        With `check_entry` (the default) the entry itself is fetched too and must
        re-hash to the proven leaf with this very seq: a proof over hashes alone
        shows that *some* leaf is in the tree, the entry check shows which one.
        With `writer_key`, the proof is against the head the writer signed (SPEC 13.6).
        """
        return self._run(calls.proof_flow(context, seq, size, check_entry, writer_key, self.address, self.verify))

    def consistency(
        self, context: str, first: int, second: int | None = None, *, first_root: bytes | None = None
    ) -> ConsistencyProof:
        return self._run(calls.consistency_flow(context, first, second, first_root))

    def snapshot(self, context: str, out: IO[bytes], *, size: int | None = None,
                 on_progress: calls.ProgressFn | None = None) -> dict[str, Any]:
        """Write a verified snapshot of `context` (at `size`, default now) to `out`.
        `on_progress(written, size)` is called after each page (entries written, in all)."""
        return self._run(calls.snapshot_flow(context, out, size, self.verify, on_progress))

    def load(self, context: str, src: IO[bytes], *, fail_if_exists: bool = False,
             chunk_bytes: int = LOAD_CHUNK_BYTES, on_progress: calls.ProgressFn | None = None) -> Head:
        """Load a snapshot file; the node re-verifies everything before it writes.
        `on_progress(sent, size)` is called after each chunk the node took."""
        return self._run(calls.load_flow(context, src, fail_if_exists, chunk_bytes, on_progress))

    def check_entries(self, context: str, entries: list[Entry], writer_key: bytes | str) -> int:
        """Check `entries` (read from this node) against the head their writer signed with
        `writer_key`: each is proven to be the leaf at its seq under the signed root (SPEC 13.6), the
        proofs asked for all at once. IntegrityError when one is not, or lies past the signed size.
        Returns the signed size."""
        return self._run(calls.check_entries_flow(context, entries, writer_key, self.address, self.verify))

    def verify_context(self, context: str, *, writer_key: bytes | str | None = None,
                       on_progress: calls.ProgressFn | None = None) -> dict[str, Any]:
        """Download a context at its current size, re-hash everything, recompute the root. With
        `writer_key`, also check the entries against the head their writer signed (SPEC 13.6): the
        root recomputed at the signed size must be the signed root (`signed_size` in the result).
        `on_progress(checked, size)` is called after each page (for a progress line)."""
        return self._run(calls.verify_context_flow(context, writer_key, self.address, self.verify, on_progress))


class WatchClosed(Exception):
    """The watch's socket was closed while a flow waited on it (ends the iteration)."""


class Watch:
    """A live, exactly-once, in-order stream of one context's entries (see `Client.watch`).

    Iterate it for entries; `close()` (or leaving a `with` block) releases its
    socket. It subscribes first, waits until the node confirms the
    subscription, catches up over the request socket, then delivers live
    entries, refilling by seq whatever PUB/SUB dropped. If the node stops
    answering it keeps trying (forever, unless `max_outage` is set) and resumes
    after the last entry it delivered. With `timeout`, waiting longer than that
    for the next entry raises Timeout (the watch stays usable). What it decides
    is `calls.WatchState`'s, shared with `AsyncWatch`; this class only waits.
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
        timeout: float | None = None,
        on_event: Callable[[str, str], None] | None = None,
        rcvhwm: int = 100_000,
        writer_key: bytes | str | None = None,
    ) -> None:
        self.client = client
        self.state = calls.WatchState(context, key, writer_key, max_outage, timeout, on_event,
                                      pub_address or "tcp://0.0.0.0:0")
        self._sub: zmq.Socket[Any] | None = None
        s = self.state
        if pub_address is None:
            s.pub_address = client.pub_address()
        self.pub_address = s.pub_address
        self._sub = open_sub(client._zctx, s.pub_address, s.topic, rcvhwm, client.key, client.server_key)
        try:
            self._run(s.start_flow(after, client.verify, client.timeout))
        except BaseException:
            self.close()
            raise

    # the watch's state, under the names it has always had
    context = property(lambda self: self.state.context)
    key = property(lambda self: self.state.key)
    cursor = property(lambda self: self.state.cursor)
    limited = property(lambda self: self.state.limited)
    boot = property(lambda self: self.state.boot)
    heartbeat_s = property(lambda self: self.state.heartbeat_s)
    refills = property(lambda self: self.state.refills)
    outages = property(lambda self: self.state.outages)
    max_outage = property(lambda self: self.state.max_outage)

    @property
    def last_seq(self) -> int:
        """Every entry up to this seq has been delivered (or skipped by the key filter)."""
        return self.state.cursor.last

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

    # -- the driver of the watch's flows ----------------------------------------------------

    def _run(self, flow: Flow[T]) -> T:
        return self.client._run(flow, self._do)

    def _do(self, step: Step) -> Any:
        if isinstance(step, calls.Clock):
            return time.monotonic()
        if isinstance(step, calls.Receive):
            sub = self._sub
            if sub is None:
                raise WatchClosed()
            if not sub.poll(max(0, int(step.seconds * 1000)), zmq.POLLIN):
                return []
            return self._queued(sub)
        if isinstance(step, calls.Ping):
            return self._ping(step.seconds)
        if isinstance(step, calls.Sleep):
            time.sleep(step.seconds)
            return None
        if isinstance(step, calls.Unsubscribe):
            if self._sub is not None:
                self._sub.setsockopt(zmq.UNSUBSCRIBE, self.state.topic)
            return None
        return self.client._do(step)

    @staticmethod
    def _queued(sub: zmq.Socket[Any], most: int = 1000) -> list[list[bytes]]:
        out = []
        for _ in range(most):
            try:
                out.append(sub.recv_multipart(zmq.NOBLOCK))
            except zmq.Again:
                break
        return out

    def _ping(self, timeout: float) -> bool:
        """One ping, waiting at most `timeout`; True when the node answered."""
        c = self.client
        rid = c.submit("ping")
        try:
            c.result(rid, timeout=max(0.05, timeout))
            return True
        except (Timeout, Unavailable):
            c._forget(rid)
            c._reconnect()
            return False

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
        s = self.state
        self._run(s.take_flow(self._queued(sub, most=100_000), self.client.verify))
        while s.cursor.needs_refill():
            self._run(s.refill_flow(self.client.verify))
        out = list(s.ready)
        s.ready.clear()
        return out

    def __next__(self) -> Entry:
        if self._sub is None and not self.state.ready:
            raise StopIteration
        try:
            return self._run(self.state.next_flow(self.client.verify, self.client.timeout, self.client.address))
        except WatchClosed:
            raise StopIteration from None


def open_sub(zctx: zmq.Context[Any], address: str, topic: bytes, rcvhwm: int, key: Identity | None,
             server_key: bytes | None) -> zmq.Socket[Any]:
    """A SUB socket connected to a node's watch address, subscribed to `topic` (a plain or a
    `zmq.asyncio` context alike)."""
    sub = zctx.socket(zmq.SUB)
    sub.setsockopt(zmq.LINGER, 0)
    sub.setsockopt(zmq.RCVHWM, rcvhwm)
    if "[" in address:
        sub.setsockopt(zmq.IPV6, 1)
    set_curve(sub, key, server_key)
    sub.connect(address)
    sub.setsockopt(zmq.SUBSCRIBE, topic)
    return sub
