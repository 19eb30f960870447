"""The README's walkthrough and WebSocket example, run as written against a live stack."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from tests.e2e.conftest import JWT_SECRET, RunningStack

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()


def _walkthrough() -> str:
    section = README.split("<!-- walkthrough:start -->", 1)[1].split("<!-- walkthrough:end -->", 1)[0]
    return "\n".join(re.findall(r"```bash\n(.*?)```", section, flags=re.S))


def _python_example() -> str:
    return re.findall(r"```python\n(.*?)```", README, flags=re.S)[0]


def test_the_readme_walkthrough_runs_as_written(stack: RunningStack) -> None:
    env = {
        "PATH": f"{Path(sys.executable).parent}:/usr/local/bin:/usr/bin:/bin",
        "HOME": os.environ.get("HOME", "/tmp"),
        "API": f"{stack.api}/api/v1",
        "PIPELINES_JWT_SECRET": JWT_SECRET,
    }
    script = "set -euo pipefail\n" + _walkthrough() + '\necho "RUN=$RUN"\n'
    done = subprocess.run(
        ["bash", "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout.splitlines()
    assert out[0] == "403" and out[1] == "running"
    assert "all tests passed" in done.stdout and "shipped 1.2.3" in done.stdout
    assert "failed" in out and "cancelled" in out
    assert any('"statusCode":400' in line and "succeeded" in line for line in out)
    assert out[-4:-1] == ["Deploys after a human says yes.", "204", "404"]

    # The walkthrough deleted its pipeline; the WebSocket example watches a run of its own.
    headers = stack.headers("member")
    pipeline = httpx.post(
        f"{stack.api}/api/v1/pipelines",
        json={"name": "readme-ws", "stages": [{"type": "script", "config": {"command": "true"}}]},
        headers=headers,
    ).json()
    run_id = httpx.post(f"{stack.api}/api/v1/pipelines/{pipeline['id']}/trigger", headers=headers).json()["id"]
    example = subprocess.run(
        [sys.executable, "-c", _python_example()],
        env={**env, "TOKEN": stack.token("viewer"), "RUN": run_id, "WS": stack.ws},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert example.returncode == 0, example.stdout + example.stderr
    statuses = [line.split()[1] for line in example.stdout.splitlines()]
    assert statuses[0] == "queued" and statuses[-1] == "succeeded" and "running" in statuses
