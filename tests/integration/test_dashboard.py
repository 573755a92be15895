"""deploy/grafana-dashboard.json: every metric its PromQL names is one a real node exports (read
from the TYPE lines of a scrape, so that a metric renamed or dropped in node/metrics.py fails
here), and it is a dashboard Grafana can import (panels with ids, queries, a datasource variable)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from tests.integration.test_metrics_endpoint import _address
from tests.unit.test_metrics import _get

pytestmark = pytest.mark.timeout(60)

DASHBOARD = Path(__file__).resolve().parents[2] / "deploy" / "grafana-dashboard.json"
# series Prometheus itself makes for every scrape target
PROMETHEUS_SERIES = {"up"}
# what PromQL calls and says besides metric names
PROMQL_WORDS = {
    "sum", "avg", "min", "max", "count", "by", "without", "on", "ignoring", "group_left", "group_right", "and",
    "or", "unless", "rate", "irate", "increase", "deriv", "delta", "histogram_quantile", "label_values",
    "topk", "bottomk", "clamp_min", "clamp_max", "abs", "offset", "bool", "time", "vector", "scalar",
}


def _queries(dash: dict[str, Any]) -> list[str]:
    out = []
    for p in dash["panels"]:
        for t in p.get("targets", []):
            out.append(t["expr"])
    for v in dash["templating"]["list"]:
        if v["type"] == "query":
            out.append(v["query"])
    return out


def metric_names(expr: str) -> set[str]:
    """The metric names a PromQL expression reads: what is left once strings, label matchers,
    ranges, grouping clauses, numbers, functions and keywords are taken out."""
    s = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)               # strings (label values, $variables)
    s = re.sub(r"\{[^}]*\}", " ", s)                            # label matchers
    s = re.sub(r"\[[^\]]*\]", " ", s)                           # ranges
    s = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", s)  # label lists
    s = re.sub(r"label_values\s*\(([^,]*),[^)]*\)", r"\1", s)  # label_values(metric, label)
    words = set(re.findall(r"[A-Za-z_:][A-Za-z0-9_:]*", s))
    return {w for w in words if w not in PROMQL_WORDS}


def exported_names(text: str) -> set[str]:
    """Every series name a scrape's TYPE lines promise (a histogram's _bucket, _sum, _count)."""
    names = set()
    for name, kind in re.findall(r"^# TYPE (\S+) (\S+)$", text, re.M):
        names.add(name)
        if kind == "histogram":
            names |= {f"{name}_bucket", f"{name}_sum", f"{name}_count"}
    return names


def test_metric_names_are_read_out_of_promql():
    assert metric_names('histogram_quantile(0.99, sum by (le, op) (rate(ledger_x_bucket{instance=~"$i"}'
                        '[$__rate_interval])))') == {"ledger_x_bucket"}
    assert metric_names('sum by (op) (rate(a_total{op=~"append|get"}[5m])) / sum by (op) (rate(b_total[5m]))') == {
        "a_total", "b_total"}
    assert metric_names('label_values(ledger_info{job=~"$job"}, instance)') == {"ledger_info"}


def test_every_metric_the_dashboard_reads_is_one_a_node_exports(node_factory):
    n = node_factory("--metrics", "127.0.0.1:0", "--busy-poll-us", "100")
    code, text = _get(_address(n), "/metrics")
    assert code == 200
    exported = exported_names(text)
    assert "ledger_request_duration_seconds_bucket" in exported and "ledger_peers" in exported
    dash = json.loads(DASHBOARD.read_text())
    used: set[str] = set()
    for q in _queries(dash):
        names = metric_names(q)
        assert names, f"no metric in {q!r}"
        used |= names
    unknown = used - exported - PROMETHEUS_SERIES
    assert not unknown, f"the dashboard reads metrics no node exports: {sorted(unknown)}"
    # and it covers what operators ask about (issue #16): requests, errors, latency, appends,
    # watchers, peers, lag, storage, stalls, memory, fds
    for want in ("ledger_requests_total", "ledger_request_errors_total", "ledger_request_duration_seconds_bucket",
                 "ledger_request_bytes_total", "ledger_watchers", "ledger_peers", "ledger_peer_behind_entries",
                 "ledger_storage_bytes", "ledger_write_stalls_total", "process_resident_memory_bytes",
                 "process_open_fds"):
        assert want in used, want


def test_the_dashboard_is_one_grafana_imports():
    dash = json.loads(DASHBOARD.read_text())
    assert dash["uid"] and dash["title"] and isinstance(dash["schemaVersion"], int)
    variables = {v["name"]: v for v in dash["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource" and variables["datasource"]["query"] == "prometheus"
    ids = [p["id"] for p in dash["panels"]]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for p in dash["panels"]:
        g = p["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24 and g["h"] > 0, p["title"]
        if p["type"] == "row":
            continue
        assert p["datasource"]["uid"] == "${datasource}" and p["targets"], p["title"]
        for t in p["targets"]:
            assert t["datasource"]["uid"] == "${datasource}" and t["refId"], p["title"]
            if "ledger_" in t["expr"] or "process_" in t["expr"]:
                assert 'instance=~"$instance"' in t["expr"], (p["title"], t["expr"])  # follows the node picker
