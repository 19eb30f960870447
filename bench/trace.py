"""A trace of one run (issue 17): where the end-to-end milliseconds of workload 1 go.

The same three-stage pipeline of `true` scripts as `e2e`, on a stack of its own that runs with
`PIPELINES_TRACE=<file>` (infra/trace.py: each service appends a JSON line per hop it passes).
Runs go one at a time, each alone (the system idle before it starts), after a few unmeasured ones.
Every timestamp is the wall clock of this one machine:

- the client's: POST sent, 201 received, each `pipeline.run.updated` frame received;
- the services' marks (`infra.trace`): the API's trigger and appends, the executor's wake-up, its
  reads and appends, units, the sandbox and steps, the relay's reads and publishes, the
  gateway's receipt and push of each event, the projector's folds;
- the store's `recorded_at` of each event (PostgreSQL's `now()`: when its append's statement
  began, before its commit);
- JetStream's stored time of each message (the server's, read back with `get_msg`).

Each is put in ms since the client's POST; marks that name no run (the relay's wake-ups and
empty reads) are the run's when they fall between its POST and its `succeeded` frame. A hop
that occurs several times in a run (three stages) is numbered in time order. The table is the
median of each hop over the runs, in order of that median, with the gap from the row above.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgspec
import psycopg
from nats.js.errors import NotFoundError

from bench.stats import median, percentile
from bench.system import TERMINAL, System, script_stages
from infra.broker.bus import connect as nats_connect

_decode = msgspec.json.Decoder()

# The hops of other runs' fan-out are kept only for these events in the critical-path table: the
# run's start (which the executor may hear of from JetStream) and its end (what the client waits for).
PATH_EVENTS = ("run_triggered", "run_succeeded", "run_failed", "run_cancelled")
# Whose marks are fan-out off the critical path, but for PATH_EVENTS.
FAN_OUT = ("relay", "nats", "gateway", "projector")


@dataclass(frozen=True)
class Mark:
    t: float  # wall clock, seconds
    process: str  # "executor" (the pid dropped)
    hop: str
    run: str | None
    what: str = ""


@dataclass
class ClientRun:
    """What the client saw of one run, and where the run's messages sit in the stream."""

    run_id: str
    posted: float
    created: float = 0.0
    frames: list[tuple[float, str]] = field(default_factory=list)  # (received, status)
    done: float = 0.0
    first_seq: int = 0  # the stream's last sequence before the POST
    last_seq: int = 0  # and after the run settled


def read_marks(path: Path) -> list[Mark]:
    """The services' marks (infra.trace's JSON lines); a torn last line is skipped."""
    out: list[Mark] = []
    if not path.exists():
        return out
    for line in path.read_text().splitlines():
        with contextlib.suppress(ValueError, KeyError, TypeError):
            d = json.loads(line)
            out.append(
                Mark(float(d["t"]), str(d["p"]).split("[", 1)[0], str(d["hop"]), d.get("run"), d.get("what", ""))
            )
    return out


def timeline(run: ClientRun, marks: Iterable[Mark]) -> list[tuple[str, float]]:
    """The run's hops as (label, ms since the POST), in time order; repeated labels numbered."""
    end = run.done or float("inf")
    mine = [m for m in marks if m.run == run.run_id or (m.run is None and run.posted <= m.t <= end)]
    points: list[tuple[float, str]] = [(run.posted, "client: POST sent"), (run.created, "client: 201 received")]
    seen: set[str] = set()
    for t, status in run.frames:
        if status not in seen:  # the first frame of each status
            seen.add(status)
            points.append((t, f"client: frame {status} received"))
    points += [(m.t, f"{m.process}: {m.hop}" + (f" {m.what}" if m.what else "")) for m in mine]
    points.sort()
    count: Counter[str] = Counter()
    out = []
    for t, label in points:
        count[label] += 1
        n = count[label]
        out.append((label if n == 1 else f"{label} #{n}", round((t - run.posted) * 1000, 3)))
    return out


def summarize(
    timelines: Sequence[Sequence[tuple[str, float]]], keep: Callable[[str], bool] = lambda _: True
) -> list[dict[str, Any]]:
    """The hops `keep` accepts that occurred in at least half of the runs: each one's median (and
    p10, p90) over the runs, in the order of the medians. `gap_ms`: the difference of its median
    from the row above's; `step_ms`: the median over the runs of its time minus the row above's
    in the same run (robust where the gap of two medians is not: a noisy hop's neighbours)."""
    by: dict[str, list[float]] = {}
    for tl in timelines:
        for label, ms in tl:
            if keep(label):
                by.setdefault(label, []).append(ms)
    rows = []
    for label, values in by.items():
        if 2 * len(values) < len(timelines):
            continue
        rows.append(
            {
                "hop": label,
                "median_ms": round(median(values) or 0.0, 2),
                "p10_ms": round(percentile(values, 10) or 0.0, 2),
                "p90_ms": round(percentile(values, 90) or 0.0, 2),
                "runs": len(values),
            }
        )
    rows.sort(key=lambda r: (r["median_ms"], r["hop"]))
    runs = [dict(tl) for tl in timelines]
    prev: dict[str, Any] | None = None
    for r in rows:
        if prev is None:
            r["gap_ms"] = r["step_ms"] = r["median_ms"]
        else:
            r["gap_ms"] = round(r["median_ms"] - prev["median_ms"], 2)
            steps = [run[r["hop"]] - run[prev["hop"]] for run in runs if r["hop"] in run and prev["hop"] in run]
            r["step_ms"] = round(median(steps) or 0.0, 2)
        prev = r
    return rows


def on_path(label: str) -> bool:
    """Whether a hop belongs to the critical-path table: everything but the fan-out of the events
    between the run's start and its end (in the full table only)."""
    who, _, rest = label.partition(": ")
    if who not in FAN_OUT:
        return True
    return any(e in rest for e in PATH_EVENTS)


def critical_path(timelines: Sequence[Sequence[tuple[str, float]]]) -> list[dict[str, Any]]:
    return summarize(timelines, on_path)


# The causal chain of a run (the spine): each gap between two of its marks, in the run's own
# time order, is charged to what ended it. Marks of parallel branches (the 201, the fan-out of the
# events between the start and the end, the projector, a second read of the run while a step
# runs) are left out, so the charges add up to the run's POST-to-`succeeded` time.
SPINE: tuple[tuple[str, str], ...] = (
    ("api: trigger", "API: HTTP, token, pipeline read"),
    ("store: now() of append", "executor/API Python between hops (decide, leases, log flush)"),
    ("api: appended", "commits (statement to return: WAL fsync)"),
    ("executor: appended", "commits (statement to return: WAL fsync)"),
    ("executor: woken", "wake-up over core NATS"),
    ("executor: loaded", "executor: read of the run"),
    ("executor: unit", "executor/API Python between hops (decide, leases, log flush)"),
    ("executor: script run", "executor: unit set-up (secrets, run log, uid, env)"),
    ("executor: script written", "executor: work dir and script files"),
    ("executor: sandbox held", "sandbox: the run's sandbox taken (spare holder, /tmp)"),
    ("executor: step sent to the runner", "sandbox: step env file, FIFOs, request"),
    ("executor: step started", "runner: fork and exec of the step (first: sandbox ready)"),
    ("executor: step exited", "the script itself (`true`) and its exit report"),
    ("relay: read run_succeeded", "relay: woken and feed read of the last event"),
    ("nats: stored run_succeeded", "relay: publish to JetStream"),
    ("gateway: received run_succeeded", "JetStream delivery to the gateway"),
    ("client: frame succeeded received", "gateway: frame built and sent, WebSocket to client"),
)


def _charge(label: str) -> str | None:
    base = label.split(" #")[0]
    for prefix, what in SPINE:
        if base == prefix or base.startswith(prefix + " "):
            return what
    return None


def breakdown(timelines: Sequence[Sequence[tuple[str, float]]]) -> list[dict[str, Any]]:
    """Per kind of cost, its median ms per run over the runs (and its share of the sum of the
    medians), largest first. Each run's spine telescopes to its POST-to-`succeeded` time."""
    per_run: list[dict[str, float]] = []
    for tl in timelines:
        charged: dict[str, float] = {}
        prev = 0.0
        loaded = ended = False
        for label, ms in sorted(tl, key=lambda x: x[1]):
            what = _charge(label)
            if what is None or (label.startswith("executor: loaded") and loaded):
                continue  # off the spine; or a second read of the run, made while a step runs
            if ended and not label.startswith(("nats:", "gateway:", "client:")):
                continue  # the relay already read the run's end: the rest is its way to the client
            loaded = loaded or label.startswith("executor: loaded")
            ended = ended or label.startswith("relay: read run_succeeded")
            charged[what] = charged.get(what, 0.0) + ms - prev
            prev = ms
            if label.startswith("client: frame succeeded"):
                break
        per_run.append(charged)
    kinds = {k for c in per_run for k in c}
    meds = {k: median([c.get(k, 0.0) for c in per_run]) or 0.0 for k in kinds}
    total = sum(meds.values()) or 1.0
    return [
        {"cost": k, "median_ms": round(v, 2), "share_pct": round(100 * v / total, 1)}
        for k, v in sorted(meds.items(), key=lambda kv: -kv[1])
    ]


def counts(timelines: Sequence[Sequence[tuple[str, float]]]) -> dict[str, float | None]:
    """Median times per run each hop occurred (its label without the event or number)."""
    per_run = []
    for tl in timelines:
        c: Counter[str] = Counter()
        for label, _ in tl:
            base = label.split(" #")[0]
            who, _, hop = base.partition(": ")
            if who in FAN_OUT and "_" in hop.rsplit(" ", 1)[-1]:
                hop = hop.rsplit(" ", 1)[0]  # "read run_triggered": "read", one count per event
            c[f"{who}: {hop}"] += 1
        per_run.append(c)
    keys = sorted({k for c in per_run for k in c})
    return {k: median([float(c.get(k, 0)) for c in per_run]) for k in keys}


def table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| hop | ms since POST: median | gap from the row above | same, per run (median) | p10 | p90 |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['hop']} | {r['median_ms']:.2f} | {r['gap_ms']:+.2f} | {r['step_ms']:+.2f} | "
            f"{r['p10_ms']:.2f} | {r['p90_ms']:.2f} |"
        )
    return "\n".join(lines)


# ---- driving the runs ------------------------------------------------------------------------------


class FrameLog:
    """One WebSocket subscription to a pipeline's runs: every `pipeline.run.updated` frame, timed."""

    def __init__(self, system: System, pipeline_id: str) -> None:
        self.system = system
        self.pipeline_id = pipeline_id
        self.frames: dict[str, list[tuple[float, str]]] = {}
        self._ended: dict[str, asyncio.Event] = {}
        self._ws: Any = None
        self._task: asyncio.Task[None] | None = None

    async def start(self) -> None:
        self._ws = await self.system.ws()
        await self._ws.send(
            json.dumps({"action": "subscribe", "channel": "runs", "params": {"pipelineId": self.pipeline_id}})
        )
        while True:
            frame = _decode.decode(await asyncio.wait_for(self._ws.recv(), 30))
            if frame.get("event") == "subscribed":
                break
            if frame.get("event") == "error":
                raise RuntimeError(f"subscribe failed: {frame}")
        self._task = asyncio.create_task(self._read())

    async def _read(self) -> None:
        with contextlib.suppress(Exception):
            async for message in self._ws:
                now = time.time()
                frame = _decode.decode(message)
                if frame.get("event") != "pipeline.run.updated":
                    continue
                run_id, status = frame["data"]["id"], str(frame["data"].get("status"))
                self.frames.setdefault(run_id, []).append((now, status))
                if status in TERMINAL:
                    self._ended.setdefault(run_id, asyncio.Event()).set()

    async def wait(self, run_id: str, timeout: float = 60.0) -> None:
        await asyncio.wait_for(self._ended.setdefault(run_id, asyncio.Event()).wait(), timeout)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
        if self._ws is not None:
            await self._ws.close()


async def _last_seq(js: Any, stream: str) -> int:
    info = await js.stream_info(stream)
    return int(info.state.last_seq)


async def stream_marks(js: Any, stream: str, run: ClientRun) -> list[Mark]:
    """JetStream's stored time of each of the run's messages (`nats: stored <event>`)."""
    out = []
    for seq in range(run.first_seq + 1, run.last_seq + 1):
        try:
            msg = await js.get_msg(stream, seq)
        except NotFoundError:
            continue
        parts = (msg.subject or "").split(".")
        if len(parts) == 6 and parts[4] == run.run_id and msg.time is not None:
            out.append(Mark(msg.time.timestamp(), "nats", "stored", run.run_id, parts[5]))
    return out


async def store_marks(database_url: str, run_id: str) -> list[Mark]:
    """Each append's `recorded_at` (its statement's start) and the types it wrote (`store: now() of`)."""
    async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
        cur = await conn.execute(
            "SELECT extract(epoch FROM recorded_at)::float8, string_agg(event_type, ',' ORDER BY position) "
            "FROM events WHERE stream_id IN (%s, %s) GROUP BY stream_id, recorded_at ORDER BY 1",
            (f"run-{run_id}", f"runlog-{run_id}"),
        )
        rows = await cur.fetchall()
    return [Mark(float(t), "store", "now() of append", run_id, types) for t, types in rows]


async def trace_runs(
    system: System,
    *,
    database_url: str,
    nats_url: str,
    stream: str,
    marks_file: Path,
    runs: int,
    warmup: int,
    settle: float = 0.3,
) -> dict[str, Any]:
    """`runs` runs one at a time after `warmup`, each once the last one's trailing work (its
    projection, its sandbox's end) has settled; their timelines and the table of medians."""
    pipeline_id = await system.create_pipeline(script_stages("true", "true", "true"))
    frames = FrameLog(system, pipeline_id)
    await frames.start()
    nc = await nats_connect(nats_url, "bench-trace")
    js = nc.jetstream()
    measured: list[ClientRun] = []
    url = f"{system.api}/pipelines/{pipeline_id}/trigger"
    try:
        for i in range(warmup + runs):
            await asyncio.sleep(settle)
            first_seq = await _last_seq(js, stream)
            posted = time.time()
            r = await system.http.post(url, json={}, headers=system._h())
            created = time.time()
            if r.status_code != 201:
                raise RuntimeError(f"trigger answered {r.status_code}: {r.text[:200]}")
            run = ClientRun(str(r.json()["id"]), posted, created, first_seq=first_seq)
            await frames.wait(run.run_id)
            run.frames = list(frames.frames.get(run.run_id, []))
            statuses = [s for _, s in run.frames]
            if "succeeded" not in statuses:
                raise RuntimeError(f"run {run.run_id} ended {statuses[-1:]}")
            run.done = next(t for t, s in run.frames if s == "succeeded")
            if i >= warmup:
                measured.append(run)
        await asyncio.sleep(settle)
        marks = read_marks(marks_file)
        timelines = []
        # Each run's messages lie between its own first sequence and the next run's.
        for run, after in zip(measured, [*measured[1:], None], strict=True):
            run.last_seq = after.first_seq if after is not None else await _last_seq(js, stream)
            extra = await stream_marks(js, stream, run) + await store_marks(database_url, run.run_id)
            timelines.append(timeline(run, [*marks, *extra]))
    finally:
        await frames.close()
        await nc.close()
    return {
        "runs": len(measured),
        "warmup": warmup,
        "settle_s": settle,
        "client_total_ms": {
            "p50": round(median([(r.done - r.posted) * 1000 for r in measured]) or 0.0, 2),
            "p90": round(percentile([(r.done - r.posted) * 1000 for r in measured], 90) or 0.0, 2),
        },
        "critical_path": critical_path(timelines),
        "breakdown": breakdown(timelines),
        "hops": summarize(timelines),
        "hops_per_run": counts(timelines),
        "timelines": timelines,
    }
