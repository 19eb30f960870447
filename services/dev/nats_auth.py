"""The embedded NATS's users: a generated password per service, each in a 0600 file
`<data_dir>/nats-users/<service>` (`user:password`, what PIPELINES_NATS_CREDS names), and the server's
configuration file `<data_dir>/nats.conf` (0600) rendered from them (the services' account) and from the
issued downstream credentials (an account each)."""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from infra.broker.creds import CredentialsError, read_user_password
from infra.broker.natsconf import BrokerUser, DownstreamAccount, render_config
from infra.broker.permissions import ADMIN, SERVICES, service_permissions
from services.dev.files import write_private

__all__ = ["CONFIG_FILE", "SERVER_NAME", "USERS_DIR", "render_users", "service_credentials", "write_config"]

USERS_DIR = "nats-users"
CONFIG_FILE = "nats.conf"
SERVER_NAME = "pipelines"


def service_credentials(data_dir: Path) -> dict[str, Path]:
    """The credential file of every service and of `admin`, generated once and kept (like the database
    password): the services find theirs again after a restart."""
    users = data_dir / USERS_DIR
    users.mkdir(mode=0o700, exist_ok=True)
    os.chmod(users, 0o700)
    paths: dict[str, Path] = {}
    for name in (*SERVICES, ADMIN):
        path = users / name
        try:
            pair = read_user_password(path) if path.exists() else None
        except CredentialsError:
            pair = None
        if pair is None or pair[0] != name:
            write_private(path, f"{name}:{secrets.token_urlsafe(24)}\n")
        paths[name] = path
    return paths


def render_users(credentials: dict[str, Path], stream: str) -> list[BrokerUser]:
    """The services' users with their permissions on events stream `stream` (`*`: any)."""
    out = []
    for name, path in credentials.items():
        pair = read_user_password(path)
        assert pair is not None
        out.append(BrokerUser(pair[0], pair[1], service_permissions(name, stream)))
    return out


def write_config(
    data_dir: Path,
    users: Iterable[BrokerUser],
    downstream: Iterable[DownstreamAccount] = (),
    options: Mapping[str, Any] | None = None,
) -> bool:
    """Write the configuration for the services' `users` and the `downstream` accounts, with the server's
    `options` (default: its name; a cluster node's also its `cluster` block); whether it changed (then the
    server must reload it)."""
    path = data_dir / CONFIG_FILE
    text = render_config(users, downstream, **(options if options is not None else {"server_name": SERVER_NAME}))
    try:
        if path.read_text(encoding="utf-8") == text:
            return False
    except OSError:
        pass
    write_private(path, text)
    return True
