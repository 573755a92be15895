"""node/options.py is the one list of the node's options: the parser, --help, the variables, the
config file's names, Config's defaults, status.config and the README's table all follow it."""

from __future__ import annotations

import argparse
import dataclasses
import re
from pathlib import Path

import pytest

from node import options
from node.config import Config, ConfigError, build_parser, parse, settings_names
from node.options import OPTIONS, SETTINGS

pytestmark = pytest.mark.timeout(30)

README = Path(__file__).resolve().parents[2] / "README.md"

# a value other than the default for every setting, as a flag gives it, and the value Config then holds
SAMPLES: dict[str, tuple[str, object]] = {
    "--config": ("", None),  # it names the file: tests/unit/test_config_file.py
    "--id": ("n7", "n7"),
    "--data": (":memory:", ":memory:"),
    "--listen": ("127.0.0.1:7500", ("127.0.0.1", 7500)),
    "--pub-port": ("7600", 7600),
    "--durability": ("sync", "sync"),
    "--flush-ms": ("25", 25),
    "--max-payload": ("1M", 1 << 20),
    "--hot-bytes": ("8MiB", 8 << 20),
    "--write-buffer": ("2m", 2 << 20),
    "--watch-heartbeat-ms": ("250", 250),
    "--watch-queue": ("77", 77),
    "--max-watch-topics": ("12", 12),
    "--max-watchers-per-context": ("13", 13),
    "--peers": ("127.0.0.1:7700,[::1]:7701", (("127.0.0.1:7700", None), ("[::1]:7701", None))),
    "--cluster": ("blue", "blue"),
    "--max-peers": ("9", 9),
    "--advertise": ("127.0.0.2:7400", "127.0.0.2:7400"),
    "--heartbeat-ms": ("100", 100),
    "--suspect-after": ("2", 2),
    "--dead-after": ("20", 20),
    "--replica-timeout-ms": ("900", 900),
    "--peer-keys": ("peers.txt", "peers.txt"),
    "--client-keys": ("clients.txt", "clients.txt"),
    "--insecure": ("1", True),
    "--max-loads": ("2", 2),
    "--context-cache": ("5000", 5000),
    "--max-staged-bytes": ("1G", 1 << 30),
    "--max-client-queue": ("128K", 128 << 10),
    "--max-clients": ("100", 100),
    "--busy-poll-us": ("500", 500),
    "--busy-poll-budget": ("50", 50),
    "--log-level": ("debug", "debug"),
    "--log-format": ("json", "json"),
    "--slow-ms": ("5", 5),
    "--metrics": ("127.0.0.1:0", ("127.0.0.1", 0)),
    "--ready-lag": ("3", 3),
    "--accept-damage": ("1", True),
}


def _argv(o: options.Option, text: str) -> list[str]:
    return [o.flag] if o.kind == options.SWITCH else [o.flag, text]


def test_every_setting_has_a_sample_here_and_a_rule():
    assert set(SAMPLES) == {o.flag for o in SETTINGS}
    assert [o.flag for o in SETTINGS if o.parse is None] == []  # (else a value given would be ignored)


def test_the_parser_has_exactly_the_rows_and_no_defaults_of_its_own():
    actions = {a.option_strings[0]: a for a in build_parser()._actions if a.option_strings and a.dest != "help"}
    assert list(actions) == [o.flag for o in OPTIONS]
    for o in OPTIONS:
        a = actions[o.flag]
        # a default in the parser would hide the variable and the file (flag > environment > file)
        assert a.default in (None, argparse.SUPPRESS), o.flag
        if o.kind == options.VALUE or o.kind == options.ACTION:
            assert a.metavar == o.metavar, o.flag


def test_nothing_set_gives_each_rows_default():
    cfg = parse([], {})
    for o in SETTINGS:
        if o.flag == "--pub-port":  # described, not a value: the listen port + 1
            assert cfg.pub_port == cfg.port + 1 and o.default is None
        else:
            assert o.value(cfg) == o.default, o.flag


def test_configs_dataclass_defaults_are_the_rows():
    fields = {f.name: f for f in dataclasses.fields(Config)}
    for o in SETTINGS:
        if o.attr in fields and fields[o.attr].default is not dataclasses.MISSING:
            assert fields[o.attr].default == o.default, o.flag


@pytest.mark.parametrize("o", [o for o in SETTINGS if o.flag != "--config"], ids=lambda o: o.flag)
def test_flag_variable_and_file_set_each_setting_alike(o, tmp_path):
    text, want = SAMPLES[o.flag]
    assert want != o.default
    by_flag = o.value(parse(_argv(o, text), {}))
    assert by_flag == want
    if o.env_var is not None:
        assert o.value(parse([], {o.env_var: text})) == want
    else:
        assert o.value(parse([], {"LEDGER_" + o.key: text})) == o.default  # no variable: ignored
    f = tmp_path / "s.toml"
    f.write_text(f"{o.name} = {text!r}\n".replace("'", '"'))
    if o.not_in_file is None:
        assert o.value(parse(["--config", str(f)], {})) == want
    else:
        with pytest.raises(ConfigError, match="cannot be set in a config file"):
            parse(["--config", str(f)], {})


def test_help_shows_each_rows_variable_and_default():
    text = re.sub(r"\s+", " ", build_parser().format_help())
    for o in OPTIONS:
        assert o.flag in text
        if o.env_var is not None:
            assert f"[{o.env_var}" in text, o.flag
        if o.kind == options.VALUE:
            assert f"(default {o.default_text})" in text, o.flag
    assert "(default 4MiB)" in text and "[LEDGER_INSECURE=1]" in text


def test_the_config_files_names_are_the_settings():
    assert settings_names() == {o.key for o in SETTINGS}
    assert {o.key for o in OPTIONS if o.not_in_file} == {"CONFIG", "ACCEPT_DAMAGE", "CHECK", "VERSION"}


def test_every_default_is_a_value_its_own_rule_accepts():
    for o in SETTINGS:
        if o.kind == options.VALUE and o.default not in (None, ()) and o.flag not in ("--listen",):
            assert o.parse is not None and o.parse(str(o.default), o.flag) == o.default, o.flag
    assert BY("--listen").parse("127.0.0.1:7400", "--listen") == BY("--listen").default


def BY(flag: str) -> options.Option:
    return options.BY_FLAG[flag]


def test_status_reports_every_row_marked_safe_and_no_key_list():
    cfg = parse(["--peers", "n2@127.0.0.1:7500", "--metrics", "127.0.0.1:0", "--peer-keys", "p.txt"], {})
    shown = cfg.report()
    assert set(shown) == {o.name for o in SETTINGS if o.status}
    assert "peer-keys" not in shown and "client-keys" not in shown
    assert shown["peers"] == ["n2@127.0.0.1:7500"] and shown["metrics"] == "127.0.0.1:0"
    assert shown["listen"] == "127.0.0.1:7400" and shown["max-payload"] == 4 << 20
    v6 = parse(["--listen", "[::1]:7400"], {}).report()
    assert v6["listen"] == "[::1]:7400"


def test_status_config_is_in_the_status_reply():
    from tests.unit.test_core import ask, make_core

    core, _ = make_core(cluster="blue")
    [reply] = ask(core, "status")
    assert reply["config"] == core.config.report()
    assert reply["config"]["cluster"] == "blue" and reply["config"]["listen"] == "127.0.0.1:1"


def test_the_readme_table_is_the_generated_one():
    table = options.readme_table(README.read_text(encoding="utf-8"))
    assert table is not None, f"README.md lost its markers: {options.BEGIN} ... {options.END}"
    assert table == options.markdown(), (
        "README.md's options table differs from node/options.py: run `python -m node.options --write-readme`")


def test_the_generator_prints_the_table_and_rewrites_only_between_the_markers(capsys):
    assert options.main(["--markdown"]) == 0
    assert capsys.readouterr().out == options.markdown()
    doc = f"before\n{options.BEGIN}\nold table\n{options.END}\nafter\n"
    new = options.with_table(doc)
    assert new.startswith(f"before\n{options.BEGIN}\n| flag |") and new.endswith(f"{options.END}\nafter\n")
    assert options.readme_table(new) == options.markdown()
    with pytest.raises(ValueError, match="markers"):
        options.with_table("no markers")
    assert options.main(["--bogus"]) == 2


def test_sizes_read_as_written():
    assert [options.format_size(n) for n in (4 << 20, 512 << 10, 1 << 30, 1000, 1536)] == [
        "4MiB", "512KiB", "1GiB", "1000", "1536"]


def test_suspect_after_must_stay_below_dead_after():
    with pytest.raises(ConfigError, match="1 <= suspect-after < dead-after <= 1000"):
        parse(["--suspect-after", "10"], {})
    with pytest.raises(ConfigError, match="--dead-after must be an integer from 1 to 1000"):
        parse(["--dead-after", "1001"], {})


def test_a_context_cache_of_no_context_is_refused():
    with pytest.raises(ConfigError, match="--context-cache must be an integer from 1"):
        parse(["--context-cache", "0"], {})
    with pytest.raises(ConfigError, match="--context-cache"):
        parse([], {"LEDGER_CONTEXT_CACHE": "many"})
    assert parse(["--context-cache", "1"], {}).context_cache == 1
