"""What a principal may subscribe to: a run or pipeline of its own organization, or the organization."""

from __future__ import annotations

from infra.app.commands import Commands
from infra.auth import Principal
from infra.gateway.protocol import BadRequest, Scope


async def resolve(commands: Commands, principal: Principal, params: dict[str, str]) -> tuple[Scope, str]:
    """What a subscription is keyed by, once the principal may see it (BadRequest: not found)."""
    run_id, pipeline_id = params.get("runId"), params.get("pipelineId")
    if run_id is not None:
        run, _ = await commands.load_run(run_id)
        ok = run.exists and run.organization_id == principal.org
        ok = ok and (pipeline_id is None or run.pipeline_id == pipeline_id)
        if ok:
            pipeline, _ = await commands.load_pipeline(run.pipeline_id)
            ok = pipeline.live
        if not ok:
            raise BadRequest("run not found")
        return "run", run_id
    if pipeline_id is not None:
        pipeline, _ = await commands.load_pipeline(pipeline_id)
        if not pipeline.live or pipeline.organization_id != principal.org:
            raise BadRequest("pipeline not found")
        return "pipeline", pipeline_id
    return "org", principal.org or ""
