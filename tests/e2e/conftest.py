"""The whole system as separate processes (api, relay, executor, projector, gateway), started by
the same supervisor as `make up`, against the session's PostgreSQL and NATS.

Package-scoped: only one JetStream stream per server may own `pipelines.v1.>`, so the stack and
its stream are gone before other packages' tests create theirs."""

from __future__ import annotations

import asyncio
import contextlib
import io
import os
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from infra.auth import issue_token
from infra.broker import bus
from infra.config import Settings, without_userinfo
from services.dev.ports import free_port
from services.dev.stack import Stack
from tests import servers

JWT_SECRET = "e2e-test-secret-0123456789abcdef0123"


@dataclass
class RunningStack:
    stack: Stack
    settings: Settings
    api: str
    ws: str
    output: io.StringIO

    def token(self, *roles: str, sub: str = "alice", org: str | None = None) -> str:
        return issue_token(self.settings, sub=sub, roles=list(roles), org=org)

    def headers(self, *roles: str, sub: str = "alice", org: str | None = None) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token(*roles, sub=sub, org=org)}"}


class _Tee(io.StringIO):
    """Keeps the services' output for failure reports and echoes it when asked to."""

    def write(self, s: str) -> int:
        if os.environ.get("PIPELINES_E2E_ECHO"):
            sys.stderr.write(s)
        return super().write(s)


@pytest.fixture(scope="package")
def stack(database_url: str, nats_url: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningStack]:
    data_dir: Path = tmp_path_factory.mktemp("stack")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIPELINES_")} | {
        "PIPELINES_JWT_SECRET": JWT_SECRET,
        "PIPELINES_EVENTS_STREAM": f"E2E_{uuid.uuid4().hex[:10]}",
        "PIPELINES_POLL_INTERVAL": "0.05",
        "PIPELINES_ACK_WAIT": "5",
        "PIPELINES_KILL_GRACE": "0.5",
    }
    output = _Tee()
    # On the tests' embedded NATS each service connects as its own user (nats_url has the tests' admin in it).
    creds = servers.nats_service_creds(nats_url)
    stack = Stack(
        env,
        database_url=database_url,
        nats_url=without_userinfo(nats_url) if creds else nats_url,
        nats_creds=creds,
        data_dir=data_dir,
        api_port=free_port(),
        gateway_port=free_port(),
        output=output,
    )
    stack.start()
    try:
        assert stack.wait_listening(60), output.getvalue()[-4000:]
        settings = Settings.from_env(env | {"PIPELINES_API_PORT": str(stack.api_port)})
        running = RunningStack(stack=stack, settings=settings, api=stack.api_url, ws=stack.gateway_url, output=output)
        deadline = time.monotonic() + 60
        while True:
            try:
                if httpx.get(f"{running.api}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise AssertionError("the stack never became ready:\n" + output.getvalue()[-4000:])
            time.sleep(0.1)
        yield running
    finally:
        stack.stop()
        asyncio.run(_delete_stream(nats_url, env["PIPELINES_EVENTS_STREAM"]))


async def _delete_stream(nats_url: str, stream: str) -> None:
    # One stream per server may own `pipelines.v1.>`: leave the server as we found it.
    nc = await bus.connect(nats_url, "e2e-cleanup")
    try:
        with contextlib.suppress(Exception):
            await nc.jetstream().delete_stream(stream)
    finally:
        await nc.close()
