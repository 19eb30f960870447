"""Stored secrets (/api/v1/secrets) against the real API, PostgreSQL and NATS: write-only, sealed
at rest, used by every run of their organization or pipeline whatever started it (the API, cron, a
webhook), masked, with a trigger's own secret over the pipeline's over the organization's; and
another organization's admin can neither read, list, overwrite nor use them."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import uuid
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from infra.executor.scheduler import Scheduler
from tests.integration.system import System

pytestmark = pytest.mark.integration

ORG_VALUE = "org-wide-s3cret-value-0001"
PIPE_VALUE = "pipeline-own-s3cret-value-0002"
TRIGGER_VALUE = "trigger-body-s3cret-value-0003"
HOOK_SECRET = "a-webhook-secret-of-some-length"
# Prints the value's digest (the script had the real value) and the value itself (to be masked).
SHOW = 'printf %s "$TOKEN" | sha256sum | cut -c1-64; echo "token=$TOKEN"; echo "other=${OTHER:-unset}"'


def sha(value: str) -> str:
    return hashlib.sha256(value.encode()).hexdigest()


def other_org() -> str:
    return f"org-b-{uuid.uuid4().hex[:8]}"


async def put_secret(
    system: System, name: str, value: str, *, pipeline: str | None = None, org: str | bool = True, role: str = "admin"
) -> Any:
    params = {"pipelineId": pipeline} if pipeline else None
    return await system.client.put(
        f"/api/v1/secrets/{name}", json={"value": value}, params=params, headers=system.headers(role, org=org)
    )


async def script_pipeline(system: System, command: str = SHOW) -> dict[str, Any]:
    return await system.create_pipeline([{"id": "show", "type": "script", "config": {"command": command}}])


async def output_of(system: System, pid: str, run_id: str) -> str:
    done = await system.wait_status(pid, run_id, "succeeded", "failed")
    assert done["status"] == "succeeded", done
    out: str = done["stageResults"][0]["output"]
    return out


async def test_secrets_are_write_only_sealed_and_admin_only(system: System) -> None:
    p = await script_pipeline(system)
    r = await put_secret(system, "TOKEN", ORG_VALUE)
    assert r.status_code == 201, r.text
    assert ORG_VALUE not in r.text
    body = r.json()
    assert body["name"] == "TOKEN" and body["scope"] == "organization" and body["pipelineId"] is None
    assert body["createdBy"] == "alice" and body["createdAt"] and body["updatedAt"]
    r = await put_secret(system, "TOKEN", PIPE_VALUE, pipeline=p["id"])
    assert r.status_code == 201 and r.json()["scope"] == "pipeline" and r.json()["pipelineId"] == p["id"]
    r = await put_secret(system, "TOKEN", ORG_VALUE + "-2")
    assert r.status_code == 200, r.text  # replaced

    # viewers read names and metadata, never a value
    r = await system.client.get("/api/v1/secrets", headers=system.headers("viewer"))
    assert r.status_code == 200
    assert ORG_VALUE not in r.text and PIPE_VALUE not in r.text and "value" not in r.text
    assert sorted((s["name"], s["scope"]) for s in r.json()) == [("TOKEN", "organization"), ("TOKEN", "pipeline")]
    r = await system.client.get("/api/v1/secrets", params={"pipelineId": p["id"]}, headers=system.headers("viewer"))
    assert [(s["name"], s["pipelineId"]) for s in r.json()] == [("TOKEN", p["id"])]
    r = await system.client.get("/api/v1/secrets/TOKEN", headers=system.headers("viewer"))
    assert r.status_code == 200 and r.json()["scope"] == "organization" and ORG_VALUE not in r.text

    # writing is an admin's
    assert (await put_secret(system, "TOKEN", "x", role="member")).status_code == 403
    r = await system.client.delete("/api/v1/secrets/TOKEN", headers=system.headers("member"))
    assert r.status_code == 403

    # sealed at rest: no table holds a value in clear
    async with system.store.pool.connection() as conn:
        cur = await conn.execute("SELECT value FROM stored_secrets WHERE org = %s", (system.org,))
        blobs = [bytes(row[0]) for row in await cur.fetchall()]
    assert len(blobs) == 2 and not any(v.encode() in b for b in blobs for v in (ORG_VALUE, PIPE_VALUE))

    r = await system.client.delete("/api/v1/secrets/TOKEN", params={"pipelineId": p["id"]}, headers=system.headers())
    assert r.status_code == 204
    r = await system.client.delete("/api/v1/secrets/TOKEN", params={"pipelineId": p["id"]}, headers=system.headers())
    assert r.status_code == 404
    r = await system.client.delete("/api/v1/secrets/TOKEN", headers=system.headers())
    assert r.status_code == 204


@pytest.mark.parametrize(
    ("name", "body", "field"),
    [
        ("1BAD", {"value": "x"}, "name"),
        ("HAS-DASH", {"value": "x"}, "name"),
        ("OK", {"value": "a\u0000b-hidden"}, "value"),
        ("OK", {"value": "y" * (32 * 1024 + 1)}, "value"),
    ],
)
async def test_bad_names_and_values_are_400_naming_the_field(
    system: System, name: str, body: dict[str, Any], field: str
) -> None:
    r = await system.client.put(f"/api/v1/secrets/{name}", json=body, headers=system.headers())
    assert r.status_code == 400, r.text
    assert field in r.text and "hidden" not in r.text and "yyyy" not in r.text


async def test_another_organization_can_neither_read_list_overwrite_nor_use_them(system: System) -> None:
    mine = await script_pipeline(system)
    assert (await put_secret(system, "TOKEN", ORG_VALUE)).status_code in (200, 201)
    assert (await put_secret(system, "OTHER", PIPE_VALUE, pipeline=mine["id"])).status_code in (200, 201)
    b = other_org()
    as_b = system.headers("admin", org=b)

    # read and list
    r = await system.client.get("/api/v1/secrets", headers=as_b)
    assert r.status_code == 200 and r.json() == []
    assert (await system.client.get("/api/v1/secrets/TOKEN", headers=as_b)).status_code == 404
    r = await system.client.get("/api/v1/secrets", params={"pipelineId": mine["id"]}, headers=as_b)
    assert r.status_code == 404
    r = await system.client.get("/api/v1/secrets/OTHER", params={"pipelineId": mine["id"]}, headers=as_b)
    assert r.status_code == 404
    # overwrite or delete: a pipeline of ours is not B's; B's own TOKEN is B's alone
    assert (await put_secret(system, "OTHER", "b-wins", pipeline=mine["id"], org=b)).status_code == 404
    r = await system.client.delete("/api/v1/secrets/OTHER", params={"pipelineId": mine["id"]}, headers=as_b)
    assert r.status_code == 404
    assert (await system.client.delete("/api/v1/secrets/TOKEN", headers=as_b)).status_code == 404
    assert (await put_secret(system, "TOKEN", "b-own-value", org=b)).status_code == 201
    assert [s["name"] for s in (await system.client.get("/api/v1/secrets", headers=as_b)).json()] == ["TOKEN"]

    # use: B's run sees its own value, and nothing of ours
    r = await system.client.post(
        "/api/v1/pipelines",
        json={
            "name": f"b-{uuid.uuid4().hex[:8]}",
            "stages": [{"id": "s", "type": "script", "config": {"command": SHOW}}],
        },
        headers=as_b,
    )
    assert r.status_code == 201, r.text
    theirs = r.json()
    run = await system.client.post(f"/api/v1/pipelines/{theirs['id']}/trigger", headers=as_b)
    assert run.status_code == 201
    done = await _wait_as(system, theirs["id"], run.json()["id"], as_b)
    out = done["stageResults"][0]["output"]
    assert out.splitlines()[0] == sha("b-own-value") and "other=unset" in out
    # and ours still sees ours
    run = await system.trigger(mine["id"])
    out = await output_of(system, mine["id"], run["id"])
    assert out.splitlines()[0] == sha(ORG_VALUE)
    assert "token=***" in out and "other=***" in out and ORG_VALUE not in out


async def _wait_as(system: System, pid: str, run_id: str, headers: dict[str, str]) -> dict[str, Any]:
    for _ in range(400):
        r = await system.client.get(f"/api/v1/pipelines/{pid}/runs/{run_id}", headers=headers)
        run: dict[str, Any] = r.json()
        if run["status"] in ("succeeded", "failed"):
            return run
        await asyncio.sleep(0.05)
    raise AssertionError(f"run {run_id} never ended")


async def test_a_triggers_secret_wins_over_the_pipelines_which_wins_over_the_organizations(system: System) -> None:
    org = other_org()  # an organization of its own: nothing else in this module sets its secrets
    as_org = system.headers("admin", org=org)
    r = await system.client.post(
        "/api/v1/pipelines",
        json={
            "name": f"prec-{uuid.uuid4().hex[:8]}",
            "stages": [{"id": "s", "type": "script", "config": {"command": SHOW}}],
        },
        headers=as_org,
    )
    p = r.json()
    assert (await put_secret(system, "TOKEN", ORG_VALUE, org=org)).status_code == 201
    assert (await put_secret(system, "OTHER", ORG_VALUE + "-other", org=org)).status_code == 201
    run = await system.client.post(f"/api/v1/pipelines/{p['id']}/trigger", headers=as_org)
    out = (await _wait_as(system, p["id"], run.json()["id"], as_org))["stageResults"][0]["output"]
    assert out.splitlines()[0] == sha(ORG_VALUE)

    assert (await put_secret(system, "TOKEN", PIPE_VALUE, pipeline=p["id"], org=org)).status_code == 201
    run = await system.client.post(f"/api/v1/pipelines/{p['id']}/trigger", headers=as_org)
    out = (await _wait_as(system, p["id"], run.json()["id"], as_org))["stageResults"][0]["output"]
    assert out.splitlines()[0] == sha(PIPE_VALUE) and "other=***" in out

    run = await system.client.post(
        f"/api/v1/pipelines/{p['id']}/trigger", json={"secrets": {"TOKEN": TRIGGER_VALUE}}, headers=as_org
    )
    assert run.json()["secretNames"] == ["TOKEN"]
    done = await _wait_as(system, p["id"], run.json()["id"], as_org)
    out = done["stageResults"][0]["output"]
    assert out.splitlines()[0] == sha(TRIGGER_VALUE) and "token=***" in out
    assert not any(v in json.dumps(done) for v in (ORG_VALUE, PIPE_VALUE, TRIGGER_VALUE))


async def test_an_expression_names_a_stored_secret_and_its_value_is_masked(system: System) -> None:
    org = other_org()
    as_org = system.headers("admin", org=org)
    spec = {"jobs": [{"name": "build", "steps": [{"name": "use", "run": 'echo "got ${{ secrets.DEPLOY_TOKEN }}"'}]}]}
    r = await system.client.post("/api/v1/pipelines", json={"name": f"expr-{uuid.uuid4().hex[:8]}"}, headers=as_org)
    pid = r.json()["id"]
    r = await system.client.post(f"/api/v1/pipelines/{pid}/spec/save", json={"spec": spec}, headers=as_org)
    assert r.status_code == 200, r.text
    assert (await put_secret(system, "DEPLOY_TOKEN", PIPE_VALUE, pipeline=pid, org=org)).status_code == 201
    run = await system.client.post(f"/api/v1/pipelines/{pid}/trigger", headers=as_org)
    assert run.status_code == 201, run.text
    done = await _wait_as(system, pid, run.json()["id"], as_org)
    assert done["status"] == "succeeded", done
    text = json.dumps(done)
    assert "got ***" in text and PIPE_VALUE not in text


async def _save_triggers(system: System, pid: str, triggers: list[dict[str, Any]]) -> None:
    spec = {"stages": [{"id": "show", "type": "script", "config": {"command": SHOW}}], "triggers": triggers}
    r = await system.client.post(
        f"/api/v1/pipelines/{pid}/spec/save", json={"spec": spec}, headers=system.headers("member")
    )
    assert r.status_code == 200, r.text


async def _assert_nowhere(system: System, value: str) -> None:
    async with system.store.pool.connection() as conn:
        cur = await conn.execute("SELECT count(*) FROM events WHERE position(%s IN data::text) > 0", (value,))
        row = await cur.fetchone()
    assert row is not None and row[0] == 0


async def test_a_cron_started_run_sees_the_pipeline_secret_masked(system: System) -> None:
    p = await script_pipeline(system)
    await _save_triggers(system, p["id"], [{"type": "cron", "schedule": "* * * * *"}])
    value = f"cron-only-{uuid.uuid4().hex}"
    assert (await put_secret(system, "TOKEN", value, pipeline=p["id"])).status_code == 201
    scheduler = Scheduler(system.commands, system.store.pool, now=lambda: datetime.now(UTC) + timedelta(minutes=2))
    started: list[str] = []
    for _ in range(100):  # until the projector lists the pipeline's triggers
        started = [
            r for r in await scheduler.tick_once() if (await system.commands.load_run(r))[0].pipeline_id == p["id"]
        ]
        if started:
            break
        await asyncio.sleep(0.05)
    assert len(started) == 1
    out = await output_of(system, p["id"], started[0])
    assert out.splitlines()[0] == sha(value) and "token=***" in out and value not in out
    await _assert_nowhere(system, value)


async def test_a_webhook_started_run_sees_the_pipeline_secret_masked(system: System) -> None:
    p = await script_pipeline(system)
    await _save_triggers(system, p["id"], [{"type": "event"}])
    r = await system.client.put(
        f"/api/v1/pipelines/{p['id']}/webhook", json={"secret": HOOK_SECRET}, headers=system.headers()
    )
    assert r.status_code == 200, r.text
    value = f"hook-only-{uuid.uuid4().hex}"
    assert (await put_secret(system, "TOKEN", value, pipeline=p["id"])).status_code == 201
    body = json.dumps({"ref": "refs/heads/main"}).encode()
    signature = "sha256=" + hmac.new(HOOK_SECRET.encode(), body, hashlib.sha256).hexdigest()
    r = await system.client.post(
        f"/api/v1/hooks/{p['id']}",
        content=body,
        headers={"X-Hub-Signature-256": signature, "X-GitHub-Event": "push", "Content-Type": "application/json"},
    )
    assert r.status_code == 201, r.text
    run_id = r.json()["run"]["id"]
    out = await output_of(system, p["id"], run_id)
    assert out.splitlines()[0] == sha(value) and "token=***" in out and value not in out
    await _assert_nowhere(system, value)


async def test_the_openapi_document_describes_the_secrets_routes(system: System) -> None:
    r = await system.client.get("/schema/openapi.json")
    assert r.status_code == 200
    paths = r.json()["paths"]
    assert set(paths["/api/v1/secrets"]) == {"get"}
    assert set(paths["/api/v1/secrets/{name}"]) == {"get", "put", "delete"}
    put = paths["/api/v1/secrets/{name}"]["put"]
    assert "requestBody" in put and any(p["name"] == "pipelineId" for p in put["parameters"])
