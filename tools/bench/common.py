"""What every part of `ledger-bench` shares: scenario and figure names, sizes (SMOKE, QUICK, FULL),
fixed parameters (payload size, window, batch, watchers per context) and the targets of the report."""

from __future__ import annotations

from dataclasses import dataclass

SCENARIOS = (
    "raw_echo_seq", "raw_echo_pipelined", "append_seq", "append_pipelined", "append_batch",
    "append_sync_pipelined", "get_one", "get_tail100", "redis_xadd_seq", "redis_xadd_pipelined",
    "redis_xadd_fsync_pipelined", "watch_latency", "append_pipelined_watched", "watch_fanout",
    "replication_lag", "append_pipelined_replicated", "catch_up",
    "append_seq_curve", "append_pipelined_curve", "get_one_curve",
    "client_append_seq", "client_append_pipelined", "aio_append_seq", "aio_append_pipelined", "aio_append_gather",
)
CURVE_SCENARIOS = ("append_seq_curve", "append_pipelined_curve", "get_one_curve")  # a node with keys
# the reference clients themselves, synchronous and asyncio (issue #16)
CLIENT_SCENARIOS = ("client_append_seq", "client_append_pipelined", "aio_append_seq", "aio_append_pipelined",
                    "aio_append_gather")
WATCH_SCENARIOS = ("watch_latency", "append_pipelined_watched")
MESH_SCENARIOS = ("replication_lag", "append_pipelined_replicated")  # on one 3-node mesh, in the rounds
# what --only accepts besides SCENARIOS: figures that are not a throughput scenario
OTHER_FIGURES = ("memory", "heartbeat_bytes_10k", "steady_rate")
FLOOD_FIGURES = ("flood_unread", "flood_idle", "flood_big", "flood_topics", "flood_loads", "flood_watchers")  # --only flood: all
PAYLOAD_SIZE = 256
WINDOW = 1000
BATCH = 1000
WATCH_RATE = 1000  # appends per second in watch_latency
WATCHERS_PER_CONTEXT = 10
LATENCY_CONTEXT = "watch-latency"
WATCHED_CONTEXT = "watched"
STALLED_RCVHWM = 10  # messages the stalled watcher's SUB socket queues before ZeroMQ stops reading
STALLED_RCVBUF = 4096  # bytes of kernel receive buffer, so the stall reaches the node quickly
FANOUT_PROCS = 2  # processes the fan-out watchers are split over (one poller each)


@dataclass
class Sizes:
    rounds: int
    seq: int
    pipelined: int
    batches: int
    sync_pipelined: int
    gets: int
    memory_entries: int
    memory_contexts: int
    watch_appends: int  # appends per round in watch_latency (at WATCH_RATE per second)
    fanout_contexts: int  # watch_fanout: WATCHERS_PER_CONTEXT watchers of each
    fanout_entries: int  # entries appended to each context per fan-out round
    catch_up_entries: int  # entries a killed follower misses per catch_up round (a multiple of BATCH)
    heartbeat_contexts: int  # contexts in sync when heartbeat_bytes_10k reads the heartbeat size
    flood_seconds: float = 10.0  # the second client timed during each flood
    flood_gets: int = 4000  # flood_unread
    flood_connections: int = 1100  # flood_idle
    flood_frame_mib: float = 15.9  # flood_big: just under the 16 MiB request limit (a larger frame is dropped)
    flood_topics: int = 100_000  # flood_topics
    flood_watchers: int = 1000  # flood_watchers (the default --max-watchers-per-context)
    steady_rates: tuple[int, ...] = (200, 1000, 2000)  # steady_rate: appends per second, one at a time
    steady_seconds: float = 3.0  # each rate on each node, per round
    steady_rounds: int = 3


QUICK = Sizes(rounds=3, seq=1500, pipelined=20_000, batches=30, sync_pipelined=10_000, gets=1500,
              memory_entries=1_000_000, memory_contexts=1000, watch_appends=2000, fanout_contexts=100,
              fanout_entries=50, catch_up_entries=200_000, heartbeat_contexts=10_000, flood_seconds=5.0)
FULL = Sizes(rounds=7, seq=5000, pipelined=60_000, batches=100, sync_pipelined=30_000, gets=5000,
             memory_entries=1_000_000, memory_contexts=1000, watch_appends=5000, fanout_contexts=100,
             fanout_entries=100, catch_up_entries=200_000, heartbeat_contexts=10_000)
SMOKE = Sizes(rounds=1, seq=20, pipelined=200, batches=2, sync_pipelined=100, gets=20,
              memory_entries=2000, memory_contexts=10, watch_appends=50, fanout_contexts=100,
              fanout_entries=3, catch_up_entries=2000, heartbeat_contexts=200, flood_seconds=1.0,
              flood_gets=50, flood_connections=20, flood_frame_mib=0.25, flood_topics=200, flood_watchers=20,
              steady_rates=(100, 400), steady_seconds=0.3, steady_rounds=1)


RATIOS: list[tuple[str, str, str, str, str, float]] = [
    # name, numerator scenario, field, denominator scenario, direction, target
    ("append_seq_p50_vs_raw_echo_seq_p50", "append_seq", "p50_us", "raw_echo_seq", "<=", 1.3),
    ("append_seq_vs_redis_xadd_seq", "append_seq", "ops_per_s", "redis_xadd_seq", ">=", 0.9),
    ("append_pipelined_vs_raw_echo_pipelined", "append_pipelined", "ops_per_s", "raw_echo_pipelined", ">=", 0.6),
    ("append_batch_vs_redis_xadd_pipelined", "append_batch", "ops_per_s", "redis_xadd_pipelined", ">=", 2.0),
    ("append_sync_pipelined_vs_redis_xadd_fsync_pipelined", "append_sync_pipelined", "ops_per_s",
     "redis_xadd_fsync_pipelined", ">=", 1.0),
    ("get_one_p50_vs_raw_echo_seq_p50", "get_one", "p50_us", "raw_echo_seq", "<=", 1.3),
    ("append_pipelined_watched_vs_append_pipelined", "append_pipelined_watched", "ops_per_s", "append_pipelined",
     ">=", 0.9),
    ("append_pipelined_replicated_vs_append_pipelined", "append_pipelined_replicated", "ops_per_s",
     "append_pipelined", ">=", 0.8),
    # a node with keys (CURVE, allowlists) against the plain node, same requests (issue #14)
    ("append_seq_curve_p50_vs_append_seq_p50", "append_seq_curve", "p50_us", "append_seq", "<=", 1.2),
    ("append_pipelined_curve_vs_append_pipelined", "append_pipelined_curve", "ops_per_s", "append_pipelined",
     ">=", 0.8),
    ("get_one_curve_p50_vs_get_one_p50", "get_one_curve", "p50_us", "get_one", "<=", 1.2),
    # the asyncio client against the synchronous one, the same appends (issue #16)
    ("aio_append_pipelined_vs_client_append_pipelined", "aio_append_pipelined", "ops_per_s",
     "client_append_pipelined", ">=", 0.8),
    ("aio_append_gather_vs_client_append_pipelined", "aio_append_gather", "ops_per_s", "client_append_pipelined",
     ">=", 0.8),
    ("aio_append_seq_p50_vs_client_append_seq_p50", "aio_append_seq", "p50_us", "client_append_seq", "<=", 1.2),
]
WATCH_LATENCY_P99_US = 5000
REPLICATION_LAG_P99_MS = 100
CATCH_UP_ENTRIES_PER_S = 100_000
HEARTBEAT_BYTES_MAX = 2048
STEADY_CPU_RATIO_MAX = 1.3  # steady_rate: node CPU at the top rate, default settings / busy-polling off
