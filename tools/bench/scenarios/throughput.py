"""The throughput round families: the ledger against the bare pyzmq echo server, and Redis Streams.

`baseline` starts the echo server, a ledger-node in the default (async) durability and one in
`--durability sync`, fills a context to read back, and adds raw_echo_seq/pipelined,
append_seq/pipelined/batch, append_sync_pipelined, get_one and get_tail100. It leaves the async
node and its DEALER in `Rounds.shared` ("node", "dealer") for the watch and mesh families.
`redis` adds the three redis_xadd scenarios when redis-server and redis-py are there, and a
note saying why they were skipped when not.
"""

from __future__ import annotations

import os
import random
import shutil
from collections.abc import Callable
from typing import Any

from ..common import BATCH
from ..drivers import Dealer, redis_pipelined, redis_seq
from ..procs import start_echo, start_node, start_redis
from ..registry import Rounds, round_family


def append_request(payload: bytes, context: str = "bench") -> dict[str, Any]:
    """One append of `payload` (the echo server decodes the same request)."""
    return {"op": "append", "context": context, "key": "k", "payload": payload}


def fill_reads(d: Dealer, gets: int, payload: bytes, rng: random.Random) -> tuple[int, Callable[[int], dict[str, Any]]]:
    """Fill the context `reads` for get_one (and get_tail100); its size, and get_one's request
    maker: one entry among the 1,000 most recent."""
    pre = d.frames(max(20, gets // 10), lambda i: {"op": "append_batch", "context": "reads",
                                                   "entries": [{"key": "k", "payload": payload}] * 100})
    d.pipelined(pre, window=10)
    reads_size = len(pre) * 100
    recent = max(1, min(reads_size, 1000))

    def get_one(i: int) -> dict[str, Any]:
        return {"op": "get", "context": "reads", "after": reads_size - rng.randrange(recent) - 1, "limit": 1}

    return reads_size, get_one


@round_family("baseline")
def baseline(r: Rounds) -> None:
    sizes, payload, rng = r.sizes, r.payload, r.rng
    echo = start_echo(r.workdir)
    r.procs.append(echo)
    node, _ = start_node(os.path.join(r.workdir, "async"))
    r.procs.append(node)
    snode, _ = start_node(os.path.join(r.workdir, "sync"), "--durability", "sync")
    r.procs.append(snode)
    e = Dealer(r.zctx, echo.address)
    d = Dealer(r.zctx, node.address)
    sd = Dealer(r.zctx, snode.address)
    r.shared.update(node=node, dealer=d)

    def echo_req(i: int) -> dict[str, Any]:
        return append_request(payload)

    def append_req(i: int) -> dict[str, Any]:
        return append_request(payload)

    def batch_req(i: int) -> dict[str, Any]:
        return {"op": "append_batch", "context": "batch",
                "entries": [{"key": "k", "payload": payload} for _ in range(BATCH)]}

    reads_size, get_one = fill_reads(d, sizes.gets, payload, rng)

    def get_tail(i: int) -> dict[str, Any]:
        return {"op": "get", "context": "reads", "after": reads_size - 100, "limit": 100}

    r.add("raw_echo_seq", lambda: e.seq(e.frames(sizes.seq, echo_req)))
    r.add("append_seq", lambda: d.seq(d.frames(sizes.seq, append_req)))
    r.add("raw_echo_pipelined", lambda: e.pipelined(e.frames(sizes.pipelined, echo_req)))
    r.add("append_pipelined", lambda: d.pipelined(d.frames(sizes.pipelined, append_req)))
    r.add("append_batch", lambda: d.pipelined(d.frames(sizes.batches, batch_req), window=4, count_per_reply=BATCH))
    r.add("append_sync_pipelined", lambda: sd.pipelined(sd.frames(sizes.sync_pipelined, append_req)))
    r.add("get_one", lambda: d.seq(d.frames(sizes.gets, get_one)))
    r.add("get_tail100", lambda: d.seq(d.frames(sizes.gets, get_tail)))

    def warm_up() -> None:
        e.seq(e.frames(50, echo_req))
        d.seq(d.frames(50, append_req))

    def close() -> None:
        for dealer in (e, d, sd):
            dealer.close()

    r.warmups.append(warm_up)
    r.finishers.append(close)


@round_family("redis")
def redis_streams(r: Rounds) -> None:
    if not shutil.which("redis-server"):
        r.notes.append("redis-server not on PATH: Redis scenarios skipped (apt-get install redis-server)")
        return
    try:
        import redis
    except ImportError:
        r.notes.append("redis-py not installed: Redis scenarios skipped (pip install redis)")
        return
    redis_plain = start_redis(r.workdir, fsync=False)
    redis_fsync = start_redis(r.workdir, fsync=True)
    r.procs.extend(p for p in (redis_plain, redis_fsync) if p)
    if not (redis_plain and redis_fsync):
        return
    rc = redis.Redis(host="127.0.0.1", port=int(redis_plain.address))
    rf = redis.Redis(host="127.0.0.1", port=int(redis_fsync.address))
    sizes, payload = r.sizes, r.payload
    r.add("redis_xadd_seq", lambda: redis_seq(rc, sizes.seq, payload))
    r.add("redis_xadd_pipelined", lambda: redis_pipelined(rc, sizes.pipelined, payload))
    r.add("redis_xadd_fsync_pipelined", lambda: redis_pipelined(rf, sizes.sync_pipelined, payload))

    def close() -> None:
        rc.close()
        rf.close()

    r.finishers.append(close)
