"""What clients send: channels and scopes, and the validation of a subscribe/unsubscribe frame."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import msgspec

from infra.broker.cursor import parse_cursor_token
from infra.store.records import FeedCursor

Channel = Literal["runs", "logs", "pipelines"]
Scope = Literal["run", "pipeline", "org"]
CHANNELS: tuple[Channel, ...] = ("runs", "logs", "pipelines")
# The channel that carries each stream kind.
STREAM_KIND: dict[str, Channel] = {"run": "runs", "runlog": "logs", "pipeline": "pipelines"}


class BadRequest(Exception):
    """A client frame the gateway refuses; its message goes back in an `error` frame."""


@dataclass(frozen=True, slots=True)
class Request:
    action: Literal["subscribe", "unsubscribe"]
    channel: Channel
    params: dict[str, str]  # pipelineId and/or runId
    from_position: int | None
    from_cursor: FeedCursor | None = None


def parse_request(message: str | bytes, echo: dict[str, Any]) -> Request:
    """The request in a client frame, or BadRequest. Fills `echo` with the channel and params as
    sent, as far as they could be read, for the error frame to repeat."""
    try:
        frame = msgspec.json.decode(message)
    except msgspec.DecodeError:
        raise BadRequest("frame must be a JSON object") from None
    if not isinstance(frame, dict):
        raise BadRequest("frame must be a JSON object")
    action = frame.get("action")
    channel = frame.get("channel")
    raw_params = frame.get("params")
    if isinstance(channel, str):
        echo["channel"] = channel
    if isinstance(raw_params, dict):
        echo["params"] = raw_params
    if action not in ("subscribe", "unsubscribe"):
        raise BadRequest("action must be 'subscribe' or 'unsubscribe'")
    if channel not in CHANNELS:
        raise BadRequest("channel must be 'runs', 'logs' or 'pipelines'")
    if raw_params is None:
        raw_params = {}
    if not isinstance(raw_params, dict):
        raise BadRequest("params must be an object")
    unknown = sorted(set(raw_params) - {"pipelineId", "runId"})
    if unknown:
        raise BadRequest(f"unknown params: {', '.join(unknown)}")
    run_id = _str_param(raw_params, "runId")
    pipeline_id = _str_param(raw_params, "pipelineId")
    if channel == "pipelines" and run_id is not None:
        raise BadRequest("the pipelines channel takes no runId")
    from_position = frame.get("fromPosition")
    if from_position is not None and (
        isinstance(from_position, bool) or not isinstance(from_position, int) or from_position < 0
    ):
        raise BadRequest("fromPosition must be a non-negative integer")
    raw_cursor = frame.get("fromCursor")
    from_cursor = None if raw_cursor is None else parse_cursor_token(raw_cursor)
    if raw_cursor is not None and from_cursor is None:
        raise BadRequest("fromCursor must be a cursor received in a frame (32 hex digits)")
    if from_cursor is not None and from_position is not None:
        raise BadRequest("give fromCursor or fromPosition, not both")
    params = {k: v for k, v in (("pipelineId", pipeline_id), ("runId", run_id)) if v is not None}
    return Request(action, channel, params, from_position, from_cursor)


def _str_param(params: dict[str, Any], name: str) -> str | None:
    value = params.get(name)
    if value is None:
        return None
    if not isinstance(value, str) or not 1 <= len(value) <= 200:
        raise BadRequest(f"params.{name} must be a string of 1-200 characters")
    return value
