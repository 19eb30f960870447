"""Durable run timers: a due retry, and the timeout of an approval gate a run waits at."""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Callable
from datetime import datetime, timedelta

from domain import run as rn
from domain.errors import NotFound, Refused
from domain.run.units import split_key, unit_key
from infra.app.commands import Commands
from infra.executor.leases import LeaseStore

log = logging.getLogger("pipelines.executor")

# A timer whose action failed (the store briefly unavailable) fires again after this many seconds.
RETRY_AFTER = 1.0


class Timers:
    def __init__(
        self, commands: Commands, leases: LeaseStore | None, kick: Callable[[str], object], hold: float
    ) -> None:
        self.commands = commands
        self.leases = leases
        self._kick = kick
        self._hold = hold

    async def schedule(self, state: rn.RunState) -> None:
        """The run's next retry, and the timeout of each gate it waits at."""
        if self.leases is None:
            return
        retry_at = state.next_retry_at
        if retry_at is not None:
            await self.leases.schedule(state.run_id, "retry", "next", retry_at)
        if state.status != "waiting_approval":
            return
        for gate in state.open_gates:
            if gate.started_at is None:
                continue
            if gate.job is None or gate.step is None:
                timeout = state.stage(gate.stage_id).timeout
            else:
                timeout = state.step(gate.stage_id, gate.job, gate.step).timeout
            if timeout is not None:
                await self.leases.schedule(
                    state.run_id,
                    "approval",
                    unit_key(gate.stage_id, gate.job, gate.step),
                    gate.started_at + timedelta(seconds=timeout),
                )

    async def fire_due(self) -> None:
        """Expire the approvals whose timeout is due, and drive the runs of due timers."""
        if self.leases is None:
            return
        for timer in await self.leases.claim_due(hold=self._hold):
            try:
                if timer.kind == "approval":
                    # A refusal is definitive (the gate was answered, the run ended): done.
                    with contextlib.suppress(Refused, NotFound):
                        await self.commands.run_command(timer.run_id, functools.partial(_expire, timer.key))
            except Exception as exc:
                # Not done: the timer fires again soon (or, if even that cannot be written, once
                # the claim's hold is over), never lost with the run parked at its gate.
                log.warning("run %s: %s timer %s failed, trying again: %s", timer.run_id, timer.kind, timer.key, exc)
                with contextlib.suppress(Exception):
                    await self.leases.schedule(timer.run_id, timer.kind, timer.key, self._again())
                continue
            # The expiry's event is one this process knows: drive the run from here.
            self._kick(timer.run_id)
            await self.leases.done(timer)

    def _again(self) -> datetime:
        return self.commands.now() + timedelta(seconds=RETRY_AFTER)


def _expire(key: str, at: datetime) -> rn.ExpireApproval:
    stage_id, job, step = split_key(key)
    return rn.ExpireApproval(stage_id=stage_id, job=job, step=step, at=at)
