"""Runs across an organization's pipelines (GET /api/v1/runs, /runs/latest), the pipelines list's
name search (q), and the dashboard's pages and assets on the API's port."""

from __future__ import annotations

import uuid

import pytest

from tests.integration.system import System, eventually

pytestmark = pytest.mark.integration

ECHO = [{"id": "a", "name": "A", "type": "script", "config": {"command": "true"}}]
GATE = [{"id": "g", "name": "G", "type": "approval", "config": {"message": "ok?"}}]


async def test_runs_across_pipelines_are_newest_first_filtered_and_only_the_organizations(system: System) -> None:
    org = f"org-{uuid.uuid4().hex[:8]}"
    mine = {"Authorization": f"Bearer {system.token('member', org=org)}"}
    made = []
    for stages in (ECHO, GATE):
        r = await system.client.post(
            "/api/v1/pipelines", json={"name": f"p-{uuid.uuid4().hex[:6]}", "stages": stages}, headers=mine
        )
        assert r.status_code == 201, r.text
        made.append(r.json())
    runs = []
    for pipeline in (made[0], made[1], made[0]):
        r = await system.client.post(f"/api/v1/pipelines/{pipeline['id']}/trigger", headers=mine)
        assert r.status_code == 201, r.text
        runs.append(r.json())
    # Another organization's run is never listed.
    await system.trigger((await system.create_pipeline(ECHO))["id"])

    async def all_projected() -> bool:
        r = await system.client.get("/api/v1/runs", params={"limit": 10}, headers=mine)
        return r.json()["total"] == 3

    await eventually(all_projected, 20, "the three runs to be projected")
    page = (await system.client.get("/api/v1/runs", params={"limit": 2}, headers=mine)).json()
    assert page["total"] == 3 and page["page"] == 1 and page["limit"] == 2
    assert [r["id"] for r in page["data"]] == [runs[2]["id"], runs[1]["id"]]
    assert page["data"][0]["pipelineName"] == made[0]["name"]
    assert "logs" not in page["data"][0] and "stageResults" not in page["data"][0]
    second = (await system.client.get("/api/v1/runs", params={"limit": 2, "page": 2}, headers=mine)).json()
    assert [r["id"] for r in second["data"]] == [runs[0]["id"]]

    async def waiting_listed() -> bool:
        r = await system.client.get("/api/v1/runs", params={"status": "waiting_approval"}, headers=mine)
        return [x["id"] for x in r.json()["data"]] == [runs[1]["id"]]

    await eventually(waiting_listed, 30, "the waiting run under status=waiting_approval")
    one = (await system.client.get("/api/v1/runs", params={"pipelineId": made[0]["id"]}, headers=mine)).json()
    assert {r["id"] for r in one["data"]} == {runs[0]["id"], runs[2]["id"]}

    latest = await system.client.get(
        "/api/v1/runs/latest", params={"pipelineIds": f"{made[0]['id']},{made[1]['id']},not-an-id"}, headers=mine
    )
    assert latest.status_code == 200, latest.text
    assert {r["pipelineId"]: r["id"] for r in latest.json()} == {
        made[0]["id"]: runs[2]["id"],
        made[1]["id"]: runs[1]["id"],
    }

    # A deleted pipeline's runs leave the list with it.
    admin = {"Authorization": f"Bearer {system.token('admin', org=org)}"}
    assert (await system.client.delete(f"/api/v1/pipelines/{made[0]['id']}", headers=admin)).status_code == 204

    async def gone() -> bool:
        r = await system.client.get("/api/v1/runs", headers=mine)
        return {x["pipelineId"] for x in r.json()["data"]} == {made[1]["id"]}

    await eventually(gone, 20, "the deleted pipeline's runs to leave the list")


async def test_bad_run_list_queries_are_4xx_naming_the_parameter(system: System) -> None:
    h = system.headers("viewer")
    r = await system.client.get("/api/v1/runs", params={"status": "sleeping"}, headers=h)
    assert r.status_code == 400 and "status" in r.text
    r = await system.client.get("/api/v1/runs", params={"limit": 101}, headers=h)
    assert r.status_code == 400 and "limit" in r.text
    r = await system.client.get("/api/v1/runs", params={"pipelineId": "nope"}, headers=h)
    assert r.status_code == 404
    r = await system.client.get("/api/v1/runs/latest", params={"pipelineIds": " , "}, headers=h)
    assert r.status_code == 400 and "pipelineIds" in r.text
    r = await system.client.get("/api/v1/runs/latest", params={"pipelineIds": ",".join(["x"] * 101)}, headers=h)
    assert r.status_code == 400 and "at most 100" in r.text
    assert (await system.client.get("/api/v1/runs")).status_code == 401


async def test_pipelines_are_searched_by_a_part_of_their_name_in_any_case(system: System) -> None:
    org = f"org-{uuid.uuid4().hex[:8]}"
    h = {"Authorization": f"Bearer {system.token('member', org=org)}"}
    for name in ("Checkout-API", "checkout-web", "billing", "100%_done"):
        r = await system.client.post("/api/v1/pipelines", json={"name": name, "stages": ECHO}, headers=h)
        assert r.status_code == 201, r.text

    async def names(q: str) -> list[str]:
        r = await system.client.get("/api/v1/pipelines", params={"q": q}, headers=h)
        assert r.status_code == 200, r.text
        body = r.json()
        assert body["total"] == len(body["data"])
        return sorted(p["name"] for p in body["data"])

    async def projected() -> bool:
        return len(await names("")) == 4

    await eventually(projected, 20, "the pipelines to be projected")
    assert await names("CHECKOUT") == ["Checkout-API", "checkout-web"]
    assert await names("%") == ["100%_done"]  # LIKE's wildcards are plain characters
    assert await names("_") == ["100%_done"]
    assert await names("nothing") == []


@pytest.mark.parametrize("path", ["/", "/pipelines/abc", "/runs", "/runs/abc", "/deployments", "/signin"])
async def test_every_dashboard_address_serves_the_page_without_a_token(system: System, path: str) -> None:
    r = await system.client.get(path)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "text/html; charset=utf-8"
    assert '<script type="module" src="/ui/app.js">' in r.text
    # Only this origin's scripts: no CDN, nothing inline.
    assert "script-src 'self'" in r.headers["content-security-policy"]


async def test_the_dashboards_assets_are_served_and_the_api_still_needs_a_token(system: System) -> None:
    for asset, kind in (
        ("/ui/app.js", "javascript"),
        ("/ui/style.css", "css"),
        ("/ui/vendor/js-yaml.mjs", "javascript"),
    ):
        r = await system.client.get(asset)
        assert r.status_code == 200, asset
        assert kind in r.headers["content-type"], (asset, r.headers["content-type"])
        assert "http://" not in r.text.replace("http://www.w3.org/2000/svg", "")  # offline: nothing fetched elsewhere
    assert (await system.client.get("/ui/nothing.js")).status_code == 404
    assert (await system.client.get("/ui/../pyproject.toml")).status_code == 404
    assert (await system.client.get("/api/v1/pipelines")).status_code == 401
    assert (await system.client.get("/pipelines/a/b")).status_code in (401, 404)
