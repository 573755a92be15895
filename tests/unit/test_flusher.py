"""The flusher thread: a failed storage write is reported, never retried on the same handle."""

from __future__ import annotations

import pytest

from node import sockets
from node.server import Flusher
from node.storage import WriteFailed

pytestmark = pytest.mark.timeout(30)


def test_a_failed_write_is_reported_once_and_not_retried(zctx):
    # LevelDB keeps a failed write's error: a retry on the same handle can only fail
    # again (or, worse, append after a torn record). The loop owns the recovery.
    rx, tx = sockets.wake_pair(zctx, "flusher-test")
    attempts = []

    def commit() -> None:
        attempts.append(1)
        raise WriteFailed("IO error: 000003.log: No space left on device")

    f = Flusher(kv=None, wake=tx, sync=True)  # type: ignore[arg-type]
    f.start()
    try:
        f.jobs.put((commit, 7, {"ctx": 5}))
        assert rx.poll(10_000)  # woken at once with the failure
        assert list(f.done) == [({"ctx": 5}, "IO error: 000003.log: No space left on device")]
        assert len(attempts) == 1
        assert (f.batches, f.keys) == (0, 0)
        f.jobs.put((lambda: None, 3, {"ctx": 6}))  # the next job (after a recovery) is written
        assert rx.poll(10_000)
        rx.recv()
        rx.recv()
        assert list(f.done)[-1] == ({"ctx": 6}, None)
        assert (f.batches, f.keys) == (1, 3)
    finally:
        f.jobs.put(None)
        f.join(10)
        rx.close(linger=0)
