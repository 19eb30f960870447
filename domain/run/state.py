"""A run's state, folded from its events, and the queries on it (stages, jobs, steps, open gates,
the next retry, a job's outcome)."""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

import msgspec

from domain.errors import Refused
from domain.run.events import JobOutcome
from domain.stages import Job, Stage, Step

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
JOB_DONE: frozenset[str] = frozenset({"succeeded", "failed", "cancelled", "timeout", "skipped"})
# The outcomes of a job or step that fail what depends on it (unless it may fail: continueOnError).
FAILING: frozenset[str] = frozenset({"failed", "cancelled", "timeout"})


class AttemptResult(msgspec.Struct, frozen=True, kw_only=True):
    attempt: int
    status: StageStatus
    started_at: datetime | None
    finished_at: datetime | None
    error: str | None = None
    exit_code: int | None = None


def ended_attempt(
    run: StageRun | StepRun, status: StageStatus, at: datetime, error: str | None, exit_code: int | None
) -> AttemptResult:
    """The attempt a stage or step just ended, for its `attempts`."""
    return AttemptResult(
        attempt=run.attempt, status=status, started_at=run.started_at, finished_at=at, error=error, exit_code=exit_code
    )


class StepRun(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    status: StageStatus = "pending"
    attempt: int = 0
    started_at: datetime | None = None
    finished_at: datetime | None = None
    error: str | None = None
    exit_code: int | None = None
    retry_at: datetime | None = None
    attempts: tuple[AttemptResult, ...] = ()
    # While the running attempt waits for an agent: why (UnitWaiting).
    waiting_for: str | None = None


class JobRun(msgspec.Struct, frozen=True, kw_only=True):
    name: str
    status: StageStatus = "pending"
    started_at: datetime | None = None
    finished_at: datetime | None = None
    error: str | None = None
    steps: tuple[StepRun, ...] = ()

    def step_index(self, name: str) -> int:
        for i, st in enumerate(self.steps):
            if st.name == name:
                return i
        raise Refused(f"job {self.name!r} has no step {name!r}")


class Gate(msgspec.Struct, frozen=True, kw_only=True):
    """Something waiting for a person: an approval stage, or an approval step of a job."""

    stage_id: str
    job: str | None = None
    step: str | None = None
    started_at: datetime | None = None


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
    # Stages of jobs: one per job (matrix jobs expanded), in the stage's order.
    jobs: tuple[JobRun, ...] = ()
    # While the running attempt waits for an agent: why (UnitWaiting).
    waiting_for: str | None = None

    def job_index(self, name: str) -> int:
        for i, jr in enumerate(self.jobs):
            if jr.name == name:
                return i
        raise Refused(f"stage {self.stage_id!r} has no job {name!r}")


class Approval(msgspec.Struct, frozen=True, kw_only=True):
    stage_id: str
    decision: Literal["approved", "rejected"]
    by: str
    comment: str | None
    at: datetime
    job: str | None = None
    step: str | None = None


# Above this many stages a run's stage lookups use an index (below it a scan is as fast).
_INDEXED = 32
# The indexes of the last few runs' stage tuples, by the tuple's identity (the tuple is kept with
# its index, so an id is never reused while cached). A pure memo: it changes no answer.
_INDEXES: dict[int, tuple[tuple[Stage, ...], dict[str, int]]] = {}


def _stage_positions(stages: tuple[Stage, ...]) -> dict[str, int]:
    hit = _INDEXES.get(id(stages))
    if hit is not None and hit[0] is stages:
        return hit[1]
    if len(_INDEXES) >= 16:
        _INDEXES.pop(next(iter(_INDEXES)))
    index = {stage.id: i for i, stage in enumerate(stages)}
    _INDEXES[id(stages)] = (stages, index)
    return index


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
        runs = self.stage_runs
        if len(runs) > _INDEXED:
            # A run's stage runs keep their stages' order for its whole life: the index built once
            # from its `stages` (the same tuple in every state of the run) answers in O(1), where
            # a scan made folding a run of thousands of stages quadratic.
            i = _stage_positions(self.stages).get(stage_id)
            if i is not None and i < len(runs) and runs[i].stage_id == stage_id:
                return i
        for i, sr in enumerate(runs):
            if sr.stage_id == stage_id:
                return i
        raise Refused(f"run has no stage {stage_id!r}")

    @property
    def next_retry_at(self) -> datetime | None:
        """When a stage or step waiting to be retried may start (the executor sleeps until then)."""
        if self.status not in ("running", "waiting_approval"):
            return None
        due = [sr.retry_at for sr in self.stage_runs if sr.status == "queued" and sr.retry_at is not None]
        due += [
            st.retry_at
            for sr in self.stage_runs
            for jr in sr.jobs
            for st in jr.steps
            if st.status == "queued" and st.retry_at is not None
        ]
        return min(due) if due else None

    @property
    def open_gates(self) -> list[Gate]:
        """What waits for approval, in stage, job and step order."""
        gates: list[Gate] = []
        for sr in self.stage_runs:
            if sr.status == "waiting_approval":
                gates.append(Gate(stage_id=sr.stage_id, started_at=sr.started_at))
            for jr in sr.jobs:
                for st in jr.steps:
                    if st.status == "waiting_approval":
                        gates.append(Gate(stage_id=sr.stage_id, job=jr.name, step=st.name, started_at=st.started_at))
        return gates

    def job_run(self, stage_id: str, job: str) -> JobRun:
        sr = self.stage_runs[self.stage_index(stage_id)]
        return sr.jobs[sr.job_index(job)]

    def step_run(self, stage_id: str, job: str, step: str) -> StepRun:
        jr = self.job_run(stage_id, job)
        return jr.steps[jr.step_index(step)]

    def job(self, stage_id: str, name: str) -> Job:
        for j in self.stage(stage_id).jobs:
            if j.name == name:
                return j
        raise Refused(f"stage {stage_id!r} has no job {name!r}")

    def step(self, stage_id: str, job: str, name: str) -> Step:
        for st in self.job(stage_id, job).steps:
            if st.name == name:
                return st
        raise Refused(f"job {job!r} has no step {name!r}")

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


def job_outcome(job: Job, jr: JobRun) -> tuple[JobOutcome, str | None]:
    """A job's status from its steps: the first step that failed (and may not), else succeeded."""
    for step, st in zip(job.steps, jr.steps, strict=True):
        if st.status in FAILING and not step.continue_on_error:
            status: JobOutcome = (
                "timeout" if st.status == "timeout" else "cancelled" if st.status == "cancelled" else "failed"
            )
            return status, f'step "{st.name}" {st.status}' + (f": {st.error}" if st.error else "")
    return "succeeded", None
