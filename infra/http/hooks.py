"""Webhooks: a push-style delivery signed with HMAC-SHA256 (`X-Hub-Signature-256`) starts a run
of the pipeline when one of its `event` triggers accepts the event type and branch."""

from __future__ import annotations

import hashlib
import hmac
import uuid
from typing import TYPE_CHECKING, Annotated, Any

import msgspec
from litestar import Controller, Request, Response, delete, get, post, put
from litestar.connection import ASGIConnection
from litestar.datastructures import State
from litestar.exceptions import NotAuthorizedException, PermissionDeniedException
from litestar.handlers.base import BaseRouteHandler
from litestar.params import FromPath

from domain.errors import Invalid
from domain.triggers import branch_of, matching_event_trigger
from infra.auth import Principal
from infra.secrets import WebhookSecrets
from infra.store.records import WrongExpectedVersion
from projections.views import iso, run_view

if TYPE_CHECKING:
    from infra.http.app import Deps

HOOKS = "/api/v1/hooks"
# Run ids of deliveries derive from this namespace, so a redelivered webhook starts nothing new.
_DELIVERIES = uuid.UUID("5f0a3c1e-0f5e-4b7e-9a65-2b8c1d7e4a90")
_encoder = msgspec.json.Encoder()


def _admin(connection: ASGIConnection[Any, Any, Any, Any], _: BaseRouteHandler) -> None:
    if not connection.user.has("admin"):
        raise PermissionDeniedException("this action needs the admin role")


class WebhookSecretBody(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    secret: Annotated[str, msgspec.Meta(min_length=16, max_length=256)]


class WebhookView(msgspec.Struct, kw_only=True, rename="camel"):
    url: str
    configured: bool
    updated_at: str | None


def _webhooks(deps: Deps) -> WebhookSecrets:
    if deps.secrets is None:
        raise NotAuthorizedException("webhooks need the secrets key, which this server does not have")
    return WebhookSecrets(deps.secrets)


class WebhookSettingsController(Controller):
    """Setting the secret is an admin's; reading says only whether one is set."""

    path = "/api/v1/pipelines/{pipeline_id:str}/webhook"
    tags = ["triggers"]

    @get("/", summary="Whether the pipeline's webhook has a secret, and its URL (never the secret)")
    async def show(self, request: Request[Principal, Any, State], pipeline_id: FromPath[str]) -> WebhookView:
        from infra.http.app import load_visible_pipeline

        state = await load_visible_pipeline(request, pipeline_id)
        row = await _webhooks(request.app.state.deps).get(state.pipeline_id)
        return WebhookView(
            url=f"{HOOKS}/{state.pipeline_id}", configured=row is not None, updated_at=iso(row[1]) if row else None
        )

    @put("/", guards=[_admin], summary="Set the webhook secret (admin)")
    async def set_secret(
        self, request: Request[Principal, Any, State], pipeline_id: FromPath[str], data: WebhookSecretBody
    ) -> WebhookView:
        from infra.http.app import load_visible_pipeline

        state = await load_visible_pipeline(request, pipeline_id)
        webhooks = _webhooks(request.app.state.deps)
        await webhooks.set(state.pipeline_id, data.secret)
        row = await webhooks.get(state.pipeline_id)
        return WebhookView(url=f"{HOOKS}/{state.pipeline_id}", configured=True, updated_at=iso(row[1]) if row else None)

    @delete("/", guards=[_admin], summary="Remove the webhook secret (admin): deliveries are refused")
    async def remove(self, request: Request[Principal, Any, State], pipeline_id: FromPath[str]) -> None:
        from infra.http.app import load_visible_pipeline

        state = await load_visible_pipeline(request, pipeline_id)
        await _webhooks(request.app.state.deps).delete(state.pipeline_id)


def _unauthorized() -> NotAuthorizedException:
    # One answer for unknown pipelines, missing secrets and bad signatures: nothing to probe.
    return NotAuthorizedException("the X-Hub-Signature-256 signature does not verify for this pipeline")


@post(f"{HOOKS}/{{pipeline_id:str}}", summary="Receive a signed push-style webhook", tags=["triggers"], status_code=200)
async def receive_hook(request: Request[Any, Any, State], pipeline_id: FromPath[str]) -> Response[bytes]:
    deps: Deps = request.app.state.deps
    body = await request.body()
    signature = request.headers.get("x-hub-signature-256", "")
    try:
        pid = str(uuid.UUID(pipeline_id))
    except ValueError:
        raise _unauthorized() from None
    row = await WebhookSecrets(deps.secrets).get(pid) if deps.secrets is not None else None
    if row is None or not signature.startswith("sha256="):
        raise _unauthorized()
    expected = hmac.new(row[0].encode(), body, hashlib.sha256).hexdigest()
    if not hmac.compare_digest(expected, signature.removeprefix("sha256=")):
        raise _unauthorized()
    pipeline, _ = await deps.commands.load_pipeline(pid)
    if not pipeline.live:
        raise _unauthorized()
    try:
        payload = msgspec.json.decode(body) if body.strip() else {}
    except msgspec.DecodeError as exc:
        raise Invalid({"body": f"is not valid JSON: {exc}"}) from exc
    if not isinstance(payload, dict):
        raise Invalid({"body": "must be a JSON object"})
    event = request.headers.get("x-github-event") or request.headers.get("x-event-type") or "push"
    ref = payload.get("ref") if isinstance(payload.get("ref"), str) else None
    branch = branch_of(ref)
    index, reason = matching_event_trigger(pipeline.triggers, event, branch)
    if index < 0:
        return Response(
            content=_encoder.encode({"triggered": False, "reason": reason}),
            status_code=200,
            media_type="application/json",
        )
    delivery = request.headers.get("x-github-delivery") or request.headers.get("x-delivery-id")
    commit = payload.get("after") if isinstance(payload.get("after"), str) else None
    trigger = {"type": "event", "event": event, "ref": ref, "branch": branch, "commit": commit, "delivery": delivery}
    run_id = str(uuid.uuid5(_DELIVERIES, f"{pid}:{delivery}")) if delivery else None
    try:
        state, _ = await deps.commands.trigger(pipeline, by="webhook", run_id=run_id, trigger=trigger)
        status, duplicate = 201, False
    except WrongExpectedVersion:
        assert run_id is not None
        state, _ = await deps.commands.load_run(run_id)
        status, duplicate = 200, True
    out = {"triggered": True, "duplicate": duplicate, "run": run_view(state)}
    return Response(content=_encoder.encode(out), status_code=status, media_type="application/json")
