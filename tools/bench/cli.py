"""`ledger-bench`'s command line: flags, `--only` names, the run (tools.bench.registry), the output.

Also the entry of the helper processes (`_echo PORT_FILE`, `_watchers SPEC`), which
tools/launch.py starts as `python -P -m tools.bench ...`. Exit codes: 0 done (a missed target
is in the report, not the exit code); 1 a node or helper failed; 2 usage; 130 interrupted.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import shutil
import signal
import sys
import tempfile
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

from protocol.errors import LedgerError

from . import scale
from .common import FLOOD_FIGURES, FULL, OTHER_FIGURES, QUICK, SCENARIOS, SMOKE
from .echo import echo_server
from .registry import execute
from .report import build_report, plot, print_table
from .watchers import watchers_main

SCALE_PLOT = "docs/benchmarks-scale.png"
T = TypeVar("T")


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["_echo"]:
        echo_server(args[1])
        return 0
    if args[:1] == ["_watchers"]:
        return watchers_main(args[1])
    from tools import bench  # the package's docstring is the tool's help

    doc = (bench.__doc__ or "").split("\nWhere each part lives")[0]
    p = argparse.ArgumentParser(prog="ledger-bench", description=doc.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n".join(doc.split("\n\n")[1:]))
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="a full pass in about two minutes")
    mode.add_argument("--smoke", action="store_true", help="tiny counts: proves the tool works (CI)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    p.add_argument("--plot", metavar="FILE.png", help="bar chart of the ratios (needs matplotlib)")
    p.add_argument("--only", metavar="NAMES", help="comma-separated scenario names to run")
    p.add_argument("--no-memory", action="store_true", help="skip the 1,000,000-entry memory/restart run")
    p.add_argument("--workdir", help="where nodes keep their data (default: a temporary folder)")
    p.add_argument("--uvloop", action="store_true",
                   help="run the asyncio client's scenarios on uvloop (pip install '.[uvloop]')")
    sc = p.add_argument_group("scale curves (issue #15; not part of --quick or the full run)")
    sc.add_argument("--scale", action="store_true",
                    help="run the scale curves instead: many contexts, and one context grown large "
                         "(with --smoke: tiny sizes)")
    sc.add_argument("--scale-contexts", metavar="N,N,...",
                    help=f"contexts curve sizes (default {','.join(map(str, scale.DEFAULT_CONTEXTS))}; "
                         "an empty string skips the curve)")
    sc.add_argument("--scale-entries", metavar="N,N,...",
                    help=f"entries curve sizes (default {','.join(map(str, scale.DEFAULT_ENTRIES))}; "
                         "an empty string skips the curve)")
    sc.add_argument("--scale-round-robin", metavar="N,N,...",
                    help=f"round-robin curve: {scale.RR_CONTEXTS:,} contexts appended in turn up to these "
                         f"entries (default {','.join(map(str, scale.DEFAULT_ROUND_ROBIN))}; an empty string "
                         "skips the curve)")
    sc.add_argument("--scale-catch-up-timeout", metavar="S", type=float, default=600.0,
                    help="seconds a catch-up may take before it is reported unfinished (default 600)")
    sc.add_argument("--plot-scale", metavar="FILE.png",
                    help=f"log-log plot of the curves (default with --scale, not --smoke: {SCALE_PLOT} "
                         "when matplotlib is installed)")
    ns = p.parse_args(args)
    if ns.scale:
        return _scale_main(p, ns)
    if ns.scale_contexts is not None or ns.scale_entries is not None or ns.scale_round_robin is not None \
            or ns.plot_scale:
        p.error("--scale-contexts, --scale-entries, --scale-round-robin and --plot-scale go with --scale")
    sizes = SMOKE if ns.smoke else QUICK if ns.quick else FULL
    mode_name = "smoke" if ns.smoke else "quick" if ns.quick else "full"
    only = set(ns.only.split(",")) if ns.only else None
    if only and "flood" in only:
        only = (only - {"flood"}) | set(FLOOD_FIGURES)
    known = set(SCENARIOS) | set(OTHER_FIGURES) | set(FLOOD_FIGURES)
    if only and only - known:
        p.error(f"--only: unknown {', '.join(sorted(only - known))} "
                f"(known: {', '.join(SCENARIOS + OTHER_FIGURES + FLOOD_FIGURES)}, flood)")
    if ns.uvloop:
        try:
            import uvloop
        except ImportError:
            p.error("--uvloop: uvloop is not installed (pip install '.[uvloop]')")
        asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    workdir = ns.workdir or tempfile.mkdtemp(prefix="ledger-bench-")
    os.makedirs(workdir, exist_ok=True)

    res, rc = _guarded(lambda: execute(sizes, workdir, ns.json, only, skip={"memory"} if ns.no_memory else set()),
                       None if ns.workdir else workdir)
    if res is None:
        return rc
    report = build_report(res.samples, res.per_round, res.memory, res.notes, mode_name, res.watch, res.mesh,
                          res.floods, res.steady)
    if ns.json:
        print(json.dumps(report))
    else:
        print_table(report)
    if ns.plot:
        plot(report, ns.plot)
    return 0


def _guarded(job: Callable[[], T], remove: str | None) -> tuple[T | None, int]:
    """Run `job` with SIGTERM turned into an interrupt (so that every process started so far is
    stopped on the way out); (its result, 0), or (None, the exit code) after saying why.
    `remove`: a folder to delete afterwards."""
    def on_term(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    try:
        old_term = signal.signal(signal.SIGTERM, on_term)
    except ValueError:  # not the main thread: leave signals alone
        old_term = None
    try:
        return job(), 0
    except KeyboardInterrupt:
        print("ledger-bench: interrupted", file=sys.stderr)
        return None, 130
    except (RuntimeError, LedgerError) as exc:
        print(f"ledger-bench: error: {exc}", file=sys.stderr)
        return None, 1
    finally:
        if old_term is not None:
            signal.signal(signal.SIGTERM, old_term)
        if remove:
            shutil.rmtree(remove, ignore_errors=True)


def _scale_main(p: argparse.ArgumentParser, ns: argparse.Namespace) -> int:
    """`--scale`: the curves of issue #15, their table (or JSON) and plot."""
    if ns.quick or ns.only or ns.no_memory or ns.plot:
        p.error("--scale goes with --smoke, --json, --workdir and the --scale-*/--plot-scale flags only")
    if ns.scale_catch_up_timeout <= 0:
        p.error("--scale-catch-up-timeout must be positive")
    try:
        contexts = _sizes(ns.scale_contexts, scale.SMOKE_CONTEXTS if ns.smoke else scale.DEFAULT_CONTEXTS)
        entries = _sizes(ns.scale_entries, scale.SMOKE_ENTRIES if ns.smoke else scale.DEFAULT_ENTRIES)
        round_robin = _sizes(ns.scale_round_robin,
                             scale.SMOKE_ROUND_ROBIN if ns.smoke else scale.DEFAULT_ROUND_ROBIN)
    except ValueError as exc:
        p.error(f"--scale-contexts/--scale-entries/--scale-round-robin: {exc}")
    if not contexts and not entries and not round_robin:
        p.error("--scale: every curve is skipped")
    plot_path = ns.plot_scale
    if plot_path is None and not ns.smoke:
        if importlib.util.find_spec("matplotlib") is None:
            print("ledger-bench: no plot: matplotlib is not installed (pip install -e '.[plot]' in a checkout)",
                  file=sys.stderr)
        else:
            plot_path = SCALE_PLOT if os.path.isdir(os.path.dirname(SCALE_PLOT)) else os.path.basename(SCALE_PLOT)
    elif plot_path is not None and importlib.util.find_spec("matplotlib") is None:
        p.error("--plot-scale needs matplotlib (pip install -e '.[plot]' in a checkout)")
    workdir = ns.workdir or tempfile.mkdtemp(prefix="ledger-bench-scale-")
    os.makedirs(workdir, exist_ok=True)
    report, rc = _guarded(lambda: scale.run_scale(contexts, entries, workdir, ns.json, ns.scale_catch_up_timeout,
                                                  ns.smoke, round_robin), None if ns.workdir else workdir)
    if report is None:
        return rc
    if ns.json:
        print(json.dumps(report))
    else:
        scale.print_scale_table(report)
    if plot_path:
        scale.plot_scale(report, plot_path)
        print(f"ledger-bench: plot written to {plot_path}", file=sys.stderr)
    return 0


def _sizes(flag: str | None, default: Sequence[int]) -> list[int]:
    if flag is None:
        return list(default)
    return scale.parse_sizes(flag) if flag.strip() else []
