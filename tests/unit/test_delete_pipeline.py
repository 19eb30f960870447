"""Deleting a pipeline stops its runs, decided from the event store (no read model is involved):
a run just triggered is cancelled, an ended run is left alone, and a store error is an error."""

from __future__ import annotations

from collections.abc import Sequence

import pytest

from domain import events as ev
from domain import run as rn
from domain.errors import NotFound
from infra.app.commands import Commands
from infra.store.memory import InMemoryEventStore
from infra.store.records import AppendResult, NewEvent, UniqueKey

STAGES = [{"id": "build", "name": "build", "type": "script", "config": {"command": "make"}}]


class FailingRunAppends(InMemoryEventStore):
    """An event store whose appends to run streams fail (the database went away) once `broken`."""

    broken = False

    async def append(
        self,
        stream_id: str,
        events: Sequence[NewEvent],
        expected_version: int | None,
        *,
        claim: Sequence[UniqueKey] = (),
        release: Sequence[UniqueKey] = (),
    ) -> AppendResult:
        if self.broken and stream_id.startswith(ev.run_stream("")):
            raise OSError("connection to the database lost")
        return await super().append(stream_id, events, expected_version, claim=claim, release=release)


async def _pipeline_with_run(commands: Commands, name: str = "app") -> tuple[str, str]:
    pipeline = await commands.create_pipeline(name=name, description=None, stages=STAGES, org="o", by="alice")
    run, _ = await commands.trigger(pipeline, by="alice")
    return pipeline.pipeline_id, run.run_id


async def test_deleting_a_pipeline_cancels_the_run_just_triggered() -> None:
    commands = Commands(InMemoryEventStore())
    pipeline_id, run_id = await _pipeline_with_run(commands)

    await commands.delete_pipeline(pipeline_id, by="bob")

    run, _ = await commands.load_run(run_id)
    assert run.status == "cancelled"
    assert (await commands.load_pipeline(pipeline_id))[0].deleted


async def test_deleting_a_pipeline_leaves_its_ended_runs_and_other_pipelines_runs_alone() -> None:
    commands = Commands(InMemoryEventStore())
    pipeline_id, ended = await _pipeline_with_run(commands)
    _, other = await _pipeline_with_run(commands, "other")
    await commands.run_command(ended, lambda at: rn.Stop(by="carol", reason="enough", at=at))
    before = await commands.load_run(ended)

    await commands.delete_pipeline(pipeline_id, by="bob")

    assert await commands.load_run(ended) == before
    assert (await commands.load_run(other))[0].status == "queued"


async def test_a_store_error_while_cancelling_runs_is_raised_and_a_retry_finishes_the_job() -> None:
    store = FailingRunAppends()
    commands = Commands(store)
    pipeline_id, run_id = await _pipeline_with_run(commands)
    store.broken = True

    with pytest.raises(OSError):
        await commands.delete_pipeline(pipeline_id, by="bob")

    store.broken = False
    with pytest.raises(NotFound):  # a retry: the pipeline is gone, and its runs are cancelled now
        await commands.delete_pipeline(pipeline_id, by="bob")
    assert (await commands.load_run(run_id))[0].status == "cancelled"
