"""The Pipelines API against real PostgreSQL and NATS, with the relay, projector and executor
running: every endpoint, code and object of the API reference."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from infra.auth import issue_token
from tests.integration.system import System, eventually

pytestmark = pytest.mark.integration

SCRIPT = {"id": "build", "name": "Build", "type": "script", "config": {"command": "echo hello; echo oops >&2"}}
GATE = {"id": "gate", "name": "Approve", "type": "approval", "config": {"message": "Ship it?"}}
AFTER = {"id": "after", "name": "After", "type": "script", "config": {"command": "echo after"}}


async def test_requests_without_a_valid_token_are_401(system: System) -> None:
    r = await system.client.get("/api/v1/pipelines")
    assert r.status_code == 401
    assert r.json()["statusCode"] == 401 and r.json()["error"] == "Unauthorized"
    r = await system.client.get("/api/v1/pipelines", headers={"Authorization": "Bearer not-a-jwt"})
    assert r.status_code == 401


async def test_a_token_signed_with_another_algorithm_or_none_is_refused(system: System) -> None:
    import jwt

    unsigned = jwt.encode({"sub": "mallory", "roles": ["admin"], "exp": 9999999999}, None, algorithm="none")
    r = await system.client.get("/api/v1/pipelines", headers={"Authorization": f"Bearer {unsigned}"})
    assert r.status_code == 401
    wrong_key = jwt.encode({"sub": "m", "roles": ["admin"], "exp": 9999999999}, "x" * 40, algorithm="HS256")
    r = await system.client.get("/api/v1/pipelines", headers={"Authorization": f"Bearer {wrong_key}"})
    assert r.status_code == 401
    expired = jwt.encode({"sub": "m", "roles": ["admin"], "exp": 1}, system.settings.jwt_secret, algorithm="HS256")
    r = await system.client.get("/api/v1/pipelines", headers={"Authorization": f"Bearer {expired}"})
    assert r.status_code == 401


async def test_time_claims_that_are_numeric_strings_are_refused(system: System) -> None:
    import jwt

    secret = system.settings.jwt_secret
    for claims in ({"exp": "9999999999"}, {"exp": 9999999999, "nbf": "0"}, {"exp": 9999999999, "iat": "0"}):
        token = jwt.encode({"sub": "m", "roles": ["admin"], "org": system.org, **claims}, secret, algorithm="HS256")
        r = await system.client.get("/api/v1/pipelines", headers={"Authorization": f"Bearer {token}"})
        assert r.status_code == 401, (claims, r.text)
        assert "must be a number" in r.text


async def test_the_webhook_settings_of_a_pipeline_need_the_viewer_role(system: System) -> None:
    p = await system.create_pipeline([SCRIPT])
    r = await system.client.get(f"/api/v1/pipelines/{p['id']}/webhook", headers=system.headers("viewer"))
    assert r.status_code == 200, r.text
    for roles in ([], ["deployer"]):
        token = issue_token(system.settings, sub="mallory", roles=roles, org=system.org)
        r = await system.client.get(
            f"/api/v1/pipelines/{p['id']}/webhook", headers={"Authorization": f"Bearer {token}"}
        )
        assert r.status_code == 403, r.text


async def test_create_get_update_and_delete_a_pipeline(system: System) -> None:
    name = f"deploy-{uuid.uuid4().hex[:6]}"
    r = await system.client.post(
        "/api/v1/pipelines",
        json={"name": name, "description": "Runs tests", "stages": [SCRIPT]},
        headers=system.headers("member"),
    )
    assert r.status_code == 201, r.text
    p = r.json()
    assert p["name"] == name and p["description"] == "Runs tests"
    assert p["organizationId"] == system.org and p["createdBy"] == "alice"
    assert p["stages"] == [
        {
            "id": "build",
            "name": "Build",
            "type": "script",
            "order": 1,
            "config": SCRIPT["config"],
            "timeout": None,
            "retry": None,
        }
    ]
    assert p["createdAt"].endswith("Z") and p["updatedAt"] == p["createdAt"]

    r = await system.client.get(f"/api/v1/pipelines/{p['id']}", headers=system.headers("viewer"))
    assert r.status_code == 200 and r.json() == p

    r = await system.client.patch(
        f"/api/v1/pipelines/{p['id']}", json={"description": "changed"}, headers=system.headers("member")
    )
    assert r.status_code == 200
    assert r.json()["description"] == "changed" and r.json()["name"] == name
    assert r.json()["definitionVersion"] == 1  # stages unchanged

    r = await system.client.put(
        f"/api/v1/pipelines/{p['id']}", json={"name": name, "stages": [AFTER]}, headers=system.headers("member")
    )
    assert r.status_code == 200
    assert r.json()["description"] is None and [s["id"] for s in r.json()["stages"]] == ["after"]
    assert r.json()["definitionVersion"] == 2

    r = await system.client.delete(f"/api/v1/pipelines/{p['id']}", headers=system.headers("member"))
    assert r.status_code == 403
    r = await system.client.delete(f"/api/v1/pipelines/{p['id']}", headers=system.headers("admin"))
    assert r.status_code == 204
    r = await system.client.get(f"/api/v1/pipelines/{p['id']}", headers=system.headers())
    assert r.status_code == 404
    # the name is free again
    await system.create_pipeline([SCRIPT], name=name)


async def test_duplicate_names_are_409_even_when_created_concurrently(system: System) -> None:
    name = f"dup-{uuid.uuid4().hex[:6]}"
    results = await asyncio.gather(
        *(
            system.client.post("/api/v1/pipelines", json={"name": name}, headers=system.headers("member"))
            for _ in range(8)
        )
    )
    codes = sorted(r.status_code for r in results)
    assert codes == [201] + [409] * 7
    conflict = next(r for r in results if r.status_code == 409).json()
    assert conflict["error"] == "Conflict" and name in conflict["message"]


async def test_bad_input_is_400_naming_each_bad_field(system: System) -> None:
    r = await system.client.post(
        "/api/v1/pipelines",
        json={"name": "ok-name", "stages": [{"type": "script"}, {"type": "rocket"}]},
        headers=system.headers("member"),
    )
    assert r.status_code == 400
    paths = {e["path"] for e in r.json()["errors"]}
    assert paths == {"stages[0].config.command", "stages[1].type"}
    r = await system.client.post(
        "/api/v1/pipelines",
        json={"name": "x", "colour": "red", "stages": [{"type": "script", "config": {"command": 1}}]},
        headers=system.headers("member"),
    )
    assert r.status_code == 400
    assert {e["path"] for e in r.json()["errors"]} == {"name", "colour", "stages[0].config.command"}
    r = await system.client.post(
        "/api/v1/pipelines",
        content=b"{not json",
        headers={**system.headers("member"), "content-type": "application/json"},
    )
    assert r.status_code == 400
    r = await system.client.get("/api/v1/pipelines?limit=1000", headers=system.headers())
    assert r.status_code == 400


async def test_malformed_and_unknown_ids_are_404_never_500(system: System) -> None:
    for path in (
        "/api/v1/pipelines/not-a-uuid",
        f"/api/v1/pipelines/{uuid.uuid4()}",
        f"/api/v1/pipelines/{uuid.uuid4()}/runs",
        "/api/v1/pipelines/runs/zzz",
    ):
        r = await system.client.get(path, headers=system.headers())
        assert r.status_code == 404, (path, r.text)
        assert r.json()["error"] == "Not Found"
    # Not text at all (issue 13): a 400 naming the parameter.
    r = await system.client.get(f"/api/v1/pipelines/{uuid.uuid4()}/runs/%00%ff", headers=system.headers())
    assert r.status_code == 400 and r.json()["errors"][0]["path"] == "run_id", r.text
    r = await system.client.post(f"/api/v1/pipelines/{uuid.uuid4()}/trigger", headers=system.headers())
    assert r.status_code == 404


async def test_list_pipelines_paginates_and_never_shows_other_organizations(system: System) -> None:
    org = f"org-{uuid.uuid4().hex[:8]}"
    headers = system.headers("member", org=org)
    for i in range(5):
        r = await system.client.post("/api/v1/pipelines", json={"name": f"p{i}-{org}"}, headers=headers)
        assert r.status_code == 201
    await system.client.post("/api/v1/pipelines", json={"name": f"other-{org}"}, headers=system.headers("member"))

    async def listed() -> bool:
        r = await system.client.get("/api/v1/pipelines?page=1&limit=2", headers=headers)
        return bool(r.json()["total"] == 5)

    await eventually(listed, what="the projector to list 5 pipelines")
    r = await system.client.get("/api/v1/pipelines?page=3&limit=2", headers=headers)
    body = r.json()
    assert body["page"] == 3 and body["limit"] == 2 and body["total"] == 5 and len(body["data"]) == 1
    r = await system.client.get("/api/v1/pipelines?limit=100", headers=headers)
    names = [p["name"] for p in r.json()["data"]]
    assert names == [f"p{i}-{org}" for i in range(5)]
    assert all(p["organizationId"] == org for p in r.json()["data"])
    r = await system.client.get(f"/api/v1/pipelines?organizationId={system.org}", headers=headers)
    assert r.json()["data"] == [] and r.json()["total"] == 0
    r = await system.client.get(f"/api/v1/pipelines?organizationId={org}", headers=headers)
    assert r.json()["total"] == 5


async def test_another_organizations_pipelines_and_runs_are_404(system: System) -> None:
    p = await system.create_pipeline([GATE])
    run = await system.trigger(p["id"])
    other = system.headers("admin", org="another-org")
    for path in (
        f"/api/v1/pipelines/{p['id']}",
        f"/api/v1/pipelines/{p['id']}/runs",
        f"/api/v1/pipelines/{p['id']}/runs/{run['id']}",
        f"/api/v1/pipelines/{p['id']}/runs/{run['id']}/events",
        f"/api/v1/pipelines/runs/{run['id']}",
    ):
        r = await system.client.get(path, headers=other)
        assert r.status_code == 404, path
    r = await system.client.post(f"/api/v1/pipelines/{p['id']}/runs/{run['id']}/cancel", headers=other)
    assert r.status_code == 404
    r = await system.client.post(f"/api/v1/pipelines/{p['id']}/trigger", headers=other)
    assert r.status_code == 404
    r = await system.client.get(f"/api/v1/pipelines/{p['id']}", headers=system.headers(org=False))
    assert r.status_code == 404


async def test_a_run_executes_scripts_and_records_output_logs_and_timings(system: System) -> None:
    p = await system.create_pipeline([SCRIPT, AFTER])
    run = await system.trigger(p["id"])
    assert run["status"] == "queued" and run["pipelineId"] == p["id"] and run["triggeredBy"] == "alice"
    assert [s["status"] for s in run["stageResults"]] == ["pending", "pending"]
    done = await system.wait_status(p["id"], run["id"], "succeeded", "failed")
    assert done["status"] == "succeeded", done
    build, after = done["stageResults"]
    assert build["stageId"] == "build" and build["status"] == "succeeded"
    assert build["output"] == "hello\noops\n" and after["output"] == "after\n"
    assert "hello\n" in done["logs"] and "oops\n" in done["logs"] and "after\n" in done["logs"]
    assert done["logs"].index("hello") < done["logs"].index("after")
    assert done["startedAt"] and done["finishedAt"] and done["durationMs"] >= 0
    assert build["startedAt"] <= build["finishedAt"] <= after["startedAt"]


async def test_scripts_get_a_clean_environment_with_the_run_variables(system: System) -> None:
    p = await system.create_pipeline([{"id": "env", "type": "script", "config": {"command": "env | sort"}}])
    run = await system.trigger(p["id"], variables={"GREETING": "hi there"})
    done = await system.wait_status(p["id"], run["id"], "succeeded", "failed")
    out = done["stageResults"][0]["output"]
    assert "GREETING=hi there" in out
    assert "PIPELINES_" not in out and "DATABASE" not in out and system.settings.jwt_secret not in out
    assert done["variables"] == {"GREETING": "hi there"}
    r = await system.client.post(
        f"/api/v1/pipelines/{p['id']}/trigger", json={"variables": {"1bad": "x"}}, headers=system.headers()
    )
    assert r.status_code == 400 and r.json()["errors"][0]["path"] == "variables.1bad"


async def test_the_first_failing_stage_fails_the_run_and_later_stages_are_skipped(system: System) -> None:
    p = await system.create_pipeline(
        [{"id": "bad", "type": "script", "config": {"command": "echo before; exit 3"}}, AFTER]
    )
    run = await system.trigger(p["id"])
    done = await system.wait_status(p["id"], run["id"], "succeeded", "failed")
    assert done["status"] == "failed"
    bad, after = done["stageResults"]
    assert bad["status"] == "failed" and bad["exitCode"] == 3 and "exit code 3" in bad["error"]
    assert after["status"] == "skipped"


async def test_deploy_and_notify_stages_fail_clearly_until_configured(system: System) -> None:
    deploy = {
        "id": "ship",
        "type": "deploy",
        "config": {"componentId": str(uuid.uuid4()), "environmentId": str(uuid.uuid4())},
    }
    r = await system.client.post(
        "/api/v1/pipelines", json={"name": f"p-{uuid.uuid4().hex[:8]}", "stages": [deploy]}, headers=system.headers()
    )
    assert r.status_code == 400  # unknown component and environment (tests/integration/test_deploy_notify.py)
    notify = {"id": "tell", "type": "notify", "config": {"channel": "#nowhere", "message": "hi"}}
    p = await system.create_pipeline([notify])
    run = await system.trigger(p["id"])
    done = await system.wait_status(p["id"], run["id"], "succeeded", "failed")
    assert done["status"] == "failed"
    assert "no notifier is configured" in done["stageResults"][0]["error"]


async def test_approval_gate_waits_then_approve_resumes_at_the_next_stage(system: System) -> None:
    p = await system.create_pipeline([SCRIPT, GATE, AFTER])
    run = await system.trigger(p["id"])
    waiting = await system.wait_status(p["id"], run["id"], "waiting_approval")
    assert [s["status"] for s in waiting["stageResults"]] == ["succeeded", "waiting_approval", "pending"]
    url = f"/api/v1/pipelines/{p['id']}/runs/{run['id']}"
    r = await system.client.post(f"{url}/approve", json={"comment": "lgtm"}, headers=system.headers("member"))
    assert r.status_code == 403
    r = await system.client.post(f"{url}/approve", json={"comment": "lgtm"}, headers=system.headers("admin"))
    assert r.status_code == 200, r.text
    assert r.json()["status"] == "running"
    assert r.json()["approvals"][0]["by"] == "alice" and r.json()["approvals"][0]["comment"] == "lgtm"
    done = await system.wait_status(p["id"], run["id"], "succeeded", "failed")
    assert done["status"] == "succeeded"
    assert [s["status"] for s in done["stageResults"]] == ["succeeded", "succeeded", "succeeded"]
    r = await system.client.post(f"{url}/approve", headers=system.headers("admin"))
    assert r.status_code == 400 and "succeeded" in r.json()["message"]


async def test_reject_fails_the_run(system: System) -> None:
    p = await system.create_pipeline([GATE, AFTER])
    run = await system.trigger(p["id"])
    await system.wait_status(p["id"], run["id"], "waiting_approval")
    url = f"/api/v1/pipelines/{p['id']}/runs/{run['id']}"
    r = await system.client.post(f"{url}/reject", json={"reason": "not today"}, headers=system.headers("admin"))
    assert r.status_code == 200 and r.json()["status"] == "failed"
    assert [s["status"] for s in r.json()["stageResults"]] == ["failed", "skipped"]
    assert r.json()["finishedAt"] is not None
    r = await system.client.post(f"{url}/reject", headers=system.headers("admin"))
    assert r.status_code == 400 and "failed" in r.json()["message"]


async def test_approve_and_reject_need_waiting_approval(system: System) -> None:
    p = await system.create_pipeline([{"id": "slow", "type": "script", "config": {"command": "sleep 2"}}])
    run = await system.trigger(p["id"])
    await system.wait_status(p["id"], run["id"], "running")
    url = f"/api/v1/pipelines/{p['id']}/runs/{run['id']}"
    for action in ("approve", "reject"):
        r = await system.client.post(f"{url}/{action}", headers=system.headers("admin"))
        assert r.status_code == 400 and "running" in r.json()["message"]
    await system.client.post(f"{url}/cancel", headers=system.headers("admin"))


async def test_cancel_stops_the_run_before_its_next_stage(system: System) -> None:
    p = await system.create_pipeline(
        [{"id": "slow", "type": "script", "config": {"command": "sleep 1; echo slept"}}, AFTER]
    )
    run = await system.trigger(p["id"])
    await system.wait_run(p["id"], run["id"], lambda r: r["stageResults"][0]["status"] == "running")
    workdir = system.executor.workdir / run["id"]

    async def executor_working() -> bool:
        return workdir.exists()

    async def executor_done() -> bool:
        return not workdir.exists()

    await eventually(executor_working, what="the stage's working directory")
    url = f"/api/v1/pipelines/{p['id']}/runs/{run['id']}"
    r = await system.client.post(f"{url}/cancel", headers=system.headers("member"))
    assert r.status_code == 403
    r = await system.client.post(f"{url}/cancel", json={"reason": "wrong branch"}, headers=system.headers("admin"))
    assert r.status_code == 200 and r.json()["status"] == "cancelled"
    cancelled_at = r.json()["finishedAt"]
    # the running stage finishes and is recorded; nothing new starts: the executor's last act for
    # an ended run is to remove its working directory, and after that the run is as it stays
    await system.wait_run(p["id"], run["id"], lambda x: x["stageResults"][0]["status"] == "succeeded")
    await eventually(executor_done, what="the executor to be done with the cancelled run")
    done = await system.get_run(p["id"], run["id"])
    assert done["status"] == "cancelled" and done["finishedAt"] == cancelled_at
    assert done["stageResults"][0]["output"] == "slept\n"
    assert done["stageResults"][1]["status"] == "skipped"
    r = await system.client.post(f"{url}/cancel", headers=system.headers("admin"))
    assert r.status_code == 400 and "cancelled" in r.json()["message"]


async def test_cancel_a_waiting_run(system: System) -> None:
    p = await system.create_pipeline([GATE])
    run = await system.trigger(p["id"])
    await system.wait_status(p["id"], run["id"], "waiting_approval")
    r = await system.client.post(f"/api/v1/pipelines/{p['id']}/runs/{run['id']}/cancel", headers=system.headers())
    assert r.status_code == 200 and r.json()["stageResults"][0]["status"] == "cancelled"


async def test_run_list_is_newest_first_and_run_events_are_the_runs_history(system: System) -> None:
    p = await system.create_pipeline([{"id": "q", "type": "script", "config": {"command": "true"}}])
    ids = []
    for _ in range(3):
        ids.append((await system.trigger(p["id"]))["id"])
    for rid in ids:
        await system.wait_status(p["id"], rid, "succeeded")

    async def listed() -> bool:
        r = await system.client.get(f"/api/v1/pipelines/{p['id']}/runs", headers=system.headers("viewer"))
        return [x["id"] for x in r.json()] == ids[::-1] and all(x["status"] == "succeeded" for x in r.json())

    await eventually(listed, what="the run list")
    r = await system.client.get(f"/api/v1/pipelines/{p['id']}/runs/{ids[0]}/events", headers=system.headers())
    types = [e["type"] for e in r.json()]
    assert types[:3] == ["run_triggered", "run_started", "stage_started"]
    assert types[-1] == "run_succeeded"
    positions = [e["position"] for e in r.json()]
    assert positions == sorted(positions)
    r = await system.client.get(f"/api/v1/pipelines/runs/{ids[0]}", headers=system.headers())
    assert r.status_code == 200 and r.json()["id"] == ids[0]


async def test_idempotency_key_returns_the_first_response_and_409_for_another_body(system: System) -> None:
    p = await system.create_pipeline([GATE])
    key = {"Idempotency-Key": uuid.uuid4().hex}
    url = f"/api/v1/pipelines/{p['id']}/trigger"
    results = await asyncio.gather(
        *(
            system.client.post(url, json={"variables": {"A": "1"}}, headers={**system.headers(), **key})
            for _ in range(5)
        )
    )
    assert {r.status_code for r in results} == {201}
    assert len({r.json()["id"] for r in results}) == 1
    r = await system.client.post(url, json={"variables": {"A": "2"}}, headers={**system.headers(), **key})
    assert r.status_code == 409
    # another caller's key space is separate
    r = await system.client.post(url, json={"variables": {"A": "1"}}, headers={**system.headers(sub="bob"), **key})
    assert r.status_code == 201 and r.json()["id"] != results[0].json()["id"]


async def test_deleting_a_pipeline_cancels_its_active_runs(system: System) -> None:
    p = await system.create_pipeline([GATE])
    run = await system.trigger(p["id"])
    await system.wait_status(p["id"], run["id"], "waiting_approval")

    async def projected() -> bool:
        r = await system.client.get(f"/api/v1/pipelines/{p['id']}/runs", headers=system.headers())
        return bool(r.json() and r.json()[0]["status"] == "waiting_approval")

    await eventually(projected, what="the run in the read model")
    r = await system.client.delete(f"/api/v1/pipelines/{p['id']}", headers=system.headers("admin"))
    assert r.status_code == 204
    state, _ = await system.commands.load_run(run["id"])
    assert state.status == "cancelled" and state.status_reason == "pipeline deleted"


async def test_metrics_are_prometheus_text_that_counts_each_response(system: System) -> None:
    async def refused_deletes() -> float:
        r = await system.client.get("/metrics")
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
        families = {f.name: f for f in text_string_to_metric_families(r.text)}
        responses = families["pipelines_http_responses"]
        assert responses.type == "counter"
        return sum(
            s.value
            for s in responses.samples
            if s.name == "pipelines_http_responses_total" and s.labels == {"method": "DELETE", "status": "401"}
        )

    before = await refused_deletes()
    assert (await system.client.delete("/api/v1/pipelines/some-id")).status_code == 401
    assert await refused_deletes() == before + 1


async def test_health_readiness_metrics_and_openapi(system: System) -> None:
    assert (await system.client.get("/healthz")).status_code == 200
    r = await system.client.get("/readyz")
    assert r.json()["checks"]["database"] is True and r.json()["checks"]["nats"] is True
    r = await system.client.get("/metrics")
    assert r.status_code == 200 and "pipelines_http_responses_total" in r.text
    r = await system.client.get("/schema/openapi.json")
    assert r.status_code == 200
    paths: dict[str, Any] = r.json()["paths"]
    assert "/api/v1/pipelines/{pipeline_id}/runs/{run_id}/approve" in paths
