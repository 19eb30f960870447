"""The peers, each in its own process (as our services are), measured by the same harness:

    python -m bench.peer spawn ...            the floor: three `/bin/sh -c true` in a row, from asyncio
    python -m bench.peer dbos --url URL ...   DBOS: a workflow of three steps that each run `true`

Prints one JSON object on its last line of output.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import sys
import time
from typing import Any

from bench import harness

STAGES = 3


async def sh_true() -> int:
    """What a stage does: spawn `/bin/sh -c true` with its output captured, and wait for it."""
    proc = await asyncio.create_subprocess_exec(
        "/bin/sh",
        "-c",
        "true",
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    await proc.communicate()
    assert proc.returncode == 0
    return proc.returncode


async def three_spawns() -> None:
    for _ in range(STAGES):
        await sh_true()


async def measure(unit: harness.Unit, args: argparse.Namespace) -> dict[str, Any]:
    lat = await harness.latency(unit, args.latency_runs, warmup=args.warmup)
    thr = await harness.throughput(unit, args.concurrency, args.duration, ramp=args.ramp)
    return {"latency": lat, "throughput": thr}


async def run_spawn(args: argparse.Namespace) -> dict[str, Any]:
    return await measure(three_spawns, args)


def run_dbos(args: argparse.Namespace) -> dict[str, Any]:
    import dbos as dbos_pkg
    from dbos import DBOS, DBOSConfig

    logging.getLogger("dbos").setLevel(logging.WARNING)

    @DBOS.step()
    async def stage(i: int) -> int:
        return await sh_true()

    @DBOS.workflow()
    async def three_stages() -> int:
        rc = 0
        for i in range(STAGES):
            rc = await stage(i)
        return rc

    config: DBOSConfig = {
        "name": "pipelines-bench",
        "system_database_url": args.url,
        "log_level": "WARNING",
        "sys_db_pool_size": max(20, args.concurrency + 4),
    }
    began = time.monotonic()
    DBOS(config=config)
    DBOS.launch()
    launched = time.monotonic() - began

    async def unit() -> None:
        handle = await DBOS.start_workflow_async(three_stages)
        assert await handle.get_result() == 0

    try:
        result = asyncio.run(measure(unit, args))
    finally:
        DBOS.destroy(destroy_registry=True)
    result["version"] = getattr(dbos_pkg, "__version__", None) or _version("dbos")
    result["launch_s"] = round(launched, 2)
    return result


def _version(name: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.peer")
    parser.add_argument("peer", choices=["spawn", "dbos"])
    parser.add_argument("--url", help="PostgreSQL URL of DBOS's system database")
    parser.add_argument("--latency-runs", type=int, default=50)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--ramp", type=float, default=1.0)
    args = parser.parse_args(argv)
    if args.peer == "spawn":
        result = asyncio.run(run_spawn(args))
    else:
        if not args.url:
            parser.error("dbos needs --url")
        result = run_dbos(args)
    sys.stdout.write("\n" + json.dumps(result) + "\n")
    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
