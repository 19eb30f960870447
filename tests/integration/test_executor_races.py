"""Executor races found in review: two executors deciding the same start, and a transient error
while recording a step's outcome. Neither may leave a run hanging."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from domain import run as rn
from infra.executor.executor import Executor
from tests.integration.system import System, make_settings, running_system
from tests.integration.test_jobs import save

pytestmark = [pytest.mark.integration, pytest.mark.asyncio(loop_scope="session")]


async def test_the_loser_of_a_race_to_start_a_step_leaves_the_winner_its_lease(
    database_url: str, nats_url: str, tmp_path: Path
) -> None:
    async with running_system(make_settings(database_url, nats_url, tmp_path), with_executor=False) as system:
        p = await save(system, {"jobs": [{"name": "j", "steps": [{"name": "s", "run": "sleep 5"}]}]}, "json")
        run = (await system.trigger(p["id"]))["id"]
        a = system.executor
        b = Executor(system.commands, system.settings, None, system.executor.leases)
        # A decides first and takes the lease; then B decides and appends; A loses the append.
        a_decided, b_appended = asyncio.Event(), asyncio.Event()
        before = a.drivers._before_start

        async def a_before(state: rn.RunState, new: list[rn.RunEvent]) -> None:
            await before(state, new)
            if not a_decided.is_set():
                a_decided.set()
                await b_appended.wait()

        a.drivers._before_start = a_before  # type: ignore[method-assign]
        lost = asyncio.create_task(a.drivers._advance(run, None))
        await a_decided.wait()
        _, won = await b.drivers._advance(run, None)
        b_appended.set()
        _, lost_new = await lost
        assert any(isinstance(e, rn.StepStarted) for e in won) and not lost_new
        async with system.store.pool.connection() as conn:
            cur = await conn.execute("SELECT executor_id FROM stage_leases WHERE run_id = %s", (run,))
            rows = await cur.fetchall()
        assert rows == [(b.executor_id,)]  # the step B started has B's lease


async def test_a_transient_error_recording_a_step_is_retried_and_the_run_finishes(system: System) -> None:
    spec = {
        "jobs": [
            {"name": "fast", "steps": [{"name": "s", "run": "echo fast"}]},
            {"name": "slow", "steps": [{"name": "s", "run": "sleep 1; echo slow"}]},
        ]
    }
    p = await save(system, spec, "json")
    commands = system.executor.commands
    real = commands.run_command
    failed: list[Any] = []

    async def flaky(run_id: str, make: Any, **kw: Any) -> Any:
        if isinstance(make(commands.now()), rn.CompleteStep) and not failed:
            failed.append(run_id)
            raise OSError("connection reset (a transient database error)")
        return await real(run_id, make, **kw)

    commands.run_command = flaky  # type: ignore[method-assign]
    try:
        run = await system.trigger(p["id"])
        done = await system.wait_status(p["id"], run["id"], "succeeded", "failed", timeout=15)
        assert done["status"] == "succeeded" and failed
    finally:
        commands.run_command = real  # type: ignore[method-assign]
