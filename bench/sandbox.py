"""What the script sandbox costs a stage: runs of one stage of three short steps through the
executor's own script runner, interleaved so that each variant sees the same load:

- `unsandboxed`: as before the sandbox existed (the run's uid through setpriv, one spawn per step);
- `sandboxed`: as shipped: the run's sandbox and its runner taken at its first step, each step
  started by the runner (a fork and setsid inside the sandbox); also with no network;
- `sandboxed_per_step`: the sandbox entered by each step (nsenter + setpriv per step), as before
  runners, for comparison.

Ending the run's sandbox happens when the run has ended, outside the figures."""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

from bench.stats import summary_ms
from infra.executor.sandbox import RunSandboxes, Sandbox, private_dir_of, private_root_of, unavailable
from infra.executor.scripts import ScriptRun, clean_env, watch_children_with_pidfds

STEPS = ("true", "echo built > out.txt", "test -s out.txt")
# A uid of the default per-run range (infra.config.default_script_uids), as a run would get.
UID = 299_999


async def _stage(workdir: Path, sandbox: RunSandboxes | None, user: int | None) -> None:
    env = clean_env(workdir, {"RUN_ID": "bench"})
    for command in STEPS:
        outcome = await ScriptRun(kill_grace=1).run(
            command, workdir=workdir, env=env, timeout=30, on_line=lambda s, t: None, user=user, sandbox=sandbox
        )
        if not outcome.succeeded:
            raise RuntimeError(f"{command!r} failed: {outcome}")


async def stage_cost(*, runs: int, warmup: int) -> dict[str, Any]:
    watch_children_with_pidfds()
    why_not = unavailable()
    user = UID if os.geteuid() == 0 else None
    # Not under /tmp: there the sandbox leaves /tmp alone (see sandbox.hides_itself), which would
    # flatter it.
    root = Path(tempfile.mkdtemp(prefix="pipelines-bench-sandbox-", dir="/var/tmp"))
    variants: dict[str, RunSandboxes | None] = {"unsandboxed": None}
    if why_not is None:
        spares = private_root_of(root)
        variants |= {
            "sandboxed": RunSandboxes(Sandbox(), spare_dir=spares),
            "sandboxed_no_network": RunSandboxes(Sandbox(network=False), spare_dir=spares),
            "sandboxed_per_step": RunSandboxes(Sandbox(), runner=False),
        }
    try:
        os.chmod(root, 0o711)
        samples: dict[str, list[float]] = {name: [] for name in variants}
        for i in range(warmup + runs):
            for name, sandbox in variants.items():
                began = time.perf_counter()
                await _stage(root / f"{name}-{i}", sandbox, user)
                if i >= warmup:
                    samples[name].append(time.perf_counter() - began)
                if sandbox is not None:  # the run ends (after its last stage: not a stage's cost)
                    await sandbox.close(private_dir_of(root / f"{name}-{i}"))
    finally:
        for sandbox in variants.values():
            if sandbox is not None:
                await sandbox.aclose()
        await asyncio.to_thread(shutil.rmtree, root, True)
    out: dict[str, Any] = {"steps_per_stage": len(STEPS), "as_uid": user, "sandbox": why_not or "available"}
    for name, values in samples.items():
        out[name] = summary_ms(values)
    with_, without = out.get("sandboxed", {}).get("p50_ms"), out["unsandboxed"]["p50_ms"]
    out["extra_per_stage_p50_ms"] = None if with_ is None or without is None else round(with_ - without, 2)
    return out
