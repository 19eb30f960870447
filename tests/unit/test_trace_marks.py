"""infra/trace.py: the opt-in marks behind `python -m bench --only trace`. On, each mark is one
JSON line naming the process, the hop and the run; off (the default), nothing is written."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import msgspec
import pytest

from infra import trace
from infra.store.records import RecordedEvent


class StageDone(msgspec.Struct, tag="stage_done"):
    stage: str


@pytest.fixture
def marks(tmp_path: Path) -> Iterator[Path]:
    path = tmp_path / "marks.jsonl"
    trace.configure(str(path))
    try:
        yield path
    finally:
        trace.configure(None)


def _lines(path: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def _recorded(stream_id: str, event_type: str) -> RecordedEvent:
    return RecordedEvent(1, 1, stream_id, 1, "e1", event_type, b"{}", None, None, None, datetime.now(UTC))


def test_each_mark_is_a_json_line_with_the_time_process_hop_run_and_detail(marks: Path) -> None:
    trace.mark("woken", "r1")
    trace.appended("run-r1", [StageDone(stage="s1"), StageDone(stage="s2")])
    trace.records("read", [_recorded("runlog-r2", "log_appended"), _recorded("pipeline-p1", "pipeline_created")])
    lines = _lines(marks)
    assert [(d["hop"], d["run"], d["what"]) for d in lines] == [
        ("woken", "r1", ""),
        ("appended", "r1", "stage_done,stage_done"),
        ("read", "r2", "log_appended"),
        ("read", None, "pipeline_created"),
    ]
    assert all(isinstance(d["t"], float) and isinstance(d["p"], str) and d["p"] for d in lines)


def test_nothing_is_written_when_tracing_is_off(tmp_path: Path) -> None:
    path = tmp_path / "marks.jsonl"
    trace.configure(str(path))
    trace.configure(None)
    trace.mark("woken", "r1")
    trace.appended("run-r1", [StageDone(stage="s1")])
    trace.records("read", [_recorded("run-r1", "run_started")])
    assert not trace.enabled()
    assert path.read_text() == ""


async def test_the_run_a_task_entered_names_the_marks_of_the_tasks_it_starts(marks: Path) -> None:
    async def unit() -> None:
        trace.mark("step exited")

    async def drive(run_id: str) -> None:
        trace.enter_run(run_id)
        await asyncio.create_task(unit())

    trace.mark("before")
    await asyncio.gather(drive("r1"), drive("r2"))
    trace.mark("after")
    assert sorted((d["hop"], d["run"]) for d in _lines(marks)) == [
        ("after", None),
        ("before", None),
        ("step exited", "r1"),
        ("step exited", "r2"),
    ]
