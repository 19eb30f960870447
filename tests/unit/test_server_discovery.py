"""Without PIPELINES_DATABASE_URL / PIPELINES_NATS_URL, services use the running `make up` of their data
directory (its stack.json) or nothing: never a guessed server."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from infra.config import Settings, stack_file

REPO = Path(__file__).resolve().parents[2]
SECRET = {"PIPELINES_JWT_SECRET": "x" * 32}


def _write_stack(data_dir: Path, pid: int) -> None:
    stack_file(data_dir).write_text(
        json.dumps({"supervisor": pid, "databaseUrl": "postgresql://u:p@127.0.0.1:6001/db", "natsUrl": "nats://h:1"})
    )


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_no_url_and_no_running_stack_means_no_server_not_the_machines_default(tmp_path: Path) -> None:
    s = Settings.from_env({**SECRET, "PIPELINES_DATA_DIR": str(tmp_path)})
    assert s.database_url == "" and s.nats_url == ""
    problem = s.servers_problem()
    assert problem is not None
    assert "PIPELINES_DATABASE_URL" in problem and "make up" in problem and str(tmp_path.resolve()) in problem


def test_the_urls_of_the_running_stack_of_the_data_directory_are_used(tmp_path: Path) -> None:
    _write_stack(tmp_path, os.getpid())  # a live supervisor
    s = Settings.from_env({**SECRET, "PIPELINES_DATA_DIR": str(tmp_path)})
    assert s.database_url == "postgresql://u:p@127.0.0.1:6001/db" and s.nats_url == "nats://h:1"
    assert s.servers_problem() is None


def test_explicit_urls_win_over_the_stack_file(tmp_path: Path) -> None:
    _write_stack(tmp_path, os.getpid())
    env = {**SECRET, "PIPELINES_DATA_DIR": str(tmp_path), "PIPELINES_DATABASE_URL": "postgresql://x/y"}
    s = Settings.from_env(env)
    assert s.database_url == "postgresql://x/y" and s.nats_url == "nats://h:1"


def test_a_stack_file_left_by_a_dead_supervisor_is_ignored(tmp_path: Path) -> None:
    _write_stack(tmp_path, _dead_pid())
    s = Settings.from_env({**SECRET, "PIPELINES_DATA_DIR": str(tmp_path)})
    assert s.database_url == "" and s.servers_problem() is not None


@pytest.mark.parametrize("content", ["not json", "[]", '{"supervisor": "1", "databaseUrl": 5}'])
def test_a_damaged_stack_file_is_ignored(tmp_path: Path, content: str) -> None:
    stack_file(tmp_path).write_text(content)
    assert Settings.from_env({**SECRET, "PIPELINES_DATA_DIR": str(tmp_path)}).database_url == ""


@pytest.mark.parametrize("service", ["projector --rebuild", "relay", "executor", "gateway", "api"])
def test_a_service_without_a_server_refuses_with_a_clear_message(tmp_path: Path, service: str) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIPELINES_")}
    env.update(SECRET, PIPELINES_DATA_DIR=str(tmp_path / "data"), PIPELINES_API_PORT="0", PIPELINES_GATEWAY_PORT="0")
    done = subprocess.run(
        [sys.executable, "-m", *f"services.{service}".split()],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode != 0
    assert "PIPELINES_DATABASE_URL and PIPELINES_NATS_URL are not set" in done.stderr, done.stderr
    assert "make up" in done.stderr and "Traceback" not in done.stderr, done.stderr
