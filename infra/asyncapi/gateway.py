"""The gateway's protocols: the raw WebSocket at /api/v1/ws and the Socket.IO namespace /events."""

from __future__ import annotations

from typing import Any

from infra.gateway.protocol import CHANNELS

WS_SERVER = {"$ref": "#/servers/gateway"}
SIO_SERVER = {"$ref": "#/servers/gatewaySocketIO"}
RUN_VIEW = {"$ref": "#/components/schemas/RunView"}
PIPELINE_VIEW = {"$ref": "#/components/schemas/PipelineView"}

_ID = {"type": "string", "minLength": 1, "maxLength": 200}
_PARAMS: dict[str, Any] = {
    "type": "object",
    "description": "narrow to a pipeline and/or a run; none: the whole organization",
    "properties": {"pipelineId": _ID, "runId": _ID},
    "additionalProperties": False,
}
_POSITION = {"type": "integer", "minimum": 0}
_CURSOR = {"type": "string", "pattern": "^[0-9a-f]{32}$"}
_LOG_LINE: dict[str, Any] = {
    "type": "object",
    "properties": {
        "runId": {"type": "string"},
        "stage": {"type": ["string", "null"]},
        "job": {"type": ["string", "null"], "description": "inside a stage of jobs: the job"},
        "step": {"type": ["string", "null"], "description": "inside a stage of jobs: the step"},
        "message": {"type": "string", "description": "one line of output"},
    },
    "required": ["runId", "stage", "message"],
}


def _frame(event: str, data: dict[str, Any], *, position: bool) -> dict[str, Any]:
    props: dict[str, Any] = {"event": {"const": event}, "data": data}
    if position:
        props["position"] = {**_POSITION, "description": "the event's store position (can go down in delivery order)"}
        props["cursor"] = {**_CURSOR, "description": "the resume token (fromCursor): only goes up in delivery order"}
    return {"type": "object", "properties": props, "required": list(props)}


def _request(action: str) -> dict[str, Any]:
    props: dict[str, Any] = {
        "action": {"const": action},
        "channel": {"enum": list(CHANNELS)},
        "params": _PARAMS,
    }
    if action == "subscribe":
        props["fromPosition"] = {
            **_POSITION,
            "description": "replay from this position (0: from the start), then continue live; omitted: live only",
        }
        props["fromCursor"] = {
            **_CURSOR,
            "description": "replay what came after this frame's cursor, then continue live (not with fromPosition)",
        }
    return {"type": "object", "properties": props, "required": ["action", "channel"]}


WS_SCHEMAS: dict[str, Any] = {
    "WsSubscribe": _request("subscribe"),
    "WsUnsubscribe": _request("unsubscribe"),
    "WsRunUpdated": _frame("pipeline.run.updated", RUN_VIEW, position=True),
    "WsLog": _frame("pipeline.log", _LOG_LINE, position=True),
    "WsPipelineUpdated": _frame("pipeline.updated", PIPELINE_VIEW, position=True),
    "WsPipelineDeleted": _frame("pipeline.deleted", PIPELINE_VIEW, position=True),
    "WsSubscribed": _frame(
        "subscribed",
        {
            "type": "object",
            "properties": {
                "channel": {"enum": list(CHANNELS)},
                "params": _PARAMS,
                "fromPosition": _POSITION,
                "fromCursor": _CURSOR,
            },
            "required": ["channel", "params"],
        },
        position=False,
    ),
    "WsUnsubscribed": _frame(
        "unsubscribed",
        {
            "type": "object",
            "properties": {"channel": {"enum": list(CHANNELS)}, "params": _PARAMS},
            "required": ["channel", "params"],
        },
        position=False,
    ),
    "WsError": _frame(
        "error",
        {
            "type": "object",
            "description": "a refused frame: the reason, and the channel and params as sent",
            "properties": {"message": {"type": "string"}, "channel": {}, "params": {}},
            "required": ["message"],
        },
        position=False,
    ),
    "SioLog": _LOG_LINE,
    "SioSubscribe": {
        "description": "narrow what this connection receives to one run or one pipeline",
        "oneOf": [
            {"type": "object", "properties": {"runId": _ID, "fromCursor": _CURSOR}, "required": ["runId"]},
            {"type": "object", "properties": {"pipelineId": _ID, "fromCursor": _CURSOR}, "required": ["pipelineId"]},
        ],
    },
    "SioAck": {"type": "object", "description": "the acknowledgement of a subscribe emit"},
}

_CLIENT_FRAMES = ("WsSubscribe", "WsUnsubscribe")
_SERVER_FRAMES = tuple(name for name in WS_SCHEMAS if name.startswith("Ws") and name not in _CLIENT_FRAMES)


def _message(name: str, schema: str, summary: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {
        "name": name,
        "contentType": "application/json",
        "payload": {"$ref": f"#/components/schemas/{schema}"},
    }
    if summary:
        out["summary"] = summary
    return out


def websocket_parts() -> tuple[dict[str, Any], ...]:
    """(channels, operations, messages, schemas) of the WebSocket and Socket.IO protocols."""
    messages: dict[str, Any] = {
        f"ws.{name[2].lower()}{name[3:]}": _message(name[2:], name) for name in (*_CLIENT_FRAMES, *_SERVER_FRAMES)
    }
    messages.update(
        {
            "sio.runUpdated": _message("pipeline.run.updated", "RunView", "the whole run after each of its events"),
            "sio.log": _message("pipeline.log", "SioLog", "one line of a run's output"),
            "sio.subscribe": _message("subscribe", "SioSubscribe", "narrow to a run or a pipeline (acknowledged)"),
            "sio.ack": _message("ack", "SioAck"),
        }
    )
    ws_messages = {key: {"$ref": f"#/components/messages/{key}"} for key in messages if key.startswith("ws.")}
    sio_messages = {key: {"$ref": f"#/components/messages/{key}"} for key in messages if key.startswith("sio.")}
    channels = {
        "websocket": {
            "address": "/api/v1/ws",
            "title": "the gateway's WebSocket",
            "description": "Token in the Authorization header (Bearer) or `?token=`; viewer role or above, else "
            "the handshake is a 403; closed with 1008 `token expired` when the token's exp passes. Subscribe to "
            "`runs`, `logs` or `pipelines` of the organization, a pipeline or a run; `fromPosition` replays "
            "what was missed, then continues live with no gap and no duplicate.",
            "servers": [WS_SERVER],
            "messages": ws_messages,
            "bindings": {
                "ws": {
                    "method": "GET",
                    "query": {"type": "object", "properties": {"token": {"type": "string"}}},
                    "headers": {"type": "object", "properties": {"Authorization": {"type": "string"}}},
                }
            },
        },
        "socketio": {
            "address": "/events",
            "title": "the Socket.IO namespace /events",
            "description": "Socket.IO (Engine.IO 4) at the default path /socket.io/ of the gateway's port. The "
            "token goes in the handshake's auth (`{token}`) or `?token=`. After connecting, a client receives "
            "`pipeline.run.updated` and `pipeline.log` for every run of its organization its role may read; a "
            "`subscribe` emit (`{runId}` or `{pipelineId}`, acknowledged) narrows that.",
            "servers": [SIO_SERVER],
            "messages": sio_messages,
        },
    }

    def refs(channel: str, keys: list[str]) -> list[dict[str, str]]:
        return [{"$ref": f"#/channels/{channel}/messages/{key}"} for key in keys]

    server_frames = [k for k in ws_messages if k not in ("ws.subscribe", "ws.unsubscribe")]
    operations = {
        "websocket.request": {
            "action": "receive",
            "summary": "subscribe and unsubscribe frames from the client",
            "channel": {"$ref": "#/channels/websocket"},
            "messages": refs("websocket", ["ws.subscribe", "ws.unsubscribe"]),
        },
        "websocket.frames": {
            "action": "send",
            "summary": "run, log and pipeline frames of the subscriptions, and the answers to requests",
            "channel": {"$ref": "#/channels/websocket"},
            "messages": refs("websocket", server_frames),
        },
        "socketio.subscribe": {
            "action": "receive",
            "summary": "a client narrows its connection to a run or a pipeline",
            "channel": {"$ref": "#/channels/socketio"},
            "messages": refs("socketio", ["sio.subscribe"]),
            "reply": {"channel": {"$ref": "#/channels/socketio"}, "messages": refs("socketio", ["sio.ack"])},
        },
        "socketio.events": {
            "action": "send",
            "summary": "run updates and log lines",
            "channel": {"$ref": "#/channels/socketio"},
            "messages": refs("socketio", ["sio.runUpdated", "sio.log"]),
        },
    }
    return channels, operations, messages, dict(WS_SCHEMAS)
