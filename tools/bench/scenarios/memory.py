"""memory: a node's RSS with many entries in many contexts, and its restart-to-serving time."""

from __future__ import annotations

import os
import sys
import time
from typing import Any

import msgpack
import zmq

from ..common import BATCH, PAYLOAD_SIZE, Sizes
from ..drivers import Dealer
from ..procs import start_node
from ..registry import Results, run


@run("memory", lambda only: not only or "memory" in only)
def _memory(sizes: Sizes, workdir: str, quiet: bool, only: set[str] | None, res: Results) -> None:
    res.memory = run_memory(sizes, workdir, quiet)


def run_memory(sizes: Sizes, workdir: str, quiet: bool) -> dict[str, Any]:
    """RSS with many entries in many contexts, then restart-to-serving time."""
    data = os.path.join(workdir, "memory")
    zctx: zmq.Context[Any] = zmq.Context()
    payload = os.urandom(PAYLOAD_SIZE)
    per_ctx = sizes.memory_entries // sizes.memory_contexts
    node, _ = start_node(data)
    try:
        d = Dealer(zctx, node.address)
        t0 = time.monotonic()
        step = min(per_ctx, BATCH)
        frames: list[bytes] = []
        for c in range(sizes.memory_contexts):
            for _ in range(0, per_ctx, step):
                frames.append(msgpack.packb({"v": 1, "id": len(frames) + 1, "op": "append_batch",
                                             "context": f"ctx-{c:05d}",
                                             "entries": [{"key": "k", "payload": payload}] * step},
                                            use_bin_type=True))
        for i in range(0, len(frames), 50):
            d.pipelined(frames[i:i + 50], window=8, count_per_reply=step)
            if not quiet and i % 200 == 0:
                print(f"\rmemory: {min(i + 50, len(frames)) * step:,} / {sizes.memory_entries:,} entries",
                      end="", file=sys.stderr, flush=True)
        fill_s = time.monotonic() - t0
        if not quiet:
            print(file=sys.stderr)
        time.sleep(0.5)
        rss = node.rss_mb()
        d.close()
    finally:
        node.stop()
    node2, ready_s = start_node(data)
    try:
        d = Dealer(zctx, node2.address)
        t = time.monotonic()
        d.seq(d.frames(1, lambda i: {"op": "get", "context": "ctx-00000", "after": per_ctx - 1, "limit": 1}))
        first_read_s = time.monotonic() - t
        rss_after = node2.rss_mb()
        d.close()
    finally:
        node2.stop()
        zctx.term()
    return {
        "entries": sizes.memory_entries,
        "contexts": sizes.memory_contexts,
        "fill_s": round(fill_s, 2),
        "rss_mb": round(rss, 1),
        "restart_s": round(ready_s + first_read_s, 3),
        "rss_after_restart_mb": round(rss_after, 1),
    }
