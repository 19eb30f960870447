"""Child processes that lead their own process group, and processes left behind by an earlier run."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

__all__ = ["ManagedProcess", "RunAs", "cmdline", "pid_alive", "stop_stale_process"]

log = logging.getLogger(__name__)


def pid_alive(pid: int) -> bool:
    """Whether `pid` names a live process (a zombie is not one)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    # A zombie (exited, not yet reaped by its parent) is not alive.
    with contextlib.suppress(OSError):
        stat_line = Path(f"/proc/{pid}/stat").read_text()
        if stat_line.rpartition(")")[2].split()[:1] == ["Z"]:
            return False
    return True


def cmdline(pid: int) -> str | None:
    """The command line of a live process, or None when there is no such process."""
    if not pid_alive(pid):
        return None
    proc = Path(f"/proc/{pid}/cmdline")
    if Path("/proc/self").exists():
        try:
            return proc.read_bytes().replace(b"\0", b" ").decode("utf-8", "replace")
        except OSError:
            return None
    try:  # no /proc (macOS)
        out = subprocess.run(
            ["ps", "-o", "command=", "-p", str(pid)], capture_output=True, text=True, timeout=5, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def stop_stale_process(pid: int, marker: str, *, sig: int = signal.SIGTERM, timeout: float = 10.0) -> bool:
    """Stop a process left behind by an earlier run.

    Only when `pid` is alive and its command line contains `marker` (so that a recycled pid of an
    unrelated process is never touched). Sends `sig`, then SIGKILL to its process group after
    `timeout`. Returns whether such a process was found.
    """
    if pid <= 1 or pid == os.getpid():
        return False
    cmd = cmdline(pid)
    if cmd is None or marker not in cmd:
        return False
    log.warning("stopping process %d left behind by an earlier run: %s", pid, cmd.strip())
    pgid: int | None = None
    with contextlib.suppress(OSError):
        pgid = os.getpgid(pid)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)
    deadline = time.monotonic() + timeout
    while pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    if pid_alive(pid):
        log.warning("process %d did not exit after %.0fs; killing it", pid, timeout)
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    if pgid == pid:  # it led its own group: kill whatever it left in there
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signal.SIGKILL)
    deadline = time.monotonic() + 5
    while pid_alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    return True


@dataclass(frozen=True, slots=True)
class RunAs:
    """The unprivileged user a child runs as when we are root."""

    uid: int
    gid: int
    name: str

    def popen_kwargs(self) -> dict[str, Any]:
        return {"user": self.uid, "group": self.gid, "extra_groups": []}


class ManagedProcess:
    """A child process that leads its own process group (new session).

    Its output goes to `log_path` (appended), or line by line to `output` (merged stdout and
    stderr, read by a daemon thread), or is inherited when neither is given. `stop()` signals the
    process, waits, then SIGKILLs the whole group, and also kills whatever the process left in its
    group after exiting: nothing it started survives it.
    """

    def __init__(
        self,
        argv: Sequence[str | os.PathLike[str]],
        *,
        name: str | None = None,
        env: Mapping[str, str] | None = None,
        cwd: str | os.PathLike[str] | None = None,
        output: Callable[[str], None] | None = None,
        log_path: Path | None = None,
        run_as: RunAs | None = None,
        umask: int = -1,
    ) -> None:
        self.argv = [os.fspath(a) for a in argv]
        self.name = name or Path(self.argv[0]).name
        log_fd: int | None = None
        stdout: int | None = None
        if log_path is not None:
            log_fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
            stdout = log_fd
        elif output is not None:
            stdout = subprocess.PIPE
        extra = run_as.popen_kwargs() if run_as is not None else {}
        try:
            self._popen: subprocess.Popen[bytes] = subprocess.Popen(
                self.argv,
                env=dict(env) if env is not None else None,
                cwd=cwd,
                stdin=subprocess.DEVNULL,
                stdout=stdout,
                stderr=subprocess.STDOUT if stdout is not None else None,
                start_new_session=True,
                umask=umask,
                **extra,
            )
        finally:
            if log_fd is not None:
                os.close(log_fd)
        self.pid: int = self._popen.pid
        self.started_at = time.monotonic()
        self._reader: threading.Thread | None = None
        if output is not None and log_path is None:
            assert self._popen.stdout is not None
            self._reader = threading.Thread(
                target=_pump, args=(self._popen.stdout, output), name=f"output-{self.name}", daemon=True
            )
            self._reader.start()

    def __repr__(self) -> str:
        return f"<ManagedProcess {self.name} pid={self.pid} returncode={self._popen.returncode}>"

    @property
    def returncode(self) -> int | None:
        return self._popen.poll()

    def poll(self) -> int | None:
        return self._popen.poll()

    def alive(self) -> bool:
        return self._popen.poll() is None

    def wait(self, timeout: float | None = None) -> int | None:
        """The exit code, or None if the process is still running after `timeout` seconds."""
        try:
            return self._popen.wait(timeout)
        except subprocess.TimeoutExpired:
            return None

    def send_signal(self, sig: int) -> None:
        if self._popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.pid, sig)

    def signal_group(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, sig)

    def stop(self, timeout: float = 10.0, sig: int = signal.SIGTERM) -> int | None:
        """Send `sig`, wait up to `timeout` s, then SIGKILL the group. Returns the exit code."""
        if self._popen.poll() is None:
            self.send_signal(sig)
            if self.wait(timeout) is None:
                log.warning("%s (pid %d) did not stop within %.1fs; killing it", self.name, self.pid, timeout)
                self.signal_group(signal.SIGKILL)
                self.wait(5)
        self.signal_group(signal.SIGKILL)  # stragglers it left in its group
        self.join_output(1.0)
        return self._popen.returncode

    def kill(self) -> None:
        """SIGKILL the whole group now."""
        self.signal_group(signal.SIGKILL)
        self.wait(5)

    def join_output(self, timeout: float | None = None) -> None:
        if self._reader is not None:
            self._reader.join(timeout)


def _pump(stream: IO[bytes], output: Callable[[str], None]) -> None:
    try:
        for raw in iter(stream.readline, b""):
            # A broken sink must not stop the reader: the child would block on a full pipe.
            with contextlib.suppress(Exception):
                output(raw.decode("utf-8", "replace").rstrip("\r\n"))
    finally:
        with contextlib.suppress(OSError):
            stream.close()
