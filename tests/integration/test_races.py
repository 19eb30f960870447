"""Races (issue 3, item 4): approve, reject, cancel, stop, pause and resume fired concurrently at one
run, against real PostgreSQL and NATS with the executor running.

Exactly one transition wins per state; the losers get 400 (naming the status they lost to) or 409;
the run's event history is a valid sequence of the state machine whose control events are exactly
the accepted commands; and the run never ends in a state that contradicts an accepted command
(cancelled, then overwritten by succeeded).

The requests go through a real ASGI transport on the test's event loop (httpx.ASGITransport), not
through `system.client`: litestar's AsyncTestClient runs the app in a blocking portal thread and
its `handle_async_request` is synchronous, so requests gathered on it run one after another and
would never race. Two api instances (two apps, two connection pools) take the requests in turn, as
when the api is scaled out: nothing but the store's optimistic concurrency keeps them consistent.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import re
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any, cast

import httpx
import pytest
import pytest_asyncio
from litestar import Litestar

from domain import events as ev
from domain import pipeline as pl
from infra.http.app import create_app
from infra.store.records import NewEvent
from services.bootstrap import build_api
from tests.fault.history import (
    ALLOWED_FROM,
    ANSWERS,
    COMMAND_OF,
    COMMANDS,
    STATUSES,
    TERMINAL,
    History,
    describe,
    fold_history,
)
from tests.integration.system import System

pytestmark = pytest.mark.integration

RUNS = int(os.environ.get("PIPELINES_RACE_RUNS", "30"))
SEED = int(os.environ.get("PIPELINES_RACE_SEED", str(random.randrange(1 << 30))))
REFUSAL = re.compile(r"^cannot (\w+) run(?: in status (\w+)|: it is already (\w+))$")

GATE = {"id": "gate", "type": "approval", "config": {"message": "race?"}}
AFTER = {"id": "after", "type": "script", "config": {"command": "echo after"}}
BRIEF = {"id": "brief", "type": "script", "config": {"command": "sleep 0.1; echo after"}}
SLOW = {"id": "slow", "type": "script", "config": {"command": "sleep 0.3; echo slept"}}
LONG = {"id": "long", "type": "script", "config": {"command": "sleep 60"}}


@dataclass
class Api:
    """Clients whose requests really run concurrently, in the test's event loop: one per api
    instance (each with its own connection pool), as when the api is scaled out."""

    clients: list[httpx.AsyncClient]
    system: System
    _next: int = 0

    @property
    def client(self) -> httpx.AsyncClient:
        """The api instances in turn."""
        self._next += 1
        return self.clients[self._next % len(self.clients)]

    def admin(self) -> dict[str, str]:
        return self.system.headers("admin")

    async def pipeline(self, stages: list[dict[str, Any]]) -> str:
        r = await self.client.post(
            "/api/v1/pipelines",
            json={"name": f"race-{uuid.uuid4().hex[:10]}", "stages": stages},
            headers=self.system.headers("member"),
        )
        assert r.status_code == 201, r.text
        return str(r.json()["id"])

    async def trigger(self, pipeline_id: str) -> str:
        r = await self.client.post(f"/api/v1/pipelines/{pipeline_id}/trigger", headers=self.system.headers("member"))
        assert r.status_code == 201, r.text
        return str(r.json()["id"])

    async def run(self, pipeline_id: str, run_id: str) -> dict[str, Any]:
        r = await self.client.get(f"/api/v1/pipelines/{pipeline_id}/runs/{run_id}", headers=self.admin())
        assert r.status_code == 200, r.text
        body: dict[str, Any] = r.json()
        return body

    async def events(self, pipeline_id: str, run_id: str) -> list[dict[str, Any]]:
        r = await self.client.get(f"/api/v1/pipelines/{pipeline_id}/runs/{run_id}/events", headers=self.admin())
        assert r.status_code == 200, r.text
        body: list[dict[str, Any]] = r.json()
        return body

    async def command(self, pipeline_id: str, run_id: str, command: str, delay: float = 0.0) -> httpx.Response:
        if delay:
            await asyncio.sleep(delay)
        return await self.client.post(
            f"/api/v1/pipelines/{pipeline_id}/runs/{run_id}/{command}",
            json={"reason": f"race {command}"},
            headers=self.admin(),
        )

    async def wait(self, pipeline_id: str, run_id: str, until: Any, timeout: float = 30) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            run = await self.run(pipeline_id, run_id)
            if until(run):
                return run
            assert time.monotonic() < deadline, f"run {run_id} stuck in {run['status']}: {run}"
            await asyncio.sleep(0.05)


@contextlib.asynccontextmanager
async def _serving(app: Litestar) -> AsyncIterator[httpx.AsyncClient]:
    started, stop = asyncio.Event(), asyncio.Event()

    async def lifespan() -> None:
        # Entered and left in one task (anyio's cancel scopes insist; fixture setup and
        # teardown run in different tasks).
        async with app.lifespan():
            started.set()
            await stop.wait()

    task = asyncio.create_task(lifespan())
    ready = asyncio.create_task(started.wait())
    await asyncio.wait([task, ready], return_when=asyncio.FIRST_COMPLETED)
    ready.cancel()
    if task.done():
        task.result()
    try:
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=cast(Any, app)), base_url="http://api", timeout=60
        ) as client:
            yield client
    finally:
        stop.set()
        await task


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def api(system: System) -> AsyncIterator[Api]:
    async with (
        _serving(create_app(lambda: build_api(system.settings))) as one,
        _serving(create_app(lambda: build_api(system.settings))) as two,
    ):
        yield Api([one, two], system)


# ---- the checks ------------------------------------------------------------------------------


@dataclass
class Race:
    """What was fired at one run and what came back."""

    pipeline_id: str
    run_id: str
    sent: list[str]
    responses: list[httpx.Response]

    def accepted(self) -> list[str]:
        return [c for c, r in zip(self.sent, self.responses, strict=True) if r.status_code == 200]


def quiet(run: dict[str, Any]) -> bool:
    """Terminal with no stage still running: nothing more will be recorded. (A run cancelled
    while a step runs is terminal at once, but that step's result and logs come later.)"""
    return run["status"] in TERMINAL and all(s["status"] != "running" for s in run["stageResults"])


async def settle(api: Api, race: Race) -> dict[str, Any]:
    """Wait until the run is quiet; a run left paused is resumed (recorded as an accepted resume)
    so that it has to finish."""
    deadline = time.monotonic() + 30
    while True:
        run = await api.run(race.pipeline_id, race.run_id)
        if quiet(run):
            return run
        if run["status"] == "paused":
            r = await api.command(race.pipeline_id, race.run_id, "resume")
            race.sent.append("resume")
            race.responses.append(r)
        assert time.monotonic() < deadline, f"run {race.run_id} never ended: {run['status']}: {run['stageResults']}"
        await asyncio.sleep(0.05)


def check(race: Race, history: History, final: dict[str, Any]) -> list[str]:
    """Everything that contradicts the state machine, as readable lines."""
    problems = list(history.problems)
    statuses = {"queued", "running", "waiting_approval"} | history.statuses
    for command, r in zip(race.sent, race.responses, strict=True):
        if r.status_code not in (200, 400, 409):
            problems.append(f"{command}: unexpected {r.status_code} {r.text}")
            continue
        if r.status_code == 200:
            if r.json()["status"] != ANSWERS[command]:
                problems.append(f"{command} was accepted but answered {r.json()['status']}")
            continue
        body = r.json()
        if body.get("statusCode") != r.status_code:
            problems.append(f"{command}: error body {body}")
        if r.status_code == 409:
            continue
        m = REFUSAL.match(body.get("message", ""))
        if m is None:
            problems.append(f"{command}: the 400 does not name a status: {body.get('message')!r}")
            continue
        verb, lost_to = m.group(1), m.group(2) or m.group(3)
        if verb != command or lost_to not in STATUSES:
            problems.append(f"{command}: refusal names {verb!r} / {lost_to!r}: {body['message']!r}")
        elif lost_to in ALLOWED_FROM[command]:
            problems.append(f"{command} was refused in {lost_to}, a status it is allowed from: {body['message']!r}")
        elif lost_to not in statuses:
            problems.append(f"{command} was refused in {lost_to}, a status the run never had ({sorted(statuses)})")

    # The control events of the stream are exactly the accepted commands.
    accepted = Counter(race.accepted())
    recorded = Counter(COMMAND_OF[s.type] for s in history.controls())
    if accepted != recorded:
        problems.append(f"accepted {dict(accepted)} but the stream records {dict(recorded)}")
    # From each status, one transition at most wins: no two control events from one stay in a status.
    leaving_gate = [s.type for s in history.controls() if s.before == "waiting_approval"]
    if len(leaving_gate) > 1:
        problems.append(f"more than one command won from waiting_approval: {leaving_gate}")
    if accepted["cancel"] + accepted["stop"] > 1:
        problems.append("both cancel and stop were accepted")
    if accepted["approve"] and accepted["reject"]:
        problems.append("both approve and reject were accepted")

    # The end agrees with what was accepted.
    status = final["status"]
    if status != history.status:
        problems.append(f"the API says {status} but the history folds to {history.status}")
    if accepted["cancel"] or accepted["stop"]:
        if status != "cancelled":
            problems.append(f"cancel/stop was accepted but the run ended {status}")
    elif accepted["reject"]:
        if status != "failed":
            problems.append(f"reject was accepted but the run ended {status}")
    elif status != "succeeded":
        problems.append(f"nothing ended the run early, yet it ended {status}")
    view = history.view()
    if view != final:
        diff = {k: (final.get(k), view.get(k)) for k in set(final) | set(view) if final.get(k) != view.get(k)}
        problems.append(f"the API's run differs from the folded history: {diff}")
    return problems


async def finish(api: Api, races: list[Race]) -> list[str]:
    problems: list[str] = []
    for race in races:
        final = await settle(api, race)
        history = fold_history(race.run_id, await api.events(race.pipeline_id, race.run_id))
        again = await api.run(race.pipeline_id, race.run_id)
        if again != final:
            problems.append(f"run {race.run_id} changed after it was quiet: {final} -> {again}")
        for p in check(race, history, final):
            sent = ", ".join(f"{c}={r.status_code}" for c, r in zip(race.sent, race.responses, strict=True))
            problems.append(f"run {race.run_id}: {p}\n    sent: {sent}\n    history: {describe(history)}")
    return problems


# ---- the tests -------------------------------------------------------------------------------


async def test_six_commands_race_at_a_run_waiting_for_approval(api: Api) -> None:
    rng = random.Random(SEED)
    pipeline_id = await api.pipeline([GATE, BRIEF])
    run_ids = [await api.trigger(pipeline_id) for _ in range(RUNS)]
    for run_id in run_ids:
        await api.wait(pipeline_id, run_id, lambda r: r["status"] == "waiting_approval")

    races: list[Race] = []
    for group in range(0, RUNS, 5):
        batch = []
        for run_id in run_ids[group : group + 5]:
            order = list(COMMANDS)
            rng.shuffle(order)
            batch.append((run_id, order))
        # A third of the groups fire all at once; the others spread the commands over 50 or 150 ms so that
        # later transitions (pause after approve, resume after pause) get their chance too.
        spread = (0.0, 0.05, 0.15)[(group // 5) % 3]
        results = await asyncio.gather(
            *(
                asyncio.gather(*(api.command(pipeline_id, run_id, c, rng.uniform(0, spread)) for c in order))
                for run_id, order in batch
            )
        )
        races += [
            Race(pipeline_id, run_id, list(order), list(rs)) for (run_id, order), rs in zip(batch, results, strict=True)
        ]

    problems = await finish(api, races)
    wins = Counter(frozenset(r.accepted()) for r in races)
    assert not problems, f"seed {SEED}:\n" + "\n".join(problems)
    # Each race had a winner out of the gate.
    assert all({"approve", "reject", "cancel", "stop"} & set(r.accepted()) for r in races)
    print(f"seed {SEED}: accepted sets {dict((tuple(sorted(k)), v) for k, v in wins.items())}")


async def test_cancel_stop_pause_and_resume_race_with_a_running_stage(api: Api) -> None:
    """Commands land at random moments around the end of a running script stage; a cancelled
    run never becomes succeeded, and no stage starts while the run is paused or cancelled."""
    rng = random.Random(SEED + 1)
    pipeline_id = await api.pipeline([SLOW, AFTER])
    races: list[Race] = []

    async def one() -> Race:
        run_id = await api.trigger(pipeline_id)
        await api.wait(
            pipeline_id, run_id, lambda r: r["status"] == "running" and r["stageResults"][0]["status"] == "running"
        )
        sent = [c for c in COMMANDS if rng.random() < 0.7] or ["cancel"]
        delays = [rng.uniform(0, 0.5) for _ in sent]
        responses = await asyncio.gather(
            *(api.command(pipeline_id, run_id, c, d) for c, d in zip(sent, delays, strict=True))
        )
        return Race(pipeline_id, run_id, sent, list(responses))

    for _ in range(0, RUNS, 10):
        races += await asyncio.gather(*(one() for _ in range(10)))

    problems = await finish(api, races)
    for race in races:
        for c, r in zip(race.sent, race.responses, strict=True):
            if c in ("approve", "reject") and r.status_code != 400:
                problems.append(f"run {race.run_id}: {c} of a run with no gate answered {r.status_code}")
    assert not problems, f"seed {SEED}:\n" + "\n".join(problems)
    wins = Counter(tuple(r.accepted()) for r in races)
    print(f"seed {SEED}: accepted, in order of sending {dict(wins)}")


async def test_deleting_a_pipeline_cancels_a_run_the_read_models_have_not_seen_yet(api: Api) -> None:
    """The read models lag the store: here an open append holds the feed's horizon back, so the
    projector cannot see a run triggered meanwhile. Deleting its pipeline still cancels it."""
    system = api.system
    pipeline_id = await api.pipeline([LONG])
    other = str(uuid.uuid4())
    holder = pl.PipelineCreated(
        pipeline_id=other,
        name=f"holder-{other[:8]}",
        description=None,
        stages=(),
        organization_id=system.org,
        created_by="alice",
        at=system.commands.now(),
    )
    hold = NewEvent(str(uuid.uuid4()), holder, org=system.org, pipeline_id=other)
    async with system.store.begin_append(ev.pipeline_stream(other), [hold], 0):
        run_id = await api.trigger(pipeline_id)
        async with system.store.pool.connection() as conn:
            cur = await conn.execute("SELECT count(*) FROM rm_runs WHERE id = %s", (run_id,))
            row = await cur.fetchone()
        assert row == (0,), "the projector saw the run: the read model does not lag here"

        r = await api.client.delete(f"/api/v1/pipelines/{pipeline_id}", headers=api.admin())
        assert r.status_code == 204, r.text

        state, _ = await system.commands.load_run(run_id)
        assert state.status == "cancelled", f"the run of a deleted pipeline is {state.status}"


async def test_ten_concurrent_triggers_with_one_idempotency_key_create_one_run(api: Api) -> None:
    pipeline_id = await api.pipeline([AFTER])
    other_pipeline = await api.pipeline([AFTER])
    key = f"idem-{uuid.uuid4()}"
    headers = {**api.system.headers("member"), "Idempotency-Key": key}
    body = {"variables": {"GREETING": "hello"}}
    url = f"/api/v1/pipelines/{pipeline_id}/trigger"

    responses = await asyncio.gather(*(api.client.post(url, json=body, headers=headers) for _ in range(10)))
    assert [r.status_code for r in responses] == [201] * 10, [r.text for r in responses]
    assert len({r.content for r in responses}) == 1
    run_id = responses[0].json()["id"]
    assert await _runs_of(api, pipeline_id) == [run_id]

    r = await api.client.post(url, json={"variables": {"GREETING": "bye"}}, headers=headers)
    assert r.status_code == 409, r.text
    assert "Idempotency-Key" in r.json()["message"]
    r = await api.client.post(url, json=body, headers=headers)
    assert r.status_code == 201 and r.content == responses[0].content
    # Scoped to the path and the caller: the same key elsewhere is another request.
    r = await api.client.post(f"/api/v1/pipelines/{other_pipeline}/trigger", json=body, headers=headers)
    assert r.status_code == 201 and r.json()["id"] != run_id
    bob = {**api.system.headers("member", sub="bob"), "Idempotency-Key": key}
    r = await api.client.post(url, json=body, headers=bob)
    assert r.status_code == 201 and r.json()["id"] != run_id
    assert len(await _runs_of(api, pipeline_id)) == 2


async def test_concurrent_requests_with_one_key_and_two_bodies_run_one_of_them(api: Api) -> None:
    pipeline_id = await api.pipeline([AFTER])
    headers = {**api.system.headers("member"), "Idempotency-Key": f"idem-{uuid.uuid4()}"}
    url = f"/api/v1/pipelines/{pipeline_id}/trigger"
    bodies = [{"variables": {"WHO": "a" if i % 2 else "b"}} for i in range(10)]
    responses = await asyncio.gather(*(api.client.post(url, json=b, headers=headers) for b in bodies))
    won = [(b, r) for b, r in zip(bodies, responses, strict=True) if r.status_code == 201]
    lost = [(b, r) for b, r in zip(bodies, responses, strict=True) if r.status_code != 201]
    assert won, [r.text for r in responses]
    winner = won[0][0]
    assert all(b == winner for b, _ in won) and len({r.content for _, r in won}) == 1
    assert all(b != winner and r.status_code == 409 for b, r in lost), [(b, r.status_code) for b, r in lost]
    assert len(won) == 5 and len(lost) == 5
    assert await _runs_of(api, pipeline_id) == [won[0][1].json()["id"]]


async def _runs_of(api: Api, pipeline_id: str) -> list[str]:
    """The runs of a pipeline, from the store itself (not a projection that may lag)."""
    async with api.system.store.pool.connection() as conn:
        cur = await conn.execute(
            "SELECT run_id FROM events WHERE pipeline_id = %s AND event_type = 'run_triggered' ORDER BY position",
            (pipeline_id,),
        )
        return [str(row[0]) for row in await cur.fetchall()]
