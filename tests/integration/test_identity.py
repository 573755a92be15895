"""A node's identity key and its protected (loopback-only) mode, as a user meets them."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys

import pytest

from node.identity import KEY_FILE
from protocol.client import Client
from protocol.keys import parse_key_file
from tools import cli

pytestmark = pytest.mark.timeout(60)


def run_node(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    e = dict(os.environ)
    e.update(env or {})
    return subprocess.run([sys.executable, "-m", "node.main", *args], capture_output=True, text=True,
                          timeout=20, env=e)


def test_a_node_makes_its_key_on_first_start_shows_it_in_status_and_keeps_it(node_factory, zctx, tmp_path):
    n = node_factory()
    key = tmp_path / "n1" / KEY_FILE
    assert stat.S_IMODE(key.stat().st_mode) == 0o600
    public = parse_key_file(key.read_text()).public_hex
    assert f"identity:          {public}" in n.output() and "loopback only" in n.output()
    with Client(n.address, zctx=zctx) as c:
        st = c.status()
        assert st["public_key"] == public and st["security"] == "loopback"
    assert n.stop() == 0
    n.start()
    with Client(n.address, zctx=zctx) as c:
        assert c.status()["public_key"] == public  # the same identity after a restart


def test_a_node_whose_key_file_others_can_read_refuses_to_start(node_factory, tmp_path):
    n = node_factory()
    assert n.stop() == 0
    key = tmp_path / "n1" / KEY_FILE
    key.chmod(0o640)
    r = run_node("--data", str(tmp_path / "n1"), "--listen", "127.0.0.1:0")
    assert r.returncode == 2 and "chmod 600" in r.stderr and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1


def test_a_non_loopback_listen_is_refused_at_start_with_one_line_saying_what_to_do(tmp_path):
    r = run_node("--data", str(tmp_path / "d"), "--listen", "0.0.0.0:0")
    assert r.returncode == 2 and "not a loopback address" in r.stderr and "--insecure" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1 and not (tmp_path / "d").exists()


def test_insecure_is_logged_at_start_and_shown_in_status(node_factory, zctx):
    n = node_factory("--listen", "0.0.0.0:0", "--advertise", "127.0.0.1:7", "--insecure")
    assert "--insecure: serving on" in n.output() and "INSECURE" in n.output()
    port = n.address.rpartition(":")[2]
    with Client(f"tcp://127.0.0.1:{port}", zctx=zctx) as c:
        assert c.status()["security"] == "insecure"


def test_keygen_writes_a_private_key_file_prints_its_public_key_and_keeps_existing_ones(tmp_path, capsys):
    path = str(tmp_path / "client.key")
    assert cli.main(["--json", "keygen", path]) == 0
    out = json.loads(capsys.readouterr().out)
    ident = parse_key_file(open(path).read())
    assert out == {"public_key": ident.public_hex, "file": path}
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
    assert cli.main(["keygen", path]) == 2  # not replaced
    assert "already exists" in capsys.readouterr().err
    assert parse_key_file(open(path).read()) == ident
    assert cli.main(["--json", "keygen", "--show", path]) == 0
    assert json.loads(capsys.readouterr().out)["public_key"] == ident.public_hex
    assert cli.main(["keygen", "--force", path]) == 0
    assert parse_key_file(open(path).read()) != ident
    assert cli.main(["keygen", "--show", str(tmp_path / "missing.key")]) == 2
    assert "cannot read key file" in capsys.readouterr().err
