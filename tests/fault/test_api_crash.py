"""An api process killed in the middle of a command: the client's retry with the same
Idempotency-Key must get a definite answer (the command done once), not a key wedged "in progress".

The command is held inside its append by a table lock taken from the test, so that the kill lands
exactly there, after the api recorded the key as in progress and before it stored an answer.
"""

from __future__ import annotations

import asyncio
import time
import uuid

import httpx
import psycopg
import pytest

from tests.fault.conftest import FaultStack

pytestmark = pytest.mark.e2e


async def _runs_of(database_url: str, pipeline_id: str) -> int:
    async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
        cur = await conn.execute(
            "SELECT count(*) FROM events WHERE pipeline_id = %s AND event_type = 'run_triggered'", (pipeline_id,)
        )
        row = await cur.fetchone()
        assert row is not None
        return int(row[0])


async def test_a_retry_after_the_api_died_mid_command_gets_an_answer(fault: FaultStack) -> None:
    headers = fault.headers("admin")
    async with httpx.AsyncClient(base_url=fault.api, timeout=60) as http:
        r = await http.post(
            "/api/v1/pipelines",
            json={
                "name": f"crash-{uuid.uuid4().hex[:6]}",
                "stages": [{"type": "script", "config": {"command": "true"}}],
            },
            headers=headers,
        )
        assert r.status_code == 201, r.text
        pipeline_id = r.json()["id"]
        key = f"crash-{uuid.uuid4()}"
        url = f"/api/v1/pipelines/{pipeline_id}/trigger"
        body = {"variables": {"WHO": "retry"}}

        async with await psycopg.AsyncConnection.connect(fault.database_url) as blocker:
            # Every append starts by writing `streams`: the trigger waits there.
            await blocker.execute("LOCK TABLE streams IN EXCLUSIVE MODE")
            first = asyncio.create_task(http.post(url, json=body, headers={**headers, "Idempotency-Key": key}))
            deadline = time.monotonic() + 10
            while True:
                async with await psycopg.AsyncConnection.connect(fault.database_url, autocommit=True) as probe:
                    cur = await probe.execute(
                        "SELECT count(*) FROM pg_locks WHERE relation = 'streams'::regclass AND NOT granted"
                    )
                    row = await cur.fetchone()
                if row is not None and row[0] > 0:
                    break  # the api's append is waiting for our lock
                assert time.monotonic() < deadline, "the trigger never reached its append"
                await asyncio.sleep(0.02)
            await asyncio.to_thread(fault.kill, "api")
            with pytest.raises(httpx.TransportError):
                await first
            await blocker.rollback()
        await asyncio.to_thread(fault.ready, 60)

        began = time.monotonic()
        retry = await http.post(url, json=body, headers={**headers, "Idempotency-Key": key})
        waited = time.monotonic() - began
        runs = await _runs_of(fault.database_url, pipeline_id)
        assert retry.status_code == 201 and waited < 10, (
            f"the retry with the same Idempotency-Key answered {retry.status_code} after {waited:.1f}s: "
            f"{retry.text}; runs stored for the pipeline: {runs}"
        )
        assert runs == 1
        again = await http.post(url, json=body, headers={**headers, "Idempotency-Key": key})
        assert again.status_code == 201 and again.content == retry.content
