"""tools/flood.py, the hostile-client measurer of docs/benchmarks.md "Floods": a short run of each mode."""

from __future__ import annotations

import json

import pytest

from tools import flood


@pytest.mark.timeout(90)
@pytest.mark.parametrize("args", [
    ["big", "--frame-mib", "0.25", "--seconds", "1"],
    ["unread", "--gets", "50", "--seconds", "1"],
    ["idle", "--connections", "20", "--seconds", "1"],
    ["watchers", "--watchers", "20", "--seconds", "1", "--node-flags", "--max-watchers-per-context 15"],
])
def test_each_flood_runs_bounded_and_reports_the_second_client(args, capsys):
    assert flood.main(args) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["what"] == args[0]
    assert out["during"]["appends"] > 0 and out["during"]["p99_ms"] > 0  # the well-behaved client was served
    assert out["rss_peak_mib"] >= out["rss_start_mib"] > 0
    if args[0] == "big":
        assert out["big_frames"]["answered"] > 0  # junk under the size limit: each got an error reply
    if args[0] == "watchers":
        assert out["watchers_subscribed"] == 20 and out["status"]["watchers_refused"] == 5
        assert out["watcher_messages_received"] > 0


def test_bounds_are_refused():
    with pytest.raises(SystemExit):
        flood.main(["big", "--frame-mib", "100"])
