"""The service's Prometheus metrics (one registry; GET /metrics exposes it)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4

REGISTRY = CollectorRegistry()
# The classic text format, as before (what `generate_latest` writes).
CONTENT_TYPE = CONTENT_TYPE_PLAIN_0_0_4
# Seconds from a few milliseconds (a relay hop) to an hour (a long stage or run).
_SECONDS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600)

http_responses = Counter(
    "pipelines_http_responses", "HTTP responses sent, by method and status.", ["method", "status"], registry=REGISTRY
)
stage_duration = Histogram(
    "pipelines_stage_duration_seconds", "Duration of finished stages.", ["status"], buckets=_SECONDS, registry=REGISTRY
)
run_duration = Histogram(
    "pipelines_run_duration_seconds", "Duration of finished runs.", ["status"], buckets=_SECONDS, registry=REGISTRY
)
relay_lag = Histogram(
    "pipelines_relay_lag_seconds",
    "From an event's commit to its publication on JetStream.",
    buckets=_SECONDS,
    registry=REGISTRY,
)
projection_lag = Histogram(
    "pipelines_projection_lag_seconds",
    "From an event's commit to its projection into the read models.",
    buckets=_SECONDS,
    registry=REGISTRY,
)
websocket_clients = Gauge("pipelines_websocket_clients", "Open WebSocket connections.", registry=REGISTRY)


def exposition() -> bytes:
    """Every metric in the Prometheus text format."""
    return generate_latest(REGISTRY)
