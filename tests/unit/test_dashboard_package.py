"""An installed wheel carries every file of the dashboard: pyproject's package data names them all."""

from __future__ import annotations

import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "infra" / "http" / "dashboard"


def test_the_package_data_globs_match_every_dashboard_file() -> None:
    globs = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    patterns = globs["infra.http.dashboard"]
    files = [p.relative_to(PACKAGE) for p in PACKAGE.rglob("*") if p.is_file() and p.suffix != ".py"]
    assert files, "no dashboard files found"
    missed = [str(f) for f in files if "__pycache__" not in f.parts and not any(f.match(g) for g in patterns)]
    assert not missed, f"not in [tool.setuptools.package-data] infra.http.dashboard: {missed}"


def test_the_dashboard_loads_nothing_from_elsewhere() -> None:
    # Offline: no CDN, no external fonts; every import is relative to /ui/.
    for path in (PACKAGE / "static").rglob("*"):
        if path.suffix in (".js", ".mjs", ".css", ".html"):
            text = path.read_text()
            for marker in ("https://", "//cdn", "@import url(", "fonts.googleapis"):
                assert marker not in text, (path, marker)
