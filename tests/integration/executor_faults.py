"""Faulty adapters of the executor's ports, for tests: an event store whose appends or reads fail
(or hang) on cue."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from domain import events as ev
from infra.app.ports import EventStore
from infra.store.records import Alongside, AppendResult, FeedCursor, NewEvent, RecordedEvent, UniqueKey

Matches = Callable[[str, Sequence[NewEvent]], bool]


def transient() -> Exception:
    return OSError("connection reset (a transient database error)")


@dataclass
class Fault:
    """Fails the next `times` calls that match (after `delay` seconds); with `hang` they block
    forever instead, with `until` they wait for it and then go through. `hit` is set at the first."""

    matches: Matches
    times: int = 1
    hang: bool = False
    delay: float = 0.0
    until: asyncio.Event | None = None
    error: Callable[[], Exception] = transient
    hits: int = 0
    hit: asyncio.Event = field(default_factory=asyncio.Event)

    async def trip(self, stream_id: str, events: Sequence[NewEvent]) -> None:
        if self.hits >= self.times or not self.matches(stream_id, events):
            return
        self.hits += 1
        self.hit.set()
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.until is not None:
            await self.until.wait()
            return
        if self.hang:
            await asyncio.Event().wait()
        raise self.error()


def to_stream(stream_id: str) -> Matches:
    return lambda s, _: s == stream_id


def with_event(stream_id: str, kind: type) -> Matches:
    return lambda s, events: s == stream_id and any(isinstance(e.event, kind) for e in events)


def run_log(run_id: str) -> Matches:
    return to_stream(ev.run_log_stream(run_id))


class FaultyStore:
    """An EventStore that passes everything to `inner` except the calls a fault matches."""

    def __init__(self, inner: EventStore) -> None:
        self.inner = inner
        self.append_faults: list[Fault] = []
        self.read_faults: list[Fault] = []
        self.appends = 0

    def fail_appends(self, matches: Matches, times: int = 1, **kw: object) -> Fault:
        fault = Fault(matches, times, **kw)  # type: ignore[arg-type]
        self.append_faults.append(fault)
        return fault

    def fail_reads(self, stream_id: str, times: int = 1, **kw: object) -> Fault:
        fault = Fault(to_stream(stream_id), times, **kw)  # type: ignore[arg-type]
        self.read_faults.append(fault)
        return fault

    async def append(
        self,
        stream_id: str,
        events: Sequence[NewEvent],
        expected_version: int | None,
        *,
        claim: Sequence[UniqueKey] = (),
        release: Sequence[UniqueKey] = (),
        alongside: Alongside | None = None,
    ) -> AppendResult:
        self.appends += 1
        # Every stream the append writes counts (a unit's last log chunk rides in its completion).
        writes = [*(alongside.before if alongside is not None else ()), (stream_id, events)]
        for fault in self.append_faults:
            for sid, evs in writes:
                await fault.trip(sid, evs)
        return await self.inner.append(
            stream_id, events, expected_version, claim=claim, release=release, alongside=alongside
        )

    async def read_stream(self, stream_id: str, after_version: int = 0) -> list[RecordedEvent]:
        for fault in self.read_faults:
            await fault.trip(stream_id, ())
        return await self.inner.read_stream(stream_id, after_version)

    async def read_feed(
        self,
        after: FeedCursor,
        limit: int = 500,
        *,
        run_id: str | None = None,
        pipeline_id: str | None = None,
    ) -> list[RecordedEvent]:
        return await self.inner.read_feed(after, limit, run_id=run_id, pipeline_id=pipeline_id)

    async def cursor_of(self, position: int) -> FeedCursor | None:
        return await self.inner.cursor_of(position)

    async def streams_of(self, pipeline_id: str, prefix: str) -> list[str]:
        return await self.inner.streams_of(pipeline_id, prefix)
