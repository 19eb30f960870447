"""What the end of a run does to its stages, jobs and steps: nothing more starts, open gates close."""

from __future__ import annotations

from datetime import datetime

import msgspec

from domain.run.state import JOB_DONE, JobRun, RunState, RunStatus, StageRun, StageStatus, job_outcome
from domain.stages import Stage


def settle_jobs(sr: StageRun, stage: Stage, run_status: str, at: datetime) -> StageRun:
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


def end_run(state: RunState, status: RunStatus, at: datetime, by: str | None, reason: str | None) -> RunState:
    """Finish the run: unreached stages are skipped, a waiting gate is cancelled."""
    runs = tuple(
        msgspec.structs.replace(sr, status="skipped")
        if sr.status == "pending"
        else msgspec.structs.replace(sr, status="cancelled", finished_at=at, retry_at=None)
        if sr.status in ("waiting_approval", "queued")
        else sr
        for sr in state.stage_runs
    )
    runs = tuple(settle_jobs(sr, stage, status, at) for sr, stage in zip(runs, state.stages, strict=True))
    return msgspec.structs.replace(
        state,
        status=status,
        stage_runs=runs,
        finished_at=at,
        updated_at=at,
        status_by=by,
        status_reason=reason,
    )
