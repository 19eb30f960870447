"""`/api/v1/agents`: an admin issues agent credentials (an agent runs the units the executor hands
it on another host: docs/scaling.md), lists them and revokes them. An agent belongs to the
organization of the admin who issued it and runs only its units; one issued with a token of no
organization is shared (runs every organization's): docs/security.md."""

from __future__ import annotations

from typing import Any

import msgspec
from litestar import Controller, Request, Response, delete, get, post
from litestar.datastructures import State
from litestar.exceptions import NotFoundException
from litestar.params import FromPath

from domain.errors import Invalid
from domain.stages import validate_runs_on
from infra.agent.registry import AgentStore
from infra.auth import Principal
from infra.http.deps import API, deps_of
from infra.http.guards import admin
from infra.http.responses import json_response
from infra.store.postgres import PostgresEventStore

MAX_CAPACITY = 256
_FIELDS = {"name", "labels", "capacity"}


def _store(request: Request[Any, Any, State]) -> AgentStore:
    store = deps_of(request).commands.store
    assert isinstance(store, PostgresEventStore), "agents need the PostgreSQL store"
    return AgentStore(store.pool)


def _body(raw: bytes) -> tuple[str | None, tuple[str, ...], int]:
    """(name, labels, capacity) of the body `{"name"?, "labels"?, "capacity"?}`; Invalid (400) names
    every problem."""
    try:
        body = msgspec.json.decode(raw) if raw.strip() else {}
    except msgspec.DecodeError as exc:
        raise Invalid({"body": f"is not valid JSON: {exc}"}) from exc
    if not isinstance(body, dict):
        raise Invalid({"body": "must be a JSON object"})
    errors = {key: "unknown field" for key in body if key not in _FIELDS}
    name = body.get("name")
    if name is not None and (not isinstance(name, str) or not 1 <= len(name) <= 100):
        errors["name"] = "must be a string of 1-100 characters"
    labels = body.get("labels", [])
    if labels != []:
        errors.update(validate_runs_on(labels, "labels"))
    capacity = body.get("capacity", 1)
    if isinstance(capacity, bool) or not isinstance(capacity, int) or not 1 <= capacity <= MAX_CAPACITY:
        errors["capacity"] = f"must be an integer from 1 to {MAX_CAPACITY} (units it runs at once)"
    if errors:
        raise Invalid(errors)
    found = tuple(sorted(set(labels if isinstance(labels, list) else [labels])))
    return name, found, capacity


class AgentsController(Controller):
    path = f"{API}/agents"
    tags = ["agents"]

    @post("/", guards=[admin], summary="Issue an agent's credentials (admin)")
    async def issue(self, request: Request[Principal, Any, State]) -> Response[bytes]:
        name, labels, capacity = _body(await request.body())
        issued = await _store(request).issue(
            org=request.user.org, by=request.user.sub, name=name, labels=labels, capacity=capacity
        )
        return json_response(201, issued.view(deps_of(request).settings.public_broker_urls))

    @get("/", guards=[admin], summary="The agents the organization's runs may use (admin)")
    async def list_agents(self, request: Request[Principal, Any, State]) -> Response[bytes]:
        agents = await _store(request).list(org=request.user.org)
        return json_response(200, [a.view() for a in agents])

    @delete("/{agent_id:str}", guards=[admin], summary="Revoke an agent's credentials (admin)")
    async def revoke(self, request: Request[Principal, Any, State], agent_id: FromPath[str]) -> None:
        if not await _store(request).revoke(org=request.user.org, agent_id=agent_id):
            raise NotFoundException("agent not found")
