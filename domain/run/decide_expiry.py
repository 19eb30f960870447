"""Decisions on an approval that nobody answered within its timeout (the executor's timer asks)."""

from __future__ import annotations

from datetime import timedelta

from domain.errors import Refused
from domain.run.commands import ExpireApproval
from domain.run.events import RunEvent, RunFailed, StageFailed, StepFinished
from domain.run.state import RunState


def expire_approval(command: ExpireApproval, state: RunState) -> list[RunEvent]:
    if command.job is not None and command.step is not None:
        return _expire_step(command, state, command.job, command.step)
    return _expire_stage(command, state)


def _expire_step(command: ExpireApproval, state: RunState, job: str, step_name: str) -> list[RunEvent]:
    """The approval step times out; its job decides what follows (as for any failed step)."""
    st = state.step_run(command.stage_id, job, step_name)
    step = state.step(command.stage_id, job, step_name)
    if st.status != "waiting_approval":
        raise Refused(f"step {step_name} of job {job} is not waiting for approval (it is {st.status})")
    if step.timeout is None or st.started_at is None:
        raise Refused(f"step {step_name} of job {job} has no approval timeout")
    if command.at < st.started_at + timedelta(seconds=step.timeout):
        raise Refused(f"the approval of step {step_name} of job {job} has not timed out yet")
    return [
        StepFinished(
            stage_id=command.stage_id,
            job=job,
            step=step_name,
            attempt=st.attempt,
            status="timeout",
            error=f"approval timed out after {step.timeout:g} s",
            at=command.at,
        )
    ]


def _expire_stage(command: ExpireApproval, state: RunState) -> list[RunEvent]:
    """The approval stage times out, and the run fails with it."""
    gate = state.active_stage
    stage = state.stage(command.stage_id)
    if state.status != "waiting_approval" or gate is None or gate.stage_id != command.stage_id:
        raise Refused(f"stage {command.stage_id} is not waiting for approval (run is {state.status})")
    if stage.timeout is None or gate.started_at is None:
        raise Refused(f"stage {command.stage_id} has no approval timeout")
    if command.at < gate.started_at + timedelta(seconds=stage.timeout):
        raise Refused(f"the approval of stage {command.stage_id} has not timed out yet")
    reason = f"approval timed out after {stage.timeout:g} s"
    return [
        StageFailed(stage_id=command.stage_id, status="timeout", error=reason, at=command.at),
        RunFailed(stage_id=command.stage_id, reason=reason, at=command.at),
    ]
