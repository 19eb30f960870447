"""Reports over runs for dashboards: a pipeline's run statistics and the comparison of two runs."""

from __future__ import annotations

import msgspec

from projections.views import RunView


class RunStats(msgspec.Struct, kw_only=True):
    """`successRate`: percent of finished runs (succeeded, failed, cancelled) that succeeded."""

    total: int
    successRate: float
    avgDurationMs: float | None
    lastRunAt: str | None


class RunSide(msgspec.Struct, kw_only=True):
    id: str
    status: str
    triggeredBy: str | None
    durationMs: int | None


class StageDiff(msgspec.Struct, kw_only=True):
    stageId: str
    statusA: str | None
    statusB: str | None
    durationMsA: int | None
    durationMsB: int | None
    durationDeltaMs: int | None
    changed: bool


class RunComparison(msgspec.Struct, kw_only=True):
    runA: RunSide
    runB: RunSide
    stageDiff: list[StageDiff]


def run_stats(total: int, succeeded: int, finished: int, avg_ms: float | None, last: str | None) -> RunStats:
    rate = round(100.0 * succeeded / finished, 1) if finished else 0.0
    return RunStats(
        total=total,
        successRate=rate,
        avgDurationMs=round(avg_ms, 1) if avg_ms is not None else None,
        lastRunAt=last,
    )


def _side(run: RunView) -> RunSide:
    return RunSide(id=run.id, status=run.status, triggeredBy=run.triggered_by, durationMs=run.duration_ms)


def compare_runs(a: RunView, b: RunView) -> RunComparison:
    """Stage by stage, in A's order then the stages only B has; `changed`: status or presence differs."""
    by_a = {s.stage_id: s for s in a.stage_results}
    by_b = {s.stage_id: s for s in b.stage_results}
    order = [s.stage_id for s in a.stage_results] + [s.stage_id for s in b.stage_results if s.stage_id not in by_a]
    diffs = []
    for stage_id in order:
        sa, sb = by_a.get(stage_id), by_b.get(stage_id)
        da = sa.duration_ms if sa is not None else None
        db = sb.duration_ms if sb is not None else None
        status_a = sa.status if sa is not None else None
        status_b = sb.status if sb is not None else None
        diffs.append(
            StageDiff(
                stageId=stage_id,
                statusA=status_a,
                statusB=status_b,
                durationMsA=da,
                durationMsB=db,
                durationDeltaMs=db - da if da is not None and db is not None else None,
                changed=status_a != status_b,
            )
        )
    return RunComparison(runA=_side(a), runB=_side(b), stageDiff=diffs)
