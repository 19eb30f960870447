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
class UnitLease:
    """A unit attempt's lease (the table `stage_leases`: who runs it, see infra.executor.leases)."""

    run_id: str
    key: str
    attempt: int


@dataclass(frozen=True, slots=True)
class LeaseHolder:
    executor_id: str
    host: str
    ttl: float  # seconds until the lease expires unless renewed


@dataclass(frozen=True, slots=True)
class Alongside:
    """What an append writes in its own transaction besides its stream's events, all of it only
    if the append lands (its expected version holds), none of it otherwise:

    - `before`: events of other streams, appended at whatever version those are, ahead of the
      append's own events in the feed (a unit's last log chunk ahead of its completion: whoever
      reads the completion has the whole log);
    - `take`: leases taken by `holder`, or taken over from whoever held them (the append decides
      who runs a unit: its writer does);
    - `release`: leases dropped, whoever holds them.

    One transaction instead of one per write: fewer commits on a run's critical path."""

    before: tuple[tuple[str, tuple[NewEvent, ...]], ...] = ()
    take: tuple[UnitLease, ...] = ()
    release: tuple[UnitLease, ...] = ()
    holder: LeaseHolder | None = None

    def __post_init__(self) -> None:
        if self.take and self.holder is None:
            raise ValueError("leases taken need a holder")
        if any(not events for _, events in self.before):
            raise ValueError("nothing to append to a stream written alongside")

    @property
    def empty(self) -> bool:
        return not (self.before or self.take or self.release)


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
