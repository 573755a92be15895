"""The mesh scenarios: replication_lag and append_pipelined_replicated in the rounds, catch_up and
heartbeat_bytes_10k alone.

`MeshScenarios` owns the rounds' 3-node mesh (tools.bench.mesh.BenchMesh) and both of its
scenarios; the `mesh` round family starts it beside the baseline family's standalone node and
notes that node's CPU per append while append_pipelined is timed. `run_catch_up` and
`run_heartbeat` each start a mesh of their own.
"""

from __future__ import annotations

import os
import random
import statistics
import time
from collections.abc import Callable
from typing import Any

import zmq

from ..common import BATCH, MESH_SCENARIOS, PAYLOAD_SIZE, WINDOW, Sizes
from ..drivers import Dealer, Sample, pipelined_timed, round_robin
from ..machine import machine_cpu
from ..mesh import CATCHUP_CONTEXT, LAG_CONTEXT, MESH_HEARTBEAT_MS, POLL_S, REPLICATED_CONTEXT, BenchMesh
from ..procs import Proc
from ..registry import Results, Rounds, Slice, round_family, run
from ..report import log, pct
from ..watchers import Watchers, wait_watchers_counted, watch_health


class MeshScenarios:
    """replication_lag and append_pipelined_replicated, on one 3-node mesh (a writer, 2 followers).

    Both drive the writer with pipelined appends (WINDOW in flight) from this process, on a DEALER
    of their own. replication_lag appends to LAG_CONTEXT, which one `_watchers` helper process
    watches on both followers (one Client.watch on each): it records when each follower's watcher
    received each seq, this process when the appender read each acknowledgement, both on
    CLOCK_MONOTONIC; the lag is their difference, so nothing is added to the writer's work.
    append_pipelined_replicated is append_pipelined on the writer (no watcher of its context
    anywhere); after each sample it waits, untimed, until both followers hold everything, so no
    scenario starts while they still apply entries.
    """

    def __init__(self, sizes: Sizes, workdir: str, zctx: zmq.Context[Any], payload: bytes, standalone: Proc,
                 notes: list[str], quiet: bool) -> None:
        self.sizes = sizes
        self.workdir = workdir
        self.zctx = zctx
        self.payload = payload
        self.standalone = standalone
        self.notes = notes
        self.quiet = quiet
        self.mesh: BenchMesh | None = None
        self.watchers: Watchers | None = None
        self.dealer: Dealer | None = None
        self.size = {LAG_CONTEXT: 0, REPLICATED_CONTEXT: 0}
        self.lag_by_follower: dict[str, list[float]] = {}
        self.before_ack = 0  # receipts at a follower before the appender had read the acknowledgement
        self.lag_missing = 0
        self.lag_rate: list[float] = []
        self.lag_by_tenth: list[list[float]] = [[] for _ in range(10)]  # by position in the round's burst
        self.followers_done_s: list[float] = []
        self.cpu: dict[str, dict[str, list[float]]] = {}
        self.detail: dict[str, Any] = {}

    def _req(self, context: str) -> Callable[[int], dict[str, Any]]:
        payload = self.payload
        return lambda i: {"op": "append", "context": context, "key": "k", "payload": payload}

    def start(self) -> None:
        t = time.monotonic()
        self.mesh = mesh = BenchMesh(self.workdir, "mesh", 3, self.zctx)
        mesh.wait_formed()
        self.dealer = d = Dealer(self.zctx, mesh.writer.proc.address)
        # warm-up: the writer creates both contexts; both followers hold them before anything is timed
        for c in (LAG_CONTEXT, REPLICATED_CONTEXT):
            d.seq(d.frames(50, self._req(c)))
            self.size[c] = 50
            mesh.wait_holds(c, 50)
        followers = mesh.members[1:]
        self.watchers = Watchers(self.workdir, "lag-watchers", {
            "nodes": [{"address": m.proc.address, "pub": m.proc.pub, "label": m.node_id} for m in followers],
            "contexts": [LAG_CONTEXT], "per_context": 1, "record": [LAG_CONTEXT]})
        for i in range(1, len(mesh.members)):
            wait_watchers_counted(mesh.client(i), 1, 1)
        self.detail["setup_s"] = round(time.monotonic() - t, 2)
        log(f"mesh: 3 nodes formed, lag watchers on {len(followers)} followers in {self.detail['setup_s']} s",
            self.quiet)

    def _cpu(self) -> list[float]:
        assert self.mesh is not None
        return [m.proc.cpu_s() for m in self.mesh.members]

    def measure_standalone(self, fn: Callable[[], Sample]) -> Callable[[], Sample]:
        """`fn` (append_pipelined on the standalone node), noting the node's CPU per append."""
        def run() -> Sample:
            before, mb = self.standalone.cpu_s(), machine_cpu()[0]
            sample = fn()
            c = self.cpu.setdefault("append_pipelined", {})
            c.setdefault("node_cpu_us_per_append", []).append((self.standalone.cpu_s() - before) / sample.ops * 1e6)
            c.setdefault("machine_busy_cores", []).append((machine_cpu()[0] - mb) / sample.seconds)
            return sample
        return run

    def replication_lag(self) -> Sample:
        assert self.dealer is not None and self.watchers is not None
        d, n = self.dealer, self.sizes.pipelined
        frames = d.frames(n, self._req(LAG_CONTEXT))
        first_seq = self.size[LAG_CONTEXT] + 1
        cpu0, m0, w0 = self._cpu(), machine_cpu()[0], self.watchers.proc.cpu_s()
        t0 = time.monotonic_ns()
        appended, acks = pipelined_timed(d, frames, at="ack")
        self.lag_rate.append(appended.ops_per_s)
        self.size[LAG_CONTEXT] += n
        rep = self.watchers.wait({LAG_CONTEXT: self.size[LAG_CONTEXT]}, timeout=120)
        wall = (time.monotonic_ns() - t0) / 1e9
        cpu1, m1, w1 = self._cpu(), machine_cpu()[0], self.watchers.proc.cpu_s()
        c = self.cpu.setdefault("replication_lag", {})
        c.setdefault("writer_cpu_cores", []).append((cpu1[0] - cpu0[0]) / wall)
        c.setdefault("followers_cpu_cores", []).append((sum(cpu1[1:]) - sum(cpu0[1:])) / wall)
        c.setdefault("watchers_cpu_cores", []).append((w1 - w0) / wall)
        c.setdefault("machine_busy_cores", []).append((m1 - m0) / wall)
        reports = rep["watchers"]
        got = sum(int(w["count"]) for w in reports)
        health = watch_health(reports)
        if not rep["done"] or got != n * len(reports) or health["errors"]:
            self.lag_missing += n * len(reports) - got
            self.notes.append(f"replication_lag: the followers' watchers delivered {got} of {n * len(reports)} "
                              f"entries (caught up: {rep['done']}, ordering errors: {health['errors']})")
        lat: list[float] = []
        for w in reports:
            mine = self.lag_by_follower.setdefault(str(w["node"]), [])
            for seq, t in w["times"]:
                a = acks.get((LAG_CONTEXT, seq))
                if a is None:
                    continue
                x = (t - a) / 1e9
                if x < 0:  # the follower had it before the (busy) appender read its acknowledgement
                    self.before_ack += 1
                    x = 0.0
                lat.append(x)
                mine.append(x)
                self.lag_by_tenth[min(9, (seq - first_seq) * 10 // n)].append(x)
        last_ns = max((int(w["last_ns"]) for w in reports if w["last_ns"]), default=t0 + 1)
        return Sample(n, (last_ns - t0) / 1e9, lat)

    def append_pipelined_replicated(self) -> Sample:
        assert self.dealer is not None and self.mesh is not None
        d, n, mesh = self.dealer, self.sizes.pipelined, self.mesh
        frames = d.frames(n, self._req(REPLICATED_CONTEXT))
        before, mb = self._cpu(), machine_cpu()[0]
        sample = d.pipelined(frames)
        timed, mt = self._cpu(), machine_cpu()[0]
        self.size[REPLICATED_CONTEXT] += n
        t = time.monotonic()  # from the last acknowledgement until both followers hold it all
        mesh.wait_holds(REPLICATED_CONTEXT, self.size[REPLICATED_CONTEXT], timeout=120)
        self.followers_done_s.append(time.monotonic() - t)
        end = self._cpu()
        c = self.cpu.setdefault("append_pipelined_replicated", {})
        c.setdefault("writer_cpu_us_per_append", []).append((timed[0] - before[0]) / n * 1e6)
        c.setdefault("machine_busy_cores", []).append((mt - mb) / sample.seconds)
        c.setdefault("followers_cpu_cores", []).append((sum(timed[1:]) - sum(before[1:])) / sample.seconds)
        # each follower's whole cost per entry, until it held everything
        c.setdefault("follower_cpu_us_per_entry", []).extend(
            (e - b) / n * 1e6 for e, b in zip(end[1:], before[1:], strict=True))
        c.setdefault("writer_cpu_us_per_append_until_replicated", []).append((end[0] - before[0]) / n * 1e6)
        return sample

    def report(self) -> dict[str, Any]:
        assert self.mesh is not None
        mesh = self.mesh
        out = dict(self.detail)
        lag: dict[str, Any] = {"followers": len(mesh.members) - 1, "window": WINDOW,
                               "received_before_ack": self.before_ack, "missing": self.lag_missing}
        if self.lag_rate:
            lag["append_rate_per_s_median"] = round(statistics.median(self.lag_rate), 1)
        for f, xs in self.lag_by_follower.items():
            lag[f] = {"p50_ms": round(pct(xs, 0.5) * 1e3, 2), "p99_ms": round(pct(xs, 0.99) * 1e3, 2),
                      "max_ms": round(max(xs, default=float("nan")) * 1e3, 2), "n": len(xs)}
        if self.lag_rate:
            # a lag that grows from the first tenth of a burst to the last is a backlog at the followers
            lag["p50_ms_by_tenth_of_burst"] = [round(pct(xs, 0.5) * 1e3, 1) for xs in self.lag_by_tenth]
            out["replication_lag"] = lag
        rep: dict[str, Any] = {}
        if self.followers_done_s:
            rep["followers_done_after_s_median"] = round(statistics.median(self.followers_done_s), 3)
            rep["followers_done_after_s_per_round"] = [round(x, 3) for x in self.followers_done_s]
        if rep:
            out["append_pipelined_replicated"] = rep
        for name, c in self.cpu.items():
            d = out.setdefault(name, {})
            for k, v in c.items():
                d[k] = round(statistics.median(v), 2)
        solo = out.get("append_pipelined", {}).get("node_cpu_us_per_append")
        writer = out.get("append_pipelined_replicated", {}).get("writer_cpu_us_per_append")
        if solo and writer:
            # what the ratio could reach if the writer had a core to itself and the followers others
            out["append_pipelined_replicated"]["writer_bound_ratio"] = round(solo / writer, 3)
        nodes = []
        for i, m in enumerate(mesh.members):
            st = mesh.status(i)
            r = st.get("replication", {})
            nodes.append({"id": m.node_id, "role": "writer" if i == 0 else "follower",
                          "entries": st.get("entries"), "pushed_entries": r.get("pushed_entries"),
                          "pulled_entries": r.get("pulled_entries"), "pulled_bytes": r.get("pulled_bytes"),
                          "published_messages": st.get("published_messages"), "forks": len(st.get("forks", [])),
                          "backpressure_waits": st.get("backpressure_waits"),
                          "write_batches": st.get("write_batches"), "gap_pulls": r.get("gap_pulls"),
                          "held_push_entries": r.get("held_push_entries"),
                          "rss_mb": round(m.proc.rss_mb(), 1)})
        out["nodes"] = nodes
        problems = mesh.log_problems()
        if problems:
            out["node_log_problems"] = problems
            self.notes.append(f"mesh nodes logged {len(problems)} warning(s)/error(s): see mesh.node_log_problems")
        return out

    def stop(self) -> None:
        if self.watchers is not None:
            self.watchers.stop()
        if self.dealer is not None:
            self.dealer.close()
        if self.mesh is not None:
            self.mesh.stop()


def _stop(d: Dealer | None, mesh: BenchMesh | None, zctx: zmq.Context[Any]) -> None:
    """The end of a mesh of its own (catch_up, heartbeat_bytes_10k): its driver, its nodes, the context."""
    if d is not None:
        d.close()
    if mesh is not None:
        mesh.stop()
    zctx.destroy(linger=0)


def run_catch_up(sizes: Sizes, workdir: str, quiet: bool) -> tuple[list[Sample], dict[str, Any]]:
    """A follower of a 3-node mesh is killed (-9) and misses `catch_up_entries` entries of one context.

    Each round: wait until the follower has everything on disk, kill -9 it, append the entries to
    the writer in batches of BATCH (pipelined, 4 in flight), wait (untimed) until the other follower
    holds them too, restart the killed one on its own ports and data, and time from the restart (the
    process's start) until its head (size and root) equals the writer's. A sample's ops are the
    missing entries and its one latency is that time; `first_entry_s` is when its head first moved
    (the repair starts at the next heartbeat from a peer). The follower's status then says how the
    entries came: `pulled_entries` should be the missing count, `pulled_bytes` about that many entries.
    """
    zctx: zmq.Context[Any] = zmq.Context()
    payload = os.urandom(PAYLOAD_SIZE)
    samples: list[Sample] = []
    rounds: list[dict[str, Any]] = []
    notes: list[str] = []
    mesh: BenchMesh | None = None
    d: Dealer | None = None
    n = max(BATCH, sizes.catch_up_entries // BATCH * BATCH)
    try:
        mesh = BenchMesh(workdir, "catchup", 3, zctx)
        mesh.wait_formed()
        d = Dealer(zctx, mesh.writer.proc.address)

        def batch(i: int) -> dict[str, Any]:
            return {"op": "append_batch", "context": CATCHUP_CONTEXT,
                    "entries": [{"key": "k", "payload": payload}] * BATCH}

        d.seq(d.frames(1, batch))
        size = BATCH
        mesh.wait_holds(CATCHUP_CONTEXT, size)
        # what one entry costs in a pull reply (a snapshot page of BATCH entries): pulled_bytes
        # well above missing x this means the same entries were pulled more than once
        page = d.request({"op": "snapshot", "context": CATCHUP_CONTEXT, "after": 0, "limit": BATCH})
        entry_bytes = len(page) / BATCH
        victim = 1
        for r in range(sizes.rounds):
            # everything it holds is on disk: the kill takes nothing it had acknowledged to the writer
            mesh.wait_holds(CATCHUP_CONTEXT, size)
            mesh.wait_flushed(victim)
            had = mesh.head(victim, CATCHUP_CONTEXT)
            assert had is not None
            mesh.kill(victim)
            t = time.monotonic()
            d.pipelined(d.frames(n // BATCH, batch), window=4, count_per_reply=BATCH)
            append_s = time.monotonic() - t
            size += n
            others = [i for i in range(len(mesh.members)) if i != victim]
            mesh.wait_holds(CATCHUP_CONTEXT, size, others)
            want = mesh.head(0, CATCHUP_CONTEXT)
            cpu0 = {i: m.proc.cpu_s() for i, m in enumerate(mesh.members) if i != victim}
            t0 = time.monotonic()
            ready_s = mesh.restart(victim)
            first = 0.0
            while True:
                h = mesh.head(victim, CATCHUP_CONTEXT)
                now = time.monotonic() - t0
                if h == want:
                    break
                if not first and h is not None and h[0] > had[0]:
                    first = now
                if now > 300:
                    raise RuntimeError(f"catch_up: the restarted follower holds {h and h[0]} of {size} entries "
                                       "after 300 s")
                time.sleep(POLL_S)
            catchup_s = time.monotonic() - t0
            # CPU per caught-up entry: the restarted follower (since its start) and each other node
            cpu = {m.node_id: round(((m.proc.cpu_s() - cpu0[i]) if i != victim else m.proc.cpu_s()) / n * 1e6, 1)
                   for i, m in enumerate(mesh.members)}
            first = first or catchup_s
            st = mesh.status(victim)
            rep = st["replication"]
            samples.append(Sample(n, catchup_s, [catchup_s]))
            by_peer = {p["id"] or p["address"]: p["pulled_entries"] for p in st["peers"]}
            rounds.append({
                "missing": n, "append_s": round(append_s, 2), "ready_s": round(ready_s, 3),
                "first_entry_s": round(first, 3), "catch_up_s": round(catchup_s, 3),
                "entries_per_s": round(n / catchup_s, 1),
                # the rate once entries flow (the first chunk's arrival is when the head first moves)
                "entries_per_s_after_first": round(n / (catchup_s - first), 1) if catchup_s > first else None,
                "pulled_entries": rep["pulled_entries"], "pushed_entries": rep["pushed_entries"],
                "pulled_bytes": rep["pulled_bytes"], "pulled_bytes_per_entry": round(rep["pulled_bytes"] / n, 1),
                "pulled_bytes_vs_missing": round(rep["pulled_bytes"] / (n * entry_bytes), 2),
                "pulled_from": by_peer, "cpu_us_per_entry": cpu,
            })
            if abs(rep["pulled_entries"] + rep["pushed_entries"] - n) > n // 100:
                notes.append(f"catch_up round {r + 1}: the follower pulled {rep['pulled_entries']} and was pushed "
                             f"{rep['pushed_entries']} entries, missing {n}")
            log(f"catch_up round {r + 1}/{sizes.rounds}: {n:,} entries in {catchup_s:.2f} s "
                f"({n / catchup_s:,.0f}/s; first entry after {first:.2f} s, ready after {ready_s:.2f} s), "
                f"pulled {rep['pulled_entries']:,} entries / {rep['pulled_bytes']:,} bytes from {by_peer}", quiet)
        detail: dict[str, Any] = {"context": CATCHUP_CONTEXT, "nodes": len(mesh.members), "missing_per_round": n,
                                  "heartbeat_ms": MESH_HEARTBEAT_MS, "entry_bytes_in_a_pull": round(entry_bytes, 1),
                                  "rounds": rounds, "equal_heads": True, "notes": notes}
        for k in ("catch_up_s", "first_entry_s", "ready_s", "entries_per_s_after_first", "pulled_bytes_per_entry",
                  "pulled_bytes_vs_missing"):
            vals = [x[k] for x in rounds if x[k] is not None]
            detail[f"{k}_median"] = round(statistics.median(vals), 3) if vals else None
        problems = mesh.log_problems(limit=100)
        if problems:
            # the killed follower is dead to its peers while it is down: expected; anything else is not
            victim_id = mesh.members[victim].node_id
            unexpected = [x for x in problems if f" peer {victim_id} " not in x]
            detail["node_log_problems"] = (unexpected + [x for x in problems if x not in unexpected])[:20]
            detail["live_peers_declared_dead"] = sum(1 for x in unexpected if " is dead " in x)
            if unexpected:
                notes.append(f"catch_up: the mesh nodes logged {len(unexpected)} warning(s)/error(s) not about the "
                             "killed follower (live peers declared dead: "
                             f"{detail['live_peers_declared_dead']}): see mesh.catch_up.node_log_problems")
        return samples, detail
    finally:
        _stop(d, mesh, zctx)


def run_heartbeat(sizes: Sizes, workdir: str, quiet: bool) -> dict[str, Any]:
    """The heartbeat's size with `heartbeat_contexts` contexts in sync on a 2-node mesh.

    The writer gets one append to each of that many distinct contexts (pipelined, WINDOW in flight);
    once the follower holds as many contexts and entries as the writer and a sample of heads
    match, the two nodes' `replication.heartbeat_bytes` (the last heartbeat each sent) is read, and
    over a few more heartbeat intervals the reply and pull bytes that moved (in sync: nothing but
    heartbeats and their replies).
    """
    zctx: zmq.Context[Any] = zmq.Context()
    payload = os.urandom(PAYLOAD_SIZE)
    mesh: BenchMesh | None = None
    d: Dealer | None = None
    n = sizes.heartbeat_contexts
    try:
        mesh = BenchMesh(workdir, "hb", 2, zctx)
        mesh.wait_formed()
        d = Dealer(zctx, mesh.writer.proc.address)
        contexts = [f"hb-{i:05d}" for i in range(n)]
        t = time.monotonic()
        d.pipelined(d.frames(n, round_robin(contexts, d.next_id, payload)))
        fill_s = time.monotonic() - t

        def same_counts() -> bool:
            a, b = mesh.status(0), mesh.status(1)
            return bool(a["contexts"] == b["contexts"] == n and a["entries"] == b["entries"])

        converge_s = mesh.wait(same_counts, f"the follower to hold {n} contexts", timeout=300, every=0.1)
        probe = random.Random(5).sample(contexts, min(50, n))
        mesh.wait(lambda: all(mesh.head(0, c) == mesh.head(1, c) for c in probe), "equal heads", timeout=60)
        # in sync: let every node send a few heartbeats of the synced state, then look at what moved
        time.sleep(2 * mesh.heartbeat_s)
        before = [mesh.status(i) for i in range(2)]
        time.sleep(4 * mesh.heartbeat_s)
        after = [mesh.status(i) for i in range(2)]
        per_node = []
        for m, b, a in zip(mesh.members, before, after, strict=True):
            rb, ra = b["replication"], a["replication"]
            beats = ra["heartbeats_sent"] - rb["heartbeats_sent"]
            per_node.append({
                "id": m.node_id, "heartbeat_bytes": ra["heartbeat_bytes"], "heartbeats_in_window": beats,
                "reply_bytes_per_heartbeat": round((ra["reply_bytes"] - rb["reply_bytes"]) / max(beats, 1), 1),
                "pulled_bytes_in_window": ra["pulled_bytes"] - rb["pulled_bytes"],
                "pushed_entries": ra["pushed_entries"], "pulled_entries": ra["pulled_entries"],
            })
        hb = max(x["heartbeat_bytes"] for x in per_node)
        detail: dict[str, Any] = {
            "contexts": n, "nodes": 2, "heartbeat_ms": MESH_HEARTBEAT_MS, "heartbeat_bytes": hb,
            "fill_s": round(fill_s, 2), "converge_s": round(converge_s, 2), "per_node": per_node,
        }
        log(f"heartbeat_bytes_10k: {n:,} contexts filled in {fill_s:.2f} s, follower in sync after "
            f"{converge_s:.2f} s more; heartbeat {hb} bytes", quiet)
        problems = mesh.log_problems()
        if problems:
            detail["node_log_problems"] = problems
            detail["notes"] = [f"heartbeat_bytes_10k: the mesh nodes logged {len(problems)} warning(s)/error(s): "
                               "see mesh.heartbeat.node_log_problems"]
        return detail
    finally:
        _stop(d, mesh, zctx)


@round_family("mesh", lambda only: only is None or bool(only & set(MESH_SCENARIOS)))
def mesh(r: Rounds) -> None:
    scenarios = MeshScenarios(r.sizes, r.workdir, r.zctx, r.payload, r.shared["node"], r.notes, r.quiet)
    r.stops.insert(0, scenarios.stop)  # stopped before the helpers and processes, as ever
    scenarios.start()

    def standalone(name: str, fn: Slice) -> Slice:
        return scenarios.measure_standalone(fn)

    def finish() -> None:
        if r.mesh_detail is not None:
            r.mesh_detail.update(scenarios.report())

    r.wrap("append_pipelined", standalone)
    r.add("replication_lag", scenarios.replication_lag)
    r.add("append_pipelined_replicated", scenarios.append_pipelined_replicated)
    r.finishers.append(finish)


@run("catch_up", lambda only: only is None or "catch_up" in only)
def _catch_up(sizes: Sizes, workdir: str, quiet: bool, only: set[str] | None, res: Results) -> None:
    res.samples["catch_up"], res.mesh["catch_up"] = run_catch_up(sizes, workdir, quiet)
    res.notes += res.mesh["catch_up"].pop("notes")


@run("heartbeat_bytes_10k", lambda only: only is None or "heartbeat_bytes_10k" in only)
def _heartbeat(sizes: Sizes, workdir: str, quiet: bool, only: set[str] | None, res: Results) -> None:
    res.mesh["heartbeat"] = run_heartbeat(sizes, workdir, quiet)
    res.notes += res.mesh["heartbeat"].pop("notes", [])
