"""The HTTP API (litestar): controllers, auth guards, idempotency, health and OpenAPI."""

from __future__ import annotations

import asyncio
import re
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Annotated, Any

import msgspec
from litestar import Controller, Litestar, Request, Response, delete, get, patch, post, put
from litestar.connection import ASGIConnection
from litestar.datastructures import State
from litestar.exceptions import NotAuthorizedException, NotFoundException, PermissionDeniedException
from litestar.handlers.base import BaseRouteHandler
from litestar.middleware import AbstractAuthenticationMiddleware, AuthenticationResult, DefineMiddleware
from litestar.openapi import OpenAPIConfig
from litestar.openapi.spec import Components, SecurityScheme
from litestar.params import FromPath, FromQuery, JSONBody, Parameter

from domain import events as ev
from domain import pipeline as pl
from domain import run as rn
from domain.errors import Invalid
from infra.app.commands import Commands
from infra.auth import AuthError, Principal, verify_token
from infra.config import Settings
from infra.http.bodies import CreatePipelineBody, PatchPipelineBody, parse_pipeline_body
from infra.http.delivery import (
    ChannelController,
    ComponentController,
    DeploymentController,
    EnvironmentController,
    check_stage_refs,
)
from infra.http.errors import error_response, handle
from infra.http.hooks import WebhookSettingsController, receive_hook
from infra.http.idempotency import IdempotencyKeys, InFlight, KeyReuse, derived_id, request_hash
from infra.http.queries import ReadModels
from infra.http.specs import SPEC_SCHEMA_URL, SpecController, spec_schema
from infra.secrets import SecretStore
from infra.store.records import WrongExpectedVersion
from projections.views import PipelineView, RunView, pipeline_view, run_view

API = "/api/v1"
PathId = FromPath[str]
_encoder = msgspec.json.Encoder()
_VAR_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")


@dataclass
class Deps:
    """What the API needs, assembled by services/api.py (or a test)."""

    settings: Settings
    commands: Commands
    read_models: ReadModels
    idempotency: IdempotencyKeys
    ready: Callable[[], Awaitable[dict[str, bool]]]
    close: Callable[[], Awaitable[None]]
    # Values of run secrets, encrypted at rest; None: triggers with secrets are refused.
    secrets: SecretStore | None = None


# ---- request bodies --------------------------------------------------------------------------


class TriggerBody(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    variables: dict[str, str] | None = None
    secrets: dict[str, str] | None = None


class ActionBody(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    reason: Annotated[str, msgspec.Meta(max_length=2000)] | None = None
    comment: Annotated[str, msgspec.Meta(max_length=2000)] | None = None


class PipelinePage(msgspec.Struct, kw_only=True):
    data: list[PipelineView]
    total: int
    page: int
    limit: int


class EventRecordView(msgspec.Struct, kw_only=True, rename="camel"):
    position: int
    stream_id: str
    stream_version: int
    event_id: str
    type: str
    recorded_at: str
    data: msgspec.Raw


# ---- auth ------------------------------------------------------------------------------------


class JWTAuth(AbstractAuthenticationMiddleware):
    async def authenticate_request(self, connection: ASGIConnection[Any, Any, Any, Any]) -> AuthenticationResult:
        deps: Deps = connection.app.state.deps
        header = connection.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise NotAuthorizedException("missing bearer token in the Authorization header")
        try:
            principal = verify_token(deps.settings, token.strip())
        except AuthError as exc:
            raise NotAuthorizedException(f"invalid token: {exc}") from exc
        return AuthenticationResult(user=principal, auth=token)


def _role(role: str) -> Callable[[ASGIConnection[Any, Any, Any, Any], BaseRouteHandler], None]:
    def guard(connection: ASGIConnection[Any, Any, Any, Any], _: BaseRouteHandler) -> None:
        principal: Principal = connection.user
        if not principal.has(role):
            raise PermissionDeniedException(f"this action needs the {role} role")

    return guard


viewer = _role("viewer")
member = _role("member")
admin = _role("admin")


def _uuid_or_404(value: str, what: str) -> str:
    try:
        return str(uuid.UUID(value))
    except ValueError:
        raise NotFoundException(f"{what} not found") from None


async def load_visible_pipeline(request: Request[Principal, Any, State], pipeline_id: str) -> pl.PipelineState:
    """The pipeline, if it exists, is not deleted and belongs to the caller's organization; else 404."""
    deps: Deps = request.app.state.deps
    state, _ = await deps.commands.load_pipeline(_uuid_or_404(pipeline_id, "pipeline"))
    if not state.live or state.organization_id != request.user.org:
        raise NotFoundException("pipeline not found")
    return state


def require_role(request: Request[Principal, Any, State], role: str) -> None:
    if not request.user.has(role):
        raise PermissionDeniedException(f"this action needs the {role} role")


def _json(status: int, body: Any) -> Response[bytes]:
    return Response(content=_encoder.encode(body), status_code=status, media_type="application/json")


async def _idempotent(
    request: Request[Principal, Any, State],
    principal: Principal,
    run: Callable[[], Awaitable[Response[bytes]]],
    *,
    digest: str | None = None,
) -> Response[bytes]:
    """`digest`: what identifies the request body, by default its SHA-256 (the trigger passes an
    HMAC when the body carries secrets)."""
    key = request.headers.get("idempotency-key")
    if not key:
        return await run()
    if len(key) > 255:
        return error_response(400, "Idempotency-Key must be at most 255 characters")
    deps: Deps = request.app.state.deps
    scope = _idempotency_scope(request, principal)
    digest = digest or request_hash(await request.body())
    try:
        stored = await deps.idempotency.begin(scope, key, digest)
    except (KeyReuse, InFlight) as exc:
        return error_response(409, str(exc))
    if stored is not None:
        return Response(content=stored.body, status_code=stored.status_code, media_type="application/json")
    try:
        response = await run()
    except BaseException as exc:
        # Client errors are answers too: store them. Anything else may succeed on a retry.
        status = _status_of(request, exc)
        if status is not None and 400 <= status < 500:
            assert isinstance(exc, Exception)
            er = handle(request, exc)
            await deps.idempotency.finish(scope, key, er.status_code or 500, er.content)
        else:
            await deps.idempotency.abandon(scope, key)
        raise
    await deps.idempotency.finish(scope, key, response.status_code or 200, response.content)
    return response


idempotent = _idempotent  # for the other controllers' POST handlers


def _idempotency_scope(request: Request[Principal, Any, State], principal: Principal) -> str:
    return f"{principal.org or '_'}|{principal.sub}|{request.method}|{request.url.path}"


def keyed_id(request: Request[Principal, Any, State], principal: Principal) -> str | None:
    """With an Idempotency-Key, the id of what the command creates (stable across retries)."""
    key = request.headers.get("idempotency-key")
    return derived_id(_idempotency_scope(request, principal), key) if key else None


def _status_of(request: Request[Any, Any, Any], exc: BaseException) -> int | None:
    if not isinstance(exc, Exception):
        return None
    return handle(request, exc).status_code


def _decode_optional(raw: bytes, kind: type[Any]) -> Any:
    if not raw.strip():
        return kind()
    try:
        return msgspec.json.decode(raw, type=kind)
    except msgspec.ValidationError as exc:
        raise Invalid({"body": str(exc)}) from exc
    except msgspec.DecodeError as exc:
        raise Invalid({"body": f"is not valid JSON: {exc}"}) from exc


def _check_variables(variables: dict[str, str] | None, field: str, *, max_entries: int = 200) -> dict[str, str]:
    """Names like environment variables; values at most 32 KiB, without NUL (they become
    environment variables of scripts). Messages never quote a value: it may be a secret."""
    errors: dict[str, str] = {}
    variables = variables or {}
    if len(variables) > max_entries:
        errors[field] = f"at most {max_entries} entries"
    for name, value in variables.items():
        if not _VAR_NAME.match(name):
            errors[f"{field}.{name}"] = "names are letters, digits and underscores, not starting with a digit"
        elif len(value.encode()) > 32 * 1024:
            errors[f"{field}.{name}"] = "values are at most 32 KiB"
        elif "\0" in value:
            errors[f"{field}.{name}"] = "values may not contain NUL characters"
    if errors:
        raise Invalid(errors)
    return variables


# ---- controllers -----------------------------------------------------------------------------


class PipelineController(Controller):
    path = f"{API}/pipelines"
    guards = [viewer]
    tags = ["pipelines"]

    @staticmethod
    async def _pipeline(deps: Deps, principal: Principal, pipeline_id: str) -> pl.PipelineState:
        state, _ = await deps.commands.load_pipeline(_uuid_or_404(pipeline_id, "pipeline"))
        if not state.live or state.organization_id != principal.org:
            raise NotFoundException("pipeline not found")
        return state

    @staticmethod
    async def _run(deps: Deps, principal: Principal, pipeline_id: str | None, run_id: str) -> rn.RunState:
        state, _ = await deps.commands.load_run(_uuid_or_404(run_id, "run"))
        if not state.exists or state.organization_id != principal.org:
            raise NotFoundException("run not found")
        if pipeline_id is not None and state.pipeline_id != pipeline_id:
            raise NotFoundException("run not found in this pipeline")
        return state

    @staticmethod
    async def _run_view(deps: Deps, state: rn.RunState) -> RunView:
        return run_view(state, await deps.commands.load_logs(state.run_id))

    @get("/", summary="List pipelines")
    async def list_pipelines(
        self,
        request: Request[Principal, Any, State],
        page: Annotated[int, Parameter(ge=1)] = 1,
        limit: Annotated[int, Parameter(ge=1, le=100)] = 20,
        organizationId: FromQuery[str | None] = None,
    ) -> PipelinePage:
        deps: Deps = request.app.state.deps
        principal = request.user
        if organizationId is not None and organizationId != principal.org:
            return PipelinePage(data=[], total=0, page=page, limit=limit)
        data, total = await deps.read_models.list_pipelines(principal.org, page, limit)
        return PipelinePage(data=data, total=total, page=page, limit=limit)

    @post("/", guards=[member], summary="Create a pipeline", status_code=201)
    async def create_pipeline(
        self, request: Request[Principal, Any, State], data: JSONBody[CreatePipelineBody | None] = None
    ) -> Response[bytes]:
        deps: Deps = request.app.state.deps
        principal = request.user
        body = parse_pipeline_body(await request.body(), partial=False)
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
            return _json(201, pipeline_view(state))

        return await _idempotent(request, principal, run)

    @get("/{pipeline_id:str}", summary="Get a pipeline")
    async def get_pipeline(self, request: Request[Principal, Any, State], pipeline_id: PathId) -> PipelineView:
        return pipeline_view(await self._pipeline(request.app.state.deps, request.user, pipeline_id))

    async def _update(self, request: Request[Principal, Any, State], pipeline_id: str, whole: bool) -> PipelineView:
        deps: Deps = request.app.state.deps
        principal = request.user
        body = parse_pipeline_body(await request.body(), partial=not whole)
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

    @post("/{pipeline_id:str}/trigger", guards=[member], summary="Trigger a run", status_code=201)
    async def trigger(self, request: Request[Principal, Any, State], pipeline_id: PathId) -> Response[bytes]:
        """Secret values are stored encrypted (SecretStore) under the new run's id before the run is
        appended, so the executor never sees a run whose secrets are not there yet; if the append
        fails they are deleted again, and if this process dies in between, `SecretStore.purge`
        removes them later (their run never existed). The run, its events and every response
        carry only the names. With an Idempotency-Key, the stored request hash is an HMAC under
        the secrets key rather than a plain SHA-256 of the body (which a dictionary attack on a
        short secret could invert)."""
        deps: Deps = request.app.state.deps
        principal = request.user
        raw = await request.body()
        body: TriggerBody = _decode_optional(raw, TriggerBody)
        variables = _check_variables(body.variables, "variables")
        secrets = _check_variables(body.secrets, "secrets", max_entries=100)
        if clash := sorted(set(variables) & set(secrets)):
            raise Invalid({f"secrets.{name}": "is also a variable: a name is a variable or a secret" for name in clash})
        store = deps.secrets
        if secrets and store is None:
            raise Invalid({"secrets": "run secrets are not configured on this server"})

        async def run() -> Response[bytes]:
            pipeline = await self._pipeline(deps, principal, pipeline_id)
            run_id = keyed_id(request, principal) or deps.commands.new_id()
            if secrets and store is not None:
                await store.put(run_id, secrets)
            try:
                state, _ = await deps.commands.trigger(
                    pipeline,
                    by=principal.sub,
                    variables=variables,
                    secret_names=tuple(sorted(secrets)),
                    run_id=run_id,
                )
            except WrongExpectedVersion:
                # A retry of a keyed trigger whose first request died after starting the run.
                state, _ = await deps.commands.load_run(run_id)
            except BaseException:
                if secrets and store is not None:
                    try:  # shielded: a cancelled request must not leave the values behind
                        await asyncio.shield(store.delete(run_id))
                    except (Exception, asyncio.CancelledError):
                        pass  # `SecretStore.purge` removes what is left
                raise
            return _json(201, run_view(state))

        digest = store.request_digest(raw) if secrets and store is not None else None
        return await _idempotent(request, principal, run, digest=digest)

    @get("/{pipeline_id:str}/runs", summary="The last 50 runs, newest first")
    async def list_runs(self, request: Request[Principal, Any, State], pipeline_id: PathId) -> list[RunView]:
        deps: Deps = request.app.state.deps
        pipeline = await self._pipeline(deps, request.user, pipeline_id)
        return await deps.read_models.list_runs(pipeline.pipeline_id)

    @get("/{pipeline_id:str}/runs/{run_id:str}", summary="Get a run with its logs and stage results")
    async def get_run(self, request: Request[Principal, Any, State], pipeline_id: PathId, run_id: PathId) -> RunView:
        deps: Deps = request.app.state.deps
        pipeline = await self._pipeline(deps, request.user, pipeline_id)
        state = await self._run(deps, request.user, pipeline.pipeline_id, run_id)
        return await self._run_view(deps, state)

    @get("/runs/{run_id:str}", summary="Get a run by id")
    async def get_run_by_id(self, request: Request[Principal, Any, State], run_id: PathId) -> RunView:
        deps: Deps = request.app.state.deps
        state = await self._run(deps, request.user, None, run_id)
        pipeline, _ = await deps.commands.load_pipeline(state.pipeline_id)
        if not pipeline.live:
            raise NotFoundException("run not found")
        return await self._run_view(deps, state)

    @get("/{pipeline_id:str}/runs/{run_id:str}/events", summary="The run's event history, in order")
    async def run_events(
        self, request: Request[Principal, Any, State], pipeline_id: PathId, run_id: PathId
    ) -> list[EventRecordView]:
        deps: Deps = request.app.state.deps
        pipeline = await self._pipeline(deps, request.user, pipeline_id)
        state = await self._run(deps, request.user, pipeline.pipeline_id, run_id)
        store = deps.commands.store
        records = await store.read_stream(ev.run_stream(state.run_id)) + await store.read_stream(
            ev.run_log_stream(state.run_id)
        )
        records.sort(key=lambda r: r.position)
        return [
            EventRecordView(
                position=r.position,
                stream_id=r.stream_id,
                stream_version=r.stream_version,
                event_id=r.event_id,
                type=r.event_type,
                recorded_at=r.recorded_at.isoformat(),
                data=msgspec.Raw(r.data),
            )
            for r in records
        ]

    async def _act(
        self,
        request: Request[Principal, Any, State],
        pipeline_id: str,
        run_id: str,
        command: type[rn.Approve | rn.Reject | rn.Cancel | rn.Stop | rn.Pause | rn.Resume],
    ) -> Response[bytes]:
        deps: Deps = request.app.state.deps
        principal = request.user
        body: ActionBody = _decode_optional(await request.body(), ActionBody)

        async def run() -> Response[bytes]:
            pipeline = await self._pipeline(deps, principal, pipeline_id)
            state = await self._run(deps, principal, pipeline.pipeline_id, run_id)
            state, _ = await deps.commands.run_command(
                state.run_id,
                lambda at: command(by=principal.sub, reason=body.reason or body.comment, at=at),
                visible=lambda s: s.organization_id == principal.org,
            )
            return _json(200, await self._run_view(deps, state))

        return await _idempotent(request, principal, run)

    @post("/{pipeline_id:str}/runs/{run_id:str}/approve", guards=[admin], status_code=200, summary="Approve")
    async def approve(
        self, request: Request[Principal, Any, State], pipeline_id: PathId, run_id: PathId
    ) -> Response[bytes]:
        return await self._act(request, pipeline_id, run_id, rn.Approve)

    @post("/{pipeline_id:str}/runs/{run_id:str}/reject", guards=[admin], status_code=200, summary="Reject")
    async def reject(
        self, request: Request[Principal, Any, State], pipeline_id: PathId, run_id: PathId
    ) -> Response[bytes]:
        return await self._act(request, pipeline_id, run_id, rn.Reject)

    @post("/{pipeline_id:str}/runs/{run_id:str}/cancel", guards=[admin], status_code=200, summary="Cancel")
    async def cancel(
        self, request: Request[Principal, Any, State], pipeline_id: PathId, run_id: PathId
    ) -> Response[bytes]:
        return await self._act(request, pipeline_id, run_id, rn.Cancel)

    @post("/{pipeline_id:str}/runs/{run_id:str}/stop", guards=[admin], status_code=200, summary="Stop")
    async def stop(
        self, request: Request[Principal, Any, State], pipeline_id: PathId, run_id: PathId
    ) -> Response[bytes]:
        return await self._act(request, pipeline_id, run_id, rn.Stop)

    @post("/{pipeline_id:str}/runs/{run_id:str}/pause", guards=[admin], status_code=200, summary="Pause")
    async def pause(
        self, request: Request[Principal, Any, State], pipeline_id: PathId, run_id: PathId
    ) -> Response[bytes]:
        return await self._act(request, pipeline_id, run_id, rn.Pause)

    @post("/{pipeline_id:str}/runs/{run_id:str}/resume", guards=[admin], status_code=200, summary="Resume")
    async def resume(
        self, request: Request[Principal, Any, State], pipeline_id: PathId, run_id: PathId
    ) -> Response[bytes]:
        return await self._act(request, pipeline_id, run_id, rn.Resume)


# ---- health ----------------------------------------------------------------------------------

_requests: dict[tuple[str, int], int] = {}


@get("/healthz", include_in_schema=False)
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@get("/readyz", include_in_schema=False)
async def readyz(request: Request[Any, Any, State]) -> Response[Any]:
    deps: Deps = request.app.state.deps
    try:
        checks = await asyncio.wait_for(deps.ready(), timeout=3)
    except Exception:
        checks = {"checks": False}
    ok = all(checks.values())
    return Response(
        content={"status": "ready" if ok else "not ready", "checks": checks}, status_code=200 if ok else 503
    )


@get("/metrics", include_in_schema=False, media_type="text/plain; version=0.0.4")
async def metrics() -> str:
    lines = ["# TYPE pipelines_http_responses_total counter"]
    for (method, status), n in sorted(_requests.items()):
        lines.append(f'pipelines_http_responses_total{{method="{method}",status="{status}"}} {n}')
    return "\n".join(lines) + "\n"


async def _count(message: Any, scope: Any) -> None:
    if message["type"] == "http.response.start":
        key = (scope.get("method", ""), int(message["status"]))
        _requests[key] = _requests.get(key, 0) + 1


def create_app(build: Callable[[], Awaitable[Deps]]) -> Litestar:
    """`build` opens the resources (pool, NATS) inside the server's event loop, at startup."""

    @asynccontextmanager
    async def lifespan(app: Litestar) -> AsyncIterator[None]:
        deps = await build()
        app.state.deps = deps
        try:
            yield
        finally:
            await deps.close()

    app = Litestar(
        route_handlers=[
            PipelineController,
            SpecController,
            WebhookSettingsController,
            EnvironmentController,
            ComponentController,
            ChannelController,
            DeploymentController,
            receive_hook,
            spec_schema,
            healthz,
            readyz,
            metrics,
        ],
        middleware=[
            DefineMiddleware(
                JWTAuth,
                exclude=["^/healthz", "^/readyz", "^/metrics", "^/schema", f"^{API}/hooks", f"^{SPEC_SCHEMA_URL}"],
            )
        ],
        exception_handlers={Exception: handle},
        after_response=None,
        before_send=[_count],
        lifespan=[lifespan],
        openapi_config=OpenAPIConfig(
            title="Pipelines API",
            version="1.0.0",
            path="/schema",
            components=Components(
                security_schemes={"BearerToken": SecurityScheme(type="http", scheme="bearer", bearer_format="JWT")}
            ),
            security=[{"BearerToken": []}],
        ),
        state=State({}),
        debug=False,
    )
    return app
