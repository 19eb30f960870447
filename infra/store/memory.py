"""An in-memory event store for fast tests; it passes the same contract tests as PostgreSQL."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime

from domain import events as ev
from infra.store.records import (
    AppendResult,
    FeedCursor,
    NewEvent,
    RecordedEvent,
    UniqueKey,
    UniqueKeyTaken,
    WrongExpectedVersion,
)


class InMemoryEventStore:
    """An EventStore in one process. `begin_append` lets tests hold a position open."""

    def __init__(self) -> None:
        self._events: list[RecordedEvent] = []
        self._versions: dict[str, int] = {}
        self._keys: dict[tuple[str, str], str] = {}
        self._next_position = 1
        self._open: set[int] = set()
        self._reserved_ids: set[str] = set()
        self._lock = asyncio.Lock()
        self.appended = asyncio.Event()

    async def append(
        self,
        stream_id: str,
        events: Sequence[NewEvent],
        expected_version: int | None,
        *,
        claim: Sequence[UniqueKey] = (),
        release: Sequence[UniqueKey] = (),
    ) -> AppendResult:
        async with self.begin_append(stream_id, events, expected_version, claim=claim, release=release) as r:
            return r

    @contextlib.asynccontextmanager
    async def begin_append(
        self,
        stream_id: str,
        events: Sequence[NewEvent],
        expected_version: int | None,
        *,
        claim: Sequence[UniqueKey] = (),
        release: Sequence[UniqueKey] = (),
    ) -> AsyncIterator[AppendResult]:
        """Reserve positions now; make the events visible when the block exits, or undo all of it
        if the block raises (as a rolled-back transaction would)."""
        if not events:
            raise ValueError("nothing to append")
        async with self._lock:
            known = {r.event_id for r in self._events} | self._reserved_ids
            if any(e.event_id in known for e in events):
                raise ValueError("an event with this event id is already stored")
            current = self._versions.get(stream_id, 0)
            exists = stream_id in self._versions
            if expected_version == 0 and exists:
                raise WrongExpectedVersion(stream_id, expected_version)
            if expected_version not in (None, 0) and current != expected_version:
                raise WrongExpectedVersion(stream_id, expected_version)
            for k in claim:
                if (k.scope, k.key) in self._keys and k not in release:
                    raise UniqueKeyTaken(k.scope, k.key)
            saved_keys = dict(self._keys)
            for k in release:
                self._keys.pop((k.scope, k.key), None)
            for k in claim:
                self._keys[(k.scope, k.key)] = stream_id
            tx = self._next_position
            now = datetime.now(UTC)
            recs = []
            for i, e in enumerate(events):
                recs.append(
                    RecordedEvent(
                        position=self._next_position,
                        tx_id=tx,
                        stream_id=stream_id,
                        stream_version=current + i + 1,
                        event_id=e.event_id,
                        event_type=ev.event_type(e.event),
                        data=ev.encode(e.event),
                        org=e.org,
                        pipeline_id=e.pipeline_id,
                        run_id=e.run_id,
                        recorded_at=now,
                    )
                )
                self._next_position += 1
            self._versions[stream_id] = current + len(events)
            self._open.add(tx)
            self._reserved_ids.update(e.event_id for e in events)
        try:
            yield AppendResult(version=current + len(events), positions=tuple(r.position for r in recs))
        except BaseException:
            async with self._lock:
                self._keys = saved_keys
                if exists:
                    self._versions[stream_id] = current
                else:
                    self._versions.pop(stream_id, None)
            raise
        else:
            self._events.extend(recs)
            self._events.sort(key=lambda r: r.cursor)
            self.appended.set()
        finally:
            self._open.discard(tx)
            self._reserved_ids.difference_update(e.event_id for e in events)

    async def read_stream(self, stream_id: str, after_version: int = 0) -> list[RecordedEvent]:
        return [r for r in self._events if r.stream_id == stream_id and r.stream_version > after_version]

    async def read_feed(
        self,
        after: FeedCursor,
        limit: int = 500,
        *,
        run_id: str | None = None,
        pipeline_id: str | None = None,
    ) -> list[RecordedEvent]:
        horizon = min(self._open, default=self._next_position + 1)
        out = []
        for r in self._events:
            if r.cursor <= after or r.tx_id >= horizon:
                continue
            if run_id is not None and r.run_id != run_id:
                continue
            if pipeline_id is not None and r.pipeline_id != pipeline_id:
                continue
            out.append(r)
            if len(out) >= limit:
                break
        return out

    async def cursor_of(self, position: int) -> FeedCursor | None:
        for r in self._events:
            if r.position == position:
                return r.cursor
        return None

    async def streams_of(self, pipeline_id: str, prefix: str) -> list[str]:
        firsts = sorted((r for r in self._events if r.stream_version == 1), key=lambda r: r.position)
        return [r.stream_id for r in firsts if r.pipeline_id == pipeline_id and r.stream_id.startswith(prefix)]
