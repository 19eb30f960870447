"""The one log format of every service (text or JSON lines), with secrets redacted, and the request line."""

from __future__ import annotations

import json
import logging
import re
import uuid
from datetime import UTC, datetime
from typing import Any

access_log = logging.getLogger("pipelines.access")

# The fields of a request line, as LogRecord attributes and as JSON keys.
REQUEST_FIELDS = {
    "method": "method",
    "path": "path",
    "status": "status",
    "duration_ms": "durationMs",
    "request_id": "requestId",
}
_REQUEST_ID = re.compile(r"^[A-Za-z0-9._:-]{1,100}$")

# Whoever logs them (our code, httpx, nats, a traceback): credentials in URLs, bearer tokens, and
# any URL's path and query (a webhook URL is a credential: Slack's carries its secret in the path).
_URL = re.compile(r"\b([a-z][a-z0-9+.-]*://)([^\s/?#@'\"<>]*@)?([^\s/?#'\"<>]*)([^\s'\"<>]*)", re.IGNORECASE)
_BEARER = re.compile(r"\b(Bearer\s+)[A-Za-z0-9._~+/=-]+", re.IGNORECASE)
_TOKEN_PARAM = re.compile(r"([?&;\s](?:access_)?token=)[^&\s'\"]+", re.IGNORECASE)


def _url(match: re.Match[str]) -> str:
    scheme, creds, host, rest = match.groups()
    return f"{scheme}{'***@' if creds else ''}{host}{'/…' if rest not in ('', '/') else rest}"


def redact(text: str) -> str:
    text = _URL.sub(_url, text)
    text = _BEARER.sub(r"\1***", text)
    return _TOKEN_PARAM.sub(r"\1***", text)


def _escape(text: str) -> str:
    """Control characters (a newline in a path) escaped, so that one record stays one line."""
    return text.encode("unicode_escape").decode("ascii") if not text.isprintable() else text


class TextFormatter(logging.Formatter):
    def __init__(self, service: str) -> None:
        super().__init__(f"%(asctime)s {service} %(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        return redact(super().format(record))


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time (UTC), level, service, logger, message, the request fields
    of a request line, and the exception's traceback."""

    def __init__(self, service: str) -> None:
        super().__init__()
        self.service = service

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "time": datetime.fromtimestamp(record.created, UTC).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z",
            "level": record.levelname,
            "service": self.service,
            "logger": record.name,
            "message": redact(record.getMessage()),
        }
        for attr, key in REQUEST_FIELDS.items():
            if hasattr(record, attr):
                out[key] = getattr(record, attr)
        if record.exc_info:
            out["exception"] = redact(self.formatException(record.exc_info))
        return json.dumps(out, ensure_ascii=False)


def request_id(raw: str | None) -> str:
    """The client's X-Request-Id when it is a plain token, else a new one."""
    if raw and _REQUEST_ID.match(raw):
        return raw
    return uuid.uuid4().hex


def log_request(method: str, path: str, status: int, seconds: float, rid: str) -> None:
    """The request line: `GET /api/v1/pipelines 200 3.1ms request_id=...` (never the query string)."""
    ms = round(seconds * 1000, 1)
    path = _escape(path)
    access_log.log(
        logging.WARNING if status >= 500 else logging.INFO,
        "%s %s %d %sms request_id=%s",
        method,
        path,
        status,
        ms,
        rid,
        extra={"method": method, "path": path, "status": status, "duration_ms": ms, "request_id": rid},
    )
