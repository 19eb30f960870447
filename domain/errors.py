"""Errors the deciders raise. The API maps them to HTTP status codes."""


class DomainError(Exception):
    """Base class of refusals by the domain."""


class Refused(DomainError):
    """The command is not allowed in the aggregate's current state (HTTP 400)."""


class NotFound(DomainError):
    """The aggregate does not exist, or no longer does (HTTP 404)."""


class Invalid(DomainError):
    """The command carries bad input (HTTP 400). `errors` maps a field path to what is wrong."""

    def __init__(self, errors: dict[str, str]) -> None:
        self.errors = errors
        super().__init__("; ".join(f"{k}: {v}" for k, v in errors.items()))
