"""The command's session: the profile `--profile` names (resolved on first use) and its API client."""

from __future__ import annotations

import typer

from services.cli.client import Api
from services.cli.profiles import Profile, resolve


class Session:
    def __init__(self, profile_name: str | None) -> None:
        self.profile_name = profile_name
        self._profile: Profile | None = None
        self._api: Api | None = None

    @property
    def profile(self) -> Profile:
        if self._profile is None:
            self._profile = resolve(self.profile_name)
        return self._profile

    @property
    def api(self) -> Api:
        if self._api is None:
            self._api = Api(self.profile)
        return self._api

    def close(self) -> None:
        if self._api is not None:
            self._api.close()


def session(ctx: typer.Context) -> Session:
    """The session the root command opened (`pipelines --profile NAME ...`)."""
    found = ctx.find_object(Session)
    if found is None:  # a command invoked without the root callback (it always runs in `pipelines`)
        found = Session(None)
        ctx.obj = found
    return found
