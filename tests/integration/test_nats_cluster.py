"""The embedded 3-node NATS cluster of `make up-cluster` (services/dev/nats_cluster.py): the nodes route
to each other, accept the same users, and the events stream gets the copies PIPELINES_STREAM_REPLICAS
asks for, also when it exists already with fewer."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path

import pytest

from infra.broker import bus
from infra.broker.permissions import ADMIN
from services.dev.nats import RunningNats
from services.dev.nats_cluster import start_nats_cluster

pytestmark = pytest.mark.integration


@pytest.fixture
def nodes(tmp_path: Path) -> Iterator[list[RunningNats]]:
    started = start_nats_cluster(tmp_path / "data", nodes=3)
    try:
        yield started
    finally:
        for node in started:
            node.stop()


async def test_an_existing_stream_is_raised_to_the_replicas_asked_for_on_every_node(nodes: list[RunningNats]) -> None:
    url = ",".join(n.url for n in nodes)
    nc = await bus.connect(url, "cluster-test", nodes[0].credentials[ADMIN])
    try:
        js = nc.jetstream()
        for attempt in range(100):  # the cluster elects its JetStream meta leader first
            try:
                await bus.ensure_events_stream(nc, "CLUSTER_TEST", 1)
                break
            except Exception:
                if attempt == 99:
                    raise
                await asyncio.sleep(0.1)
        assert (await js.stream_info("CLUSTER_TEST")).config.num_replicas == 1
        await bus.ensure_events_stream(nc, "CLUSTER_TEST", 3)
        info = await js.stream_info("CLUSTER_TEST")
        assert info.config.num_replicas == 3
        await bus.ensure_events_stream(nc, "CLUSTER_TEST", 1)  # never lowered
        assert (await js.stream_info("CLUSTER_TEST")).config.num_replicas == 3
    finally:
        await nc.close()
    # Every node with the same users: the services' account's user logs in on each alone.
    for node in nodes:
        one = await bus.connect(node.url, "cluster-test", node.credentials["relay"])
        assert one.is_connected
        await one.close()
