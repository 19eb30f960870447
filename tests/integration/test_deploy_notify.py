"""Deploy and notify stages for real: environments, components and channels; command and webhook
deployers against local receivers; deployment history; notifications with retries and NATS."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import hashlib
import hmac
import itertools
import json
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import psycopg
import pytest

from domain import events as ev
from domain.deployment import DeploymentQueued, DeploymentStarted
from domain.pipeline import PipelineSpecSaved
from domain.stages import Job, Stage, Step
from infra.broker.bus import notify_subject
from infra.delivery.deliveries import DeliveryOptions
from infra.delivery.deployers import env_lock_key
from infra.store.records import NewEvent
from tests.integration.system import System, eventually

pytestmark = pytest.mark.integration


@dataclass
class Receiver:
    """A tiny HTTP server on 127.0.0.1: records each request, answers from `statuses` (then 200)."""

    statuses: list[int] = field(default_factory=list)
    requests: list[tuple[str, dict[str, str], bytes]] = field(default_factory=list)
    port: int = 0
    reply: bytes = b'{"ok": true}'

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hook"

    def bodies(self) -> list[Any]:
        return [json.loads(b) for _, _, b in self.requests]

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request_line = (await reader.readline()).decode()
            headers: dict[str, str] = {}
            while True:
                line = (await reader.readline()).decode().strip()
                if not line:
                    break
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
            body = await reader.readexactly(int(headers.get("content-length", "0")))
            self.requests.append((request_line.split(" ")[1], headers, body))
            status = self.statuses.pop(0) if self.statuses else 200
            reply = self.reply
            writer.write(
                f"HTTP/1.1 {status} X\r\nContent-Type: application/json\r\nContent-Length: {len(reply)}\r\n"
                "Connection: close\r\n\r\n".encode()
                + reply
            )
            await writer.drain()
        finally:
            writer.close()


@contextlib.asynccontextmanager
async def receiver(*statuses: int) -> AsyncIterator[Receiver]:
    r = Receiver(statuses=list(statuses))
    server = await asyncio.start_server(r.handle, "127.0.0.1", 0)
    r.port = server.sockets[0].getsockname()[1]
    try:
        yield r
    finally:
        server.close()
        await server.wait_closed()


async def _post(system: System, path: str, body: dict[str, Any], *roles: str) -> dict[str, Any]:
    r = await system.client.post(path, json=body, headers=system.headers(*(roles or ("admin",))))
    assert r.status_code == 201, r.text
    out: dict[str, Any] = r.json()
    return out


async def component(system: System) -> dict[str, Any]:
    return await _post(system, "/api/v1/components", {"name": f"api-{uuid.uuid4().hex[:6]}"})


async def environment(system: System, deployer: dict[str, Any]) -> dict[str, Any]:
    return await _post(system, "/api/v1/environments", {"name": f"env-{uuid.uuid4().hex[:6]}", "deployer": deployer})


async def deployments(system: System, **query: str) -> dict[str, Any]:
    r = await system.client.get("/api/v1/deployments", params=query, headers=system.headers("viewer"))
    assert r.status_code == 200, r.text
    out: dict[str, Any] = r.json()
    return out


def deploy_stage(comp: dict[str, Any], env: dict[str, Any]) -> dict[str, Any]:
    return {
        "id": "deploy",
        "name": "Deploy",
        "type": "deploy",
        "config": {"componentId": comp["id"], "environmentId": env["id"]},
    }


@pytest.fixture(autouse=True)
def fast_retries(system: System) -> None:
    assert system.executor.deliveries is not None
    system.executor.deliveries.options = dataclasses.replace(
        DeliveryOptions.from_settings(system.settings), notify_attempts=3, notify_backoff=0.05, http_timeout=5
    )


async def test_registry_crud_roles_validation_and_org_scoping(system: System) -> None:
    r = await system.client.post(
        "/api/v1/environments",
        json={"name": "staging", "deployer": {"type": "webhook", "url": "ftp://x"}},
        headers=system.headers("admin"),
    )
    assert r.status_code == 400 and {e["path"] for e in r.json()["errors"]} == {"deployer.url"}
    r = await system.client.post(
        "/api/v1/environments",
        json={"name": "s", "deployer": {"type": "command", "command": "true"}},
        headers=system.headers("member"),
    )
    assert r.status_code == 403
    env = await environment(system, {"type": "webhook", "url": "https://deploy.example/x", "secret": "s3cret"})
    assert env["organizationId"] == system.org
    assert env["deployer"] == {
        "type": "webhook",
        "command": None,
        "url": "https://deploy.example/x",
        "secretConfigured": True,
    }
    assert "s3cret" not in json.dumps(env)
    r = await system.client.get(f"/api/v1/environments/{env['id']}", headers=system.headers("viewer"))
    assert r.status_code == 200 and r.json() == env
    r = await system.client.get("/api/v1/environments", headers=system.headers("viewer"))
    assert env["id"] in [e["id"] for e in r.json()]
    r = await system.client.patch(
        f"/api/v1/environments/{env['id']}", json={"description": "pre-prod"}, headers=system.headers("admin")
    )
    assert r.status_code == 200 and r.json()["description"] == "pre-prod"
    assert r.json()["deployer"]["secretConfigured"] is True  # a PATCH keeps what it does not name
    r = await system.client.put(
        f"/api/v1/environments/{env['id']}",
        json={"name": env["name"], "deployer": {"type": "command", "command": "echo hi"}},
        headers=system.headers("admin"),
    )
    assert r.status_code == 200 and r.json()["deployer"]["type"] == "command"
    # Another organization sees nothing of it.
    other = system.headers("admin", org="another-org")
    r = await system.client.get(f"/api/v1/environments/{env['id']}", headers=other)
    assert r.status_code == 404
    r = await system.client.delete(f"/api/v1/environments/{env['id']}", headers=other)
    assert r.status_code == 404
    r = await system.client.delete(f"/api/v1/environments/{env['id']}", headers=system.headers("member"))
    assert r.status_code == 403
    r = await system.client.delete(f"/api/v1/environments/{env['id']}", headers=system.headers("admin"))
    assert r.status_code == 204
    r = await system.client.get(f"/api/v1/environments/{env['id']}", headers=system.headers("viewer"))
    assert r.status_code == 404

    ch = await _post(system, "/api/v1/channels", {"name": "#ops", "type": "slack", "url": "http://127.0.0.1:9/x"})
    assert ch["type"] == "slack" and ch["secretConfigured"] is False
    r = await system.client.post(
        "/api/v1/channels",
        json={"name": "#ops", "type": "slack", "url": "http://127.0.0.1:9/x"},
        headers=system.headers("admin"),
    )
    assert r.status_code == 409
    r = await system.client.post(
        "/api/v1/channels", json={"name": "x", "type": "email", "url": "http://h/"}, headers=system.headers("admin")
    )
    assert r.status_code == 400 and r.json()["errors"][0]["path"] == "type"


async def test_unknown_component_or_environment_is_refused_at_save_time(system: System) -> None:
    comp = await component(system)
    env = await environment(system, {"type": "command", "command": "true"})
    bad = {"id": "d", "name": "d", "type": "deploy", "config": {"componentId": "nope", "environmentId": env["id"]}}
    r = await system.client.post(
        "/api/v1/pipelines",
        json={"name": f"p-{uuid.uuid4().hex[:6]}", "stages": [bad]},
        headers=system.headers("member"),
    )
    assert r.status_code == 400, r.text
    assert [e["path"] for e in r.json()["errors"]] == ["stages[0].config.componentId"]
    # Another organization's environment is unknown here too.
    other_env = await _post(
        system, "/api/v1/environments", {"name": "x", "deployer": {"type": "command", "command": "true"}}
    )
    p = await system.create_pipeline([deploy_stage(comp, env)])
    stage = {**deploy_stage(comp, env), "config": {"componentId": comp["id"], "environmentId": "missing"}}
    r = await system.client.patch(f"/api/v1/pipelines/{p['id']}", json={"stages": [stage]}, headers=system.headers())
    assert r.status_code == 400 and r.json()["errors"][0]["path"] == "stages[0].config.environmentId"
    r = await system.client.post(
        f"/api/v1/pipelines/{p['id']}/spec/save",
        json={"spec": {"stages": [stage]}, "format": "json"},
        headers=system.headers(),
    )
    assert r.status_code == 400, r.text
    assert r.json()["errors"][0]["path"] == "spec.stages[0].config.environmentId"
    r = await system.client.post(
        "/api/v1/pipelines",
        json={"name": f"p-{uuid.uuid4().hex[:6]}", "stages": [deploy_stage(comp, other_env)]},
        headers=system.headers("member", org="someone-else"),
    )
    assert r.status_code == 400


async def test_command_deployer_runs_and_is_recorded_with_approval(system: System) -> None:
    comp = await component(system)
    env = await environment(
        system,
        {
            "type": "command",
            "command": 'echo "deploying $COMPONENT_ID to $ENVIRONMENT_ID run=$RUN_ID '
            'pipeline=$PIPELINE_ID version=$VERSION"',
        },
    )
    gate = {"id": "gate", "name": "Gate", "type": "approval", "config": {}}
    p = await system.create_pipeline([gate, deploy_stage(comp, env)])
    run = await system.trigger(p["id"], variables={"VERSION": "1.2.3"})
    await system.wait_status(p["id"], run["id"], "waiting_approval")
    r = await system.client.post(
        f"/api/v1/pipelines/{p['id']}/runs/{run['id']}/approve", json={}, headers=system.headers("admin", sub="boss")
    )
    assert r.status_code == 200, r.text
    done = await system.wait_status(p["id"], run["id"], "succeeded", "failed")
    assert done["status"] == "succeeded", done
    out = done["stageResults"][1]["output"]
    assert f"deploying {comp['id']} to {env['id']} run={run['id']} pipeline={p['id']} version=1.2.3" in out
    assert "succeeded" in out

    async def recorded() -> bool:
        return (await deployments(system, environmentId=env["id"], status="succeeded"))["total"] == 1

    await eventually(recorded, what="the deployment in the history")
    page = await deployments(system, environmentId=env["id"])
    d = page["data"][0]
    assert d["componentId"] == comp["id"] and d["componentName"] == comp["name"]
    assert d["runId"] == run["id"] and d["pipelineId"] == p["id"] and d["definitionVersion"] == 1
    assert d["version"] == "1.2.3" and d["approvedBy"] == "boss" and d["approvedAt"] is not None
    assert d["deployer"] == "command" and d["startedAt"] and d["finishedAt"]
    r = await system.client.get(f"/api/v1/deployments/{d['id']}", headers=system.headers("viewer"))
    assert r.status_code == 200 and r.json() == d
    r = await system.client.get(
        "/api/v1/deployments/current", params={"environmentId": env["id"]}, headers=system.headers("viewer")
    )
    assert [x["id"] for x in r.json()] == [d["id"]]
    r = await system.client.get(f"/api/v1/deployments/{d['id']}", headers=system.headers("viewer", org="other"))
    assert r.status_code == 404

    # A failing command fails the stage and the deployment.
    broken = await environment(system, {"type": "command", "command": "echo nope >&2; exit 3"})
    p2 = await system.create_pipeline([deploy_stage(comp, broken)])
    run2 = await system.trigger(p2["id"])
    failed = await system.wait_status(p2["id"], run2["id"], "failed", "succeeded")
    assert failed["status"] == "failed"
    assert "exited with code 3" in (failed["stageResults"][0]["error"] or "")
    assert "nope" in failed["stageResults"][0]["output"]

    async def failed_recorded() -> bool:
        return (await deployments(system, environmentId=broken["id"], status="failed"))["total"] == 1

    await eventually(failed_recorded, what="the failed deployment in the history")


async def test_webhook_deployer_posts_a_signed_request(system: System) -> None:
    comp = await component(system)
    async with receiver(200, 503) as hook:
        env = await environment(system, {"type": "webhook", "url": hook.url, "secret": "topsecret"})
        p = await system.create_pipeline([deploy_stage(comp, env)])
        run = await system.trigger(p["id"], variables={"COLOR": "blue"})
        done = await system.wait_status(p["id"], run["id"], "succeeded", "failed")
        assert done["status"] == "succeeded", done
        assert len(hook.requests) == 1
        _, headers, body = hook.requests[0]
        expected = "sha256=" + hmac.new(b"topsecret", body, hashlib.sha256).hexdigest()
        assert headers["x-pipelines-signature-256"] == expected
        # The secret is stored sealed (AES-GCM under the secrets key), never in clear.
        async with system.store.pool.connection() as conn:
            cur = await conn.execute("SELECT secret FROM delivery_config WHERE id = %s", (env["id"],))
            stored = (await cur.fetchone() or ("",))[0]
        assert stored.startswith("sealed:v1:") and "topsecret" not in stored
        sent = json.loads(body)
        assert sent["componentId"] == comp["id"] and sent["environmentId"] == env["id"]
        assert sent["runId"] == run["id"] and sent["pipelineId"] == p["id"] and sent["definitionVersion"] == 1
        assert sent["variables"] == {"COLOR": "blue"} and sent["deploymentId"]
        assert "HTTP 200" in done["stageResults"][0]["output"]
        # Not 2xx: the stage fails.
        run2 = await system.trigger(p["id"])
        failed = await system.wait_status(p["id"], run2["id"], "failed", "succeeded")
        assert failed["status"] == "failed" and "HTTP 503" in (failed["stageResults"][0]["error"] or "")

    async def recorded() -> bool:
        page = await deployments(system, environmentId=env["id"])
        return page["total"] == 2 and {d["status"] for d in page["data"]} == {"succeeded", "failed"}

    await eventually(recorded, what="both deployments in the history")
    page = await deployments(system, environmentId=env["id"], limit="1", page="1")
    assert len(page["data"]) == 1 and page["data"][0]["runId"] == run2["id"]  # newest first


async def test_one_deployment_at_a_time_per_environment_in_order(system: System) -> None:
    comp = await component(system)
    env = await environment(system, {"type": "command", "command": "sleep 0.4"})
    p = await system.create_pipeline([deploy_stage(comp, env)])

    async def in_line(run_id: str) -> bool:
        """The run's deployment holds the environment's lock (it started) or waits for it: the
        next one queues behind it."""
        async with system.store.pool.connection() as conn:
            cur = await conn.execute(
                "SELECT q.stream_id, EXISTS (SELECT 1 FROM events s WHERE s.stream_id = q.stream_id "
                "AND s.event_type = 'deployment_started') FROM events q "
                "WHERE q.run_id = %s AND q.event_type = 'deployment_queued'",
                (run_id,),
            )
            row = await cur.fetchone()
            if row is None:
                return False
            stream_id, started = row
            cur = await conn.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE application_name = %s AND wait_event_type = 'Lock'",
                (f"pipelines-deploy {stream_id.removeprefix('deployment-')}"[:63],),
            )
            waiting = await cur.fetchone()
        return bool(started) or waiting == (1,)

    runs = []
    for _ in range(3):
        runs.append(await system.trigger(p["id"]))
        await eventually(partial(in_line, runs[-1]["id"]), what="the deployment at the environment's lock")
    for run in runs:
        done = await system.wait_status(p["id"], run["id"], "succeeded", "failed")
        assert done["status"] == "succeeded", done

    async def recorded() -> bool:
        return (await deployments(system, environmentId=env["id"], status="succeeded"))["total"] == 3

    await eventually(recorded, what="three deployments")
    ds = sorted((await deployments(system, environmentId=env["id"]))["data"], key=lambda d: d["startedAt"])
    for a, b in itertools.pairwise(ds):
        assert a["finishedAt"] <= b["startedAt"], ds  # never two at once
    assert [d["queuedAt"] for d in ds] == sorted(d["queuedAt"] for d in ds)  # in queue order
    logs = [(await system.get_run(p["id"], r["id"]))["logs"] for r in runs]
    assert any("queued: another deployment" in log for log in logs)


async def test_notify_slack_retries_and_publishes_on_nats(system: System) -> None:
    received: list[bytes] = []

    async def on_msg(msg: Any) -> None:
        received.append(msg.data)

    sub = await system.nc.subscribe(notify_subject(system.org, "#deploys-x"), cb=on_msg)
    try:
        async with receiver(500, 502) as hook:
            await _post(
                system, "/api/v1/channels", {"name": "#deploys-x", "type": "slack", "url": hook.url, "secret": "k"}
            )
            stage = {
                "id": "n",
                "name": "Notify",
                "type": "notify",
                "config": {"channel": "#deploys-x", "message": "Run ${{ run.id }} of ${{ pipeline.name }}"},
            }
            p = await system.create_pipeline([stage], name=f"shop-{uuid.uuid4().hex[:6]}")
            run = await system.trigger(p["id"])
            done = await system.wait_status(p["id"], run["id"], "succeeded", "failed")
            assert done["status"] == "succeeded", done
            text = f"Run {run['id']} of {p['name']}"
            assert hook.bodies() == [{"text": text}] * 3  # two failures, then delivered
            _, headers, body = hook.requests[-1]
            assert headers["x-pipelines-signature-256"] == "sha256=" + hmac.new(b"k", body, hashlib.sha256).hexdigest()
            out = done["stageResults"][0]["output"]
            assert "attempt 1 of 3" in out and "attempt 2 of 3" in out and "HTTP 200 (attempt 3)" in out
        await eventually(lambda: asyncio.sleep(0, bool(received)), what="the NATS notification")
        note = json.loads(received[0])
        assert note["message"] == text and note["channel"] == "#deploys-x" and note["runId"] == run["id"]
        assert note["pipelineId"] == p["id"] and note["status"] == "running" and note["sentAt"]
    finally:
        await sub.unsubscribe()


async def test_notify_generic_webhook_and_final_failure(system: System) -> None:
    async with receiver(200, 500, 500, 500) as hook:
        await _post(system, "/api/v1/channels", {"name": "builds", "type": "webhook", "url": hook.url})
        stage = {
            "id": "n",
            "name": "Notify",
            "type": "notify",
            "config": {"channel": "builds", "message": "done: ${{ pipeline.id }}"},
        }
        p = await system.create_pipeline([stage])
        run = await system.trigger(p["id"])
        done = await system.wait_status(p["id"], run["id"], "succeeded", "failed")
        assert done["status"] == "succeeded", done
        body = hook.bodies()[0]
        assert body["channel"] == "builds" and body["message"] == f"done: {p['id']}"
        assert body["runId"] == run["id"] and body["pipelineId"] == p["id"] and body["status"] == "running"
        assert body["sentAt"]
        run2 = await system.trigger(p["id"])
        failed = await system.wait_status(p["id"], run2["id"], "failed", "succeeded")
        assert failed["status"] == "failed"
        assert "failed after 3 attempts: HTTP 500" in (failed["stageResults"][0]["error"] or "")
        assert len(hook.requests) == 4


async def test_notify_without_a_notifier_fails_clearly(system: System) -> None:
    stage = {"id": "n", "name": "Notify", "type": "notify", "config": {"channel": "#nobody", "message": "hi"}}
    p = await system.create_pipeline([stage])
    run = await system.trigger(p["id"])
    failed = await system.wait_status(p["id"], run["id"], "failed", "succeeded")
    assert failed["status"] == "failed"
    assert "no notifier is configured for channel '#nobody'" in (failed["stageResults"][0]["error"] or "")


async def test_deployment_events_are_published_on_nats(system: System) -> None:
    subjects: list[str] = []

    async def on_msg(msg: Any) -> None:
        subjects.append(msg.subject)

    sub = await system.nc.subscribe(f"pipelines.v1.{system.org}.deployment.>", cb=on_msg)
    try:
        comp = await component(system)
        env = await environment(system, {"type": "command", "command": "true"})
        p = await system.create_pipeline([deploy_stage(comp, env)])
        run = await system.trigger(p["id"])
        await system.wait_status(p["id"], run["id"], "succeeded")

        async def published() -> bool:
            return len(subjects) >= 3

        await eventually(published, what="deployment events on NATS")
        assert [s.rsplit(".", 1)[1] for s in subjects] == [
            "deployment_queued",
            "deployment_started",
            "deployment_succeeded",
        ]
    finally:
        await sub.unsubscribe()


async def test_creating_an_environment_honours_the_idempotency_key(system: System) -> None:
    key = {"Idempotency-Key": "env-create-1"}
    body = {"name": "idem-env", "deployer": {"type": "command", "command": "true"}}
    first = await system.client.post("/api/v1/environments", json=body, headers={**system.headers("admin"), **key})
    again = await system.client.post("/api/v1/environments", json=body, headers={**system.headers("admin"), **key})
    assert first.status_code == 201 and again.status_code == 201 and again.json() == first.json()
    other = await system.client.post(
        "/api/v1/environments", json={**body, "name": "other"}, headers={**system.headers("admin"), **key}
    )
    assert other.status_code == 409


async def _half_done_deployment(
    system: System, comp: dict[str, Any], env: dict[str, Any], pipeline_id: str, run_id: str, stage_id: str
) -> str:
    """What a dead executor leaves behind: a deployment queued and started, never finished."""
    deployment_id = str(uuid.uuid4())
    now = system.commands.now()
    queued = DeploymentQueued(
        deployment_id=deployment_id,
        organization_id=system.org,
        environment_id=env["id"],
        environment_name=env["name"],
        component_id=comp["id"],
        component_name=comp["name"],
        run_id=run_id,
        pipeline_id=pipeline_id,
        stage_id=stage_id,
        attempt=1,
        definition_version=1,
        deployer="command",
        at=now,
    )
    for version, event in enumerate([queued, DeploymentStarted(deployment_id=deployment_id, at=now)]):
        meta = NewEvent(str(uuid.uuid4()), event, org=system.org, pipeline_id=pipeline_id, run_id=run_id)
        await system.store.append(ev.deployment_stream(deployment_id), [meta], version)
    system.commands.notify_appended()

    async def running() -> bool:
        page = await deployments(system, environmentId=env["id"], status="running")
        return deployment_id in [d["id"] for d in page["data"]]

    await eventually(running, what="the half-done deployment in the history")
    return deployment_id


async def _deployment(system: System, deployment_id: str) -> dict[str, Any]:
    r = await system.client.get(f"/api/v1/deployments/{deployment_id}", headers=system.headers("viewer"))
    assert r.status_code == 200, r.text
    out: dict[str, Any] = r.json()
    return out


async def test_abandon_closes_a_deployment_left_by_a_dead_executor(system: System) -> None:
    deliveries = system.executor.deliveries
    assert deliveries is not None
    comp = await component(system)
    env = await environment(system, {"type": "command", "command": "echo deployed"})
    p = await system.create_pipeline([deploy_stage(comp, env)])
    dead_run = str(uuid.uuid4())
    # The dead executor held the environment's lock on its own session.
    dead = await psycopg.AsyncConnection.connect(system.settings.database_url, autocommit=True)
    try:
        await dead.execute("SELECT pg_advisory_lock(%s)", (env_lock_key(env["id"]),))
        deployment_id = await _half_done_deployment(system, comp, env, p["id"], dead_run, "deploy")
        # A new deployment to that environment queues behind it ...
        run = await system.trigger(p["id"])

        async def queued() -> bool:
            return "queued: another deployment" in (await system.get_run(p["id"], run["id"]))["logs"]

        await eventually(queued, what="the next deployment queued behind the dead one")
    finally:
        await dead.close()  # ... until the executor's process (and so its session) is gone.
    reason = "executor lost: the executor running stage deploy stopped renewing its lease"
    assert await deliveries.abandon(dead_run, "deploy", reason, attempt=2) == []  # another attempt's
    assert await deliveries.abandon(dead_run, "deploy", reason, attempt=1) == [deployment_id]
    assert await deliveries.abandon(dead_run, "deploy", reason) == []  # twice: nothing more
    assert await deliveries.abandon(dead_run, "other-stage", reason) == []  # nothing to close
    assert await deliveries.abandon(str(uuid.uuid4()), "deploy", reason) == []
    records = await system.store.read_stream(ev.deployment_stream(deployment_id))
    assert [r.event_type for r in records] == ["deployment_queued", "deployment_started", "deployment_failed"]

    async def closed() -> bool:
        return (await _deployment(system, deployment_id))["status"] == "failed"

    await eventually(closed, what="the abandoned deployment failed in the history")
    d = await _deployment(system, deployment_id)
    assert d["error"] == reason and d["finishedAt"] is not None and d["runId"] == dead_run

    done = await system.wait_status(p["id"], run["id"], "succeeded", "failed")
    assert done["status"] == "succeeded", done
    # And a later one still runs at once.
    run2 = await system.trigger(p["id"])
    done2 = await system.wait_status(p["id"], run2["id"], "succeeded", "failed")
    assert done2["status"] == "succeeded", done2
    assert "queued: another deployment" not in done2["logs"]

    async def recorded() -> bool:
        page = await deployments(system, environmentId=env["id"])
        return sorted(x["status"] for x in page["data"]) == ["failed", "succeeded", "succeeded"]

    await eventually(recorded, what="the next deployments in the history")


async def test_close_orphans_closes_deployments_whose_stage_has_ended(system: System) -> None:
    deliveries = system.executor.deliveries
    assert deliveries is not None
    comp = await component(system)
    env = await environment(system, {"type": "command", "command": "true"})
    p = await system.create_pipeline([deploy_stage(comp, env)])
    run = await system.trigger(p["id"])
    done = await system.wait_status(p["id"], run["id"], "succeeded", "failed")
    assert done["status"] == "succeeded", done
    # Left running against a stage that has ended (its executor died after the stage was settled).
    orphan = await _half_done_deployment(system, comp, env, p["id"], run["id"], "deploy")
    closed = await deliveries.close_orphans()
    assert orphan in closed
    assert orphan not in await deliveries.close_orphans()

    async def failed() -> bool:
        return (await _deployment(system, orphan))["status"] == "failed"

    await eventually(failed, what="the orphan closed")
    d = await _deployment(system, orphan)
    assert "executor lost" in (d["error"] or "") and "is succeeded" in (d["error"] or "")
    # The run's own deployment is untouched.
    page = await deployments(system, environmentId=env["id"], status="succeeded")
    assert page["total"] == 1


async def _projected(system: System, pipeline_id: str, version: int | None) -> None:
    """Wait until the pipelines read model holds this definition version (None: the row is gone)."""

    async def check() -> bool:
        async with system.store.pool.connection() as conn:
            cur = await conn.execute(
                "SELECT (state::jsonb ->> 'definition_version')::int FROM rm_pipelines WHERE id = %s", (pipeline_id,)
            )
            row = await cur.fetchone()
        return (row[0] if row else None) == version

    await eventually(check, what=f"pipeline {pipeline_id} at version {version} in the read model")


async def test_deleting_an_environment_or_component_a_pipeline_uses_is_refused(system: System) -> None:
    comp = await component(system)
    env = await environment(system, {"type": "command", "command": "true"})
    env2 = await environment(system, {"type": "command", "command": "true"})
    admin = system.headers("admin")
    p = await system.create_pipeline([deploy_stage(comp, env)], name=f"a-{uuid.uuid4().hex[:6]}")
    # A deploy step inside a job uses them too. (The API refuses to save stages of jobs until they
    # can run, so the saved definition is appended as the spec save would record it.)
    p2 = await system.create_pipeline([{"id": "s", "name": "s", "type": "script", "config": {"command": "true"}}])
    step = Step(name="ship", kind="deploy", config={"componentId": comp["id"], "environmentId": env2["id"]})
    jobs = Stage(id="b", name="b", type="jobs", order=0, jobs=(Job(name="j", steps=(step,)),))
    _, version = await system.commands.load_pipeline(p2["id"])
    saved = PipelineSpecSaved(
        spec={"stages": [{"id": "b", "jobs": [{"name": "j", "steps": [{"name": "ship", "deploy": step.config}]}]}]},
        stages=(jobs,),
        saved_by="alice",
        at=system.commands.now(),
        definition_version=2,
    )
    await system.store.append(
        ev.pipeline_stream(p2["id"]),
        [NewEvent(str(uuid.uuid4()), saved, org=system.org, pipeline_id=p2["id"])],
        version,
    )
    system.commands.notify_appended()
    await _projected(system, p["id"], 1)
    await _projected(system, p2["id"], 2)

    r = await system.client.delete(f"/api/v1/environments/{env['id']}", headers=admin)
    assert r.status_code == 409, r.text
    assert r.json() == {
        "statusCode": 409,
        "error": "Conflict",
        "message": f"environment {env['id']} is used by pipelines: {p['name']} ({p['id']})",
    }
    r = await system.client.delete(f"/api/v1/environments/{env2['id']}", headers=admin)
    assert r.status_code == 409 and p2["id"] in r.json()["message"] and p["id"] not in r.json()["message"]
    r = await system.client.delete(f"/api/v1/components/{comp['id']}", headers=admin)
    assert r.status_code == 409, r.text
    message = r.json()["message"]
    assert message.startswith(f"component {comp['id']} is used by pipelines: ")
    assert p["id"] in message and p2["id"] in message
    # Another organization neither sees it nor learns who uses it.
    r = await system.client.delete(f"/api/v1/environments/{env['id']}", headers=system.headers("admin", org="x"))
    assert r.status_code == 404
    # Still there.
    r = await system.client.get(f"/api/v1/environments/{env['id']}", headers=admin)
    assert r.status_code == 200

    # Once no live pipeline uses them, they go.
    script = {"id": "s", "name": "s", "type": "script", "config": {"command": "true"}}
    r = await system.client.patch(f"/api/v1/pipelines/{p['id']}", json={"stages": [script]}, headers=admin)
    assert r.status_code == 200, r.text
    await _projected(system, p["id"], 2)
    r = await system.client.delete(f"/api/v1/environments/{env['id']}", headers=admin)
    assert r.status_code == 204, r.text
    r = await system.client.delete(f"/api/v1/components/{comp['id']}", headers=admin)
    assert r.status_code == 409 and p2["id"] in r.json()["message"] and p["id"] not in r.json()["message"]
    r = await system.client.delete(f"/api/v1/pipelines/{p2['id']}", headers=admin)
    assert r.status_code in (200, 204), r.text
    await _projected(system, p2["id"], None)
    r = await system.client.delete(f"/api/v1/components/{comp['id']}", headers=admin)
    assert r.status_code == 204, r.text
    r = await system.client.delete(f"/api/v1/environments/{env2['id']}", headers=admin)
    assert r.status_code == 204, r.text


async def test_a_deployment_closed_while_it_waited_does_not_run(system: System) -> None:
    deliveries = system.executor.deliveries
    assert deliveries is not None
    comp = await component(system)
    env = await environment(system, {"type": "command", "command": "echo ran"})
    p = await system.create_pipeline([deploy_stage(comp, env)])
    holder = await psycopg.AsyncConnection.connect(system.settings.database_url, autocommit=True)
    try:
        await holder.execute("SELECT pg_advisory_lock(%s)", (env_lock_key(env["id"]),))
        run = await system.trigger(p["id"])

        async def queued() -> bool:
            return "queued: another deployment" in (await system.get_run(p["id"], run["id"]))["logs"]

        await eventually(queued, what="the deployment queued")
        closed = await deliveries.abandon(run["id"], "deploy", "taken for lost")
        assert len(closed) == 1
    finally:
        await holder.close()
    done = await system.wait_status(p["id"], run["id"], "failed", "succeeded")
    assert done["status"] == "failed", done
    assert "was closed while it waited: taken for lost" in (done["stageResults"][0]["error"] or "")
    assert "ran" not in done["stageResults"][0]["output"].split()
    records = await system.store.read_stream(ev.deployment_stream(closed[0]))
    assert [r.event_type for r in records] == ["deployment_queued", "deployment_failed"]
