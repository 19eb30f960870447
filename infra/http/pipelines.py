"""Pipeline CRUD: list, create, read, update (PUT and PATCH) and delete."""

from __future__ import annotations

from typing import Annotated, Any

import msgspec
from litestar import Controller, Request, Response, delete, get, patch, post, put
from litestar.datastructures import State
from litestar.params import FromPath, FromQuery, JSONBody, Parameter

from domain import pipeline as pl
from domain.errors import Invalid
from infra.auth import Principal
from infra.config import Settings
from infra.git.policy import repo_url_problem
from infra.http.bodies import CreatePipelineBody, PatchPipelineBody, parse_pipeline_body
from infra.http.delivery import check_stage_refs
from infra.http.deps import API, MAX_PAGE, Deps, deps_of, limits_of, load_visible_pipeline
from infra.http.deps import uuid_or_404 as _uuid_or_404
from infra.http.guards import admin, member, viewer
from infra.http.keyed import idempotent, keyed_id
from infra.http.responses import json_response
from infra.store.records import WrongExpectedVersion
from projections.views import PipelineView, pipeline_view

PathId = FromPath[str]


class PipelinePage(msgspec.Struct, kw_only=True):
    data: list[PipelineView]
    total: int
    page: int
    limit: int


def _check_repo(settings: Settings, body: dict[str, Any]) -> None:
    """A repository on the server's own disk only under PIPELINES_GIT_ALLOW_LOCAL (400 otherwise)."""
    url = body.get("repoUrl")
    if isinstance(url, str) and (problem := repo_url_problem(url, settings.git_allow_local)) is not None:
        raise Invalid({"repoUrl": problem})


class PipelineController(Controller):
    path = f"{API}/pipelines"
    guards = [viewer]
    tags = ["pipelines"]

    @get("/", summary="List pipelines")
    async def list_pipelines(
        self,
        request: Request[Principal, Any, State],
        page: Annotated[int, Parameter(ge=1, le=MAX_PAGE)] = 1,
        limit: Annotated[int, Parameter(ge=1, le=100)] = 20,
        organizationId: FromQuery[str | None] = None,
        q: Annotated[str | None, Parameter(max_length=200, description="only names containing this (any case)")] = None,
    ) -> PipelinePage:
        deps = deps_of(request)
        principal = request.user
        if organizationId is not None and organizationId != principal.org:
            return PipelinePage(data=[], total=0, page=page, limit=limit)
        data, total = await deps.read_models.list_pipelines(principal.org, page, limit, q or None)
        return PipelinePage(data=data, total=total, page=page, limit=limit)

    @post("/", guards=[member], summary="Create a pipeline", status_code=201)
    async def create_pipeline(
        self, request: Request[Principal, Any, State], data: JSONBody[CreatePipelineBody | None] = None
    ) -> Response[bytes]:
        deps = deps_of(request)
        principal = request.user
        body = parse_pipeline_body(await request.body(), partial=False, limits=limits_of(deps.settings))
        _check_repo(deps.settings, body)
        await check_stage_refs(request, body.get("stages"))

        async def run() -> Response[bytes]:
            pipeline_id = keyed_id(request, principal)
            try:
                state = await deps.commands.create_pipeline(
                    name=body["name"],
                    description=body.get("description"),
                    stages=body.get("stages") or [],
                    org=principal.org,
                    by=principal.sub,
                    pipeline_id=pipeline_id,
                    repo_url=body.get("repoUrl"),
                    default_branch=body.get("defaultBranch"),
                    pipeline_file_path=body.get("pipelineFilePath"),
                )
            except WrongExpectedVersion:
                # A retry of a keyed create whose first request died after creating it.
                assert pipeline_id is not None
                state, _ = await deps.commands.load_pipeline(pipeline_id)
            return json_response(201, pipeline_view(state))

        return await idempotent(request, principal, run)

    @get("/{pipeline_id:str}", summary="Get a pipeline")
    async def get_pipeline(self, request: Request[Principal, Any, State], pipeline_id: PathId) -> PipelineView:
        return pipeline_view(await load_visible_pipeline(request, pipeline_id))

    async def _update(self, request: Request[Principal, Any, State], pipeline_id: str, whole: bool) -> PipelineView:
        deps = deps_of(request)
        principal = request.user
        body = parse_pipeline_body(await request.body(), partial=not whole, limits=limits_of(deps.settings))
        _check_repo(deps.settings, body)
        await check_stage_refs(request, body.get("stages"))
        state = await deps.commands.update_pipeline(
            _uuid_or_404(pipeline_id, "pipeline"),
            by=principal.sub,
            name=body.get("name"),
            description=body.get("description"),
            set_description=whole or "description" in body,
            stages=(body.get("stages") or []) if whole else body.get("stages"),
            repo_url=body.get("repoUrl"),
            set_repo_url=whole or "repoUrl" in body,
            default_branch=body.get("defaultBranch") or (pl.DEFAULT_BRANCH if whole else None),
            pipeline_file_path=body.get("pipelineFilePath") or (pl.DEFAULT_PIPELINE_FILE if whole else None),
            visible=lambda s: s.organization_id == principal.org,
        )
        return pipeline_view(state)

    @patch("/{pipeline_id:str}", guards=[member], summary="Update some fields of a pipeline")
    async def patch_pipeline(
        self,
        request: Request[Principal, Any, State],
        pipeline_id: PathId,
        data: JSONBody[PatchPipelineBody | None] = None,
    ) -> PipelineView:
        return await self._update(request, pipeline_id, whole=False)

    @put("/{pipeline_id:str}", guards=[member], summary="Replace a pipeline")
    async def put_pipeline(
        self,
        request: Request[Principal, Any, State],
        pipeline_id: PathId,
        data: JSONBody[CreatePipelineBody | None] = None,
    ) -> PipelineView:
        return await self._update(request, pipeline_id, whole=True)

    @delete("/{pipeline_id:str}", guards=[admin], summary="Delete a pipeline (cancels its active runs)")
    async def delete_pipeline(self, request: Request[Principal, Any, State], pipeline_id: PathId) -> None:
        deps: Deps = request.app.state.deps
        principal = request.user
        pid = _uuid_or_404(pipeline_id, "pipeline")
        # Cancels the pipeline's runs too, found in the store; an error is an error (5xx: retry).
        await deps.commands.delete_pipeline(pid, by=principal.sub, visible=lambda s: s.organization_id == principal.org)
