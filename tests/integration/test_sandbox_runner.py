"""The run's runner, driven as the executor drives it (infra.executor.scripts.ScriptRun in a run's
sandbox), with real processes: steps of one run side by side keep their own output and exit status,
stopping one kills its process group only, a step that kills its runner fails and the run's next
step gets a new sandbox with the run's /tmp, and a run's sandbox ends when it is closed. Root only
(namespaces and a uid per run)."""

from __future__ import annotations

import asyncio
import shutil
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

from infra.executor.sandbox import RunSandboxes, Sandbox, private_dir_of, private_root_of, unavailable
from infra.executor.scripts import ScriptOutcome, ScriptRun, clean_env

_why = unavailable()
pytestmark = [
    pytest.mark.integration,
    pytest.mark.skipif(_why is not None, reason=f"the script sandbox cannot run here: {_why}"),
]

UID = 299_998  # of the default per-run range, as a run would get


@pytest_asyncio.fixture(loop_scope="session")
async def work() -> AsyncIterator[Path]:
    # Not under /tmp (the private /tmp would hide it: see sandbox.hides_itself).
    root = Path("/var/tmp") / f"pipelines-runner-test-{uuid.uuid4().hex[:12]}"
    root.mkdir(mode=0o711)
    try:
        yield root
    finally:
        shutil.rmtree(root, ignore_errors=True)


@pytest_asyncio.fixture(loop_scope="session")
async def sandboxes(work: Path) -> AsyncIterator[RunSandboxes]:
    sandboxes = RunSandboxes(Sandbox(), label=str(work), spare_dir=private_root_of(work))
    try:
        yield sandboxes
    finally:
        await asyncio.wait_for(sandboxes.aclose(), 10)


async def step(
    sandboxes: RunSandboxes, workdir: Path, command: str, script: ScriptRun | None = None, timeout: float = 20
) -> tuple[ScriptOutcome, list[tuple[str, str]]]:
    lines: list[tuple[str, str]] = []
    outcome = await (script or ScriptRun(kill_grace=1)).run(
        command,
        workdir=workdir,
        env=clean_env(workdir, {"RUN_ID": workdir.name}),
        timeout=timeout,
        on_line=lambda stream, text: lines.append((stream, text)),
        user=UID,
        sandbox=sandboxes,
    )
    return outcome, lines


def group_alive(pgid: int) -> bool:
    """Whether a process of the group still runs (a zombie its PID 1 has yet to reap does not)."""
    for proc in Path("/proc").iterdir():
        if proc.name.isdigit():
            try:
                fields = (proc / "stat").read_text().rpartition(")")[2].split()
            except OSError:
                continue
            if int(fields[2]) == pgid and fields[0] != "Z":
                return True
    return False


async def test_steps_of_one_run_side_by_side_keep_their_own_output_and_exit_status(
    sandboxes: RunSandboxes, work: Path
) -> None:
    run = work / "side-by-side"
    results = await asyncio.gather(
        *(step(sandboxes, run, f"sleep 0.3; echo out-{i}; echo err-{i} >&2; exit {i}") for i in range(3))
    )
    for i, (outcome, lines) in enumerate(results):
        assert outcome.exit_code == i and outcome.error is None, outcome
        # (stdout and stderr are read apart: their order between them is not kept, as with pipes)
        assert sorted(lines) == [("stderr", f"err-{i}"), ("stdout", f"out-{i}")], lines


async def test_stopping_a_step_kills_its_process_group_only(sandboxes: RunSandboxes, work: Path) -> None:
    run = work / "stop-one"
    victim = ScriptRun(kill_grace=1)
    stopped = asyncio.create_task(step(sandboxes, run, "sleep 30 & sleep 30; echo never", victim))
    other = asyncio.create_task(step(sandboxes, run, "sleep 1; echo still here"))
    for _ in range(200):
        if victim.pid is not None:
            break
        await asyncio.sleep(0.02)
    pgid = victim.pid
    assert pgid is not None and group_alive(pgid)
    await victim.stop()
    outcome, lines = await asyncio.wait_for(stopped, 10)
    assert outcome.killed and ("stdout", "never") not in lines, (outcome, lines)
    assert not group_alive(pgid)  # its background sleep too
    outcome, lines = await asyncio.wait_for(other, 10)
    assert outcome.succeeded and lines == [("stdout", "still here")], (outcome, lines)


async def test_a_timed_out_step_is_killed_with_what_it_started(sandboxes: RunSandboxes, work: Path) -> None:
    run = work / "timeout"
    script = ScriptRun(kill_grace=0.5)
    outcome, _ = await step(sandboxes, run, "sleep 30 & sleep 30", script, timeout=0.5)
    assert outcome.timed_out and script.pid is not None
    assert not group_alive(script.pid)


async def test_a_step_that_kills_its_runner_fails_and_the_next_gets_a_new_sandbox_with_the_runs_tmp(
    sandboxes: RunSandboxes, work: Path
) -> None:
    run = work / "kill-all"
    outcome, _ = await step(sandboxes, run, "echo kept > /tmp/mark; kill -9 -1; sleep 5")
    assert not outcome.succeeded, outcome
    outcome, lines = await step(sandboxes, run, "cat /tmp/mark")
    assert outcome.succeeded and lines == [("stdout", "kept")], (outcome, lines)


async def test_closing_a_runs_sandbox_ends_its_steps_and_leaves_no_file_behind(
    sandboxes: RunSandboxes, work: Path
) -> None:
    run = work / "closed"
    script = ScriptRun(kill_grace=1)
    running = asyncio.create_task(step(sandboxes, run, "sleep 30", script))
    for _ in range(200):
        if script.pid is not None:
            break
        await asyncio.sleep(0.02)
    assert script.pid is not None
    await sandboxes.close(private_dir_of(run))
    outcome, _ = await asyncio.wait_for(running, 10)
    assert not outcome.succeeded
    # The sandbox's PID 1 is gone, so the kernel has sent SIGKILL to everything in it; on a loaded
    # machine the step may take a moment more to exit (it did in one CI run).
    pid = script.pid
    for _ in range(250):
        if not group_alive(pid):
            break
        await asyncio.sleep(0.02)
    assert not group_alive(pid)
    # Only the run's /tmp is left in its private directory: no script, environment or FIFO.
    assert sorted(p.name for p in private_dir_of(run).iterdir()) == ["tmp"]


async def test_a_step_has_no_capability_and_cannot_gain_one(sandboxes: RunSandboxes, work: Path) -> None:
    outcome, lines = await step(
        sandboxes, work / "caps", "grep -E '^(CapInh|CapPrm|CapEff|CapAmb|NoNewPrivs)' /proc/self/status; id -G"
    )
    assert outcome.succeeded, (outcome, lines)
    status = dict(text.split(":\t") for _, text in lines if ":\t" in text)
    assert {k: int(v, 16) for k, v in status.items()} == {
        "CapInh": 0,
        "CapPrm": 0,
        "CapEff": 0,
        "CapAmb": 0,
        "NoNewPrivs": 1,  # a setuid program (su, mount) or file capabilities (ping) grant nothing
    }, lines
    assert lines[-1] == ("stdout", str(UID)), lines  # no supplementary group


async def test_a_steps_environment_arrives_exactly_and_its_line_numbers_are_the_scripts_own(
    sandboxes: RunSandboxes, work: Path
) -> None:
    # The step's own shell exports its environment on the script's first line: values with quotes,
    # line breaks and `$` arrive as they were, and an error on line 3 is reported on line 3.
    run = work / "environment"
    value = 'it\'s "quoted"\nsecond line $HOME `x`'
    lines: list[tuple[str, str]] = []
    outcome = await ScriptRun(kill_grace=1).run(
        'printf "%s|" "$SECRET_VALUE"; echo "$LANG"\n'
        "env | grep -c ^SECRET_VALUE=\n"
        'no-such-command-here; [ "$PWD" = "$(pwd -P)" ] && [ "$PPID" != 7 ] && echo shell-managed-kept\n'
        "exit 127",
        workdir=run,
        # PWD and PPID are the shell's own: a run variable of that name never replaces them.
        env=clean_env(run, {"RUN_ID": run.name, "SECRET_VALUE": value, "PWD": "/nowhere", "PPID": "7"}),
        timeout=20,
        on_line=lambda stream, text: lines.append((stream, text)),
        user=UID,
        sandbox=sandboxes,
    )
    assert outcome.exit_code == 127, (outcome, lines)
    out = [text for stream, text in lines if stream == "stdout"]
    assert out == ['it\'s "quoted"', "second line $HOME `x`|C.UTF-8", "1", "shell-managed-kept"], lines
    err = [text for stream, text in lines if stream == "stderr"]
    assert len(err) == 1 and ": 3: no-such-command-here: not found" in err[0], err
    # Nothing of the step is left in the run's private directory once it has ended.
    assert sorted(p.name for p in private_dir_of(run).iterdir()) == ["tmp"]
    await sandboxes.close(private_dir_of(run))
