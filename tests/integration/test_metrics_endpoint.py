"""`--metrics`: a real node's Prometheus endpoint, /healthz and /readyz, and its flag errors."""

from __future__ import annotations

import re
import socket
import urllib.request

import pytest
import zmq
from prometheus_client.parser import text_string_to_metric_families

from protocol.client import Client
from protocol.errors import NotFound
from tests.integration.test_node import run_node
from tests.unit.test_metrics import _get

pytestmark = pytest.mark.timeout(60)


def _address(n) -> str:
    m = re.search(r"metrics \(HTTP\):\s+http://(\S+)/metrics", n.output())
    assert m, n.output()
    return m.group(1)


def _samples(text: str) -> dict[tuple[str, tuple], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def test_a_scrape_counts_requests_errors_and_latency_by_op(node_factory, zctx):
    n = node_factory("--metrics", "127.0.0.1:0")
    address = _address(n)
    with Client(n.address, zctx=zctx) as c:
        for i in range(20):
            c.append("notes", f"p{i}")
        with pytest.raises(NotFound):
            c.head("nosuch")
    junk = zctx.socket(zmq.DEALER)
    junk.connect(n.address)
    junk.send(b"\x93not a map")
    assert junk.poll(5000)
    junk.recv()
    junk.close(linger=0)
    code, text = _get(address, "/metrics")
    assert code == 200
    got = _samples(text)
    assert got[("ledger_requests_total", (("op", "append"),))] == 20
    assert got[("ledger_request_errors_total", (("code", "NOT_FOUND"), ("op", "head")))] == 1
    assert got[("ledger_request_errors_total", (("code", "BAD_REQUEST"), ("op", "invalid")))] == 1
    assert got[("ledger_request_duration_seconds_count", (("op", "append"),))] == 20
    assert got[("ledger_entries", ())] == 20 and got[("ledger_contexts", ())] == 1
    assert got[("ledger_context_cache_contexts", ())] == 1  # the one just written, still in RAM
    assert got[("process_open_fds", ())] > 0 and got[("process_resident_memory_bytes", ())] > 1e6
    assert got[("ledger_storage_bytes", (("store", "main"),))] > 0
    assert _get(address, "/healthz") == (200, "ok\n")
    assert _get(address, "/readyz") == (200, "ready\n")
    assert n.stop() == 0  # and the endpoint goes with it
    with pytest.raises(OSError):
        urllib.request.urlopen(f"http://{address}/healthz", timeout=2)


def test_a_metrics_port_in_use_fails_the_start_in_one_line(tmp_path):
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen()
    try:
        port = s.getsockname()[1]
        r = run_node("--data", str(tmp_path / "d"), "--listen", "127.0.0.1:0", "--metrics", f"127.0.0.1:{port}")
    finally:
        s.close()
    assert r.returncode == 2
    assert f"cannot listen on --metrics 127.0.0.1:{port}" in r.stderr and "pick another --metrics address" in r.stderr
    assert not (tmp_path / "d").exists()


@pytest.mark.parametrize("flags, says", [
    (["--metrics", "9100"], "--metrics must be HOST:PORT"),
    (["--metrics", "127.0.0.1:99999"], "--metrics: port must be 0..65535"),
    (["--ready-lag", "-5"], "--ready-lag must be an integer"),
])
def test_bad_metrics_flags_are_refused(tmp_path, flags, says):
    r = run_node("--data", str(tmp_path / "d"), "--listen", "127.0.0.1:0", *flags)
    assert r.returncode == 2 and says in r.stderr
