"""Checks every request's text before a handler sees it: no NUL or unpaired surrogate in a path
parameter, a query parameter or a JSON body's strings, JSON no deeper than the limit, bodies no
larger than the limit. Each refusal is a 400 (413 for size) naming the field."""

from __future__ import annotations

from typing import Any
from urllib.parse import parse_qsl, unquote_to_bytes

import msgspec
from litestar.enums import ScopeType
from litestar.types import (
    ASGIApp,
    HTTPRequestEvent,
    HTTPResponseBodyEvent,
    HTTPResponseStartEvent,
    Receive,
    ReceiveMessage,
    Scope,
    Send,
)

from infra.http.errors import error_body

_encoder = msgspec.json.Encoder()


class Refusal(Exception):
    def __init__(self, status: int, message: str, errors: list[dict[str, str]] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.errors = errors


def text_problem(value: str) -> str | None:
    """Why `value` cannot be stored or passed on as text (None: it can)."""
    if "\0" in value:
        return "must not contain NUL characters"
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return "must be valid Unicode text (no unpaired surrogates)"
    return None


def _field(path: str, problem: str) -> Refusal:
    return Refusal(400, f"{path}: {problem}", [{"path": path, "message": problem}])


def json_depth(raw: bytes, limit: int) -> bool:
    """Whether the JSON text nests arrays/objects more than `limit` deep (strings skipped)."""
    depth = 0
    in_string = escaped = False
    for byte in raw:
        if in_string:
            if escaped:
                escaped = False
            elif byte == 0x5C:  # backslash
                escaped = True
            elif byte == 0x22:
                in_string = False
        elif byte == 0x22:
            in_string = True
        elif byte in (0x5B, 0x7B):
            depth += 1
            if depth > limit:
                return True
        elif byte in (0x5D, 0x7D):
            depth -= 1
    return False


def bad_text(value: Any, path: str = "") -> tuple[str, str] | None:
    """The first (field path, problem) of a decoded JSON value's strings, keys included."""
    if isinstance(value, str):
        problem = text_problem(value)
        return (path or "body", problem) if problem is not None else None
    if isinstance(value, dict):
        for key, item in value.items():
            if isinstance(key, str) and (problem := text_problem(key)) is not None:
                return path or "body", f"a key {problem}"
            if (found := bad_text(item, f"{path}.{key}" if path else str(key))) is not None:
                return found
    elif isinstance(value, list):
        for i, item in enumerate(value):
            if (found := bad_text(item, f"{path}[{i}]")) is not None:
                return found
    return None


def check_query(raw: bytes) -> None:
    for name, value in parse_qsl(raw.decode("latin-1"), keep_blank_values=True, encoding="latin-1"):
        for part, what in ((name, "query parameter name"), (value, name)):
            try:
                text = unquote_to_bytes(part.encode("latin-1")).decode("utf-8")
            except UnicodeDecodeError:
                raise _field(_printable(name), "must be valid UTF-8 text") from None
            if (problem := text_problem(text)) is not None:
                raise _field(_printable(name) if what == name else "query", problem)


def _printable(name: str) -> str:
    return name.encode("latin-1", "replace").decode("utf-8", "replace").replace("\0", "\\0")


_NOT_JSON = ("application/x-www-form-urlencoded", "multipart/")


def check_body(raw: bytes, content_type: str, max_depth: int) -> None:
    # Handlers decode JSON whatever the Content-Type says, so only a declared form is skipped.
    if content_type.startswith(_NOT_JSON) or not raw.strip():
        return
    if json_depth(raw, max_depth):
        raise Refusal(
            400,
            f"body: JSON nested deeper than {max_depth} levels (PIPELINES_MAX_JSON_DEPTH)",
            [{"path": "body", "message": f"is nested deeper than the limit of {max_depth} levels"}],
        )
    try:
        decoded = msgspec.json.decode(raw)
    except msgspec.DecodeError:
        return  # the handler answers its own "is not valid JSON"
    if (found := bad_text(decoded)) is not None:
        raise _field(*found)


class InputChecks:
    """ASGI middleware (per route: litestar has parsed the path parameters already)."""

    def __init__(self, app: ASGIApp, *, max_body_bytes: int, max_json_depth: int) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes
        self.max_json_depth = max_json_depth

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != ScopeType.HTTP:
            await self.app(scope, receive, send)
            return
        try:
            for name, value in (scope.get("path_params") or {}).items():
                if isinstance(value, str) and (problem := text_problem(value)) is not None:
                    raise _field(name, problem)
            check_query(scope.get("query_string", b""))
            body = await self._read(receive)
            content_type = dict(scope.get("headers") or []).get(b"content-type", b"")
            check_body(body, content_type.decode("latin-1").lower(), self.max_json_depth)
        except Refusal as exc:
            answer = _encoder.encode(error_body(exc.status, str(exc), exc.errors))
            start: HTTPResponseStartEvent = {
                "type": "http.response.start",
                "status": exc.status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(answer)).encode())],
            }
            end: HTTPResponseBodyEvent = {"type": "http.response.body", "body": answer, "more_body": False}
            await send(start)
            await send(end)
            return
        sent = False

        async def replay() -> ReceiveMessage:
            nonlocal sent
            if not sent:
                sent = True
                event: HTTPRequestEvent = {"type": "http.request", "body": body, "more_body": False}
                return event
            return await receive()

        await self.app(scope, replay, send)

    async def _read(self, receive: Receive) -> bytes:
        chunks: list[bytes] = []
        size = 0
        while True:
            message = await receive()
            if message["type"] != "http.request":
                break
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.max_body_bytes:
                raise Refusal(413, f"the body is larger than {self.max_body_bytes} bytes (PIPELINES_MAX_BODY_BYTES)")
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        return b"".join(chunks)
