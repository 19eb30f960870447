"""Runs: trigger one, read them (list, one, its event history) and act on one (approve ... stop)."""

from __future__ import annotations

import asyncio
import re
from typing import Annotated, Any

import msgspec
from litestar import Controller, Request, Response, get, post
from litestar.datastructures import State
from litestar.exceptions import NotFoundException
from litestar.handlers import HTTPRouteHandler
from litestar.params import FromPath, FromQuery, Parameter

from domain import events as ev
from domain import run as rn
from domain.errors import Invalid
from domain.run.state import RunStatus
from infra import trace
from infra.auth import Principal
from infra.http.deps import API, MAX_PAGE, Deps, deps_of, uuid_or_404, visible_pipeline, visible_run
from infra.http.guards import admin, member, viewer
from infra.http.keyed import idempotent, keyed_id
from infra.http.responses import decode_json, json_response
from infra.http.views import RunPage
from infra.store.records import WrongExpectedVersion
from projections.run_reports import RunComparison, RunStats, compare_runs
from projections.views import RunView, run_view

PathId = FromPath[str]
# Offsets past this are refused (400 naming `skip`).
MAX_SKIP = 100_000_000
_VAR_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")


class TriggerBody(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    variables: dict[str, str] | None = None
    secrets: dict[str, str] | None = None


class ActionBody(msgspec.Struct, forbid_unknown_fields=True, kw_only=True):
    reason: Annotated[str, msgspec.Meta(max_length=2000)] | None = None
    comment: Annotated[str, msgspec.Meta(max_length=2000)] | None = None


class EventRecordView(msgspec.Struct, kw_only=True, rename="camel"):
    position: int
    stream_id: str
    stream_version: int
    event_id: str
    type: str
    recorded_at: str
    data: msgspec.Raw


def _check_variables(variables: dict[str, str] | None, field: str, *, max_entries: int = 200) -> dict[str, str]:
    """Names like environment variables; values at most 32 KiB, without NUL (they become
    environment variables of scripts). Messages never quote a value: it may be a secret."""
    errors: dict[str, str] = {}
    variables = variables or {}
    if len(variables) > max_entries:
        errors[field] = f"has {len(variables)} entries; at most {max_entries}" + (
            " (PIPELINES_MAX_VARIABLES)" if field == "variables" else ""
        )
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


async def _run_view(deps: Deps, state: rn.RunState) -> RunView:
    return run_view(state, await deps.commands.load_logs(state.run_id))


class RunController(Controller):
    path = f"{API}/pipelines"
    guards = [viewer]
    tags = ["pipelines"]

    @post("/{pipeline_id:str}/trigger", guards=[member], summary="Trigger a run", status_code=201)
    async def trigger(self, request: Request[Principal, Any, State], pipeline_id: PathId) -> Response[bytes]:
        """Secret values are stored encrypted (SecretStore) under the new run's id before the run is
        appended, so the executor never sees a run whose secrets are not there yet; if the append
        fails they are deleted again, and if this process dies in between, `SecretStore.purge`
        removes them later (their run never existed). The run, its events and every response
        carry only the names. With an Idempotency-Key, the stored request hash is an HMAC under
        the secrets key rather than a plain SHA-256 of the body (which a dictionary attack on a
        short secret could invert)."""
        deps = deps_of(request)
        principal = request.user
        raw = await request.body()
        body: TriggerBody = decode_json(raw, TriggerBody, optional=True)
        variables = _check_variables(body.variables, "variables", max_entries=deps.settings.max_variables)
        secrets = _check_variables(body.secrets, "secrets", max_entries=100)
        if clash := sorted(set(variables) & set(secrets)):
            raise Invalid({f"secrets.{name}": "is also a variable: a name is a variable or a secret" for name in clash})
        store = deps.secrets
        if secrets and store is None:
            raise Invalid({"secrets": "run secrets are not configured on this server"})

        async def run() -> Response[bytes]:
            pipeline = await visible_pipeline(deps, principal, pipeline_id)
            run_id = keyed_id(request, principal) or deps.commands.new_id()
            trace.mark("trigger", run_id)  # the pipeline read, the request checked
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
            return json_response(201, run_view(state))

        digest = store.request_digest(raw) if secrets and store is not None else None
        return await idempotent(request, principal, run, digest=digest)

    @get(
        "/{pipeline_id:str}/runs",
        summary="Runs, newest first: the last 50 as an array, or with skip/take (or page/limit) a page {data, total}",
    )
    async def list_runs(
        self,
        request: Request[Principal, Any, State],
        pipeline_id: PathId,
        skip: Annotated[int | None, Parameter(ge=0, le=MAX_SKIP)] = None,
        take: Annotated[int | None, Parameter(ge=1, le=100)] = None,
        page: Annotated[int | None, Parameter(ge=1, le=MAX_PAGE)] = None,
        limit: Annotated[int | None, Parameter(ge=1, le=100)] = None,
        status: Annotated[RunStatus | None, Parameter()] = None,
    ) -> list[RunView] | RunPage:
        deps = deps_of(request)
        pipeline = await visible_pipeline(deps, request.user, pipeline_id)
        pid = pipeline.pipeline_id
        if skip is None and take is None and page is None and limit is None:
            # The reference's shape: the last 50 (filtered by `status` when given).
            return await deps.read_models.list_runs(pid, status=status)
        if skip is not None or take is not None:
            size = take or 20
            offset = skip or 0
        else:
            size = limit or 20
            offset = ((page or 1) - 1) * size
        data = await deps.read_models.list_runs(pid, limit=size, offset=offset, status=status)
        return RunPage(data=data, total=await deps.read_models.count_runs(pid, status))

    @get("/{pipeline_id:str}/runs/stats", summary="The pipeline's run statistics")
    async def run_stats(self, request: Request[Principal, Any, State], pipeline_id: PathId) -> RunStats:
        deps = deps_of(request)
        pipeline = await visible_pipeline(deps, request.user, pipeline_id)
        return await deps.read_models.run_stats(pipeline.pipeline_id)

    @get("/{pipeline_id:str}/runs/compare", summary="Two runs of the pipeline compared stage by stage")
    async def compare_runs(
        self, request: Request[Principal, Any, State], pipeline_id: PathId, a: FromQuery[str], b: FromQuery[str]
    ) -> RunComparison:
        deps = deps_of(request)
        pipeline = await visible_pipeline(deps, request.user, pipeline_id)
        ids = {name: uuid_or_404(value, f"run {name}") for name, value in (("a", a), ("b", b))}
        found = await deps.read_models.runs_by_id(pipeline.pipeline_id, list(ids.values()))
        for name, run_id in ids.items():
            if run_id not in found:
                raise NotFoundException(f"run {name} not found in this pipeline")
        return compare_runs(found[ids["a"]], found[ids["b"]])

    @get("/{pipeline_id:str}/runs/{run_id:str}", summary="Get a run with its logs and stage results")
    async def get_run(self, request: Request[Principal, Any, State], pipeline_id: PathId, run_id: PathId) -> RunView:
        deps = deps_of(request)
        pipeline = await visible_pipeline(deps, request.user, pipeline_id)
        state = await visible_run(deps, request.user, pipeline.pipeline_id, run_id)
        return await _run_view(deps, state)

    @get("/runs/{run_id:str}", summary="Get a run by id")
    async def get_run_by_id(self, request: Request[Principal, Any, State], run_id: PathId) -> RunView:
        deps = deps_of(request)
        state = await visible_run(deps, request.user, None, run_id)
        pipeline, _ = await deps.commands.load_pipeline(state.pipeline_id)
        if not pipeline.live:
            raise NotFoundException("run not found")
        return await _run_view(deps, state)

    @get("/{pipeline_id:str}/runs/{run_id:str}/events", summary="The run's event history, in order")
    async def run_events(
        self, request: Request[Principal, Any, State], pipeline_id: PathId, run_id: PathId
    ) -> list[EventRecordView]:
        deps = deps_of(request)
        pipeline = await visible_pipeline(deps, request.user, pipeline_id)
        state = await visible_run(deps, request.user, pipeline.pipeline_id, run_id)
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


# ---- run actions -----------------------------------------------------------------------------

Action = type[rn.Approve | rn.Reject | rn.Cancel | rn.Stop | rn.Pause | rn.Resume]
# The run actions: one admin-only POST handler each, made from this table.
ACTIONS: dict[str, Action] = {
    "approve": rn.Approve,
    "reject": rn.Reject,
    "cancel": rn.Cancel,
    "stop": rn.Stop,
    "pause": rn.Pause,
    "resume": rn.Resume,
}


async def act(
    request: Request[Principal, Any, State], pipeline_id: str, run_id: str, command: Action
) -> Response[bytes]:
    deps = deps_of(request)
    principal = request.user
    body: ActionBody = decode_json(await request.body(), ActionBody, optional=True)

    async def run() -> Response[bytes]:
        pipeline = await visible_pipeline(deps, principal, pipeline_id)
        state = await visible_run(deps, principal, pipeline.pipeline_id, run_id)
        state, _ = await deps.commands.run_command(
            state.run_id,
            lambda at: command(by=principal.sub, reason=body.reason or body.comment, at=at),
            visible=lambda s: s.organization_id == principal.org,
        )
        return json_response(200, await _run_view(deps, state))

    return await idempotent(request, principal, run)


def _action_handler(name: str, command: Action) -> HTTPRouteHandler:
    async def handler(request: Request[Principal, Any, State], pipeline_id: PathId, run_id: PathId) -> Response[bytes]:
        return await act(request, pipeline_id, run_id, command)

    # The OpenAPI operationId is made from the function's name.
    handler.__name__ = handler.__qualname__ = name
    return post(
        f"{API}/pipelines/{{pipeline_id:str}}/runs/{{run_id:str}}/{name}",
        guards=[viewer, admin],
        tags=["pipelines"],
        status_code=200,
        summary=name.capitalize(),
    )(handler)


run_actions = [_action_handler(name, command) for name, command in ACTIONS.items()]
