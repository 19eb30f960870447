"""JSON Schemas (draft 07, the dialect AsyncAPI 3 reads) generated from the msgspec types, so the
documented payloads are the ones the code encodes."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, get_args

import msgspec

from domain import events as ev
from domain.run import LogAppended
from projections.views import PipelineView, RunView

REF = "#/components/schemas/{name}"

# Every stored event type, in the order of the union.
EVENT_TYPES: tuple[type[Any], ...] = get_args(ev.Event)


def event_type_of(cls: type[Any]) -> str:
    tag = cls.__struct_config__.tag
    assert isinstance(tag, str)
    return tag


def aggregate_of(cls: type[Any]) -> str:
    """The subject's aggregate token of an event type: the kind of stream it is stored on."""
    if cls is LogAppended:  # a run's log chunks have a stream of their own
        return "runlog"
    for aggregate, members in (
        ("pipeline", ev.PIPELINE_EVENTS),
        ("run", ev.RUN_EVENTS),
        ("deployment", ev.DEPLOYMENT_EVENTS),
    ):
        if cls in members:
            return aggregate
    raise ValueError(f"event type {cls.__name__} belongs to no aggregate")


def draft07(node: Any) -> Any:
    """msgspec writes 2020-12 (`prefixItems`, `$defs`); AsyncAPI 3 schemas are draft 07. Tuples
    (defaults of tuple fields) become lists: the document is plain JSON."""
    if isinstance(node, list | tuple):
        return [draft07(x) for x in node]
    if not isinstance(node, dict):
        return node
    out = {k: draft07(v) for k, v in node.items()}
    if "prefixItems" in out:
        closed = out.get("items") is False
        out["items"] = out.pop("prefixItems")
        if closed:
            out["additionalItems"] = False
    return out


def components(types: Sequence[type[Any]]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The schema of each type (a `$ref`) and every named component they need."""
    refs, named = msgspec.json.schema_components(types, ref_template=REF)
    return [draft07(r) for r in refs], {name: draft07(s) for name, s in named.items()}


def model_components() -> tuple[dict[type[Any], dict[str, Any]], dict[str, Any]]:
    """`$ref` schemas of every event type and of the views the gateway frames carry."""
    types: list[type[Any]] = [*EVENT_TYPES, RunView, PipelineView]
    refs, named = components(types)
    return dict(zip(types, refs, strict=True)), named


# A stored event larger than a NATS message is published as this stub (infra.broker.relay.body_for).
TRUNCATED_EVENT: dict[str, Any] = {
    "title": "TruncatedEvent",
    "description": "Published instead of an event too large for one NATS message: read it from the API.",
    "type": "object",
    "properties": {
        "type": {"type": "string", "description": "the event type"},
        "truncated": {"enum": [True]},
        "size": {"type": "integer", "description": "the event's size in bytes"},
        "position": {"type": "integer"},
        "streamId": {"type": "string"},
        "streamVersion": {"type": "integer"},
    },
    "required": ["type", "truncated", "size", "position", "streamId", "streamVersion"],
}

_NULLABLE_STRING: dict[str, Any] = {"type": ["string", "null"]}

LOG_CHUNK: dict[str, Any] = {
    "title": "LogChunk",
    "description": "Lines of a run's log as they are stored (core NATS, not kept).",
    "type": "object",
    "properties": {
        "runId": {"type": "string"},
        "stage": {**_NULLABLE_STRING, "description": "the stage id; null for lines of the run itself"},
        "job": {**_NULLABLE_STRING, "description": "inside a stage of jobs: the job"},
        "step": {**_NULLABLE_STRING, "description": "inside a stage of jobs: the step"},
        "lines": {
            "type": "array",
            "items": {
                "type": "object",
                "properties": {
                    "stream": {"enum": ["stdout", "stderr", "system"]},
                    "text": {"type": "string"},
                },
                "required": ["stream", "text"],
            },
        },
    },
    "required": ["runId", "stage", "lines"],
}

NOTIFICATION: dict[str, Any] = {
    "title": "Notification",
    "description": "What a notify stage sends, also the body of a generic webhook channel.",
    "type": "object",
    "properties": {
        "channel": {"type": "string", "description": "the channel's name as written in the stage"},
        "message": {"type": "string"},
        "runId": {"type": "string"},
        "pipelineId": {"type": "string"},
        "pipelineName": {"type": "string"},
        "organizationId": _NULLABLE_STRING,
        "status": {"type": "string", "description": "the run's status when the stage ran"},
        "sentAt": {"type": "string", "format": "date-time"},
    },
    "required": ["channel", "message", "runId", "pipelineId", "pipelineName", "organizationId", "status", "sentAt"],
}
