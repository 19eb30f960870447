"""The gateway sets aside an event it cannot frame: no frame, the hook told, nothing raised."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime

from infra.gateway.views import Views
from infra.store.memory import InMemoryEventStore
from infra.store.records import RecordedEvent


def _record(stream_id: str, data: bytes) -> RecordedEvent:
    return RecordedEvent(
        position=7,
        tx_id=1,
        stream_id=stream_id,
        stream_version=1,
        event_id="00000000-0000-0000-0000-000000000007",
        event_type="martian_landed",
        data=data,
        org="o",
        pipeline_id=None,
        run_id=None,
        recorded_at=datetime.now(UTC),
    )


def test_an_event_that_cannot_be_framed_is_set_aside() -> None:
    told: list[tuple[int, str]] = []

    async def set_aside(rec: RecordedEvent, exc: Exception) -> None:
        told.append((rec.position, type(exc).__name__))

    async def main() -> tuple[bytes, ...]:
        views = Views(InMemoryEventStore(), set_aside=set_aside)
        return await views.frames(_record("runlog-r1", b'{"type": "martian_landed"}'))

    assert asyncio.run(main()) == ()
    assert told == [(7, "ValidationError")]
