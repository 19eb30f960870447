"""Opt-in marks of where a run is, for the timeline of `python -m bench --only trace`
(docs/benchmarks.md): which hop of a run's critical path takes how long.

`PIPELINES_TRACE=<file>`: every process of the stack appends one JSON line per mark to that file,
`{"t": seconds, "p": process, "hop": name, "run": run id or null, "what": detail}`. The time is the
wall clock (`time.time()`), as PostgreSQL's `now()`, the NATS server's stored times and the bench
client's: on one machine they are one clock. A line is one `write` to a file opened `O_APPEND`, so
the processes' lines never interleave.

Unset (the default, and production): `mark` and `records` return at their first test, and nothing
else runs; call sites pass only values they already hold, so tracing off costs a call per hop.
The executor names the run a task works for once (`enter_run`); the marks of its units, scripts
and sandboxes then carry it without being told.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Iterable
from contextvars import ContextVar

from infra.store.records import RecordedEvent

VARIABLE = "PIPELINES_TRACE"

_fd: int | None = None
_process = ""
_run: ContextVar[str | None] = ContextVar("pipelines_trace_run", default=None)


def configure(path: str | None) -> None:
    """Write marks to `path` from now on (None: stop). Done once at import from the environment."""
    global _fd, _process
    if _fd is not None:
        os.close(_fd)
        _fd = None
    if path:
        _fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        _process = _process_name()


def _process_name() -> str:
    # `python -m services.executor` (or bench.unsandboxed.executor): "executor".
    spec = getattr(sys.modules.get("__main__"), "__spec__", None)
    name = spec.name if spec is not None else os.path.basename(sys.argv[0] if sys.argv else "")
    return f"{name.rsplit('.', 1)[-1]}[{os.getpid()}]"


def enabled() -> bool:
    return _fd is not None


def run_of(stream_id: str) -> str | None:
    """The run a stream belongs to: `run-<id>` and `runlog-<id>`."""
    kind, _, ident = stream_id.partition("-")
    return ident if kind in ("run", "runlog") else None


def enter_run(run_id: str) -> None:
    """The current task (and the tasks it starts from now on) works for this run."""
    if _fd is not None:
        _run.set(run_id)


def mark(hop: str, run: str | None = None, what: str = "") -> None:
    if _fd is None:
        return
    _write(time.time(), hop, run if run is not None else _run.get(), what)


def records(hop: str, recs: Iterable[RecordedEvent]) -> None:
    """One mark per stored event, its type as the detail (the relay's, projector's and gateway's hops)."""
    if _fd is None:
        return
    now = time.time()
    for rec in recs:
        _write(now, hop, rec.run_id or run_of(rec.stream_id), rec.event_type)


def appended(stream_id: str, events: Iterable[object]) -> None:
    """An append returned (committed): its stream's run and the types of the events it wrote (their
    tags, as in the store)."""
    if _fd is None:
        return
    now = time.time()
    _write(now, "appended", run_of(stream_id), ",".join(_tag(e) for e in events))


def _tag(event: object) -> str:
    config = getattr(type(event), "__struct_config__", None)
    return str(getattr(config, "tag", None) or type(event).__name__)


def _write(t: float, hop: str, run: str | None, what: str) -> None:
    assert _fd is not None
    line = json.dumps({"t": t, "p": _process, "hop": hop, "run": run, "what": what}) + "\n"
    try:
        os.write(_fd, line.encode())
    except OSError:
        pass  # a full disk must not stop a service that is being traced


configure(os.environ.get(VARIABLE))
