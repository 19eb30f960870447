"""Broker credentials for downstream systems: issued per organization, kept in PostgreSQL (a bcrypt
hash of the password only), revoked; and the broker accounts they make (an account each, importing
its organization's subjects and its own consumer from the services' account; read-only permissions)."""

from __future__ import annotations

import secrets
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import bcrypt
from psycopg_pool import AsyncConnectionPool

from infra.broker.creds import inbox_prefix
from infra.broker.natsconf import BrokerUser, DownstreamAccount
from infra.broker.permissions import DOWNSTREAM_JS_PREFIX, org_consumer, org_imports, org_permissions, org_subjects

__all__ = [
    "ACTIVE_SQL",
    "CHANGED_CHANNEL",
    "BrokerCredentialStore",
    "Issued",
    "issued_users",
]

# The rows that are broker users now: (username, password_hash, org, stream).
ACTIVE_SQL = (
    "SELECT username, password_hash, org, stream FROM broker_credentials "
    "WHERE revoked_at IS NULL AND (expires_at IS NULL OR expires_at > now()) ORDER BY username"
)
# NOTIFY'd on every issue and revocation: whoever writes the broker's configuration listens.
CHANGED_CHANNEL = "pipelines_broker_credentials"
# bcrypt's cost: the broker checks it on every connection of the credential.
_ROUNDS = 10


@dataclass(frozen=True)
class Issued:
    id: str
    org: str | None
    user: str
    password: str
    stream: str
    expires_at: datetime | None

    def view(self, servers: Iterable[str]) -> dict[str, Any]:
        """The JSON a downstream system connects with (the only time the password is shown)."""
        events, logs, notify = org_subjects(self.org or "")
        out: dict[str, Any] = {
            "id": self.id,
            "servers": list(servers),
            "user": self.user,
            "password": self.password,
            # nats-py `inbox_prefix=`: its replies may come on this prefix only.
            "inboxPrefix": inbox_prefix(self.user),
            # nats-py `nc.jetstream(prefix=...)`: its account's name for its consumer's JetStream API
            "jsPrefix": DOWNSTREAM_JS_PREFIX,
            "stream": self.stream,
            # its one durable pull consumer (the API created it, filtered to `events`): read and ack
            "consumer": org_consumer(self.user),
            "subjects": {"events": events, "logs": logs, "notify": notify},
        }
        if self.expires_at is not None:
            out["expiresAt"] = self.expires_at.isoformat().replace("+00:00", "Z")
        return out


def issued_users(rows: Iterable[tuple[str, str, str | None, str]]) -> tuple[DownstreamAccount, ...]:
    """The broker accounts of ACTIVE_SQL's rows: each its one user's."""
    return tuple(
        DownstreamAccount(
            BrokerUser(user, password_hash, org_permissions(org or "", stream, user)),
            org_imports(org or "", stream, user),
        )
        for user, password_hash, org, stream in rows
    )


class BrokerCredentialStore:
    def __init__(self, pool: AsyncConnectionPool) -> None:
        self._pool = pool

    async def issue(self, *, org: str | None, by: str, stream: str, ttl_seconds: int | None) -> Issued:
        ident = secrets.token_hex(8)
        user = f"bc_{ident}"
        password = secrets.token_urlsafe(32)
        hashed = bcrypt.hashpw(password.encode(), bcrypt.gensalt(_ROUNDS)).decode()
        expires = (
            datetime.now(UTC).replace(microsecond=0) + timedelta(seconds=ttl_seconds)
            if ttl_seconds is not None
            else None
        )
        async with self._pool.connection() as conn:
            await conn.execute(
                "INSERT INTO broker_credentials (id, org, username, password_hash, stream, created_by, expires_at) "
                "VALUES (%s, %s, %s, %s, %s, %s, %s)",
                (user, org, user, hashed, stream, by, expires),
            )
            await conn.execute(f"NOTIFY {CHANGED_CHANNEL}")
        return Issued(user, org, user, password, stream, expires)

    async def revoke(self, *, org: str | None, credential_id: str) -> bool:
        """Whether a live credential of `org` was revoked (another organization's is not found)."""
        async with self._pool.connection() as conn:
            cur = await conn.execute(
                "UPDATE broker_credentials SET revoked_at = now() "
                "WHERE id = %s AND org IS NOT DISTINCT FROM %s AND revoked_at IS NULL",
                (credential_id, org),
            )
            if cur.rowcount:
                await conn.execute(f"NOTIFY {CHANGED_CHANNEL}")
            return cur.rowcount > 0
