"""The plan: everything the seed decides before the first node starts (pure).

One `random.Random(seed)` makes every random choice: first the whole fault
schedule (`plan_faults`), then one seed per workload thread. The schedule is
fixed before the first node starts, as offsets from the start of the fault
phase, so the same seed replays the same faults whatever the nodes do (the
workload replays its choices too, as far as the outcomes it sees are the same).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

KINDS = ("kill", "pause", "partition")


@dataclass(frozen=True, slots=True)
class Fault:
    """One planned fault: `at` seconds into the fault phase, for `duration` seconds.

    kill/pause name one node; a partition names one side (the other side is
    every other node)."""

    at: float
    kind: str
    nodes: tuple[str, ...]
    duration: float

    def to_json(self) -> dict[str, Any]:
        return {"at": self.at, "kind": self.kind, "nodes": list(self.nodes), "duration": self.duration}


def plan_faults(rng: random.Random, names: Sequence[str], duration: float, partitions: bool = False) -> list[Fault]:
    """The fault schedule, drawn from `rng` alone (so a seed replays it exactly).

    Every kind comes at least once, early and in a random order, when the run is
    long enough. A node has one fault at a time, with half a second of rest after
    it; at most N-1 nodes are down or paused together; one partition at a time.
    """
    kinds = ["kill", "pause"] + (["partition"] if partitions and len(names) >= 2 else [])
    owed = list(kinds)
    rng.shuffle(owed)
    cap = max(1, len(names) - 1)
    busy = dict.fromkeys(names, 0.0)
    split_busy = 0.0
    out: list[Fault] = []
    longest = max(0.6, min(3.0, duration / 4))
    t = round(rng.uniform(0.3, 1.0), 3)
    while t < duration - 0.3:
        kind = owed[0] if owed else rng.choice(kinds)
        d = round(rng.uniform(0.5, longest), 3)
        if kind == "partition":
            if split_busy <= t:
                order = sorted(names)
                rng.shuffle(order)
                side = tuple(sorted(order[: rng.randint(1, len(names) // 2)]))
                out.append(Fault(t, kind, side, d))
                split_busy = t + d + 0.5
                if owed and owed[0] == kind:
                    owed.pop(0)
        else:
            free = [n for n in names if busy[n] <= t]
            down = sum(1 for n in names if busy[n] > t)
            if free and down < cap:
                n = rng.choice(free)
                out.append(Fault(t, kind, (n,), d))
                busy[n] = t + d + 0.5
                if owed and owed[0] == kind:
                    owed.pop(0)
        t = round(t + rng.uniform(0.3, 2.5), 3)  # about one fault at a time on average, with quiet spells
    return out


@dataclass(frozen=True, slots=True)
class Plan:
    """Everything the seed decides before the run starts."""

    seed: int
    faults: list[Fault]
    worker_seeds: dict[str, int]
    context_writers: dict[str, str]
    watcher_nodes: dict[str, str]


def node_names(n: int) -> list[str]:
    return [f"n{i}" for i in range(1, n + 1)]


def make_plan(seed: int, nodes: int, duration: float, partitions: bool, contexts: int,
              writers: int, readers: int) -> Plan:
    rng = random.Random(seed)
    names = node_names(nodes)
    faults = plan_faults(rng, names, duration, partitions)
    workers = [f"w{i}" for i in range(1, writers + 1)] + [f"r{i}" for i in range(1, readers + 1)]
    worker_seeds = {w: rng.getrandbits(64) for w in workers}
    ctx_names = [f"chaos-{i}" for i in range(contexts)]
    context_writers = {c: names[i % len(names)] for i, c in enumerate(ctx_names)}
    watcher_nodes = {c: rng.choice(names) for c in ctx_names}
    return Plan(seed, faults, worker_seeds, context_writers, watcher_nodes)
