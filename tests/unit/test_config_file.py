"""`--config FILE`: a TOML file of settings, below flags and the environment, checked like them."""

from __future__ import annotations

import pytest

from node.config import ConfigError, build_parser, parse, settings_names

pytestmark = pytest.mark.timeout(30)


def _file(tmp_path, text: str) -> str:
    p = tmp_path / "ledger.toml"
    p.write_text(text)
    return str(p)


def test_precedence_is_flag_then_environment_then_file_then_default(tmp_path):
    f = _file(tmp_path, 'flush-ms = 30\nheartbeat_ms = 700\ncluster = "from-file"\nmax-loads = 7\n')
    cfg = parse(["--config", f, "--flush-ms", "20"], {"LEDGER_HEARTBEAT_MS": "600"})
    assert cfg.flush_ms == 20  # flag
    assert cfg.heartbeat_ms == 600  # environment
    assert cfg.cluster == "from-file" and cfg.max_loads == 7  # file
    assert cfg.watch_queue == 1000  # default
    assert cfg.config_file == f


def test_the_file_can_be_named_by_the_environment_and_holds_lists_and_booleans(tmp_path):
    f = _file(tmp_path, 'peers = ["127.0.0.1:7500", "127.0.0.1:7600"]\ndurability = "sync"\n'
                        'listen = "127.0.0.1:7400"\ninsecure = false\n')
    cfg = parse([], {"LEDGER_CONFIG": f})
    assert cfg.peers == ("127.0.0.1:7500", "127.0.0.1:7600") and cfg.durability == "sync"
    assert not cfg.insecure


@pytest.mark.parametrize("text, says", [
    ("flush-ms = 0\n", "--flush-ms must be an integer from 1"),  # the flag's own rule
    ("lissen = \"x\"\n", "unknown setting 'lissen'"),
    ("accept-damage = true\n", "cannot be set in a config file"),
    ("check = \"DATA\"\n", "cannot be set in a config file"),
    ("heartbeat-ms = 1.5\n", "'heartbeat-ms' must be a string, an integer, true/false or a list of strings"),
    ("[cluster]\nx = 1\n", "'cluster' must be"),
    ("listen = \n", "not valid TOML"),
])
def test_a_bad_file_is_refused_in_one_line_naming_the_setting(tmp_path, text, says):
    with pytest.raises(ConfigError) as e:
        parse(["--config", _file(tmp_path, text)], {})
    assert says in str(e.value) and "\n" not in str(e.value)


def test_a_missing_file_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="cannot read it"):
        parse(["--config", str(tmp_path / "nope.toml")], {})


def test_every_flag_with_a_variable_can_be_set_in_the_file():
    names = settings_names(build_parser())
    assert {"LISTEN", "PEERS", "BUSY_POLL_US", "METRICS", "LOG_FORMAT", "INSECURE"} <= names
    assert "CONFIG" in names  # (and refused inside a file: see above)
