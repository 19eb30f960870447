"""Stop and cancel always win, fast: on the largest run the limits allow, while an executor drives
it as fast as it can, an admin's stop or cancel answers within the bound and the run ends cancelled."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Coroutine
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
import pytest_asyncio

from domain import run as rn
from infra.store.records import NewEvent
from tests.integration.system import System, make_settings, running_system

pytestmark = pytest.mark.integration

# A pipeline of 10,000 stages (as in issue 13's report: far over the default limit of 200, which this
# module's system raises to allow it), and how many of its stages are done when the admin steps in.
STAGES = 10_000
DONE = 3_000
# Issue 13 asks for 2 s. This machine's 2 cores are shared by several test suites at once, so the
# assertion allows 5 s; `make bench` (workload stop_huge_run) prints the figure on a quiet machine.
BOUND = 5.0


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def system(
    database_url: str, nats_url: str, tmp_path_factory: pytest.TempPathFactory, git_repos: Path
) -> AsyncIterator[System]:
    """A system of this module's own; once it has stopped, the huge pipelines and runs leave the
    shared database again (their events of megabytes would make every later module's relay, feed
    and rebuild pay for them)."""
    settings = make_settings(
        database_url, nats_url, tmp_path_factory.mktemp("data"), git_allow_local=(git_repos,), max_stages=STAGES
    )
    async with running_system(settings) as s:
        yield s
        org = s.org
    async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
        cur = await conn.execute("SELECT DISTINCT stream_id, run_id FROM events WHERE org = %s", (org,))
        rows = await cur.fetchall()
        streams = [r[0] for r in rows]
        runs = [r[1] for r in rows if r[1] is not None]
        await conn.execute("DELETE FROM events WHERE org = %s", (org,))
        await conn.execute("DELETE FROM streams WHERE stream_id = ANY(%s)", (streams,))
        await conn.execute("DELETE FROM unique_keys WHERE owner = ANY(%s)", (streams,))
        await conn.execute("DELETE FROM rm_pipelines WHERE org = %s", (org,))
        await conn.execute("DELETE FROM rm_runs WHERE org = %s", (org,))
        for table in ("rm_run_logs", "stage_leases", "run_timers"):
            await conn.execute(f"DELETE FROM {table} WHERE run_id = ANY(%s)", (runs,))


def in_thread(request: Coroutine[Any, Any, httpx.Response]) -> asyncio.Future[httpx.Response]:
    """The test client serves a request by blocking its caller's loop, which also runs the
    executor: the command is sent from a thread of its own, so the executor races it for real."""
    return asyncio.ensure_future(asyncio.to_thread(asyncio.run, request))


async def _huge_run_under_way(system: System) -> tuple[str, str]:
    """A run of the largest pipeline, its first stages already done (written straight into the
    store, as its executor would have: driving thousands of stages for real takes minutes), and an
    executor now driving the rest as fast as it can."""
    stages = [{"id": f"s{i}", "type": "script", "config": {"command": "true"}} for i in range(STAGES)]
    created = await system.create_pipeline(stages)
    pipeline, _ = await system.commands.load_pipeline(created["id"])
    run_id = str(uuid.uuid4())
    at = datetime.now(UTC)
    new: list[rn.RunEvent] = rn.decide(
        rn.TriggerRun(
            run_id=run_id,
            pipeline_id=pipeline.pipeline_id,
            organization_id=pipeline.organization_id,
            definition_version=pipeline.definition_version,
            stages=pipeline.stages,
            variables={},
            secret_names=(),
            trigger={"type": "manual"},
            by="mallory",
            at=at,
        ),
        rn.initial_state,
    )
    state = rn.fold(new)
    events = list(new)
    for i in range(DONE):
        for command in (
            rn.Advance(at=at),
            rn.CompleteStage(stage_id=f"s{i}", attempt=1, succeeded=True, exit_code=0, at=at, advance=False),
        ):
            step = rn.decide(command, state)
            for e in step:
                state = rn.evolve(state, e)
            events += step
    records = [
        NewEvent(str(uuid.uuid4()), e, org=pipeline.organization_id, pipeline_id=pipeline.pipeline_id, run_id=run_id)
        for e in events
    ]
    await system.store.append(f"run-{run_id}", records, 0)
    system.commands.notify_appended()
    # Under way: the executor has picked the run up and is appending stage after stage.
    deadline = time.monotonic() + 120
    while True:
        await asyncio.sleep(0.2)
        stream = await system.store.read_stream(f"run-{run_id}", len(events))
        if sum(e.event_type == "stage_succeeded" for e in stream) >= 5:
            return pipeline.pipeline_id, run_id
        assert time.monotonic() < deadline, "the executor never picked the huge run up"


@pytest.mark.parametrize("action", ["stop", "cancel"])
async def test_an_admins_stop_or_cancel_wins_over_the_executor_on_the_largest_run(system: System, action: str) -> None:
    pipeline_id, run_id = await _huge_run_under_way(system)
    url = f"/api/v1/pipelines/{pipeline_id}/runs/{run_id}/{action}"
    started = time.monotonic()
    r = await in_thread(system.client.post(url, json={"reason": "too big"}, headers=system.headers("admin")))
    took = time.monotonic() - started
    assert r.status_code == 200, r.text
    assert r.json()["status"] == "cancelled"
    assert took < BOUND, f"{action} took {took:.1f} s"
    state, _ = await system.commands.load_run(run_id)
    assert state.status == "cancelled"
