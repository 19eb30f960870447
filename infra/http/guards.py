"""Who may call what: the bearer-token middleware and the one role guard."""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

from litestar.connection import ASGIConnection
from litestar.exceptions import HTTPException, NotAuthorizedException, PermissionDeniedException
from litestar.handlers.base import BaseRouteHandler
from litestar.middleware import AbstractAuthenticationMiddleware, AuthenticationResult
from litestar.types import Guard

from infra.auth import AuthError, OrganizationRefused, Principal, verify_token
from infra.http.deps import Deps

COOKIE = "access_token"
_SAFE = frozenset({"GET", "HEAD", "OPTIONS"})


class JWTAuth(AbstractAuthenticationMiddleware):
    """The token from `Authorization: Bearer`, else from the httpOnly `access_token` cookie of a
    browser session; `X-Organization-Id` picks one of the organizations the token grants."""

    async def authenticate_request(self, connection: ASGIConnection[Any, Any, Any, Any]) -> AuthenticationResult:
        deps: Deps = connection.app.state.deps
        header = connection.headers.get("authorization", "")
        scheme, _, token = header.partition(" ")
        token = token.strip()
        from_cookie = False
        if scheme.lower() != "bearer" or not token:
            token = connection.cookies.get(COOKIE, "").strip()
            from_cookie = True
            if header or not token:
                raise NotAuthorizedException(
                    "missing bearer token in the Authorization header (or an access_token cookie)"
                )
        try:
            principal = verify_token(deps.settings, token)
        except AuthError as exc:
            raise NotAuthorizedException(f"invalid token: {exc}") from exc
        if from_cookie and connection.scope.get("method", "GET") not in _SAFE:
            check_same_site(connection, deps.settings.cors_origins)
        try:
            principal = principal.acting_in(connection.headers.get("x-organization-id") or None)
        except OrganizationRefused as exc:
            raise PermissionDeniedException(str(exc)) from exc
        if principal.org is None and principal.orgs:
            raise HTTPException(
                status_code=400, detail="X-Organization-Id is required: the token grants several organizations"
            )
        return AuthenticationResult(user=principal, auth=token)


def check_same_site(connection: ASGIConnection[Any, Any, Any, Any], allowed: tuple[str, ...]) -> None:
    """CSRF: a browser sends the cookie with any site's form; a write made with the cookie must
    come from this site or an allowed origin (Origin or Referer), or carry X-Requested-With
    (which no cross-site form can set, and which a cross-site script may send only after a CORS
    preflight the allowed origins pass)."""
    if connection.headers.get("x-requested-with"):
        return
    origin = connection.headers.get("origin") or _origin_of(connection.headers.get("referer", ""))
    if origin and origin != "null":
        host = connection.headers.get("host", "")
        if origin in allowed or urlsplit(origin).netloc == host:
            return
    raise PermissionDeniedException(
        "a write authenticated by the access_token cookie needs an Origin of this site or an allowed one "
        "(PIPELINES_CORS_ORIGINS), or an X-Requested-With header"
    )


def _origin_of(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}" if parts.scheme and parts.netloc else ""


def role(name: str) -> Guard:
    """A guard that lets through callers whose token grants `name` (403 otherwise)."""

    # Async although it awaits nothing: litestar runs a sync guard through a thread pool
    # (`AsyncCallable`, anyio's `to_thread`), a thread hop per guard per request that the
    # profile of issue 17 found in 12-31% of the API's samples.
    async def guard(connection: ASGIConnection[Any, Any, Any, Any], _: BaseRouteHandler) -> None:
        # OPTIONS (CORS preflights, allowed-methods probes) carries no token and reads nothing.
        if connection.scope.get("method") == "OPTIONS":
            return
        principal: Principal = connection.user
        if not principal.has(name):
            raise PermissionDeniedException(f"this action needs the {name} role")

    return guard


viewer = role("viewer")
member = role("member")
admin = role("admin")
