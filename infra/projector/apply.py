"""Folding a batch of the feed into the read-model tables: one statement per table, not per row."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from typing import Any, TypeVar

import msgspec
import psycopg

from domain import deployment as dp
from domain import pipeline as pl
from domain import run as rn
from infra.store.records import RecordedEvent
from projections import deployments as dm
from projections import read_models as rm
from projections.views import log_key, pipeline_view, run_view

_enc = msgspec.json.Encoder()


class States(OrderedDict[str, tuple[Any, int]]):
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

    def update_from(self, other: States) -> None:
        for key, value in other.items():
            self[key] = value
            self.move_to_end(key)
        while len(self) > self.size:
            self.popitem(last=False)


async def apply(
    conn: psycopg.AsyncConnection[Any], events: Sequence[RecordedEvent], cache: States | None = None
) -> States:
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
    folded = States(len(last))
    for pid in (row[0] for row in prow):
        folded[f"pipeline-{pid}"] = (pipelines[pid], last[f"pipeline-{pid}"])
    for run_id in (row[0] for row in rrow):
        folded[f"run-{run_id}"] = (runs[run_id], last[f"run-{run_id}"])
    return folded


_S = TypeVar("_S")


def _start_states(
    ids: set[str], prefix: str, first: dict[str, int], cache: States | None, states: dict[str, _S], initial: _S
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
