"""The process's Prometheus metrics (one registry), and serving them on a port of their own.

The API serves them at GET /metrics, the gateway beside /healthz; the executor, the relay and the
projector on PIPELINES_<SERVICE>_METRICS_PORT (see `serve`)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from datetime import UTC, datetime

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest, start_http_server
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
    "pipelines_stage_duration_seconds",
    "Duration of finished stage attempts, by their outcome.",
    ["status"],
    buckets=_SECONDS,
    registry=REGISTRY,
)
step_duration = Histogram(
    "pipelines_step_duration_seconds",
    "Duration of finished attempts of steps of jobs, by their outcome.",
    ["status"],
    buckets=_SECONDS,
    registry=REGISTRY,
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
feed_reads = Counter(
    "pipelines_feed_reads",
    "Reads of the event store's feed by a follower (relay, projector), by whether they found events "
    "(`empty`: nothing below the transaction horizon yet).",
    ["consumer", "result"],
    registry=REGISTRY,
)
websocket_clients = Gauge("pipelines_websocket_clients", "Open WebSocket connections.", registry=REGISTRY)
log_lines_dropped = Counter(
    "pipelines_log_lines_dropped",
    "Log lines of runs that could not be stored (the event store unavailable for too long).",
    registry=REGISTRY,
)
events_set_aside = Counter(
    "pipelines_events_set_aside",
    "Events a consumer could not handle, set aside so that the ones after them go on (see /readyz).",
    ["consumer"],
    registry=REGISTRY,
)

agent_reports_refused = Counter(
    "pipelines_agent_reports_refused",
    "Agent reports the executor refused (a unit not handed to that agent, a stale attempt), by reason.",
    ["reason"],
    registry=REGISTRY,
)
agent_units = Counter(
    "pipelines_agent_units", "Units handed to agents, by how they ended.", ["outcome"], registry=REGISTRY
)


def exposition() -> bytes:
    """Every metric in the Prometheus text format."""
    return generate_latest(REGISTRY)


def observe_lags(histogram: Histogram, recorded: Iterable[datetime]) -> None:
    """Observe how long ago each of these events was recorded (never less than 0: the database's
    clock and ours may differ a little)."""
    now = datetime.now(UTC)
    for at in recorded:
        histogram.observe(max(0.0, (now - at).total_seconds()))


def serve(host: str, port: int) -> Callable[[], None] | None:
    """Serve the metrics at http://host:port/metrics from a thread of their own; port 0: nothing
    (None). Returns what stops the server."""
    if not port:
        return None
    server, thread = start_http_server(port, addr=host, registry=REGISTRY)

    def stop() -> None:
        server.shutdown()
        server.server_close()
        thread.join(5)

    return stop
