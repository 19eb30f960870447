"""A stopping executor ends every sandbox it started (each run's, and the spare one started ahead
of need), without waiting for a spare to become ready: none of its processes is left behind. Root
only, as test_sandbox (a stack of its own: one at a time on the shared broker)."""

from __future__ import annotations

from pathlib import Path

import pytest

from infra.executor.sandbox import LABEL_VARIABLE, unavailable
from tests.integration.system import eventually
from tests.integration.test_sandbox import host_processes, pipeline, sandboxed_system

_why = unavailable()
pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(_why is not None, reason=f"the script sandbox cannot run here: {_why}"),
]


def holders_of(work: Path) -> list[int]:
    """This work directory's sandbox holders (unshare and PID 1 of each run's namespace), by the
    label in their environment: other executors of the host (other tests) have their own."""
    label = f"{LABEL_VARIABLE}={work.absolute()}".encode()
    return [pid for pid, (_, env) in host_processes().items() if label in env.split(b"\0")]


async def test_a_stopped_executor_leaves_no_sandbox_process_behind(
    database_url: str, nats_url: str, tmp_path_factory: pytest.TempPathFactory
) -> None:
    async with sandboxed_system(database_url, nats_url, tmp_path_factory.mktemp("data")) as system:
        work = system.settings.work_root
        spec = {"jobs": [{"name": "hold", "steps": [{"name": "s", "run": "sleep 60"}]}]}
        p = await pipeline(system, spec)
        r = await system.client.post(f"/api/v1/pipelines/{p['id']}/trigger", headers=system.headers())
        assert r.status_code == 201, r.text
        run_id = r.json()["id"]

        async def sleeping_and_a_spare_ready() -> bool:
            sleeping = any(
                cmd == b"sleep\x0060\x00" and f"RUN_ID={run_id}".encode() in env
                for cmd, env in host_processes().values()
            )
            # The run's holder and the spare started for the next run: two unshare, two PID 1.
            return sleeping and len(holders_of(work)) >= 4

        await eventually(sleeping_and_a_spare_ready, what="the run's step to sleep and a spare sandbox to wait")
    # The executor has stopped (the run goes on elsewhere or after a restart): nothing of it is left.
    await eventually(lambda: _none(holders_of(work)), timeout=10, what="the executor's sandboxes to end")
    assert not any(f"RUN_ID={run_id}".encode() in env for _, env in host_processes().values())


async def _none(found: list[int]) -> bool:
    return not found
