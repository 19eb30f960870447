"""Runs one script stage: `/bin/sh -c` in its own process group and working directory, with a
clean environment, a timeout, and output delivered line by line.

The service's own environment (database URLs, the JWT secret) never reaches a script: the
environment is built from nothing but a fixed PATH and the run's own values.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

SAFE_PATH = "/usr/local/bin:/usr/bin:/bin"
_CHUNK = 64 * 1024
# A single line longer than this is cut into pieces so memory stays bounded.
MAX_LINE = 64 * 1024

OnLine = Callable[[Literal["stdout", "stderr"], str], None]


@dataclass(frozen=True)
class ScriptOutcome:
    exit_code: int | None
    timed_out: bool = False
    killed: bool = False
    error: str | None = None

    @property
    def succeeded(self) -> bool:
        return self.exit_code == 0 and not self.timed_out and not self.killed and self.error is None


def clean_env(workdir: Path, values: Mapping[str, str]) -> dict[str, str]:
    env = {
        "PATH": SAFE_PATH,
        "HOME": str(workdir),
        "LANG": "C.UTF-8",
        "LC_ALL": "C.UTF-8",
        "CI": "true",
    }
    env.update(values)
    return env


def _signal_group(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


class ScriptRun:
    """One running script; `stop()` ends its whole process group (TERM, then KILL)."""

    def __init__(self, *, kill_grace: float) -> None:
        self._proc: asyncio.subprocess.Process | None = None
        self._grace = kill_grace
        self._stopped = False
        self._started = asyncio.Event()

    async def _terminate(self) -> None:
        proc = self._proc
        if proc is None:
            return
        _signal_group(proc.pid, signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), self._grace)
        except TimeoutError:
            pass
        _signal_group(proc.pid, signal.SIGKILL)

    @property
    def pid(self) -> int | None:
        """The script's pid, which is also its process group id; None until it has started."""
        return self._proc.pid if self._proc is not None else None

    async def stop(self) -> None:
        self._stopped = True
        await self._terminate()

    async def run(
        self,
        command: str,
        *,
        workdir: Path,
        env: Mapping[str, str],
        timeout: float | None,
        on_line: OnLine,
    ) -> ScriptOutcome:
        workdir.mkdir(parents=True, exist_ok=True)
        try:
            proc = await asyncio.create_subprocess_exec(
                "/bin/sh",
                "-c",
                command,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                cwd=str(workdir),
                env=dict(env),
                start_new_session=True,  # its own session and process group
                close_fds=True,
            )
        except OSError as exc:
            return ScriptOutcome(exit_code=None, error=f"could not start the script: {exc}")
        self._proc = proc
        assert proc.stdout is not None and proc.stderr is not None
        readers = [
            asyncio.create_task(_pump(proc.stdout, "stdout", on_line)),
            asyncio.create_task(_pump(proc.stderr, "stderr", on_line)),
        ]
        timed_out = False
        try:
            await asyncio.wait_for(proc.wait(), timeout)
        except TimeoutError:
            timed_out = True
            await self._terminate()
            await proc.wait()
        except asyncio.CancelledError:
            await self._terminate()
            raise
        finally:
            # Children the script left behind would hold the pipes open: end the whole group.
            _signal_group(proc.pid, signal.SIGKILL)
            with contextlib.suppress(Exception):
                await asyncio.wait_for(asyncio.gather(*readers), 5)
            for r in readers:
                r.cancel()
        return ScriptOutcome(exit_code=proc.returncode, timed_out=timed_out, killed=self._stopped)


async def _pump(stream: asyncio.StreamReader, name: Literal["stdout", "stderr"], on_line: OnLine) -> None:
    pending = b""
    while True:
        chunk = await stream.read(_CHUNK)
        if not chunk:
            break
        pending += chunk
        *lines, pending = pending.split(b"\n")
        for line in lines:
            on_line(name, line.decode("utf-8", "replace").rstrip("\r"))
        while len(pending) > MAX_LINE:
            on_line(name, pending[:MAX_LINE].decode("utf-8", "replace"))
            pending = pending[MAX_LINE:]
    if pending:
        on_line(name, pending.decode("utf-8", "replace").rstrip("\r"))
