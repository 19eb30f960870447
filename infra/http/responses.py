"""JSON in and out of handlers that build their responses themselves."""

from __future__ import annotations

from typing import Any

import msgspec
from litestar import Response

from domain.errors import Invalid

_encoder = msgspec.json.Encoder()


def json_response(status: int, body: Any) -> Response[bytes]:
    return Response(content=_encoder.encode(body), status_code=status, media_type="application/json")


def decode_json(raw: bytes, kind: type[Any], *, optional: bool = False) -> Any:
    """The body as `kind`; Invalid (400) naming the problem. `optional`: an empty body is `kind()`."""
    if optional and not raw.strip():
        return kind()
    try:
        return msgspec.json.decode(raw, type=kind)
    except msgspec.ValidationError as exc:
        raise Invalid({"body": str(exc)}) from exc
    except msgspec.DecodeError as exc:
        raise Invalid({"body": f"is not valid JSON: {exc}"}) from exc
