"""The projector: folds the store's feed into the read models.

It follows the PostgreSQL feed itself (gap-free by construction) and uses NATS only to wake
up early: every writer pokes `pipelines.internal.appended` after its commit (as the relay hears
it), so the projector reads at once instead of waiting for the relay to republish the event.
Each batch's read-model changes and the checkpoint commit in one transaction, one statement per
table (not per row), so a crash at any point replays nothing twice and skips nothing. The
checkpoint is kept in memory between batches (this process holds the projector lock) and moved
by compare-and-set, so a rebuild that committed meanwhile is noticed and the batch rolled back.

A poked read can find nothing new: the event sits behind the feed's horizon while an older
transaction (any writer's, events or not) is still open. When committed events are waiting
behind the horizon the projector reads again after 1 ms, backing off to 25 ms (the poll
interval if shorter), rather than sleeping until the next poke. `rebuild()` recreates every read model from the store
in one transaction; readers see the old rows until it commits.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any, TypeVar

import msgspec
import psycopg
from nats.aio.client import Client as NATS

from domain import deployment as dp
from domain import pipeline as pl
from domain import run as rn
from infra.broker.bus import APPENDED_SUBJECT
from infra.store.postgres import PostgresEventStore
from infra.store.records import FEED_START, FeedCursor, RecordedEvent
from projections import deployments as dm
from projections import read_models as rm
from projections.views import log_key, pipeline_view, run_view

log = logging.getLogger("pipelines.projector")

NAME = "projector"
_MAX_BACKOFF = 0.025
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
        self._states = _States(state_cache)

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
        async with self.store.pool.connection() as conn:
            cur = await conn.execute("SELECT tx_id::text::bigint, position FROM checkpoints WHERE name = %s", (NAME,))
            row = await cur.fetchone()
            return (row[0], row[1]) if row else FEED_START

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
            events = await self.store.read_feed(cursor, self.batch)
            if not events:
                return total, await self._behind_horizon(cursor)
            try:
                pending, folded = await self._commit_batch(cursor, events)
            except CheckpointMoved:
                self._cursor = None  # a rebuild ran meanwhile: our batch was rolled back, read again
                continue
            except BaseException:
                self._cursor = None  # the commit's outcome is unknown: read the table again
                raise
            self._cursor = events[-1].cursor
            self._states.update_from(folded)
            total += len(events)
            if len(events) < self.batch:
                return total, pending

    async def _commit_batch(self, cursor: FeedCursor, events: Sequence[RecordedEvent]) -> tuple[bool, _States]:
        """One batch in one transaction, sent in pipeline mode: the checkpoint's compare-and-set
        first, the read-model rows, a look behind the horizon, the commit. One round trip when
        every touched aggregate's state is cached (or starts in this batch), two otherwise."""
        async with self.store.pool.connection() as conn:
            try:
                async with conn.pipeline(), conn.transaction():
                    await move_checkpoint(conn, events[-1].cursor, expected=cursor)
                    folded = await apply(conn, events, self._states)
                    cur = await conn.execute(_BEHIND_HORIZON, (str(events[-1].cursor[0]), events[-1].cursor[1]))
                pending = await cur.fetchone() is not None
            except psycopg.errors.DivisionByZero as exc:
                raise CheckpointMoved() from exc
        return pending, folded

    async def _behind_horizon(self, cursor: FeedCursor) -> bool:
        """Whether committed events after `cursor` are not yet readable (an older transaction is
        still open). Rows of uncommitted transactions are invisible here, so any row is committed."""
        async with self.store.pool.connection() as conn:
            cur = await conn.execute(_BEHIND_HORIZON, (str(cursor[0]), cursor[1]))
            return await cur.fetchone() is not None

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
        self._cursor = None
        return total


class CheckpointMoved(Exception):
    """The checkpoint is not where this batch started (a rebuild committed in between)."""


# ORDER BY, although any row would do: psycopg prepares a statement run this often, and
# PostgreSQL's generic plan for a bare `... > ($1, $2) LIMIT 1` is a sequential scan (it expects a
# third of the rows to match, and finds none: the rows past the checkpoint are the newest), a
# read of the whole events table every batch. The order makes the feed index the only sane plan.
_BEHIND_HORIZON = "SELECT 1 FROM events WHERE (tx_id, position) > (%s::text::xid8, %s) ORDER BY tx_id, position LIMIT 1"


class _States(OrderedDict[str, tuple[Any, int]]):
    """Stream id -> (state after the stream's last applied event, that event's stream version),
    least recently used first, at most `size` entries."""

    def __init__(self, size: int) -> None:
        super().__init__()
        self.size = size

    def take(self, stream_id: str, first_version: int) -> Any | None:
        """The cached state if it is exactly the one before `first_version`."""
        hit = self.get(stream_id)
        if hit is None or hit[1] != first_version - 1:
            return None
        self.move_to_end(stream_id)
        return hit[0]

    def update_from(self, other: _States) -> None:
        for key, value in other.items():
            self[key] = value
            self.move_to_end(key)
        while len(self) > self.size:
            self.popitem(last=False)


async def move_checkpoint(conn: psycopg.AsyncConnection[Any], cursor: FeedCursor, *, expected: FeedCursor) -> None:
    """Compare-and-set the checkpoint from `expected` to `cursor`, failing the statement (and so the
    whole transaction, also in pipeline mode, where nothing waits for its result) when the
    checkpoint is elsewhere: the count of moved rows is 0 and the division by it raises."""
    if expected == FEED_START:
        move = (
            "INSERT INTO checkpoints (name, tx_id, position) VALUES (%s, %s::text::xid8, %s) "
            "ON CONFLICT (name) DO NOTHING RETURNING 1"
        )
        params: tuple[Any, ...] = (NAME, str(cursor[0]), cursor[1])
    else:
        move = (
            "UPDATE checkpoints SET tx_id = %s::text::xid8, position = %s "
            "WHERE name = %s AND tx_id = %s::text::xid8 AND position = %s RETURNING 1"
        )
        params = (str(cursor[0]), cursor[1], NAME, str(expected[0]), expected[1])
    await conn.execute(f"WITH moved AS ({move}) SELECT 1 / (SELECT count(*)::int FROM moved)", params)


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


async def apply(
    conn: psycopg.AsyncConnection[Any], events: Sequence[RecordedEvent], cache: _States | None = None
) -> _States:
    """Fold a batch into the read models: one statement per table. A touched pipeline or run
    starts from `cache`, from nothing when the batch holds its first event, else from its row.
    Returns the new states (for the caller to cache once the transaction has committed)."""
    first: dict[str, int] = {}
    for e in events:
        first.setdefault(e.stream_id, e.stream_version)
    pipeline_ids = {e.stream_id.partition("-")[2] for e in events if e.stream_id.startswith("pipeline-")}
    run_ids = {e.stream_id.partition("-")[2] for e in events if e.stream_id.startswith("run-")}
    pipelines: dict[str, pl.PipelineState] = {}
    runs: dict[str, rn.RunState] = {}
    read_pipelines = _start_states(pipeline_ids, "pipeline-", first, cache, pipelines, pl.initial_state)
    read_runs = _start_states(run_ids, "run-", first, cache, runs, rn.initial_state)
    if read_pipelines:
        cur = await conn.execute("SELECT id, state::text FROM rm_pipelines WHERE id = ANY(%s)", (read_pipelines,))
        pipelines.update({r[0]: rm.decode_pipeline_state(r[1]) for r in await cur.fetchall()})
    if read_runs:
        cur = await conn.execute("SELECT id, state::text FROM rm_runs WHERE id = ANY(%s)", (read_runs,))
        runs.update({r[0]: rm.decode_run_state(r[1]) for r in await cur.fetchall()})
    log_rows: list[tuple[str, int, str | None, str]] = []
    last: dict[str, int] = {}
    for rec in events:
        kind, _, ident = rec.stream_id.partition("-")
        event = rec.event
        if kind == "pipeline":
            pipelines[ident] = rm.fold_pipeline(pipelines.get(ident, pl.initial_state), event)
            last[rec.stream_id] = rec.stream_version
        elif kind == "run":
            runs[ident] = rm.fold_run(runs.get(ident, rn.initial_state), event)
            last[rec.stream_id] = rec.stream_version
        elif kind == "runlog" and isinstance(event, rn.LogAppended):
            # Inside a stage of jobs the key names the step too (views.log_key), so lists show each
            # step's own output.
            log_rows.append((ident, rec.position, log_key(event), _enc.encode(event.lines).decode()))
    gone: list[str] = []
    prow: list[tuple[str, str | None, str, Any, str, str]] = []
    for pid in pipeline_ids:
        p = pipelines.get(pid)
        if p is None:
            continue
        if not p.live:
            # The pipeline's runs keep their rows: events of theirs may still arrive (a stage
            # finishing after the delete), and the API hides them with the pipeline anyway.
            gone.append(pid)
            continue
        prow.append(
            (
                pid,
                p.organization_id,
                p.name,
                p.created_at,
                _enc.encode(pipeline_view(p)).decode(),
                rm.encode_state(p).decode(),
            )
        )
    if gone:
        await conn.execute("DELETE FROM rm_pipelines WHERE id = ANY(%s)", (gone,))
    if prow:
        await conn.execute(
            "INSERT INTO rm_pipelines (id, org, name, created_at, doc, state) "
            "SELECT i, o, n, c, d::jsonb, s::json "
            "FROM unnest(%b::text[], %b::text[], %b::text[], %b::timestamptz[], %b::text[], %b::text[]) "
            "AS u(i, o, n, c, d, s) "
            "ON CONFLICT (id) DO UPDATE SET org = EXCLUDED.org, name = EXCLUDED.name, doc = EXCLUDED.doc, "
            "state = EXCLUDED.state",
            _columns(prow, 6),
        )
    rrow: list[tuple[str, str, str | None, str, Any, str, str]] = []
    for run_id in run_ids:
        r = runs.get(run_id)
        if r is None or not r.exists:
            continue
        rrow.append(
            (
                run_id,
                r.pipeline_id,
                r.organization_id,
                r.status,
                r.created_at,
                _enc.encode(run_view(r)).decode(),
                rm.encode_state(r).decode(),
            )
        )
    if rrow:
        await conn.execute(
            "INSERT INTO rm_runs (id, pipeline_id, org, status, created_at, doc, state) "
            "SELECT i, p, o, st, c, d::jsonb, s::json "
            "FROM unnest(%b::text[], %b::text[], %b::text[], %b::text[], %b::timestamptz[], %b::text[], %b::text[]) "
            "AS u(i, p, o, st, c, d, s) "
            "ON CONFLICT (id) DO UPDATE SET status = EXCLUDED.status, doc = EXCLUDED.doc, state = EXCLUDED.state",
            _columns(rrow, 7),
        )
    await apply_deployments(conn, events)
    if log_rows:
        await conn.execute(
            "INSERT INTO rm_run_logs (run_id, position, stage_id, lines) "
            "SELECT r, p, s, l::jsonb FROM unnest(%b::text[], %b::bigint[], %b::text[], %b::text[]) AS u(r, p, s, l) "
            "ON CONFLICT DO NOTHING",
            _columns(log_rows, 4),
        )
    # Only the states of rows written here: one whose row is gone starts again from its row
    # (that is, from nothing), exactly as it would without the cache.
    folded = _States(len(last))
    for pid in (row[0] for row in prow):
        folded[f"pipeline-{pid}"] = (pipelines[pid], last[f"pipeline-{pid}"])
    for run_id in (row[0] for row in rrow):
        folded[f"run-{run_id}"] = (runs[run_id], last[f"run-{run_id}"])
    return folded


_S = TypeVar("_S")


def _start_states(
    ids: set[str], prefix: str, first: dict[str, int], cache: _States | None, states: dict[str, _S], initial: _S
) -> list[str]:
    """Fill `states` with what each aggregate starts the batch from, where known without a read
    (cached, or new in this batch); returns the ids whose row must be read."""
    unread = []
    for ident in ids:
        version = first[prefix + ident]
        hit = cache.take(prefix + ident, version) if cache is not None else None
        if hit is not None:
            states[ident] = hit
        elif version == 1:
            states[ident] = initial
        else:
            unread.append(ident)
    return unread


def _columns(rows: Sequence[tuple[Any, ...]], width: int) -> list[list[Any]]:
    """Rows as column arrays, for one `INSERT ... SELECT FROM unnest(...)` per table."""
    return [[row[i] for row in rows] for i in range(width)]


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
    rows: list[tuple[Any, ...]] = []
    for ident in ids:
        d = states.get(ident)
        if d is None or not d.exists or d.queued_at is None:
            continue
        rows.append(
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
            )
        )
    if rows:
        await conn.execute(
            "INSERT INTO rm_deployments (id, org, environment_id, component_id, status, queued_at, finished_at, doc, "
            "state) SELECT i, o, e, c, st, q, f, d::jsonb, s::jsonb "
            "FROM unnest(%b::text[], %b::text[], %b::text[], %b::text[], %b::text[], %b::timestamptz[], "
            "%b::timestamptz[], %b::text[], %b::text[]) AS u(i, o, e, c, st, q, f, d, s) "
            "ON CONFLICT (id) DO UPDATE SET status = EXCLUDED.status, finished_at = EXCLUDED.finished_at, "
            "doc = EXCLUDED.doc, state = EXCLUDED.state",
            _columns(rows, 9),
        )
