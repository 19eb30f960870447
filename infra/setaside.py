"""Poison events: one a consumer cannot handle is set aside (recorded with its error, counted) so
that everything after it goes on. Shared by the projector, the relay and the gateway."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import msgspec
import psycopg
from psycopg_pool import AsyncConnectionPool

from infra.metrics import events_set_aside
from infra.store.records import RecordedEvent

log = logging.getLogger("pipelines.setaside")

PROJECTOR = "projector"
RELAY = "relay"
GATEWAY = "gateway"


@dataclass(frozen=True, slots=True)
class SetAside:
    consumer: str
    position: int
    event_id: str
    event_type: str
    error: str
    at: datetime

    @property
    def reason(self) -> str:
        return (
            f"{self.consumer} set aside the {self.event_type} event at position {self.position} "
            f"({self.event_id}): {self.error}"
        )


def is_poison(exc: BaseException) -> bool:
    """Whether `exc` is the event's own fault (it fails the same way every time), not the
    database's or the network's (then the consumer retries instead of skipping the event)."""
    # Not ProgrammingError and the like: a missing table would set every event aside.
    if isinstance(exc, psycopg.DataError | psycopg.IntegrityError):
        return True
    if isinstance(exc, psycopg.Error | OSError | TimeoutError):
        return False
    return isinstance(exc, Exception)


def describe(exc: BaseException) -> str:
    # NUL cannot be stored in a text column: the error may quote the very text that failed.
    text = f"{type(exc).__name__}: {exc}".replace("\x00", "\\u0000")
    return text[:1000]


async def record(conn: psycopg.AsyncConnection[Any], consumer: str, rec: RecordedEvent, exc: BaseException) -> None:
    """Record `rec` as set aside by `consumer`, in the caller's transaction."""
    error = describe(exc)
    log.error("%s: set aside the %s event at position %d: %s", consumer, rec.event_type, rec.position, error)
    cur = await conn.execute(
        "INSERT INTO poison_events (consumer, position, event_id, event_type, error) VALUES (%s, %s, %s, %s, %s) "
        "ON CONFLICT (consumer, event_id) DO NOTHING RETURNING 1",
        (consumer, rec.position, rec.event_id, rec.event_type.replace("\x00", ""), error),
    )
    if await cur.fetchone() is not None:
        events_set_aside.labels(consumer).inc()


async def set_aside(pool: AsyncConnectionPool, consumer: str, rec: RecordedEvent, exc: BaseException) -> None:
    async with pool.connection() as conn:
        await record(conn, consumer, rec, exc)


async def forget(conn: psycopg.AsyncConnection[Any], consumer: str) -> None:
    """Forget what `consumer` set aside (a rebuild sets aside again what still fails)."""
    await conn.execute("DELETE FROM poison_events WHERE consumer = %s", (consumer,))


async def list_set_aside(pool: AsyncConnectionPool, limit: int = 20) -> list[SetAside]:
    """The most recently set aside events, newest first."""
    async with pool.connection() as conn:
        cur = await conn.execute(
            "SELECT consumer, position, event_id::text, event_type, error, at FROM poison_events "
            "ORDER BY at DESC, position DESC LIMIT %s",
            (limit,),
        )
        return [SetAside(*row) for row in await cur.fetchall()]


def report(items: list[SetAside]) -> dict[str, Any]:
    """What /readyz and `--rebuild` say about set-aside events."""
    return {"status": "degraded", "reasons": [i.reason for i in items]}


def report_json(items: list[SetAside]) -> str:
    return msgspec.json.encode(report(items)).decode()
