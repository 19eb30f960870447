"""JWT bearer tokens: verification with the configured algorithm, and dev tokens for the CLI."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace

import jwt

from infra.config import Settings

ROLES = ("admin", "member", "viewer")


class AuthError(Exception):
    """The token is missing, malformed, expired or signed with something else."""


class OrganizationRefused(Exception):
    """X-Organization-Id names an organization the token does not grant (403)."""


@dataclass(frozen=True, slots=True)
class Principal:
    sub: str
    roles: frozenset[str]
    org: str | None
    # The token's `exp` (seconds since the epoch): a session (a WebSocket) ends with it.
    expires: float | None = field(default=None, compare=False)
    # Every organization the token grants (`orgs`, plus `org`); `org` is the one acted in.
    orgs: frozenset[str] = frozenset()

    def acting_in(self, requested: str | None) -> Principal:
        """The principal acting in the organization `X-Organization-Id` names (None: the default one).
        Raises OrganizationRefused for an organization the token does not grant."""
        if requested is None or requested == self.org:
            return self
        if requested in self.orgs:
            return replace(self, org=requested)
        raise OrganizationRefused(f"the token does not grant organization {requested!r}")

    def has(self, role: str) -> bool:
        # admin implies member implies viewer.
        rank = {"viewer": 0, "member": 1, "admin": 2}
        best = max((rank[r] for r in self.roles if r in rank), default=-1)
        return best >= rank[role]


def verify_token(settings: Settings, token: str) -> Principal:
    # The algorithm comes from configuration, never from the token header, so a token
    # signed with `none` or with another algorithm is refused.
    options = {"require": ["exp", "sub"]}
    try:
        claims = jwt.decode(
            token,
            settings.jwt_secret,
            algorithms=[settings.jwt_algorithm],
            issuer=settings.jwt_issuer,
            audience=settings.jwt_audience,
            options=options,  # type: ignore[arg-type]
        )
    except jwt.PyJWTError as exc:
        raise AuthError(str(exc)) from exc
    # PyJWT reads these with int(), so "9999999999" (a string) would pass; RFC 7519 says NumericDate.
    for name in ("exp", "nbf", "iat"):
        value = claims.get(name)
        if name in claims and (isinstance(value, bool) or not isinstance(value, int | float)):
            raise AuthError(f"claim {name!r} must be a number")
    roles = claims.get("roles", [])
    if isinstance(roles, str):
        roles = [roles]
    if not isinstance(roles, list) or not all(isinstance(r, str) for r in roles):
        raise AuthError("claim 'roles' must be a list of strings")
    org = claims.get("org")
    if org is not None and not isinstance(org, str):
        raise AuthError("claim 'org' must be a string")
    orgs = claims.get("orgs", [])
    if not isinstance(orgs, list) or not all(isinstance(o, str) and o for o in orgs):
        raise AuthError("claim 'orgs' must be a list of non-empty strings")
    if not org and len(orgs) == 1:
        org = orgs[0]
    sub = claims["sub"]
    if not isinstance(sub, str) or not sub:
        raise AuthError("claim 'sub' must be a non-empty string")
    granted = frozenset(orgs) | ({org} if org else set())
    return Principal(
        sub=sub, roles=frozenset(roles), org=org or None, expires=float(claims["exp"]), orgs=frozenset(granted)
    )


def issue_token(
    settings: Settings,
    *,
    sub: str,
    roles: Sequence[str],
    org: str | None = None,
    ttl_seconds: int = 24 * 3600,
    orgs: Sequence[str] = (),
) -> str:
    claims: dict[str, object] = {"sub": sub, "roles": list(roles), "exp": int(time.time()) + ttl_seconds}
    if org:
        claims["org"] = org
    if orgs:
        claims["orgs"] = list(orgs)
    if settings.jwt_issuer:
        claims["iss"] = settings.jwt_issuer
    if settings.jwt_audience:
        claims["aud"] = settings.jwt_audience
    return jwt.encode(claims, settings.jwt_secret, algorithm=settings.jwt_algorithm)
