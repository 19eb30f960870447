"""`runsOn` in specs (jobs and typed stages), and a unit waiting for an agent in the run's state and
its view: queued with the reason while the attempt it names runs, nothing once it moved on."""

from __future__ import annotations

from typing import Any
from zoneinfo import ZoneInfo

import pytest

from domain import run as rn
from domain.spec import stages_from_spec, validate_spec
from domain.stages import validate_stage_dicts
from infra.broker.permissions import agent_permissions
from projections.views import run_view
from tests.unit.test_run_jobs import Run


def errors_of(spec: dict[str, Any]) -> dict[str, str]:
    errors, _ = validate_spec(spec, zone=ZoneInfo)
    return {e.path: e.message for e in errors}


def test_a_jobs_runs_on_names_the_labels_its_agent_must_have_sorted_and_once() -> None:
    spec = {"jobs": [{"name": "b", "runsOn": ["linux", "arm64", "linux"], "steps": [{"run": "make"}]}]}
    assert errors_of(spec) == {}
    (stage,) = stages_from_spec(spec, [])
    assert stage.jobs[0].runs_on == ("arm64", "linux")
    one = {"jobs": [{"name": "b", "runsOn": "gpu", "steps": [{"run": "make"}]}]}
    assert stages_from_spec(one, [])[0].jobs[0].runs_on == ("gpu",)


@pytest.mark.parametrize(
    ("runs_on", "path"),
    [
        ([], "jobs[0].runsOn"),
        ("", "jobs[0].runsOn[0]"),
        (["ok", "not ok"], "jobs[0].runsOn[1]"),
        ([1], "jobs[0].runsOn[0]"),
        ({"a": 1}, "jobs[0].runsOn"),
        (["-leading"], "jobs[0].runsOn[0]"),
        ([f"l{i}" for i in range(17)], "jobs[0].runsOn"),
    ],
)
def test_a_bad_runs_on_is_an_error_at_its_path(runs_on: Any, path: str) -> None:
    spec = {"jobs": [{"name": "b", "runsOn": runs_on, "steps": [{"run": "make"}]}]}
    assert path in errors_of(spec)


def test_a_typed_stage_takes_runs_on_too() -> None:
    stage = {"type": "script", "config": {"command": "make"}, "runsOn": ["deploy-net"]}
    assert validate_stage_dicts([stage]) == {}
    assert stages_from_spec({"stages": [stage]}, ["s1"])[0].runs_on == ("deploy-net",)
    assert "stages[0].runsOn[0]" in validate_stage_dicts([{**stage, "runsOn": ["a b"]}])


def note(run: Run, reason: str | None, attempt: int = 1) -> list[rn.RunEvent]:
    return run.do(rn.NoteWaiting(stage_id="default", job="b", step="go", attempt=attempt, reason=reason, at=run.now()))


def test_a_running_step_waiting_for_an_agent_shows_queued_with_the_reason_until_an_agent_takes_it() -> None:
    run = Run({"jobs": [{"name": "b", "runsOn": ["gpu"], "steps": [{"name": "go", "run": "make"}]}]})
    run.advance()
    assert run.running_steps() == {("b", "go")}
    assert len(note(run, "waiting for an agent with gpu")) == 1
    assert note(run, "waiting for an agent with gpu") == []  # nothing new: nothing appended
    step = run_view(run.state).stage_results[0].jobs[0].steps[0]  # type: ignore[index]
    assert (step.status, step.waiting_for) == ("queued", "waiting for an agent with gpu")
    assert run.state.step_run("default", "b", "go").status == "running"  # the decisions see it running
    note(run, None)
    step = run_view(run.state).stage_results[0].jobs[0].steps[0]  # type: ignore[index]
    assert (step.status, step.waiting_for) == ("running", None)


def test_a_note_on_another_attempt_or_an_ended_step_changes_nothing() -> None:
    run = Run({"jobs": [{"name": "b", "runsOn": ["gpu"], "steps": [{"name": "go", "run": "make"}]}]})
    run.advance()
    assert note(run, "waiting", attempt=2) == []
    note(run, "waiting for an agent with gpu")
    run.finish("b", "go")
    assert note(run, "still waiting") == []
    step = run_view(run.state).stage_results[0].jobs[0].steps[0]  # type: ignore[index]
    assert (step.status, step.waiting_for) == ("succeeded", None)


def test_an_agent_may_hear_only_its_own_work_and_speak_only_as_itself() -> None:
    p = agent_permissions("ag_1")
    assert p.subscribe == ("pipelines.agents.v1.ag_1.work",)
    assert set(p.publish) == {"pipelines.agents.v1.ag_1.report.*", "pipelines.agents.v1.ag_1.presence"}
