"""`python -m services.executor`: runs the stages of runs, and the cron scheduler (every executor
runs one; each tick still starts exactly one run)."""

from __future__ import annotations

import asyncio

from infra.app.commands import Commands
from infra.broker import bus
from infra.config import Settings
from infra.executor.executor import Executor
from infra.executor.leases import LeaseStore
from infra.executor.scheduler import Scheduler
from infra.executor.scripts import watch_children_with_pidfds
from infra.git.credentials import StoredGitCredentials
from infra.git.repos import GitRepos
from infra.secrets import SecretStore, load_key_material
from infra.stored_secrets import StoredSecrets
from services.bootstrap import connect_nats, open_store, run_until_signalled


def main() -> None:
    settings = Settings.from_env()

    async def body(stop: asyncio.Event) -> None:
        watch_children_with_pidfds()
        key = load_key_material(settings)  # the run secrets' key (created when missing): fails fast
        pool, store = await open_store(settings, max_size=10)
        nc = await connect_nats(settings, "executor")
        poker = bus.Poker(nc)
        poker.start()
        try:
            await bus.ensure_events_stream(nc, settings.events_stream, settings.events_stream_replicas)
            secrets = SecretStore(pool, key)
            # The scheduler's cron triggers read Git-backed pipelines' specs: as the api does.
            git = GitRepos.from_settings(settings)
            credentials = StoredGitCredentials(StoredSecrets(secrets))
            commands = Commands(
                store,
                on_append=poker.poke,
                git=git,
                git_credentials=credentials,
                limits=settings.definition_limits(),
            )
            executor = Executor(commands, settings, nc, LeaseStore(pool), secrets)
            scheduler = Scheduler(commands, pool, interval=settings.sweep_interval)
            await asyncio.gather(executor.run(stop), scheduler.run(stop))
        finally:
            await poker.stop()
            await nc.drain()
            await pool.close()

    run_until_signalled("executor", body, metrics=(settings.metrics_host, settings.executor_metrics_port))


if __name__ == "__main__":
    main()
