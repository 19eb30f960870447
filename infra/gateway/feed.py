"""The live feed from JetStream: one ordered consumer from right after the stream's last message."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js.api import ConsumerConfig, DeliverPolicy
from nats.js.errors import NotFoundError

from infra.broker.bus import EVENTS_SUBJECTS, ensure_events_stream
from infra.broker.relay import POSITION, TX
from infra.store.records import FEED_START, FeedCursor, RecordedEvent

STREAM_VERSION = "Pipelines-Stream-Version"


async def feed_head(nc: NATS, stream: str, replicas: int = 1) -> tuple[int, FeedCursor]:
    """The stream's last sequence and the feed cursor of its last message (where "now" is); the stream
    is made (with `replicas` copies) when missing."""
    await ensure_events_stream(nc, stream, replicas)
    js = nc.jetstream()
    info = await js.stream_info(stream)
    last_seq: int = info.state.last_seq
    cursor: FeedCursor = FEED_START
    if last_seq > 0:
        try:
            msg = await js.get_msg(stream, last_seq)
            pos, tx = _headers_get(msg.headers, POSITION), _headers_get(msg.headers, TX)
            if pos is not None and tx is not None:
                cursor = (int(tx), int(pos))
        except NotFoundError:
            pass
    return last_seq, cursor


async def subscribe_after(nc: NATS, stream: str, last_seq: int, cb: Callable[[Msg], Awaitable[None]]) -> Any:
    """An ordered consumer of every event published after stream sequence `last_seq`."""
    config = ConsumerConfig(deliver_policy=DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=last_seq + 1)
    return await nc.jetstream().subscribe(EVENTS_SUBJECTS, stream=stream, cb=cb, ordered_consumer=True, config=config)


def _headers_get(headers: Any, name: str) -> str | None:
    if not headers:
        return None
    value = headers.get(name)
    return str(value) if value is not None else None


def record_from_msg(msg: Msg) -> RecordedEvent | None:
    """The stored event a relay message carries (org, pipeline and run are left to the caller)."""
    headers = msg.headers or {}
    pos, tx = _headers_get(headers, POSITION), _headers_get(headers, TX)
    if pos is None or tx is None:
        return None
    parts = msg.subject.split(".")
    stream_id = _headers_get(headers, "ce-subject")
    if stream_id is None:
        if len(parts) < 6:
            return None
        stream_id = f"{parts[3]}-{parts[4]}"
    event_type = parts[-1] if len(parts) >= 6 else ""
    raw_time = _headers_get(headers, "ce-time")
    try:
        recorded_at = datetime.fromisoformat(raw_time) if raw_time else datetime.now(UTC)
    except ValueError:
        recorded_at = datetime.now(UTC)
    return RecordedEvent(
        position=int(pos),
        tx_id=int(tx),
        stream_id=stream_id,
        stream_version=int(_headers_get(headers, STREAM_VERSION) or 0),
        event_id=_headers_get(headers, "Nats-Msg-Id") or "",
        event_type=event_type,
        data=msg.data,
        org=None,
        pipeline_id=None,
        run_id=None,
        recorded_at=recorded_at,
    )
