"""Where the executor, the relay and the projector serve their metrics: PIPELINES_*_METRICS_PORT
(0, the default: not served) on PIPELINES_METRICS_HOST (loopback by default)."""

from __future__ import annotations

import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from infra.config import Settings
from infra.metrics import serve
from services.dev.ports import free_port

ENV = {"PIPELINES_JWT_SECRET": "x" * 32}


def test_metrics_endpoints_are_off_by_default_and_on_loopback() -> None:
    s = Settings.from_env(ENV)
    assert (s.executor_metrics_port, s.relay_metrics_port, s.projector_metrics_port) == (0, 0, 0)
    assert s.metrics_host == "127.0.0.1"


def test_metrics_ports_and_host_come_from_pipelines_variables() -> None:
    s = Settings.from_env(
        {
            **ENV,
            "PIPELINES_EXECUTOR_METRICS_PORT": "9101",
            "PIPELINES_RELAY_METRICS_PORT": "9102",
            "PIPELINES_PROJECTOR_METRICS_PORT": "9103",
            "PIPELINES_METRICS_HOST": "0.0.0.0",
        }
    )
    assert (s.executor_metrics_port, s.relay_metrics_port, s.projector_metrics_port) == (9101, 9102, 9103)
    assert s.metrics_host == "0.0.0.0"
    for value in ("-1", "65536", "ninety"):
        with pytest.raises(ValueError, match="PIPELINES_RELAY_METRICS_PORT"):
            Settings.from_env({**ENV, "PIPELINES_RELAY_METRICS_PORT": value})


def test_a_metrics_port_of_zero_serves_nothing() -> None:
    assert serve("127.0.0.1", 0) is None


def test_a_metrics_port_serves_the_prometheus_text_until_stopped() -> None:
    port = free_port()
    stop = serve("127.0.0.1", port)
    assert stop is not None
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
            names = {f.name for f in text_string_to_metric_families(r.read().decode())}
    finally:
        stop()
    assert {"pipelines_stage_duration_seconds", "pipelines_log_lines_dropped"} <= names
    with pytest.raises(OSError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2)
