"""Fault suite (issue 3, item 8): runs go on while the api, relay, executor, projector and gateway
are killed with SIGKILL one at a time (and restarted by the supervisor) and nats-server is
restarted. Afterwards:

- every run is terminal or waiting for approval, and ended as its pipeline says it must
  (scripts that succeed: succeeded; a failing script: failed; an approved gate: succeeded; a gate
  nobody approved: still waiting);
- every run's event history is a valid sequence of the state machine, and folds to what the API
  answers;
- no stage and no step of a job ran more often than its attempts recorded (a redelivery never runs
  one twice), and every attempt that ran to its end was recorded by the script itself;
- every job and step of a stage of jobs started and ended once per attempt (tests/fault/history.py);
- every trigger (retried with its Idempotency-Key while the api was down) made exactly one run;
- every event in the store appears in JetStream exactly once and in feed order (Nats-Msg-Id = event
  id at the same index, same subject and body);
- the read models equal a rebuild from the store.

The pipelines: two script stages ("ok"), a gate between scripts ("gate"), a failing script
("fail"), and a stage of parallel jobs (one a matrix, one needing another, steps retried by their
job's `retry`) followed by a script stage ("jobs"); executor kills are aimed at a running script
stage or step.

`make test` runs a 10-run version (under a minute); `make soak` the 50-run version (marked soak),
which also kills nats-server with SIGKILL. PIPELINES_FAULT_SEED=n changes the order of the faults
and the pauses between them (the services never see the variable).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import time
import uuid
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest

from infra.broker import bus
from infra.broker.relay import POSITION
from infra.projector.consumer import Projector
from infra.store.migrate import open_pool
from infra.store.postgres import PostgresEventStore
from infra.store.records import FEED_START, RecordedEvent
from tests.fault.conftest import FaultStack
from tests.fault.history import TERMINAL, EffectKey, History, describe, effect_problems, fold_history

pytestmark = pytest.mark.e2e

SERVICES = ("api", "relay", "executor", "projector", "gateway")


# ---- a client that outlives the api --------------------------------------------------------


class GaveUp(Exception):
    pass


@dataclass
class Client:
    """HTTP with bounded retries: connection errors (the api is down), 5xx, and 409 "still in
    progress" are retried; every POST carries an Idempotency-Key so that a retry is safe."""

    http: httpx.AsyncClient
    headers: dict[str, str]
    retry_for: float = 45.0
    retries: Counter[str] = field(default_factory=Counter)

    async def request(self, method: str, path: str, *, json_body: Any = None, key: str | None = None) -> httpx.Response:
        headers = dict(self.headers)
        if method == "POST":
            headers["Idempotency-Key"] = key or f"k-{uuid.uuid4()}"
        deadline = time.monotonic() + self.retry_for
        delay = 0.05
        while True:
            try:
                r = await self.http.request(method, path, json=json_body, headers=headers)
                if r.status_code < 500 and not (r.status_code == 409 and "in progress" in r.text):
                    return r
                self.retries[f"{r.status_code}"] += 1
                last = f"{r.status_code} {r.text[:200]}"
            except httpx.TransportError as exc:
                self.retries[type(exc).__name__] += 1
                last = repr(exc)
            if time.monotonic() > deadline:
                raise GaveUp(f"{method} {path}: still failing after {self.retry_for}s: {last}")
            await asyncio.sleep(delay)
            delay = min(delay * 2, 0.5)

    async def get(self, path: str) -> Any:
        r = await self.request("GET", path)
        assert r.status_code == 200, f"GET {path}: {r.status_code} {r.text}"
        return r.json()


# ---- the workload ---------------------------------------------------------------------------

RETRY = {"maxAttempts": 3, "backoff": 0.1}


def _effect(fault: FaultStack) -> str:
    """A shell snippet that records that a script stage or a step of a job started (once per
    execution): `run|stage|job|step`, job and step empty for a typed stage (see `_effects`). A file
    of its own per execution: scripts of different runs may run as different users, and one could
    not append to a file another created."""
    return f'e=$(mktemp {fault.effects_dir}/start.XXXXXXXXXX) && echo "$RUN_ID|$STAGE_ID|$JOB_NAME|$STEP_NAME" > "$e"'


def _effects(fault: FaultStack) -> Counter[EffectKey]:
    out: Counter[EffectKey] = Counter()
    for path in fault.effects_dir.glob("start.*"):
        parts = path.read_text().strip().split("|")
        if len(parts) == 4:
            out[parts[0], parts[1], parts[2], parts[3]] += 1
    return out


def jobs_spec(fault: FaultStack) -> dict[str, Any]:
    """A stage of jobs run in parallel (a matrix of two, one job needing another), each step
    retried by its job's `retry` when its executor dies, then a script stage."""
    e = _effect(fault)
    return {
        "stages": [
            {
                "id": "work",
                "jobs": [
                    {
                        "name": "compile",
                        "retry": RETRY,
                        "steps": [
                            {"name": "fetch", "run": f"{e}; sleep 0.3; echo fetched"},
                            {"name": "build", "run": f"{e}; sleep 0.6; echo built"},
                        ],
                    },
                    {
                        "name": "lint",
                        "retry": RETRY,
                        "matrix": {"shard": ["a", "b"]},
                        "steps": [{"name": "check", "run": f"{e}; sleep 0.7; echo linted $MATRIX_SHARD"}],
                    },
                    {
                        "name": "package",
                        "needs": ["compile"],
                        "retry": RETRY,
                        "steps": [{"name": "pack", "run": f"{e}; sleep 0.4; echo packed"}],
                    },
                ],
            },
            {"id": "ship", "type": "script", "retry": RETRY, "config": {"command": f"{e}; sleep 0.2; echo shipped"}},
        ]
    }


def pipelines(fault: FaultStack) -> dict[str, list[dict[str, Any]]]:
    """The pipelines of typed stages, created with their stages (the "jobs" one is saved as a spec
    afterwards: see `jobs_spec`)."""
    e = _effect(fault)
    return {
        "ok": [
            {"id": "build", "type": "script", "retry": RETRY, "config": {"command": f"{e}; sleep 0.8; echo built"}},
            {"id": "test", "type": "script", "retry": RETRY, "config": {"command": f"{e}; sleep 0.4; echo tested"}},
        ],
        "gate": [
            {"id": "pre", "type": "script", "retry": RETRY, "config": {"command": f"{e}; sleep 0.4; echo pre"}},
            {"id": "gate", "type": "approval", "config": {"message": "ship?"}},
            {"id": "post", "type": "script", "retry": RETRY, "config": {"command": f"{e}; sleep 0.6; echo post"}},
        ],
        "fail": [
            {"id": "broken", "type": "script", "config": {"command": f"{e}; sleep 0.1; echo boom >&2; exit 3"}},
            {"id": "never", "type": "script", "config": {"command": f"{e}; echo never"}},
        ],
    }


# Seven runs in a cycle: three kinds of three (ok, gate, jobs) and a failing one; 10 runs trigger
# every kind (gates approved in even blocks of seven, so the 10-run suite has both an approved
# gate and one left waiting), 50 runs about 14 of each and 7 failing.
KINDS = ("ok", "gate", "jobs", "ok", "fail", "jobs", "gate")


@dataclass
class Trigger:
    index: int
    kind: str
    approve: bool
    run_id: str | None = None
    status_code: int | None = None
    error: str | None = None


@dataclass
class Chaos:
    actions: list[tuple[str, float]] = field(default_factory=list)
    # Executor kills that hit a running script stage, and a running step of a job.
    mid_stage: int = 0
    mid_step: int = 0

    def summary(self) -> str:
        by: dict[str, list[float]] = defaultdict(list)
        for name, seconds in self.actions:
            by[name].append(seconds)
        done = ", ".join(f"{n} x{len(s)} (back in max {max(s):.1f}s)" for n, s in by.items())
        return f"{done}; executor kills during a script stage: {self.mid_stage}, during a step: {self.mid_step}"


def _running_steps(stage: dict[str, Any]) -> int:
    return sum(1 for j in stage.get("jobs") or [] for st in j["steps"] if st["status"] == "running")


async def _work_running(
    client: Client, ids: dict[str, str], triggers: list[Trigger], timeout: float
) -> tuple[bool, bool]:
    """Wait (bounded) until a script stage and a step of a job run at the same time (half a second
    after either was first seen, either is enough), so that killing the executor interrupts them;
    says which ran."""
    began = time.monotonic()
    seen: float | None = None
    while True:
        stage = step = False
        for t in list(triggers):
            if t.run_id is None:
                continue
            with contextlib.suppress(GaveUp, AssertionError):
                run = await client.get(f"/api/v1/pipelines/{ids[t.kind]}/runs/{t.run_id}")
                for s in run["stageResults"]:
                    stage = stage or (s["status"] == "running" and s["type"] == "script")
                    step = step or _running_steps(s) > 0
        waited = time.monotonic() - began
        if (stage or step) and seen is None:
            seen = time.monotonic()
        if (stage and step) or ((stage or step) and time.monotonic() - (seen or began) > 0.5) or waited > timeout:
            return stage, step
        await asyncio.sleep(0.05)


async def _trigger(client: Client, ids: dict[str, str], t: Trigger) -> None:
    try:
        r = await client.request(
            "POST",
            f"/api/v1/pipelines/{ids[t.kind]}/trigger",
            json_body={"variables": {"INDEX": str(t.index)}},
            key=f"trigger-{t.index}",
        )
    except GaveUp as exc:
        t.error = str(exc)
        return
    t.status_code = r.status_code
    if r.status_code == 201:
        t.run_id = r.json()["id"]
    else:
        t.error = r.text


async def _chaos(
    fault: FaultStack,
    client: Client,
    ids: dict[str, str],
    triggers: list[Trigger],
    *,
    rounds: int,
    gap: float,
    hard_nats: bool,
    chaos: Chaos,
    rng: random.Random,
) -> None:
    """One at a time: kill -9 each service and wait for it to come back; restart nats-server.
    Before each action the next share of the runs is triggered, so that every fault lands while
    runs are under way; the share before an executor kill has a run of jobs in it (taken ahead of
    its turn), so that the kill hits steps of jobs as well as script stages."""
    actions = rounds * (len(SERVICES) + 1)
    requests: list[asyncio.Task[None]] = []
    queue = list(triggers)  # not yet sent
    done = 0
    for r in range(rounds):
        targets = [*SERVICES, "nats"]
        rng.shuffle(targets)
        for target in targets:
            size = len(triggers) * (done + 1) // actions - len(triggers) * done // actions
            jobs_run = next((t for t in queue if t.kind == "jobs"), None)
            if target == "executor" and size and jobs_run is not None and jobs_run not in queue[:size]:
                queue.remove(jobs_run)
                queue.insert(0, jobs_run)
            share, queue = queue[:size], queue[size:]
            requests += [asyncio.create_task(_trigger(client, ids, t)) for t in share]
            done += 1
            if target == "executor":
                # The executor dies with a script stage and steps of jobs under way.
                stage, step = await _work_running(client, ids, triggers, 5.0)
                chaos.mid_stage += stage
                chaos.mid_step += step
            elif target == "api":
                await asyncio.sleep(rng.uniform(0, 0.05))  # the api dies with the triggers in flight
            else:
                await asyncio.sleep(rng.uniform(0.3, 1.0) * gap)
            if target == "nats":
                hard = hard_nats and r % 2 == 1
                seconds = await asyncio.to_thread(fault.restart_nats, hard=hard)
                chaos.actions.append(("nats-kill" if hard else "nats-restart", seconds))
            else:
                seconds = await asyncio.to_thread(fault.kill, target)
                chaos.actions.append((target, seconds))
            # Back for real: the api answers /readyz (database, NATS and the gateway reachable).
            await asyncio.to_thread(fault.ready, 60)
    await asyncio.gather(*requests)


async def _approve(client: Client, pipeline_id: str, t: Trigger, approved: set[str]) -> None:
    """Approve once the run waits; an approve answered 400 (already running) counts when the
    run's history shows the approval."""
    assert t.run_id is not None
    run = await client.get(f"/api/v1/pipelines/{pipeline_id}/runs/{t.run_id}")
    if run["status"] != "waiting_approval":
        return
    r = await client.request("POST", f"/api/v1/pipelines/{pipeline_id}/runs/{t.run_id}/approve", json_body={})
    if r.status_code == 200 or run_was_approved(await client.get(f"/api/v1/pipelines/{pipeline_id}/runs/{t.run_id}")):
        approved.add(t.run_id)


def run_was_approved(run: dict[str, Any]) -> bool:
    return any(a["decision"] == "approved" for a in run.get("approvals", []))


async def _approver(
    client: Client, ids: dict[str, str], triggers: list[Trigger], approved: set[str], done: asyncio.Event
) -> None:
    while not done.is_set():
        for t in triggers:
            if t.approve and t.run_id and t.run_id not in approved:
                with contextlib.suppress(GaveUp):
                    await _approve(client, ids["gate"], t, approved)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(done.wait(), 0.3)


# ---- the checks -----------------------------------------------------------------------------


async def _whole_feed(store: PostgresEventStore) -> list[RecordedEvent]:
    out: list[RecordedEvent] = []
    cursor = FEED_START
    while batch := await store.read_feed(cursor, 1000):
        out.extend(batch)
        cursor = batch[-1].cursor
    return out


async def _stream_messages(fault: FaultStack) -> tuple[Any, list[Any]]:
    nc = await bus.connect(fault.nats.url, "fault-check", fault.nats.credentials["admin"])
    try:
        js = nc.jetstream()
        info = await js.stream_info(fault.settings.events_stream)
        msgs = [await js.get_msg(fault.settings.events_stream, seq) for seq in range(1, info.state.last_seq + 1)]
        return info, msgs
    finally:
        await nc.close()


async def check_jetstream(fault: FaultStack, store: PostgresEventStore, timeout: float) -> list[str]:
    """Every event of the store, in JetStream once and in feed order."""
    deadline = time.monotonic() + timeout
    while True:
        feed = await _whole_feed(store)
        info, msgs = await _stream_messages(fault)
        if info.state.last_seq >= len(feed) or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.2)
    problems = []
    if info.state.first_seq != 1 or info.state.messages != info.state.last_seq:
        problems.append(f"the stream lost messages: {info.state}")
    if len(msgs) != len(feed):
        problems.append(f"the store has {len(feed)} events, the stream {len(msgs)} messages")
    ids = [m.headers.get("Nats-Msg-Id") if m.headers else None for m in msgs]
    dupes = [i for i, n in Counter(ids).items() if n > 1]
    if dupes:
        problems.append(f"{len(dupes)} event ids published more than once, e.g. {dupes[:3]}")
    missing = {r.event_id for r in feed} - set(ids)
    if missing:
        problems.append(f"{len(missing)} events never published, e.g. {sorted(missing)[:3]}")
    for i, (rec, msg) in enumerate(zip(feed, msgs, strict=False)):
        expected = (rec.event_id, bus.event_subject(rec), str(rec.position), rec.data)
        got = ((msg.headers or {}).get("Nats-Msg-Id"), msg.subject, (msg.headers or {}).get(POSITION), msg.data)
        if got != expected:
            problems.append(f"stream message {i + 1} is {got[:3]}, but feed event {i} is {expected[:3]}")
            break
    return problems


async def _read_model_rows(store: PostgresEventStore) -> dict[str, list[tuple[str, ...]]]:
    out: dict[str, list[tuple[str, ...]]] = {}
    async with store.pool.connection() as conn:
        for table, key in (("rm_pipelines", "id"), ("rm_runs", "id"), ("rm_run_logs", "run_id, position")):
            cur = await conn.execute(f"SELECT * FROM {table} ORDER BY {key}")
            out[table] = [tuple(str(v) for v in row) for row in await cur.fetchall()]
    return out


async def projector_caught_up(store: PostgresEventStore, fault: FaultStack, timeout: float) -> bool:
    projector = Projector(store, fault.database_url)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if await projector.checkpoint() == await store.head():
            return True
        await asyncio.sleep(0.1)
    return False


def _diff_rows(before: dict[str, list[tuple[str, ...]]], after: dict[str, list[tuple[str, ...]]]) -> list[str]:
    problems = []
    for table in before:
        live, rebuilt = set(before[table]), set(after[table])
        if live != rebuilt:
            problems.append(
                f"{table}: {len(live - rebuilt)} live rows not in the rebuild, {len(rebuilt - live)} rebuilt rows "
                f"not live; e.g. live {sorted(live - rebuilt)[:1]} rebuilt {sorted(rebuilt - live)[:1]}"
            )
    return problems


@dataclass
class Outcome:
    problems: list[str] = field(default_factory=list)
    statuses: Counter[tuple[str, str]] = field(default_factory=Counter)
    timings: dict[str, float] = field(default_factory=dict)
    # Stage and step attempts that failed because their executor was lost (and were retried or failed).
    recovered: int = 0
    recovered_steps: int = 0


async def scenario(fault: FaultStack, *, runs: int, rounds: int, hard_nats: bool, settle: float) -> Outcome:
    # The order of the faults and the pauses between them; PIPELINES_FAULT_SEED=n tries another.
    seed = int(os.environ.get("PIPELINES_FAULT_SEED") or runs * 7919 + rounds)
    rng = random.Random(seed)
    out = Outcome()
    began = time.monotonic()
    chaos = Chaos()
    async with httpx.AsyncClient(base_url=fault.api, timeout=40) as http:
        client = Client(http, fault.headers("admin"))
        ids: dict[str, str] = {}
        for kind, stages in pipelines(fault).items():
            r = await client.request(
                "POST",
                "/api/v1/pipelines",
                json_body={"name": f"fault-{kind}-{uuid.uuid4().hex[:6]}", "stages": stages},
            )
            assert r.status_code == 201, r.text
            ids[kind] = r.json()["id"]
        r = await client.request(
            "POST", "/api/v1/pipelines", json_body={"name": f"fault-jobs-{uuid.uuid4().hex[:6]}", "stages": []}
        )
        assert r.status_code == 201, r.text
        ids["jobs"] = r.json()["id"]
        r = await client.request(
            "POST", f"/api/v1/pipelines/{ids['jobs']}/spec/save", json_body={"spec": jobs_spec(fault), "format": "json"}
        )
        assert r.status_code == 200, r.text
        # Half of the gates (alternate blocks of len(KINDS) runs) are approved, the others left waiting.
        triggers = [
            Trigger(i, KINDS[i % len(KINDS)], approve=KINDS[i % len(KINDS)] == "gate" and (i // len(KINDS)) % 2 == 0)
            for i in range(runs)
        ]
        approved: set[str] = set()
        done = asyncio.Event()
        approver = asyncio.create_task(_approver(client, ids, triggers, approved, done))
        await _chaos(fault, client, ids, triggers, rounds=rounds, gap=1.0, hard_nats=hard_nats, chaos=chaos, rng=rng)
        out.timings["chaos"] = time.monotonic() - began

        # Every run approved that is meant to be, then wait for the dust to settle.
        settle_began = time.monotonic()
        known = {t.run_id: t for t in triggers if t.run_id}
        pending: dict[str, dict[str, Any]] = {}
        deadline = time.monotonic() + settle
        while True:
            pending = {}
            for run_id, t in known.items():
                run = await client.get(f"/api/v1/pipelines/{ids[t.kind]}/runs/{run_id}")
                waiting_ok = run["status"] == "waiting_approval" and not t.approve
                if run["status"] not in TERMINAL and not waiting_ok:
                    pending[run_id] = run
            if not pending or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.3)
        done.set()
        await approver
        out.timings["settle"] = time.monotonic() - settle_began
        for run_id, stuck in pending.items():
            summary = ", ".join(f"{s['stageId']}={s['status']}#{s['attempt']}" for s in stuck["stageResults"])
            out.problems.append(
                f"run {run_id} ({known[run_id].kind}) still {stuck['status']} after {settle:.0f}s: {summary}; "
                f"last log lines: {stuck['logs'].splitlines()[-3:]}"
            )

        # Each trigger made exactly one run, whatever the api's deaths did to the request.
        check_began = time.monotonic()
        pool = await open_pool(fault.database_url, max_size=4)
        store = PostgresEventStore(pool)
        try:
            async with pool.connection() as conn:
                cur = await conn.execute(
                    "SELECT run_id, data->>'pipeline_id', data->'variables'->>'INDEX' FROM events "
                    "WHERE event_type = 'run_triggered' ORDER BY position"
                )
                stored_runs = [(str(a), str(b), str(c)) for a, b, c in await cur.fetchall()]
            per_index = Counter(index for _, _, index in stored_runs)
            for t in triggers:
                n = per_index.get(str(t.index), 0)
                if t.run_id is not None and n != 1:
                    out.problems.append(f"trigger {t.index} answered 201 ({t.run_id}) but made {n} runs")
                elif t.run_id is None:
                    out.problems.append(f"trigger {t.index} got no run ({t.status_code}: {t.error}); {n} runs stored")
            kind_of = {pid: kind for kind, pid in ids.items()}
            index_of = {run_id: int(index) for run_id, _, index in stored_runs}

            # Every run: where it ended, its history, and what its scripts did.
            effects = _effects(fault)
            for run_id, pipeline_id, _ in stored_runs:
                kind = kind_of[pipeline_id]
                t = triggers[index_of[run_id]]
                run = await client.get(f"/api/v1/pipelines/{pipeline_id}/runs/{run_id}")
                records = await client.get(f"/api/v1/pipelines/{pipeline_id}/runs/{run_id}/events")
                history = fold_history(run_id, records)
                if await client.get(f"/api/v1/pipelines/{pipeline_id}/runs/{run_id}") != run:
                    out.problems.append(f"run {run_id} still changes after everything settled")
                status = run["status"]
                out.statuses[(kind, status)] += 1
                expected = {"ok": "succeeded", "jobs": "succeeded", "fail": "failed"}.get(kind) or (
                    "succeeded" if t.approve else "waiting_approval"
                )
                where = f"run {run_id} ({kind}#{t.index}): "
                if status != expected:
                    out.problems.append(f"{where}ended {status}, expected {expected}: {describe(history)}")
                out.problems += [where + p for p in history.problems]
                if history.view() != run:
                    diff = [k for k in run if run.get(k) != history.view().get(k)]
                    out.problems.append(f"{where}the API's run differs from its folded history in {diff}")
                lost = [
                    a
                    for s in run["stageResults"]
                    for a in s["attempts"]
                    if a["status"] != "succeeded" and "executor" in (a["error"] or "")
                ]
                lost_steps = [
                    a
                    for s in run["stageResults"]
                    for j in s.get("jobs") or []
                    for st in j["steps"]
                    for a in st["attempts"]
                    if a["status"] != "succeeded" and "executor" in (a["error"] or "")
                ]
                out.recovered += len(lost)
                out.recovered_steps += len(lost_steps)
                out.problems += [where + p for p in effect_problems(history, effects)]

            # JetStream against the store; the read models against a rebuild.
            out.problems += await check_jetstream(fault, store, timeout=30)
            if not await projector_caught_up(store, fault, timeout=30):
                out.problems.append("the projector did not catch up with the store within 30s")
            live = await _read_model_rows(store)
            await asyncio.to_thread(fault.stack.stop)  # nothing may write while the rebuild runs
            await Projector(store, fault.database_url).rebuild()
            out.problems += _diff_rows(live, await _read_model_rows(store))
        finally:
            await pool.close()
        out.timings["checks"] = time.monotonic() - check_began

    out.timings["total"] = time.monotonic() - began
    restarts = {s: fault.stack.restarts(s) for s in SERVICES}
    killed = Counter(name for name, _ in chaos.actions)
    if any(restarts[s] > killed[s] for s in SERVICES):
        fault.log.flush()
        exits = [line for line in fault.log.path.read_text().splitlines() if "exited with" in line]
        print("  services that also exited on their own (the supervisor restarted them):\n    " + "\n    ".join(exits))
    print(
        f"\nfault suite, {runs} runs (seed {seed}): {dict(out.statuses)}\n"
        f"  chaos: {chaos.summary()}; supervisor restarts {restarts}\n"
        f"  attempts recovered from a lost executor: {out.recovered} of stages, {out.recovered_steps} of steps; "
        f"client retries: {dict(client.retries)}\n"
        f"  timings: {', '.join(f'{k} {v:.1f}s' for k, v in out.timings.items())}"
    )
    return out


def _report(out: Outcome, fault: FaultStack) -> str:
    lines = out.problems[:60]
    more = f"\n... and {len(out.problems) - 60} more" if len(out.problems) > 60 else ""
    return "\n".join(lines) + more + f"\n\nservices' output: {fault.log.path}\n{fault.log.tail(3000)}"


async def test_ten_runs_survive_killed_services_and_a_nats_restart(fault: FaultStack) -> None:
    out = await scenario(fault, runs=10, rounds=1, hard_nats=False, settle=20)
    assert not out.problems, _report(out, fault)


@pytest.mark.soak
@pytest.mark.timeout(1200)
async def test_fifty_runs_survive_repeated_kills_and_nats_restarts(fault: FaultStack) -> None:
    out = await scenario(fault, runs=50, rounds=4, hard_nats=True, settle=90)
    assert not out.problems, _report(out, fault)


async def test_history_checker_sees_an_overwritten_cancel() -> None:
    """The checker itself: a run cancelled, then succeeded, is reported."""
    at = "2026-01-01T00:00:00Z"
    stage = {"id": "s", "name": "s", "type": "script", "order": 1, "config": {"command": "true"}}
    events: list[tuple[str, dict[str, Any]]] = [
        ("run_triggered", {"run_id": "r", "pipeline_id": "p", "organization_id": None, "definition_version": 1,
                           "stages": [stage], "triggered_by": "t", "at": at}),
        ("run_started", {"at": at}),
        ("stage_started", {"stage_id": "s", "attempt": 1, "at": at}),
        ("run_cancelled", {"cancelled_by": "t", "at": at}),
        ("run_succeeded", {"at": at}),
    ]  # fmt: skip
    records = [
        {"position": i + 1, "streamId": "run-r", "streamVersion": i + 1, "type": t, "data": {"type": t, **d}}
        for i, (t, d) in enumerate(events)
    ]
    history = fold_history("r", records)
    assert any("moved a cancelled run to succeeded" in p for p in history.problems), history.problems
    assert json.dumps(history.view())  # the fold still renders


async def test_history_checker_sees_a_step_started_twice_and_run_too_often() -> None:
    """The checker on a stage of jobs: a history with a step retried after a lost executor is clean;
    the same attempt of a step started twice, and a step executed more often than its attempts,
    are reported."""
    at = "2026-01-01T00:00:00Z"
    shell = {"name": "s", "kind": "shell", "run": "true"}
    job = {"name": "j", "retry": {"maxAttempts": 2, "backoff": 0}, "steps": [shell]}
    stage = {"id": "w", "name": "w", "type": "jobs", "order": 1, "jobs": [job]}
    step = {"stage_id": "w", "job": "j", "step": "s"}
    good: list[tuple[str, dict[str, Any]]] = [
        ("run_triggered", {"run_id": "r", "pipeline_id": "p", "organization_id": None, "definition_version": 1,
                           "stages": [stage], "triggered_by": "t", "at": at}),
        ("run_started", {"at": at}),
        ("stage_started", {"stage_id": "w", "attempt": 1, "at": at}),
        ("job_started", {"stage_id": "w", "job": "j", "at": at}),
        ("step_started", {**step, "attempt": 1, "at": at}),
        ("step_retry_scheduled", {**step, "attempt": 1, "error": "executor lost", "retry_at": at, "at": at}),
        ("step_started", {**step, "attempt": 2, "at": at}),
        ("step_finished", {**step, "attempt": 2, "status": "succeeded", "exit_code": 0, "at": at}),
        ("job_finished", {"stage_id": "w", "job": "j", "status": "succeeded", "at": at}),
        ("stage_succeeded", {"stage_id": "w", "at": at}),
        ("run_succeeded", {"at": at}),
    ]  # fmt: skip

    def fold(events: list[tuple[str, dict[str, Any]]]) -> History:
        records = [
            {"position": i + 1, "streamId": "run-r", "streamVersion": i + 1, "type": t, "data": {"type": t, **d}}
            for i, (t, d) in enumerate(events)
        ]
        return fold_history("r", records)

    clean = fold(good)
    assert clean.status == "succeeded" and not clean.problems, clean.problems
    assert not effect_problems(clean, Counter({("r", "w", "j", "s"): 2}))
    # One more execution than attempts: a redelivery ran the step again.
    assert any("ran 3 times in 2 attempts" in p for p in effect_problems(clean, Counter({("r", "w", "j", "s"): 3})))

    # Attempt 1 started again without a retry in between.
    twice = fold([*good[:5], ("step_started", {**step, "attempt": 1, "at": at}), *good[5:]])
    assert any("attempt 1 of step s of job j (stage w) started twice" in p for p in twice.problems), twice.problems
