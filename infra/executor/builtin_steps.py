"""Step plugins that ship with the service (entry-point group `pipelines.steps`, see
infra.executor.plugins): each runs in its own process, in the run's working directory.

- `file`: `action: write` with `args: {path, content}` writes a file in the workspace;
  `action: check` with `args: {path, contains?}` fails unless the file exists (and holds the text).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any


def _inside(path: object) -> Path:
    if not isinstance(path, str) or not path:
        raise SystemExit("args.path must be a relative path inside the workspace")
    p = Path(path)
    if p.is_absolute() or ".." in p.parts:
        raise SystemExit(f"args.path {path!r} must be a relative path inside the workspace")
    return Path.cwd() / p


def file(action: str | None, args: dict[str, Any], context: dict[str, Any]) -> int:
    target = _inside(args.get("path"))
    if action == "write":
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(str(args.get("content", "")))
        target.chmod(0o644)
        print(f"wrote {target.stat().st_size} bytes to {args['path']}")
        return 0
    if action == "check":
        if not target.is_file():
            print(f"{args['path']} does not exist")
            return 1
        wanted = args.get("contains")
        if wanted is not None and str(wanted) not in target.read_text(errors="replace"):
            print(f"{args['path']} does not contain {wanted!r}")
            return 1
        print(f"{args['path']} is there")
        return 0
    print(f"unknown action {action!r} for the file plugin: write or check")
    return 2
