"""`make up-cluster` (`pipelines up --cluster`): the multi-host shape on one machine, on loopback. A
3-node NATS cluster (services/dev/nats_cluster.py) with the events stream replicated on every node, and
two processes of every service (endpoints.CLUSTER_SERVICES): two APIs and two gateways (the first on
PIPELINES_API_PORT / PIPELINES_GATEWAY_PORT, the others on free ports), a standby relay and projector
(each takes over when the leader's advisory lock goes with its connection), two executors and two
agents with labels of their own. docs/scaling.md says what each needs and what fails over how fast."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

from services.dev.endpoints import CLUSTER_SERVICES
from services.dev.stack import Stack

__all__ = ["CLUSTER_NATS_NODES", "cluster_env", "cluster_stack"]

CLUSTER_NATS_NODES = 3

# What the cluster profile sets unless the environment says otherwise.
CLUSTER_DEFAULTS = {
    # One copy per node: a node lost loses no event and the stream keeps a quorum.
    "PIPELINES_STREAM_REPLICAS": str(CLUSTER_NATS_NODES),
    # Every script unit goes to the agents, which run on "other hosts" (the executors place them).
    "PIPELINES_RUN_ON_AGENTS": "all",
}


def cluster_env(env: Mapping[str, str] | None = None) -> dict[str, str]:
    """`env` (default os.environ) with the cluster profile's defaults for what it does not set."""
    out = dict(os.environ if env is None else env)
    for name, value in CLUSTER_DEFAULTS.items():
        out.setdefault(name, value)
    return out


def cluster_stack(env: Mapping[str, str] | None = None, **options: Any) -> Stack:
    """The cluster profile's stack (not started); `options` as for Stack (say, data_dir, output)."""
    options.setdefault("services", CLUSTER_SERVICES)
    return Stack(cluster_env(env), nats_nodes=CLUSTER_NATS_NODES, **options)
