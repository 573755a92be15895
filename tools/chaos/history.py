"""The history: every operation the workload made, with its invoke and completion times and outcome.

Outcomes: `ok`; `fail` (the node answered that it did not apply it:
UNAVAILABLE because the writer is down, NOT_WRITER, ...); `unknown` (no answer
in time: it may or may not have been applied, which the dedup_id makes safe to
retry). The records are plain dicts, written one a line to `history.jsonl` and
read by the checks (`tools.chaos.checks`).
"""

from __future__ import annotations

import threading
import time
from typing import Any

from protocol.errors import LedgerError, Timeout, Unavailable


class History:
    """Every operation: who, what, where, invoke and completion times, outcome.

    Times are seconds since the fault phase started (setup is negative)."""

    def __init__(self) -> None:
        self.ops: list[dict[str, Any]] = []
        self.t0 = time.monotonic()
        self._lock = threading.Lock()

    def now(self) -> float:
        return round(time.monotonic() - self.t0, 4)

    def invoke(self, process: str, f: str, context: str, node: str, **fields: Any) -> dict[str, Any]:
        op = {"process": process, "f": f, "context": context, "node": node, "invoke": self.now(),
              "type": "invoke", **fields}
        with self._lock:
            op["index"] = len(self.ops)
            self.ops.append(op)
        return op

    def complete(self, op: dict[str, Any], outcome: str, **fields: Any) -> None:
        op.update(fields)
        op["complete"] = self.now()
        op["type"] = outcome


def error_code(exc: LedgerError) -> str:
    """The error's code, with a timeout told apart from an UNAVAILABLE answer."""
    return "TIMEOUT" if isinstance(exc, Timeout) else exc.code


def classify(exc: LedgerError) -> str:
    """fail: the node said it did not apply it; unknown: it may have."""
    if isinstance(exc, Timeout):
        return "unknown"
    if isinstance(exc, Unavailable) and "required" in exc.details:
        return "unknown"  # replicas=N timed out: appended, not acknowledged at the level asked
    return "fail"
