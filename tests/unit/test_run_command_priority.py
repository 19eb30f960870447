"""People's run commands win over a busy executor: each retry reads only what changed since the
last (a run's state is kept per process), and stop or cancel keep re-deciding until they land."""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from domain import events as ev
from domain import run as rn
from infra.app.commands import Commands, ConcurrencyConflict
from infra.store.memory import InMemoryEventStore
from infra.store.records import AppendResult, NewEvent, RecordedEvent, UniqueKey, WrongExpectedVersion

STAGES = [{"id": f"s{i}", "name": f"s{i}", "type": "script", "config": {"command": "true"}} for i in range(3)]


class BusyRun(InMemoryEventStore):
    """A store where another writer wins the next `losses` appends to run streams (as an executor
    driving the run does), and that counts the run events each read returns."""

    losses = 0
    events_read = 0

    async def append(
        self,
        stream_id: str,
        events: Sequence[NewEvent],
        expected_version: int | None,
        *,
        claim: Sequence[UniqueKey] = (),
        release: Sequence[UniqueKey] = (),
    ) -> AppendResult:
        if self.losses and stream_id.startswith(ev.run_stream("")):
            self.losses -= 1
            raise WrongExpectedVersion(stream_id, expected_version)
        return await super().append(stream_id, events, expected_version, claim=claim, release=release)

    async def read_stream(self, stream_id: str, after_version: int = 0) -> list[RecordedEvent]:
        records = await super().read_stream(stream_id, after_version)
        if stream_id.startswith(ev.run_stream("")):
            self.events_read += len(records)
        return records


async def _run(commands: Commands) -> str:
    pipeline = await commands.create_pipeline(name="big", description=None, stages=STAGES, org="o", by="mallory")
    run, _ = await commands.trigger(pipeline, by="mallory")
    return run.run_id


async def test_a_stop_keeps_re_deciding_until_it_lands_however_many_races_it_loses() -> None:
    store = BusyRun()
    commands = Commands(store, retries=8)
    run_id = await _run(commands)
    await commands.run_command(run_id, lambda at: rn.Advance(at=at))
    store.losses = 50
    state, _ = await commands.run_command(run_id, lambda at: rn.Stop(by="admin", reason="too big", at=at))
    assert state.status == "cancelled"


async def test_the_executors_own_commands_still_give_up_after_their_retries() -> None:
    store = BusyRun()
    commands = Commands(store, retries=8)
    run_id = await _run(commands)
    store.losses = 50
    with pytest.raises(ConcurrencyConflict):
        await commands.run_command(run_id, lambda at: rn.Advance(at=at))


async def test_loading_a_run_again_reads_only_the_events_since_the_last_load() -> None:
    store = BusyRun()
    commands = Commands(store)
    run_id = await _run(commands)
    other = Commands(store)  # another process: it has never seen the run
    await other.load_run(run_id)
    first = store.events_read
    await commands.run_command(run_id, lambda at: rn.Advance(at=at))  # appends RunStarted, StageStarted
    store.events_read = 0
    state, version = await other.load_run(run_id)
    assert first == 1 and store.events_read == 2
    assert state.status == "running" and version == 3
