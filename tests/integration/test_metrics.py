"""Each process's Prometheus metrics, read back with prometheus_client's parser: the executor's stage,
step and run durations (over its own HTTP endpoint), the relay's and the projector's lag, and the
gateway's WebSocket clients (on its GET /metrics).

Every service of the `system` fixture runs in this one process and shares one registry, and other
runs may end meanwhile: the tests compare before and after, never absolute values."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import urllib.request
import uuid
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families
from websockets.asyncio.client import connect

from infra.broker import bus
from infra.gateway.server import Gateway
from infra.metrics import serve
from services.dev.ports import free_port
from tests.integration.system import System, eventually

pytestmark = pytest.mark.integration

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


async def scrape(url: str) -> Samples:
    """Every sample of the metrics page at `url`, by name and labels."""

    def get() -> str:
        with urllib.request.urlopen(url, timeout=5) as r:
            assert r.status == 200 and r.headers["Content-Type"].startswith("text/plain")
            text: str = r.read().decode()
            return text

    text = await asyncio.to_thread(get)
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


@contextlib.contextmanager
def endpoint() -> Any:
    port = free_port()
    stop = serve("127.0.0.1", port)
    assert stop is not None
    try:
        yield f"http://127.0.0.1:{port}/metrics"
    finally:
        stop()


async def test_the_executor_observes_stage_step_and_run_durations_when_they_end(system: System) -> None:
    with endpoint() as url:
        before = await scrape(url)
        p = await system.create_pipeline(
            [
                {"id": "build", "name": "Build", "type": "script", "config": {"command": "sleep 0.05"}},
                {"id": "test", "name": "Test", "type": "script", "config": {"command": "true"}},
            ]
        )
        run = await system.trigger(p["id"])
        await system.wait_status(p["id"], run["id"], "succeeded")
        jobs = await system.create_pipeline([], name=f"jobs-{uuid.uuid4().hex[:8]}")
        spec = {"stages": [{"id": "j", "jobs": [{"name": "one", "steps": [{"name": "a", "run": "true"}]}]}]}
        r = await system.client.post(
            f"/api/v1/pipelines/{jobs['id']}/spec/save", json={"spec": spec}, headers=system.headers("member")
        )
        assert r.status_code == 200, r.text
        run = await system.trigger(jobs["id"])
        await system.wait_status(jobs["id"], run["id"], "succeeded")
        after = await scrape(url)

        def delta(name: str, **labels: str) -> float:
            return value(after, name, **labels) - value(before, name, **labels)

        async def observed() -> bool:
            # The executor observes once its append returns, which may be after the read model
            # (the projector read the committed events meanwhile) shows the run succeeded.
            nonlocal after
            after = await scrape(url)
            return delta("pipelines_run_duration_seconds_count", status="succeeded") >= 2

        await eventually(observed, timeout=5, what="the executor to observe the second run's end")

    # Three stages (two scripts, one of jobs), one step and two runs succeeded meanwhile.
    assert delta("pipelines_stage_duration_seconds_count", status="succeeded") >= 3
    assert delta("pipelines_stage_duration_seconds_sum", status="succeeded") >= 0.05
    assert delta("pipelines_step_duration_seconds_count", status="succeeded") >= 1
    assert delta("pipelines_run_duration_seconds_count", status="succeeded") >= 2
    assert delta("pipelines_run_duration_seconds_sum", status="succeeded") >= 0.05


async def test_a_failed_stage_and_run_are_observed_with_status_failed(system: System) -> None:
    with endpoint() as url:
        before = await scrape(url)
        p = await system.create_pipeline([{"id": "b", "name": "B", "type": "script", "config": {"command": "false"}}])
        run = await system.trigger(p["id"])
        await system.wait_status(p["id"], run["id"], "failed")
        after = await scrape(url)
    for name in ("pipelines_stage_duration_seconds_count", "pipelines_run_duration_seconds_count"):
        assert value(after, name, status="failed") - value(before, name, status="failed") >= 1, name


async def test_the_relay_and_the_projector_observe_their_lag_as_events_flow(system: System) -> None:
    with endpoint() as url:
        before = await scrape(url)
        await system.create_pipeline([{"id": "b", "name": "B", "type": "script", "config": {"command": "true"}}])
        counts: dict[str, float] = {}

        async def both_observed() -> bool:
            now = await scrape(url)
            for name in ("pipelines_relay_lag_seconds_count", "pipelines_projection_lag_seconds_count"):
                counts[name] = value(now, name) - value(before, name)
            return all(n > 0 for n in counts.values())

        await eventually(both_observed, what="relay and projection lag observations")


@contextlib.asynccontextmanager
async def running_gateway(system: System) -> AsyncIterator[Gateway]:
    nc = await bus.connect(system.settings.nats_url, "test-metrics-gateway")
    gateway = Gateway(dataclasses.replace(system.settings, gateway_port=0), system.store, system.commands, nc)
    stop = asyncio.Event()
    task = asyncio.create_task(gateway.serve(stop))
    try:
        async with asyncio.timeout(10):
            await gateway.ready.wait()
        yield gateway
    finally:
        stop.set()
        await asyncio.wait_for(task, 10)
        await nc.drain()


async def test_the_gateway_serves_metrics_with_its_open_websocket_clients(system: System) -> None:
    async with running_gateway(system) as gateway:
        url = f"http://127.0.0.1:{gateway.port}/metrics"
        base = value(await scrape(url), "pipelines_websocket_clients")

        def clients_are(expected: float) -> Callable[[], Any]:
            async def check() -> bool:
                return value(await scrape(url), "pipelines_websocket_clients") == expected

            return check

        ws_url = f"ws://127.0.0.1:{gateway.port}/api/v1/ws?token={system.token('viewer')}"
        async with connect(ws_url):
            await eventually(clients_are(base + 1), what="one more WebSocket client")
        await eventually(clients_are(base), what="the client gone")

        # Beside a health check that still answers.
        def health() -> int:
            with urllib.request.urlopen(f"http://127.0.0.1:{gateway.port}/healthz", timeout=5) as r:
                status: int = r.status
                return status

        assert await asyncio.to_thread(health) == 200


async def test_runs_cancelled_or_stopped_through_the_api_are_observed_once_on_the_api_metrics(system: System) -> None:
    async def scrape_api() -> Samples:
        r = await system.client.get("/metrics")
        assert r.status_code == 200, r.text
        return {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(r.text)
            for s in family.samples
        }

    count = "pipelines_run_duration_seconds_count"
    before = await scrape_api()
    gated = await system.create_pipeline(
        [{"id": "gate", "name": "Gate", "type": "approval", "config": {"message": "go?"}}]
    )
    busy = await system.create_pipeline(
        [{"id": "slow", "name": "Slow", "type": "script", "config": {"command": "sleep 60"}}]
    )
    waiting = await system.trigger(gated["id"])
    await system.wait_status(gated["id"], waiting["id"], "waiting_approval")
    running = await system.trigger(busy["id"])
    await system.wait_status(busy["id"], running["id"], "running")
    for pid, run, action in ((gated["id"], waiting, "cancel"), (busy["id"], running, "stop")):
        r = await system.client.post(
            f"/api/v1/pipelines/{pid}/runs/{run['id']}/{action}", json={"reason": "not now"}, headers=system.headers()
        )
        assert r.status_code == 200, r.text
    await system.wait_status(gated["id"], waiting["id"], "cancelled")
    await system.wait_status(busy["id"], running["id"], "cancelled")
    # The executor hears of both ends too (it kills the sleeping script): give it the time to
    # record what it does about them, then neither end must have been observed twice.
    await asyncio.sleep(2)
    after = await scrape_api()
    assert value(after, count, status="cancelled") - value(before, count, status="cancelled") == 2
