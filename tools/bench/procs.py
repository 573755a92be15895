"""The processes a run starts and stops: ledger-nodes (through tools/launch.py), the echo server and
redis-server, as `Proc` (with its RSS and CPU time); free ports and the open-files limit."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass

from tools import launch


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    address: str = ""
    pub: str = ""  # a ledger-node's watch (XPUB) address

    def rss_mb(self) -> float:
        try:
            with open(f"/proc/{self.popen.pid}/status") as f:
                for line in f:
                    if line.startswith("VmRSS:"):
                        return int(line.split()[1]) / 1024
        except OSError:
            pass
        return float("nan")

    def cpu_s(self) -> float:
        """User + system CPU seconds the process has used so far (all its threads)."""
        try:
            with open(f"/proc/{self.popen.pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
            return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        except (OSError, IndexError, ValueError):
            return float("nan")

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(30)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(10)


def start_echo(workdir: str) -> Proc:
    port_file = os.path.join(workdir, "echo.port")
    p = subprocess.Popen(launch.tool_command("tools.bench", "_echo", port_file),
                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 15
    while not os.path.exists(port_file):
        if p.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError("the echo server did not start")
        time.sleep(0.02)
    with open(port_file) as f:
        return Proc("echo", p, f"tcp://127.0.0.1:{f.read().strip()}")


def start_node(data: str, *flags: str, listen: str = "127.0.0.1:0", log_path: str | None = None,
               name: str = "ledger", nofile: int | None = None, timeout: float = 60.0) -> tuple[Proc, float]:
    """Start a ledger-node (tools/launch.py); returns it and the seconds until its ready line.

    Its output after the ready line is discarded, or appended to `log_path`. `nofile` sets
    the node's open-files limit (soft and hard)."""
    t0 = time.monotonic()

    def limit() -> None:
        import resource

        if nofile is not None:
            resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))

    try:
        p, _out, ready = launch.start(["--data", data, "--listen", listen, "--log-level", "warning", *flags],
                                      timeout=timeout, keep=False, text=False, log_path=log_path,
                                      preexec_fn=limit if nofile else None)
    except launch.NodeDidNotStart as exc:
        raise RuntimeError(f"{name} did not start: {exc}") from None
    return Proc(name, p, ready.router, ready.pub), time.monotonic() - t0


def start_redis(workdir: str, fsync: bool) -> Proc | None:
    exe = shutil.which("redis-server")
    if exe is None:
        return None
    port = free_port()
    d = tempfile.mkdtemp(prefix="redis-", dir=workdir)
    args = [exe, "--port", str(port), "--bind", "127.0.0.1", "--dir", d, "--save", "",
            "--protected-mode", "yes", "--daemonize", "no", "--logfile", ""]
    args += ["--appendonly", "yes", "--appendfsync", "always"] if fsync else ["--appendonly", "no"]
    p = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    import redis

    r = redis.Redis(host="127.0.0.1", port=port)
    deadline = time.monotonic() + 15
    while True:
        try:
            r.ping()
            break
        except redis.exceptions.ConnectionError:
            if p.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("redis-server did not start") from None
            time.sleep(0.05)
    r.close()
    return Proc("redis-fsync" if fsync else "redis", p, f"{port}")


def _raise_fd_limit(want: int) -> None:
    """Sockets are file descriptors (a SUB socket: its TCP connection and a mailbox)."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < want:
        new = want if hard == resource.RLIM_INFINITY else min(want, hard)
        resource.setrlimit(resource.RLIMIT_NOFILE, (new, hard))
