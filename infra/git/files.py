"""What crosses the Git port: its errors, a file at a branch head, a pushed commit, and the spec
file's formats (render and parse), shared by the adapter and the application layer."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import yaml

from domain.pipeline import SpecFormat, check_git_source


class GitError(Exception):
    """The repository cannot be read or written (unreachable, no such branch or file, git failed)."""


class GitConflict(GitError):
    """The branch head is not the commit the caller expected, or moved while we pushed."""


@dataclass(frozen=True)
class FileAtHead:
    content: str
    commit_sha: str
    branch: str


@dataclass(frozen=True)
class Pushed:
    commit_sha: str
    branch: str
    # The head of the base branch the commit was made on (None: the branch did not exist).
    parent_sha: str | None


def check_repo_url(url: str) -> str | None:
    """An error message when `url` is not an allowed repository URL, else None."""
    return check_git_source(url, None, None).get("repoUrl")


def render_spec(spec: dict[str, Any], fmt: str) -> str:
    """The spec as stored in Git and returned as text: YAML (`yaml`, `yml`) or JSON."""
    if fmt in ("yaml", "yml"):
        return yaml.safe_dump(spec, sort_keys=False, allow_unicode=True)
    return json.dumps(spec, indent=2, ensure_ascii=False) + "\n"


def parse_spec(text: str, path: str) -> tuple[Any, SpecFormat]:
    """The spec in a pipeline file, and its format (`json` when it is a JSON document, else `yaml`).
    Raises GitError naming the file when it is neither."""
    stripped = text.lstrip()
    if stripped.startswith("{") or path.endswith(".json"):
        try:
            return json.loads(text), "json"
        except ValueError as exc:
            if path.endswith(".json"):
                raise GitError(f"{path} is not valid JSON: {exc}") from exc
    try:
        return yaml.safe_load(text), ("yml" if path.endswith(".yml") else "yaml")
    except yaml.YAMLError as exc:
        raise GitError(f"{path} is not valid YAML: {exc}") from exc
