"""Errors of the development tooling: its servers and the `make up` stack."""

from __future__ import annotations

__all__ = ["PortTaken", "ServerError", "StackError"]


class ServerError(RuntimeError):
    """An embedded server could not be started (the message carries the tail of its log)."""


class PortTaken(Exception):
    """A server could not listen on the port it was given (another process holds it)."""


class StackError(RuntimeError):
    """The stack could not be started."""
