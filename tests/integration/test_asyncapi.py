"""The served AsyncAPI document, and what a real run publishes on NATS checked against it."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from infra.asyncapi import asyncapi_document
from tests.asyncapi_support import check_nats_message
from tests.integration.system import System, eventually

pytestmark = pytest.mark.integration


async def test_the_api_serves_the_asyncapi_document_without_a_token(system: System) -> None:
    r = await system.client.get("/api/v1/asyncapi.json")
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("application/json")
    assert r.json() == asyncapi_document()


async def test_every_message_of_a_real_run_matches_the_document(system: System) -> None:
    nc = system.nc  # the tests' admin user: a service's own may not read every subject
    assert nc is not None
    received: list[tuple[str, dict[str, str] | None, bytes]] = []

    async def on_msg(msg: Any) -> None:
        received.append((msg.subject, msg.headers, msg.data))

    subs = [
        await nc.subscribe(f"pipelines.v1.{system.org}.>", cb=on_msg),
        await nc.subscribe(f"pipelines.logs.v1.{system.org}.>", cb=on_msg),
        await nc.subscribe(f"pipelines.notify.v1.{system.org}.>", cb=on_msg),
    ]
    try:
        stages = [
            {"id": "build", "name": "Build", "type": "script", "config": {"command": "echo built; echo warn >&2"}},
            {"id": "tell", "name": "Tell", "type": "notify", "config": {"channel": "#ops", "message": "done"}},
        ]
        p = await system.create_pipeline(stages)
        run = await system.trigger(p["id"])
        await system.wait_status(p["id"], run["id"], "succeeded", "failed")

        def complete() -> bool:
            subjects = [subject for subject, _, _ in received]
            return (
                any(s.startswith("pipelines.logs.") for s in subjects)
                and any(s.startswith("pipelines.notify.") for s in subjects)
                and any(s.endswith((".run_succeeded", ".run_failed")) for s in subjects)
            )

        await eventually(lambda: asyncio.sleep(0, complete()), what="events, log chunks and a notification on NATS")
    finally:
        for sub in subs:
            await sub.unsubscribe()
    channels = {check_nats_message(subject, headers, data) for subject, headers, data in received}
    assert {"logs", "notifications", "event.pipeline_created", "event.run_triggered", "event.log_appended"} <= channels
