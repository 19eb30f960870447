"""Attacks on outbound requests at save time, through the real API (PostgreSQL, NATS) of a system
as shipped (PIPELINES_OUTBOUND_ALLOW empty): deployer and channel URLs that point inside, in any
spelling, or carry credentials, are a 400 naming the field."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

from tests.integration.system import System, make_settings, running_system
from tests.integration.test_deploy_notify import environment, receiver

pytestmark = pytest.mark.integration


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def system(database_url: str, nats_url: str, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[System]:
    """A system as shipped: PIPELINES_OUTBOUND_ALLOW empty."""
    data_dir: Path = tmp_path_factory.mktemp("strict")
    async with running_system(make_settings(database_url, nats_url, data_dir, outbound_allow=())) as s:
        yield s


INTERNAL = [
    "http://2130706433/",
    "http://169.254.169.254/latest/meta-data/",
    "http://user:pw@example.com/",
    "http://[::1]/",
    "http://0x7f.1/",
    "http://017700000001/",
    "http://[::ffff:127.0.0.1]/",
    "http://127.1/",
    "http://10.0.0.1/",
    "http://100.64.0.1/",
    "http://[fe80::1]/",
]


async def test_deployer_and_channel_urls_pointing_inside_are_refused_at_save_time(system: System) -> None:
    admin = system.headers("admin")
    async with receiver() as hook:
        urls = [hook.url, f"http://localhost:{hook.port}/hook", *INTERNAL]
        for url in urls:
            r = await system.client.post(
                "/api/v1/environments",
                json={"name": f"e-{uuid.uuid4().hex[:6]}", "deployer": {"type": "webhook", "url": url}},
                headers=admin,
            )
            assert r.status_code == 400, (url, r.text)
            assert [e["path"] for e in r.json()["errors"]] == ["deployer.url"], (url, r.text)
            r = await system.client.post(
                "/api/v1/channels",
                json={"name": f"c-{uuid.uuid4().hex[:6]}", "type": "webhook", "url": url},
                headers=admin,
            )
            assert r.status_code == 400, (url, r.text)
            assert [e["path"] for e in r.json()["errors"]] == ["url"], (url, r.text)
        # Nor can an existing one be pointed there.
        env = await environment(system, {"type": "command", "command": "true"})
        for method in ("PUT", "PATCH"):
            body = {"name": env["name"], "deployer": {"type": "webhook", "url": hook.url}}
            r = await system.client.request(method, f"/api/v1/environments/{env['id']}", json=body, headers=admin)
            assert r.status_code == 400 and r.json()["errors"][0]["path"] == "deployer.url", r.text
        assert hook.requests == []
    r = await system.client.get("/api/v1/environments", headers=admin)
    assert [e["deployer"]["type"] for e in r.json()] == ["command"]
