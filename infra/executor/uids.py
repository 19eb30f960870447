"""A uid of its own for each run's scripts (when the executor is root).

Scripts of one run share a uid that no other run on this host has at the same time, so one run's
scripts cannot read another's working directory, `/proc/<pid>/environ` (its secrets) or signal its
processes. A uid is claimed by hard-linking a file holding the run id to `<dir>/<uid>` (atomic on
the host, across every executor process sharing the work directory); the same run asking again gets
the same uid, and the file is removed when the run ends. Claims of runs that ended without it
(their executor died) are found by `stale` and dropped by the executor's sweep.
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
from pathlib import Path


class NoFreeUid(Exception):
    pass


class ScriptUids:
    def __init__(self, directory: Path, first: int, last: int) -> None:
        self.dir = directory
        self.first = first
        self.size = last - first + 1

    def _path(self, uid: int) -> Path:
        return self.dir / str(uid)

    def acquire(self, run_id: str) -> int:
        """The run's uid: the one it holds, else a free one (starting from a hash of the run id)."""
        self.dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        start = int(hashlib.sha256(run_id.encode()).hexdigest()[:12], 16) % self.size
        for i in range(self.size):
            uid = self.first + (start + i) % self.size
            path = self._path(uid)
            if self._claim(path, run_id) or self._holder(path) == run_id:
                return uid
        raise NoFreeUid(f"every script uid from {self.first} to {self.first + self.size - 1} is in use")

    def release(self, run_id: str) -> None:
        start = int(hashlib.sha256(run_id.encode()).hexdigest()[:12], 16) % self.size
        # Usually the first probe; a run that had to probe further is found by a scan.
        path = self._path(self.first + start)
        if self._holder(path) == run_id:
            path.unlink(missing_ok=True)
            return
        if not self.dir.exists():
            return
        for entry in self.dir.iterdir():
            if self._holder(entry) == run_id:
                entry.unlink(missing_ok=True)

    def stale(self, older_than: float = 3600.0) -> list[tuple[int, str]]:
        """Claims older than `older_than` seconds under whose uid no process runs: (uid, run id).
        Only the caller knows whether each run has ended (a run waiting for approval for hours
        runs nothing and still needs its uid, which owns its working directory)."""
        if not self.dir.exists():
            return []
        busy = _uids_in_use()
        now = time.time()
        found: list[tuple[int, str]] = []
        for entry in self.dir.iterdir():
            try:
                if entry.name.startswith(".") or now - entry.stat().st_mtime < older_than or int(entry.name) in busy:
                    continue
            except (OSError, ValueError):
                continue
            holder = self._holder(entry)
            if holder is not None:
                found.append((int(entry.name), holder))
        return found

    def drop(self, uid: int, run_id: str) -> None:
        """Remove the claim of `uid` if `run_id` still holds it."""
        path = self._path(uid)
        if self._holder(path) == run_id:
            path.unlink(missing_ok=True)

    def _claim(self, path: Path, run_id: str) -> bool:
        # The claim appears with its content or not at all (a hard link never replaces a file),
        # so a concurrent reader never sees an empty claim and takes another uid for the same run.
        tmp = self.dir / f".{os.getpid()}.{threading.get_ident()}.{run_id}"
        tmp.write_text(run_id)
        try:
            os.link(tmp, path)
            return True
        except FileExistsError:
            return False
        finally:
            tmp.unlink(missing_ok=True)

    @staticmethod
    def _holder(path: Path) -> str | None:
        try:
            return path.read_text()
        except OSError:
            return None


def _uids_in_use() -> set[int]:
    uids: set[int] = set()
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                uids.add(proc.stat().st_uid)
            except OSError:
                pass
    return uids
