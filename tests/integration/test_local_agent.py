"""`make up` runs one local agent (services/dev/local_agent.py) beside its embedded NATS: a job whose
`runsOn` names the local agent's labels runs on it, with nothing issued by hand, and the agent's
process holds no database URL, no JWT secret and no service's broker credentials."""

from __future__ import annotations

import io
import json
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from infra.auth import issue_token
from infra.config import Settings
from services.dev.ports import free_port
from services.dev.stack import Stack

pytestmark = [pytest.mark.integration]

SECRET = "local-agent-test-secret-0123456789abcdef"
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def stack() -> Iterator[Stack]:
    data = Path(tempfile.mkdtemp(prefix="pipelines-local-agent-"))
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIPELINES_")} | {
        "PIPELINES_JWT_SECRET": SECRET,
        "PIPELINES_POLL_INTERVAL": "0.05",
        "PIPELINES_LOCAL_AGENT_LABELS": "local,smoke",
        "PIPELINES_LOCAL_AGENT_CAPACITY": "2",
    }
    out = io.StringIO()
    stack = Stack(
        env,
        services=("api", "relay", "projector", "executor", "agent"),
        data_dir=data / "data",
        api_port=free_port(),
        gateway_port=free_port(),
        cwd=REPO,
        output=out,
    )
    stack.start()
    try:
        assert stack.wait_listening(90), out.getvalue()[-4000:]
        yield stack
    finally:
        stack.stop()
        shutil.rmtree(data, ignore_errors=True)


def _wait(check: object, timeout: float, what: str) -> object:
    deadline = time.monotonic() + timeout
    while True:
        value = check()  # type: ignore[operator]
        if value:
            return value
        assert time.monotonic() < deadline, what
        time.sleep(0.1)


def test_make_up_runs_a_local_agent_that_takes_jobs_with_its_labels(stack: Stack) -> None:
    settings = Settings.from_env({"PIPELINES_JWT_SECRET": SECRET, "PIPELINES_DATA_DIR": str(stack.data_dir)})
    token = issue_token(settings, sub="alice", roles=["admin"], org=None)
    headers = {"Authorization": f"Bearer {token}"}
    api = f"{stack.api_url}/api/v1"
    with httpx.Client(timeout=10) as client:
        agents = _wait(lambda: _agents(client, api, headers), 60, "the local agent's row")
        assert [(a["id"], a["labels"], a["shared"]) for a in agents] == [("ag_local", ["local", "smoke"], True)]
        r = client.post(
            f"{api}/pipelines",
            headers=headers,
            json={
                "name": f"local-{uuid.uuid4().hex[:6]}",
                "stages": [{"id": "s", "type": "script", "config": {"command": "echo on $PWD"}, "runsOn": ["smoke"]}],
            },
        )
        assert r.status_code == 201, r.text
        pipeline = r.json()["id"]
        run = client.post(f"{api}/pipelines/{pipeline}/trigger", headers=headers).json()["id"]

        def ended() -> dict[str, object] | None:
            body: dict[str, object] = client.get(f"{api}/pipelines/{pipeline}/runs/{run}", headers=headers).json()
            return body if body["status"] in ("succeeded", "failed", "cancelled") else None

        done = _wait(ended, 90, "the run to end")
        assert isinstance(done, dict) and done["status"] == "succeeded", done
        assert f"on {stack.data_dir / 'agents' / 'ag_local'}" in str(done["logs"])
    pid = json.loads((stack.data_dir / "stack.pids").read_text())["children"]["agent"]
    environ = Path(f"/proc/{pid}/environ").read_bytes().decode().split("\0")
    names = {item.split("=", 1)[0] for item in environ if "=" in item}
    assert "PIPELINES_AGENT_CREDS" in names
    assert not names & {"PIPELINES_DATABASE_URL", "PIPELINES_NATS_URL", "PIPELINES_JWT_SECRET", "PIPELINES_NATS_CREDS"}


def _agents(client: httpx.Client, api: str, headers: dict[str, str]) -> list[dict[str, object]] | None:
    try:
        r = client.get(f"{api}/agents", headers=headers)
    except httpx.HTTPError:
        return None
    found: list[dict[str, object]] = r.json() if r.status_code == 200 else []
    return found or None
