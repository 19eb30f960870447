"""The read models: a rebuild from the store yields the same rows as the live projector."""

from __future__ import annotations

from typing import Any

import pytest

from tests.integration.system import System, eventually

pytestmark = [pytest.mark.integration, pytest.mark.asyncio(loop_scope="session")]


async def _rows(system: System) -> dict[str, list[Any]]:
    out: dict[str, list[Any]] = {}
    async with system.store.pool.connection() as conn:
        for table, key in (("rm_pipelines", "id"), ("rm_runs", "id"), ("rm_run_logs", "run_id, position")):
            cur = await conn.execute(f"SELECT * FROM {table} ORDER BY {key}")
            out[table] = [tuple(str(v) for v in row) for row in await cur.fetchall()]
    return out


async def test_rebuild_recreates_the_same_read_models(system: System) -> None:
    gate = {"id": "gate", "type": "approval", "config": {"message": "ok?"}}
    script = {"id": "s", "type": "script", "config": {"command": "echo one; echo two"}}
    p1 = await system.create_pipeline([script, gate])
    p2 = await system.create_pipeline([script])
    r1 = await system.trigger(p1["id"])
    r2 = await system.trigger(p2["id"])
    await system.wait_status(p1["id"], r1["id"], "waiting_approval")
    await system.wait_status(p2["id"], r2["id"], "succeeded")
    deleted = await system.create_pipeline([script])
    await system.client.delete(f"/api/v1/pipelines/{deleted['id']}", headers=system.headers("admin"))

    async def caught_up() -> bool:
        head = await system.store.head()
        return await system.projector.checkpoint() == head

    await eventually(caught_up, what="the projector to catch up")
    before = await _rows(system)
    assert any(p1["id"] in row[0] for row in before["rm_pipelines"])
    assert not any(deleted["id"] in row[0] for row in before["rm_pipelines"])
    assert len(before["rm_run_logs"]) >= 2

    applied = await system.projector.rebuild()
    assert applied > 0
    after = await _rows(system)
    assert after == before
