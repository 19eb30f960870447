"""The one place that assembles dependencies for every service, and the shared run loop."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import sys
from collections.abc import Awaitable, Callable, Iterator, Mapping
from typing import TYPE_CHECKING, TextIO

from infra.app.commands import Commands
from infra.broker import bus
from infra.config import Settings
from infra.git.credentials import StoredGitCredentials
from infra.git.repos import GitRepos
from infra.http.deps import Deps
from infra.http.idempotency import IdempotencyKeys
from infra.http.queries import ReadModels
from infra.logs import JsonFormatter, TextFormatter
from infra.metrics import serve
from infra.secrets import SecretStore, load_key_material
from infra.store.migrate import migrate, open_pool
from infra.store.postgres import PostgresEventStore
from infra.stored_secrets import StoredSecrets

if TYPE_CHECKING:
    from nats.aio.client import Client as NATS
    from psycopg_pool import AsyncConnectionPool


class _Handler(logging.StreamHandler):  # type: ignore[type-arg]
    """The handler setup_logging installs (replaced, not doubled, by a second call)."""


def setup_logging(
    service: str, *, stream: TextIO | None = None, env: Mapping[str, str] | None = None
) -> logging.Handler:
    """Every service logs to stderr in one format: text, or JSON lines with PIPELINES_LOG_FORMAT=json
    (for log shippers); secrets are redacted from every line (infra.logs)."""
    fmt = (os.environ if env is None else env).get("PIPELINES_LOG_FORMAT") or "text"
    if fmt not in ("text", "json"):
        raise SystemExit(f"PIPELINES_LOG_FORMAT must be 'text' or 'json', not {fmt!r}")
    handler = _Handler(stream if stream is not None else sys.stderr)
    handler.setFormatter(JsonFormatter(service) if fmt == "json" else TextFormatter(service))
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _Handler)]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    # httpx logs every request's full URL at INFO (a webhook URL is a credential); websockets logs
    # each handshake, which the gateway's own request line already records.
    for noisy in ("httpx", "httpcore", "websockets"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    return handler


def require_servers(settings: Settings) -> None:
    """Exit with the reason when no PostgreSQL or NATS URL is known: never a guessed server."""
    problem = settings.servers_problem()
    if problem is not None:
        raise SystemExit(f"cannot start: {problem}")


async def open_store(settings: Settings, *, max_size: int = 10) -> tuple[AsyncConnectionPool, PostgresEventStore]:
    require_servers(settings)
    await migrate(settings.database_url)
    pool = await open_pool(settings.database_url, max_size=max_size)
    return pool, PostgresEventStore(pool)


def _idempotency_retention_hours() -> float:
    """PIPELINES_IDEMPOTENCY_RETENTION_HOURS: how long a response stays answerable to its key (24)."""
    raw = os.environ.get("PIPELINES_IDEMPOTENCY_RETENTION_HOURS", "24")
    try:
        hours = float(raw)
    except ValueError:
        hours = 0.0
    if not 0 < hours <= 24 * 365:
        raise ValueError(f"PIPELINES_IDEMPOTENCY_RETENTION_HOURS must be more than 0 and at most 8760, not {raw!r}")
    return hours


async def build_api(settings: Settings) -> Deps:
    require_servers(settings)
    key = load_key_material(settings)  # the run secrets' key (created when missing): fails fast
    pool, store = await open_store(settings, max_size=20)
    secrets = SecretStore(pool, key)
    nc = await connect_nats(settings, "api")
    poker = bus.Poker(nc)
    poker.start()
    waker = bus.RunWaker(nc, settings.events_stream)
    commands = Commands(
        store,
        on_append=poker.poke,
        on_run_appended=waker.wake,
        git=GitRepos.from_settings(settings),
        git_credentials=StoredGitCredentials(StoredSecrets(secrets)),
        limits=settings.definition_limits(),
    )

    async def ready() -> dict[str, bool]:
        checks = {"database": False, "nats": nc.is_connected, "gateway": False}
        with contextlib.suppress(Exception):
            async with pool.connection() as conn:
                await conn.execute("SELECT 1")
            checks["database"] = True
        with contextlib.suppress(Exception):
            reader, writer = await asyncio.wait_for(
                asyncio.open_connection(settings.gateway_host, settings.gateway_port), 1
            )
            writer.write(b"GET /healthz HTTP/1.1\r\nHost: gateway\r\nConnection: close\r\n\r\n")
            await writer.drain()
            status = await asyncio.wait_for(reader.readline(), 1)
            writer.close()
            checks["gateway"] = b" 200 " in status
        return checks

    async def close() -> None:
        await poker.stop()
        with contextlib.suppress(Exception):
            await nc.drain()
        await pool.close()

    return Deps(
        settings=settings,
        commands=commands,
        read_models=ReadModels(pool),
        idempotency=IdempotencyKeys(pool, retention_hours=_idempotency_retention_hours()),
        ready=ready,
        close=close,
        secrets=secrets,
        nc=nc,
    )


async def connect_nats(settings: Settings, service: str) -> NATS:
    """Connect as `service` (api, relay, executor, gateway, projector), with its own credentials."""
    require_servers(settings)
    return await bus.connect(settings.nats_url, f"pipelines-{service}", settings.nats_creds_for(service))


@contextlib.contextmanager
def metrics_served(host: str, port: int) -> Iterator[None]:
    """This process's metrics at http://host:port/metrics meanwhile (port 0: not served)."""
    try:
        stop = serve(host, port)
    except OSError as exc:
        raise SystemExit(f"cannot serve the metrics on {host}:{port}: {exc}") from exc
    if stop is not None:
        logging.getLogger("pipelines").info("metrics at http://%s:%d/metrics", host, port)
    try:
        yield
    finally:
        if stop is not None:
            stop()


def run_until_signalled(
    service: str, body: Callable[[asyncio.Event], Awaitable[None]], *, metrics: tuple[str, int] | None = None
) -> None:
    """Run `body(stop)` until SIGTERM or SIGINT sets `stop`; exit 0 after it drains. `metrics`
    (host, port): where the process serves its metrics meanwhile (port 0: not served)."""
    setup_logging(service)

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await body(stop)

    host, port = metrics or ("", 0)
    with metrics_served(host, port):
        asyncio.run(main())
