"""An in-memory event store for fast tests; it passes the same contract tests as PostgreSQL."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence
from datetime import UTC, datetime

from domain import events as ev
from infra.store.records import (
    Alongside,
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
        # Unit leases written alongside appends: (run, key, attempt) -> the executor holding it.
        self.leases: dict[tuple[str, str, int], str] = {}
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
        alongside: Alongside | None = None,
    ) -> AppendResult:
        async with self.begin_append(
            stream_id, events, expected_version, claim=claim, release=release, alongside=alongside
        ) as r:
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
        alongside: Alongside | None = None,
    ) -> AsyncIterator[AppendResult]:
        """Reserve positions now; make the events visible when the block exits, or undo all of it
        if the block raises (as a rolled-back transaction would)."""
        if not events:
            raise ValueError("nothing to append")
        also = alongside or Alongside()
        others = [sid for sid, _ in also.before]
        if stream_id in others or len(set(others)) != len(others):
            raise ValueError("a stream written alongside is written once, and is not the append's own")
        # The feed order of the whole transaction: the streams written alongside first.
        writes = [*also.before, (stream_id, tuple(events))]
        everything = [e for _, evs in writes for e in evs]
        async with self._lock:
            known = {r.event_id for r in self._events} | self._reserved_ids
            if any(e.event_id in known for e in everything) or len({e.event_id for e in everything}) != len(everything):
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
            saved_leases = dict(self.leases)
            saved_versions = {sid: self._versions.get(sid) for sid, _ in writes}
            for k in release:
                self._keys.pop((k.scope, k.key), None)
            for k in claim:
                self._keys[(k.scope, k.key)] = stream_id
            for lease in also.release:
                self.leases.pop((lease.run_id, lease.key, lease.attempt), None)
            for lease in also.take:
                assert also.holder is not None
                self.leases[(lease.run_id, lease.key, lease.attempt)] = also.holder.executor_id
            tx = self._next_position
            now = datetime.now(UTC)
            recs = []
            for sid, evs in writes:
                at = self._versions.get(sid, 0)
                for i, e in enumerate(evs):
                    recs.append(
                        RecordedEvent(
                            position=self._next_position,
                            tx_id=tx,
                            stream_id=sid,
                            stream_version=at + i + 1,
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
                self._versions[sid] = at + len(evs)
            self._open.add(tx)
            self._reserved_ids.update(e.event_id for e in everything)
        try:
            yield AppendResult(version=current + len(events), positions=tuple(r.position for r in recs))
        except BaseException:
            async with self._lock:
                self._keys = saved_keys
                self.leases = saved_leases
                for sid, version in saved_versions.items():
                    if version is None:
                        self._versions.pop(sid, None)
                    else:
                        self._versions[sid] = version
            raise
        else:
            self._events.extend(recs)
            self._events.sort(key=lambda r: r.cursor)
            self.appended.set()
        finally:
            self._open.discard(tx)
            self._reserved_ids.difference_update(e.event_id for e in everything)

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
