"""What a spec save request must satisfy before it is looked at further, and the step plugins
installed here (the save itself is `Definitions.save_spec`, through the Git port)."""

from __future__ import annotations

import re
from importlib.metadata import entry_points
from typing import Any, Literal

from domain import pipeline as pl
from domain.errors import Invalid

PLUGIN_GROUP = "pipelines.steps"
SaveMode = Literal["direct", "pr"]
_COMMIT_SHA = re.compile(r"^[0-9a-fA-F]{7,64}$")


def installed_plugins() -> frozenset[str]:
    """Step kinds that `uses` may name: entry points of the group `pipelines.steps`."""
    return frozenset(e.name for e in entry_points(group=PLUGIN_GROUP))


def check_save(state: pl.PipelineState, spec: Any, save_mode: SaveMode, expected_head_commit_sha: str | None) -> None:
    """What a save request must satisfy before anything else is looked at (Invalid otherwise)."""
    if state.repo_url is None and (save_mode == "pr" or expected_head_commit_sha is not None):
        raise Invalid({"saveMode": "this pipeline is not backed by a Git repository; use saveMode direct"})
    if expected_head_commit_sha is not None and not _COMMIT_SHA.match(expected_head_commit_sha):
        raise Invalid({"expectedHeadCommitSha": "must be a commit sha (7-64 hex digits)"})
    if not isinstance(spec, dict):
        raise Invalid({"spec": "must be an object with `stages` or `jobs`"})
