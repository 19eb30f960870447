"""What crosses the Git port: its errors, a file at a branch head, a pushed commit, the credential
a pipeline's organization registered, and the spec file's formats (render and parse), shared by
the adapter and the application layer."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import yaml

from domain.pipeline import SpecFormat, check_git_source
from domain.spec import TOP_FIELDS


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


@dataclass(frozen=True, repr=False)
class GitCredential:
    """What Git may authenticate with for one pipeline (stored secrets of its organization or of
    the pipeline itself): an SSH deploy key for ssh URLs, a token for https URLs, and optionally
    the known host keys to check the server against. Never in a repr (logs, tracebacks)."""

    ssh_key: str | None = None
    ssh_known_hosts: str | None = None
    token: str | None = None
    username: str = "x-access-token"


def check_repo_url(url: str) -> str | None:
    """An error message when `url` is not an allowed repository URL, else None."""
    return check_git_source(url, None, None).get("repoUrl")


def render_spec(spec: dict[str, Any], fmt: str) -> str:
    """The spec as stored in Git and returned as text: YAML (`yaml`, `yml`) or JSON."""
    if fmt in ("yaml", "yml"):
        return yaml.safe_dump(spec, sort_keys=False, allow_unicode=True)
    return json.dumps(spec, indent=2, ensure_ascii=False) + "\n"


def _not_a_spec(path: str, fmt: str, line: int | None = None) -> GitError:
    # Never the parser's own message: it quotes the offending line, and the file may be anything
    # in the repository (a config file with credentials in it), not a pipeline spec.
    where = f" (line {line})" if line is not None else ""
    return GitError(f"not a valid {fmt} pipeline spec at {path}{where}")


def parse_spec(text: str, path: str) -> tuple[Any, SpecFormat]:
    """The spec in a pipeline file, and its format (`json` when it is a JSON document, else `yaml`).
    Raises GitError naming the file (and a line at most) when it is neither, or when it is not
    shaped like a pipeline spec at all (an object of spec fields with `stages` or `jobs`): such a
    file's validation errors would quote its keys and values."""
    stripped = text.lstrip()
    spec: Any
    fmt: SpecFormat
    if stripped.startswith("{") or path.endswith(".json"):
        try:
            spec, fmt = json.loads(text), "json"
        except ValueError as exc:
            if path.endswith(".json"):
                raise _not_a_spec(path, "JSON", getattr(exc, "lineno", None)) from None
        else:
            return _shaped(spec, path, "JSON"), fmt
    try:
        spec = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        raise _not_a_spec(path, "YAML", mark.line + 1 if mark is not None else None) from None
    return _shaped(spec, path, "YAML"), ("yml" if path.endswith(".yml") else "yaml")


def _shaped(spec: Any, path: str, fmt: str) -> Any:
    if not isinstance(spec, dict) or not (set(spec) & {"stages", "jobs"}) or not set(spec) <= TOP_FIELDS:
        raise _not_a_spec(path, fmt)
    return spec
