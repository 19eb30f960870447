"""Keeps the embedded NATS's users in step with the broker credentials and agents issued through the
API (infra/broker/credentials.py, infra/agent/registry.py): reloads it after an issue or a revocation,
and when one expires."""

from __future__ import annotations

import time
from collections.abc import Sequence
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

    def __init__(self, database_url: str, *, every: float = 5.0, local_agents: Sequence[Path] = ()) -> None:
        self._database_url = database_url
        # `make up`'s local agents (services/dev/local_agent.py): their rows are made once the table is there.
        self._local_agents = list(local_agents)
        self._every = every
        self._conn: psycopg.Connection[tuple[str, str, str | None, str]] | None = None
        self._due = 0.0

    def sync(self, *servers: RunningNats) -> bool:
        """Whether a server (of a cluster's nodes, each with the same users) was reloaded. Raises
        psycopg.Error when the database cannot be read."""
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
        while self._local_agents:
            try:
                upsert_local_agent(self._conn, self._local_agents[0])  # type: ignore[arg-type]
                self._local_agents.pop(0)
            except psycopg.errors.UndefinedTable:
                break  # the API has not migrated the database yet: next time
        try:
            # Agents (infra/agent/registry.py) are users of the same server, on the same NOTIFY.
            agents: list[tuple[str, str]] = self._conn.execute(ACTIVE_AGENTS_SQL).fetchall()  # type: ignore[assignment]
        except psycopg.errors.UndefinedTable:
            agents = []
        accounts, users = issued_users(rows), agent_users(agents)
        reloaded = [server.set_issued_users(accounts, users) for server in servers]
        return any(reloaded)

    def close(self) -> None:
        if self._conn is not None:
            self._conn.close()
            self._conn = None
