"""One client connection: its subscriptions, its bounded outgoing queue, and the direct write path."""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from websockets.asyncio.server import ServerConnection
from websockets.protocol import State

from domain import events as ev
from infra.auth import Principal
from infra.gateway import frames as fr
from infra.gateway.protocol import STREAM_KIND, Channel, Scope
from infra.store.records import FEED_START, FeedCursor, RecordedEvent


@dataclass(eq=False, slots=True)
class Item:
    frame: bytes
    sub: Sub | None = None  # None for control frames (subscribed, error, ...)
    cursor: FeedCursor = FEED_START
    index: int = 0  # the frame's index among its event's frames
    last: bool = True


@dataclass(eq=False)
class Sub:
    conn: Conn
    channel: Channel
    scope: Scope
    key: str  # run id, pipeline id, or the organization ("" for none)
    params: dict[str, str]
    # Every frame of every event at or before `enqueued` is queued or sent.
    enqueued: FeedCursor
    # Every frame of every event at or before `sent` has been handed to the socket; of the event
    # at `partial[0]`, the first `partial[1]` frames have too.
    sent: FeedCursor
    partial: tuple[FeedCursor, int] | None = None
    catching_up: bool = False
    # Live events held while a catch-up makes its last read (None: not holding).
    buffer: list[RecordedEvent] | None = None
    task: asyncio.Task[None] | None = None
    closed: bool = False

    @property
    def ident(self) -> tuple[Channel, Scope, str]:
        return (self.channel, self.scope, self.key)

    def feed_filter(self) -> dict[str, str]:
        if self.scope == "run":
            return {"run_id": self.key}
        if self.scope == "pipeline":
            return {"pipeline_id": self.key}
        return {}

    def matches(self, rec: RecordedEvent) -> bool:
        """For a record read from the store (it carries its org, pipeline and run)."""
        kind, _ = ev.aggregate_of(rec.stream_id)
        if STREAM_KIND.get(kind) != self.channel:
            return False
        if self.scope == "run":
            return rec.run_id == self.key
        if self.scope == "pipeline":
            return rec.pipeline_id == self.key
        return (rec.org or "") == self.key


class Conn:
    """One client: its subscriptions and its bounded outgoing queue, drained by `writer()`."""

    def __init__(self, ws: ServerConnection, principal: Principal, limit: int, buffer_limit: int = 256 << 10) -> None:
        self.ws = ws
        self.principal = principal
        self.limit = limit
        self.buffer_limit = buffer_limit
        self.subs: dict[tuple[Channel, Scope, str], Sub] = {}
        self.items: deque[Item] = deque()
        self.overflows = 0
        # The writer is inside `ws.send` (a frame of the queue is on its way to the transport).
        self.sending = False
        self._nonempty = asyncio.Event()
        self._room = asyncio.Event()
        self._room.set()

    def room_for(self, n: int) -> bool:
        # An event with more frames than the whole queue still goes in, alone.
        return not self.items or len(self.items) + n <= self.limit

    async def wait_room(self, n: int) -> None:
        while not self.room_for(n):
            self._room.clear()
            await self._room.wait()

    def push(self, items: Iterable[Item]) -> None:
        self.items.extend(items)
        self._nonempty.set()

    def write_now(self, wire: bytes) -> bool | None:
        """Write an event's encoded frames straight to the transport. None: not now (something is
        queued or being sent, or the connection is not plainly open): use the queue. False: the
        client's transport buffer is over the limit (too slow). True: written."""
        ws = self.ws
        if (
            self.items
            or self.sending
            or ws.protocol.state is not State.OPEN
            or getattr(ws, "send_in_progress", None) is not None
            or ws.protocol.extensions
        ):
            return None
        transport = ws.transport
        if transport.is_closing():
            return None
        if transport.get_write_buffer_size() > self.buffer_limit:
            return False
        if wire:
            transport.write(wire)
        return True

    async def control(self, event: str, data: dict[str, Any]) -> None:
        await self.wait_room(1)
        self.push([Item(fr.control(event, data))])

    def drop_events(self, sub: Sub | None = None) -> None:
        """Drop the queued event frames (of one subscription, or all); keep control frames."""
        self.items = deque(i for i in self.items if i.sub is None or (sub is not None and i.sub is not sub))
        self._room.set()

    async def writer(self) -> None:
        while True:
            while not self.items:
                self._nonempty.clear()
                await self._nonempty.wait()
            item = self.items.popleft()
            self._room.set()
            sub = item.sub
            if sub is not None:
                if sub.closed:
                    continue
                # Counted as sent once handed over: a catch-up that starts while this frame is
                # being written must not send it again.
                if item.last:
                    sub.sent, sub.partial = item.cursor, None
                else:
                    sub.partial = (item.cursor, item.index + 1)
            self.sending = True
            try:
                await self.ws.send(item.frame, text=True)
            finally:
                self.sending = False


def items_of(sub: Sub, rec: RecordedEvent, frames: tuple[bytes, ...]) -> list[Item]:
    skip = sub.partial[1] if sub.partial is not None and sub.partial[0] == rec.cursor else 0
    n = len(frames)
    return [Item(frames[i], sub, rec.cursor, i, i == n - 1) for i in range(skip, n)]
