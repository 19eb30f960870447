"""`python -m bench`: the whole suite, in one run on this machine. See docs/benchmarks.md.

    python -m bench                       full run (embedded PostgreSQL and NATS), 3 repetitions
    python -m bench --smoke               tiny counts, one repetition (what `make test` runs)
    python -m bench --database-url URL --nats-url URL    use running servers instead

Prints a table of medians and writes JSON (and the same table as Markdown) under bench/results/.
Run order inside each repetition interleaves our system with its peers (spawn floor, DBOS, ours),
so that the ratios compare figures taken under the same load.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from bench import agents, cpu, database, env, projection, stop, system
from bench import profile as profiling
from bench import sandbox as sandbox_cost
from bench import trace as tracing
from bench.stats import median, ratio
from infra.store.migrate import migrate
from infra.trace import VARIABLE as TRACE_VARIABLE

RESULTS = env.ROOT / "bench" / "results"
WORKLOADS = (
    "spawn",
    "sandbox",
    "dbos",
    "e2e",
    "e2e_unsandboxed",
    "insert",
    "store",
    "logs",
    "fanout",
    "memory",
    "projection",
    "stop_huge_run",
    "agents",
    "trace",
    "profile",
)
# Run only when named in --only: py-spy costs CPU on the same cores, and its files are large.
OPT_IN = frozenset({"profile"})


@dataclass(frozen=True)
class Sizes:
    repeat: int = 3
    latency_runs: int = 50
    warmup: int = 3
    concurrency: int = 16
    duration: float = 10.0
    ramp: float = 1.0
    db_concurrencies: tuple[int, ...] = (1, 8, 32)
    db_duration: float = 3.0
    log_lines: int = 200
    log_interval: float = 0.02
    subscribers: int = 1000
    fanout_events: int = 200
    fanout_rate: float = 20.0
    waiting_runs: int = 1000
    output_mb: float = 200
    projection_rate: float = 500.0
    projection_duration: float = 10.0
    pgbench: bool = True
    # The 200 MB script runs on a stack of its own (see _memory_output_rep); tiny outputs need not.
    isolate_output: bool = True
    log_delay: float = 1.0
    # stop_huge_run: a pipeline of `huge_stages` stages (above the default limit of 200 stages: the
    # main stack raises PIPELINES_MAX_STAGES to it, a setting that changes nothing else), and how
    # far its runs get first.
    huge_stages: int = 1000
    huge_done: int = 100
    # agents (issue 16): runs of one `sleep 0.5` step, `agent_in_flight` in flight, handed to 1, 2,
    # then 4 agents of `agent_capacity` concurrent units each (docs/benchmarks.md says why 4).
    agent_counts: tuple[int, ...] = (1, 2, 4)
    agent_capacity: int = 4
    agent_in_flight: int = 64
    agent_duration: float = 10.0
    agent_ramp: float = 2.0
    # trace (issue 17): single runs of workload 1, each alone, after unmeasured ones; profile: the
    # py-spy sampling rate of each service during workload 1's throughput part.
    trace_runs: int = 20
    trace_warmup: int = 3
    profile_rate: int = 200


SMOKE = Sizes(
    repeat=1,
    latency_runs=2,
    warmup=1,
    concurrency=2,
    duration=1.0,
    ramp=0.2,
    db_duration=0.3,
    log_lines=3,
    log_interval=0.01,
    subscribers=5,
    fanout_events=3,
    fanout_rate=20.0,
    waiting_runs=3,
    output_mb=0.2,
    projection_rate=100.0,
    projection_duration=1.0,
    pgbench=False,
    isolate_output=False,
    log_delay=0.3,
    huge_stages=200,
    huge_done=3,
    agent_counts=(1, 2),
    agent_capacity=2,
    agent_in_flight=4,
    agent_duration=1.0,
    agent_ramp=0.5,
    trace_runs=2,
    trace_warmup=1,
)

# Every key the JSON carries, whatever the sizes (the smoke test checks them).
MEDIAN_KEYS: dict[str, tuple[str, ...]] = {
    "e2e": ("latency_p50_ms", "latency_p99_ms", "throughput_per_s"),
    "dbos": ("latency_p50_ms", "latency_p99_ms", "throughput_per_s"),
    "spawn_floor": ("latency_p50_ms", "latency_p99_ms", "throughput_per_s"),
    "insert_floor": ("1", "8", "32", "e2e_concurrency"),
    "event_store": ("1", "8", "32"),
    "projection": ("p50_ms", "p99_ms", "rate_per_s", "offered_per_s"),
    "fanout": ("subscribers", "p50_ms", "p99_ms", "per_delivery_p99_ms", "missing_deliveries"),
    "log_delivery": ("p50_ms", "p99_ms", "lines"),
    "memory": ("waiting_runs", "rss_waiting_mb", "output_mb", "rss_output_peak_mb", "rss_idle_mb"),
    "stop_huge_run": ("stages", "stop_ms", "cancel_ms"),
    "agents": ("capacity", "in_flight", "by_agents", "ratio_2_to_1", "ratio_4_to_2"),
}
TARGET_NAMES = (
    "e2e throughput >= 2x DBOS",
    "e2e throughput >= 60% of spawn floor",
    "e2e p50 latency <= 0.5x DBOS",
    "appends/s >= 60% of INSERT/s, 1 writer",
    "appends/s >= 60% of INSERT/s, 8 writers",
    "appends/s >= 60% of INSERT/s, 32 writers",
    "projection lag p99 <= 50 ms at 500 ev/s",
    "fan-out p99 <= 100 ms, 1,000 subscribers",
    "log line delivery p99 <= 100 ms",
    "executor RSS <= 150 MB, 1,000 runs waiting",
    "executor RSS <= 150 MB, script printing 200 MB",
    "stop and cancel of a 1,000-stage run <= 2 s",
    "runs/s with 2 agents >= 1.8x with 1",
)


def say(msg: str) -> None:
    sys.stderr.write(f"[bench {time.strftime('%H:%M:%S')}] {msg}\n")
    sys.stderr.flush()


@dataclass
class Run:
    sizes: Sizes
    args: argparse.Namespace
    reps: list[dict[str, Any]] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def wanted(self, name: str) -> bool:
        if name in OPT_IN:
            return self.args.only is not None and name in self.args.only
        return self.args.only is None or name in self.args.only

    def record(self, rep: dict[str, Any], name: str, fn: Callable[[], Any]) -> None:
        if not self.wanted(name):
            return
        say(f"rep {rep['rep'] + 1}: {name}")
        began = time.monotonic()
        load = [round(x, 2) for x in os.getloadavg()]
        try:
            result = fn()
        except Exception as exc:
            self.errors.append(f"{name}: {exc!r}")
            say(f"{name} failed: {exc!r}\n{traceback.format_exc()}")
            result = {"error": repr(exc)[:500]}
        if isinstance(result, dict):
            result.setdefault("load_avg_before", load)
            result.setdefault("wall_s", round(time.monotonic() - began, 1))
        rep[name] = result


def _peer(kind: str, sizes: Sizes, url: str | None = None) -> dict[str, Any]:
    argv = [
        sys.executable,
        "-m",
        "bench.peer",
        kind,
        "--latency-runs",
        str(sizes.latency_runs),
        "--warmup",
        str(sizes.warmup),
        "--concurrency",
        str(sizes.concurrency),
        "--duration",
        str(sizes.duration),
        "--ramp",
        str(sizes.ramp),
    ]
    if url:
        argv += ["--url", url]
    out = subprocess.run(
        argv, cwd=env.ROOT, capture_output=True, text=True, timeout=600, env=os.environ | {"PYTHONPATH": str(env.ROOT)}
    )
    if out.returncode != 0:
        raise RuntimeError(f"{kind} peer exited {out.returncode}: {out.stderr[-1500:]}")
    last = [ln for ln in out.stdout.splitlines() if ln.startswith("{")]
    if not last:
        raise RuntimeError(f"{kind} peer printed no result: {out.stdout[-500:]} {out.stderr[-1000:]}")
    return dict(json.loads(last[-1]))


def dbos_available() -> bool:
    return importlib.util.find_spec("dbos") is not None


def run_suite(args: argparse.Namespace) -> dict[str, Any]:
    sizes = SMOKE if args.smoke else Sizes()
    overrides = {
        k: getattr(args, k)
        for k in ("repeat", "subscribers", "concurrency", "duration")
        if getattr(args, k) is not None
    }
    sizes = replace(sizes, **overrides)
    env.raise_fd_limit()
    run = Run(sizes, args)
    machine = env.machine()
    say(f"machine: {machine['cpu']}, {machine['cores']} cores, load {machine['load_avg_start']}")
    servers = env.Servers.start(args.database_url, args.nats_url, say=say)
    result: dict[str, Any] = {}
    try:
        dbs = {name: servers.create_database(name) for name in ("system", "dbos", "floor", "projection")}
        asyncio.run(database.prepare(dbs["floor"]))
        for name in ("system", "projection"):
            asyncio.run(migrate(dbs[name]))
        with env.running_stack(
            servers, dbs["system"], extra_env={"PIPELINES_MAX_STAGES": str(sizes.huge_stages)}, echo=args.echo
        ) as (stack, stack_env, tail):
            sysm = system.System(stack, stack_env)
            asyncio.run(_with_fresh_client(sysm, sysm.wait_ready))
            for i in range(sizes.repeat):
                rep: dict[str, Any] = {"rep": i}
                run.reps.append(rep)
                _main_stack_rep(run, rep, sysm, dbs, _processes(stack, servers))
            if run.errors:
                say("last lines of the services' output:\n" + tail.text(40))
        if run.wanted("e2e_unsandboxed"):
            _unsandboxed_reps(run, servers)
        if run.wanted("trace"):
            _trace_rep(run, servers)
        if run.wanted("memory") and sizes.isolate_output:
            for rep in run.reps:
                _memory_output_rep(run, rep, servers)
        if run.wanted("projection"):
            with env.running_stack(servers, dbs["projection"], services=("relay", "projector"), echo=args.echo):
                for rep in run.reps or [{"rep": 0}]:
                    if rep not in run.reps:
                        run.reps.append(rep)
                    run.record(
                        rep,
                        "projection",
                        lambda: asyncio.run(
                            projection.projection_lag(
                                dbs["projection"],
                                servers.nats_url,
                                rate=sizes.projection_rate,
                                duration=sizes.projection_duration,
                            )
                        ),
                    )
        if run.wanted("agents"):
            _agents_reps(run, servers)
        result = {
            "suite": "pipelines-bench",
            "format": 1,
            "smoke": bool(args.smoke),
            "machine": machine | {"load_avg_end": [round(x, 2) for x in os.getloadavg()]},
            "servers": {
                "postgres": "given" if args.database_url else "embedded (default settings, as `make up`)",
                "nats": "given" if args.nats_url else "embedded",
                "postgres_version": servers.postgres_version(),
                "postgres_settings": servers.postgres_settings(),
            },
            "sizes": asdict(sizes),
            "repetitions": run.reps,
            "errors": run.errors,
        }
    finally:
        servers.close()
    result["medians"] = medians(run.reps, sizes)
    result["targets"] = targets(result["medians"], sizes)
    result["notes"] = notes(result)
    return result


def _processes(stack: Any, servers: env.Servers) -> dict[str, int | None]:
    """The processes whose CPU the end-to-end workload reports per run: the services, the
    servers when embedded, and this client."""
    out: dict[str, int | None] = {name: stack.pid(name) for name in stack.services}
    out["postgres"] = cpu.postmaster_pid(servers.postgres.pgdata if servers.postgres is not None else None)
    out["nats"] = servers.nats.process.pid if servers.nats is not None else None
    out["client"] = os.getpid()
    return out


def _e2e(run: Run, sysm: system.System, processes: dict[str, int | None]) -> dict[str, Any]:
    s = run.sizes
    return dict(
        asyncio.run(
            _with_fresh_client(
                sysm,
                lambda: system.end_to_end(
                    sysm,
                    latency_runs=s.latency_runs,
                    warmup=s.warmup,
                    concurrency=s.concurrency,
                    duration=s.duration,
                    ramp=s.ramp,
                    processes=processes,
                ),
            )
        )
    )


def _unsandboxed_reps(run: Run, servers: env.Servers) -> None:
    """The end-to-end workload on a stack of its own whose executor runs scripts without the
    sandbox (bench.unsandboxed): what the sandbox costs a run, beside `e2e`."""
    db = servers.create_database("unsandboxed")
    try:
        asyncio.run(migrate(db))
        with env.running_stack(servers, db, package="bench.unsandboxed", echo=run.args.echo) as (stack, stack_env, _):
            sysm = system.System(stack, stack_env)
            asyncio.run(_with_fresh_client(sysm, sysm.wait_ready))
            for i in range(run.sizes.repeat):
                if i >= len(run.reps):
                    run.reps.append({"rep": i})
                run.record(run.reps[i], "e2e_unsandboxed", lambda: _e2e(run, sysm, _processes(stack, servers)))
    finally:
        servers.drop_database(db)


def _trace_rep(run: Run, servers: env.Servers) -> None:
    """Workload 1's pipeline on a stack of its own whose services write trace marks
    (PIPELINES_TRACE, infra/trace.py): the median timeline of single runs (bench.trace). Once,
    in the first repetition: its figures are medians over its own runs."""
    assert servers.tmp is not None
    db = servers.create_database("trace")
    marks = servers.tmp / "trace-marks.jsonl"
    marks.unlink(missing_ok=True)
    if not run.reps:
        run.reps.append({"rep": 0})
    try:
        asyncio.run(migrate(db))
        with env.running_stack(servers, db, extra_env={TRACE_VARIABLE: str(marks)}, echo=run.args.echo) as (
            stack,
            stack_env,
            _,
        ):
            sysm = system.System(stack, stack_env)
            asyncio.run(_with_fresh_client(sysm, sysm.wait_ready))
            run.record(
                run.reps[0],
                "trace",
                lambda: asyncio.run(
                    _with_fresh_client(
                        sysm,
                        lambda: tracing.trace_runs(
                            sysm,
                            database_url=db,
                            nats_url=servers.nats_url,
                            stream=stack_env["PIPELINES_EVENTS_STREAM"],
                            marks_file=marks,
                            runs=run.sizes.trace_runs,
                            warmup=run.sizes.trace_warmup,
                        ),
                    )
                ),
            )
    finally:
        servers.drop_database(db)


def _profile(run: Run, sysm: system.System, processes: dict[str, int | None]) -> dict[str, Any]:
    s = run.sizes
    return dict(
        asyncio.run(
            _with_fresh_client(
                sysm,
                lambda: profiling.profile(
                    sysm,
                    processes,
                    RESULTS / "profile",
                    concurrency=s.concurrency,
                    duration=s.duration,
                    ramp=s.ramp,
                    rate=s.profile_rate,
                ),
            )
        )
    )


def _main_stack_rep(
    run: Run, rep: dict[str, Any], sysm: system.System, dbs: dict[str, str], processes: dict[str, int | None]
) -> None:
    s = run.sizes
    if rep["rep"] == 0:  # one set of files
        run.record(rep, "profile", lambda: _profile(run, sysm, processes))
    run.record(rep, "spawn", lambda: _peer("spawn", s))
    run.record(rep, "sandbox", lambda: asyncio.run(sandbox_cost.stage_cost(runs=s.latency_runs, warmup=s.warmup)))
    if dbos_available():
        run.record(rep, "dbos", lambda: _peer("dbos", s, dbs["dbos"]))
    elif run.wanted("dbos"):
        rep["dbos"] = {"skipped": "dbos is not installed: pip install -e '.[bench]'"}
    run.record(rep, "e2e", lambda: _e2e(run, sysm, processes))
    concurrencies = tuple(dict.fromkeys((*s.db_concurrencies, s.concurrency)))
    run.record(
        rep,
        "insert",
        lambda: asyncio.run(database.database_floor(dbs["floor"], concurrencies, s.db_duration, pgbench=s.pgbench)),
    )
    run.record(rep, "store", lambda: asyncio.run(database.event_store(dbs["floor"], s.db_concurrencies, s.db_duration)))
    run.record(
        rep,
        "logs",
        lambda: asyncio.run(
            _with_fresh_client(
                sysm, lambda: system.log_delivery(sysm, lines=s.log_lines, interval=s.log_interval, delay=s.log_delay)
            )
        ),
    )
    run.record(
        rep,
        "fanout",
        lambda: asyncio.run(
            _with_fresh_client(
                sysm,
                lambda: system.fan_out(
                    sysm, dbs["system"], subscribers=s.subscribers, events=s.fanout_events, rate=s.fanout_rate
                ),
            )
        ),
    )
    run.record(
        rep,
        "stop_huge_run",
        lambda: asyncio.run(
            _with_fresh_client(sysm, lambda: stop.stop_huge_run(sysm, stages=s.huge_stages, done=s.huge_done))
        ),
    )
    if run.wanted("memory"):
        run.record(
            rep,
            "memory_waiting",
            lambda: asyncio.run(
                _with_fresh_client(sysm, lambda: system.memory_waiting(sysm, dbs["system"], runs=s.waiting_runs))
            ),
        )
        if not s.isolate_output:
            run.record(
                rep,
                "memory_output",
                lambda: asyncio.run(
                    _with_fresh_client(sysm, lambda: system.memory_output(sysm, dbs["system"], megabytes=s.output_mb))
                ),
            )


def _memory_output_rep(run: Run, rep: dict[str, Any], servers: env.Servers) -> None:
    """On a stack of its own: a script printing 200 MB leaves the relay unable to publish the
    oversized log events it causes (docs/benchmarks.md), which would stall every later workload."""
    s = run.sizes
    db = servers.create_database(f"output{rep['rep']}")
    try:
        asyncio.run(migrate(db))
        with env.running_stack(servers, db, echo=run.args.echo) as (stack, stack_env, _):
            sysm = system.System(stack, stack_env)
            asyncio.run(_with_fresh_client(sysm, sysm.wait_ready))
            run.record(
                rep,
                "memory_output",
                lambda: asyncio.run(
                    _with_fresh_client(sysm, lambda: system.memory_output(sysm, db, megabytes=s.output_mb))
                ),
            )
    finally:
        servers.drop_database(db)


def _agents_reps(run: Run, servers: env.Servers) -> None:
    """On a stack of its own whose executor hands every script unit to an agent (issue 16)."""
    s = run.sizes
    if servers.nats is None:
        for rep in run.reps or [{"rep": 0}]:
            if rep not in run.reps:
                run.reps.append(rep)
            rep["agents"] = {"skipped": "needs the embedded NATS, whose users the agents become (no --nats-url)"}
        return
    db = servers.create_database("agents")
    try:
        asyncio.run(migrate(db))
        with (
            env.running_stack(
                servers, db, services=agents.STACK_SERVICES, extra_env=agents.STACK_ENV, echo=run.args.echo
            ) as (stack, stack_env, tail),
            agents.reconciler(servers.nats, db),
        ):
            sysm = system.System(stack, stack_env)
            asyncio.run(_with_fresh_client(sysm, sysm.wait_ready))
            for i in range(s.repeat):
                if i >= len(run.reps):
                    run.reps.append({"rep": i})
                run.record(
                    run.reps[i],
                    "agents",
                    lambda: asyncio.run(
                        _with_fresh_client(
                            sysm,
                            lambda: agents.scaling(
                                sysm,
                                servers.nats_url,
                                others=_server_pids(servers),
                                counts=s.agent_counts,
                                capacity=s.agent_capacity,
                                in_flight=s.agent_in_flight,
                                duration=s.agent_duration,
                                ramp=s.agent_ramp,
                            ),
                        )
                    ),
                )
            if any("agents" in e for e in run.errors):
                say("last lines of the agents stack's output:\n" + tail.text(40))
    finally:
        servers.drop_database(db)


def _server_pids(servers: env.Servers) -> dict[str, int]:
    out = {}
    if servers.nats is not None:
        out["nats"] = servers.nats.process.pid
    if servers.postgres is not None:
        out["postgres"] = servers.postgres.process.pid
    return out


async def _with_fresh_client(sysm: system.System, make: Callable[[], Any]) -> Any:
    # httpx clients are bound to the event loop that made them: one per asyncio.run.
    import httpx

    sysm.http = httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=64, max_keepalive_connections=64))
    try:
        return await make()
    finally:
        await sysm.http.aclose()


# ---- medians, targets, notes ---------------------------------------------------------------------


def _get(d: Any, *path: str) -> Any:
    for p in path:
        if not isinstance(d, dict):
            return None
        d = d.get(p)
    return d


def _med(reps: list[dict[str, Any]], *path: str) -> float | None:
    return median([_get(r, *path) for r in reps])


def medians(reps: list[dict[str, Any]], sizes: Sizes) -> dict[str, Any]:
    def runs(name: str) -> dict[str, Any]:
        return {
            "latency_p50_ms": _med(reps, name, "latency", "p50_ms"),
            "latency_p99_ms": _med(reps, name, "latency", "p99_ms"),
            "throughput_per_s": _med(reps, name, "throughput", "per_s"),
        }

    def per_run_of(name: str, what: str) -> dict[str, float | None]:
        keys = dict.fromkeys(k for r in reps for k in (_get(r, name, what) or {}))
        return {k: _med(reps, name, what, k) for k in keys}

    def cpu_of(name: str) -> dict[str, float | None]:
        return per_run_of(name, "cpu_ms_per_run")

    insert: dict[str, Any] = {}
    for c in ("1", "8", "32"):
        insert[c] = {
            "psycopg_per_s": _med(reps, "insert", c, "psycopg_per_s"),
            "pgbench_per_s": _med(reps, "insert", c, "pgbench_per_s"),
        }
    ec = str(sizes.concurrency)
    insert["e2e_concurrency"] = {
        "concurrency": sizes.concurrency,
        "psycopg_per_s": _med(reps, "insert", ec, "psycopg_per_s"),
        "pgbench_per_s": _med(reps, "insert", ec, "pgbench_per_s"),
    }
    store: dict[str, Any] = {}
    for c in ("1", "8", "32"):
        appends = _med(reps, "store", c, "appends_per_s")
        store[c] = {
            "appends_per_s": appends,
            "ratio_to_insert": ratio(appends, insert[c]["psycopg_per_s"]),
            "ratio_to_pgbench": ratio(appends, insert[c]["pgbench_per_s"]),
        }
    return {
        "e2e": runs("e2e")
        | {"failed_runs": _med(reps, "e2e", "failed_runs")}
        | {"cpu_ms_per_run": cpu_of("e2e"), "feed_reads_per_run": per_run_of("e2e", "feed_reads_per_run")},
        "e2e_unsandboxed": runs("e2e_unsandboxed") | {"cpu_ms_per_run": cpu_of("e2e_unsandboxed")},
        "dbos": runs("dbos"),
        "spawn_floor": runs("spawn"),
        "sandbox": {
            "steps_per_stage": len(sandbox_cost.STEPS),
            **{
                f"{variant}_{p}_ms": _med(reps, "sandbox", variant, f"{p}_ms")
                for variant in ("unsandboxed", "sandboxed", "sandboxed_no_network", "sandboxed_per_step")
                for p in ("p50", "p99")
            },
            "extra_per_stage_p50_ms": _med(reps, "sandbox", "extra_per_stage_p50_ms"),
        },
        "insert_floor": insert,
        "event_store": store,
        "projection": {
            "p50_ms": _med(reps, "projection", "p50_ms"),
            "p99_ms": _med(reps, "projection", "p99_ms"),
            "rate_per_s": sizes.projection_rate,
            "offered_per_s": _med(reps, "projection", "offered_per_s"),
            "missing": _med(reps, "projection", "missing"),
        },
        "fanout": {
            "subscribers": sizes.subscribers,
            "p50_ms": _med(reps, "fanout", "to_every_subscriber", "p50_ms"),
            "p99_ms": _med(reps, "fanout", "to_every_subscriber", "p99_ms"),
            "per_delivery_p99_ms": _med(reps, "fanout", "per_delivery", "p99_ms"),
            "missing_deliveries": _med(reps, "fanout", "missing_deliveries"),
        },
        "log_delivery": {
            "p50_ms": _med(reps, "logs", "p50_ms"),
            "p99_ms": _med(reps, "logs", "p99_ms"),
            "lines": sizes.log_lines,
        },
        "memory": {
            "waiting_runs": sizes.waiting_runs,
            "rss_waiting_mb": _med(reps, "memory_waiting", "rss_peak_mb"),
            "output_mb": sizes.output_mb,
            "rss_output_peak_mb": _med(reps, "memory_output", "rss_peak_mb"),
            "rss_idle_mb": _med(reps, "memory_output", "rss_before_mb"),
        },
        "stop_huge_run": {
            "stages": sizes.huge_stages,
            "stop_ms": _med(reps, "stop_huge_run", "stop_ms"),
            "cancel_ms": _med(reps, "stop_huge_run", "cancel_ms"),
        },
        "agents": _agents_medians(reps, sizes),
    }


def _agents_medians(reps: list[dict[str, Any]], sizes: Sizes) -> dict[str, Any]:
    by: dict[str, Any] = {}
    for n in sizes.agent_counts:
        k = str(n)
        by[k] = {
            "per_s": _med(reps, "agents", "by_agents", k, "per_s"),
            "ceiling_per_s": round(n * sizes.agent_capacity / 0.5, 2),
            "errors": _med(reps, "agents", "by_agents", k, "errors"),
            "cores_used": {
                part: _med(reps, "agents", "by_agents", k, "cores_used", part)
                for part in sorted({p for r in reps for p in (_get(r, "agents", "by_agents", k, "cores_used") or {})})
            },
        }

    # The ratios per repetition (figures taken under the same load), then their median.
    def ratio_of(a: str, b: str) -> float | None:
        return median(
            [
                ratio(_get(r, "agents", "by_agents", a, "per_s"), _get(r, "agents", "by_agents", b, "per_s"))
                for r in reps
            ]
        )

    return {
        "capacity": sizes.agent_capacity,
        "in_flight": sizes.agent_in_flight,
        "in_flight_ceiling_per_s": round(sizes.agent_in_flight / 0.5, 2),
        "by_agents": by,
        "ratio_2_to_1": ratio_of("2", "1"),
        "ratio_4_to_2": ratio_of("4", "2"),
    }


def _target(
    name: str, value: float | None, limit: float | None, *, at_most: bool, unit: str, detail: str
) -> dict[str, Any]:
    met = None if value is None or limit is None else (value <= limit if at_most else value >= limit)
    margin = None
    if met is not None and value is not None and limit:
        margin = round((value / limit - 1) * 100, 1)  # + is over the limit, - under it
    return {
        "name": name,
        "value": value,
        "limit": limit,
        "unit": unit,
        "at_most": at_most,
        "met": met,
        "margin_pct": margin,
        "detail": detail,
    }


def targets(m: dict[str, Any], sizes: Sizes) -> list[dict[str, Any]]:
    e2e, dbos, spawn = m["e2e"], m["dbos"], m["spawn_floor"]
    out = [
        _target(
            TARGET_NAMES[0],
            e2e["throughput_per_s"],
            _mul(dbos["throughput_per_s"], 2),
            at_most=False,
            unit="runs/s",
            detail=f"DBOS {dbos['throughput_per_s']} runs/s",
        ),
        _target(
            TARGET_NAMES[1],
            e2e["throughput_per_s"],
            _mul(spawn["throughput_per_s"], 0.6),
            at_most=False,
            unit="runs/s",
            detail=f"spawn floor {spawn['throughput_per_s']} runs/s",
        ),
        _target(
            TARGET_NAMES[2],
            e2e["latency_p50_ms"],
            _mul(dbos["latency_p50_ms"], 0.5),
            at_most=True,
            unit="ms",
            detail=f"DBOS p50 {dbos['latency_p50_ms']} ms",
        ),
    ]
    for i, c in enumerate(("1", "8", "32")):
        ins = m["insert_floor"][c]["psycopg_per_s"]
        out.append(
            _target(
                TARGET_NAMES[3 + i],
                m["event_store"][c]["appends_per_s"],
                _mul(ins, 0.6),
                at_most=False,
                unit="appends/s",
                detail=f"INSERT {ins}/s (psycopg), {m['insert_floor'][c]['pgbench_per_s']}/s (pgbench)",
            )
        )
    out += [
        _target(
            TARGET_NAMES[6],
            m["projection"]["p99_ms"],
            50.0,
            at_most=True,
            unit="ms",
            detail=f"offered {m['projection']['offered_per_s']} ev/s",
        ),
        _target(
            TARGET_NAMES[7],
            m["fanout"]["p99_ms"],
            100.0,
            at_most=True,
            unit="ms",
            detail=f"{sizes.subscribers} subscribers",
        ),
        _target(TARGET_NAMES[8], m["log_delivery"]["p99_ms"], 100.0, at_most=True, unit="ms", detail="issue 3"),
        _target(
            TARGET_NAMES[9],
            m["memory"]["rss_waiting_mb"],
            150.0,
            at_most=True,
            unit="MB",
            detail=f"{sizes.waiting_runs} runs waiting",
        ),
        _target(
            TARGET_NAMES[10],
            m["memory"]["rss_output_peak_mb"],
            150.0,
            at_most=True,
            unit="MB",
            detail=f"{sizes.output_mb} MB printed",
        ),
        _target(
            TARGET_NAMES[11],
            _slowest(m["stop_huge_run"]["stop_ms"], m["stop_huge_run"]["cancel_ms"]),
            2000.0,
            at_most=True,
            unit="ms",
            detail=f"{sizes.huge_stages} stages, {sizes.huge_done} done first; issue 13",
        ),
        _target(
            TARGET_NAMES[12],
            m["agents"]["ratio_2_to_1"],
            1.8,
            at_most=False,
            unit="x",
            detail=f"capacity {sizes.agent_capacity} each, {sizes.agent_in_flight} runs of `sleep 0.5` in flight",
        ),
    ]
    return out


def _slowest(*values: float | None) -> float | None:
    known = [v for v in values if v is not None]
    return max(known) if known else None


def _mul(v: float | None, k: float) -> float | None:
    return None if v is None else round(v * k, 2)


def notes(result: dict[str, Any]) -> list[str]:
    m = result["machine"]
    out = [
        f"{m['cores']} cores, shared: other engineers' test suites may run at the same time "
        f"(load average {m['load_avg_start']} at the start, {m['load_avg_end']} at the end). Ratios between figures "
        "of the same repetition are the meaningful numbers.",
    ]
    if m.get("busy_processes_at_start"):
        out.append("busy at the start: " + "; ".join(m["busy_processes_at_start"]))
    if result.get("smoke"):
        out.append("SMOKE RUN: tiny counts, figures are meaningless.")
    return out


# ---- report ----------------------------------------------------------------------------------------


def _fmt(v: Any, digits: int = 1) -> str:
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:,.{digits}f}"
    return str(v)


def table(result: dict[str, Any]) -> str:
    m = result["medians"]
    e2e, dbos, spawn = m["e2e"], m["dbos"], m["spawn_floor"]
    rows = [
        ("End to end p50 (ms)", e2e["latency_p50_ms"], dbos["latency_p50_ms"], spawn["latency_p50_ms"]),
        ("End to end p99 (ms)", e2e["latency_p99_ms"], dbos["latency_p99_ms"], spawn["latency_p99_ms"]),
        (
            f"Throughput, {result['sizes']['concurrency']} in flight (runs/s)",
            e2e["throughput_per_s"],
            dbos["throughput_per_s"],
            spawn["throughput_per_s"],
        ),
    ]
    lines = [
        "| workload | ours | DBOS | floor | ours/DBOS | ours/floor |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    un = m.get("e2e_unsandboxed") or {}
    if un.get("latency_p50_ms") is not None:
        rows += [
            ("End to end p50, scripts unsandboxed (ms)", un["latency_p50_ms"], dbos["latency_p50_ms"], None),
            (
                f"Throughput, scripts unsandboxed, {result['sizes']['concurrency']} in flight (runs/s)",
                un["throughput_per_s"],
                dbos["throughput_per_s"],
                spawn["throughput_per_s"],
            ),
        ]
    for name, ours, peer, floor in rows:
        lines.append(
            f"| {name} | {_fmt(ours)} | {_fmt(peer)} | {_fmt(floor)} | "
            f"{_fmt(ratio(ours, peer), 2)} | {_fmt(ratio(ours, floor), 2)} |"
        )
    for c in ("1", "8", "32"):
        st, ins = m["event_store"][c], m["insert_floor"][c]
        lines.append(
            f"| Appends/s, {c} writer{'s' if c != '1' else ''} (floor: INSERT/s psycopg; pgbench "
            f"{_fmt(ins['pgbench_per_s'], 0)}) | {_fmt(st['appends_per_s'], 0)} | | "
            f"{_fmt(ins['psycopg_per_s'], 0)} | | {_fmt(st['ratio_to_insert'], 2)} |"
        )
    ec = m["insert_floor"]["e2e_concurrency"]
    lines.append(
        f"| INSERT/s at {ec['concurrency']} connections (psycopg / pgbench) | | | "
        f"{_fmt(ec['psycopg_per_s'], 0)} / {_fmt(ec['pgbench_per_s'], 0)} | | |"
    )
    p = m["projection"]
    lines.append(
        f"| Projection lag at {_fmt(p['rate_per_s'], 0)} ev/s, p50 / p99 (ms) | "
        f"{_fmt(p['p50_ms'])} / {_fmt(p['p99_ms'])} | | | | |"
    )
    f = m["fanout"]
    lines.append(
        f"| Fan-out to {f['subscribers']} subscribers, p50 / p99 (ms) | {_fmt(f['p50_ms'])} / "
        f"{_fmt(f['p99_ms'])} | | | | |"
    )
    lg = m["log_delivery"]
    lines.append(
        f"| Log line write → subscriber, p50 / p99 (ms) | {_fmt(lg['p50_ms'])} / {_fmt(lg['p99_ms'])} | | | | |"
    )
    mem = m["memory"]
    lines.append(f"| Executor RSS, {mem['waiting_runs']} runs waiting (MB) | {_fmt(mem['rss_waiting_mb'])} | | | | |")
    lines.append(
        f"| Executor RSS peak, script printing {mem['output_mb']} MB (MB) | {_fmt(mem['rss_output_peak_mb'])} | | | | |"
    )
    sb = m["sandbox"]
    lines.append(
        f"| Stage of {sb['steps_per_stage']} short steps, p50 / p99 (ms), floor: unsandboxed (no network: "
        f"{_fmt(sb['sandboxed_no_network_p50_ms'])} / {_fmt(sb['sandboxed_no_network_p99_ms'])}; "
        f"the sandbox entered per step: {_fmt(sb['sandboxed_per_step_p50_ms'])} / "
        f"{_fmt(sb['sandboxed_per_step_p99_ms'])}) | "
        f"{_fmt(sb['sandboxed_p50_ms'])} / {_fmt(sb['sandboxed_p99_ms'])} | | "
        f"{_fmt(sb['unsandboxed_p50_ms'])} / {_fmt(sb['unsandboxed_p99_ms'])} | | "
        f"{_fmt(ratio(sb['sandboxed_p50_ms'], sb['unsandboxed_p50_ms']), 2)} |"
    )
    hr = m["stop_huge_run"]
    lines.append(
        f"| Stop / cancel of a {hr['stages']}-stage run being driven (ms) | {_fmt(hr['stop_ms'])} / "
        f"{_fmt(hr['cancel_ms'])} | | | | |"
    )
    ag = m["agents"]
    for n, row in ag["by_agents"].items():
        lines.append(
            f"| Runs/s of `sleep 0.5`, {ag['in_flight']} in flight, {n} agent{'s' if n != '1' else ''} of capacity "
            f"{ag['capacity']} (floor: the agents' ceiling, slots / 0.5 s) | {_fmt(row['per_s'])} | | "
            f"{_fmt(row['ceiling_per_s'])} | | {_fmt(ratio(row['per_s'], row['ceiling_per_s']), 2)} |"
        )
    lines.append(
        f"| Runs/s ratio, 2 agents / 1 and 4 / 2 | {_fmt(ag['ratio_2_to_1'], 2)} / "
        f"{_fmt(ag['ratio_4_to_2'], 2)} | | | | |"
    )
    lines += cpu_table(m)
    lines += ["", "| target | value | limit | met | margin |", "|---|---:|---:|:-:|---:|"]
    for t in result["targets"]:
        met = {True: "yes", False: "**no**", None: "-"}[t["met"]]
        margin = "-" if t["margin_pct"] is None else f"{t['margin_pct']:+.0f}%"
        lines.append(f"| {t['name']} | {_fmt(t['value'])} {t['unit']} | {_fmt(t['limit'])} | {met} | {margin} |")
    return "\n".join(lines)


def cpu_table(m: dict[str, Any]) -> list[str]:
    """CPU milliseconds per end-to-end run of each process, sandbox on and off (bench.cpu):
    `own` is the process itself, `tree` adds its children (the executor's: scripts, setpriv,
    sandboxes; PostgreSQL's: its backends; the client's tree is the whole stack, not shown)."""
    on = m["e2e"].get("cpu_ms_per_run") or {}
    off = (m.get("e2e_unsandboxed") or {}).get("cpu_ms_per_run") or {}
    names = [k for k in dict.fromkeys([*on, *off]) if not k.endswith("+children")]
    if not names:
        return []
    lines = [
        "",
        "| CPU per run (ms) | own | tree | own, unsandboxed | tree, unsandboxed |",
        "|---|---:|---:|---:|---:|",
    ]
    total = [0.0, 0.0, 0.0, 0.0]
    for name in names:
        cells = [on.get(name), on.get(f"{name}+children"), off.get(name), off.get(f"{name}+children")]
        if name == "client":  # this process: its children are the stack itself
            cells[1] = cells[3] = None
        for i, v in enumerate(cells):
            if v is not None and name != "client":
                total[i] += v
        lines.append(f"| {name} | " + " | ".join(_fmt(v, 2) for v in cells) + " |")
    lines.append("| all but the client | " + " | ".join(_fmt(v if v else None, 2) for v in total) + " |")
    reads = m["e2e"].get("feed_reads_per_run") or {}
    if reads:
        lines += ["", "Feed reads per run (sandbox on): " + ", ".join(f"{k} {_fmt(v, 2)}" for k, v in reads.items())]
    return lines


def sections(result: dict[str, Any]) -> str:
    """The trace's critical path and the profile's tops, when they ran (first repetition)."""
    first = result["repetitions"][0] if result["repetitions"] else {}
    out = ""
    tr = first.get("trace") or {}
    if tr.get("critical_path"):
        total = tr["client_total_ms"]
        out += (
            f"\n## Trace of one run: median over {tr['runs']} single runs (POST to `succeeded` p50 "
            f"{total['p50']} ms, p90 {total['p90']} ms; load {tr.get('load_avg_before')})\n\n"
            + tracing.table(tr["critical_path"])
            + "\n\nWhere the time goes (each run's causal chain charged to what ended each gap; median ms per run):\n\n"
            + "\n".join(f"- {r['cost']}: {r['median_ms']} ms ({r['share_pct']}%)" for r in tr.get("breakdown", []))
            + "\n\nHops per run (median): "
            + ", ".join(f"{k} {v:g}" for k, v in tr["hops_per_run"].items() if v)
            + "\n"
        )
    pr = first.get("profile") or {}
    if pr.get("processes"):
        thr = pr["throughput"]
        out += (
            f"\n## Profile under the throughput load ({thr['concurrency']} in flight, {thr['per_s']} runs/s "
            f"while sampled at {pr['rate_hz']} Hz; load {pr.get('load_avg_before')})\n" + profiling.report(pr) + "\n"
        )
    return out


def header(result: dict[str, Any]) -> str:
    m = result["machine"]
    s = result["servers"]
    return (
        f"{m['date']} on {m['hostname']}: {m['cpu']}, {m['cores']} cores, {m['memory_mb']} MB, {m['os']}, "
        f"Python {m['python']}; PostgreSQL {s['postgres_version']} ({s['postgres']}; "
        f"fsync={s['postgres_settings'].get('fsync')}, "
        f"synchronous_commit={s['postgres_settings'].get('synchronous_commit')}), "
        f"NATS {s['nats']}; commit {m['git_commit']}{' (dirty)' if m['git_dirty'] else ''}; "
        f"{result['sizes']['repeat']} repetitions, medians shown."
    )


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--smoke", action="store_true", help="tiny counts, one repetition")
    parser.add_argument("--repeat", type=int)
    parser.add_argument("--concurrency", type=int, help="runs in flight for the throughput figures")
    parser.add_argument("--duration", type=float, help="seconds of each throughput measurement")
    parser.add_argument("--subscribers", type=int)
    parser.add_argument("--database-url", help="a PostgreSQL server to use (CREATE DATABASE must be allowed)")
    parser.add_argument("--nats-url", help="a NATS server with JetStream; no other stream may own pipelines.v1.>")
    parser.add_argument("--only", type=lambda s: set(s.split(",")), help=f"comma-separated subset of {WORKLOADS}")
    parser.add_argument("--out", type=Path, help="JSON output (default bench/results/latest.json)")
    parser.add_argument("--echo", action="store_true", help="show the services' output")
    args = parser.parse_args(argv)
    # Stop cleanly (services, servers, databases) on Ctrl-C and on SIGTERM, even when started in
    # the background, where SIGINT arrives ignored.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, _interrupt)
    if args.only is not None:
        if "memory" in args.only:
            args.only |= {"memory"}
        unknown = args.only - set(WORKLOADS)
        if unknown:
            parser.error(f"unknown workloads: {sorted(unknown)}")
    out = args.out or RESULTS / ("smoke.json" if args.smoke else "latest.json")
    result = run_suite(args)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    report = header(result) + "\n\n" + table(result) + "\n\n" + "\n".join(f"- {n}" for n in result["notes"]) + "\n"
    report += sections(result)
    out.with_suffix(".md").write_text(report)
    print(report)
    say(f"wrote {out} and {out.with_suffix('.md')}")
    if result["errors"]:
        say("workloads that failed: " + "; ".join(result["errors"]))
        return 1
    return 0
