"""Pipeline definitions as code: read, validate and save specs; definition versions."""

from __future__ import annotations

from typing import Annotated, Any, Literal
from zoneinfo import ZoneInfo

import msgspec
from litestar import Controller, Request, Response, get, post
from litestar.datastructures import State
from litestar.exceptions import NotFoundException
from litestar.params import FromPath, FromQuery, QueryParameter

from domain import pipeline as pl
from domain.errors import Invalid
from domain.spec import size_errors, validate_spec
from infra.app.specs import check_save, installed_plugins
from infra.auth import Principal
from infra.git.repos import render_spec
from infra.http.delivery import check_stage_refs
from infra.http.deps import API, deps_of, limits_of, load_visible_pipeline
from infra.http.guards import member, viewer
from infra.http.keyed import idempotent
from infra.http.responses import decode_json, json_response
from projections.views import iso

SPEC_SCHEMA_URL = f"{API}/schemas/pipeline-spec.json"


def render(spec: dict[str, Any], fmt: str) -> str:
    return render_spec(spec, fmt)


class SpecView(msgspec.Struct, kw_only=True, rename="camel"):
    """`version` is null when the spec read from a Git-backed pipeline's branch head is not a
    recorded definition version yet (it becomes one at the next trigger)."""

    pipeline_id: str
    version: int | None
    format: str
    spec: dict[str, Any]
    content: str
    saved_by: str | None
    saved_at: str | None
    commit_message: str | None
    commit_sha: str | None = None
    branch: str | None = None


class VersionView(msgspec.Struct, kw_only=True, rename="camel"):
    version: int
    format: str
    saved_by: str
    saved_at: str | None
    commit_message: str | None
    commit_sha: str | None = None


class SpecIssue(msgspec.Struct, kw_only=True):
    path: str
    message: str


class ValidationView(msgspec.Struct, kw_only=True):
    valid: bool
    errors: list[SpecIssue]
    warnings: list[SpecIssue]


class ValidateBody(msgspec.Struct, kw_only=True):
    spec: Any
    format: Literal["json", "yaml", "yml"] = "json"


class SaveBody(msgspec.Struct, kw_only=True, rename="camel"):
    spec: Any
    format: Literal["json", "yaml", "yml"] = "json"
    commit_message: Annotated[str, msgspec.Meta(max_length=2000)] | None = None
    expected_head_commit_sha: str | None = None
    request_id: str | None = None
    save_mode: Literal["direct", "pr"] = "direct"


class SavedView(msgspec.Struct, kw_only=True, rename="camel"):
    pipeline_id: str
    version: int
    format: str
    commit_sha: str | None = None
    branch: str | None = None
    pr_branch: str | None = None


async def _validation(request: Request[Principal, Any, State]) -> ValidationView:
    body: ValidateBody = decode_json(await request.body(), ValidateBody)
    limits = limits_of(deps_of(request).settings)
    found, warnings = validate_spec(body.spec, zone=ZoneInfo, plugins=installed_plugins(), limits=limits)
    errors = [SpecIssue(path=e.path, message=e.message) for e in found]
    if not errors and isinstance(body.spec, dict):
        # What a save checks beyond the spec itself: the components and environments its deploy
        # stages name (so that `validate` passes exactly what `save` accepts, and `apply` creates
        # no pipeline it then cannot save a spec to).
        try:
            await check_stage_refs(request, body.spec.get("stages"), "stages")
        except Invalid as exc:
            errors = [SpecIssue(path=path, message=message) for path, message in exc.errors.items()]
    return ValidationView(
        valid=not errors,
        errors=errors,
        warnings=[SpecIssue(path=w.path, message=w.message) for w in warnings],
    )


def _view(state: pl.PipelineState, version: pl.DefinitionVersion, fmt: str | None) -> SpecView:
    chosen = fmt or version.format
    return SpecView(
        pipeline_id=state.pipeline_id,
        version=version.version,
        format=chosen,
        spec=version.spec,
        content=render(version.spec, chosen),
        saved_by=version.saved_by,
        saved_at=iso(version.saved_at),
        commit_message=version.commit_message,
        commit_sha=version.commit_sha,
    )


class SpecController(Controller):
    path = f"{API}/pipelines/{{pipeline_id:str}}"
    tags = ["definitions"]
    guards = [viewer]

    @get("/spec", summary="The pipeline's spec (current or a given version), as JSON and as text")
    async def get_spec(
        self,
        request: Request[Principal, Any, State],
        pipeline_id: FromPath[str],
        format: FromQuery[Literal["json", "yaml", "yml"] | None] = None,
        version: Annotated[int | None, QueryParameter(ge=1)] = None,
    ) -> SpecView:
        state = await load_visible_pipeline(request, pipeline_id)
        if state.repo_url is not None and version is None:
            return await self._git_head(request, state, format)
        chosen = state.version(version or state.definition_version)
        if chosen is None:
            raise NotFoundException(f"pipeline has no definition version {version}")
        return _view(state, chosen, format)

    @staticmethod
    async def _git_head(request: Request[Principal, Any, State], state: pl.PipelineState, fmt: str | None) -> SpecView:
        """A Git-backed pipeline's spec as it is at its branch head."""
        deps = deps_of(request)
        spec, stored, head = await deps.commands.read_git_spec(state)
        recorded = next((v for v in reversed(state.versions) if v.spec == spec), None)
        return SpecView(
            pipeline_id=state.pipeline_id,
            version=recorded.version if recorded is not None else None,
            format=fmt or stored,
            spec=spec,
            content=head.content if fmt is None or fmt == stored else render(spec, fmt),
            saved_by=recorded.saved_by if recorded is not None else None,
            saved_at=iso(recorded.saved_at) if recorded is not None else None,
            commit_message=recorded.commit_message if recorded is not None else None,
            commit_sha=head.commit_sha,
            branch=head.branch,
        )

    @get("/versions", summary="Every definition version of the pipeline, oldest first")
    async def versions(self, request: Request[Principal, Any, State], pipeline_id: FromPath[str]) -> list[VersionView]:
        state = await load_visible_pipeline(request, pipeline_id)
        return [
            VersionView(
                version=v.version,
                format=v.format,
                saved_by=v.saved_by,
                saved_at=iso(v.saved_at),
                commit_message=v.commit_message,
                commit_sha=v.commit_sha,
            )
            for v in state.versions
        ]

    @get("/versions/{version:int}", summary="The spec of one definition version")
    async def version(
        self, request: Request[Principal, Any, State], pipeline_id: FromPath[str], version: FromPath[int]
    ) -> SpecView:
        state = await load_visible_pipeline(request, pipeline_id)
        chosen = state.version(version)
        if chosen is None:
            raise NotFoundException(f"pipeline has no definition version {version}")
        return _view(state, chosen, None)

    @post("/spec/validate", status_code=200, summary="Validate a spec; every error with its path")
    async def validate(self, request: Request[Principal, Any, State], pipeline_id: FromPath[str]) -> ValidationView:
        await load_visible_pipeline(request, pipeline_id)
        return await _validation(request)

    @post("/spec/save", guards=[member], status_code=200, summary="Save a spec as the next definition version")
    async def save(self, request: Request[Principal, Any, State], pipeline_id: FromPath[str]) -> Response[bytes]:
        """With an Idempotency-Key, a retried save answers the first answer (and commits nothing again)."""
        deps = deps_of(request)
        principal = request.user
        body: SaveBody = decode_json(await request.body(), SaveBody)
        state = await load_visible_pipeline(request, pipeline_id)
        if sized := size_errors(body.spec, limits_of(deps.settings)):
            raise Invalid({f"spec.{e.path}": e.message for e in sized})
        check_save(state, body.spec, body.save_mode, body.expected_head_commit_sha)
        await check_stage_refs(request, body.spec.get("stages"), "spec.stages")
        spec: dict[str, Any] = body.spec

        async def run() -> Response[bytes]:
            saved = await deps.commands.save_spec(
                state.pipeline_id,
                spec=spec,
                format=body.format,
                commit_message=body.commit_message,
                by=principal.sub,
                plugins=installed_plugins(),
                visible=lambda s: s.organization_id == principal.org,
                save_mode=body.save_mode,
                expected_head_commit_sha=body.expected_head_commit_sha,
            )
            view = SavedView(
                pipeline_id=saved.state.pipeline_id,
                version=saved.state.definition_version,
                format=body.format,
                commit_sha=saved.commit_sha,
                branch=saved.branch,
                pr_branch=saved.pr_branch,
            )
            return json_response(200, view)

        return await idempotent(request, principal, run)


@post(
    f"{API}/pipelines/validate",
    guards=[viewer],
    status_code=200,
    tags=["definitions"],
    summary="Validate a spec before any pipeline has it; every error with its path",
)
async def validate_new_spec(request: Request[Principal, Any, State]) -> ValidationView:
    return await _validation(request)


_STRINGS = {"type": "object", "additionalProperties": {"type": "string"}}
_RETRY = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "maxAttempts": {"type": "integer", "minimum": 1, "maximum": 20},
        "backoff": {"type": "number", "minimum": 0, "maximum": 3600},
    },
}
_SECONDS = {"type": "number", "exclusiveMinimum": 0}
_STEP = {
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "name": {"type": "string", "pattern": "^[A-Za-z0-9_][A-Za-z0-9_.-]{0,99}$"},
        "run": {"type": "string", "description": "a shell command (the builtin shell step); may use ${{ }}"},
        "uses": {"type": "string", "description": "a step plugin (entry-point group pipelines.steps)"},
        "action": {"type": "string"},
        "args": {"type": "object"},
        "approval": {"type": "object", "properties": {"message": {"type": "string"}}, "additionalProperties": False},
        "deploy": {
            "type": "object",
            "required": ["componentId", "environmentId"],
            "properties": {"componentId": {"type": "string"}, "environmentId": {"type": "string"}},
            "additionalProperties": False,
        },
        "notify": {
            "type": "object",
            "required": ["channel", "message"],
            "properties": {"channel": {"type": "string"}, "message": {"type": "string"}},
            "additionalProperties": False,
        },
        "when": {"type": "string"},
        "timeout": _SECONDS,
        "continueOnError": {"type": "boolean"},
    },
    "oneOf": [{"required": [k]} for k in ("run", "uses", "approval", "deploy", "notify")],
}
_JOB = {
    "type": "object",
    "additionalProperties": False,
    "required": ["name", "steps"],
    "properties": {
        "name": {"type": "string", "pattern": "^[A-Za-z0-9_][A-Za-z0-9_.-]{0,99}$"},
        "steps": {"type": "array", "minItems": 1, "items": _STEP},
        "needs": {"type": "array", "items": {"type": "string"}},
        "when": {"type": "string"},
        "matrix": {
            "type": "object",
            "additionalProperties": {
                "type": "array",
                "minItems": 1,
                "items": {"type": ["string", "number", "boolean"]},
            },
        },
        "env": _STRINGS,
        "timeout": _SECONDS,
        "retry": _RETRY,
        "continueOnError": {"type": "boolean"},
    },
}
_TYPED_STAGE = {
    "type": "object",
    "additionalProperties": False,
    "required": ["type"],
    "properties": {
        "id": {"type": "string"},
        "name": {"type": "string"},
        "type": {"enum": ["script", "approval", "deploy", "notify"]},
        "order": {"type": "integer"},
        "timeout": _SECONDS,
        "retry": _RETRY,
        "config": {"type": "object"},
    },
}
_JOBS_STAGE = {
    "type": "object",
    "additionalProperties": False,
    "required": ["jobs"],
    "properties": {
        "id": {"type": "string"},
        "name": {"type": "string"},
        "when": {"type": "string"},
        "jobs": {"type": "array", "minItems": 1, "items": _JOB},
    },
}
SPEC_SCHEMA: dict[str, Any] = {
    "$schema": "https://json-schema.org/draft/2020-12/schema",
    "$id": SPEC_SCHEMA_URL,
    "title": "Pipeline spec",
    "type": "object",
    "additionalProperties": False,
    "properties": {
        "stages": {"type": "array", "items": {"oneOf": [_TYPED_STAGE, _JOBS_STAGE]}},
        "jobs": {"type": "array", "minItems": 1, "items": _JOB},
        "variables": _STRINGS,
        "triggers": {
            "type": "array",
            "items": {
                "type": "object",
                "required": ["type"],
                "properties": {
                    "type": {"enum": ["manual", "cron", "event"]},
                    "schedule": {"type": "string", "description": "five-field cron expression"},
                    "timezone": {"type": "string"},
                    "events": {"type": "array", "items": {"type": "string"}},
                    "branches": {"type": "array", "items": {"type": "string"}},
                },
            },
        },
    },
    "oneOf": [{"required": ["stages"]}, {"required": ["jobs"]}],
}


@get(SPEC_SCHEMA_URL, summary="JSON Schema of pipeline specs, for editors", tags=["definitions"])
async def spec_schema() -> dict[str, Any]:
    return SPEC_SCHEMA
