"""Poison events: an event that cannot be projected or published is set aside (recorded, counted,
reported by /readyz as degraded) and everything after it goes on, in every organization."""

from __future__ import annotations

import asyncio
import os
import sys
import threading
import uuid
from collections.abc import AsyncIterator, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import msgspec
import pytest
import pytest_asyncio

from infra.projector.consumer import Projector
from tests.integration.system import System, eventually, make_settings, running_system

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def gateway_health() -> Iterator[int]:
    """A stand-in for the gateway's /healthz (in a thread: the test client serves the app on a
    loop of its own), so that the API is ready and /readyz can say degraded."""

    class Healthy(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Healthy)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def system(
    database_url: str, nats_url: str, tmp_path_factory: pytest.TempPathFactory, gateway_health: int
) -> AsyncIterator[System]:
    settings = make_settings(
        database_url, nats_url, tmp_path_factory.mktemp("data"), gateway_host="127.0.0.1", gateway_port=gateway_health
    )
    async with running_system(settings) as s:
        yield s


SCRIPT = {"id": "s", "type": "script", "config": {"command": "true"}}


async def _insert_raw(system: System, stream_id: str, event_type: str, data: str, org: str | None) -> int:
    """An event written straight into the store, as no command of ours would write it."""
    async with system.store.pool.connection() as conn:
        cur = await conn.execute(
            "INSERT INTO events (stream_id, stream_version, event_id, event_type, org, pipeline_id, data) "
            "VALUES (%s, 1, %s, %s, %s, %s, %s::json) RETURNING position",
            (stream_id, str(uuid.uuid4()), event_type, org, stream_id.partition("-")[2] or None, data),
        )
        row = await cur.fetchone()
        assert row is not None
        return int(row[0])


@pytest_asyncio.fixture(loop_scope="session")
async def poisoned(system: System) -> AsyncIterator[list[int]]:
    """Three poison events in the store: a pipeline whose description holds a NUL (PostgreSQL's
    jsonb refuses it in the read model), an event type no fold knows, and an event whose stream
    id has no aggregate (it cannot be given a NATS subject). Removed again afterwards, so that the
    other modules sharing this database see a healthy store."""
    model = await system.create_pipeline([SCRIPT])
    records = await system.store.read_stream(f"pipeline-{model['id']}")
    data: dict[str, Any] = msgspec.json.decode(records[0].data)
    nul_id = str(uuid.uuid4())
    data.update(pipeline_id=nul_id, name=f"nul-{nul_id[:8]}", description="before\u0000after")
    positions = [
        await _insert_raw(
            system, f"pipeline-{nul_id}", "pipeline_created", msgspec.json.encode(data).decode(), system.org
        ),
        await _insert_raw(system, f"pipeline-{uuid.uuid4()}", "martian_landed", '{"type": "martian_landed"}', None),
        await _insert_raw(system, "bogus", "bogus", '{"type": "bogus"}', None),
    ]
    try:
        yield positions
    finally:
        async with system.store.pool.connection() as conn:
            await conn.execute("DELETE FROM events WHERE position = ANY(%s)", (positions,))
            await conn.execute("DELETE FROM poison_events WHERE position = ANY(%s)", (positions,))


async def test_a_poison_event_is_set_aside_and_every_organization_goes_on(system: System, poisoned: list[int]) -> None:
    other = f"org-{uuid.uuid4().hex[:8]}"
    headers = system.headers("admin", org=other)
    r = await system.client.post(
        "/api/v1/pipelines", json={"name": f"after-{uuid.uuid4().hex[:6]}", "stages": [SCRIPT]}, headers=headers
    )
    assert r.status_code == 201, r.text
    pipeline = r.json()
    r = await system.client.post(f"/api/v1/pipelines/{pipeline['id']}/trigger", headers=headers)
    assert r.status_code == 201, r.text
    run = r.json()

    async def projected() -> bool:
        listed = await system.client.get("/api/v1/pipelines", headers=headers)
        runs = await system.client.get(f"/api/v1/pipelines/{pipeline['id']}/runs", headers=headers)
        return any(p["id"] == pipeline["id"] for p in listed.json()["data"]) and any(
            x["id"] == run["id"] for x in runs.json()
        )

    await eventually(projected, timeout=15, what="the other organization's pipeline and run in the read models")

    later = max((await system.store.read_stream(f"run-{run['id']}")), key=lambda e: e.position)

    async def published() -> bool:
        return system.relay.cursor >= later.cursor

    await eventually(published, timeout=15, what="the relay to publish past the poison events")

    r = await system.client.get("/readyz")
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["status"] == "degraded", body
    reasons = " ".join(body["reasons"])
    for position in poisoned:
        assert f"position {position}" in reasons, reasons
    assert "martian_landed" in reasons and "projector" in reasons and "relay" in reasons

    metrics = (await system.client.get("/metrics")).text
    assert 'pipelines_events_set_aside_total{consumer="projector"}' in metrics
    assert 'pipelines_events_set_aside_total{consumer="relay"}' in metrics


async def test_rebuild_sets_poison_events_aside_and_reports_them(system: System, poisoned: list[int]) -> None:
    applied = await Projector(system.store, system.settings.database_url).rebuild()
    assert applied > 0
    async with system.store.pool.connection() as conn:
        cur = await conn.execute(
            "SELECT position FROM poison_events WHERE consumer = 'projector' AND position = ANY(%s)", (poisoned,)
        )
        assert sorted(r[0] for r in await cur.fetchall()) == sorted(poisoned)
    r = await system.client.get("/readyz")
    assert r.json()["status"] == "degraded"


# It rebuilds every read model of the session's shared database (every earlier test's events).
# The test is async and waits for the command without blocking the loop: the `system` fixture's
# projector runs on this loop, and a batch of it caught mid-transaction (the poison events just
# appended are being projected) would otherwise never commit, so the rebuild's LOCK TABLE would
# wait for it until the timeout (as it did on a slow CI run).
@pytest.mark.timeout(400)
async def test_the_rebuild_command_reports_set_aside_events(system: System, poisoned: list[int]) -> None:
    env = {
        **os.environ,
        "PIPELINES_DATABASE_URL": system.settings.database_url,
        "PIPELINES_NATS_URL": system.settings.nats_url,
        "PIPELINES_JWT_SECRET": system.settings.jwt_secret,
        "PIPELINES_DATA_DIR": str(system.settings.data_dir),
    }
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "services.projector",
        "--rebuild",
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), timeout=380)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    stdout, stderr = out.decode(), err.decode()
    assert proc.returncode == 0, stderr
    report = msgspec.json.decode(stdout.strip().splitlines()[-1])
    assert report["status"] == "degraded"
    assert any(f"position {poisoned[0]}" in reason for reason in report["reasons"]), report
    assert "degraded" in stderr
