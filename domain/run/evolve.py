"""`evolve`: the state after one event, each event family handled in its own module; `fold`."""

from __future__ import annotations

from domain.run.events import (
    ApprovalRequested,
    JobFinished,
    JobStarted,
    RunApproved,
    RunCancelled,
    RunEvent,
    RunFailed,
    RunPaused,
    RunRejected,
    RunResumed,
    RunStarted,
    RunStopped,
    RunSucceeded,
    RunTriggered,
    StageFailed,
    StageRetryScheduled,
    StageSkipped,
    StageStarted,
    StageSucceeded,
    StepFinished,
    StepRetryScheduled,
    StepStarted,
    UnitWaiting,
)
from domain.run.evolve_gates import approval_requested, run_approved, run_rejected
from domain.run.evolve_jobs import (
    job_finished,
    job_started,
    step_finished,
    step_retry_scheduled,
    step_started,
    unit_waiting,
)
from domain.run.evolve_run import (
    run_cancelled,
    run_failed,
    run_paused,
    run_resumed,
    run_started,
    run_stopped,
    run_succeeded,
    run_triggered,
)
from domain.run.evolve_stages import stage_failed, stage_retry_scheduled, stage_skipped, stage_started, stage_succeeded
from domain.run.state import RunState, initial_state


def evolve(state: RunState, event: RunEvent) -> RunState:
    match event:
        case RunTriggered():
            return run_triggered(event)
        case RunStarted():
            return run_started(state, event)
        case RunPaused():
            return run_paused(state, event)
        case RunResumed():
            return run_resumed(state, event)
        case RunCancelled():
            return run_cancelled(state, event)
        case RunStopped():
            return run_stopped(state, event)
        case RunSucceeded():
            return run_succeeded(state, event)
        case RunFailed():
            return run_failed(state, event)
        case StageStarted():
            return stage_started(state, event)
        case StageSucceeded():
            return stage_succeeded(state, event)
        case StageFailed():
            return stage_failed(state, event)
        case StageRetryScheduled():
            return stage_retry_scheduled(state, event)
        case StageSkipped():
            return stage_skipped(state, event)
        case ApprovalRequested():
            return approval_requested(state, event)
        case RunApproved():
            return run_approved(state, event)
        case RunRejected():
            return run_rejected(state, event)
        case JobStarted():
            return job_started(state, event)
        case JobFinished():
            return job_finished(state, event)
        case StepStarted():
            return step_started(state, event)
        case StepFinished():
            return step_finished(state, event)
        case StepRetryScheduled():
            return step_retry_scheduled(state, event)
        case UnitWaiting():
            return unit_waiting(state, event)


def fold(events: list[RunEvent], state: RunState = initial_state) -> RunState:
    for e in events:
        state = evolve(state, e)
    return state
