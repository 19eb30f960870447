"""The authorization part of a NATS server configuration: the services' account (their users, passwords
and permissions, and the events stream) and one account per downstream credential, importing from it."""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from infra.broker.permissions import SERVICE_ACCOUNT, Import, Permissions

__all__ = ["BrokerUser", "DownstreamAccount", "render_config"]


@dataclass(frozen=True)
class BrokerUser:
    user: str
    # In clear, or a bcrypt hash (`$2a$...`, `$2b$...`): NATS accepts both.
    password: str
    permissions: Permissions


@dataclass(frozen=True)
class DownstreamAccount:
    """A downstream credential's own NATS account (named after its user): one user, and what it imports
    from the services' account.

    One account per credential rather than per organization: an account is a subject space, and a
    credential can have messages delivered on any subject of its own account (NATS does not check a
    request's reply subject), so two credentials sharing one could forge messages for each other, even
    within an organization; and revoking one removes its account and every import with it."""

    user: BrokerUser
    imports: tuple[Import, ...]

    @property
    def name(self) -> str:
        return self.user.user


def _permissions(p: Permissions) -> dict[str, Any]:
    # An empty allow list would mean "anything": deny everything instead.
    out: dict[str, Any] = {}
    for kind, allowed in (("publish", p.publish), ("subscribe", p.subscribe)):
        out[kind] = {"allow": list(allowed)} if allowed else {"deny": [">"]}
    return out


def _user(u: BrokerUser) -> dict[str, Any]:
    return {"user": u.user, "password": u.password, "permissions": _permissions(u.permissions)}


def render_config(users: Iterable[BrokerUser], downstream: Iterable[DownstreamAccount] = (), **options: Any) -> str:
    """A configuration file (JSON, which the NATS configuration format includes) whose only clients are
    `users`, in the services' account (JetStream on), and the users of the `downstream` accounts
    (JetStream off), each of which imports what the services' account exports to it alone; and
    `options` (say, `server_name`: a reload keeps only what the file says, so what may not change on
    reload belongs here too)."""
    exports: dict[tuple[str, bool, bool], list[str]] = {}
    accounts: dict[str, Any] = {}
    for account in downstream:
        if account.name in (SERVICE_ACCOUNT, "$SYS", "$G"):
            raise ValueError(f"a downstream account may not be named {account.name!r}")
        imports = []
        for i in account.imports:
            exports.setdefault((i.subject, i.service, i.streamed), []).append(account.name)
            if i.service:
                imports.append({"service": {"account": SERVICE_ACCOUNT, "subject": i.subject}, "to": i.to})
            else:
                if i.to != i.subject:
                    raise ValueError(f"a stream import keeps its subject ({i.subject!r}, not {i.to!r})")
                imports.append({"stream": {"account": SERVICE_ACCOUNT, "subject": i.subject}})
        accounts[account.name] = {"users": [_user(account.user)], "imports": imports}
    service_exports = []
    for (subject, service, streamed), importers in exports.items():
        entry: dict[str, Any] = {"service" if service else "stream": subject, "accounts": importers}
        if streamed:
            entry["response_type"] = "stream"
        service_exports.append(entry)
    services: dict[str, Any] = {"jetstream": "enabled", "users": [_user(u) for u in users]}
    if service_exports:
        services["exports"] = service_exports
    return json.dumps({**options, "accounts": {SERVICE_ACCOUNT: services, **accounts}}, indent=1) + "\n"
