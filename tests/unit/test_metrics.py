"""node/metrics.py without a node: the text format (read back by prometheus_client's own
parser), readiness, and the HTTP side's answers when the request loop does or does not answer."""

from __future__ import annotations

import threading
import urllib.error
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from node import metrics

pytestmark = pytest.mark.timeout(30)

STATUS = {
    "version": "0.1.0", "node_id": 'n"1\\x\n', "durability": "async", "security": "loopback", "cluster": "c",
    "uptime_s": 1.5, "contexts": 3, "entries": 100, "lamport": 7, "pending_writes": 0, "hot_bytes": 10,
    "storage": {"state": "ok", "write_errors": 0, "recoveries": 0}, "write_batches": 4, "written_keys": 9,
    "backpressure_waits": 2, "integrity_errors": 0, "damaged": [], "connections": {"router": 2, "watch": 1},
    "client_cutoffs": 0, "watchers": 1, "watched_contexts": 1, "published_entries": 5, "publish_drops": 0,
    "busy_poll": {"spun_ms": 250.0},
    "peers": [{"id": "n2", "address": "h:1", "state": "alive", "last_heard_s": 0.2, "entries": 150, "behind": 0},
              {"id": None, "address": "h:2", "state": "unknown", "last_heard_s": None, "entries": 0, "behind": None}],
    "replication": {"pulled_entries": 3, "pulled_bytes": 300, "pushed_entries": 4, "gap_pulls": 0,
                    "heartbeats_sent": 8, "reply_bytes": 10, "refused_messages": 0, "peer_errors": 1},
    "forks": [], "equivocations": [],
}


def samples(text: str) -> dict[tuple[str, tuple], float]:
    out = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_a_request_held_for_storage_is_timed_when_it_is_served_not_when_it_is_held():
    from node.core import HELD

    ops = [HELD, "append"]
    timer = metrics.RequestTimer(lambda frames, now, who=None: False, lambda: ops[0])
    timer([b"id", b"x" * 10], 0.0)  # held: the core set last_op to HELD
    assert timer.latency == {} and timer.bytes == {}
    ops.pop(0)
    timer([b"id", b"x" * 10], 0.0)  # served (Core.release through this wrapper)
    assert set(timer.latency) == {"append"} and timer.bytes == {"append": 10}


def test_the_text_reads_back_with_prometheus_clients_parser():
    timer = metrics.RequestTimer(lambda frames, now, who=None: False, lambda: "append")
    for _ in range(3):
        timer([b"id", b"x" * 10], 0.0)
    text = metrics.render(STATUS, {"append": 3, "get": 0}, {("head", "NOT_FOUND"): 2}, timer,
                          {"rss": 1e8, "fds": 12, "cpu": 1.25, "storage_bytes": 4096, "entries_bytes": 8192})
    got = samples(text)
    assert got[("ledger_requests_total", (("op", "append"),))] == 3
    assert got[("ledger_request_errors_total", (("code", "NOT_FOUND"), ("op", "head")))] == 2
    assert got[("ledger_request_duration_seconds_count", (("op", "append"),))] == 3
    assert got[("ledger_request_duration_seconds_bucket", (("le", "+Inf"), ("op", "append")))] == 3
    assert got[("ledger_request_bytes_total", (("op", "append"),))] == 30
    assert got[("ledger_peers", (("state", "alive"),))] == 1 and got[("ledger_peers", (("state", "unknown"),))] == 1
    assert got[("ledger_peer_ahead_entries", (("peer", "n2"),))] == 50
    assert got[("ledger_storage_bytes", (("store", "entries"),))] == 8192
    assert got[("ledger_busy_poll_seconds_total", ())] == 0.25
    assert got[("process_open_fds", ())] == 12
    (info,) = [k for k in got if k[0] == "ledger_info"]
    assert dict(info[1])["node_id"] == 'n"1\\x\n'  # escaped on the way out, read back whole


def test_histogram_buckets_are_cumulative_and_bounded():
    h = metrics.Histogram()
    for s in (0.00001, 0.0003, 0.0003, 2.0):
        h.observe(s)
    t = metrics.Text()
    t.histogram("x_seconds", "x", {"op": h})
    got = samples(t.text())
    assert got[("x_seconds_bucket", (("le", "5e-05"), ("op", "op")))] == 1
    assert got[("x_seconds_bucket", (("le", "0.0005"), ("op", "op")))] == 3
    assert got[("x_seconds_bucket", (("le", "1.0"), ("op", "op")))] == 3
    assert got[("x_seconds_bucket", (("le", "+Inf"), ("op", "op")))] == 4


def test_readiness_names_what_is_not_ready():
    assert metrics.readiness({"storage": {"state": "ok"}, "entries": 100, "peers": []}, 10) == []
    why = metrics.readiness({"storage": {"state": "failed", "error": "disk full"}, "entries": 100,
                             "peers": [{"id": "n2", "state": "alive", "entries": 200},
                                       {"id": "n3", "state": "dead", "entries": 10_000}]}, 10)
    assert len(why) == 2 and "disk full" in why[0] and "n2 holds 100 entries more" in why[1]


def _get(address: str, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://{address}{path}", timeout=10) as r:
            return r.status, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode()


@pytest.fixture
def endpoint(tmp_path):
    answer = threading.Event()
    answer.set()
    holder: list[metrics.Endpoint] = []

    def wake() -> None:  # plays the request loop, in the caller's thread
        if answer.is_set():
            ep = holder[0]
            while not ep.jobs.empty():
                job = ep.jobs.get_nowait()
                job.result = ({"storage": {"state": "ok"}, "entries": 0, "peers": []} if job.kind == "ready"
                              else (lambda proc: "x 1\n") if job.kind == "metrics" else True)
                job.done.set()

    ep = metrics.Endpoint("127.0.0.1", 0, str(tmp_path), wake, 10)
    holder.append(ep)
    ep.start()
    yield ep, answer
    ep.close()


def test_the_endpoint_answers_while_the_loop_does(endpoint):
    ep, _ = endpoint
    assert _get(ep.address, "/healthz") == (200, "ok\n")
    assert _get(ep.address, "/readyz") == (200, "ready\n")
    assert _get(ep.address, "/metrics") == (200, "x 1\n")
    assert _get(ep.address, "/other")[0] == 404


def test_health_fails_when_the_loop_does_not_answer(endpoint, monkeypatch):
    ep, answer = endpoint
    answer.clear()
    monkeypatch.setattr(metrics, "HEALTH_TIMEOUT_S", 0.2)
    code, body = _get(ep.address, "/healthz")
    assert code == 503 and "has not answered" in body
    monkeypatch.setattr(metrics, "SCRAPE_TIMEOUT_S", 0.2)
    assert _get(ep.address, "/metrics")[0] == 503
