"""`ledger-bench --scale`: the scale curves of issue #15, their goals, table and log-log plot.

Two curves, each over a list of sizes, on fresh nodes driven through the wire protocol only
(requests and `status`), so that they measure whatever storage the node under test has:

- *contexts*: N contexts x 10 entries of 64 B. Per N: restart time (SIGTERM, start again on the
  same data, until `status` answers), idle RSS after the restart, `contexts` listing latency (the
  first page and one from the middle), and an empty second node catching up (time, and the bytes
  of heads/digests moved per byte of data: `heads_over_data`);
- *entries*: one context grown by append_batch of 1,000 x 256-byte random payloads. At each
  checkpoint: the append rate over the last stretch, write amplification (bytes the node process
  wrote / bytes of entries appended), get_one p99, head and proof p50 (after as many untimed reads:
  the first read of a table opens it), and the longest round trip
  of a `head` probe sent every 20 ms from a thread of its own during the growth (the longest
  stall of the node's request loop).

`judge` checks the figures against the goals of issue #15, `normalise` divides each figure by its
value at the smallest size; both are pure, for the table, the JSON report and the plot.
"""

from __future__ import annotations

import os
import random
import statistics
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import msgpack
import zmq

from protocol.client import Client
from tools.progress import Progress

from .drivers import Dealer
from .machine import settle
from .procs import Proc, start_node
from .report import environment, log, pct

CONTEXT_ENTRIES = 10  # entries per context in the contexts curve
CONTEXT_PAYLOAD = 64
ENTRY_PAYLOAD = 256
BATCH = 1000  # entries per append_batch in the entries curve
FILL_WINDOW = 200  # append_batch requests in flight while filling contexts
GROW_WINDOW = 4  # append_batch requests of 1,000 in flight while growing one context
RATE_STRETCH = 100_000  # the append rate is over the last this many entries before a checkpoint
PROBE_EVERY_S = 0.02
GETS = 2000  # a p99 of 2,000 is the 20th slowest: one 1-ms hiccup of a 2-core machine no longer decides it
# reads are timed once the node is quiet again (at most this long): the growth's last LevelDB
# compactions would otherwise land in the p99; the stall figure covers reads during growth
READ_SETTLE_MAX_S = 30.0
HEADS = PROOFS = 200
LISTINGS = 20
BIG = "big"

DEFAULT_CONTEXTS = (10_000, 100_000, 1_000_000)
DEFAULT_ENTRIES = (10_000, 100_000, 1_000_000, 10_000_000)
FOLLOWER_GOAL_RATE = 125_000  # issue #15: an empty follower catches up 5M entries in <= 40 s
SMOKE_CONTEXTS = (200, 1000)
SMOKE_ENTRIES = (2000, 10_000)
# round-robin: RR_CONTEXTS contexts appended in turn (an append_batch of RR_BATCH entries each), the
# common case of an agent platform; each memtable then spans every context's key range
RR_CONTEXTS = 1000
RR_BATCH = 10
RR_WINDOW = 8
DEFAULT_ROUND_ROBIN = (1_000_000, 3_000_000, 10_000_000)
SMOKE_ROUND_ROBIN = (5_000, 20_000)


@dataclass(frozen=True)
class Figure:
    """One line of a curve: its key in a row, what it is, and its goal (if the issue sets one).

    `goal(size, value, first)` is True/False, or None where no goal applies; `first` is the
    figure's value at the smallest size. `cost` says how the plot draws it (rates are drawn
    as their inverse, time per entry, so that every line is a cost)."""

    key: str
    label: str
    unit: str
    goal_text: str = ""
    goal: Callable[[int, float, float | None], bool | None] | None = None
    cost: bool = True


def _at_most(limit: float) -> Callable[[int, float, float | None], bool | None]:
    return lambda size, v, first: v <= limit


def _relative(limit: float, below: bool = True) -> Callable[[int, float, float | None], bool | None]:
    """At most (or, for a rate, at least) `limit` x the value at the smallest size."""
    def check(size: int, v: float, first: float | None) -> bool | None:
        if not first:
            return None
        return v / first <= limit if below else v / first >= limit
    return check


def _catch_up_goal(size: int, v: float, first: float | None) -> bool | None:
    limit = 10.0 if size <= 100_000 else 120.0 if size <= 1_000_000 else None
    return None if limit is None else v <= limit


CONTEXT_FIGURES = (
    Figure("restart_s", "restart (SIGTERM -> status answers)", "s", "<= 3 s (at 1M)", _at_most(3.0)),
    Figure("idle_rss_mb", "idle RSS after restart", "MB", "<= 500 MB (at 1M)", _at_most(500.0)),
    Figure("list_first_ms", "contexts: first page (median)", "ms"),
    Figure("list_middle_ms", "contexts: a middle page (median)", "ms"),
    Figure("catch_up_s", "empty node catches up", "s", "<= 10 s to 100k, <= 120 s to 1M", _catch_up_goal),
    Figure("heads_over_data", "heads bytes / data bytes in catch-up", "x", "<= 0.2", _at_most(0.2)),
)
ENTRY_FIGURES = (
    Figure("append_rate", "append_batch rate (last stretch)", "entries/s", ">= 0.8x at smallest",
           _relative(0.8, below=False), cost=False),
    Figure("segment_rate", "append rate since the last size, stalls in", "entries/s", cost=False),
    Figure("write_amp", "write amplification", "x", "<= 3", _at_most(3.0)),
    Figure("get_one_p99_us", "get_one p99 (random seqs)", "us", "<= 1.5x at smallest", _relative(1.5)),
    Figure("get_one_cold_p99_us", "get_one p99, first reads after growth", "us"),
    Figure("head_p50_us", "head p50", "us", "<= 1.5x at smallest", _relative(1.5)),
    Figure("proof_p50_us", "proof p50 (random seqs)", "us", "<= 1.5x at smallest", _relative(1.5)),
    Figure("stall_ms", "longest request-loop stall (head probe)", "ms", "<= 500 ms", _at_most(500.0)),
)
ROUND_ROBIN_FIGURES = (
    Figure("append_rate", "append_batch rate since the last size", "entries/s", cost=False),
    Figure("write_amp", "write amplification", "x"),
    Figure("stall_ms", "longest read stall (head probe)", "ms", "<= 500 ms", _at_most(500.0)),
    Figure("append_max_ms", "longest append_batch round trip", "ms"),
)
CURVES = {"contexts": CONTEXT_FIGURES, "entries": ENTRY_FIGURES, "round_robin": ROUND_ROBIN_FIGURES}


def parse_sizes(text: str) -> list[int]:
    """'10000,100000' -> [10000, 100000] (sorted, distinct, each >= 1); ValueError otherwise."""
    sizes = sorted({int(s.replace("_", "")) for s in text.split(",") if s.strip()})
    if not sizes or sizes[0] < 1:
        raise ValueError(f"sizes must be positive integers: {text!r}")
    return sizes


# -- the pure part: normalisation and goals ------------------------------------------------------

def normalise(rows: Sequence[dict[str, Any]], figures: Sequence[Figure]) -> dict[str, list[float | None]]:
    """Each figure at each size divided by its value at the smallest size (None where either is
    missing or the first is 0). Rates are inverted first (time per entry), so that every line is
    a cost: 2.0 means "twice as expensive as at the smallest size"."""
    out: dict[str, list[float | None]] = {}
    for f in figures:
        vals = [r.get(f.key) for r in rows]
        costs = [None if v is None else (v if f.cost else (1 / v if v else None)) for v in vals]
        first = costs[0] if costs else None
        out[f.key] = [None if c is None or not first else round(c / first, 3) for c in costs]
    return out


def judge(rows: Sequence[dict[str, Any]], figures: Sequence[Figure], size_key: str) -> dict[str, dict[str, Any]]:
    """Per figure: its goal, the verdict at each size (True/False/None where no goal applies or the
    value is missing and the goal is not a relative one) and overall "PASS" (met wherever a goal
    applies), "MISS" (missed somewhere, or a figure missing where a goal applies) or "-" (no goal)."""
    out: dict[str, dict[str, Any]] = {}
    for f in figures:
        first = rows[0].get(f.key) if rows else None
        per_size: list[bool | None] = []
        for r in rows:
            v = r.get(f.key)
            if f.goal is None:
                per_size.append(None)
            elif v is None:  # e.g. a catch-up that did not finish
                per_size.append(False if f.goal(r[size_key], float("inf"), first or 1.0) is not None else None)
            else:
                per_size.append(f.goal(r[size_key], float(v), first))
        applied = [m for m in per_size if m is not None]
        verdict = "-" if not applied else "PASS" if all(applied) else "MISS"
        out[f.key] = {"goal": f.goal_text or None, "met": per_size, "verdict": verdict}
    return out


# -- measuring ---------------------------------------------------------------------------------

_line: list[Progress] = []  # the progress line of the step running now


def _progress(msg: str, quiet: bool) -> None:
    """The progress line (tools.progress) says `msg`; an empty `msg` ends it."""
    if quiet:
        return
    if not _line:
        _line.append(Progress(""))
    if msg:
        _line[0].update(msg)
    else:
        _line.pop().done()


def restart(node: Proc, data: str, zctx: zmq.Context[Any], flags: Sequence[str] = ()) -> tuple[Proc, float]:
    """Stop `node` (SIGTERM, wait), start it again on `data`: the new one and the seconds from
    its start until `status` answers."""
    node.stop()
    t0 = time.monotonic()
    new, _ = start_node(data, *flags, timeout=600)
    with Client(new.address, zctx=zctx, timeout=600) as c:
        c.status()
    return new, time.monotonic() - t0


def _median_ms(fn: Callable[[], Any], n: int) -> float:
    times = []
    for _ in range(n):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return round(statistics.median(times) * 1e3, 3)


def fill_contexts(d: Dealer, n: int, quiet: bool) -> None:
    """N contexts x CONTEXT_ENTRIES entries, one append_batch per context, FILL_WINDOW in flight
    (built and sent 10,000 requests at a time, so that a million contexts fit in memory)."""
    entries = [{"key": "k", "payload": b"x" * CONTEXT_PAYLOAD}] * CONTEXT_ENTRIES
    for start in range(0, n, 10_000):
        k = min(10_000, n - start)
        d.pipelined(_fill_frames(d, start, k, entries), window=FILL_WINDOW)
        _progress(f"scale contexts {n:,}: filled {100 * (start + k) / n:.0f}%", quiet)


def _fill_frames(d: Dealer, start: int, k: int, entries: list[dict[str, Any]]) -> list[bytes]:
    """append_batch of `entries` to contexts start .. start + k - 1."""
    first = d.next_id - start  # request ids go on from d.next_id: context i gets id first + i
    return d.frames(k, lambda i: {"op": "append_batch", "context": _ctx(i - first), "entries": entries})


def _ctx(i: int) -> str:
    return f"ctx-{i:07d}"


def catch_up(zctx: zmq.Context[Any], source: Proc, data: str, want: int, timeout: float,
             quiet: bool, what: str = "scale contexts") -> dict[str, Any]:
    """Start an empty node peered with `source`; the seconds until it holds `want` entries (or
    how far it got in `timeout`), and heads bytes / data bytes over both nodes."""
    t0 = time.monotonic()
    peer, _ = start_node(data, "--id", "scale-follower", "--peers", source.address.removeprefix("tcp://"),
                         name="follower", timeout=120)
    try:
        with Client(peer.address, zctx=zctx, timeout=60) as c2, Client(source.address, zctx=zctx, timeout=60) as c1:
            last = -1.0
            while True:
                st2 = c2.status()
                waited = time.monotonic() - t0
                if st2["entries"] >= want or waited > timeout:
                    break
                if waited - last >= 1:
                    last = waited
                    _progress(f"{what}: catch-up {100 * st2['entries'] / want:.0f}% after {waited:.0f} s", quiet)
                time.sleep(0.1)
            st1 = c1.status()
        reps = [st1["replication"], st2["replication"]]
        heads = sum(r["reply_bytes"] - r["pulled_bytes"] for r in reps)
        data_bytes = sum(r["pulled_bytes"] for r in reps)
        done = st2["entries"] >= want
        return {"catch_up_s": round(waited, 2) if done else None, "catch_up_done": done,
                "catch_up_fraction": round(st2["entries"] / want, 4), "catch_up_waited_s": round(waited, 1),
                "heads_over_data": round(heads / data_bytes, 3) if data_bytes else None,
                "heads_bytes": heads, "data_bytes": data_bytes}
    finally:
        peer.stop()


def run_contexts(n: int, workdir: str, zctx: zmq.Context[Any], catch_up_timeout: float, quiet: bool,
                 ) -> dict[str, Any]:
    data = os.path.join(workdir, f"contexts-{n}")
    node, _ = start_node(data, "--id", "scale-source", timeout=120)
    try:
        d = Dealer(zctx, node.address)
        t0 = time.monotonic()
        try:
            fill_contexts(d, n, quiet)
        finally:
            d.close()
        fill_s = time.monotonic() - t0
        _progress(f"scale contexts {n:,}: restart", quiet)
        node, restart_s = restart(node, data, zctx, ("--id", "scale-source"))
        time.sleep(1.0)
        rss = node.rss_mb()
        with Client(node.address, zctx=zctx, timeout=60) as c:
            first = _median_ms(lambda: c.call("contexts"), LISTINGS)
            middle = _median_ms(lambda: c.call("contexts", after=_ctx(n // 2)), LISTINGS)
        row = {"contexts": n, "fill_s": round(fill_s, 2), "restart_s": round(restart_s, 3),
               "idle_rss_mb": round(rss, 1), "list_first_ms": first, "list_middle_ms": middle}
        row.update(catch_up(zctx, node, os.path.join(workdir, f"contexts-{n}-follower"), n * CONTEXT_ENTRIES,
                            catch_up_timeout, quiet))
        return row
    finally:
        node.stop()
        _progress("", quiet)


def io_written(pid: int) -> dict[str, int]:
    """The process's write_bytes and wchar (/proc/PID/io); {} where it cannot be read."""
    out: dict[str, int] = {}
    try:
        with open(f"/proc/{pid}/io") as f:
            for line in f:
                k, _, v = line.partition(":")
                if k in ("write_bytes", "wchar"):
                    out[k] = int(v)
    except (OSError, ValueError):
        pass
    return out


def dir_bytes(path: str) -> int:
    total = 0
    for root, _dirs, files in os.walk(path):
        for f in files:
            try:
                total += os.path.getsize(os.path.join(root, f))
            except OSError:
                pass
    return total


class StallProbe:
    """A thread with a socket of its own that sends `head` every PROBE_EVERY_S and keeps the
    longest round trip (a request loop that stalls answers it late)."""

    def __init__(self, zctx: zmq.Context[Any], address: str) -> None:
        self.zctx = zctx
        self.address = address
        self.longest = 0.0
        self.probes = 0
        self.error: str | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        d = Dealer(self.zctx, self.address)
        d.s.setsockopt(zmq.RCVTIMEO, 300_000)
        try:
            while not self._stop.is_set():
                t = time.perf_counter()
                try:  # any reply will do (NOT_FOUND before the first batch): it is the round trip we time
                    (frame,) = d.frames(1, lambda i: {"op": "head", "context": BIG})
                    d.s.send(frame)
                    d.s.recv()
                except zmq.ZMQError as exc:
                    self.error = str(exc)
                    return
                self.longest = max(self.longest, time.perf_counter() - t)
                self.probes += 1
                self._stop.wait(PROBE_EVERY_S)
        finally:
            d.close()

    def stop(self) -> float:
        """Stop the thread; the longest round trip in seconds."""
        self._stop.set()
        self._thread.join(330)
        if self.error:
            raise RuntimeError(f"the stall probe failed: {self.error}")
        return self.longest


def _read_figures(d: Dealer, size: int, rng: random.Random) -> dict[str, float]:
    """Read latencies in steady state: after as many untimed reads first (the first read of a
    table after the growth opens it: at 10M entries, ~200 tables, 1-4 ms each), whose p99 is
    reported on its own (`get_one_cold_p99_us`)."""
    def get_frames() -> list[bytes]:
        return d.frames(GETS, lambda i: {"op": "get", "context": BIG, "after": rng.randrange(size), "limit": 1})

    def proof_frames() -> list[bytes]:
        return d.frames(PROOFS, lambda i: {"op": "proof", "context": BIG, "seq": rng.randrange(size) + 1})

    cold = d.seq(get_frames())
    d.seq(proof_frames())
    gets = d.seq(get_frames())
    heads = d.seq(d.frames(HEADS, lambda i: {"op": "head", "context": BIG}))
    proofs = d.seq(proof_frames())
    return {"get_one_p99_us": round(pct(gets.latencies, 0.99) * 1e6, 1),
            "get_one_cold_p99_us": round(pct(cold.latencies, 0.99) * 1e6, 1),
            "head_p50_us": round(pct(heads.latencies, 0.50) * 1e6, 1),
            "proof_p50_us": round(pct(proofs.latencies, 0.50) * 1e6, 1)}


def run_entries(sizes: Sequence[int], workdir: str, zctx: zmq.Context[Any], quiet: bool,
                catch_up_timeout: float = 600.0) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Grow one context through `sizes`; a row per size, and what holds for the whole run (the
    write counter used, restart time at the largest size, an empty follower catching it up)."""
    data = os.path.join(workdir, "entries")
    node, _ = start_node(data, timeout=120)
    rng = random.Random(15)
    rows: list[dict[str, Any]] = []
    extra: dict[str, Any] = {}
    entry_bytes = len(msgpack.packb({"key": "k", "payload": b"\0" * ENTRY_PAYLOAD}, use_bin_type=True))
    try:
        d = Dealer(zctx, node.address)
        io0 = io_written(node.popen.pid)
        counter = "write_bytes" if "write_bytes" in io0 else "wchar"
        done = 0
        stretch: list[tuple[int, float]] = []  # (entries, seconds) of each chunk sent
        t_start = time.monotonic()
        for size in sizes:
            probe = StallProbe(zctx, node.address)
            first_chunk = len(stretch)
            while done < size:
                k = min(10, -(-(size - done) // BATCH))  # requests in this chunk
                counts = [min(BATCH, size - done - j * BATCH) for j in range(k)]
                s = d.pipelined(_grow_frames(d, counts), window=GROW_WINDOW)
                done += sum(counts)
                stretch.append((sum(counts), s.seconds))
                _progress(f"scale entries: {done:,} / {sizes[-1]:,} ({time.monotonic() - t_start:.0f} s)", quiet)
            segment_s = sum(sec for _cnt, sec in stretch[first_chunk:])  # time spent sending: stalls count
            stall = probe.stop()
            n = secs = 0.0
            for cnt, sec in reversed(stretch):
                n += cnt
                secs += sec
                if n >= min(RATE_STRETCH, size):
                    break
            io = io_written(node.popen.pid)
            if counter == "write_bytes" and not io.get("write_bytes"):
                counter = "wchar"  # no block-I/O accounting here (e.g. a tmpfs): bytes passed to write()
            written = io.get(counter, 0) - io0.get(counter, 0)
            row = {"entries": size, "append_rate": round(n / secs, 1) if secs else None,
                   "segment_rate": round((size - (rows[-1]["entries"] if rows else 0)) / segment_s, 1),
                   "stall_probes": probe.probes,
                   "write_amp": round(written / (size * entry_bytes), 3), "stall_ms": round(stall * 1e3, 1),
                   "disk_mb": round(dir_bytes(data) / 2**20, 1)}
            row["settle_s"] = round(settle(READ_SETTLE_MAX_S), 1)
            row.update(_read_figures(d, size, rng))
            rows.append(row)
        d.close()
        extra["write_counter"] = counter
        extra["entry_bytes"] = entry_bytes
        _progress("scale entries: restart", quiet)
        node, extra["restart_s"] = restart(node, data, zctx)
        extra["restart_s"] = round(extra["restart_s"], 3)
        extra["restart_entries"] = sizes[-1]
        _progress("scale entries: an empty follower catches up", quiet)
        cu = catch_up(zctx, node, os.path.join(workdir, "entries-follower"), sizes[-1], catch_up_timeout, quiet,
                      "scale entries")
        extra["follower"] = {"entries": sizes[-1], "catch_up_s": cu["catch_up_s"], "done": cu["catch_up_done"],
                             "fraction": cu["catch_up_fraction"], "waited_s": cu["catch_up_waited_s"],
                             "rate": round(sizes[-1] * cu["catch_up_fraction"] / cu["catch_up_waited_s"], 1)
                             if cu["catch_up_waited_s"] else None}
        return rows, extra
    finally:
        node.stop()
        _progress("", quiet)


def run_round_robin(sizes: Sequence[int], workdir: str, zctx: zmq.Context[Any], quiet: bool,
                    ) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """RR_CONTEXTS contexts appended in turn up to each size: the append rate, the longest read
    stall (a `head` probe) and the longest append round trip; what the node held meanwhile."""
    data = os.path.join(workdir, "round-robin")
    node, _ = start_node(data, timeout=120)
    rows: list[dict[str, Any]] = []
    entries = [{"key": "k", "payload": b"\0" * ENTRY_PAYLOAD}] * RR_BATCH
    entry_bytes = len(msgpack.packb(entries[0], use_bin_type=True))
    try:
        d = Dealer(zctx, node.address)
        io0 = io_written(node.popen.pid)
        counter = "write_bytes" if "write_bytes" in io0 else "wchar"
        done = 0
        t_start = time.monotonic()
        for size in sizes:
            probe = StallProbe(zctx, node.address)
            first, secs, longest = done, 0.0, 0.0
            while done < size:
                k = min(1000, -(-(size - done) // RR_BATCH))
                s = d.pipelined(d.frames(k, lambda rid: {"op": "append_batch", "context": f"rr-{rid % RR_CONTEXTS:04d}",
                                                         "entries": entries}), window=RR_WINDOW)
                done += k * RR_BATCH
                secs += s.seconds
                longest = max(longest, max(s.latencies))
                _progress(f"scale round-robin: {done:,} / {sizes[-1]:,} ({time.monotonic() - t_start:.0f} s)", quiet)
            stall = probe.stop()
            io = io_written(node.popen.pid)
            rows.append({"entries": done, "append_rate": round((done - first) / secs, 1) if secs else None,
                         "write_amp": round((io.get(counter, 0) - io0.get(counter, 0)) / (done * entry_bytes), 3),
                         "stall_ms": round(stall * 1e3, 1), "append_max_ms": round(longest * 1e3, 1)})
        d.close()
        with Client(node.address, zctx=zctx, timeout=60) as c:
            st = c.status()
        extra = {"contexts": RR_CONTEXTS, "batch": RR_BATCH, "write_counter": counter,
                 "held_requests_total": st.get("held_requests_total"), "held_turns": st.get("held_turns"),
                 "backpressure_waits": st.get("backpressure_waits")}
        return rows, extra
    finally:
        node.stop()
        _progress("", quiet)


def _grow_frames(d: Dealer, counts: list[int]) -> list[bytes]:
    """One append_batch to the big context per count, of that many entries."""
    first = d.next_id
    return d.frames(len(counts), lambda i: {"op": "append_batch", "context": BIG, "entries": [
        {"key": "k", "payload": p} for p in _payloads(counts[i - first])]})


def _payloads(n: int) -> list[bytes]:
    """n distinct random payloads (not one repeated: LevelDB would compress that away)."""
    blob = os.urandom(n * ENTRY_PAYLOAD)
    return [blob[i:i + ENTRY_PAYLOAD] for i in range(0, len(blob), ENTRY_PAYLOAD)]


def run_scale(contexts: Sequence[int], entries: Sequence[int], workdir: str, quiet: bool,
              catch_up_timeout: float = 600.0, smoke: bool = False,
              round_robin: Sequence[int] = ()) -> dict[str, Any]:
    """The curves (an empty list skips one); the report (see `build_scale_report`)."""
    zctx: zmq.Context[Any] = zmq.Context()
    try:
        crow = []
        for i, n in enumerate(contexts):
            log(f"scale contexts: {n:,} contexts x {CONTEXT_ENTRIES} entries ({i + 1}/{len(contexts)})", quiet)
            crow.append(run_contexts(n, workdir, zctx, catch_up_timeout, quiet))
            log(f"scale contexts {n:,}: " + ", ".join(f"{k} {v}" for k, v in crow[-1].items() if k != "contexts"),
                quiet)
        erows: list[dict[str, Any]] = []
        extra: dict[str, Any] = {}
        if entries:
            log(f"scale entries: one context grown to {', '.join(f'{n:,}' for n in entries)}", quiet)
            erows, extra = run_entries(entries, workdir, zctx, quiet, catch_up_timeout)
            for r in erows:
                log(f"scale entries {r['entries']:,}: " + ", ".join(f"{k} {v}" for k, v in r.items()
                                                                   if k != "entries"), quiet)
        rrows: list[dict[str, Any]] = []
        rextra: dict[str, Any] = {}
        if round_robin:
            log(f"scale round-robin: {RR_CONTEXTS:,} contexts appended in turn up to "
                f"{', '.join(f'{n:,}' for n in round_robin)} entries", quiet)
            rrows, rextra = run_round_robin(round_robin, workdir, zctx, quiet)
            for r in rrows:
                log(f"scale round-robin {r['entries']:,}: " + ", ".join(f"{k} {v}" for k, v in r.items()
                                                                       if k != "entries"), quiet)
    finally:
        zctx.destroy(linger=0)
    return build_scale_report(crow, erows, extra, catch_up_timeout, smoke, rrows, rextra)


def build_scale_report(crow: list[dict[str, Any]], erows: list[dict[str, Any]], extra: dict[str, Any],
                       catch_up_timeout: float, smoke: bool = False, rrows: Sequence[dict[str, Any]] = (),
                       rextra: dict[str, Any] | None = None) -> dict[str, Any]:
    notes = []
    for r in crow:
        if not r.get("catch_up_done", True):
            notes.append(f"catch-up of {r['contexts']:,} contexts did not finish: "
                         f"{100 * r['catch_up_fraction']:.0f}% after {r['catch_up_waited_s']:.0f} s")
    follower = extra.get("follower")
    if follower is not None:
        # the goal: 5M entries in <= 40 s, i.e. at least FOLLOWER_GOAL_RATE entries/s at any size
        follower["goal"] = f">= {FOLLOWER_GOAL_RATE:,} entries/s (5M in <= 40 s)"
        follower["verdict"] = "PASS" if follower["done"] and (follower["rate"] or 0) >= FOLLOWER_GOAL_RATE else "MISS"
        if not follower["done"]:
            notes.append(f"the follower's catch-up of {follower['entries']:,} entries did not finish: "
                         f"{100 * follower['fraction']:.0f}% after {follower['waited_s']:.0f} s")
    if extra.get("write_counter") == "wchar":
        notes.append("write amplification counts wchar (bytes passed to write()): this system has no "
                     "per-process block-I/O accounting (write_bytes)")
    return {
        "mode": "scale-smoke" if smoke else "scale",
        "contexts": {"rows": crow, "normalised": normalise(crow, CONTEXT_FIGURES),
                     "goals": judge(crow, CONTEXT_FIGURES, "contexts"), "catch_up_timeout_s": catch_up_timeout},
        "entries": {"rows": erows, "normalised": normalise(erows, ENTRY_FIGURES),
                    "goals": judge(erows, ENTRY_FIGURES, "entries"), **extra},
        "round_robin": {"rows": list(rrows), "normalised": normalise(rrows, ROUND_ROBIN_FIGURES),
                        "goals": judge(rrows, ROUND_ROBIN_FIGURES, "entries"), **(rextra or {})},
        "environment": environment(),
        "notes": notes,
    }


# -- output ------------------------------------------------------------------------------------

def _fmt(v: Any) -> str:
    if v is None:
        return "-"
    if isinstance(v, float) and v >= 100:
        return f"{v:,.0f}"
    if isinstance(v, int):
        return f"{v:,}"
    return f"{v:g}"


def _size(n: int) -> str:
    for div, suffix in ((1_000_000, "M"), (1000, "k")):
        if n >= div and n % (div // 10) == 0:
            return f"{n / div:g}{suffix}"
    return str(n)


def print_scale_table(report: dict[str, Any]) -> None:
    env = report["environment"]
    print(f"ledger-bench ({report['mode']}), {env['cpus']} CPUs, Python {env['python']}, libzmq {env['libzmq']}")
    for curve, size_key in (("contexts", "contexts"), ("entries", "entries"), ("round_robin", "entries")):
        part = report.get(curve)
        if part is None:
            continue
        rows = part["rows"]
        if not rows:
            continue
        print()
        names = {f.key: f"{f.label} ({f.unit})" for f in CURVES[curve]}
        w = max(map(len, names.values())) + 1
        head = {"contexts": "contexts (x 10 entries)", "entries": "entries (in one context)",
                "round_robin": f"entries ({part.get('contexts', RR_CONTEXTS):,} contexts in turn)"}[curve]
        print(f"{head:{w}s}" + "".join(f"{_size(r[size_key]):>10s}" for r in rows) + "  goal")
        for f in CURVES[curve]:
            g = part["goals"][f.key]
            goal = f"{g['goal']} {g['verdict']}" if g["goal"] else ""
            print(f"{names[f.key]:{w}s}" + "".join(f"{_fmt(r.get(f.key)):>10s}" for r in rows) + f"  {goal}")
    e = report["entries"]
    if e["rows"]:
        print(f"\nwrite amplification: node {e['write_counter']} / {e['entry_bytes']} bytes per entry appended; "
              f"restart with {e['restart_entries']:,} entries: {e['restart_s']:.2f} s")
        f = e.get("follower")
        if f is not None:
            print(f"an empty follower catches up {f['entries']:,} entries: {_fmt(f['catch_up_s'])} s "
                  f"({_fmt(f['rate'])} entries/s)  goal {f['goal']} {f['verdict']}")
    r = report.get("round_robin")
    if r and r["rows"]:
        print(f"round-robin: write requests held while storage caught up (reads answered meanwhile): "
              f"{_fmt(r.get('held_requests_total'))}; turns no request was read: {_fmt(r.get('backpressure_waits'))}")
    for n in report["notes"]:
        print(f"note: {n}")


GOAL_LINES = {  # issue #15's goals, under each panel's title ([PASS]/[MISS] in the legend: this run's sizes)
    "contexts": "goals: restart <= 3 s, idle RSS <= 500 MB at 1M contexts; catch-up 100k <= 10 s,\n"
                "1M <= 120 s; heads/data <= 0.2",
    "entries": "goals: at 10M, append rate >= 0.8x and reads <= 1.5x their values at 10k;\n"
               "write amplification <= 3; stall <= 0.5 s",
    "round_robin": f"{RR_CONTEXTS:,} contexts appended in turn\ngoal: read stall <= 0.5 s",
}


def plot_scale(report: dict[str, Any], path: str) -> None:
    """Log-log panels (contexts, entries, round-robin): each figure over its value at the smallest size."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = [c for c in ("contexts", "entries", "round_robin") if c in report]
    fig, axes = plt.subplots(1, len(curves), figsize=(6.5 * len(curves), 5.5), squeeze=False)
    for ax, curve in zip(axes[0], curves, strict=True):
        part = report[curve]
        sizes = [r["contexts" if curve == "contexts" else "entries"] for r in part["rows"]]
        for f in CURVES[curve]:
            pts = [(s, v) for s, v in zip(sizes, part["normalised"][f.key], strict=True) if v]
            if not pts:
                continue
            label = f.label if f.cost else f"time per entry: 1 / {f.label}"
            verdict = part["goals"][f.key]["verdict"]
            ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o",
                    label=label + ("" if verdict == "-" else f" [{verdict}]"))
        if curve == "entries":
            ax.axhline(1.5, color="grey", linestyle="--", linewidth=0.8)
            ax.text(sizes[0] if sizes else 1, 1.55, "reads goal: 1.5x", fontsize=7, color="grey")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel({"contexts": "contexts (x 10 entries)", "entries": "entries in one context",
                       "round_robin": "entries (in all)"}[curve])
        ax.set_ylabel("x its value at the smallest size")
        ax.set_title(f"{curve}: cost vs size\n{GOAL_LINES[curve]}", fontsize=9)
        ax.grid(True, which="both", linewidth=0.3)
        if ax.get_lines():
            ax.legend(fontsize=7, loc="upper left")
        else:
            ax.text(0.5, 0.5, "not run", transform=ax.transAxes, ha="center", color="grey")
    fig.suptitle(f"ledger-bench --scale ({report['mode']})")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
