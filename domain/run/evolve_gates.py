"""How approval gates change a run's state: a gate opens (an approval stage, or an approval step of
a job), and is approved or rejected."""

from __future__ import annotations

import msgspec

from domain.run.ending import end_run
from domain.run.events import ApprovalRequested, RunApproved, RunRejected
from domain.run.patch import set_stage, set_step
from domain.run.state import Approval, RunState, ended_attempt


def gate_answered(state: RunState) -> RunState:
    """After a gate of a job closes, the run waits only while another gate is open."""
    if state.status == "waiting_approval" and not state.open_gates:
        return msgspec.structs.replace(state, status="running")
    return state


def approval_requested(state: RunState, event: ApprovalRequested) -> RunState:
    if event.job is not None and event.step is not None:
        state = set_step(state, event.stage_id, event.job, event.step, status="waiting_approval")
        return msgspec.structs.replace(state, status="waiting_approval", updated_at=event.at)
    runs = set_stage(state, event.stage_id, status="waiting_approval")
    return msgspec.structs.replace(state, stage_runs=runs, status="waiting_approval", updated_at=event.at)


def run_approved(state: RunState, event: RunApproved) -> RunState:
    if event.job is not None and event.step is not None:
        return _step_approved(state, event, event.job, event.step)
    runs = set_stage(state, event.stage_id, status="succeeded", finished_at=event.at)
    approval = Approval(
        stage_id=event.stage_id, decision="approved", by=event.approved_by, comment=event.comment, at=event.at
    )
    return msgspec.structs.replace(
        state, stage_runs=runs, status="running", updated_at=event.at, approvals=(*state.approvals, approval)
    )


def _step_approved(state: RunState, event: RunApproved, job: str, step: str) -> RunState:
    st = state.step_run(event.stage_id, job, step)
    state = set_step(
        state,
        event.stage_id,
        job,
        step,
        status="succeeded",
        finished_at=event.at,
        attempts=(*st.attempts, ended_attempt(st, "succeeded", event.at, None, None)),
    )
    approval = Approval(
        stage_id=event.stage_id,
        job=job,
        step=step,
        decision="approved",
        by=event.approved_by,
        comment=event.comment,
        at=event.at,
    )
    state = msgspec.structs.replace(state, updated_at=event.at, approvals=(*state.approvals, approval))
    return gate_answered(state)


def run_rejected(state: RunState, event: RunRejected) -> RunState:
    """A rejected gate fails the run."""
    error = f"rejected by {event.rejected_by}" + (f": {event.reason}" if event.reason else "")
    if event.job is not None and event.step is not None:
        st = state.step_run(event.stage_id, event.job, event.step)
        state = set_step(
            state,
            event.stage_id,
            event.job,
            event.step,
            status="failed",
            finished_at=event.at,
            error=error,
            attempts=(*st.attempts, ended_attempt(st, "failed", event.at, error, None)),
        )
        approval = Approval(
            stage_id=event.stage_id,
            job=event.job,
            step=event.step,
            decision="rejected",
            by=event.rejected_by,
            comment=event.reason,
            at=event.at,
        )
    else:
        runs = set_stage(state, event.stage_id, status="failed", finished_at=event.at, error=error)
        state = msgspec.structs.replace(state, stage_runs=runs)
        approval = Approval(
            stage_id=event.stage_id, decision="rejected", by=event.rejected_by, comment=event.reason, at=event.at
        )
    state = msgspec.structs.replace(state, approvals=(*state.approvals, approval))
    return end_run(state, "failed", event.at, event.rejected_by, event.reason)
