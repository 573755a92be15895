"""The scenario registry: what `ledger-bench` can run, by name, and the interleaved rounds.

Two kinds of entries, both registered by the modules of `tools.bench.scenarios` when it is
imported:

- a *round family* (`round_family`) sets up what its scenarios need (processes, clients,
  helper watchers) on a shared `Rounds`, and adds its timed slices with `Rounds.add`; every
  selected slice of every family then runs once per round, in a shuffled order, after the
  machine settles (`run_rounds`). Families set up in the order of FAMILY_ORDER, and a slice's
  place in `Rounds.slices` seeds the shuffle, so that order is part of the tool's behaviour;
- a *run* (`run`) is a figure measured on its own (watch_fanout, catch_up, heartbeat_bytes_10k,
  memory, the floods, steady_rate); it writes into the shared `Results`. Runs run in the order of RUN_ORDER.

`execute` runs the selected entries and returns the `Results` that
`tools.bench.report.build_report` turns into the report.
"""

from __future__ import annotations

import os
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import zmq

from tools.progress import Progress

from .common import PAYLOAD_SIZE, RATIOS, SCENARIOS, Sizes
from .drivers import Sample
from .machine import SETTLE_MAX_S, settle
from .procs import Proc
from .report import log, summarize
from .watchers import Watchers

Slice = Callable[[], Sample]


@dataclass
class Results:
    """What the runs found: throughput samples, per-round ratios, notes and each part's detail."""

    samples: dict[str, list[Sample]] = field(default_factory=dict)
    per_round: dict[str, list[float]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    watch: dict[str, Any] = field(default_factory=dict)
    mesh: dict[str, Any] = field(default_factory=dict)
    memory: dict[str, Any] | None = None
    floods: dict[str, Any] = field(default_factory=dict)
    steady: dict[str, Any] | None = None
    # the progress line (stderr; none with --json): which run, N of M, and inside the rounds which
    # scenario of which round
    progress: Progress | None = None
    stage: str = ""


@dataclass
class Rounds:
    """The interleaved rounds' shared state: what the round families start, their slices, and
    what runs after the rounds (`finishers`, on success) and at the end (`stops`, always)."""

    sizes: Sizes
    workdir: str
    quiet: bool
    only: set[str] | None
    notes: list[str]
    watch_detail: dict[str, Any]
    mesh_detail: dict[str, Any] | None
    zctx: zmq.Context[Any] = field(default_factory=zmq.Context)
    payload: bytes = field(default_factory=lambda: os.urandom(PAYLOAD_SIZE))
    rng: random.Random = field(default_factory=lambda: random.Random(1))
    procs: list[Proc] = field(default_factory=list)
    helpers: list[Watchers] = field(default_factory=list)
    slices: list[tuple[str, Slice]] = field(default_factory=list)
    warmups: list[Callable[[], None]] = field(default_factory=list)
    finishers: list[Callable[[], None]] = field(default_factory=list)
    stops: list[Callable[[], None]] = field(default_factory=list)  # before helpers and procs stop
    shared: dict[str, Any] = field(default_factory=dict)  # what one family starts for the next ones
    progress: Progress | None = None
    stage: str = ""

    def add(self, name: str, fn: Slice) -> None:
        self.slices.append((name, fn))

    def wrap(self, name: str, wrapper: Callable[[str, Slice], Slice]) -> None:
        """Replace slice `name` by `wrapper(name, slice)` (e.g. to note a process's CPU while it runs)."""
        self.slices = [(n, wrapper(n, fn) if n == name else fn) for n, fn in self.slices]


@dataclass(frozen=True)
class RoundFamily:
    name: str
    selected: Callable[[set[str] | None], bool]
    setup: Callable[[Rounds], None]


@dataclass(frozen=True)
class Run:
    name: str
    selected: Callable[[set[str] | None], bool]
    run: Callable[[Sizes, str, bool, set[str] | None, Results], None]


FAMILY_ORDER = ("baseline", "redis", "curve", "clients", "watch", "mesh")
RUN_ORDER = ("throughput", "watch_fanout", "catch_up", "heartbeat_bytes_10k", "memory", "floods", "steady_rate")
ROUND_FAMILIES: dict[str, RoundFamily] = {}
RUNS: dict[str, Run] = {}


def round_family(name: str, selected: Callable[[set[str] | None], bool] = lambda only: True,
                 ) -> Callable[[Callable[[Rounds], None]], Callable[[Rounds], None]]:
    """Register a family of interleaved scenarios (set up when the rounds run and `selected(only)`)."""
    def register(setup: Callable[[Rounds], None]) -> Callable[[Rounds], None]:
        if name not in FAMILY_ORDER:
            raise ValueError(f"round family {name!r} is not in FAMILY_ORDER")
        ROUND_FAMILIES[name] = RoundFamily(name, selected, setup)
        return setup
    return register


def run(name: str, selected: Callable[[set[str] | None], bool],
        ) -> Callable[[Callable[..., None]], Callable[..., None]]:
    """Register a figure measured on its own, run when `selected(only)`."""
    def register(fn: Callable[..., None]) -> Callable[..., None]:
        if name not in RUN_ORDER:
            raise ValueError(f"run {name!r} is not in RUN_ORDER")
        RUNS[name] = Run(name, selected, fn)
        return fn
    return register


def _register() -> None:
    """Import the scenario modules, which register the families and runs (idempotent)."""
    from . import scenarios  # noqa: F401


def pair_up(order: list[tuple[str, Slice]], a: str, b: str, first: bool) -> None:
    """Move `b` next to `a` (after it when `first`, else before): a ratio of the two then
    compares runs seconds apart, not whatever else ran between them on a shared machine."""
    names = [n for n, _ in order]
    if a not in names or b not in names:
        return
    item = order.pop(names.index(b))
    i = [n for n, _ in order].index(a)
    order.insert(i + 1 if first else i, item)


def run_rounds(r: Rounds) -> tuple[dict[str, list[Sample]], dict[str, list[float]]]:
    """Every selected slice once per round, shuffled, each after the machine settles."""
    samples: dict[str, list[Sample]] = {}
    per_round: dict[str, list[float]] = {}
    settle_s: dict[str, float] = {}
    scenarios = [s for s in r.slices if s[0] in r.only] if r.only else r.slices
    for warmup in r.warmups:  # connections, caches, lazy imports
        warmup()
    for i in range(r.sizes.rounds):
        order = scenarios[:]
        random.Random(i).shuffle(order)  # no scenario always runs first or last
        pair_up(order, "append_pipelined", "append_pipelined_watched", first=i % 2 == 0)
        # on append_pipelined's other side, so that both stay next to it
        pair_up(order, "append_pipelined", "append_pipelined_replicated", first=i % 2 == 1)
        # each asyncio scenario next to its synchronous counterpart, alternating which goes first
        pair_up(order, "client_append_pipelined", "aio_append_pipelined", first=i % 2 == 0)
        pair_up(order, "client_append_pipelined", "aio_append_gather", first=i % 2 == 1)
        pair_up(order, "client_append_seq", "aio_append_seq", first=i % 2 == 1)
        this_round: dict[str, Sample] = {}
        for k, (name, fn) in enumerate(order):
            if r.progress is not None:
                r.progress.update(f"{r.stage}round {i + 1}/{r.sizes.rounds}, {name} ({k + 1} of {len(order)})")
            waited = settle()
            settle_s[name] = settle_s.get(name, 0.0) + waited
            s = fn()
            this_round[name] = s
            samples.setdefault(name, []).append(s)
        log(f"round {i + 1}/{r.sizes.rounds}: " + ", ".join(
            f"{n} {this_round[n].ops_per_s:,.0f}/s" for n, _ in scenarios), r.quiet)
        summary = {n: summarize([s]) for n, s in this_round.items()}
        for name, num, fld, den, _dirn, _t in RATIOS:
            if num in summary and den in summary and summary[den][fld]:
                per_round.setdefault(name, []).append(summary[num][fld] / summary[den][fld])
    slow = {n: round(w, 1) for n, w in settle_s.items() if w >= SETTLE_MAX_S * r.sizes.rounds / 2}
    if slow:
        r.notes.append(f"the machine did not quiet down before these scenarios (seconds waited, "
                       f"{SETTLE_MAX_S:g} s at most per round): {slow}")
    return samples, per_round


def run_throughput(sizes: Sizes, workdir: str, quiet: bool, only: set[str] | None,
                   watch_detail: dict[str, Any] | None = None, mesh_detail: dict[str, Any] | None = None,
                   progress: Progress | None = None, stage: str = "",
                   ) -> tuple[dict[str, list[Sample]], dict[str, list[float]], list[str]]:
    """The interleaved rounds of every selected round family; what the watch and mesh scenarios
    saw besides timings goes to `watch_detail` and `mesh_detail`."""
    _register()
    r = Rounds(sizes, workdir, quiet, only, [], {} if watch_detail is None else watch_detail, mesh_detail,
               progress=progress, stage=stage)
    try:
        for family in (ROUND_FAMILIES[n] for n in FAMILY_ORDER):
            if family.selected(only):
                family.setup(r)
        samples, per_round = run_rounds(r)
        for finish in r.finishers:
            finish()
    finally:
        for stop in r.stops:
            stop()
        for h in r.helpers:
            h.stop()
        for p in r.procs:
            p.stop()
        r.zctx.destroy(linger=0)  # closes whatever an error left open; term() would wait for it
    return samples, per_round, r.notes


@run("throughput", lambda only: only is None or bool(only & (set(SCENARIOS) - {"watch_fanout", "catch_up"})))
def _throughput(sizes: Sizes, workdir: str, quiet: bool, only: set[str] | None, res: Results) -> None:
    res.samples, res.per_round, res.notes = run_throughput(sizes, workdir, quiet, only, res.watch, res.mesh,
                                                           res.progress, res.stage)


def execute(sizes: Sizes, workdir: str, quiet: bool, only: set[str] | None, skip: frozenset[str] | set[str] = frozenset(),
            ) -> Results:
    """Every run that `only` selects and `skip` does not name, in the order of RUN_ORDER."""
    _register()
    res = Results()
    chosen = [RUNS[n] for n in RUN_ORDER if n not in skip and RUNS[n].selected(only)]
    with Progress("ledger-bench", quiet=quiet) as res.progress:
        for j, entry in enumerate(chosen):
            res.stage = f"{entry.name} ({j + 1} of {len(chosen)}): "
            res.progress.update(f"{res.stage}starting", force=True)
            entry.run(sizes, workdir, quiet, only, res)
        res.progress.done(f"{len(chosen)} runs done in {res.progress.elapsed():,.0f} s")
    return res
