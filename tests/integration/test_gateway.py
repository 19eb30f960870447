"""The WebSocket gateway against real PostgreSQL and NATS.

One relay and one gateway run in-process on the test's event loop, on a JetStream stream of their
own; events are appended through `Commands`, as the api and the executor do (no executor runs, so
each run moves only when a test moves it).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

import jwt
import pytest
import pytest_asyncio
from psycopg_pool import AsyncConnectionPool
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from domain import pipeline as pl
from domain import run as rn
from infra.app.commands import Commands
from infra.auth import issue_token
from infra.broker import bus
from infra.broker.relay import Relay
from infra.config import Settings
from infra.gateway.server import Gateway
from infra.store.migrate import migrate, open_pool
from infra.store.postgres import PostgresEventStore
from infra.store.records import RecordedEvent

pytestmark = pytest.mark.integration

SECRET = "gateway-test-secret-0123456789abcdef"
WAIT = 10.0


@dataclass
class Env:
    settings: Settings
    pool: AsyncConnectionPool
    store: PostgresEventStore
    commands: Commands
    nc: Any
    relay: Relay
    gateway: Gateway
    org: str

    def token(self, org: str | None = None, *, sub: str = "alice", roles: tuple[str, ...] = ("viewer",)) -> str:
        return issue_token(self.settings, sub=sub, roles=list(roles), org=org)

    def url(self, gateway: Gateway | None = None, path: str = "/api/v1/ws") -> str:
        return f"ws://127.0.0.1:{(gateway or self.gateway).port}{path}"

    async def settle(self, gateway: Gateway | None = None) -> None:
        """Wait until the gateway's live feed has dispatched everything stored so far."""
        head = await self.store.head()
        async with asyncio.timeout(WAIT):
            while True:
                if (gateway or self.gateway).live_cursor >= head:
                    return
                await asyncio.sleep(0.02)

    async def pipeline(self, org: str | None) -> pl.PipelineState:
        return await self.commands.create_pipeline(
            name=f"p-{uuid.uuid4().hex[:10]}",
            description=None,
            stages=[{"id": "build", "name": "Build", "type": "script", "config": {"command": "make"}}],
            org=org,
            by="alice",
        )

    async def trigger(self, pipeline: pl.PipelineState) -> rn.RunState:
        state, _ = await self.commands.trigger(pipeline, by="alice")
        return state

    async def advance(self, run_id: str) -> rn.RunState:
        state, _ = await self.commands.run_command(run_id, lambda at: rn.Advance(at=at))
        return state

    async def complete(self, run_id: str, stage_id: str = "build") -> rn.RunState:
        state, _ = await self.commands.run_command(
            run_id, lambda at: rn.CompleteStage(stage_id=stage_id, attempt=1, succeeded=True, exit_code=0, at=at)
        )
        return state

    async def log(self, run: rn.RunState, *lines: str, stage: str | None = "build") -> None:
        chunk = rn.LogAppended(
            stage_id=stage, lines=tuple(rn.LogLine("stdout", t) for t in lines), at=self.commands.now()
        )
        await self.commands.append_logs(run, [chunk])


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def env(database_url: str, nats_url: str) -> AsyncIterator[Env]:
    await migrate(database_url)
    pool = await open_pool(database_url, max_size=10)
    store = PostgresEventStore(pool)
    settings = Settings(
        database_url=database_url,
        nats_url=nats_url,
        jwt_secret=SECRET,
        events_stream=f"GW_{uuid.uuid4().hex[:12]}",
        gateway_port=0,
        poll_interval=0.05,
    )
    nc = await bus.connect(nats_url, "test-gateway")
    poker = bus.Poker(nc)
    poker.start()
    commands = Commands(store, on_append=poker.poke)
    stop = asyncio.Event()
    relay = Relay(store, database_url, nc, stream=settings.events_stream, poll_interval=0.05)
    relay_task = asyncio.create_task(relay.run(stop))
    gateway = Gateway(settings, store, commands, nc)
    gateway_task: asyncio.Task[None] | None = None
    try:
        # Let the relay publish what other tests left in the store before the gateway starts.
        head = await store.head()
        async with asyncio.timeout(60):
            while relay.cursor < head:
                assert not relay_task.done(), relay_task
                await asyncio.sleep(0.05)
        gateway_task = asyncio.create_task(gateway.serve(stop))
        async with asyncio.timeout(WAIT):
            await gateway.ready.wait()
        yield Env(settings, pool, store, commands, nc, relay, gateway, org=f"org-{uuid.uuid4().hex[:8]}")
    finally:
        stop.set()
        tasks = [t for t in (relay_task, gateway_task) if t is not None]
        done, pending = await asyncio.wait(tasks, timeout=WAIT)
        for t in pending:
            t.cancel()
        for t in done:
            if not t.cancelled() and t.exception() is not None:
                raise t.exception()  # type: ignore[misc]
        await poker.stop()
        with contextlib.suppress(Exception):
            await nc.jetstream().delete_stream(settings.events_stream)
        with contextlib.suppress(Exception):
            await nc.drain()
        await pool.close()


@contextlib.asynccontextmanager
async def running_gateway(env: Env, store: PostgresEventStore | None = None, **options: Any) -> AsyncIterator[Gateway]:
    """A second gateway on the same stream (its own consumer and port), reading `store` (the test's by default)."""
    gateway = Gateway(env.settings, store or env.store, env.commands, env.nc, **options)
    stop = asyncio.Event()
    task = asyncio.create_task(gateway.serve(stop))
    try:
        async with asyncio.timeout(WAIT):
            await gateway.ready.wait()
        yield gateway
    finally:
        stop.set()
        await asyncio.wait_for(task, WAIT)


class Client:
    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.seen: list[dict[str, Any]] = []  # every frame received, in order
        self._held: list[dict[str, Any]] = []  # received while waiting for `subscribed`

    async def send(self, frame: Any) -> None:
        await self.ws.send(frame if isinstance(frame, str) else json.dumps(frame))

    async def _next(self, timeout: float) -> dict[str, Any]:
        raw = await asyncio.wait_for(self.ws.recv(), timeout)
        frame: dict[str, Any] = json.loads(raw)
        self.seen.append(frame)
        return frame

    async def recv(self, timeout: float = WAIT) -> dict[str, Any]:
        if self._held:
            return self._held.pop(0)
        return await self._next(timeout)

    async def subscribe(self, channel: str, params: dict[str, str], from_position: int | None = None) -> None:
        frame: dict[str, Any] = {"action": "subscribe", "channel": channel, "params": params}
        if from_position is not None:
            frame["fromPosition"] = from_position
        await self.send(frame)
        async with asyncio.timeout(WAIT):
            while (got := await self._next(WAIT))["event"] not in ("subscribed", "error"):
                self._held.append(got)  # frames of another subscription of this client
        assert got["event"] == "subscribed", got
        assert got["data"]["channel"] == channel and got["data"]["params"] == params, got

    async def error(self) -> str:
        got = await self.recv()
        assert got["event"] == "error", got
        message: str = got["data"]["message"]
        return message

    async def until(self, done: Callable[[dict[str, Any]], bool], timeout: float = WAIT) -> list[dict[str, Any]]:
        """Frames up to and including the first for which `done` holds."""
        out: list[dict[str, Any]] = []
        async with asyncio.timeout(timeout):
            while True:
                frame = await self.recv()
                out.append(frame)
                if done(frame):
                    return out

    async def take(self, n: int, timeout: float = WAIT) -> list[dict[str, Any]]:
        async with asyncio.timeout(timeout):
            return [await self.recv() for _ in range(n)]

    async def next_is(self, marker: Callable[[dict[str, Any]], bool]) -> None:
        """The next frame is the marker: nothing else came first. The marker is an event appended
        after whatever the test expects no frame of, for one of this client's live subscriptions
        or for the subscription in question itself (a subscription sends its frames in feed order,
        and the gateway hands a connection the frames of its live subscriptions in feed order)."""
        frame = await self.recv()
        assert marker(frame), f"unexpected frame {frame}"


@contextlib.asynccontextmanager
async def client(env: Env, token: str | None, *, gateway: Gateway | None = None, **kw: Any) -> AsyncIterator[Client]:
    headers = {"Authorization": f"Bearer {token}"} if token else None
    async with connect(env.url(gateway), additional_headers=headers, open_timeout=WAIT, **kw) as ws:
        yield Client(ws)


async def http_get(port: int, path: str) -> tuple[int, str]:
    reader, writer = await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), WAIT)
    try:
        writer.write(f"GET {path} HTTP/1.1\r\nHost: gw\r\nConnection: close\r\n\r\n".encode())
        await writer.drain()
        raw = await asyncio.wait_for(reader.read(), WAIT)
    finally:
        writer.close()
    head, _, body = raw.decode().partition("\r\n\r\n")
    return int(head.split()[1]), body


def run_frames(frames: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [f for f in frames if f["event"] == "pipeline.run.updated"]


def log_frames(frames: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [f for f in frames if f["event"] == "pipeline.log"]


async def nothing_more(env: Env, c: Client, org: str | None) -> None:
    """`c` gets no further frame from anything appended so far: a marker appended now, on a live
    subscription of its own, is its next frame."""
    marker = await env.pipeline(org)
    await c.subscribe("pipelines", {"pipelineId": marker.pipeline_id})
    renamed = marker.name + "-marker"
    await env.commands.update_pipeline(marker.pipeline_id, by="marker", name=renamed)
    # The marker's own creation may reach the gateway after the subscription: its frame comes first then.
    frame = await c.recv()
    if frame["data"].get("id") == marker.pipeline_id and frame["data"].get("name") == marker.name:
        frame = await c.recv()
    assert frame["event"] == "pipeline.updated", f"unexpected frame {frame}"
    assert frame["data"]["id"] == marker.pipeline_id and frame["data"]["name"] == renamed, f"unexpected frame {frame}"


# ---- HTTP: health, paths, auth --------------------------------------------------------------------


async def test_health_paths_and_auth(env: Env) -> None:
    assert await http_get(env.gateway.port, "/healthz") == (200, "ok")
    assert (await http_get(env.gateway.port, "/elsewhere"))[0] == 404

    for headers in (None, {"Authorization": "Bearer not-a-jwt"}, {"Authorization": "Basic YTpi"}):
        with pytest.raises(InvalidStatus) as info:
            async with connect(env.url(), additional_headers=headers, open_timeout=WAIT):
                pass
        assert info.value.response.status_code == 401
    expired = issue_token(env.settings, sub="alice", roles=["viewer"], ttl_seconds=-60)
    with pytest.raises(InvalidStatus) as info:
        async with connect(env.url() + f"?token={expired}", open_timeout=WAIT):
            pass
    assert info.value.response.status_code == 401
    with pytest.raises(InvalidStatus) as info:
        async with connect(env.url(path="/api/v1/other"), additional_headers={"Authorization": "Bearer x"}):
            pass
    assert info.value.response.status_code == 404

    # The token may come in the query string (browsers cannot set headers on a WebSocket).
    async with connect(env.url() + f"?token={env.token(env.org)}", open_timeout=WAIT) as ws:
        c = Client(ws)
        await c.subscribe("runs", {})


async def test_session_ends_with_its_token(env: Env) -> None:
    token = issue_token(env.settings, sub="alice", roles=["viewer"], org=env.org, ttl_seconds=2)
    async with client(env, token) as c:
        await c.subscribe("runs", {})
        started = time.monotonic()
        with pytest.raises(ConnectionClosed):
            await c.recv(timeout=WAIT)
        assert c.ws.close_code == 1008 and c.ws.close_reason == "token expired"
        assert time.monotonic() - started < 2 + WAIT / 2  # at its expiry, not at some later sweep


async def test_a_token_without_a_role_cannot_connect(env: Env) -> None:
    # 403 on every HTTP read, so no subscription either: refused at the handshake.
    for roles in ([], ["deployer"]):
        token = issue_token(env.settings, sub="mallory", roles=roles, org=env.org)
        with pytest.raises(InvalidStatus) as info:
            async with connect(env.url() + f"?token={token}", open_timeout=WAIT):
                pass
        assert info.value.response.status_code == 403
        assert b"viewer role" in info.value.response.body


async def test_a_token_whose_time_claims_are_strings_is_refused(env: Env) -> None:
    for claims in ({"exp": "9999999999"}, {"exp": 9999999999, "nbf": "0"}, {"exp": 9999999999, "iat": "0"}):
        token = jwt.encode({"sub": "mallory", "roles": ["viewer"], "org": env.org, **claims}, SECRET, algorithm="HS256")
        with pytest.raises(InvalidStatus) as info:
            async with connect(env.url(), additional_headers={"Authorization": f"Bearer {token}"}, open_timeout=WAIT):
                pass
        assert info.value.response.status_code == 401, claims


# ---- runs ---------------------------------------------------------------------------------------


async def test_run_updates_in_order_as_of_each_event(env: Env) -> None:
    pipeline = await env.pipeline(env.org)
    run = await env.trigger(pipeline)
    await env.log(run, "hello")
    await env.settle()
    async with client(env, env.token(env.org)) as c:
        await c.subscribe("runs", {"runId": run.run_id})
        await env.advance(run.run_id)  # run_started, stage_started
        await env.log(run, "world")
        await env.complete(run.run_id)  # stage_succeeded, run_succeeded
        live = await c.until(lambda f: f.get("data", {}).get("status") == "succeeded")
        assert all(f["event"] == "pipeline.run.updated" for f in live), live
        assert [f["data"]["status"] for f in live] == ["running", "running", "running", "succeeded"]
        assert [f["data"]["stageResults"][0]["status"] for f in live] == [
            "pending",
            "running",
            "succeeded",
            "succeeded",
        ]
        # Each frame shows the run as of its event: the logs appended after it are not there yet.
        assert [f["data"]["logs"] for f in live] == ["hello\n", "hello\n", "hello\nworld\n", "hello\nworld\n"]
        positions = [f["position"] for f in live]
        assert positions == sorted(positions) and len(set(positions)) == 4
        assert all(f["data"]["id"] == run.run_id and f["data"]["pipelineId"] == pipeline.pipeline_id for f in live)
        assert live[-1]["data"]["finishedAt"] is not None and live[-1]["data"]["stageResults"][0]["durationMs"] >= 0
        await nothing_more(env, c, env.org)

    # Replayed from the store, the same events give the same frames, byte for byte, and nothing
    # else: the next frame of the same subscription is a run triggered after the replay.
    async with client(env, env.token(env.org)) as c:
        await c.subscribe("runs", {"pipelineId": pipeline.pipeline_id}, from_position=0)
        replay = await c.take(5)
        assert replay[0]["data"]["status"] == "queued" and replay[0]["data"]["logs"] == ""
        assert replay[1:] == live
        marker = await env.trigger(pipeline)
        await c.next_is(lambda f: f["data"]["id"] == marker.run_id and f["data"]["status"] == "queued")

    # A pipeline subscription sees every run of the pipeline, and a run cancelled by someone.
    async with client(env, env.token(env.org)) as c:
        await c.subscribe("runs", {"pipelineId": pipeline.pipeline_id})
        second = await env.trigger(pipeline)
        await env.commands.run_command(second.run_id, lambda at: rn.Cancel(by="x", at=at))
        frames = await c.take(2)
        assert [(f["data"]["id"], f["data"]["status"]) for f in frames] == [
            (second.run_id, "queued"),
            (second.run_id, "cancelled"),
        ]
        assert frames[1]["data"]["statusBy"] == "x"


async def test_log_lines(env: Env) -> None:
    pipeline = await env.pipeline(env.org)
    run = await env.trigger(pipeline)
    await env.settle()
    async with client(env, env.token(env.org)) as by_run, client(env, env.token(env.org)) as by_pipeline:
        await by_run.subscribe("logs", {"runId": run.run_id})
        await by_pipeline.subscribe("logs", {"pipelineId": pipeline.pipeline_id})
        await env.advance(run.run_id)  # run events: not on the logs channel
        await env.log(run, "a", "b")
        await env.log(run, "c", stage=None)
        for c in (by_run, by_pipeline):
            frames = await c.take(3)
            assert [f["event"] for f in frames] == ["pipeline.log"] * 3
            assert [f["data"] for f in frames] == [
                {"runId": run.run_id, "stage": "build", "message": "a"},
                {"runId": run.run_id, "stage": "build", "message": "b"},
                {"runId": run.run_id, "stage": None, "message": "c"},
            ]
            assert frames[0]["position"] == frames[1]["position"] < frames[2]["position"]

        await by_run.send({"action": "unsubscribe", "channel": "logs", "params": {"runId": run.run_id}})
        got = await by_run.recv()
        assert got == {"event": "unsubscribed", "data": {"channel": "logs", "params": {"runId": run.run_id}}}
        await env.log(run, "d")
        assert (await by_pipeline.recv())["data"]["message"] == "d"
        await nothing_more(env, by_run, env.org)
        await by_run.send({"action": "unsubscribe", "channel": "logs", "params": {"runId": run.run_id}})
        assert await by_run.error() == "not subscribed"


# ---- visibility and bad frames ------------------------------------------------------------------


async def test_other_organizations_and_bad_frames(env: Env) -> None:
    other = f"org-{uuid.uuid4().hex[:8]}"
    theirs = await env.pipeline(other)
    their_run = await env.trigger(theirs)
    ours = await env.pipeline(env.org)
    our_run = await env.trigger(ours)
    await env.settle()
    async with client(env, env.token(env.org)) as c:
        for channel in ("runs", "logs"):
            await c.send({"action": "subscribe", "channel": channel, "params": {"runId": their_run.run_id}})
            assert await c.error() == "run not found"
            await c.send({"action": "subscribe", "channel": channel, "params": {"runId": str(uuid.uuid4())}})
            assert await c.error() == "run not found"
            # Our run, claimed to be in their pipeline.
            params = {"runId": our_run.run_id, "pipelineId": theirs.pipeline_id}
            await c.send({"action": "subscribe", "channel": channel, "params": params})
            assert await c.error() == "run not found"
        for channel in ("runs", "logs", "pipelines"):
            await c.send({"action": "subscribe", "channel": channel, "params": {"pipelineId": theirs.pipeline_id}})
            assert await c.error() == "pipeline not found"
            await c.send({"action": "subscribe", "channel": channel, "params": {"pipelineId": str(uuid.uuid4())}})
            assert await c.error() == "pipeline not found"

        bad: list[Any] = [
            "not json",
            "[1, 2]",
            {"action": "dance", "channel": "runs"},
            {"action": "subscribe", "channel": "nope"},
            {"action": "subscribe", "channel": "runs", "params": {"runId": 5}},
            {"action": "subscribe", "channel": "runs", "params": "x"},
            {"action": "subscribe", "channel": "runs", "params": {"job": "x"}},
            {"action": "subscribe", "channel": "runs", "params": {}, "fromPosition": -1},
            {"action": "subscribe", "channel": "runs", "params": {}, "fromPosition": "7"},
            {"action": "subscribe", "channel": "runs", "params": {}, "fromPosition": 10**15},
            {"action": "subscribe", "channel": "pipelines", "params": {"runId": our_run.run_id}},
        ]
        for frame in bad:
            await c.send(frame)
            assert await c.error(), frame

        # The socket survived all of it; an organization-wide subscription sees only our runs.
        await c.subscribe("runs", {})
        await c.send({"action": "subscribe", "channel": "runs", "params": {}})
        assert (await c.error()).startswith("already subscribed")
        await env.advance(their_run.run_id)
        await env.advance(our_run.run_id)
        frames = await c.take(2)
        assert {f["data"]["id"] for f in frames} == {our_run.run_id}
        assert {f["data"]["organizationId"] for f in frames} == {env.org}
        await nothing_more(env, c, env.org)

    # A token without an organization sees only pipelines without one.
    async with client(env, env.token(None)) as c:
        await c.send({"action": "subscribe", "channel": "runs", "params": {"runId": our_run.run_id}})
        assert await c.error() == "run not found"
        mine = await env.pipeline(None)
        await env.settle()
        await c.subscribe("pipelines", {})
        await env.commands.update_pipeline(mine.pipeline_id, by="bob", name=mine.name + "-renamed")
        await env.commands.delete_pipeline(ours.pipeline_id, by="bob")  # another organization's
        await env.commands.delete_pipeline(mine.pipeline_id, by="bob")
        frames = await c.take(2)
        assert [(f["event"], f["data"]["id"]) for f in frames] == [
            ("pipeline.updated", mine.pipeline_id),
            ("pipeline.deleted", mine.pipeline_id),
        ]
        assert frames[0]["data"]["name"] == mine.name + "-renamed"
        # A deleted pipeline is gone.
        await c.send({"action": "subscribe", "channel": "runs", "params": {"pipelineId": mine.pipeline_id}})
        assert await c.error() == "pipeline not found"


# ---- resuming -----------------------------------------------------------------------------------


async def test_resume_from_position_no_gap_no_duplicate(env: Env) -> None:
    pipeline = await env.pipeline(env.org)
    params = {"pipelineId": pipeline.pipeline_id}
    async with client(env, env.token(env.org)) as steady:
        await steady.subscribe("runs", params)
        await steady.subscribe("logs", params)
        async with client(env, env.token(env.org)) as flaky:
            await flaky.subscribe("runs", params)
            await flaky.subscribe("logs", params)
            run = await env.trigger(pipeline)
            await env.advance(run.run_id)
            await env.log(run, "before 1", "before 2")
            seen = await flaky.until(lambda f: f.get("data", {}).get("message") == "before 2")
            last = seen[-1]["position"]
        # While the flaky client is away:
        await env.log(run, "missed 1")
        await env.complete(run.run_id)
        second = await env.trigger(pipeline)
        await env.log(second, "missed 2")

        # It comes back while events keep coming; it must get each one exactly once.
        async def writer() -> None:
            for i in range(30):
                await env.log(second, f"during {i}")
                if i == 10:
                    await env.advance(second.run_id)
                await asyncio.sleep(0.01)
            await env.complete(second.run_id)
            await env.log(second, "the end")

        async with client(env, env.token(env.org)) as back:
            writing = asyncio.create_task(writer())
            await back.subscribe("runs", params, from_position=last)
            await back.subscribe("logs", params, from_position=last)
            await asyncio.wait_for(writing, WAIT)
            got = await back.until(lambda f: f.get("data", {}).get("message") == "the end", timeout=20)
            # The runs subscription may finish after the logs one: wait for its last frame too.
            if not any(
                f["event"] == "pipeline.run.updated"
                and f["data"]["status"] == "succeeded"
                and f["data"]["id"] == second.run_id
                for f in got
            ):
                got += await back.until(
                    lambda f: f.get("data", {}).get("status") == "succeeded" and f["data"]["id"] == second.run_id
                )
            # Nothing else: each subscription's next frame is an event appended now.
            await env.log(second, "marker")
            run_marker = await env.trigger(pipeline)
            rest = await back.take(2)
            assert sorted((f["event"], f["data"].get("message") or f["data"]["id"]) for f in rest) == sorted(
                [("pipeline.log", "marker"), ("pipeline.run.updated", run_marker.run_id)]
            ), rest
        await steady.until(lambda f: f.get("data", {}).get("message") == "the end", timeout=20)
        if not any(
            f["event"] == "pipeline.run.updated"
            and f["data"]["status"] == "succeeded"
            and f["data"]["id"] == second.run_id
            for f in steady.seen
        ):
            await steady.until(
                lambda f: f.get("data", {}).get("status") == "succeeded" and f["data"]["id"] == second.run_id
            )
        want = [f for f in steady.seen if f["data"].get("message") != "marker" and f not in rest]
        expected_runs = [f for f in run_frames(want) if f["position"] > last]
        expected_logs = [f for f in log_frames(want) if f["position"] > last]
        assert run_frames(got) == expected_runs
        assert log_frames(got) == expected_logs
        messages = [f["data"]["message"] for f in expected_logs]
        assert messages[:2] == ["missed 1", "missed 2"] and messages[-1] == "the end" and len(messages) == 33
        assert [f["data"]["status"] for f in expected_runs][:2] == ["running", "succeeded"]


async def test_unknown_position_is_an_error(env: Env) -> None:
    async with client(env, env.token(env.org)) as c:
        await c.send({"action": "subscribe", "channel": "runs", "params": {}, "fromPosition": 10**12})
        assert (await c.error()).startswith("unknown position")
        await c.subscribe("runs", {})


# ---- slow clients -------------------------------------------------------------------------------


async def test_slow_client_falls_back_to_catch_up(env: Env) -> None:
    pipeline = await env.pipeline(env.org)
    run = await env.trigger(pipeline)
    n, width = 80, 16 * 1024
    await env.settle()
    async with running_gateway(env, queue_limit=4) as gw:
        # The slow client's socket takes little, and its library stops reading after one frame.
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.setblocking(False)
        await asyncio.wait_for(asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", gw.port)), WAIT)
        token = env.token(env.org)
        async with (
            client(env, token, gateway=gw, sock=sock, max_queue=1, max_size=None) as slow,
            client(env, token, gateway=gw, max_size=None) as fast,
        ):
            for c in (slow, fast):
                await c.subscribe("runs", {"runId": run.run_id})
                await c.subscribe("logs", {"runId": run.run_id})
            await env.advance(run.run_id)
            for i in range(n):
                # Three lines an event: a client may fall behind in the middle of one.
                await env.log(run, *(f"{i:03d}.{j} " + "x" * width for j in range(3)))
            await env.complete(run.run_id)
            lines = [f"{i:03d}.{j}" for i in range(n) for j in range(3)]

            # The fast client is not held back by the slow one.
            fast_frames = await fast.take(3 * n + 4, timeout=30)
            assert [f["data"]["message"][:5] for f in log_frames(fast_frames)] == lines
            assert [f["data"]["status"] for f in run_frames(fast_frames)] == [
                "running",
                "running",
                "running",
                "succeeded",
            ]
            assert gw.overflows >= 1

            # The slow client still gets everything, once, in order.
            slow_frames = await slow.take(3 * n + 4, timeout=30)
            assert log_frames(slow_frames) == log_frames(fast_frames)
            assert run_frames(slow_frames) == run_frames(fast_frames)
            await env.log(run, "live again")
            assert (await slow.recv())["data"]["message"] == "live again"
            await env.log(run, "the end")
            await slow.next_is(lambda f: f["data"].get("message") == "the end")


async def test_stopping_the_gateway_closes_its_clients(env: Env) -> None:
    async with running_gateway(env) as gw:
        assert await http_get(gw.port, "/healthz") == (200, "ok")
        ws = await connect(env.url(gw), additional_headers={"Authorization": f"Bearer {env.token(env.org)}"})
        await Client(ws).subscribe("runs", {})
    try:
        with pytest.raises(ConnectionClosed):
            await asyncio.wait_for(ws.recv(), WAIT)
        assert ws.close_code == 1001
    finally:
        await ws.close()


def test_wire_frames_are_what_websockets_would_send() -> None:
    """The live fan-out writes pre-encoded frames straight to each transport: byte for byte what
    the library writes for `send(text)` on a server connection without extensions."""
    from websockets.frames import Frame, Opcode

    from infra.gateway.frames import wire as _wire

    payloads = (b"", b"x" * 125, b"y" * 126, b"z" * 65535, b"w" * 65536, '{"m":"zo\u00eb \u2713"}'.encode())
    for p in payloads:
        assert _wire((p,)) == Frame(Opcode.TEXT, p).serialize(mask=False, extensions=[])
    assert _wire(payloads) == b"".join(Frame(Opcode.TEXT, p).serialize(mask=False, extensions=[]) for p in payloads)


async def test_many_subscribers_of_one_run_get_every_frame_once_in_order(env: Env) -> None:
    pipeline = await env.pipeline(env.org)
    run = await env.trigger(pipeline)
    await env.settle()
    token = env.token(env.org)
    direct = env.gateway.written_direct
    async with contextlib.AsyncExitStack() as stack:
        clients = [await stack.enter_async_context(client(env, token)) for _ in range(40)]
        for c in clients:
            await c.subscribe("logs", {"runId": run.run_id})
            await c.subscribe("runs", {"runId": run.run_id})
        other_org = f"other-{uuid.uuid4().hex[:8]}"
        outsider = await stack.enter_async_context(client(env, env.token(other_org)))
        await outsider.subscribe("runs", {})
        await outsider.subscribe("logs", {})
        await env.advance(run.run_id)
        for i in range(10):
            await env.log(run, f"line {i}.a", f"line {i}.b")
        await env.complete(run.run_id)
        expected = [f"line {i}.{x}" for i in range(10) for x in "ab"]
        for c in clients:
            frames = await c.take(len(expected) + 4, timeout=WAIT)
            assert [f["data"]["message"] for f in log_frames(frames)] == expected
            assert [f["data"]["status"] for f in run_frames(frames)] == ["running", "running", "running", "succeeded"]
        # Nothing more for anyone: the next frame is a line appended now.
        await env.log(run, "the end")
        for c in clients:
            await c.next_is(lambda f: f["data"].get("message") == "the end")
        # Another organization's subscriber of everything it may see got none of it: its first
        # frame is of a run of its own organization, triggered after all of it.
        theirs = await env.trigger(await env.pipeline(other_org))
        await outsider.next_is(lambda f: f["data"].get("id") == theirs.run_id)
    assert env.gateway.written_direct > direct  # the fast path was taken


class _CountingStore(PostgresEventStore):
    """The store, counting the stream reads made through it."""

    def __init__(self, store: PostgresEventStore) -> None:
        super().__init__(store.pool)
        self.reads: list[str] = []

    async def read_stream(self, stream_id: str, after_version: int = 0) -> list[RecordedEvent]:
        self.reads.append(stream_id)
        return await super().read_stream(stream_id, after_version)


async def test_live_run_frames_come_from_the_messages_and_equal_frames_built_from_the_store(env: Env) -> None:
    counting = _CountingStore(env.store)
    token = env.token(env.org)
    async with running_gateway(env, store=counting) as gw:
        pipeline, unwatched = await env.pipeline(env.org), await env.pipeline(env.org)
        async with client(env, token, gateway=gw) as c:
            await c.subscribe("runs", {"pipelineId": pipeline.pipeline_id})
            first, second = await env.trigger(pipeline), await env.trigger(pipeline)
            # Runs nobody watches get no history: they do not push the watched ones out of the
            # gateway's cache (64 runs), else the watched ones would be read again below.
            for _ in range(70):
                await env.trigger(unwatched)
            for run in (first, second):
                await env.advance(run.run_id)
                await c.until(lambda f, r=run: f["data"]["id"] == r.run_id and f["data"]["status"] == "running")
            # Two runs' events interleaved in the feed, as they are when runs go on at once.
            await env.log(first, "one", "two")
            await env.log(second, "2: one")
            await env.log(first, "three")
            await env.complete(second.run_id)
            await env.complete(first.run_id)
            frames = await c.until(lambda f: f["data"]["id"] == first.run_id and f["data"]["status"] == "succeeded")
            # The gateway saw both runs from their first event: it never read them from the store.
            assert counting.reads == [], "a live frame read the store"
            by_run = {r.run_id: [f for f in frames if f["data"]["id"] == r.run_id] for r in (first, second)}
            assert by_run[first.run_id][-1]["data"]["logs"] == "one\ntwo\nthree\n"
            assert by_run[second.run_id][-1]["data"]["logs"] == "2: one\n"
            assert by_run[second.run_id][-1]["data"]["status"] == "succeeded"

    # The same events, framed by a gateway that has seen nothing yet (a replay from the store),
    # give the same frames byte for byte.
    async with running_gateway(env) as fresh, client(env, token, gateway=fresh) as replay:
        for run in (first, second):
            await replay.subscribe("runs", {"runId": run.run_id}, from_position=0)
            replayed = await replay.until(
                lambda f, r=run: f["data"]["id"] == r.run_id and f["data"]["status"] == "succeeded"
            )
            by_position = {f["position"]: f for f in replayed}
            assert [by_position.get(f["position"]) for f in by_run[run.run_id]] == by_run[run.run_id]
