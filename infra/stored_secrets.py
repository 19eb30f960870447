"""Stored secrets: an organization's and a pipeline's named secrets, sealed with the run secrets'
key (SecretStore), and the secrets a run's unit gets (stored ones under the trigger's own)."""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass
from datetime import datetime
from typing import Literal

from domain import run as rn
from infra.secrets import SecretStore, SecretsUnavailable

Scope = Literal["organization", "pipeline"]
_COLUMNS = "pipeline_id, name, created_by, created_at, updated_by, updated_at"


@dataclass(frozen=True)
class StoredSecretInfo:
    """What may be shown of a stored secret: everything but its value."""

    name: str
    pipeline_id: str | None
    created_by: str
    created_at: datetime
    updated_by: str
    updated_at: datetime

    @property
    def scope(self) -> Scope:
        return "organization" if self.pipeline_id is None else "pipeline"


def _info(row: tuple[str, str, str, datetime, str, datetime]) -> StoredSecretInfo:
    return StoredSecretInfo(row[1], row[0] or None, row[2], row[3], row[4], row[5])


def _seal_scope(org: str, pipeline_id: str) -> str:
    # Length-prefixed: no organization name can make two different (org, pipeline) pairs collide.
    return f"stored:{len(org)}:{org}:{pipeline_id}"


class StoredSecrets:
    """`org` None is the tenant of callers without an organization; `pipeline_id` None is a secret
    of the whole organization. Every method is scoped to one organization: there is no call that
    reaches another's rows."""

    def __init__(self, sealer: SecretStore) -> None:
        self._sealer = sealer
        self._pool = sealer.pool

    async def put(
        self, org: str | None, pipeline_id: str | None, name: str, value: str, *, by: str
    ) -> tuple[StoredSecretInfo, bool]:
        """Create or replace; the secret's metadata, and whether it was created."""
        o, p = org or "", pipeline_id or ""
        sealed = self._sealer.encrypt(_seal_scope(o, p), name, value)
        async with self._pool.connection() as conn:
            cur = await conn.execute(
                "INSERT INTO stored_secrets (org, pipeline_id, name, value, created_by, updated_by) "
                "VALUES (%s, %s, %s, %s, %s, %s) ON CONFLICT (org, pipeline_id, name) DO UPDATE SET "
                "value = EXCLUDED.value, updated_by = EXCLUDED.updated_by, updated_at = now() "
                f"RETURNING {_COLUMNS}, (xmax = 0)",
                (o, p, name, sealed, by, by),
            )
            row = await cur.fetchone()
        assert row is not None
        return _info(row[:6]), bool(row[6])

    async def list(self, org: str | None, pipeline_id: str | None = None) -> list[StoredSecretInfo]:
        """Every secret of the organization, or (with `pipeline_id`) only those of that pipeline."""
        query = f"SELECT {_COLUMNS} FROM stored_secrets WHERE org = %s"
        args: tuple[str, ...] = (org or "",)
        if pipeline_id is not None:
            query += " AND pipeline_id = %s"
            args += (pipeline_id,)
        async with self._pool.connection() as conn:
            cur = await conn.execute(query + " ORDER BY pipeline_id, name", args)
            return [_info(row) for row in await cur.fetchall()]

    async def info(self, org: str | None, pipeline_id: str | None, name: str) -> StoredSecretInfo | None:
        async with self._pool.connection() as conn:
            cur = await conn.execute(
                f"SELECT {_COLUMNS} FROM stored_secrets WHERE org = %s AND pipeline_id = %s AND name = %s",
                (org or "", pipeline_id or "", name),
            )
            row = await cur.fetchone()
        return _info(row) if row is not None else None

    async def delete(self, org: str | None, pipeline_id: str | None, name: str) -> bool:
        async with self._pool.connection() as conn:
            cur = await conn.execute(
                "DELETE FROM stored_secrets WHERE org = %s AND pipeline_id = %s AND name = %s",
                (org or "", pipeline_id or "", name),
            )
            return cur.rowcount > 0

    async def values_for(
        self, org: str | None, pipeline_id: str, names: Collection[str] | None = None
    ) -> dict[str, str]:
        """The values a run of the pipeline may use: the organization's, overridden by the
        pipeline's own of the same name. Raises SecretsUnavailable when one does not decrypt."""
        o = org or ""
        query = "SELECT pipeline_id, name, value FROM stored_secrets WHERE org = %s AND pipeline_id IN ('', %s)"
        args: tuple[object, ...] = (o, pipeline_id)
        if names is not None:
            query += " AND name = ANY(%s)"
            args += (list(names),)
        async with self._pool.connection() as conn:
            cur = await conn.execute(query + " ORDER BY pipeline_id <> '', name", args)
            rows = await cur.fetchall()
        out: dict[str, str] = {}
        for pid, name, blob in rows:
            try:
                out[name] = self._sealer.decrypt(_seal_scope(o, pid), name, bytes(blob))
            except SecretsUnavailable:
                scope = "pipeline" if pid else "organization"
                raise SecretsUnavailable(
                    f"the {scope} secret {name} does not decrypt: the secrets key changed, or the row was "
                    "tampered with; set it again"
                ) from None
        return out


async def unit_secrets(run_secrets: SecretStore | None, state: rn.RunState) -> tuple[dict[str, str], str | None]:
    """The secret values a unit of the run gets, or why they cannot be had (the unit then fails
    with that): the stored secrets of its organization and pipeline, under the trigger's own.

    Why resolved here, when the executor starts a unit, rather than recorded at trigger time: a
    run started by cron or a webhook has no trigger body to carry them, and nothing of them
    (neither values nor names) needs to enter the run's events; the organization and pipeline
    come from the run's own events, so no caller can point a run at another organization's
    secrets. A secret changed while a run waits takes effect from its next unit."""
    if run_secrets is None:
        if state.secret_names:
            return {}, "this executor has no secret store: the run's secrets cannot be read"
        return {}, None
    try:
        values = await StoredSecrets(run_secrets).values_for(state.organization_id, state.pipeline_id)
        if not state.secret_names:
            return values, None
        own = await run_secrets.get(state.run_id)
    except SecretsUnavailable as exc:
        return {}, str(exc)
    missing = sorted(set(state.secret_names) - set(own))
    values.update({name: own[name] for name in state.secret_names if name in own})
    if missing:
        return values, f"the run's secrets {', '.join(missing)} are no longer available"
    return values, None
