"""A full scenario over HTTP and WebSocket against every service running as its own process."""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Callable
from typing import Any

import httpx
import pytest
from websockets.asyncio.client import connect

from tests.e2e.conftest import RunningStack

pytestmark = pytest.mark.e2e

SCRIPT = {"id": "build", "name": "Build", "type": "script", "config": {"command": "echo building; echo done >&2"}}
GATE = {"id": "gate", "name": "Ship it?", "type": "approval", "config": {"message": "Deploy to production?"}}
FINAL = {"id": "final", "type": "script", "config": {"command": "echo shipped"}}


async def _wait_for(
    client: httpx.AsyncClient, url: str, headers: dict[str, str], done: Callable[[dict[str, Any]], bool]
) -> dict[str, Any]:
    """The resource once `done` holds for it (polled, for at most 30 s)."""
    deadline = time.monotonic() + 30
    while True:
        r = await client.get(url, headers=headers)
        assert r.status_code == 200, r.text
        body: dict[str, Any] = r.json()
        if done(body):
            return body
        assert time.monotonic() < deadline, f"stuck at {body}"
        await asyncio.sleep(0.05)


async def _wait(client: httpx.AsyncClient, url: str, headers: dict[str, str], statuses: set[str]) -> dict[str, Any]:
    return await _wait_for(client, url, headers, lambda body: body["status"] in statuses)


async def _frames(ws: Any, want: int, timeout: float = 20) -> list[dict[str, Any]]:
    frames: list[dict[str, Any]] = []
    deadline = time.monotonic() + timeout
    while len(frames) < want:
        raw = await asyncio.wait_for(ws.recv(), max(0.1, deadline - time.monotonic()))
        frames.append(json.loads(raw))
    return frames


async def test_create_trigger_approve_reject_cancel_with_live_websocket_events(stack: RunningStack) -> None:
    member, admin, viewer = stack.headers("member"), stack.headers("admin"), stack.headers("viewer")
    async with httpx.AsyncClient(base_url=stack.api, timeout=10) as client:
        r = await client.post("/api/v1/pipelines", json={"name": "e2e"}, headers=viewer)
        assert r.status_code == 403
        r = await client.post(
            "/api/v1/pipelines",
            json={"name": f"e2e-{uuid.uuid4().hex[:6]}", "stages": [SCRIPT, GATE, FINAL]},
            headers=member,
        )
        assert r.status_code == 201, r.text
        pipeline = r.json()
        base = f"/api/v1/pipelines/{pipeline['id']}"

        async with connect(stack.ws, additional_headers=admin) as ws:
            await ws.send(
                json.dumps({"action": "subscribe", "channel": "runs", "params": {"pipelineId": pipeline["id"]}})
            )
            subscribed = json.loads(await asyncio.wait_for(ws.recv(), 10))
            assert subscribed["event"] == "subscribed"

            # approve path
            r = await client.post(f"{base}/trigger", headers=member)
            assert r.status_code == 201 and r.json()["status"] == "queued"
            run = r.json()
            waiting = await _wait(client, f"{base}/runs/{run['id']}", viewer, {"waiting_approval", "failed"})
            assert waiting["status"] == "waiting_approval"
            assert waiting["stageResults"][0]["output"] == "building\ndone\n"
            assert "building" in waiting["logs"]

            seen: list[str] = []
            deadline = time.monotonic() + 20
            while "waiting_approval" not in seen:
                frame = json.loads(await asyncio.wait_for(ws.recv(), max(0.1, deadline - time.monotonic())))
                assert frame["event"] == "pipeline.run.updated"
                assert frame["data"]["id"] == run["id"] and isinstance(frame["position"], int)
                seen.append(frame["data"]["status"])
            assert seen[0] == "queued" and "running" in seen

            r = await client.post(f"{base}/runs/{run['id']}/approve", headers=member)
            assert r.status_code == 403
            r = await client.post(f"{base}/runs/{run['id']}/approve", json={"comment": "ok"}, headers=admin)
            assert r.status_code == 200 and r.json()["status"] == "running"
            done = await _wait(client, f"{base}/runs/{run['id']}", viewer, {"succeeded", "failed"})
            assert done["status"] == "succeeded" and done["stageResults"][2]["output"] == "shipped\n"
            while "succeeded" not in seen:
                frame = json.loads(await asyncio.wait_for(ws.recv(), 20))
                seen.append(frame["data"]["status"])

        # reject path
        run = (await client.post(f"{base}/trigger", headers=member)).json()
        await _wait(client, f"{base}/runs/{run['id']}", viewer, {"waiting_approval"})
        r = await client.post(f"{base}/runs/{run['id']}/reject", json={"reason": "no"}, headers=admin)
        assert r.status_code == 200 and r.json()["status"] == "failed"

        # cancel path
        slow = await client.post(
            "/api/v1/pipelines",
            json={
                "name": f"slow-{uuid.uuid4().hex[:6]}",
                "stages": [{"id": "wait", "type": "script", "config": {"command": "sleep 1"}}, FINAL],
            },
            headers=member,
        )
        sbase = f"/api/v1/pipelines/{slow.json()['id']}"
        run = (await client.post(f"{sbase}/trigger", headers=member)).json()
        await _wait(client, f"{sbase}/runs/{run['id']}", viewer, {"running"})
        r = await client.post(f"{sbase}/runs/{run['id']}/cancel", headers=member)
        assert r.status_code == 403
        r = await client.post(f"{sbase}/runs/{run['id']}/cancel", headers=admin)
        assert r.status_code == 200 and r.json()["status"] == "cancelled"
        # The executor records the end of the stage it was running (the script finished, or was
        # killed): after that nothing is left to go on, and the run stayed cancelled.
        final = await _wait_for(
            client, f"{sbase}/runs/{run['id']}", viewer, lambda body: body["stageResults"][0]["status"] != "running"
        )
        assert final["stageResults"][0]["status"] in ("succeeded", "cancelled"), final
        assert final["status"] == "cancelled" and final["stageResults"][1]["status"] == "skipped"

        # the run list (read model) catches up with all of it
        deadline = time.monotonic() + 20
        while True:
            runs = (await client.get(f"{base}/runs", headers=viewer)).json()
            if [x["status"] for x in runs] == ["failed", "succeeded"]:
                break
            assert time.monotonic() < deadline, runs
            await asyncio.sleep(0.1)


async def test_log_lines_stream_over_websocket_and_resume_from_a_position(stack: RunningStack) -> None:
    member, admin = stack.headers("member"), stack.headers("admin")
    async with httpx.AsyncClient(base_url=stack.api, timeout=10) as client:
        r = await client.post(
            "/api/v1/pipelines",
            json={
                "name": f"logs-{uuid.uuid4().hex[:6]}",
                "stages": [
                    {"id": "count", "type": "script", "config": {"command": "for i in 1 2 3; do echo line $i; done"}},
                    GATE,
                ],
            },
            headers=member,
        )
        pipeline = r.json()
        run = (await client.post(f"/api/v1/pipelines/{pipeline['id']}/trigger", headers=member)).json()
        async with connect(f"{stack.ws}?token={stack.token('viewer')}") as ws:
            await ws.send(
                json.dumps(
                    {"action": "subscribe", "channel": "logs", "params": {"runId": run["id"]}, "fromPosition": 0}
                )
            )
            messages: list[str] = []
            positions: list[int] = []
            deadline = time.monotonic() + 20
            while "line 3" not in messages:
                frame = json.loads(await asyncio.wait_for(ws.recv(), max(0.1, deadline - time.monotonic())))
                if frame["event"] == "pipeline.log":
                    assert frame["data"]["runId"] == run["id"] and frame["data"]["stage"] == "count"
                    messages.append(frame["data"]["message"])
                    positions.append(frame["position"])
            assert [m for m in messages if m.startswith("line")] == ["line 1", "line 2", "line 3"]
        # another organization cannot subscribe to this run
        async with connect(stack.ws, additional_headers=stack.headers("admin", org="elsewhere")) as ws:
            await ws.send(json.dumps({"action": "subscribe", "channel": "runs", "params": {"runId": run["id"]}}))
            frame = json.loads(await asyncio.wait_for(ws.recv(), 10))
            assert frame["event"] == "error"
        await client.post(f"/api/v1/pipelines/{pipeline['id']}/runs/{run['id']}/cancel", headers=admin)


async def test_websocket_needs_a_token(stack: RunningStack) -> None:
    from websockets.exceptions import InvalidStatus

    with pytest.raises(InvalidStatus) as exc:
        async with connect(stack.ws):
            pass
    assert exc.value.response.status_code == 401
