"""What every part of `ledger-chaos` shares: its name, exit codes, options and its one error type."""

from __future__ import annotations

from dataclasses import dataclass

PROG = "ledger-chaos"
EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 130
MAX_PROBLEMS = 50         # problems listed in the report (all are counted)


class ChaosError(Exception):
    """The run cannot go on: a node that will not start, a missing tool."""


@dataclass
class Options:
    """A run's settings, as parsed from the command line (`tools.chaos.cli.parse_args`)."""

    nodes: int = 3
    duration: float = 20.0
    seed: int = 0
    partitions: bool = False
    json: bool = False
    plot: str | None = None
    contexts: int = 4
    writers: int = 3
    readers: int = 2
    replicas: int = 0
    durability: str = "sync"
    flush_ms: int = 500
    converge_timeout: float = 60.0
    workdir: str | None = None
    keep_data: bool = False
    verbose: bool = False
    secure: bool = False  # every node and client with keys: CURVE, allowlists (README "Security")
    intruder: bool = False  # a stranger keeps trying issue #14's attacks during the run (intruder.py)
