"""The scenarios, one module per family; importing this package registers them (tools.bench.registry,
whose FAMILY_ORDER and RUN_ORDER say in which order they set up and run).

- `throughput`: the `baseline` (echo server, ledger async and sync) and `redis` round families;
- `watch`: the `watch` round family (watch_latency, append_pipelined_watched) and watch_fanout;
- `mesh`: the `mesh` round family (replication_lag, append_pipelined_replicated), catch_up and
  heartbeat_bytes_10k;
- `curve`: the `curve` round family (append_seq_curve, append_pipelined_curve, get_one_curve: a
  node with keys);
- `clients`: the `clients` round family (the synchronous and asyncio reference clients, one
  append at a time and pipelined);
- `memory`, `floods`: the memory/restart run and the floods (tools/flood.py);
- `steady`: steady_rate, a paced client against the default node and one with busy-polling off
  (issue #17; only when named).
"""

from __future__ import annotations

from . import clients, curve, floods, memory, mesh, steady, throughput, watch  # noqa: F401  (registers them)
from .floods import run_floods
from .memory import run_memory
from .steady import run_steady
from .mesh import MeshScenarios, run_catch_up, run_heartbeat
from .watch import run_fanout

__all__ = ["MeshScenarios", "run_catch_up", "run_fanout", "run_floods", "run_heartbeat", "run_memory", "run_steady"]
