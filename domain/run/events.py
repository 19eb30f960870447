"""The events of a run's stream (and of its log stream). A storage contract: add fields with
defaults; never change a field's type or a tag."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

import msgspec

from domain.stages import Stage


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
    # Set when the gate is an approval step of a job.
    job: str | None = None
    step: str | None = None
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
    job: str | None = None
    step: str | None = None
    at: datetime


class RunRejected(msgspec.Struct, frozen=True, kw_only=True, tag="run_rejected"):
    stage_id: str
    rejected_by: str
    reason: str | None = None
    job: str | None = None
    step: str | None = None
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


class StageSkipped(msgspec.Struct, frozen=True, kw_only=True, tag="stage_skipped"):
    """A stage of jobs whose `when` is false."""

    stage_id: str
    reason: str | None = None
    at: datetime


JobOutcome = Literal["succeeded", "failed", "cancelled", "timeout", "skipped"]


class JobStarted(msgspec.Struct, frozen=True, kw_only=True, tag="job_started"):
    stage_id: str
    job: str
    at: datetime


class JobFinished(msgspec.Struct, frozen=True, kw_only=True, tag="job_finished"):
    stage_id: str
    job: str
    status: JobOutcome
    error: str | None = None
    at: datetime


class StepStarted(msgspec.Struct, frozen=True, kw_only=True, tag="step_started"):
    stage_id: str
    job: str
    step: str
    attempt: int = 1
    at: datetime


class StepFinished(msgspec.Struct, frozen=True, kw_only=True, tag="step_finished"):
    stage_id: str
    job: str
    step: str
    attempt: int = 0
    status: JobOutcome
    error: str | None = None
    exit_code: int | None = None
    at: datetime


class StepRetryScheduled(msgspec.Struct, frozen=True, kw_only=True, tag="step_retry_scheduled"):
    """A step failed and its job's retry policy allows another attempt, not before `retry_at`."""

    stage_id: str
    job: str
    step: str
    attempt: int
    status: Literal["failed", "timeout"] = "failed"
    error: str | None = None
    exit_code: int | None = None
    retry_at: datetime
    at: datetime


class UnitWaiting(msgspec.Struct, frozen=True, kw_only=True, tag="unit_waiting"):
    """A started attempt of a typed stage or of a step waits for an agent (`reason` says for which),
    or no longer does (`reason` None: an agent took it)."""

    stage_id: str
    job: str | None = None
    step: str | None = None
    attempt: int
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
    # Inside stages of jobs: the job and step the lines came from.
    job: str | None = None
    step: str | None = None


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
    | StageSkipped
    | JobStarted
    | JobFinished
    | StepStarted
    | StepFinished
    | StepRetryScheduled
    | UnitWaiting
)
