"""The database floor and the event store: single-row INSERT commits per second (psycopg, the same
driver the store uses, and pgbench, a C client), and appends per second through the store's own
API, at the same concurrencies."""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import shutil
import subprocess
import tempfile
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import psycopg

from domain import events as ev
from domain import run as rn
from infra.store.migrate import migrate, open_pool
from infra.store.postgres import PostgresEventStore
from infra.store.records import NewEvent
from services.dev.postgres import postgres_bin_dir


def sample_event() -> rn.LogAppended:
    return rn.LogAppended(
        stage_id="build", lines=(rn.LogLine("stdout", "compiling module 12 of 40"),), at=datetime.now(UTC)
    )


SAMPLE_JSON = ev.encode(sample_event()).decode()


async def prepare(database_url: str) -> None:
    await migrate(database_url)
    async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
        await conn.execute(
            "CREATE TABLE IF NOT EXISTS bench_raw "
            "(id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY, data json NOT NULL)"
        )


async def _timed_workers(concurrency: int, duration: float, make_worker: Any) -> float:
    """Run `concurrency` workers until `duration` passes; returns operations per second."""
    loop = asyncio.get_running_loop()
    stop_at = loop.time() + duration
    counts = [0] * concurrency

    async def worker(i: int) -> None:
        op = await make_worker(i)
        while loop.time() < stop_at:
            await op()
            counts[i] += 1

    began = loop.time()
    await asyncio.gather(*(worker(i) for i in range(concurrency)))
    return sum(counts) / (loop.time() - began)


async def raw_inserts(database_url: str, concurrency: int, duration: float) -> float:
    """Single-row INSERT, autocommit: one commit each, on `concurrency` connections."""
    conns = [await psycopg.AsyncConnection.connect(database_url, autocommit=True) for _ in range(concurrency)]
    try:

        async def make(i: int) -> Any:
            conn = conns[i]

            async def op() -> None:
                await conn.execute("INSERT INTO bench_raw (data) VALUES (%s)", (SAMPLE_JSON,))

            return op

        return await _timed_workers(concurrency, duration, make)
    finally:
        for c in conns:
            await c.close()


async def store_appends(database_url: str, concurrency: int, duration: float) -> float:
    """`PostgresEventStore.append` of one event to a writer's own stream, under optimistic
    concurrency (expected version), from `concurrency` writers sharing a pool of that size."""
    pool = await open_pool(database_url, min_size=concurrency, max_size=concurrency)
    store = PostgresEventStore(pool)
    try:

        async def make(i: int) -> Any:
            stream = f"runlog-{uuid.uuid4()}"
            version = 0
            run_id = stream.partition("-")[2]

            async def op() -> None:
                nonlocal version
                result = await store.append(
                    stream, [NewEvent(str(uuid.uuid4()), sample_event(), run_id=run_id)], version
                )
                version = result.version

            return op

        return await _timed_workers(concurrency, duration, make)
    finally:
        await pool.close()


def pgbench_path() -> str | None:
    with contextlib.suppress(Exception):
        candidate = postgres_bin_dir() / "pgbench"
        if candidate.exists():
            return str(candidate)
    return shutil.which("pgbench")


def pgbench_inserts(database_url: str, concurrency: int, duration: float) -> float | None:
    """The same INSERT from pgbench (prepared statements, C client): the server's own ceiling."""
    binary = pgbench_path()
    if binary is None:
        return None
    parts = urlsplit(database_url)
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "PGHOST": parts.hostname or "127.0.0.1",
        "PGPORT": str(parts.port or 5432),
        "PGUSER": unquote(parts.username or ""),
        "PGPASSWORD": unquote(parts.password or ""),
        "PGDATABASE": parts.path.lstrip("/"),
    }
    with tempfile.TemporaryDirectory() as tmp:
        script = Path(tmp) / "insert.sql"
        # pgbench reads `:name` as a variable (`"job":null` would become `"job"$1`): a space after
        # each key's colon keeps the same JSON out of its way.
        spaced = SAMPLE_JSON.replace('":', '": ')
        script.write_text(f"INSERT INTO bench_raw (data) VALUES ('{spaced}');\n")
        seconds = max(1, round(duration))
        try:
            out = subprocess.run(
                [
                    binary,
                    "-n",
                    "-M",
                    "prepared",
                    "-f",
                    str(script),
                    "-c",
                    str(concurrency),
                    "-j",
                    str(min(concurrency, os.cpu_count() or 1)),
                    "-T",
                    str(seconds),
                ],
                env=env,
                capture_output=True,
                text=True,
                timeout=seconds + 60,
            )
        except (OSError, subprocess.TimeoutExpired):
            return None
    m = re.search(r"tps = ([0-9.]+) \(without initial connection time\)", out.stdout)
    return float(m.group(1)) if m else None


async def database_floor(
    database_url: str, concurrencies: tuple[int, ...], duration: float, *, pgbench: bool = True
) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for c in concurrencies:
        raw = await raw_inserts(database_url, c, duration)
        pgb = await asyncio.to_thread(pgbench_inserts, database_url, c, duration) if pgbench else None
        out[str(c)] = {"psycopg_per_s": round(raw, 1), "pgbench_per_s": None if pgb is None else round(pgb, 1)}
    return out


async def event_store(database_url: str, concurrencies: tuple[int, ...], duration: float) -> dict[str, Any]:
    return {str(c): {"appends_per_s": round(await store_appends(database_url, c, duration), 1)} for c in concurrencies}
