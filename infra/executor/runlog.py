"""A run's log as the executor writes it: lines buffered and appended in chunks; the last chunks of
a finished unit handed to its completion, which appends them in its own transaction."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

import msgspec

from domain import events as ev
from domain import run as rn
from domain.masking import Masker
from domain.run.units import split_key, unit_key
from infra.app.commands import Commands
from infra.metrics import log_lines_dropped
from infra.store.records import NewEvent

log = logging.getLogger("pipelines.executor")

_json = msgspec.json.Encoder()


class RunLog:
    """Buffers a run's log lines and appends them in chunks (every `interval` or `max_lines`),
    capped at `max_bytes` per run with a marker where the log was cut.

    Lines whose append fails are kept and appended by a later flush, in order. While the store
    stays unavailable, at most `max_held` bytes are kept: older lines are then dropped, and a
    marker line saying how many takes their place (counted in `dropped`)."""

    def __init__(
        self,
        commands: Commands,
        state: rn.RunState,
        *,
        max_bytes: int,
        publish: Callable[[bytes], Awaitable[None]] | None,
        interval: float = 0.05,
        max_lines: int = 500,
        masker: Masker | None = None,
        max_held: int = 4 * 1024 * 1024,
        retry_delay: float = 0.2,
    ) -> None:
        self._commands = commands
        self._masker = masker
        self._state = state
        self._max_bytes = max_bytes
        self._publish = publish
        self._interval = interval
        self._max_lines = max_lines
        self._buffer: list[tuple[str | None, rn.LogLine]] = []
        self._bytes = 0
        self._cut = False
        self._wake = asyncio.Event()
        self._closing = False
        self._task: asyncio.Task[None] | None = None
        self._max_held = max_held
        self._retry_delay = retry_delay
        # Lines dropped (the store unavailable for too long) and not yet told by a stored marker.
        self._gap = 0
        self._gap_key: str | None = None
        self.dropped = 0

    @property
    def run_id(self) -> str:
        return self._state.run_id

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop())

    def line(
        self,
        stage_id: str | None,
        stream: Literal["stdout", "stderr", "system"],
        text: str,
        job: str | None = None,
        step: str | None = None,
    ) -> None:
        if self._cut:
            return
        if self._masker is not None:
            text = self._masker.mask(text)
        size = len(text.encode()) + 1
        if self._bytes + size > self._max_bytes and stream != "system":
            self._cut = True
            text = f"[log truncated: this run's log reached the limit of {self._max_bytes} bytes]"
            stream = "system"
        self._bytes += size
        key = None if stage_id is None else unit_key(stage_id, job, step)
        self._buffer.append((key, rn.LogLine(stream, text)))
        if len(self._buffer) >= self._max_lines:
            self._wake.set()

    async def _loop(self) -> None:
        # Never cancelled mid-flush: a flush swaps the buffer out before it appends, so a cancel
        # there would lose those lines. close() asks the loop to finish instead.
        # What is left when it is asked to finish is for close() or finish() to store or hand over.
        while not self._closing:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self._interval)
            self._wake.clear()
            if not self._closing:
                await self.flush()

    async def flush(self) -> None:
        if not self._buffer and not self._gap:
            return
        buffer, self._buffer = self._buffer, []
        gap = self._gap
        if gap:
            text = f"[log gap: {gap} lines could not be stored (the event store was unavailable)]"
            buffer.insert(0, (self._gap_key, rn.LogLine("system", text)))
        chunks = chunk_lines(buffer, self._commands.now())
        # One append of at most a few chunks at a time keeps every stored event and every
        # transaction small (events are published on NATS, whose messages are capped at 1 MB).
        stored_chunks = stored_lines = 0
        for start in range(0, len(chunks), CHUNKS_PER_APPEND):
            group = chunks[start : start + CHUNKS_PER_APPEND]
            if not await self._append(group):
                break
            stored_chunks += len(group)
            stored_lines += sum(len(c.lines) for c in group)
        if gap and stored_lines:
            self._gap -= gap  # the marker is the first line: stored
        if stored_lines < len(buffer):
            self._hold(buffer[max(stored_lines, 1 if gap else 0) :])
        await self.publish(chunks[:stored_chunks])

    async def publish(self, chunks: list[rn.LogAppended]) -> None:
        """Tell the live tail (NATS) about chunks that are stored."""
        if self._publish is None:
            return
        for c in chunks:
            payload: dict[str, Any] = {
                "runId": self._state.run_id,
                "stage": c.stage_id,
                "lines": [{"stream": ln.stream, "text": ln.text} for ln in c.lines],
            }
            if c.job is not None:
                payload["job"], payload["step"] = c.job, c.step
            with contextlib.suppress(Exception):
                await self._publish(_json.encode(payload))

    async def _append(self, group: list[rn.LogAppended], records: list[NewEvent] | None = None) -> bool:
        for attempt in range(5):
            try:
                await self._commands.append_logs(self._state, group, records)
                return True
            except ValueError:
                raise  # these very records are stored already (see store)
            except Exception as exc:
                log.warning("log append failed (attempt %d): %s", attempt + 1, exc)
                await asyncio.sleep(self._retry_delay * (attempt + 1))
        return False

    def _hold(self, unstored: list[tuple[str | None, rn.LogLine]]) -> None:
        """Keep lines not stored yet ahead of those written meanwhile; beyond `max_held` bytes,
        drop the oldest (a marker line tells how many)."""
        self._buffer = unstored + self._buffer
        size = sum(len(line.text) + 16 for _, line in self._buffer)
        drop = 0
        while size > self._max_held and drop < len(self._buffer):
            size -= len(self._buffer[drop][1].text) + 16
            drop += 1
        if drop:
            if not self._gap:
                self._gap_key = self._buffer[0][0]
            del self._buffer[:drop]
            self._gap += drop
            self.dropped += drop
            log_lines_dropped.inc(drop)
            log.error("run %s: %d log lines dropped: the event store stayed unavailable", self._state.run_id, drop)

    async def close(self) -> None:
        await self._stop()
        await self._store_rest()

    async def _stop(self) -> None:
        self._closing = True
        self._wake.set()
        if self._task is not None:
            await self._task

    async def finish(self) -> LastChunks | None:
        """Stop appending: the lines left, for the unit's completion to append in its own
        transaction (one commit fewer per unit, and the completion follows the whole log). None
        when nothing is left, or when what is left is stored here as `close` does: after failed
        appends (a marker of dropped lines goes first), or more than one append's worth."""
        await self._stop()
        if not self._buffer:
            await self._store_rest()
            return None
        chunks = chunk_lines(self._buffer, self._commands.now())
        if self._gap or len(chunks) > CHUNKS_PER_APPEND:
            await self._store_rest()
            return None
        self._buffer = []
        return LastChunks(self, chunks, self._commands.log_records(self._state, chunks))

    async def store(self, last: LastChunks) -> None:
        """Append chunks handed over by `finish` on their own (their completion did not take them)."""
        try:
            stored = await self._append(last.chunks, last.records)
        except ValueError:
            return  # stored already: the completion took them after all (and told the live tail)
        if stored:
            await self.publish(last.chunks)
        else:
            lost = sum(len(c.lines) for c in last.chunks)
            self.dropped += lost
            log_lines_dropped.inc(lost)
            log.error("run %s: %d log lines could not be stored after the unit ended", self._state.run_id, lost)

    async def _store_rest(self) -> None:
        # Lines kept after failed appends get a few more tries; what is still left then is lost
        # with this process's memory, and said so.
        for _ in range(CLOSE_ROUNDS):
            await self.flush()
            if not self._buffer and not self._gap:
                return
        lost = len(self._buffer) + self._gap
        self.dropped += len(self._buffer)
        log_lines_dropped.inc(len(self._buffer))
        log.error("run %s: %d log lines could not be stored before the unit ended", self._state.run_id, lost)


# Flushes a closing log tries before it gives up on lines the store keeps refusing.
CLOSE_ROUNDS = 3

# Log chunks per append at most (see RunLog.flush).
CHUNKS_PER_APPEND = 8


@dataclass(frozen=True)
class LastChunks:
    """A finished unit's last log chunks, not stored yet (RunLog.finish), as records with their
    event ids: appended ahead of the unit's completion in its transaction, or else on their own
    (`RunLog.store`; an append of the same records again is refused, never stored twice)."""

    runlog: RunLog
    chunks: list[rn.LogAppended]
    records: list[NewEvent]

    @property
    def stream(self) -> str:
        return ev.run_log_stream(self.runlog.run_id)


# A log event holds at most this many bytes of text (one over-long line is cut at MAX_LINE already).
MAX_CHUNK_BYTES = 256 * 1024


def chunk_lines(buffer: list[tuple[str | None, rn.LogLine]], at: datetime) -> list[rn.LogAppended]:
    """Consecutive lines of one stage (or one step of a job), in chunks of at most MAX_CHUNK_BYTES
    of text. Each line comes with its unit key (see domain.run.units)."""
    chunks: list[rn.LogAppended] = []
    current: list[rn.LogLine] = []
    current_key: str | None = None
    size = 0

    def close() -> None:
        stage_id, job, step = split_key(current_key) if current_key is not None else (None, None, None)
        chunks.append(rn.LogAppended(stage_id=stage_id, job=job, step=step, lines=tuple(current), at=at))

    for key, line in buffer:
        n = len(line.text) + 16
        if current and (key != current_key or size + n > MAX_CHUNK_BYTES):
            close()
            current, size = [], 0
        current_key = key
        current.append(line)
        size += n
    if current:
        close()
    return chunks


class ClosingLogs:
    """The last log lines of each finished unit (the task of its `RunLog.finish`, which first lets
    a chunk being appended land) until its completion appends them in its own transaction; lines
    a completion did not take are appended on their own (`store_later`)."""

    def __init__(self) -> None:
        self._by_unit: dict[tuple[str, str, int], asyncio.Task[LastChunks | None]] = {}
        self._running: set[asyncio.Task[Any]] = set()  # every one still running, for drain()

    def add(self, run_id: str, key: str, attempt: int, closing: asyncio.Task[LastChunks | None]) -> None:
        self._by_unit[(run_id, key, attempt)] = closing
        self._track(closing)

    def get(self, run_id: str, key: str, attempt: int) -> asyncio.Task[LastChunks | None] | None:
        return self._by_unit.get((run_id, key, attempt))

    def forget(self, run_id: str, key: str, attempt: int) -> None:
        """The unit's completion appended its last lines."""
        self._by_unit.pop((run_id, key, attempt), None)

    def store_later(self, run_id: str, key: str, attempt: int) -> None:
        """The unit's completion will not append its last lines (refused, given up, cut off by a
        shutdown): append them on their own."""
        closing = self._by_unit.pop((run_id, key, attempt), None)
        if closing is None:
            return

        async def store() -> None:
            last = await settled(closing)
            if last is not None:
                await last.runlog.store(last)

        self._track(asyncio.create_task(store()))

    @property
    def pending(self) -> int:
        """How many units' last chunks are still tracked or being appended."""
        return len(self._by_unit) + len(self._running)

    async def wait(self, timeout: float) -> None:
        if self._running:
            await asyncio.wait(set(self._running), timeout=timeout)

    def _track(self, task: asyncio.Task[Any]) -> None:
        self._running.add(task)
        task.add_done_callback(self._flushed)

    def _flushed(self, task: asyncio.Task[Any]) -> None:
        self._running.discard(task)
        if not task.cancelled():
            task.exception()  # retrieved: RunLog reported what failed


async def settled(task: asyncio.Task[LastChunks | None]) -> LastChunks | None:
    """The last lines `task` left, once it ended; None whatever went wrong (a log append that
    failed for good was already reported by RunLog; the completion goes ahead regardless)."""
    with contextlib.suppress(Exception):
        return await asyncio.shield(task)
    return None
