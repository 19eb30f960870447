"""What `make up` runs and where it listens: the service table, the URLs it prints, masked credentials."""

from __future__ import annotations

__all__ = ["CLUSTER_SERVICES", "SERVICES", "display_host", "mask_url", "service_module"]

# `agent`: the local agent (services/dev/local_agent.py), run only beside the embedded NATS.
SERVICES: tuple[str, ...] = ("api", "relay", "executor", "projector", "gateway", "agent")
# `make up-cluster` (docs/scaling.md): two of each; `<service>-2` is a second process of `<service>`
# (a second API and gateway on free ports, a standby relay and projector, a second agent).
CLUSTER_SERVICES: tuple[str, ...] = tuple(f"{name}{suffix}" for name in SERVICES for suffix in ("", "-2"))


def service_module(name: str) -> str:
    """`api-2` -> `api`: the service a process of the stack runs (`python -m services.<it>`)."""
    return name.split("-", 1)[0]


def display_host(host: str) -> str:
    """The address a client on this machine uses for a server listening on `host`."""
    return "127.0.0.1" if host in ("", "0.0.0.0", "::") else host


def mask_url(url: str) -> str:
    """postgresql://user:secret@host/db -> postgresql://user:***@host/db"""
    scheme, sep, rest = url.partition("://")
    if not sep or "@" not in rest:
        return url
    creds, _, host = rest.rpartition("@")
    if ":" not in creds:
        return url
    user = creds.split(":", 1)[0]
    return f"{scheme}://{user}:***@{host}"
