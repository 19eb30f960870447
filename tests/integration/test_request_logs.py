"""Every API request is logged once, with method, path, status, duration and request id, and never a token."""

from __future__ import annotations

import logging

import pytest

from tests.integration.system import System

pytestmark = pytest.mark.integration


def _access(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == "pipelines.access"]


async def test_every_request_is_logged_with_its_outcome_and_request_id(
    system: System, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="pipelines.access")
    token = system.token("admin")
    r = await system.client.get("/api/v1/pipelines", headers={"Authorization": f"Bearer {token}"})
    assert r.status_code == 200
    r = await system.client.get("/api/v1/pipelines/nope", headers={"X-Request-Id": "req-42", **system.headers()})
    assert r.status_code == 404 and r.headers["x-request-id"] == "req-42"
    r = await system.client.get(f"/api/v1/pipelines?token={token}")
    assert r.status_code == 401
    records = _access(caplog)
    got = [(x.method, x.path, x.status) for x in records]  # type: ignore[attr-defined]
    assert got == [
        ("GET", "/api/v1/pipelines", 200),
        ("GET", "/api/v1/pipelines/nope", 404),
        ("GET", "/api/v1/pipelines", 401),
    ]
    assert records[1].request_id == "req-42"  # type: ignore[attr-defined]
    assert all(isinstance(x.duration_ms, float) and x.duration_ms >= 0 for x in records)  # type: ignore[attr-defined]
    assert len({x.request_id for x in records}) == 3  # type: ignore[attr-defined]
    # The test's own HTTP client (httpx) logs the URL it requests; the services' setup_logging silences it.
    served = [r.getMessage() for r in caplog.records if not r.name.startswith(("httpx", "httpcore"))]
    assert served and not [m for m in served if token in m]


async def test_a_request_id_that_could_forge_log_lines_is_replaced(
    system: System, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="pipelines.access")
    r = await system.client.get("/healthz", headers={"X-Request-Id": "x y\tstatus=200"})
    assert r.status_code == 200
    (record,) = _access(caplog)
    assert record.request_id == r.headers["x-request-id"] != "x y\tstatus=200"  # type: ignore[attr-defined]


async def test_a_path_no_route_serves_is_logged_too(system: System, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="pipelines.access")
    r = await system.client.delete("/no/such/route")
    assert r.status_code == 404
    (record,) = _access(caplog)
    assert (record.method, record.path, record.status) == ("DELETE", "/no/such/route", 404)  # type: ignore[attr-defined]
    assert record.request_id == r.headers["x-request-id"]  # type: ignore[attr-defined]
