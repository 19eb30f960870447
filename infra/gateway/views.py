"""Each event's frames, built once from per-run and per-pipeline histories kept in memory."""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from domain import events as ev
from domain import pipeline as pl
from domain import run as rn
from infra.app.ports import EventStore
from infra.gateway import frames as fr
from infra.gateway.cache import FrameCache, Lru
from infra.metrics import events_set_aside
from infra.setaside import GATEWAY, describe, is_poison
from infra.store.records import FEED_START, FeedCursor, RecordedEvent

log = logging.getLogger("pipelines.gateway")


@dataclass(eq=False)
class RunHistory:
    """What the gateway has read of one run: its events, states after each, and its log chunks."""

    positions: list[int] = field(default_factory=list)  # of its events, by stream version
    states: list[rn.RunState] = field(default_factory=list)
    # (feed cursor, chunk) in cursor order; every chunk at or before `logs_through` is here.
    logs: list[tuple[FeedCursor, rn.LogAppended]] = field(default_factory=list)
    log_version: int = 0
    logs_through: FeedCursor = FEED_START
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    # Kept up to date from the live messages (see Views.observe): holds every event and chunk of
    # the run up to the last live message the gateway handled, so its live frames need no read.
    live: bool = False


@dataclass(eq=False)
class PipelineHistory:
    positions: list[int] = field(default_factory=list)
    states: list[pl.PipelineState] = field(default_factory=list)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


@dataclass(frozen=True, slots=True)
class Owner:
    """Who an aggregate belongs to (never changes)."""

    pipeline_id: str | None
    org: str | None


class Views:
    """Builds each event's frames once, from incrementally loaded, cached histories.

    Frames are built once per event and shared by every subscriber (a bounded cache keyed by
    position); the run view "as of an event" folds the run's stream up to that event's version
    with the log chunks whose feed cursor is at or before the event's, from a per-run history that
    only reads what it has not seen (or, for a watched run, is kept live from the messages).
    """

    def __init__(
        self,
        store: EventStore,
        *,
        runs: int = 64,
        pipelines: int = 256,
        frame_bytes: int = 64 << 20,
        set_aside: Callable[[RecordedEvent, Exception], Awaitable[None]] | None = None,
    ):
        self.store = store
        # Records an event that cannot be framed (infra/setaside.py); None: logged and counted only.
        self.set_aside = set_aside
        self._runs: Lru[str, RunHistory] = Lru(runs)
        self._pipelines: Lru[str, PipelineHistory] = Lru(pipelines)
        self._owners: Lru[str, Owner] = Lru(50_000)
        self._frames = FrameCache(frame_bytes)

    async def owner(self, stream_id: str) -> Owner | None:
        """The pipeline and organization of a `run-`, `runlog-` or `pipeline-` stream (None: unknown)."""
        kind, ident = ev.aggregate_of(stream_id)
        key = ("pipeline-" if kind == "pipeline" else "run-") + ident
        cached = self._owners.get_fresh(key)
        if cached is not None:
            return cached
        records = await self.store.read_stream(key, 0)
        if not records:
            return None
        first = records[0]
        owner = Owner(pipeline_id=first.pipeline_id, org=first.org)
        self._owners.put(key, owner)
        return owner

    async def frames(self, rec: RecordedEvent, *, live: bool = False) -> tuple[bytes, ...]:
        """The frames of `rec`; `live` when it is the live message being dispatched now."""
        cached = self._frames.get(rec.position)
        if cached is not None:
            return cached
        frames: tuple[bytes, ...]
        try:
            kind, ident = ev.aggregate_of(rec.stream_id)
            if kind == "run":
                frames = (await self._run_frame(ident, rec, live),)
            elif kind == "runlog":
                frames = fr.log_frames(ident, rec)
            elif kind == "pipeline":
                frames = (await self._pipeline_frame(ident, rec),)
            else:
                frames = ()
        except Exception as exc:
            if not is_poison(exc):
                raise
            # An event that cannot be framed is set aside (no frame), never in the way of the ones after it.
            frames = ()
            if self.set_aside is not None:
                await self.set_aside(rec, exc)
            else:
                log.error("set aside the %s event at position %d: %s", rec.event_type, rec.position, describe(exc))
                events_set_aside.labels(GATEWAY).inc()
        self._frames.put(rec.position, frames)
        return frames

    def observe(self, rec: RecordedEvent, watched: Callable[[Owner], bool]) -> None:
        """Bring a cached run history up to date from a live message itself, so that the run's
        next frame needs no read of the store. Live messages come in feed order, one at a time:
        a history that held everything of its run up to the last one holds everything up to this
        one once this message is added. Whatever breaks that (a history being read meanwhile, a gap
        in versions, an event the relay sent as a stub) makes the history read the store again at
        its next live frame (`_run_frame`). A new run gets a history from its first event only
        when someone `watched` its runs (a subscription to its pipeline or organization): nobody
        else's run costs memory or pushes a watched run's history out of the cache."""
        kind, ident = ev.aggregate_of(rec.stream_id)
        if kind not in ("run", "runlog"):
            return
        hist = self._runs.get_fresh(ident)
        try:
            if hist is None and kind == "run" and rec.stream_version == 1:
                # A new run: its first event says whose it is, and it has no log yet.
                hist = self._start_history(ident, rec, watched)
            if hist is None or not hist.live:
                return
            hist.live = self._apply_live(hist, kind, rec)
        except Exception:  # never in the way of the dispatch: the next frame reads the store
            log.exception("keeping run %s's history from position %d failed", ident, rec.position)
            if hist is not None:
                hist.live = False
            return
        if hist.live and rec.cursor > hist.logs_through:
            hist.logs_through = rec.cursor

    def _start_history(self, run_id: str, rec: RecordedEvent, watched: Callable[[Owner], bool]) -> RunHistory | None:
        try:
            e = rec.event
        except Exception:
            return None
        if not isinstance(e, rn.RunTriggered):
            return None
        owner = Owner(pipeline_id=e.pipeline_id, org=e.organization_id)
        self._owners.put(f"run-{run_id}", owner)
        if not watched(owner):
            return None
        # Its first event is in it already (observe then finds it known: no second decode).
        hist = RunHistory(positions=[rec.position], states=[rn.evolve(rn.initial_state, e)], live=True)
        self._runs.put(run_id, hist)
        return hist

    @staticmethod
    def _apply_live(hist: RunHistory, kind: str, rec: RecordedEvent) -> bool:
        if hist.lock.locked():
            return False
        known = hist.log_version if kind == "runlog" else len(hist.positions)
        if 0 < rec.stream_version <= known:  # a catch-up read it from the store already
            return kind == "runlog" or hist.positions[rec.stream_version - 1] == rec.position
        if rec.stream_version != known + 1:
            return False
        try:
            e = rec.event
        except Exception:  # a stub for an oversized event
            return False
        if kind == "runlog":
            if not isinstance(e, rn.LogAppended):
                return False
            # In feed order, as a read from the store sorts them: chunks of parallel steps can
            # commit in another order than their versions (a catch-up may have read a later one).
            bisect.insort(hist.logs, (rec.cursor, e), key=lambda p: p[0])
            hist.log_version = rec.stream_version
            return True
        if not ev.is_run_event(e) or isinstance(e, rn.LogAppended):
            return False
        hist.states.append(rn.evolve(hist.states[-1] if hist.states else rn.initial_state, e))
        hist.positions.append(rec.position)
        return True

    @staticmethod
    def _index(positions: list[int], rec: RecordedEvent) -> int | None:
        if 0 < rec.stream_version <= len(positions) and positions[rec.stream_version - 1] == rec.position:
            return rec.stream_version - 1
        with contextlib.suppress(ValueError):
            return positions.index(rec.position)
        return None

    async def _run_frame(self, run_id: str, rec: RecordedEvent, live: bool = False) -> bytes:
        hist = self._runs.get_fresh(run_id)
        if hist is None:
            hist = RunHistory()
            self._runs.put(run_id, hist)
        async with hist.lock:
            i = self._index(hist.positions, rec)
            if i is None:
                more = await self.store.read_stream(ev.run_stream(run_id), len(hist.positions))
                state = hist.states[-1] if hist.states else rn.initial_state
                for r in more:
                    e = r.event
                    assert ev.is_run_event(e)
                    assert not isinstance(e, rn.LogAppended)
                    state = rn.evolve(state, e)
                    hist.positions.append(r.position)
                    hist.states.append(state)
                i = self._index(hist.positions, rec)
                if i is None:
                    raise LookupError(f"event {rec.position} is not in {rec.stream_id}")
            if rec.cursor > hist.logs_through:
                # Every chunk at or before this (committed, below-horizon) event has committed.
                for r in await self.store.read_stream(ev.run_log_stream(run_id), hist.log_version):
                    e = r.event
                    if isinstance(e, rn.LogAppended):
                        hist.logs.append((r.cursor, e))
                    hist.log_version = r.stream_version
                hist.logs.sort(key=lambda p: p[0])
                hist.logs_through = rec.cursor
            if live:
                # Everything up to this, the last live message, is here: from now on the live
                # messages themselves keep the history up to date.
                hist.live = True
            state = hist.states[i]
            logs = [chunk for cursor, chunk in hist.logs if cursor <= rec.cursor]
        return fr.run_frame(state, logs, rec.cursor)

    async def _pipeline_frame(self, pipeline_id: str, rec: RecordedEvent) -> bytes:
        hist = self._pipelines.get_fresh(pipeline_id)
        if hist is None:
            hist = PipelineHistory()
            self._pipelines.put(pipeline_id, hist)
        async with hist.lock:
            i = self._index(hist.positions, rec)
            if i is None:
                more = await self.store.read_stream(ev.pipeline_stream(pipeline_id), len(hist.positions))
                state = hist.states[-1] if hist.states else pl.initial_state
                for r in more:
                    e = r.event
                    assert ev.is_pipeline_event(e)
                    state = pl.evolve(state, e)
                    hist.positions.append(r.position)
                    hist.states.append(state)
                i = self._index(hist.positions, rec)
                if i is None:
                    raise LookupError(f"event {rec.position} is not in {rec.stream_id}")
            state = hist.states[i]
        return fr.pipeline_frame(state, rec.cursor)
