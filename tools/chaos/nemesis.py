"""The nemesis: it runs the planned fault schedule against the cluster, and notices crashes.

Faults: kill -9 and restart on the same ports and data folder, SIGSTOP/SIGCONT,
and iptables partitions (`tools.chaos.netns`). Each fault begins and ends at its
planned offset from the start of the fault phase; every one has ended (restarted,
SIGCONTed, rules flushed) when the run's duration is over. A node that exits
without being killed is a crash: recorded, reported as a problem, and restarted.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

from .cluster import Cluster
from .common import Options
from .history import History
from .plan import Fault, Plan


class Nemesis:
    """`executed`: each fault as it happened ({"index", "kind", "nodes", "planned_at", "began",
    "ended"}, times on the history's clock); `crashes`: one sentence per crash."""

    def __init__(self, opts: Options, plan: Plan, cluster: Cluster, history: History, abort: threading.Event,
                 say: Callable[[str], None], phase_start: float) -> None:
        self.opts = opts
        self.plan = plan
        self.cluster = cluster
        self.history = history
        self.abort = abort
        self.say = say
        self.phase_start = phase_start
        self.executed: list[dict[str, Any]] = []
        self.crashes: list[str] = []

    def _begin(self, f: Fault) -> None:
        if f.kind == "kill":
            self.cluster.node(f.nodes[0]).kill()
        elif f.kind == "pause":
            self.cluster.node(f.nodes[0]).pause()
        elif f.kind == "partition":
            assert self.cluster.netns is not None
            self.cluster.netns.cut(i for i, n in enumerate(self.cluster.nodes) if n.name in f.nodes)

    def _end(self, f: Fault) -> None:
        if f.kind == "kill":
            self.cluster.restart(self.cluster.node(f.nodes[0]))
        elif f.kind == "pause":
            self.cluster.node(f.nodes[0]).resume()
        elif f.kind == "partition":
            assert self.cluster.netns is not None
            self.cluster.netns.heal()

    def _watch_for_crashes(self) -> None:
        for n in self.cluster.nodes:
            if n.proc is not None and not n.expect_exit and n.proc.poll() is not None:
                rc = n.proc.returncode
                tail = " | ".join(n.log_lines(r"ERROR|Traceback|Error")[-5:])
                self.crashes.append(f"{n.name} exited by itself with code {rc} at t={self.history.now()} "
                                    f"(log {n.log_path}): {tail}")
                self.say(f"node {n.name} CRASHED (exit code {rc}); restarting it")
                n.expect_exit = True
                self.cluster.restart(n)

    def run(self) -> None:
        """Run the schedule to its end (or until `abort`), restarting any node that exits by itself."""
        duration = self.opts.duration
        actions = sorted([(f.at, 1, i, "begin") for i, f in enumerate(self.plan.faults)]
                         + [(f.at + f.duration, 0, i, "end") for i, f in enumerate(self.plan.faults)])
        for at, _, i, what in actions:
            f = self.plan.faults[i]
            when = self.phase_start + min(at, duration)
            while not self.abort.is_set() and time.monotonic() < when:
                self._watch_for_crashes()
                time.sleep(min(0.05, max(0.0, when - time.monotonic())))
            if self.abort.is_set():
                return
            if what == "begin":
                rec = {"index": i, "kind": f.kind, "nodes": list(f.nodes), "planned_at": f.at,
                       "began": self.history.now(), "ended": None}
                self.executed.append(rec)
                self._begin(f)
                if self.opts.verbose:
                    self.say(f"t={rec['began']:6.2f} {f.kind} {','.join(f.nodes)} for {f.duration:.2f} s")
            else:
                self._end(f)
                rec = next(r for r in self.executed if r["index"] == i)
                rec["ended"] = self.history.now()
        while not self.abort.is_set() and time.monotonic() < self.phase_start + duration:
            self._watch_for_crashes()
            time.sleep(0.05)
        self._watch_for_crashes()
