"""The store positions a request's commands wrote, so that the HTTP layer can answer with them
(read-your-writes: a client waits for the read models to pass its own write)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from contextvars import ContextVar

from infra.store.records import AppendResult

# A box rather than the value itself: a command run in a task of its own (an idempotent request's
# shielded body) gets a copy of the context, and the copy holds the same box.
_written: ContextVar[list[int] | None] = ContextVar("pipelines_written_position", default=None)


@contextlib.contextmanager
def tracking() -> Iterator[list[int]]:
    """Collect the positions written meanwhile: the box holds the highest (0: none)."""
    box = [0]
    token = _written.set(box)
    try:
        yield box
    finally:
        _written.reset(token)


def written() -> int:
    """The highest position the request being served has written so far (0: none, or untracked)."""
    box = _written.get()
    return box[0] if box is not None else 0


def note(result: AppendResult) -> AppendResult:
    """Tell the request being served (if any) what this append wrote; returns `result`."""
    box = _written.get()
    if box is not None and result.positions:
        box[0] = max(box[0], *result.positions)
    return result
