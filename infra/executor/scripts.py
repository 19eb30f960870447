"""Runs one script stage: `/bin/sh -c` in its own process group and working directory, with a
clean environment, a timeout, and output delivered line by line.

The service's own environment (database URLs, the JWT secret) never reaches a script: the
environment is built from nothing but a fixed PATH and the run's own values.

A script can run as another user (`user=`, PIPELINES_SCRIPT_USER; `nobody` by default when the
executor is root): then it cannot signal the services (another uid: EPERM) nor read the data
directory's private files (0600, owned by the services' user). Its working directory, which is
also its HOME, is made its own (0700); the work root above it is 0711 (others may pass through
to a directory they know, not list it), and every directory above that must let the user pass:
o+x is added, with a warning, where it is missing (as for the embedded PostgreSQL's user). The
script gets no supplementary groups. Scripts of different runs share that one user, so they are
not isolated from each other, unless each run gets a uid of its own (infra.executor.uids).

The script text is written to a file only the script's user can read, in the run's private
directory, and run as `sh <file>`: what it holds (a secret interpolated into a step's `run`) is
never on a command line. When the executor is root, each script runs in the sandbox of
infra.executor.sandbox (its own PID namespace, a private /tmp, resource limits).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import os
import pwd
import secrets
import signal
import stat
import subprocess
import sys
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from infra import trace
from infra.executor.sandbox import (
    RunnerStep,
    RunSandboxes,
    SandboxError,
    hides_itself,
    private_dir_of,
    setpriv_argv,
    unavailable,
    warn_unsandboxed,
    write_env,
)

log = logging.getLogger("pipelines.script")

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


class ScriptUserError(Exception):
    """The configured script user does not exist, or its working directory cannot be prepared."""


@dataclass(frozen=True)
class ScriptUser:
    uid: int
    gid: int
    name: str


@functools.lru_cache(maxsize=4096)
def resolve_user(spec: str | int | None) -> ScriptUser | None:
    """The user to run scripts as: a name or a uid (a uid without a passwd entry runs with the gid
    of the same number). None when no switch is needed: no user given, or it is ourselves."""
    if spec is None or spec == "":
        return None
    entry: pwd.struct_passwd | None = None
    try:
        entry = pwd.getpwnam(spec) if isinstance(spec, str) and not spec.isdigit() else pwd.getpwuid(int(spec))
    except KeyError:
        if isinstance(spec, str) and not spec.isdigit():
            raise ScriptUserError(f"script user {spec!r} does not exist on this host") from None
    user = (
        ScriptUser(entry.pw_uid, entry.pw_gid, entry.pw_name)
        if entry is not None
        else ScriptUser(int(spec), int(spec), str(spec))
    )
    if user.uid == os.geteuid():
        return None
    return user


def _may_search(st: os.stat_result, user: ScriptUser) -> bool:
    if user.uid == 0:
        return True
    if st.st_uid == user.uid:
        return bool(st.st_mode & stat.S_IXUSR)
    if st.st_gid == user.gid:
        return bool(st.st_mode & stat.S_IXGRP)
    return bool(st.st_mode & stat.S_IXOTH)


def prepare_workdir(workdir: Path, user: ScriptUser | None) -> None:
    """Create the script's working directory (its HOME too). With a `user`: owned by that user,
    mode 0700, under a work root of mode 0711, every directory above it searchable by the user."""
    workdir = workdir.absolute()
    # The stages of a run share its directory: after the first, one stat shows it is ready.
    try:
        st = workdir.stat()
    except FileNotFoundError:
        pass
    else:
        if stat.S_ISDIR(st.st_mode) and (user is None or (st.st_uid == user.uid and stat.S_IMODE(st.st_mode) == 0o700)):
            return
    if user is None:
        workdir.mkdir(mode=0o700, parents=True, exist_ok=True)
        return
    root = workdir.parent
    if not root.exists():
        root.mkdir(mode=0o711, parents=True, exist_ok=True)
    st = root.stat()
    if st.st_uid == os.geteuid() and stat.S_IMODE(st.st_mode) != 0o711:
        os.chmod(root, 0o711)
    for directory in root.parents:
        st = directory.stat()
        if not _may_search(st, user):
            log.warning("adding o+x to %s so that scripts, running as %s, can reach it", directory, user.name)
            os.chmod(directory, stat.S_IMODE(st.st_mode) | stat.S_IXOTH)
    workdir.mkdir(mode=0o700, exist_ok=True)
    os.chown(workdir, user.uid, user.gid)
    os.chmod(workdir, 0o700)


def _owned(st: os.stat_result, user: ScriptUser | None) -> bool:
    uid = os.geteuid() if user is None else user.uid
    return stat.S_ISDIR(st.st_mode) and st.st_uid == uid and stat.S_IMODE(st.st_mode) == 0o700


def prepare_private(private: Path, user: ScriptUser | None) -> Path:
    """The run's private directory and its /tmp (both 0700, the script user's), under a root of
    mode 0711; returns the directory mounted on /tmp."""
    tmp = private / "tmp"
    try:
        if _owned(private.stat(), user) and _owned(tmp.stat(), user):
            return tmp  # prepared by an earlier step of the run
    except FileNotFoundError:
        pass
    root = private.parent
    root.mkdir(mode=0o711, parents=True, exist_ok=True)
    if stat.S_IMODE(root.stat().st_mode) != 0o711:
        os.chmod(root, 0o711)
    for directory in (private, tmp):
        directory.mkdir(mode=0o700, exist_ok=True)
        if user is not None:
            os.chown(directory, user.uid, user.gid, follow_symlinks=False)
        os.chmod(directory, 0o700, follow_symlinks=False)
    return tmp


def write_script(private: Path, text: str, user: ScriptUser | None) -> Path:
    """The script in a file of its own (mode 0400, the script user's): what it holds is never on
    a command line. A fresh random name, created exclusively, never through a link."""
    path = private / f"step-{secrets.token_hex(8)}.sh"
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o400)
    try:
        os.write(fd, text.encode())
        if user is not None:
            os.fchown(fd, user.uid, user.gid)
    finally:
        os.close(fd)
    return path


def watch_children_with_pidfds() -> bool:
    """Have asyncio learn of a script's exit from a pidfd on the event loop (Python 3.11).

    By default 3.11 waits for each child in a thread of its own, and starting that thread blocks
    the event loop until the new thread runs: on a busy 2-core machine about a millisecond per
    script, during which no other run moves. 3.12 and later use pidfds by default. Call this in
    the process's only event loop, before it spawns anything; whether it took effect."""
    if sys.version_info >= (3, 12) or not hasattr(os, "pidfd_open"):
        return False
    try:
        os.close(os.pidfd_open(os.getpid()))  # the kernel may not support pidfds (before 5.3)
    except OSError:
        return False
    watcher = asyncio.PidfdChildWatcher()
    watcher.attach_loop(asyncio.get_running_loop())
    asyncio.set_child_watcher(watcher)
    return True


def _signal_group(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


class ScriptRun:
    """One running script; `stop()` ends its whole process group (TERM, then KILL)."""

    def __init__(self, *, kill_grace: float) -> None:
        self._proc: asyncio.subprocess.Process | None = None
        self._step: RunnerStep | None = None  # started by its run's runner (in the sandbox)
        self._grace = kill_grace
        self._stopped = False
        self._finished = False

    def _signal(self, sig: int) -> None:
        if self._step is not None:
            self._step.signal(sig)
        elif self._proc is not None:
            _signal_group(self._proc.pid, sig)

    async def _wait(self) -> int | None:
        if self._step is not None:
            return await self._step.wait()
        assert self._proc is not None
        return await self._proc.wait()

    async def _terminate(self) -> None:
        if self._proc is None and self._step is None:
            return
        self._signal(signal.SIGTERM)
        try:
            await asyncio.wait_for(self._wait(), self._grace)
        except TimeoutError:
            pass
        self._signal(signal.SIGKILL)

    @property
    def pid(self) -> int | None:
        """The script's pid, which is also its process group id; None until it has started."""
        if self._step is not None:
            return self._step.pid
        return self._proc.pid if self._proc is not None else None

    @property
    def finished(self) -> bool:
        """The script has ended (or never started) and its whole process group is gone."""
        return self._finished

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
        user: str | int | None = None,
        sandbox: RunSandboxes | None = None,
    ) -> ScriptOutcome:
        """Run `command`; as `user` (a name or uid) when given and not ourselves, which needs root;
        in the run's sandbox when given and this host can (see infra.executor.sandbox)."""
        why_not = None if sandbox is None else unavailable()
        if why_not is not None:
            warn_unsandboxed(why_not)
            sandbox = None
        try:
            as_user = resolve_user(user)
            prepare_workdir(workdir, as_user)
            private = private_dir_of(workdir.absolute())
            prepare_private(private, as_user)
            script = write_script(private, (sandbox.prologue() if sandbox else "") + command, as_user)
            trace.mark("script written")
        except (ScriptUserError, OSError) as exc:
            self._finished = True
            return ScriptOutcome(exit_code=None, error=f"could not prepare the script's user or directory: {exc}")
        try:
            return await self._spawn(script, private, as_user, workdir, env, timeout, on_line, sandbox)
        finally:
            script.unlink(missing_ok=True)
            if sandbox is not None:
                script.with_suffix(".env").unlink(missing_ok=True)

    async def _spawn(
        self,
        script: Path,
        private: Path,
        as_user: ScriptUser | None,
        workdir: Path,
        env: Mapping[str, str],
        timeout: float | None,
        on_line: OnLine,
        sandbox: RunSandboxes | None,
    ) -> ScriptOutcome:
        # Relative to the working directory, which the spawn enters as root: the script's user then
        # needs no right on the directories above the work root (a test's /tmp/pytest-of-root).
        argv: list[str] = ["/bin/sh", os.path.relpath(script, workdir.absolute())]
        switch: dict[str, Any] = {}
        drop = setpriv_argv(as_user.uid, as_user.gid) if as_user is not None else []
        if sandbox is None or hides_itself(private):
            # No private /tmp: a temporary directory of the run's own all the same.
            env = {**env, "TMPDIR": str(private / "tmp")}
        if sandbox is not None:
            owner = None if as_user is None else (as_user.uid, as_user.gid)
            try:
                # Sourced by the script's first line (sandbox.step_prologue), in the runner's step
                # and in a step that enters the sandbox alike.
                write_env(private, script.stem, env, owner)
                step = await sandbox.start(private, private / "tmp", workdir, owner, script)
                trace.mark("step sent to the runner")
                if step is not None:
                    return await self._follow(step, timeout, on_line)
                argv = await sandbox.enter(private, private / "tmp", workdir, [*(drop or []), *argv], owner)
            except (SandboxError, OSError, TimeoutError) as exc:
                self._finished = True
                return ScriptOutcome(exit_code=None, error=f"could not start the run's sandbox: {exc}")
        elif drop is not None:
            argv = [*drop, *argv]
        elif as_user is not None:
            # another user: its uid and primary group, none of our supplementary groups
            switch = {"user": as_user.uid, "group": as_user.gid, "extra_groups": []}
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                cwd=str(workdir),
                env=dict(env),
                start_new_session=True,  # its own session and process group
                close_fds=True,
                **switch,
            )
        except (OSError, ValueError, subprocess.SubprocessError) as exc:
            self._finished = True
            return ScriptOutcome(exit_code=None, error=f"could not start the script: {exc}")
        trace.mark("process spawned")
        self._proc = proc
        assert proc.stdout is not None and proc.stderr is not None
        readers = [
            asyncio.create_task(_pump(proc.stdout, "stdout", on_line)),
            asyncio.create_task(_pump(proc.stderr, "stderr", on_line)),
        ]
        timed_out = False
        try:
            await asyncio.wait_for(proc.wait(), timeout)
            trace.mark("process exited")
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
            self._finished = True
            with contextlib.suppress(Exception):
                await asyncio.wait_for(asyncio.gather(*readers), 5)
            for r in readers:
                r.cancel()
        return ScriptOutcome(exit_code=proc.returncode, timed_out=timed_out, killed=self._stopped)

    async def _follow(self, step: RunnerStep, timeout: float | None, on_line: OnLine) -> ScriptOutcome:
        """See a step the run's runner started through to its end, as `_spawn` does a process."""
        self._step = step
        readers = [
            asyncio.create_task(_pump(step.stdout, "stdout", on_line)),
            asyncio.create_task(_pump(step.stderr, "stderr", on_line)),
        ]
        timed_out = False
        try:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(step.started), 10)
            if not step.started.done():
                self._finished = True
                return ScriptOutcome(exit_code=None, error="the run's sandbox did not start the script in 10 s")
            trace.mark("step started")
            if self._stopped:  # stopped while it was being started
                await self._terminate()
            await asyncio.wait_for(step.wait(), timeout)
            trace.mark("step exited")
        except TimeoutError:
            timed_out = True
            await self._terminate()
            # Its report comes from the runner's subshell, which a script could have killed.
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(step.wait(), 5)
        except asyncio.CancelledError:
            await self._terminate()
            raise
        finally:
            # Children the script left behind would hold its output open: end the whole group.
            step.signal(signal.SIGKILL)
            step.release()
            self._finished = True
            with contextlib.suppress(Exception):
                await asyncio.wait_for(asyncio.gather(*readers), 5)
            for r in readers:
                r.cancel()
            step.close()
        if step.returncode is None and not timed_out and not self._stopped:
            why = f": {step.problem}" if step.problem else ""
            return ScriptOutcome(exit_code=None, error=f"the run's sandbox ended while the script ran{why}")
        return ScriptOutcome(exit_code=step.returncode, timed_out=timed_out, killed=self._stopped)


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
