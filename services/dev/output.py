"""The supervisor's output: every line prefixed with the name of the service (or `stack`), coloured on a terminal."""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Sequence
from typing import TextIO

__all__ = ["PrefixedOutput", "isatty"]

_COLORS = ("36", "33", "35", "32", "34", "31", "96", "93")


def isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False


class PrefixedOutput:
    """Writes `name | line` to `stream`, one whole line at a time (services write from several threads)."""

    def __init__(self, stream: TextIO, names: Sequence[str], *, color: bool) -> None:
        self.stream = stream
        self._width = max([5, *(len(n) for n in names)])
        self._colors = {n: _COLORS[i % len(_COLORS)] for i, n in enumerate(names)}
        self._color = color
        self._lock = threading.Lock()

    def say(self, name: str, line: str) -> None:
        label = f"{name:<{self._width}} |"
        if self._color:
            code = self._colors.get(name, "1")
            label = f"\x1b[{code}m{label}\x1b[0m"
        with self._lock, contextlib.suppress(OSError, ValueError):
            self.stream.write(f"{label} {line}\n")
            self.stream.flush()
