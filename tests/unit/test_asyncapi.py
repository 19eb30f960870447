"""The AsyncAPI document: valid AsyncAPI 3, and every event type, header and frame the code emits in it."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any, get_args

import jsonschema
import pytest

from domain import events as ev
from domain.run import LogAppended, LogLine
from infra.asyncapi import asyncapi_document
from infra.asyncapi.nats import UNDOCUMENTED
from infra.broker.relay import headers_for
from infra.gateway import frames
from infra.gateway.protocol import parse_request
from infra.store.records import RecordedEvent
from tests.asyncapi_support import check, check_nats_message, official_schema, resolve

AT = datetime(2026, 3, 1, tzinfo=UTC)


def _walk(node: Any) -> Any:
    if isinstance(node, dict):
        yield node
        for v in node.values():
            yield from _walk(v)
    elif isinstance(node, list):
        for v in node:
            yield from _walk(v)


def _recorded(event: ev.Event, stream_id: str = "runlog-r1") -> RecordedEvent:
    return RecordedEvent(
        position=7,
        tx_id=3,
        stream_id=stream_id,
        stream_version=2,
        event_id="ev-1",
        event_type=ev.event_type(event),
        data=ev.encode(event),
        org="acme",
        pipeline_id="p1",
        run_id="r1",
        recorded_at=datetime(2026, 3, 1, tzinfo=UTC),
    )


def test_the_document_is_valid_against_the_official_asyncapi_3_schema() -> None:
    schema = official_schema()
    doc = asyncapi_document()
    assert doc["asyncapi"] == "3.0.0"
    errors = [
        f"{list(e.absolute_path)}: {e.message[:200]}" for e in jsonschema.Draft7Validator(schema).iter_errors(doc)
    ]
    assert errors == []


def test_the_official_schema_check_refuses_a_broken_document() -> None:
    """The check is not vacuous: a wrong operation action and a channel address that is not a string fail."""
    broken = json.loads(json.dumps(asyncapi_document()))
    broken["operations"]["publish.logs"]["action"] = "publish"  # AsyncAPI 2 wording
    broken["channels"]["logs"]["address"] = 5
    errors = list(jsonschema.Draft7Validator(official_schema()).iter_errors(broken))
    assert {tuple(e.absolute_path)[:2] for e in errors} == {("operations", "publish.logs"), ("channels", "logs")}


def test_every_local_reference_resolves() -> None:
    doc = asyncapi_document()
    refs = [n["$ref"] for n in _walk(doc) if isinstance(n.get("$ref"), str)]
    assert refs
    for ref in refs:
        resolve(doc, ref)


def test_every_stored_event_type_has_a_channel_with_its_generated_payload_schema() -> None:
    doc = asyncapi_document()
    for cls in get_args(ev.Event):
        tag = cls.__struct_config__.tag
        channel = doc["channels"][f"event.{tag}"]
        assert channel["address"].startswith("pipelines.v1.{org}.") and channel["address"].endswith(f".{{id}}.{tag}")
        message = resolve(doc, channel["messages"][tag]["$ref"])
        assert {"$ref": f"#/components/schemas/{cls.__name__}"} in message["payload"]["oneOf"]
        schema = doc["components"]["schemas"][cls.__name__]
        assert schema["properties"]["type"] == {"enum": [tag]}  # the tag msgspec writes


def test_every_header_the_relay_sets_is_documented() -> None:
    rec = _recorded(LogAppended(stage_id="s", lines=(LogLine("stdout", "hi"),), at=AT))
    headers = headers_for(rec)
    doc = asyncapi_document()
    message = doc["components"]["messages"]["event.log_appended"]
    documented = message["headers"]["properties"]
    assert set(documented) == set(headers)
    assert [name for name, prop in documented.items() if prop["description"] == UNDOCUMENTED] == []
    assert check_nats_message("pipelines.v1.acme.runlog.r1.log_appended", headers, rec.data) == "event.log_appended"


def test_a_header_that_contradicts_the_document_is_refused() -> None:
    rec = _recorded(LogAppended(stage_id=None, lines=(), at=AT))
    headers = {**headers_for(rec), "ce-type": "pipelines.run_started"}
    with pytest.raises(jsonschema.ValidationError):
        check_nats_message("pipelines.v1.acme.runlog.r1.log_appended", headers, rec.data)


def test_a_truncated_event_stub_matches_the_document() -> None:
    stub = {"type": "run_triggered", "truncated": True, "size": 2_000_000, "position": 9, "streamId": "run-r1"}
    stub["streamVersion"] = 1
    rec = _recorded(LogAppended(stage_id=None, lines=(), at=AT), stream_id="run-r1")
    headers = {**headers_for(rec), "ce-type": "pipelines.run_triggered"}
    check_nats_message("pipelines.v1.acme.run.r1.run_triggered", headers, json.dumps(stub).encode())


def test_the_gateway_frames_match_the_websocket_messages() -> None:
    doc = asyncapi_document()
    schemas = doc["components"]["schemas"]
    chunk = LogAppended(stage_id="build", lines=(LogLine("stdout", "a"), LogLine("stderr", "b")), at=AT, job="j")
    for frame in frames.log_frames("r1", _recorded(chunk)):
        check(doc, schemas["WsLog"], json.loads(frame))
    subscribed = frames.control("subscribed", {"channel": "runs", "params": {"runId": "r1"}, "fromPosition": 0})
    check(doc, schemas["WsSubscribed"], json.loads(subscribed))
    check(doc, schemas["WsError"], json.loads(frames.control("error", {"message": "no", "channel": "x"})))
    with pytest.raises(jsonschema.ValidationError):
        check(doc, schemas["WsSubscribed"], json.loads(frames.control("error", {"message": "no"})))


@pytest.mark.parametrize(
    "frame",
    [
        {"action": "subscribe", "channel": "runs", "params": {"runId": "r1"}, "fromPosition": 0},
        {"action": "subscribe", "channel": "logs", "params": {"pipelineId": "p1"}},
        {"action": "unsubscribe", "channel": "pipelines"},
    ],
)
def test_documented_client_frames_are_accepted_by_the_gateway(frame: dict[str, Any]) -> None:
    doc = asyncapi_document()
    name = "WsSubscribe" if frame["action"] == "subscribe" else "WsUnsubscribe"
    check(doc, doc["components"]["schemas"][name], frame)
    parse_request(json.dumps(frame), {})


def test_a_frame_the_gateway_refuses_is_outside_the_document() -> None:
    doc = asyncapi_document()
    with pytest.raises(jsonschema.ValidationError):
        check(doc, doc["components"]["schemas"]["WsSubscribe"], {"action": "subscribe", "channel": "everything"})
