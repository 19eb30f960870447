"""Cron triggers. Every executor process runs a scheduler; each tick still starts exactly one run,
because a tick's run id is derived from (pipeline, trigger, tick): the second scheduler to start
it finds the run stream already there (optimistic concurrency) and starts nothing.

After downtime the scheduler catches up one missed tick: it always looks at the latest tick at
or before now, never older ones, and never a tick from before the trigger was saved.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
import zoneinfo
from collections.abc import Callable
from datetime import datetime

from psycopg_pool import AsyncConnectionPool

from domain import pipeline as pl
from domain.cron import CronError, CronSchedule
from infra.app.commands import Commands, utc_now
from infra.store.records import WrongExpectedVersion
from projections.read_models import decode_pipeline_state

log = logging.getLogger("pipelines.scheduler")

# The pipelines with a cron trigger (read every tick by every executor).
CRON_PIPELINES = "SELECT state::text FROM rm_pipelines WHERE state::jsonb -> 'triggers' @> '[{\"type\": \"cron\"}]'"

_TICKS = uuid.UUID("8d3c5a0b-7c1e-4f59-b0f2-6a1d2e3f4b5c")


def tick_run_id(pipeline_id: str, index: int, schedule: str, tick: datetime) -> str:
    return str(uuid.uuid5(_TICKS, f"{pipeline_id}:{index}:{schedule}:{tick.isoformat()}"))


class Scheduler:
    def __init__(
        self,
        commands: Commands,
        pool: AsyncConnectionPool,
        *,
        now: Callable[[], datetime] = utc_now,
        interval: float = 1.0,
    ) -> None:
        self.commands = commands
        self.pool = pool
        self.now = now
        self.interval = interval
        # The latest tick each trigger fired, by (pipeline, trigger index, schedule): only a
        # trigger's latest tick at or before now can fire, so older ones need no memory.
        self._fired: dict[tuple[str, int, str], str] = {}

    @property
    def remembered(self) -> int:
        """How many fired ticks this scheduler remembers (to skip them without a store round trip)."""
        return len(self._fired)

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                await self.tick_once()
            except Exception as exc:
                log.warning("scheduler pass failed: %s", exc)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.interval)

    async def _cron_pipelines(self) -> list[pl.PipelineState]:
        async with self.pool.connection() as conn:
            cur = await conn.execute(CRON_PIPELINES)
            return [decode_pipeline_state(r[0]) for r in await cur.fetchall()]

    async def tick_once(self) -> list[str]:
        """Start the run of every cron trigger's latest due tick not started yet; their run ids."""
        now = self.now()
        started: list[str] = []
        triggers: set[tuple[str, int, str]] = set()
        for listed in await self._cron_pipelines():
            since = listed.versions[-1].saved_at if listed.versions else listed.created_at
            for index, trig in enumerate(listed.triggers):
                if trig.get("type") != "cron":
                    continue
                expr = str(trig.get("schedule", ""))
                key = (listed.pipeline_id, index, expr)
                triggers.add(key)
                try:
                    schedule = CronSchedule.parse(expr)
                    tz = zoneinfo.ZoneInfo(str(trig.get("timezone") or "UTC"))
                except (CronError, zoneinfo.ZoneInfoNotFoundError, ValueError) as exc:
                    log.warning("pipeline %s trigger %d: %s", listed.pipeline_id, index, exc)
                    continue
                tick = schedule.latest_at_or_before(now, tz)
                if tick is None or (since is not None and tick < since):
                    continue
                run_id = tick_run_id(listed.pipeline_id, index, expr, tick)
                if self._fired.get(key) == run_id:
                    continue
                pipeline, _ = await self.commands.load_pipeline(listed.pipeline_id)
                if not pipeline.live:
                    continue
                trigger = {"type": "cron", "schedule": expr, "timezone": str(tz), "tick": tick.isoformat()}
                try:
                    await self.commands.trigger(pipeline, by="scheduler", run_id=run_id, trigger=trigger)
                    started.append(run_id)
                    log.info(
                        "cron %r started run %s of pipeline %s for tick %s",
                        expr,
                        run_id,
                        pipeline.pipeline_id,
                        tick.isoformat(),
                    )
                except WrongExpectedVersion:
                    pass  # another scheduler (or an earlier pass of ours) started this tick's run
                self._fired[key] = run_id
        # Triggers no longer there (a pipeline deleted, a schedule changed) are forgotten.
        for gone in self._fired.keys() - triggers:
            del self._fired[gone]
        return started
