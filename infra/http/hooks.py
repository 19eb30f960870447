"""Webhooks: a push-style delivery signed with HMAC-SHA256 (`X-Hub-Signature-256`) starts a run
of the pipeline when one of its `event` triggers accepts the event type and branch."""

from __future__ import annotations

import hashlib
import hmac
import uuid
from typing import Annotated, Any
from urllib.parse import parse_qs

import msgspec
from litestar import Controller, Request, Response, delete, get, post, put
from litestar.datastructures import State
from litestar.exceptions import NotAuthorizedException
from litestar.params import FromPath, JSONBody

from domain.errors import Invalid
from domain.triggers import branch_of, matching_event_trigger
from infra.auth import Principal
from infra.http.deps import API, Deps, deps_of, load_visible_pipeline
from infra.http.guards import admin, viewer
from infra.http.inputs import bad_text, json_depth
from infra.http.responses import json_response
from infra.secrets import WebhookSecrets
from infra.store.records import WrongExpectedVersion
from projections.views import iso, run_view

HOOKS = f"{API}/hooks"
# Run ids of deliveries derive from this namespace, so a redelivered webhook starts nothing new.
_DELIVERIES = uuid.UUID("5f0a3c1e-0f5e-4b7e-9a65-2b8c1d7e4a90")
# GitHub's payloads nest a few levels; far deeper is an attack on the decoder.
_MAX_DEPTH = 64
# GitHub's `after` of a deleted branch or tag.
_NO_COMMIT = "0" * 40


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

    path = f"{API}/pipelines/{{pipeline_id:str}}/webhook"
    tags = ["triggers"]

    @get("/", guards=[viewer], summary="Whether the pipeline's webhook has a secret, and its URL (never the secret)")
    async def show(self, request: Request[Principal, Any, State], pipeline_id: FromPath[str]) -> WebhookView:
        state = await load_visible_pipeline(request, pipeline_id)
        row = await _webhooks(request.app.state.deps).get(state.pipeline_id)
        return WebhookView(
            url=f"{HOOKS}/{state.pipeline_id}", configured=row is not None, updated_at=iso(row[1]) if row else None
        )

    @put("/", guards=[admin], summary="Set the webhook secret (admin)")
    async def set_secret(
        self, request: Request[Principal, Any, State], pipeline_id: FromPath[str], data: JSONBody[WebhookSecretBody]
    ) -> WebhookView:
        state = await load_visible_pipeline(request, pipeline_id)
        webhooks = _webhooks(request.app.state.deps)
        await webhooks.set(state.pipeline_id, data.secret)
        row = await webhooks.get(state.pipeline_id)
        return WebhookView(url=f"{HOOKS}/{state.pipeline_id}", configured=True, updated_at=iso(row[1]) if row else None)

    @delete("/", guards=[admin], summary="Remove the webhook secret (admin): deliveries are refused")
    async def remove(self, request: Request[Principal, Any, State], pipeline_id: FromPath[str]) -> None:
        state = await load_visible_pipeline(request, pipeline_id)
        await _webhooks(request.app.state.deps).delete(state.pipeline_id)


def _payload(body: bytes, content_type: str) -> dict[str, Any]:
    """The delivery's JSON: the body, or its `payload` field when form-encoded (GitHub's default)."""
    if content_type.split(";")[0].strip().lower() == "application/x-www-form-urlencoded":
        fields = parse_qs(body.decode("utf-8", "replace"), keep_blank_values=True)
        if len(fields.get("payload", [])) != 1:
            raise Invalid({"payload": "a form-encoded delivery carries its JSON in one `payload` field"})
        raw = fields["payload"][0].encode()
        where = "payload"
    else:
        raw, where = body, "body"
    if json_depth(raw, _MAX_DEPTH):
        raise Invalid({where: f"is nested deeper than {_MAX_DEPTH} levels"})
    try:
        payload = msgspec.json.decode(raw) if raw.strip() else {}
    except msgspec.DecodeError as exc:
        raise Invalid({where: f"is not valid JSON: {exc}"}) from exc
    if not isinstance(payload, dict):
        raise Invalid({where: "must be a JSON object"})
    if where == "payload" and (found := bad_text(payload, where)) is not None:
        raise Invalid(dict([found]))
    return payload


def _pusher(payload: dict[str, Any]) -> str | None:
    """Who pushed: `pusher.name` (push events), else the `sender.login` of any event."""
    for outer, inner in (("pusher", "name"), ("sender", "login")):
        value = payload.get(outer)
        if isinstance(value, dict) and isinstance(value.get(inner), str) and value[inner]:
            return str(value[inner])
    return None


def _unauthorized() -> NotAuthorizedException:
    # One answer for unknown pipelines, missing secrets and bad signatures: nothing to probe.
    return NotAuthorizedException("the X-Hub-Signature-256 signature does not verify for this pipeline")


@post(f"{HOOKS}/{{pipeline_id:str}}", summary="Receive a signed push-style webhook", tags=["triggers"], status_code=200)
async def receive_hook(request: Request[Any, Any, State], pipeline_id: FromPath[str]) -> Response[bytes]:
    deps = deps_of(request)
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
    payload = _payload(body, request.headers.get("content-type", ""))
    event = request.headers.get("x-github-event") or request.headers.get("x-event-type") or "push"
    if event == "ping":
        return json_response(200, {"triggered": False, "reason": "ping: the webhook is set up"})
    ref = payload.get("ref") if isinstance(payload.get("ref"), str) else None
    commit = payload.get("after") if isinstance(payload.get("after"), str) else None
    if payload.get("deleted") is True or commit == _NO_COMMIT:
        # A branch or tag deletion: there is nothing to build.
        return json_response(200, {"triggered": False, "reason": f"{ref or 'the ref'} was deleted: nothing to run"})
    branch = branch_of(ref)
    index, reason = matching_event_trigger(pipeline.triggers, event, branch)
    if index < 0:
        return json_response(200, {"triggered": False, "reason": reason})
    delivery = request.headers.get("x-github-delivery") or request.headers.get("x-delivery-id")
    trigger = {
        "type": "event",
        "event": event,
        "ref": ref,
        "branch": branch,
        "commit": commit,
        "delivery": delivery,
        "pusher": _pusher(payload),
    }
    run_id = str(uuid.uuid5(_DELIVERIES, f"{pid}:{delivery}")) if delivery else None
    try:
        state, _ = await deps.commands.trigger(pipeline, by="webhook", run_id=run_id, trigger=trigger)
        status, duplicate = 201, False
    except WrongExpectedVersion:
        assert run_id is not None
        state, _ = await deps.commands.load_run(run_id)
        status, duplicate = 200, True
    out = {"triggered": True, "duplicate": duplicate, "run": run_view(state)}
    return json_response(status, out)
