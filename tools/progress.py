"""The progress line of the long commands (backup, restore, load, snapshot, verify, ledger-chaos,
ledger-bench): one line on stderr that a terminal rewrites in place, and nothing with --json.

On a terminal (`stream.isatty()`, or `tty=True`) the line is rewritten at most every 0.2 s
("\\r", then the text, then "erase to the end of the line"); elsewhere (a log file, a pipe, CI)
it is written as a whole line at most every 10 s, so that a long job still shows it is alive
without flooding the log; `done` writes the last state once. With `delay`, nothing at all is
shown before that many seconds, so that a command that turns out quick stays as quiet as before.
`quiet` (the commands' --json) writes nothing at all: the JSON result on stdout is the only
output a script has to read, and stderr stays free for errors.

`note` writes a line that stays (a result, a warning) without tearing the progress line: on a
terminal the line is cleared first and drawn again after the note. Only one line can be live
on a terminal, so the tools keep one `Progress` at a time; `say` reaches the live one from code
that does not hold it (the benchmark's per-round result lines).
"""

from __future__ import annotations

import sys
import time
from typing import IO

TTY_EVERY_S = 0.2
LOG_EVERY_S = 10.0
_CLEAR = "\r\x1b[K"

_live: list[Progress] = []  # the line being drawn now, if any (one per process)


class Progress:
    """One progress line (see the module's docstring). `what` prefixes every line."""

    def __init__(self, what: str, quiet: bool = False, stream: IO[str] | None = None,
                 tty: bool | None = None, delay: float = 0.0) -> None:
        self.what = what
        self.quiet = quiet
        self.stream = stream if stream is not None else sys.stderr
        if tty is None:
            try:
                tty = bool(self.stream.isatty())
            except (AttributeError, ValueError):  # (a closed or odd stream)
                tty = False
        self.tty = tty
        self.delay = delay  # nothing shown before this many seconds (a quick run stays silent)
        self.t0 = time.monotonic()
        self.last = float("-inf")  # the first update is shown at once
        self.text = ""            # what the line says now (on a terminal: what is drawn)
        self.drawn = False
        if not quiet:
            _live[:] = [self]

    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def update(self, text: str, force: bool = False) -> None:
        """The line now says `text` (shown when the last showing is old enough, or `force`)."""
        if self.quiet:
            return
        self.text = text
        now = time.monotonic()
        if now - self.t0 < self.delay:
            return
        if not force and now - self.last < (TTY_EVERY_S if self.tty else LOG_EVERY_S):
            return
        self.last = now
        self._show()

    def _show(self) -> None:
        line = f"{self.what}: {self.text}" if self.what else self.text
        if self.tty:
            self.stream.write(_CLEAR + line)
            self.drawn = True
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def note(self, text: str, stream: IO[str] | None = None) -> None:
        """A line that stays, above the progress line, on this line's stream or `stream` (stdout
        and stderr are often the same terminal: the line is cleared first either way). Written
        even when `quiet`: it is not progress."""
        out = stream if stream is not None else self.stream
        if self.tty and self.drawn:
            self.stream.write(_CLEAR)
            self.stream.flush()
            out.write(text + "\n")
            out.flush()
            self._show()
        else:
            out.write(text + "\n")
            out.flush()

    def done(self, text: str | None = None) -> None:
        """The last state, shown once (`text`, or the last one), and the line ended."""
        if self.quiet:
            return
        if text is not None:
            self.text = text
        if self.text and (self.delay <= 0 or self.last > float("-inf")):  # (a quick run: nothing)
            self._show()
            if self.tty:
                self.stream.write("\n")
                self.stream.flush()
        self.drawn = False
        if _live and _live[0] is self:
            _live.clear()

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc: object) -> None:
        # an error or Ctrl-C: end the line as it is, so the error message starts on its own line
        if self.tty and self.drawn and not self.quiet:
            self.stream.write("\n")
            self.stream.flush()
            self.drawn = False
        if _live and _live[0] is self:
            _live.clear()


def say(text: str, quiet: bool = False, stream: IO[str] | None = None) -> None:
    """A line that stays, on stderr (or `stream`), above the live progress line if there is one."""
    if quiet:
        return
    if _live:
        _live[0].note(text, stream)
        return
    out = stream if stream is not None else sys.stderr
    out.write(text + "\n")
    out.flush()
