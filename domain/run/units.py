"""Units of work the executor runs: a typed stage's attempt, or one attempt of a step of a job.

A unit is named by a key that is unique within its run (domain.run.unit_key): the stage id for a
typed stage, and `<stage id>␟<job>␟<step>` for a step. Leases and timers are kept under that key,
so a lost executor's step is recovered like a lost stage.
"""

from __future__ import annotations

from dataclasses import dataclass

from domain import run as rn
from domain.run import split_unit_key as split_key
from domain.run import unit_key
from domain.stages import Job, Stage, Step

__all__ = ["Unit", "split_key", "started_units", "unit_key", "unit_status"]


@dataclass(frozen=True)
class Unit:
    stage: Stage
    attempt: int
    job: Job | None = None
    step: Step | None = None

    @property
    def key(self) -> str:
        return unit_key(self.stage.id, self.job.name if self.job else None, self.step.name if self.step else None)

    @property
    def label(self) -> str:
        stage = (
            f"Stage {self.stage.name}"
            if self.stage.name == self.stage.id
            else f"Stage {self.stage.name} ({self.stage.id})"
        )
        if self.job is None or self.step is None:
            return stage
        return f"Job {self.job.name}, step {self.step.name}"


def started_units(state: rn.RunState, new: list[rn.RunEvent]) -> list[Unit]:
    """What the executor must run for these newly decided events: typed stages that are not gates,
    and steps that are not approval steps."""
    units: list[Unit] = []
    for e in new:
        if isinstance(e, rn.StageStarted):
            stage = state.stage(e.stage_id)
            if stage.type not in ("approval", "jobs"):
                units.append(Unit(stage=stage, attempt=e.attempt))
        elif isinstance(e, rn.StepStarted):
            step = state.step(e.stage_id, e.job, e.step)
            if step.kind != "approval":
                units.append(
                    Unit(stage=state.stage(e.stage_id), attempt=e.attempt, job=state.job(e.stage_id, e.job), step=step)
                )
    return units


def unit_status(state: rn.RunState, key: str) -> tuple[str, int] | None:
    """(status, attempt) of the stage or step a key names, or None when the run has no such unit."""
    stage_id, job, step = split_key(key)
    try:
        if job is None or step is None:
            sr = state.stage_runs[state.stage_index(stage_id)]
            return sr.status, sr.attempt
        st = state.step_run(stage_id, job, step)
        return st.status, st.attempt
    except Exception:
        return None
