"""The NATS part: one channel per stored event type (JetStream), live logs and notifications (core)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from infra.asyncapi.schemas import LOG_CHUNK, NOTIFICATION, TRUNCATED_EVENT, aggregate_of, event_type_of
from infra.broker.relay import headers_for
from infra.store.records import RecordedEvent

NATS_SERVER = {"$ref": "#/servers/nats"}

# Every header the relay sets; a header without a line here is documented as "undocumented" and
# fails tests/unit/test_asyncapi.py.
HEADER_DOCS: dict[str, str] = {
    "Nats-Msg-Id": "the event id: JetStream drops a duplicate published within its window",
    "ce-specversion": "CloudEvents binary mode: always 1.0",
    "ce-id": "CloudEvents id: the event id",
    "ce-type": "CloudEvents type: `pipelines.` and the event type",
    "ce-source": "CloudEvents source: /organizations/<org>/<aggregate>s/<id>",
    "ce-time": "CloudEvents time: when the event was recorded (ISO 8601)",
    "ce-subject": "CloudEvents subject: the event's stream, <aggregate>-<id>",
    "ce-datacontenttype": "CloudEvents data content type: application/json",
    "Pipelines-Position": "the event's global position in the store (decimal)",
    "Pipelines-Tx": "the id of the transaction that stored it (decimal); the feed is ordered by (tx, position)",
    "Pipelines-Stream-Version": "the event's version within its stream (decimal, from 1)",
    "Pipelines-Cursor": (
        "the event's place in delivery order: 32 hex digits that sort as the feed does (by transaction, then"
        " position); keep this one as a high-water mark and resume from it, never from Pipelines-Position,"
        " which can go down when commits land out of position order"
    ),
}
UNDOCUMENTED = "undocumented"
_FIXED = {"ce-specversion": "1.0", "ce-datacontenttype": "application/json"}
_NUMERIC = {"Pipelines-Position", "Pipelines-Tx", "Pipelines-Stream-Version"}
_PATTERNS = {"Pipelines-Cursor": "^[0-9a-f]{32}$"}


def header_names() -> list[str]:
    """The headers of a published event, as the relay sets them (read from the relay itself)."""
    sample = RecordedEvent(
        position=1,
        tx_id=1,
        stream_id="run-x",
        stream_version=1,
        event_id="e",
        event_type="run_started",
        data=b"{}",
        org=None,
        pipeline_id=None,
        run_id=None,
        recorded_at=datetime(2026, 1, 1, tzinfo=UTC),
    )
    return list(headers_for(sample))


def event_headers(event_type: str) -> dict[str, Any]:
    props: dict[str, Any] = {}
    for name in header_names():
        prop: dict[str, Any] = {"type": "string", "description": HEADER_DOCS.get(name, UNDOCUMENTED)}
        if name in _FIXED:
            prop["const"] = _FIXED[name]
        elif name == "ce-type":
            prop["const"] = f"pipelines.{event_type}"
        elif name in _NUMERIC:
            prop["pattern"] = "^[0-9]+$"
        elif name in _PATTERNS:
            prop["pattern"] = _PATTERNS[name]
        props[name] = prop
    return {"type": "object", "properties": props, "required": list(props)}


def event_channels(payloads: dict[type[Any], dict[str, Any]]) -> tuple[dict[str, Any], ...]:
    """(channels, operations, messages) of every stored event type."""
    channels: dict[str, Any] = {}
    operations: dict[str, Any] = {}
    messages: dict[str, Any] = {}
    for cls, ref in payloads.items():
        if not hasattr(cls, "__struct_config__") or cls.__struct_config__.tag is None:
            continue  # a view, not an event
        etype = event_type_of(cls)
        aggregate = aggregate_of(cls)
        key = f"event.{etype}"
        messages[key] = {
            "name": etype,
            "title": cls.__name__,
            "summary": (cls.__doc__ or f"{cls.__name__} event").strip().splitlines()[0],
            "contentType": "application/json",
            "headers": event_headers(etype),
            "payload": {"oneOf": [ref, {"$ref": "#/components/schemas/TruncatedEvent"}]},
        }
        channels[key] = {
            "address": f"pipelines.v1.{{org}}.{aggregate}.{{id}}.{etype}",
            "title": f"{aggregate} events: {etype}",
            "description": f"JetStream stream PIPELINES_EVENTS (PIPELINES_EVENTS_STREAM); follow "
            f"`pipelines.v1.*.{aggregate}.>` for every {aggregate} event.",
            "servers": [NATS_SERVER],
            "parameters": {
                "org": {"description": "the organization id as a subject token (`_` when none)"},
                "id": {"description": f"the {aggregate} id as a subject token"},
            },
            "messages": {etype: {"$ref": f"#/components/messages/{key}"}},
        }
        operations[f"publish.{etype}"] = {
            "action": "send",
            "summary": f"the relay publishes every stored {etype} event, in feed order, once",
            "channel": {"$ref": f"#/channels/{key}"},
            "messages": [{"$ref": f"#/channels/{key}/messages/{etype}"}],
        }
    return channels, operations, messages


def core_channels() -> tuple[dict[str, Any], ...]:
    """(channels, operations, messages, schemas) of live logs and notifications."""
    org = {"description": "the organization id as a subject token (`_` when none)"}
    channels = {
        "logs": {
            "address": "pipelines.logs.v1.{org}.{runId}",
            "title": "live log chunks",
            "description": "Core NATS (not kept): each chunk of a run's log once it is stored.",
            "servers": [NATS_SERVER],
            "parameters": {"org": org, "runId": {"description": "the run id as a subject token"}},
            "messages": {"logChunk": {"$ref": "#/components/messages/logChunk"}},
        },
        "notifications": {
            "address": "pipelines.notify.v1.{org}.{channel}",
            "title": "notifications",
            "description": "Core NATS (not kept): every notify stage's message, whether or not a notifier is "
            "configured for the channel.",
            "servers": [NATS_SERVER],
            "parameters": {
                "org": org,
                "channel": {
                    "description": "the channel name as a subject token: a leading `#` dropped, characters "
                    "outside A-Za-z0-9_- replaced by `_` (`#deploys` is `deploys`)"
                },
            },
            "messages": {"notification": {"$ref": "#/components/messages/notification"}},
        },
    }
    operations = {
        "publish.logs": {
            "action": "send",
            "summary": "the executor publishes each stored log chunk",
            "channel": {"$ref": "#/channels/logs"},
            "messages": [{"$ref": "#/channels/logs/messages/logChunk"}],
        },
        "publish.notifications": {
            "action": "send",
            "summary": "the executor publishes each notify stage's message",
            "channel": {"$ref": "#/channels/notifications"},
            "messages": [{"$ref": "#/channels/notifications/messages/notification"}],
        },
    }
    messages = {
        "logChunk": {
            "name": "logChunk",
            "contentType": "application/json",
            "payload": {"$ref": "#/components/schemas/LogChunk"},
        },
        "notification": {
            "name": "notification",
            "contentType": "application/json",
            "payload": {"$ref": "#/components/schemas/Notification"},
        },
    }
    schemas = {"LogChunk": LOG_CHUNK, "Notification": NOTIFICATION, "TruncatedEvent": TRUNCATED_EVENT}
    return channels, operations, messages, schemas
