"""Project-wide fixtures.

Servers: `database_url` (a fresh, empty database for the whole session, dropped at the end) and
`nats_url` (a NATS server with JetStream). They are found in this order: URLs from the environment
(PIPELINES_TEST_DATABASE_URL / PIPELINES_TEST_NATS_URL, else PIPELINES_DATABASE_URL /
PIPELINES_NATS_URL), testcontainers when a Docker engine answers, else the embedded servers in a
temporary directory. See tests/servers.py. Both are lazy: tests that do not ask for them start
nothing.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests import servers


def pytest_report_header() -> str:
    try:
        return f"servers: postgres={servers.choose_source('postgres')}, nats={servers.choose_source('nats')}"
    except Exception as exc:  # a bad PIPELINES_TEST_SERVERS shows up here and again in the fixtures
        return f"servers: {exc}"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Every skip says why (CI lists them with -rs; a root-only test says "needs root")."""
    bare = []
    for item in items:
        for mark in [*item.iter_markers("skip"), *item.iter_markers("skipif")]:
            reason = mark.kwargs.get("reason", mark.args[0] if mark.name == "skip" and mark.args else "")
            if not str(reason).strip():
                bare.append(f"{item.nodeid}: a skip needs a reason")
    if bare:
        raise pytest.UsageError("\n".join(bare))


@pytest.fixture(scope="session")
def database_url() -> Iterator[str]:
    with servers.session_database() as url:
        yield url


@pytest.fixture(scope="session")
def nats_url() -> Iterator[str]:
    with servers.nats_server() as url:
        yield url
