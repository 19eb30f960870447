"""Runs a POST command once per `Idempotency-Key` and answers retries with the stored response."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from litestar import Request, Response
from litestar.datastructures import State

from infra.app.positions import written
from infra.auth import Principal
from infra.http.consistency import POSITION_HEADER
from infra.http.deps import deps_of
from infra.http.errors import error_response, handle
from infra.http.idempotency import InFlight, KeyReuse, derived_id, request_hash


async def idempotent(
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
    deps = deps_of(request)
    scope = _scope(request, principal)
    digest = digest or request_hash(await request.body())
    try:
        stored = await deps.idempotency.begin(scope, key, digest)
    except (KeyReuse, InFlight) as exc:
        return error_response(409, str(exc))
    if stored is not None:
        # The headers a client relies on, as the first answer carried them: a replay writes
        # nothing, so the read-your-writes middleware has no position of its own to add.
        headers = {POSITION_HEADER: str(stored.position)} if stored.position else None
        return Response(
            content=stored.body, status_code=stored.status_code, media_type="application/json", headers=headers
        )
    try:
        async with deps.idempotency.held(scope, key):
            response = await run()
    except BaseException as exc:
        # Client errors are answers too: store them. Anything else may succeed on a retry.
        status = _status_of(request, exc)
        if status is not None and 400 <= status < 500:
            assert isinstance(exc, Exception)
            er = handle(request, exc)
            await deps.idempotency.finish(scope, key, er.status_code or 500, er.content, written() or None)
        else:
            await deps.idempotency.abandon(scope, key)
        raise
    await deps.idempotency.finish(scope, key, response.status_code or 200, response.content, written() or None)
    return response


def _scope(request: Request[Principal, Any, State], principal: Principal) -> str:
    return f"{principal.org or '_'}|{principal.sub}|{request.method}|{request.url.path}"


def keyed_id(request: Request[Principal, Any, State], principal: Principal) -> str | None:
    """With an Idempotency-Key, the id of what the command creates (stable across retries)."""
    key = request.headers.get("idempotency-key")
    return derived_id(_scope(request, principal), key) if key else None


def _status_of(request: Request[Any, Any, Any], exc: BaseException) -> int | None:
    if not isinstance(exc, Exception):
        return None
    return handle(request, exc).status_code
