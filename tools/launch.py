"""Starting a `ledger-node` child process and waiting for its ready line: the one place the
tools (cluster, chaos, bench) and the tests do it.

The child runs as `python -P -m node.main`: `-P` (Python 3.11) keeps the caller's working
folder off `sys.path`, so a project that has its own `node/`, `protocol/` or `tools/` folder
cannot shadow the installed packages (without it, `ledger cluster` run from such a folder
failed with "No module named node.main"). PYTHONPATH is still honoured, so a source tree can
be run without installing it.

A node prints `ready router=ADDR pub=ADDR id=ID` once it serves (SPEC, README "Quick start").
Its output goes either to a pipe, read by a thread (`Output`: kept lines, optionally echoed or
appended to a file, never left to fill the pipe and block the node), or straight to a log file
that survives the caller (`wait_ready_in_file`).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import IO, Any

READY = re.compile(r"^ready router=(\S+) pub=(\S+) id=(\S+)$", re.MULTILINE)


@dataclass(frozen=True)
class Ready:
    router: str  # tcp://host:port
    pub: str  # tcp://host:port
    node_id: str


class NodeDidNotStart(RuntimeError):
    """The node exited, or printed no ready line in time; the message ends with its output,
    and `lines` holds all of it that was read."""

    def __init__(self, message: str, lines: list[str] | None = None) -> None:
        super().__init__(message)
        self.lines = lines or []


def node_command(*args: str, netns: str | None = None) -> list[str]:
    """The command line of a node with these flags (inside network namespace `netns`, if given)."""
    prefix = ["ip", "netns", "exec", netns] if netns else []
    return [*prefix, sys.executable, "-P", "-m", "node.main", *args]


def tool_command(module: str, *args: str) -> list[str]:
    """A helper process of a tool (`python -P -m tools.bench _echo ...`), safe from shadowing too."""
    return [sys.executable, "-P", "-m", module, *args]


def parse_ready(text: str) -> Ready | None:
    m = READY.search(text)
    return Ready(*m.groups()) if m else None


class Output:
    """Reads a child's stdout (text or bytes) in a daemon thread until it closes: keeps every
    line (`keep`), appends them to `log_path`, and calls `on_line` for each; `ready` is set at
    the ready line, whose fields are in `info`."""

    def __init__(self, proc: subprocess.Popen[Any], keep: bool = True, log_path: str | None = None,
                 on_line: Callable[[str], None] | None = None) -> None:
        self.lines: list[str] = []
        self.info: Ready | None = None
        self.ready = threading.Event()
        self._keep = keep
        self._log_path = log_path
        self._on_line = on_line
        threading.Thread(target=self._read, args=(proc,), daemon=True).start()

    def _read(self, proc: subprocess.Popen[Any]) -> None:
        assert proc.stdout is not None
        log: IO[str] | None = open(self._log_path, "a") if self._log_path else None  # noqa: SIM115
        try:
            for raw in proc.stdout:
                line = (raw.decode(errors="replace") if isinstance(raw, bytes) else raw).rstrip("\n")
                if self._keep or not self.ready.is_set():
                    self.lines.append(line)
                if log is not None:
                    log.write(line + "\n")
                    log.flush()
                if self.info is None:
                    self.info = parse_ready(line)
                    if self.info is not None:
                        self.ready.set()
                if self._on_line is not None:
                    self._on_line(line)
        finally:
            if log is not None:
                log.close()

    def text(self, last: int | None = None) -> str:
        lines = self.lines if last is None else self.lines[-last:]
        return "\n".join(lines)


def wait_ready(proc: subprocess.Popen[Any], out: Output, timeout: float,
               abort: threading.Event | None = None) -> Ready:
    """The node's ready line, once printed; NodeDidNotStart if it exits, `timeout` passes or
    `abort` is set first (the caller stops it)."""
    deadline = time.monotonic() + timeout
    while not out.ready.wait(0.05):
        rc = proc.poll()
        if rc is not None or time.monotonic() > deadline or (abort is not None and abort.is_set()):
            why = f"exited with code {rc}" if rc is not None else "printed no ready line in time"
            raise NodeDidNotStart(f"ledger-node {why}:\n{out.text(last=40)}", out.lines)
    assert out.info is not None
    return out.info


def wait_ready_in_file(proc: subprocess.Popen[Any], path: str | os.PathLike[str], offset: int, timeout: float,
                       abort: threading.Event | None = None) -> Ready:
    """The same for a node whose output goes to a log file: read from `offset` on."""
    deadline = time.monotonic() + timeout
    while True:
        with open(path, "rb") as f:
            f.seek(offset)
            text = f.read().decode(errors="replace")
        info = parse_ready(text)
        if info is not None:
            return info
        rc = proc.poll()
        if rc is not None or time.monotonic() > deadline or (abort is not None and abort.is_set()):
            why = f"exited with code {rc}" if rc is not None else "printed no ready line in time"
            tail = "\n".join(text.splitlines()[-8:])
            raise NodeDidNotStart(f"ledger-node {why} (log {path}):\n{tail}", text.splitlines())
        time.sleep(0.05)


def start(args: Sequence[str], *, timeout: float = 30.0, keep: bool = True, text: bool = True,
          log_path: str | None = None, on_line: Callable[[str], None] | None = None,
          env: dict[str, str] | None = None, **popen: Any) -> tuple[subprocess.Popen[Any], Output, Ready]:
    """Start a node with flags `args`, its output on a pipe read by an `Output`, and wait for
    its ready line. On failure the child is killed and NodeDidNotStart raised."""
    proc = subprocess.Popen(node_command(*args), stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, text=text, bufsize=1 if text else -1,
                            env={**os.environ, **env} if env else None, **popen)
    out = Output(proc, keep=keep, log_path=log_path, on_line=on_line)
    try:
        return proc, out, wait_ready(proc, out, timeout)
    except BaseException:
        if proc.poll() is None:
            proc.kill()
        proc.wait(10)
        time.sleep(0.05)  # the reader thread takes the last lines the child wrote
        raise
