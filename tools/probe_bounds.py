"""The topics and loads floods of issue #12, under their old command line.

    python -m tools.probe_bounds topics [--topics 100000] [--seconds 5] [-- NODE FLAGS...]
    python -m tools.probe_bounds loads [--seconds 20] [-- NODE FLAGS...]

They live in tools/flood.py now (`python -m tools.flood topics|loads`, and `ledger-bench --only
flood_topics,flood_loads` with the issue's targets), which runs the flood in a process of its own
and prints JSON; this only passes the arguments on.
"""

from __future__ import annotations

import shlex
import sys
from collections.abc import Sequence

from tools import flood


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    flags: list[str] = []
    if "--" in args:  # the node's flags
        flags = args[args.index("--") + 1:]
        args = args[:args.index("--")]
    if args[:1] == ["loads"] and "--seconds" not in args:
        args += ["--seconds", "20"]
    if args[:1] == ["topics"] and "--seconds" not in args:
        args += ["--seconds", "5"]
    return flood.main([*args, "--node-flags", shlex.join(flags)])


if __name__ == "__main__":
    sys.exit(main())
