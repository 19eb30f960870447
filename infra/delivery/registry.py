"""The registry of environments, components and notification channels: org-scoped rows of
`delivery_config`, a webhook secret sealed with the secrets key."""

from __future__ import annotations

import base64
import json
import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

import psycopg
from psycopg_pool import AsyncConnectionPool

from infra.secrets import SecretStore

Kind = Literal["environment", "component", "channel"]


class NameInUse(Exception):
    pass


@dataclass(frozen=True)
class Item:
    kind: str
    id: str
    org: str | None
    name: str
    doc: dict[str, Any]
    secret: str | None
    created_by: str
    created_at: datetime
    updated_at: datetime


_COLUMNS = "kind, id, org, name, doc::text, secret, created_by, created_at, updated_at"


_SEALED = "sealed:v1:"


class Registry:
    """Environments, components and channels, each scoped to an organization (None: none).

    A webhook's HMAC secret is sealed with the secrets key (`SecretStore`, AES-GCM bound to the
    item) before it is stored, and opened only when the executor signs with it."""

    def __init__(self, pool: AsyncConnectionPool, sealer: SecretStore | None = None) -> None:
        self._pool = pool
        self._sealer = sealer

    def _seal(self, kind: str, item_id: str, secret: str | None) -> str | None:
        if secret is None or self._sealer is None:
            return secret
        blob = self._sealer.encrypt(f"{kind}:{item_id}", "webhook-secret", secret)
        return _SEALED + base64.b64encode(blob).decode()

    def _item(self, row: tuple[Any, ...]) -> Item:
        secret: str | None = row[5]
        if secret is not None and secret.startswith(_SEALED):
            if self._sealer is None:
                raise RuntimeError("this secret is sealed, and this process has no secrets key to open it")
            secret = self._sealer.decrypt(
                f"{row[0]}:{row[1]}", "webhook-secret", base64.b64decode(secret[len(_SEALED) :])
            )
        return Item(row[0], row[1], row[2], row[3], json.loads(row[4]), secret, row[6], row[7], row[8])

    @property
    def pool(self) -> AsyncConnectionPool:
        return self._pool

    async def create(
        self, kind: Kind, org: str | None, name: str, doc: dict[str, Any], secret: str | None, by: str, at: datetime
    ) -> Item:
        item_id = str(uuid.uuid4())
        try:
            async with self._pool.connection() as conn:
                cur = await conn.execute(
                    f"INSERT INTO delivery_config ({_COLUMNS.replace('::text', '')}) "
                    f"VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s) RETURNING {_COLUMNS}",
                    (kind, item_id, org, name, json.dumps(doc), self._seal(kind, item_id, secret), by, at, at),
                )
                row = await cur.fetchone()
        except psycopg.errors.UniqueViolation as exc:
            raise NameInUse(f"a {kind} named {name!r} already exists") from exc
        assert row is not None
        return self._item(row)

    async def get(self, kind: Kind, org: str | None, item_id: str) -> Item | None:
        async with self._pool.connection() as conn:
            cur = await conn.execute(
                f"SELECT {_COLUMNS} FROM delivery_config WHERE kind = %s AND id = %s AND org IS NOT DISTINCT FROM %s",
                (kind, item_id, org),
            )
            row = await cur.fetchone()
        return self._item(row) if row else None

    async def list_all(self, kind: Kind, org: str | None) -> list[Item]:
        async with self._pool.connection() as conn:
            cur = await conn.execute(
                f"SELECT {_COLUMNS} FROM delivery_config WHERE kind = %s AND org IS NOT DISTINCT FROM %s "
                "ORDER BY name, id",
                (kind, org),
            )
            rows = await cur.fetchall()
        return [self._item(r) for r in rows]

    async def update(
        self,
        kind: Kind,
        org: str | None,
        item_id: str,
        name: str,
        doc: dict[str, Any],
        secret: str | None,
        at: datetime,
    ) -> Item | None:
        try:
            async with self._pool.connection() as conn:
                cur = await conn.execute(
                    "UPDATE delivery_config SET name = %s, doc = %s, secret = %s, updated_at = %s "
                    f"WHERE kind = %s AND id = %s AND org IS NOT DISTINCT FROM %s RETURNING {_COLUMNS}",
                    (name, json.dumps(doc), self._seal(kind, item_id, secret), at, kind, item_id, org),
                )
                row = await cur.fetchone()
        except psycopg.errors.UniqueViolation as exc:
            raise NameInUse(f"a {kind} named {name!r} already exists") from exc
        return self._item(row) if row else None

    async def delete(self, kind: Kind, org: str | None, item_id: str) -> bool:
        async with self._pool.connection() as conn:
            cur = await conn.execute(
                "DELETE FROM delivery_config WHERE kind = %s AND id = %s AND org IS NOT DISTINCT FROM %s RETURNING 1",
                (kind, item_id, org),
            )
            return await cur.fetchone() is not None

    async def existing(self, kind: Kind, org: str | None, ids: list[str]) -> set[str]:
        if not ids:
            return set()
        async with self._pool.connection() as conn:
            cur = await conn.execute(
                "SELECT id FROM delivery_config WHERE kind = %s AND id = ANY(%s) AND org IS NOT DISTINCT FROM %s",
                (kind, ids, org),
            )
            return {r[0] for r in await cur.fetchall()}

    async def used_by(self, kind: Kind, org: str | None, item_id: str) -> list[tuple[str, str]]:
        """(id, name) of the live pipelines of `org` whose current definition deploys with this
        environment or component: a typed `deploy` stage's config, or a `deploy` step's config in
        a stage of jobs. From the pipelines read model (deleted pipelines have no row there)."""
        key = {"environment": "environmentId", "component": "componentId"}.get(kind)
        if key is None:
            return []
        async with self._pool.connection() as conn:
            cur = await conn.execute(
                "SELECT p.id, p.name FROM rm_pipelines p WHERE p.org IS NOT DISTINCT FROM %(org)s AND EXISTS ("
                "  SELECT 1 FROM jsonb_array_elements(coalesce(p.state::jsonb -> 'stages', '[]')) s"
                "  WHERE (s ->> 'type' = 'deploy' AND s -> 'config' ->> %(key)s = %(id)s) OR EXISTS ("
                "    SELECT 1 FROM jsonb_array_elements(coalesce(s -> 'jobs', '[]')) j,"
                "                  jsonb_array_elements(coalesce(j -> 'steps', '[]')) st"
                "    WHERE st ->> 'kind' = 'deploy' AND st -> 'config' ->> %(key)s = %(id)s)"
                ") ORDER BY p.name, p.id",
                {"org": org, "key": key, "id": item_id},
            )
            return [(r[0], r[1]) for r in await cur.fetchall()]

    async def channel(self, org: str | None, name: str) -> Item | None:
        """The channel called `name` (`#deploys` and `deploys` are the same), or with that id."""
        bare = name.removeprefix("#")
        async with self._pool.connection() as conn:
            cur = await conn.execute(
                f"SELECT {_COLUMNS} FROM delivery_config WHERE kind = 'channel' AND org IS NOT DISTINCT FROM %s "
                "AND (name = %s OR ltrim(name, '#') = %s OR id = %s) ORDER BY (name = %s) DESC LIMIT 1",
                (org, name, bare, name, name),
            )
            row = await cur.fetchone()
        return self._item(row) if row else None
