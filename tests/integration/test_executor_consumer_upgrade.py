"""A durable consumer made by an earlier version (every run event) is narrowed to the events the
executor acts on when an executor starts (issue 17). A module of its own: its stream cannot
coexist with another module's system on the same NATS."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from infra.broker import bus
from infra.executor.consumer import CONSUMER, RUN_EVENTS_FILTERS
from tests.integration.system import make_settings, running_system

pytestmark = pytest.mark.integration


def script(sid: str, command: str) -> dict[str, Any]:
    return {"id": sid, "type": "script", "config": {"command": command}}


async def test_a_consumer_made_by_an_earlier_version_is_narrowed(
    database_url: str, nats_url: str, tmp_path: Path
) -> None:
    settings = make_settings(database_url, nats_url, tmp_path / "data")
    nc = await bus.connect(nats_url, "test-consumer")
    try:
        await bus.ensure_events_stream(nc, settings.events_stream)
        await nc.jetstream().add_consumer(
            settings.events_stream,
            ConsumerConfig(
                durable_name=CONSUMER,
                filter_subject="pipelines.v1.*.run.*.*",  # every run event, as before issue 17
                ack_policy=AckPolicy.EXPLICIT,
                deliver_policy=DeliverPolicy.ALL,
            ),
        )
        async with running_system(settings) as system:
            p = await system.create_pipeline([script("a", "true")])
            run = await system.trigger(p["id"])
            await system.wait_status(p["id"], run["id"], "succeeded")
            info = await nc.jetstream().consumer_info(settings.events_stream, CONSUMER)
            assert sorted(info.config.filter_subjects or []) == sorted(RUN_EVENTS_FILTERS)
    finally:
        await nc.close()
