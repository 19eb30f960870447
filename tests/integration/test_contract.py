"""The HTTP contract as third-party clients meet it: the OpenAPI document, OPTIONS and CORS,
and bad input (NUL, unpaired surrogates, deep JSON, huge pages and bodies) answered 4xx naming
the field, against the real API on PostgreSQL and NATS."""

from __future__ import annotations

import uuid
from typing import Any

import pytest
from litestar.testing import AsyncTestClient

from infra.http.app import create_app
from services.bootstrap import build_api
from tests.integration.system import System

pytestmark = pytest.mark.integration

SCRIPT = {"id": "build", "name": "Build", "type": "script", "config": {"command": "echo hi"}}


def _field(r: Any) -> set[str]:
    assert r.status_code == 400, (r.status_code, r.text)
    body = r.json()
    assert body["statusCode"] == 400 and body["error"] == "Bad Request", body
    return {e["path"] for e in body.get("errors") or []}


async def test_options_answers_on_every_route_with_or_without_a_token(system: System) -> None:
    doc = (await system.client.get("/schema/openapi.json")).json()
    p = await system.create_pipeline([SCRIPT])
    for path in doc["paths"]:
        url = path.replace("{pipeline_id}", p["id"]).replace("{run_id}", str(uuid.uuid4()))
        url = url.replace("{item_id}", "x").replace("{deployment_id}", "x").replace("{name}", "X")
        url = url.replace("{version}", "1")
        for headers in ({}, system.headers()):
            r = await system.client.options(url, headers=headers)
            assert r.status_code in (200, 204), (path, r.status_code, r.text)
            assert "allow" in {k.lower() for k in r.headers}, (path, r.headers)


async def test_cors_answers_the_configured_origins_only(system: System) -> None:
    app = create_app(lambda: build_api(system.settings), cors_origins=["https://dash.example"])
    async with AsyncTestClient(app=app) as client:
        preflight = {"Origin": "https://dash.example", "Access-Control-Request-Method": "POST"}
        r = await client.options("/api/v1/pipelines", headers=preflight)
        assert r.status_code in (200, 204), r.text
        assert r.headers["access-control-allow-origin"] == "https://dash.example"
        assert r.headers["access-control-allow-credentials"] == "true"
        r = await client.get("/api/v1/pipelines", headers={"Origin": "https://dash.example", **system.headers()})
        assert r.status_code == 200 and r.headers["access-control-allow-origin"] == "https://dash.example"
        r = await client.get("/api/v1/pipelines", headers={"Origin": "https://evil.example", **system.headers()})
        assert "access-control-allow-origin" not in r.headers
    # None by default.
    r = await system.client.get("/api/v1/pipelines", headers={"Origin": "https://dash.example", **system.headers()})
    assert "access-control-allow-origin" not in r.headers


async def test_a_dashboard_on_another_origin_can_read_its_writes_position_and_ask_for_it(system: System) -> None:
    """Read-your-writes from a browser on an allowed origin: it must be let read the position a
    write answered with and send it back as a header (CORS hides and refuses other headers)."""
    app = create_app(lambda: build_api(system.settings), cors_origins=["https://dash.example"])
    async with AsyncTestClient(app=app) as client:
        preflight = {
            "Origin": "https://dash.example",
            "Access-Control-Request-Method": "GET",
            "Access-Control-Request-Headers": "authorization, pipelines-min-position",
        }
        r = await client.options("/api/v1/pipelines", headers=preflight)
        assert r.status_code in (200, 204), r.text
        assert "pipelines-min-position" in r.headers["access-control-allow-headers"].lower()
        r = await client.post(
            "/api/v1/pipelines",
            json={
                "name": "cors-position",
                "stages": [{"name": "build", "type": "script", "config": {"command": "true"}}],
            },
            headers={"Origin": "https://dash.example", **system.headers()},
        )
        assert r.status_code == 201, r.text
        assert "Pipelines-Position" in r.headers
        exposed = {h.strip().lower() for h in r.headers["access-control-expose-headers"].split(",")}
        assert {"location", "pipelines-position"} <= exposed


async def test_the_document_types_every_body_and_every_error_with_one_schema(system: System) -> None:
    doc = (await system.client.get("/schema/openapi.json")).json()
    error = doc["components"]["schemas"]["ErrorBody"]
    assert set(error["required"]) == {"statusCode", "error", "message"} and "errors" in error["properties"]
    for path, item in doc["paths"].items():
        for method, op in item.items():
            where = f"{method.upper()} {path}"
            for status, answer in op["responses"].items():
                schema = answer.get("content", {}).get("application/json", {}).get("schema")
                if status.startswith("2") and status != "204":
                    assert schema and schema != {} and schema.get("type") != "string", where
                if status.startswith("4"):
                    assert schema == {"$ref": "#/components/schemas/ErrorBody"}, (where, status)
            if path.startswith("/api/v1/") and not path.startswith(("/api/v1/schemas", "/api/v1/asyncapi.json")):
                assert {"400", "404"} <= set(op["responses"]), where
            if method in ("post", "put", "patch") and path.startswith("/api/v1/"):
                assert "requestBody" in op, where
                assert "413" in op["responses"], where
            if not path.startswith(("/api/v1/hooks", "/api/v1/schemas", "/api/v1/asyncapi.json")):
                assert {"401", "403"} <= set(op["responses"]), where
    assert (
        doc["paths"]["/api/v1/channels"]["get"]["responses"]["200"]["content"]["application/json"]["schema"]["type"]
        == "array"
    )


async def test_a_validation_error_answers_the_documented_shape(system: System) -> None:
    r = await system.client.get("/api/v1/pipelines?limit=abc", headers=system.headers())
    assert "limit" in _field(r)
    assert set(r.json()) <= {"statusCode", "error", "message", "errors"}


async def test_a_page_past_the_limit_is_a_400_naming_page(system: System) -> None:
    for url in ("/api/v1/pipelines", "/api/v1/deployments"):
        for page in ("99999999999999999999", "18446744073709551615", "1000001"):
            r = await system.client.get(f"{url}?page={page}", headers=system.headers())
            assert "page" in _field(r), (url, page, r.text)


async def test_nul_in_a_path_parameter_is_a_400_naming_it(system: System) -> None:
    for url, name in (
        ("/api/v1/environments/a%00", "item_id"),
        ("/api/v1/pipelines/a%00b", "pipeline_id"),
        ("/api/v1/secrets/A%00", "name"),
    ):
        r = await system.client.get(url, headers=system.headers())
        assert _field(r) == {name}, (url, r.text)


async def test_nul_or_a_lone_surrogate_in_a_query_parameter_is_a_400_naming_it(system: System) -> None:
    r = await system.client.get("/api/v1/pipelines?organizationId=a%00", headers=system.headers())
    assert _field(r) == {"organizationId"}
    r = await system.client.get("/api/v1/deployments?status=%ED%A0%80", headers=system.headers())
    assert _field(r) == {"status"}


async def test_nul_in_any_text_of_a_body_is_a_400_naming_the_field(system: System) -> None:
    admin = system.headers("admin")
    bad = [
        ("/api/v1/pipelines", {"name": "a\0b"}, "name"),
        ("/api/v1/pipelines", {"name": "ok-name", "description": "x\0"}, "description"),
        (
            "/api/v1/pipelines",
            {"name": "ok-name", "stages": [{**SCRIPT, "config": {"command": "echo \0"}}]},
            "stages[0].config.command",
        ),
        ("/api/v1/environments", {"name": "e\0", "deployer": {"type": "command", "command": "true"}}, "name"),
        ("/api/v1/components", {"name": "c\0"}, "name"),
    ]
    for url, body, field in bad:
        r = await system.client.post(url, json=body, headers=admin)
        assert _field(r) == {field}, (url, r.text)
    # An escaped lone surrogate is not text either.
    raw = b'{"name": "ok-name", "description": "\\ud800"}'
    r = await system.client.post(
        "/api/v1/pipelines", content=raw, headers={**admin, "Content-Type": "application/json"}
    )
    assert r.status_code == 400, r.text


async def test_json_nested_ten_thousand_deep_is_a_400_on_every_write(system: System) -> None:
    p = await system.create_pipeline([SCRIPT])
    deep = b"[" * 10_000 + b"]" * 10_000
    for url in (
        "/api/v1/pipelines",
        f"/api/v1/pipelines/{p['id']}/trigger",
        f"/api/v1/pipelines/{p['id']}/spec/validate",
        "/api/v1/environments",
        "/api/v1/channels",
    ):
        body = b'{"stages": ' + deep + b"}"
        r = await system.client.post(
            url, content=body, headers={**system.headers("admin"), "Content-Type": "application/json"}
        )
        assert r.status_code == 400, (url, r.status_code, r.text)
        assert "nested deeper" in r.json()["message"]
        # Without a Content-Type the handlers still read JSON: the same answer.
        r = await system.client.post(url, content=body, headers=system.headers("admin"))
        assert r.status_code == 400 and "nested deeper" in r.json()["message"], (url, r.text)


async def test_a_body_over_the_size_limit_is_a_413(system: System) -> None:
    app = create_app(lambda: build_api(system.settings), max_body_bytes=1000)
    async with AsyncTestClient(app=app) as client:
        r = await client.post("/api/v1/pipelines", json={"name": "x" * 2000}, headers=system.headers("member"))
        assert r.status_code == 413, r.text
        assert r.json()["statusCode"] == 413


async def test_definitions_over_the_size_limits_are_a_400_naming_the_limit(system: System) -> None:
    member = system.headers("member")
    many = [{"id": f"s{i}", "name": "S", "type": "script", "config": {"command": "true"}} for i in range(201)]
    r = await system.client.post("/api/v1/pipelines", json={"name": "too-big", "stages": many}, headers=member)
    assert _field(r) == {"stages"} and "PIPELINES_MAX_STAGES" in r.text
    p = await system.create_pipeline([SCRIPT])
    step = {"name": "s", "run": "true"}
    jobs = [{"name": f"j{i}", "steps": [step]} for i in range(201)]
    r = await system.client.post(
        f"/api/v1/pipelines/{p['id']}/spec/save", json={"spec": {"jobs": jobs}}, headers=member
    )
    assert _field(r) == {"spec.jobs"} and "PIPELINES_MAX_JOBS" in r.text
    checks = {
        "PIPELINES_MAX_STEPS": {"jobs": [{"name": "j", "steps": [step] * 201}]},
        "PIPELINES_MAX_MATRIX": {
            "jobs": [{"name": "j", "steps": [step], "matrix": {"a": list(range(20)), "b": list(range(20))}}]
        },
        "PIPELINES_MAX_VARIABLES": {
            "jobs": [{"name": "j", "steps": [step]}],
            "variables": {f"V{i}": "x" for i in range(201)},
        },
    }
    for limit, spec in checks.items():
        r = await system.client.post(f"/api/v1/pipelines/{p['id']}/spec/validate", json={"spec": spec}, headers=member)
        assert r.status_code == 200 and not r.json()["valid"], r.text
        assert any(limit in e["message"] for e in r.json()["errors"]), (limit, r.text)
    r = await system.client.post(
        f"/api/v1/pipelines/{p['id']}/trigger", json={"variables": {f"V{i}": "x" for i in range(201)}}, headers=member
    )
    assert _field(r) == {"variables"} and "PIPELINES_MAX_VARIABLES" in r.text
