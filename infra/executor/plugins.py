"""Step plugins: `uses: <name>` in a job's step runs the entry point `<name>` of the group
`pipelines.steps`, in a process of its own.

A plugin is a callable `run(action, args, context) -> int | bool | None` (None, True or 0 is
success). It runs in a fresh Python process (the service's interpreter) with the step's clean
environment, its working directory the run's, its stdout and stderr streamed into the run's log
line by line, and the step's timeout, stop and kill like any script. `context` holds the run's
variables, trigger, matrix values and the results of earlier jobs and steps (never secrets: those
are in the environment, as for scripts).
"""

from __future__ import annotations

import shlex
import sys
from importlib.metadata import entry_points
from typing import Any

import msgspec

GROUP = "pipelines.steps"

# Runs in the plugin's own process: reads the request from the environment, loads the entry
# point, calls it, exits 0 on success.
_HOST = """
import json, os, sys, traceback
from importlib.metadata import entry_points
request = json.loads(os.environ.pop("PIPELINES_STEP_REQUEST"))
found = [e for e in entry_points(group="pipelines.steps") if e.name == request["uses"]]
if not found:
    print(f"no step plugin named {request['uses']!r} is installed (entry-point group pipelines.steps)", file=sys.stderr)
    sys.exit(127)
try:
    result = found[0].load()(request["action"], request["args"], request["context"])
except Exception:
    traceback.print_exc()
    sys.exit(1)
sys.stdout.flush()
if result is None or result is True or result == 0:
    sys.exit(0)
sys.exit(result if isinstance(result, int) and not isinstance(result, bool) and 0 < result < 256 else 1)
"""

_json = msgspec.json.Encoder()


def installed() -> frozenset[str]:
    """The step kinds `uses` may name."""
    return frozenset(e.name for e in entry_points(group=GROUP))


def plugin_command(
    uses: str, action: str | None, args: dict[str, Any], context: dict[str, Any]
) -> tuple[str, dict[str, str]]:
    """The shell command that runs the plugin, and the environment it needs beside the step's."""
    request = {
        "uses": uses,
        "action": action,
        "args": args,
        "context": {k: v for k, v in context.items() if k != "secrets"},
    }
    command = f"exec {shlex.quote(sys.executable)} -I -c {shlex.quote(_HOST)}"
    return command, {"PIPELINES_STEP_REQUEST": _json.encode(request).decode()}
