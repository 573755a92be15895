"""The asyncio reference client: `AsyncClient`, the same operations, errors and guarantees as the
synchronous `Client` (protocol/client.py), on `zmq.asyncio` sockets, never blocking the event loop.

    async with AsyncClient(["127.0.0.1:7400", "127.0.0.1:7410"]) as c:
        e = await c.append("notes", b"hello", dedup_id="note-1")
        entries = await asyncio.gather(*(c.append("notes", p) for p in payloads))  # pipelined
        async with c.watch("notes", after=0, timeout=30) as w:
            async for e in w:
                ...

Theory of operation. One DEALER per node address in use; any number of coroutines may await
requests on it at once (pipelining). A reader task takes every reply as it comes and resolves the
future of the request it answers (`calls.ReplyBook`: by id, a nil id to the oldest request still
waiting); a monitor task reads the socket monitor and fails the waiting requests at once when
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
import os
import time
from collections.abc import AsyncIterator, Callable, Iterable, Mapping, Sequence
from typing import IO, Any, TypeVar

import zmq
import zmq.asyncio

from protocol import calls, codec, watch
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
    Step,
    Submit,
)
from protocol.client import monitor_kind, open_dealer, set_curve, unreachable
from protocol.entry import Entry
from protocol.errors import BadRequest, ClientClosed, LedgerError, NotWriter, Timeout, Unavailable, Unreachable
from protocol.keys import Identity, parse_public_key

T = TypeVar("T")
# replies taken in one turn of the event loop at most (the rest on the next: other coroutines run
# in between, and each woken caller re-hashes its entry on its own turn)
DRAIN_MOST = 1000
SWEEP_S = 0.05  # how often the requests waiting on a connection are checked against their deadlines


class _Connection:
    """One DEALER to one node, and the requests waiting on it.

    The DEALER is a plain socket read from the event loop's own reader callback (`add_reader` on
    its edge-triggered FD): every queued reply is taken in one go and resolves the future of the
    request it answers, with no future per message (zmq.asyncio's per-call futures cost about
    half the throughput of pipelined appends). Sends never wait (a large high-water mark), and
    after each one the loop looks for replies once more (a send can take the FD's edge). The
    monitor is read through zmq.asyncio by a task."""

    def __init__(self, client: AsyncClient, address: str) -> None:
        self.address = address
        self.loop = asyncio.get_running_loop()
        self.sock, monitor = open_dealer(client._plain_ctx, address, client.key, client.server_key)
        self.monitor = zmq.asyncio.Socket.from_socket(monitor)
        self._plain_monitor = monitor
        self.link = Link()
        # rid -> (future, deadline, sent at) in loop time, oldest first
        self.book = ReplyBook()
        self._sweeper: asyncio.TimerHandle | None = None
        self.closed = False
        self._scheduled = False
        self.loop.add_reader(self.sock.FD, self._drain)
        self.task = self.loop.create_task(self._watch_link())

    def send(self, rid: int, frame: bytes, timeout: float) -> asyncio.Future[dict[str, Any]]:
        """Send a request; its future fails with Timeout when no reply came within `timeout`."""
        loop = self.loop
        fut: asyncio.Future[dict[str, Any]] = loop.create_future()
        now = loop.time()
        book = self.book
        book.sent(rid, (fut, now + timeout, now))
        try:
            self.sock.send(frame, zmq.NOBLOCK)
        except zmq.Again:
            book.forget(rid)
            raise Unavailable(f"more than 100,000 requests queued for {self.address}") from None
        # A send may take the FD's edge (the signal that replies are queued): look again. Alone,
        # at once (one request awaited after another: no extra turn of the loop); pipelined,
        # once per turn of the loop for all the sends of that turn.
        if not self._scheduled:
            if len(book) > 1:
                self._scheduled = True
                loop.call_soon(self._drain)
            elif self.sock.get(zmq.EVENTS) & zmq.POLLIN:
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
        sock, match = self.sock, self.book.match
        if not sock.get(zmq.EVENTS) & zmq.POLLIN:
            return  # a wake-up for the socket's own commands (after a send): nothing to read
        for _ in range(DRAIN_MOST):
            try:
                frames = sock.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            got = match(frames[-1])
            if got is not None:
                fut = got[2][0]
                if not fut.done():
                    fut.set_result(got[1])
        self._scheduled = True  # more queued: the rest on the next turn of the loop
        self.loop.call_soon(self._drain)

    async def _watch_link(self) -> None:
        try:
            while True:
                kind = monitor_kind(await self.monitor.recv_multipart())
                if kind is None:
                    continue
                self.link.on_event(kind)
                if kind == "refused" and self.link.unreachable:
                    self.fail(lambda: unreachable([self.address]))
        except (asyncio.CancelledError, zmq.ZMQError):
            return

    def fail(self, error: Callable[[], LedgerError]) -> None:
        """Fail every request waiting here (nothing listens, or the connection is replaced)."""
        for _rid, (fut, _deadline, _sent) in self.book.clear():
            if not fut.done():
                fut.set_exception(error())

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        self.task.cancel()
        if self._sweeper is not None:
            self._sweeper.cancel()
        try:
            self.loop.remove_reader(self.sock.FD)
        except (RuntimeError, zmq.ZMQError):  # (a loop already closed)
            pass
        self.fail(lambda: Timeout(f"the connection to {self.address} was closed before the answer came; "
                                  "the request may or may not have been applied", {"address": self.address}))
        try:
            self.sock.disable_monitor()
        except zmq.ZMQError:
            pass
        self.monitor.close(linger=0)  # (the same socket as `_plain_monitor`: closed once)
        self.sock.close(linger=0)


class AsyncClient:
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
        self.addresses = calls.addresses_of(address)
        self.address = self.addresses[0]
        if (key is None) != (server_key is None):
            raise BadRequest("a client with keys needs both its own key and the node's public key (server_key)")
        self.key = key
        self.server_key = parse_public_key(server_key) if isinstance(server_key, str) else server_key
        self.timeout = timeout
        self.retries = retries
        self.verify = verify
        if zctx is not None and not isinstance(zctx, zmq.asyncio.Context):
            zctx = zmq.asyncio.Context.shadow(zctx.underlying)
        self._zctx: zmq.asyncio.Context = zctx or zmq.asyncio.Context.instance()
        self._plain_ctx: zmq.Context[Any] = zmq.Context.shadow(self._zctx.underlying)
        self._next_id = int.from_bytes(os.urandom(3), "big") << 20
        self._closed = False
        self._writers: dict[str, AsyncClient] = {}
        self.last_replicated: int | None = None
        # submitted and not yet asked for (`result`): on which connection, and the reply's future
        self._submitted: dict[int, tuple[_Connection, asyncio.Future[dict[str, Any]]]] = {}
        self._conn: _Connection | None = None  # made when first used, inside the event loop

    # -- plumbing ----------------------------------------------------------------

    def _connection(self) -> _Connection:
        if self._closed:
            raise ClientClosed("this client is closed (make a new one)")
        if self._conn is None:
            self._conn = _Connection(self, self.address)
        return self._conn

    def _reconnect(self, conn: _Connection, next_address: bool) -> None:
        """A fresh connection in place of `conn` (once, however many requests saw it fail); the
        requests still waiting on it fail with Timeout (their calls retry when that is safe)."""
        if conn is not self._conn or self._closed:
            return
        if next_address:
            self.address = self.addresses[(self.addresses.index(self.address) + 1) % len(self.addresses)]
        conn.close()
        self._conn = _Connection(self, self.address)

    async def close(self) -> None:
        self.close_now()
        await asyncio.sleep(0)  # let the cancelled tasks finish

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
        rid = self._next_id
        self._next_id += 1
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

    def _deadline(self) -> float:
        return self._connection().loop.time() + self.timeout

    async def call(self, op: str, *, retry: bool = True, **fields: Any) -> dict[str, Any]:
        """One request and its reply, in at most `timeout` seconds (see `Client.call`)."""
        return await self._call(op, fields, retry, self._deadline())

    async def _call(self, op: str, fields: dict[str, Any], retry: bool, deadline: float,
                    follow: bool = False) -> dict[str, Any]:
        """`call` until `deadline` (loop time); with `follow`, NOT_WRITER is followed to the
        context's writer, within the same deadline."""
        loop = self._connection().loop
        began = loop.time()
        attempts_left = 1 + (self.retries if retry else 0)
        attempts = 0
        refused: list[str] = []
        while True:
            conn = self._connection()
            rid = self._next_id
            self._next_id += 1
            fut = conn.send(rid, calls.encode(op, rid, fields), max(0.0, (deadline - loop.time()) / attempts_left))
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
            except Unreachable:
                refused.append(conn.address)
                movable = retry or not conn.link.ever_up  # it reached no node: any may have it
                self._reconnect(conn, next_address=True)
                if not movable or len(set(refused)) >= len(self.addresses) or loop.time() >= deadline:
                    raise unreachable(list(dict.fromkeys(refused))) from None
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

    async def _run(self, flow: Flow[T]) -> T:
        """Drive a flow of `protocol.calls` to its result (as `Client._run`, awaiting)."""
        try:
            step = next(flow)
            while True:
                error: LedgerError | None = None
                try:
                    answer = await self._do(step)
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
        return await self.result(step.handle)

    def _writer_client(self, address: str, key: Any = None) -> AsyncClient:
        """A client of the writer a NOT_WRITER reply named (kept for later appends); see `Client`."""
        c = self._writers.get(address)
        if c is None:
            server_key = None
            if self.key is not None:
                if not isinstance(key, str):
                    raise Unavailable(f"the writer at {address} has no known key; cannot authenticate it")
                server_key = key
            c = AsyncClient(address, timeout=self.timeout, retries=self.retries, verify=self.verify,
                            zctx=self._zctx, key=self.key if server_key is not None else None,
                            server_key=server_key)
            self._writers[address] = c
        return c

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
        r = await self._call("append", fields, dedup_id is not None, self._deadline(), follow=True)
        self.last_replicated = r.get("replicated")
        return calls.entry_of(r["entry"], self.verify)

    async def append_batch(self, context: str,
                           items: Iterable[tuple[str, bytes | str, Mapping[str, str] | None] | bytes | str], *,
                           dedup_id: bytes | str | None = None, expect_seq: int | None = None,
                           after_lamport: int | None = None, replicas: int | None = None) -> list[Entry]:
        """Append many entries atomically (see `Client.append_batch`)."""
        fields = {"context": context, "entries": calls.append_items(items), "dedup_id": dedup_id,
                  "expect_seq": expect_seq, "after_lamport": after_lamport, "replicas": replicas}
        r = await self._call("append_batch", fields, dedup_id is not None, self._deadline(), follow=True)
        self.last_replicated = r.get("replicated")
        return [calls.entry_of(m, self.verify) for m in r["entries"]]

    async def append_many(self, context: str, payloads: Iterable[bytes | str], *, key: str = "",
                          metadata: Mapping[str, str] | None = None, window: int = DEFAULT_WINDOW,
                          dedup_prefix: str | None = None) -> AsyncIterator[Entry]:
        """Pipelined appends, up to `window` awaited at once; yields the entries in order (each
        append follows NOT_WRITER to the writer by itself)."""
        md = dict(metadata) if metadata else None
        loop = asyncio.get_running_loop()
        inflight: collections.deque[asyncio.Future[Entry]] = collections.deque()
        try:
            for i, p in enumerate(payloads):
                inflight.append(loop.create_task(self.append(
                    context, p, key=key, metadata=md, dedup_id=f"{dedup_prefix}:{i}" if dedup_prefix else None)))
                if len(inflight) >= window:
                    yield await inflight.popleft()
                while inflight and inflight[0].done():
                    yield inflight.popleft().result()
            while inflight:
                yield await inflight.popleft()
        finally:
            for t in inflight:
                t.cancel()

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

    async def snapshot(self, context: str, out: IO[bytes], *, size: int | None = None) -> dict[str, Any]:
        """A verified snapshot to `out` (written to as pages come: give it a fast file)."""
        return await self._run(calls.snapshot_flow(context, out, size, self.verify))

    async def load(self, context: str, src: IO[bytes], *, fail_if_exists: bool = False,
                   chunk_bytes: int = LOAD_CHUNK_BYTES) -> Head:
        return await self._run(calls.load_flow(context, src, fail_if_exists, chunk_bytes))

    async def check_entries(self, context: str, entries: list[Entry], writer_key: bytes | str) -> int:
        return await self._run(calls.check_entries_flow(context, entries, writer_key, self.address, self.verify))

    async def verify_context(self, context: str, *, writer_key: bytes | str | None = None) -> dict[str, Any]:
        return await self._run(calls.verify_context_flow(context, writer_key, self.address, self.verify))


class AsyncWatch:
    """A live, exactly-once, in-order stream of one context's entries for asyncio (see
    `Client.watch` and `Watch`): `async for e in watch`. Cancel the task that iterates it to stop
    (then `await watch.close()`, or use `async with`); with `timeout`, waiting longer than that
    for the next entry raises Timeout."""

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
        self._heard = time.monotonic()

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
        sub = c._zctx.socket(zmq.SUB)
        sub.setsockopt(zmq.LINGER, 0)
        sub.setsockopt(zmq.RCVHWM, self._rcvhwm)
        if "[" in s.pub_address:
            sub.setsockopt(zmq.IPV6, 1)
        set_curve(sub, c.key, c.server_key)
        sub.connect(s.pub_address)
        sub.setsockopt(zmq.SUBSCRIBE, s.topic)
        self._sub = sub
        try:
            await self._confirm_subscription(sub)
            s.start(self._after, await c._run(calls.size_flow(s.context)))
            for m in s.early:
                await self._on_message(m)
            s.early = []
        except BaseException:
            await self.close()
            raise
        self._started = True

    async def _confirm_subscription(self, sub: zmq.asyncio.Socket) -> None:
        s = self.state
        deadline = time.monotonic() + self.client.timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not await sub.poll(int(left * 1000) + 1, zmq.POLLIN):
                if time.monotonic() < deadline:
                    continue
                s.on_event("warning", f"no greeting on {s.pub_address}; watching without it")
                return
            m = s.decode(await sub.recv_multipart(), self.client.verify)
            if m is None:
                continue
            s.early.append(m)
            if isinstance(m, watch.HeadMsg):
                s.note_head(m, greeting=True)
                if s.limited:
                    sub.setsockopt(zmq.UNSUBSCRIBE, s.topic)  # nothing live comes: give the node its place
                return

    async def _on_message(self, m: watch.WatchMsg) -> None:
        if self.state.on_message(m):
            assert isinstance(m, watch.HeadMsg)
            await self.client._run(calls.continuity_flow(self.state.context, self.state.cursor))
            self.state.resume(m)

    async def _refill(self) -> None:
        s = self.state
        s.ready.extend(await self.client._run(calls.refill_flow(s.context, s.key, s.cursor, self.client.verify)))
        s.refills += 1

    def _left(self) -> float:
        if self.state.max_outage is None:
            return self.client.timeout
        return self.state.max_outage - (time.monotonic() - self._heard)

    async def _ping(self, timeout: float) -> bool:
        c = self.client
        try:
            conn = c._connection()
            rid = c.submit("ping")
            await c.result(rid, timeout=max(0.05, timeout))
            return True
        except (Timeout, Unavailable):
            c._reconnect(conn, next_address=False)
            return False

    async def _outage(self, why: str) -> None:
        s, c = self.state, self.client
        s.outages += 1
        s.on_event("lost", f"node at {c.address} is not answering ({why}); retrying")
        while True:
            left = self._left()
            if s.max_outage is not None and left <= 0:
                raise Unavailable(f"node at {c.address} did not come back within {s.max_outage:g} s",
                                  {"address": c.address})
            started = time.monotonic()
            if await self._ping(min(c.timeout, left)):
                break
            await asyncio.sleep(max(0.0, min(0.2 - (time.monotonic() - started), self._left())))
        self._heard = time.monotonic()
        await c._run(calls.continuity_flow(s.context, s.cursor))
        s.on_event("back", f"node at {c.address} is back; resuming after #{s.cursor.last}")

    async def _read_queued(self, sub: zmq.asyncio.Socket, most: int = 1000) -> None:
        for _ in range(most):
            try:
                frames = await sub.recv_multipart(zmq.NOBLOCK)
            except zmq.Again:
                return
            m = self.state.decode(frames, self.client.verify)
            if m is not None:
                await self._on_message(m)

    async def __anext__(self) -> Entry:
        await self._start()
        s = self.state
        ready = s.ready
        began = time.monotonic()
        while not ready:
            sub = self._sub
            if sub is None:
                raise StopAsyncIteration
            waited = time.monotonic() - began
            if s.timeout is not None and waited >= s.timeout:
                raise s.idle_timeout(waited)
            try:
                if s.cursor.needs_refill():
                    await self._refill()
                    continue
                silence = s.silence(self._left() if s.max_outage is not None else None)
                if s.timeout is not None:
                    silence = min(silence, s.timeout - waited)
                if await sub.poll(int(silence * 1000), zmq.POLLIN):
                    self._heard = time.monotonic()
                    await self._read_queued(sub)
                    continue
                if s.timeout is not None and time.monotonic() - began >= s.timeout:
                    continue  # (raised above)
                if not s.limited and not await self._ping(min(self.client.timeout, self._left())):
                    await self._outage("no heartbeat")
                self._heard = time.monotonic()
                await self._refill()
            except Timeout as exc:
                await self._outage(exc.message)
        if s.writer_key is not None and ready[0].seq > s.checked:
            batch = list(ready)
            await self.client.check_entries(s.context, batch, s.writer_key)
            s.checked = batch[-1].seq
        return ready.popleft()
