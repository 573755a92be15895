"""The command line: `ledger-chaos` flags, `execute` (a run with parsed options, to an exit code) and `main`.

Exit codes: 0 every check holds; 1 a check failed; 2 usage or environment
(a node that will not start, partitions without root/ip/iptables); 130
interrupted. `--json` prints the report as one JSON object (progress on
stderr); otherwise the summary lines.
"""

from __future__ import annotations

import argparse
import json
import random
import signal
import sys
import threading
from collections.abc import Callable, Sequence
from typing import IO, Any

from .common import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE, PROG, ChaosError, Options
from .netns import partition_support
from .report import summary_lines
from .runner import run


def _positive(kind: type) -> Callable[[str], Any]:
    def conv(text: str) -> Any:
        try:
            v = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
        if not v > 0:
            raise argparse.ArgumentTypeError(f"must be positive, got {text!r}")
        return v
    return conv


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=PROG,
        description="Start a mesh of ledger-node processes, drive a workload, inject faults (kill -9 and restart, "
        "SIGSTOP/SIGCONT, optionally network partitions), heal, and check the history: no acknowledged write "
        "lost, no duplicate, order and causality kept, watchers complete, every node converged. Exit 0 only "
        "when every check holds. The same --seed replays the same fault schedule.",
    )
    p.add_argument("--nodes", type=_positive(int), default=3, help="ledger-node processes (default 3)")
    p.add_argument("--duration", type=_positive(float), default=20.0,
                   help="seconds of workload and faults, before healing (default 20)")
    p.add_argument("--seed", type=int, default=None, help="seed of every random choice (default: a random one, "
                   "printed)")
    p.add_argument("--partitions", action="store_true",
                   help="also partition the network (each node in a network namespace; needs root, ip, iptables)")
    p.add_argument("--json", action="store_true", help="print the report as one JSON object (progress on stderr)")
    p.add_argument("--plot", metavar="FILE.png", help="draw appends over time and the faults (needs matplotlib)")
    p.add_argument("--contexts", type=_positive(int), default=4, help="contexts written (default 4)")
    p.add_argument("--writers", type=_positive(int), default=3, help="appending clients (default 3)")
    p.add_argument("--readers", type=int, default=2, help="reading clients (default 2)")
    p.add_argument("--replicas", type=int, default=0,
                   help="appends ask for replicas=N (default 0: sync durability alone makes an ack durable)")
    p.add_argument("--durability", choices=("sync", "async"), default="sync",
                   help="the nodes' durability (default sync; async is ledger-node's default: an acknowledged "
                   "append may be lost with its writer's unflushed tail, which the checker then allows)")
    p.add_argument("--flush-ms", type=_positive(int), default=500,
                   help="with --durability async: the nodes' flush interval (default 500)")
    p.add_argument("--converge-timeout", type=_positive(float), default=60.0,
                   help="seconds after healing within which every node must hold the same logs (default 60)")
    p.add_argument("--workdir", help="folder for node data, logs, history and report (default: a new temp folder)")
    p.add_argument("--keep-data", action="store_true", help="keep the nodes' data folders after a passing run")
    p.add_argument("--secure", action="store_true", help="every node and client with keys: CURVE on every "
                   "socket, peer and client allowlists (README, \"Security\")")
    p.add_argument("--intruder", action="store_true", help="a stranger keeps trying fake node ids, forged acks "
                   "and loads during the run, without a key, with an unknown one and with a client key; the run "
                   "fails if any is answered (without --secure, they are)")
    p.add_argument("-v", "--verbose", action="store_true", help="print each fault as it is injected")
    return p


def parse_args(argv: Sequence[str] | None = None) -> Options:
    a = build_parser().parse_args(argv)
    if a.readers < 0 or a.replicas < 0:
        build_parser().error("--readers and --replicas must be 0 or more")
    if a.partitions and a.nodes < 2:
        build_parser().error("--partitions needs at least 2 nodes")
    if a.nodes > 32:
        build_parser().error("--nodes must be at most 32")
    seed = a.seed if a.seed is not None else random.SystemRandom().randrange(1 << 32)
    return Options(nodes=a.nodes, duration=a.duration, seed=seed, partitions=a.partitions, json=a.json,
                   plot=a.plot, contexts=a.contexts, writers=a.writers, readers=a.readers, replicas=a.replicas,
                   durability=a.durability, flush_ms=a.flush_ms, converge_timeout=a.converge_timeout, workdir=a.workdir, keep_data=a.keep_data, verbose=a.verbose,
                   secure=a.secure, intruder=a.intruder)


def execute(opts: Options, out: IO[str] | None = None, err: IO[str] | None = None) -> int:
    """Run with parsed options; returns the exit code."""
    out = out or sys.stdout
    err = err or sys.stderr
    if opts.partitions:
        why = partition_support()
        if why is not None:
            err.write(f"{PROG}: error: --partitions is not possible here: {why}. Run as root on Linux with "
                      "iproute2 and iptables installed, or leave out --partitions.\n")
            return EXIT_USAGE
    if opts.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            err.write(f"{PROG}: error: --plot needs matplotlib (pip install -e '.[plot]' in a checkout)\n")
            return EXIT_USAGE
    old: dict[int, Any] = {}

    def on_term(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    if threading.current_thread() is threading.main_thread():
        old[signal.SIGTERM] = signal.signal(signal.SIGTERM, on_term)
    try:
        report = run(opts, out, err)
    except KeyboardInterrupt:
        err.write(f"{PROG}: interrupted; every node was stopped (seed {opts.seed}; logs in the work folder above)\n")
        return EXIT_INTERRUPTED
    except ChaosError as exc:
        err.write(f"{PROG}: error: {exc}\n")
        return EXIT_USAGE
    finally:
        for sig, h in old.items():
            signal.signal(sig, h)
    if opts.json:
        out.write(json.dumps(report, separators=(",", ":")) + "\n")
    else:
        for line in summary_lines(report):
            out.write(line + "\n")
    out.flush()
    return EXIT_OK if report["ok"] else EXIT_FAILED


def main(argv: Sequence[str] | None = None) -> int:
    return execute(parse_args(argv))
