"""A CPU profile of each service process under the end-to-end throughput load (issue 17).

The throughput part of workload 1 (three `true` script stages, `concurrency` clients in a closed
loop) while `py-spy record --gil --nonblocking --format raw` samples each service process (api,
relay, executor, projector, gateway) for the whole of it. py-spy reads the processes' memory from
outside (root, or ptrace allowed) and does not stop them. `--gil`: only the thread holding the GIL
is sampled, so a sample is Python code running (or runnable, waiting for a core), not a wait in
`epoll` or a thread pool's queue; without it a busy two-core host shows the event loop's `select`
as the top function, because a thread woken there stays "running" while it waits for a core. Its
own CPU is taken from the same cores, so the throughput measured meanwhile is lower than `e2e`'s:
the figure is reported beside the profile, not instead of it.

Each process's collapsed stacks land in `<out>/<name>.txt` (one `frame;frame;... count` line
per distinct stack: flamegraph.pl and speedscope.app read it as it is). Summaries: the functions
with the most self samples (the innermost frame) and the most inclusive samples (anywhere on
the stack; the event loop's, the entry point's and context managers' frames left out), and
self samples per package (the first part of the frame's file path).
"""

from __future__ import annotations

import asyncio
import math
import shutil
import sys
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from bench import harness
from bench.system import RunWatcher, System, script_stages

SERVICES = ("api", "relay", "executor", "projector", "gateway")


def py_spy() -> str | None:
    """The py-spy beside this interpreter (the `bench` extra), else on PATH."""
    beside = Path(sys.executable).parent / "py-spy"
    return str(beside) if beside.exists() else shutil.which("py-spy")


def _function(frame: str) -> str:
    # "drive_once (infra/executor/driver.py:212)" -> "drive_once (infra/executor/driver.py)"
    name, _, where = frame.partition(" (")
    return f"{name} ({where.rsplit(':', 1)[0]})" if where else name


def _package(frame: str) -> str:
    _, _, where = frame.partition(" (")
    path = where.rsplit(":", 1)[0].rstrip(")")
    parts = [p for p in path.split("/") if p]
    if not parts:
        return "?"
    if "site-packages" in parts:
        parts = parts[parts.index("site-packages") + 1 :]
    return parts[0] if len(parts) > 1 else parts[0].removesuffix(".py")


# Frames under nearly every sample (the event loop, the entry point): left out of the inclusive list.
_SCAFFOLDING = ("asyncio/", "<frozen runpy>", "services/", "selectors.py", "contextlib.py")


def _scaffolding(frame: str) -> bool:
    _, _, where = frame.partition(" (")
    return where.startswith(_SCAFFOLDING)


def parse_collapsed(text: str) -> list[tuple[list[str], int]]:
    """py-spy's raw output: one (frames outermost first, samples) per line."""
    out = []
    for line in text.splitlines():
        stack, _, n = line.rpartition(" ")
        if stack and n.isdigit():
            out.append((stack.split(";"), int(n)))
    return out


def summary(stacks: list[tuple[list[str], int]], top: int = 12) -> dict[str, Any]:
    total = sum(n for _, n in stacks)
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    packages: Counter[str] = Counter()
    for frames, n in stacks:
        if not frames:
            continue
        own[_function(frames[-1])] += n
        packages[_package(frames[-1])] += n
        for f in {_function(f) for f in frames if not _scaffolding(f)}:
            inclusive[f] += n

    def pct(c: Counter[str]) -> list[dict[str, Any]]:
        return [
            {"function": k, "samples": v, "pct": round(100 * v / total, 1) if total else 0.0}
            for k, v in c.most_common(top)
        ]

    return {"samples": total, "self": pct(own), "inclusive": pct(inclusive), "self_by_package": pct(packages)}


async def profile(
    system: System,
    pids: Mapping[str, int | None],
    out_dir: Path,
    *,
    concurrency: int,
    duration: float,
    ramp: float,
    rate: int = 100,
) -> dict[str, Any]:
    tool = py_spy()
    if tool is None:
        return {"skipped": "py-spy is not installed: pip install -e '.[bench]'"}
    out_dir.mkdir(parents=True, exist_ok=True)
    pipeline_id = await system.create_pipeline(script_stages("true", "true", "true"))
    watcher = RunWatcher(system, pipeline_id)
    await watcher.start()
    failures: list[str] = []

    async def unit() -> None:
        run_id = await system.trigger(pipeline_id)
        status, _ = await watcher.wait(run_id)
        if status != "succeeded":
            failures.append(status)
            raise RuntimeError(f"run {run_id} ended {status}")

    seconds = ramp + duration + 1.0  # the whole throughput part, its ramp and its last runs
    spies: dict[str, tuple[asyncio.subprocess.Process, Path]] = {}
    try:
        for name in SERVICES:
            pid = pids.get(name)
            if pid is None:
                continue
            path = out_dir / f"{name}.txt"
            path.unlink(missing_ok=True)
            argv = ["record", "--pid", str(pid), "--rate", str(rate), "--duration", str(math.ceil(seconds))]
            argv += ["--gil", "--nonblocking", "--format", "raw", "--output", str(path)]
            proc = await asyncio.create_subprocess_exec(
                tool, *argv, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT
            )
            spies[name] = (proc, path)
        await asyncio.sleep(0.5)  # py-spy attached before the load begins
        thr = await harness.throughput(unit, concurrency, duration, ramp=ramp)
    finally:
        await watcher.close()
        said: dict[str, str] = {}
        for name, (proc, _) in spies.items():
            try:
                out, _ = await asyncio.wait_for(proc.communicate(), seconds + 30)
                said[name] = out.decode(errors="replace")[-500:]
            except TimeoutError:
                proc.kill()
                await proc.wait()
                said[name] = "did not end"
    processes: dict[str, Any] = {}
    for name, (proc, path) in spies.items():
        if proc.returncode != 0 or not path.exists():
            processes[name] = {"error": f"py-spy exited {proc.returncode}: {said.get(name)}"}
            continue
        processes[name] = {"file": str(path)} | summary(parse_collapsed(path.read_text()))
    return {"throughput": thr, "failed_runs": len(failures), "rate_hz": rate, "processes": processes}


def report(result: Mapping[str, Any], top: int = 8) -> str:
    """Markdown: per process, the top functions by self and by inclusive samples."""
    lines = []
    for name, p in (result.get("processes") or {}).items():
        if "error" in p:
            lines.append(f"**{name}**: {p['error']}")
            continue
        lines += [
            "",
            f"**{name}** ({p['samples']} samples; {p['file']})",
            "",
            "| self % | function | | inclusive % | function |",
            "|---:|---|---|---:|---|",
        ]
        for i in range(top):
            s = p["self"][i] if i < len(p["self"]) else None
            c = p["inclusive"][i] if i < len(p["inclusive"]) else None
            lines.append(
                f"| {s['pct'] if s else ''} | {s['function'] if s else ''} | | "
                f"{c['pct'] if c else ''} | {c['function'] if c else ''} |"
            )
        lines.append("")
        lines.append("self by package: " + ", ".join(f"{r['function']} {r['pct']}%" for r in p["self_by_package"]))
    return "\n".join(lines)
