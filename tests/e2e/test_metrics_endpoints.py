"""Every service, as the process `make up` starts, serves its own Prometheus metrics: the API and
the gateway on their ports, the executor, relay and projector on the ports the supervisor gave them."""

from __future__ import annotations

import asyncio
import time
import uuid

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.e2e.conftest import RunningStack

pytestmark = pytest.mark.e2e


async def _samples(client: httpx.AsyncClient, url: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    r = await client.get(url)
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain"), url
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(r.text)
        for s in family.samples
    }


async def test_each_service_serves_what_it_measures(stack: RunningStack) -> None:
    urls = dict(stack.stack.metrics_urls())
    assert set(urls) == {"api", "relay", "executor", "projector", "gateway"}
    for name in ("relay", "executor", "projector"):
        assert f"{urls[name]} ({name})" in "\n".join(stack.stack.banner())
    succeeded = frozenset({("status", "succeeded")})
    expected = {
        "executor": [("pipelines_stage_duration_seconds_count", succeeded)],
        "relay": [
            ("pipelines_relay_lag_seconds_count", frozenset()),
            ("pipelines_feed_reads_total", frozenset({("consumer", "relay"), ("result", "events")})),
        ],
        "projector": [
            ("pipelines_projection_lag_seconds_count", frozenset()),
            ("pipelines_feed_reads_total", frozenset({("consumer", "projector"), ("result", "events")})),
        ],
    }
    async with httpx.AsyncClient(timeout=10) as client:
        before = {name: await _samples(client, url) for name, url in urls.items()}
        base = stack.api + "/api/v1/pipelines"
        stage = {"id": "b", "name": "B", "type": "script", "config": {"command": "true"}}
        r = await client.post(
            base, json={"name": f"m-{uuid.uuid4().hex[:6]}", "stages": [stage]}, headers=stack.headers("member")
        )
        assert r.status_code == 201, r.text
        pipeline = r.json()["id"]
        r = await client.post(f"{base}/{pipeline}/trigger", headers=stack.headers("member"))
        assert r.status_code == 201, r.text
        run_url = f"{base}/{pipeline}/runs/{r.json()['id']}"
        deadline = time.monotonic() + 30
        while (await client.get(run_url, headers=stack.headers("viewer"))).json()["status"] != "succeeded":
            assert time.monotonic() < deadline, "the run never succeeded"
            await asyncio.sleep(0.05)
        while True:
            now = {name: await _samples(client, urls[name]) for name in expected}
            grown = all(
                now[name].get(key, 0.0) > before[name].get(key, 0.0) for name, keys in expected.items() for key in keys
            )
            if grown:
                break
            assert time.monotonic() < deadline, f"not every service observed the run: {now}"
            await asyncio.sleep(0.1)
        assert now["executor"].get(("pipelines_run_duration_seconds_count", succeeded), 0.0) > 0
        assert ("pipelines_websocket_clients", frozenset()) in await _samples(client, urls["gateway"])
        assert any(name == "pipelines_http_responses_total" for name, _ in await _samples(client, urls["api"]))
