"""`make up-cluster`'s NATS: `nodes` embedded nats-servers on 127.0.0.1 routed into one cluster, each
with JetStream and its own store (`<data_dir>/nats-cluster/node<i>/nats`), all with the same users (the
stack's `<data_dir>/nats-users`): services connect with every node's URL and the events stream keeps a
copy on each (PIPELINES_STREAM_REPLICAS), so losing one node loses no event and stops nothing."""

from __future__ import annotations

from pathlib import Path

from infra.broker.natsconf import DownstreamAccount
from services.dev.files import private_dir
from services.dev.nats import RunningNats, start_nats
from services.dev.ports import LOOPBACK, free_port

__all__ = ["CLUSTER_DIR", "CLUSTER_NAME", "start_nats_cluster"]

CLUSTER_DIR = "nats-cluster"
CLUSTER_NAME = "pipelines"


def start_nats_cluster(
    data_dir: Path, *, nodes: int = 3, stream: str = "*", issued: tuple[DownstreamAccount, ...] = ()
) -> list[RunningNats]:
    """Start the nodes one after another (each is ready for clients before the next starts; JetStream
    elects its meta leader once a majority is routed). Stops those started when one cannot start."""
    home = private_dir(data_dir)
    root = private_dir(home / CLUSTER_DIR)
    # Chosen up front: every node's routes name every other node's cluster port.
    route_ports = [free_port() for _ in range(nodes)]
    client_ports = [free_port() for _ in range(nodes)]
    started: list[RunningNats] = []
    try:
        for i in range(nodes):
            cluster = {
                "name": CLUSTER_NAME,
                "listen": f"{LOOPBACK}:{route_ports[i]}",
                "routes": [f"nats-route://{LOOPBACK}:{p}" for j, p in enumerate(route_ports) if j != i],
            }
            started.append(
                start_nats(
                    private_dir(root / f"node{i + 1}"),
                    port=client_ports[i],
                    stream=stream,
                    issued=issued,
                    name=f"{CLUSTER_NAME}-{i + 1}",
                    cluster=cluster,
                    credentials_home=home,
                )
            )
    except BaseException:
        for node in started:
            node.stop()
        raise
    return started
