"""The OS user the embedded PostgreSQL runs as when we are root (it refuses root): `pipelines-pg`, created on
first use (PIPELINES_POSTGRES_OS_USER picks another); an existing cluster keeps running as its owner."""

from __future__ import annotations

import contextlib
import logging
import os
import pwd
import shutil
import stat
import subprocess
from pathlib import Path

from services.dev.process import RunAs

__all__ = ["DEFAULT_POSTGRES_OS_USER", "POSTGRES_OS_USER_ENV", "ensure_searchable", "postgres_run_as"]

log = logging.getLogger(__name__)

POSTGRES_OS_USER_ENV = "PIPELINES_POSTGRES_OS_USER"
DEFAULT_POSTGRES_OS_USER = "pipelines-pg"


def postgres_run_as(pgdata: Path) -> RunAs | None:
    if os.geteuid() != 0:
        return None
    if (pgdata / "PG_VERSION").exists():
        st = pgdata.stat()
        if st.st_uid != 0:  # an existing cluster keeps running as its owner
            try:
                entry = pwd.getpwuid(st.st_uid)
                return RunAs(entry.pw_uid, entry.pw_gid, entry.pw_name)
            except KeyError:
                return RunAs(st.st_uid, st.st_gid, str(st.st_uid))
    entry = _ensure_system_user(os.environ.get(POSTGRES_OS_USER_ENV) or DEFAULT_POSTGRES_OS_USER)
    return RunAs(entry.pw_uid, entry.pw_gid, entry.pw_name)


def _ensure_system_user(name: str) -> pwd.struct_passwd:
    with contextlib.suppress(KeyError):
        return pwd.getpwnam(name)
    path = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin", "/usr/bin", "/bin"])
    nologin = shutil.which("nologin", path=path) or "/bin/false"
    commands: list[list[str]] = []
    if useradd := shutil.which("useradd", path=path):
        commands.append(
            [useradd, "--system", "--user-group", "--no-create-home", "--home-dir", "/nonexistent",
             "--shell", nologin, "--comment", "pipelines embedded PostgreSQL", name]
        )  # fmt: skip
    if adduser := shutil.which("adduser", path=path):  # busybox (Alpine)
        commands.append([adduser, "-S", "-D", "-H", "-h", "/nonexistent", "-s", nologin, name])
    errors: list[str] = []
    for command in commands:
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=30, check=False)
        except (OSError, subprocess.SubprocessError) as exc:
            errors.append(str(exc))
            continue
        with contextlib.suppress(KeyError):  # also covers a concurrent creation by another process
            entry = pwd.getpwnam(name)
            log.warning("created system user %r to run PostgreSQL (it refuses to run as root)", name)
            return entry
        errors.append(done.stderr.strip())
    log.warning("could not create system user %r (%s); running PostgreSQL as 'nobody'", name, "; ".join(errors))
    return pwd.getpwnam("nobody")


def ensure_searchable(path: Path, run_as: RunAs) -> None:
    """Let `run_as` reach `path`: add o+x (search, not listing) to each directory on the way that
    it cannot search."""
    for directory in [path, *path.parents]:
        st = directory.stat()
        if st.st_uid == run_as.uid:
            ok = st.st_mode & stat.S_IXUSR
        elif st.st_gid == run_as.gid:
            ok = st.st_mode & stat.S_IXGRP
        else:
            ok = st.st_mode & stat.S_IXOTH
        if not ok:
            log.warning("adding o+x to %s so that PostgreSQL, running as %s, can reach it", directory, run_as.name)
            os.chmod(directory, stat.S_IMODE(st.st_mode) | stat.S_IXOTH)
