"""Issue 13: an admin's stop and cancel of the largest run, while an executor drives it."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from bench.system import System, script_stages


async def _under_way(system: System, pipeline_id: str, run_id: str, done: int, timeout: float = 300.0) -> int:
    """Wait until `done` stages of the run have succeeded; returns how many had."""
    deadline = time.monotonic() + timeout
    while True:
        r = await system.http.get(f"{system.api}/pipelines/{pipeline_id}/runs/{run_id}", headers=system._h())
        r.raise_for_status()
        succeeded = sum(s["status"] == "succeeded" for s in r.json()["stageResults"])
        if succeeded >= done:
            return succeeded
        if time.monotonic() > deadline:
            raise RuntimeError(f"the huge run never got {done} stages done ({succeeded})")
        await asyncio.sleep(0.1)


async def _one(system: System, pipeline_id: str, action: str, done: int) -> tuple[float, int, str]:
    run_id = await system.trigger(pipeline_id)
    before = await _under_way(system, pipeline_id, run_id, done)
    began = time.monotonic()
    r = await system.http.post(
        f"{system.api}/pipelines/{pipeline_id}/runs/{run_id}/{action}",
        json={"reason": "bench"},
        headers=system._h(admin=True),
    )
    took = (time.monotonic() - began) * 1000
    if r.status_code != 200:
        raise RuntimeError(f"{action} answered {r.status_code}: {r.text[:200]}")
    return round(took, 1), before, str(r.json()["status"])


async def stop_huge_run(system: System, *, stages: int, done: int) -> dict[str, Any]:
    """A pipeline of `stages` stages running `true`, triggered twice; once `done` stages of a run
    have succeeded (the executor driving it flat out), an admin stops it, then cancels the other:
    how long each command took to answer, and the status it left."""
    pipeline_id = await system.create_pipeline(script_stages(*(["true"] * stages)))
    try:
        stop_ms, stop_done, stop_status = await _one(system, pipeline_id, "stop", done)
        cancel_ms, cancel_done, cancel_status = await _one(system, pipeline_id, "cancel", done)
    finally:
        await system.delete_pipeline(pipeline_id)
    return {
        "stages": stages,
        "stop_ms": stop_ms,
        "cancel_ms": cancel_ms,
        "stages_done_before": [stop_done, cancel_done],
        "statuses": [stop_status, cancel_status],
    }
