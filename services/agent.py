"""`python -m services.agent` (or `pipelines agent`): runs the units the executor hands it, on this
host, with no database credentials: only the broker's address and its own agent credentials
(PIPELINES_AGENT_CREDS). See docs/scaling.md."""

from __future__ import annotations

import asyncio
import logging

from infra.agent.config import AgentConfig, AgentConfigError
from infra.agent.worker import Agent, connect
from infra.executor.scripts import watch_children_with_pidfds
from infra.executor.units import sandbox_of
from services.bootstrap import run_until_signalled

log = logging.getLogger("pipelines.agent")


def main() -> None:
    try:
        config = AgentConfig.from_env()
    except AgentConfigError as exc:
        raise SystemExit(f"cannot start: {exc}") from None
    refused: list[str] = []

    async def body(stop: asyncio.Event) -> None:
        watch_children_with_pidfds()

        def on_refused(text: str) -> None:
            # Revoked (or never valid): nothing to wait for.
            refused.append(text)
            stop.set()

        nc = await connect(config, on_refused=on_refused)
        log.info(
            "agent %s: labels [%s], capacity %d, working in %s",
            config.id,
            ", ".join(config.labels),
            config.capacity,
            config.work_root,
        )
        agent = Agent(
            nc,
            agent_id=config.id,
            labels=config.labels,
            capacity=config.capacity,
            work_root=config.work_root,
            lease_ttl=config.settings.lease_ttl,
            sandbox=sandbox_of(config.settings),
            script_user=config.settings.script_user,
            script_uids=config.settings.script_uids,
        )
        try:
            await agent.run(stop)
        finally:
            if not nc.is_closed:
                await nc.close()

    run_until_signalled("agent", body)
    if refused:
        raise SystemExit(f"the broker refused this agent's credentials (revoked?): {refused[-1]}")


if __name__ == "__main__":
    main()
