"""The progress line (tools.progress): in place on a terminal, whole lines elsewhere, nothing quiet."""

from __future__ import annotations

import io

import pytest

from tools import progress as progress_mod
from tools.progress import Progress, say


class FakeTTY(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_terminal_gets_one_line_rewritten_in_place_and_ended_once():
    s = FakeTTY()
    p = Progress("verify", stream=s)
    assert p.tty
    p.update("1/3", force=True)
    p.update("2/3", force=True)
    p.done("3/3")
    out = s.getvalue()
    assert out == "\r\x1b[Kverify: 1/3\r\x1b[Kverify: 2/3\r\x1b[Kverify: 3/3\n"


def test_updates_are_rate_limited_on_a_terminal_and_more_so_in_a_log(monkeypatch):
    now = [100.0]
    monkeypatch.setattr(progress_mod.time, "monotonic", lambda: now[0])
    tty, log = FakeTTY(), io.StringIO()
    pt, pl = Progress("x", stream=tty), Progress("x", stream=log)
    assert not pl.tty
    for i in range(80):  # 10 s in steps of 1/8 s (exact in binary)
        pt.update(f"step {i}")
        pl.update(f"step {i}")
        now[0] += 0.125
    assert tty.getvalue().count("\r") == 40  # the first at once, then at most every 0.2 s
    assert log.getvalue().splitlines() == ["x: step 0"]  # the first at once, then every 10 s
    pl.done()
    assert log.getvalue().splitlines() == ["x: step 0", "x: step 79"]  # and the last state, once


def test_quiet_writes_nothing_at_all():
    s = FakeTTY()
    p = Progress("backup", quiet=True, stream=s)
    p.update("1/2", force=True)
    p.done("2/2")
    say("a result line", quiet=True, stream=s)
    assert s.getvalue() == ""


def test_with_a_delay_a_quick_run_shows_nothing_even_at_the_end(monkeypatch):
    now = [0.0]
    monkeypatch.setattr(progress_mod.time, "monotonic", lambda: now[0])
    s = FakeTTY()
    p = Progress("load", stream=s, delay=1.0)
    p.update("1/2")
    now[0] = 0.5
    p.done("2/2")
    assert s.getvalue() == ""
    p = Progress("load", stream=s, delay=1.0)
    now[0] = 2.0
    p.update("1/2")
    p.done("2/2")
    assert s.getvalue() == "\r\x1b[Kload: 1/2\r\x1b[Kload: 2/2\n"


def test_a_note_goes_above_the_drawn_line_and_the_line_comes_back():
    s = FakeTTY()
    with Progress("bench", stream=s) as p:
        p.update("round 1/3", force=True)
        say("round 1/3: 1,000/s")  # from code that does not hold the line
        assert s.getvalue() == ("\r\x1b[Kbench: round 1/3" "\r\x1b[K" "round 1/3: 1,000/s\n"
                                "\r\x1b[Kbench: round 1/3")
    assert s.getvalue().endswith("\n")  # left by an error: ended, so the next line starts clean


def test_a_note_to_another_stream_clears_the_line_first():
    err, out = FakeTTY(), io.StringIO()
    p = Progress("chaos", stream=err)
    p.update("t=3/20 s", force=True)
    p.note("ledger-chaos: healed", out)
    assert out.getvalue() == "ledger-chaos: healed\n"
    assert err.getvalue() == "\r\x1b[Kchaos: t=3/20 s\r\x1b[K\r\x1b[Kchaos: t=3/20 s"
    p.done()


@pytest.mark.parametrize("stream", [None])
def test_the_default_stream_is_stderr(stream, capsys):
    p = Progress("x", stream=stream)
    p.update("1", force=True)
    p.done()
    err = capsys.readouterr().err
    assert err.splitlines()[-1] == "x: 1"
