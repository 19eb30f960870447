"""The jobs sub-machine of a stage of jobs: start every job whose needs are met and the next step
of every running job; finish jobs whose steps are done, and the stage when every job is."""

from __future__ import annotations

from datetime import datetime, timedelta

from domain.run.context import evaluate_when, job_context
from domain.run.events import (
    ApprovalRequested,
    JobFinished,
    JobOutcome,
    JobStarted,
    RunEvent,
    RunFailed,
    StageFailed,
    StageSucceeded,
    StepFinished,
    StepStarted,
)
from domain.run.evolve import fold
from domain.run.state import FAILING, JOB_DONE, JobRun, RunState, job_outcome
from domain.stages import Job, Stage


def advance_jobs(state: RunState, stage: Stage, at: datetime) -> list[RunEvent]:
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
        if jr.status in FAILING and not job.continue_on_error
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
        return _start_job(state, stage, job, at)
    if jr.status == "running":
        return _next_step(state, stage, job, jr, at)
    return []


def _start_job(state: RunState, stage: Stage, job: Job, at: datetime) -> list[RunEvent]:
    """A pending job starts once what it needs is done, unless its `when` (or, by default, a
    failed need) says it is not to run."""
    sr = state.stage_runs[state.stage_index(stage.id)]
    needed = [(n, sr.jobs[sr.job_index(n)]) for n in job.needs]
    if any(r.status not in JOB_DONE for _, r in needed):
        return []
    if job.when is None:
        # By default a job runs when what it needs succeeded (or failed with continueOnError).
        for name, r in needed:
            ok = r.status == "succeeded" or (r.status in FAILING and state.job(stage.id, name).continue_on_error)
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
        holds, problem = evaluate_when(job.when, job_context(state, stage, job))
        if problem is not None:
            return [JobFinished(stage_id=stage.id, job=job.name, status="failed", error=problem, at=at)]
        if not holds:
            return [
                JobFinished(
                    stage_id=stage.id, job=job.name, status="skipped", error=f"when is false: {job.when}", at=at
                )
            ]
    return [JobStarted(stage_id=stage.id, job=job.name, at=at)]


def _next_step(state: RunState, stage: Stage, job: Job, jr: JobRun, at: datetime) -> list[RunEvent]:
    """A running job starts its next step once none runs, or times out, or ends with its steps."""
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
                        if r.status in FAILING and not s.continue_on_error
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
                holds, problem = evaluate_when(step.when, job_context(state, stage, job, upto=i))
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
