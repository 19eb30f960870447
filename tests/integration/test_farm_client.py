"""Farm's web client (the API reference's own frontend) as it calls us: paged run lists, run
statistics and comparisons, the access_token cookie (with CSRF protection for writes), and a
token with several organizations among which X-Organization-Id picks one."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from infra.auth import issue_token
from infra.broker.bus import notify_subject
from tests.integration.system import System, eventually

pytestmark = pytest.mark.integration

OK = {"id": "ok", "name": "OK", "type": "script", "config": {"command": "true"}}
BAD = {"id": "bad", "name": "Bad", "type": "script", "config": {"command": "exit 3"}}


async def _finished_runs(system: System, pid: str, n: int) -> list[dict[str, Any]]:
    runs = [await system.trigger(pid) for _ in range(n)]
    done = [await system.wait_status(pid, r["id"], "succeeded", "failed", "cancelled") for r in runs]

    async def projected() -> bool:
        r = await system.client.get(f"/api/v1/pipelines/{pid}/runs", headers=system.headers())
        return sum(1 for run in r.json() if run["status"] in ("succeeded", "failed")) >= n

    await eventually(projected, what="the finished runs in the read model")
    return done


async def test_runs_are_paged_with_skip_take_or_page_limit_and_filtered_by_status(system: System) -> None:
    p = await system.create_pipeline([OK])
    runs = await _finished_runs(system, p["id"], 3)
    url = f"/api/v1/pipelines/{p['id']}/runs"
    bare = (await system.client.get(url, headers=system.headers())).json()
    assert isinstance(bare, list) and [r["id"] for r in bare] == [r["id"] for r in reversed(runs)]
    r = await system.client.get(f"{url}?skip=0&take=2", headers=system.headers())
    page = r.json()
    assert page["total"] == 3 and [x["id"] for x in page["data"]] == [bare[0]["id"], bare[1]["id"]]
    r = await system.client.get(f"{url}?skip=2&take=2", headers=system.headers())
    assert r.json()["total"] == 3 and [x["id"] for x in r.json()["data"]] == [bare[2]["id"]]
    r = await system.client.get(f"{url}?page=2&limit=2", headers=system.headers())
    assert [x["id"] for x in r.json()["data"]] == [bare[2]["id"]]
    r = await system.client.get(f"{url}?skip=0&take=20&status=failed", headers=system.headers())
    assert r.json() == {"data": [], "total": 0}
    r = await system.client.get(f"{url}?skip=0&take=20&status=succeeded", headers=system.headers())
    assert r.json()["total"] == 3
    for bad in ("take=0", "take=101", "skip=-1", "status=nope", "skip=99999999999999999999"):
        r = await system.client.get(f"{url}?{bad}", headers=system.headers())
        assert r.status_code == 400 and r.json()["errors"][0]["path"] == bad.split("=")[0], r.text


async def test_run_stats_and_a_comparison_of_two_runs(system: System) -> None:
    p = await system.create_pipeline([OK])
    url = f"/api/v1/pipelines/{p['id']}/runs"
    r = await system.client.get(f"{url}/stats", headers=system.headers())
    assert r.json() == {"total": 0, "successRate": 0.0, "avgDurationMs": None, "lastRunAt": None}
    [a] = await _finished_runs(system, p["id"], 1)
    r = await system.client.put(
        f"/api/v1/pipelines/{p['id']}", json={"name": p["name"], "stages": [OK, BAD]}, headers=system.headers()
    )
    assert r.status_code == 200, r.text
    b = await system.trigger(p["id"])
    b = await system.wait_status(p["id"], b["id"], "failed")

    async def both() -> bool:
        r = await system.client.get(f"{url}?status=failed&skip=0&take=5", headers=system.headers())
        return bool(r.json()["total"] == 1)

    await eventually(both, what="the failed run in the read model")
    stats = (await system.client.get(f"{url}/stats", headers=system.headers("viewer"))).json()
    assert stats["total"] == 2 and stats["successRate"] == 50.0
    assert stats["avgDurationMs"] is not None and stats["lastRunAt"]
    r = await system.client.get(f"{url}/compare?a={a['id']}&b={b['id']}", headers=system.headers("viewer"))
    assert r.status_code == 200, r.text
    cmp = r.json()
    assert cmp["runA"] == {"id": a["id"], "status": "succeeded", "triggeredBy": "alice", "durationMs": a["durationMs"]}
    assert cmp["runB"]["status"] == "failed"
    diff = {d["stageId"]: d for d in cmp["stageDiff"]}
    assert diff["ok"]["changed"] is False and diff["ok"]["statusA"] == diff["ok"]["statusB"] == "succeeded"
    assert diff["bad"] == {**diff["bad"], "statusA": None, "statusB": "failed", "changed": True}
    r = await system.client.get(f"{url}/compare?a={a['id']}&b=not-a-run", headers=system.headers())
    assert r.status_code == 404


async def test_the_access_token_cookie_authenticates_and_writes_need_a_same_site_origin(system: System) -> None:
    token = system.token("member")
    cookie = {"Cookie": f"access_token={token}"}
    r = await system.client.get("/api/v1/pipelines", headers=cookie)
    assert r.status_code == 200, r.text
    body = {"name": "from-a-cookie"}
    # Another site's form or script: refused.
    for headers in ({}, {"Origin": "https://evil.example"}, {"Referer": "https://evil.example/page"}):
        r = await system.client.post("/api/v1/pipelines", json=body, headers={**cookie, **headers})
        assert r.status_code == 403 and "X-Requested-With" in r.json()["message"], (headers, r.text)
    # This site (its own origin), or a client that sets X-Requested-With: allowed.
    r = await system.client.post(
        "/api/v1/pipelines", json=body, headers={**cookie, "Origin": "http://testserver.local"}
    )
    assert r.status_code == 201, r.text
    r = await system.client.post(
        "/api/v1/pipelines", json={"name": "from-a-cookie-2"}, headers={**cookie, "X-Requested-With": "fetch"}
    )
    assert r.status_code == 201, r.text
    # A bearer header still wins, without any CSRF check.
    r = await system.client.post("/api/v1/pipelines", json={"name": "bearer"}, headers=system.headers("member"))
    assert r.status_code == 201


async def test_a_token_with_several_organizations_acts_in_the_one_x_organization_id_names(system: System) -> None:
    one, two, other = system.org, f"{system.org}-two", f"{system.org}-other"
    token = issue_token(system.settings, sub="multi", roles=["admin"], orgs=[one, two])
    bearer = {"Authorization": f"Bearer {token}"}
    r = await system.client.post(
        "/api/v1/pipelines", json={"name": "in-two"}, headers={**bearer, "X-Organization-Id": two}
    )
    assert r.status_code == 201 and r.json()["organizationId"] == two, r.text
    pid = r.json()["id"]
    r = await system.client.get(f"/api/v1/pipelines/{pid}", headers={**bearer, "X-Organization-Id": two})
    assert r.status_code == 200
    r = await system.client.get(f"/api/v1/pipelines/{pid}", headers={**bearer, "X-Organization-Id": one})
    assert r.status_code == 404
    r = await system.client.get("/api/v1/pipelines", headers={**bearer, "X-Organization-Id": other})
    assert r.status_code == 403, r.text
    r = await system.client.get("/api/v1/pipelines", headers=bearer)
    assert r.status_code == 400 and "X-Organization-Id" in r.text
    # A token with one `org` behaves as before; naming another organization is a 403.
    r = await system.client.get("/api/v1/pipelines", headers={**system.headers(), "X-Organization-Id": system.org})
    assert r.status_code == 200
    r = await system.client.get("/api/v1/pipelines", headers={**system.headers(), "X-Organization-Id": other})
    assert r.status_code == 403


async def test_the_stage_builders_order_from_zero_is_kept_as_sent(system: System) -> None:
    stages = [{**OK, "id": "first", "order": 0}, {**OK, "id": "second", "order": 1}]
    p = await system.create_pipeline(stages)
    assert [(s["id"], s["order"]) for s in p["stages"]] == [("first", 0), ("second", 1)]
    r = await system.client.get(f"/api/v1/pipelines/{p['id']}", headers=system.headers())
    assert [(s["id"], s["order"]) for s in r.json()["stages"]] == [("first", 0), ("second", 1)]


async def test_a_deploy_stage_with_only_a_component_deploys_to_its_default_environment(system: System) -> None:
    admin = system.headers("admin")
    env = await system.client.post(
        "/api/v1/environments",
        json={"name": "prod-default", "deployer": {"type": "command", "command": "true"}},
        headers=admin,
    )
    assert env.status_code == 201, env.text
    r = await system.client.post(
        "/api/v1/components", json={"name": "web-default", "defaultEnvironmentId": "nope"}, headers=admin
    )
    assert r.status_code == 400 and r.json()["errors"][0]["path"] == "defaultEnvironmentId", r.text
    comp = await system.client.post(
        "/api/v1/components", json={"name": "web-default", "defaultEnvironmentId": env.json()["id"]}, headers=admin
    )
    assert comp.status_code == 201 and comp.json()["defaultEnvironmentId"] == env.json()["id"], comp.text
    deploy = {"id": "d", "name": "Deploy", "type": "deploy", "config": {"componentId": comp.json()["id"]}}
    p = await system.create_pipeline([deploy])
    assert p["stages"][0]["config"] == {"componentId": comp.json()["id"], "environmentId": env.json()["id"]}
    run = await system.trigger(p["id"])
    done = await system.wait_status(p["id"], run["id"], "succeeded", "failed")
    assert done["status"] == "succeeded", done
    # A component without a default: the stage must name the environment.
    bare = await system.client.post("/api/v1/components", json={"name": "api-no-default"}, headers=admin)
    assert bare.json()["defaultEnvironmentId"] is None
    r = await system.client.post(
        "/api/v1/pipelines",
        json={"name": "no-env", "stages": [{**deploy, "config": {"componentId": bare.json()["id"]}}]},
        headers=system.headers("member"),
    )
    assert r.status_code == 400 and r.json()["errors"][0]["path"] == "stages[0].config.environmentId", r.text


async def test_a_notify_stage_with_only_a_channel_sends_a_default_message(system: System) -> None:
    assert system.nc is not None
    received: list[bytes] = []

    async def on_msg(msg: Any) -> None:
        received.append(msg.data)

    sub = await system.nc.subscribe(notify_subject(system.org, "#farm"), cb=on_msg)
    try:
        stage = {"id": "n", "name": "Notify", "type": "notify", "config": {"channel": "#farm"}}
        p = await system.create_pipeline([stage], name="farm-notify")
        run = await system.trigger(p["id"])
        await system.wait_status(p["id"], run["id"], "succeeded", "failed")
        await eventually(lambda: asyncio.sleep(0, bool(received)), what="the NATS notification")
    finally:
        await sub.unsubscribe()
    note = json.loads(received[0])
    assert note["message"] == f"Pipeline farm-notify: run {run['id']} is running", note


async def test_unsupported_stage_types_and_a_script_without_command_are_a_clear_400(system: System) -> None:
    member = system.headers("member")
    for stage, path, words in (
        ({"type": "build", "config": {}}, "stages[0].type", "script, approval, deploy, notify"),
        ({"type": "aws-lambda", "config": {}}, "stages[0].type", "script, approval, deploy, notify"),
        ({"type": "script", "config": {}}, "stages[0].config.command", "is required"),
        ({"type": "script"}, "stages[0].config.command", "is required"),
    ):
        r = await system.client.post(
            "/api/v1/pipelines", json={"name": "unsupported", "stages": [stage]}, headers=member
        )
        assert r.status_code == 400, r.text
        errors = {e["path"]: e["message"] for e in r.json()["errors"]}
        assert words in errors[path], errors
