"""The executor's durable consumer hears only the run events it acts on (issue 17): those written
by others, not the starts, completions and ends it wrote itself."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from infra.broker import bus
from infra.executor.consumer import CONSUMER
from tests.integration.system import System

pytestmark = pytest.mark.integration


def script(sid: str, command: str) -> dict[str, Any]:
    return {"id": sid, "type": "script", "config": {"command": command}}


async def _delivered(system: System) -> int:
    """How many messages the executor's consumer has handed out, once nothing is left to hand out
    (a fresh stream first gets the whole store republished by the relay, earlier modules' runs
    included) and the stream has stopped growing."""
    nc = await bus.connect(system.settings.nats_url, "test-consumer")
    try:
        js = nc.jetstream()
        last = -1
        for _ in range(200):  # 20 s at most
            stream = await js.stream_info(system.settings.events_stream)
            info = await js.consumer_info(system.settings.events_stream, CONSUMER)
            if stream.state.last_seq == last and not info.num_pending and not info.num_ack_pending:
                return int(info.delivered.consumer_seq)
            last = stream.state.last_seq
            await asyncio.sleep(0.1)
        raise AssertionError(f"the executor's consumer never settled: {info}")
    finally:
        await nc.close()


async def test_a_three_stage_run_delivers_only_its_trigger_to_the_executor(system: System) -> None:
    p = await system.create_pipeline([script("a", "true"), script("b", "true"), script("c", "true")])
    before = await _delivered(system)
    run = await system.trigger(p["id"])
    await system.wait_status(p["id"], run["id"], "succeeded")
    # Its 11 run events were all published (the gateway and projector saw the run succeed); the
    # executor was handed one: `run_triggered`.
    assert await _delivered(system) - before == 1


async def test_approvals_and_stops_still_reach_the_executor(system: System) -> None:
    p = await system.create_pipeline(
        [{"id": "gate", "type": "approval", "config": {"message": "go?"}}, script("after", "sleep 30")]
    )
    run = await system.trigger(p["id"])
    await system.wait_status(p["id"], run["id"], "waiting_approval")
    r = await system.client.post(
        f"/api/v1/pipelines/{p['id']}/runs/{run['id']}/approve", json={}, headers=system.headers()
    )
    assert r.status_code == 200, r.text
    await system.wait_run(p["id"], run["id"], lambda r: r["stageResults"][1]["status"] == "running")
    r = await system.client.post(
        f"/api/v1/pipelines/{p['id']}/runs/{run['id']}/stop", json={}, headers=system.headers()
    )
    assert r.status_code == 200, r.text
    # Heard at once: the 30 s script is killed, not waited for.
    await system.wait_status(p["id"], run["id"], "cancelled", timeout=10)
