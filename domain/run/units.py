"""Units of work the executor runs: a typed stage's attempt, or one attempt of a step of a job.

A unit is named by a key unique within its run: the stage id for a typed stage, and
`<stage id>␟<job>␟<step>` for a step. Leases, timers and log lines are kept under that key, so a
lost executor's step is recovered like a lost stage.
"""

from __future__ import annotations

from dataclasses import dataclass

from domain.errors import Refused
from domain.run.events import RunEvent, StageStarted, StepStarted
from domain.run.state import RunState
from domain.stages import Job, Stage, Step

__all__ = ["UNIT_SEP", "Unit", "split_key", "split_unit_key", "started_units", "unit_key", "unit_status"]

# U+241F (SYMBOL FOR UNIT SEPARATOR): cannot be typed by accident in a stage, job or step name.
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


split_key = split_unit_key  # the executor's name for it


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


def started_units(state: RunState, new: list[RunEvent]) -> list[Unit]:
    """What the executor must run for these newly decided events: typed stages that are not gates,
    and steps that are not approval steps."""
    units: list[Unit] = []
    for e in new:
        if isinstance(e, StageStarted):
            stage = state.stage(e.stage_id)
            if stage.type not in ("approval", "jobs"):
                units.append(Unit(stage=stage, attempt=e.attempt))
        elif isinstance(e, StepStarted):
            step = state.step(e.stage_id, e.job, e.step)
            if step.kind != "approval":
                units.append(
                    Unit(stage=state.stage(e.stage_id), attempt=e.attempt, job=state.job(e.stage_id, e.job), step=step)
                )
    return units


def unit_status(state: RunState, key: str) -> tuple[str, int] | None:
    """(status, attempt) of the stage or step a key names, or None when the run has no such unit."""
    stage_id, job, step = split_unit_key(key)
    try:
        if job is None or step is None:
            sr = state.stage_runs[state.stage_index(stage_id)]
            return sr.status, sr.attempt
        st = state.step_run(stage_id, job, step)
        return st.status, st.attempt
    except Refused:  # the run has no such stage, job or step
        return None
