"""The watch scenarios: watch_latency and append_pipelined_watched in the rounds, watch_fanout alone.

The `watch` round family runs on the baseline family's async node: 10 watchers of each of two
contexts in one `_watchers` helper process (tools.bench.watchers), one stalled watcher of
WATCHED_CONTEXT in another; append_pipelined's context has none. It notes the node's and the
watchers' CPU while append_pipelined and append_pipelined_watched are timed, and checks that
every watcher delivered every entry in order. watch_fanout (1,000 watchers over 100 contexts)
runs on a node of its own (`run_fanout`).
"""

from __future__ import annotations

import os
import statistics
import time
from typing import Any

import zmq

from protocol.client import Client

from ..common import (
    FANOUT_PROCS,
    LATENCY_CONTEXT,
    PAYLOAD_SIZE,
    WATCH_RATE,
    WATCH_SCENARIOS,
    WATCHED_CONTEXT,
    WATCHERS_PER_CONTEXT,
    Sizes,
)
from ..drivers import Dealer, Sample, paced_appends, pipelined_timed, round_robin
from ..procs import Proc, start_node
from ..registry import Results, Rounds, Slice, round_family, run
from ..report import log
from ..watchers import Watchers, join_latencies, wait_watchers_counted, watch_health


@round_family("watch", lambda only: only is None or bool(only & set(WATCH_SCENARIOS)))
def watch(r: Rounds) -> None:
    sizes, payload, notes, detail = r.sizes, r.payload, r.notes, r.watch_detail
    node: Proc = r.shared["node"]
    d: Dealer = r.shared["dealer"]
    watched_size = [0]
    catchup_s: list[float] = []
    rss = {"before": node.rss_mb(), "max": 0.0}
    cpu: dict[str, dict[str, list[float]]] = {}

    def watched_req(i: int) -> dict[str, Any]:
        return {"op": "append", "context": WATCHED_CONTEXT, "key": "k", "payload": payload}

    stalled = Watchers(r.workdir, "stalled-watcher", {"address": node.address, "pub": node.pub,
                                                      "contexts": [WATCHED_CONTEXT], "per_context": 1,
                                                      "stalled": True})
    r.helpers.append(stalled)
    r.procs.append(stalled.proc)
    watchers = Watchers(r.workdir, "watchers", {"address": node.address, "pub": node.pub,
                                                "contexts": [LATENCY_CONTEXT, WATCHED_CONTEXT],
                                                "per_context": WATCHERS_PER_CONTEXT,
                                                "record": [LATENCY_CONTEXT]})
    r.helpers.append(watchers)
    r.procs.append(watchers.proc)
    wclient = Client(node.address, zctx=r.zctx, timeout=10.0)
    wait_watchers_counted(wclient, 2 * WATCHERS_PER_CONTEXT + 1, 2)

    def check_watch(name: str, rep: dict[str, Any], expected: int) -> None:
        got = sum(int(w["count"]) for w in rep["watchers"])
        health = watch_health(rep["watchers"])
        detail.setdefault(name, {}).update(health)  # cumulative counts, as of the last round
        if not rep["done"] or got != expected or health["errors"]:
            notes.append(f"{name}: watchers delivered {got} of {expected} entries (caught up: {rep['done']}, "
                         f"ordering errors: {health['errors']}) after waiting {rep['elapsed_s']:.1f} s")

    def cpu_used(name: str, fn: Slice) -> Slice:
        """`fn`, noting the CPU the node and the watchers' process used while it was timed."""
        def run() -> Sample:
            before = (node.cpu_s(), watchers.proc.cpu_s())
            sample = fn()
            c = cpu.setdefault(name, {"node": [], "watchers": []})
            c["node"].append((node.cpu_s() - before[0]) / sample.ops * 1e6)
            c["watchers"].append((watchers.proc.cpu_s() - before[1]) / sample.seconds)
            return sample
        return run

    def watch_latency() -> Sample:
        seconds, acks = paced_appends(d, LATENCY_CONTEXT, sizes.watch_appends, WATCH_RATE, payload)
        rep = watchers.wait({LATENCY_CONTEXT: max(seq for _, seq in acks)}, timeout=60)
        check_watch("watch_latency", rep, len(acks) * WATCHERS_PER_CONTEXT)
        lat = join_latencies(rep["watchers"], acks)
        detail.setdefault("watch_latency", {})["append_rate_per_s"] = round(len(acks) / seconds, 1)
        return Sample(len(lat), seconds, lat)

    def pipelined_watched() -> Sample:
        sample = cpu_used("append_pipelined_watched", lambda: d.pipelined(d.frames(sizes.pipelined, watched_req)))()
        watched_size[0] += sizes.pipelined
        rss["max"] = max(rss["max"], node.rss_mb())
        t = time.monotonic()  # from the last acknowledgement until all 10 watchers have it
        rep = watchers.wait({WATCHED_CONTEXT: watched_size[0]}, timeout=120)
        catchup_s.append(time.monotonic() - t)
        check_watch("append_pipelined_watched", rep, sizes.pipelined * WATCHERS_PER_CONTEXT)
        return sample

    def warm_up() -> None:
        d.seq(d.frames(50, lambda i: {"op": "append", "context": LATENCY_CONTEXT, "key": "k", "payload": payload}))
        d.seq(d.frames(50, watched_req))
        watched_size[0] += 50
        watchers.wait({LATENCY_CONTEXT: 50, WATCHED_CONTEXT: 50}, timeout=30)

    def finish() -> None:
        st = wclient.status()
        detail["node"] = {
            "watchers_at_end": st.get("watchers"),  # the stalled one still counted: 21
            "published_entries": st.get("published_entries"),
            "published_messages": st.get("published_messages"),
            "publish_errors": st.get("publish_errors"),
            "rss_mb_before_watch_rounds": round(rss["before"], 1),
            "rss_mb_max_after_watched_rounds": round(rss["max"], 1),
        }
        for name, c in cpu.items():
            # node: CPU microseconds per append (its own cost, whatever else runs);
            # watchers: cores the watchers' process kept busy while the appends were timed
            detail.setdefault(name, {}).update({
                "node_cpu_us_per_append": round(statistics.median(c["node"]), 1),
                "watchers_cpu_cores": round(statistics.median(c["watchers"]), 2)})
        if catchup_s:
            detail.setdefault("append_pipelined_watched", {})["catchup_s_median"] = round(
                statistics.median(catchup_s), 3)
            detail["append_pipelined_watched"]["catchup_s_per_round"] = [round(x, 3) for x in catchup_s]
        wclient.close()

    r.wrap("append_pipelined", cpu_used)
    r.add("watch_latency", watch_latency)
    r.add("append_pipelined_watched", pipelined_watched)
    r.warmups.append(warm_up)
    r.finishers.append(finish)


def run_fanout(sizes: Sizes, workdir: str, quiet: bool) -> tuple[list[Sample], dict[str, Any]]:
    """1,000 watchers over 100 contexts on a node of its own, a few rounds of appends to all of them.

    Each round appends `fanout_entries` entries to every context (pipelined, round-robin over
    the contexts) and waits until every watcher has delivered them. A round's sample counts
    deliveries (entry x watcher) from the first append sent to the last delivery; its latencies
    run from each append's submission to each watcher's receipt. Complete: every watcher
    delivered exactly the entries of its context, each once, in seq order, in every round.
    """
    contexts = [f"fan-{i:03d}" for i in range(sizes.fanout_contexts)]
    n_watchers = len(contexts) * WATCHERS_PER_CONTEXT
    payload = os.urandom(PAYLOAD_SIZE)
    zctx: zmq.Context[Any] = zmq.Context()
    helpers: list[Watchers] = []
    samples: list[Sample] = []
    detail: dict[str, Any] = {"watchers": n_watchers, "contexts": len(contexts),
                              "entries_per_context_per_round": sizes.fanout_entries, "processes": FANOUT_PROCS}
    node, _ = start_node(os.path.join(workdir, "fanout"))
    try:
        t = time.monotonic()
        for i in range(FANOUT_PROCS):
            group = contexts[i::FANOUT_PROCS]
            if group:
                helpers.append(Watchers(workdir, f"fanout-watchers-{i}", {
                    "address": node.address, "pub": node.pub, "contexts": group,
                    "per_context": WATCHERS_PER_CONTEXT, "after": 0, "record": group}))
        client = Client(node.address, zctx=zctx, timeout=10.0)
        wait_watchers_counted(client, n_watchers, len(contexts))
        detail["setup_s"] = round(time.monotonic() - t, 2)
        log(f"watch_fanout: {n_watchers} watchers of {len(contexts)} contexts subscribed in {detail['setup_s']} s",
            quiet)
        d = Dealer(zctx, node.address)
        complete = True
        delivered = 0
        for r in range(sizes.rounds):
            frames = d.frames(len(contexts) * sizes.fanout_entries, round_robin(contexts, d.next_id, payload))
            t0 = time.monotonic_ns()
            _, submits = pipelined_timed(d, frames, at="submit")
            until = {c: (r + 1) * sizes.fanout_entries for c in contexts}
            for h in helpers:
                h.request({c: until[c] for c in contexts if c in h.contexts}, timeout=120)
            reports: list[dict[str, Any]] = []
            done = True
            for h in helpers:
                a = h.answer()
                done = done and bool(a["done"])
                reports += a["watchers"]
            got = sum(int(w["count"]) for w in reports)
            health = watch_health(reports)
            ok = (done and len(reports) == n_watchers and got == n_watchers * sizes.fanout_entries
                  and health["errors"] == 0 and all(w["last"] == until[w["context"]] for w in reports))
            complete = complete and ok
            delivered += got
            last_ns = max((int(w["last_ns"]) for w in reports if w["last_ns"]), default=t0)
            samples.append(Sample(got, max(last_ns - t0, 1) / 1e9, join_latencies(reports, submits)))
            detail.update(health)  # cumulative over the rounds
            log(f"watch_fanout round {r + 1}/{sizes.rounds}: {got:,} deliveries at "
                f"{samples[-1].ops_per_s:,.0f}/s, complete: {ok}", quiet)
        detail["complete"] = complete
        detail["deliveries"] = delivered
        detail["per_round_ops_per_s"] = [round(x.ops_per_s, 1) for x in samples]
        d.close()
        client.close()
    finally:
        for h in helpers:
            h.stop()
        node.stop()
        zctx.destroy(linger=0)
    return samples, detail


@run("watch_fanout", lambda only: only is None or "watch_fanout" in only)
def _fanout(sizes: Sizes, workdir: str, quiet: bool, only: set[str] | None, res: Results) -> None:
    res.samples["watch_fanout"], res.watch["watch_fanout"] = run_fanout(sizes, workdir, quiet)
