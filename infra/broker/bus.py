"""NATS: connection, subject naming, the event stream, and wake-up pokes."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from dataclasses import replace
from pathlib import Path

import nats
from nats.aio.client import Client as NATS
from nats.js.api import DiscardPolicy, RetentionPolicy, StorageType, StreamConfig
from nats.js.errors import NotFoundError

from infra.broker.creds import connect_options
from infra.store.records import RecordedEvent

log = logging.getLogger(__name__)

EVENTS_SUBJECTS = "pipelines.v1.>"
# Published (core NATS, no payload) after every committed append so that the relay reads the
# feed at once instead of waiting for its next poll. Never part of the event stream.
APPENDED_SUBJECT = "pipelines.internal.appended"
# `pipelines.internal.runs.<events stream>.<run id>`: the API tells the executors of its system (one
# of them, a queue group) that a run changed, so that the executor need not wait for the relay's
# republish of the event (which still arrives, and is then acked at once as already known).
RUN_WAKE_SUBJECT = "pipelines.internal.runs"
RUN_WAKE_QUEUE = "executors"
_BAD = re.compile(r"[^A-Za-z0-9_-]")


def token(name: str | None) -> str:
    """A subject token for a name: `_` for none; a leading `#` dropped; other characters `_`."""
    if not name:
        return "_"
    if name.startswith("#"):
        name = name[1:]
    return _BAD.sub("_", name) or "_"


def event_subject(rec: RecordedEvent) -> str:
    aggregate, ident = rec.stream_id.split("-", 1)
    return f"pipelines.v1.{token(rec.org)}.{aggregate}.{token(ident)}.{token(rec.event_type)}"


def log_subject(org: str | None, run_id: str) -> str:
    return f"pipelines.logs.v1.{token(org)}.{token(run_id)}"


def notify_subject(org: str | None, channel: str) -> str:
    return f"pipelines.notify.v1.{token(org)}.{token(channel)}"


async def connect(url: str, name: str, creds: Path | None = None) -> NATS:
    """Connect as the user of credential file `creds` (infra/broker/creds.py; none: as no one, which
    only a server without authorization accepts)."""

    async def on_error(exc: Exception) -> None:
        log.warning("nats: %s", exc)

    nc = await nats.connect(
        # A comma-separated list (the nodes of a cluster): nats-py takes a list, a string is one URL.
        [u.strip() for u in url.split(",") if u.strip()],
        name=name,
        max_reconnect_attempts=-1,
        reconnect_time_wait=0.5,
        error_cb=on_error,
        connect_timeout=5,
        **connect_options(creds),
    )
    return nc


async def ensure_events_stream(nc: NATS, stream: str, replicas: int = 1) -> None:
    """Create the events stream with `replicas` copies (a cluster's nodes), or raise an existing one's
    copies to `replicas` (never lower them: another process may run with an older setting)."""
    js = nc.jetstream()
    config = StreamConfig(
        name=stream,
        subjects=[EVENTS_SUBJECTS],
        retention=RetentionPolicy.LIMITS,
        storage=StorageType.FILE,
        discard=DiscardPolicy.OLD,
        duplicate_window=120.0,
        num_replicas=replicas,
    )
    try:
        info = await js.stream_info(stream)
        if (info.config.num_replicas or 1) < replicas:
            log.info("events stream %s: %s -> %d replicas", stream, info.config.num_replicas, replicas)
            await js.update_stream(replace(info.config, num_replicas=replicas))
        return
    except NotFoundError:
        pass
    try:
        await js.add_stream(config)
    except Exception as exc:
        # Another process may have created it meanwhile; anything else (say, another stream
        # already owning `pipelines.v1.>` on this server) must be reported, not hidden.
        try:
            await js.stream_info(stream)
        except NotFoundError:
            raise RuntimeError(f"cannot create JetStream stream {stream} on {EVENTS_SUBJECTS}: {exc}") from exc


class Poker:
    """Coalesces wake-ups: many `poke()` calls while one publish is pending send one message."""

    def __init__(self, nc: NATS, subject: str = APPENDED_SUBJECT) -> None:
        self._nc = nc
        self._subject = subject
        self._wanted = asyncio.Event()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="poker")

    def poke(self) -> None:
        self._wanted.set()

    async def _run(self) -> None:
        while True:
            await self._wanted.wait()
            self._wanted.clear()
            try:
                await self._nc.publish(self._subject, b"")
            except Exception as exc:  # the poll fallback covers a lost poke
                log.debug("poke failed: %s", exc)

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task


class RunWaker:
    """Publishes run wake-ups without making the caller wait; best effort (the event on JetStream
    is the guarantee)."""

    def __init__(self, nc: NATS, stream: str) -> None:
        self._nc = nc
        self._prefix = f"{RUN_WAKE_SUBJECT}.{stream}"
        self._tasks: set[asyncio.Task[None]] = set()

    def wake(self, run_id: str) -> None:
        task = asyncio.get_running_loop().create_task(self._publish(run_id))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _publish(self, run_id: str) -> None:
        try:
            await self._nc.publish(f"{self._prefix}.{run_id}", b"")
        except Exception:  # best effort: the relay's message still wakes the executor
            pass
