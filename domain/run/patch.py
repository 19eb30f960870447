"""Copies of a run's state with one stage, job or step changed (the state is immutable)."""

from __future__ import annotations

import msgspec

from domain.run.state import RunState, StageRun


def set_stage(state: RunState, stage_id: str, **changes: object) -> tuple[StageRun, ...]:
    i = state.stage_index(stage_id)
    runs = list(state.stage_runs)
    runs[i] = msgspec.structs.replace(runs[i], **changes)
    return tuple(runs)


def set_job(state: RunState, stage_id: str, job: str, **changes: object) -> RunState:
    i = state.stage_index(stage_id)
    sr = state.stage_runs[i]
    j = sr.job_index(job)
    jobs = list(sr.jobs)
    jobs[j] = msgspec.structs.replace(jobs[j], **changes)
    runs = list(state.stage_runs)
    runs[i] = msgspec.structs.replace(sr, jobs=tuple(jobs))
    return msgspec.structs.replace(state, stage_runs=tuple(runs))


def set_step(state: RunState, stage_id: str, job: str, step: str, **changes: object) -> RunState:
    jr = state.job_run(stage_id, job)
    k = jr.step_index(step)
    steps = list(jr.steps)
    steps[k] = msgspec.structs.replace(steps[k], **changes)
    return set_job(state, stage_id, job, steps=tuple(steps))
