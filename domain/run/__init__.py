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

from domain import expressions
from domain.errors import NotFound, Refused
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
)

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
)

# ---- state ---------------------------------------------------------------------------------


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


# ---- decide --------------------------------------------------------------------------------


def _advance(state: RunState, at: datetime) -> list[RunEvent]:
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
        emit(_advance_jobs(state, stage, at))
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
            holds, problem = _condition(stage.when, job_context(state, stage, None))
            if not holds:
                emit([StageSkipped(stage_id=stage.id, reason=problem or f"when is false: {stage.when}", at=at)])
                continue
        emit([StageStarted(stage_id=stage.id, attempt=sr.attempt + 1, at=at)])
        if stage.type == "approval":
            emit([ApprovalRequested(stage_id=stage.id, message=stage.config.get("message"), at=at)])
        elif stage.type == "jobs":
            emit(_advance_jobs(state, stage, at))
            if state.active_stage is None and state.status == "running":
                continue  # the stage finished at once (every job skipped): go on to the next
        return events
    emit([RunSucceeded(at=at)])
    return events


# ---- stages of jobs ------------------------------------------------------------------------

# Where a step's lease, timers and log lines are kept: `<stage id>␟<job>␟<step>` (U+241F between);
# a typed stage's key is its id.
UNIT_SEP = "\u241f"


def unit_key(stage_id: str, job: str | None = None, step: str | None = None) -> str:
    if job is None or step is None:
        return stage_id
    return UNIT_SEP.join((stage_id, job, step))


def split_unit_key(key: str) -> tuple[str, str | None, str | None]:
    parts = key.split(UNIT_SEP)
    if len(parts) == 3:
        return parts[0], parts[1], parts[2]
    return key, None, None


JOB_DONE: frozenset[str] = frozenset({"succeeded", "failed", "cancelled", "timeout", "skipped"})
_BAD: frozenset[str] = frozenset({"failed", "cancelled", "timeout"})


def job_context(
    state: RunState, stage: Stage, job: Job | None, upto: int | None = None, secrets: dict[str, str] | None = None
) -> dict[str, Any]:
    """What `when` and `${{ }}` see inside a stage of jobs. `jobs` holds the jobs this one needs (so
    `success()`/`failure()` speak of them), `steps` the job's steps before step number `upto`.
    Secret values are only given by the executor; the decider sees them masked."""
    sr = state.stage_runs[state.stage_index(stage.id)]
    jobs: dict[str, Any] = {}
    steps: dict[str, Any] = {}
    if job is not None:
        expansions: dict[str, list[str]] = {}
        for name in job.needs:
            jr = sr.jobs[sr.job_index(name)]
            jobs[name] = {"status": jr.status, "error": jr.error}
            base = state.job(stage.id, name).base_name
            if base is not None:
                expansions.setdefault(base, []).append(jr.status)
        # A matrix job is also there under its spec name: `jobs.image.status` sums up its expansions.
        for base, statuses in expansions.items():
            jobs.setdefault(base, {"status": _combined(statuses), "error": None})
        jr = sr.jobs[sr.job_index(job.name)]
        for st in jr.steps[: len(jr.steps) if upto is None else upto]:
            steps[st.name] = {"status": st.status, "exitCode": st.exit_code, "error": st.error}
    return {
        "variables": dict(state.variables),
        "secrets": secrets if secrets is not None else {name: "***" for name in state.secret_names},
        "matrix": dict(job.matrix_values or {}) if job is not None else {},
        "trigger": dict(state.trigger),
        "jobs": jobs,
        "steps": steps,
        "env": dict(job.env) if job is not None else {},
        "run": {
            "id": state.run_id,
            "pipelineId": state.pipeline_id,
            "definitionVersion": state.definition_version,
            "triggeredBy": state.triggered_by,
            "status": state.status,
        },
        "pipeline": {"id": state.pipeline_id},
    }


def _combined(statuses: list[str]) -> str:
    for status in ("failed", "timeout", "cancelled"):
        if status in statuses:
            return status
    if all(s == "skipped" for s in statuses):
        return "skipped"
    if all(s in ("succeeded", "skipped") for s in statuses):
        return "succeeded"
    return next(s for s in statuses if s not in ("succeeded", "skipped"))


def _condition(text: str, context: dict[str, Any]) -> tuple[bool, str | None]:
    try:
        return expressions.evaluate_condition(text, context), None
    except expressions.ExpressionError as exc:
        return False, f"when {text!r} cannot be evaluated: {exc}"


def _advance_jobs(state: RunState, stage: Stage, at: datetime) -> list[RunEvent]:
    """Start every job whose needs are met and the next step of every running job; finish jobs
    whose steps are done, and the stage when every job is."""
    events: list[RunEvent] = []
    moved = True
    while moved:
        moved = False
        sr = state.stage_runs[state.stage_index(stage.id)]
        for job, jr in zip(stage.jobs, sr.jobs, strict=True):
            new = _advance_job(state, stage, job, jr, at)
            if new:
                events.extend(new)
                state = fold(new, state)
                moved = True
                break
    sr = state.stage_runs[state.stage_index(stage.id)]
    if sr.status != "running" or not all(jr.status in JOB_DONE for jr in sr.jobs):
        return events
    bad = [
        (job, jr)
        for job, jr in zip(stage.jobs, sr.jobs, strict=True)
        if jr.status in _BAD and not job.continue_on_error
    ]
    if not bad:
        return [*events, StageSucceeded(stage_id=stage.id, at=at)]
    names = ", ".join(f'"{jr.name}" {jr.status}' for _, jr in bad)
    reason = f"job {names}" if len(bad) == 1 else f"jobs {names}"
    failed = StageFailed(stage_id=stage.id, status="failed", error=reason, at=at)
    if state.status in ("running", "waiting_approval", "paused"):
        return [*events, failed, RunFailed(stage_id=stage.id, reason=reason, at=at)]
    return [*events, failed]


def _advance_job(state: RunState, stage: Stage, job: Job, jr: JobRun, at: datetime) -> list[RunEvent]:
    if state.status not in ("running", "waiting_approval"):
        return []
    if jr.status == "pending":
        sr = state.stage_runs[state.stage_index(stage.id)]
        needed = [(n, sr.jobs[sr.job_index(n)]) for n in job.needs]
        if any(r.status not in JOB_DONE for _, r in needed):
            return []
        if job.when is None:
            # By default a job runs when what it needs succeeded (or failed with continueOnError).
            for name, r in needed:
                ok = r.status == "succeeded" or (r.status in _BAD and state.job(stage.id, name).continue_on_error)
                if not ok:
                    status: JobOutcome = "skipped" if r.status == "skipped" else "failed"
                    verb = "was skipped" if r.status == "skipped" else f"ended {r.status}"
                    return [
                        JobFinished(
                            stage_id=stage.id,
                            job=job.name,
                            status=status,
                            error=f'not run: needs "{name}", which {verb}',
                            at=at,
                        )
                    ]
        else:
            holds, problem = _condition(job.when, job_context(state, stage, job))
            if problem is not None:
                return [JobFinished(stage_id=stage.id, job=job.name, status="failed", error=problem, at=at)]
            if not holds:
                return [
                    JobFinished(
                        stage_id=stage.id, job=job.name, status="skipped", error=f"when is false: {job.when}", at=at
                    )
                ]
        return [JobStarted(stage_id=stage.id, job=job.name, at=at)]
    if jr.status != "running":
        return []
    if any(st.status in ("running", "waiting_approval") for st in jr.steps):
        return []
    if job.timeout is not None and jr.started_at is not None and at >= jr.started_at + timedelta(seconds=job.timeout):
        return [
            JobFinished(
                stage_id=stage.id, job=job.name, status="timeout", error=f"timed out after {job.timeout:g} s", at=at
            )
        ]
    for i, (step, st) in enumerate(zip(job.steps, jr.steps, strict=True)):
        if st.status in JOB_DONE:
            continue
        if st.status == "queued" and st.retry_at is not None and st.retry_at > at:
            return []  # a retry is due later
        if st.status == "pending":
            if step.when is None:
                # By default a step runs while every step before it succeeded (or may fail).
                broken = next(
                    (
                        (s, r)
                        for s, r in zip(job.steps[:i], jr.steps[:i], strict=True)
                        if r.status in _BAD and not s.continue_on_error
                    ),
                    None,
                )
                if broken is not None:
                    return [
                        StepFinished(
                            stage_id=stage.id,
                            job=job.name,
                            step=step.name,
                            status="skipped",
                            error=f'not run: step "{broken[0].name}" {broken[1].status}',
                            at=at,
                        )
                    ]
            else:
                holds, problem = _condition(step.when, job_context(state, stage, job, upto=i))
                if problem is not None or not holds:
                    return [
                        StepFinished(
                            stage_id=stage.id,
                            job=job.name,
                            step=step.name,
                            status="failed" if problem else "skipped",
                            error=problem or f"when is false: {step.when}",
                            at=at,
                        )
                    ]
        started: list[RunEvent] = [
            StepStarted(stage_id=stage.id, job=job.name, step=step.name, attempt=st.attempt + 1, at=at)
        ]
        if step.kind == "approval":
            started.append(
                ApprovalRequested(
                    stage_id=stage.id, job=job.name, step=step.name, message=step.config.get("message"), at=at
                )
            )
        return started
    status, error = job_outcome(job, jr)
    return [JobFinished(stage_id=stage.id, job=job.name, status=status, error=error, at=at)]


def job_outcome(job: Job, jr: JobRun) -> tuple[JobOutcome, str | None]:
    """A job's status from its steps: the first step that failed (and may not), else succeeded."""
    for step, st in zip(job.steps, jr.steps, strict=True):
        if st.status in _BAD and not step.continue_on_error:
            status: JobOutcome = (
                "timeout" if st.status == "timeout" else "cancelled" if st.status == "cancelled" else "failed"
            )
            return status, f'step "{st.name}" {st.status}' + (f": {st.error}" if st.error else "")
    return "succeeded", None


def _complete_step(command: CompleteStep, state: RunState) -> list[RunEvent]:
    st = state.step_run(command.stage_id, command.job, command.step)
    if st.status != "running" or st.attempt != command.attempt:
        raise Refused(
            f"step {command.step} of job {command.job} attempt {command.attempt} is not running (it is {st.status})"
        )
    ident = {"stage_id": command.stage_id, "job": command.job, "step": command.step}
    if command.succeeded:
        done: RunEvent = StepFinished(
            **ident, attempt=command.attempt, status="succeeded", exit_code=command.exit_code, at=command.at
        )
        return [done, *_advance(evolve(state, done), command.at)] if command.advance else [done]
    retry = state.job(command.stage_id, command.job).retry
    if (
        command.failure != "cancelled"
        and retry is not None
        and command.attempt < retry.max_attempts
        and state.status in ("running", "paused", "waiting_approval")
    ):
        delay = retry.backoff * (2 ** (command.attempt - 1))
        return [
            StepRetryScheduled(
                **ident,
                attempt=command.attempt,
                status="timeout" if command.failure == "timeout" else "failed",
                error=command.error,
                exit_code=command.exit_code,
                retry_at=command.at + timedelta(seconds=delay),
                at=command.at,
            )
        ]
    done = StepFinished(
        **ident,
        attempt=command.attempt,
        status=command.failure,
        error=command.error,
        exit_code=command.exit_code,
        at=command.at,
    )
    return [done, *_advance(evolve(state, done), command.at)] if command.advance else [done]


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
                return [done, *_advance(evolve(state, done), command.at)] if command.advance else [done]
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
        case CompleteStep():
            return _complete_step(command, state)
        case ExpireApproval() if command.job is not None and command.step is not None:
            st = state.step_run(command.stage_id, command.job, command.step)
            step = state.step(command.stage_id, command.job, command.step)
            if st.status != "waiting_approval":
                raise Refused(
                    f"step {command.step} of job {command.job} is not waiting for approval (it is {st.status})"
                )
            if step.timeout is None or st.started_at is None:
                raise Refused(f"step {command.step} of job {command.job} has no approval timeout")
            if command.at < st.started_at + timedelta(seconds=step.timeout):
                raise Refused(f"the approval of step {command.step} of job {command.job} has not timed out yet")
            done = StepFinished(
                stage_id=command.stage_id,
                job=command.job,
                step=command.step,
                attempt=st.attempt,
                status="timeout",
                error=f"approval timed out after {step.timeout:g} s",
                at=command.at,
            )
            return [done]
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
        case Reject():
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


def _set_job(state: RunState, stage_id: str, job: str, **changes: object) -> RunState:
    i = state.stage_index(stage_id)
    sr = state.stage_runs[i]
    j = sr.job_index(job)
    jobs = list(sr.jobs)
    jobs[j] = msgspec.structs.replace(jobs[j], **changes)
    runs = list(state.stage_runs)
    runs[i] = msgspec.structs.replace(sr, jobs=tuple(jobs))
    return msgspec.structs.replace(state, stage_runs=tuple(runs))


def _set_step(state: RunState, stage_id: str, job: str, step: str, **changes: object) -> RunState:
    jr = state.job_run(stage_id, job)
    k = jr.step_index(step)
    steps = list(jr.steps)
    steps[k] = msgspec.structs.replace(steps[k], **changes)
    return _set_job(state, stage_id, job, steps=tuple(steps))


def _gate_answered(state: RunState) -> RunState:
    """After a gate of a job closes, the run waits only while another gate is open."""
    if state.status == "waiting_approval" and not state.open_gates:
        return msgspec.structs.replace(state, status="running")
    return state


def _settle_jobs(sr: StageRun, stage: Stage, run_status: str, at: datetime) -> StageRun:
    """A stage of jobs in a run that has ended: nothing more starts. Steps that never started are
    skipped (cancelled if the run was), open gates cancelled; jobs with no step still running take
    their outcome; the stage ends once no step runs."""
    if not sr.jobs:
        return sr
    mark: StageStatus = "cancelled" if run_status == "cancelled" else "skipped"
    jobs: list[JobRun] = []
    for job, jr in zip(stage.jobs, sr.jobs, strict=True):
        if jr.status in JOB_DONE:
            jobs.append(jr)
            continue
        ended = f"not run: the run ended {run_status}"
        steps = tuple(
            msgspec.structs.replace(st, status=mark, retry_at=None, error=ended)
            if st.status in ("pending", "queued")
            else msgspec.structs.replace(st, status="cancelled", finished_at=at)
            if st.status == "waiting_approval"
            else st
            for st in jr.steps
        )
        # Steps that the end of the run left unrun (not those their own `when` skipped before);
        # settled again when a step still running then ends.
        cut_short = any(st.error == ended for st in steps)
        jr = msgspec.structs.replace(jr, steps=steps)
        if any(st.status == "running" for st in steps):
            jobs.append(jr)
        elif jr.status == "pending":
            jobs.append(msgspec.structs.replace(jr, status=mark))
        else:
            status, error = job_outcome(job, jr)
            if status == "succeeded" and cut_short:
                status, error = "cancelled", f"the run ended: {run_status}"
            jobs.append(msgspec.structs.replace(jr, status=status, error=error, finished_at=at))
    sr = msgspec.structs.replace(sr, jobs=tuple(jobs))
    if sr.status == "running" and all(jr.status in JOB_DONE for jr in jobs):
        failed = any(jr.status in ("failed", "timeout") for jr in jobs)
        sr = msgspec.structs.replace(sr, status="failed" if failed else "cancelled", finished_at=at)
    return sr


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
    runs = tuple(_settle_jobs(sr, stage, status, at) for sr, stage in zip(runs, state.stages, strict=True))
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
                stage_runs=tuple(
                    StageRun(
                        stage_id=s.id,
                        jobs=tuple(
                            JobRun(name=j.name, steps=tuple(StepRun(name=st.name) for st in j.steps)) for j in s.jobs
                        ),
                    )
                    for s in event.stages
                ),
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
        case ApprovalRequested() if event.job is not None and event.step is not None:
            state = _set_step(state, event.stage_id, event.job, event.step, status="waiting_approval")
            return r(state, status="waiting_approval", updated_at=event.at)
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
                attempts=(*sr.attempts, ended_attempt(sr, "succeeded", event.at, None, event.exit_code)),
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
                attempts=(*sr.attempts, ended_attempt(sr, event.status, event.at, event.error, event.exit_code)),
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
                attempts=(*sr.attempts, ended_attempt(sr, event.status, event.at, event.error, event.exit_code)),
            )
            return r(state, stage_runs=runs, updated_at=event.at)
        case RunApproved() if event.job is not None and event.step is not None:
            st = state.step_run(event.stage_id, event.job, event.step)
            state = _set_step(
                state,
                event.stage_id,
                event.job,
                event.step,
                status="succeeded",
                finished_at=event.at,
                attempts=(*st.attempts, ended_attempt(st, "succeeded", event.at, None, None)),
            )
            approval = Approval(
                stage_id=event.stage_id,
                job=event.job,
                step=event.step,
                decision="approved",
                by=event.approved_by,
                comment=event.comment,
                at=event.at,
            )
            state = r(state, updated_at=event.at, approvals=(*state.approvals, approval))
            return _gate_answered(state)
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
        case RunRejected() if event.job is not None and event.step is not None:
            error = f"rejected by {event.rejected_by}" + (f": {event.reason}" if event.reason else "")
            st = state.step_run(event.stage_id, event.job, event.step)
            state = _set_step(
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
            state = r(state, approvals=(*state.approvals, approval))
            return _end(state, "failed", event.at, event.rejected_by, event.reason)
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
        case StageSkipped():
            runs = _set_stage(state, event.stage_id, status="skipped", error=event.reason)
            sr = runs[state.stage_index(event.stage_id)]
            skipped = tuple(
                msgspec.structs.replace(
                    jr, status="skipped", steps=tuple(msgspec.structs.replace(st, status="skipped") for st in jr.steps)
                )
                for jr in sr.jobs
            )
            runs = _set_stage(r(state, stage_runs=runs), event.stage_id, jobs=skipped)
            return r(state, stage_runs=runs, updated_at=event.at)
        case JobStarted():
            state = _set_job(state, event.stage_id, event.job, status="running", started_at=event.at)
            return r(state, updated_at=event.at)
        case JobFinished():
            jr = state.job_run(event.stage_id, event.job)
            mark = "cancelled" if event.status == "cancelled" else "skipped"
            steps = tuple(
                msgspec.structs.replace(st, status=mark, retry_at=None) if st.status in ("pending", "queued") else st
                for st in jr.steps
            )
            state = _set_job(
                state,
                event.stage_id,
                event.job,
                status=event.status,
                finished_at=event.at,
                error=event.error,
                steps=steps,
            )
            return r(state, updated_at=event.at)
        case StepStarted():
            state = _set_step(
                state,
                event.stage_id,
                event.job,
                event.step,
                status="running",
                attempt=event.attempt,
                started_at=event.at,
                finished_at=None,
                error=None,
                exit_code=None,
                retry_at=None,
            )
            return r(state, updated_at=event.at)
        case StepFinished():
            st = state.step_run(event.stage_id, event.job, event.step)
            attempts = st.attempts
            if event.status != "skipped":
                attempts = (*attempts, ended_attempt(st, event.status, event.at, event.error, event.exit_code))
            state = _set_step(
                state,
                event.stage_id,
                event.job,
                event.step,
                status=event.status,
                finished_at=event.at,
                error=event.error,
                exit_code=event.exit_code,
                attempts=attempts,
            )
            state = _gate_answered(r(state, updated_at=event.at))
            if state.terminal:
                # The run ended while this step ran: its job and stage end with it.
                i = state.stage_index(event.stage_id)
                settled = list(state.stage_runs)
                settled[i] = _settle_jobs(settled[i], state.stages[i], state.status, event.at)
                state = r(state, stage_runs=tuple(settled))
            return state
        case StepRetryScheduled():
            st = state.step_run(event.stage_id, event.job, event.step)
            state = _set_step(
                state,
                event.stage_id,
                event.job,
                event.step,
                status="queued",
                finished_at=event.at,
                error=event.error,
                exit_code=event.exit_code,
                retry_at=event.retry_at,
                attempts=(*st.attempts, ended_attempt(st, event.status, event.at, event.error, event.exit_code)),
            )
            return r(state, updated_at=event.at)
        case RunFailed():
            return _end(state, "failed", event.at, None, event.reason)


def fold(events: list[RunEvent], state: RunState = initial_state) -> RunState:
    for e in events:
        state = evolve(state, e)
    return state
