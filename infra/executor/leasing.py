"""The leases of the units this executor starts: taken before a start is appended, dropped when
the append loses, taken over when another executor held the lease of a start we appended."""

from __future__ import annotations

from domain import run as rn
from domain.run.units import started_units
from infra.executor.background import Background
from infra.executor.leases import LeaseStore


class UnitLeases:
    def __init__(
        self, leases: LeaseStore | None, executor_id: str, host: str, ttl: float, background: Background
    ) -> None:
        self.store = leases
        self.executor_id = executor_id
        self.host = host
        self.ttl = ttl
        self._background = background
        # Starts whose lease another executor held when we took it (see take).
        self._contended: set[tuple[str, str, int]] = set()

    @property
    def contended(self) -> int:
        """Starts decided here whose lease another executor held when we asked for it."""
        return len(self._contended)

    @staticmethod
    def _new_attempts(state: rn.RunState, new: list[rn.RunEvent]) -> list[tuple[str, int]]:
        return [(unit.key, unit.attempt) for unit in started_units(state, new)]

    async def take(self, state: rn.RunState, new: list[rn.RunEvent]) -> None:
        # Taken before the StageStarted append commits: a started stage always has a lease, so an
        # executor that dies right after the commit is still noticed.
        if self.store is None:
            return
        for key, attempt in self._new_attempts(state, new):
            taken = await self.store.acquire(state.run_id, key, attempt, self.executor_id, self.host, self.ttl)
            if not taken:  # another executor decided the same start; whoever appends it keeps it
                self._contended.add((state.run_id, key, attempt))

    async def drop(self, state: rn.RunState, new: list[rn.RunEvent]) -> None:
        if self.store is None:
            return
        for key, attempt in self._new_attempts(state, new):
            self._contended.discard((state.run_id, key, attempt))
            await self.store.release(state.run_id, key, attempt, self.executor_id)

    async def own(self, state: rn.RunState, new: list[rn.RunEvent]) -> None:
        """After our append started units: a lease another executor took for the same start (it
        lost the race) becomes ours."""
        if self.store is None or not self._contended:
            return
        for key, attempt in self._new_attempts(state, new):
            if (state.run_id, key, attempt) in self._contended:
                self._contended.discard((state.run_id, key, attempt))
                await self.store.take_over(state.run_id, key, attempt, self.executor_id, self.host, self.ttl)

    def forget(self, run_id: str) -> None:
        """Forget the run's contended starts: the command that found them failed, and the next
        one takes their leases again."""
        self._contended = {c for c in self._contended if c[0] != run_id}

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
