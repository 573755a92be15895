"""The `clients` round family: the reference clients themselves, not a bare DEALER (issue #16's
targets): the synchronous `Client` and the asyncio `AsyncClient`, one append at a time and
pipelined, each entry re-hashed as the clients always do, on the async node of `baseline` (or one
of its own when `baseline` is not selected).

- client_append_seq / aio_append_seq: `append` awaited one after the other (latency);
- client_append_pipelined / aio_append_pipelined: `append_many`, WINDOW appends in flight;
- aio_append_gather: WINDOW `AsyncClient.append` calls awaited at once (`asyncio.gather`) on one
  connection, then the next WINDOW: each the full call (its own deadline, NOT_WRITER, verification).

The asyncio side runs on one event loop kept for the whole run (`run_until_complete` per slice).
"""

from __future__ import annotations

import asyncio
import collections
import os
import time
from collections.abc import Iterator

from protocol.aioclient import AsyncClient
from protocol.client import Client

from ..common import CLIENT_SCENARIOS, WINDOW
from ..drivers import Sample
from ..procs import start_node
from ..registry import Rounds, round_family

CONTEXT = "clients"


def client_seq(c: Client, n: int, payload: bytes) -> Sample:
    pc = time.perf_counter
    lat = []
    t0 = pc()
    for _ in range(n):
        t = pc()
        c.append(CONTEXT, payload, key="k")
        lat.append(pc() - t)
    return Sample(n, pc() - t0, lat)


class Timed:
    """Payloads handed to `append_many`, each one's time noted when the client takes it (it sends
    it right then); `done()` as each entry comes back gives the request's latency."""

    def __init__(self, n: int, payload: bytes) -> None:
        self.n, self.payload = n, payload
        self.taken: collections.deque[float] = collections.deque()
        self.lat: list[float] = []

    def __iter__(self) -> Iterator[bytes]:
        pc, taken, payload = time.perf_counter, self.taken, self.payload
        for _ in range(self.n):
            taken.append(pc())
            yield payload

    def done(self) -> None:
        self.lat.append(time.perf_counter() - self.taken.popleft())


def client_pipelined(c: Client, n: int, payload: bytes, window: int = WINDOW) -> Sample:
    timed = Timed(n, payload)
    t0 = time.perf_counter()
    for _ in c.append_many(CONTEXT, timed, key="k", window=window):
        timed.done()
    return Sample(n, time.perf_counter() - t0, timed.lat)


async def aio_seq(c: AsyncClient, n: int, payload: bytes) -> Sample:
    pc = time.perf_counter
    lat = []
    t0 = pc()
    for _ in range(n):
        t = pc()
        await c.append(CONTEXT, payload, key="k")
        lat.append(pc() - t)
    return Sample(n, pc() - t0, lat)


async def aio_pipelined(c: AsyncClient, n: int, payload: bytes, window: int = WINDOW) -> Sample:
    timed = Timed(n, payload)
    t0 = time.perf_counter()
    async for _ in c.append_many(CONTEXT, timed, key="k", window=window):
        timed.done()
    return Sample(n, time.perf_counter() - t0, timed.lat)


async def aio_gather(c: AsyncClient, n: int, payload: bytes, window: int = WINDOW) -> Sample:
    pc = time.perf_counter
    lat: list[float] = []

    async def one() -> None:
        t = pc()
        await c.append(CONTEXT, payload, key="k")
        lat.append(pc() - t)

    t0 = pc()
    for start in range(0, n, window):
        await asyncio.gather(*(one() for _ in range(min(window, n - start))))
    return Sample(n, pc() - t0, lat)


@round_family("clients", lambda only: only is None or bool(only & set(CLIENT_SCENARIOS)))
def clients(r: Rounds) -> None:
    sizes, payload = r.sizes, r.payload
    node = r.shared.get("node")
    if node is None:
        node, _ = start_node(os.path.join(r.workdir, "clients"))
        r.procs.append(node)
    c = Client(node.address, zctx=r.zctx, timeout=30.0)
    loop = asyncio.new_event_loop()
    ac = AsyncClient(node.address, timeout=30.0)

    r.add("client_append_seq", lambda: client_seq(c, sizes.seq, payload))
    r.add("client_append_pipelined", lambda: client_pipelined(c, sizes.pipelined, payload))
    r.add("aio_append_seq", lambda: loop.run_until_complete(aio_seq(ac, sizes.seq, payload)))
    r.add("aio_append_pipelined", lambda: loop.run_until_complete(aio_pipelined(ac, sizes.pipelined, payload)))
    r.add("aio_append_gather", lambda: loop.run_until_complete(aio_gather(ac, sizes.pipelined, payload)))

    def warm_up() -> None:
        client_seq(c, 50, payload)
        loop.run_until_complete(aio_seq(ac, 50, payload))

    def stop() -> None:
        c.close()
        loop.run_until_complete(ac.close())
        loop.close()

    r.warmups.append(warm_up)
    r.stops.append(stop)
