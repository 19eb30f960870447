"""The gateway logs every HTTP request it answers (handshakes, health, metrics) as the API does."""

from __future__ import annotations

import logging

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus

from tests.integration.test_gateway import Env, env  # noqa: F401  (the gateway fixture)

pytestmark = pytest.mark.integration


async def test_handshakes_are_logged_without_their_token(env: Env, caplog: pytest.LogCaptureFixture) -> None:  # noqa: F811
    caplog.set_level(logging.INFO, logger="pipelines.access")
    token = env.token(env.org)
    async with connect(f"{env.url()}?token={token}", additional_headers={"X-Request-Id": "ws-1"}) as ws:
        await ws.send('{"action": "subscribe", "channel": "runs"}')
        await ws.recv()
    with pytest.raises(InvalidStatus):
        async with connect(f"{env.url()}?token=not-a-token"):
            pass
    records = [r for r in caplog.records if r.name == "pipelines.access"]
    got = [(r.method, r.path, r.status) for r in records]  # type: ignore[attr-defined]
    assert got == [("GET", "/api/v1/ws", 101), ("GET", "/api/v1/ws", 401)]
    assert records[0].request_id == "ws-1"  # type: ignore[attr-defined]
    assert all(r.duration_ms >= 0 for r in records)  # type: ignore[attr-defined]
    assert not [r for r in caplog.records if token in r.getMessage() or "not-a-token" in r.getMessage()]
