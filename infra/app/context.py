"""What every command of the application layer shares: the store, the clock, ids, the retry budget
and the hooks told about appends."""

from __future__ import annotations

import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

from domain.stages import DEFAULT_LIMITS, Limits
from infra.app.ports import EventStore


def utc_now() -> datetime:
    return datetime.now(UTC)


def new_uuid() -> str:
    return str(uuid.uuid4())


@dataclass(frozen=True)
class AppContext:
    store: EventStore
    now: Callable[[], datetime] = utc_now
    new_id: Callable[[], str] = new_uuid
    retries: int = 8
    on_append: Callable[[], None] | None = None
    # Told the id of every run this process appended to (the API wakes the executors with it).
    on_run_appended: Callable[[str], None] | None = None
    # Definition size limits (PIPELINES_MAX_*): the API's and the commands' checks agree.
    limits: Limits = DEFAULT_LIMITS

    def appended(self) -> None:
        if self.on_append is not None:
            self.on_append()

    def run_appended(self, run_id: str) -> None:
        if self.on_run_appended is not None:
            self.on_run_appended(run_id)
