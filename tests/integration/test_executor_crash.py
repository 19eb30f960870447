"""A killed executor: its running stage is noticed through its lease, the orphaned script is
killed, and the attempt is retried or failed with a message that says why."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

from tests.integration.system import System, make_settings, running_system
from tests.integration.test_run_control import _alive, script

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[2]


# ---- a killed executor ---------------------------------------------------------------------


@pytest_asyncio.fixture(loop_scope="session")
async def bare_system(
    database_url: str, nats_url: str, tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[System]:
    """A system whose executor runs as a separate process, so the test can kill -9 it."""
    settings = make_settings(database_url, nats_url, tmp_path_factory.mktemp("bare"))
    async with running_system(settings, with_executor=False) as s:
        yield s


def _executor_process(system: System) -> subprocess.Popen[bytes]:
    s = system.settings
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "PIPELINES_DATABASE_URL": s.database_url,
        "PIPELINES_NATS_URL": s.nats_url,
        "PIPELINES_JWT_SECRET": s.jwt_secret,
        "PIPELINES_EVENTS_STREAM": s.events_stream,
        "PIPELINES_DATA_DIR": str(s.data_dir),
        "PIPELINES_LEASE_TTL": str(s.lease_ttl),
        "PIPELINES_SWEEP_INTERVAL": str(s.sweep_interval),
        "PIPELINES_ACK_WAIT": "5",
    }
    return subprocess.Popen(
        [sys.executable, "-m", "services.executor"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )


async def test_a_killed_executors_stage_is_killed_then_retried_by_another(bare_system: System) -> None:
    system = bare_system
    marker = f"m-{uuid.uuid4().hex[:6]}"
    # First attempt: leaves a marker and hangs. Second attempt: sees the marker and succeeds.
    command = f"if [ -f {marker} ]; then echo second attempt; else touch {marker}; sleep 60; fi"
    p = await system.create_pipeline([script("work", command, retry={"maxAttempts": 2, "backoff": 0})])
    victim = _executor_process(system)
    stop = asyncio.Event()
    rescuer: asyncio.Task[None] | None = None
    try:
        run = await system.trigger(p["id"])
        await system.wait_run(p["id"], run["id"], lambda r: r["stageResults"][0]["status"] == "running", timeout=20)
        pgid = await _lease_pgid(system, run["id"])
        os.kill(victim.pid, signal.SIGKILL)
        victim.wait(5)
        assert _alive(pgid), "the orphaned script should still be running right after the kill"
        rescuer = asyncio.create_task(system.executor.run(stop))
        done = await system.wait_status(p["id"], run["id"], "succeeded", "failed", timeout=30)
        assert done["status"] == "succeeded", done
        assert not _alive(pgid), "the lost executor's script must be killed before the retry"
        stage = done["stageResults"][0]
        assert [a["status"] for a in stage["attempts"]] == ["failed", "succeeded"]
        assert "executor lost" in stage["attempts"][0]["error"]
        assert "executor lost" in done["logs"] and "second attempt" in done["logs"]
    finally:
        stop.set()
        if victim.poll() is None:
            victim.kill()
        if rescuer is not None:
            await asyncio.wait_for(rescuer, 15)


async def test_a_killed_executors_stage_without_retries_fails_with_a_clear_message(bare_system: System) -> None:
    system = bare_system
    p = await system.create_pipeline([script("work", "sleep 60"), script("after", "echo after")])
    victim = _executor_process(system)
    stop = asyncio.Event()
    rescuer: asyncio.Task[None] | None = None
    try:
        run = await system.trigger(p["id"])
        await system.wait_run(p["id"], run["id"], lambda r: r["stageResults"][0]["status"] == "running", timeout=20)
        await _lease_pgid(system, run["id"])
        os.kill(victim.pid, signal.SIGKILL)
        victim.wait(5)
        rescuer = asyncio.create_task(system.executor.run(stop))
        done = await system.wait_status(p["id"], run["id"], "succeeded", "failed", timeout=30)
        assert done["status"] == "failed"
        assert "executor lost" in done["stageResults"][0]["error"]
        assert done["stageResults"][1]["status"] == "skipped"
    finally:
        stop.set()
        if victim.poll() is None:
            victim.kill()
        if rescuer is not None:
            await asyncio.wait_for(rescuer, 15)


async def test_a_killed_executors_parallel_steps_are_each_recovered_and_retried(bare_system: System) -> None:
    system = bare_system
    marker = f"m-{uuid.uuid4().hex[:6]}"
    hang = f"if [ -f {marker}-$JOB_NAME ]; then echo second attempt; else touch {marker}-$JOB_NAME; sleep 60; fi"
    spec = {
        "jobs": [
            {"name": name, "retry": {"maxAttempts": 2, "backoff": 0}, "steps": [{"name": "work", "run": hang}]}
            for name in ("a", "b")
        ]
        + [{"name": "after", "needs": ["a", "b"], "steps": [{"name": "s", "run": "echo after"}]}]
    }
    p = await system.create_pipeline([])
    r = await system.client.post(
        f"/api/v1/pipelines/{p['id']}/spec/save", json={"spec": spec}, headers=system.headers("member")
    )
    assert r.status_code == 200, r.text
    victim = _executor_process(system)
    stop = asyncio.Event()
    rescuer: asyncio.Task[None] | None = None
    try:
        run = await system.trigger(p["id"])

        async def two_leases() -> list[int]:
            async with system.store.pool.connection() as conn:
                cur = await conn.execute("SELECT pgid FROM stage_leases WHERE run_id = %s", (run["id"],))
                return [int(row[0]) for row in await cur.fetchall() if row[0]]

        deadline = time.monotonic() + 20
        while len(pgids := await two_leases()) < 2:
            assert time.monotonic() < deadline, "both steps should be running under leases"
            await asyncio.sleep(0.05)
        os.kill(victim.pid, signal.SIGKILL)
        victim.wait(5)
        rescuer = asyncio.create_task(system.executor.run(stop))
        done = await system.wait_status(p["id"], run["id"], "succeeded", "failed", timeout=40)
        assert done["status"] == "succeeded", done["logs"]
        assert not any(_alive(pgid) for pgid in pgids)
        jobs = {j["name"]: j for j in done["stageResults"][0]["jobs"]}
        for name in ("a", "b"):
            step = jobs[name]["steps"][0]
            assert [a["status"] for a in step["attempts"]] == ["failed", "succeeded"]
            assert "executor lost" in step["attempts"][0]["error"]
            assert step["output"].endswith("second attempt\n")
        assert jobs["after"]["status"] == "succeeded"
    finally:
        stop.set()
        if victim.poll() is None:
            victim.kill()
        if rescuer is not None:
            await asyncio.wait_for(rescuer, 15)


async def test_what_a_recovered_failure_starts_is_run_by_the_rescuer(bare_system: System) -> None:
    # A lost step without retries fails its job; the jobs that then start (here one that runs on
    # failure, and a typed stage after a lost typed stage would be the same) must be run, not left
    # "running" under a lease nobody works on.
    system = bare_system
    spec = {
        "jobs": [
            {"name": "lost", "steps": [{"name": "work", "run": "sleep 60"}]},
            {"name": "after", "needs": ["lost"], "when": "always()", "steps": [{"name": "s", "run": "echo after"}]},
        ]
    }
    p = await system.create_pipeline([])
    r = await system.client.post(
        f"/api/v1/pipelines/{p['id']}/spec/save", json={"spec": spec}, headers=system.headers("member")
    )
    assert r.status_code == 200, r.text
    victim = _executor_process(system)
    stop = asyncio.Event()
    rescuer: asyncio.Task[None] | None = None
    try:
        run = await system.trigger(p["id"])
        await _lease_pgid(system, run["id"])
        os.kill(victim.pid, signal.SIGKILL)
        victim.wait(5)
        rescuer = asyncio.create_task(system.executor.run(stop))
        done = await system.wait_status(p["id"], run["id"], "succeeded", "failed", timeout=30)
        jobs = {j["name"]: j for j in done["stageResults"][0]["jobs"]}
        assert jobs["lost"]["status"] == "failed" and "executor lost" in jobs["lost"]["steps"][0]["error"]
        assert jobs["after"]["status"] == "succeeded", done
        assert jobs["after"]["steps"][0]["output"] == "after\n"
        assert done["status"] == "failed"
    finally:
        stop.set()
        if victim.poll() is None:
            victim.kill()
        if rescuer is not None:
            await asyncio.wait_for(rescuer, 15)


async def _lease_pgid(system: System, run_id: str) -> int:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        async with system.store.pool.connection() as conn:
            cur = await conn.execute("SELECT pgid FROM stage_leases WHERE run_id = %s", (run_id,))
            row = await cur.fetchone()
        if row and row[0]:
            return int(row[0])
        await asyncio.sleep(0.05)
    raise AssertionError("no lease with a process group was recorded")
