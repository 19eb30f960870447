"""The command line's parts without a server: profiles, status lines of a followed run, an absent gateway."""

from __future__ import annotations

import asyncio
import http.server
import json
import socket
import stat
import threading
import uuid
from pathlib import Path
from typing import Any, ClassVar

import pytest

from services.cli import main
from services.cli.errors import UNREACHABLE, CliError
from services.cli.follow import Changes, follow
from services.cli.profiles import config_path, load, remember, resolve


@pytest.fixture
def config_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("XDG_CONFIG_HOME", str(tmp_path))
    for name in ("PIPELINES_API_URL", "PIPELINES_TOKEN", "PIPELINES_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    return tmp_path


def test_a_profile_is_kept_mode_0600_and_the_environment_overrides_it(
    config_home: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    remember(None, "http://ci.example:8080", "tok-default")
    remember("admin", "https://ci.example/api/v1", 'tok-"admin"')
    path = config_home / "pipelines" / "config.toml"
    assert config_path() == path
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load()["current"] == "admin"  # named explicitly: it becomes the current one
    assert resolve("default").token == "tok-default"
    assert (resolve(None).api, resolve(None).token) == ("https://ci.example/api/v1", 'tok-"admin"')
    monkeypatch.setenv("PIPELINES_TOKEN", "from-env")
    monkeypatch.setenv("PIPELINES_API_URL", "http://other:1")
    assert (resolve("default").api, resolve("default").token) == ("http://other:1", "from-env")
    with pytest.raises(CliError) as missing:
        resolve("nobody")
    assert missing.value.code == 2


def test_a_json_config_is_read_and_kept_json(config_home: Path) -> None:
    folder = config_home / "pipelines"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"profiles": {"default": {"api": "http://j:1", "token": "t"}}}))
    assert resolve(None).api == "http://j:1"
    remember("second", "http://j:2", "t2")
    assert json.loads((folder / "config.json").read_text())["profiles"]["second"]["api"] == "http://j:2"
    assert not (folder / "config.toml").exists()


def _run(status: str, step: str, job: str, stage: str) -> dict[str, object]:
    return {
        "id": "r1",
        "status": status,
        "durationMs": None,
        "stageResults": [
            {
                "stageId": "build",
                "name": None,
                "status": stage,
                "durationMs": 1200,
                "jobs": [
                    {"name": "unit", "status": job, "durationMs": 1100, "steps": [{"name": "test", "status": step}]}
                ],
            }
        ],
    }


def test_status_lines_show_each_start_parent_first_and_each_end_parent_last() -> None:
    changes = Changes()
    started = changes.of(_run("running", "running", "running", "running"))
    assert [text for text, _ in started] == [
        "stage build: running",
        "job build/unit: running",
        "step build/unit/test: running",
        "run r1: running",
    ]
    assert changes.of(_run("running", "running", "running", "running")) == []
    ended = changes.of(_run("succeeded", "succeeded", "succeeded", "succeeded"))
    assert [text for text, _ in ended] == [
        "step build/unit/test: succeeded",
        "job build/unit: succeeded 1.1s",
        "stage build: succeeded 1.2s",
        "run r1: succeeded",
    ]


def test_following_with_no_gateway_listening_is_exit_5() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(CliError) as caught:
        asyncio.run(follow(f"ws://127.0.0.1:{port}/api/v1/ws", "token", "run-id"))
    assert caught.value.code == UNREACHABLE


def test_no_api_listening_is_exit_5(config_home: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    monkeypatch.setenv("PIPELINES_API_URL", f"http://127.0.0.1:{port}")
    assert main(["list"]) == UNREACHABLE


class _RefusingSaveApi(http.server.BaseHTTPRequestHandler):
    """An API that validates any spec, creates pipelines, then refuses every spec save (as when a
    component is deleted between the validation and the save); DELETE as `delete_status` says."""

    pipelines: ClassVar[dict[str, dict[str, Any]]] = {}
    delete_status: ClassVar[int] = 204

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def _answer(self, status: int, body: Any = None) -> None:
        content = b"" if body is None else json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(content)))
        self.end_headers()
        self.wfile.write(content)

    def do_GET(self) -> None:
        data = list(self.pipelines.values())
        self._answer(200, {"data": data, "total": len(data), "page": 1, "limit": 100})

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if self.path == "/api/v1/pipelines/validate":
            self._answer(200, {"valid": True, "errors": [], "warnings": []})
        elif self.path == "/api/v1/pipelines":
            pipeline = {"id": str(uuid.uuid4()), "name": body["name"], "description": body.get("description")}
            self.pipelines[pipeline["id"]] = pipeline
            self._answer(201, pipeline)
        else:
            error = {"path": "spec.stages[0].config.componentId", "message": "unknown component 'gone'"}
            self._answer(400, {"statusCode": 400, "message": "invalid", "errors": [error]})

    def do_DELETE(self) -> None:
        if self.delete_status == 204:
            self.pipelines.pop(self.path.rsplit("/", 1)[1])
            self._answer(204)
        else:
            self._answer(self.delete_status, {"statusCode": self.delete_status, "message": "needs the admin role"})


@pytest.mark.parametrize("delete_status", [204, 403])
def test_apply_of_a_new_pipeline_whose_save_is_refused_leaves_no_empty_pipeline_or_says_so(
    config_home: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], delete_status: int
) -> None:
    _RefusingSaveApi.pipelines = {}
    _RefusingSaveApi.delete_status = delete_status
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _RefusingSaveApi)
    serving = threading.Thread(target=server.serve_forever, daemon=True)
    serving.start()
    try:
        monkeypatch.setenv("PIPELINES_API_URL", f"http://127.0.0.1:{server.server_address[1]}")
        monkeypatch.setenv("PIPELINES_TOKEN", "t")
        path = config_home / "p.yaml"
        path.write_text("name: refused\njobs:\n  - name: a\n    steps: [{run: 'true'}]\n")
        assert main(["apply", "-f", str(path)]) == 1
    finally:
        server.shutdown()
        serving.join(timeout=10)
        server.server_close()
    printed = capsys.readouterr().err
    assert "spec.stages[0].config.componentId: unknown component 'gone'" in printed
    if delete_status == 204:
        assert _RefusingSaveApi.pipelines == {}
        assert "pipeline refused was not created" in printed
    else:
        [left] = _RefusingSaveApi.pipelines.values()
        assert f"pipelines delete {left['id']}" in printed
