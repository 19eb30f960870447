"""Runs across the organization's pipelines: a page newest first (filtered by status or pipeline),
and the latest run of each of some pipelines (the dashboard's pipelines list)."""

from __future__ import annotations

import uuid
from typing import Annotated, Any

import msgspec
from litestar import Controller, Request, get
from litestar.datastructures import State
from litestar.params import Parameter

from domain.errors import Invalid
from domain.run.state import RunStatus
from infra.auth import Principal
from infra.http.deps import API, MAX_PAGE, deps_of, uuid_or_404
from infra.http.guards import viewer
from projections.views import RunSummaryView

# Pipelines one `GET /runs/latest` may ask about (one page of the pipelines list is at most 100).
MAX_LATEST = 100


class RunSummaryPage(msgspec.Struct, kw_only=True):
    data: list[RunSummaryView]
    total: int
    page: int
    limit: int


class RunListController(Controller):
    path = f"{API}/runs"
    guards = [viewer]
    tags = ["pipelines"]

    @get("/", summary="Runs of every pipeline of the organization, newest first (without logs or stage results)")
    async def list_runs(
        self,
        request: Request[Principal, Any, State],
        page: Annotated[int, Parameter(ge=1, le=MAX_PAGE)] = 1,
        limit: Annotated[int, Parameter(ge=1, le=100)] = 20,
        status: Annotated[RunStatus | None, Parameter()] = None,
        pipelineId: Annotated[str | None, Parameter(max_length=100)] = None,
    ) -> RunSummaryPage:
        pipeline_id = None if pipelineId is None else uuid_or_404(pipelineId, "pipeline")
        data, total = await deps_of(request).read_models.list_org_runs(
            request.user.org, status=status, pipeline_id=pipeline_id, limit=limit, offset=(page - 1) * limit
        )
        return RunSummaryPage(data=data, total=total, page=page, limit=limit)

    @get("/latest", summary="The latest run of each given pipeline (those with no run are left out)")
    async def latest_runs(
        self,
        request: Request[Principal, Any, State],
        pipelineIds: Annotated[str, Parameter(max_length=MAX_LATEST * 40)],
    ) -> list[RunSummaryView]:
        ids = [p for p in (part.strip() for part in pipelineIds.split(",")) if p]
        if not ids:
            raise Invalid({"pipelineIds": "give one or more pipeline ids, separated by commas"})
        if len(ids) > MAX_LATEST:
            raise Invalid({"pipelineIds": f"at most {MAX_LATEST} pipeline ids"})
        # An id that is no UUID matches no pipeline: it is left out like one without runs.
        wanted = [str(uuid.UUID(value)) for value in ids if _is_uuid(value)]
        return await deps_of(request).read_models.latest_runs(request.user.org, wanted)


def _is_uuid(value: str) -> bool:
    try:
        uuid.UUID(value)
    except ValueError:
        return False
    return True
