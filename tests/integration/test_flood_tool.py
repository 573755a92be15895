"""tools/flood.py, the hostile-client measurer of docs/benchmarks.md "Floods", alone and through
`ledger-bench --only flood_...`: short runs that prove the tool works (figures are never asserted)."""

from __future__ import annotations

import json

import pytest

from tests.integration.test_bench import _children
from tools import bench, flood, probe_bounds


@pytest.mark.timeout(90)
@pytest.mark.parametrize("args", [
    ["big", "--frame-mib", "0.25", "--seconds", "1"],
    ["unread", "--gets", "50", "--seconds", "1"],
    ["idle", "--connections", "20", "--seconds", "1"],
    ["topics", "--topics", "50", "--seconds", "1"],
    ["watchers", "--watchers", "20", "--seconds", "1", "--node-flags", "--max-watchers-per-context 15"],
])
def test_each_flood_runs_bounded_and_reports_the_second_client(args, capsys):
    before = _children()
    assert flood.main(args) == 0
    assert _children() <= before, "the flooder or the node was left running"
    out = json.loads(capsys.readouterr().out)
    assert out["what"] == args[0]
    assert out["during"]["appends"] > 0 and out["during"]["p99_ms"] > 0  # the well-behaved client was served
    assert out["rss_peak_mib"] >= out["rss_start_mib"] > 0
    assert out["node_alive"] is True
    if args[0] == "big":
        assert out["flood"]["answered"] > 0  # junk under the size limit: each got an error reply
    if args[0] == "topics":
        assert out["status"]["watched_contexts"] == 50  # the flooder's subscriptions reached the node
    if args[0] == "watchers":
        assert out["flood"]["subscribed"] == 20 and out["status"]["watchers_refused"] == 5
        # every watcher was answered (greeted, or refused and told); entries may be dropped at a busy
        # reader (nice 19) on a loaded machine, so they are not counted here
        assert out["flood"]["greeted"] == 20 and out["flood"]["received"] >= 20
        assert out["during"]["node_cpu_us_per_append"] > 0


@pytest.mark.timeout(120)
def test_the_old_probe_command_runs_the_loads_flood_with_node_flags(capsys):
    assert probe_bounds.main(["loads", "--seconds", "1", "--", "--max-loads", "1"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["what"] == "loads" and out["node_flags"] == ["--max-loads", "1"]
    assert out["flood"]["staged"] > 0 and out["flood"]["refused"] > 0  # the bound refused the second load
    assert out["data_mib_after_restart"] <= out["data_mib"]


@pytest.mark.timeout(180)
def test_ledger_bench_runs_floods_and_judges_them_against_the_targets(capsys, tmp_path):
    before = _children()
    assert bench.main(["--smoke", "--json", "--workdir", str(tmp_path), "--only", "flood_big,flood_unread"]) == 0
    assert _children() <= before, "ledger-bench left processes running"
    report = json.loads(capsys.readouterr().out)
    assert report["results"] == {} and report["memory"] is None  # nothing but the floods ran
    assert set(report["floods"]) == {"flood_big", "flood_unread"}
    for name, f in report["floods"].items():
        assert f["node_alive"] is True, name
        for phase in ("before", "during"):
            assert f[phase]["appends"] > 0 and f[phase]["p50_ms"] > 0, (name, phase)
        assert f["rss_start_mib"] > 0 and f["rss_peak_mib"] >= f["rss_start_mib"] and f["rss_after_mib"] > 0
        assert f["rss_bound_mib"] > f["rss_start_mib"] and f["p50_ratio"] > 0
        for fig in ("p50_ms", "p99_ms", "rss_peak_mib", "node_alive"):
            r = report["ratios"][f"{name}_{fig}"]
            assert isinstance(r["met"], bool) and r["target"], (name, fig)
    assert report["floods"]["flood_big"]["flood"]["frame_mib"] == bench.SMOKE.flood_frame_mib


@pytest.mark.timeout(30)
def test_a_second_client_that_is_not_served_is_a_missed_target_not_a_crash():
    during = flood.measure_appends(f"tcp://127.0.0.1:{bench.free_port()}", 1.0)  # nobody there
    assert during["appends"] == 0 and during["p50_ms"] is None and "nothing listening" in during["error"]  # (refused, not waited out)
    out = {"before": during, "during": during, "rss_peak_mib": 50.0, "rss_bound_mib": 100.0, "node_alive": True}
    targets = flood.verdict(out)
    assert targets["p50_ms"]["met"] is False and targets["p99_ms"]["met"] is False
    assert targets["rss_peak_mib"]["met"] is True


def test_bounds_and_names_are_refused():
    with pytest.raises(SystemExit):
        flood.main(["big", "--frame-mib", "100"])
    with pytest.raises(SystemExit):
        bench.main(["--smoke", "--only", "flood_nope"])


@pytest.mark.timeout(30)
def test_the_rss_bound_counts_the_requests_held_while_storage_is_behind():
    status = {"hot_limit": 64 << 20, "max_client_queue": 32 << 20, "max_request": 16 << 20}
    small = flood.rss_bound_mib(100.0, {**status, "config": {"write-buffer": 1 << 20}})
    default = flood.rss_bound_mib(100.0, {**status, "config": {"write-buffer": 16 << 20}})
    assert default - small == 15.0 and flood.rss_bound_mib(100.0, status) == default  # (16 MiB if not told)
    assert default == 100.0 + 64 + 32 + 32 + 16 + flood.RSS_SLACK_MIB
