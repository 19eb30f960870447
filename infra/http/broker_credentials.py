"""`/api/v1/broker-credentials`: an admin issues and revokes read-only broker credentials for the
token's organization (downstream systems subscribe to its events, logs and notifications)."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import msgspec
from litestar import Controller, Request, Response, delete, post
from litestar.datastructures import State
from litestar.exceptions import NotFoundException, ServiceUnavailableException
from litestar.params import FromPath
from nats.errors import NoRespondersError
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.errors import ServiceUnavailableError

from domain.errors import Invalid
from infra.auth import Principal
from infra.broker.bus import ensure_events_stream
from infra.broker.credentials import BrokerCredentialStore
from infra.broker.permissions import org_consumer, org_subjects
from infra.http.deps import API, deps_of
from infra.http.guards import admin
from infra.http.responses import json_response
from infra.store.postgres import PostgresEventStore

# At most a year; at least a minute.
_TTL = (60, 365 * 24 * 3600)
# While NATS reloads its accounts (each issue and revocation), its JetStream API does not answer for a
# few milliseconds ("no responders"): an issue right after another one is retried for this long.
_RELOAD_GRACE = 2.0

T = TypeVar("T")


async def _through_reloads(request: Callable[[], Awaitable[T]]) -> T:
    deadline = asyncio.get_running_loop().time() + _RELOAD_GRACE
    while True:
        try:
            return await request()
        except (NoRespondersError, ServiceUnavailableError):
            if asyncio.get_running_loop().time() > deadline:
                raise
            await asyncio.sleep(0.05)


def _store(request: Request[Any, Any, State]) -> BrokerCredentialStore:
    store = deps_of(request).commands.store
    assert isinstance(store, PostgresEventStore), "broker credentials need the PostgreSQL store"
    return BrokerCredentialStore(store.pool)


def _ttl(raw: bytes) -> int | None:
    """The body's `ttlSeconds` (optional; no body: credentials that do not expire)."""
    try:
        body = msgspec.json.decode(raw) if raw.strip() else {}
    except msgspec.DecodeError as exc:
        raise Invalid({"body": f"is not valid JSON: {exc}"}) from exc
    if not isinstance(body, dict):
        raise Invalid({"body": "must be a JSON object"})
    errors = {key: "unknown field" for key in body if key != "ttlSeconds"}
    ttl = body.get("ttlSeconds")
    if ttl is not None and (isinstance(ttl, bool) or not isinstance(ttl, int) or not _TTL[0] <= ttl <= _TTL[1]):
        errors["ttlSeconds"] = f"must be an integer number of seconds from {_TTL[0]} to {_TTL[1]}"
    if errors:
        raise Invalid(errors)
    return ttl if isinstance(ttl, int) else None


class BrokerCredentialsController(Controller):
    path = f"{API}/broker-credentials"
    tags = ["broker"]

    @post("/", guards=[admin], summary="Issue read-only broker credentials for the organization (admin)")
    async def issue(self, request: Request[Principal, Any, State]) -> Response[bytes]:
        ttl = _ttl(await request.body())
        deps = deps_of(request)
        if deps.nc is None:
            raise ServiceUnavailableException("the API has no broker connection")
        store = _store(request)
        issued = await store.issue(
            org=request.user.org, by=request.user.sub, stream=deps.settings.events_stream, ttl_seconds=ttl
        )
        # The credential's one durable pull consumer, created here: the credential itself may not
        # create consumers (a push consumer's deliver subject is not checked against its permissions).
        events, _, _ = org_subjects(issued.org or "")
        name = org_consumer(issued.user)
        try:
            nc = deps.nc
            replicas = deps.settings.events_stream_replicas
            await _through_reloads(lambda: ensure_events_stream(nc, issued.stream, replicas))
            config = ConsumerConfig(
                name=name,
                durable_name=name,
                filter_subject=events,
                ack_policy=AckPolicy.EXPLICIT,
                deliver_policy=DeliverPolicy.ALL,
            )
            await _through_reloads(lambda: nc.jetstream().add_consumer(issued.stream, config))
        except Exception:
            await store.revoke(org=issued.org, credential_id=issued.id)  # nothing half-done
            raise
        return json_response(201, issued.view(deps.settings.public_broker_urls))

    @delete("/{credential_id:str}", guards=[admin], summary="Revoke broker credentials (admin)")
    async def revoke(self, request: Request[Principal, Any, State], credential_id: FromPath[str]) -> None:
        if not await _store(request).revoke(org=request.user.org, credential_id=credential_id):
            raise NotFoundException("broker credentials not found")
        nc = deps_of(request).nc
        if nc is not None:
            # The user is gone already; its consumer's stored position goes too (best effort).
            with contextlib.suppress(Exception):
                await nc.jetstream().delete_consumer(
                    deps_of(request).settings.events_stream, org_consumer(credential_id)
                )
