"""Units of work of a run (a typed stage's attempt, a step's attempt): their keys, which newly
decided events start one, and the status of the unit a key names."""

from __future__ import annotations

from datetime import UTC, datetime
from zoneinfo import ZoneInfo

from domain import run as rn
from domain.spec import stages_from_spec, validate_spec

T0 = datetime(2026, 3, 16, 12, 0, 0, tzinfo=UTC)
SPEC = {
    "stages": [
        {"id": "build", "name": "Build", "type": "script", "config": {"command": "make"}},
        {
            "id": "ship",
            "jobs": [{"name": "push", "steps": [{"name": "gate", "approval": {}}, {"name": "up", "run": "./up"}]}],
        },
    ]
}


def _triggered() -> rn.RunState:
    assert validate_spec(SPEC, zone=ZoneInfo) == ([], [])
    stages = stages_from_spec(SPEC, ["unused"])
    trigger = rn.TriggerRun(
        run_id="r", pipeline_id="p", organization_id=None, definition_version=1, stages=stages, by="u", at=T0
    )
    return rn.fold(rn.decide(trigger, rn.initial_state))


def test_a_step_key_names_stage_job_and_step_and_a_typed_stage_key_is_its_id() -> None:
    key = rn.unit_key("ship", "push", "up")
    assert key == "ship\u241fpush\u241fup"
    assert rn.split_unit_key(key) == ("ship", "push", "up")
    assert rn.unit_key("build") == "build"
    assert rn.split_unit_key("build") == ("build", None, None)


def test_only_typed_stages_and_steps_that_are_not_gates_are_units_to_run() -> None:
    state = _triggered()
    started = rn.decide(rn.Advance(at=T0), state)
    state = rn.fold(started, state)
    units = rn.started_units(state, started)
    assert [(u.key, u.attempt, u.label) for u in units] == [("build", 1, "Stage Build (build)")]

    done = rn.decide(rn.CompleteStage(stage_id="build", attempt=1, succeeded=True, at=T0), state)
    state = rn.fold(done, state)
    assert rn.started_units(state, done) == []  # the stage of jobs and its approval step: no unit
    approved = rn.decide(rn.Approve(by="u", at=T0), state)
    state = rn.fold(approved, state)
    after = rn.decide(rn.Advance(at=T0), state)
    state = rn.fold(after, state)
    assert [(u.key, u.label) for u in rn.started_units(state, after)] == [
        (rn.unit_key("ship", "push", "up"), "Job push, step up")
    ]


def test_the_status_of_a_unit_is_its_stage_or_step_status_and_attempt() -> None:
    state = _triggered()
    state = rn.fold(rn.decide(rn.Advance(at=T0), state), state)
    assert rn.unit_status(state, "build") == ("running", 1)
    assert rn.unit_status(state, rn.unit_key("ship", "push", "up")) == ("pending", 0)


def test_a_key_the_run_does_not_have_has_no_status() -> None:
    state = _triggered()
    assert rn.unit_status(state, "deploy") is None
    assert rn.unit_status(state, rn.unit_key("ship", "push", "down")) is None
    assert rn.unit_status(state, rn.unit_key("ship", "pull", "up")) is None
    assert rn.unit_status(state, rn.unit_key("nowhere", "push", "up")) is None
