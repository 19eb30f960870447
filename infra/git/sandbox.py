"""Where and as whom Git runs: a private, throw-away HOME holding only what one operation needs
(the pipeline's own deploy key or token), an environment built from nothing, the transports it
may use, and an unprivileged uid when the service is root."""

from __future__ import annotations

import functools
import os
import re
import shutil
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from infra.executor.scripts import ScriptUser, resolve_user
from infra.git.files import GitCredential
from infra.git.policy import is_local, local_path

# Every call is independent of the host's git configuration, runs no hooks or fsmonitor, and may
# use only https, ssh and (when local repositories are allowed) file transports: never `ext::`,
# which runs commands.
_BASE_CONFIG = (
    "-c", "protocol.allow=never",
    "-c", "protocol.https.allow=always",
    "-c", "protocol.ssh.allow=always",
    "-c", "protocol.ext.allow=never",
    "-c", "core.hooksPath=/dev/null",
    "-c", "core.fsmonitor=false",
    "-c", "credential.helper=",
    "-c", "init.defaultBranch=main",
)  # fmt: skip
_ASKPASS = """#!/bin/sh
case "$1" in
  Username*) cat "$(dirname "$0")/username" ;;
  *) cat "$(dirname "$0")/token" ;;
esac
"""


@functools.cache
def _setpriv() -> str | None:
    return shutil.which("setpriv", path="/usr/bin:/bin:/usr/sbin:/sbin")


def git_config(allow_local: bool) -> tuple[str, ...]:
    return (*_BASE_CONFIG, "-c", f"protocol.file.allow={'always' if allow_local else 'never'}")


def as_user(user: ScriptUser | None) -> tuple[list[str], dict[str, Any]]:
    """How to drop to `user` (its uid and group, no supplementary groups, no capabilities): an
    argv prefix (setpriv) or, without setpriv, the subprocess options that do it in the child.
    Nothing when no switch is needed."""
    if user is None:
        return [], {}
    setpriv = _setpriv()
    if setpriv is None:
        return [], {"user": user.uid, "group": user.gid, "extra_groups": []}
    prefix = [
        setpriv,
        f"--reuid={user.uid}",
        f"--regid={user.gid}",
        "--clear-groups",
        "--inh-caps=-all",
        "--bounding-set=-all",
        "--",
    ]
    return prefix, {}


def git_user(spec: str | int | None) -> ScriptUser | None:
    """The user git runs as: `spec` (PIPELINES_GIT_USER), None when that is ourselves."""
    return resolve_user(spec)


def _identity(who: str) -> str:
    cleaned = re.sub(r"[^A-Za-z0-9._@+-]", "_", who)[:100]
    return cleaned or "pipelines"


def _write(path: Path, content: str, user: ScriptUser | None, mode: int = 0o600) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        os.write(fd, content.encode())
    finally:
        os.close(fd)
    if user is not None:
        os.chown(path, user.uid, user.gid)


@dataclass(frozen=True)
class GitHome:
    """The private HOME of one operation (mode 0700, owned by the git user)."""

    path: Path
    user: ScriptUser | None

    def prepare(self) -> None:
        os.chmod(self.path, 0o700)
        if self.user is not None:
            os.chown(self.path, self.user.uid, self.user.gid)

    def env(self, url: str, credential: GitCredential | None, *, author: str | None = None) -> dict[str, str]:
        """Only what git needs: never the service's own variables (database URL, keys, tokens),
        its SSH agent, or its user's ~/.ssh (ssh finds that through the passwd entry, not HOME:
        hence `-F /dev/null` and explicit identity and known-hosts files)."""
        home = self.path
        env = {
            "PATH": os.environ.get("PATH", "/usr/local/bin:/usr/bin:/bin"),
            "HOME": str(home),
            "LANG": "C",
            "LC_ALL": "C",
            "GIT_TERMINAL_PROMPT": "0",
            "GIT_CONFIG_NOSYSTEM": "1",
            "GIT_CONFIG_GLOBAL": str(home / "gitconfig"),
            "GIT_ASKPASS": "/bin/false",
            "SSH_ASKPASS": "/bin/false",
        }
        _write(home / "gitconfig", self._global_config(url), self.user, 0o644)
        ssh = ["ssh", "-F", "/dev/null", "-o", "BatchMode=yes", "-o", "IdentityAgent=none", "-o", "IdentitiesOnly=yes"]
        known = home / "known_hosts"
        if credential is not None and credential.ssh_known_hosts:
            _write(known, credential.ssh_known_hosts.strip() + "\n", self.user)
            ssh += ["-o", "StrictHostKeyChecking=yes"]
        else:
            ssh += ["-o", "StrictHostKeyChecking=accept-new"]
        ssh += ["-o", f"UserKnownHostsFile={known}"]
        if credential is not None and credential.ssh_key and not url.startswith("https://"):
            key = home / "deploy_key"
            _write(key, credential.ssh_key.strip() + "\n", self.user)
            ssh += ["-o", f"IdentityFile={key}"]
        else:
            ssh += ["-o", "IdentityFile=none"]
        env["GIT_SSH_COMMAND"] = " ".join(ssh)
        if credential is not None and credential.token and url.startswith("https://"):
            # The token is answered by an askpass script reading a file only the git user can
            # read: never in an argv (visible in ps) nor in the environment.
            askpass = home / "askpass"
            askpass.mkdir(mode=0o700)
            if self.user is not None:
                os.chown(askpass, self.user.uid, self.user.gid)
            _write(askpass / "token", credential.token, self.user)
            _write(askpass / "username", credential.username, self.user)
            _write(askpass / "run", _ASKPASS, self.user, 0o700)
            env["GIT_ASKPASS"] = str(askpass / "run")
        name = _identity(author or "pipelines")
        env.update(
            GIT_AUTHOR_NAME=name,
            GIT_AUTHOR_EMAIL=f"{name}@pipelines.invalid",
            GIT_COMMITTER_NAME="pipelines",
            GIT_COMMITTER_EMAIL="pipelines@pipelines.invalid",
        )
        return env

    @staticmethod
    def _global_config(url: str) -> str:
        # A local repository (under PIPELINES_GIT_ALLOW_LOCAL, checked before) is usually owned by
        # another user than git's: trust that one repository, and only it, despite its owner.
        path = local_path(url) if is_local(url) else None
        if path is None:
            return ""
        quoted = os.path.realpath(path).replace("\\", "\\\\").replace('"', '\\"')
        return f'[safe]\n\tdirectory = "{quoted}"\n'


def git_command(user: ScriptUser | None, allow_local: bool, args: Sequence[str]) -> tuple[list[str], dict[str, Any]]:
    """The argv of a git call, and the subprocess options that switch its user."""
    prefix, options = as_user(user)
    return [*prefix, "git", *git_config(allow_local), *args], options
