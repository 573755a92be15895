"""A real node started from a config file (`--config`), and one refused for a bad one."""

from __future__ import annotations

import pytest

from protocol.client import Client
from tests.integration.test_node import run_node

pytestmark = pytest.mark.timeout(60)


def test_a_node_takes_its_settings_from_the_file_and_says_so(node_factory, zctx, tmp_path):
    f = tmp_path / "ledger.toml"
    f.write_text('durability = "sync"\ncluster = "from-file"\nflush-ms = 25\n')
    n = node_factory("--config", str(f), "--flush-ms", "15")
    with Client(n.address, zctx=zctx) as c:
        st = c.status()
    assert (st["durability"], st["cluster"], st["flush_ms"], st["config_file"]) == ("sync", "from-file", 15, str(f))
    assert f"settings read from {f}" in n.output()


def test_a_bad_config_file_stops_the_start_in_one_line(tmp_path):
    f = tmp_path / "ledger.toml"
    f.write_text("max-payload = \"lots\"\n")
    r = run_node("--config", str(f), "--data", str(tmp_path / "d"), "--listen", "127.0.0.1:0")
    assert r.returncode == 2 and "max-payload" in r.stderr.lower() and len(r.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "d").exists()
