"""CPU time of the processes behind a workload, read from /proc (Linux): who pays for a run.

A process tree's CPU is the user + system time of every live process in it plus the time of the
children each has already waited for (cutime + cstime): a script, a `setpriv`, a run's sandbox
holder and its runner are counted in the executor's tree once reaped. Time of children not yet
reaped when the second reading is taken is counted only if they are still alive then."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Mapping
from pathlib import Path

TICK_S = 1.0 / os.sysconf("SC_CLK_TCK")


def _stat(pid: int) -> tuple[int, float, float] | None:
    """(ppid, own CPU seconds, waited-for children's CPU seconds) of a process, None when gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) is in parentheses and may hold spaces: split after it.
    fields = raw[raw.rfind(")") + 2 :].split()
    ppid = int(fields[1])
    utime, stime, cutime, cstime = (int(x) for x in fields[11:15])
    return ppid, (utime + stime) * TICK_S, (cutime + cstime) * TICK_S


def _table() -> dict[int, tuple[int, float, float]]:
    out: dict[int, tuple[int, float, float]] = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            st = _stat(int(entry.name))
            if st is not None:
                out[int(entry.name)] = st
    return out


def snapshot(roots: Mapping[str, int | None]) -> dict[str, float]:
    """For each named root pid: `<name>` (the process itself) and `<name>+children` (its whole
    tree, itself included), in CPU seconds."""
    table = _table()
    children: dict[int, list[int]] = {}
    for pid, (ppid, _, _) in table.items():
        children.setdefault(ppid, []).append(pid)
    out: dict[str, float] = {}
    for name, root in roots.items():
        if root is None or root not in table:
            continue
        own = table[root][1]
        tree = 0.0
        todo = [root]
        while todo:
            pid = todo.pop()
            _, mine, waited = table[pid]
            tree += mine + waited
            todo.extend(children.get(pid, ()))
        out[name] = own
        out[f"{name}+children"] = tree
    return out


def per_run_ms(before: Mapping[str, float], after: Mapping[str, float], runs: int) -> dict[str, float]:
    """CPU milliseconds per run of each process between two snapshots (those present in both)."""
    if runs <= 0:
        return {}
    return {k: round((after[k] - before[k]) * 1000 / runs, 2) for k in before if k in after}


def postmaster_pid(pgdata: Path | None) -> int | None:
    """The PostgreSQL server's pid from its data directory (first line of postmaster.pid)."""
    if pgdata is None:
        return None
    with contextlib.suppress(OSError, ValueError, IndexError):
        return int((pgdata / "postmaster.pid").read_text().splitlines()[0])
    return None
