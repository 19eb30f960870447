"""Which repository URLs Git may reach (infra/git/policy.py) and how PIPELINES_GIT_ALLOW_LOCAL is read."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from infra.config import Settings
from infra.git.policy import repo_url_problem


@pytest.mark.parametrize(
    "url",
    ["https://example.com/acme/app.git", "ssh://git@example.com/acme/app.git", "git@example.com:acme/app.git"],
)
def test_network_urls_need_no_allowed_directory(url: str) -> None:
    assert repo_url_problem(url, ()) is None


def test_local_repositories_are_refused_unless_under_an_allowed_directory(tmp_path: Path) -> None:
    allowed, elsewhere = tmp_path / "repos", tmp_path / "repos-evil"
    (allowed / "app.git").mkdir(parents=True)
    (elsewhere / "app.git").mkdir(parents=True)
    for url in (f"file://{allowed}/app.git", f"{allowed}/app.git"):
        assert repo_url_problem(url, ()) is not None  # nothing is allowed by default
        assert repo_url_problem(url, (allowed,)) is None
    # a sibling whose name merely starts with the allowed one is not under it
    assert repo_url_problem(f"{elsewhere}/app.git", (allowed,)) is not None
    # symlinks are resolved before comparing, whichever side they are on
    (allowed / "out").symlink_to(elsewhere)
    assert repo_url_problem(f"file://{allowed}/out/app.git", (allowed,)) is not None
    (tmp_path / "alias").symlink_to(allowed)
    assert repo_url_problem(f"{allowed}/app.git", (tmp_path / "alias",)) is None
    for url in (f"{allowed}/../repos-evil/app.git", "relative/app.git", "ext::sh -c id", "/"):
        assert repo_url_problem(url, (allowed,)) is not None


def test_the_allowed_directories_are_read_from_the_environment() -> None:
    base = {"PIPELINES_JWT_SECRET": "x" * 40}
    assert Settings.from_env(base).git_allow_local == ()
    raw = f"/srv/repos{os.pathsep}/opt/git, /home/git"
    got = Settings.from_env({**base, "PIPELINES_GIT_ALLOW_LOCAL": raw}).git_allow_local
    assert got == (Path("/srv/repos"), Path("/opt/git"), Path("/home/git"))
    with pytest.raises(ValueError, match="absolute"):
        Settings.from_env({**base, "PIPELINES_GIT_ALLOW_LOCAL": "repos"})
    assert Settings.from_env({**base, "PIPELINES_GIT_USER": "daemon"}).git_user == "daemon"
