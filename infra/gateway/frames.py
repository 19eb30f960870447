"""The server's frames: JSON encoding of each event kind, and their WebSocket wire bytes.

An event frame is `{"event", "data", "position", "cursor"}`: `cursor` is the resume token (only goes
up in delivery order); `position` is the store's, kept for compatibility (it can go down)."""

from __future__ import annotations

from typing import Any

import msgspec

from domain import pipeline as pl
from domain import run as rn
from infra.broker.cursor import cursor_token
from infra.store.records import FeedCursor, RecordedEvent
from projections.views import pipeline_view, run_view

_encoder = msgspec.json.Encoder()


def control(event: str, data: dict[str, Any]) -> bytes:
    """A frame about the session itself (subscribed, unsubscribed, error), not about an event."""
    return _encoder.encode({"event": event, "data": data})


class Envelope(msgspec.Struct):
    """An event frame read back with its payload left encoded (for another protocol to reuse)."""

    event: str
    data: msgspec.Raw
    position: int
    cursor: str


_envelope = msgspec.json.Decoder(Envelope)


def envelope(frame: bytes) -> Envelope:
    return _envelope.decode(frame)


def run_frame(state: rn.RunState, logs: list[rn.LogAppended], cursor: FeedCursor) -> bytes:
    view = run_view(state, logs)
    return _event("pipeline.run.updated", view, cursor)


def pipeline_frame(state: pl.PipelineState, cursor: FeedCursor) -> bytes:
    name = "pipeline.deleted" if state.deleted else "pipeline.updated"
    return _event(name, pipeline_view(state), cursor)


def _event(name: str, data: Any, cursor: FeedCursor) -> bytes:
    return _encoder.encode({"event": name, "data": data, "position": cursor[1], "cursor": cursor_token(cursor)})


def log_frames(run_id: str, rec: RecordedEvent) -> tuple[bytes, ...]:
    """One frame per line of a log chunk."""
    e = rec.event
    if not isinstance(e, rn.LogAppended):
        return ()
    where: dict[str, str | None] = {"runId": run_id, "stage": e.stage_id}
    if e.job is not None:  # inside a stage of jobs
        where["job"], where["step"] = e.job, e.step
    return tuple(_event("pipeline.log", {**where, "message": line.text}, rec.cursor) for line in e.lines)


def wire(frames: tuple[bytes, ...]) -> bytes:
    """The frames as unmasked, unfragmented WebSocket text frames, back to back (RFC 6455 5.2)."""
    out = bytearray()
    for payload in frames:
        n = len(payload)
        if n < 126:
            out += bytes((0x81, n))
        elif n < 1 << 16:
            out += bytes((0x81, 126)) + n.to_bytes(2, "big")
        else:
            out += bytes((0x81, 127)) + n.to_bytes(8, "big")
        out += payload
    return bytes(out)
