"""The report: the JSON object a run ends with, its summary lines, and the optional plot.

The report's fields are the run's figures and the checks' counts; `ok` is true
only when no check found a problem. `summary_lines` is what `ledger-chaos`
prints without `--json`; `plot` draws appends over time with the faults as bands.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from typing import Any

from protocol.entry import Entry

from .common import Options
from .plan import KINDS, Plan, node_names


def build_report(opts: Options, plan: Plan, result: Mapping[str, Any], *, executed: Sequence[Mapping[str, Any]],
                 aside: Mapping[str, Mapping[str, str]], watches: Sequence[Mapping[str, Any]],
                 logs: Mapping[str, Sequence[Entry]], crashes: int, forks: int, converged: bool,
                 convergence_s: float | None, heal_at_s: float | None) -> dict[str, Any]:
    """The report's fields after the run's own (seed, nodes, ...) and before `problems` and `ok`;
    `result` is what `checks.check_history` returned."""
    counts = Counter(e["kind"] for e in executed)
    return {
        "faults": {k: counts.get(k, 0) for k in KINDS},
        "acked": result["acked"],
        "durability": opts.durability,
        "lost_acked": result["lost_acked"],
        "lost_in_crash": result["lost_in_crash"],
        "lost_in_crash_set_aside": result["lost_in_crash_set_aside"],
        "set_aside_entries": sum(len(v) for v in aside.values()),
        "served_then_lost": result["served_then_lost"],
        "watch_restarts": sum(len(w["switches"]) for w in watches),
        "duplicates": result["duplicates"],
        "order_violations": result["order_violations"],
        "causality_violations": result["causality_violations"],
        "read_violations": result["read_violations"],
        "watch_violations": result["watch_violations"],
        "phantom_writes": result["phantom_writes"],
        "unexpected_errors": result["unexpected_errors"],
        "writes_failed": result["writes_failed"],
        "writes_unknown": result["writes_unknown"],
        "append_attempts": result["attempts"],
        "reads": result["reads"],
        "watchers": len(watches),
        "watched_entries": sum(len(w["delivered"]) for w in watches),
        "entries": {ctx: len(log) for ctx, log in logs.items()},
        "crashes": crashes,
        "forks": forks,
        "converged": converged,
        "convergence_s": convergence_s,
        "heal_at_s": heal_at_s,
        "schedule": [f.to_json() for f in plan.faults],
        "executed": list(executed),
    }


def summary_lines(rep: Mapping[str, Any]) -> list[str]:
    f = rep["faults"]
    conv = (f"yes, {rep['convergence_s']:.2f} s after healing" if rep["converged"] else "NO")
    lines = [
        f"faults: {f['kill']} kill, {f['pause']} pause, {f['partition']} partition",
        f"writes: {rep['acked']} acknowledged, {rep['writes_failed']} failed, {rep['writes_unknown']} unknown "
        f"({rep['append_attempts']} attempts); {rep['reads']} reads; {rep['watchers']} watchers saw "
        f"{rep['watched_entries']} entries",
        f"durability {rep['durability']}: acknowledged appends lost with a writer's unflushed tail "
        f"{rep['lost_in_crash']} (allowed in async mode; {rep['lost_in_crash_set_aside']} of them kept aside "
        f"by a replica), entries set aside {rep['set_aside_entries']}, reads of a lost tail no node holds any more "
        f"{rep['served_then_lost']}, watcher restarts {rep['watch_restarts']}",
        f"checks: lost acknowledged {rep['lost_acked']}, duplicates {rep['duplicates']}, order "
        f"{rep['order_violations']}, causality {rep['causality_violations']}, reads {rep['read_violations']}, "
        f"watchers {rep['watch_violations']}, phantom {rep['phantom_writes']}, crashes {rep['crashes']}, "
        f"forks {rep['forks']}",
        f"converged: {conv}",
    ]
    if "intruder" in rep:
        i = rep["intruder"]
        lines.append(f"intruder: {i['attempts']} attempts, {i['accepted']} answered (of attacks that must not be)")
    lines += [f"problem: {p}" for p in rep["problems"]]
    lines.append(f"PASS (seed {rep['seed']})" if rep["ok"] else f"FAIL (seed {rep['seed']}; logs and history in {rep['workdir']})")
    return lines


def plot(rep: Mapping[str, Any], ops: Sequence[Mapping[str, Any]], path: str) -> None:
    """Acknowledged, failed and unknown appends per half second, with the faults as bands."""
    import matplotlib.pyplot as plt

    fig = figure(rep, ops)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def figure(rep: Mapping[str, Any], ops: Sequence[Mapping[str, Any]]) -> Any:
    """The plot's figure (tests look at its labels)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    end = max([rep["heal_at_s"] or rep["duration"], *(op.get("complete") or 0 for op in ops)])
    nbins = int(end / 0.5) + 1
    series = {k: [0] * nbins for k in ("ok", "fail", "unknown")}
    for op in ops:
        if op.get("f") == "append" and op.get("complete") is not None and op["complete"] >= 0:
            series[op["type"]][int(op["complete"] / 0.5)] += 1
    fig, ax = plt.subplots(figsize=(12, 4.5))
    xs = [i * 0.5 for i in range(nbins)]
    # appends in greens and greys; faults in red (kill), blue (pause), purple (partition)
    for k, color in (("ok", "tab:green"), ("fail", "tab:orange"), ("unknown", "tab:gray")):
        ax.plot(xs, series[k], label=f"append {k}", color=color, drawstyle="steps-post")
    colors = {"kill": "tab:red", "pause": "tab:blue", "partition": "tab:purple"}
    top = max(max(s) for s in series.values()) or 1
    names = node_names(rep["nodes"])
    kinds = {e["kind"] for e in rep["executed"]}
    rows = names + (["partitions"] if "partition" in kinds else [])
    for e in rep["executed"]:
        end_t = e["ended"] if e["ended"] is not None else rep["heal_at_s"]
        row = names.index(e["nodes"][0]) if e["kind"] != "partition" else len(names)
        y0 = top * (1.05 + 0.08 * row)
        ax.plot([e["began"], end_t], [y0, y0], color=colors[e["kind"]], linewidth=5, solid_capstyle="butt")
    for row, label in enumerate(rows):  # each fault row named at its left
        ax.text(-0.01, top * (1.05 + 0.08 * row), label, transform=ax.get_yaxis_transform(), ha="right",
                va="center", fontsize=7)
    for k, c in colors.items():
        if k in kinds:  # only the faults that happened
            ax.plot([], [], color=c, linewidth=5, label=k)
    if rep["heal_at_s"] is not None:
        ax.axvline(rep["heal_at_s"], color="black", linestyle="--", linewidth=1, label="healed")
    ax.set_xlabel("seconds into the fault phase")
    ax.set_ylabel("appends per 0.5 s (faults above, a row per node)")
    ax.set_title(f"ledger-chaos seed {rep['seed']}: {rep['acked']} acknowledged, {rep['lost_acked']} lost, "
                 + (f"converged in {rep['convergence_s']:.2f} s" if rep["converged"] else "NOT converged"))
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize="small")
    fig.tight_layout()
    return fig
