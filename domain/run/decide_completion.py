"""Decisions on an attempt's outcome (a typed stage's or a step's): success goes on, a failure is
retried while the retry policy allows, else it fails the stage (and run) or the step."""

from __future__ import annotations

from datetime import timedelta

from domain.errors import Refused
from domain.run.advance import advance
from domain.run.commands import CompleteStage, CompleteStep
from domain.run.events import (
    RunEvent,
    RunFailed,
    StageFailed,
    StageRetryScheduled,
    StageSucceeded,
    StepFinished,
    StepRetryScheduled,
)
from domain.run.evolve import evolve
from domain.run.state import RunState
from domain.stages import RetryPolicy


def _retry_delay(retry: RetryPolicy, attempt: int) -> timedelta:
    # The wait grows: backoff, 2 x backoff, 4 x backoff, ...
    return timedelta(seconds=retry.backoff * (2 ** (attempt - 1)))


def _then_advance(state: RunState, done: RunEvent, command: CompleteStage | CompleteStep) -> list[RunEvent]:
    """The outcome, and what starts next unless the caller only records it."""
    return [done, *advance(evolve(state, done), command.at)] if command.advance else [done]


def complete_stage(command: CompleteStage, state: RunState) -> list[RunEvent]:
    sr = state.stage_runs[state.stage_index(command.stage_id)]
    if sr.status != "running" or sr.attempt != command.attempt:
        raise Refused(f"stage {command.stage_id} attempt {command.attempt} is not running (it is {sr.status})")
    if command.succeeded:
        return _then_advance(
            state, StageSucceeded(stage_id=command.stage_id, exit_code=command.exit_code, at=command.at), command
        )
    retry = state.stage(command.stage_id).retry
    if (
        command.failure != "cancelled"
        and retry is not None
        and command.attempt < retry.max_attempts
        and state.status in ("running", "paused")
    ):
        return [
            StageRetryScheduled(
                stage_id=command.stage_id,
                attempt=command.attempt,
                status="timeout" if command.failure == "timeout" else "failed",
                error=command.error,
                exit_code=command.exit_code,
                retry_at=command.at + _retry_delay(retry, command.attempt),
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


def complete_step(command: CompleteStep, state: RunState) -> list[RunEvent]:
    st = state.step_run(command.stage_id, command.job, command.step)
    if st.status != "running" or st.attempt != command.attempt:
        raise Refused(
            f"step {command.step} of job {command.job} attempt {command.attempt} is not running (it is {st.status})"
        )
    ident = {"stage_id": command.stage_id, "job": command.job, "step": command.step}
    if command.succeeded:
        done = StepFinished(
            **ident, attempt=command.attempt, status="succeeded", exit_code=command.exit_code, at=command.at
        )
        return _then_advance(state, done, command)
    retry = state.job(command.stage_id, command.job).retry
    if (
        command.failure != "cancelled"
        and retry is not None
        and command.attempt < retry.max_attempts
        and state.status in ("running", "paused", "waiting_approval")
    ):
        return [
            StepRetryScheduled(
                **ident,
                attempt=command.attempt,
                status="timeout" if command.failure == "timeout" else "failed",
                error=command.error,
                exit_code=command.exit_code,
                retry_at=command.at + _retry_delay(retry, command.attempt),
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
    return _then_advance(state, done, command)
