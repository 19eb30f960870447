"""The CI entry point (.ci/run) and the make targets it runs: skip reasons shown, no green run without tests."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
NEEDS_MAKE = pytest.mark.skipif(shutil.which("make") is None, reason="needs make: runs the targets with stand-ins")


def _tool(path: Path, body: str) -> None:
    path.write_text(f"#!/bin/sh\n{body}\n")
    path.chmod(path.stat().st_mode | stat.S_IXUSR)


def _fake_bin(tmp_path: Path, pytest_exit: int) -> Path:
    """Stand-ins for the venv's tools: all succeed except pytest, which records its arguments."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for name in ("python", "ruff", "mypy"):
        _tool(bin_dir / name, "exit 0")
    _tool(bin_dir / "pytest", f'echo "$@" >> "{tmp_path}/pytest.args"\nexit {pytest_exit}')
    return bin_dir


def _make(target: str, tmp_path: Path, bin_dir: Path) -> subprocess.CompletedProcess[str]:
    stamp = tmp_path / "installed"
    stamp.touch()
    os.utime(stamp, (2**31, 2**31))  # newer than pyproject.toml: nothing to install
    return subprocess.run(
        ["make", "-s", target, f"BIN={bin_dir}", f"STAMP={stamp}"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )


@NEEDS_MAKE
@pytest.mark.parametrize("target", ["test", "soak"])
def test_make_runs_pytest_showing_skip_reasons(target: str, tmp_path: Path) -> None:
    done = _make(target, tmp_path, _fake_bin(tmp_path, 0))
    assert done.returncode == 0, done.stderr
    args = (tmp_path / "pytest.args").read_text().split()
    summary = [a[2:] for a in args if a.startswith("-r")]
    # Skipped tests are listed with their reasons (a root-only test says so), and so are failures
    # and errors still (a bare -rs would drop them from the summary).
    assert summary and set("fEs") <= set(summary[-1]), args


@NEEDS_MAKE
@pytest.mark.parametrize("target", ["test", "soak"])
def test_a_pytest_run_that_collected_no_test_fails_the_target(target: str, tmp_path: Path) -> None:
    done = _make(target, tmp_path, _fake_bin(tmp_path, 5))  # 5: no tests collected
    assert done.returncode != 0


def test_ci_run_fails_when_a_make_target_fails(tmp_path: Path) -> None:
    calls = tmp_path / "calls"
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    # A make whose soak run collected nothing: .ci/run must not be green.
    _tool(bin_dir / "make", f'echo "$@" >> "{calls}"\n[ "$1" = soak ] && exit 5\nexit 0')
    env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}")
    done = subprocess.run([str(REPO / ".ci" / "run")], env=env, capture_output=True, text=True, timeout=60)
    assert calls.read_text().split() == ["test", "soak"]
    assert done.returncode != 0


def test_a_skip_without_a_reason_is_refused_at_collection(tmp_path: Path) -> None:
    (tmp_path / "conftest.py").write_text("from tests.conftest import pytest_collection_modifyitems  # noqa: F401\n")
    (tmp_path / "test_x.py").write_text(
        "import pytest\n\n"
        "@pytest.mark.skip\ndef test_bare() -> None: ...\n\n"
        "@pytest.mark.skipif(True, reason=' ')\ndef test_blank() -> None: ...\n\n"
        "@pytest.mark.skipif(True, reason='needs root: switching users')\ndef test_clear() -> None: ...\n"
    )
    env = dict(os.environ, PYTHONPATH=str(REPO))
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    output = done.stdout + done.stderr
    assert done.returncode != 0, output
    assert "test_x.py::test_bare: a skip needs a reason" in output
    assert "test_x.py::test_blank: a skip needs a reason" in output
    assert "test_clear" not in output
