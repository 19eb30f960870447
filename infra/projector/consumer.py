"""The projector: follows the store's feed and folds it into the read models, batch by batch.

It follows the PostgreSQL feed itself (gap-free by construction) and uses NATS only to wake up early.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence
from typing import Any

import psycopg
from nats.aio.client import Client as NATS

from infra import trace
from infra.broker.bus import APPENDED_SUBJECT
from infra.metrics import feed_reads, observe_lags, projection_lag
from infra.projector import rebuild as rb
from infra.projector.apply import States, apply
from infra.projector.checkpoint import BEHIND_HORIZON, CheckpointMoved, move_checkpoint, read_checkpoint
from infra.setaside import PROJECTOR, is_poison, record
from infra.store.postgres import PostgresEventStore
from infra.store.records import FeedCursor, RecordedEvent

log = logging.getLogger("pipelines.projector")

_MAX_BACKOFF = 0.025
PROJECTOR_LOCK = 7_311_224_003
_READS = feed_reads.labels(consumer=PROJECTOR, result="events")
_EMPTY_READS = feed_reads.labels(consumer=PROJECTOR, result="empty")


class Projector:
    """Every writer pokes `pipelines.internal.appended` after its commit (as the relay hears it),
    so the projector reads at once instead of waiting for the relay to republish the event.
    Each batch's read-model changes and the checkpoint commit in one transaction, one statement per
    table (not per row), so a crash at any point replays nothing twice and skips nothing. The
    checkpoint is kept in memory between batches (this process holds the projector lock) and moved
    by compare-and-set, so a rebuild that committed meanwhile is noticed and the batch rolled back.

    A poked read can find nothing new: the event sits behind the feed's horizon while an older
    transaction (any writer's, events or not) is still open. When committed events are waiting
    behind the horizon the projector reads again after 1 ms, backing off to 25 ms (the poll
    interval if shorter), rather than sleeping until the next poke.
    """

    def __init__(
        self,
        store: PostgresEventStore,
        database_url: str,
        nc: NATS | None = None,
        *,
        poll_interval: float = 0.5,
        batch: int = 1000,
        state_cache: int = 4096,
    ) -> None:
        self.store = store
        self.database_url = database_url
        self.nc = nc
        self.poll_interval = poll_interval
        self.batch = batch
        self._wake = asyncio.Event()
        # Where this process's batches stand (None: read it from the table).
        self._cursor: FeedCursor | None = None
        # The state of recently touched pipelines and runs as of `_cursor`, with their stream
        # version, so that a batch need not read its rows back (cleared whenever the cursor is).
        self._states = States(state_cache)
        # Batches refused because the checkpoint had moved since they were read (another projector
        # or a rebuild committed first): rolled back and read again. For tests and logs.
        self.stale_batches = 0

    async def run(self, stop: asyncio.Event) -> None:
        async with await psycopg.AsyncConnection.connect(self.database_url, autocommit=True) as lock_conn:
            while not stop.is_set():
                cur = await lock_conn.execute("SELECT pg_try_advisory_lock(%s)", (PROJECTOR_LOCK,))
                row = await cur.fetchone()
                if row and row[0]:
                    break
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), 1.0)
            sub = None
            if self.nc is not None:
                sub = await self.nc.subscribe(APPENDED_SUBJECT, cb=self._poke)
            self._cursor = None
            try:
                backoff = 0.0
                while not stop.is_set():
                    # Cleared before reading: a poke that lands during the read wakes the next wait.
                    self._wake.clear()
                    try:
                        _, pending = await self._follow()
                    except Exception:
                        log.exception("projection failed; retrying")
                        self._cursor = None
                        backoff = 0.0
                        await asyncio.sleep(1)
                        continue
                    if pending:
                        # Committed events wait behind the horizon: look again soon, backing off
                        # (to at most 25 ms: a poke may never come for the transaction holding it).
                        backoff = min(max(backoff * 2, 0.001), _MAX_BACKOFF, self.poll_interval)
                        timeout = backoff
                    else:
                        backoff = 0.0
                        timeout = self.poll_interval
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._wake.wait(), timeout)
            finally:
                if sub is not None:
                    with contextlib.suppress(Exception):
                        await sub.unsubscribe()

    async def _poke(self, _msg: Any) -> None:
        self._wake.set()

    async def checkpoint(self) -> FeedCursor:
        return await read_checkpoint(self.store)

    async def catch_up(self) -> int:
        """Apply everything committed so far; returns how many events were applied."""
        total, _ = await self._follow()
        return total

    async def _follow(self) -> tuple[int, bool]:
        """Apply every readable batch. Returns how many events were applied, and whether committed
        events are still waiting behind the feed's horizon."""
        total = 0
        while True:
            cursor = self._cursor
            if cursor is None:
                cursor = self._cursor = await self.checkpoint()
                self._states.clear()
            events, pending = await self.store.follow_feed(cursor, self.batch)
            if not events:
                _EMPTY_READS.inc()
                return total, pending
            _READS.inc()
            try:
                try:
                    pending, folded = await self._commit_batch(cursor, events)
                except Exception as exc:
                    if not is_poison(exc):
                        raise
                    # An event of the batch cannot be projected: the batch was rolled back as a
                    # whole. Apply its halves, and theirs, down to the event that fails, which is
                    # set aside: it holds back neither its neighbours nor anything after it.
                    pending, folded = await self._commit_halves(cursor, events, exc)
            except CheckpointMoved:
                self.stale_batches += 1
                self._cursor = None  # a rebuild ran meanwhile: our batch was rolled back, read again
                continue
            except BaseException:
                self._cursor = None  # the commit's outcome is unknown: read the table again
                raise
            self._cursor = events[-1].cursor
            self._states.update_from(folded)
            observe_lags(projection_lag, (e.recorded_at for e in events))
            trace.records("applied", events)
            total += len(events)
            if len(events) < self.batch:
                return total, pending

    async def _commit_batch(self, cursor: FeedCursor, events: Sequence[RecordedEvent]) -> tuple[bool, States]:
        """One batch in one transaction, sent in pipeline mode: the checkpoint's compare-and-set
        first, the read-model rows, a look behind the horizon, the commit. One round trip when
        every touched aggregate's state is cached (or starts in this batch), two otherwise."""
        async with self.store.pool.connection() as conn:
            try:
                async with conn.pipeline(), conn.transaction():
                    await move_checkpoint(conn, events[-1].cursor, expected=cursor)
                    folded = await apply(conn, events, self._states)
                    cur = await conn.execute(BEHIND_HORIZON, (str(events[-1].cursor[0]), events[-1].cursor[1]))
                pending = await cur.fetchone() is not None
            except psycopg.errors.DivisionByZero as exc:
                raise CheckpointMoved() from exc
        return pending, folded

    async def _commit_halves(
        self, cursor: FeedCursor, events: Sequence[RecordedEvent], error: BaseException
    ) -> tuple[bool, States]:
        """A batch that failed with `error`, as two halves, each committed whole if it can be, else
        halved again; a single event that fails is recorded as set aside, the checkpoint moving past
        it in that same transaction. Bisecting, not one event at a time: a transaction per event
        would write a large run's row once per event (a 10,000-stage run's row is megabytes)."""
        if len(events) == 1:
            await self._set_aside(cursor, events[0], error)
            return False, States(self._states.size)
        folded = States(self._states.size)
        pending = False
        mid = len(events) // 2
        for part in (events[:mid], events[mid:]):
            try:
                pending, done = await self._commit_batch(cursor, part)
            except Exception as exc:
                if not is_poison(exc):
                    raise
                pending, done = await self._commit_halves(cursor, part, exc)
            # The next part's fold starts from these states (the cache is keyed by stream version,
            # so the stream of a set-aside event reads its row back instead).
            folded.update_from(done)
            self._states.update_from(done)
            cursor = part[-1].cursor
        return pending, folded

    async def _set_aside(self, cursor: FeedCursor, rec: RecordedEvent, exc: BaseException) -> None:
        async with self.store.pool.connection() as conn:
            try:
                async with conn.transaction():
                    await move_checkpoint(conn, rec.cursor, expected=cursor)
                    await record(conn, PROJECTOR, rec, exc)
            except psycopg.errors.DivisionByZero as moved:
                raise CheckpointMoved() from moved

    async def rebuild(self) -> int:
        """Drop every read model and fold the whole store again, in one transaction."""
        total = await rb.rebuild(self.store, self.batch)
        self._cursor = None
        return total
