"""`python -m services.api`: the HTTP API."""

from __future__ import annotations

import uvicorn

from infra.api.app import create_app
from infra.config import Settings
from services.bootstrap import build_api, setup_logging


def main() -> None:
    setup_logging("api")
    settings = Settings.from_env()
    app = create_app(lambda: build_api(settings))
    uvicorn.run(
        app,
        host=settings.api_host,
        port=settings.api_port,
        log_level="warning",
        access_log=False,
        timeout_graceful_shutdown=5,
    )


if __name__ == "__main__":
    main()
