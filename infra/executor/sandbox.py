"""The sandbox each script step runs in: its own PID and mount namespaces (a fresh /proc, a private
/tmp), no network when asked, resource limits and the run's uid; built from util-linux (`unshare`,
`mount`, `setpriv`) and the shell's `ulimit`. Without root, scripts run as before (logged once)."""

from __future__ import annotations

import functools
import logging
import os
import shutil
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
    missing = [t for t in ("unshare", "mount", "setpriv") if _tool(t) is None]
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


def _ulimits(limits: Limits) -> str:
    # dash's ulimit takes one resource per call; with neither -H nor -S it sets both, so a script
    # (no longer root) cannot raise them again. -f is in 512-byte blocks, -v in KiB.
    parts = []
    if limits.procs is not None:
        parts.append(f"ulimit -p {limits.procs}")
    if limits.open_files is not None:
        parts.append(f"ulimit -n {limits.open_files}")
    if limits.file_size is not None:
        parts.append(f"ulimit -f {max(limits.file_size // 512, 1)}")
    if limits.memory is not None:
        parts.append(f"ulimit -v {max(limits.memory // 1024, 1)}")
    return "; ".join(parts)


@functools.cache
def hides_itself(private: Path) -> bool:
    """A private directory under /tmp (a work directory there: tests, a developer's data dir)
    would be hidden by the private /tmp mounted over it, with the run's workspace: such runs keep
    the host's /tmp (with TMPDIR pointing to their own), and a warning says so once."""
    hidden = Path(os.path.realpath(private)).is_relative_to("/tmp")
    if hidden:
        log.warning("the work directory is under /tmp: scripts keep the host's /tmp (TMPDIR is their own)")
    return hidden


def init_script(sandbox: Sandbox, private_tmp: bool) -> str:
    """What PID 1 of the new namespaces runs, as root: `$1` is the directory to mount on /tmp, the
    rest is the command to run (setpriv ... sh <file>), whose exit status it returns."""
    lines = ["set -e"]
    if private_tmp:
        lines.append(f'{_tool("mount")} --bind "$1" /tmp')
    if not sandbox.network and _tool("ip") is not None:
        lines.append(f"{_tool('ip')} link set lo up")
    limits = _ulimits(sandbox.limits)
    if limits:
        lines.append(limits)
    # Not exec: PID 1 ignores signals it has no handler for, so the script would outlive the
    # TERM of a stop. PID 1 stays this shell; when it exits, the kernel kills the rest.
    lines.append('shift; "$@" && exit 0 || exit $?')
    return "\n".join(lines)


def sandboxed_argv(sandbox: Sandbox, tmp: Path, command: list[str]) -> list[str]:
    """`command` (already dropping to the run's uid) started in new PID and mount namespaces:
    unshare forks PID 1, which mounts a fresh /proc and `tmp` on /tmp, sets the limits and runs
    `command`. When PID 1 ends, the kernel kills whatever else is left in its namespace, and
    `--kill-child` ends PID 1 when unshare itself is killed (a stop, a timeout, a recovery)."""
    unshare = _tool("unshare")
    assert unshare is not None
    flags = ["--pid", "--fork", "--kill-child", "--mount-proc", "--propagation=private"]
    if not sandbox.network:
        flags.append("--net")
    init = init_script(sandbox, private_tmp=not hides_itself(tmp.parent))
    return [unshare, *flags, "--", "/bin/sh", "-c", init, "sandbox-init", str(tmp), *command]


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
