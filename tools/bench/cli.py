"""`ledger-bench`'s command line: flags, `--only` names, the run (tools.bench.registry), the output.

Also the entry of the helper processes (`_echo PORT_FILE`, `_watchers SPEC`), which
tools/launch.py starts as `python -P -m tools.bench ...`. Exit codes: 0 done (a missed target
is in the report, not the exit code); 1 a node or helper failed; 2 usage; 130 interrupted.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import sys
import tempfile
from collections.abc import Sequence
from typing import Any

from protocol.errors import LedgerError

from .common import FLOOD_FIGURES, FULL, OTHER_FIGURES, QUICK, SCENARIOS, SMOKE
from .echo import echo_server
from .registry import execute
from .report import build_report, plot, print_table
from .watchers import watchers_main


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
    ns = p.parse_args(args)
    sizes = SMOKE if ns.smoke else QUICK if ns.quick else FULL
    mode_name = "smoke" if ns.smoke else "quick" if ns.quick else "full"
    only = set(ns.only.split(",")) if ns.only else None
    if only and "flood" in only:
        only = (only - {"flood"}) | set(FLOOD_FIGURES)
    known = set(SCENARIOS) | set(OTHER_FIGURES) | set(FLOOD_FIGURES)
    if only and only - known:
        p.error(f"--only: unknown {', '.join(sorted(only - known))} "
                f"(known: {', '.join(SCENARIOS + OTHER_FIGURES + FLOOD_FIGURES)}, flood)")
    workdir = ns.workdir or tempfile.mkdtemp(prefix="ledger-bench-")
    os.makedirs(workdir, exist_ok=True)

    def on_term(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt  # unwind, so that every process started so far is stopped

    try:
        old_term = signal.signal(signal.SIGTERM, on_term)
    except ValueError:  # not the main thread: leave signals alone
        old_term = None
    try:
        res = execute(sizes, workdir, ns.json, only, skip={"memory"} if ns.no_memory else set())
    except KeyboardInterrupt:
        print("ledger-bench: interrupted", file=sys.stderr)
        return 130
    except (RuntimeError, LedgerError) as exc:
        print(f"ledger-bench: error: {exc}", file=sys.stderr)
        return 1
    finally:
        if old_term is not None:
            signal.signal(signal.SIGTERM, old_term)
        if not ns.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
    report = build_report(res.samples, res.per_round, res.memory, res.notes, mode_name, res.watch, res.mesh,
                          res.floods)
    if ns.json:
        print(json.dumps(report))
    else:
        print_table(report)
    if ns.plot:
        plot(report, ns.plot)
    return 0
