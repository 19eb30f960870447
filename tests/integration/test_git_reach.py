"""Git has no ambient reach, tried as an attacker would through the real API (real PostgreSQL and
NATS): another organization's repository or the service's own checkout named as `repoUrl`, a
non-spec file named as `pipelineFilePath`, and the environment and user Git is launched with (seen
through a fake `git` that the test puts first on PATH and that dumps what it was given)."""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
import yaml

from infra.git.files import GitError
from infra.git.repos import GitRepos
from tests.integration.system import System, make_settings, running_system

pytestmark = pytest.mark.integration

CHECKOUT = Path(__file__).resolve().parents[2]
SPEC = {"stages": [{"id": "s", "type": "script", "config": {"command": "echo hi"}}]}
DEPLOY_KEY = "-----BEGIN OPENSSH PRIVATE KEY-----\norg-a-deploy-key-material\n-----END OPENSSH PRIVATE KEY-----"
TOKEN = "org-c-https-token-0123456789"
_ENV = {
    "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
    "HOME": "/nonexistent",
    "GIT_CONFIG_NOSYSTEM": "1",
    "GIT_CONFIG_GLOBAL": os.devnull,
    "GIT_AUTHOR_NAME": "tester",
    "GIT_AUTHOR_EMAIL": "tester@example.invalid",
    "GIT_COMMITTER_NAME": "tester",
    "GIT_COMMITTER_EMAIL": "tester@example.invalid",
}
FAKE_GIT = """#!/bin/sh
# An attacker's view of how git is launched: everything it was given, then a failure.
d="{dump}/$$"
mkdir -p "$d"
env > "$d/env"
id -u > "$d/uid"
printf '%s\\n' "$@" > "$d/args"
stat -c '%a %u' "$HOME" > "$d/home"
key=$(printf '%s' "$GIT_SSH_COMMAND" | sed -n 's/.*IdentityFile=\\([^ ]*\\).*/\\1/p')
printf '%s' "$key" > "$d/identity"
[ -f "$key" ] && cat "$key" > "$d/key"
if [ "$GIT_ASKPASS" != /bin/false ]; then
  "$GIT_ASKPASS" "Username for 'https://example.invalid': " > "$d/username"
  "$GIT_ASKPASS" "Password for 'https://x@example.invalid': " > "$d/password"
fi
echo "fatal: this is the test's fake git" >&2
exit 128
"""


def git(cwd: Path, *args: str) -> str:
    out = subprocess.run(["git", *args], cwd=cwd, env=_ENV, check=True, capture_output=True, text=True, timeout=30)
    return out.stdout.strip()


def shared_dir(prefix: str, mode: int = 0o755) -> Path:
    """A directory outside pytest's private temporary directories: the git user can reach it."""
    path = Path(tempfile.mkdtemp(prefix=prefix))
    path.chmod(mode)
    return path


def bare_repo(root: Path, files: dict[str, str]) -> Path:
    bare = root / f"{uuid.uuid4().hex[:8]}.git"
    git(root, "init", "-q", "--bare", "--shared=0666", "-b", "main", str(bare))
    work = root / f"work-{uuid.uuid4().hex[:8]}"
    git(root, "clone", "-q", str(bare), str(work))
    for name, content in files.items():
        (work / name).parent.mkdir(parents=True, exist_ok=True)
        (work / name).write_text(content)
        git(work, "add", name)
    git(work, "commit", "-q", "-m", "initial")
    git(work, "push", "-q", "origin", "HEAD:refs/heads/main")
    shutil.rmtree(work)
    return bare


@pytest.fixture(scope="module")
def allowed() -> Iterator[Path]:
    root = shared_dir("pipelines-allowed-repos-")
    yield root
    shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="module")
def org_a_repo() -> Iterator[Path]:
    """Organization A's repository, on the server's disk outside the allowed directory."""
    root = shared_dir("pipelines-org-a-")
    yield bare_repo(root, {"pipeline.yaml": yaml.safe_dump(SPEC)})
    shutil.rmtree(root, ignore_errors=True)


@pytest_asyncio.fixture(scope="module", loop_scope="session")
async def system(
    database_url: str, nats_url: str, tmp_path_factory: pytest.TempPathFactory, allowed: Path
) -> AsyncIterator[System]:
    settings = make_settings(database_url, nats_url, tmp_path_factory.mktemp("data"), git_allow_local=(allowed,))
    async with running_system(settings) as s:
        yield s


def org_b(system: System, role: str = "member") -> dict[str, str]:
    return system.headers(role, sub="mallory", org=f"org-b-{system.org}")


async def create(system: System, headers: dict[str, str], **fields: Any) -> Any:
    body = {"name": f"git-{uuid.uuid4().hex[:8]}", **fields}
    return await system.client.post("/api/v1/pipelines", json=body, headers=headers)


def refused_naming_repo_url(r: Any) -> None:
    assert r.status_code == 400, r.text
    assert [e["path"] for e in r.json()["errors"]] == ["repoUrl"], r.text


async def test_another_organizations_repository_path_is_refused(system: System, org_a_repo: Path) -> None:
    head = git(org_a_repo, "rev-parse", "main")
    for url in (f"file://{org_a_repo}", str(org_a_repo), f"file://{org_a_repo}/", f"{org_a_repo}/."):
        refused_naming_repo_url(await create(system, org_b(system), repoUrl=url))
    # nor by changing an existing pipeline's repository
    r = await create(system, org_b(system))
    assert r.status_code == 201, r.text
    pid = r.json()["id"]
    for method in ("patch", "put"):
        r = await getattr(system.client, method)(
            f"/api/v1/pipelines/{pid}", json={"name": f"b-{method}", "repoUrl": str(org_a_repo)}, headers=org_b(system)
        )
        refused_naming_repo_url(r)
    assert git(org_a_repo, "rev-parse", "main") == head


async def test_the_services_own_checkout_is_refused(system: System, allowed: Path) -> None:
    for url in (f"file://{CHECKOUT}", str(CHECKOUT), f"file://{CHECKOUT}/.git", "/", "file:///etc"):
        refused_naming_repo_url(await create(system, org_b(system), repoUrl=url))
    # a symlink under the allowed directory is resolved before it is compared
    link = allowed / f"link-{uuid.uuid4().hex[:8]}"
    link.symlink_to(CHECKOUT)
    refused_naming_repo_url(await create(system, org_b(system), repoUrl=f"file://{link}"))
    for url in ("ext::sh -c id", "relative/path", "./repo.git", "host:path/repo.git"):
        refused_naming_repo_url(await create(system, org_b(system), repoUrl=url))


async def test_a_local_url_recorded_earlier_is_refused_at_every_git_call(system: System, org_a_repo: Path) -> None:
    """A pipeline that already names a path (saved before the allowed directories changed) gets
    nothing out of it: Git checks the URL again at each call."""
    head = git(org_a_repo, "rev-parse", "main")
    state = await system.commands.create_pipeline(
        name=f"old-{uuid.uuid4().hex[:8]}",
        description=None,
        stages=[],
        org=f"org-b-{system.org}",
        by="mallory",
        repo_url=f"file://{org_a_repo}",
    )
    pid, headers = state.pipeline_id, org_b(system)
    r = await system.client.get(f"/api/v1/pipelines/{pid}/spec", headers=headers)
    assert r.status_code == 400 and "echo hi" not in r.text, r.text
    r = await system.client.post(f"/api/v1/pipelines/{pid}/trigger", headers=headers)
    refused_naming_repo_url(r)
    r = await system.client.post(
        f"/api/v1/pipelines/{pid}/spec/save", json={"spec": {**SPEC, "variables": {"X": "pwned"}}}, headers=headers
    )
    refused_naming_repo_url(r)
    assert git(org_a_repo, "rev-parse", "main") == head


async def test_a_file_that_is_not_a_spec_is_refused_without_quoting_it(system: System, allowed: Path) -> None:
    files = {
        "pyproject.toml": (CHECKOUT / "pyproject.toml").read_text(),
        "Makefile": (CHECKOUT / "Makefile").read_text(),
        "config.yaml": "database:\n  password: correct-horse-battery\n  user: admin\n",
        "ci.json": '{"token": "correct-horse-battery"}',
    }
    bare = bare_repo(allowed, files)
    headers = system.headers("member")
    for path, content in files.items():
        r = await create(system, headers, repoUrl=f"file://{bare}", pipelineFilePath=path)
        assert r.status_code == 201, r.text
        pid = r.json()["id"]
        answers = [
            await system.client.post(f"/api/v1/pipelines/{pid}/trigger", headers=headers),
            await system.client.get(f"/api/v1/pipelines/{pid}/spec", headers=headers),
        ]
        for answer in answers:
            assert answer.status_code == 400, answer.text
            message = answer.json()["message"]
            assert f"pipeline spec at {path}" in message, message
            quoted = [
                line.strip() for line in content.splitlines() if len(line.strip()) >= 4 and line.strip() in answer.text
            ]
            assert quoted == [], (path, quoted)
            assert "correct-horse-battery" not in answer.text and "password" not in answer.text


def _read_dump(dump: Path) -> dict[str, str]:
    (one,) = [d for d in dump.iterdir() if d.is_dir()]
    out = {f.name: f.read_text() for f in one.iterdir()}
    shutil.rmtree(one)
    return out


@pytest.fixture
def fake_git(monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """A `git` first on PATH that dumps its environment, user, arguments, HOME and identity file;
    the service's own environment carries an SSH agent and variables git must not see."""
    bindir, dump = shared_dir("pipelines-fake-git-"), shared_dir("pipelines-git-dump-", 0o777)
    (bindir / "git").write_text(FAKE_GIT.format(dump=dump))
    (bindir / "git").chmod(0o755)
    monkeypatch.setenv("PATH", f"{bindir}:{os.environ['PATH']}")
    monkeypatch.setenv("SSH_AUTH_SOCK", "/tmp/service-agent.sock")
    monkeypatch.setenv("PIPELINES_CANARY", "service-canary-value")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "service-canary-value")
    yield dump
    shutil.rmtree(bindir, ignore_errors=True)
    shutil.rmtree(dump, ignore_errors=True)


def _assert_confined(seen: dict[str, str]) -> dict[str, str]:
    env = dict(line.split("=", 1) for line in seen["env"].splitlines() if "=" in line)
    assert "SSH_AUTH_SOCK" not in env and "service-canary-value" not in seen["env"]
    assert not [k for k in env if k.startswith("PIPELINES_")]
    assert env["GIT_CONFIG_NOSYSTEM"] == "1" and env["GIT_TERMINAL_PROMPT"] == "0"
    assert env["HOME"].startswith(tempfile.gettempdir()) and env["GIT_CONFIG_GLOBAL"].startswith(env["HOME"])
    ssh = env["GIT_SSH_COMMAND"]
    assert "-F /dev/null" in ssh and "IdentityAgent=none" in ssh and "IdentitiesOnly=yes" in ssh
    assert "protocol.ext.allow=never" in seen["args"].splitlines()
    uid = pwd.getpwnam("nobody").pw_uid if os.geteuid() == 0 else os.geteuid()
    assert seen["uid"].strip() == str(uid)
    assert seen["home"].split() == ["700", str(uid)]
    if os.geteuid() == 0:
        assert uid != 0  # git never runs as root
    return env


async def test_git_runs_confined_with_only_the_pipelines_own_deploy_key(system: System, fake_git: Path) -> None:
    admin = system.headers("admin")
    r = await create(system, admin, repoUrl="git@example.invalid:org-a/app.git")
    a = r.json()["id"]
    r = await system.client.put(
        "/api/v1/secrets/GIT_SSH_KEY", params={"pipelineId": a}, json={"value": DEPLOY_KEY}, headers=admin
    )
    assert r.status_code == 201, r.text
    refused_naming_repo_url(await system.client.post(f"/api/v1/pipelines/{a}/trigger", headers=admin))
    seen = _read_dump(fake_git)
    env = _assert_confined(seen)
    assert f"IdentityFile={seen['identity']}" in env["GIT_SSH_COMMAND"]
    assert seen["identity"].startswith(env["HOME"]) and seen["key"].strip() == DEPLOY_KEY
    assert DEPLOY_KEY not in seen["env"] and "org-a-deploy-key" not in seen["args"]

    # organization B's pipeline on the same host gets no key at all: not A's, not the service's
    r = await create(system, org_b(system), repoUrl="ssh://git@example.invalid/org-a/app.git")
    b = r.json()["id"]
    refused_naming_repo_url(await system.client.post(f"/api/v1/pipelines/{b}/trigger", headers=org_b(system)))
    seen = _read_dump(fake_git)
    env = _assert_confined(seen)
    assert seen["identity"] == "none" and "key" not in seen
    assert "org-a-deploy-key" not in "".join(seen.values())


async def test_an_https_token_reaches_git_only_through_its_askpass(system: System, fake_git: Path) -> None:
    org = f"org-c-{system.org}"
    admin = system.headers("admin", org=org)
    r = await system.client.put("/api/v1/secrets/GIT_TOKEN", json={"value": TOKEN}, headers=admin)
    assert r.status_code == 201, r.text
    r = await create(system, admin, repoUrl="https://example.invalid/org-c/app.git")
    pid = r.json()["id"]
    refused_naming_repo_url(await system.client.post(f"/api/v1/pipelines/{pid}/trigger", headers=admin))
    seen = _read_dump(fake_git)
    _assert_confined(seen)
    assert seen["password"].strip() == TOKEN and seen["username"].strip() == "x-access-token"
    assert TOKEN not in seen["env"] and TOKEN not in seen["args"]


async def test_without_allowed_directories_git_refuses_the_file_transport(fake_git: Path, org_a_repo: Path) -> None:
    repos = GitRepos.from_settings(make_settings("postgresql://unused", "nats://unused", Path("/nonexistent")))
    with pytest.raises(GitError, match="repoUrl"):
        await repos.read_file(f"file://{org_a_repo}", "main", "pipeline.yaml")
    with pytest.raises(GitError):
        await repos.read_file("git@example.invalid:a/b.git", "main", "pipeline.yaml")
    seen = _read_dump(fake_git)
    _assert_confined(seen)
    assert "protocol.file.allow=never" in seen["args"].splitlines()
