"""`domain/` does no IO: no module under it imports an IO module or reads the clock, the file
system or the time-zone database (what it needs of them is passed in by `infra`)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

DOMAIN = Path(__file__).resolve().parents[2] / "domain"
IO_MODULES = frozenset({"zoneinfo", "os", "time", "uuid", "random", "socket", "subprocess", "pathlib", "io"})
# Calls that read the outside world: open(), the clock.
IO_CALLS = frozenset({"open", "now", "utcnow", "today"})


def _modules() -> list[Path]:
    return sorted(DOMAIN.rglob("*.py"))


def _call_name(node: ast.Call) -> str | None:
    if isinstance(node.func, ast.Name):
        return node.func.id
    if isinstance(node.func, ast.Attribute):
        return node.func.attr
    return None


def io_uses(source: str) -> list[str]:
    """Each import of an IO module and each IO call in `source`, with its line."""
    found = []
    for node in ast.walk(ast.parse(source)):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module is not None and node.level == 0:
            names = [node.module]
        found += [f"line {node.lineno}: import {n}" for n in names if n.split(".")[0] in IO_MODULES]
        if isinstance(node, ast.Call):
            name = _call_name(node)
            # `open()` by name; `now`/`utcnow`/`today` as methods (datetime.now(), date.today()).
            if (name == "open" and isinstance(node.func, ast.Name)) or (
                name in IO_CALLS - {"open"} and isinstance(node.func, ast.Attribute)
            ):
                found.append(f"line {node.lineno}: {name}()")
    return found


def test_the_scan_finds_io_imports_and_calls_anywhere_in_a_module() -> None:
    source = (
        "import os.path\n"
        "from time import monotonic\n"
        "def f():\n"
        "    import zoneinfo\n"
        "    with open('x') as fh:\n"
        "        return datetime.now(), date.today(), datetime.utcnow()\n"
    )
    assert io_uses(source) == [
        "line 1: import os.path",
        "line 2: import time",
        "line 4: import zoneinfo",
        "line 5: open()",
        "line 6: now()",
        "line 6: today()",
        "line 6: utcnow()",
    ]
    assert io_uses("from datetime import datetime\nx = datetime(2026, 1, 1).replace(hour=1)\n") == []


def test_the_scan_covers_every_domain_module() -> None:
    names = {p.relative_to(DOMAIN).as_posix() for p in _modules()}
    assert {"spec.py", "cron.py", "masking.py", "run/__init__.py", "run/decide.py"} <= names


@pytest.mark.parametrize("module", _modules(), ids=lambda p: p.relative_to(DOMAIN).as_posix())
def test_no_domain_module_does_io(module: Path) -> None:
    assert io_uses(module.read_text()) == []
