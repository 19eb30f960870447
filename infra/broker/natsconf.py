"""The authorization part of a NATS server configuration: users, their passwords and permissions."""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from infra.broker.permissions import Permissions

__all__ = ["BrokerUser", "render_config"]


@dataclass(frozen=True)
class BrokerUser:
    user: str
    # In clear, or a bcrypt hash (`$2a$...`, `$2b$...`): NATS accepts both.
    password: str
    permissions: Permissions


def _permissions(p: Permissions) -> dict[str, Any]:
    # An empty allow list would mean "anything": deny everything instead.
    out: dict[str, Any] = {}
    for kind, allowed in (("publish", p.publish), ("subscribe", p.subscribe)):
        out[kind] = {"allow": list(allowed)} if allowed else {"deny": [">"]}
    return out


def render_config(users: Iterable[BrokerUser], **options: Any) -> str:
    """A configuration file (JSON, which the NATS configuration format includes) with `users` as the
    only clients the server accepts, and `options` (say, `server_name`: a reload keeps only what the
    file says, so what may not change on reload belongs here too)."""
    entries = [{"user": u.user, "password": u.password, "permissions": _permissions(u.permissions)} for u in users]
    return json.dumps({**options, "authorization": {"users": entries}}, indent=1) + "\n"
