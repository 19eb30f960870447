"""The API's objects (camelCase), rendered from folded domain state. Pure functions."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from datetime import datetime
from typing import Any

import msgspec

from domain.pipeline import PipelineState
from domain.run import LogAppended, LogLine, RunState
from domain.stages import RetryPolicy


def iso(ts: datetime | None) -> str | None:
    """2026-03-16T00:00:00.000Z, as in the API reference."""
    if ts is None:
        return None
    return ts.strftime("%Y-%m-%dT%H:%M:%S.") + f"{ts.microsecond // 1000:03d}Z"


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


class AttemptView(msgspec.Struct, kw_only=True, rename="camel"):
    attempt: int
    status: str
    started_at: str | None
    finished_at: str | None
    error: str | None
    exit_code: int | None


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


class ApprovalView(msgspec.Struct, kw_only=True, rename="camel"):
    stage_id: str
    decision: str
    by: str
    comment: str | None
    at: str | None


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
    )


def _ms(start: datetime | None, end: datetime | None) -> int | None:
    if start is None or end is None:
        return None
    return max(0, round((end - start).total_seconds() * 1000))


def log_text(chunks: Iterable[tuple[str | None, Sequence[LogLine]]]) -> tuple[str, dict[str, str]]:
    """The run's whole log, and each stage's own output (its script's stdout and stderr).

    `chunks` are (stage id, lines) pairs in log order.
    """
    log: list[str] = []
    outputs: dict[str, list[str]] = {}
    for stage_id, lines in chunks:
        for line in lines:
            log.append(line.text + "\n")
            if line.stream != "system" and stage_id is not None:
                outputs.setdefault(stage_id, []).append(line.text + "\n")
    return "".join(log), {k: "".join(v) for k, v in outputs.items()}


def run_view(state: RunState, logs: Iterable[LogAppended] = ()) -> RunView:
    text, outputs = log_text((c.stage_id, c.lines) for c in logs)
    results = []
    for stage, sr in zip(state.stages, state.stage_runs, strict=True):
        results.append(
            StageResultView(
                stage_id=sr.stage_id,
                name=stage.name,
                type=stage.type,
                status=sr.status,
                attempt=sr.attempt,
                started_at=iso(sr.started_at),
                finished_at=iso(sr.finished_at),
                duration_ms=_ms(sr.started_at, sr.finished_at),
                output=outputs.get(sr.stage_id, ""),
                error=sr.error,
                exit_code=sr.exit_code,
                retry_at=iso(sr.retry_at),
                attempts=[
                    AttemptView(
                        attempt=a.attempt,
                        status=a.status,
                        started_at=iso(a.started_at),
                        finished_at=iso(a.finished_at),
                        error=a.error,
                        exit_code=a.exit_code,
                    )
                    for a in sr.attempts
                ],
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
            ApprovalView(stage_id=a.stage_id, decision=a.decision, by=a.by, comment=a.comment, at=iso(a.at))
            for a in state.approvals
        ],
        status_reason=state.status_reason,
        status_by=state.status_by,
        created_at=iso(state.created_at),
        updated_at=iso(state.updated_at),
    )
