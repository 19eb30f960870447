"""Every error as `{"statusCode", "error", "message"}` (plus `errors` naming bad fields)."""

from __future__ import annotations

import logging
from http import HTTPStatus
from typing import Any

import msgspec
from litestar import Request, Response
from litestar.exceptions import HTTPException, ValidationException

from domain.errors import Invalid, NotFound, Refused
from infra.app.commands import ConcurrencyConflict, NameTaken

log = logging.getLogger("pipelines.api")
_encoder = msgspec.json.Encoder()


def error_body(status: int, message: str, errors: list[dict[str, str]] | None = None) -> dict[str, Any]:
    """The one error shape (ErrorBody in the OpenAPI document)."""
    body: dict[str, Any] = {"statusCode": status, "error": HTTPStatus(status).phrase, "message": message}
    if errors:
        body["errors"] = errors
    return body


def error_response(status: int, message: str, errors: list[dict[str, str]] | None = None) -> Response[bytes]:
    body = error_body(status, message, errors)
    return Response(content=_encoder.encode(body), status_code=status, media_type="application/json")


def _validation(exc: ValidationException) -> Response[bytes]:
    errors: list[dict[str, str]] = []
    extra = exc.extra if isinstance(exc.extra, list) else []
    for item in extra:
        if isinstance(item, dict):
            key = str(item.get("key") or "body")
            message = str(item.get("message") or "is invalid")
            errors.append({"path": key, "message": message})
    detail = exc.detail or "Validation failed"
    if errors:
        detail = "; ".join(f"{e['path']}: {e['message']}" for e in errors)
    return error_response(400, detail, errors)


def handle(request: Request[Any, Any, Any], exc: Exception) -> Response[bytes]:
    match exc:
        case ValidationException():
            return _validation(exc)
        case HTTPException():
            status = exc.status_code
            message = exc.detail or HTTPStatus(status).phrase
            if status == 422:
                status = 400
            return error_response(status, message)
        case Invalid():
            return error_response(400, str(exc), [{"path": k, "message": v} for k, v in exc.errors.items()])
        case Refused():
            return error_response(400, str(exc))
        case NotFound():
            return error_response(404, str(exc))
        case NameTaken():
            return error_response(409, str(exc))
        case ConcurrencyConflict():
            return error_response(409, str(exc))
    if isinstance(exc, RecursionError):
        # A decoder given nesting deeper than the stack (the depth limit should have refused it).
        return error_response(400, "body: nested too deeply", [{"path": "body", "message": "is nested too deeply"}])
    log.exception("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return error_response(500, "Internal server error")
