"""`python -m services.projector`: builds the read models. `--rebuild` recreates them and exits."""

from __future__ import annotations

import argparse
import asyncio
import logging

from infra.config import Settings
from infra.projector.consumer import Projector
from infra.projector.rebuild import RebuildBlocked
from infra.setaside import list_set_aside, report_json
from services.bootstrap import connect_nats, open_store, run_until_signalled


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m services.projector")
    parser.add_argument("--rebuild", action="store_true", help="recreate every read model from the store, then exit")
    args = parser.parse_args(argv)
    settings = Settings.from_env()

    async def body(stop: asyncio.Event) -> None:
        pool, store = await open_store(settings, max_size=4)
        try:
            if args.rebuild:
                try:
                    n = await Projector(store, settings.database_url).rebuild()
                except RebuildBlocked as exc:
                    raise SystemExit(f"rebuild refused: {exc}") from None
                logging.getLogger("pipelines.projector").info("rebuilt the read models from %d events", n)
                # As /readyz reports it: events that could not be projected were set aside.
                if set_aside := await list_set_aside(pool):
                    logging.getLogger("pipelines.projector").warning(
                        "degraded: %d event(s) set aside: %s", len(set_aside), report_json(set_aside)
                    )
                    print(report_json(set_aside), flush=True)
                return
            nc = await connect_nats(settings, "projector")
            try:
                await Projector(store, settings.database_url, nc, poll_interval=settings.poll_interval).run(stop)
            finally:
                await nc.drain()
        finally:
            await pool.close()

    # A rebuild is a one-off: nothing to scrape.
    port = 0 if args.rebuild else settings.projector_metrics_port
    run_until_signalled("projector", body, metrics=(settings.metrics_host, port))


if __name__ == "__main__":
    main()
