"""What the executor writes in one transaction: a unit's lease with the append that starts it and
ends with the append that records its outcome; a unit's last log lines ahead of its completion."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

import pytest

from domain import events as ev
from domain import pipeline as pl
from domain import run as rn
from domain.errors import Refused
from domain.stages import Stage
from infra.app.commands import Commands
from infra.executor.executor import Executor
from infra.executor.leases import LeaseStore
from infra.store.memory import InMemoryEventStore
from infra.store.records import NewEvent
from tests.integration.executor_faults import FaultyStore, with_event
from tests.integration.system import make_settings, running_system

pytestmark = pytest.mark.integration


async def _queued_run(store: FaultyStore, *stages: Stage) -> tuple[Commands, rn.RunState]:
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
    return commands, state


def _script(stage_id: str, command: str) -> Stage:
    return Stage(id=stage_id, name=stage_id, type="script", order=1, config={"command": command})


async def test_a_units_last_log_lines_are_appended_in_its_completions_transaction_ahead_of_it(
    tmp_path: Path,
) -> None:
    inner = InMemoryEventStore()
    commands, state = await _queued_run(FaultyStore(inner), _script("a", "echo hi"), _script("b", "true"))
    executor = Executor(commands, make_settings("postgresql://unused", "nats://unused", tmp_path))
    try:
        assert (await executor.drive_once(state.run_id)).status == "succeeded"
    finally:
        await executor.drain()
    feed = await inner.read_feed((0, 0), 1000, run_id=state.run_id)
    done = next(i for i, r in enumerate(feed) if isinstance(r.event, rn.StageSucceeded) and r.event.stage_id == "a")
    last_lines, completion = feed[done - 1], feed[done]
    assert isinstance(last_lines.event, rn.LogAppended) and last_lines.event.stage_id == "a"
    assert [ln.text for ln in last_lines.event.lines][-1].startswith("Stage a succeeded")
    assert last_lines.tx_id == completion.tx_id
    # The same transaction starts the next stage.
    assert isinstance(feed[done + 1].event, rn.StageStarted) and feed[done + 1].tx_id == completion.tx_id
    logs = [ln.text for c in await commands.load_logs(state.run_id) for ln in c.lines]
    assert "hi" in logs and logs[-1].startswith("Stage b succeeded")


async def test_the_last_log_lines_of_a_unit_whose_completion_is_refused_are_stored_on_their_own(
    tmp_path: Path,
) -> None:
    store = FaultyStore(InMemoryEventStore())
    commands, state = await _queued_run(store, _script("a", "echo hi"))
    refused = store.fail_appends(
        with_event(ev.run_stream(state.run_id), rn.StageSucceeded), error=lambda: Refused("settled elsewhere")
    )
    executor = Executor(commands, make_settings("postgresql://unused", "nats://unused", tmp_path))
    try:
        await executor.drive_once(state.run_id)
    finally:
        await executor.drain()
    assert refused.hits == 1
    assert executor.closing_logs.pending == 0
    logs = [ln.text for c in await commands.load_logs(state.run_id) for ln in c.lines]
    assert "hi" in logs and logs[-1].startswith("Stage a succeeded")


async def test_a_units_lease_ends_with_the_append_of_its_completion(
    database_url: str, nats_url: str, tmp_path: Path
) -> None:
    settings = make_settings(database_url, nats_url, tmp_path)
    async with running_system(settings, with_executor=False) as system:
        p = await system.create_pipeline([{"id": "s", "type": "script", "config": {"command": "true"}}])
        run = (await system.trigger(p["id"]))["id"]
        executor = Executor(system.commands, settings, None, LeaseStore(system.store.pool))
        try:
            assert (await executor.drive_once(run)).status == "succeeded"
            async with system.store.pool.connection() as conn:
                cur = await conn.execute("SELECT stage_id FROM stage_leases WHERE run_id = %s", (run,))
                assert await cur.fetchall() == []  # already gone: no later write drops it
        finally:
            await executor.drain()
