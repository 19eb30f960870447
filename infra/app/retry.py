"""The one command loop: load a stream, decide, append under optimistic concurrency, and on a lost
race load and decide again (a stale command becomes a clear refusal instead of an overwrite)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

from infra import trace
from infra.app.ports import EventStore
from infra.app.positions import note
from infra.store.records import Alongside, NewEvent, UniqueKey, WrongExpectedVersion

S = TypeVar("S")
E = TypeVar("E")

Keys = tuple[Sequence[UniqueKey], Sequence[UniqueKey]]


class ConcurrencyConflict(RuntimeError):
    """Still losing optimistic-concurrency races after retries (HTTP 409)."""


@dataclass(frozen=True, slots=True)
class Decided(Generic[S, E]):
    """The state a decision was made against, its stream version, and the events appended
    (none: the command had nothing to do and nothing was written)."""

    state: S
    version: int
    events: list[E]


async def load_decide_append(
    store: EventStore,
    stream_id: str,
    *,
    load: Callable[[], Awaitable[tuple[S, int]]],
    decide: Callable[[S], list[E]],
    record: Callable[[S, list[E]], list[NewEvent]],
    retries: int,
    conflict: str,
    patience: float = 0.0,
    keys: Callable[[S, list[E]], Keys] | None = None,
    before_append: Callable[[S, list[E]], Awaitable[None]] | None = None,
    lost_race: Callable[[S, list[E]], Awaitable[None]] | None = None,
    alongside: Callable[[S, list[E]], Alongside | None] | None = None,
) -> Decided[S, E]:
    """`decide` raises the domain's refusals; `keys` gives the unique keys the events claim and
    release; `before_append` runs between the decision and the append, `lost_race` undoes it when
    the append loses to another writer; `alongside` gives what the append writes in its own
    transaction besides the events (written only if it lands: nothing to undo).
    ConcurrencyConflict(`conflict`) after `retries` lost races, or, with `patience` (seconds),
    once both the retries and the patience are spent."""
    give_up = time.monotonic() + patience
    attempt = 0
    while attempt < retries or time.monotonic() < give_up:
        attempt += 1
        state, version = await load()
        trace.mark("loaded", trace.run_of(stream_id))
        new = decide(state)
        if not new:
            return Decided(state, version, [])
        claim, release = keys(state, new) if keys is not None else ((), ())
        if before_append is not None:
            await before_append(state, new)
        try:
            also = alongside(state, new) if alongside is not None else None
            if also is None:
                result = await store.append(stream_id, record(state, new), version, claim=claim, release=release)
            else:
                result = await store.append(
                    stream_id, record(state, new), version, claim=claim, release=release, alongside=also
                )
            note(result)
            trace.appended(stream_id, new)
        except WrongExpectedVersion:
            if lost_race is not None:
                await lost_race(state, new)
            if attempt >= retries:
                await asyncio.sleep(0)  # let this process's own writers finish their turn
            continue
        return Decided(state, version, new)
    raise ConcurrencyConflict(conflict)
