from __future__ import annotations

import shutil
import tempfile
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import pytest_asyncio

from tests.integration.system import System, make_settings, running_system


@pytest.fixture(scope="session")
def git_repos() -> Iterator[Path]:
    """Where tests keep local Git repositories: the directory the systems' PIPELINES_GIT_ALLOW_LOCAL
    allows, outside pytest's private temporary directories so that git, running as the
    unprivileged git user when the tests run as root, can reach it."""
    root = Path(tempfile.mkdtemp(prefix="pipelines-test-repos-"))
    root.chmod(0o755)
    yield root
    shutil.rmtree(root, ignore_errors=True)


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def system(
    database_url: str, nats_url: str, tmp_path_factory: pytest.TempPathFactory, git_repos: Path
) -> AsyncIterator[System]:
    data_dir: Path = tmp_path_factory.mktemp("data")
    async with running_system(make_settings(database_url, nats_url, data_dir, git_allow_local=(git_repos,))) as s:
        yield s
