"""The script runner on its own: a working directory prepared once per run, and scripts awaited
through pidfds (in a process of its own, as the executor service runs it)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from infra.config import Settings, parse_limit
from infra.executor.sandbox import Limits
from infra.executor.scripts import ScriptUser, prepare_workdir
from infra.executor.units import sandbox_of

ROOT = Path(__file__).resolve().parents[2]


def test_a_prepared_working_directory_is_left_as_it_is(tmp_path: Path) -> None:
    workdir = tmp_path / "work" / "run-1"
    prepare_workdir(workdir, None)
    assert workdir.is_dir() and (workdir.stat().st_mode & 0o777) == 0o700
    (workdir / "artifact").write_text("kept")
    prepare_workdir(workdir, None)  # the next stage of the same run
    assert (workdir / "artifact").read_text() == "kept"


@pytest.mark.skipif(os.geteuid() != 0, reason="giving a directory to another user needs root")
def test_a_directory_of_another_user_is_made_the_scripts_own_again(tmp_path: Path) -> None:
    workdir = tmp_path / "work" / "run-1"
    prepare_workdir(workdir, ScriptUser(uid=230001, gid=230001, name="230001"))
    assert (workdir.stat().st_uid, workdir.stat().st_mode & 0o777) == (230001, 0o700)
    prepare_workdir(workdir, ScriptUser(uid=230002, gid=230002, name="230002"))  # another uid now
    assert workdir.stat().st_uid == 230002
    os.chmod(workdir, 0o755)
    prepare_workdir(workdir, ScriptUser(uid=230002, gid=230002, name="230002"))
    assert workdir.stat().st_mode & 0o777 == 0o700


def test_scripts_run_and_end_with_the_pidfd_child_watcher(tmp_path: Path) -> None:
    code = textwrap.dedent(
        f"""
        import asyncio, sys
        from pathlib import Path
        from infra.executor.scripts import ScriptRun, watch_children_with_pidfds

        async def main() -> None:
            used = watch_children_with_pidfds()
            lines = []
            outcomes = []
            for command in ("echo one", "exit 3", "echo two; sleep 0.05"):
                outcome = await ScriptRun(kill_grace=1).run(
                    command, workdir=Path({str(tmp_path)!r}) / "w", env={{"PATH": "/usr/bin:/bin"}},
                    timeout=10, on_line=lambda stream, text: lines.append(text),
                )
                outcomes.append(outcome.exit_code)
            timed = await ScriptRun(kill_grace=1).run(
                "sleep 5", workdir=Path({str(tmp_path)!r}) / "w", env={{}}, timeout=0.2, on_line=lambda s, t: None
            )
            print(used, outcomes, lines, timed.timed_out)

        asyncio.run(main())
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    used, rest = done.stdout.split(" ", 1)
    assert used == ("True" if sys.version_info < (3, 12) else "False")
    assert rest.strip() == "[0, 3, 0] ['one', 'two'] True"


def test_the_script_text_is_never_on_a_command_line(tmp_path: Path) -> None:
    code = textwrap.dedent(
        f"""
        import asyncio
        from pathlib import Path
        from infra.executor.scripts import ScriptRun

        async def main() -> None:
            lines = []
            outcome = await ScriptRun(kill_grace=1).run(
                "tr '\\\\0' ' ' < /proc/$$/cmdline; echo; ls ..  # hunter2-secret",
                workdir=Path({str(tmp_path)!r}) / "w", env={{"PATH": "/usr/bin:/bin"}},
                timeout=10, on_line=lambda stream, text: lines.append(text),
            )
            print(outcome.exit_code, lines)

        asyncio.run(main())
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("0 ["), done.stdout
    assert "/bin/sh " in done.stdout and "hunter2" not in done.stdout.split(",")[0], done.stdout
    private = tmp_path / ".sandbox" / "w"
    assert private.stat().st_mode & 0o777 == 0o700 and list(private.glob("*.sh")) == []  # removed once run


@pytest.mark.parametrize(
    ("raw", "size", "expected"),
    [
        ("", True, 7),
        ("512M", True, 512 * 1024**2),
        ("4g", True, 4 * 1024**3),
        ("2GiB", True, 2 * 1024**3),
        ("1000", False, 1000),
        ("unlimited", False, None),
        ("0", True, None),
    ],
)
def test_limits_are_counts_or_sizes_or_unlimited(raw: str, size: bool, expected: int | None) -> None:
    assert parse_limit({"PIPELINES_X": raw}, "PIPELINES_X", 7, size=size) == expected


@pytest.mark.parametrize(
    ("name", "raw"),
    [
        ("PIPELINES_SCRIPT_MAX_MEMORY", "4x"),
        ("PIPELINES_SCRIPT_MAX_PROCS", "1G"),
        ("PIPELINES_SCRIPT_NETWORK", "bridge"),
    ],
)
def test_bad_sandbox_settings_name_the_variable(name: str, raw: str) -> None:
    with pytest.raises(ValueError, match=name):
        Settings.from_env({name: raw, "PIPELINES_JWT_SECRET": "x" * 32})


def test_sandbox_settings_default_and_reach_the_limits() -> None:
    settings = Settings.from_env(
        {"PIPELINES_JWT_SECRET": "x" * 32, "PIPELINES_SCRIPT_NETWORK": "none", "PIPELINES_SCRIPT_MAX_FILE_SIZE": "1M"}
    )
    sandbox = sandbox_of(settings)
    assert sandbox.network is False
    assert sandbox.limits == Limits(procs=4096, open_files=4096, file_size=1024**2, memory=8 * 1024**3)
