"""The executor's periodic sweep: lost attempts, due timers, and now and then leftovers of runs
that ended elsewhere (secrets, script uids, open deployments)."""

from __future__ import annotations

import asyncio
import logging

from infra.app.commands import Commands
from infra.delivery.deliveries import Deliveries
from infra.executor.leases import LeaseStore
from infra.executor.recovery import Recovery
from infra.executor.timers import Timers
from infra.executor.uids import ScriptUids
from infra.secrets import SecretStore

log = logging.getLogger("pipelines.executor")


class Sweeper:
    def __init__(
        self,
        commands: Commands,
        *,
        executor_id: str,
        interval: float,
        lease_ttl: float,
        leases: LeaseStore | None,
        secrets: SecretStore | None,
        uids: ScriptUids | None,
        deliveries: Deliveries | None,
        recovery: Recovery | None,
        timers: Timers,
        running: set[tuple[str, str, int]],
    ) -> None:
        self.commands = commands
        self.executor_id = executor_id
        self.interval = interval
        self.lease_ttl = lease_ttl
        self.leases = leases
        self.secrets = secrets
        self.uids = uids
        self.deliveries = deliveries
        self.recovery = recovery
        self.timers = timers
        # Stage attempts this process is running right now: (run, stage, attempt).
        self._running = running
        self._purged_at = 0.0
        self._orphans_at = 0.0
        self._uids_swept_at = 0.0

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            try:
                await self.sweep_once()
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("sweep failed: %s", exc)

    async def sweep_once(self) -> None:
        """Recover stages whose executor was lost; fire due retries and approval timeouts; now and
        then, delete the secrets of runs that ended (or never got recorded)."""
        now = asyncio.get_running_loop().time()
        if self.secrets is not None and now - self._purged_at > 60:
            self._purged_at = now
            await self.secrets.purge(older_than=600)
        if self.uids is not None and now - self._uids_swept_at > 300:
            self._uids_swept_at = now
            for uid, run_id in await asyncio.to_thread(self.uids.stale):
                state, _ = await self.commands.load_run(run_id)
                if not state.exists or state.terminal:
                    await asyncio.to_thread(self.uids.drop, uid, run_id)
        if self.leases is None or self.recovery is None:
            return
        if self.deliveries is not None and now - self._orphans_at > 60:
            self._orphans_at = now
            await self.deliveries.close_orphans(older_than=self.lease_ttl)
        lost = {(lease.run_id, lease.stage_id, lease.attempt): lease for lease in self.recovery.unsettled()}
        for lease in await self.leases.claim_expired(self.executor_id, hold=self.lease_ttl):
            if (lease.run_id, lease.stage_id, lease.attempt) in self._running:
                continue  # ours after all (a slow heartbeat); the claim renewed it
            lost[(lease.run_id, lease.stage_id, lease.attempt)] = lease
        for lease in lost.values():
            try:
                await self.recovery.recover(lease)
            except Exception as exc:  # kept: the next sweep tries again
                log.warning("recovering %s of run %s failed: %s", lease.stage_id, lease.run_id, exc)
        await self.timers.fire_due()
