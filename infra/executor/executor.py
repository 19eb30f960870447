"""The executor: drives runs from their events and runs their stages for real. This module only
composes the parts (consumer, driver, units, leasing, recovery, timers, sweep, runlog)."""

from __future__ import annotations

import asyncio
import socket
import uuid

from nats.aio.client import Client as NATS
from nats.aio.msg import Msg

from domain import run as rn
from infra.agent.dispatch import Agents
from infra.agent.registry import AgentStore
from infra.app.commands import Commands
from infra.config import Settings
from infra.delivery.deliveries import Deliveries
from infra.executor.background import Background
from infra.executor.consumer import Consumer
from infra.executor.driver import RunDriver, RunDrivers
from infra.executor.leases import Lease, LeaseStore
from infra.executor.leasing import UnitLeases
from infra.executor.recovery import Recovery
from infra.executor.runlog import ClosingLogs
from infra.executor.sweep import Sweeper
from infra.executor.timers import Timers
from infra.executor.units import UnitRunner
from infra.secrets import SecretStore
from infra.store.postgres import PostgresEventStore

__all__ = ["Executor", "RunDriver"]


class Executor:
    def __init__(
        self,
        commands: Commands,
        settings: Settings,
        nc: NATS | None = None,
        leases: LeaseStore | None = None,
        secrets: SecretStore | None = None,
    ) -> None:
        self.commands = commands
        self.settings = settings
        self.nc = nc
        self.leases = leases
        self.secrets = secrets
        self.executor_id = uuid.uuid4().hex
        self.host = socket.gethostname()
        self.workdir = settings.work_root
        # Deploy and notify stages need the registry's tables (PostgreSQL).
        self.deliveries: Deliveries | None = (
            Deliveries(commands, commands.store.pool, settings.database_url, nc, sealer=secrets, settings=settings)
            if isinstance(commands.store, PostgresEventStore)
            else None
        )
        background = Background()
        self.closing_logs = ClosingLogs()
        self.unit_leases = unit_leases = UnitLeases(leases, self.executor_id, self.host, settings.lease_ttl, background)
        self.units = UnitRunner(
            commands, settings, nc, unit_leases, secrets, self.deliveries, self.closing_logs, background
        )
        self.uids = self.units.uids
        # Agents on other hosts (infra/agent): reached over the broker, known from the store.
        self.agents: Agents | None = (
            Agents(
                nc,
                self.executor_id,
                AgentStore(commands.store.pool),
                lease_ttl=settings.lease_ttl,
                kill_grace=settings.kill_grace,
            )
            if nc is not None and isinstance(commands.store, PostgresEventStore)
            else None
        )
        self.units.agents = self.agents
        self.timers = Timers(commands, leases, self.kick, hold=max(30.0, settings.lease_ttl))
        self.drivers = RunDrivers(commands, self.units, unit_leases, self.timers, self.closing_logs, background)
        self.recovery = (
            None
            if leases is None
            else Recovery(commands, leases, self.deliveries, self.host, settings.kill_grace, self.kick)
        )
        self.sweeper = Sweeper(
            commands,
            executor_id=self.executor_id,
            interval=settings.sweep_interval,
            lease_ttl=settings.lease_ttl,
            leases=leases,
            secrets=secrets,
            uids=self.uids,
            deliveries=self.deliveries,
            recovery=self.recovery,
            timers=self.timers,
            running=self.drivers.running,
        )
        self.consumer = Consumer(nc, settings, self.drivers, unit_leases, background)

    async def run(self, stop: asyncio.Event) -> None:
        if self.agents is not None:
            await self.agents.start()
        sweeper = asyncio.create_task(self.sweeper.run())

        async def wind_down() -> None:
            sweeper.cancel()
            await self.drain()

        try:
            await self.consumer.run(stop, wind_down)
        finally:
            sweeper.cancel()
            if self.agents is not None:
                await self.agents.stop()
            await self.units.close()

    def on_message(self, msg: Msg) -> None:
        self.consumer.on_message(msg)

    def kick(self, run_id: str) -> RunDriver:
        """Make sure the run is being driven; a run already being driven looks again when done."""
        return self.drivers.kick(run_id)

    def stop_local(self, run_id: str) -> None:
        """Kill the run's script if this process runs it (TERM, then KILL after the grace period)."""
        self.drivers.stop_local(run_id)

    async def drive_once(self, run_id: str, driver: RunDriver | None = None) -> rn.RunState:
        return await self.drivers.drive_once(run_id, driver)

    async def sweep_once(self) -> None:
        await self.sweeper.sweep_once()

    async def recover(self, lease: Lease) -> None:
        assert self.recovery is not None
        await self.recovery.recover(lease)

    async def drain(self) -> None:
        """Stop driving runs (what was running is recorded as such) and end what this process
        holds for them on this host (their sandboxes: see RunSandboxes.aclose)."""
        await self.drivers.drain()
        await self.units.close()
