"""Where the suite runs: the servers (embedded, or given by URL), throw-away databases on them,
the stack of services, and a record of the machine."""

from __future__ import annotations

import contextlib
import datetime as dt
import io
import os
import platform
import resource
import secrets
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import psycopg
from psycopg import sql

from services.dev.nats import RunningNats, start_nats
from services.dev.ports import free_port
from services.dev.postgres import RunningPostgres, start_postgres
from services.dev.stack import Stack

ROOT = Path(__file__).resolve().parent.parent
JWT_SECRET = "bench-secret-0123456789abcdef0123456789"


def with_database(url: str, database: str) -> str:
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, "/" + database, parts.query, parts.fragment))


def raise_fd_limit() -> None:
    """1,000 WebSocket clients here and 1,000 connections in the gateway (which inherits this)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = hard if hard != resource.RLIM_INFINITY else 65536
    if soft < want:
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))


@dataclass
class Servers:
    """PostgreSQL and NATS for the whole run; databases made here are dropped at the end."""

    database_url: str  # any database on the server; CREATE DATABASE must be allowed
    nats_url: str
    postgres: RunningPostgres | None = None
    nats: RunningNats | None = None
    tmp: Path | None = None
    created: list[str] = field(default_factory=list)

    @classmethod
    def start(
        cls,
        database_url: str | None,
        nats_url: str | None,
        *,
        pg_settings: dict[str, str] | None = None,
        say: Any = print,
    ) -> Servers:
        tmp = Path(tempfile.mkdtemp(prefix="pipelines-bench-"))
        postgres = nats = None
        try:
            if database_url is None:
                began = time.monotonic()
                postgres = start_postgres(tmp / "servers", settings=pg_settings)
                database_url = postgres.url
                say(f"embedded PostgreSQL on port {postgres.port} ({time.monotonic() - began:.1f}s)")
            if nats_url is None:
                nats = start_nats(tmp / "servers")
                nats_url = nats.admin_url()  # the benchmark's own connections; the services get their own users
                say(f"embedded NATS on port {nats.port}")
        except BaseException:
            if postgres is not None:
                postgres.stop()
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return cls(database_url=database_url, nats_url=nats_url, postgres=postgres, nats=nats, tmp=tmp)

    def create_database(self, purpose: str) -> str:
        name = f"bench_{purpose}_{secrets.token_hex(4)}"
        with self._admin() as conn:
            conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        self.created.append(name)
        return with_database(self.database_url, name)

    def drop_database(self, url: str) -> None:
        name = urlsplit(url).path.lstrip("/")
        with contextlib.suppress(Exception), self._admin() as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
        with contextlib.suppress(ValueError):
            self.created.remove(name)

    def _admin(self) -> psycopg.Connection[Any]:
        try:
            return psycopg.connect(with_database(self.database_url, "postgres"), autocommit=True, connect_timeout=10)
        except psycopg.OperationalError:
            return psycopg.connect(self.database_url, autocommit=True, connect_timeout=10)

    def postgres_version(self) -> str | None:
        with contextlib.suppress(Exception), psycopg.connect(self.database_url, connect_timeout=10) as conn:
            row = conn.execute("SHOW server_version").fetchone()
            return str(row[0]) if row else None
        return None

    def postgres_settings(self) -> dict[str, str]:
        out: dict[str, str] = {}
        with contextlib.suppress(Exception), psycopg.connect(self.database_url, connect_timeout=10) as conn:
            for name in ("fsync", "synchronous_commit", "shared_buffers", "max_connections", "wal_sync_method"):
                row = conn.execute(sql.SQL("SHOW {}").format(sql.Identifier(name))).fetchone()
                if row:
                    out[name] = str(row[0])
        return out

    def close(self) -> None:
        for name in list(self.created):
            self.drop_database(with_database(self.database_url, name))
        if self.nats is not None:
            self.nats.stop()
        if self.postgres is not None:
            self.postgres.stop()
        if self.tmp is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)


class _Tail(io.TextIOBase):
    """Keeps the last lines of the services' output (shown when something fails)."""

    def __init__(self, keep: int = 400, echo: bool = False) -> None:
        self.lines: list[str] = []
        self.keep = keep
        self.echo = echo
        self._lock = threading.Lock()

    def write(self, s: str) -> int:
        with self._lock:
            self.lines.extend(s.splitlines())
            del self.lines[: -self.keep]
        if self.echo:
            sys.stderr.write(s)
        return len(s)

    def flush(self) -> None:
        pass

    def text(self, n: int = 60) -> str:
        with self._lock:
            return "\n".join(self.lines[-n:])


@contextlib.contextmanager
def running_stack(
    servers: Servers,
    database_url: str,
    *,
    services: Sequence[str] | None = None,
    extra_env: dict[str, str] | None = None,
    echo: bool = False,
    timeout: float = 90.0,
    package: str = "services",
) -> Iterator[tuple[Stack, dict[str, str], _Tail]]:
    """The services as `make up` runs them (default settings), against `database_url`, with an
    events stream of their own that is deleted afterwards; `package`: where the services' modules
    are (bench.unsandboxed: the executor without the script sandbox)."""
    assert servers.tmp is not None
    stream = f"BENCH_{secrets.token_hex(5).upper()}"
    data_dir = Path(tempfile.mkdtemp(prefix="stack-", dir=servers.tmp))
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIPELINES_")} | {
        "PIPELINES_JWT_SECRET": JWT_SECRET,
        "PIPELINES_EVENTS_STREAM": stream,
        "PYTHONPATH": str(ROOT),
        **(extra_env or {}),
    }
    output = _Tail(echo=echo)
    kwargs: dict[str, Any] = {}
    if services is not None:
        kwargs["services"] = tuple(services)
    stack = Stack(
        env,
        database_url=database_url,
        nats_url=servers.nats_url,  # with the embedded server's admin in it: the benchmark's own connections
        nats_creds=servers.nats.credentials if servers.nats is not None else None,  # each service as itself
        data_dir=data_dir,
        api_port=free_port(),
        gateway_port=free_port(),
        output=output,  # type: ignore[arg-type]  # a TextIOBase that keeps the tail
        cwd=ROOT,
        package=package,
        **kwargs,
    )
    stack.start()
    try:
        if not stack.wait_listening(timeout):
            raise RuntimeError("the stack did not start listening:\n" + output.text())
        yield stack, env, output
    finally:
        stack.stop()
        _delete_stream(servers.nats_url, stream)
        shutil.rmtree(data_dir, ignore_errors=True)


def _delete_stream(nats_url: str, stream: str) -> None:
    import asyncio

    from infra.broker import bus

    async def go() -> None:
        nc = await bus.connect(nats_url, "bench-cleanup")
        try:
            with contextlib.suppress(Exception):
                await nc.jetstream().delete_stream(stream)
        finally:
            await nc.close()

    with contextlib.suppress(Exception):
        asyncio.run(go())


# ---- the machine ---------------------------------------------------------------------------------


def _cpu_model() -> str | None:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or None


def _mem_total_mb() -> int | None:
    with contextlib.suppress(OSError, ValueError):
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) // 1024
    return None


def _git(*args: str) -> str | None:
    with contextlib.suppress(Exception):
        out = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10, check=True)
        return out.stdout.strip()
    return None


def other_busy_processes(limit: int = 5) -> list[str]:
    """Processes outside this run using CPU right now (other engineers' test suites, ...)."""
    try:
        import psutil  # type: ignore[import-untyped]
    except ImportError:
        return []
    ours = {os.getpid()}
    with contextlib.suppress(Exception):
        ours |= {p.pid for p in psutil.Process().children(recursive=True)}
    procs = []
    for p in psutil.process_iter(["pid", "name", "cmdline"]):
        if p.pid in ours:
            continue
        with contextlib.suppress(Exception):
            p.cpu_percent(None)
            procs.append(p)
    time.sleep(0.5)
    busy = []
    for p in procs:
        with contextlib.suppress(Exception):
            pct = p.cpu_percent(None)
            if pct >= 5:
                cmd = " ".join(p.info.get("cmdline") or [p.info.get("name") or "?"])[:80]
                busy.append((pct, f"{pct:.0f}% {cmd}"))
    return [s for _, s in sorted(busy, reverse=True)[:limit]]


def machine() -> dict[str, Any]:
    status = _git("status", "--porcelain")
    return {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "hostname": platform.node(),
        "os": f"{platform.system()} {platform.release()}",
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "memory_mb": _mem_total_mb(),
        "python": platform.python_version(),
        "load_avg_start": [round(x, 2) for x in os.getloadavg()],
        "git_commit": _git("rev-parse", "--short", "HEAD") or os.environ.get("BENCH_COMMIT"),
        "git_dirty": bool(status) if status is not None else None,
        "busy_processes_at_start": other_busy_processes(),
    }
