"""Git-backed pipelines: read a pipeline file at a branch head, commit and push a new version of it.

Drives the `git` CLI through asyncio subprocesses: arguments always as a list (never a shell
string), `--` before every repository URL, a clean environment (no service variables or secrets,
`GIT_TERMINAL_PROMPT=0`, no system or global git configuration), a timeout on every call (the
process is killed when it runs out). Every operation works in a fresh temporary repository that
is removed afterwards: nothing is cached between operations, so a push made to the repository by
anyone else is seen by the next read.

Commits are built with plumbing (hash-object, update-index, write-tree, commit-tree) on top of the
fetched branch head, without a working tree; the push is a plain (non-forced) push, so a branch
that moved after our fetch rejects it and the save is a conflict, never an overwrite.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import tempfile
from collections.abc import AsyncIterator
from pathlib import Path

from domain.pipeline import check_git_source
from infra.git.files import FileAtHead, GitConflict, GitError, Pushed, parse_spec, render_spec

# The port's types and the spec formats stay importable from here (infra/http/specs.py uses render_spec).
__all__ = ["FileAtHead", "GitConflict", "GitError", "GitRepos", "Pushed", "parse_spec", "render_spec"]

DEFAULT_TIMEOUT = 30.0
MAX_FILE_BYTES = 1024 * 1024
_SHA = re.compile(r"^[0-9a-fA-F]{7,64}$")
# Options that make every call independent of the host's git configuration and refuse the
# transports that run commands (`ext::`) or read arbitrary local files through submodules.
_SAFE_CONFIG = (
    "-c", "protocol.ext.allow=never",
    "-c", "core.hooksPath=/dev/null",
    "-c", "core.fsmonitor=false",
    "-c", "credential.helper=",
    "-c", "init.defaultBranch=main",
)  # fmt: skip


def _clean_env(home: str, *, author: str | None = None) -> dict[str, str]:
    """Only what git needs: never the service's own variables (database URL, keys, tokens)."""
    env = {
        "PATH": os.environ.get("PATH", "/usr/local/bin:/usr/bin:/bin"),
        "HOME": home,
        "LANG": "C",
        "LC_ALL": "C",
        "GIT_TERMINAL_PROMPT": "0",
        "GIT_CONFIG_NOSYSTEM": "1",
        "GIT_CONFIG_GLOBAL": os.devnull,
        "GIT_ASKPASS": "/bin/false",
        "SSH_ASKPASS": "/bin/false",
        "GIT_SSH_COMMAND": "ssh -o BatchMode=yes -o StrictHostKeyChecking=accept-new",
    }
    # ssh-ish URLs authenticate with the service user's agent, if it has one.
    if os.environ.get("SSH_AUTH_SOCK"):
        env["SSH_AUTH_SOCK"] = os.environ["SSH_AUTH_SOCK"]
    name = _identity(author or "pipelines")
    env.update(
        GIT_AUTHOR_NAME=name,
        GIT_AUTHOR_EMAIL=f"{name}@pipelines.invalid",
        GIT_COMMITTER_NAME="pipelines",
        GIT_COMMITTER_EMAIL="pipelines@pipelines.invalid",
    )
    return env


def _identity(who: str) -> str:
    cleaned = re.sub(r"[^A-Za-z0-9._@+-]", "_", who)[:100]
    return cleaned or "pipelines"


class GitRepos:
    """Git operations on pipeline repositories. `timeout`: seconds per git call; `tmp_root`: where
    the temporary repositories go (the system's temporary directory by default)."""

    def __init__(self, *, timeout: float = DEFAULT_TIMEOUT, tmp_root: Path | None = None) -> None:
        self.timeout = timeout
        self.tmp_root = tmp_root

    async def _git(
        self, cwd: Path, *args: str, env: dict[str, str], stdin: bytes | None = None, check: bool = True
    ) -> tuple[int, str, str]:
        try:
            proc = await asyncio.create_subprocess_exec(
                "git",
                *_SAFE_CONFIG,
                *args,
                cwd=cwd,
                env=env,
                stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                start_new_session=True,
            )
        except OSError as exc:
            raise GitError(f"cannot run git: {exc}") from exc
        try:
            out, err = await asyncio.wait_for(proc.communicate(stdin), self.timeout)
        except BaseException as exc:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, 9)
            with contextlib.suppress(BaseException):
                await asyncio.wait_for(proc.wait(), 5)
            if isinstance(exc, TimeoutError):
                raise GitError(f"git {args[0]} did not finish within {self.timeout:g}s") from None
            raise
        code = proc.returncode or 0
        stdout, stderr = out.decode(errors="replace"), err.decode(errors="replace")
        if check and code != 0:
            raise GitError(f"git {args[0]} failed: {_last_line(stderr)}")
        return code, stdout, stderr

    @contextlib.asynccontextmanager
    async def _scratch(self, author: str | None = None) -> AsyncIterator[tuple[Path, dict[str, str]]]:
        """A fresh, empty bare repository to fetch into, removed afterwards."""
        if self.tmp_root is not None:
            self.tmp_root.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="pipelines-git-", dir=self.tmp_root) as tmp:
            root = Path(tmp)
            env = _clean_env(str(root), author=author)
            await self._git(root, "init", "-q", "--bare", "repo.git", env=env)
            yield root / "repo.git", env

    async def _fetch_head(self, repo: Path, env: dict[str, str], url: str, branch: str) -> str | None:
        """Fetch the branch's head into `repo` as refs/base; its sha, or None when the repository
        has no such branch. GitError when the repository cannot be reached."""
        code, out, err = await self._git(
            repo, "ls-remote", "--heads", "--", url, f"refs/heads/{branch}", env=env, check=False
        )
        if code != 0:
            raise GitError(f"cannot read repository: {_last_line(err)}")
        listed = [line.split("\t", 1) for line in out.splitlines() if "\t" in line]
        if not any(ref == f"refs/heads/{branch}" for _, ref in listed):
            return None
        await self._git(
            repo, "fetch", "-q", "--no-tags", "--depth", "1", "--", url, f"+refs/heads/{branch}:refs/base", env=env
        )
        _, sha, _ = await self._git(repo, "rev-parse", "--verify", "refs/base^{commit}", env=env)
        return sha.strip()

    async def read_file(self, url: str, branch: str, path: str) -> FileAtHead:
        """The file at the branch head, and the head's commit sha."""
        _check(url, branch, path)
        async with self._scratch() as (repo, env):
            sha = await self._fetch_head(repo, env, url, branch)
            if sha is None:
                raise GitError(f"branch {branch!r} does not exist in the repository")
            code, size, _ = await self._git(repo, "cat-file", "-s", f"{sha}:{path}", env=env, check=False)
            if code != 0:
                raise GitError(f"{path} does not exist on branch {branch!r} (commit {sha[:12]})")
            if int(size.strip() or 0) > MAX_FILE_BYTES:
                raise GitError(f"{path} is larger than {MAX_FILE_BYTES // 1024} KiB")
            _, out, _ = await self._git(repo, "cat-file", "blob", f"{sha}:{path}", env=env)
            return FileAtHead(content=out, commit_sha=sha, branch=branch)

    async def commit_file(
        self,
        url: str,
        branch: str,
        path: str,
        content: str,
        *,
        message: str,
        author: str,
        expected_head: str | None = None,
        push_to: str | None = None,
    ) -> Pushed:
        """Commit `content` as `path` on top of the head of `branch` and push it: to `branch`
        itself (direct), or to the new branch `push_to` (pr), which must not exist yet.

        GitConflict when `expected_head` is given and is not the branch head, or when the branch
        moved between our fetch and our push (the push is never forced)."""
        _check(url, branch, path)
        if push_to is not None:
            _check(url, push_to, path)
        if expected_head is not None and not _SHA.match(expected_head):
            raise GitError(f"expectedHeadCommitSha {expected_head!r} is not a commit sha (7-64 hex digits)")
        async with self._scratch(author) as (repo, env):
            head = await self._fetch_head(repo, env, url, branch)
            if expected_head is not None and (head is None or not head.startswith(expected_head.lower())):
                raise GitConflict(
                    f"branch {branch!r} is at {head or 'no commit'}, not at expectedHeadCommitSha {expected_head}"
                )
            _, blob, _ = await self._git(repo, "hash-object", "-w", "--stdin", env=env, stdin=content.encode())
            index_env = {**env, "GIT_INDEX_FILE": str(repo / "pipelines-index")}
            if head is not None:
                await self._git(repo, "read-tree", head, env=index_env)
            await self._git(
                repo, "update-index", "--add", "--cacheinfo", f"100644,{blob.strip()},{path}", env=index_env
            )
            _, tree, _ = await self._git(repo, "write-tree", env=index_env)
            parents = ["-p", head] if head is not None else []
            _, sha, _ = await self._git(
                repo,
                "commit-tree",
                tree.strip(),
                *parents,
                "-F",
                "-",
                env=env,
                stdin=(message.strip() or "Update pipeline").encode() + b"\n",
            )
            sha = sha.strip()
            target = push_to or branch
            code, _, err = await self._git(
                repo, "push", "--porcelain", "--", url, f"{sha}:refs/heads/{target}", env=env, check=False
            )
            if code != 0:
                if push_to is not None and ("already exists" in err or "rejected" in err):
                    raise GitConflict(f"branch {push_to!r} already exists in the repository")
                if "rejected" in err or "non-fast-forward" in err or "fetch first" in err:
                    raise GitConflict(f"branch {branch!r} moved while saving; read it again and retry")
                raise GitError(f"cannot push to the repository: {_last_line(err)}")
            return Pushed(commit_sha=sha, branch=target, parent_sha=head)


def _check(url: str, branch: str, path: str) -> None:
    errors = check_git_source(url, branch, path)
    if errors:
        raise GitError("; ".join(f"{k}: {v}" for k, v in errors.items()))


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    # fatal:/error: lines say what went wrong; hints and progress do not
    for line in lines:
        if line.startswith(("fatal:", "error:", "remote: error", "!")):
            return line
    return lines[-1] if lines else "no output"
