"""Read-your-writes: a command answers the position it wrote; a list read given that position waits
for the projector, so a client never sees its own write missing, however slow the projector."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator, Coroutine
from typing import Any

import httpx
import psycopg
import pytest

from tests.integration.system import System

pytestmark = pytest.mark.integration

SCRIPT = {"id": "s", "type": "script", "config": {"command": "true"}}


def in_thread(request: Coroutine[Any, Any, httpx.Response]) -> asyncio.Future[httpx.Response]:
    """The test client serves a request by blocking its caller's loop (which also runs the
    projector): a request that waits for the projector is sent from a thread of its own."""
    return asyncio.ensure_future(asyncio.to_thread(asyncio.run, request))


@contextlib.asynccontextmanager
async def projector_held(system: System) -> AsyncIterator[None]:
    """Holds a transaction open with an id: the feed's horizon stays below it, so nothing written
    meanwhile reaches the projector until it ends."""
    async with await psycopg.AsyncConnection.connect(system.settings.database_url) as conn:
        await conn.execute("SELECT pg_current_xact_id()")
        try:
            yield
        finally:
            await conn.rollback()


async def test_a_list_given_the_triggers_position_shows_the_run(system: System) -> None:
    headers = system.headers("admin")
    pipeline = await system.create_pipeline([SCRIPT])
    async with projector_held(system):
        r = await system.client.post(f"/api/v1/pipelines/{pipeline['id']}/trigger", headers=headers)
        assert r.status_code == 201, r.text
        position = int(r.headers["Pipelines-Position"])
        run_id = r.json()["id"]
        # The projector really is behind: without the position, the list misses the run.
        unaware = await system.client.get(f"/api/v1/pipelines/{pipeline['id']}/runs", headers=headers)
        assert run_id not in [x["id"] for x in unaware.json()]
        waiting = in_thread(
            system.client.get(
                f"/api/v1/pipelines/{pipeline['id']}/runs", headers={**headers, "Pipelines-Min-Position": str(position)}
            )
        )
        await asyncio.sleep(0.3)  # the read is waiting meanwhile (its answer is checked below)
    r = await waiting
    assert r.status_code == 200, r.text
    assert "pipelines-stale" not in r.headers
    assert run_id in [x["id"] for x in r.json()]


async def test_a_created_pipeline_is_listed_given_its_position_as_a_query_parameter(system: System) -> None:
    headers = system.headers("admin")
    async with projector_held(system):
        r = await system.client.post(
            "/api/v1/pipelines", json={"name": f"ryw-{uuid.uuid4().hex[:8]}", "stages": [SCRIPT]}, headers=headers
        )
        assert r.status_code == 201, r.text
        position = r.headers["Pipelines-Position"]
        created = r.json()["id"]
        waiting = in_thread(system.client.get(f"/api/v1/pipelines?limit=100&minPosition={position}", headers=headers))
        await asyncio.sleep(0.3)
    r = await waiting
    assert r.status_code == 200, r.text
    assert created in [p["id"] for p in r.json()["data"]]


async def test_a_bad_min_position_is_a_400_naming_it(system: System) -> None:
    r = await system.client.get("/api/v1/pipelines?minPosition=-1", headers=system.headers("admin"))
    assert r.status_code == 400
    assert r.json()["errors"][0]["path"] == "minPosition"
    r = await system.client.get(
        "/api/v1/pipelines", headers={**system.headers("admin"), "Pipelines-Min-Position": "x" * 30}
    )
    assert r.status_code == 400
    assert r.json()["errors"][0]["path"] == "Pipelines-Min-Position"


async def test_a_replayed_idempotent_command_answers_the_position_the_first_answer_carried(system: System) -> None:
    pipeline = await system.create_pipeline([SCRIPT])
    headers = {**system.headers("member"), "Idempotency-Key": f"ryw-{uuid.uuid4()}"}
    url = f"/api/v1/pipelines/{pipeline['id']}/trigger"
    first = await system.client.post(url, headers=headers)
    assert first.status_code == 201, first.text
    position = first.headers["Pipelines-Position"]
    assert int(position) > 0
    again = await system.client.post(url, headers=headers)
    assert (again.status_code, again.json()["id"]) == (201, first.json()["id"])
    # The client that lost the first answer waits for its write with the replay's position.
    assert again.headers.get("Pipelines-Position") == position
    listed = await in_thread(
        system.client.get(
            f"/api/v1/pipelines/{pipeline['id']}/runs", headers={**headers, "Pipelines-Min-Position": position}
        )
    )
    assert "pipelines-stale" not in listed.headers
    assert first.json()["id"] in [x["id"] for x in listed.json()]


async def test_an_idempotency_record_stored_without_a_position_still_replays(system: System) -> None:
    # As kept by a version that did not store the position: replayed as it is, without the header.
    pipeline = await system.create_pipeline([SCRIPT])
    key = f"old-{uuid.uuid4()}"
    path = f"/api/v1/pipelines/{pipeline['id']}/trigger"
    async with await psycopg.AsyncConnection.connect(system.settings.database_url, autocommit=True) as conn:
        await conn.execute(
            "INSERT INTO idempotency_keys (scope, key, request_hash, status_code, body) "
            "VALUES (%s, %s, encode(sha256(''::bytea), 'hex'), 201, %s)",
            (f"{system.org}|alice|POST|{path}", key, b'{"id": "stored-earlier"}'),
        )
    r = await system.client.post(path, headers={**system.headers("member"), "Idempotency-Key": key})
    assert (r.status_code, r.json()) == (201, {"id": "stored-earlier"})
    assert "pipelines-position" not in r.headers
