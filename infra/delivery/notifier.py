"""Notify stages: the message (with `${{ run.* }}` and `${{ pipeline.* }}`) is published on NATS
under `pipelines.notify.v1.<org>.<channel>` and sent to the channel's notifier (`slack` or a
generic `webhook`), retried with a growing backoff."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any, Literal

import httpx
import msgspec
from nats.aio.client import Client as NATS

from domain import run as rn
from domain.expressions import ExpressionError, interpolate
from domain.stages import Stage
from infra.app.commands import Commands
from infra.broker.bus import notify_subject
from infra.delivery.redaction import excerpt, shown_url, url_parts
from infra.delivery.registry import Registry
from infra.delivery.webhooks import SIGNATURE_HEADER, DeliveryOptions, OutboundRefused, post_json, sign
from infra.executor.scripts import ScriptOutcome
from projections.views import iso

_enc = msgspec.json.Encoder()

Log = Callable[[Literal["stdout", "stderr", "system"], str], None]


# What a notify stage without `message` sends.
DEFAULT_MESSAGE = "Pipeline ${{ pipeline.name }}: run ${{ run.id }} is ${{ run.status }}"


class Notifier:
    """The executor's side of a notify stage."""

    def __init__(self, commands: Commands, registry: Registry, nc: NATS | None, options: DeliveryOptions) -> None:
        self.commands = commands
        self.registry = registry
        self.nc = nc
        self.options = options

    async def notify(
        self, state: rn.RunState, stage: Stage, log: Log, extra: dict[str, Any] | None = None
    ) -> ScriptOutcome:
        """`extra`: more of the expression context (a step of a job: its matrix, jobs, steps...)."""
        org = state.organization_id
        channel_name = str(stage.config.get("channel", ""))
        pipeline, _ = await self.commands.load_pipeline(state.pipeline_id)
        context = {
            **(extra or {}),
            "run": {
                "id": state.run_id,
                "status": state.status,
                "pipelineId": state.pipeline_id,
                "organizationId": org,
                "definitionVersion": state.definition_version,
                "triggeredBy": state.triggered_by,
                "trigger": state.trigger,
                "variables": state.variables,
                "createdAt": iso(state.created_at),
                "startedAt": iso(state.started_at),
            },
            "pipeline": {
                "id": pipeline.pipeline_id,
                "name": pipeline.name,
                "description": pipeline.description,
                "organizationId": pipeline.organization_id,
                "definitionVersion": pipeline.definition_version,
            },
        }
        try:
            message = interpolate(str(stage.config.get("message") or DEFAULT_MESSAGE), context)
        except ExpressionError as exc:
            return ScriptOutcome(exit_code=None, error=f"config.message: {exc}")
        payload = {
            "channel": channel_name,
            "message": message,
            "runId": state.run_id,
            "pipelineId": state.pipeline_id,
            "pipelineName": pipeline.name,
            "organizationId": org,
            "status": state.status,
            "sentAt": iso(self.commands.now()),
        }
        body = _enc.encode(payload)
        if self.nc is not None:
            subject = notify_subject(org, channel_name)
            try:
                await self.nc.publish(subject, body)
                log("stdout", f"published on {subject}")
            except Exception as exc:
                log("system", f"publishing on {subject} failed: {exc}")
        channel = await self.registry.channel(org, channel_name)
        if channel is None:
            return ScriptOutcome(
                exit_code=None,
                error=f"no notifier is configured for channel {channel_name!r}: create one with POST /api/v1/channels",
            )
        kind = channel.doc.get("type")
        url = str(channel.doc.get("url", ""))
        out = _enc.encode({"text": message}) if kind == "slack" else body
        headers = {SIGNATURE_HEADER: sign(channel.secret, out)} if channel.secret else {}
        attempts = max(1, self.options.notify_attempts)
        problem = ""
        for i in range(attempts):
            try:
                reply = await post_json(url, out, headers, self.options.http_timeout, self.options.outbound)
                if 200 <= reply.status < 300:
                    log(
                        "stdout",
                        f"notification sent to {channel.name} ({kind}): HTTP {reply.status} (attempt {i + 1})",
                    )
                    return ScriptOutcome(exit_code=0)
                text = excerpt(reply.text, *url_parts(url), channel.secret)
                problem = f"HTTP {reply.status}" + (f": {text}" if text else "")
            except OutboundRefused as exc:
                # Not worth retrying: the address is what it is until someone changes the channel.
                problem = f"POST {shown_url(url)} refused: {exc}"
                log("stdout", f"delivery to {channel.name} refused: {problem}")
                return ScriptOutcome(exit_code=None, error=f"notification to {channel.name} failed: {problem}")
            except httpx.HTTPError as exc:
                problem = excerpt(f"{type(exc).__name__}: {exc}", *url_parts(url), channel.secret)
            log("stdout", f"delivery to {channel.name} failed (attempt {i + 1} of {attempts}): {problem}")
            if i + 1 < attempts:
                await asyncio.sleep(self.options.notify_backoff * (2**i))
        return ScriptOutcome(
            exit_code=None, error=f"notification to {channel.name} failed after {attempts} attempts: {problem}"
        )
