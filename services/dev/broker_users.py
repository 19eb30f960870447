"""Keeps the embedded NATS's users in step with the broker credentials and agents issued through the
API (infra/broker/credentials.py, infra/agent/registry.py): reloads it after an issue or a revocation,
and when one expires."""

from __future__ import annotations

import time
from pathlib import Path

import psycopg

from infra.agent.registry import ACTIVE_AGENTS_SQL, agent_users
from infra.broker.credentials import ACTIVE_SQL, CHANGED_CHANNEL, issued_users
from services.dev.local_agent import upsert_local_agent
from services.dev.nats import RunningNats

__all__ = ["IssuedUsers"]


class IssuedUsers:
    """`sync(nats)` often (the supervisor's check loop): cheap unless a NOTIFY came or `every` seconds
    passed (expiries). Not thread-safe; one per NATS server."""

    def __init__(self, database_url: str, *, every: float = 5.0, local_agent: Path | None = None) -> None:
        self._database_url = database_url
        # `make up`'s local agent (services/dev/local_agent.py): its row is made once the table is there.
        self._local_agent = local_agent
        self._every = every
        self._conn: psycopg.Connection[tuple[str, str, str | None, str]] | None = None
        self._due = 0.0

    def sync(self, nats: RunningNats) -> bool:
        """Whether the server was reloaded. Raises psycopg.Error when the database cannot be read."""
        changed = False
        if self._conn is None or self._conn.closed:
            self._conn = psycopg.connect(self._database_url, autocommit=True, connect_timeout=3)
            self._conn.execute(f"LISTEN {CHANGED_CHANNEL}")
            changed = True
        for _ in self._conn.notifies(timeout=0):
            changed = True
        if not changed and time.monotonic() < self._due:
            return False
        self._due = time.monotonic() + self._every
        try:
            rows = self._conn.execute(ACTIVE_SQL).fetchall()
        except psycopg.errors.UndefinedTable:  # the API has not migrated the database yet
            rows = []
        if self._local_agent is not None:
            try:
                upsert_local_agent(self._conn, self._local_agent)  # type: ignore[arg-type]
                self._local_agent = None
            except psycopg.errors.UndefinedTable:
                pass  # the API has not migrated the database yet: next time
        try:
            # Agents (infra/agent/registry.py) are users of the same server, on the same NOTIFY.
            agents: list[tuple[str, str]] = self._conn.execute(ACTIVE_AGENTS_SQL).fetchall()  # type: ignore[assignment]
        except psycopg.errors.UndefinedTable:
            agents = []
        return nats.set_issued_users(issued_users(rows), agent_users(agents))

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None
