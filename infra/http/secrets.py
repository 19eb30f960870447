"""Stored secrets of the token's organization (and of its pipelines): admins set and delete them,
viewers read their names and metadata; a value is never returned."""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

import msgspec
from litestar import Controller, Request, Response, delete, get, put
from litestar.datastructures import State
from litestar.exceptions import NotFoundException
from litestar.params import FromPath, FromQuery, JSONBody

from domain.errors import Invalid
from infra.auth import Principal
from infra.http.deps import API, deps_of, visible_pipeline
from infra.http.guards import admin, viewer
from infra.http.responses import json_response
from infra.stored_secrets import StoredSecretInfo, StoredSecrets
from projections.views import iso

_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,127}$")
MAX_VALUE_BYTES = 32 * 1024


class SecretBody(msgspec.Struct, kw_only=True, forbid_unknown_fields=True):
    """The value; it becomes an environment variable of the runs' scripts (no NUL, 32 KiB at most)."""

    value: Annotated[str, msgspec.Meta(max_length=MAX_VALUE_BYTES)]


class SecretView(msgspec.Struct, kw_only=True, rename="camel"):
    name: str
    scope: Literal["organization", "pipeline"]
    pipeline_id: str | None
    created_by: str
    created_at: str
    updated_by: str
    updated_at: str


def _view(info: StoredSecretInfo) -> SecretView:
    return SecretView(
        name=info.name,
        scope=info.scope,
        pipeline_id=info.pipeline_id,
        created_by=info.created_by,
        created_at=iso(info.created_at) or "",
        updated_by=info.updated_by,
        updated_at=iso(info.updated_at) or "",
    )


def _store(request: Request[Principal, Any, State]) -> StoredSecrets:
    sealer = deps_of(request).secrets
    if sealer is None:
        raise Invalid({"secrets": "stored secrets are not configured on this server (no secrets key)"})
    return StoredSecrets(sealer)


def _name(name: str) -> str:
    if not _NAME.match(name):
        raise Invalid({"name": "names are letters, digits and underscores, not starting with a digit (at most 128)"})
    return name


async def _pipeline(request: Request[Principal, Any, State], pipeline_id: str | None) -> str | None:
    """The pipeline's id, when it is one of the caller's organization (else 404, as for any
    pipeline of another organization); None for the organization's own secrets."""
    if pipeline_id is None:
        return None
    return (await visible_pipeline(deps_of(request), request.user, pipeline_id)).pipeline_id


class SecretController(Controller):
    path = f"{API}/secrets"
    guards = [viewer]
    tags = ["secrets"]

    @get("/", summary="The organization's stored secrets (names and metadata, never values)")
    async def list_secrets(
        self, request: Request[Principal, Any, State], pipelineId: FromQuery[str | None] = None
    ) -> list[SecretView]:
        """All of the organization's secrets, or with `pipelineId` only that pipeline's own."""
        pid = await _pipeline(request, pipelineId)
        return [_view(info) for info in await _store(request).list(request.user.org, pid)]

    @get("/{name:str}", summary="A stored secret's metadata (never its value)")
    async def get_secret(
        self, request: Request[Principal, Any, State], name: FromPath[str], pipelineId: FromQuery[str | None] = None
    ) -> SecretView:
        pid = await _pipeline(request, pipelineId)
        info = await _store(request).info(request.user.org, pid, _name(name))
        if info is None:
            raise NotFoundException("secret not found")
        return _view(info)

    @put(
        "/{name:str}",
        guards=[admin],
        summary="Set a secret of the organization, or with pipelineId of one pipeline (admin)",
        status_code=200,
    )
    async def set_secret(
        self,
        request: Request[Principal, Any, State],
        name: FromPath[str],
        data: JSONBody[SecretBody],
        pipelineId: FromQuery[str | None] = None,
    ) -> Response[bytes]:
        """201 when created, 200 when replaced. Runs of the organization (or of that pipeline)
        get it as `${{ secrets.NAME }}` and as an environment variable, masked in logs; a
        pipeline's secret wins over the organization's, a trigger's own over both."""
        _name(name)
        if "\0" in data.value or len(data.value.encode()) > MAX_VALUE_BYTES:
            raise Invalid({"value": f"must be at most {MAX_VALUE_BYTES // 1024} KiB, without NUL characters"})
        pid = await _pipeline(request, pipelineId)
        info, created = await _store(request).put(request.user.org, pid, name, data.value, by=request.user.sub)
        return json_response(201 if created else 200, _view(info))

    @delete("/{name:str}", guards=[admin], summary="Delete a stored secret (admin)")
    async def delete_secret(
        self, request: Request[Principal, Any, State], name: FromPath[str], pipelineId: FromQuery[str | None] = None
    ) -> None:
        pid = await _pipeline(request, pipelineId)
        if not await _store(request).delete(request.user.org, pid, _name(name)):
            raise NotFoundException("secret not found")
