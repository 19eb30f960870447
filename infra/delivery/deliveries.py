"""Deploy and notify stages, as the executor sees them: `Deliveries` runs a deploy (deployers.py)
or a notify (notifier.py) stage and closes the deployments a dead executor left behind.

A deployment whose executor died is closed as failed by `Deliveries.abandon` (called when the
stage's lease is recovered) or `Deliveries.close_orphans` (a sweep): the dead executor's
environment lock went with its database session (PostgreSQL ends a session whose client vanished;
the lock session sets TCP keepalives so that a lost host is noticed in about half a minute too).
"""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from nats.aio.client import Client as NATS
from psycopg_pool import AsyncConnectionPool

from domain import deployment as dp
from domain import run as rn
from domain.errors import Refused
from domain.stages import Stage
from infra.app.commands import Commands
from infra.config import Settings
from infra.delivery.deployers import Deployer, Log, RunCommand
from infra.delivery.notifier import Notifier
from infra.delivery.registry import Item, Kind, NameInUse, Registry
from infra.delivery.webhooks import DeliveryOptions
from infra.executor.scripts import ScriptOutcome
from infra.secrets import SecretStore

# The registry's names stay importable from here (the HTTP layer's delivery routes use them).
__all__ = ["Deliveries", "DeliveryOptions", "Item", "Kind", "NameInUse", "Registry"]


class Deliveries:
    """The executor's deploy and notify stages."""

    def __init__(
        self,
        commands: Commands,
        pool: AsyncConnectionPool,
        database_url: str,
        nc: NATS | None,
        options: DeliveryOptions | None = None,
        sealer: SecretStore | None = None,
        *,
        settings: Settings | None = None,
    ) -> None:
        """`options` wins; else `settings` (the PIPELINES_NOTIFY_* variables); else the defaults."""
        self.commands = commands
        self.registry = Registry(pool, sealer)
        self.database_url = database_url
        self.nc = nc
        if options is None:
            options = DeliveryOptions.from_settings(settings) if settings is not None else DeliveryOptions()
        self.deployer = Deployer(commands, self.registry, database_url, options)
        self.notifier = Notifier(commands, self.registry, nc, options)

    @property
    def options(self) -> DeliveryOptions:
        return self.notifier.options

    @options.setter
    def options(self, options: DeliveryOptions) -> None:
        self.deployer.options = self.notifier.options = options

    async def deploy(
        self, state: rn.RunState, stage: Stage, attempt: int, log: Log, run_command: RunCommand
    ) -> ScriptOutcome:
        return await self.deployer.deploy(state, stage, attempt, log, run_command)

    async def notify(
        self, state: rn.RunState, stage: Stage, log: Log, extra: dict[str, Any] | None = None
    ) -> ScriptOutcome:
        """`extra`: more of the expression context (a step of a job: its matrix, jobs, steps...)."""
        return await self.notifier.notify(state, stage, log, extra)

    async def load_deployment(self, deployment_id: str) -> tuple[dp.DeploymentState, int]:
        return await self.commands.deployments.load(deployment_id)

    # ---- closing deployments whose executor is gone -------------------------------------------

    async def _deployments_of(self, run_id: str, stage_id: str, attempt: int | None) -> list[str]:
        """The deployments a stage of a run has queued (from the event store, not the read model,
        which may lag); the decider then skips those that have finished."""
        async with self.registry.pool.connection() as conn:
            cur = await conn.execute(
                "SELECT stream_id FROM events WHERE run_id = %s AND event_type = 'deployment_queued' "
                "AND data->>'stage_id' = %s AND (%s::int IS NULL OR (data->>'attempt')::int = %s::int) "
                "ORDER BY position",
                (run_id, stage_id, attempt, attempt),
            )
            rows = await cur.fetchall()
        return [str(r[0]).removeprefix("deployment-") for r in rows]

    async def abandon(self, run_id: str, stage_id: str, reason: str, *, attempt: int | None = None) -> list[str]:
        """Record every unfinished deployment of this run's stage (of that attempt, when given) as
        failed with `reason`: its executor died. Nothing to release: a dead executor's environment
        lock, and its place in the environment's queue, went with its database session. Safe to
        call again, and when the stage never deployed. Returns the ids of the deployments it closed."""
        close = self.commands.deployments.abandon
        return [d for d in await self._deployments_of(run_id, stage_id, attempt) if await close(d, reason)]

    async def close_orphans(self, older_than: float = 0.0, limit: int = 100) -> list[str]:
        """A sweep: close the deployments still queued or running (per the read model, then checked
        on the event store) whose run stage is no longer running that attempt: the stage finished,
        failed or moved on to a retry without them. `older_than`: seconds since queued. Returns the
        ids closed."""
        since = self.commands.now() - timedelta(seconds=older_than)
        async with self.registry.pool.connection() as conn:
            cur = await conn.execute(
                "SELECT id, doc->>'runId', doc->>'stageId', (doc->>'attempt')::int FROM rm_deployments "
                "WHERE status IN ('queued', 'running') AND queued_at <= %s ORDER BY queued_at LIMIT %s",
                (since, limit),
            )
            rows = await cur.fetchall()
        closed: list[str] = []
        runs: dict[str, rn.RunState] = {}
        for deployment_id, run_id, stage_id, attempt in rows:
            if run_id not in runs:
                runs[run_id], _ = await self.commands.load_run(run_id)
            state = runs[run_id]
            try:
                sr = state.stage_runs[state.stage_index(stage_id)] if state.exists else None
            except Refused:
                sr = None
            if sr is not None and sr.status == "running" and (sr.attempt == attempt or sr.jobs):
                continue  # its executor is (as far as we know) still at it (a step's attempts are its own)
            where = f"stage {stage_id} of run {run_id}"
            reason = (
                f"executor lost: {where} is {sr.status} (attempt {sr.attempt}) but this deployment never finished"
                if sr is not None
                else f"executor lost: {where} does not exist"
            )
            if await self.commands.deployments.abandon(deployment_id, reason):
                closed.append(deployment_id)
        return closed
