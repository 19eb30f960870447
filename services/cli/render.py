"""What the commands print: JSON for scripts, tables and run trees for people (rich), status lines."""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from enum import StrEnum
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table
from rich.tree import Tree

# Log lines and answers go to stdout; status changes, progress and errors to stderr.
out = Console(highlight=False, soft_wrap=True)
err = Console(stderr=True, highlight=False, soft_wrap=True)

_STYLE = {
    "succeeded": "green",
    "failed": "red",
    "timeout": "red",
    "cancelled": "yellow",
    "waiting_approval": "magenta",
    "paused": "yellow",
    "running": "cyan",
    "skipped": "dim",
}


class Output(StrEnum):
    text = "text"
    json = "json"


OutputOption = Annotated[
    Output, typer.Option("--output", "-o", help="text for people, or json: the API's JSON, unchanged")
]


def emit_json(data: Any) -> None:
    """The API's JSON, unchanged (plain print: no markup, no wrapping)."""
    sys.stdout.write(json.dumps(data, indent=2) + "\n")


def status(value: str | None) -> str:
    text = value or "-"
    style = _STYLE.get(text)
    return f"[{style}]{text}[/]" if style else text


def duration(ms: int | None) -> str:
    if ms is None:
        return ""
    if ms < 1000:
        return f"{ms}ms"
    seconds = ms / 1000
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, rest = divmod(int(seconds), 60)
    return f"{minutes}m{rest:02d}s"


def table(columns: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    grid = Table(box=None, pad_edge=False, header_style="bold")
    for column in columns:
        grid.add_column(column, overflow="fold")
    for row in rows:
        grid.add_row(*("" if cell is None else str(cell) for cell in row))
    out.print(grid)


def fields(pairs: Sequence[tuple[str, Any]]) -> None:
    width = max(len(k) for k, _ in pairs)
    for key, value in pairs:
        out.print(f"{key.ljust(width)}  {'' if value is None else value}", markup=False)


def run_tree(run: dict[str, Any]) -> None:
    """The run, its stages, their jobs and steps, each with its status and duration."""
    title = f"run {run['id']}  {status(run['status'])}  {duration(run.get('durationMs'))}"
    tree = Tree(title.rstrip())
    for stage in run.get("stageResults") or []:
        label = stage.get("name") or stage["stageId"]
        node = tree.add(f"stage {label}  {status(stage['status'])}  {duration(stage.get('durationMs'))}".rstrip())
        if stage.get("error"):
            node.add(f"[red]{stage['error']}[/]")
        for job in stage.get("jobs") or []:
            jnode = node.add(f"job {job['name']}  {status(job['status'])}  {duration(job.get('durationMs'))}".rstrip())
            for step in job.get("steps") or []:
                line = f"step {step['name']}  {status(step['status'])}  {duration(step.get('durationMs'))}".rstrip()
                if step.get("error"):
                    line += f"  [red]{step['error']}[/]"
                jnode.add(line)
    out.print(tree)
    if run.get("statusReason"):
        out.print(f"reason: {run['statusReason']} ({run.get('statusBy')})", markup=False)


class Progress:
    """A spinner on a terminal while waiting; nothing at all when output is piped. Only when both
    streams are terminals: the spinner routes stdout through stderr while it spins."""

    def __init__(self, message: str) -> None:
        self.message = message
        self._status: Any = None

    def __enter__(self) -> Progress:
        if err.is_terminal and out.is_terminal:
            self._status = err.status(self.message)
            self._status.__enter__()
        return self

    def update(self, message: str) -> None:
        if self._status is not None:
            self._status.update(message)

    def __exit__(self, *exc: object) -> None:
        if self._status is not None:
            self._status.__exit__(*exc)


def status_line(text: str, state: str | None = None) -> None:
    """A status change, on stderr (also when piped): `stage build: succeeded 1.2s`."""
    err.print(text, style=_STYLE.get(state or ""), markup=False, highlight=False)


def log_line(message: str, where: str | None = None) -> None:
    """A log line on stdout; on a terminal prefixed with where it comes from, plain when piped."""
    if where and out.is_terminal:
        out.print(f"[dim]{where} |[/] ", end="")
        out.print(message, markup=False, highlight=False)
    else:
        sys.stdout.write(message + "\n")
        sys.stdout.flush()
