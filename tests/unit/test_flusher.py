"""The flusher thread: a failed storage write is retried, never dropped."""

from __future__ import annotations

import pytest

from node import sockets
from node.server import Flusher

pytestmark = pytest.mark.timeout(30)


def test_failed_write_is_retried_until_it_succeeds(zctx):
    rx, tx = sockets.wake_pair(zctx, "flusher-test")
    attempts = []

    def commit() -> None:
        attempts.append(1)
        if len(attempts) < 3:
            raise OSError("disk full")

    f = Flusher(kv=None, wake=tx, sync=True)  # type: ignore[arg-type]
    f.start()
    try:
        f.jobs.put((commit, 7, {"ctx": 5}))
        assert rx.poll(10_000)  # woken once the write finally succeeded
        assert len(attempts) == 3
        assert list(f.done) == [{"ctx": 5}]
        assert (f.batches, f.keys) == (1, 7)
    finally:
        f.jobs.put(None)
        f.join(10)
        rx.close(linger=0)
