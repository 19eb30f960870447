"""Where the tests find PostgreSQL and NATS (plain functions; the fixtures are in tests/conftest.py).

Order (DESIGN.md, "Configuration and running"):

1. URLs from the environment: PIPELINES_TEST_DATABASE_URL / PIPELINES_TEST_NATS_URL, else
   PIPELINES_DATABASE_URL / PIPELINES_NATS_URL;
2. testcontainers (postgres:16, nats:2.10 -js) when a Docker engine answers within 3 s (a Docker
   client without an engine fails over at once);
3. the embedded servers (services/dev/postgres.py, services/dev/nats.py) in a temporary directory.

PIPELINES_TEST_SERVERS=env|docker|embedded forces one source (auto by default).

Whatever the server, each test session gets a fresh database `pipelines_test_<random>`, created
on that server and dropped (WITH (FORCE)) at the end.

The embedded NATS accepts only its users (services/dev/nats_auth.py): its URL is given with the
`admin` user in it (`nats://admin:<password>@127.0.0.1:<port>`, every permission: the tests' own
checks), and `nats_service_creds(url)` names each service's credential file, which the systems under
test connect with. A URL from the environment or a container is used as it is (its authorization is
that server's business).
"""

from __future__ import annotations

import contextlib
import functools
import os
import secrets
import shutil
import tempfile
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import psycopg
from psycopg import sql

from services.dev.nats import RunningNats, start_nats
from services.dev.postgres import start_postgres

POSTGRES_IMAGE = "postgres:16"
NATS_IMAGE = "nats:2.10"
DOCKER_TIMEOUT = 3.0
# Throw-away test servers need no durability.
FAST_POSTGRES_SETTINGS = {"fsync": "off", "synchronous_commit": "off", "full_page_writes": "off"}


def _env(env: Mapping[str, str] | None) -> Mapping[str, str]:
    return os.environ if env is None else env


def env_database_url(env: Mapping[str, str] | None = None) -> str | None:
    e = _env(env)
    return e.get("PIPELINES_TEST_DATABASE_URL") or e.get("PIPELINES_DATABASE_URL") or None


def env_nats_url(env: Mapping[str, str] | None = None) -> str | None:
    e = _env(env)
    return e.get("PIPELINES_TEST_NATS_URL") or e.get("PIPELINES_NATS_URL") or None


def forced_source(env: Mapping[str, str] | None = None) -> str:
    value = _env(env).get("PIPELINES_TEST_SERVERS", "auto").strip().lower() or "auto"
    if value not in ("auto", "env", "docker", "embedded"):
        raise ValueError(f"PIPELINES_TEST_SERVERS must be auto, env, docker or embedded, not {value!r}")
    return value


def docker_engine_available(timeout: float = DOCKER_TIMEOUT, env: Mapping[str, str] | None = None) -> bool:
    """Whether a Docker engine answers a ping within `timeout` seconds.

    With no DOCKER_HOST and no socket file this answers False at once, so a machine with only a
    Docker client installed does not wait for anything.
    """
    e = _env(env)
    host = e.get("DOCKER_HOST", "")
    if not host:
        sockets = [Path("/var/run/docker.sock"), Path.home() / ".docker/run/docker.sock"]
        if e.get("XDG_RUNTIME_DIR"):
            sockets.append(Path(e["XDG_RUNTIME_DIR"]) / "docker.sock")
        if not any(p.exists() for p in sockets):
            return False
    elif host.startswith("unix://") and not Path(host[len("unix://") :]).exists():
        return False
    try:
        import docker  # type: ignore[import-untyped]

        client = docker.from_env(timeout=int(max(1, timeout)), environment=dict(e))
        try:
            return bool(client.ping())
        finally:
            client.close()
    except Exception:
        return False


@functools.cache
def _docker_cached() -> bool:
    return docker_engine_available()


def choose_source(kind: str, env: Mapping[str, str] | None = None) -> str:
    """'env', 'docker' or 'embedded' for kind 'postgres' or 'nats'."""
    forced = forced_source(env)
    url = env_database_url(env) if kind == "postgres" else env_nats_url(env)
    if forced == "env" or (forced == "auto" and url):
        if not url:
            raise RuntimeError(f"PIPELINES_TEST_SERVERS=env but no URL for {kind} in the environment")
        return "env"
    if forced == "docker":
        return "docker"
    if forced == "embedded":
        return "embedded"
    return "docker" if (_docker_cached() if env is None else docker_engine_available(env=env)) else "embedded"


# ---------------------------------------------------------------------------------------------
# databases


def with_database(url: str, database: str) -> str:
    """The same server URL with another database name (query string kept); a key=value
    connection string works too."""
    if "://" not in url:
        return psycopg.conninfo.make_conninfo(url, dbname=database)
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, "/" + database, parts.query, parts.fragment))


def database_name(url: str) -> str:
    return str(psycopg.conninfo.conninfo_to_dict(url).get("dbname") or "")


def _admin_connect(server_url: str) -> psycopg.Connection[Any]:
    """A connection for CREATE/DROP DATABASE: to the `postgres` maintenance database, else to the
    database named in the URL."""
    try:
        return psycopg.connect(with_database(server_url, "postgres"), autocommit=True, connect_timeout=10)
    except psycopg.OperationalError:
        return psycopg.connect(server_url, autocommit=True, connect_timeout=10)


def create_database(server_url: str, prefix: str = "pipelines_test") -> str:
    """Create `<prefix>_<random>` on the server of `server_url`; returns its URL."""
    name = f"{prefix}_{secrets.token_hex(6)}"
    with _admin_connect(server_url) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    return with_database(server_url, name)


def drop_database(server_url: str, name: str) -> None:
    with _admin_connect(server_url) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


@contextlib.contextmanager
def fresh_database(server_url: str, prefix: str = "pipelines_test") -> Iterator[str]:
    url = create_database(server_url, prefix)
    try:
        yield url
    finally:
        drop_database(server_url, database_name(url))


# ---------------------------------------------------------------------------------------------
# servers


@contextlib.contextmanager
def _temp_dir(prefix: str) -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _publish_on_loopback(container: Any) -> bool:
    """Publish the container's ports on 127.0.0.1 only, when the engine is local (a remote
    engine's loopback is not ours). Returns whether it did."""
    from testcontainers.core.utils import inside_container

    host = os.environ.get("DOCKER_HOST", "")
    if (host and not host.startswith("unix://")) or inside_container():
        return False  # reached through the engine's host or gateway address, not our loopback
    for port in list(container.ports):
        container.ports[port] = ("127.0.0.1", None)  # random host port, loopback interface
    return True


@contextlib.contextmanager
def postgres_server(env: Mapping[str, str] | None = None) -> Iterator[str]:
    """A URL of a PostgreSQL server on which databases can be created (see the module doc)."""
    source = choose_source("postgres", env)
    if source == "env":
        url = env_database_url(env)
        assert url is not None
        yield url
    elif source == "docker":
        from testcontainers.community.postgres import PostgresContainer

        container = PostgresContainer(POSTGRES_IMAGE, password=secrets.token_hex(12), driver=None)
        local = _publish_on_loopback(container)
        with container:
            yield str(container.get_connection_url(host="127.0.0.1" if local else None))
    else:
        with _temp_dir("pipelines-test-pg-") as tmp, start_postgres(tmp, settings=FAST_POSTGRES_SETTINGS) as pg:
            yield pg.url


_EMBEDDED_NATS: dict[str, RunningNats] = {}


def _address(url: str) -> str:
    return urlsplit(url).netloc.rpartition("@")[2]


def embedded_nats(url: str) -> RunningNats | None:
    """The embedded server of a URL `nats_server` gave, else None."""
    return _EMBEDDED_NATS.get(_address(url))


def nats_service_creds(url: str) -> dict[str, Path]:
    """Each service's (and `admin`'s) credential file on the embedded server of `url`; empty for another."""
    server = embedded_nats(url)
    return dict(server.credentials) if server is not None else {}


@contextlib.contextmanager
def nats_server(env: Mapping[str, str] | None = None) -> Iterator[str]:
    """A URL of a NATS server with JetStream (see the module doc)."""
    source = choose_source("nats", env)
    if source == "env":
        url = env_nats_url(env)
        assert url is not None
        yield url
    elif source == "docker":
        from testcontainers.community.nats import NatsContainer

        container = NatsContainer(NATS_IMAGE, jetstream=True)
        local = _publish_on_loopback(container)
        with container:
            if local:
                yield f"nats://127.0.0.1:{container.get_exposed_port(container.client_port)}"
            else:
                yield str(container.nats_uri())
    else:
        with _temp_dir("pipelines-test-nats-") as tmp, start_nats(tmp) as nats:
            address = _address(nats.url)
            _EMBEDDED_NATS[address] = nats
            try:
                yield nats.admin_url()
            finally:
                _EMBEDDED_NATS.pop(address, None)


@contextlib.contextmanager
def session_database(env: Mapping[str, str] | None = None) -> Iterator[str]:
    """A fresh database on whichever server `postgres_server` finds; dropped at the end."""
    with postgres_server(env) as server_url, fresh_database(server_url) as url:
        yield url


def wait_for(predicate: Any, timeout: float = 10.0, interval: float = 0.05) -> bool:
    """Poll `predicate()` until it is truthy or `timeout` passes."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return bool(predicate())
