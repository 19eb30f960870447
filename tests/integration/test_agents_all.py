"""With PIPELINES_RUN_ON_AGENTS=all, every script unit goes to an agent (a system of its own: the
setting is the executor's)."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

from tests.integration.system import System, make_settings, running_system
from tests.integration.test_agents import Agents, embedded, hosts, reconciler

__all__ = ["embedded", "hosts", "reconciler"]  # the fixtures this module uses

pytestmark = pytest.mark.integration


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def system(database_url: str, nats_url: str, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[System]:
    settings = make_settings(database_url, nats_url, tmp_path_factory.mktemp("data"), run_on_agents="all")
    async with running_system(settings) as s:
        yield s


async def test_with_run_on_agents_all_every_script_unit_goes_to_an_agent(
    system: System, reconciler: None, hosts: Path
) -> None:
    agents = Agents(system, hosts)
    try:
        agent = await agents.start([])
        p = await system.create_pipeline([{"id": "s", "type": "script", "config": {"command": "echo on $PWD"}}])
        run = await system.trigger(p["id"])
        done = await system.wait_status(p["id"], run["id"], "succeeded", "failed", timeout=60)
        assert done["status"] == "succeeded", done["logs"]
        assert f"on {agent.home / 'work'}" in done["logs"]
    finally:
        await agents.close()
