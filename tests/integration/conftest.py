from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

from tests.integration.system import System, make_settings, running_system


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def system(database_url: str, nats_url: str, tmp_path_factory: pytest.TempPathFactory) -> AsyncIterator[System]:
    data_dir: Path = tmp_path_factory.mktemp("data")
    async with running_system(make_settings(database_url, nats_url, data_dir)) as s:
        yield s
