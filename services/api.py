"""`python -m services.api`: the HTTP API."""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import Iterator

import uvicorn

from infra.config import Settings
from infra.http.app import create_app
from services.bootstrap import build_api, require_servers, setup_logging


class _Server(uvicorn.Server):
    # uvicorn re-raises SIGTERM after its graceful shutdown, so the process would die "by signal";
    # here the signal only asks the server to exit, and the process ends with status 0.
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.handle_exit, sig, None)
        yield


def main() -> None:
    setup_logging("api")
    settings = Settings.from_env()
    require_servers(settings)  # before uvicorn: a clear line, not a failed lifespan
    app = create_app(
        lambda: build_api(settings),
        cors_origins=settings.cors_origins,
        max_body_bytes=settings.max_body_bytes,
        max_json_depth=settings.max_json_depth,
    )
    config = uvicorn.Config(
        app,
        host=settings.api_host,
        port=settings.api_port,
        log_level="warning",
        log_config=None,  # uvicorn's lines go through setup_logging's format; requests: infra/http/access.py
        access_log=False,
        timeout_graceful_shutdown=5,
    )
    asyncio.run(_Server(config).serve())


if __name__ == "__main__":
    main()
