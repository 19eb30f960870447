"""Projection lag: the life of real three-stage runs (the events the executor writes, made by the
same decider) appended at a sustained rate through the store, waking the relay as every writer
does; the relay and the projector run as their own processes. Lag is measured from the moment an
append returns (committed) to the moment the projector's checkpoint, which commits in the same
transaction as the read-model rows, covers that event (polled every millisecond)."""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import time
import uuid
from datetime import UTC, datetime
from typing import Any

import psycopg

from bench.stats import summary_ms
from domain import events as ev
from domain import run as rn
from domain.stages import stages_from_dicts
from infra.broker import bus
from infra.store.migrate import open_pool
from infra.store.postgres import PostgresEventStore
from infra.store.records import NewEvent

Action = tuple[str, list[Any], int | None]  # stream, events, expected version


def run_life(run_id: str, pipeline_id: str) -> list[Action]:
    raw = [{"id": f"s{i}", "name": f"s{i}", "type": "script", "config": {"command": "true"}} for i in (1, 2, 3)]
    stages = stages_from_dicts(raw, [str(uuid.uuid4()) for _ in raw])
    at = datetime.now(UTC)
    state, version = rn.initial_state, 0
    actions: list[Action] = []

    def do(cmd: rn.RunCommand) -> None:
        nonlocal state, version
        new = rn.decide(cmd, state)
        actions.append((ev.run_stream(run_id), new, version))
        for e in new:
            state = rn.evolve(state, e)
        version += len(new)

    do(
        rn.TriggerRun(
            run_id=run_id,
            pipeline_id=pipeline_id,
            organization_id=None,
            definition_version=1,
            stages=stages,
            variables={},
            by="bench",
            at=at,
        )
    )
    do(rn.Advance(at=at))
    while not state.terminal:
        active = state.active_stage
        assert active is not None
        line = rn.LogLine("system", f"Stage {active.stage_id} succeeded (2 ms)")
        actions.append(
            (ev.run_log_stream(run_id), [rn.LogAppended(stage_id=active.stage_id, lines=(line,), at=at)], None)
        )
        do(rn.CompleteStage(stage_id=active.stage_id, attempt=active.attempt, succeeded=True, exit_code=0, at=at))
    return actions


async def projection_lag(
    database_url: str, nats_url: str, *, rate: float, duration: float, chains: int = 64
) -> dict[str, Any]:
    pool = await open_pool(database_url, min_size=chains, max_size=chains)
    store = PostgresEventStore(pool)
    nc = await bus.connect(nats_url, "bench-projection")
    poker = bus.Poker(nc)
    poker.start()
    poll_conn = await psycopg.AsyncConnection.connect(database_url, autocommit=True)
    polls: list[tuple[tuple[int, int], float]] = []
    stop_polling = asyncio.Event()

    async def checkpoint() -> tuple[int, int] | None:
        cur = await poll_conn.execute("SELECT tx_id::text::bigint, position FROM checkpoints WHERE name = 'projector'")
        row = await cur.fetchone()
        return (int(row[0]), int(row[1])) if row else None

    async def poll() -> None:
        last = None
        while not stop_polling.is_set():
            cp = await checkpoint()
            now = time.perf_counter()
            if cp is not None and cp != last:
                polls.append((cp, now))
                last = cp
            await asyncio.sleep(0.001)

    appended: list[tuple[int, float]] = []  # (position, committed at)
    try:
        # Warm up: the projector is up and caught up once it covers a first run.
        pipeline_id = str(uuid.uuid4())
        probe = str(uuid.uuid4())
        for stream, events, expected in run_life(probe, pipeline_id)[:1]:
            result = await store.append(
                stream,
                [NewEvent(str(uuid.uuid4()), e, pipeline_id=pipeline_id, run_id=probe) for e in events],
                expected,
            )
            poker.poke()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            cp = await checkpoint()
            if cp is not None and cp[1] >= result.positions[-1]:
                break
            poker.poke()
            await asyncio.sleep(0.1)
        else:
            raise RuntimeError("the projector never caught up with the first event")

        poller = asyncio.create_task(poll())
        loop = asyncio.get_running_loop()
        start = loop.time()
        end = start + duration
        emitted = 0

        async def chain() -> None:
            nonlocal emitted
            while loop.time() < end:
                run_id = str(uuid.uuid4())
                for stream, events, expected in run_life(run_id, pipeline_id):
                    slot = start + emitted / rate
                    emitted += len(events)
                    if slot >= end:
                        return
                    await asyncio.sleep(max(0.0, slot - loop.time()))
                    result = await store.append(
                        stream,
                        [NewEvent(str(uuid.uuid4()), e, pipeline_id=pipeline_id, run_id=run_id) for e in events],
                        expected,
                    )
                    now = time.perf_counter()
                    poker.poke()
                    appended.extend((p, now) for p in result.positions)

        await asyncio.gather(*(chain() for _ in range(chains)))
        offered = len(appended) / (loop.time() - start)
        # Tx ids of what was appended, to compare with the checkpoint's (tx_id, position).
        async with pool.connection() as conn:
            cur = await conn.execute(
                "SELECT position, tx_id::text::bigint FROM events WHERE position = ANY(%s)", ([p for p, _ in appended],)
            )
            tx_of = {int(r[0]): int(r[1]) for r in await cur.fetchall()}
        newest = max((tx_of[p], p) for p, _ in appended)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not (polls and polls[-1][0] >= newest):  # noqa: ASYNC110
            await asyncio.sleep(0.01)
        stop_polling.set()
        await poller
    finally:
        stop_polling.set()
        await poker.stop()
        with contextlib.suppress(Exception):
            await nc.close()
        await poll_conn.close()
        await pool.close()
    cursors = [c for c, _ in polls]
    lags: list[float] = []
    missing = 0
    for position, committed in appended:
        i = bisect.bisect_left(cursors, (tx_of[position], position))
        if i >= len(polls):
            missing += 1
            continue
        lags.append(max(0.0, polls[i][1] - committed))
    out: dict[str, Any] = summary_ms(lags)
    out.update(rate_per_s=rate, offered_per_s=round(offered, 1), events=len(appended), missing=missing)
    return out
