"""Notification retry settings: PIPELINES_NOTIFY_* variables, validated, reaching Deliveries."""

from __future__ import annotations

import pytest

from infra.config import Settings
from infra.delivery.deliveries import Deliveries, DeliveryOptions


def test_notification_settings_come_from_pipelines_variables() -> None:
    env = {"PIPELINES_JWT_SECRET": "x" * 32}
    s = Settings.from_env(
        {
            **env,
            "PIPELINES_NOTIFY_MAX_ATTEMPTS": "6",
            "PIPELINES_NOTIFY_BACKOFF": "0.5",
            "PIPELINES_NOTIFY_TIMEOUT": "3",
        }
    )
    assert (s.notify_max_attempts, s.notify_backoff, s.notify_timeout) == (6, 0.5, 3.0)
    assert DeliveryOptions.from_settings(s) == DeliveryOptions(notify_attempts=6, notify_backoff=0.5, http_timeout=3.0)
    d = Settings.from_env(env)
    assert (d.notify_max_attempts, d.notify_backoff, d.notify_timeout) == (4, 1.0, 10.0)
    for name, value in (
        ("PIPELINES_NOTIFY_MAX_ATTEMPTS", "0"),
        ("PIPELINES_NOTIFY_MAX_ATTEMPTS", "three"),
        ("PIPELINES_NOTIFY_BACKOFF", "-1"),
        ("PIPELINES_NOTIFY_TIMEOUT", "0"),
        ("PIPELINES_NOTIFY_TIMEOUT", "nan"),
    ):
        with pytest.raises(ValueError, match=name):
            Settings.from_env({**env, name: value})


def test_deliveries_take_their_options_from_settings() -> None:
    s = Settings(database_url="postgresql://x/y", nats_url="nats://x", jwt_secret="x" * 32, notify_max_attempts=2)
    d = Deliveries(None, None, "", None, settings=s)  # type: ignore[arg-type]
    assert d.options.notify_attempts == 2 and d.options.http_timeout == 10.0
    explicit = DeliveryOptions(notify_attempts=9)
    assert Deliveries(None, None, "", None, explicit, settings=s).options is explicit  # type: ignore[arg-type]
    assert Deliveries(None, None, "", None).options == DeliveryOptions()  # type: ignore[arg-type]
