"""Git-backed pipelines: read a pipeline file at a branch head, commit and push a new version of it.

Drives the `git` CLI through asyncio subprocesses: arguments always as a list (never a shell
string), `--` before every repository URL, as an unprivileged user when the service is root, in a
clean environment with a private HOME (see sandbox.py), a timeout on every call (the process is
killed when it runs out). A repository on the server's own disk is refused unless it lies under
an allowed directory (policy.py), at every call. Every operation works in a fresh temporary
repository that is removed afterwards: nothing is cached between operations, so a push made to the
repository by anyone else is seen by the next read.

Commits are built with plumbing (hash-object, update-index, write-tree, commit-tree) on top of the
fetched branch head, without a working tree; the push is a plain (non-forced) push, so a branch
that moved after our fetch rejects it and the save is a conflict, never an overwrite.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import subprocess
import tempfile
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

from domain.pipeline import check_git_source
from infra.config import Settings
from infra.executor.scripts import ScriptUser
from infra.git.files import FileAtHead, GitConflict, GitCredential, GitError, Pushed, parse_spec, render_spec
from infra.git.policy import repo_url_problem
from infra.git.sandbox import GitHome, git_command, git_user

# The port's types and the spec formats stay importable from here (infra/http/specs.py uses render_spec).
__all__ = ["FileAtHead", "GitConflict", "GitError", "GitRepos", "Pushed", "parse_spec", "render_spec"]

DEFAULT_TIMEOUT = 30.0
MAX_FILE_BYTES = 1024 * 1024
_SHA = re.compile(r"^[0-9a-fA-F]{7,64}$")


class GitRepos:
    """Git operations on pipeline repositories. `timeout`: seconds per git call; `tmp_root`: where
    the temporary repositories go (the system's temporary directory by default); `allow_local`:
    the directories whose repositories may be used (none: no repository on this machine);
    `user`: who git runs as (None: ourselves)."""

    def __init__(
        self,
        *,
        timeout: float = DEFAULT_TIMEOUT,
        tmp_root: Path | None = None,
        allow_local: Sequence[Path] = (),
        user: ScriptUser | None = None,
    ) -> None:
        self.timeout = timeout
        self.tmp_root = tmp_root
        self.allow_local = tuple(allow_local)
        self.user = user

    @classmethod
    def from_settings(cls, settings: Settings) -> GitRepos:
        return cls(allow_local=settings.git_allow_local, user=git_user(settings.git_user))

    async def _git(
        self, cwd: Path, *args: str, env: dict[str, str], stdin: bytes | None = None, check: bool = True
    ) -> tuple[int, str, str]:
        argv, switch = git_command(self.user, bool(self.allow_local), args)
        try:
            proc = await asyncio.create_subprocess_exec(
                *argv,
                cwd=cwd,
                env=env,
                stdin=asyncio.subprocess.PIPE if stdin is not None else asyncio.subprocess.DEVNULL,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                start_new_session=True,
                **switch,
            )
        except (OSError, ValueError, subprocess.SubprocessError) as exc:
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
    async def _scratch(
        self, url: str, credential: GitCredential | None, author: str | None = None
    ) -> AsyncIterator[tuple[Path, dict[str, str]]]:
        """A fresh, empty bare repository to fetch into, in a private HOME (the pipeline's own
        credential in it), removed afterwards."""
        if self.tmp_root is not None:
            self.tmp_root.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="pipelines-git-", dir=self.tmp_root) as tmp:
            home = GitHome(Path(tmp), self.user)
            try:
                home.prepare()
                env = home.env(url, credential, author=author)
            except OSError as exc:
                raise GitError(f"cannot prepare git's private directory: {exc}") from exc
            await self._git(home.path, "init", "-q", "--bare", "repo.git", env=env)
            yield home.path / "repo.git", env

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

    async def read_file(
        self, url: str, branch: str, path: str, *, credential: GitCredential | None = None
    ) -> FileAtHead:
        """The file at the branch head, and the head's commit sha."""
        self._check(url, branch, path)
        async with self._scratch(url, credential) as (repo, env):
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
        credential: GitCredential | None = None,
    ) -> Pushed:
        """Commit `content` as `path` on top of the head of `branch` and push it: to `branch`
        itself (direct), or to the new branch `push_to` (pr), which must not exist yet.

        GitConflict when `expected_head` is given and is not the branch head, or when the branch
        moved between our fetch and our push (the push is never forced)."""
        self._check(url, branch, path)
        if push_to is not None:
            self._check(url, push_to, path)
        if expected_head is not None and not _SHA.match(expected_head):
            raise GitError(f"expectedHeadCommitSha {expected_head!r} is not a commit sha (7-64 hex digits)")
        async with self._scratch(url, credential, author) as (repo, env):
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

    def _check(self, url: str, branch: str, path: str) -> None:
        errors = check_git_source(url, branch, path)
        # Checked at every call, not only when the pipeline was saved: the allowed directories may
        # have changed since, and a symlink under one may now lead elsewhere.
        if "repoUrl" not in errors and (problem := repo_url_problem(url, self.allow_local)) is not None:
            errors["repoUrl"] = problem
        if errors:
            raise GitError("; ".join(f"{k}: {v}" for k, v in errors.items()))


def _last_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    # fatal:/error: lines say what went wrong; hints and progress do not
    for line in lines:
        if line.startswith(("fatal:", "error:", "remote: error", "!")):
            return line
    return lines[-1] if lines else "no output"
