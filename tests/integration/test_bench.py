"""`ledger-bench --smoke` works end to end (figures are never asserted: they are benchmark results)."""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from tools import bench

pytestmark = pytest.mark.timeout(180)

LEDGER_SCENARIOS = {"raw_echo_seq", "raw_echo_pipelined", "append_seq", "append_pipelined", "append_batch",
                    "append_sync_pipelined", "get_one", "get_tail100"}
WATCH_SCENARIOS = {"watch_latency", "append_pipelined_watched", "watch_fanout"}
MESH_SCENARIOS = {"replication_lag", "append_pipelined_replicated", "catch_up"}
CLIENT_SCENARIOS = {"client_append_seq", "client_append_pipelined", "aio_append_seq", "aio_append_pipelined",
                    "aio_append_gather"}
MESH_FIGURES = {"replication_lag_p99_ms", "append_pipelined_replicated_vs_append_pipelined", "catch_up_entries_per_s",
                "heartbeat_bytes_10k_contexts"}


def _children() -> set[int]:
    """Live processes whose parent is this one (reaped ones are gone from /proc)."""
    me = os.getpid()
    out = set()
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == me:
            out.add(int(d))
    return out


def test_smoke_json_report_has_every_scenario_and_ratio(capsys, tmp_path):
    before = _children()
    assert bench.main(["--smoke", "--json", "--workdir", str(tmp_path)]) == 0
    assert _children() <= before, "ledger-bench left processes running"
    report = json.loads(capsys.readouterr().out)
    results = report["results"]
    assert LEDGER_SCENARIOS | WATCH_SCENARIOS | MESH_SCENARIOS | CLIENT_SCENARIOS <= set(results)
    for name, r in results.items():
        assert set(r) == {"ops_per_s", "p50_us", "p99_us", "n"}, name
        assert r["ops_per_s"] > 0 and r["n"] > 0 and r["p50_us"] > 0, name
    assert results["append_batch"]["n"] == bench.SMOKE.batches * bench.BATCH
    for key in ("append_seq_p50_vs_raw_echo_seq_p50", "append_pipelined_vs_raw_echo_pipelined",
                "get_one_p50_vs_raw_echo_seq_p50", "get_one_p99_us", "rss_mb_1m_entries",
                "append_pipelined_watched_vs_append_pipelined", "watch_latency_p99_us", "watch_fanout_complete",
                "aio_append_pipelined_vs_client_append_pipelined", "aio_append_gather_vs_client_append_pipelined",
                "aio_append_seq_p50_vs_client_append_seq_p50",
                *MESH_FIGURES):
        assert key in report["ratios"] and isinstance(report["ratios"][key]["met"], bool)
    assert {"replication_lag", "append_pipelined_replicated", "catch_up", "heartbeat"} <= set(report["mesh"])
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


def test_smoke_watch_scenarios_deliver_every_entry_once_in_order(capsys, tmp_path):
    """Correctness of what the watch scenarios measure (never their speed)."""
    before = _children()
    assert bench.main(["--smoke", "--json", "--no-memory", "--workdir", str(tmp_path), "--only",
                       "append_pipelined,append_pipelined_watched,watch_latency,watch_fanout"]) == 0
    assert _children() <= before, "ledger-bench left processes running"
    report = json.loads(capsys.readouterr().out)
    results, ratios, watch = report["results"], report["ratios"], report["watch"]
    assert set(results) == {"append_pipelined"} | WATCH_SCENARIOS
    w = bench.WATCHERS_PER_CONTEXT
    # every watcher received every entry, so every acknowledgement has its receipts
    assert results["watch_latency"]["n"] == bench.SMOKE.rounds * bench.SMOKE.watch_appends * w
    assert results["append_pipelined_watched"]["n"] == bench.SMOKE.rounds * bench.SMOKE.pipelined
    for name in ("watch_latency", "append_pipelined_watched"):
        assert watch[name]["errors"] == 0 and watch[name]["outages"] == 0, watch[name]
    assert watch["node"]["watchers_at_end"] == 2 * w + 1  # the stalled watcher is still subscribed
    fan = watch["watch_fanout"]
    assert fan["watchers"] == bench.SMOKE.fanout_contexts * w == 1000
    assert fan["complete"] is True and fan["errors"] == 0
    assert fan["deliveries"] == results["watch_fanout"]["n"] == (
        bench.SMOKE.rounds * bench.SMOKE.fanout_contexts * bench.SMOKE.fanout_entries * w)
    assert ratios["watch_fanout_complete"] == {"value": True, "target": "all", "met": True}
    assert ratios["watch_latency_p99_us"]["target"] == "<= 5000"
    assert ratios["append_pipelined_watched_vs_append_pipelined"]["target"] == ">= 0.9"
    # (a loaded machine that did not quiet down before a slice is reported, not a failure)
    assert not report["notes"] or all("Redis" in n or "did not quiet down" in n for n in report["notes"])


def test_smoke_mesh_scenarios_replicate_every_entry_and_catch_up_exactly(
        capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """Correctness of what the mesh scenarios measure (never their speed)."""
    before = _children()
    assert bench.main(["--smoke", "--json", "--no-memory", "--workdir", str(tmp_path), "--only",
                       "append_pipelined,replication_lag,append_pipelined_replicated,catch_up,heartbeat_bytes_10k"]) == 0
    assert _children() <= before, "ledger-bench left processes running"
    report = json.loads(capsys.readouterr().out)
    results, ratios, mesh = report["results"], report["ratios"], report["mesh"]
    assert set(results) == {"append_pipelined"} | MESH_SCENARIOS
    assert set(ratios) == MESH_FIGURES
    s = bench.SMOKE
    # every follower's watcher received every entry appended at the writer, in order
    lag = mesh["replication_lag"]
    assert results["replication_lag"]["n"] == s.rounds * s.pipelined and lag["missing"] == 0
    followers = [k for k in lag if k.startswith("mesh-")]
    assert sorted(followers) == ["mesh-2", "mesh-3"]
    for f in followers:
        assert lag[f]["n"] == s.rounds * s.pipelined, (f, lag[f])
    assert len(lag["p50_ms_by_tenth_of_burst"]) == 10
    assert results["append_pipelined_replicated"]["n"] == s.rounds * s.pipelined
    assert len(mesh["append_pipelined_replicated"]["followers_done_after_s_per_round"]) == s.rounds
    # the mesh's 3 nodes ended with the same entries, no fork
    nodes = mesh["nodes"]
    assert [n["role"] for n in nodes] == ["writer", "follower", "follower"]
    assert len({n["entries"] for n in nodes}) == 1 and all(n["forks"] == 0 for n in nodes)
    # catch-up ended with equal heads, and the restarted follower pulled exactly what it missed
    cu = mesh["catch_up"]
    assert cu["equal_heads"] is True and len(cu["rounds"]) == s.rounds
    assert results["catch_up"]["n"] == s.rounds * s.catch_up_entries
    for r in cu["rounds"]:
        assert r["missing"] == s.catch_up_entries
        assert r["pulled_entries"] == s.catch_up_entries and r["pushed_entries"] == 0, r
        assert r["pulled_bytes"] >= s.catch_up_entries * cu["entry_bytes_in_a_pull"] * 0.99, r
        assert 0 < r["ready_s"] <= r["first_entry_s"] <= r["catch_up_s"]
        assert set(r["cpu_us_per_entry"]) == {"catchup-1", "catchup-2", "catchup-3"}
    assert ratios["catch_up_entries_per_s"]["value"] == results["catch_up"]["ops_per_s"]
    # heartbeats of contexts in sync: read from both nodes, nothing pulled while in sync
    hb = mesh["heartbeat"]
    assert hb["contexts"] == s.heartbeat_contexts and hb["heartbeat_bytes"] > 0
    assert ratios["heartbeat_bytes_10k_contexts"]["value"] == hb["heartbeat_bytes"]
    for n in hb["per_node"]:
        assert n["heartbeat_bytes"] > 0 and n["heartbeats_in_window"] > 0 and n["pulled_bytes_in_window"] == 0, n
    assert ratios["replication_lag_p99_ms"]["target"] == "<= 100"
    assert ratios["append_pipelined_replicated_vs_append_pipelined"]["target"] == ">= 0.8"
    assert ratios["catch_up_entries_per_s"]["target"] == ">= 100000"
    assert ratios["heartbeat_bytes_10k_contexts"]["target"] == "<= 2048"
    # nothing missing, no stuck catch-up (node warnings on a loaded machine are reported, not failures)
    assert all("Redis" in n or "logged" in n or "did not quiet down" in n for n in report["notes"]), report["notes"]


def test_only_rejects_unknown_names(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        bench.main(["--smoke", "--only", "append_pipelined,no_such_scenario"])
    assert info.value.code == 2
    assert "no_such_scenario" in capsys.readouterr().err


def test_uvloop_flag_runs_the_asyncio_client_scenarios_on_uvloop(capsys, tmp_path):
    pytest.importorskip("uvloop")
    import asyncio

    try:
        assert bench.main(["--smoke", "--no-memory", "--json", "--uvloop", "--only", "aio_append_seq,client_append_seq",
                           "--workdir", str(tmp_path)]) == 0
    finally:
        asyncio.set_event_loop_policy(None)  # (the flag sets it for the whole process)
    report = json.loads(capsys.readouterr().out)
    assert report["environment"]["event_loop"] == "uvloop"
    assert report["results"]["aio_append_seq"]["n"] > 0


def test_uvloop_flag_without_uvloop_says_how_to_install_it(capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "uvloop", None)  # (importing it raises ImportError)
    with pytest.raises(SystemExit) as info:
        bench.main(["--smoke", "--uvloop", "--only", "aio_append_seq"])
    assert info.value.code == 2
    assert "uvloop is not installed" in capsys.readouterr().err


def test_watcher_state_counts_every_gap_duplicate_and_reorder():
    def entries(*seqs: int) -> list[SimpleNamespace]:
        return [SimpleNamespace(seq=s, context="c") for s in seqs]

    st = bench._WatcherState(watch=None, context="c", record=True, next_seq=1)  # type: ignore[arg-type]
    st.took(entries(1, 2, 3), now=10)
    assert (st.errors, st.count, st.times) == (0, 3, [(1, 10), (2, 10), (3, 10)])
    st.took(entries(5), now=11)  # a gap
    st.took(entries(5), now=12)  # a duplicate
    st.took(entries(4), now=13)  # out of order
    st.took([SimpleNamespace(seq=6, context="other")], now=14)  # another context's entry
    assert st.errors == 4 and st.count == 7 and (st.first_ns, st.last_ns) == (10, 14)


def test_a_helper_that_never_gets_ready_is_stopped(tmp_path):
    before = _children()
    # nothing listens there: the watcher waits for a greeting that never comes
    spec = {"address": f"tcp://127.0.0.1:{bench.free_port()}", "pub": f"tcp://127.0.0.1:{bench.free_port()}",
            "contexts": ["c"], "per_context": 1, "stalled": True}
    with pytest.raises(RuntimeError, match="did not answer"):
        bench.Watchers(str(tmp_path), "never-ready", spec, ready_timeout=0.5)
    assert _children() <= before


def test_human_table_and_only_filter(capsys, tmp_path):
    assert bench.main(["--smoke", "--no-memory", "--only", "raw_echo_seq,append_seq",
                       "--workdir", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "append_seq" in out and "raw_echo_seq" in out and "append_batch" not in out
    assert "append_seq_p50_vs_raw_echo_seq_p50" in out
    assert "watch_" not in out  # no watch scenario was asked for: no watchers, no fan-out


def test_settle_waits_for_a_quiet_machine_and_gives_up_after_its_limit(monkeypatch):
    now = [0.0]  # a fake clock that only sleeping moves
    monkeypatch.setattr(bench.machine.time, "sleep", lambda s: now.__setitem__(0, now[0] + s))
    monkeypatch.setattr(bench.machine.time, "monotonic", lambda: now[0])
    # busy CPU seconds of the machine, read once before and once per sample
    busy = iter([0.0, 0.2, 0.4, 0.42, 0.44])  # busy (2 cores) for two samples, then quiet
    monkeypatch.setattr(bench.machine, "machine_cpu", lambda: (next(busy), 0.0))
    assert bench.settle() == pytest.approx(0.3)
    assert next(busy) == 0.44  # it sampled until the first quiet one, and no further

    # always busy (2 cores): it samples until its limit, then goes on anyway
    now[0] = 0.0
    samples = []

    def cpu() -> tuple[float, float]:
        samples.append(now[0])
        return 2 * now[0], 0.0

    monkeypatch.setattr(bench.machine, "machine_cpu", cpu)
    assert bench.settle(max_s=0.95) == pytest.approx(1.0)
    assert len(samples) == 11  # one before, then one per 0.1 s


def test_settle_does_not_wait_without_proc_stat(monkeypatch):
    monkeypatch.setattr(bench.machine, "machine_cpu", lambda: (float("nan"), float("nan")))
    assert bench.settle() == 0.0


def test_steady_rate_runs_only_when_named_and_reports_cpu_and_p50(capsys, tmp_path):
    # short: two small rates, 0.3 s each, one round (figures are never asserted, only their shape)
    before = _children()
    assert bench.main(["--smoke", "--json", "--workdir", str(tmp_path), "--only", "steady_rate"]) == 0
    assert _children() <= before, "ledger-bench left processes running"
    report = json.loads(capsys.readouterr().out)
    assert report["results"] == {} and report["memory"] is None  # nothing else ran
    s = report["steady_rate"]
    assert s["rates"] == list(bench.SMOKE.steady_rates) and s["rounds"] == 1
    assert s["variants"] == {"default": [], "off": ["--busy-poll-us", "0"], "on_500us": ["--busy-poll-us", "500"]}
    for name in s["variants"]:
        for rate in bench.SMOKE.steady_rates:
            r = s["results"][name][str(rate)]
            assert r["cpu_pct"] >= 0 and r["p50_us"] > 0, (name, rate, r)
            # the client kept its pace (it sends one at a time, so it can only fall behind)
            assert 0.5 * rate <= r["achieved_per_s"] <= 1.2 * rate, (name, rate, r)
            assert len(r["per_round"]) == 1 and r["per_round"][0]["spin_pct_last_s"] is not None
    top = max(bench.SMOKE.steady_rates)
    fig = report["ratios"][f"steady_{top}_cpu_default_vs_off"]
    assert fig["target"] == "<= 1.3" and isinstance(fig["met"], bool)
    # and not part of a run that does not name it
    assert bench.main(["--smoke", "--json", "--no-memory", "--workdir", str(tmp_path), "--only", "raw_echo_seq"]) == 0
    assert json.loads(capsys.readouterr().out)["steady_rate"] is None


class _FakeTTY(__import__("io").StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_names_the_run_and_the_scenario_on_a_terminal_and_nothing_with_json(capsys, monkeypatch, tmp_path):
    err = _FakeTTY()
    monkeypatch.setattr("sys.stderr", err)
    assert bench.main(["--smoke", "--no-memory", "--only", "raw_echo_seq,append_seq",
                       "--workdir", str(tmp_path / "a")]) == 0
    text = err.getvalue()
    # which run of how many, which round, which scenario of how many, rewritten in place
    assert "\r\x1b[Kledger-bench: throughput (1 of " in text and "): round 1/1, " in text
    assert ", raw_echo_seq (" in text and ", append_seq (" in text and " of 2)" in text
    # a round's result line stays (the line cleared before it, drawn again after)
    assert "\r\x1b[Kround 1/1: " in text
    assert " runs done in " in text and text.endswith("\n") and text.count("\n") == 2
    assert "append_seq" in capsys.readouterr().out  # the table, on stdout as before
    err.seek(0)
    err.truncate()
    assert bench.main(["--smoke", "--no-memory", "--json", "--only", "raw_echo_seq",
                       "--workdir", str(tmp_path / "b")]) == 0
    assert err.getvalue() == ""
    assert json.loads(capsys.readouterr().out)["mode"] == "smoke"
