"""Reads of the projector's read models, for lists."""

from __future__ import annotations

import msgspec
from psycopg_pool import AsyncConnectionPool

from domain.run import LogLine
from infra.setaside import SetAside, list_set_aside
from projections.run_reports import RunStats, run_stats
from projections.views import PipelineView, RunSummaryView, RunView, iso, log_text, step_log_key

_pipeline = msgspec.json.Decoder(PipelineView)
_run = msgspec.json.Decoder(RunView)
_summary = msgspec.json.Decoder(RunSummaryView)
_lines = msgspec.json.Decoder(tuple[LogLine, ...])


class ReadModels:
    def __init__(self, pool: AsyncConnectionPool) -> None:
        self._pool = pool

    async def projected_past(self, position: int) -> bool:
        """Whether the projector's checkpoint has passed the event at `position` (a position no
        event holds, one of a rolled-back append, counts as passed once the checkpoint's is past it)."""
        async with self._pool.connection() as conn:
            cur = await conn.execute(
                "SELECT CASE WHEN e.position IS NULL THEN c.position >= %s "
                "ELSE (c.tx_id, c.position) >= (e.tx_id, e.position) END "
                "FROM checkpoints c LEFT JOIN events e ON e.position = %s WHERE c.name = 'projector'",
                (position, position),
            )
            row = await cur.fetchone()
            return bool(row and row[0])

    async def set_aside(self) -> list[SetAside]:
        """Events the consumers set aside (poison events): /readyz reports them."""
        return await list_set_aside(self._pool)

    async def list_pipelines(
        self, org: str | None, page: int, limit: int, name_contains: str | None = None
    ) -> tuple[list[PipelineView], int]:
        # ILIKE's wildcards in the search text are literal characters.
        pattern = None if name_contains is None else "%" + _like_escape(name_contains) + "%"
        where = "org IS NOT DISTINCT FROM %s AND (%s::text IS NULL OR name ILIKE %s)"
        async with self._pool.connection() as conn:
            cur = await conn.execute(f"SELECT count(*) FROM rm_pipelines WHERE {where}", (org, pattern, pattern))
            row = await cur.fetchone()
            total = int(row[0]) if row else 0
            cur = await conn.execute(
                f"SELECT doc::text FROM rm_pipelines WHERE {where} ORDER BY created_at, id LIMIT %s OFFSET %s",
                (org, pattern, pattern, limit, (page - 1) * limit),
            )
            rows = await cur.fetchall()
        return [_pipeline.decode(r[0]) for r in rows], total

    async def list_org_runs(
        self, org: str | None, *, status: str | None, pipeline_id: str | None, limit: int, offset: int
    ) -> tuple[list[RunSummaryView], int]:
        """Runs of the organization's pipelines, newest first; a deleted pipeline's runs are left
        out (its read-model row is gone, and the API hides them with it)."""
        where = (
            "r.org IS NOT DISTINCT FROM %s AND (%s::text IS NULL OR r.status = %s) "
            "AND (%s::text IS NULL OR r.pipeline_id = %s)"
        )
        args = (org, status, status, pipeline_id, pipeline_id)
        async with self._pool.connection() as conn:
            cur = await conn.execute(
                f"SELECT count(*) FROM rm_runs r JOIN rm_pipelines p ON p.id = r.pipeline_id WHERE {where}", args
            )
            row = await cur.fetchone()
            cur = await conn.execute(
                f"SELECT r.doc::text, p.name FROM rm_runs r JOIN rm_pipelines p ON p.id = r.pipeline_id WHERE {where} "
                "ORDER BY r.created_at DESC, r.id DESC LIMIT %s OFFSET %s",
                (*args, limit, offset),
            )
            rows = await cur.fetchall()
        return [_summary_of(doc, name) for doc, name in rows], int(row[0]) if row else 0

    async def latest_runs(self, org: str | None, pipeline_ids: list[str]) -> list[RunSummaryView]:
        """The newest run of each of these pipelines of the organization (none: left out)."""
        async with self._pool.connection() as conn:
            cur = await conn.execute(
                "SELECT r.doc::text, p.name FROM rm_pipelines p CROSS JOIN LATERAL ("
                " SELECT doc FROM rm_runs WHERE pipeline_id = p.id ORDER BY created_at DESC, id DESC LIMIT 1) r "
                "WHERE p.id = ANY(%s) AND p.org IS NOT DISTINCT FROM %s",
                (pipeline_ids, org),
            )
            rows = await cur.fetchall()
        return [_summary_of(doc, name) for doc, name in rows]

    async def count_runs(self, pipeline_id: str, status: str | None = None) -> int:
        async with self._pool.connection() as conn:
            cur = await conn.execute(
                "SELECT count(*) FROM rm_runs WHERE pipeline_id = %s AND (%s::text IS NULL OR status = %s)",
                (pipeline_id, status, status),
            )
            row = await cur.fetchone()
        return int(row[0]) if row else 0

    async def run_stats(self, pipeline_id: str) -> RunStats:
        async with self._pool.connection() as conn:
            cur = await conn.execute(
                "SELECT count(*), count(*) FILTER (WHERE status = 'succeeded'), "
                "count(*) FILTER (WHERE status IN ('succeeded', 'failed', 'cancelled')), "
                "avg((doc->>'durationMs')::float8) FILTER (WHERE status IN ('succeeded', 'failed', 'cancelled')), "
                "max(created_at) FROM rm_runs WHERE pipeline_id = %s",
                (pipeline_id,),
            )
            row = await cur.fetchone()
        assert row is not None
        total, succeeded, finished, avg_ms, last = row
        return run_stats(int(total), int(succeeded), int(finished), avg_ms, iso(last) if last else None)

    async def runs_by_id(self, pipeline_id: str, ids: list[str]) -> dict[str, RunView]:
        async with self._pool.connection() as conn:
            cur = await conn.execute(
                "SELECT id, doc::text FROM rm_runs WHERE pipeline_id = %s AND id = ANY(%s)", (pipeline_id, ids)
            )
            rows = await cur.fetchall()
        return {r[0]: _run.decode(r[1]) for r in rows}

    async def list_runs(
        self, pipeline_id: str, limit: int = 50, offset: int = 0, status: str | None = None
    ) -> list[RunView]:
        async with self._pool.connection() as conn:
            cur = await conn.execute(
                "SELECT id, doc::text FROM rm_runs WHERE pipeline_id = %s AND (%s::text IS NULL OR status = %s) "
                "ORDER BY created_at DESC, id DESC LIMIT %s OFFSET %s",
                (pipeline_id, status, status, limit, offset),
            )
            rows = await cur.fetchall()
            ids = [r[0] for r in rows]
            cur = await conn.execute(
                "SELECT run_id, stage_id, lines::text FROM rm_run_logs WHERE run_id = ANY(%s) "
                "ORDER BY run_id, position",
                (ids,),
            )
            chunks: dict[str, list[tuple[str | None, tuple[LogLine, ...]]]] = {}
            for run_id, stage_id, lines in await cur.fetchall():
                chunks.setdefault(run_id, []).append((stage_id, _lines.decode(lines)))
        out = []
        for run_id, doc in rows:
            view = _run.decode(doc)
            text, outputs = log_text(chunks.get(run_id, []))
            view.logs = text
            for sr in view.stage_results:
                sr.output = outputs.get(sr.stage_id, "")
                for job in sr.jobs or ():
                    for step in job.steps:
                        step.output = outputs.get(step_log_key(sr.stage_id, job.name, step.name), "")
            out.append(view)
        return out


def _summary_of(doc: str, pipeline_name: str) -> RunSummaryView:
    view = _summary.decode(doc)
    view.pipeline_name = pipeline_name
    return view


def _like_escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
