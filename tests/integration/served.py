"""The API served by uvicorn inside a test's event loop on a loopback port, telling its clients
where the gateway is: what the CLI's and the dashboard's tests reach, as a user's client would."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import socket
from collections.abc import AsyncIterator, Iterator

import uvicorn

from infra.config import Settings
from infra.http.app import create_app
from services.bootstrap import build_api
from tests.integration.system import System, eventually


class InLoopServer(uvicorn.Server):
    # The API serves inside the test's event loop: the test process keeps its own signal handlers.
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


async def relay_backlog(system: System, wait: float) -> None:
    """Wait until the relay has published what the store holds (other tests' events): a gateway
    started after that does not replay them to its clients."""
    head = await system.store.head()

    async def relayed() -> bool:
        return system.relay.cursor >= head

    await eventually(relayed, wait, "the relay to publish the backlog")


@contextlib.asynccontextmanager
async def served_api(settings: Settings, gateway_port: int, wait: float) -> AsyncIterator[str]:
    """The API's base URL while it serves; it names the gateway on `gateway_port`
    (PIPELINES_GATEWAY_PUBLIC_URL) to the clients that ask (GET /api/v1/info)."""
    public = dataclasses.replace(settings, gateway_public_url=f"ws://127.0.0.1:{gateway_port}/api/v1/ws")
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    server = InLoopServer(uvicorn.Config(create_app(lambda: build_api(public)), log_level="warning", access_log=False))
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:

        async def listening() -> bool:
            return bool(server.started)

        await eventually(listening, wait, "the API to listen")
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        await asyncio.wait([task], timeout=wait)
