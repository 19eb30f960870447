"""Stage attempts whose executor was lost (its lease expired): kill what is left of them on this
host and record them as failed, so their retry policy decides what comes next."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import Callable
from pathlib import Path

from domain import run as rn
from domain.errors import Refused
from domain.run.units import split_key, unit_status
from infra.app.commands import Commands
from infra.delivery.deliveries import Deliveries
from infra.executor.leases import Lease, LeaseStore
from infra.executor.scripts import ScriptOutcome
from infra.executor.units import completion


class Recovery:
    def __init__(
        self,
        commands: Commands,
        leases: LeaseStore,
        deliveries: Deliveries | None,
        host: str,
        kill_grace: float,
        kick: Callable[[str], object],
    ) -> None:
        self.commands = commands
        self.leases = leases
        self.deliveries = deliveries
        self.host = host
        self.kill_grace = kill_grace
        self._kick = kick
        self._unsettled: dict[tuple[str, str, int], Lease] = {}

    def unsettled(self) -> list[Lease]:
        """Lost attempts whose recovery failed here (the store was unavailable): still leased by
        this executor, to be recovered again by the next sweep."""
        return list(self._unsettled.values())

    async def recover(self, lease: Lease) -> None:
        """A stage attempt whose executor stopped renewing its lease: make sure nothing of it still
        runs here, record the attempt as failed (its retry policy decides what next), go on.

        The lease is dropped only once that is done: an attempt left `running` without a lease
        would never be looked at again. Until then this executor holds (and renews) it and tries
        again; if it dies meanwhile, the lease expires and another executor recovers the attempt."""
        key = (lease.run_id, lease.stage_id, lease.attempt)
        try:
            await self._settle(lease)
            await self.leases.release(lease.run_id, lease.stage_id, lease.attempt)
        except BaseException:
            self._unsettled[key] = lease
            raise
        self._unsettled.pop(key, None)
        self._kick(lease.run_id)

    async def _settle(self, lease: Lease) -> None:
        if lease.host == self.host and lease.pgid:
            await kill_orphan(lease.pgid, lease.run_id, self.kill_grace)
        state, _ = await self.commands.load_run(lease.run_id)
        stage_id, job, step = split_key(lease.stage_id)
        if state.exists and unit_status(state, lease.stage_id) == ("running", lease.attempt):
            what = f"stage {stage_id}" if job is None else f"step {step} of job {job}"
            message = (
                f"executor lost: the executor running {what} (attempt {lease.attempt}) "
                f"on {lease.host} stopped renewing its lease"
            )
            await self.commands.append_logs(
                state,
                [
                    rn.LogAppended(
                        stage_id=stage_id,
                        job=job,
                        step=step,
                        lines=(rn.LogLine("system", message),),
                        at=self.commands.now(),
                    )
                ],
            )
            lost = ScriptOutcome(exit_code=None, error=message)
            # Only the outcome: what comes next is started by the driver that the kick below
            # runs (a unit started here would have a lease and nobody working on it).
            with contextlib.suppress(Refused):
                await self.commands.run_command(
                    lease.run_id, lambda at: completion(stage_id, job, step, lease.attempt, lost, at, advance=False)
                )
            # A deployment the lost executor was making is closed too (after the stage is
            # recorded, so a failure here still leaves the stage failed).
            # (A deploy step's deployment is closed by the orphan sweep once its stage ends: the
            # stage's other deploy steps may still be running elsewhere.)
            if self.deliveries is not None and job is None:
                await self.deliveries.abandon(lease.run_id, stage_id, message, attempt=lease.attempt)


async def kill_orphan(pgid: int, run_id: str, grace: float) -> None:
    """Kill a lost executor's script group, if it is still there and still that run's script."""
    try:
        environ = Path(f"/proc/{pgid}/environ").read_bytes().split(b"\0")
    except OSError:
        environ = []
    if environ and f"RUN_ID={run_id}".encode() not in environ:
        return  # the pid was reused by something else: not ours to kill
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, signal.SIGKILL)
    deadline = asyncio.get_running_loop().time() + max(grace, 2.0)
    while asyncio.get_running_loop().time() < deadline:
        try:
            os.killpg(pgid, 0)
        except (ProcessLookupError, PermissionError):
            return
        await asyncio.sleep(0.02)
