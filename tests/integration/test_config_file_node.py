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


def test_status_config_shows_the_settings_in_effect_from_each_source(node_factory, zctx, tmp_path):
    f = tmp_path / "ledger.toml"
    f.write_text('cluster = "from-file"\nmax-payload = "1M"\nheartbeat-ms = 900\n')
    n = node_factory("--config", str(f), "--flush-ms", "15", env={"LEDGER_HEARTBEAT_MS": "700"})
    with Client(n.address, zctx=zctx) as c:
        cfg = c.status()["config"]
    assert (cfg["cluster"], cfg["max-payload"], cfg["heartbeat-ms"], cfg["flush-ms"]) == ("from-file", 1 << 20, 700, 15)
    assert cfg["config"] == str(f) and cfg["watch-queue"] == 1000  # the file, and a default
    assert isinstance(cfg["max-clients"], int)  # what the open-files limit left, not "unset"
    assert "peer-keys" not in cfg and "client-keys" not in cfg
