"""Decisions on the commands of people: approve or reject the open gate, cancel, stop, pause,
resume. Each is allowed in some run statuses only."""

from __future__ import annotations

from domain.errors import Refused
from domain.run.commands import Approve, Cancel, Pause, Reject, Resume, Stop
from domain.run.events import RunApproved, RunCancelled, RunEvent, RunPaused, RunRejected, RunResumed, RunStopped
from domain.run.state import RunState

_LIVE = ("queued", "running", "waiting_approval", "paused")


def _require(state: RunState, allowed: tuple[str, ...], verb: str) -> None:
    if state.status not in allowed:
        if state.terminal:
            raise Refused(f"cannot {verb} run: it is already {state.status}")
        raise Refused(f"cannot {verb} run in status {state.status}")


def approve(command: Approve, state: RunState) -> list[RunEvent]:
    # With several gates open at once (approval steps of parallel jobs), one approval
    # answers the first of them; the run waits until every gate is answered.
    _require(state, ("waiting_approval",), "approve")
    first = state.open_gates[0]
    approved = RunApproved(
        stage_id=first.stage_id,
        job=first.job,
        step=first.step,
        approved_by=command.by,
        comment=command.reason,
        at=command.at,
    )
    # Nothing starts here: the executor, hearing the approval, starts what comes next (and
    # takes the leases of what it starts).
    return [approved]


def reject(command: Reject, state: RunState) -> list[RunEvent]:
    _require(state, ("waiting_approval",), "reject")
    first = state.open_gates[0]
    return [
        RunRejected(
            stage_id=first.stage_id,
            job=first.job,
            step=first.step,
            rejected_by=command.by,
            reason=command.reason,
            at=command.at,
        )
    ]


def cancel(command: Cancel, state: RunState) -> list[RunEvent]:
    _require(state, _LIVE, "cancel")
    return [RunCancelled(cancelled_by=command.by, reason=command.reason, at=command.at)]


def stop(command: Stop, state: RunState) -> list[RunEvent]:
    _require(state, _LIVE, "stop")
    return [RunStopped(stopped_by=command.by, reason=command.reason, at=command.at)]


def pause(command: Pause, state: RunState) -> list[RunEvent]:
    _require(state, ("running",), "pause")
    return [RunPaused(paused_by=command.by, reason=command.reason, at=command.at)]


def resume(command: Resume, state: RunState) -> list[RunEvent]:
    _require(state, ("paused",), "resume")
    return [RunResumed(resumed_by=command.by, reason=command.reason, at=command.at)]
