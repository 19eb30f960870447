"""`python -m services.projector --rebuild` run beside `make up`, with no URL in its environment,
uses the stack's own servers (its stack.json), and refuses once the stack is gone."""

from __future__ import annotations

import io
import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from infra.config import stack_file
from services.dev.stack import Stack

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]


def _rebuild(data_dir: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIPELINES_")}
    env.update(PIPELINES_JWT_SECRET="x" * 32, PIPELINES_DATA_DIR=str(data_dir))
    return subprocess.run(
        [sys.executable, "-m", "services.projector", "--rebuild"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_rebuild_uses_the_running_stacks_database_and_refuses_once_it_stopped(
    database_url: str, nats_url: str, tmp_path: Path
) -> None:
    data_dir = tmp_path / "data"
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIPELINES_")}
    stack = Stack(
        env, services=(), database_url=database_url, nats_url=nats_url, data_dir=data_dir, output=io.StringIO()
    )
    with stack:
        written = stack_file(data_dir)
        assert stat.S_IMODE(written.stat().st_mode) == 0o600  # the URLs hold passwords
        assert json.loads(written.read_text())["databaseUrl"] == database_url
        assert f"AsyncAPI    {stack.api_url}/api/v1/asyncapi.json" in stack.banner()
        done = _rebuild(data_dir)
        assert done.returncode == 0, done.stderr
        assert "rebuilt the read models from" in done.stderr
    assert not stack_file(data_dir).exists()
    done = _rebuild(data_dir)
    assert done.returncode == 1 and "no `make up` is running" in done.stderr, done.stderr
