"""What users see while they wait: a status line or a bar on a terminal, plain lines otherwise."""

from __future__ import annotations

import sys
import time
from collections.abc import Mapping, Sequence
from typing import TextIO

_SPINNER = "|/-\\"


class Progress:
    """A one-line progress display on ``stream`` (stderr by default).

    On a terminal the line is redrawn in place; elsewhere only changes are printed,
    one per line, so logs stay readable.
    """

    def __init__(self, stream: TextIO | None = None, *, enabled: bool = True) -> None:
        self.stream = stream or sys.stderr
        self.enabled = enabled
        self.tty = self.stream.isatty()
        self.started = time.monotonic()
        self._last = ""
        self._tick = 0

    def status(self, text: str) -> None:
        """Show ``text`` with the time elapsed so far."""
        if not self.enabled:
            return
        elapsed = time.monotonic() - self.started
        if self.tty:
            self._tick += 1
            spin = _SPINNER[self._tick % len(_SPINNER)]
            self._draw(f"{spin} {text} [{elapsed:5.1f}s]")
        elif text != self._last:
            self.stream.write(f"{text} [{elapsed:.1f}s]\n")
            self.stream.flush()
        self._last = text

    def bar(self, done: int, total: int, text: str = "") -> None:
        """Show a bar for ``done`` of ``total``."""
        if not self.enabled:
            return
        width = 30
        filled = width * done // total if total else width
        line = f"[{'#' * filled}{'.' * (width - filled)}] {done}/{total} {text}".rstrip()
        if self.tty:
            self._draw(line)
        elif line != self._last:
            self.stream.write(line + "\n")
            self.stream.flush()
        self._last = line

    def _draw(self, line: str) -> None:
        self.stream.write("\r\x1b[K" + line)
        self.stream.flush()

    def close(self) -> None:
        """Clear the line so what follows starts clean."""
        if self.enabled and self.tty and self._last:
            self.stream.write("\r\x1b[K")
            self.stream.flush()


def table(rows: Sequence[Mapping[str, object]], columns: list[str]) -> str:
    """Return ``rows`` as an aligned text table with a header line."""
    cells = [[str(c).upper() for c in columns]]
    cells += [["" if r.get(c) is None else str(r.get(c)) for c in columns] for r in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(columns))]
    return "\n".join("  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)).rstrip()
                     for row in cells)
