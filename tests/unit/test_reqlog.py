"""node/reqlog.py without a node: the JSON formatter and the request timer."""

from __future__ import annotations

import json
import logging

import msgpack
import pytest

from node import reqlog
from protocol import codec

pytestmark = pytest.mark.timeout(30)


def _record(msg: str = "hello %s", args: tuple = ("world",), **extra) -> logging.LogRecord:
    r = logging.LogRecord("node.x", logging.WARNING, __file__, 1, msg, args, None)
    for k, v in extra.items():
        setattr(r, k, v)
    return r


def test_json_formatter_gives_the_fixed_keys_then_the_extras():
    out = json.loads(reqlog.JsonFormatter().format(_record(op="get", us=12, odd=object())))
    assert out["level"] == "warning" and out["logger"] == "node.x" and out["msg"] == "hello world"
    assert out["op"] == "get" and out["us"] == 12 and out["odd"].startswith("<object")
    assert "\n" not in reqlog.JsonFormatter().format(_record("two\nlines", ()))


def test_json_formatter_puts_a_traceback_under_exc():
    try:
        raise ValueError("boom")
    except ValueError:
        import sys
        r = logging.LogRecord("node.x", logging.ERROR, __file__, 1, "failed", (), sys.exc_info())
    out = json.loads(reqlog.JsonFormatter().format(r))
    assert "ValueError: boom" in out["exc"]


class FakeCore:
    def __init__(self, reply: bytes | None) -> None:
        self.outbox: list[list[bytes]] = []
        self.reply = reply

    def request(self, frames, now, who=None) -> bool:
        if self.reply is not None:
            self.outbox.append([frames[0], self.reply])
        return False


def _frames(op: str = "get", context: object = "c") -> list[bytes]:
    return [b"id", msgpack.packb({"v": 1, "id": 7, "op": op, "context": context})]


def test_the_timer_logs_slow_requests_with_their_fields(caplog):
    core = FakeCore(codec.encode_error(7, "NOT_FOUND", "no"))
    rl = reqlog.RequestLog(core.request, lambda: core.outbox, slow_ms=0, debug=False)
    with caplog.at_level(logging.WARNING, logger="node.slow"):
        assert rl(_frames(), 0.0) is False
    (rec,) = caplog.records
    assert (rec.op, rec.id, rec.context, rec.outcome) == ("get", 7, "c", "NOT_FOUND")
    assert rl.slow == 1


def test_the_timer_says_waiting_when_no_reply_went_and_copes_with_junk(caplog):
    core = FakeCore(None)
    rl = reqlog.RequestLog(core.request, lambda: core.outbox, slow_ms=0, debug=False)
    with caplog.at_level(logging.WARNING, logger="node.slow"):
        rl(_frames("append", context=b"\xff"), 0.0)
        rl([b"id", b"\xc1garbage"], 0.0)
    first, second = caplog.records
    assert first.outcome == "waiting" and first.context == "bytes"
    assert second.op is None and second.outcome == "waiting"


def test_nothing_is_logged_under_the_threshold(caplog):
    core = FakeCore(codec.encode_error(7, "NOT_FOUND", "no"))
    rl = reqlog.RequestLog(core.request, lambda: core.outbox, slow_ms=60_000, debug=False)
    with caplog.at_level(logging.DEBUG):
        rl(_frames(), 0.0)
    assert not caplog.records and rl.slow == 0
