"""The sandbox a run's steps run in: the run's own PID and mount namespaces (a fresh /proc, a
private /tmp), no network when asked, resource limits and the run's uid; built from util-linux
(`unshare`, `nsenter`, `mount`, `setpriv`) and the shell's `ulimit`. Without root, scripts run as
before (logged once)."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import shutil
import signal
import stat
import sys
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("pipelines.sandbox")

_TOOLS_PATH = "/usr/bin:/bin:/usr/sbin:/sbin"
GIB = 1024**3


@dataclass(frozen=True)
class Limits:
    """Resource limits of a script (None: none). `procs` counts every process of the run's uid
    (RLIMIT_NPROC is per user), `memory` is each process's address space (RLIMIT_AS)."""

    procs: int | None = 4096
    open_files: int | None = 4096
    file_size: int | None = 4 * GIB
    memory: int | None = 8 * GIB


@dataclass(frozen=True)
class Sandbox:
    limits: Limits = Limits()
    # False: a network namespace of its own with only the loopback interface.
    network: bool = True


@functools.cache
def _tool(name: str) -> str | None:
    return shutil.which(name, path=_TOOLS_PATH)


@functools.cache
def unavailable() -> str | None:
    """Why scripts cannot be sandboxed on this host, or None when they can."""
    if os.geteuid() != 0:
        return "the executor is not root (namespaces and a uid per run need root)"
    missing = [t for t in ("unshare", "nsenter", "mount", "setpriv") if _tool(t) is None]
    if missing:
        return f"{', '.join(missing)} (util-linux) not found in {_TOOLS_PATH}"
    return None


@functools.cache
def warn_unsandboxed(reason: str) -> None:
    """Say once per process that scripts run without the sandbox, and why."""
    log.warning("scripts run WITHOUT the sandbox (no PID namespace, shared /tmp, no resource limits): %s", reason)


def private_dir_of(workdir: Path) -> Path:
    """The run's private directory: its /tmp and the files its steps are run from. Beside the work
    directory (not in it, so a run's workspace holds only what its scripts put there)."""
    return workdir.parent / ".sandbox" / workdir.name


def prologue(limits: Limits) -> str:
    """Shell that sets the limits, put before the script's first line (on that same line, so
    that the script's line numbers stay what they were). dash's ulimit takes one resource per
    call and, with neither -H nor -S, sets both: the script cannot raise them again. -p is
    RLIMIT_NPROC, -f is in 512-byte blocks, -v (RLIMIT_AS) in KiB."""
    parts = []
    if limits.procs is not None:
        parts.append(f"ulimit -p {limits.procs}")
    if limits.open_files is not None:
        parts.append(f"ulimit -n {limits.open_files}")
    if limits.file_size is not None:
        parts.append(f"ulimit -f {max(limits.file_size // 512, 1)}")
    if limits.memory is not None:
        parts.append(f"ulimit -v {max(limits.memory // 1024, 1)}")
    return "".join(f"{p} 2>/dev/null; " for p in parts)


@functools.cache
def hides_itself(private: Path) -> bool:
    """A private directory under /tmp (a work directory there: tests, a developer's data dir)
    would be hidden by the private /tmp mounted over it, with the run's workspace: such runs keep
    the host's /tmp (with TMPDIR pointing to their own), and a warning says so once."""
    hidden = Path(os.path.realpath(private)).is_relative_to("/tmp")
    if hidden:
        log.warning("the work directory is under /tmp: scripts keep the host's /tmp (TMPDIR is their own)")
    return hidden


def holder_init(sandbox: Sandbox) -> str:
    """What PID 1 of a run's namespaces runs, as root. Started ahead of need, it waits for its
    run: a line with the directory to mount on /tmp (`-`: none), then says it is ready and reaps
    the orphans the run's steps leave (a zombie still counts against the process limit) until it
    is killed; as PID 1 it ignores signals it has no handler for. If the executor dies before
    giving it a run, the line never comes (end of file) and it exits."""
    lines = ["set -e"]
    if not sandbox.network and _tool("ip") is not None:
        lines.append(f"{_tool('ip')} link set lo up")
    lines += [
        "read -r tmp",
        f'[ "$tmp" = - ] || {_tool("mount")} --bind "$tmp" /tmp',
        "echo ready",
        "exec >/dev/null 2>&1 </dev/null",
        "set +e",
        "while :; do sleep 3600 & wait; done",
    ]
    return "\n".join(lines)


class SandboxError(Exception):
    """A run's sandbox could not be started."""


class RunSandboxes:
    """One sandbox per run on this host, which the run's steps enter: starting one costs more
    than a step (new namespaces, a mount), entering one a little (nsenter; see `make bench`).

    The sandbox is held by a process of its own (`unshare`, whose child is PID 1 of the run's
    PID namespace, in the run's mount namespace and, with no network, its network namespace).
    Killing `unshare` kills PID 1 (--kill-child), and the kernel then kills everything left in
    the namespace. `close` does that when the run ends, from any executor process of the host
    (the holder's pid is kept in a directory only root reads)."""

    def __init__(self, sandbox: Sandbox) -> None:
        self.sandbox = sandbox
        self._pid1: dict[Path, tuple[asyncio.subprocess.Process, int]] = {}
        self._locks: dict[Path, asyncio.Lock] = {}
        # A holder started ahead of need, so that a run's first step does not wait for one.
        self._spare: asyncio.Task[asyncio.subprocess.Process] | None = None

    def prologue(self) -> str:
        return prologue(self.sandbox.limits)

    async def enter(self, private: Path, tmp: Path, workdir: Path, command: list[str]) -> list[str]:
        """The argv that runs `command` in the run's sandbox (started when it has none yet)."""
        lock = self._locks.setdefault(private, asyncio.Lock())
        async with lock:
            held = self._pid1.get(private)
            if held is None or held[0].returncode is not None:
                held = await self._start(private, tmp)
                self._pid1[private] = held
                if len(self._pid1) > 1000:  # runs that ended on another executor, which killed their holder
                    for key in [k for k, (proc, _) in self._pid1.items() if proc.returncode is not None]:
                        del self._pid1[key]
                        self._locks.pop(key, None)
        nsenter = _tool("nsenter")
        assert nsenter is not None
        flags = ["--pid", "--mount"] + ([] if self.sandbox.network else ["--net"])
        return [nsenter, f"--target={held[1]}", *flags, f"--wdns={workdir}", "--", *command]

    async def close(self, private: Path) -> None:
        """End the run's sandbox and everything still running in it."""
        self._locks.pop(private, None)
        held = self._pid1.pop(private, None)
        if held is not None and held[0].returncode is None:
            with contextlib.suppress(ProcessLookupError):
                held[0].kill()
            await held[0].wait()
        await asyncio.to_thread(_kill_recorded, private)

    async def aclose(self) -> None:
        """End the spare holder (the runs' own end with the runs)."""
        spare, self._spare = self._spare, None
        if spare is not None:
            with contextlib.suppress(OSError):
                proc = await spare
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()

    async def _holder(self) -> asyncio.subprocess.Process:
        unshare = _tool("unshare")
        assert unshare is not None
        flags = ["--pid", "--fork", "--kill-child", "--mount-proc", "--propagation=private"]
        if not self.sandbox.network:
            flags.append("--net")
        return await asyncio.create_subprocess_exec(
            unshare,
            *flags,
            "--",
            "/bin/sh",
            "-c",
            holder_init(self.sandbox),
            "pipelines-sandbox",
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
            env={"PATH": _TOOLS_PATH},
            cwd="/",
            start_new_session=True,  # not in the executor's process group: its signals are not the run's
            close_fds=True,
        )

    async def _take_spare(self) -> asyncio.subprocess.Process:
        spare, self._spare = self._spare, asyncio.create_task(self._holder())
        if spare is not None:
            with contextlib.suppress(OSError):
                proc = await spare
                if proc.returncode is None:
                    return proc
        return await self._holder()

    async def _start(self, private: Path, tmp: Path) -> tuple[asyncio.subprocess.Process, int]:
        _kill_recorded(private)  # a holder left by an executor that died (a stat when there is none)
        proc = await self._take_spare()
        assert proc.stdin is not None and proc.stdout is not None and proc.stderr is not None
        try:
            proc.stdin.write(b"-\n" if hides_itself(private) else f"{tmp}\n".encode())
            await proc.stdin.drain()
            proc.stdin.close()
            ready = await asyncio.wait_for(proc.stdout.readline(), 10)
            if ready.strip() != b"ready":
                problem = (await asyncio.wait_for(proc.stderr.read(), 5)).decode(errors="replace").strip()
                raise SandboxError(f"the run's sandbox did not start: {problem or 'no reason given'}")
            pid1 = _child_of(proc.pid)
        except BaseException:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            await proc.wait()
            raise
        _record(private, proc.pid)
        return proc, pid1


def _child_of(pid: int) -> int:
    children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    if len(children) != 1:
        raise SandboxError(f"the run's sandbox has {len(children)} init processes")
    return int(children[0])


def _record_path(private: Path) -> Path:
    return private.parent / ".holders" / private.name


def _started(pid: int) -> str:
    """The process's start time (clock ticks after boot): with the pid, names it (pids are reused)."""
    return Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[19]


def _record(private: Path, pid: int) -> None:
    path = _record_path(private)
    path.parent.mkdir(mode=0o700, exist_ok=True)
    path.write_text(f"{pid} {_started(pid)}\n")


def _kill_recorded(private: Path) -> None:
    """Kill the holder recorded for this run, if that pid is still its holder (not reused)."""
    path = _record_path(private)
    try:
        pid, started = path.read_text().split()
        if _started(int(pid)) == started:
            os.kill(int(pid), signal.SIGKILL)
    except (OSError, ValueError):
        pass
    path.unlink(missing_ok=True)


def setpriv_argv(uid: int, gid: int) -> list[str] | None:
    setpriv = _tool("setpriv")
    if setpriv is None:
        return None
    # setpriv drops to the user (no supplementary groups, no capabilities) after the spawn, so
    # Python can spawn without a full fork(): about 3x cheaper per script.
    return [
        setpriv,
        f"--reuid={uid}",
        f"--regid={gid}",
        "--clear-groups",
        "--inh-caps=-all",
        "--bounding-set=-all",
        "--",
    ]


@functools.cache
def others_can_run_python() -> bool:
    """Whether another uid can run this service's interpreter (step plugins run in it): every
    directory on the way to it, its prefixes and the executable itself searchable by others."""
    paths = {Path(os.path.realpath(sys.executable)), Path(sys.prefix), Path(sys.base_prefix)}
    for path in paths:
        for p in (path, *path.parents):
            try:
                if not os.stat(p).st_mode & stat.S_IXOTH:
                    return False
            except OSError:
                return False
    return True
