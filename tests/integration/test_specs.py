"""Pipeline definitions as code over the API: validate, save, versions, formats, JSON Schema."""

from __future__ import annotations

from typing import Any

import pytest
import yaml

from tests.integration.system import System

pytestmark = pytest.mark.integration

CANONICAL: dict[str, Any] = {
    "variables": {"PUBLISH": "no"},
    "stages": [
        {
            "id": "test",
            "name": "Run tests",
            "type": "script",
            "timeout": 600,
            "retry": {"maxAttempts": 3, "backoff": 2},
            "config": {"command": "pytest -q"},
        },
        {"id": "gate", "type": "approval", "timeout": 86400, "config": {"message": "Ship it?"}},
        {
            "id": "build",
            "jobs": [
                {
                    "name": "image",
                    "matrix": {"arch": ["amd64", "arm64"]},
                    "steps": [{"name": "build", "run": "make image ARCH=${{ matrix.arch }}"}],
                },
                {
                    "name": "publish",
                    "needs": ["image"],
                    "when": "variables.PUBLISH == 'yes'",
                    "steps": [{"name": "push", "run": "echo push"}],
                },
            ],
        },
    ],
    "triggers": [{"type": "manual"}, {"type": "cron", "schedule": "0 3 * * 1-5", "timezone": "Europe/Berlin"}],
}


async def _validate(system: System, pid: str, spec: Any) -> dict[str, Any]:
    r = await system.client.post(
        f"/api/v1/pipelines/{pid}/spec/validate", json={"spec": spec}, headers=system.headers("viewer")
    )
    assert r.status_code == 200, r.text
    out: dict[str, Any] = r.json()
    return out


async def test_the_canonical_spec_validates(system: System) -> None:
    p = await system.create_pipeline([])
    result = await _validate(system, p["id"], CANONICAL)
    assert result == {"valid": True, "errors": [], "warnings": []}


async def test_validation_reports_every_error_with_its_path(system: System) -> None:
    p = await system.create_pipeline([])
    spec = {
        "stages": [
            {"type": "script", "config": {}},
            {
                "id": "b",
                "jobs": [
                    {"name": "a", "needs": ["build"], "steps": [{"run": "true"}]},
                    {"name": "a", "steps": [{"run": "${{ variables.X == }}"}]},
                    {"name": "c", "needs": ["d"], "steps": [{"uses": "no-such-plugin"}]},
                    {"name": "d", "needs": ["c"], "matrix": {"os": []}, "steps": [{"frobnicate": 1}], "colour": "red"},
                ],
            },
        ],
        "triggers": [{"type": "cron", "schedule": "61 * * * *"}],
    }
    result = await _validate(system, p["id"], spec)
    assert result["valid"] is False
    errors = {(e["path"], e["message"]) for e in result["errors"]}
    paths = {path for path, _ in errors}
    assert ("stages[1].jobs[0].needs", 'unknown job "build"') in errors
    assert "stages[0].config.command" in paths
    assert "stages[1].jobs[1].name" in paths  # duplicate
    assert "stages[1].jobs[1].steps[0].run" in paths  # bad expression
    assert "stages[1].jobs[2].steps[0].uses" in paths  # unknown step kind
    assert any("cycle in needs" in m for _, m in errors)
    assert "stages[1].jobs[3].matrix.os" in paths
    assert "stages[1].jobs[3].colour" in paths
    assert "stages[1].jobs[3].steps[0]" in paths
    assert "triggers[0].schedule" in paths


async def test_a_spec_validates_before_any_pipeline_has_it(system: System) -> None:
    # `pipelines validate -f FILE` checks a file for a pipeline that does not exist yet.
    url = "/api/v1/pipelines/validate"
    good = await system.client.post(url, json={"spec": CANONICAL}, headers=system.headers("viewer"))
    assert (good.status_code, good.json()) == (200, {"valid": True, "errors": [], "warnings": []})
    bad = await system.client.post(
        url,
        json={"spec": {"jobs": [{"name": "a", "needs": ["b"], "steps": [{"run": "true"}]}]}},
        headers=system.headers("member"),
    )
    assert bad.status_code == 200, bad.text
    assert bad.json()["valid"] is False
    assert ("jobs[0].needs", 'unknown job "b"') in {(e["path"], e["message"]) for e in bad.json()["errors"]}
    anonymous = await system.client.post(url, json={"spec": CANONICAL})
    assert anonymous.status_code == 401


async def test_info_names_the_gateway_and_the_caller(system: System) -> None:
    r = await system.client.get("/api/v1/info", headers=system.headers("viewer", sub="vera"))
    assert r.status_code == 200, r.text
    assert r.json() == {
        "gatewayUrl": system.settings.gateway_url,
        "subject": "vera",
        "organization": system.org,
        "roles": ["viewer"],
    }
    assert (await system.client.get("/api/v1/info")).status_code == 401


TYPED: dict[str, Any] = {
    "variables": {"GREETING": "hello"},
    "stages": [
        {
            "id": "test",
            "name": "Run tests",
            "type": "script",
            "timeout": 600,
            "retry": {"maxAttempts": 3, "backoff": 2},
            "config": {"command": "echo $GREETING"},
        },
        {"id": "gate", "type": "approval", "timeout": 86400, "config": {"message": "Ship it?"}},
    ],
    "triggers": [{"type": "manual"}],
}


async def test_save_creates_versions_kept_forever_and_readable_in_json_and_yaml(system: System) -> None:
    p = await system.create_pipeline([{"id": "one", "type": "script", "config": {"command": "echo one"}}])
    base = f"/api/v1/pipelines/{p['id']}"
    r = await system.client.post(
        f"{base}/spec/save",
        json={"spec": TYPED, "format": "yaml", "commitMessage": "as code"},
        headers=system.headers("member"),
    )
    assert r.status_code == 200, r.text
    assert r.json()["version"] == 2 and r.json()["format"] == "yaml"
    r = await system.client.get(f"{base}/spec", headers=system.headers("viewer"))
    body = r.json()
    assert body["version"] == 2 and body["format"] == "yaml" and body["spec"] == TYPED
    assert yaml.safe_load(body["content"]) == TYPED
    r = await system.client.get(f"{base}/spec?format=json&version=1", headers=system.headers("viewer"))
    assert r.json()["spec"]["stages"][0]["config"] == {"command": "echo one"}
    versions = (await system.client.get(f"{base}/versions", headers=system.headers())).json()
    assert [(v["version"], v["commitMessage"]) for v in versions] == [(1, None), (2, "as code")]
    r = await system.client.get(f"{base}/versions/2", headers=system.headers())
    assert r.json()["spec"] == TYPED
    r = await system.client.get(f"{base}/versions/9", headers=system.headers())
    assert r.status_code == 404
    pipeline = (await system.client.get(base, headers=system.headers())).json()
    assert pipeline["definitionVersion"] == 2
    assert [s["id"] for s in pipeline["stages"]] == ["test", "gate"]
    # a run records the version it was triggered with, and gets the spec's variables
    run = await system.trigger(p["id"])
    assert run["definitionVersion"] == 2
    waiting = await system.wait_status(p["id"], run["id"], "waiting_approval")
    assert waiting["stageResults"][0]["output"] == "hello\n"


async def test_an_invalid_save_is_400_and_saves_nothing(system: System) -> None:
    p = await system.create_pipeline([])
    base = f"/api/v1/pipelines/{p['id']}"
    r = await system.client.post(
        f"{base}/spec/save", json={"spec": {"jobs": [{"name": "x"}]}}, headers=system.headers("member")
    )
    assert r.status_code == 400
    assert any(e["path"] == "spec.jobs[0].steps" for e in r.json()["errors"])
    r = await system.client.post(f"{base}/spec/save", json={"spec": TYPED}, headers=system.headers("viewer"))
    assert r.status_code == 403
    r = await system.client.post(
        f"{base}/spec/save", json={"spec": TYPED, "saveMode": "pr"}, headers=system.headers("member")
    )
    assert r.status_code == 400 and "Git" in r.json()["message"]
    versions = (await system.client.get(f"{base}/versions", headers=system.headers())).json()
    assert len(versions) == 1


async def test_the_spec_json_schema_is_published(system: System) -> None:
    r = await system.client.get("/api/v1/schemas/pipeline-spec.json")
    assert r.status_code == 200
    schema = r.json()
    assert schema["title"] == "Pipeline spec" and "stages" in schema["properties"]
