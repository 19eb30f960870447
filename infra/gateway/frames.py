"""The server's frames: JSON encoding of each event kind, and their WebSocket wire bytes."""

from __future__ import annotations

from typing import Any

import msgspec

from domain import pipeline as pl
from domain import run as rn
from infra.store.records import RecordedEvent
from projections.views import pipeline_view, run_view

_encoder = msgspec.json.Encoder()


def control(event: str, data: dict[str, Any]) -> bytes:
    """A frame about the session itself (subscribed, unsubscribed, error), not about an event."""
    return _encoder.encode({"event": event, "data": data})


def run_frame(state: rn.RunState, logs: list[rn.LogAppended], position: int) -> bytes:
    view = run_view(state, logs)
    return _encoder.encode({"event": "pipeline.run.updated", "data": view, "position": position})


def pipeline_frame(state: pl.PipelineState, position: int) -> bytes:
    name = "pipeline.deleted" if state.deleted else "pipeline.updated"
    return _encoder.encode({"event": name, "data": pipeline_view(state), "position": position})


def log_frames(run_id: str, rec: RecordedEvent) -> tuple[bytes, ...]:
    """One frame per line of a log chunk."""
    e = rec.event
    if not isinstance(e, rn.LogAppended):
        return ()
    where: dict[str, str | None] = {"runId": run_id, "stage": e.stage_id}
    if e.job is not None:  # inside a stage of jobs
        where["job"], where["step"] = e.job, e.step
    return tuple(
        _encoder.encode({"event": "pipeline.log", "data": {**where, "message": line.text}, "position": rec.position})
        for line in e.lines
    )


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
