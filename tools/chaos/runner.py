"""One chaos run from start to report: plan, cluster, workload and nemesis threads, heal, final state, checks.

1. Start the nodes (`tools.chaos.cluster`) and create every context
   (`tools.chaos.workload`).
2. For `--duration` seconds the workload's threads and the nemesis
   (`tools.chaos.nemesis`) run side by side.
3. Heal everything (restart, SIGCONT, flush the rules), wait until every node
   has the same (size, root) for every context, let the watchers catch up, read
   the final logs and the forks, and run the checks (`tools.chaos.checks`).

Every node is stopped in all cases (SIGCONT first if paused) and the network
namespaces are removed; node logs, `history.jsonl` and `report.json` stay in the
work folder (the nodes' data folders too, unless the run passed).
"""

from __future__ import annotations

import functools
import json
import shutil
import tempfile
import threading
import time
import traceback
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import zmq

from tools.progress import Progress

from .checks import check_convergence, check_forks, check_history
from .cluster import Cluster
from .common import MAX_PROBLEMS, PROG, Options
from .history import History
from .intruder import Intruder, check_intruder
from .nemesis import Nemesis
from .node import START_TIMEOUT
from .plan import make_plan
from .report import build_report, plot
from .workload import Workload

PROGRESS_STEP_S = 0.2  # how often the fault phase looks at the clock for its progress line


def replay_command(opts: Options) -> str:
    """The command line that replays this run."""
    replay = f"{PROG} --nodes {opts.nodes} --duration {opts.duration:g} --seed {opts.seed}"
    replay += " --partitions" if opts.partitions else ""
    replay += " --secure" if opts.secure else ""
    replay += " --intruder" if opts.intruder else ""
    if opts.durability != "sync":
        replay += f" --durability {opts.durability} --flush-ms {opts.flush_ms}"
    defaults = Options()
    for flag in ("contexts", "writers", "readers", "replicas"):
        if getattr(opts, flag) != getattr(defaults, flag):
            replay += f" --{flag} {getattr(opts, flag)}"
    return replay


def _guard(name: str, body: Callable[[], None], errors: list[str]) -> Callable[[], None]:
    """A thread's body that records an exception as a harness error instead of losing it."""
    def run() -> None:
        try:
            body()
        except Exception:
            errors.append(f"{name}: {traceback.format_exc()}")
    return run


def _close_zmq(zctx: zmq.Context[Any], errors: list[str]) -> None:
    done = threading.Event()

    def term() -> None:
        zctx.term()
        done.set()

    threading.Thread(target=term, daemon=True).start()
    if not done.wait(10):
        errors.append("a ZeroMQ socket of the harness was left open")


def run(opts: Options, out: IO[str], err: IO[str]) -> dict[str, Any]:
    """One chaos run; returns the report (`ok` says whether every check held)."""
    plan = make_plan(opts.seed, opts.nodes, opts.duration, opts.partitions, opts.contexts, opts.writers,
                     opts.readers)
    human = err if opts.json else out
    # the phases' line on stderr (a terminal rewrites it in place); nothing with --json
    progress = Progress(PROG, quiet=opts.json, stream=err)

    def say(text: str) -> None:
        progress.note(f"{PROG}: {text}", human)

    say(f"seed {opts.seed} (replay: {replay_command(opts)})")
    if opts.workdir:
        workdir = Path(opts.workdir)
        workdir.mkdir(parents=True, exist_ok=True)
    else:
        workdir = Path(tempfile.mkdtemp(prefix="ledger-chaos-"))
    say(f"work folder {workdir} (node logs n1.log ..., history.jsonl, report.json)")
    say(f"{len(plan.faults)} faults planned over {opts.duration:g} s: " + ", ".join(
        f"{v} {k}" for k, v in sorted(Counter(f.kind for f in plan.faults).items())))
    history = History()
    zctx: zmq.Context[Any] = zmq.Context()
    abort = threading.Event()          # everything, now (errors, Ctrl-C)
    harness_errors: list[str] = []
    cluster = Cluster(opts, workdir, say, zctx, abort, harness_errors)
    work = Workload(opts, plan, cluster, history, zctx, workdir)
    threads: list[threading.Thread] = []
    nemesis_thread: threading.Thread | None = None
    report: dict[str, Any] = {"seed": opts.seed, "nodes": opts.nodes, "duration": opts.duration,
                              "partitions": opts.partitions, "workdir": str(workdir)}
    try:
        cluster.start()
        work.create_contexts()
        history.t0 = phase_start = time.monotonic()
        nemesis = Nemesis(opts, plan, cluster, history, abort, say, phase_start)
        for ctx, name in plan.watcher_nodes.items():
            body = functools.partial(work.watcher, ctx, cluster.node(name))
            threads.append(threading.Thread(target=_guard(f"watcher {ctx}", body, harness_errors),
                                            name=f"watch-{ctx}", daemon=True))
        for w, s in plan.worker_seeds.items():
            body = functools.partial(work.writer if w.startswith("w") else work.reader, w, s)
            threads.append(threading.Thread(target=_guard(w, body, harness_errors), name=w, daemon=True))
        nemesis_thread = threading.Thread(target=_guard("nemesis", nemesis.run, harness_errors), name="nemesis",
                                          daemon=True)
        intruder = None
        if opts.intruder:
            intruder = Intruder(cluster.nodes, zctx, opts.seed + 1, cluster.intruder_key)
            threads.append(threading.Thread(target=_guard("intruder", lambda: intruder.run(work.stop_work),
                                                          harness_errors), name="intruder", daemon=True))
        for t in threads:
            t.start()
        nemesis_thread.start()
        say(f"workload: {opts.writers} writers, {opts.readers} readers, {len(plan.watcher_nodes)} watchers over "
            f"{len(work.contexts)} contexts; faults for {opts.duration:g} s")
        faults = len(plan.faults)
        while not work.stop_work.wait(min(PROGRESS_STEP_S, max(0.0, phase_start + opts.duration - time.monotonic()))):
            t = time.monotonic() - phase_start
            if t >= opts.duration:
                break
            progress.update(f"faults t={t:.0f}/{opts.duration:g} s, {len(nemesis.executed)}/{faults} faults "
                            f"injected, {len(history.ops):,} client operations")
        work.stop_work.set()
        nemesis_thread.join()  # it has ended every fault by now: restarted, SIGCONTed, rules flushed
        # Heal whatever is left (a node that crashed and would not restart), then
        # measure convergence from here.
        cluster.heal()
        healed = time.monotonic()
        heal_s = history.now()
        for t in threads:
            if t.name.startswith(("w", "r")) and not t.name.startswith("watch-"):
                t.join()
        say(f"healed at t={heal_s:.1f} s; waiting up to {opts.converge_timeout:g} s for convergence")
        converged, conv_s, heads = cluster.wait_converged(
            work.contexts, opts.converge_timeout, since=healed,
            on_wait=lambda agreed, waited: progress.update(
                f"converging: {agreed}/{len(work.contexts)} contexts agree on every node, {waited:.0f} s"))
        progress.done(f"converged in {conv_s:.1f} s" if converged else "did not converge")
        logs = cluster.final_logs(plan.context_writers)
        work.watch_targets.update({ctx: len(log) for ctx, log in logs.items()})
        deadline = time.monotonic() + 20.0
        for t in threads:
            if t.name.startswith("watch-"):
                t.join(max(0.1, deadline - time.monotonic()))
        work.stop_watch.set()
        for t in threads:
            t.join(5.0)
        reported, aside = cluster.forks()
        intruder_problems: list[str] = []
        if intruder is not None:
            report["intruder"] = intruder.report()
            writers = {e.writer for log in logs.values() for e in log}
            intruder_problems = check_intruder(intruder, cluster.context_names(), writers)
        forks = check_forks(reported, opts.durability)
        kills = [(e["nodes"][0], e["began"]) for e in nemesis.executed if e["kind"] == "kill"]
        result = check_history(history.ops, logs, work.watches, durability=opts.durability,
                               flush_s=opts.flush_ms / 1000.0, kills=kills, writers=plan.context_writers,
                               aside=aside)
        problems: list[str] = list(result.pop("problems"))
        problems += check_convergence(converged, opts.converge_timeout, heads)
        problems += [f"fork: {f}" for f in forks]
        problems += [f"crash: {c}" for c in nemesis.crashes]
        problems += [f"harness: {e}" for e in harness_errors]
        problems += intruder_problems
        for n in cluster.nodes:
            problems += [f"{n.name} log: {line}" for line in n.log_lines(r"Traceback|CRITICAL")[:5]]
        report.update(build_report(
            opts, plan, result, executed=nemesis.executed, aside=aside, watches=work.watches, logs=logs,
            crashes=len(nemesis.crashes), forks=len(forks), converged=converged, convergence_s=conv_s,
            heal_at_s=heal_s))
        report["problems"] = problems[:MAX_PROBLEMS]
        report["ok"] = not problems
        return report
    finally:
        progress.__exit__()
        abort.set()
        work.stop_work.set()
        work.stop_watch.set()
        if nemesis_thread is not None:
            nemesis_thread.join(START_TIMEOUT + 5)  # it may be starting a node: let it finish or give up
        for t in threads:
            t.join(5.0)
        _close_zmq(zctx, harness_errors)
        errors = cluster.shutdown()
        if errors:
            say("cleanup: " + "; ".join(errors))
        with open(workdir / "history.jsonl", "w") as f:
            for op in history.ops:
                f.write(json.dumps(op, separators=(",", ":")) + "\n")
        if "ok" in report:
            (workdir / "report.json").write_text(json.dumps(report, indent=1) + "\n")
            if report["ok"] and not opts.keep_data:
                for n in cluster.nodes:
                    shutil.rmtree(n.data, ignore_errors=True)
            if opts.plot:
                plot(report, history.ops, opts.plot)
