"""One log format across services (text, or JSON lines with PIPELINES_LOG_FORMAT=json), and no
credential, token or webhook URL in any line, whoever logs it."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import httpx
import pytest

from infra.logs import log_request
from services.bootstrap import setup_logging

SLACK = "https://hooks.slack.com/services/T0000/B0000/XXXXSECRETXXXX"
SECRETS = ("XXXXSECRETXXXX", "tok.en.value", "pw-secret", "query-secret")


@pytest.fixture
def captured() -> Iterator[tuple[io.StringIO, list[logging.Handler]]]:
    out = io.StringIO()
    installed: list[logging.Handler] = []
    yield out, installed
    for handler in installed:
        logging.getLogger().removeHandler(handler)


def _setup(captured: tuple[io.StringIO, list[logging.Handler]], fmt: str | None) -> None:
    out, installed = captured
    env = {} if fmt is None else {"PIPELINES_LOG_FORMAT": fmt}
    installed.append(setup_logging("relay", stream=out, env=env))


def _leaky_lines() -> None:
    log = logging.getLogger("pipelines.test")
    log.info("posting to %s", SLACK)
    log.warning("nats: connect to nats://user:pw-secret@nats.example:4222 failed")
    log.info("Authorization: Bearer tok.en.value; url http://10.0.0.5/hook?token=query-secret&x=1")
    try:
        raise RuntimeError(f"boom {SLACK}")
    except RuntimeError:
        log.exception("failed")


def test_text_lines_name_the_service_and_hide_every_secret(captured: tuple[io.StringIO, list[logging.Handler]]) -> None:
    _setup(captured, None)
    _leaky_lines()
    text = captured[0].getvalue()
    assert " relay INFO pipelines.test: posting to https://hooks.slack.com/" in text
    assert not [s for s in SECRETS if s in text], text
    assert "http://10.0.0.5/" in text and "x=1" not in text  # a URL keeps its scheme and host only


def test_json_lines_carry_the_request_fields(captured: tuple[io.StringIO, list[logging.Handler]]) -> None:
    _setup(captured, "json")
    log_request("GET", "/api/v1/pipelines", 200, 0.0123, "req-1")
    _leaky_lines()
    lines = [json.loads(line) for line in captured[0].getvalue().splitlines()]
    first = lines[0]
    assert first["service"] == "relay" and first["level"] == "INFO" and first["logger"] == "pipelines.access"
    assert (first["method"], first["path"], first["status"], first["requestId"]) == (
        "GET",
        "/api/v1/pipelines",
        200,
        "req-1",
    )
    assert first["durationMs"] == 12.3 and first["time"].endswith("Z")
    assert "exception" in lines[-1] and "RuntimeError" in lines[-1]["exception"]
    assert not [s for s in SECRETS if s in captured[0].getvalue()]


def test_a_request_line_reads_the_same_in_text(captured: tuple[io.StringIO, list[logging.Handler]]) -> None:
    _setup(captured, "text")
    log_request("POST", "/api/v1/pipelines/p\n1", 500, 1.5, "req-2")
    (line,) = captured[0].getvalue().splitlines()  # a newline in a path cannot forge a second line
    assert line.endswith("pipelines.access: POST /api/v1/pipelines/p\\n1 500 1500.0ms request_id=req-2")


def test_httpx_does_not_log_the_webhook_urls_it_posts_to(captured: tuple[io.StringIO, list[logging.Handler]]) -> None:
    _setup(captured, None)
    transport = httpx.MockTransport(lambda request: httpx.Response(200))
    with httpx.Client(transport=transport) as client:
        client.post(SLACK, json={"text": "hi"})
    assert "XXXXSECRETXXXX" not in captured[0].getvalue()


def test_an_unknown_log_format_is_refused(captured: tuple[io.StringIO, list[logging.Handler]]) -> None:
    with pytest.raises(SystemExit, match="PIPELINES_LOG_FORMAT must be 'text' or 'json', not 'xml'"):
        _setup(captured, "xml")
