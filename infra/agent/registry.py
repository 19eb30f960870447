"""Agent credentials: issued by an admin (POST /api/v1/agents), kept in PostgreSQL (a bcrypt hash of
the password only), revoked; the broker users they make (their own work and report subjects only);
and the agents the executor may hand units to."""

from __future__ import annotations

import secrets
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import bcrypt
from psycopg_pool import AsyncConnectionPool

from infra.broker.credentials import CHANGED_CHANNEL
from infra.broker.natsconf import BrokerUser
from infra.broker.permissions import agent_permissions

__all__ = ["ACTIVE_AGENTS_SQL", "AgentRecord", "AgentStore", "IssuedAgent", "agent_users"]

# The agents that are broker users now: (id, password_hash).
ACTIVE_AGENTS_SQL = "SELECT id, password_hash FROM agents WHERE revoked_at IS NULL ORDER BY id"
_ROUNDS = 10


@dataclass(frozen=True)
class AgentRecord:
    id: str
    org: str | None
    name: str
    labels: tuple[str, ...]
    capacity: int
    created_by: str
    created_at: datetime

    def view(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "name": self.name,
            "organizationId": self.org,
            "shared": self.org is None,
            "labels": list(self.labels),
            "capacity": self.capacity,
            "createdBy": self.created_by,
            "createdAt": self.created_at.isoformat().replace("+00:00", "Z"),
        }


@dataclass(frozen=True)
class IssuedAgent:
    record: AgentRecord
    password: str

    def view(self, servers: Iterable[str]) -> dict[str, Any]:
        """What the agent connects with: the only time the password is shown. The same JSON is the
        agent's credential file (PIPELINES_AGENT_CREDS)."""
        return {**self.record.view(), "servers": list(servers), "user": self.record.id, "password": self.password}


def agent_users(rows: Iterable[tuple[str, str]]) -> tuple[BrokerUser, ...]:
    """The broker users of ACTIVE_AGENTS_SQL's rows."""
    return tuple(BrokerUser(ident, password_hash, agent_permissions(ident)) for ident, password_hash in rows)


_COLUMNS = "id, org, name, labels, capacity, created_by, created_at"


def _record(row: tuple[Any, ...]) -> AgentRecord:
    ident, org, name, labels, capacity, by, at = row
    return AgentRecord(ident, org, name, tuple(labels), capacity, by, at)


class AgentStore:
    def __init__(self, pool: AsyncConnectionPool) -> None:
        self._pool = pool

    async def issue(
        self, *, org: str | None, by: str, name: str | None, labels: tuple[str, ...], capacity: int
    ) -> IssuedAgent:
        ident = f"ag_{secrets.token_hex(8)}"
        password = secrets.token_urlsafe(32)
        hashed = bcrypt.hashpw(password.encode(), bcrypt.gensalt(_ROUNDS)).decode()
        async with self._pool.connection() as conn:
            cur = await conn.execute(
                "INSERT INTO agents (id, org, name, labels, capacity, password_hash, created_by) "
                f"VALUES (%s, %s, %s, %s, %s, %s, %s) RETURNING {_COLUMNS}",
                (ident, org, name or ident, list(labels), capacity, hashed, by),
            )
            row = await cur.fetchone()
            # The broker's users are reloaded on this (services/dev/broker_users.py).
            await conn.execute(f"NOTIFY {CHANGED_CHANNEL}")
        assert row is not None
        return IssuedAgent(_record(row), password)

    async def revoke(self, *, org: str | None, agent_id: str) -> bool:
        """Whether a live agent of `org` was revoked (another organization's is not found)."""
        async with self._pool.connection() as conn:
            cur = await conn.execute(
                "UPDATE agents SET revoked_at = now() "
                "WHERE id = %s AND org IS NOT DISTINCT FROM %s AND revoked_at IS NULL",
                (agent_id, org),
            )
            if cur.rowcount:
                await conn.execute(f"NOTIFY {CHANGED_CHANNEL}")
            return cur.rowcount > 0

    async def list(self, *, org: str | None) -> list[AgentRecord]:
        """The live agents an organization's runs may use: its own and the shared ones."""
        async with self._pool.connection() as conn:
            cur = await conn.execute(
                f"SELECT {_COLUMNS} FROM agents WHERE revoked_at IS NULL "
                "AND (org IS NULL OR org IS NOT DISTINCT FROM %s) ORDER BY created_at, id",
                (org,),
            )
            return [_record(row) for row in await cur.fetchall()]

    async def active(self) -> dict[str, AgentRecord]:
        """Every live agent, by id (the executor's view of whom it may hand units to)."""
        async with self._pool.connection() as conn:
            cur = await conn.execute(f"SELECT {_COLUMNS} FROM agents WHERE revoked_at IS NULL")
            return {r.id: r for r in map(_record, await cur.fetchall())}
