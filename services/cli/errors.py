"""The command line's exit codes, and the error that carries one to `main`."""

from __future__ import annotations

from collections.abc import Sequence

OK = 0
FAILED = 1  # the run failed, the API refused the command, or the file is invalid
USAGE = 2  # what click/typer answers for a bad command line too
CANCELLED = 3  # the run was cancelled or stopped
AUTH = 4  # 401 or 403
UNREACHABLE = 5  # no answer from the API or the gateway
INTERRUPTED = 130  # Ctrl-C stopped following (the run goes on)


class CliError(Exception):
    """Printed on stderr (with its details, one a line) by `main`, which exits with `code`."""

    def __init__(self, message: str, code: int = FAILED, details: Sequence[str] = ()) -> None:
        super().__init__(message)
        self.message = message
        self.code = code
        self.details = list(details)
