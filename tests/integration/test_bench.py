"""`ledger-bench --smoke` works end to end (figures are never asserted: they are benchmark results)."""

from __future__ import annotations

import json
import shutil

import pytest

from tools import bench

pytestmark = pytest.mark.timeout(180)

LEDGER_SCENARIOS = {"raw_echo_seq", "raw_echo_pipelined", "append_seq", "append_pipelined", "append_batch",
                    "append_sync_pipelined", "get_one", "get_tail100"}


def test_smoke_json_report_has_every_scenario_and_ratio(capsys, tmp_path):
    assert bench.main(["--smoke", "--json", "--workdir", str(tmp_path)]) == 0
    report = json.loads(capsys.readouterr().out)
    results = report["results"]
    assert LEDGER_SCENARIOS <= set(results)
    for name, r in results.items():
        assert set(r) == {"ops_per_s", "p50_us", "p99_us", "n"}, name
        assert r["ops_per_s"] > 0 and r["n"] > 0 and r["p50_us"] > 0, name
    assert results["append_batch"]["n"] == bench.SMOKE.batches * bench.BATCH
    for key in ("append_seq_p50_vs_raw_echo_seq_p50", "append_pipelined_vs_raw_echo_pipelined",
                "get_one_p50_vs_raw_echo_seq_p50", "get_one_p99_us", "rss_mb_1m_entries"):
        assert key in report["ratios"] and isinstance(report["ratios"][key]["met"], bool)
    assert report["memory"]["entries"] == bench.SMOKE.memory_entries and report["memory"]["rss_mb"] > 0
    assert report["environment"]["cpus"] >= 1
    try:
        import redis  # noqa: F401

        has_redis_py = True
    except ImportError:
        has_redis_py = False
    if shutil.which("redis-server") and has_redis_py:
        assert {"redis_xadd_seq", "redis_xadd_pipelined", "redis_xadd_fsync_pipelined"} <= set(results)
    else:  # skipped, and the report says why
        assert any("Redis scenarios skipped" in n for n in report["notes"])
        assert not any(name.startswith("redis_") for name in results)


def test_human_table_and_only_filter(capsys, tmp_path):
    assert bench.main(["--smoke", "--no-memory", "--only", "raw_echo_seq,append_seq",
                       "--workdir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "append_seq" in out and "raw_echo_seq" in out and "append_batch" not in out
    assert "append_seq_p50_vs_raw_echo_seq_p50" in out
