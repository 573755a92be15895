"""`ledger-chaos`: a seeded chaos run against a real mesh of `ledger-node` processes.

Theory of operation
-------------------
One `random.Random(seed)` makes every random choice: first the whole fault
schedule, then one seed per workload thread. The schedule is fixed before the
first node starts, as offsets from the start of the fault phase, so the same
seed replays the same faults whatever the nodes do (the workload replays its
choices too, as far as the outcomes it sees are the same).

A run:

1. Start N nodes with `--durability sync` (acknowledged means fsynced, so it
   survives kill -9), or `--durability async` (the default of ledger-node:
   acknowledged means in RAM, on disk within `--flush-ms`), and fast heartbeats:
   on loopback on free ports, or, with `--partitions`, each in its own network
   namespace joined by a bridge.
2. Create every context at a chosen writer (spread over the nodes) and wait
   until every node holds all of them. The workload never creates a context,
   so a fork can only come from a bug, never from two nodes creating one name.
3. For `--duration` seconds: writers append with a dedup_id, retries and a
   causal token (`after_lamport` = the largest lamport they observed), readers
   read, one watcher per context follows it from seq 0, and the nemesis runs
   the schedule: kill -9 and restart on the same ports and data folder,
   SIGSTOP/SIGCONT, and iptables partitions.
4. Heal everything (restart, SIGCONT, flush the rules), wait until every node
   has the same (size, root) for every context, let the watchers catch up,
   read the final logs and check them against the history.

Every operation is recorded with its invoke and completion times and an
outcome (`ok`, `fail`, `unknown`). The checks are pure, one per property (lost
acknowledged writes, duplicates, order, causality, reads, watches, writes that
every attempt saw fail yet exist, unexpected errors, and on the final state
convergence and forks), each judged by the promise of the durability mode: in
async mode an acknowledged append may be lost with its writer's unflushed tail,
and nothing else.

Where each part lives:

- `plan`: the seeded schedule of faults and the workload's seeds (pure);
- `node`, `cluster`, `netns`: the node processes, the mesh, partitions;
- `workload`, `history`: the clients and the record of what they did;
- `nemesis`: the faults, run on schedule, and crash detection;
- `checks`: one pure checker per property, `check_history` runs them;
- `runner`, `report`, `cli`: one run end to end, its report and plot, the command line.

Exit codes: 0 every check holds; 1 a check failed; 2 usage or environment; 130
interrupted. Every node is stopped in all cases (SIGCONT first if paused) and
the network namespaces are removed; node logs stay in the work folder.
"""

from __future__ import annotations

from .checks import CRASH_SLACK_S, STALE_S, check_history
from .cli import build_parser, execute, main, parse_args
from .common import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_OK, EXIT_USAGE, PROG, ChaosError, Options
from .netns import partition_support
from .node import NodeProc, free_port_block
from .plan import Fault, Plan, make_plan, node_names, plan_faults
from .report import summary_lines
from .runner import run

__all__ = [
    "CRASH_SLACK_S", "EXIT_FAILED", "EXIT_INTERRUPTED", "EXIT_OK", "EXIT_USAGE", "PROG", "STALE_S", "ChaosError",
    "Fault", "NodeProc", "Options", "Plan", "build_parser", "check_history", "execute", "free_port_block", "main",
    "make_plan", "node_names", "parse_args", "partition_support", "plan_faults", "run", "summary_lines",
]
