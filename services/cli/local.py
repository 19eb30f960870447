"""`pipelines up` runs the whole system on this machine; `pipelines token` prints a development JWT."""

from __future__ import annotations

import logging
import signal
import sys
import threading
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, Annotated

import typer

from infra.auth import ROLES, issue_token
from infra.config import Settings
from services.dev.endpoints import CLUSTER_SERVICES, SERVICES

if TYPE_CHECKING:
    from services.dev.stack import Stack


def _settings() -> Settings:
    """Settings.from_env(), with its warnings printed as one plain line on stderr."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        settings = Settings.from_env()
    for warning in caught:
        print(f"warning: {warning.message}", file=sys.stderr)
    return settings


def _one_of(choices: Sequence[str]) -> Callable[[list[str] | None], list[str] | None]:
    """A check that every value of a repeatable option is one of `choices` (exit 2 otherwise)."""

    def check(values: list[str] | None) -> list[str] | None:
        for value in values or []:
            if value not in choices:
                raise typer.BadParameter(f"{value!r} is not one of {', '.join(choices)}")
        return values

    return check


def token(
    sub: Annotated[str, typer.Option("--sub", help="subject (user name)")],
    role: Annotated[
        list[str] | None,
        typer.Option("--role", callback=_one_of(ROLES), help=f"role (repeatable): {', '.join(ROLES)}"),
    ] = None,
    org: Annotated[str | None, typer.Option("--org", help="organisation claim")] = None,
    ttl: Annotated[int, typer.Option("--ttl", metavar="SECONDS", help="lifetime (default one day)")] = 24 * 3600,
) -> None:
    """Print a bearer token signed with PIPELINES_JWT_SECRET."""
    settings = _settings()
    roles = list(dict.fromkeys(role or []))
    print(issue_token(settings, sub=sub, roles=roles, org=org, ttl_seconds=ttl))


def _token_command() -> str:
    local = Path(".venv/bin/pipelines")
    exe = str(local) if local.exists() else "pipelines"
    return f"{exe} token --sub alice --role admin"


_TOOLING_LOGGERS = ("services.dev", "infra")


class _StackLogHandler(logging.Handler):
    """Routes log records of the embedded servers and the supervisor through the stack's prefixed output."""

    def __init__(self, stack: Stack) -> None:
        super().__init__(logging.WARNING)
        self.stack = stack

    def emit(self, record: logging.LogRecord) -> None:
        self.stack.say(self.format(record))


def up(
    service: Annotated[
        list[str] | None,
        typer.Option(
            "--service",
            metavar="NAME",
            callback=_one_of(CLUSTER_SERVICES),
            help=f"run only this service (repeatable): {', '.join(SERVICES)} (with --cluster also api-2 etc.)",
        ),
    ] = None,
    package: Annotated[str, typer.Option("--package", hidden=True)] = "services",
    cluster: Annotated[
        bool,
        typer.Option(
            "--cluster",
            help="the cluster profile (make up-cluster): a 3-node NATS cluster, two of every service; "
            "see docs/scaling.md",
        ),
    ] = False,
) -> None:
    """Run every service in the foreground (embedded PostgreSQL and NATS unless URLs are given).

    Runs api, relay, executor, projector and gateway, each as its own process, restarted when it dies.
    Without PIPELINES_DATABASE_URL / PIPELINES_NATS_URL it starts an embedded PostgreSQL and
    nats-server -js under PIPELINES_DATA_DIR (default .data). Ctrl-C stops everything.
    """
    if cluster:
        raise typer.Exit(_up(service or list(CLUSTER_SERVICES), package, cluster=True))
    raise typer.Exit(_up(service or list(SERVICES), package))


def _up(services: list[str], package: str, *, cluster: bool = False) -> int:
    # Imported here, not at the top: the supervisor pulls in psycopg (about 0.4 s), which every other
    # command would pay at start-up for nothing.
    from services.dev.cluster import cluster_stack
    from services.dev.stack import Stack, StackError

    _settings()  # validates the environment early; warns when PIPELINES_JWT_SECRET is unset
    if cluster:
        stack = cluster_stack(services=services, package=package)
    else:
        stack = Stack(services=services, package=package)
    handler = _StackLogHandler(stack)
    # services.dev: the embedded servers and stale processes (before the move they were infra.servers).
    loggers = [logging.getLogger(name) for name in _TOOLING_LOGGERS]
    for logger in loggers:
        logger.addHandler(handler)
        logger.setLevel(logging.INFO)

    stop = threading.Event()
    signals = 0

    def on_signal(signum: int, frame: FrameType | None) -> None:
        nonlocal signals
        signals += 1
        if signals == 1:
            stack.say(f"{signal.Signals(signum).name}: stopping (again to kill at once)")
            stop.set()
        else:
            stack.force_kill()

    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, on_signal)
    try:
        try:
            stack.start()
        except StackError as exc:
            stack.say(f"could not start: {exc}")
            return 1
        for line in stack.banner(_token_command()):
            stack.say(line)
        stack.say("Ctrl-C stops everything")
        while not stop.wait(0.5):
            pass
    finally:
        stack.stop()
        for logger in loggers:
            logger.removeHandler(handler)
    stack.say("stopped")
    return 0


def register(app: typer.Typer) -> None:
    app.command(epilog="Example: pipelines up --service api --service gateway")(up)
    app.command(epilog="Example: pipelines token --sub alice --role admin --org acme")(token)
