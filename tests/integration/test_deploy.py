"""deploy/: the systemd unit and the container file, exercised as far as this machine allows
(`systemd-analyze verify` where present; the container's configuration run as a process)."""

from __future__ import annotations

import configparser
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from node.config import build_parser
from tools import launch

pytestmark = pytest.mark.timeout(60)

DEPLOY = Path(__file__).resolve().parents[2] / "deploy"
UNIT = DEPLOY / "ledger-node.service"
CONTAINER = DEPLOY / "Containerfile"


def _unit() -> configparser.ConfigParser:
    cp = configparser.ConfigParser(strict=False, interpolation=None, delimiters=("=",))
    cp.optionxform = str  # type: ignore[assignment,method-assign]
    cp.read(UNIT)
    return cp


def _known_variables() -> set[str]:
    return set(re.findall(r"\[(LEDGER_[A-Z_]+)", build_parser().format_help()))


def test_the_unit_is_sandboxed_and_stops_cleanly():
    svc = _unit()["Service"]
    for key, want in (("NoNewPrivileges", "yes"), ("ProtectSystem", "strict"), ("DynamicUser", "yes"),
                      ("StateDirectory", "converge-ledger"), ("KillSignal", "SIGTERM"), ("PrivateTmp", "yes"),
                      ("ProtectHome", "yes"), ("CapabilityBoundingSet", "")):
        assert svc.get(key) == want, key
    assert "Environment=LEDGER_DATA=/var/lib/converge-ledger" in UNIT.read_text()  # the state directory
    assert int(svc["TimeoutStopSec"]) >= 30


def test_every_variable_the_deploy_files_set_is_one_the_node_reads():
    used = set(re.findall(r"(LEDGER_[A-Z_]+)=", UNIT.read_text() + CONTAINER.read_text()))
    assert used and used <= _known_variables(), used - _known_variables()


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not on this machine")
def test_systemd_analyze_verifies_the_unit(tmp_path):
    node = shutil.which("ledger-node", path=os.path.dirname(sys.executable)) or shutil.which("ledger-node")
    if node is None:
        pytest.skip("ledger-node is not installed as a command")
    unit = tmp_path / "ledger-node.service"
    unit.write_text(UNIT.read_text().replace("/usr/local/bin/ledger-node", node))
    r = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr


def _container_env() -> dict[str, str]:
    text = CONTAINER.read_text().replace("\\\n", " ")
    (env_line,) = [line for line in text.splitlines() if line.startswith("ENV ")]
    return dict(kv.split("=", 1) for kv in env_line[4:].split())


def test_the_container_file_runs_as_a_user_with_a_health_check():
    text = CONTAINER.read_text()
    assert re.search(r"^FROM python:3\.11", text, re.M) and re.search(r"^USER ledger$", text, re.M)
    assert 'ENTRYPOINT ["ledger-node"]' in text and "STOPSIGNAL SIGTERM" in text
    assert "127.0.0.1:9464/healthz" in text and _container_env()["LEDGER_METRICS"] == "127.0.0.1:9464"


def _env(extra: dict[str, str], data: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("LEDGER_")}
    env.update(extra)
    env["LEDGER_DATA"] = str(data)
    env["LEDGER_METRICS"] = "127.0.0.1:0"  # the container's, on a free port here
    env["LEDGER_LISTEN"] = env["LEDGER_LISTEN"].replace(":7400", ":0")
    return env


def test_the_container_configuration_without_keys_is_refused_in_one_line(tmp_path):
    env = _env(_container_env(), tmp_path / "data")
    r = subprocess.run([sys.executable, "-m", "node.main"], capture_output=True, text=True, timeout=30, env=env)
    assert r.returncode == 2 and "is not a loopback address" in r.stderr and "--insecure" in r.stderr


def test_the_container_configuration_serves_and_its_health_check_passes(tmp_path):
    env = _env({**_container_env(), "LEDGER_INSECURE": "1"}, tmp_path / "data")
    proc, out, ready = launch.start([], timeout=20, env=env)  # no flags: the variables alone, as in the image
    try:
        text = "\n".join(out.lines)
        assert "ready router=tcp://0.0.0.0:" in text  # all interfaces, as in the container
        m = re.search(r"metrics \(HTTP\):\s+http://(\S+)/metrics", text)
        assert m, text
        # the HEALTHCHECK's own command, pointed at this node's port
        (cmd,) = re.findall(r'"-c", "(.*)"\]', CONTAINER.read_text())
        r = subprocess.run([sys.executable, "-c", cmd.replace("127.0.0.1:9464", m.group(1))], timeout=30)
        assert r.returncode == 0
    finally:
        proc.terminate()
        assert proc.wait(30) == 0
