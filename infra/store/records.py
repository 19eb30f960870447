"""The event store's records: what is appended, what is read back, the feed cursor, and the errors
an append raises. The port itself is `infra.app.ports.EventStore`."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from domain import events as ev

# A follower's place in the global feed: (transaction id, position). Positions alone commit out
# of order; ordering by the pair and reading below the transaction horizon never skips one.
FeedCursor = tuple[int, int]
FEED_START: FeedCursor = (0, 0)


class WrongExpectedVersion(Exception):
    def __init__(self, stream_id: str, expected: int | None) -> None:
        super().__init__(f"stream {stream_id} is not at version {expected}")
        self.stream_id = stream_id
        self.expected = expected


class UniqueKeyTaken(Exception):
    def __init__(self, scope: str, key: str) -> None:
        super().__init__(f"{scope}: {key!r} is taken")
        self.scope = scope
        self.key = key


@dataclass(frozen=True, slots=True)
class NewEvent:
    event_id: str
    event: ev.Event
    org: str | None = None
    pipeline_id: str | None = None
    run_id: str | None = None


@dataclass(frozen=True, slots=True)
class UniqueKey:
    scope: str
    key: str


@dataclass(frozen=True, slots=True)
class RecordedEvent:
    position: int
    tx_id: int
    stream_id: str
    stream_version: int
    event_id: str
    event_type: str
    data: bytes
    org: str | None
    pipeline_id: str | None
    run_id: str | None
    recorded_at: datetime

    @property
    def cursor(self) -> FeedCursor:
        return (self.tx_id, self.position)

    @property
    def event(self) -> ev.Event:
        return ev.decode(self.data)


@dataclass(frozen=True, slots=True)
class AppendResult:
    version: int
    positions: tuple[int, ...]
