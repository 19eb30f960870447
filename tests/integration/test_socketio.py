"""Socket.IO `/events` on the gateway's port, as a dashboard built against the API reference uses it:
driven by the real `socket.io-client` from npm (a node script) and by python-socketio's AsyncClient,
against real PostgreSQL, NATS, relay and gateway."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import shutil
import subprocess
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
import socketio

from infra.gateway.server import Gateway
from tests.integration.gateway_env import WAIT, GatewayEnv, gateway_env

pytestmark = pytest.mark.integration

CLIENT_DIR = Path(__file__).parent / "socketio_client"
# What npm says when it cannot reach its registry (then, and only then, these tests are skipped).
_NETWORK_ERRORS = ("ENOTFOUND", "EAI_AGAIN", "ECONNREFUSED", "ECONNRESET", "ETIMEDOUT", "ENETUNREACH", "network")

Event = dict[str, Any]


@pytest.fixture(scope="session")
def socketio_client() -> Iterator[Path]:
    """The real socket.io-client, installed from the committed package-lock.json (`npm ci`)."""
    npm, node = shutil.which("npm"), shutil.which("node")
    if npm is None or node is None:
        pytest.fail("node and npm are needed to run the real socket.io-client (the machine has node 20)")
    installed = CLIENT_DIR / "node_modules" / ".package-lock.json"
    lock = CLIENT_DIR / "package-lock.json"
    if not installed.exists() or installed.stat().st_mtime < lock.stat().st_mtime:
        try:
            done = subprocess.run(
                [npm, "ci", "--no-audit", "--no-fund", "--loglevel=error"],
                cwd=CLIENT_DIR,
                capture_output=True,
                text=True,
                timeout=180,
            )
        except subprocess.TimeoutExpired:
            pytest.skip("npm cannot reach its registry: `npm ci` of socket.io-client timed out after 180 s")
        if done.returncode != 0:
            if any(word in done.stderr for word in _NETWORK_ERRORS):
                pytest.skip(f"npm cannot reach its registry: {done.stderr.strip()[-300:]}")
            pytest.fail(f"npm ci failed: {done.stderr.strip()[-2000:]}")
    yield CLIENT_DIR


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def env(database_url: str, nats_url: str) -> AsyncIterator[GatewayEnv]:
    async with gateway_env(database_url, nats_url) as e:
        yield e


def new_org() -> str:
    return f"org-{uuid.uuid4().hex[:8]}"


class NodeClient:
    """`listen.js` running the real socket.io-client; what it prints, one JSON object a line."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.seen: list[Event] = []

    async def next(self, timeout: float = WAIT) -> Event:
        assert self.proc.stdout is not None
        line = await asyncio.wait_for(self.proc.stdout.readline(), timeout)
        if not line:
            assert self.proc.stderr is not None
            err = await self.proc.stderr.read()
            raise AssertionError(f"the node client ended: {err.decode()[-2000:]} (saw {self.seen})")
        got: Event = json.loads(line)
        self.seen.append(got)
        return got

    async def until(self, done: Callable[[Event], bool], timeout: float = WAIT) -> list[Event]:
        """What it prints up to and including the first line for which `done` holds."""
        out: list[Event] = []
        async with asyncio.timeout(timeout):
            while True:
                got = await self.next(timeout)
                out.append(got)
                if done(got):
                    return out


@contextlib.asynccontextmanager
async def node_client(client_dir: Path, env: GatewayEnv, **options: Any) -> AsyncIterator[NodeClient]:
    proc = await asyncio.create_subprocess_exec(
        "node",
        str(client_dir / "listen.js"),
        env.http_url,
        json.dumps(options),
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env={**os.environ, "NODE_PATH": str(client_dir / "node_modules")},
    )
    try:
        yield NodeClient(proc)
    finally:
        if proc.stdin is not None:
            proc.stdin.close()
        try:
            await asyncio.wait_for(proc.wait(), WAIT)
        except TimeoutError:
            proc.kill()
            await proc.wait()


async def connected(c: NodeClient) -> Event:
    got = await c.next()
    assert got["type"] == "connect", c.seen
    return got


def is_run(run_id: str, status: str | None = None) -> Callable[[Event], bool]:
    def check(e: Event) -> bool:
        return (
            e.get("event") == "pipeline.run.updated"
            and e["data"]["id"] == run_id
            and (status is None or e["data"]["status"] == status)
        )

    return check


def is_log(message: str) -> Callable[[Event], bool]:
    return lambda e: e.get("event") == "pipeline.log" and e["data"]["message"] == message


def about(e: Event) -> str | None:
    """The run an event is about."""
    data = e.get("data") or {}
    return data.get("runId") if e.get("event") == "pipeline.log" else data.get("id")


class PyClient:
    """python-socketio's AsyncClient on `/events`, collecting every event it receives."""

    def __init__(self) -> None:
        self.sio = socketio.AsyncClient(reconnection=False)
        self.events: asyncio.Queue[Event] = asyncio.Queue()
        self.errors: list[Any] = []
        self.disconnected = asyncio.Event()

        async def on_any(event: str, data: Any = None, meta: Any = None) -> None:
            await self.events.put({"event": event, "data": data, "meta": meta})

        async def on_error(data: Any = None) -> None:
            self.errors.append(data)

        async def on_disconnect(*_: Any) -> None:
            self.disconnected.set()

        self.sio.on("*", on_any, namespace="/events")
        self.sio.on("connect_error", on_error, namespace="/events")
        self.sio.on("disconnect", on_disconnect, namespace="/events")

    async def connect(self, env: GatewayEnv, token: str, *, transports: list[str] | None = None) -> None:
        await self.sio.connect(
            env.http_url,
            namespaces=["/events"],
            auth={"token": token},
            transports=transports or ["websocket"],
            wait_timeout=WAIT,
        )

    async def until(self, done: Callable[[Event], bool], timeout: float = WAIT) -> list[Event]:
        out: list[Event] = []
        async with asyncio.timeout(timeout):
            while True:
                got = await self.events.get()
                out.append(got)
                if done(got):
                    return out


@contextlib.asynccontextmanager
async def py_client(env: GatewayEnv, token: str, **kw: Any) -> AsyncIterator[PyClient]:
    c = PyClient()
    await c.connect(env, token, **kw)
    try:
        yield c
    finally:
        # Not waiting for the long-poll in flight (python-engineio's client waits for it, up to 25 s).
        await c.sio.eio.disconnect(abort=True)


# ---- socket.io-client (npm) ---------------------------------------------------------------------


async def test_a_dashboard_gets_its_organizations_runs_and_logs_and_no_other_organizations(
    env: GatewayEnv, socketio_client: Path
) -> None:
    org_a, org_b = new_org(), new_org()
    pa, pb = await env.pipeline(org_a), await env.pipeline(org_b)
    # A as the farm web client connects: `auth.token`, default transports (polling, then websocket).
    async with (
        node_client(socketio_client, env, auth={"token": env.token(org_a)}) as a,
        node_client(socketio_client, env, query={"token": env.token(org_b)}, transports=["websocket"]) as b,
    ):
        await connected(a)
        await connected(b)
        run = await env.trigger(pa)
        await env.advance(run.run_id)
        await env.log(run, "hello", "world")
        await env.complete(run.run_id)

        got = await a.until(is_run(run.run_id, "succeeded"))
        mine = [e for e in got if e["type"] == "event"]
        assert all(about(e) == run.run_id for e in mine), mine
        statuses = [e["data"]["status"] for e in mine if e["event"] == "pipeline.run.updated"]
        assert statuses[-1] == "succeeded" and "running" in statuses, statuses
        logs = [e["data"] for e in mine if e["event"] == "pipeline.log"]
        assert logs == [
            {"runId": run.run_id, "stage": "build", "message": "hello"},
            {"runId": run.run_id, "stage": "build", "message": "world"},
        ]
        final = mine[-1]["data"]
        # The full PipelineRun, as the reference says.
        assert final["pipelineId"] == pa.pipeline_id and final["stageResults"][0]["stageId"] == "build"
        assert "hello\nworld" in final["logs"]
        # Every event says where it is in the feed; the resume token only goes up.
        cursors = [e["meta"]["cursor"] for e in mine]
        assert cursors == sorted(cursors) and all(isinstance(e["meta"]["position"], int) for e in mine)

        # B's next event is its own organization's: none of A's came before it (one emitter, in
        # feed order, one connection).
        marker = await env.trigger(pb)
        seen_b = await b.until(is_run(marker.run_id))
        assert [about(e) for e in seen_b if e["type"] == "event"] == [marker.run_id], seen_b


async def test_subscribe_narrows_a_dashboard_to_one_run(env: GatewayEnv, socketio_client: Path) -> None:
    org = new_org()
    pipeline = await env.pipeline(org)
    r1, r2 = await env.trigger(pipeline), await env.trigger(pipeline)
    async with node_client(socketio_client, env, auth={"token": env.token(org)}, subscribe={"runId": r1.run_id}) as c:
        await connected(c)
        ack = await c.until(lambda e: e["type"] == "ack")
        assert ack[-1]["ack"] == {"ok": True, "runId": r1.run_id}
        await env.log(r2, "not for you")
        await env.advance(r2.run_id)
        await env.log(r1, "for you")
        got = await c.until(is_log("for you"))
        assert [about(e) for e in got if e["type"] == "event"] == [r1.run_id], got


async def test_a_token_without_a_role_is_refused_and_a_viewer_token_connects(
    env: GatewayEnv, socketio_client: Path
) -> None:
    org = new_org()
    for roles, message in (((), "this connection needs the viewer role"), (("deployer",), "needs the viewer role")):
        async with node_client(socketio_client, env, auth={"token": env.token(org, roles=roles)}) as c:
            got = await c.next()
            assert got["type"] == "connect_error" and message in got["message"], got
    async with node_client(socketio_client, env, auth={"token": "not-a-jwt"}) as c:
        assert await c.next() == {"type": "connect_error", "message": "invalid token"}
    async with node_client(socketio_client, env) as c:
        assert await c.next() == {"type": "connect_error", "message": "missing token"}
    async with node_client(socketio_client, env, auth={"token": env.token(org, roles=("viewer",))}) as c:
        await connected(c)


async def test_a_dashboard_is_disconnected_when_its_token_expires(env: GatewayEnv, socketio_client: Path) -> None:
    async with node_client(socketio_client, env, auth={"token": env.token(new_org(), ttl=2)}) as c:
        await connected(c)
        got = await c.until(lambda e: e["type"] == "disconnect", timeout=2 + WAIT)
        assert {"type": "event", "event": "session.expired", "data": {"message": "token expired"}} in got
        assert got[-1] == {"type": "disconnect", "reason": "io server disconnect"}


# ---- python-socketio ----------------------------------------------------------------------------


async def test_python_client_gets_its_runs_and_subscribes_with_an_ack(env: GatewayEnv) -> None:
    org, other = new_org(), new_org()
    pipeline, foreign = await env.pipeline(org), await env.pipeline(other)
    foreign_run = await env.trigger(foreign)
    async with py_client(env, env.token(org)) as c, py_client(env, env.token(other), transports=["polling"]) as o:
        run = await env.trigger(pipeline)
        await env.log(run, "line 1")
        got = await c.until(is_log("line 1"))
        assert [about(e) for e in got] == [run.run_id, run.run_id], got
        assert got[0]["data"]["status"] == "queued" and got[-1]["data"]["stage"] == "build"

        # Another organization's run cannot be subscribed to; its own pipeline can.
        ack = await c.sio.call("subscribe", {"runId": foreign_run.run_id}, namespace="/events", timeout=WAIT)
        assert ack == {"ok": False, "error": "run not found"}
        ack = await c.sio.call("subscribe", {"nope": 1}, namespace="/events", timeout=WAIT)
        assert ack == {"ok": False, "error": "unknown fields: nope"}
        ack = await c.sio.call("subscribe", {"pipelineId": pipeline.pipeline_id}, namespace="/events", timeout=WAIT)
        assert ack == {"ok": True, "pipelineId": pipeline.pipeline_id}

        # The other organization's client (over long-polling) sees its own marker and nothing of ours.
        marker = await env.trigger(foreign)
        seen = await o.until(is_run(marker.run_id))
        # Its first run's update may arrive late on a loaded machine (it was triggered before this
        # client connected): that run is its own. Nothing of the first organization's is there.
        assert {about(e) for e in seen} <= {foreign_run.run_id, marker.run_id}, seen
        assert run.run_id not in {about(e) for e in seen}, seen


async def test_python_client_without_a_role_is_refused_and_expired_is_disconnected(env: GatewayEnv) -> None:
    c = PyClient()
    with pytest.raises(socketio.exceptions.ConnectionError):
        await c.connect(env, env.token(new_org(), roles=()))
    assert c.errors == [{"message": "this connection needs the viewer role"}]
    async with py_client(env, env.token(new_org(), ttl=2)) as c:
        got = await c.until(lambda e: e["event"] == "session.expired", timeout=2 + WAIT)
        assert got[-1]["data"] == {"message": "token expired"}
        async with asyncio.timeout(WAIT):
            await c.disconnected.wait()


async def test_subscribe_from_a_cursor_replays_what_was_missed_then_goes_live_with_no_gap_or_duplicate(
    env: GatewayEnv, socketio_client: Path
) -> None:
    org = new_org()
    pipeline = await env.pipeline(org)
    async with py_client(env, env.token(org)) as steady:
        run = await env.trigger(pipeline)
        await env.log(run, "one")
        first = await steady.until(is_log("one"))
        resume_from = first[-1]["meta"]["cursor"]
        # Missed by a client that went away after "one":
        await env.advance(run.run_id)
        await env.log(run, "two", "three")
        await env.complete(run.run_id)
        missed = await steady.until(is_run(run.run_id, "succeeded"))

        # The real socket.io-client comes back with the cursor of the last event it had.
        resume = {"runId": run.run_id, "fromCursor": resume_from}
        async with node_client(socketio_client, env, auth={"token": env.token(org)}, subscribe=resume) as back:
            await connected(back)
            replayed = await back.until(lambda e: e["type"] == "ack")
            assert replayed[-1]["ack"] == {"ok": True, **resume}
            events = [e for e in replayed if e["type"] == "event"]
            assert [(e["event"], e["data"], e["meta"]) for e in events] == [
                (e["event"], e["data"], e["meta"]) for e in missed
            ]
            # Then live: the next event is the next one appended, once.
            await env.log(run, "after")
            got = await back.until(is_log("after"))
            assert [e["data"].get("message") for e in got] == ["after"], got

        # Resuming the whole organization (no runId) from the same cursor gives the same events.
        async with py_client(env, env.token(org)) as whole:
            ack = await whole.sio.call("subscribe", {"fromCursor": resume_from}, namespace="/events", timeout=WAIT)
            assert ack == {"ok": True, "fromCursor": resume_from}
            again = await whole.until(is_log("after"))
            assert [(e["event"], e["data"]) for e in again[: len(missed)]] == [(e["event"], e["data"]) for e in missed]
            bad = await whole.sio.call("subscribe", {"fromCursor": "12"}, namespace="/events", timeout=WAIT)
            assert bad == {"ok": False, "error": "fromCursor must be a cursor received with an event (32 hex digits)"}


async def test_the_access_token_cookie_works_from_the_same_origin_and_not_from_another(env: GatewayEnv) -> None:
    org = new_org()
    cookie = {"Cookie": f"access_token={env.token(org)}"}
    c = socketio.AsyncClient(reconnection=False)
    await c.connect(env.http_url, namespaces=["/events"], headers=cookie, transports=["websocket"], wait_timeout=WAIT)
    try:
        ack = await c.call("subscribe", {"pipelineId": (await env.pipeline(org)).pipeline_id}, namespace="/events")
        assert ack["ok"], ack
    finally:
        await c.eio.disconnect(abort=True)
    # A page of another origin cannot ride on a visitor's cookie.
    for transports in (["websocket"], ["polling"]):
        evil = socketio.AsyncClient(reconnection=False)
        with pytest.raises(socketio.exceptions.ConnectionError):
            await evil.connect(
                env.http_url,
                namespaces=["/events"],
                headers={**cookie, "Origin": "http://elsewhere.invalid"},
                transports=transports,
                wait_timeout=WAIT,
            )
        assert not evil.connected


async def test_stopping_the_gateway_disconnects_its_socketio_clients(env: GatewayEnv) -> None:
    gateway = Gateway(env.settings, env.store, env.commands, env.nc)
    stop = asyncio.Event()
    task = asyncio.create_task(gateway.serve(stop))
    async with asyncio.timeout(WAIT):
        await gateway.ready.wait()
    other = dataclasses.replace(env, gateway=gateway)
    websocket, polling = PyClient(), PyClient()
    await websocket.connect(other, env.token(new_org()))
    await polling.connect(other, env.token(new_org()), transports=["polling"])
    stop.set()
    async with asyncio.timeout(WAIT):
        await task
        await websocket.disconnected.wait()
        await polling.disconnected.wait()
