"""What a run's appends ended, observed in the metrics: stage and step attempts, and runs, with
their durations (see infra.metrics). Observed by whichever process stored the end: the executor
for what it records, the API for the runs people cancel or stop (RunCommands.command)."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from datetime import datetime

from prometheus_client import Histogram

from domain import run as rn
from domain.run.state import AttemptResult
from infra import metrics

log = logging.getLogger("pipelines.measures")


def observe_ended(state: rn.RunState, new: Sequence[rn.RunEvent]) -> None:
    """`state` is the run after `new`, the events one append stored (each observed once: only
    the append that stored an event observes it). Never raises: metrics never stop a run."""
    try:
        _observe(state, new)
    except Exception:
        log.exception("run %s: observing its metrics failed", state.run_id)


def _observe(state: rn.RunState, new: Sequence[rn.RunEvent]) -> None:
    for e in new:
        if isinstance(e, rn.StageSucceeded | rn.StageFailed | rn.StageRetryScheduled):
            sr = state.stage_runs[state.stage_index(e.stage_id)]
            _observe_attempt(metrics.stage_duration, sr.attempts, e.at)
        elif isinstance(e, rn.StepFinished | rn.StepRetryScheduled):
            _observe_attempt(metrics.step_duration, state.step_run(e.stage_id, e.job, e.step).attempts, e.at)
        elif isinstance(e, rn.RunSucceeded | rn.RunFailed | rn.RunCancelled | rn.RunStopped):
            # A run cancelled before it started has no duration.
            if state.started_at is not None:
                metrics.run_duration.labels(state.status).observe(max(0.0, (e.at - state.started_at).total_seconds()))


def _observe_attempt(histogram: Histogram, attempts: Sequence[AttemptResult], at: datetime) -> None:
    # The attempt this event ended is the one it stamped with its time (a step skipped by its
    # `when` ended no attempt).
    for attempt in reversed(attempts):
        if attempt.finished_at == at:
            if attempt.started_at is not None:
                histogram.labels(attempt.status).observe(max(0.0, (at - attempt.started_at).total_seconds()))
            return
