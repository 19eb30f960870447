"""What the executor observes of the events its appends stored: each ended attempt of a stage
with its own duration and outcome, and the run's duration from its start."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from domain import run as rn
from domain.stages import Stage
from infra.app.measures import observe_ended
from infra.metrics import REGISTRY

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def at(seconds: float) -> datetime:
    return T0 + timedelta(seconds=seconds)


def sample(name: str, status: str) -> float:
    return REGISTRY.get_sample_value(name, {"status": status}) or 0.0


def fold(events: list[rn.RunEvent]) -> rn.RunState:
    state = rn.RunState()
    for e in events:
        state = rn.evolve(state, e)
    return state


def triggered() -> rn.RunTriggered:
    stage = Stage(id="s", name="s", type="script", order=1, config={"command": "true"})
    return rn.RunTriggered(
        run_id="r",
        pipeline_id="p",
        organization_id=None,
        definition_version=1,
        stages=(stage,),
        triggered_by="u",
        at=T0,
    )


def test_a_retried_stage_is_observed_once_per_attempt_with_its_outcome_and_the_run_from_its_start() -> None:
    names = ("pipelines_stage_duration_seconds_sum", "pipelines_stage_duration_seconds_count")
    before = {(n, s): sample(n, s) for n in names for s in ("timeout", "succeeded")}
    run_before = sample("pipelines_run_duration_seconds_sum", "succeeded")
    history: list[rn.RunEvent] = [triggered(), rn.RunStarted(at=at(1)), rn.StageStarted(stage_id="s", at=at(2))]
    first: list[rn.RunEvent] = [
        rn.StageRetryScheduled(stage_id="s", attempt=1, status="timeout", retry_at=at(6), at=at(5))
    ]
    observe_ended(fold(history + first), first)
    second: list[rn.RunEvent] = [
        rn.StageStarted(stage_id="s", attempt=2, at=at(6)),
        rn.StageSucceeded(stage_id="s", exit_code=0, at=at(7.5)),
        rn.RunSucceeded(at=at(7.5)),
    ]
    observe_ended(fold(history + first + second), second)

    def grew(name: str, status: str) -> float:
        return sample(name, status) - before[(name, status)]

    # Sums of floats other tests added to: compared approximately.
    assert (grew(names[1], "timeout"), grew(names[0], "timeout")) == (1, pytest.approx(3.0))
    assert (grew(names[1], "succeeded"), grew(names[0], "succeeded")) == (1, pytest.approx(1.5))
    assert sample("pipelines_run_duration_seconds_sum", "succeeded") - run_before == pytest.approx(6.5)


def test_a_run_cancelled_before_it_started_has_no_duration() -> None:
    before = sample("pipelines_run_duration_seconds_count", "cancelled")
    cancel: list[rn.RunEvent] = [rn.RunCancelled(cancelled_by="u", at=at(3))]
    observe_ended(fold([triggered(), *cancel]), cancel)
    assert sample("pipelines_run_duration_seconds_count", "cancelled") == before
