"""The plots of ledger-chaos and ledger-bench, built from small reports: what they say is right."""

from __future__ import annotations

import pytest

matplotlib = pytest.importorskip("matplotlib")

from tools.bench import report as bench_report  # noqa: E402
from tools.chaos import report as chaos_report  # noqa: E402

pytestmark = pytest.mark.timeout(60)


def _chaos(kinds: list[str]) -> tuple[dict, list[dict]]:
    executed = [{"kind": k, "nodes": ["n2"] if k != "partition" else ["n1", "n2"], "began": 1.0 + i,
                 "ended": 1.5 + i} for i, k in enumerate(kinds)]
    rep = {"nodes": 3, "executed": executed, "heal_at_s": 6.0, "duration": 6.0, "seed": 7, "acked": 3,
           "lost_acked": 0, "converged": True, "convergence_s": 0.25}
    ops = [{"f": "append", "type": t, "complete": 0.2 * i} for i, t in enumerate(["ok", "ok", "fail", "unknown"])]
    return rep, ops


def _texts(fig) -> tuple[list[str], list[str]]:
    ax = fig.axes[0]
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    return legend, [t.get_text() for t in ax.texts]


def test_the_chaos_plot_names_each_fault_row_and_lists_only_faults_that_happened(tmp_path):
    rep, ops = _chaos(["kill", "pause"])
    fig = chaos_report.figure(rep, ops)
    legend, labels = _texts(fig)
    assert "partition" not in legend and {"kill", "pause", "append unknown"} <= set(legend)
    assert labels == ["n1", "n2", "n3"]  # the rows, named; no partitions row
    colors = {line.get_label(): matplotlib.colors.to_hex(line.get_color()) for line in fig.axes[0].get_lines()}
    assert colors["append unknown"] != colors["kill"]
    chaos_report.plot(rep, ops, str(tmp_path / "c.png"))
    assert (tmp_path / "c.png").stat().st_size > 1000


def test_the_chaos_plot_has_a_partitions_row_when_there_were_some():
    fig = chaos_report.figure(*_chaos(["partition"]))
    legend, labels = _texts(fig)
    assert "partition" in legend and labels[-1] == "partitions"


def test_the_bench_plot_writes_each_value_and_says_floor_or_ceiling(tmp_path):
    rep = {"mode": "quick", "ratios": {
        "append_seq_vs_echo_seq": {"value": 1.234, "target": "<= 1.3", "met": True},
        "append_pipelined_vs_redis_pipelined": {"value": 0.5, "target": ">= 0.8", "met": False},
    }}
    fig = bench_report.figure(rep)
    ax = fig.axes[0]
    assert [t.get_text() for t in ax.texts] == ["1.23", "0.50"]
    ticks = [t.get_text() for t in ax.get_xticklabels()]
    assert "(ceiling 1.3)" in ticks[0] and "(floor 0.8)" in ticks[1]
    bench_report.plot(rep, str(tmp_path / "b.png"))
    assert (tmp_path / "b.png").stat().st_size > 1000
