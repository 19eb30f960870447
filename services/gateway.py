"""`python -m services.gateway`: live run updates and logs over WebSocket (`/api/v1/ws`) and
Socket.IO (namespace `/events`), on one port."""

from __future__ import annotations

import asyncio
import contextlib
import logging

from infra.app.commands import Commands
from infra.config import Settings
from infra.gateway.server import Gateway
from services.bootstrap import connect_nats, open_store, run_until_signalled


def main() -> None:
    settings = Settings.from_env()

    async def body(stop: asyncio.Event) -> None:
        # Every health probe is a rejected handshake: keep them out of the log.
        logging.getLogger("websockets.server").setLevel(logging.WARNING)
        pool, store = await open_store(settings, max_size=8)
        try:
            nc = await connect_nats(settings, "gateway")
            try:
                await Gateway(settings, store, Commands(store), nc).serve(stop)
            finally:
                with contextlib.suppress(Exception):
                    await nc.drain()
        finally:
            await pool.close()

    run_until_signalled("gateway", body)


if __name__ == "__main__":
    main()
