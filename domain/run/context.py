"""What expressions (`when`, `${{ }}`) see inside a stage of jobs, and the evaluation of a `when`."""

from __future__ import annotations

from typing import Any

from domain import expressions
from domain.run.state import RunState
from domain.stages import Job, Stage


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
    """The status of a matrix job as a whole: the worst of its expansions'."""
    for status in ("failed", "timeout", "cancelled"):
        if status in statuses:
            return status
    if all(s == "skipped" for s in statuses):
        return "skipped"
    if all(s in ("succeeded", "skipped") for s in statuses):
        return "succeeded"
    return next(s for s in statuses if s not in ("succeeded", "skipped"))


def evaluate_when(text: str, context: dict[str, Any]) -> tuple[bool, str | None]:
    """(holds, problem): a `when` that cannot be evaluated does not hold, and says why."""
    try:
        return expressions.evaluate_condition(text, context), None
    except expressions.ExpressionError as exc:
        return False, f"when {text!r} cannot be evaluated: {exc}"
