"""`GET /api/v1/info`: where this installation's gateway is, and who the caller is (for clients such as the CLI)."""

from __future__ import annotations

from typing import Any

import msgspec
from litestar import Request, get
from litestar.datastructures import State

from infra.auth import Principal
from infra.http.deps import API, deps_of


class InfoView(msgspec.Struct, kw_only=True, rename="camel"):
    gateway_url: str
    subject: str
    organization: str | None
    roles: list[str]


@get(f"{API}/info", summary="The gateway's WebSocket URL and the caller's identity (any valid token)", tags=["info"])
async def info(request: Request[Principal, Any, State]) -> InfoView:
    principal = request.user
    return InfoView(
        gateway_url=deps_of(request).settings.gateway_url,
        subject=principal.sub,
        organization=principal.org,
        roles=sorted(principal.roles),
    )
