"""The leases of the units this executor starts: written in the transaction of the append that
starts them (so a started unit always has one, and an append that loses its race leaves none
behind), dropped in the transaction of the append that records their outcome."""

from __future__ import annotations

from collections.abc import Sequence

from domain import run as rn
from domain.run.units import started_units
from infra.executor.background import Background
from infra.executor.leases import LeaseStore
from infra.store.records import Alongside, LeaseHolder, NewEvent, UnitLease


class UnitLeases:
    def __init__(
        self, leases: LeaseStore | None, executor_id: str, host: str, ttl: float, background: Background
    ) -> None:
        self.store = leases
        self.executor_id = executor_id
        self.host = host
        self.ttl = ttl
        self._background = background

    def alongside(
        self,
        state: rn.RunState,
        new: list[rn.RunEvent],
        *,
        ended: tuple[str, int] | None = None,
        before: Sequence[tuple[str, Sequence[NewEvent]]] = (),
    ) -> Alongside | None:
        """What the append of `new` (decided against `state`) writes besides: the leases of the
        units it starts (taken over from anyone holding them: whoever appends a start runs it),
        the lease of the unit whose outcome it records (`ended`: its key and attempt), and the
        events of other streams that go ahead of it (`before`). None: nothing."""
        take: tuple[UnitLease, ...] = ()
        release: tuple[UnitLease, ...] = ()
        if self.store is not None:
            take = tuple(UnitLease(state.run_id, u.key, u.attempt) for u in started_units(state, new))
            if ended is not None:
                release = (UnitLease(state.run_id, *ended),)
        also = Alongside(
            before=tuple((stream, tuple(events)) for stream, events in before),
            take=take,
            release=release,
            holder=LeaseHolder(self.executor_id, self.host, self.ttl) if take else None,
        )
        return None if also.empty else also

    def release_later(self, run_id: str, key: str, attempt: int) -> None:
        # Off the critical path: a lease left behind is found expired and dropped by the sweep
        # (its unit is no longer running).
        if self.store is not None:
            self._background.spawn(self.store.release(run_id, key, attempt))

    async def heartbeat(self) -> None:
        if self.store is not None:
            await self.store.heartbeat(self.executor_id, self.ttl)

    async def record_pgid(self, run_id: str, key: str, attempt: int, pgid: int) -> None:
        if self.store is not None:
            await self.store.set_pgid(run_id, key, attempt, pgid)
