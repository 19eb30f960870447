"""How the events of jobs and their steps change a run's state (stages of jobs)."""

from __future__ import annotations

import msgspec

from domain.run.ending import settle_jobs
from domain.run.events import JobFinished, JobStarted, StepFinished, StepRetryScheduled, StepStarted, UnitWaiting
from domain.run.evolve_gates import gate_answered
from domain.run.patch import set_job, set_stage, set_step
from domain.run.state import RunState, ended_attempt


def job_started(state: RunState, event: JobStarted) -> RunState:
    state = set_job(state, event.stage_id, event.job, status="running", started_at=event.at)
    return msgspec.structs.replace(state, updated_at=event.at)


def job_finished(state: RunState, event: JobFinished) -> RunState:
    """Steps of the job that never started end with it: skipped, or cancelled with a cancelled job."""
    jr = state.job_run(event.stage_id, event.job)
    mark = "cancelled" if event.status == "cancelled" else "skipped"
    steps = tuple(
        msgspec.structs.replace(st, status=mark, retry_at=None) if st.status in ("pending", "queued") else st
        for st in jr.steps
    )
    state = set_job(
        state,
        event.stage_id,
        event.job,
        status=event.status,
        finished_at=event.at,
        error=event.error,
        steps=steps,
    )
    return msgspec.structs.replace(state, updated_at=event.at)


def step_started(state: RunState, event: StepStarted) -> RunState:
    state = set_step(
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
        waiting_for=None,
    )
    return msgspec.structs.replace(state, updated_at=event.at)


def step_finished(state: RunState, event: StepFinished) -> RunState:
    r = msgspec.structs.replace
    st = state.step_run(event.stage_id, event.job, event.step)
    attempts = st.attempts
    if event.status != "skipped":
        attempts = (*attempts, ended_attempt(st, event.status, event.at, event.error, event.exit_code))
    state = set_step(
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
    state = gate_answered(r(state, updated_at=event.at))
    if state.terminal:
        # The run ended while this step ran: its job and stage end with it.
        i = state.stage_index(event.stage_id)
        settled = list(state.stage_runs)
        settled[i] = settle_jobs(settled[i], state.stages[i], state.status, event.at)
        state = r(state, stage_runs=tuple(settled))
    return state


def step_retry_scheduled(state: RunState, event: StepRetryScheduled) -> RunState:
    st = state.step_run(event.stage_id, event.job, event.step)
    state = set_step(
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
    return msgspec.structs.replace(state, updated_at=event.at)


def unit_waiting(state: RunState, event: UnitWaiting) -> RunState:
    """Only the attempt it names, while it runs: a late note changes nothing that moved on."""
    if event.job is None or event.step is None:
        sr = state.stage_runs[state.stage_index(event.stage_id)]
        if sr.status != "running" or sr.attempt != event.attempt:
            return state
        return msgspec.structs.replace(
            state, stage_runs=set_stage(state, event.stage_id, waiting_for=event.reason), updated_at=event.at
        )
    st = state.step_run(event.stage_id, event.job, event.step)
    if st.status != "running" or st.attempt != event.attempt:
        return state
    state = set_step(state, event.stage_id, event.job, event.step, waiting_for=event.reason)
    return msgspec.structs.replace(state, updated_at=event.at)
