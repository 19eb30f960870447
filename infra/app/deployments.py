"""Deployment commands: record a deployment's lifecycle events, and close one whose executor is gone."""

from __future__ import annotations

from domain import deployment as dp
from domain import events as ev
from infra.app.context import AppContext
from infra.app.retry import load_decide_append
from infra.store.records import NewEvent


class DeploymentCommands:
    def __init__(self, ctx: AppContext) -> None:
        self.ctx = ctx

    async def load(self, deployment_id: str) -> tuple[dp.DeploymentState, int]:
        state, version = dp.initial_state, 0
        for rec in await self.ctx.store.read_stream(ev.deployment_stream(deployment_id)):
            e = rec.event
            if ev.is_deployment_event(e):
                state = dp.evolve(state, e)
            version = rec.stream_version
        return state, version

    def _records(
        self, events: list[dp.DeploymentEvent], org: str | None, pipeline_id: str, run_id: str
    ) -> list[NewEvent]:
        return [NewEvent(self.ctx.new_id(), e, org=org, pipeline_id=pipeline_id, run_id=run_id) for e in events]

    async def append(
        self,
        deployment_id: str,
        events: list[dp.DeploymentEvent],
        expected: int | None,
        org: str | None,
        pipeline_id: str,
        run_id: str,
    ) -> None:
        """Append at the version the executor's deploy step knows (0 queued, 1 started, 2 ended):
        WrongExpectedVersion when the deployment was closed meanwhile."""
        await self.ctx.store.append(
            ev.deployment_stream(deployment_id), self._records(events, org, pipeline_id, run_id), expected
        )
        self.ctx.appended()

    async def abandon(self, deployment_id: str, reason: str) -> bool:
        """Record the deployment as failed with `reason` unless it has finished (the deployment
        decider); True when this call closed it. A lost race re-reads and decides again."""
        done = await load_decide_append(
            self.ctx.store,
            ev.deployment_stream(deployment_id),
            load=lambda: self.load(deployment_id),
            decide=lambda state: dp.decide(
                dp.AbandonDeployment(deployment_id=deployment_id, reason=reason, at=self.ctx.now()), state
            ),
            record=lambda state, new: self._records(new, state.organization_id, state.pipeline_id, state.run_id),
            retries=10,
            conflict=f"deployment {deployment_id}: too many concurrent writers",
        )
        if not done.events:
            return False
        self.ctx.appended()
        return True
