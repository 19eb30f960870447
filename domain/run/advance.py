"""The advance of a run: what starts next (the run, the next stage, jobs and steps whose turn has
come) or the end of the run. Asked by the executor, and after every completion."""

from __future__ import annotations

from datetime import datetime

from domain.run.context import evaluate_when, job_context
from domain.run.events import ApprovalRequested, RunEvent, RunStarted, RunSucceeded, StageSkipped, StageStarted
from domain.run.evolve import fold
from domain.run.jobs import advance_jobs
from domain.run.state import RunState


def advance(state: RunState, at: datetime) -> list[RunEvent]:
    """What starts next in a run that is free to go on: the run itself, the next stage, the jobs and
    steps of a stage of jobs whose turn has come, or the end of the run."""
    events: list[RunEvent] = []

    def emit(new: list[RunEvent]) -> None:
        nonlocal state
        events.extend(new)
        state = fold(new, state)

    if state.status == "queued":
        emit([RunStarted(at=at)])
    elif state.status not in ("running", "waiting_approval"):
        return []
    active = state.active_stage
    if active is not None:
        stage = state.stage(active.stage_id)
        if stage.type != "jobs" or active.status != "running":
            return events  # a typed stage runs, or a gate waits
        # Other jobs go on while one waits for approval; a paused run starts nothing new.
        emit(advance_jobs(state, stage, at))
        if state.active_stage is not None or state.status != "running":
            return events
    elif state.status != "running":
        return events
    for stage, sr in zip(state.stages, state.stage_runs, strict=True):
        if sr.status == "queued" and sr.retry_at is not None and sr.retry_at > at:
            return events  # a retry is due later; the executor comes back then
        if sr.status not in ("pending", "queued"):
            continue
        if stage.type == "jobs" and stage.when is not None:
            holds, problem = evaluate_when(stage.when, job_context(state, stage, None))
            if not holds:
                emit([StageSkipped(stage_id=stage.id, reason=problem or f"when is false: {stage.when}", at=at)])
                continue
        emit([StageStarted(stage_id=stage.id, attempt=sr.attempt + 1, at=at)])
        if stage.type == "approval":
            emit([ApprovalRequested(stage_id=stage.id, message=stage.config.get("message"), at=at)])
        elif stage.type == "jobs":
            emit(advance_jobs(state, stage, at))
            if state.active_stage is None and state.status == "running":
                continue  # the stage finished at once (every job skipped): go on to the next
        return events
    emit([RunSucceeded(at=at)])
    return events
