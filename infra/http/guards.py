"""Who may call what: the bearer-token middleware and the one role guard."""

from __future__ import annotations

from typing import Any

from litestar.connection import ASGIConnection
from litestar.exceptions import NotAuthorizedException, PermissionDeniedException
from litestar.handlers.base import BaseRouteHandler
from litestar.middleware import AbstractAuthenticationMiddleware, AuthenticationResult
from litestar.types import Guard

from infra.auth import AuthError, Principal, verify_token
from infra.http.deps import Deps


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


def role(name: str) -> Guard:
    """A guard that lets through callers whose token grants `name` (403 otherwise)."""

    def guard(connection: ASGIConnection[Any, Any, Any, Any], _: BaseRouteHandler) -> None:
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
