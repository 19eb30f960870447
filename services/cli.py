"""`pipelines` command line: `pipelines up` runs the whole system, `pipelines token` prints a JWT."""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
import warnings
from collections.abc import Sequence
from pathlib import Path
from types import FrameType

from infra.auth import ROLES, issue_token
from infra.config import Settings
from services.dev.stack import SERVICES, Stack, StackError


def _settings() -> Settings:
    """Settings.from_env(), with its warnings printed as one plain line on stderr."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        settings = Settings.from_env()
    for warning in caught:
        print(f"warning: {warning.message}", file=sys.stderr)
    return settings


def _token(args: argparse.Namespace) -> int:
    settings = _settings()
    roles = list(dict.fromkeys(args.role or []))
    print(issue_token(settings, sub=args.sub, roles=roles, org=args.org, ttl_seconds=args.ttl))
    return 0


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


def _up(args: argparse.Namespace) -> int:
    _settings()  # validates the environment early; warns when PIPELINES_JWT_SECRET is unset
    stack = Stack(services=args.service or SERVICES, package=args.package)
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


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pipelines", description="Event-sourced CI/CD pipeline orchestrator")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    up = commands.add_parser(
        "up",
        help="run every service in the foreground (embedded PostgreSQL and NATS unless URLs are given)",
        description=(
            "Runs api, relay, executor, projector and gateway, each as its own process, restarted when it dies. "
            "Without PIPELINES_DATABASE_URL / PIPELINES_NATS_URL it starts an embedded PostgreSQL and "
            "nats-server -js under PIPELINES_DATA_DIR (default .data). Ctrl-C stops everything."
        ),
    )
    up.add_argument(
        "--service", action="append", choices=SERVICES, metavar="NAME", help="run only this service (repeatable)"
    )
    up.add_argument("--package", default="services", help=argparse.SUPPRESS)
    up.set_defaults(func=_up)

    token = commands.add_parser(
        "token", help="print a JWT signed with PIPELINES_JWT_SECRET", description="Print a bearer token."
    )
    token.add_argument("--sub", required=True, help="subject (user name)")
    token.add_argument("--role", action="append", choices=ROLES, help="role (repeatable)")
    token.add_argument("--org", default=None, help="organisation claim")
    token.add_argument("--ttl", type=int, default=24 * 3600, metavar="SECONDS", help="lifetime (default one day)")
    token.set_defaults(func=_token)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    result: int = args.func(args)
    return result


if __name__ == "__main__":
    sys.exit(main())
