"""The asyncio client against real nodes, and what both clients promise about failures: several
addresses with failover, "nothing listening" at once, timeouts that say the time really waited,
replies with a nil id, a closed client."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import msgpack
import pytest
import zmq

from protocol.aioclient import AsyncClient
from protocol.client import Client
from protocol.errors import BadRequest, ClientClosed, NotFound, Timeout, Unreachable
from tests.integration.test_cli import free_port
from tests.integration.test_mesh import converged, hostport, mesh, wait_for

pytestmark = pytest.mark.timeout(120)

HEARTBEAT_S = 0.010
# generous: CI has 2 shared cores, and 0.100 failed twice in full runs of session 17 (155 and 161 ms
# late, never alone); a blocking call on the loop (below: 0.6 s) still fails it
LATE_BOUND_S = 0.300


def run(coro: Any) -> Any:
    return asyncio.run(coro)


class Ticker:
    """A coroutine that wants to run every 10 ms; `worst` is how late it ever ran."""

    def __init__(self) -> None:
        self.worst = 0.0
        self.ticks = 0
        self.stop = False

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        due = loop.time() + HEARTBEAT_S
        while not self.stop:
            await asyncio.sleep(max(0.0, due - loop.time()))
            self.worst = max(self.worst, loop.time() - due)
            self.ticks += 1
            due = loop.time() + HEARTBEAT_S


@pytest.fixture
def silent_router() -> Iterator[tuple[str, Callable[[Callable[[dict[str, Any]], Any]], None]]]:
    """A ROUTER on a free port that answers as `answer(request)` says (None: not at all; a
    list: each of its replies)."""
    ctx = zmq.Context()
    s = ctx.socket(zmq.ROUTER)
    s.setsockopt(zmq.LINGER, 0)
    port = s.bind_to_random_port("tcp://127.0.0.1")
    behaviour: list[Callable[[dict[str, Any]], Any]] = [lambda req: None]
    done = threading.Event()

    def serve() -> None:
        while not done.is_set():
            if not s.poll(50):
                continue
            ident, body = s.recv_multipart()
            reply = behaviour[0](msgpack.unpackb(body))
            for r in reply if isinstance(reply, list) else [] if reply is None else [reply]:
                s.send_multipart([ident, msgpack.packb(r, use_bin_type=True)])

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    yield f"127.0.0.1:{port}", lambda fn: behaviour.__setitem__(0, fn)
    done.set()
    t.join(5)
    s.close(0)
    ctx.term()


def test_async_client_does_what_the_sync_client_does(node):
    async def main() -> None:
        async with AsyncClient(node.address) as c:
            assert await c.ping() == node.node_id
            e = await c.append("notes", "first", key="facts", metadata={"a": "b"}, dedup_id="d1")
            again = await c.append("notes", "first", key="facts", metadata={"a": "b"}, dedup_id="d1")
            assert e == again and e.seq == 1  # exactly once: a retried dedup_id gives the original
            batch = await c.append_batch("notes", ["x", ("intents", b"y", None)])
            assert [b.seq for b in batch] == [2, 3]
            h = await c.head("notes")
            assert h.size == 3 and h.writer == node.node_id
            page = await c.get("notes", after=1)
            assert [x.seq for x in page.entries] == [2, 3] and not page.more
            assert [x.seq async for x in c.iter_entries("notes", key="intents")] == [3]
            p = await c.proof("notes", 2)
            assert (p.seq, p.size, p.root) == (2, 3, h.root)
            assert (await c.consistency("notes", 1, 3)).second_root == h.root
            assert (await c.verify_context("notes"))["root"] == h.root
            assert [x["name"] for x in await c.contexts()] == ["notes"]
            assert (await c.status())["node_id"] == node.node_id
            with pytest.raises(NotFound):
                await c.head("nosuch")
            got = [x.seq async for x in c.append_many("notes", [f"m{i}" for i in range(50)], window=8)]
            assert got == list(range(4, 54))
            merged = [x.context async for x in c.merged(["notes"])]
            assert len(merged) == 53
            rids = [c.submit("ping") for _ in range(3)]
            await asyncio.sleep(0.3)  # the replies come before anyone asks for them
            assert [(await c.result(r))["node_id"] for r in rids] == [node.node_id] * 3
        with pytest.raises(ClientClosed):
            await c.ping()

    run(main())


def test_a_watch_and_1000_concurrent_appends_never_stall_the_event_loop(node):
    async def main(blocking: bool) -> tuple[float, list[int]]:
        ticker = Ticker()
        async with AsyncClient(node.address) as c:
            await c.append("busy", "0")
            size = (await c.head("busy")).size
            beat = asyncio.get_running_loop().create_task(ticker.run())
            seen: list[int] = []
            async with c.watch("busy", after=size, timeout=10) as w:
                async def watch() -> None:
                    async for e in w:
                        seen.append(e.seq)
                        if len(seen) == 1000:
                            return
                watcher = asyncio.get_running_loop().create_task(watch())
                if blocking:
                    time.sleep(2 * LATE_BOUND_S)  # what a blocking call does to everyone else on the loop
                entries = await asyncio.gather(*(c.append("busy", f"p{i}") for i in range(1000)))
                await asyncio.wait_for(watcher, 30)
            ticker.stop = True
            await beat
        assert sorted(e.seq for e in entries) == list(range(size + 1, size + 1001))
        assert ticker.ticks >= 2  # it ran while the work did
        return ticker.worst, seen

    worst, seen = run(main(blocking=False))
    assert seen == list(range(seen[0], seen[0] + 1000)) and seen[0] == 2  # every entry once, in order
    assert worst < LATE_BOUND_S, f"a heartbeat ran {worst * 1000:.0f} ms late"
    # the bound can fail: the same run with one blocking call in it does
    worst_blocked, _ = run(main(blocking=True))
    assert worst_blocked >= LATE_BOUND_S


def test_an_async_watch_times_out_and_can_be_cancelled(node):
    async def main() -> None:
        async with AsyncClient(node.address) as c:
            await c.append("quiet", "x")
            async with c.watch("quiet", timeout=0.3) as w:
                t0 = time.monotonic()
                with pytest.raises(Timeout, match="no entry of 'quiet' within"):
                    await w.__anext__()
                assert 0.25 < time.monotonic() - t0 < 2
                await c.append("quiet", "y")
                assert (await w.__anext__()).payload == b"y"  # still usable after its timeout
            w2 = c.watch("quiet")

            async def forever() -> None:
                async for _ in w2:
                    pass

            task = asyncio.get_running_loop().create_task(forever())
            await asyncio.sleep(0.3)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            await w2.close()
            assert await c.ping()  # the client goes on after a cancelled watch

    run(main())


def test_both_clients_fail_over_past_a_dead_address_for_reads_and_to_the_writer(node_factory, zctx, capsys):
    n1, n2 = mesh(node_factory, 2)
    with Client(n1.address, zctx=zctx) as c1:
        c1.append("routed", "first")
    wait_for(lambda: converged([n1, n2], zctx, ["routed"]), what="replication")
    dead = f"127.0.0.1:{free_port()}"
    with Client([dead, hostport(n2)], zctx=zctx) as c:
        t0 = time.monotonic()
        assert c.head("routed").size == 1  # read at n2, past the dead first address
        assert time.monotonic() - t0 < 2
        e = c.append("routed", "via the list")  # no dedup_id: nothing was listening, so it moved on
        assert (e.seq, e.writer) == (2, "n1")  # n2 named its writer, n1
    with Client(f"{dead},{hostport(n2)}", zctx=zctx) as c:  # one string, commas
        assert c.get("routed").entries[0].payload == b"first"
    from tools import cli

    capsys.readouterr()
    assert cli.main(["--node", f"{dead},{hostport(n2)}", "--json", "append", "routed", "by the cli"]) == 0
    assert '"writer":"n1"' in capsys.readouterr().out

    async def main() -> None:
        async with AsyncClient([dead, hostport(n2)]) as ac:
            assert (await ac.head("routed")).size >= 2
            e = await ac.append("routed", "async via the list", dedup_id="a1")
            assert (e.writer, e.seq, e.payload) == ("n1", 4, b"async via the list")  # (after the cli's)
            assert await ac.append("routed", "async via the list", dedup_id="a1") == e  # exactly once
            # pipelined at a replica: what it did not take goes to the writer it names, in order
            many = [x async for x in ac.append_many("routed", [f"m{i}" for i in range(300)], window=50)]
            assert [x.seq for x in many] == list(range(5, 305)) and {x.writer for x in many} == {"n1"}

    run(main())


def test_nothing_listening_fails_in_a_fraction_of_a_second(zctx):
    dead = f"127.0.0.1:{free_port()}"
    with Client(dead, zctx=zctx, timeout=5) as c:
        t0 = time.monotonic()
        with pytest.raises(Unreachable, match="nothing listening.*connection refused"):
            c.ping()
        assert time.monotonic() - t0 < 1.0

    async def main() -> float:
        async with AsyncClient(dead, timeout=5) as ac:
            t0 = time.monotonic()
            with pytest.raises(Unreachable, match="connection refused"):
                await ac.ping()
            return time.monotonic() - t0

    assert run(main()) < 1.0


def test_a_timeout_reports_the_time_really_waited_and_never_doubles(silent_router, zctx):
    addr, _answer = silent_router  # connects, never answers
    with Client(addr, zctx=zctx, timeout=0.6, retries=1) as c:
        t0 = time.monotonic()
        with pytest.raises(Timeout) as info:
            c.get("c")
        waited = time.monotonic() - t0
    assert not isinstance(info.value, Unreachable)
    assert 0.55 < waited < 0.9  # retries included, not 2 x 0.6 s
    assert "in 0.6 s (2 attempts)" in info.value.message and info.value.details["waited"] < 0.9

    async def main() -> tuple[float, Timeout]:
        async with AsyncClient(addr, timeout=0.6, retries=1) as ac:
            t0 = time.monotonic()
            try:
                await ac.get("c")
            except Timeout as exc:
                return time.monotonic() - t0, exc
        raise AssertionError("no Timeout")

    waited, exc = run(main())
    assert 0.55 < waited < 0.9 and "in 0.6 s" in exc.message


def test_a_redirect_to_a_dead_writer_stays_within_one_timeout(silent_router, zctx):
    addr, answer = silent_router
    writer = f"127.0.0.1:{free_port()}"  # nothing there

    def not_writer(req: dict[str, Any]) -> dict[str, Any]:
        return {"v": 1, "id": req.get("id"), "ok": False,
                "error": {"code": "NOT_WRITER", "message": "ask n1", "writer": "n1", "address": writer}}

    answer(not_writer)
    with Client(addr, zctx=zctx, timeout=3) as c:
        t0 = time.monotonic()
        with pytest.raises(Timeout, match="writer"):
            c.append("c", "x", dedup_id="d")
        assert time.monotonic() - t0 < 3.3


def test_a_reply_with_a_nil_id_answers_the_oldest_waiting_request(silent_router, zctx):
    addr, answer = silent_router
    answer(lambda req: {"v": 1, "id": None, "ok": False, "error": {"code": "BAD_REQUEST", "message": "garbled"}})
    with Client(addr, zctx=zctx, timeout=3) as c:
        t0 = time.monotonic()
        with pytest.raises(BadRequest, match="garbled"):
            c.get("c")
        assert time.monotonic() - t0 < 1  # an answer, not a timeout

    async def main() -> None:
        async with AsyncClient(addr, timeout=3) as ac:
            results = await asyncio.gather(*(ac.get("c") for _ in range(5)), return_exceptions=True)
            assert all(isinstance(r, BadRequest) for r in results)

    run(main())


def test_a_stale_reply_left_queued_does_not_hide_the_next_answer(silent_router):
    """The async client stops reading replies once no request waits (a failed read costs more
    than a reply); a late duplicate left queued then must not hide the next request's reply (a
    ZeroMQ socket signals only on an empty queue turning non-empty: the next send looks)."""
    addr, answer = silent_router
    answer(lambda req: [{"v": 1, "id": req["id"], "ok": True, "node_id": "n"}] * 2)

    async def main() -> None:
        async with AsyncClient(addr, timeout=3) as ac:
            for _ in range(30):
                t0 = time.monotonic()
                assert await ac.ping() == "n"
                assert time.monotonic() - t0 < 1  # an answer, not a timeout
                await asyncio.sleep(0.002 if _ % 2 else 0)  # the duplicate before and after the next send

    run(main())


def test_the_async_client_on_uvloop(node):
    """The optional extra: the same reader callbacks, deadlines and watch on uvloop's loop."""
    uvloop = pytest.importorskip("uvloop")

    async def main() -> None:
        assert type(asyncio.get_running_loop()).__module__.startswith("uvloop")
        async with AsyncClient(node.address, timeout=5) as c:
            entries = await asyncio.gather(*(c.append("uv", f"p{i}", dedup_id=f"uv-{i}") for i in range(200)))
            assert sorted(e.seq for e in entries) == list(range(1, 201))
            assert (await c.append("uv", "p0", dedup_id="uv-0")).seq == entries[0].seq  # exactly once
            seen: list[int] = []
            async with c.watch("uv", after=0, timeout=5) as w:
                async for e in w:
                    seen.append(e.seq)
                    if len(seen) == 200:
                        break
            assert seen == list(range(1, 201))
            with pytest.raises(NotFound):
                await c.head("no-such-context-on-uvloop")

    uvloop.run(main())


def test_a_closed_client_says_so(node, zctx):
    c = Client(node.address, zctx=zctx)
    c.close()
    for use in (c.ping, lambda: c.append("c", "x"), lambda: c.submit("ping")):
        with pytest.raises(ClientClosed, match="closed"):
            use()

    async def main() -> None:
        ac = AsyncClient(node.address)
        await ac.ping()
        await ac.close()
        with pytest.raises(ClientClosed, match="closed"):
            await ac.append("c", "x")

    run(main())

    reused = AsyncClient(node.address)  # one client, two event loops one after the other
    assert run(reused.ping()) == node.node_id
    assert run(reused.ping()) == node.node_id
    reused.close_now()


def test_a_sync_watch_takes_a_timeout_too(node, zctx):
    with Client(node.address, zctx=zctx) as c:
        c.append("quiet", "x")
        with c.watch("quiet", timeout=0.3) as w:
            t0 = time.monotonic()
            with pytest.raises(Timeout, match="no entry of 'quiet' within"):
                next(w)
            assert 0.25 < time.monotonic() - t0 < 2
            c.append("quiet", "y")
            assert next(w).payload == b"y"
        with pytest.raises(BadRequest, match="positive"):
            c.watch("quiet", timeout=0)
