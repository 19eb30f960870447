"""Starting and awaiting one unit of a run (a script stage, a step of a job, a deploy, a notify,
a plugin): its secrets, environment, timeout and log, and the command recording its outcome."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import shutil
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any, Literal, Protocol

from nats.aio.client import Client as NATS

from domain import expressions
from domain import run as rn
from domain.masking import Masker
from domain.run.units import Unit
from domain.stages import Stage
from infra import trace
from infra.agent.dispatch import Agents, RemoteStop
from infra.app.commands import Commands
from infra.broker.bus import log_subject
from infra.config import Settings
from infra.delivery.deliveries import Deliveries
from infra.executor.background import Background
from infra.executor.leasing import UnitLeases
from infra.executor.plugins import plugin_command
from infra.executor.runlog import ClosingLogs, RunLog
from infra.executor.sandbox import (
    Limits,
    RunSandboxes,
    Sandbox,
    others_can_run_python,
    private_dir_of,
    private_root_of,
)
from infra.executor.scripts import ScriptOutcome, ScriptRun, clean_env
from infra.executor.uids import NoFreeUid, ScriptUids
from infra.secrets import SecretStore
from infra.stored_secrets import unit_secrets

log = logging.getLogger("pipelines.executor")


class Stoppable(Protocol):
    """What a unit needs of its run's driver: whether the run was stopped, and where to register
    its script so that a stop kills it."""

    stop_requested: bool
    scripts: set[ScriptRun]


class UnitRunner:
    def __init__(
        self,
        commands: Commands,
        settings: Settings,
        nc: NATS | None,
        leases: UnitLeases,
        secrets: SecretStore | None,
        deliveries: Deliveries | None,
        closing_logs: ClosingLogs,
        background: Background,
    ) -> None:
        self.commands = commands
        self.settings = settings
        self.nc = nc
        self.leases = leases
        self.secrets = secrets
        self.deliveries = deliveries
        self.closing_logs = closing_logs
        self._background = background
        self.workdir = settings.work_root
        # A uid per run for its scripts (when root): see infra.executor.uids.
        self.uids = ScriptUids(self.workdir / ".uids", *settings.script_uids) if settings.script_uids else None
        # The uids this process claimed for runs it drives (until they end).
        self._run_uids: dict[str, int] = {}
        root = settings.work_root.absolute()
        self.sandbox = RunSandboxes(sandbox_of(settings), label=str(root), spare_dir=private_root_of(root))
        # Agents this executor hands units to (set by the executor when it has a broker): units
        # with `runsOn` always go to one, every script unit with PIPELINES_RUN_ON_AGENTS=all.
        self.agents: Agents | None = None

    async def close(self) -> None:
        """End what this process holds for runs on this host (their sandboxes), as it stops."""
        await self.sandbox.aclose()

    async def run_ended(self, state: rn.RunState) -> None:
        """Free what an ended run held here: its working directory (shared by its attempts and
        stages until it ends), its scripts' uid, its secrets."""
        run_id = state.run_id
        if self.agents is not None:
            self.agents.run_ended(run_id)
        private = private_dir_of(self.workdir.absolute() / run_id)
        # The sandbox first: nothing of the run still runs (nor writes files) when its files go
        # and its uid is freed for another run.
        await self.sandbox.close(private)
        uids = self.uids
        self._run_uids.pop(run_id, None)

        def free_files() -> None:
            # One thread hop for all of the blocking work, not one per call: each hop cost a
            # ThreadPoolExecutor.submit that stood out in the executor's profile (issue 17).
            shutil.rmtree(self.workdir / run_id, True)
            shutil.rmtree(private, True)
            if uids is not None:
                uids.release(run_id)

        await asyncio.to_thread(free_files)
        if self.secrets is not None and state.secret_names:
            await self.secrets.delete(run_id)

    async def _load_secrets(self, state: rn.RunState) -> tuple[dict[str, str], str | None]:
        """The unit's secret values (stored ones under the trigger's), or why they cannot be had."""
        return await unit_secrets(self.secrets, state)

    async def execute(self, state: rn.RunState, unit: Unit, driver: Stoppable | None) -> ScriptOutcome:
        """Run one unit to its outcome, its log lines appended as it goes (the last ones left to
        its completion: see ClosingLogs)."""
        trace.mark("unit", what=unit.key)
        secrets, secrets_problem = await self._load_secrets(state)
        masker = Masker(secrets.values())
        publish = None
        if self.nc is not None:
            nc, subject = self.nc, log_subject(state.organization_id, state.run_id)

            async def publish(payload: bytes) -> None:
                await nc.publish(subject, payload)

        runlog = RunLog(self.commands, state, max_bytes=self.settings.max_log_bytes, publish=publish, masker=masker)
        runlog.start()
        stage, job, step = unit.stage, unit.job, unit.step
        job_name, step_name = (job.name, step.name) if job and step else (None, None)

        def line(stream: Literal["stdout", "stderr", "system"], text: str) -> None:
            runlog.line(stage.id, stream, text, job_name, step_name)

        label = unit.label
        line("system", f"{label} started" + (f" (attempt {unit.attempt})" if unit.attempt > 1 else ""))
        loop = asyncio.get_running_loop()
        started = loop.time()
        timeout = self._timeout(state, unit)
        try:
            if secrets_problem is not None:
                outcome = ScriptOutcome(exit_code=None, error=secrets_problem)
            elif job is not None and step is not None:
                outcome = await self._run_step(state, unit, line, driver, secrets, timeout)
            elif stage.type == "script":
                outcome = await self._run_script(
                    state, unit, line, driver, secrets, command=str(stage.config.get("command", "")), timeout=timeout
                )
            elif stage.type in ("deploy", "notify"):
                outcome = await self._deliver(state, unit, stage, line, driver, secrets, timeout)
            else:
                outcome = ScriptOutcome(exit_code=None, error=f"{stage.type} stages are not run by the executor")
            ms = round((loop.time() - started) * 1000)
            if outcome.succeeded:
                line("system", f"{label} succeeded ({ms} ms)")
            else:
                described = describe(outcome, timeout)
                line("system", f"{label} failed: {described}")
                if outcome.error is None:
                    outcome = dataclasses.replace(outcome, error=described)
        except BaseException:
            await runlog.close()
            raise
        # The last lines are appended by the unit's completion, in its transaction (see
        # driver.RunDrivers._complete); the log's loop ends meanwhile.
        self.closing_logs.add(state.run_id, unit.key, unit.attempt, asyncio.create_task(runlog.finish()))
        # The error becomes part of a stage event: never with a secret in it.
        return dataclasses.replace(outcome, error=masker.mask_optional(outcome.error))

    def _timeout(self, state: rn.RunState, unit: Unit) -> float:
        """A stage's own timeout; for a step, its own, else what is left of its job's."""
        if unit.job is None or unit.step is None:
            return unit.stage.timeout or self.settings.stage_timeout
        limits = [self.settings.stage_timeout]
        if unit.step.timeout is not None:
            limits.append(unit.step.timeout)
        if unit.job.timeout is not None:
            jr = state.job_run(unit.stage.id, unit.job.name)
            if jr.started_at is not None:
                left = unit.job.timeout - (self.commands.now() - jr.started_at).total_seconds()
                limits.append(max(left, 0.001))
        return min(limits)

    def _context(self, state: rn.RunState, unit: Unit, secrets: dict[str, str]) -> dict[str, Any]:
        index = None
        if unit.job is not None and unit.step is not None:
            index = [s.name for s in unit.job.steps].index(unit.step.name)
        return rn.job_context(state, unit.stage, unit.job, upto=index, secrets=secrets)

    async def _run_step(
        self,
        state: rn.RunState,
        unit: Unit,
        line: Callable[[Literal["stdout", "stderr", "system"], str], None],
        driver: Stoppable | None,
        secrets: dict[str, str],
        timeout: float,
    ) -> ScriptOutcome:
        assert unit.job is not None and unit.step is not None
        job, step = unit.job, unit.step
        context = self._context(state, unit, secrets)
        try:
            env = {k: expressions.interpolate(v, context) for k, v in job.env.items()}
            context["env"] = env
            extra = {
                **env,
                "JOB_NAME": job.name,
                "STEP_NAME": step.name,
                **{f"MATRIX_{k.upper()}": expressions.render(v) for k, v in (job.matrix_values or {}).items()},
            }
            if step.kind == "shell":
                command = expressions.interpolate(step.run or "", context)
                return await self._run_script(
                    state, unit, line, driver, secrets, command=command, extra=extra, timeout=timeout
                )
            if step.kind == "notify" and self.deliveries is not None:
                # The notifier renders the message itself, with run.* and pipeline.* in full; the
                # step adds its own context (never secret values: a message leaves the system).
                told: dict[str, Any] = {k: v for k, v in context.items() if k not in ("run", "pipeline")}
                told["secrets"] = {name: "***" for name in secrets}
                # The job's env rendered again without secret values (it may hold ${{ secrets.X }}).
                told["env"] = {k: expressions.interpolate(v, told) for k, v in job.env.items()}
                as_stage = Stage(
                    id=unit.stage.id, name=f"{job.name}/{step.name}", type="notify", order=0, config=dict(step.config)
                )
                return await self.deliveries.notify(state, as_stage, line, told)
            if step.kind in ("deploy", "notify"):
                config = {k: expressions.interpolate(str(v), context) for k, v in step.config.items()}
                as_stage = Stage(
                    id=unit.stage.id, name=f"{job.name}/{step.name}", type=step.kind, order=0, config=config
                )
                return await self._deliver(state, unit, as_stage, line, driver, secrets, timeout)
            if step.kind == "plugin":
                args = interpolate_all(step.args, context)
                command, plugin_env = plugin_command(step.uses or "", step.action, args, context)
                return await self._run_script(
                    state,
                    unit,
                    line,
                    driver,
                    secrets,
                    command=command,
                    extra={**extra, **plugin_env},
                    timeout=timeout,
                    as_service=True,
                )
        except expressions.ExpressionError as exc:
            return ScriptOutcome(exit_code=None, error=f"step {step.name}: {exc}")
        return ScriptOutcome(exit_code=None, error=f"step kind {step.kind} is not run by the executor")

    async def _record_pgid(self, script: ScriptRun, run_id: str, key: str, attempt: int) -> None:
        for _ in range(500):
            if script.finished:
                # Its whole process group is gone already: there is nothing for a recovery to
                # kill, and a script that ends within the first poll costs no write at all.
                return
            pid = script.pid
            if pid is not None:
                await self.leases.record_pgid(run_id, key, attempt, pid)
                return
            await asyncio.sleep(0.01)

    async def _deliver(
        self,
        state: rn.RunState,
        unit: Unit,
        stage: Stage,
        line: Callable[[Literal["stdout", "stderr", "system"], str], None],
        driver: Stoppable | None,
        secrets: dict[str, str],
        timeout: float,
    ) -> ScriptOutcome:
        if self.deliveries is None:
            return ScriptOutcome(
                exit_code=None,
                error=f"{stage.type} is not configured on this server: "
                f"no {'deployer' if stage.type == 'deploy' else 'notifier'} is set up",
            )
        if stage.type == "notify":
            return await self.deliveries.notify(state, stage, line)

        async def run_command(command: str, extra: dict[str, str]) -> ScriptOutcome:
            return await self._run_script(
                state, unit, line, driver, secrets, command=command, extra=extra, timeout=timeout
            )

        return await self.deliveries.deploy(state, stage, unit.attempt, line, run_command)

    async def _run_script(
        self,
        state: rn.RunState,
        unit: Unit,
        line: Callable[[Literal["stdout", "stderr", "system"], str], None],
        driver: Stoppable | None,
        secrets: dict[str, str],
        *,
        command: str,
        timeout: float,
        extra: dict[str, str] | None = None,
        as_service: bool = False,
    ) -> ScriptOutcome:
        if driver is not None and driver.stop_requested:
            return ScriptOutcome(exit_code=None, killed=True)
        labels = runs_on(unit)
        if labels or (self.agents is not None and self.settings.run_on_agents == "all"):
            values = {
                **state.variables,
                **secrets,
                "PIPELINE_ID": state.pipeline_id,
                "RUN_ID": state.run_id,
                "STAGE_ID": unit.stage.id,
                **(extra or {}),
            }
            return await self._run_on_agent(state, unit, line, driver, command, values, timeout, labels)
        script = ScriptRun(kill_grace=self.settings.kill_grace)
        # Plugins are the admin's installed code, run by the service's Python: as the run's user
        # when that user can run it, else as the service's user (in the sandbox all the same).
        as_service = as_service and not others_can_run_python()
        user: str | int | None = None if as_service else self.settings.script_user
        identity: dict[str, str] = {}
        if self.uids is not None and not as_service:
            user = self._run_uids.get(state.run_id)
            if user is None:
                try:
                    user = await asyncio.to_thread(self.uids.acquire, state.run_id)
                except NoFreeUid as exc:
                    return ScriptOutcome(exit_code=None, error=str(exc))
                if len(self._run_uids) > 10_000:  # runs another executor ended
                    self._run_uids.clear()
                self._run_uids[state.run_id] = user
            identity = {"USER": f"run-{user}", "LOGNAME": f"run-{user}"}
        if driver is not None:
            driver.scripts.add(script)
        workdir = self.workdir / state.run_id
        env = clean_env(
            workdir,
            {
                **state.variables,
                **secrets,
                "PIPELINE_ID": state.pipeline_id,
                "RUN_ID": state.run_id,
                "STAGE_ID": unit.stage.id,
                **identity,
                **(extra or {}),
            },
        )
        if self.leases.store is not None:
            self._background.spawn(self._record_pgid(script, state.run_id, unit.key, unit.attempt))
        trace.mark("script run")  # the unit's secrets, log, uid and environment ready
        try:
            return await script.run(
                command,
                workdir=workdir,
                env=env,
                timeout=timeout,
                on_line=line,
                user=user,
                sandbox=self.sandbox,
            )
        finally:
            if driver is not None:
                driver.scripts.discard(script)

    async def _run_on_agent(
        self,
        state: rn.RunState,
        unit: Unit,
        line: Callable[[Literal["stdout", "stderr", "system"], str], None],
        driver: Stoppable | None,
        command: str,
        values: dict[str, str],
        timeout: float,
        labels: tuple[str, ...],
    ) -> ScriptOutcome:
        """Hand the command to an agent with the labels (it runs it in its own sandbox and working
        directory) and wait for its outcome; its lines come back as the unit's."""
        if self.agents is None:
            return ScriptOutcome(
                exit_code=None,
                error=f"runsOn [{', '.join(labels)}] needs agents, and this executor has no broker to reach them",
            )
        stopper = RemoteStop(self.agents)
        if driver is not None:
            driver.scripts.add(stopper)  # type: ignore[arg-type]  # stop() is all a run's stop needs
        job = (state.run_id, unit.stage.id, unit.job.name) if unit.job is not None else None

        stage_id = unit.stage.id
        job_name = unit.job.name if unit.job is not None else None
        step_name = unit.step.name if unit.step is not None else None

        def on_wait(reason: str | None) -> None:
            if reason is not None:
                line("system", reason)
            # Shown in the run's read model (the step `queued`, its `waitingFor`): off the unit's path.
            self._background.spawn(
                self._note_waiting(state.run_id, stage_id, job_name, step_name, unit.attempt, reason)
            )

        try:
            return await self.agents.run(
                org=state.organization_id,
                run_id=state.run_id,
                key=unit.key,
                attempt=unit.attempt,
                labels=labels,
                job=job,
                command=command,
                env=values,
                timeout=timeout,
                on_line=line,
                on_wait=on_wait,
                stopper=stopper,
            )
        finally:
            if driver is not None:
                driver.scripts.discard(stopper)

    async def _note_waiting(
        self, run_id: str, stage_id: str, job: str | None, step: str | None, attempt: int, reason: str | None
    ) -> None:
        try:
            await self.commands.run_command(
                run_id,
                lambda at: rn.NoteWaiting(stage_id=stage_id, job=job, step=step, attempt=attempt, reason=reason, at=at),
            )
        except Exception as exc:  # only a note: the unit goes on regardless
            log.info("run %s: could not note that %s waits for an agent: %s", run_id, stage_id, exc)


def runs_on(unit: Unit) -> tuple[str, ...]:
    """The labels of the agent that must run the unit (`runsOn` of its job, or of its typed stage)."""
    return unit.job.runs_on if unit.job is not None else unit.stage.runs_on


def completion(
    stage_id: str,
    job: str | None,
    step: str | None,
    attempt: int,
    outcome: ScriptOutcome,
    at: datetime,
    advance: bool = True,
) -> rn.CompleteStage | rn.CompleteStep:
    """The command that records an attempt's outcome: of a typed stage, or of a step of a job.
    `advance=False` only records it (see rn.CompleteStage.advance)."""
    failure: Literal["failed", "timeout", "cancelled"] = (
        "cancelled" if outcome.killed else "timeout" if outcome.timed_out else "failed"
    )
    common: dict[str, Any] = {
        "stage_id": stage_id,
        "attempt": attempt,
        "succeeded": outcome.succeeded,
        "failure": failure,
        "error": None if outcome.succeeded else outcome.error,
        "exit_code": 0 if outcome.succeeded else outcome.exit_code,
        "advance": advance,
        "at": at,
    }
    if job is None or step is None:
        return rn.CompleteStage(**common)
    return rn.CompleteStep(job=job, step=step, **common)


def interpolate_all(value: Any, context: dict[str, Any]) -> Any:
    if isinstance(value, str):
        return expressions.interpolate(value, context)
    if isinstance(value, dict):
        return {k: interpolate_all(v, context) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate_all(v, context) for v in value]
    return value


def describe(outcome: ScriptOutcome, timeout: float) -> str:
    if outcome.error:
        return outcome.error
    if outcome.killed:
        return "stopped: the script's process group was killed"
    if outcome.timed_out:
        return f"timed out after {timeout:g} s; the process group was killed"
    return f"exit code {outcome.exit_code}"


def sandbox_of(settings: Settings) -> Sandbox:
    limits = Limits(
        procs=settings.script_max_procs,
        open_files=settings.script_max_open_files,
        file_size=settings.script_max_file_size,
        memory=settings.script_max_memory,
    )
    return Sandbox(limits=limits, network=settings.script_network)


def workdir_of(settings: Settings, run_id: str) -> Path:
    return settings.work_root / run_id
