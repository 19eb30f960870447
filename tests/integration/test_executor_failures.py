"""The executor when a step of its own fails: a start whose checks fail keeps no lease, a
shutdown while an outcome is being recorded leaves nothing behind, and units running when driving
a run failed are recorded by the next drive."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

import pytest

from domain import events as ev
from domain import pipeline as pl
from domain import run as rn
from domain.errors import NotFound
from domain.run.units import unit_status
from domain.stages import Job, Stage, Step
from infra.app.commands import Commands
from infra.executor.executor import Executor, RunDriver
from infra.executor.leases import LeaseStore
from infra.store.memory import InMemoryEventStore
from infra.store.records import NewEvent
from tests.integration.executor_faults import FaultyStore, to_stream, with_event
from tests.integration.system import eventually, make_settings, running_system
from tests.integration.test_jobs import save

pytestmark = pytest.mark.integration


async def _in_memory(tmp_path: Path, *stages: Stage) -> tuple[Commands, FaultyStore, Executor, rn.RunState]:
    """An executor on an in-memory store (through a faulty adapter), and a queued run of a
    pipeline with `stages`."""
    store = FaultyStore(InMemoryEventStore())
    created = pl.PipelineCreated(
        pipeline_id="p",
        name="p",
        description=None,
        stages=stages,
        organization_id=None,
        created_by="u",
        at=datetime.now(UTC),
    )
    await store.append(ev.pipeline_stream("p"), [NewEvent("created", created)], 0)
    commands = Commands(store)
    pipeline, _ = await commands.load_pipeline("p")
    state, _ = await commands.trigger(pipeline, by="u")
    return commands, store, Executor(commands, make_settings("postgresql://unused", "nats://unused", tmp_path)), state


async def test_a_start_whose_pipeline_cannot_be_read_keeps_no_lease(
    database_url: str, nats_url: str, tmp_path: Path
) -> None:
    settings = make_settings(database_url, nats_url, tmp_path)
    async with running_system(settings, with_executor=False) as system:
        p = await save(system, {"jobs": [{"name": "j", "steps": [{"name": "s", "run": "true"}]}]}, "json")
        run = (await system.trigger(p["id"]))["id"]
        faulty = FaultyStore(system.store)
        # Reading the pipeline before the start fails, slower than taking the lease.
        unreadable = faulty.fail_reads(ev.pipeline_stream(p["id"]), delay=0.05)
        executor = Executor(Commands(faulty), settings, None, LeaseStore(system.store.pool))
        with pytest.raises(OSError):
            await executor.drive_once(run)
        assert unreadable.hits == 1
        state, _ = await system.commands.load_run(run)
        assert state.status == "queued"
        async with system.store.pool.connection() as conn:
            cur = await conn.execute("SELECT stage_id FROM stage_leases WHERE run_id = %s", (run,))
            assert await cur.fetchall() == []
        # The next try starts it.
        assert (await executor.drive_once(run)).status == "succeeded"
        await executor.drain()  # the sandbox started ahead of the next run ends with it


async def test_a_shutdown_while_an_outcome_is_recorded_leaves_no_log_task_behind(tmp_path: Path) -> None:
    stage = Stage(id="s", name="s", type="script", order=1, config={"command": "echo hi"})
    commands, store, executor, state = await _in_memory(tmp_path, stage)
    # The store hangs right when the executor records the outcome, and the executor is stopped.
    recording = store.fail_appends(with_event(ev.run_stream(state.run_id), rn.StageSucceeded), hang=True)
    task = asyncio.create_task(executor.drive_once(state.run_id, RunDriver()))
    await recording.hit.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await executor.drain()
    assert executor.closing_logs.pending == 0
    logs = await commands.load_logs(state.run_id)
    assert any("succeeded" in line.text for chunk in logs for line in chunk.lines)


async def test_units_still_running_when_a_drive_fails_are_recorded_by_the_next(tmp_path: Path) -> None:
    stage = Stage(
        id="s",
        name="s",
        type="jobs",
        order=1,
        jobs=(
            Job(name="a", steps=(Step(name="x", kind="shell", run="echo a"),)),
            Job(name="b", steps=(Step(name="x", kind="shell", run="sleep 0.5; echo b"),)),
        ),
    )
    commands, store, executor, state = await _in_memory(tmp_path, stage)

    def a_finished(stream_id: str, events: Sequence[NewEvent]) -> bool:
        return stream_id == ev.run_stream(state.run_id) and any(
            isinstance(e.event, rn.StepFinished) and e.event.job == "a" for e in events
        )

    lost = store.fail_appends(a_finished, error=lambda: NotFound("the store lost track of the run for a moment"))
    driver = RunDriver()
    with pytest.raises(NotFound):
        await executor.drive_once(state.run_id, driver)
    assert lost.hits == 1
    assert len(driver.units) == 1  # b is still running, and kept
    async with asyncio.timeout(10):
        await executor.drive_once(state.run_id, driver)  # what the driver's loop does after a failure
    after, _ = await commands.load_run(state.run_id)
    assert after.step_run("s", "b", "x").status == "succeeded"
    await executor.drain()
    assert not driver.units and executor.closing_logs.pending == 0


async def test_a_lost_attempt_whose_failure_could_not_be_recorded_is_recovered_by_a_later_sweep(
    database_url: str, nats_url: str, tmp_path: Path
) -> None:
    settings = make_settings(database_url, nats_url, tmp_path)
    async with running_system(settings, with_executor=False) as system:
        p = await system.create_pipeline([{"id": "s", "type": "script", "config": {"command": "true"}}])
        run = (await system.trigger(p["id"]))["id"]
        # The stage was started by an executor that is gone: its lease has expired.
        state, _ = await system.commands.run_command(run, lambda at: rn.Advance(at=at))
        assert unit_status(state, "s") == ("running", 1)
        leases = LeaseStore(system.store.pool)
        assert await leases.acquire(run, "s", 1, "lost-executor", "another-host", ttl=-1)
        faulty = FaultyStore(system.store)
        refused = faulty.fail_appends(to_stream(ev.run_stream(run)))  # recording the lost attempt fails once
        rescuer = Executor(Commands(faulty), settings, None, leases)
        try:
            with contextlib.suppress(OSError):
                await rescuer.sweep_once()
            assert refused.hits == 1
            # The store is back: the next sweep records the attempt as failed.
            await rescuer.sweep_once()
            state, _ = await system.commands.load_run(run)
            assert unit_status(state, "s") != ("running", 1)
            assert "executor lost" in (state.stage_runs[state.stage_index("s")].error or "")
        finally:
            await rescuer.drain()
        async with system.store.pool.connection() as conn:
            cur = await conn.execute("SELECT stage_id FROM stage_leases WHERE run_id = %s", (run,))
            assert await cur.fetchall() == []


async def test_an_approval_timeout_that_failed_to_expire_the_gate_fires_again(
    database_url: str, nats_url: str, tmp_path: Path
) -> None:
    settings = make_settings(database_url, nats_url, tmp_path)
    async with running_system(settings, with_executor=False) as system:
        gate = {"id": "gate", "type": "approval", "timeout": 0.2, "config": {"message": "anyone?"}}
        p = await system.create_pipeline([gate])
        run = (await system.trigger(p["id"]))["id"]
        faulty = FaultyStore(system.store)
        executor = Executor(Commands(faulty), settings, None, LeaseStore(system.store.pool))
        try:
            assert (await executor.drive_once(run)).status == "waiting_approval"  # its timer is set
            expiring = faulty.fail_appends(to_stream(ev.run_stream(run)))  # the expiry's append fails once

            async def expired() -> bool:
                with contextlib.suppress(OSError):  # as the sweeper's loop does
                    await executor.sweep_once()
                state, _ = await system.commands.load_run(run)
                return state.status == "failed"

            await eventually(expired, timeout=8, what="the approval's timeout to fail the run")
            assert expiring.hits == 1
        finally:
            await executor.drain()


async def test_a_start_whose_append_fails_takes_no_lease_and_leaves_another_executors_alone(
    database_url: str, nats_url: str, tmp_path: Path
) -> None:
    settings = make_settings(database_url, nats_url, tmp_path)
    async with running_system(settings, with_executor=False) as system:
        p = await system.create_pipeline([{"id": "s", "type": "script", "config": {"command": "true"}}])
        run = (await system.trigger(p["id"]))["id"]
        leases = LeaseStore(system.store.pool)
        # Another executor decided the same start and holds its lease.
        assert await leases.acquire(run, "s", 1, "another-executor", "another-host", ttl=30)
        faulty = FaultyStore(system.store)
        failing = faulty.fail_appends(with_event(ev.run_stream(run), rn.StageStarted))
        executor = Executor(Commands(faulty), settings, None, leases)
        with pytest.raises(OSError):
            await executor.drive_once(run)
        assert failing.hits == 1
        async with system.store.pool.connection() as conn:
            cur = await conn.execute("SELECT stage_id, executor_id FROM stage_leases WHERE run_id = %s", (run,))
            assert await cur.fetchall() == [("s", "another-executor")]
