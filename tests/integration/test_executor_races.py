"""Executor races found in review: two executors deciding the same start, and a transient error
while recording a step's outcome. Neither may leave a run hanging."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from domain import events as ev
from domain import run as rn
from domain.run.units import unit_key, unit_status
from infra.app.commands import Commands
from infra.executor.executor import Executor
from infra.executor.leases import LeaseStore
from tests.integration.executor_faults import FaultyStore, with_event
from tests.integration.system import eventually, make_settings, running_system
from tests.integration.test_jobs import save

pytestmark = pytest.mark.integration


async def test_the_loser_of_a_race_to_start_a_step_leaves_the_winner_its_lease(
    database_url: str, nats_url: str, tmp_path: Path
) -> None:
    settings = make_settings(database_url, nats_url, tmp_path)
    async with running_system(settings, with_executor=False) as system:
        p = await save(system, {"jobs": [{"name": "j", "steps": [{"name": "s", "run": "sleep 5"}]}]}, "json")
        run = (await system.trigger(p["id"]))["id"]
        leases = LeaseStore(system.store.pool)
        # A decides the start and takes the lease; its append waits until B has appended the same start.
        b_appended = asyncio.Event()
        slow = FaultyStore(system.store)
        a_deciding = slow.fail_appends(with_event(ev.run_stream(run), rn.StepStarted), until=b_appended)
        a = Executor(Commands(slow), settings, None, leases)
        b = Executor(Commands(system.store), settings, None, leases)
        lost = asyncio.create_task(a.drive_once(run))
        won = asyncio.create_task(b.drive_once(run))
        try:
            await a_deciding.hit.wait()

            async def b_started_it() -> bool:
                state, _ = await system.commands.load_run(run)
                return bool(state.stages) and unit_status(state, unit_key(state.stages[0].id, "j", "s"))[0] == "running"

            await eventually(b_started_it, what="B's start of the step")
            b_appended.set()
            async with asyncio.timeout(5):  # A loses the append, and runs nothing
                assert (await lost).status == "running"
            async with system.store.pool.connection() as conn:
                cur = await conn.execute("SELECT executor_id FROM stage_leases WHERE run_id = %s", (run,))
                rows = await cur.fetchall()
            assert rows == [(b.executor_id,)]  # the step B started has B's lease
            assert not won.done()  # and B runs it
        finally:
            won.cancel()
            await asyncio.gather(won, return_exceptions=True)
            await a.drain()
            await b.drain()


async def test_a_transient_error_recording_a_step_is_retried_and_the_run_finishes(
    database_url: str, nats_url: str, tmp_path: Path
) -> None:
    settings = make_settings(database_url, nats_url, tmp_path)
    async with running_system(settings, with_executor=False) as system:
        spec = {
            "jobs": [
                {"name": "fast", "steps": [{"name": "s", "run": "echo fast"}]},
                {"name": "slow", "steps": [{"name": "s", "run": "sleep 1; echo slow"}]},
            ]
        }
        p = await save(system, spec, "json")
        run = (await system.trigger(p["id"]))["id"]
        flaky = FaultyStore(system.store)
        failed = flaky.fail_appends(with_event(ev.run_stream(run), rn.StepFinished))  # a transient error, once
        executor = Executor(Commands(flaky), settings, None, LeaseStore(system.store.pool))
        async with asyncio.timeout(15):
            done = await executor.drive_once(run)
        assert done.status == "succeeded" and failed.hits == 1
        await executor.drain()  # the sandbox started ahead of the next run ends with it
