"""Deploy stages: one deployment at a time per environment (a session-level advisory lock), its
lifecycle recorded as a `deployment-<id>` stream, the environment's deployer run (a shell
command like a script stage, or a signed webhook)."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Any, Literal

import httpx
import msgspec
import psycopg

from domain import deployment as dp
from domain import run as rn
from domain.deployment import DeploymentFailed, DeploymentQueued, DeploymentStarted, DeploymentSucceeded
from domain.stages import Stage
from infra.app.commands import Commands
from infra.delivery.redaction import excerpt, shown_url, url_parts
from infra.delivery.registry import Item, Registry
from infra.delivery.webhooks import SIGNATURE_HEADER, DeliveryOptions, OutboundRefused, post_json, sign
from infra.executor.scripts import ScriptOutcome
from infra.store.records import WrongExpectedVersion

_enc = msgspec.json.Encoder()

Log = Callable[[Literal["stdout", "stderr", "system"], str], None]
RunCommand = Callable[[str, dict[str, str]], Awaitable[ScriptOutcome]]


def env_lock_key(environment_id: str) -> int:
    digest = hashlib.sha256(f"pipelines-environment:{environment_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big", signed=True)


def _approval(state: rn.RunState) -> tuple[str | None, datetime | None]:
    approved = [a for a in state.approvals if a.decision == "approved"]
    return (approved[-1].by, approved[-1].at) if approved else (None, None)


class Deployer:
    """The executor's side of a deploy stage."""

    def __init__(self, commands: Commands, registry: Registry, database_url: str, options: DeliveryOptions) -> None:
        self.commands = commands
        self.registry = registry
        self.database_url = database_url
        self.options = options

    async def _record(
        self, state: rn.RunState, deployment_id: str, event: dp.DeploymentEvent, expected: int | None
    ) -> None:
        await self.commands.deployments.append(
            deployment_id, [event], expected, state.organization_id, state.pipeline_id, state.run_id
        )

    async def deploy(
        self, state: rn.RunState, stage: Stage, attempt: int, log: Log, run_command: RunCommand
    ) -> ScriptOutcome:
        org = state.organization_id
        env_id = str(stage.config.get("environmentId", ""))
        component_id = str(stage.config.get("componentId", ""))
        environment = await self.registry.get("environment", org, env_id)
        if environment is None:
            return ScriptOutcome(exit_code=None, error=f"environment {env_id} not found in this organization")
        component = await self.registry.get("component", org, component_id)
        if component is None:
            return ScriptOutcome(exit_code=None, error=f"component {component_id} not found in this organization")
        deployer = environment.doc.get("deployer") or {}
        kind = str(deployer.get("type", ""))
        deployment_id = self.commands.new_id()
        approved_by, approved_at = _approval(state)
        await self._record(
            state,
            deployment_id,
            DeploymentQueued(
                deployment_id=deployment_id,
                organization_id=org,
                environment_id=environment.id,
                environment_name=environment.name,
                component_id=component.id,
                component_name=component.name,
                run_id=state.run_id,
                pipeline_id=state.pipeline_id,
                stage_id=stage.id,
                attempt=attempt,
                definition_version=state.definition_version,
                version=state.variables.get("VERSION"),
                deployer=kind,
                triggered_by=state.triggered_by,
                approved_by=approved_by,
                approved_at=approved_at,
                at=self.commands.now(),
            ),
            0,
        )
        target = f"{component.name} to {environment.name}"
        log("stdout", f"deployment {deployment_id}: {target} through the {kind} deployer")
        async with await psycopg.AsyncConnection.connect(
            self.database_url, autocommit=True, application_name=f"pipelines-deploy {deployment_id}"[:63]
        ) as lock:
            key = env_lock_key(environment.id)
            try:
                # The server notices a vanished client (its host lost) within about half a minute,
                # and ends the session, which frees the lock (ignored on a Unix socket).
                await lock.execute(
                    "SELECT set_config('tcp_keepalives_idle', '15', false), "
                    "set_config('tcp_keepalives_interval', '5', false), set_config('tcp_keepalives_count', '3', false)"
                )
                cur = await lock.execute("SELECT pg_try_advisory_lock(%s)", (key,))
                row = await cur.fetchone()
                if not (row and row[0]):
                    log("stdout", f"queued: another deployment to {environment.name} is in progress")
                    await lock.execute("SELECT pg_advisory_lock(%s)", (key,))
                try:
                    await self._record(
                        state, deployment_id, DeploymentStarted(deployment_id=deployment_id, at=self.commands.now()), 1
                    )
                except WrongExpectedVersion:
                    closed, _ = await self.commands.deployments.load(deployment_id)
                    error = f"deployment {deployment_id} was closed while it waited: {closed.error or closed.status}"
                    log("system", error)
                    return ScriptOutcome(exit_code=None, error=error)
                outcome, detail = await self._run_deployer(
                    kind, deployer, environment, deployment_id, component.id, state, log, run_command
                )
                if outcome.succeeded:
                    log("stdout", f"deployment {deployment_id} succeeded: {target}")
                    done: dp.DeploymentEvent = DeploymentSucceeded(
                        deployment_id=deployment_id, detail=detail, at=self.commands.now()
                    )
                else:
                    error = outcome.error or (
                        "the deploy command timed out"
                        if outcome.timed_out
                        else "the deploy command was stopped"
                        if outcome.killed
                        else f"the deploy command exited with code {outcome.exit_code}"
                    )
                    log("stdout", f"deployment {deployment_id} failed: {error}")
                    done = DeploymentFailed(deployment_id=deployment_id, error=error, at=self.commands.now())
                    outcome = ScriptOutcome(
                        exit_code=outcome.exit_code,
                        timed_out=outcome.timed_out,
                        killed=outcome.killed,
                        error=f"deployment of {target} failed: {error}",
                    )
                try:
                    await asyncio.shield(self._record(state, deployment_id, done, 2))
                except WrongExpectedVersion:
                    # Closed meanwhile (this executor was taken for lost): the history keeps that.
                    closed, _ = await self.commands.deployments.load(deployment_id)
                    error = f"deployment {deployment_id} was closed meanwhile: {closed.error or closed.status}"
                    log("system", error)
                    outcome = ScriptOutcome(exit_code=outcome.exit_code, error=error)
            except asyncio.CancelledError:
                # Queued or running: either way it is closed as failed (once, by the decider).
                await asyncio.shield(self.commands.deployments.abandon(deployment_id, "the executor stopped"))
                raise
            finally:
                with contextlib.suppress(Exception):  # closing the connection releases it anyway
                    await lock.execute("SELECT pg_advisory_unlock(%s)", (key,))
        return outcome

    async def _run_deployer(
        self,
        kind: str,
        deployer: dict[str, Any],
        environment: Item,
        deployment_id: str,
        component_id: str,
        state: rn.RunState,
        log: Log,
        run_command: RunCommand,
    ) -> tuple[ScriptOutcome, str | None]:
        if kind == "command":
            extra = {
                "COMPONENT_ID": component_id,
                "ENVIRONMENT_ID": environment.id,
                "DEPLOYMENT_ID": deployment_id,
                "RUN_ID": state.run_id,
                "PIPELINE_ID": state.pipeline_id,
            }
            outcome = await run_command(str(deployer.get("command", "")), extra)
            return outcome, None if outcome.exit_code is None else f"exit code {outcome.exit_code}"
        if kind == "webhook":
            url = str(deployer.get("url", ""))
            body = _enc.encode(
                {
                    "deploymentId": deployment_id,
                    "componentId": component_id,
                    "environmentId": environment.id,
                    "runId": state.run_id,
                    "pipelineId": state.pipeline_id,
                    "organizationId": state.organization_id,
                    "definitionVersion": state.definition_version,
                    "variables": state.variables,
                }
            )
            headers = {SIGNATURE_HEADER: sign(environment.secret, body)} if environment.secret else {}
            # Run logs are read by viewers: the URL as scheme and host, the reply as a masked excerpt.
            shown = shown_url(url)
            try:
                reply = await post_json(url, body, headers, self.options.http_timeout, self.options.outbound)
            except OutboundRefused as exc:
                log("stdout", f"POST {shown} refused: {exc}")
                return ScriptOutcome(exit_code=None, error=f"POST {shown} refused: {exc}"), None
            except httpx.HTTPError as exc:
                problem = excerpt(f"{type(exc).__name__}: {exc}", *url_parts(url), environment.secret)
                return ScriptOutcome(exit_code=None, error=f"POST {shown} failed: {problem}"), None
            text = excerpt(reply.text, *url_parts(url), environment.secret)
            log("stdout", f"POST {shown}: HTTP {reply.status}" + (f": {text}" if text else ""))
            if 200 <= reply.status < 300:
                return ScriptOutcome(exit_code=0), f"HTTP {reply.status}"
            error = f"POST {shown} answered HTTP {reply.status}"
            return ScriptOutcome(exit_code=None, error=error), f"HTTP {reply.status}"
        return ScriptOutcome(exit_code=None, error=f"environment {environment.name} has no usable deployer"), None
