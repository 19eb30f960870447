"""The embedded servers this process started, stopped at exit so that none outlives it."""

from __future__ import annotations

import atexit
import contextlib
import threading
from typing import Protocol

__all__ = ["Stoppable", "forget", "remember"]


class Stoppable(Protocol):
    def stop(self) -> None: ...


_live: set[Stoppable] = set()
_live_lock = threading.Lock()


def remember(server: Stoppable) -> None:
    with _live_lock:
        _live.add(server)


def forget(server: Stoppable) -> None:
    with _live_lock:
        _live.discard(server)


def _stop_all_at_exit() -> None:
    with _live_lock:
        servers = list(_live)
    for server in servers:
        with contextlib.suppress(Exception):
            server.stop()


atexit.register(_stop_all_at_exit)
