"""The fault suite's own system: every service as a separate process (services/dev/stack.py `Stack`)
against a fresh database on the session's PostgreSQL server and a NATS server of its own, which
the tests stop and start again.

Function-scoped: each fault test gets a new database, a new NATS server (hence its own JetStream
stream, deleted with the server's store) and new processes, all gone before the next test starts.
The services' output goes to `<tmp_path>/stack.log` (echoed to stderr with PIPELINES_FAULT_ECHO=1).
"""

from __future__ import annotations

import contextlib
import io
import os
import signal
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import httpx
import pytest

from infra.auth import issue_token
from infra.config import Settings
from services.dev.nats import RunningNats, start_nats
from services.dev.ports import free_port
from services.dev.stack import Stack
from tests import servers

JWT_SECRET = "fault-suite-secret-0123456789abcdef0123"

# Timers shortened so that faults are noticed within the suite's time budget.
FAULT_ENV = {
    "PIPELINES_POLL_INTERVAL": "0.05",
    "PIPELINES_ACK_WAIT": "2",
    "PIPELINES_KILL_GRACE": "0.3",
    "PIPELINES_LEASE_TTL": "1.5",
    "PIPELINES_SWEEP_INTERVAL": "0.2",
    "PIPELINES_STAGE_TIMEOUT": "30",
}


class _Log(io.StringIO):
    """The services' output: kept in a file (and its tail in memory), echoed when asked to."""

    def __init__(self, path: Path) -> None:
        super().__init__()
        self.path = path
        self._file: TextIO = path.open("a", encoding="utf-8")
        self._echo = bool(os.environ.get("PIPELINES_FAULT_ECHO"))
        self._tail: list[str] = []

    def write(self, s: str) -> int:
        self._file.write(s)
        if self._echo:
            sys.stderr.write(s)
        self._tail.append(s)
        if len(self._tail) > 400:
            del self._tail[:200]
        return len(s)

    def flush(self) -> None:
        with contextlib.suppress(ValueError):
            self._file.flush()

    def tail(self, chars: int = 6000) -> str:
        return "".join(self._tail)[-chars:]

    def close(self) -> None:
        with contextlib.suppress(ValueError):
            self._file.close()
        super().close()


@dataclass
class FaultStack:
    stack: Stack
    nats: RunningNats
    nats_dir: Path
    database_url: str
    settings: Settings
    api: str
    log: _Log
    effects_dir: Path

    def token(self, *roles: str, sub: str = "chaos") -> str:
        return issue_token(self.settings, sub=sub, roles=list(roles or ("admin",)), org=None)

    def headers(self, *roles: str, sub: str = "chaos") -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token(*roles, sub=sub)}"}

    def restart_nats(self, *, hard: bool = False) -> float:
        """Stop nats-server (SIGTERM, or SIGKILL when `hard`) and start it again on the same port
        and store; returns the seconds it was away."""
        began = time.monotonic()
        port = self.nats.port
        if hard:
            self.nats.process.send_signal(signal.SIGKILL)
            self.nats.process.wait(10)
        self.nats.stop()
        self.nats = start_nats(self.nats_dir, port=port)
        return time.monotonic() - began

    def kill(self, service: str, timeout: float = 30.0) -> float:
        """kill -9 one service and wait until the supervisor has started it again; returns the
        seconds until its new process runs."""
        began = time.monotonic()
        before = self.stack.restarts(service)
        old = self.stack.pid(service)
        assert old is not None, f"{service} is not running"
        self.stack.send_signal(service, signal.SIGKILL)
        while self.stack.restarts(service) == before or self.stack.pid(service) in (None, old):
            if time.monotonic() - began > timeout:
                raise AssertionError(f"{service} was not restarted within {timeout}s:\n{self.log.tail()}")
            time.sleep(0.02)
        return time.monotonic() - began

    def ready(self, timeout: float = 30.0) -> float:
        """Wait until the api answers /readyz with 200 (database, NATS and gateway reachable)."""
        began = time.monotonic()
        while True:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"{self.api}/readyz", timeout=2).status_code == 200:
                    return time.monotonic() - began
            if time.monotonic() - began > timeout:
                raise AssertionError(f"the stack was not ready within {timeout}s:\n{self.log.tail()}")
            time.sleep(0.05)


@pytest.fixture
def fault(database_url: str, tmp_path: Path) -> Iterator[FaultStack]:
    nats_dir = tmp_path / "nats"
    # Scripts run as `nobody` when the tests run as root: their effects file must be reachable.
    effects_dir = Path(tmp_path_for_scripts())
    log = _Log(tmp_path / "stack.log")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIPELINES_")} | {
        "PIPELINES_JWT_SECRET": JWT_SECRET,
        "PIPELINES_EVENTS_STREAM": f"FAULT_{uuid.uuid4().hex[:10]}",
        **FAULT_ENV,
    }
    with servers.fresh_database(database_url, prefix="pipelines_fault") as db_url:
        nats = start_nats(nats_dir)
        stack = Stack(
            env,
            database_url=db_url,
            nats_url=nats.url,
            nats_creds=nats.credentials,  # each service as its own broker user
            data_dir=tmp_path / "stack",
            api_port=free_port(),
            gateway_port=free_port(),
            output=log,
            backoff=0.1,
            max_backoff=1.0,
            stable_after=3.0,
        )
        fs = FaultStack(
            stack=stack,
            nats=nats,
            nats_dir=nats_dir,
            database_url=db_url,
            settings=Settings.from_env(env | {"PIPELINES_DATABASE_URL": db_url, "PIPELINES_NATS_URL": nats.url}),
            api=stack.api_url,
            log=log,
            effects_dir=effects_dir,
        )
        try:
            stack.start()
            assert stack.wait_listening(60), log.tail()
            fs.ready(60)
            yield fs
        finally:
            stack.stop()
            fs.nats.stop()
            log.close()
            with contextlib.suppress(OSError):
                for f in effects_dir.iterdir():
                    f.unlink()
                effects_dir.rmdir()
            print(f"\nfault suite: services' output in {log.path}")


def tmp_path_for_scripts() -> str:
    import tempfile

    path = tempfile.mkdtemp(prefix="pipelines-fault-effects-")
    os.chmod(path, 0o777)
    return path
