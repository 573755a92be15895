"""Without authentication a node serves only on loopback unless told --insecure (node/config.py)."""

from __future__ import annotations

import pytest

from node.config import ConfigError, is_loopback, parse

pytestmark = pytest.mark.timeout(30)


@pytest.mark.parametrize("host, loopback", [
    ("127.0.0.1", True), ("127.5.5.5", True), ("::1", True), ("[::1]", True), ("localhost", True),
    ("LOCALHOST", True), ("::ffff:127.0.0.1", True),
    ("0.0.0.0", False), ("::", False), ("10.0.0.1", False), ("192.168.1.5", False), ("example.com", False),
    ("::ffff:10.0.0.1", False), ("localhost.example.com", False), ("fe80::1", False),
])
def test_what_counts_as_loopback(host, loopback):
    assert is_loopback(host) is loopback


@pytest.mark.parametrize("argv", [
    ["--listen", "0.0.0.0:7400"],
    ["--listen", "10.1.2.3:7400"],
    ["--listen", "[::]:7400"],
    ["--listen", "node1.example.com:7400"],
    ["--advertise", "10.1.2.3:7400"],
    ["--listen", "127.0.0.1:7400", "--advertise", "node1.example.com:7400"],
])
def test_a_non_loopback_address_without_insecure_is_refused_with_what_to_do(argv):
    with pytest.raises(ConfigError, match=r"is not a loopback address.*--insecure"):
        parse(argv, environ={})


@pytest.mark.parametrize("argv, environ", [
    (["--listen", "0.0.0.0:7400", "--insecure"], {}),
    (["--listen", "10.1.2.3:7400", "--advertise", "10.1.2.3:7400"], {"LEDGER_INSECURE": "1"}),
])
def test_insecure_serves_beyond_loopback_and_is_recorded(argv, environ):
    assert parse(argv, environ=environ).insecure


def test_loopback_needs_no_flag_and_is_not_insecure():
    for listen in ("127.0.0.1:7400", "[::1]:7400", "localhost:7400"):
        assert not parse(["--listen", listen], environ={}).insecure


@pytest.mark.parametrize("value", ["yes", "true", "2", " 1"])
def test_ledger_insecure_takes_only_1_or_0(value):
    with pytest.raises(ConfigError, match="LEDGER_INSECURE must be 1 or 0"):
        parse([], environ={"LEDGER_INSECURE": value})


def test_ledger_insecure_0_does_not_open_a_non_loopback_address():
    with pytest.raises(ConfigError, match="not a loopback address"):
        parse(["--listen", "0.0.0.0:7400"], environ={"LEDGER_INSECURE": "0"})
