"""The API's objects (camelCase), rendered from folded domain state. Pure functions."""

from __future__ import annotations

import functools
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from typing import Any

import msgspec

from domain.pipeline import PipelineState
from domain.run import LogAppended, LogLine, RunState, StageRun, split_unit_key, unit_key
from domain.stages import RetryPolicy, Stage


def iso(ts: datetime | None) -> str | None:
    """2026-03-16T00:00:00.000Z, as in the API reference (in UTC; a naive time is taken as UTC)."""
    return None if ts is None else _iso(ts)


# Cached: a run's view is built again for every event of the run (the gateway's frames, the
# projector's rows, the API's answers), and its timestamps are mostly the same ones each time;
# formatting them was 18% of the gateway's CPU under the end-to-end load (issue 17's profile).
@functools.lru_cache(maxsize=8192)
def _iso(ts: datetime) -> str:
    if ts.tzinfo is not None:
        ts = ts.astimezone(UTC).replace(tzinfo=None)
    return ts.isoformat(timespec="milliseconds") + "Z"


class StageView(msgspec.Struct, kw_only=True, rename="camel"):
    id: str
    name: str
    type: str
    order: int
    config: dict[str, Any]
    timeout: float | None = None
    retry: RetryPolicy | None = None


class PipelineView(msgspec.Struct, kw_only=True, rename="camel"):
    id: str
    name: str
    description: str | None
    stages: list[StageView]
    organization_id: str | None
    created_by: str
    created_at: str | None
    updated_at: str | None
    definition_version: int
    # Git-backed pipelines (all null when the pipeline is not).
    repo_url: str | None = None
    default_branch: str | None = None
    pipeline_file_path: str | None = None


class AttemptView(msgspec.Struct, kw_only=True, rename="camel"):
    attempt: int
    status: str
    started_at: str | None
    finished_at: str | None
    error: str | None
    exit_code: int | None


class StepResultView(msgspec.Struct, kw_only=True, rename="camel"):
    name: str
    kind: str
    status: str
    attempt: int
    started_at: str | None
    finished_at: str | None
    duration_ms: int | None
    output: str
    error: str | None
    exit_code: int | None
    retry_at: str | None = None
    attempts: list[AttemptView] = msgspec.field(default_factory=list)
    # While it waits for an agent (status `queued`): why, e.g. "waiting for an agent with linux, arm64".
    waiting_for: str | None = None


class JobResultView(msgspec.Struct, kw_only=True, rename="camel"):
    name: str
    status: str
    needs: list[str]
    matrix: dict[str, Any] | None
    started_at: str | None
    finished_at: str | None
    duration_ms: int | None
    error: str | None
    steps: list[StepResultView]


class StageResultView(msgspec.Struct, kw_only=True, rename="camel"):
    stage_id: str
    name: str
    type: str
    status: str
    attempt: int
    started_at: str | None
    finished_at: str | None
    duration_ms: int | None
    output: str
    error: str | None
    exit_code: int | None
    retry_at: str | None = None
    attempts: list[AttemptView] = msgspec.field(default_factory=list)
    # Stages of jobs: every job (matrix jobs expanded) with its steps.
    jobs: list[JobResultView] | None = None
    # While it waits for an agent (status `queued`): why.
    waiting_for: str | None = None


class ApprovalView(msgspec.Struct, kw_only=True, rename="camel"):
    stage_id: str
    decision: str
    by: str
    comment: str | None
    at: str | None
    job: str | None = None
    step: str | None = None


class RunView(msgspec.Struct, kw_only=True, rename="camel"):
    id: str
    pipeline_id: str
    organization_id: str | None
    status: str
    triggered_by: str
    definition_version: int
    variables: dict[str, str]
    secret_names: list[str]
    trigger: dict[str, Any]
    started_at: str | None
    finished_at: str | None
    duration_ms: int | None
    logs: str
    stage_results: list[StageResultView]
    approvals: list[ApprovalView]
    status_reason: str | None
    status_by: str | None
    created_at: str | None
    updated_at: str | None


class RunSummaryView(msgspec.Struct, kw_only=True, rename="camel"):
    """A run in a list across pipelines: what a row shows, without logs or stage results."""

    id: str
    pipeline_id: str
    pipeline_name: str | None = None
    organization_id: str | None
    status: str
    triggered_by: str
    definition_version: int
    trigger: dict[str, Any]
    started_at: str | None
    finished_at: str | None
    duration_ms: int | None
    status_reason: str | None
    status_by: str | None
    created_at: str | None
    updated_at: str | None


def pipeline_view(state: PipelineState) -> PipelineView:
    return PipelineView(
        id=state.pipeline_id,
        name=state.name,
        description=state.description,
        stages=[
            StageView(
                id=s.id, name=s.name, type=s.type, order=s.order, config=s.config, timeout=s.timeout, retry=s.retry
            )
            for s in state.stages
        ],
        organization_id=state.organization_id,
        created_by=state.created_by,
        created_at=iso(state.created_at),
        updated_at=iso(state.updated_at),
        definition_version=state.definition_version,
        repo_url=state.repo_url,
        default_branch=state.default_branch if state.repo_url is not None else None,
        pipeline_file_path=state.pipeline_file_path if state.repo_url is not None else None,
    )


def _ms(start: datetime | None, end: datetime | None) -> int | None:
    if start is None or end is None:
        return None
    return max(0, round((end - start).total_seconds() * 1000))


def log_text(chunks: Iterable[tuple[str | None, Sequence[LogLine]]]) -> tuple[str, dict[str, str]]:
    """The run's whole log, and each stage's own output (its scripts' stdout and stderr).

    `chunks` are (key, lines) pairs in log order; a key is a stage id, or for a step of a job
    `<stage id>\u241f<job>\u241f<step>`. Outputs are kept under both the stage id and the step's key.
    """
    log: list[str] = []
    outputs: dict[str, list[str]] = {}
    for key, lines in chunks:
        stage_id = None if key is None else split_unit_key(key)[0]
        for line in lines:
            log.append(line.text + "\n")
            if line.stream != "system" and key is not None and stage_id is not None:
                outputs.setdefault(stage_id, []).append(line.text + "\n")
                if key != stage_id:
                    outputs.setdefault(key, []).append(line.text + "\n")
    return "".join(log), {k: "".join(v) for k, v in outputs.items()}


def log_key(chunk: LogAppended) -> str | None:
    """Where a chunk of log belongs: its stage, or its step of a job (see log_text)."""
    if chunk.stage_id is None or chunk.job is None or chunk.step is None:
        return chunk.stage_id
    return step_log_key(chunk.stage_id, chunk.job, chunk.step)


def step_log_key(stage_id: str, job: str, step: str) -> str:
    return unit_key(stage_id, job, step)


def _attempts(attempts: Iterable[Any]) -> list[AttemptView]:
    return [
        AttemptView(
            attempt=a.attempt,
            status=a.status,
            started_at=iso(a.started_at),
            finished_at=iso(a.finished_at),
            error=a.error,
            exit_code=a.exit_code,
        )
        for a in attempts
    ]


def _shown(status: str, waiting_for: str | None) -> str:
    """A running attempt that waits for an agent shows as `queued` (the reference's status of a step
    or job not yet on an agent); its `waitingFor` says why."""
    return "queued" if status == "running" and waiting_for else status


def _jobs_view(stage: Stage, sr: StageRun, outputs: dict[str, str]) -> list[JobResultView]:
    views = []
    for job, jr in zip(stage.jobs, sr.jobs, strict=True):
        steps = [
            StepResultView(
                name=st.name,
                kind=step.kind if step.kind != "plugin" else f"uses:{step.uses}",
                status=_shown(st.status, st.waiting_for),
                attempt=st.attempt,
                started_at=iso(st.started_at),
                finished_at=iso(st.finished_at),
                duration_ms=_ms(st.started_at, st.finished_at),
                output=outputs.get(step_log_key(stage.id, job.name, st.name), ""),
                error=st.error,
                exit_code=st.exit_code,
                retry_at=iso(st.retry_at),
                attempts=_attempts(st.attempts),
                waiting_for=st.waiting_for if st.status == "running" else None,
            )
            for step, st in zip(job.steps, jr.steps, strict=True)
        ]
        views.append(
            JobResultView(
                name=jr.name,
                status=jr.status,
                needs=list(job.needs),
                matrix=job.matrix_values,
                started_at=iso(jr.started_at),
                finished_at=iso(jr.finished_at),
                duration_ms=_ms(jr.started_at, jr.finished_at),
                error=jr.error,
                steps=steps,
            )
        )
    return views


def run_view(state: RunState, logs: Iterable[LogAppended] = ()) -> RunView:
    text, outputs = log_text((log_key(c), c.lines) for c in logs)
    results = []
    for stage, sr in zip(state.stages, state.stage_runs, strict=True):
        results.append(
            StageResultView(
                stage_id=sr.stage_id,
                name=stage.name,
                type=stage.type,
                status=_shown(sr.status, sr.waiting_for),
                attempt=sr.attempt,
                started_at=iso(sr.started_at),
                finished_at=iso(sr.finished_at),
                duration_ms=_ms(sr.started_at, sr.finished_at),
                output=outputs.get(sr.stage_id, ""),
                error=sr.error,
                exit_code=sr.exit_code,
                retry_at=iso(sr.retry_at),
                attempts=_attempts(sr.attempts),
                jobs=_jobs_view(stage, sr, outputs) if stage.type == "jobs" else None,
                waiting_for=sr.waiting_for if sr.status == "running" else None,
            )
        )
    return RunView(
        id=state.run_id,
        pipeline_id=state.pipeline_id,
        organization_id=state.organization_id,
        status=state.status,
        triggered_by=state.triggered_by,
        definition_version=state.definition_version,
        variables=state.variables,
        secret_names=list(state.secret_names),
        trigger=state.trigger,
        started_at=iso(state.started_at),
        finished_at=iso(state.finished_at),
        duration_ms=_ms(state.started_at or state.created_at, state.finished_at),
        logs=text,
        stage_results=results,
        approvals=[
            ApprovalView(
                stage_id=a.stage_id,
                decision=a.decision,
                by=a.by,
                comment=a.comment,
                at=iso(a.at),
                job=a.job,
                step=a.step,
            )
            for a in state.approvals
        ],
        status_reason=state.status_reason,
        status_by=state.status_by,
        created_at=iso(state.created_at),
        updated_at=iso(state.updated_at),
    )
