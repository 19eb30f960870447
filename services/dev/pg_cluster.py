"""The embedded PostgreSQL cluster on disk: initdb, the superuser's password file, ownership, offline tools."""

from __future__ import annotations

import contextlib
import logging
import os
import secrets
import shutil
import signal
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path

from services.dev.errors import ServerError
from services.dev.files import read_pid, write_private
from services.dev.process import RunAs, cmdline, pid_alive, stop_stale_process

__all__ = [
    "fix_cluster_ownership",
    "initdb",
    "pg_env",
    "read_or_create_password",
    "set_password",
    "stop_stale_postmaster",
]

log = logging.getLogger(__name__)


def pg_env() -> dict[str, str]:
    env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C", "LANG": "C"}
    if "TZ" in os.environ:
        env["TZ"] = os.environ["TZ"]
    return env


def _run_pg_tool(argv: Sequence[str | os.PathLike[str]], run_as: RunAs | None, *, stdin: str | None = None) -> str:
    extra = run_as.popen_kwargs() if run_as is not None else {}
    args = [os.fspath(a) for a in argv]
    proc = subprocess.run(
        args,
        input=stdin,
        capture_output=True,
        text=True,
        cwd="/",
        env=pg_env(),
        timeout=120,
        check=False,
        **extra,
    )
    if proc.returncode != 0:
        raise ServerError(f"{Path(args[0]).name} failed (exit {proc.returncode}):\n{proc.stderr or proc.stdout}")
    output: str = proc.stdout + proc.stderr
    return output


def stop_stale_postmaster(pgdata: Path) -> None:
    pid_file = pgdata / "postmaster.pid"
    pid = read_pid(pid_file)
    if pid is None:
        return
    # We hold the data directory's lock, so a live postmaster here belongs to nobody: it was left
    # behind by a supervisor that died. SIGINT is PostgreSQL's fast shutdown.
    stop_stale_process(pid, marker=str(pgdata), sig=signal.SIGINT, timeout=30)
    if not pid_alive(pid) or "postgres" not in (cmdline(pid) or ""):
        with contextlib.suppress(OSError):
            pid_file.unlink()  # a stale pid file, possibly naming a recycled pid


def read_or_create_password(path: Path) -> tuple[str, bool]:
    """(password, created): the kept password, or a new one written to `path` with mode 0600."""
    if path.exists():
        os.chmod(path, 0o600)
        password = path.read_text().strip()
        if password:
            return password, False
    password = secrets.token_urlsafe(24)
    write_private(path, f"{password}\n")
    return password, True


def initdb(bin_dir: Path, pgdata: Path, user: str, password: str, run_as: RunAs | None) -> None:
    if pgdata.exists() and any(pgdata.iterdir()):
        log.warning("%s holds an incomplete cluster (no PG_VERSION): removing it", pgdata)
        shutil.rmtree(pgdata)
    pgdata.mkdir(mode=0o700, parents=True, exist_ok=True)
    os.chmod(pgdata, 0o700)
    if run_as is not None:
        os.chown(pgdata, run_as.uid, run_as.gid)
    # The password reaches initdb through a file that only its user can read, outside the cluster.
    fd, pwfile = tempfile.mkstemp(prefix=".initdb-", dir=pgdata.parent)
    try:
        os.write(fd, f"{password}\n".encode())
        if run_as is not None:
            os.fchown(fd, run_as.uid, run_as.gid)
        os.close(fd)
        _run_pg_tool(
            [
                bin_dir / "initdb",
                "-D",
                pgdata,
                "-U",
                user,
                "--auth=scram-sha-256",
                f"--pwfile={pwfile}",
                "--encoding=UTF8",
                "--no-locale",
                "--no-instructions",
            ],
            run_as,
        )
    finally:
        with contextlib.suppress(OSError):
            os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(pwfile)


def fix_cluster_ownership(pgdata: Path, run_as: RunAs | None) -> None:
    os.chmod(pgdata, 0o700)
    if run_as is None or pgdata.stat().st_uid == run_as.uid:
        return
    log.warning("giving %s to %s (PostgreSQL runs as its data directory's owner)", pgdata, run_as.name)
    for root, dirs, files in os.walk(pgdata):
        for name in [*dirs, *files]:
            os.lchown(os.path.join(root, name), run_as.uid, run_as.gid)
    os.chown(pgdata, run_as.uid, run_as.gid)


def _sql_literal(value: str) -> str:
    return "'" + value.replace("'", "''") + "'"


def _sql_ident(value: str) -> str:
    return '"' + value.replace('"', '""') + '"'


def set_password(bin_dir: Path, pgdata: Path, user: str, password: str, run_as: RunAs | None) -> None:
    """Set the superuser's password with the server stopped (single-user mode)."""
    statements = (
        "DO $$BEGIN IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = "
        f"{_sql_literal(user)}) THEN CREATE ROLE {_sql_ident(user)} LOGIN SUPERUSER; END IF; END$$;\n"
        f"ALTER ROLE {_sql_ident(user)} WITH LOGIN SUPERUSER PASSWORD {_sql_literal(password)};\n"
    )
    out = _run_pg_tool(
        [bin_dir / "postgres", "--single", "-D", pgdata, "-c", "listen_addresses=",
         "-c", "unix_socket_directories=", "postgres"],
        run_as,
        stdin=statements,
    )  # fmt: skip
    if "ERROR:" in out:
        raise ServerError(f"could not set the PostgreSQL password:\n{out}")
