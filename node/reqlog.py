"""What the node logs about requests, and the JSON log format (`--log-format json`).

Two request logs, both off unless asked for, so that the request loop pays nothing for them
otherwise (the server calls the core directly then):

- with `--log-level debug`, one DEBUG line per request on the logger `node.requests`;
- with `--slow-ms N`, one WARNING line on `node.slow` for each request whose handling in the
  request loop took N ms or more (a wait for the disk or for replicas after that is not counted:
  it is not the loop's time).

Each line carries the same fields, as the record's extras (keys of the JSON object) and in its
text: `op`, `id`, `context`, `outcome` (`ok`, an error code, or `waiting` for a reply that goes
once the disk or the replicas have it), `us` (microseconds in the loop) and `bytes` (the request's).
"""

from __future__ import annotations

import datetime
import json
import logging
import time
from collections.abc import Callable
from typing import Any

import msgpack

REQUESTS = logging.getLogger("node.requests")
SLOW = logging.getLogger("node.slow")
FIELDS = ("op", "id", "context", "outcome", "us", "bytes")

# the attributes every LogRecord has: anything else on a record is an extra (a field)
_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    """One JSON object per line, keys always present: `ts` (UTC, ISO 8601 with milliseconds),
    `level`, `logger`, `msg`; then the record's extras (the request fields above); `exc` with the
    traceback when there is one."""

    def format(self, record: logging.LogRecord) -> str:
        ts = datetime.datetime.fromtimestamp(record.created, datetime.timezone.utc)
        out: dict[str, Any] = {
            "ts": ts.strftime("%Y-%m-%dT%H:%M:%S.") + f"{ts.microsecond // 1000:03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for k, v in vars(record).items():
            if k not in _STANDARD and k not in out:
                out[k] = v if isinstance(v, (str, int, float, bool)) or v is None else repr(v)
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False, separators=(",", ":"))


def _str(v: object) -> str | int | None:
    if isinstance(v, str):
        return v.encode("utf-8", "backslashreplace").decode()[:200]
    if isinstance(v, int) and not isinstance(v, bool):
        return v
    return None if v is None else type(v).__name__


def describe(frame: Any, outbox: list[list[Any]], before: int) -> dict[str, Any]:
    """The fields of a request (its last frame) and of its reply, if one went to `outbox`
    beyond index `before`. Only ever run for a request that is logged."""
    raw = bytes(frame)
    fields: dict[str, Any] = {"op": None, "id": None, "context": None, "bytes": len(raw)}
    try:
        m = msgpack.unpackb(raw, raw=False, strict_map_key=False, unicode_errors="surrogateescape")
    except Exception:
        m = None
    if isinstance(m, dict):
        fields["op"] = _str(m.get("op"))
        fields["id"] = _str(m.get("id"))
        fields["context"] = _str(m.get("context"))
    outcome = "waiting"
    if len(outbox) > before:
        try:
            reply = msgpack.unpackb(outbox[-1][-1], raw=False)
            if reply.get("ok"):
                outcome = "ok"
            else:
                outcome = str(reply.get("error", {}).get("code", "error"))
        except Exception:
            outcome = "?"
    fields["outcome"] = outcome
    return fields


class RequestLog:
    """Wraps the core's `request` when a request log is on: times each call, and logs it."""

    def __init__(self, request: Callable[..., bool], outbox: Callable[[], list[list[Any]]],
                 slow_ms: int | None, debug: bool) -> None:
        self._request = request
        self._outbox = outbox
        self.slow_s = None if slow_ms is None else slow_ms / 1000.0
        self.debug = debug
        self.slow = 0  # requests logged as slow

    def __call__(self, frames: list[Any], now: float, who: Any = None) -> bool:
        outbox = self._outbox()
        before = len(outbox)
        t0 = time.perf_counter()
        junk = self._request(frames, now, who)
        took = time.perf_counter() - t0
        slow = self.slow_s is not None and took >= self.slow_s
        if slow or self.debug:
            fields = describe(frames[-1], self._outbox(), before)
            fields["us"] = int(took * 1e6)
            text = "%(op)s id=%(id)s context=%(context)s -> %(outcome)s in %(us)d us (%(bytes)d bytes)" % fields
            if slow:
                self.slow += 1
                SLOW.warning("slow request: %s", text, extra=fields)
            if self.debug:
                REQUESTS.debug("request: %s", text, extra=fields)
        return junk


def configure(level: str, fmt: str) -> None:
    """The root logger, as `--log-level` and `--log-format` ask."""
    handler = logging.StreamHandler()
    handler.setFormatter(JsonFormatter() if fmt == "json" else
                         logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    for h in list(root.handlers):
        root.removeHandler(h)
    root.addHandler(handler)
    root.setLevel(level.upper())
