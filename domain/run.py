"""The Run aggregate as a Decider: pure `decide` and `evolve`.

A run is driven by two kinds of callers: people (approve, reject, cancel, stop, pause,
resume) and the executor (advance, complete a stage). Every decision is made against the
state folded from the run's own stream, and the events are appended under optimistic
concurrency, so a stale caller loses instead of overwriting (cancelled stays cancelled).
"""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any, Literal

import msgspec

from domain.errors import NotFound, Refused
from domain.stages import Stage

RunStatus = Literal["queued", "running", "waiting_approval", "paused", "succeeded", "failed", "cancelled"]
StageStatus = Literal[
    "pending",
    "queued",
    "running",
    "waiting_approval",
    "succeeded",
    "failed",
    "cancelled",
    "timeout",
    "skipped",
]
TERMINAL: frozenset[str] = frozenset({"succeeded", "failed", "cancelled"})
STAGE_DONE: frozenset[str] = frozenset({"succeeded", "failed", "cancelled", "timeout", "skipped"})

# ---- commands ------------------------------------------------------------------------------


class TriggerRun(msgspec.Struct, frozen=True, kw_only=True, tag="trigger_run"):
    run_id: str
    pipeline_id: str
    organization_id: str | None
    definition_version: int
    stages: tuple[Stage, ...]
    variables: dict[str, str] = msgspec.field(default_factory=dict)
    # Only the names: secret values never enter an event.
    secret_names: tuple[str, ...] = ()
    # What started the run: {"type": "manual"}, {"type": "cron", ...}, {"type": "event", ...}.
    trigger: dict[str, Any] = msgspec.field(default_factory=lambda: {"type": "manual"})
    by: str
    at: datetime


class Advance(msgspec.Struct, frozen=True, kw_only=True, tag="advance"):
    """The executor asks for the next thing to do: start the run, the next stage, or finish."""

    at: datetime


class CompleteStage(msgspec.Struct, frozen=True, kw_only=True, tag="complete_stage"):
    stage_id: str
    attempt: int
    succeeded: bool
    # failed, timeout or cancelled (a stopped run's killed stage)
    failure: Literal["failed", "timeout", "cancelled"] = "failed"
    error: str | None = None
    exit_code: int | None = None
    at: datetime


class ExpireApproval(msgspec.Struct, frozen=True, kw_only=True, tag="expire_approval"):
    """Nobody approved or rejected the gate within its timeout."""

    stage_id: str
    at: datetime


class _Control(msgspec.Struct, frozen=True, kw_only=True):
    by: str
    reason: str | None = None
    at: datetime


class Approve(_Control, frozen=True, kw_only=True, tag="approve"):
    pass


class Reject(_Control, frozen=True, kw_only=True, tag="reject"):
    pass


class Cancel(_Control, frozen=True, kw_only=True, tag="cancel"):
    pass


class Stop(_Control, frozen=True, kw_only=True, tag="stop"):
    pass


class Pause(_Control, frozen=True, kw_only=True, tag="pause"):
    pass


class Resume(_Control, frozen=True, kw_only=True, tag="resume"):
    pass


RunCommand = TriggerRun | Advance | CompleteStage | ExpireApproval | Approve | Reject | Cancel | Stop | Pause | Resume

# ---- events --------------------------------------------------------------------------------


class RunTriggered(msgspec.Struct, frozen=True, kw_only=True, tag="run_triggered"):
    run_id: str
    pipeline_id: str
    organization_id: str | None
    definition_version: int
    stages: tuple[Stage, ...]
    variables: dict[str, str] = msgspec.field(default_factory=dict)
    secret_names: tuple[str, ...] = ()
    trigger: dict[str, Any] = msgspec.field(default_factory=lambda: {"type": "manual"})
    triggered_by: str
    at: datetime


class RunStarted(msgspec.Struct, frozen=True, kw_only=True, tag="run_started"):
    at: datetime


class StageStarted(msgspec.Struct, frozen=True, kw_only=True, tag="stage_started"):
    stage_id: str
    attempt: int = 1
    at: datetime


class ApprovalRequested(msgspec.Struct, frozen=True, kw_only=True, tag="approval_requested"):
    stage_id: str
    message: str | None = None
    at: datetime


class StageSucceeded(msgspec.Struct, frozen=True, kw_only=True, tag="stage_succeeded"):
    stage_id: str
    exit_code: int | None = None
    at: datetime


class StageFailed(msgspec.Struct, frozen=True, kw_only=True, tag="stage_failed"):
    stage_id: str
    status: Literal["failed", "timeout", "cancelled"] = "failed"
    error: str | None = None
    exit_code: int | None = None
    at: datetime


class StageRetryScheduled(msgspec.Struct, frozen=True, kw_only=True, tag="stage_retry_scheduled"):
    """An attempt failed and the stage's retry policy allows another, not before `retry_at`."""

    stage_id: str
    attempt: int
    status: Literal["failed", "timeout"] = "failed"
    error: str | None = None
    exit_code: int | None = None
    retry_at: datetime
    at: datetime


class RunApproved(msgspec.Struct, frozen=True, kw_only=True, tag="run_approved"):
    stage_id: str
    approved_by: str
    comment: str | None = None
    at: datetime


class RunRejected(msgspec.Struct, frozen=True, kw_only=True, tag="run_rejected"):
    stage_id: str
    rejected_by: str
    reason: str | None = None
    at: datetime


class RunCancelled(msgspec.Struct, frozen=True, kw_only=True, tag="run_cancelled"):
    cancelled_by: str
    reason: str | None = None
    at: datetime


class RunStopped(msgspec.Struct, frozen=True, kw_only=True, tag="run_stopped"):
    stopped_by: str
    reason: str | None = None
    at: datetime


class RunPaused(msgspec.Struct, frozen=True, kw_only=True, tag="run_paused"):
    paused_by: str
    reason: str | None = None
    at: datetime


class RunResumed(msgspec.Struct, frozen=True, kw_only=True, tag="run_resumed"):
    resumed_by: str
    reason: str | None = None
    at: datetime


class RunSucceeded(msgspec.Struct, frozen=True, kw_only=True, tag="run_succeeded"):
    at: datetime


class RunFailed(msgspec.Struct, frozen=True, kw_only=True, tag="run_failed"):
    stage_id: str | None = None
    reason: str | None = None
    at: datetime


class LogLine(msgspec.Struct, frozen=True, array_like=True):
    stream: Literal["stdout", "stderr", "system"]
    text: str


class LogAppended(msgspec.Struct, frozen=True, kw_only=True, tag="log_appended"):
    """Lines of a run's log. Kept on the run's own log stream so loading a run stays cheap."""

    stage_id: str | None
    lines: tuple[LogLine, ...]
    at: datetime


RunEvent = (
    RunTriggered
    | RunStarted
    | StageStarted
    | ApprovalRequested
    | StageSucceeded
    | StageFailed
    | StageRetryScheduled
    | RunApproved
    | RunRejected
    | RunCancelled
    | RunStopped
    | RunPaused
    | RunResumed
    | RunSucceeded
    | RunFailed
)

# ---- state ---------------------------------------------------------------------------------


class AttemptResult(msgspec.Struct, frozen=True, kw_only=True):
    attempt: int
    status: StageStatus
    started_at: datetime | None
    finished_at: datetime | None
    error: str | None = None
    exit_code: int | None = None


class StageRun(msgspec.Struct, frozen=True, kw_only=True):
    stage_id: str
    status: StageStatus = "pending"
    attempt: int = 0
    started_at: datetime | None = None
    finished_at: datetime | None = None
    error: str | None = None
    exit_code: int | None = None
    # When a failed attempt is to be retried (status `queued` until then).
    retry_at: datetime | None = None
    attempts: tuple[AttemptResult, ...] = ()

    def ended_attempt(
        self, status: StageStatus, at: datetime, error: str | None, exit_code: int | None
    ) -> AttemptResult:
        return AttemptResult(
            attempt=self.attempt,
            status=status,
            started_at=self.started_at,
            finished_at=at,
            error=error,
            exit_code=exit_code,
        )


class Approval(msgspec.Struct, frozen=True, kw_only=True):
    stage_id: str
    decision: Literal["approved", "rejected"]
    by: str
    comment: str | None
    at: datetime


class RunState(msgspec.Struct, frozen=True, kw_only=True):
    exists: bool = False
    run_id: str = ""
    pipeline_id: str = ""
    organization_id: str | None = None
    status: RunStatus = "queued"
    definition_version: int = 0
    stages: tuple[Stage, ...] = ()
    stage_runs: tuple[StageRun, ...] = ()
    variables: dict[str, str] = msgspec.field(default_factory=dict)
    secret_names: tuple[str, ...] = ()
    trigger: dict[str, Any] = msgspec.field(default_factory=lambda: {"type": "manual"})
    triggered_by: str = ""
    created_at: datetime | None = None
    started_at: datetime | None = None
    finished_at: datetime | None = None
    updated_at: datetime | None = None
    approvals: tuple[Approval, ...] = ()
    # Who ended or held the run, and why (cancel, stop, pause, reject, failure).
    status_reason: str | None = None
    status_by: str | None = None

    @property
    def terminal(self) -> bool:
        return self.status in TERMINAL

    def stage_index(self, stage_id: str) -> int:
        for i, sr in enumerate(self.stage_runs):
            if sr.stage_id == stage_id:
                return i
        raise Refused(f"run has no stage {stage_id!r}")

    @property
    def next_retry_at(self) -> datetime | None:
        """When a stage waiting to be retried may start (the executor sleeps until then)."""
        if self.status != "running":
            return None
        return next((sr.retry_at for sr in self.stage_runs if sr.status == "queued"), None)

    def stage(self, stage_id: str) -> Stage:
        return self.stages[self.stage_index(stage_id)]

    @property
    def active_stage(self) -> StageRun | None:
        """The stage running or waiting for approval, if any."""
        for sr in self.stage_runs:
            if sr.status in ("running", "waiting_approval"):
                return sr
        return None


initial_state = RunState()


# ---- decide --------------------------------------------------------------------------------


def _advance(state: RunState, at: datetime) -> list[RunEvent]:
    """What starts next in a run that is free to go on (queued, or running with no active stage)."""
    events: list[RunEvent] = []
    if state.status == "queued":
        events.append(RunStarted(at=at))
    elif state.status != "running" or state.active_stage is not None:
        return []
    for stage, sr in zip(state.stages, state.stage_runs, strict=True):
        if sr.status == "queued" and sr.retry_at is not None and sr.retry_at > at:
            return events  # a retry is due later; the executor comes back then
        if sr.status not in ("pending", "queued"):
            continue
        events.append(StageStarted(stage_id=stage.id, attempt=sr.attempt + 1, at=at))
        if stage.type == "approval":
            events.append(ApprovalRequested(stage_id=stage.id, message=stage.config.get("message"), at=at))
        return events
    events.append(RunSucceeded(at=at))
    return events


def _require(state: RunState, allowed: tuple[str, ...], verb: str) -> None:
    if state.status not in allowed:
        if state.terminal:
            raise Refused(f"cannot {verb} run: it is already {state.status}")
        raise Refused(f"cannot {verb} run in status {state.status}")


def decide(command: RunCommand, state: RunState) -> list[RunEvent]:
    if not isinstance(command, TriggerRun) and not state.exists:
        raise NotFound("run not found")
    match command:
        case TriggerRun():
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
        case Advance():
            return _advance(state, command.at)
        case CompleteStage():
            sr = state.stage_runs[state.stage_index(command.stage_id)]
            if sr.status != "running" or sr.attempt != command.attempt:
                raise Refused(f"stage {command.stage_id} attempt {command.attempt} is not running (it is {sr.status})")
            if command.succeeded:
                done: RunEvent = StageSucceeded(stage_id=command.stage_id, exit_code=command.exit_code, at=command.at)
                return [done, *_advance(evolve(state, done), command.at)]
            retry = state.stage(command.stage_id).retry
            if (
                command.failure != "cancelled"
                and retry is not None
                and command.attempt < retry.max_attempts
                and state.status in ("running", "paused")
            ):
                # The wait grows: backoff, 2 x backoff, 4 x backoff, ...
                delay = retry.backoff * (2 ** (command.attempt - 1))
                return [
                    StageRetryScheduled(
                        stage_id=command.stage_id,
                        attempt=command.attempt,
                        status="timeout" if command.failure == "timeout" else "failed",
                        error=command.error,
                        exit_code=command.exit_code,
                        retry_at=command.at + timedelta(seconds=delay),
                        at=command.at,
                    )
                ]
            failed = StageFailed(
                stage_id=command.stage_id,
                status=command.failure,
                error=command.error,
                exit_code=command.exit_code,
                at=command.at,
            )
            if state.status in ("running", "paused"):
                return [failed, RunFailed(stage_id=command.stage_id, reason=command.error, at=command.at)]
            return [failed]
        case ExpireApproval():
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
        case Approve():
            _require(state, ("waiting_approval",), "approve")
            gate = state.active_stage
            assert gate is not None
            return [RunApproved(stage_id=gate.stage_id, approved_by=command.by, comment=command.reason, at=command.at)]
        case Reject():
            _require(state, ("waiting_approval",), "reject")
            gate = state.active_stage
            assert gate is not None
            return [RunRejected(stage_id=gate.stage_id, rejected_by=command.by, reason=command.reason, at=command.at)]
        case Cancel():
            _require(state, ("queued", "running", "waiting_approval", "paused"), "cancel")
            return [RunCancelled(cancelled_by=command.by, reason=command.reason, at=command.at)]
        case Stop():
            _require(state, ("queued", "running", "waiting_approval", "paused"), "stop")
            return [RunStopped(stopped_by=command.by, reason=command.reason, at=command.at)]
        case Pause():
            _require(state, ("running",), "pause")
            return [RunPaused(paused_by=command.by, reason=command.reason, at=command.at)]
        case Resume():
            _require(state, ("paused",), "resume")
            return [RunResumed(resumed_by=command.by, reason=command.reason, at=command.at)]


# ---- evolve --------------------------------------------------------------------------------


def _set_stage(state: RunState, stage_id: str, **changes: object) -> tuple[StageRun, ...]:
    i = state.stage_index(stage_id)
    runs = list(state.stage_runs)
    runs[i] = msgspec.structs.replace(runs[i], **changes)
    return tuple(runs)


def _end(state: RunState, status: RunStatus, at: datetime, by: str | None, reason: str | None) -> RunState:
    """Finish the run: unreached stages are skipped, a waiting gate is cancelled."""
    runs = tuple(
        msgspec.structs.replace(sr, status="skipped")
        if sr.status == "pending"
        else msgspec.structs.replace(sr, status="cancelled", finished_at=at, retry_at=None)
        if sr.status in ("waiting_approval", "queued")
        else sr
        for sr in state.stage_runs
    )
    return msgspec.structs.replace(
        state,
        status=status,
        stage_runs=runs,
        finished_at=at,
        updated_at=at,
        status_by=by,
        status_reason=reason,
    )


def evolve(state: RunState, event: RunEvent) -> RunState:
    r = msgspec.structs.replace
    match event:
        case RunTriggered():
            return RunState(
                exists=True,
                run_id=event.run_id,
                pipeline_id=event.pipeline_id,
                organization_id=event.organization_id,
                status="queued",
                definition_version=event.definition_version,
                stages=event.stages,
                stage_runs=tuple(StageRun(stage_id=s.id) for s in event.stages),
                variables=event.variables,
                secret_names=event.secret_names,
                trigger=event.trigger,
                triggered_by=event.triggered_by,
                created_at=event.at,
                updated_at=event.at,
            )
        case RunStarted():
            return r(state, status="running", started_at=event.at, updated_at=event.at)
        case StageStarted():
            runs = _set_stage(
                state,
                event.stage_id,
                status="running",
                attempt=event.attempt,
                started_at=event.at,
                finished_at=None,
                error=None,
                exit_code=None,
                retry_at=None,
            )
            return r(state, stage_runs=runs, updated_at=event.at)
        case ApprovalRequested():
            runs = _set_stage(state, event.stage_id, status="waiting_approval")
            return r(state, stage_runs=runs, status="waiting_approval", updated_at=event.at)
        case StageSucceeded():
            sr = state.stage_runs[state.stage_index(event.stage_id)]
            runs = _set_stage(
                state,
                event.stage_id,
                status="succeeded",
                finished_at=event.at,
                exit_code=event.exit_code,
                attempts=(*sr.attempts, sr.ended_attempt("succeeded", event.at, None, event.exit_code)),
            )
            return r(state, stage_runs=runs, updated_at=event.at)
        case StageFailed():
            sr = state.stage_runs[state.stage_index(event.stage_id)]
            runs = _set_stage(
                state,
                event.stage_id,
                status=event.status,
                finished_at=event.at,
                error=event.error,
                exit_code=event.exit_code,
                attempts=(*sr.attempts, sr.ended_attempt(event.status, event.at, event.error, event.exit_code)),
            )
            return r(state, stage_runs=runs, updated_at=event.at)
        case StageRetryScheduled():
            sr = state.stage_runs[state.stage_index(event.stage_id)]
            runs = _set_stage(
                state,
                event.stage_id,
                status="queued",
                finished_at=event.at,
                error=event.error,
                exit_code=event.exit_code,
                retry_at=event.retry_at,
                attempts=(*sr.attempts, sr.ended_attempt(event.status, event.at, event.error, event.exit_code)),
            )
            return r(state, stage_runs=runs, updated_at=event.at)
        case RunApproved():
            runs = _set_stage(state, event.stage_id, status="succeeded", finished_at=event.at)
            approval = Approval(
                stage_id=event.stage_id,
                decision="approved",
                by=event.approved_by,
                comment=event.comment,
                at=event.at,
            )
            return r(
                state,
                stage_runs=runs,
                status="running",
                updated_at=event.at,
                approvals=(*state.approvals, approval),
            )
        case RunRejected():
            runs = _set_stage(
                state,
                event.stage_id,
                status="failed",
                finished_at=event.at,
                error=f"rejected by {event.rejected_by}" + (f": {event.reason}" if event.reason else ""),
            )
            approval = Approval(
                stage_id=event.stage_id,
                decision="rejected",
                by=event.rejected_by,
                comment=event.reason,
                at=event.at,
            )
            state = r(state, stage_runs=runs, approvals=(*state.approvals, approval))
            return _end(state, "failed", event.at, event.rejected_by, event.reason)
        case RunCancelled():
            return _end(state, "cancelled", event.at, event.cancelled_by, event.reason)
        case RunStopped():
            return _end(state, "cancelled", event.at, event.stopped_by, event.reason)
        case RunPaused():
            return r(
                state,
                status="paused",
                updated_at=event.at,
                status_by=event.paused_by,
                status_reason=event.reason,
            )
        case RunResumed():
            return r(
                state,
                status="running",
                updated_at=event.at,
                status_by=event.resumed_by,
                status_reason=event.reason,
            )
        case RunSucceeded():
            return _end(state, "succeeded", event.at, None, None)
        case RunFailed():
            return _end(state, "failed", event.at, None, event.reason)


def fold(events: list[RunEvent], state: RunState = initial_state) -> RunState:
    for e in events:
        state = evolve(state, e)
    return state
