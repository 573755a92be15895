"""Percentiles and summaries of samples, the report (results, ratios against targets, environment),
its table and plot, and progress lines on stderr (`log`)."""

from __future__ import annotations

import asyncio
import os
import platform
import shutil
import statistics
import subprocess
from typing import Any

import msgpack
import zmq

from tools.progress import say

from .common import (
    CATCH_UP_ENTRIES_PER_S,
    HEARTBEAT_BYTES_MAX,
    RATIOS,
    REPLICATION_LAG_P99_MS,
    SCENARIOS,
    WATCH_LATENCY_P99_US,
)
from .drivers import Sample


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    v = sorted(values)
    i = min(len(v) - 1, max(0, int(round(q * (len(v) - 1)))))
    return v[i]


def summarize(samples: list[Sample]) -> dict[str, Any]:
    lat = [x for s in samples for x in s.latencies]
    return {
        "ops_per_s": round(statistics.median(s.ops_per_s for s in samples), 1),
        "p50_us": round(pct(lat, 0.50) * 1e6, 1),
        "p99_us": round(pct(lat, 0.99) * 1e6, 1),
        "n": sum(s.ops for s in samples),
    }


def environment() -> dict[str, Any]:
    import plyvel

    env: dict[str, Any] = {
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "pyzmq": zmq.__version__,
        "libzmq": zmq.zmq_version(),
        "msgpack": ".".join(map(str, msgpack.version)),
        "plyvel": plyvel.__version__,
        # what the asyncio client's scenarios run on (`--uvloop`)
        "event_loop": type(asyncio.get_event_loop_policy()).__module__.split(".")[0],
    }
    try:
        from node import __version__

        env["ledger"] = __version__
    except ImportError:
        pass
    exe = shutil.which("redis-server")
    if exe:
        out = subprocess.run([exe, "--version"], capture_output=True, text=True).stdout
        env["redis_server"] = out.strip()
    return env


def log(msg: str, quiet: bool) -> None:
    """A line that stays on stderr (above the progress line, if one is drawn); none when quiet."""
    say(msg, quiet)


def build_report(samples: dict[str, list[Sample]], per_round: dict[str, list[float]],
                 memory: dict[str, Any] | None, notes: list[str], mode: str,
                 watch: dict[str, Any] | None = None, mesh: dict[str, Any] | None = None,
                 floods: dict[str, Any] | None = None, steady: dict[str, Any] | None = None) -> dict[str, Any]:
    order = [n for n in SCENARIOS if n in samples]
    results = {name: summarize(samples[name]) for name in order}
    ratios: dict[str, Any] = {}
    for name, _num, _fld, _den, dirn, target in RATIOS:
        vals = per_round.get(name)
        if not vals:
            continue
        v = statistics.median(vals)
        ok = v <= target if dirn == "<=" else v >= target
        ratios[name] = {"value": round(v, 3), "target": f"{dirn} {target}", "met": ok,
                        "per_round": [round(x, 3) for x in vals]}
    if "get_one" in results:
        p99 = results["get_one"]["p99_us"]
        ratios["get_one_p99_us"] = {"value": p99, "target": "< 1000", "met": p99 < 1000}
    if "watch_latency" in results:
        p99 = results["watch_latency"]["p99_us"]
        ratios["watch_latency_p99_us"] = {"value": p99, "target": f"<= {WATCH_LATENCY_P99_US}",
                                          "met": p99 <= WATCH_LATENCY_P99_US}
    if watch and "watch_fanout" in watch:
        ok = bool(watch["watch_fanout"]["complete"])
        ratios["watch_fanout_complete"] = {"value": ok, "target": "all", "met": ok}
    if "replication_lag" in results:
        ms = round(results["replication_lag"]["p99_us"] / 1000, 2)
        ratios["replication_lag_p99_ms"] = {"value": ms, "target": f"<= {REPLICATION_LAG_P99_MS}",
                                            "met": ms <= REPLICATION_LAG_P99_MS}
    if "catch_up" in results:
        v = results["catch_up"]["ops_per_s"]
        ratios["catch_up_entries_per_s"] = {"value": v, "target": f">= {CATCH_UP_ENTRIES_PER_S}",
                                            "met": v >= CATCH_UP_ENTRIES_PER_S,
                                            "per_round": [round(x.ops_per_s, 1) for x in samples["catch_up"]]}
    if mesh and "heartbeat" in mesh:
        b = mesh["heartbeat"]["heartbeat_bytes"]
        ratios["heartbeat_bytes_10k_contexts"] = {"value": b, "target": f"<= {HEARTBEAT_BYTES_MAX}",
                                                  "met": b <= HEARTBEAT_BYTES_MAX}
    if memory:
        ratios["rss_mb_1m_entries"] = {"value": memory["rss_mb"], "target": "<= 300", "met": memory["rss_mb"] <= 300}
        ratios["restart_s_1m_entries"] = {"value": memory["restart_s"], "target": "<= 3",
                                          "met": memory["restart_s"] <= 3}
    for name, f in (floods or {}).items():
        for fig, r in f["targets"].items():
            ratios[f"{name}_{fig}"] = r
    if steady and "cpu_ratio" in steady:
        c = steady["cpu_ratio"]
        ratios[c["name"]] = {k: c[k] for k in ("value", "target", "met")}
    return {"mode": mode, "results": results, "ratios": ratios, "memory": memory, "watch": watch or None,
            "mesh": mesh or None, "floods": floods or None, "steady_rate": steady, "environment": environment(),
            "notes": notes}


def print_table(report: dict[str, Any]) -> None:
    res = report["results"]
    print(f"ledger-bench ({report['mode']}), {report['environment']['cpus']} CPUs, "
          f"Python {report['environment']['python']}, libzmq {report['environment']['libzmq']}")
    print(f"{'scenario':30s} {'ops/s':>12s} {'p50 us':>10s} {'p99 us':>10s} {'n':>10s}")
    for name, r in res.items():
        print(f"{name:30s} {r['ops_per_s']:>12,.0f} {r['p50_us']:>10,.1f} {r['p99_us']:>10,.1f} {r['n']:>10,}")
    if report["memory"]:
        m = report["memory"]
        print(f"memory: {m['entries']:,} entries in {m['contexts']:,} contexts: RSS {m['rss_mb']:.0f} MB "
              f"(filled in {m['fill_s']:.1f} s); restart to serving {m['restart_s']:.2f} s")
    for name, w in (report.get("watch") or {}).items():
        print(f"{name}: " + ", ".join(f"{k} {v}" for k, v in w.items()))
    for name, w in (report.get("mesh") or {}).items():
        if name == "nodes":
            print("mesh nodes: " + "; ".join(f"{n['id']} ({n['role']}) {n['entries']:,} entries, pushed "
                                             f"{n['pushed_entries']:,}, pulled {n['pulled_entries']:,}" for n in w))
        elif name == "node_log_problems":
            print(f"mesh: {len(w)} warning(s)/error(s) logged by the nodes (in the JSON report)")
        elif isinstance(w, dict):
            print(f"mesh {name}: " + ", ".join(f"{k} {v}" for k, v in w.items()
                                              if k not in ("rounds", "per_node", "node_log_problems")))
        else:
            print(f"mesh {name}: {w}")
    for name, f in (report.get("floods") or {}).items():
        b, d = f["before"], f["during"]
        print(f"{name}: second client's append p50/p99 {b['p50_ms']}/{b['p99_ms']} ms before, "
              f"{d['p50_ms']}/{d['p99_ms']} ms during ({d['appends']:,} appends; x{f.get('p50_ratio')}/"
              f"x{f.get('p99_ratio')}); node RSS {f['rss_start_mib']:.0f} / {f['rss_peak_mib']:.0f} / "
              f"{f['rss_after_mib']:.0f} MiB (start / peak / after), bound {f['rss_bound_mib']:.0f}; "
              f"flooder {f['flood']}")
    steady = report.get("steady_rate")
    if steady:
        print(f"steady_rate: one client, single 256-byte appends, {steady['seconds']:g} s per rate, "
              f"medians of {steady['rounds']} round(s)")
        for name, per_rate in steady["results"].items():
            print(f"  {name:10s} " + "; ".join(f"{rate}/s: node CPU {r['cpu_pct']}%, p50 {r['p50_us']} us"
                                               for rate, r in per_rate.items()))
    print()
    print(f"{'figure':55s} {'value':>10s}  target")
    for name, r in report["ratios"].items():
        mark = "ok " if r["met"] else "MISS"
        print(f"{name:55s} {r['value']!s:>10}  {r['target']:8s} {mark}")
    for n in report["notes"]:
        print(f"note: {n}")


def plot(report: dict[str, Any], path: str) -> None:
    """The ratios against their targets: a bar each with its value written on it, the target as a
    black tick, and in the label whether it is a floor (at least) or a ceiling (at most)."""
    fig = figure(report)
    fig.savefig(path, dpi=110)
    import matplotlib.pyplot as plt

    plt.close(fig)


def figure(report: dict[str, Any]) -> Any:
    """The plot's figure (tests look at its labels)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        raise SystemExit("ledger-bench: --plot needs matplotlib (pip install -e '.[plot]' in a checkout)") from None
    items = [(k, v) for k, v in report["ratios"].items() if k.endswith(("_p50", "_seq", "_pipelined"))
             or "_vs_" in k]
    names, values, targets, colors = [], [], [], []
    for k, v in items:
        sign, _, number = str(v["target"]).partition(" ")
        kind = "floor" if sign.startswith((">", "≥")) else "ceiling"
        names.append(k.replace("_vs_", " vs ") + f"\n({kind} {number})")
        values.append(float(v["value"]))
        targets.append(float(number))
        colors.append("tab:green" if v["met"] else "tab:red")
    fig, ax = plt.subplots(figsize=(max(8.0, 1.1 * len(values) + 2), 5.5))
    xs = range(len(values))
    bars = ax.bar(xs, values, color=colors)
    for bar, value in zip(bars, values):
        ax.text(bar.get_x() + bar.get_width() / 2, bar.get_height(), f"{value:.2f}", ha="center",
                va="bottom", fontsize=7)
    ax.scatter(xs, targets, marker="_", s=900, color="black", label="target (floor: at least; ceiling: at most)",
               zorder=3)
    ax.set_xticks(list(xs))
    ax.set_xticklabels(names, fontsize=7, rotation=30, ha="right")
    ax.set_ylabel("ratio")
    ax.set_title(f"ledger-bench ({report['mode']}): ratios against baselines (green: target met, red: missed)")
    ax.legend(fontsize="small")
    fig.tight_layout()
    return fig
