"""The commands a run accepts: from people (approve, cancel, ...) and from the executor (advance,
complete a stage or step, expire an approval)."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

import msgspec

from domain.stages import Stage


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
    # False: record the outcome only, start nothing (a recovery or a shutdown records it; the
    # executor that then drives the run starts what comes next, and takes its leases).
    advance: bool = True
    at: datetime


class CompleteStep(msgspec.Struct, frozen=True, kw_only=True, tag="complete_step"):
    """The outcome of one attempt of a step of a job (stages of jobs)."""

    stage_id: str
    job: str
    step: str
    attempt: int
    succeeded: bool
    failure: Literal["failed", "timeout", "cancelled"] = "failed"
    error: str | None = None
    exit_code: int | None = None
    advance: bool = True
    at: datetime


class ExpireApproval(msgspec.Struct, frozen=True, kw_only=True, tag="expire_approval"):
    """Nobody approved or rejected the gate within its timeout. `job` and `step` name an approval
    step inside a stage of jobs."""

    stage_id: str
    job: str | None = None
    step: str | None = None
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


class NoteWaiting(msgspec.Struct, frozen=True, kw_only=True, tag="note_waiting"):
    """The executor notes that a running attempt waits for an agent (`reason`), or no longer does
    (None)."""

    stage_id: str
    job: str | None = None
    step: str | None = None
    attempt: int
    reason: str | None
    at: datetime


RunCommand = (
    TriggerRun
    | Advance
    | CompleteStage
    | CompleteStep
    | ExpireApproval
    | Approve
    | Reject
    | Cancel
    | Stop
    | Pause
    | Resume
    | NoteWaiting
)
