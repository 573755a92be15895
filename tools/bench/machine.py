"""The whole machine's CPU (/proc/stat) and `settle`: wait until it is quiet before a scenario is timed."""

from __future__ import annotations

import os
import time


def machine_cpu() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine so far, all cores (/proc/stat)."""
    try:
        with open("/proc/stat") as f:
            # user nice system idle iowait irq softirq steal (guest time is already in user/nice)
            vals = [int(x) for x in f.readline().split()[1:9]]
    except (OSError, ValueError):
        return float("nan"), float("nan")
    tick = os.sysconf("SC_CLK_TCK")
    idle = vals[3] + (vals[4] if len(vals) > 4 else 0)
    return (sum(vals) - idle) / tick, sum(vals) / tick


SETTLE_BUSY_CORES = 0.3  # the machine counts as quiet below this many busy cores ...
SETTLE_SAMPLE_S = 0.1  # ... over a sample this long
SETTLE_MAX_S = 3.0  # and a scenario waits at most this long for it


def settle(max_s: float = SETTLE_MAX_S) -> float:
    """Wait until the machine is quiet, so a scenario is not timed while another one's
    leftovers (LevelDB compactions, a flush, a watcher catching up) share the cores.
    Returns the seconds waited; after `max_s` it goes on anyway."""
    t0 = t1 = time.monotonic()
    busy0, _ = machine_cpu()
    if busy0 != busy0:  # no /proc/stat: nothing to wait for
        return 0.0
    while True:
        time.sleep(SETTLE_SAMPLE_S)
        busy1, _ = machine_cpu()
        t2 = time.monotonic()
        if (busy1 - busy0) / max(t2 - t1, 1e-3) < SETTLE_BUSY_CORES or t2 - t0 >= max_s:
            return t2 - t0
        busy0, t1 = busy1, t2
