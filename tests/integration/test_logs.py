"""What the node logs: `--log-format json`, the per-request debug lines, `--slow-ms`."""

from __future__ import annotations

import json
import re

import pytest

from protocol.client import Client
from protocol.errors import NotFound
from tests.integration.test_node import run_node

pytestmark = pytest.mark.timeout(60)

TEXT_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} [A-Z]+ ")


def _requests(n, zctx) -> None:
    with Client(n.address, zctx=zctx) as c:
        c.append("notes", b"x" * 10)
        with pytest.raises(NotFound):
            c.head("nosuch")


def test_json_logs_are_one_object_a_line_with_stable_keys_and_slow_requests(node_factory, zctx):
    n = node_factory("--log-format", "json", "--slow-ms", "0")
    _requests(n, zctx)
    assert n.stop() == 0
    logs = [line for line in n.lines if line.startswith("{")]
    assert not [line for line in n.lines if TEXT_LINE.match(line)]  # no line in the text format
    objs = [json.loads(line) for line in logs]
    assert objs and all({"ts", "level", "logger", "msg"} <= o.keys() for o in objs)
    assert all(re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", o["ts"]) for o in objs)
    slow = [o for o in objs if o["logger"] == "node.slow"]
    append = next(o for o in slow if o["op"] == "append")
    assert append["context"] == "notes" and append["outcome"] == "ok" and append["level"] == "warning"
    assert isinstance(append["us"], int) and append["us"] >= 0 and append["bytes"] > 10
    head = next(o for o in slow if o["op"] == "head")
    assert head["outcome"] == "NOT_FOUND" and head["context"] == "nosuch"


def test_no_request_is_logged_below_the_slow_threshold_or_without_debug(node_factory, zctx):
    n = node_factory("--slow-ms", "60000")
    _requests(n, zctx)
    assert n.stop() == 0
    assert "slow request" not in n.output() and "request: " not in n.output()


def test_debug_logs_every_request_in_text(node_factory, zctx):
    n = node_factory("--log-level", "debug")
    _requests(n, zctx)
    assert n.stop() == 0
    lines = [line for line in n.lines if "node.requests: request: " in line]
    assert any("append id=" in line and "context=notes -> ok in" in line for line in lines)
    assert any("head id=" in line and "-> NOT_FOUND" in line for line in lines)


@pytest.mark.parametrize("flags, says", [
    (["--log-format", "xml"], "--log-format must be text or json, got 'xml'"),
    (["--slow-ms", "-1"], "--slow-ms must be an integer from 0 to 3600000, got '-1'"),
    (["--slow-ms", "soon"], "--slow-ms must be an integer"),
])
def test_bad_log_flags_are_refused_in_one_line(tmp_path, flags, says):
    r = run_node("--data", str(tmp_path / "d"), "--listen", "127.0.0.1:0", *flags)
    assert r.returncode == 2 and says in r.stderr
