"""A request that crashes its handler is still logged, with the 500 the client got."""

from __future__ import annotations

import logging

import pytest
from litestar import Litestar, get
from litestar.testing import TestClient

from infra.http.access import access_log, log_response
from infra.http.app import Deps, create_app
from infra.http.errors import handle


@get("/boom")
async def boom() -> None:
    raise RuntimeError("the handler failed")


def test_a_500_is_logged_with_its_request_id(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="pipelines.access")
    app = Litestar(
        route_handlers=[boom],
        middleware=[access_log],
        before_send=[log_response],
        exception_handlers={Exception: handle},
        logging_config=None,
    )
    with TestClient(app) as client:
        r = client.get("/boom?token=abc")
    assert r.status_code == 500
    (record,) = [x for x in caplog.records if x.name == "pipelines.access"]
    assert (record.method, record.path, record.status) == ("GET", "/boom", 500)  # type: ignore[attr-defined]
    assert record.levelno == logging.WARNING and record.request_id == r.headers["x-request-id"]  # type: ignore[attr-defined]


def test_creating_the_api_leaves_the_services_log_format_alone() -> None:
    """Litestar's default logging config replaced the root handlers: the api's lines looked unlike the others'."""
    root = logging.getLogger()
    before = list(root.handlers)

    async def never() -> Deps:
        raise AssertionError("not started")

    create_app(never)
    assert root.handlers == before
