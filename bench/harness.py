"""One harness for every "run a unit of work" benchmark (ours, DBOS, the spawn floor), so that
the three are measured the same way:

- latency: `latency_runs` units one at a time (after `warmup` unmeasured ones), p50/p99;
- throughput: `concurrency` workers, each starting a new unit as soon as its last one finished
  (closed loop, so that many are in flight), for `duration` seconds; completions counted after
  the first `ramp` seconds, divided by the time counted. Workers then finish what they started.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import Any

from bench.stats import summary_ms

Unit = Callable[[], Awaitable[Any]]


async def latency(unit: Unit, runs: int, warmup: int = 2, timeout: float = 60.0) -> dict[str, Any]:
    for _ in range(warmup):
        await asyncio.wait_for(unit(), timeout)
    samples: list[float] = []
    for _ in range(runs):
        began = time.perf_counter()
        await asyncio.wait_for(unit(), timeout)
        samples.append(time.perf_counter() - began)
    return summary_ms(samples)


async def throughput(
    unit: Unit, concurrency: int, duration: float, ramp: float = 1.0, timeout: float = 60.0
) -> dict[str, Any]:
    loop = asyncio.get_running_loop()
    start = loop.time()
    counted_from = start + ramp
    stop_at = counted_from + duration
    done: list[float] = []
    errors: list[str] = []
    started = 0
    stalled = False

    async def worker() -> None:
        nonlocal started, stalled
        while loop.time() < stop_at and not stalled:
            started += 1
            try:
                await asyncio.wait_for(unit(), timeout)
            except TimeoutError:
                stalled = True  # the system under test stopped answering: stop, don't wait it out
                errors.append(f"a unit took more than {timeout} s")
                return
            except Exception as exc:  # counted, not fatal: the figure says how many failed
                errors.append(repr(exc)[:200])
                if len(errors) > 50:
                    return
                continue
            done.append(loop.time())

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    counted = [t for t in done if counted_from <= t <= stop_at]
    return {
        "concurrency": concurrency,
        "per_s": round(len(counted) / duration, 2),
        "completed": len(done),
        "started": started,
        "errors": len(errors),
        "first_error": errors[0] if errors else None,
        "stalled": stalled,
        "seconds": duration,
    }
