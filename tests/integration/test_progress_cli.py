"""Progress lines of the long commands against a real node: on a terminal (a forced one in-process,
a real pseudo-terminal for the installed script), and none at all with --json."""

from __future__ import annotations

import io
import json
import os
import pty
import select
import subprocess
import sys
import time
from pathlib import Path

import pytest

from protocol.client import Client
from tools import cli

pytestmark = pytest.mark.timeout(90)
N = 25_000  # three pages of `snapshot` (10,000 entries each): several progress updates


class FakeTTY(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture
def filled(node, zctx):
    with Client(node.address, zctx=zctx) as c:
        for start in range(0, N, 5000):
            c.append_batch("big", [f"e{i}".encode() for i in range(start, start + 5000)])
        c.append_batch("small", [b"a", b"b"])
    return node


def _run(monkeypatch, capsys, node, *argv: str) -> tuple[int, str, str]:
    """`ledger` in-process with stderr a terminal and the progress line shown from the start."""
    monkeypatch.setattr(cli, "PROGRESS_AFTER_S", 0.0)
    err = FakeTTY()
    monkeypatch.setattr(sys, "stderr", err)
    rc = cli.main(["--node", node.address.removeprefix("tcp://"), *argv])
    return rc, capsys.readouterr().out, err.getvalue()


def test_verify_snapshot_and_load_draw_a_progress_line_on_a_terminal(monkeypatch, capsys, filled, node_factory,
                                                                     tmp_path):
    rc, out, err = _run(monkeypatch, capsys, filled, "verify", "big")
    assert rc == 0 and out.startswith(f"verified big: {N} entries")
    assert err.startswith("\r\x1b[Kverify: ") and f"{N:,}/{N:,} entries (100%)" in err and err.endswith("\n")
    assert err.count("\r") >= 2  # updated in place (a first page, then the end), one line in all
    assert err.count("\n") == 1

    snap = tmp_path / "big.snap"
    rc, out, err = _run(monkeypatch, capsys, filled, "snapshot", "big", "-o", str(snap))
    assert rc == 0 and f"size: {N}" in out
    assert "\r\x1b[Ksnapshot: 10,000/25,000 entries (40%)" in err and f"{N:,}/{N:,} entries (100%)" in err

    n2 = node_factory(name="n2")
    rc, out, err = _run(monkeypatch, capsys, n2, "load", "big", str(snap))
    assert rc == 0 and f"size: {N}" in out
    assert "\r\x1b[Kload: " in err and f"{N:,}/{N:,} entries (100%)" in err

    rc, out, err = _run(monkeypatch, capsys, n2, "load", "--import", "copy", str(snap))
    assert rc == 0 and f"imported: {N}" in out
    assert "\r\x1b[Kload: 500/25,000 entries (2%)" in err and f"{N:,}/{N:,} entries (100%)" in err


def test_json_mode_writes_no_progress_and_stdout_stays_one_json_object(monkeypatch, capsys, filled, tmp_path):
    for argv in (["verify", "big"], ["snapshot", "big", "-o", str(tmp_path / "b.snap")],
                 ["load", "--import", "copy", str(tmp_path / "b.snap")],
                 ["backup", str(tmp_path / "bk")], ["restore", str(tmp_path / "bk")]):
        rc, out, err = _run(monkeypatch, capsys, filled, "--json", *argv)
        assert rc == 0, (argv, err)
        assert err == "", argv  # not a byte of progress on the terminal
        assert len(out.splitlines()) == 1 and isinstance(json.loads(out), dict), argv


def test_a_quick_command_stays_as_quiet_as_before(capsys, filled):
    # not forced: a small context takes far less than PROGRESS_AFTER_S, so no line, even on a terminal
    rc = cli.main(["--node", filled.address.removeprefix("tcp://"), "verify", "small"])
    cap = capsys.readouterr()
    assert rc == 0 and cap.err == "" and cap.out.startswith("verified small: 2 entries")


def _script() -> str:
    exe = Path(sys.executable).parent / "ledger"
    return str(exe) if exe.exists() else "ledger"


def test_the_installed_script_on_a_real_terminal_rewrites_its_backup_line(filled, tmp_path):
    master, slave = pty.openpty()
    try:
        p = subprocess.Popen([_script(), "--node", filled.address.removeprefix("tcp://"), "backup",
                              str(tmp_path / "bk")], stdout=subprocess.PIPE, stderr=slave, stdin=subprocess.DEVNULL)
        os.close(slave)
        slave = -1
        got = b""
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            r, _, _ = select.select([master], [], [], 0.5)
            if r:
                try:
                    chunk = os.read(master, 4096)
                except OSError:  # (Linux: EIO once the child closed its end)
                    break
                if not chunk:
                    break
                got += chunk
            elif p.poll() is not None:
                break
        out = p.communicate(timeout=30)[0].decode()
        assert p.returncode == 0, got
    finally:
        os.close(master)
        if slave >= 0:
            os.close(slave)
    text = got.decode()
    assert "\r\x1b[Kbackup: 2/2 contexts" in text and text.rstrip("\r\n").count("\n") == 0  # one line, rewritten
    assert "written: 2" in out  # the summary on stdout, untouched
