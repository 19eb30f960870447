"""The executor's JetStream consumer: run events and direct wake-ups become drives of their runs,
stops reach the process running the run's scripts, and messages are kept in progress and acked
when their run's driver is done."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable

import msgspec
from nats.aio.client import Client as NATS
from nats.aio.msg import Msg
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from nats.js.errors import NotFoundError

from domain import run as rn
from infra import trace
from infra.broker.bus import RUN_WAKE_QUEUE, RUN_WAKE_SUBJECT
from infra.config import Settings
from infra.executor.background import Background
from infra.executor.driver import RunDrivers
from infra.executor.leasing import UnitLeases

log = logging.getLogger("pipelines.executor")

# The run events the executor acts on: those written by others (the API's commands, the scheduler's
# triggers). The ones an executor writes itself (starts, completions, log chunks, the run's end:
# 8 of a three-stage run's 11) are not delivered at all: the driver that wrote them already acted,
# and timers and lease recovery drive the runs they touch themselves (Executor.kick). Needs
# NATS 2.10+ (`filter_subjects`).
ACTION_EVENTS: tuple[type[msgspec.Struct], ...] = (
    rn.RunTriggered,
    rn.RunApproved,
    rn.RunRejected,
    rn.RunPaused,
    rn.RunResumed,
    rn.RunCancelled,
    rn.RunStopped,
)
RUN_EVENTS_FILTERS: list[str] = [f"pipelines.v1.*.run.*.{e.__struct_config__.tag}" for e in ACTION_EVENTS]
STOP_SUBJECT = "pipelines.v1.*.run.*.run_stopped"
CONSUMER = "executor"
STREAM_VERSION = "Pipelines-Stream-Version"


class Consumer:
    def __init__(
        self, nc: NATS | None, settings: Settings, drivers: RunDrivers, leases: UnitLeases, background: Background
    ) -> None:
        self.nc = nc
        self.settings = settings
        self.drivers = drivers
        self.leases = leases
        self._background = background

    async def run(self, stop: asyncio.Event, wind_down: Callable[[], Awaitable[None]]) -> None:
        """Consume until `stop` is set; `wind_down` runs before the subscriptions end (the drivers'
        last acks still need them)."""
        assert self.nc is not None
        js = self.nc.jetstream()
        config = ConsumerConfig(
            durable_name=CONSUMER,
            filter_subjects=RUN_EVENTS_FILTERS,
            ack_policy=AckPolicy.EXPLICIT,
            deliver_policy=DeliverPolicy.ALL,
            ack_wait=self.settings.ack_wait,
            max_ack_pending=10_000,
        )
        try:
            info = await js.consumer_info(self.settings.events_stream, CONSUMER)
            # A consumer made by an earlier version heard every run event: narrow it (an update
            # of its filter; what it had delivered and not acked is still delivered).
            stale = sorted(info.config.filter_subjects or []) != sorted(RUN_EVENTS_FILTERS)
        except NotFoundError:
            stale = True
        if stale:
            try:
                await js.add_consumer(self.settings.events_stream, config)
            except Exception as exc:
                log.warning("could not set the filter of consumer %s: %s", CONSUMER, exc)
        sub = await js.pull_subscribe_bind(CONSUMER, self.settings.events_stream)
        # Every executor hears every stop, whichever of them the durable consumer gave it to:
        # only the one running the stage can kill its process group.
        stops = await self.nc.subscribe(STOP_SUBJECT, cb=self._on_stop)
        # The API's direct wake-ups (one executor of the group each): a run starts without waiting
        # for the relay's hop; the JetStream message that follows is then already known.
        wakes = await self.nc.subscribe(
            f"{RUN_WAKE_SUBJECT}.{self.settings.events_stream}.*", queue=RUN_WAKE_QUEUE, cb=self._on_wake
        )
        heartbeat = asyncio.create_task(self._heartbeat())
        try:
            while not stop.is_set():
                try:
                    msgs = await sub.fetch(256, timeout=1.0)
                except TimeoutError:
                    continue
                except Exception as exc:
                    log.warning("fetch failed: %s", exc)
                    await asyncio.sleep(0.5)
                    continue
                for msg in msgs:
                    self.on_message(msg)
        finally:
            heartbeat.cancel()
            await wind_down()
            for subscription in (sub, stops, wakes):
                with contextlib.suppress(Exception):
                    await subscription.unsubscribe()

    def on_message(self, msg: Msg) -> None:
        parts = msg.subject.split(".")
        if len(parts) != 6:
            self._background.spawn(msg.ack())
            return
        run_id, event_type = parts[4], parts[5]
        trace.mark("message", run_id, event_type)
        try:
            version = int((msg.headers or {}).get(STREAM_VERSION, "0"))
        except ValueError:
            version = 0
        if 0 < version <= self.drivers.known.get(run_id) and event_type != "run_stopped":
            # Our own event (or one we read before acting): nothing new to react to.
            self._background.spawn(msg.ack())
            return
        driver = self.drivers.kick(run_id)
        driver.messages.append(msg)
        if event_type == "run_stopped":
            self.drivers.stop_local(run_id)

    async def _on_wake(self, msg: Msg) -> None:
        run_id = msg.subject.rsplit(".", 1)[-1]
        trace.mark("woken", run_id)
        if run_id:
            self.drivers.kick(run_id)

    async def _on_stop(self, msg: Msg) -> None:
        parts = msg.subject.split(".")
        if len(parts) == 6:
            self.drivers.stop_local(parts[4])

    async def _heartbeat(self) -> None:
        # Long stages keep their messages from being redelivered to another executor, and their
        # leases from expiring.
        interval = max(min(self.settings.ack_wait, self.settings.lease_ttl) / 3, 0.2)
        while True:
            await asyncio.sleep(interval)
            try:
                await self.leases.heartbeat()
            except Exception as exc:
                log.warning("lease heartbeat failed: %s", exc)
            for driver in self.drivers.drivers():
                for msg in driver.messages:
                    with contextlib.suppress(Exception):
                        await msg.in_progress()
