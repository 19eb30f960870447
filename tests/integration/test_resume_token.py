"""The resume token against commits that land out of position order: the store's `position` goes
down in delivery order; the `cursor` (frames) and `Pipelines-Cursor` (NATS header) never do, and a
WebSocket client or a nats-py consumer resuming from it gets every event."""

from __future__ import annotations

import asyncio
import contextlib
import json
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import pytest
import pytest_asyncio
import socketio
from nats.aio.msg import Msg
from nats.js.api import ConsumerConfig, DeliverPolicy
from websockets.asyncio.client import ClientConnection, connect

from domain import events as ev
from domain import run as rn
from infra.broker.bus import EVENTS_SUBJECTS
from infra.broker.cursor import CURSOR, parse_cursor_token
from infra.broker.relay import POSITION
from infra.store.records import NewEvent
from tests.integration.gateway_env import WAIT, GatewayEnv, gateway_env

pytestmark = pytest.mark.integration


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def env(database_url: str, nats_url: str) -> AsyncIterator[GatewayEnv]:
    async with gateway_env(database_url, nats_url) as e:
        yield e


@dataclass
class Appended:
    high: int  # the position of the event that commits first (and is delivered first)
    low: int  # the position of the event that commits last


@contextlib.asynccontextmanager
async def out_of_position_order(
    env: GatewayEnv, first: rn.RunState, first_line: str, last: rn.RunState, last_line: str
) -> AsyncIterator[Appended]:
    """Two transactions on two connections. The first takes its transaction id at once but appends
    `first_line` last; the second appends `last_line` meanwhile (the lower position) and stays open
    until the block exits. The feed delivers in (transaction id, position) order: `first_line`
    (higher position) before `last_line` (lower position)."""
    async with env.pool.connection() as c1, env.pool.connection() as c2:
        await c1.execute("BEGIN")
        await c1.execute("SELECT pg_current_xact_id()")  # the lower transaction id
        await c2.execute("BEGIN")
        try:
            low = await env.store.append_in(c2, ev.run_log_stream(last.run_id), [log_event(last, last_line)], None)
            high = await env.store.append_in(c1, ev.run_log_stream(first.run_id), [log_event(first, first_line)], None)
            await c1.execute("COMMIT")
            assert low.positions[0] < high.positions[0]
            yield Appended(high=high.positions[0], low=low.positions[0])
            await c2.execute("COMMIT")
        except BaseException:
            with contextlib.suppress(Exception):
                await c1.execute("ROLLBACK")
            with contextlib.suppress(Exception):
                await c2.execute("ROLLBACK")
            raise


def log_event(run: rn.RunState, line: str) -> NewEvent:
    chunk = rn.LogAppended(stage_id="build", lines=(rn.LogLine("stdout", line),), at=rn_now())
    return NewEvent(uuid.uuid4().hex, chunk, org=run.organization_id, pipeline_id=run.pipeline_id, run_id=run.run_id)


def rn_now() -> datetime:
    return datetime.now(UTC)


class WsClient:
    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws

    async def recv(self) -> dict[str, Any]:
        frame: dict[str, Any] = json.loads(await asyncio.wait_for(self.ws.recv(), WAIT))
        return frame

    async def subscribe(self, params: dict[str, str], **resume: Any) -> None:
        await self.ws.send(json.dumps({"action": "subscribe", "channel": "logs", "params": params, **resume}))
        got = await self.recv()
        assert got["event"] == "subscribed", got

    async def until_line(self, line: str) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        async with asyncio.timeout(WAIT):
            while True:
                frame = await self.recv()
                out.append(frame)
                if frame["event"] == "pipeline.log" and frame["data"]["message"] == line:
                    return out


@contextlib.asynccontextmanager
async def ws_client(env: GatewayEnv, token: str) -> AsyncIterator[WsClient]:
    async with connect(f"{env.ws_url}?token={token}", open_timeout=WAIT) as ws:
        yield WsClient(ws)


async def two_runs(env: GatewayEnv) -> tuple[str, rn.RunState, rn.RunState, str]:
    org = f"org-{uuid.uuid4().hex[:8]}"
    pipeline = await env.pipeline(org)
    return org, await env.trigger(pipeline), await env.trigger(pipeline), pipeline.pipeline_id


async def test_a_websocket_client_resuming_from_the_cursor_gets_the_event_whose_position_went_down(
    env: GatewayEnv,
) -> None:
    org, r1, r2, pipeline_id = await two_runs(env)
    params = {"pipelineId": pipeline_id}
    tag = uuid.uuid4().hex[:6]
    high_line, low_line = f"high-{tag}", f"low-{tag}"
    async with ws_client(env, env.token(org)) as steady:
        await steady.subscribe(params)
        async with ws_client(env, env.token(org)) as flaky:
            await flaky.subscribe(params)
            async with out_of_position_order(env, r1, high_line, r2, low_line) as appended:
                # The flaky client gets the first-delivered event, then goes away before the other commits.
                got = await flaky.until_line(high_line)
                last = got[-1]
        seen = await steady.until_line(low_line)
        high, low = seen[-2], seen[-1]
        assert (high["data"]["message"], low["data"]["message"]) == (high_line, low_line), seen
        # The position went down in delivery order; the cursor went up.
        assert (high["position"], low["position"]) == (appended.high, appended.low) and appended.low < appended.high
        assert high["cursor"] < low["cursor"] and last["cursor"] == high["cursor"]
        assert parse_cursor_token(low["cursor"]) is not None

        # Resuming from the cursor of the last frame received: the lower-position event comes next.
        async with ws_client(env, env.token(org)) as back:
            await back.subscribe(params, fromCursor=last["cursor"])
            assert (await back.recv())["data"]["message"] == low_line
        # A position high-water mark would have skipped it (it is below the last position received).
        assert low["position"] < last["position"]
        # `fromPosition` with the last position received looks that position's cursor up in the
        # store, so it does not skip either (a client that keeps the maximum would get repeats).
        async with ws_client(env, env.token(org)) as back:
            await back.subscribe(params, fromPosition=last["position"])
            assert (await back.recv())["data"]["message"] == low_line
        # Bad tokens are refused, naming the field.
        async with ws_client(env, env.token(org)) as bad:
            for wrong in ("12", 12, "g" * 32, "0" * 31):
                frame = {"action": "subscribe", "channel": "logs", "params": params, "fromCursor": wrong}
                await bad.ws.send(json.dumps(frame))
                got_error = await bad.recv()
                assert got_error["event"] == "error" and "fromCursor" in got_error["data"]["message"], got_error
            both = {"action": "subscribe", "channel": "logs", "params": params, "fromCursor": last["cursor"]}
            await bad.ws.send(json.dumps({**both, "fromPosition": 0}))
            got_error = await bad.recv()
            assert got_error["data"]["message"] == "give fromCursor or fromPosition, not both", got_error


async def test_a_nats_consumer_keeping_the_cursor_header_as_its_high_water_mark_skips_nothing(
    env: GatewayEnv,
) -> None:
    _, r1, r2, _ = await two_runs(env)
    tag = uuid.uuid4().hex[:6]
    high_line, low_line = f"high-{tag}", f"low-{tag}"
    js = env.nc.jetstream()
    stream = env.settings.events_stream
    start_seq = (await js.stream_info(stream)).state.last_seq + 1

    # A consumer that processes each event once: it keeps the cursor of the last one it processed
    # and drops anything at or below it (a redelivery). It stops after the first marker.
    processed: list[str] = []
    hwm = ""
    stopped = asyncio.Event()

    def line_of(msg: Msg) -> str | None:
        for line in (high_line, low_line):
            if line.encode() in msg.data:
                return line
        return None

    async def first_run(msg: Msg) -> None:
        nonlocal hwm
        if stopped.is_set():
            return
        cursor = (msg.headers or {})[CURSOR]
        if cursor > hwm:
            hwm = cursor
            processed.append(line_of(msg) or "")
        if line_of(msg) == high_line:
            stopped.set()  # "crashes" here, before the other event arrives

    config = ConsumerConfig(deliver_policy=DeliverPolicy.BY_START_SEQUENCE, opt_start_seq=start_seq)
    sub = await js.subscribe(EVENTS_SUBJECTS, stream=stream, cb=first_run, ordered_consumer=True, config=config)
    try:
        async with out_of_position_order(env, r1, high_line, r2, low_line) as appended:
            async with asyncio.timeout(WAIT):
                await stopped.wait()
    finally:
        await sub.unsubscribe()
    assert processed[-1] == high_line

    # It comes back and reads the stream again from where it started, skipping what it processed.
    msgs: list[Msg] = []
    done = asyncio.Event()

    async def again(msg: Msg) -> None:
        msgs.append(msg)
        if line_of(msg) == low_line:
            done.set()

    sub = await js.subscribe(EVENTS_SUBJECTS, stream=stream, cb=again, ordered_consumer=True, config=config)
    try:
        async with asyncio.timeout(WAIT):
            await done.wait()
    finally:
        await sub.unsubscribe()
    after = [line_of(m) for m in msgs if (m.headers or {})[CURSOR] > hwm]
    assert after == [low_line]
    # In stream order the cursor header only goes up; the position went down at the marker.
    cursors = [(m.headers or {})[CURSOR] for m in msgs]
    assert cursors == sorted(cursors) and len(set(cursors)) == len(cursors)
    positions = {line_of(m): int((m.headers or {})[POSITION]) for m in msgs}
    assert positions[low_line] == appended.low < positions[high_line] == appended.high
    # ... so a consumer keeping the position as its high-water mark would have dropped it.
    assert [line for line, pos in positions.items() if pos > positions[high_line]] == []


async def test_a_socketio_client_resuming_from_the_cursor_gets_the_event_whose_position_went_down(
    env: GatewayEnv,
) -> None:
    org, r1, r2, pipeline_id = await two_runs(env)
    tag = uuid.uuid4().hex[:6]
    high_line, low_line = f"high-{tag}", f"low-{tag}"
    got: asyncio.Queue[tuple[dict[str, Any], dict[str, Any]]] = asyncio.Queue()

    async def on_log(data: dict[str, Any], meta: dict[str, Any]) -> None:
        await got.put((data, meta))

    async def connected_client() -> socketio.AsyncClient:
        c = socketio.AsyncClient(reconnection=False)
        c.on("pipeline.log", on_log, namespace="/events")
        await c.connect(env.http_url, namespaces=["/events"], auth={"token": env.token(org)}, wait_timeout=WAIT)
        return c

    async def next_line(line: str) -> dict[str, Any]:
        async with asyncio.timeout(WAIT):
            while True:
                data, meta = await got.get()
                if data["message"] in (high_line, low_line):
                    assert data["message"] == line, (data, meta)
                    return meta

    flaky = await connected_client()
    try:
        ack = await flaky.call("subscribe", {"pipelineId": pipeline_id}, namespace="/events", timeout=WAIT)
        assert ack["ok"], ack
        async with out_of_position_order(env, r1, high_line, r2, low_line) as appended:
            last = await next_line(high_line)
            await flaky.eio.disconnect(abort=True)
    finally:
        await flaky.eio.disconnect(abort=True)
    assert last["position"] == appended.high
    back = await connected_client()
    try:
        resume = {"pipelineId": pipeline_id, "fromCursor": last["cursor"]}
        ack = await back.call("subscribe", resume, namespace="/events", timeout=WAIT)
        assert ack == {"ok": True, **resume}
        meta = await next_line(low_line)
        # Its position is below the last one the client had: only the cursor went up.
        assert meta["position"] == appended.low < last["position"] and meta["cursor"] > last["cursor"]
    finally:
        await back.eio.disconnect(abort=True)
