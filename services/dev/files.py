"""Files of the development servers: private files and directories, pid files, logs, and an exclusive lock."""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path
from typing import Self

from services.dev.errors import ServerError

__all__ = ["FileLock", "file_size", "log_since", "private_dir", "read_pid", "rotate_log", "write_private"]

MAX_LOG_BYTES = 10 * 1024 * 1024


def write_private(path: Path, text: str) -> None:
    """Write `text` to `path` (atomically) readable by its owner only (0600)."""
    tmp = path.with_name(path.name + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.fchmod(fd, 0o600)
        os.write(fd, text.encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)


def private_dir(path: Path) -> Path:
    """`path`, absolute, created if missing with mode 0700 (0711 when we are root, so that the
    PostgreSQL user can pass through to its cluster)."""
    path = Path(path).resolve()
    if not path.exists():
        path.mkdir(mode=0o700, parents=True, exist_ok=True)
        if os.geteuid() == 0:
            os.chmod(path, 0o711)
    return path


def read_pid(path: Path) -> int | None:
    try:
        return int(path.read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def rotate_log(path: Path, max_bytes: int = MAX_LOG_BYTES) -> None:
    with contextlib.suppress(FileNotFoundError):
        if path.stat().st_size > max_bytes:
            os.replace(path, path.with_name(path.name + ".1"))


def log_since(path: Path, offset: int, limit: int = 4000) -> str:
    try:
        with path.open("rb") as f:
            f.seek(offset)
            data = f.read()
    except OSError:
        return ""
    return data[-limit:].decode("utf-8", "replace")


def file_size(path: Path) -> int:
    try:
        return path.stat().st_size
    except OSError:
        return 0


class FileLock:
    """An exclusive, non-blocking `flock` on a file, held by this process until `release()`.

    Released by the kernel when the process dies, so a lock never outlives its holder.
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self._fd: int | None = None

    def acquire(self, what: str = "") -> Self:
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = read_pid(self.path)
            os.close(fd)
            who = f"process {holder}" if holder else "another process"
            raise ServerError(f"{what or self.path.name}: {self.path.parent} is in use by {who}") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None

    @property
    def held(self) -> bool:
        return self._fd is not None
