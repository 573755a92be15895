"""The floods (issue #12): each on a node of its own, through tools/flood.py; only when named."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ..common import FLOOD_FIGURES, Sizes
from ..machine import settle
from ..registry import Results, run
from ..report import log


def run_floods(sizes: Sizes, names: Sequence[str], workdir: str, quiet: bool) -> dict[str, Any]:
    """Each flood of `names` on a node of its own (tools/flood.py), one after the other."""
    from tools import flood

    o = flood.Opts(seconds=sizes.flood_seconds, gets=sizes.flood_gets, connections=sizes.flood_connections,
                   frame_mib=sizes.flood_frame_mib, topics=sizes.flood_topics, watchers=sizes.flood_watchers,
                   before_seconds=min(2.0, sizes.flood_seconds))
    out = {}
    for name in names:
        kind = name.removeprefix("flood_")
        settle()
        log(f"{name}: {sizes.flood_seconds:g} s under the flood", quiet)
        out[name] = flood.measure(kind, o, workdir)
    return out


@run("floods", lambda only: True)  # --only names them (or "flood"); with no name, none runs
def _floods(sizes: Sizes, workdir: str, quiet: bool, only: set[str] | None, res: Results) -> None:
    res.floods = run_floods(sizes, [n for n in FLOOD_FIGURES if n in (only or ())], workdir, quiet)
