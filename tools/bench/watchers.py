"""The watcher helper processes: `python -m tools.bench _watchers SPEC` (`watchers_main`), their
parent-side handle `Watchers`, and what is computed from their reports (latencies, health)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import zmq

from protocol import watch as wire
from protocol.client import Client, Watch
from tools import launch

from .common import STALLED_RCVBUF, STALLED_RCVHWM, WATCHERS_PER_CONTEXT
from .procs import Proc, _raise_fd_limit

#
# `python -m tools.bench _watchers SPEC` runs watchers in a process of their own, so that
# their reading never runs in (and is never timed as part of) the appender's process. SPEC (JSON):
#   address, pub            the node's request and watch addresses
#   nodes                   instead: [{"address", "pub", "label"}, ...]: the same watchers on each of
#                           these nodes (a mesh's followers), still one poller; reports name the node
#   contexts, per_context   `per_context` watchers (Client.watch) of each context, one poller
#   stalled                 instead: plain SUB sockets that read the node's greeting and then
#                           never read again (small RCVHWM and kernel buffer)
#   record                  contexts whose receipt times (seq, monotonic ns) are sent back
#   rcvhwm                  the watchers' RCVHWM (default: Watch's own)
# The helper prints one JSON line when every watcher is subscribed, then answers JSON lines
# on stdin: {"cmd": "wait", "until": {context: seq}, "timeout": s} -> once every watcher of
# those contexts has delivered up to seq (or on timeout) one JSON line with what each watcher
# delivered since the last answer. It exits when stdin closes (its parent is gone, or is done
# with it) or, unless stalled, on {"cmd": "quit"}.


@dataclass
class _WatcherState:
    watch: Watch
    context: str
    record: bool
    next_seq: int  # the seq this watcher must deliver next: anything else is an error
    node: str = ""  # the node watched, when the helper watches several
    errors: int = 0
    count: int = 0
    first_ns: int = 0
    last_ns: int = 0
    times: list[tuple[int, int]] = field(default_factory=list)

    def took(self, entries: Sequence[Any], now: int) -> None:
        for e in entries:
            if e.seq != self.next_seq or e.context != self.context:
                self.errors += 1
            self.next_seq = e.seq + 1
            if self.record:
                self.times.append((e.seq, now))
        if entries:
            self.count += len(entries)
            self.first_ns = self.first_ns or now
            self.last_ns = now

    def report(self) -> dict[str, Any]:
        w = self.watch
        out = {"context": self.context, "node": self.node, "last": w.last_seq, "count": self.count, "errors": self.errors,
               "first_ns": self.first_ns, "last_ns": self.last_ns, "times": self.times,
               "refills": w.refills, "duplicates": w.cursor.duplicates, "dropped_ahead": w.cursor.dropped_ahead,
               "outages": w.outages}
        self.count, self.first_ns, self.last_ns, self.times = 0, 0, 0, []
        return out


def _say(obj: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(obj, separators=(",", ":")) + "\n")
    sys.stdout.flush()


def watchers_main(spec_json: str) -> int:
    spec = json.loads(spec_json)
    contexts: list[str] = spec["contexts"]
    per = int(spec.get("per_context", WATCHERS_PER_CONTEXT))
    nodes: list[dict[str, str]] = spec.get("nodes") or [{"address": spec["address"], "pub": spec["pub"], "label": ""}]
    n = len(contexts) * per * len(nodes)
    _raise_fd_limit(4 * n + 256)
    zctx: zmq.Context[Any] = zmq.Context()
    zctx.set(zmq.MAX_SOCKETS, n + 64)
    stdin_fd = sys.stdin.fileno()
    try:
        if spec.get("stalled"):
            subs = []
            for c in contexts:
                for _ in range(per):
                    s = zctx.socket(zmq.SUB)
                    s.setsockopt(zmq.LINGER, 0)
                    s.setsockopt(zmq.RCVHWM, STALLED_RCVHWM)
                    s.setsockopt(zmq.RCVBUF, STALLED_RCVBUF)
                    s.connect(spec["pub"])
                    s.setsockopt(zmq.SUBSCRIBE, wire.topic(c))
                    if not s.poll(15_000, zmq.POLLIN):  # the greeting: the node counts this watcher
                        raise RuntimeError(f"no greeting for the stalled watcher of {c!r}")
                    s.recv_multipart()
                    subs.append(s)  # ... and never read again
            _say({"ready": True, "watchers": len(subs)})
            while os.read(stdin_fd, 65536):  # until the parent closes our stdin
                pass
            for s in subs:
                s.close(linger=0)
            return 0
        record = set(spec.get("record", ()))
        options: dict[str, Any] = {"rcvhwm": int(spec["rcvhwm"])} if spec.get("rcvhwm") else {}
        states: list[_WatcherState] = []
        by_sock: dict[Any, _WatcherState] = {}
        poller = zmq.Poller()
        for node in nodes:
            client = Client(node["address"], timeout=10.0, zctx=zctx)
            for c in contexts:
                for _ in range(per):
                    w = client.watch(c, after=spec.get("after"), pub_address=node["pub"], **options)
                    st = _WatcherState(w, c, c in record, w.last_seq + 1, node.get("label", ""))
                    states.append(st)
                    by_sock[w.socket] = st
                    poller.register(w.socket, zmq.POLLIN)
        poller.register(stdin_fd, zmq.POLLIN)
        _say({"ready": True, "watchers": len(states)})
        buf = b""
        until: dict[str, int] | None = None
        deadline = started = 0.0
        mono = time.monotonic_ns
        while True:
            for sock, _ in poller.poll(50):
                if sock == stdin_fd:
                    chunk = os.read(stdin_fd, 65536)
                    if not chunk:
                        return 0
                    buf += chunk
                    while b"\n" in buf:
                        line, buf = buf.split(b"\n", 1)
                        cmd = json.loads(line)
                        if cmd["cmd"] == "quit":
                            return 0
                        until = {str(k): int(v) for k, v in cmd["until"].items()}
                        started = time.monotonic()
                        deadline = started + float(cmd.get("timeout", 60))
                    continue
                st = by_sock[sock]
                got = st.watch.drain()
                st.took(got, mono())
            if until is not None:
                done = all(st.watch.last_seq >= until[st.context] for st in states if st.context in until)
                if done or time.monotonic() > deadline:
                    _say({"done": done, "elapsed_s": time.monotonic() - started,
                          "watchers": [st.report() for st in states if st.context in until]})
                    until = None
    finally:
        zctx.destroy(linger=0)


class Watchers:
    """A `_watchers` helper process, seen from the benchmark."""

    def __init__(self, workdir: str, name: str, spec: dict[str, Any], ready_timeout: float = 120.0) -> None:
        import queue
        import threading

        self.name = name
        self.contexts = set(spec.get("contexts", ()))
        self.log_path = os.path.join(workdir, f"{name}.log")
        with open(self.log_path, "wb") as err:
            popen = subprocess.Popen(launch.tool_command("tools.bench", "_watchers", json.dumps(spec)),
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=err)
        self.proc = Proc(name, popen)
        self._timeout = 60.0
        self._lines: queue.Queue[bytes] = queue.Queue()

        def read() -> None:
            assert popen.stdout is not None
            for line in popen.stdout:
                self._lines.put(line)
            self._lines.put(b"")

        threading.Thread(target=read, daemon=True).start()
        try:
            self.ready = self._reply(ready_timeout)
        except BaseException:
            self.stop(graceful=False)
            raise

    def _reply(self, timeout: float) -> dict[str, Any]:
        import queue

        try:
            line = self._lines.get(timeout=timeout)
        except queue.Empty:
            raise RuntimeError(f"the {self.name} helper did not answer within {timeout:g} s") from None
        if not line:
            with open(self.log_path, errors="replace") as f:
                tail = f.read()[-2000:]
            raise RuntimeError(f"the {self.name} helper exited:\n{tail}")
        out: dict[str, Any] = json.loads(line)
        return out

    def request(self, until: dict[str, int], timeout: float) -> None:
        """Ask for what each watcher of those contexts delivered since the last answer, once all reach `until`."""
        stdin = self.proc.popen.stdin
        assert stdin is not None
        stdin.write(json.dumps({"cmd": "wait", "until": until, "timeout": timeout}).encode() + b"\n")
        stdin.flush()
        self._timeout = timeout

    def answer(self) -> dict[str, Any]:
        return self._reply(self._timeout + 30)

    def wait(self, until: dict[str, int], timeout: float) -> dict[str, Any]:
        self.request(until, timeout)
        return self.answer()

    def stop(self, graceful: bool = True) -> None:
        """Close its stdin (it exits at once when idle), then SIGTERM if it is still there."""
        stdin = self.proc.popen.stdin
        if stdin is not None and not stdin.closed:
            try:
                stdin.close()
            except OSError:
                pass
        if graceful:
            try:
                self.proc.popen.wait(2)
            except subprocess.TimeoutExpired:
                pass
        self.proc.stop()
        if self.proc.popen.stdout is not None:
            self.proc.popen.stdout.close()


def wait_watchers_counted(client: Client, watchers: int, contexts: int, timeout: float = 15.0) -> None:
    """Until the node's watch registry counts `watchers` watchers over `contexts` contexts."""
    deadline = time.monotonic() + timeout
    while True:
        st = client.status()
        got = (st.get("watchers"), st.get("watched_contexts"))
        if got == (watchers, contexts):
            return
        if time.monotonic() > deadline:
            raise RuntimeError(f"the node counts (watchers, contexts) = {got}, expected {(watchers, contexts)}")
        time.sleep(0.05)


def join_latencies(reports: Sequence[dict[str, Any]], since: dict[tuple[str, int], int]) -> list[float]:
    """Each watcher's receipt of (context, seq) minus `since[(context, seq)]` (an acknowledgement or
    a submission; both CLOCK_MONOTONIC ns, the same clock in every process), in seconds."""
    lat = []
    for w in reports:
        c = w["context"]
        for seq, t in w["times"]:
            a = since.get((c, seq))
            if a is not None:
                lat.append((t - a) / 1e9)
    return lat


def watch_health(reports: Sequence[dict[str, Any]]) -> dict[str, int]:
    """Totals over watchers: ordering errors and what the Watch had to repair."""
    return {k: sum(int(w[k]) for w in reports) for k in ("errors", "refills", "duplicates", "dropped_ahead", "outages")}
