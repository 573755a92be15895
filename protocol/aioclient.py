"""The asyncio reference client: `AsyncClient`, the same operations, errors and guarantees as the
synchronous `Client` (protocol/client.py), on `zmq.asyncio` sockets, never blocking the event loop.

    async with AsyncClient(["127.0.0.1:7400", "127.0.0.1:7410"]) as c:
        e = await c.append("notes", b"hello", dedup_id="note-1")
        entries = await asyncio.gather(*(c.append("notes", p) for p in payloads))  # pipelined
        async with c.watch("notes", after=0, timeout=30) as w:
            async for e in w:
                ...

Theory of operation. One DEALER per node address in use; any number of coroutines may await
requests on it at once (pipelining). The loop's reader callback takes every reply as it comes and resolves the
future of the request it answers (`calls.ReplyBook`: by id, a nil id to the oldest request still
waiting); another reads the socket monitor and fails the waiting requests at once when
nothing listens at the address (`calls.Link`). A call is bounded by `timeout` in all, retries and
redirects included; it retries (reads, appends with a `dedup_id`) on a fresh connection, at the
next address when there are several, and follows NOT_WRITER to the context's writer. Everything a
node proves is verified by the same code as the synchronous client's (`protocol.calls`: results
and flows); only the waiting differs.
"""

from __future__ import annotations

import asyncio
import collections
import heapq
import itertools
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, Mapping, Sequence
from typing import IO, Any, TypeVar

import zmq
import zmq.asyncio

from protocol import calls, codec
from protocol.calls import (
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
)
from protocol.client import (
    PROBE_S,
    SEND_HWM,
    WatchClosed,
    close_dealer,
    monitor_kind,
    open_dealer,
    open_probe,
    open_sub,
    probe_answered,
    unreachable,
)
from protocol.entry import Entry
from protocol.errors import BadRequest, ClientClosed, LedgerError, NotWriter, Timeout, Unavailable, Unreachable
from protocol.keys import Identity

T = TypeVar("T")
# replies taken in one turn of the event loop at most (the rest on the next: other coroutines run
# in between, and each woken caller re-hashes its entry on its own turn)
DRAIN_MOST = 1000
SWEEP_S = 0.05  # how often the requests waiting on a connection are checked against their deadlines
QUEUE_MOST = SEND_HWM  # requests waiting on one connection (the DEALER's send high-water mark)
PROBE_STEP_S = 0.005  # how often a probe for a PUB (calls.Link.probe_due) looks at its monitor
# pyzmq's flags as plain ints: its enum members cost about 1 µs per `&` and per call on this hot path
_EVENTS, _POLLIN, _NOBLOCK, _RCVMORE = int(zmq.EVENTS), int(zmq.POLLIN), int(zmq.NOBLOCK), int(zmq.RCVMORE)


class _Connection:
    """One DEALER to one node, and the requests waiting on it.

    The DEALER is a plain socket read from the event loop's own reader callback (`add_reader` on
    its edge-triggered FD): every queued reply is taken in one go and resolves the future of the
    request it answers, with no future per message (a first version awaiting zmq.asyncio's
    futures, with a timeout context per request, took 0.51 s for 5,000 concurrent appends; this
    one 0.15 s). Deadlines are swept every SWEEP_S, not timed one by one. Sends never wait (a large high-water mark), and
    after each one the loop looks for replies once more (a send can take the FD's edge). The
    monitor is read the same way."""

    def __init__(self, client: AsyncClient, address: str) -> None:
        self.address = address
        self.loop = asyncio.get_running_loop()
        self.client = client
        self.sock, self.monitor = open_dealer(client._plain_ctx, address, client.key, client.server_key)
        self.link = Link()
        self._probe: asyncio.Task[None] | None = None
        # rid -> (future, deadline, sent at) in loop time, oldest first
        self.book = ReplyBook()
        self._sweeper: asyncio.TimerHandle | None = None
        self.closed = False
        self._scheduled = False
        self.loop.add_reader(self.sock.FD, self._drain)
        self.loop.add_reader(self.monitor.FD, self._on_monitor)
        # (edge-triggered: what came before the readers were added would never wake them)
        self.loop.call_soon(self._on_monitor)

    def send(self, rid: int, frame: bytes, timeout: float) -> asyncio.Future[dict[str, Any]]:
        """Send a request; its future fails with Timeout when no reply came within `timeout`."""
        loop = self.loop
        fut: asyncio.Future[dict[str, Any]] = loop.create_future()
        if self.link.verdict is not None:  # not a node's request port: no answer will ever come
            fut.set_exception(calls.not_a_request_port(self.address, self.link.verdict))
            return fut
        now = loop.time()
        book = self.book
        book.sent(rid, (fut, now + timeout, now))
        sock = self.sock
        try:
            sock.send(frame, _NOBLOCK)
        except zmq.Again:
            if len(book) > QUEUE_MOST:
                book.forget(rid)
                raise Unavailable(f"more than {QUEUE_MOST:,} requests queued for {self.address}") from None
            # not a full queue: no connection takes it now (the one there was dropped during its
            # handshake, as at a watch port): it waits, as if lost, for its deadline or for what
            # the link finds out (`_look_for_pub`)
        # A send may take the FD's edge (the signal that replies are queued): look again. Alone,
        # at once (one request awaited after another: no extra turn of the loop); pipelined,
        # once per turn of the loop for all the sends of that turn. (This look also finds the
        # stale replies `_drain` leaves when nothing waits.)
        if not self._scheduled and (len(book) > 1 or sock.get(_EVENTS) & _POLLIN):  # type: ignore[operator]
            self._scheduled = True
            loop.call_soon(self._drain)
        if self._sweeper is None:
            self._sweeper = loop.call_at(now + min(timeout, SWEEP_S), self._sweep)
        return fut

    def forget(self, rid: int) -> None:
        self.book.forget(rid)

    def shorten(self, rid: int, timeout: float) -> None:
        kept = self.book.forget(rid)
        if kept is not None:
            fut, deadline, sent = kept
            self.book.sent(rid, (fut, min(deadline, self.loop.time() + timeout), sent))

    def _sweep(self) -> None:
        """Fail the requests whose deadline passed (one timer for all, not one per request: a
        timeout is then up to SWEEP_S late, and says how long it really waited)."""
        self._sweeper = None
        if self.closed or not self.book:
            return
        now = self.loop.time()
        first = now + SWEEP_S
        for rid, (fut, deadline, sent) in self.book.items():
            if deadline > now:
                first = min(first, deadline)
                continue
            self.book.forget(rid)
            if not fut.done():
                waited = now - sent
                fut.set_exception(Timeout(calls.timeout_text(self.address, "", waited, 1, True),
                                          {"address": self.address, "waited": round(waited, 3)}))
        if self.book:
            self._sweeper = self.loop.call_at(first, self._sweep)

    def _drain(self) -> None:
        self._scheduled = False
        if self.closed:
            return
        sock, book = self.sock, self.book
        get: Callable[[int], int] = sock.get  # type: ignore[assignment]  # (EVENTS, RCVMORE: ints)
        recv, match = sock.recv, book.match
        if not get(_EVENTS) & _POLLIN:
            return  # a wake-up for the socket's own commands (after a send): nothing to read
        for _ in range(DRAIN_MOST):
            try:
                frame = recv(_NOBLOCK)
                while get(_RCVMORE):  # (a reply is its last frame)
                    frame = recv(_NOBLOCK)
            except zmq.Again:
                return
            got = match(frame)
            if got is not None:
                fut = got[2][0]
                if not fut.done():
                    fut.set_result(got[1])
                if not book:
                    # Nothing waits: stop here rather than pay for a failed read (zmq.Again costs
                    # more than a reply). What may still be queued is stale (a late reply to a
                    # forgotten request); the next `send` looks for it.
                    return
        self._scheduled = True  # more queued: the rest on the next turn of the loop
        self.loop.call_soon(self._drain)

    def _on_monitor(self) -> None:
        """What the socket monitor says (its FD is edge-triggered too: read all there is)."""
        if self.closed:
            return
        while True:
            try:
                frames = self.monitor.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            kind = monitor_kind(frames)
            if kind is None:
                continue
            self.link.on_event(kind)
            if kind == "refused" and self.link.unreachable:
                self.fail(lambda: unreachable([self.address]))
            if self.link.probe_due and self._probe is None:
                self._probe = self.loop.create_task(self._look_for_pub())

    async def _look_for_pub(self) -> None:
        """Whether a PUB answers at the address (`calls.Link.probe_due`), without blocking the loop;
        when the link's verdict is then known, fail what waits here with it at once."""
        client = self.client
        sock, monitor = open_probe(client._plain_ctx, self.address, client.key, client.server_key)
        found = False
        try:
            end = self.loop.time() + PROBE_S
            while not self.closed and self.loop.time() < end:
                if probe_answered(monitor):
                    found = True
                    break
                await asyncio.sleep(PROBE_STEP_S)
        finally:
            close_dealer(sock, monitor)
        if self.closed:
            return
        self.link.on_probe(found)
        verdict = self.link.verdict
        if verdict is not None:
            self.fail(lambda: calls.not_a_request_port(self.address, verdict))

    def fail(self, error: Callable[[], LedgerError]) -> None:
        """Fail every request waiting here (nothing listens, or the connection is replaced)."""
        for _rid, (fut, _deadline, _sent) in self.book.clear():
            if not fut.done():
                try:
                    fut.set_exception(error())
                except RuntimeError:  # its event loop is closed: nobody waits for it any more
                    continue
                fut.exception()  # (nobody may ask: a submitted request never `result`ed is no error to log)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        if self._sweeper is not None:
            self._sweeper.cancel()
        if self._probe is not None and not self._probe.done():
            self._probe.cancel()
        for s in (self.sock, self.monitor):
            try:
                self.loop.remove_reader(s.FD)
            except (RuntimeError, zmq.ZMQError):  # (a loop already closed)
                pass
        self.fail(lambda: Timeout(f"the connection to {self.address} was closed before the answer came; "
                                  "the request may or may not have been applied", {"address": self.address}))
        close_dealer(self.sock, self.monitor)


class AsyncClient(calls.ClientCore):
    """An asyncio connection to a node (one at a time, of the ones given): `async with`, then await
    its operations, from as many coroutines at once as you like. Not thread-safe."""

    def __init__(
        self,
        address: str | Sequence[str] = DEFAULT_ADDRESS,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        retries: int = 1,
        verify: bool = True,
        zctx: zmq.asyncio.Context | None = None,
        key: Identity | None = None,
        server_key: bytes | str | None = None,
    ) -> None:
        """As `Client`; `zctx` is a `zmq.asyncio.Context` (a plain one is wrapped by a shadow)."""
        super().__init__(address, timeout, retries, verify, key, server_key)
        if zctx is not None and not isinstance(zctx, zmq.asyncio.Context):
            zctx = zmq.asyncio.Context.shadow(zctx.underlying)
        self._zctx: zmq.asyncio.Context = zctx or zmq.asyncio.Context.instance()
        self._plain_ctx: zmq.Context[Any] = zmq.Context.shadow(self._zctx.underlying)
        # submitted and not yet asked for (`result`): on which connection, and the reply's future
        self._submitted: dict[int, tuple[_Connection, asyncio.Future[dict[str, Any]]]] = {}
        self._conn: _Connection | None = None  # made when first used, inside the event loop

    # -- plumbing ----------------------------------------------------------------

    def _connection(self) -> _Connection:
        if self._closed:
            raise ClientClosed("this client is closed (make a new one)")
        conn = self._conn
        if conn is None or conn.loop is not asyncio.get_running_loop():
            if conn is not None:  # used from another event loop now (a second asyncio.run)
                conn.close()
            conn = self._conn = _Connection(self, self.address)
        return conn

    def _reconnect(self, conn: _Connection, next_address: bool) -> None:
        """A fresh connection in place of `conn` (once, however many requests saw it fail); the
        requests still waiting on it fail with Timeout (their calls retry when that is safe)."""
        if conn is not self._conn or self._closed:
            return
        if next_address:
            self._rotate()
        conn.close()
        self._conn = _Connection(self, self.address)

    async def close(self) -> None:
        self.close_now()
        await asyncio.sleep(0)  # let callbacks already scheduled see it closed

    def close_now(self) -> None:
        """Close without awaiting (from synchronous code, or `__del__`-like cleanup)."""
        self._closed = True
        if self._conn is not None:
            self._conn.close()
            self._conn = None
        for c in self._writers.values():
            c.close_now()
        self._writers.clear()

    async def __aenter__(self) -> AsyncClient:
        self._connection()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def submit(self, op: str, **fields: Any) -> int:
        """Send a request without waiting; returns its id for `result`."""
        conn = self._connection()
        rid = self._new_id()
        self._submitted[rid] = (conn, conn.send(rid, calls.encode(op, rid, fields), self.timeout))
        return rid

    async def result(self, rid: int, timeout: float | None = None) -> dict[str, Any]:
        """The reply to `rid` (its error raised). Its timeout was set when it was sent (`submit`:
        the client's); `timeout` here can only shorten the wait."""
        got = self._submitted.pop(rid, None)
        if got is None:
            raise BadRequest(f"no request {rid} is waiting for its answer")
        conn, fut = got
        if timeout is not None:
            conn.shorten(rid, timeout)
        try:
            return calls.check(await fut)
        except asyncio.CancelledError:
            conn.forget(rid)
            raise

    async def call(self, op: str, *, retry: bool = True, **fields: Any) -> dict[str, Any]:
        """One request and its reply, in at most `timeout` seconds (see `Client.call`)."""
        return await self._call(op, fields, retry, None)

    async def _call(self, op: str, fields: dict[str, Any], retry: bool, deadline: float | None,
                    follow: bool = False) -> dict[str, Any]:
        """`call` until `deadline` (loop time; None: `timeout` from now); with `follow`,
        NOT_WRITER is followed to the context's writer, within the same deadline."""
        conn = self._connection()
        loop = conn.loop
        began = now = loop.time()
        if deadline is None:
            deadline = began + self.timeout
        attempts_left = 1 + (self.retries if retry else 0)
        attempts = 0
        refused: list[Unreachable] = []
        while True:
            if attempts:
                conn = self._connection()
                now = loop.time()
            rid = self._new_id()
            fut = conn.send(rid, calls.encode(op, rid, fields), max(0.0, (deadline - now) / attempts_left))
            attempts += 1
            try:
                return calls.check(await fut)
            except asyncio.CancelledError:
                conn.forget(rid)
                raise
            except NotWriter as exc:
                if not follow or not exc.details.get("address"):
                    raise
                return await self._follow(exc, op, fields, retry, deadline)
            except Unreachable as exc:
                refused.append(exc)
                # it reached no node (no connection, or not a request port there): any may have it
                movable = retry or not conn.link.ever_up or conn.link.verdict is not None
                self._reconnect(conn, next_address=True)
                tried = {str(e.details.get("address")) for e in refused}
                if not movable or len(tried) >= len(self.addresses) or loop.time() >= deadline:
                    raise calls.unreachable_of(refused) from None
            except Timeout:
                self._reconnect(conn, next_address=retry)
                attempts_left -= 1
                now = loop.time()
                if attempts_left <= 0 or now >= deadline:
                    raise Timeout(calls.timeout_text(conn.address, op, now - began, attempts, retry),
                                  {"address": conn.address, "waited": round(now - began, 3)}) from None

    async def _follow(self, exc: NotWriter, op: str, fields: dict[str, Any], retry: bool,
                      deadline: float) -> dict[str, Any]:
        """After NOT_WRITER: the same request at the writer it named (and the next, up to
        MAX_REDIRECTS), within the same deadline."""
        for _ in range(MAX_REDIRECTS):
            client = self._writer_client(str(exc.details["address"]), exc.details.get("key"))
            try:
                return await client._call(op, fields, retry, deadline)
            except NotWriter as again:
                if not again.details.get("address"):
                    raise
                exc = again
            except Timeout as err:
                raise type(err)(f"{self.address} sent this {op} to the writer of {fields.get('context')!r} at "
                                f"{client.address}: {err.message} (it may be down)", err.details) from None
        raise Unavailable(f"too many NOT_WRITER redirects for {fields.get('context')!r}")

    async def _run(self, flow: Flow[T], do: Callable[[Step], Awaitable[Any]] | None = None) -> T:
        """Drive a flow of `protocol.calls` to its result (as `Client._run`, awaiting)."""
        do = do or self._do
        try:
            step = next(flow)
            while True:
                error: LedgerError | None = None
                try:
                    answer = await do(step)
                except LedgerError as exc:
                    error = exc
                step = flow.throw(error) if error is not None else flow.send(answer)
        except StopIteration as stop:
            return stop.value  # type: ignore[no-any-return]

    async def _do(self, step: Step) -> Any:
        if isinstance(step, Call):
            return await self.call(step.op, retry=step.retry, **step.fields)
        if isinstance(step, Submit):
            return self.submit(step.op, **step.fields)
        if isinstance(step, Result):
            return await self.result(step.handle)
        raise TypeError(f"a client does not answer {step!r}")

    # -- operations ------------------------------------------------------------------

    async def ping(self) -> str:
        return str((await self.call("ping"))["node_id"])

    async def append(self, context: str, payload: bytes | str, *, key: str = "",
                     metadata: Mapping[str, str] | None = None, dedup_id: bytes | str | None = None,
                     expect_seq: int | None = None, after_lamport: int | None = None,
                     replicas: int | None = None) -> Entry:
        """Append one entry (see `Client.append`). Await many at once to pipeline them."""
        fields = {"context": context, "key": key, "payload": payload.encode() if isinstance(payload, str) else payload,
                  "metadata": dict(metadata) if metadata else None, "dedup_id": dedup_id, "expect_seq": expect_seq,
                  "after_lamport": after_lamport, "replicas": replicas}
        r = await self._call("append", fields, dedup_id is not None, None, follow=True)
        self.last_replicated = r.get("replicated")
        return calls.entry_of(r["entry"], self.verify)

    async def append_batch(self, context: str,
                           items: Iterable[tuple[str, bytes | str, Mapping[str, str] | None] | bytes | str], *,
                           dedup_id: bytes | str | None = None, expect_seq: int | None = None,
                           after_lamport: int | None = None, replicas: int | None = None) -> list[Entry]:
        """Append many entries atomically (see `Client.append_batch`)."""
        fields = {"context": context, "entries": calls.append_items(items), "dedup_id": dedup_id,
                  "expect_seq": expect_seq, "after_lamport": after_lamport, "replicas": replicas}
        r = await self._call("append_batch", fields, dedup_id is not None, None, follow=True)
        self.last_replicated = r.get("replicated")
        return [calls.entry_of(m, self.verify) for m in r["entries"]]

    async def append_many(self, context: str, payloads: Iterable[bytes | str], *, key: str = "",
                          metadata: Mapping[str, str] | None = None, window: int = DEFAULT_WINDOW,
                          dedup_prefix: str | None = None) -> AsyncIterator[Entry]:
        """Pipelined appends, up to `window` in flight on one connection; yields the entries in
        order. At a node that is not the context's writer, everything not yet acknowledged (none
        of it was applied) goes to the writer instead (as `Client.append_many`)."""
        md = dict(metadata) if metadata else None
        items: Iterator[tuple[bytes, str | None]] = (
            (p.encode() if isinstance(p, str) else p, f"{dedup_prefix}:{i}" if dedup_prefix else None)
            for i, p in enumerate(payloads))
        client: AsyncClient = self
        for hop in range(MAX_REDIRECTS + 1):
            inflight: collections.deque[tuple[int, bytes, str | None]] = collections.deque()
            try:
                for p, dd in items:
                    rid = client.submit("append", context=context, key=key, payload=p, metadata=md, dedup_id=dd)
                    inflight.append((rid, p, dd))
                    if len(inflight) >= window:
                        yield await client._first_entry(inflight)
                    # what is acknowledged already goes out at once (a slow producer sees progress)
                    while inflight and client._answered(inflight[0][0]):
                        yield await client._first_entry(inflight)
                while inflight:
                    yield await client._first_entry(inflight)
                return
            except NotWriter as exc:
                if hop >= MAX_REDIRECTS or not exc.details.get("address"):
                    raise
                for rid, _, _ in inflight:
                    client._drop(rid)
                items = itertools.chain([(p, dd) for _, p, dd in inflight], items)
                client = self._writer_client(str(exc.details["address"]), exc.details.get("key"))
            finally:
                for rid, _, _ in inflight:
                    client._drop(rid)

    async def _first_entry(self, inflight: collections.deque[tuple[int, bytes, str | None]]) -> Entry:
        """The entry of the oldest pipelined append, once acknowledged (then it leaves `inflight`)."""
        got = self._submitted[inflight[0][0]]
        e = calls.entry_of(calls.check(await got[1])["entry"], self.verify)
        del self._submitted[inflight.popleft()[0]]
        return e

    def _answered(self, rid: int) -> bool:
        return self._submitted[rid][1].done()

    def _drop(self, rid: int) -> None:
        """Forget a submitted request nobody will ask for."""
        got = self._submitted.pop(rid, None)
        if got is not None:
            got[0].forget(rid)

    async def get(self, context: str, *, key: str | None = None, after: int = 0, limit: int | None = None,
                  fork: str | None = None, fork_index: int | None = None) -> GetResult:
        """Entries with seq > `after` (see `Client.get`)."""
        r = await self.call("get", context=context, key=key, after=after, limit=limit, fork=fork,
                            fork_index=fork_index)
        return calls.get_result_of(r, self.verify)

    async def iter_entries(self, context: str, *, key: str | None = None, after: int = 0, fork: str | None = None,
                           fork_index: int | None = None) -> AsyncIterator[Entry]:
        """Every entry after `after`, page by page (see `Client.iter_entries`)."""
        more = True
        while more:
            page = await self.get(context, key=key, after=after, limit=codec.MAX_GET_LIMIT, fork=fork,
                                  fork_index=fork_index)
            for e in page.entries:
                yield e
            more, after = page.more, page.next_after

    async def merged(self, contexts: Iterable[str], *, after_lamport: int = 0) -> AsyncIterator[Entry]:
        """Entries of several contexts in one causal order (see `Client.merged`)."""
        streams = []
        for name in dict.fromkeys(contexts):
            start = await self._run(calls.first_after_lamport_flow(name, after_lamport)) if after_lamport else 0
            streams.append(self.iter_entries(name, after=start))
        heap: list[tuple[tuple[int, str, str, int], int, Entry]] = []
        for i, s in enumerate(streams):
            async for e in s:
                heap.append((calls.merge_key(e), i, e))
                break
        heapq.heapify(heap)
        while heap:
            _, i, e = heapq.heappop(heap)
            yield e
            async for nxt in streams[i]:
                heapq.heappush(heap, (calls.merge_key(nxt), i, nxt))
                break

    async def head(self, context: str, *, writer_key: bytes | str | None = None) -> Head:
        """The context's head, checked against its writer's signature with `writer_key` (see `Client.head`)."""
        return await self._run(calls.head_flow(context, writer_key, self.address, self.verify))

    async def pub_address(self) -> str:
        return calls.pub_address_of(await self.status(), self.address)

    def watch(self, context: str, after: int | None = None, key: str | None = None, **options: Any) -> AsyncWatch:
        """Entries of `context` in seq order, exactly once, live (see `Client.watch`): `async with`
        it (or just `async for` over it; it subscribes on first use). Options as `Client.watch`."""
        return AsyncWatch(self, context, after, key, **options)

    async def contexts(self) -> list[dict[str, Any]]:
        return await self._run(calls.contexts_flow())

    async def status(self) -> dict[str, Any]:
        return calls.status_of(await self.call("status"))

    async def proof(self, context: str, seq: int, size: int | None = None, *, check_entry: bool = True,
                    writer_key: bytes | str | None = None) -> InclusionProof:
        """An inclusion proof of entry `seq`, verified (see `Client.proof`)."""
        return await self._run(calls.proof_flow(context, seq, size, check_entry, writer_key, self.address,
                                                self.verify))

    async def consistency(self, context: str, first: int, second: int | None = None, *,
                          first_root: bytes | None = None) -> ConsistencyProof:
        return await self._run(calls.consistency_flow(context, first, second, first_root))

    async def snapshot(self, context: str, out: IO[bytes], *, size: int | None = None,
                       on_progress: calls.ProgressFn | None = None) -> dict[str, Any]:
        """A verified snapshot to `out` (written to as pages come: give it a fast file)."""
        return await self._run(calls.snapshot_flow(context, out, size, self.verify, on_progress))

    async def load(self, context: str, src: IO[bytes], *, fail_if_exists: bool = False,
                   chunk_bytes: int = LOAD_CHUNK_BYTES, on_progress: calls.ProgressFn | None = None) -> Head:
        return await self._run(calls.load_flow(context, src, fail_if_exists, chunk_bytes, on_progress))

    async def check_entries(self, context: str, entries: list[Entry], writer_key: bytes | str) -> int:
        return await self._run(calls.check_entries_flow(context, entries, writer_key, self.address, self.verify))

    async def verify_context(self, context: str, *, writer_key: bytes | str | None = None,
                             on_progress: calls.ProgressFn | None = None) -> dict[str, Any]:
        return await self._run(calls.verify_context_flow(context, writer_key, self.address, self.verify,
                                                         on_progress))


class AsyncWatch:
    """A live, exactly-once, in-order stream of one context's entries for asyncio (see
    `Client.watch` and `Watch`): `async for e in watch`. Cancel the task that iterates it to stop
    (then `await watch.close()`, or use `async with`); with `timeout`, waiting longer than that
    for the next entry raises Timeout. What it decides is `calls.WatchState`'s, shared with
    `Watch`; this class only waits, on the event loop."""

    def __init__(self, client: AsyncClient, context: str, after: int | None = None, key: str | None = None, *,
                 pub_address: str | None = None, max_outage: float | None = None, timeout: float | None = None,
                 on_event: Callable[[str, str], None] | None = None, rcvhwm: int = 100_000,
                 writer_key: bytes | str | None = None) -> None:
        self.client = client
        self.state = calls.WatchState(context, key, writer_key, max_outage, timeout, on_event,
                                      pub_address or "tcp://0.0.0.0:0")
        self._pub_given = pub_address is not None
        self._after = after
        self._rcvhwm = rcvhwm
        self._sub: zmq.asyncio.Socket | None = None
        self._started = False
        self._closed = False

    @property
    def last_seq(self) -> int:
        return self.state.cursor.last

    async def __aenter__(self) -> AsyncWatch:
        await self._start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    def __aiter__(self) -> AsyncWatch:
        return self

    async def close(self) -> None:
        self._closed = True
        if self._sub is not None:
            self._sub.close(linger=0)
            self._sub = None

    async def _start(self) -> None:
        if self._started:
            return
        if self._closed:
            raise ClientClosed("this watch is closed")
        s, c = self.state, self.client
        if not self._pub_given:
            s.pub_address = await c.pub_address()
        self._sub = open_sub(c._zctx, s.pub_address, s.topic, self._rcvhwm, c.key, c.server_key)
        try:
            await self._run(s.start_flow(self._after, c.verify, c.timeout))
        except BaseException:
            await self.close()
            raise
        self._started = True

    async def _run(self, flow: Flow[T]) -> T:
        return await self.client._run(flow, self._do)

    async def _do(self, step: Step) -> Any:
        if isinstance(step, calls.Clock):
            return time.monotonic()
        if isinstance(step, calls.Receive):
            sub = self._sub
            if sub is None:
                raise WatchClosed()
            if not await sub.poll(max(0, int(step.seconds * 1000)), zmq.POLLIN):
                return []
            out = []
            for _ in range(1000):
                try:
                    out.append(await sub.recv_multipart(zmq.NOBLOCK))
                except zmq.Again:
                    break
            return out
        if isinstance(step, calls.Ping):
            return await self._ping(step.seconds)
        if isinstance(step, calls.Sleep):
            await asyncio.sleep(step.seconds)
            return None
        if isinstance(step, calls.Unsubscribe):
            if self._sub is not None:
                self._sub.setsockopt(zmq.UNSUBSCRIBE, self.state.topic)
            return None
        return await self.client._do(step)

    async def _ping(self, timeout: float) -> bool:
        c = self.client
        conn = c._connection()
        try:
            await c.result(c.submit("ping"), timeout=max(0.05, timeout))
            return True
        except (Timeout, Unavailable):
            c._reconnect(conn, next_address=False)
            return False

    async def __anext__(self) -> Entry:
        await self._start()
        if self._sub is None and not self.state.ready:
            raise StopAsyncIteration
        try:
            return await self._run(self.state.next_flow(self.client.verify, self.client.timeout, self.client.address))
        except WatchClosed:
            raise StopAsyncIteration from None
