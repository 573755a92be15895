"""steady_rate (issue #17): what busy-polling costs a node whose client sends at a steady pace.

One client appends one 256-byte entry at a time on a fixed schedule (200, 1,000 and 2,000 per
second, `Sizes.steady_seconds` each) to a node with the default settings, one with
`--busy-poll-us 0` (off) and one with `--busy-poll-us 500` (on, with the default CPU budget),
alternating (the order reverses every round), after the machine settles. For each it notes the node's CPU over the run (user + system from
/proc/PID/stat, in percent of one core) and the append's p50 latency, and the node's own
`status.busy_poll` (share of a core spent spinning over the last second, budget run-outs).
Medians over `Sizes.steady_rounds` rounds. Only when named (`--only steady_rate`): it takes
about a minute and a half with the default sizes (3 rounds of 3 s).
"""

from __future__ import annotations

import os
import statistics
import time
from collections.abc import Sequence
from typing import Any

import msgpack
import zmq

from ..common import PAYLOAD_SIZE, STEADY_CPU_RATIO_MAX, Sizes
from ..drivers import Dealer
from ..machine import settle
from ..procs import Proc, start_node
from ..registry import Results, run
from ..report import log, pct

# (name, ledger-node flags); the target is about the first against the second; the third shows
# what turning busy-polling on (with its default CPU budget) costs and gains
VARIANTS: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("default", ()), ("off", ("--busy-poll-us", "0")), ("on_500us", ("--busy-poll-us", "500")),
)


@run("steady_rate", lambda only: bool(only and "steady_rate" in only))  # only when named
def _steady(sizes: Sizes, workdir: str, quiet: bool, only: set[str] | None, res: Results) -> None:
    res.steady = run_steady(sizes.steady_rates, sizes.steady_seconds, sizes.steady_rounds, VARIANTS, workdir, quiet)


def paced(d: Dealer, rate: float, seconds: float, payload: bytes) -> list[float]:
    """Appends one at a time, started every 1/rate s for `seconds`; each one's latency (s).
    A request that would start late (the previous reply came after its time) starts at once."""
    n = max(1, int(rate * seconds))
    frames = d.frames(n, lambda i: {"op": "append", "context": "steady", "key": "k", "payload": payload})
    s = d.s
    pc = time.perf_counter
    step = 1.0 / rate
    lat = []
    t0 = pc()
    for i, f in enumerate(frames):
        wait = t0 + i * step - pc()
        if wait > 0:
            time.sleep(wait)
        t = pc()
        s.send(f)
        reply = s.recv()
        lat.append(pc() - t)
        if b"\xa2ok\xc3" not in reply:
            raise RuntimeError(f"append failed: {msgpack.unpackb(reply)}")
    return lat


def busy_status(d: Dealer) -> dict[str, Any]:
    reply = msgpack.unpackb(d.request({"op": "status"}))
    bp: dict[str, Any] = reply.get("busy_poll", {})
    return bp


def measure(node: Proc, d: Dealer, rate: float, seconds: float, payload: bytes) -> dict[str, Any]:
    before = busy_status(d)
    paced(d, rate, min(0.2, seconds / 4), payload)  # the client's and the node's caches, the pace
    cpu0, t0 = node.cpu_s(), time.monotonic()
    lat = paced(d, rate, seconds, payload)
    cpu1, t1 = node.cpu_s(), time.monotonic()
    after = busy_status(d)  # (spent_pct_last_s: the last second of the run)
    return {
        "cpu_pct": round(100 * (cpu1 - cpu0) / (t1 - t0), 1),
        "p50_us": round(pct(lat, 0.5) * 1e6, 1),
        "p99_us": round(pct(lat, 0.99) * 1e6, 1),
        "achieved_per_s": round(len(lat) / (t1 - t0), 1),
        "spin_pct_last_s": after.get("spent_pct_last_s"),
        "budget_runouts": after.get("budget_runouts", 0) - before.get("budget_runouts", 0),
    }


def run_steady(rates: Sequence[int], seconds: float, rounds: int, variants: Sequence[tuple[str, Sequence[str]]],
               workdir: str, quiet: bool) -> dict[str, Any]:
    """Each rate on each variant's node, `rounds` times, variants alternating; the medians and
    every round's figures: {"rates": [...], "variants": {name: {rate: {...}}}, "cpu_ratio": ...}."""
    zctx: zmq.Context[Any] = zmq.Context()
    payload = os.urandom(PAYLOAD_SIZE)
    procs: list[Proc] = []
    runs: dict[str, dict[int, list[dict[str, Any]]]] = {name: {r: [] for r in rates} for name, _ in variants}
    try:
        dealers = []
        for name, flags in variants:
            node, _ = start_node(os.path.join(workdir, f"steady-{name}"), *flags, name=f"steady-{name}")
            procs.append(node)
            dealers.append(Dealer(zctx, node.address))
        for i in range(rounds):
            for rate in rates:
                order = list(range(len(variants)))
                if i % 2:
                    order.reverse()
                for k in order:
                    settle()
                    m = measure(procs[k], dealers[k], rate, seconds, payload)
                    runs[variants[k][0]][rate].append(m)
                    log(f"steady_rate round {i + 1}/{rounds}: {rate}/s {variants[k][0]}: node CPU {m['cpu_pct']}%, "
                        f"p50 {m['p50_us']} us", quiet)
        for d in dealers:
            d.close()
    finally:
        for p in procs:
            p.stop()
        zctx.destroy(linger=0)
    out: dict[str, Any] = {"rates": list(rates), "seconds": seconds, "rounds": rounds,
                           "variants": {name: list(flags) for name, flags in variants}, "results": {}}
    for name, _ in variants:
        out["results"][name] = {str(rate): {
            "cpu_pct": round(statistics.median(m["cpu_pct"] for m in ms), 1),
            "p50_us": round(statistics.median(m["p50_us"] for m in ms), 1),
            "achieved_per_s": round(statistics.median(m["achieved_per_s"] for m in ms), 1),
            "budget_runouts": sum(m["budget_runouts"] for m in ms),
            "per_round": ms,
        } for rate, ms in runs[name].items()}
    if len(variants) >= 2:
        a, b = variants[0][0], variants[1][0]
        top = str(max(rates))
        ra, rb = out["results"][a][top], out["results"][b][top]
        ratio = ra["cpu_pct"] / rb["cpu_pct"] if rb["cpu_pct"] else float("nan")
        out["cpu_ratio"] = {"name": f"steady_{top}_cpu_{a}_vs_{b}", "value": round(ratio, 3),
                            "target": f"<= {STEADY_CPU_RATIO_MAX}", "met": ratio <= STEADY_CPU_RATIO_MAX}
    return out
