"""A relay and a gateway running in-process on a JetStream stream of their own, for the Socket.IO
and resume-token tests (the same set-up as test_gateway.py's `env`)."""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

from psycopg_pool import AsyncConnectionPool

from domain import pipeline as pl
from domain import run as rn
from infra.app.commands import Commands
from infra.auth import issue_token
from infra.broker import bus
from infra.broker.relay import Relay
from infra.config import Settings
from infra.gateway.server import Gateway
from infra.store.migrate import migrate, open_pool
from infra.store.postgres import PostgresEventStore

SECRET = "gateway-env-secret-0123456789abcdef"
WAIT = 15.0


@dataclass
class GatewayEnv:
    settings: Settings
    pool: AsyncConnectionPool
    store: PostgresEventStore
    commands: Commands
    nc: Any
    relay: Relay
    gateway: Gateway

    def token(self, org: str | None, *, roles: tuple[str, ...] = ("viewer",), ttl: int | None = None) -> str:
        if ttl is None:
            return issue_token(self.settings, sub="alice", roles=list(roles), org=org)
        return issue_token(self.settings, sub="alice", roles=list(roles), org=org, ttl_seconds=ttl)

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.gateway.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.gateway.port}/api/v1/ws"

    async def pipeline(self, org: str | None) -> pl.PipelineState:
        return await self.commands.create_pipeline(
            name=f"p-{uuid.uuid4().hex[:10]}",
            description=None,
            stages=[{"id": "build", "name": "Build", "type": "script", "config": {"command": "make"}}],
            org=org,
            by="alice",
        )

    async def trigger(self, pipeline: pl.PipelineState) -> rn.RunState:
        state, _ = await self.commands.trigger(pipeline, by="alice")
        return state

    async def advance(self, run_id: str) -> rn.RunState:
        state, _ = await self.commands.run_command(run_id, lambda at: rn.Advance(at=at))
        return state

    async def complete(self, run_id: str, stage_id: str = "build") -> rn.RunState:
        state, _ = await self.commands.run_command(
            run_id, lambda at: rn.CompleteStage(stage_id=stage_id, attempt=1, succeeded=True, exit_code=0, at=at)
        )
        return state

    def chunk(self, *lines: str, stage: str = "build") -> rn.LogAppended:
        lines_ = tuple(rn.LogLine("stdout", t) for t in lines)
        return rn.LogAppended(stage_id=stage, lines=lines_, at=self.commands.now())

    async def log(self, run: rn.RunState, *lines: str) -> None:
        await self.commands.append_logs(run, [self.chunk(*lines)])


@contextlib.asynccontextmanager
async def gateway_env(database_url: str, nats_url: str) -> AsyncIterator[GatewayEnv]:
    await migrate(database_url)
    pool = await open_pool(database_url, max_size=10)
    store = PostgresEventStore(pool)
    settings = Settings(
        database_url=database_url,
        nats_url=nats_url,
        jwt_secret=SECRET,
        events_stream=f"GWE_{uuid.uuid4().hex[:12]}",
        gateway_port=0,
        poll_interval=0.05,
    )
    nc = await bus.connect(nats_url, "test-gateway-env")
    poker = bus.Poker(nc)
    poker.start()
    commands = Commands(store, on_append=poker.poke)
    stop = asyncio.Event()
    relay = Relay(store, database_url, nc, stream=settings.events_stream, poll_interval=0.05)
    relay_task = asyncio.create_task(relay.run(stop))
    gateway = Gateway(settings, store, commands, nc)
    gateway_task: asyncio.Task[None] | None = None
    try:
        # Let the relay publish what other tests left in the store before the gateway starts.
        head = await store.head()
        async with asyncio.timeout(60):
            while relay.cursor < head:
                assert not relay_task.done(), relay_task
                await asyncio.sleep(0.05)
        gateway_task = asyncio.create_task(gateway.serve(stop))
        async with asyncio.timeout(WAIT):
            await gateway.ready.wait()
        yield GatewayEnv(settings, pool, store, commands, nc, relay, gateway)
    finally:
        stop.set()
        tasks = [t for t in (relay_task, gateway_task) if t is not None]
        done, pending = await asyncio.wait(tasks, timeout=WAIT)
        for t in pending:
            t.cancel()
        await poker.stop()
        with contextlib.suppress(Exception):
            await nc.jetstream().delete_stream(settings.events_stream)
        with contextlib.suppress(Exception):
            await nc.drain()
        await pool.close()
        for t in done:
            if not t.cancelled() and t.exception() is not None:
                raise t.exception()  # type: ignore[misc]
