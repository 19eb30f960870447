"""The projector: folds the store's feed into the read models.

It follows the PostgreSQL feed itself (gap-free by construction) and uses NATS only to wake
up early. Each batch's read-model changes and the checkpoint commit in one transaction, so a
crash at any point replays nothing twice and skips nothing. `rebuild()` recreates every read
model from the store in one transaction; readers see the old rows until it commits.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Sequence
from typing import Any

import msgspec
import psycopg
from nats.aio.client import Client as NATS

from domain import deployment as dp
from domain import pipeline as pl
from domain import run as rn
from infra.bus import EVENTS_SUBJECTS, wait_for_wake
from infra.pg_store import PostgresEventStore
from infra.store import FEED_START, FeedCursor, RecordedEvent
from projections import deployments as dm
from projections import read_models as rm
from projections.views import pipeline_view, run_view

log = logging.getLogger("pipelines.projector")

NAME = "projector"
PROJECTOR_LOCK = 7_311_224_003
_enc = msgspec.json.Encoder()


class Projector:
    def __init__(
        self,
        store: PostgresEventStore,
        database_url: str,
        nc: NATS | None = None,
        *,
        poll_interval: float = 0.5,
        batch: int = 1000,
    ) -> None:
        self.store = store
        self.database_url = database_url
        self.nc = nc
        self.poll_interval = poll_interval
        self.batch = batch
        self._wake = asyncio.Event()

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
                sub = await self.nc.subscribe(EVENTS_SUBJECTS, cb=self._poke)
            try:
                fast = 0
                while not stop.is_set():
                    try:
                        n = await self.catch_up()
                    except Exception:
                        log.exception("projection failed; retrying")
                        await asyncio.sleep(1)
                        continue
                    if n:
                        fast = 0
                    elif fast:
                        # Woken, yet nothing readable: a transaction still open below the new event
                        # holds the horizon back for a moment. Look again soon, not a poll later.
                        fast -= 1
                        await asyncio.sleep(0.002)
                    else:
                        fast = await wait_for_wake(self._wake, self.poll_interval)
            finally:
                if sub is not None:
                    with contextlib.suppress(Exception):
                        await sub.unsubscribe()

    async def _poke(self, _msg: Any) -> None:
        self._wake.set()

    async def checkpoint(self) -> FeedCursor:
        async with self.store.pool.connection() as conn:
            cur = await conn.execute("SELECT tx_id::text::bigint, position FROM checkpoints WHERE name = %s", (NAME,))
            row = await cur.fetchone()
            return (row[0], row[1]) if row else FEED_START

    async def catch_up(self) -> int:
        """Apply everything committed so far; returns how many events were applied."""
        total = 0
        while True:
            cursor = await self.checkpoint()
            events = await self.store.read_feed(cursor, self.batch)
            if not events:
                return total
            try:
                async with self.store.pool.connection() as conn, conn.transaction():
                    await apply(conn, events)
                    await save_checkpoint(conn, events[-1].cursor, expected=cursor)
            except CheckpointMoved:
                continue  # a rebuild ran meanwhile: our batch was rolled back, read again
            total += len(events)

    async def rebuild(self) -> int:
        """Drop every read model and fold the whole store again, in one transaction."""
        total = 0
        async with self.store.pool.connection() as conn, conn.transaction():
            await conn.execute("LOCK TABLE checkpoints, rm_pipelines, rm_runs, rm_run_logs IN EXCLUSIVE MODE")
            await conn.execute("TRUNCATE rm_pipelines, rm_runs, rm_run_logs, rm_deployments")
            await conn.execute("DELETE FROM checkpoints WHERE name = %s", (NAME,))
            cursor = FEED_START
            while True:
                # The feed is read on other connections: this transaction's own xid holds the
                # horizon, so the rebuild sees exactly what committed before it began.
                events = await self.store.read_feed(cursor, self.batch)
                if not events:
                    break
                await apply(conn, events)
                cursor = events[-1].cursor
                total += len(events)
            await save_checkpoint(conn, cursor)
        return total


class CheckpointMoved(Exception):
    """The checkpoint is not where this batch started (a rebuild committed in between)."""


async def save_checkpoint(
    conn: psycopg.AsyncConnection[Any], cursor: FeedCursor, *, expected: FeedCursor | None = None
) -> None:
    """Move the checkpoint; with `expected`, only from there (compare and set)."""
    if expected is None:
        await conn.execute(
            "INSERT INTO checkpoints (name, tx_id, position) VALUES (%s, %s::text::xid8, %s) "
            "ON CONFLICT (name) DO UPDATE SET tx_id = EXCLUDED.tx_id, position = EXCLUDED.position",
            (NAME, str(cursor[0]), cursor[1]),
        )
        return
    if expected == FEED_START:
        cur = await conn.execute(
            "INSERT INTO checkpoints (name, tx_id, position) VALUES (%s, %s::text::xid8, %s) "
            "ON CONFLICT (name) DO NOTHING RETURNING 1",
            (NAME, str(cursor[0]), cursor[1]),
        )
    else:
        cur = await conn.execute(
            "UPDATE checkpoints SET tx_id = %s::text::xid8, position = %s "
            "WHERE name = %s AND tx_id = %s::text::xid8 AND position = %s RETURNING 1",
            (str(cursor[0]), cursor[1], NAME, str(expected[0]), expected[1]),
        )
    if await cur.fetchone() is None:
        raise CheckpointMoved()


async def apply(conn: psycopg.AsyncConnection[Any], events: Sequence[RecordedEvent]) -> None:
    """Fold a batch into the read models: one read and one write per touched row."""
    pipeline_ids = {e.stream_id.partition("-")[2] for e in events if e.stream_id.startswith("pipeline-")}
    run_ids = {e.stream_id.partition("-")[2] for e in events if e.stream_id.startswith("run-")}
    pipelines: dict[str, pl.PipelineState] = {}
    runs: dict[str, rn.RunState] = {}
    if pipeline_ids:
        cur = await conn.execute("SELECT id, state::text FROM rm_pipelines WHERE id = ANY(%s)", (list(pipeline_ids),))
        pipelines = {r[0]: rm.decode_pipeline_state(r[1]) for r in await cur.fetchall()}
    if run_ids:
        cur = await conn.execute("SELECT id, state::text FROM rm_runs WHERE id = ANY(%s)", (list(run_ids),))
        runs = {r[0]: rm.decode_run_state(r[1]) for r in await cur.fetchall()}
    log_rows: list[tuple[str, int, str | None, str]] = []
    for rec in events:
        kind, _, ident = rec.stream_id.partition("-")
        event = rec.event
        if kind == "pipeline":
            pipelines[ident] = rm.fold_pipeline(pipelines.get(ident, pl.initial_state), event)
        elif kind == "run":
            runs[ident] = rm.fold_run(runs.get(ident, rn.initial_state), event)
        elif kind == "runlog" and isinstance(event, rn.LogAppended):
            log_rows.append((ident, rec.position, event.stage_id, _enc.encode(event.lines).decode()))
    for pid in pipeline_ids:
        p = pipelines.get(pid)
        if p is None:
            continue
        if not p.live:
            # The pipeline's runs keep their rows: events of theirs may still arrive (a stage
            # finishing after the delete), and the API hides them with the pipeline anyway.
            await conn.execute("DELETE FROM rm_pipelines WHERE id = %s", (pid,))
            continue
        await conn.execute(
            "INSERT INTO rm_pipelines (id, org, name, created_at, doc, state) VALUES (%s, %s, %s, %s, %s, %s) "
            "ON CONFLICT (id) DO UPDATE SET org = EXCLUDED.org, name = EXCLUDED.name, doc = EXCLUDED.doc, "
            "state = EXCLUDED.state",
            (
                pid,
                p.organization_id,
                p.name,
                p.created_at,
                _enc.encode(pipeline_view(p)).decode(),
                rm.encode_state(p).decode(),
            ),
        )
    for run_id in run_ids:
        r = runs.get(run_id)
        if r is None or not r.exists:
            continue
        await conn.execute(
            "INSERT INTO rm_runs (id, pipeline_id, org, status, created_at, doc, state) "
            "VALUES (%s, %s, %s, %s, %s, %s, %s) "
            "ON CONFLICT (id) DO UPDATE SET status = EXCLUDED.status, doc = EXCLUDED.doc, state = EXCLUDED.state",
            (
                run_id,
                r.pipeline_id,
                r.organization_id,
                r.status,
                r.created_at,
                _enc.encode(run_view(r)).decode(),
                rm.encode_state(r).decode(),
            ),
        )
    await apply_deployments(conn, events)
    if log_rows:
        async with conn.cursor() as cur:
            await cur.executemany(
                "INSERT INTO rm_run_logs (run_id, position, stage_id, lines) VALUES (%s, %s, %s, %s) "
                "ON CONFLICT DO NOTHING",
                log_rows,
            )


async def apply_deployments(conn: psycopg.AsyncConnection[Any], events: Sequence[RecordedEvent]) -> None:
    """Fold `deployment-<id>` events into rm_deployments."""
    ids = {e.stream_id.partition("-")[2] for e in events if e.stream_id.startswith("deployment-")}
    if not ids:
        return
    cur = await conn.execute("SELECT id, state::text FROM rm_deployments WHERE id = ANY(%s)", (list(ids),))
    states = {r[0]: dm.decode_state(r[1]) for r in await cur.fetchall()}
    for rec in events:
        kind, _, ident = rec.stream_id.partition("-")
        if kind == "deployment":
            states[ident] = dm.fold_deployment(states.get(ident, dp.initial_state), rec.event)
    for ident in ids:
        d = states.get(ident)
        if d is None or not d.exists or d.queued_at is None:
            continue
        await conn.execute(
            "INSERT INTO rm_deployments (id, org, environment_id, component_id, status, queued_at, finished_at, doc, "
            "state) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s) ON CONFLICT (id) DO UPDATE SET status = "
            "EXCLUDED.status, finished_at = EXCLUDED.finished_at, doc = EXCLUDED.doc, state = EXCLUDED.state",
            (
                ident,
                d.organization_id,
                d.environment_id,
                d.component_id,
                d.status,
                d.queued_at,
                d.finished_at,
                _enc.encode(dm.deployment_view(d)).decode(),
                dm.encode_state(d).decode(),
            ),
        )
