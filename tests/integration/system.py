"""An in-process system for integration tests: the litestar app (through its test client), the
relay, the projector and the executor as tasks on the test's event loop, against real
PostgreSQL and NATS. Each system gets its own JetStream stream and executor consumer."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from litestar.testing import AsyncTestClient
from nats.aio.client import Client as NATS

from infra.app.commands import Commands
from infra.auth import issue_token
from infra.broker import bus
from infra.broker.relay import Relay
from infra.config import Settings, parse_cidrs
from infra.executor.executor import Executor
from infra.executor.leases import LeaseStore
from infra.git.credentials import StoredGitCredentials
from infra.git.repos import GitRepos
from infra.http.app import create_app
from infra.projector.consumer import Projector
from infra.secrets import SecretStore
from infra.store.postgres import PostgresEventStore
from infra.stored_secrets import StoredSecrets
from services.bootstrap import build_api, connect_nats, open_store
from tests import servers

JWT_SECRET = "integration-test-secret-0123456789abcdef"


def make_settings(database_url: str, nats_url: str, data_dir: Path, **overrides: Any) -> Settings:
    values: dict[str, Any] = dict(
        database_url=database_url,
        # Its `admin` user (tests' own connections); each service connects as its own user.
        nats_url=nats_url,
        nats_service_creds=servers.nats_service_creds(nats_url),
        jwt_secret=JWT_SECRET,
        events_stream=f"T_{uuid.uuid4().hex[:12]}",
        data_dir=data_dir,
        poll_interval=0.05,
        ack_wait=5.0,
        stage_timeout=30.0,
        kill_grace=0.5,
        lease_ttl=1.0,
        sweep_interval=0.2,
        gateway_port=1,
        # Tests post to receivers on this machine (an attack test narrows it again).
        outbound_allow=parse_cidrs("127.0.0.0/8,::1/128"),
    )
    values.update(overrides)
    return Settings(**values)


@dataclass
class System:
    settings: Settings
    client: AsyncTestClient[Any]
    store: PostgresEventStore
    commands: Commands
    relay: Relay
    projector: Projector
    executor: Executor
    org: str
    # The tests' own connection (the session server's admin): to watch subjects no service may read.
    nc: NATS

    def token(self, *roles: str, sub: str = "alice", org: str | bool | None = True) -> str:
        chosen = self.org if org is True else (None if org is False else org)
        return issue_token(self.settings, sub=sub, roles=list(roles or ("admin",)), org=chosen)  # type: ignore[arg-type]

    def headers(self, *roles: str, sub: str = "alice", org: str | bool | None = True) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token(*roles, sub=sub, org=org)}"}

    async def create_pipeline(self, stages: list[dict[str, Any]], name: str | None = None) -> dict[str, Any]:
        r = await self.client.post(
            "/api/v1/pipelines",
            json={"name": name or f"p-{uuid.uuid4().hex[:8]}", "stages": stages},
            headers=self.headers("member"),
        )
        assert r.status_code == 201, r.text
        body: dict[str, Any] = r.json()
        return body

    async def trigger(self, pipeline_id: str, **body: Any) -> dict[str, Any]:
        r = await self.client.post(
            f"/api/v1/pipelines/{pipeline_id}/trigger", json=body or None, headers=self.headers("member")
        )
        assert r.status_code == 201, r.text
        out: dict[str, Any] = r.json()
        return out

    async def get_run(self, pipeline_id: str, run_id: str) -> dict[str, Any]:
        r = await self.client.get(f"/api/v1/pipelines/{pipeline_id}/runs/{run_id}", headers=self.headers())
        assert r.status_code == 200, r.text
        out: dict[str, Any] = r.json()
        return out

    async def wait_run(
        self, pipeline_id: str, run_id: str, until: Callable[[dict[str, Any]], bool], timeout: float = 20
    ) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            run = await self.get_run(pipeline_id, run_id)
            if until(run):
                return run
            if time.monotonic() > deadline:
                raise AssertionError(f"run never reached the expected state: {run['status']}: {run}")
            await asyncio.sleep(0.05)

    async def wait_status(self, pipeline_id: str, run_id: str, *statuses: str, timeout: float = 20) -> dict[str, Any]:
        return await self.wait_run(pipeline_id, run_id, lambda r: r["status"] in statuses, timeout)


async def eventually(check: Callable[[], Awaitable[bool]], timeout: float = 10, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await asyncio.sleep(0.05)


@contextlib.asynccontextmanager
async def running_system(settings: Settings, *, with_executor: bool = True) -> AsyncIterator[System]:
    pool, store = await open_store(settings)
    # Each service as its own broker user, as in production: a missing permission fails the tests.
    connections: list[Any] = []
    try:
        for service in ("relay", "projector", "executor"):
            connections.append(await connect_nats(settings, service))
        connections.append(await bus.connect(settings.nats_url, "test-system", settings.nats_creds_for("admin")))
        nc_relay, nc_projector, nc_executor, nc_tests = connections
        await bus.ensure_events_stream(nc_relay, settings.events_stream)
    except BaseException:
        for c in connections:
            await c.close()
        await pool.close()
        raise
    poker = bus.Poker(nc_executor)
    poker.start()
    secrets = SecretStore.from_settings(pool, settings)
    commands = Commands(
        store,
        on_append=poker.poke,
        git=GitRepos.from_settings(settings),
        git_credentials=StoredGitCredentials(StoredSecrets(secrets)),
        limits=settings.definition_limits(),
    )
    relay = Relay(store, settings.database_url, nc_relay, stream=settings.events_stream, poll_interval=0.05)
    projector = Projector(store, settings.database_url, nc_projector, poll_interval=0.05)
    executor = Executor(commands, settings, nc_executor, LeaseStore(pool), secrets)
    stop = asyncio.Event()
    tasks = [
        asyncio.create_task(relay.run(stop)),
        asyncio.create_task(projector.run(stop)),
    ]
    if with_executor:
        tasks.append(asyncio.create_task(executor.run(stop)))
    app = create_app(lambda: build_api(settings))
    try:
        async with AsyncTestClient(app=app, raise_server_exceptions=False) as client:
            yield System(
                settings=settings,
                client=client,
                store=store,
                commands=commands,
                relay=relay,
                projector=projector,
                executor=executor,
                org=f"org-{uuid.uuid4().hex[:8]}",
                nc=nc_tests,
            )
    finally:
        stop.set()
        _, pending = await asyncio.wait(tasks, timeout=10)
        for t in pending:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        # The executor's sandboxes end with it (run() did, unless it was cut short or not started
        # and the tests drove runs through it directly).
        with contextlib.suppress(Exception):
            await asyncio.wait_for(executor.units.close(), 10)
        await poker.stop()
        with contextlib.suppress(Exception):
            await nc_tests.jetstream().delete_stream(settings.events_stream)
        for c in connections:
            await c.drain()
        await pool.close()
