"""The embedded servers (services/dev/postgres.py, nats.py) and the fixture chain that finds them (tests/servers.py)."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import nats
import psycopg
import pytest

from infra.broker import bus
from infra.broker.permissions import SERVICE_ACCOUNT
from services.dev.errors import ServerError
from services.dev.nats import start_nats
from services.dev.ports import free_port
from services.dev.postgres import RunningPostgres, start_postgres
from services.dev.process import pid_alive
from tests import servers
from tests.servers import wait_for

pytestmark = pytest.mark.integration

ORPHANING_SUPERVISOR = """
import sys, time
from pathlib import Path
from services.dev.postgres import start_postgres

print(start_postgres(Path(sys.argv[1])).pid, flush=True)
time.sleep(600)
"""


@pytest.fixture
def data_dir() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="pipelines-servers-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def _group_gone(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return True
    return False


def _connect_without(pg: RunningPostgres, password: str | None) -> None:
    params = {
        "host": pg.host,
        "port": pg.port,
        "user": pg.user,
        "dbname": pg.database,
        "passfile": "/nonexistent",
        "connect_timeout": 5,
    }
    if password is not None:
        params["password"] = password
    psycopg.connect(**params).close()  # type: ignore[arg-type]


def test_embedded_postgres_requires_a_password_and_keeps_its_data(
    data_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("PGPASSWORD", raising=False)
    began = time.monotonic()
    pg = start_postgres(data_dir)
    first_start = time.monotonic() - began
    second: RunningPostgres | None = None
    try:
        assert pg.url.startswith(f"postgresql://pipelines:{pg.password}@127.0.0.1:{pg.port}/pipelines")
        assert pg.port != 5432
        with psycopg.connect(pg.url) as conn:
            row = conn.execute(
                "SELECT current_setting('listen_addresses'), current_setting('unix_socket_directories'),"
                " current_setting('password_encryption')"
            ).fetchone()
            assert row == ("127.0.0.1", "", "scram-sha-256")
            methods = {r[0] for r in conn.execute("SELECT auth_method FROM pg_hba_file_rules").fetchall()}
            assert methods == {"scram-sha-256"}
            conn.execute("CREATE TABLE kept (x int)")
            conn.execute("INSERT INTO kept VALUES (42)")

        with pytest.raises(psycopg.OperationalError, match="no password supplied"):
            _connect_without(pg, None)
        with pytest.raises(psycopg.OperationalError, match="password authentication failed"):
            _connect_without(pg, "wrong-" + pg.password)

        # The password is kept in a 0600 file of ours; the cluster is unreadable to other users.
        assert pg.password_file == data_dir.resolve() / "postgres.password"
        st = pg.password_file.stat()
        assert stat.S_IMODE(st.st_mode) == 0o600
        assert st.st_uid == os.geteuid()
        assert pg.password_file.read_text().strip() == pg.password
        assert stat.S_IMODE(pg.pgdata.stat().st_mode) == 0o700
        for root, dirs, files in os.walk(pg.pgdata):
            for name in [*dirs, *files]:
                mode = os.lstat(os.path.join(root, name)).st_mode
                assert mode & 0o007 == 0, f"{name} is accessible to other users"
        if os.geteuid() == 0:
            assert pg.run_as is not None and pg.run_as.uid != 0
            assert pg.pgdata.stat().st_uid == pg.run_as.uid

        # A second server on the same data directory is refused while this one runs.
        with pytest.raises(ServerError, match="in use"):
            start_postgres(data_dir)

        pid, port, password = pg.pid, pg.port, pg.password
        pg.stop()
        assert _group_gone(pid)

        began = time.monotonic()
        second = start_postgres(data_dir)
        restart = time.monotonic() - began
        assert second.password == password
        assert second.port == port  # the previous port is reused when free
        with psycopg.connect(second.url) as conn:
            assert conn.execute("SELECT x FROM kept").fetchall() == [(42,)]
        print(f"embedded postgres: first start {first_start:.2f}s, restart {restart:.2f}s")
        assert restart < 10
    finally:
        pg.stop()
        if second is not None:
            second.stop()


def test_embedded_postgres_stops_a_server_left_behind(data_dir: Path) -> None:
    # A supervisor killed with SIGKILL: its lock goes with it, its server (own session) stays.
    supervisor = subprocess.Popen(
        [sys.executable, "-c", ORPHANING_SUPERVISOR, str(data_dir)], stdout=subprocess.PIPE, text=True
    )
    assert supervisor.stdout is not None
    orphan = int(supervisor.stdout.readline())
    supervisor.kill()
    supervisor.wait(10)
    try:
        assert pid_alive(orphan)
        fresh = start_postgres(data_dir)
        try:
            # Not our child: gone once init has reaped it, with everything in its group.
            assert wait_for(lambda: _group_gone(orphan), timeout=10)
            with psycopg.connect(fresh.url) as conn:
                assert conn.execute("SELECT 1").fetchone() == (1,)
        finally:
            fresh.stop()
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(orphan, signal.SIGKILL)


def test_embedded_postgres_sets_a_new_password_when_the_file_is_lost(data_dir: Path) -> None:
    pg = start_postgres(data_dir)
    old = pg.password
    pg.stop()
    pg.password_file.unlink()
    pg = start_postgres(data_dir)
    try:
        assert pg.password != old
        assert stat.S_IMODE(pg.password_file.stat().st_mode) == 0o600
        with psycopg.connect(pg.url) as conn:
            assert conn.execute("SELECT 1").fetchone() == (1,)
    finally:
        pg.stop()


async def test_embedded_nats_runs_jetstream_and_keeps_streams(data_dir: Path) -> None:
    began = time.monotonic()
    server = start_nats(data_dir)
    startup = time.monotonic() - began
    try:
        assert server.url == f"nats://127.0.0.1:{server.port}"
        nc = await bus.connect(server.url, "smoke", server.credentials["admin"])
        js = nc.jetstream()
        await js.add_stream(name="SMOKE", subjects=["smoke.>"])
        ack = await js.publish("smoke.a", b"hello")
        assert ack.seq == 1
        await nc.close()
        pid = server.pid
        server.stop()
        assert _group_gone(pid)

        server = start_nats(data_dir)
        nc = await bus.connect(server.url, "smoke", server.credentials["admin"])
        info = await nc.jetstream().stream_info("SMOKE")
        assert info.state.messages == 1
        await nc.close()
        print(f"embedded nats: start {startup:.2f}s")
        assert startup < 10
    finally:
        server.stop()


async def test_embedded_nats_keeps_the_streams_of_a_data_directory_from_before_accounts(data_dir: Path) -> None:
    """Until the services had an account of their own, their JetStream data was the global account's."""
    server = start_nats(data_dir)
    try:
        nc = await bus.connect(server.url, "smoke", server.credentials["admin"])
        await nc.jetstream().add_stream(name="OLD", subjects=["old.>"])
        await nc.jetstream().publish("old.a", b"kept")
        await nc.close()
        server.stop()
        jetstream = data_dir / "nats" / "jetstream"
        (jetstream / SERVICE_ACCOUNT).rename(jetstream / "$G")  # the layout of that time

        server = start_nats(data_dir)
        nc = await bus.connect(server.url, "smoke", server.credentials["admin"])
        info = await nc.jetstream().stream_info("OLD")
        assert info.state.messages == 1
        await nc.close()
        assert not (jetstream / "$G").exists()
    finally:
        server.stop()


# -- where the fixtures find their servers -----------------------------------------------------


def test_env_urls_come_first() -> None:
    env = {
        "PIPELINES_TEST_DATABASE_URL": "postgresql://u:p@127.0.0.1:1/test",
        "PIPELINES_DATABASE_URL": "postgresql://u:p@127.0.0.1:2/dev",
        "PIPELINES_TEST_NATS_URL": "nats://127.0.0.1:3",
    }
    assert servers.choose_source("postgres", env) == "env"
    assert servers.choose_source("nats", env) == "env"
    with servers.postgres_server(env) as url:
        assert url == "postgresql://u:p@127.0.0.1:1/test"
    with servers.nats_server(env) as url:
        assert url == "nats://127.0.0.1:3"
    # The service variables are the fallback.
    env = {"PIPELINES_DATABASE_URL": "postgresql://u:p@127.0.0.1:2/dev", "PIPELINES_NATS_URL": "nats://127.0.0.1:4"}
    with servers.postgres_server(env) as url:
        assert url == "postgresql://u:p@127.0.0.1:2/dev"
    with servers.nats_server(env) as url:
        assert url == "nats://127.0.0.1:4"


def test_without_urls_or_docker_the_embedded_servers_are_used() -> None:
    env = {"DOCKER_HOST": "unix:///nonexistent/docker.sock"}
    assert servers.choose_source("postgres", env) == "embedded"
    assert servers.choose_source("nats", {"PIPELINES_TEST_SERVERS": "embedded", "PIPELINES_NATS_URL": "x"}) == (
        "embedded"
    )


def test_with_database_replaces_only_the_database_name() -> None:
    url = "postgresql://u:p%40ss@127.0.0.1:5432/old?sslmode=disable"
    assert servers.with_database(url, "new") == "postgresql://u:p%40ss@127.0.0.1:5432/new?sslmode=disable"
    assert servers.database_name(servers.with_database(url, "new")) == "new"
    dsn = servers.with_database("host=127.0.0.1 port=5 dbname=old user=u", "new")
    assert servers.database_name(dsn) == "new"


def test_a_docker_client_without_an_engine_fails_over_fast() -> None:
    for env in (
        {"DOCKER_HOST": "unix:///nonexistent/docker.sock"},
        {"DOCKER_HOST": f"tcp://127.0.0.1:{free_port()}"},  # nothing listens there
    ):
        began = time.monotonic()
        assert servers.docker_engine_available(env=env) is False
        assert time.monotonic() - began < 3.5


def test_session_fixtures_give_a_fresh_database_and_jetstream(database_url: str, nats_url: str) -> None:
    with psycopg.connect(database_url) as conn:
        name = conn.execute("SELECT current_database()").fetchone()
        assert name is not None and name[0].startswith("pipelines_test_")
        assert servers.database_name(database_url) == name[0]


async def test_session_nats_url_has_jetstream(nats_url: str) -> None:
    nc = await nats.connect(nats_url)
    try:
        account = await nc.jetstream().account_info()
        assert account is not None
    finally:
        await nc.close()


def test_fresh_database_is_created_and_dropped(database_url: str) -> None:
    with servers.fresh_database(database_url, prefix="pipelines_test_tmp") as url:
        name = servers.database_name(url)
        assert name.startswith("pipelines_test_tmp_")
        with psycopg.connect(url) as conn:
            assert conn.execute("SELECT current_database()").fetchone() == (name,)
    with psycopg.connect(database_url) as conn:
        gone = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone()
    assert gone is None
