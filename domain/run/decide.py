"""`decide`: the events a command produces against a run's state, or `Refused`/`NotFound`. Each
kind of command is decided in its own module."""

from __future__ import annotations

from domain.errors import NotFound, Refused
from domain.run.advance import advance
from domain.run.commands import (
    Advance,
    Approve,
    Cancel,
    CompleteStage,
    CompleteStep,
    ExpireApproval,
    NoteWaiting,
    Pause,
    Reject,
    Resume,
    RunCommand,
    Stop,
    TriggerRun,
)
from domain.run.decide_completion import complete_stage, complete_step
from domain.run.decide_control import approve, cancel, pause, reject, resume, stop
from domain.run.decide_expiry import expire_approval
from domain.run.events import RunEvent, RunTriggered, UnitWaiting
from domain.run.state import RunState, StageRun, StepRun


def decide(command: RunCommand, state: RunState) -> list[RunEvent]:
    if not isinstance(command, TriggerRun) and not state.exists:
        raise NotFound("run not found")
    match command:
        case TriggerRun():
            return _trigger(command, state)
        case Advance():
            return advance(state, command.at)
        case CompleteStage():
            return complete_stage(command, state)
        case CompleteStep():
            return complete_step(command, state)
        case ExpireApproval():
            return expire_approval(command, state)
        case Approve():
            return approve(command, state)
        case Reject():
            return reject(command, state)
        case Cancel():
            return cancel(command, state)
        case Stop():
            return stop(command, state)
        case Pause():
            return pause(command, state)
        case Resume():
            return resume(command, state)
        case NoteWaiting():
            return _note_waiting(command, state)


def _trigger(command: TriggerRun, state: RunState) -> list[RunEvent]:
    if state.exists:
        raise Refused(f"run {command.run_id} already exists")
    return [
        RunTriggered(
            run_id=command.run_id,
            pipeline_id=command.pipeline_id,
            organization_id=command.organization_id,
            definition_version=command.definition_version,
            stages=command.stages,
            variables=command.variables,
            secret_names=command.secret_names,
            trigger=command.trigger,
            triggered_by=command.by,
            at=command.at,
        )
    ]


def _note_waiting(command: NoteWaiting, state: RunState) -> list[RunEvent]:
    """A note on the attempt that runs now, when it changes what is known; nothing otherwise."""
    try:
        if command.job is None or command.step is None:
            run: StageRun | StepRun = state.stage_runs[state.stage_index(command.stage_id)]
        else:
            run = state.step_run(command.stage_id, command.job, command.step)
    except Refused:
        return []
    if run.status != "running" or run.attempt != command.attempt or run.waiting_for == command.reason:
        return []
    return [
        UnitWaiting(
            stage_id=command.stage_id,
            job=command.job,
            step=command.step,
            attempt=command.attempt,
            reason=command.reason,
            at=command.at,
        )
    ]
