"""A live stack for the browser: the integration system (relay, projector, executor on real
PostgreSQL and NATS) with the API served by uvicorn and the gateway on loopback ports, as a
browser reaches them. The gateway can be restarted on its port (a lost connection)."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from infra.auth import issue_token
from infra.broker import bus
from infra.config import Settings
from infra.gateway.server import Gateway
from tests.integration.served import relay_backlog, served_api
from tests.integration.system import System, make_settings, running_system

WAIT = 60.0


@dataclass
class LiveStack:
    system: System
    settings: Settings
    api_url: str
    gateway: Gateway
    _gateway_task: asyncio.Task[None]
    _gateway_stop: asyncio.Event
    _nc: Any

    def token(self, role: str, *, sub: str | None = None, ttl: int = 3600) -> str:
        return issue_token(self.settings, sub=sub or f"{role}-user", roles=[role], org=self.system.org, ttl_seconds=ttl)

    async def stop_gateway(self) -> None:
        """Closes every gateway connection (1001) and stops listening: a lost connection."""
        self._gateway_stop.set()
        await asyncio.wait_for(self._gateway_task, WAIT)

    async def start_gateway(self) -> None:
        """A new gateway on the same port (the address the API told the browser)."""
        settings = dataclasses.replace(self.settings, gateway_port=self.gateway.port)
        self.gateway = Gateway(settings, self.system.store, self.system.commands, self._nc)
        self._gateway_stop = asyncio.Event()
        self._gateway_task = asyncio.create_task(self.gateway.serve(self._gateway_stop))
        async with asyncio.timeout(WAIT):
            await self.gateway.ready.wait()


@contextlib.asynccontextmanager
async def live_stack(database_url: str, nats_url: str, data_dir: Path) -> AsyncIterator[LiveStack]:
    settings = make_settings(database_url, nats_url, data_dir, gateway_port=0)
    async with running_system(settings) as system:
        nc = await bus.connect(nats_url, "test-dashboard-gateway")
        tasks: list[asyncio.Task[None]] = []
        stack: LiveStack | None = None
        stop = asyncio.Event()
        try:
            # The gateway starts after what the relay publishes of other tests' events.
            await relay_backlog(system, WAIT)
            gateway = Gateway(settings, system.store, system.commands, nc)
            gateway_task = asyncio.create_task(gateway.serve(stop))
            tasks.append(gateway_task)
            async with asyncio.timeout(WAIT):
                await gateway.ready.wait()
            # The API tells the browser where the gateway is (PIPELINES_GATEWAY_PUBLIC_URL).
            async with served_api(settings, gateway.port, WAIT) as url:
                stack = LiveStack(system, settings, url, gateway, gateway_task, stop, nc)
                yield stack
        finally:
            stop.set()
            if stack is not None:  # a restarted gateway
                stack._gateway_stop.set()
                tasks.append(stack._gateway_task)
            if tasks:
                await asyncio.wait(tasks, timeout=WAIT)
            await nc.drain()
