"""Following a run live on the gateway's WebSocket: log lines to stdout, status changes to stderr."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus, InvalidURI

from services.cli.errors import AUTH, CANCELLED, FAILED, OK, UNREACHABLE, CliError
from services.cli.render import Progress, duration, log_line, status_line

EXIT_OF = {"succeeded": OK, "failed": FAILED, "cancelled": CANCELLED}
# After the run's last status, how long to wait for log lines it names but that are still on their way.
LOG_DRAIN_SECONDS = 5.0
_DONE = {"succeeded", "failed", "cancelled", "timeout", "skipped"}


class Changes:
    """Status lines for what changed since the last view of the run: each stage, job and step as it
    starts and ends (a finished parent after its children), then the run itself."""

    def __init__(self) -> None:
        self.seen: dict[str, str] = {}
        self.approval_announced = False

    def _change(self, key: str, label: str, unit: dict[str, Any]) -> tuple[str, str] | None:
        state = str(unit.get("status"))
        before = self.seen.get(key)
        self.seen[key] = state
        if state == before or (before is None and state == "pending"):
            return None
        took = duration(unit.get("durationMs")) if state in _DONE else ""
        return f"{label}: {state} {took}".rstrip(), state

    def of(self, run: dict[str, Any]) -> list[tuple[str, str]]:
        lines: list[tuple[str, str]] = []
        for stage in run.get("stageResults") or []:
            sid = stage["stageId"]
            stage_line = self._change(sid, f"stage {stage.get('name') or sid}", stage)
            inner: list[tuple[str, str]] = []
            for job in stage.get("jobs") or []:
                jkey = f"{sid}/{job['name']}"
                job_line = self._change(jkey, f"job {jkey}", job)
                steps = [self._change(f"{jkey}/{s['name']}", f"step {jkey}/{s['name']}", s) for s in job["steps"]]
                inner += _ordered(job_line, [s for s in steps if s], job.get("status"))
            lines += _ordered(stage_line, inner, stage.get("status"))
        run_line = self._change("", f"run {run['id']}", run)
        if run_line:
            lines.append(run_line)
        return lines


def _ordered(parent: tuple[str, str] | None, children: list[tuple[str, str]], state: Any) -> list[tuple[str, str]]:
    if parent is None:
        return children
    return [*children, parent] if state in _DONE else [parent, *children]


def _where(data: dict[str, Any]) -> str:
    if data.get("job"):
        return f"{data['job']}/{data.get('step')}"
    return str(data.get("stage") or "")


async def follow(gateway_url: str, token: str | None, run_id: str, *, statuses: bool = True, logs: bool = True) -> int:
    """Follows the run until it ends; its exit code (0 succeeded, 1 failed, 3 cancelled or stopped)."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        async with connect(gateway_url, additional_headers=headers, open_timeout=10, max_size=None) as ws:
            return await _follow(ws, run_id, statuses=statuses, logs=logs)
    except InvalidStatus as exc:
        code = exc.response.status_code
        raise CliError(f"the gateway refused the connection: {code}", AUTH if code in (401, 403) else FAILED) from exc
    except (OSError, TimeoutError, InvalidURI, InvalidHandshake) as exc:
        raise CliError(f"cannot reach the gateway at {gateway_url}: {exc}", UNREACHABLE) from exc
    except ConnectionClosed as exc:
        raise CliError(f"the gateway closed the connection: {exc}", UNREACHABLE) from exc


async def _follow(ws: ClientConnection, run_id: str, *, statuses: bool, logs: bool) -> int:
    # Both channels from the start of the feed: the run's whole history, then live, no gap.
    for channel in ("runs", "logs"):
        request = {"action": "subscribe", "channel": channel, "params": {"runId": run_id}, "fromPosition": 0}
        await ws.send(json.dumps(request))
    changes = Changes()
    loop = asyncio.get_running_loop()
    final: dict[str, Any] | None = None
    expected_lines = received_lines = 0
    deadline = 0.0
    with Progress(f"run {run_id}: connecting") as progress:
        while final is None or received_lines < expected_lines:
            timeout = None if final is None else deadline - loop.time()
            if timeout is not None and timeout <= 0:
                break
            try:
                raw = await asyncio.wait_for(ws.recv(), timeout)
            except TimeoutError:
                break
            frame = json.loads(raw)
            event, data = frame.get("event"), frame.get("data") or {}
            if event == "error":
                raise CliError(f"gateway: {data.get('message')}", FAILED)
            if event == "pipeline.log":
                received_lines += 1
                if logs:
                    log_line(str(data.get("message", "")), _where(data))
            elif event == "pipeline.run.updated":
                progress.update(f"run {run_id}: {data['status']}")
                if statuses:
                    _report(changes, data)
                if final is None and data["status"] in EXIT_OF:
                    final = data
                    # The run's view names every line logged so far: wait for those still on their way.
                    expected_lines = str(data.get("logs") or "").count("\n")
                    deadline = loop.time() + LOG_DRAIN_SECONDS
    assert final is not None
    return EXIT_OF[final["status"]]


def _report(changes: Changes, run: dict[str, Any]) -> None:
    for text, state in changes.of(run):
        status_line(text, state)
    if run["status"] == "waiting_approval" and not changes.approval_announced:
        changes.approval_announced = True
        status_line(
            f"run {run['id']} waits for approval: someone with the admin role approves it with "
            f"`pipelines approve {run['id']}` (or rejects it with `pipelines reject {run['id']}`)",
            "waiting_approval",
        )
    elif run["status"] != "waiting_approval":
        changes.approval_announced = False
