"""Which repository URLs Git may reach: repositories on the server's own disk only under the
directories of PIPELINES_GIT_ALLOW_LOCAL (none by default); network URLs as the domain allows."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from domain.pipeline import check_git_source

_NETWORK = ("https://", "ssh://", "git@")


def local_path(url: str) -> str | None:
    """The path of a URL that names a repository on this machine (`file://`, an absolute or
    relative path, anything that is not https, ssh or git@host:path), else None."""
    if url.startswith(_NETWORK):
        return None
    return url.removeprefix("file://")


def is_local(url: str) -> bool:
    return local_path(url) is not None


def repo_url_problem(url: str, allow_local: Sequence[Path]) -> str | None:
    """Why `url` may not be used as a pipeline's repository here, or None when it may.

    A local repository must lie under one of `allow_local` once symlinks and `..` are resolved on
    both sides: without that, any member could read (and push to) another organization's
    repository, or the service's own checkout, by naming its path."""
    problem = check_git_source(url, None, None).get("repoUrl")
    if problem is not None:
        return problem
    path = local_path(url)
    if path is None:
        return None
    refused = "repositories on the server's own disk are not allowed here (PIPELINES_GIT_ALLOW_LOCAL)"
    if not allow_local or not os.path.isabs(path):
        return refused
    real = Path(os.path.realpath(path))
    for root in allow_local:
        if real.is_relative_to(os.path.realpath(root)):
            return None
    return refused
