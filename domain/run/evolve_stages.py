"""How a stage's events change a run's state: started, succeeded, failed, retry scheduled, skipped."""

from __future__ import annotations

import msgspec

from domain.run.events import StageFailed, StageRetryScheduled, StageSkipped, StageStarted, StageSucceeded
from domain.run.patch import set_stage
from domain.run.state import RunState, ended_attempt


def stage_started(state: RunState, event: StageStarted) -> RunState:
    runs = set_stage(
        state,
        event.stage_id,
        status="running",
        attempt=event.attempt,
        started_at=event.at,
        finished_at=None,
        error=None,
        exit_code=None,
        retry_at=None,
        waiting_for=None,
    )
    return msgspec.structs.replace(state, stage_runs=runs, updated_at=event.at)


def stage_succeeded(state: RunState, event: StageSucceeded) -> RunState:
    sr = state.stage_runs[state.stage_index(event.stage_id)]
    runs = set_stage(
        state,
        event.stage_id,
        status="succeeded",
        finished_at=event.at,
        exit_code=event.exit_code,
        attempts=(*sr.attempts, ended_attempt(sr, "succeeded", event.at, None, event.exit_code)),
    )
    return msgspec.structs.replace(state, stage_runs=runs, updated_at=event.at)


def stage_failed(state: RunState, event: StageFailed) -> RunState:
    sr = state.stage_runs[state.stage_index(event.stage_id)]
    runs = set_stage(
        state,
        event.stage_id,
        status=event.status,
        finished_at=event.at,
        error=event.error,
        exit_code=event.exit_code,
        attempts=(*sr.attempts, ended_attempt(sr, event.status, event.at, event.error, event.exit_code)),
    )
    return msgspec.structs.replace(state, stage_runs=runs, updated_at=event.at)


def stage_retry_scheduled(state: RunState, event: StageRetryScheduled) -> RunState:
    sr = state.stage_runs[state.stage_index(event.stage_id)]
    runs = set_stage(
        state,
        event.stage_id,
        status="queued",
        finished_at=event.at,
        error=event.error,
        exit_code=event.exit_code,
        retry_at=event.retry_at,
        attempts=(*sr.attempts, ended_attempt(sr, event.status, event.at, event.error, event.exit_code)),
    )
    return msgspec.structs.replace(state, stage_runs=runs, updated_at=event.at)


def stage_skipped(state: RunState, event: StageSkipped) -> RunState:
    """A stage of jobs whose `when` is false: its jobs and steps are skipped with it."""
    r = msgspec.structs.replace
    runs = set_stage(state, event.stage_id, status="skipped", error=event.reason)
    sr = runs[state.stage_index(event.stage_id)]
    jobs = tuple(r(jr, status="skipped", steps=tuple(r(st, status="skipped") for st in jr.steps)) for jr in sr.jobs)
    runs = set_stage(r(state, stage_runs=runs), event.stage_id, jobs=jobs)
    return r(state, stage_runs=runs, updated_at=event.at)
