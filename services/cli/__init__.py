"""The `pipelines` command line: `main` runs it and returns its exit code (services.cli.errors)."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from services.cli.app import app
from services.cli.errors import CliError
from services.cli.render import err

__all__ = ["main"]


def main(argv: Sequence[str] | None = None) -> int:
    try:
        app(args=None if argv is None else list(argv), prog_name="pipelines", standalone_mode=True)
    except SystemExit as exc:
        code = exc.code
        return code if isinstance(code, int) else (0 if code is None else 1)
    except CliError as exc:
        err.print(f"error: {exc.message}", markup=False, style="red")
        for detail in exc.details:
            err.print(f"  {detail}", markup=False)
        return exc.code
    return 0


if __name__ == "__main__":
    sys.exit(main())
