"""`python -m services.relay`: publishes the event store's feed to JetStream."""

from __future__ import annotations

import asyncio

from infra.broker.relay import Relay
from infra.config import Settings
from services.bootstrap import connect_nats, open_store, run_until_signalled


def main() -> None:
    settings = Settings.from_env()

    async def body(stop: asyncio.Event) -> None:
        pool, store = await open_store(settings, max_size=4)
        nc = await connect_nats(settings, "relay")
        try:
            relay = Relay(
                store,
                settings.database_url,
                nc,
                stream=settings.events_stream,
                stream_replicas=settings.events_stream_replicas,
                poll_interval=settings.poll_interval,
            )
            await relay.run(stop)
        finally:
            await nc.drain()
            await pool.close()

    run_until_signalled("relay", body, metrics=(settings.metrics_host, settings.relay_metrics_port))


if __name__ == "__main__":
    main()
