"""ledger-bench: the ledger side by side with a bare pyzmq server and Redis Streams.

Every system runs in its own process on loopback, started here on free ports,
and is driven from this process one scenario slice at a time, interleaved over
several rounds, so that a noisy machine moves all of them alike. Before each
slice it waits (at most 3 s) until the machine is quiet, so no slice is timed
while the previous one's leftovers (compactions, flushes) share the cores. The report
gives each scenario's median throughput and latency percentiles, and the
ratios the targets are stated in (medians of per-round ratios).

Scenarios (256-byte payloads):
  raw_echo_seq, raw_echo_pipelined   a bare ROUTER doing msgpack decode, one SHA-256,
                                     msgpack reply: the transport's limit for a Python node
  append_seq, append_pipelined       the ledger, one request in flight / 1,000 in flight
  append_batch                       batches of 1,000 entries (entries per second)
  append_sync_pipelined              the ledger in --durability sync, 1,000 in flight
  get_one, get_tail100               random single-entry reads among recent entries; last 100
  redis_xadd_seq, redis_xadd_pipelined, redis_xadd_fsync_pipelined
                                     Redis Streams through redis-py (when redis-server is on PATH)
  memory                             node RSS with 1,000,000 entries in 1,000 contexts, and the
                                     time from start to serving them again after a restart
  watch_latency                      appends paced at 1,000/s, 10 watchers (Client.watch) in another
                                     process: time from the append's acknowledgement at the appender
                                     to each watcher's receipt (ops = deliveries, entry x watcher)
  append_pipelined_watched           append_pipelined into a context with 1 stalled watcher (a SUB
                                     socket that never reads, small RCVHWM) and 10 active watchers
  watch_fanout                       1,000 watchers over 100 contexts (10 each) on a node of its own;
                                     every watcher must get every entry of its context once, in
                                     order (ops = deliveries per second, latency = submit to receipt)
  replication_lag                    a 3-node mesh (--heartbeat-ms 500); the writer gets pipelined
                                     appends (1,000 in flight); a Client.watch on each follower, in a
                                     helper process, notes when the follower has each entry: lag = that
                                     minus the append's acknowledgement at the appender (ops = entries
                                     held by both followers per second, first append to last receipt)
  append_pipelined_replicated        append_pipelined on that mesh's writer (2 followers), run next
                                     to append_pipelined in every round
  catch_up                           a follower of another 3-node mesh is killed (-9), misses
                                     200,000 entries (append_batch), is restarted: entries per second
                                     from its restart until its head equals the writer's
  heartbeat_bytes_10k                (a figure, not a scenario) the heartbeat's size on a 2-node mesh
                                     with 10,000 contexts in sync

Floods (issue #12; only when named, e.g. --only flood for all five; tools/flood.py): each on a
node of its own, one hostile client in a process of its own while a well-behaved client appends
one 256-byte entry at a time; its p50/p99 before and during the flood, the node's RSS (start,
peak, after) against the targets p50 <= 5 ms, p99 <= 50 ms, RSS under README's bound:
  flood_unread                       4,000 gets of ~1.1 MiB pages, never read
  flood_idle                         1,100 idle connections (DEALERs that never send)
  flood_big                          junk frames just under the 16 MiB request limit, 8 in flight
  flood_topics                       100,000 watch topics on one SUB socket
  flood_loads                        loads of 1 MiB entries started and never finished
  flood_watchers                     1,000 watchers of the context the second client appends to

Steady rate (issue #17; only when named: --only steady_rate, about a minute and a half):
  steady_rate                        one client appending one 256-byte entry at a time at a steady
                                     200, 1,000 and 2,000 per second (3 s each, 3 rounds) to a node
                                     with the default settings, one with --busy-poll-us 0 and one
                                     with --busy-poll-us 500, alternating: the node's CPU
                                     (/proc/PID/stat) and the p50; node CPU at 2,000/s, default / off,
                                     against the target <= 1.3

Scale (issue #15; only with --scale, never in --quick or the full run; --smoke --scale: tiny sizes):
  contexts curve                     per N in --scale-contexts: N contexts x 10 entries of 64 B on a
                                     fresh node; restart (SIGTERM -> status answers), idle RSS, the
                                     `contexts` listing (first and middle page), an empty node
                                     catching up (time, heads bytes / data bytes)
  entries curve                      one context grown by append_batch of 1,000 x 256 B through
                                     --scale-entries: append rate, write amplification, get_one
                                     p99, head and proof p50, the longest stall of a head probe
                                     sent every 20 ms; restart at the largest size
  Each figure against issue #15's goals (PASS/MISS), and a log-log plot of each over its value
  at the smallest size (--plot-scale; docs/benchmarks-scale.png by default without --smoke).

Where each part lives (the help above ends before this section):

- `common`: scenario and figure names, sizes (SMOKE, QUICK, FULL), targets;
- `procs`, `echo`, `machine`: the processes (nodes, the echo server, Redis), the echo server
  itself, and waiting for a quiet machine (`settle`);
- `drivers`, `watchers`, `mesh`: what drives a node (a DEALER, Redis, paced appends), the
  watcher helper processes, a mesh of nodes;
- `registry`: the scenario registry and the interleaved rounds;
- `scenarios`: one module per family (throughput, watch, mesh, memory, floods);
- `scale`: the scale curves (`--scale`), their goals, table and plot;
- `report`, `cli`: percentiles, the report, table and plot; the command line.
"""

from __future__ import annotations

from .cli import main
from .common import (
                     BATCH,
                     FLOOD_FIGURES,
                     FULL,
                     MESH_SCENARIOS,
                     OTHER_FIGURES,
                     PAYLOAD_SIZE,
                     QUICK,
                     RATIOS,
                     SCENARIOS,
                     SMOKE,
                     WATCH_SCENARIOS,
                     WATCHERS_PER_CONTEXT,
                     WINDOW,
                     Sizes,
)
from .drivers import Dealer, Sample
from .machine import machine_cpu, settle
from .procs import Proc, _raise_fd_limit, free_port, start_echo, start_node, start_redis
from .registry import execute, run_throughput
from .report import build_report, pct, print_table, summarize
from .watchers import Watchers, _WatcherState

__all__ = [
    "BATCH", "FLOOD_FIGURES", "FULL", "MESH_SCENARIOS", "OTHER_FIGURES", "PAYLOAD_SIZE", "QUICK", "RATIOS", "SCENARIOS",
    "SMOKE", "WATCHERS_PER_CONTEXT", "WATCH_SCENARIOS", "WINDOW", "Dealer", "Proc", "Sample", "Sizes", "Watchers",
    "_WatcherState", "_raise_fd_limit", "build_report", "execute", "free_port", "machine_cpu", "main", "pct",
    "print_table", "run_throughput", "settle", "start_echo", "start_node", "start_redis", "summarize",
]
