"""How a run's own lifecycle events change its state: triggered, started, paused, resumed, ended."""

from __future__ import annotations

import msgspec

from domain.run.ending import end_run
from domain.run.events import (
    RunCancelled,
    RunFailed,
    RunPaused,
    RunResumed,
    RunStarted,
    RunStopped,
    RunSucceeded,
    RunTriggered,
)
from domain.run.state import JobRun, RunState, StageRun, StepRun


def run_triggered(event: RunTriggered) -> RunState:
    return RunState(
        exists=True,
        run_id=event.run_id,
        pipeline_id=event.pipeline_id,
        organization_id=event.organization_id,
        status="queued",
        definition_version=event.definition_version,
        stages=event.stages,
        stage_runs=tuple(
            StageRun(
                stage_id=s.id,
                jobs=tuple(JobRun(name=j.name, steps=tuple(StepRun(name=st.name) for st in j.steps)) for j in s.jobs),
            )
            for s in event.stages
        ),
        variables=event.variables,
        secret_names=event.secret_names,
        trigger=event.trigger,
        triggered_by=event.triggered_by,
        created_at=event.at,
        updated_at=event.at,
    )


def run_started(state: RunState, event: RunStarted) -> RunState:
    return msgspec.structs.replace(state, status="running", started_at=event.at, updated_at=event.at)


def run_paused(state: RunState, event: RunPaused) -> RunState:
    return msgspec.structs.replace(
        state, status="paused", updated_at=event.at, status_by=event.paused_by, status_reason=event.reason
    )


def run_resumed(state: RunState, event: RunResumed) -> RunState:
    return msgspec.structs.replace(
        state, status="running", updated_at=event.at, status_by=event.resumed_by, status_reason=event.reason
    )


def run_cancelled(state: RunState, event: RunCancelled) -> RunState:
    return end_run(state, "cancelled", event.at, event.cancelled_by, event.reason)


def run_stopped(state: RunState, event: RunStopped) -> RunState:
    return end_run(state, "cancelled", event.at, event.stopped_by, event.reason)


def run_succeeded(state: RunState, event: RunSucceeded) -> RunState:
    return end_run(state, "succeeded", event.at, None, None)


def run_failed(state: RunState, event: RunFailed) -> RunState:
    return end_run(state, "failed", event.at, None, event.reason)
