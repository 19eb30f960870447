"""tools/check_imports.py: the layer rule and import cycles, on small trees written to a temporary directory."""

from __future__ import annotations

import importlib.util
import sys
import textwrap
from pathlib import Path
from types import ModuleType

import pytest

REPO = Path(__file__).resolve().parents[2]


def _checker() -> ModuleType:
    spec = importlib.util.spec_from_file_location("check_imports", REPO / "tools" / "check_imports.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


check_imports = _checker()


def _tree(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    for layer in ("domain", "projections", "infra", "services"):
        (root / layer).mkdir(exist_ok=True)
        (root / layer / "__init__.py").touch()
    return root


def _run(root: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    code = check_imports.main([str(root)])
    return code, capsys.readouterr().out


def test_a_cycle_through_a_function_level_import_fails_and_is_printed_as_a_chain(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = _tree(
        tmp_path,
        {
            "infra/a.py": "from infra.b import helper\n",
            "infra/b.py": """
                def helper() -> None:
                    from infra import a  # inside a function: still a cycle

                    print(a)
            """,
        },
    )
    code, out = _run(root, capsys)
    assert code == 1
    assert "import cycle: infra.a -> infra.b -> infra.a  (infra/a.py:1; infra/b.py:3)" in out


def test_a_back_edge_under_type_checking_only_is_not_a_cycle(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = _tree(
        tmp_path,
        {
            "infra/a.py": "from infra.b import helper\n",
            "infra/b.py": """
                from typing import TYPE_CHECKING

                if TYPE_CHECKING:
                    from infra.a import Thing

                def helper(thing: "Thing") -> None: ...
            """,
        },
    )
    code, out = _run(root, capsys)
    assert (code, out.strip()) == (0, "imports ok")


def test_importing_a_module_of_a_package_runs_the_package_init_too(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # infra/store/__init__.py imports infra.api.app, which imports a module of infra.store: the
    # package's __init__ runs first, so this is a cycle though app.py never names infra.store itself.
    root = _tree(
        tmp_path,
        {
            "infra/store/__init__.py": "from infra.api.app import App\n",
            "infra/store/records.py": "RECORD = 1\n",
            "infra/api/__init__.py": "",
            "infra/api/app.py": "from infra.store.records import RECORD\n\nclass App: ...\n",
        },
    )
    code, out = _run(root, capsys)
    assert code == 1
    assert "import cycle: infra.api.app -> infra.store -> infra.api.app" in out


def test_a_package_init_re_exporting_its_modules_is_not_a_cycle(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = _tree(
        tmp_path,
        {
            "infra/store/__init__.py": "from infra.store.postgres import PostgresStore\n",
            "infra/store/records.py": "RECORD = 1\n",
            "infra/store/postgres.py": "from infra.store import records\n\nclass PostgresStore: ...\n",
        },
    )
    code, out = _run(root, capsys)
    assert (code, out.strip()) == (0, "imports ok")


def test_the_layer_rule_still_holds(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = _tree(
        tmp_path,
        {
            "domain/model.py": "import psycopg\n",
            "infra/adapter.py": "def f() -> None:\n    from services import api\n",
            "services/api.py": "from services.dev.stack import Stack\n",
            "services/cli.py": "from services.dev.stack import Stack\n",
            "services/dev/__init__.py": "",
            "services/dev/stack.py": "class Stack: ...\n",
        },
    )
    code, out = _run(root, capsys)
    assert code == 1
    assert "domain/model.py:1: imports psycopg: domain is pure" in out
    assert "infra/adapter.py:2: imports services: infra must not import services" in out
    # Development tooling is for the `pipelines` command line only, never for a service.
    assert "services/api.py:1: imports services.dev.stack: a service must not import another services module" in out
    assert "services/cli.py" not in out


def test_the_command_line_package_imports_itself_the_dev_tooling_and_only_auth_and_config_of_infra(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root = _tree(
        tmp_path,
        {
            "infra/__init__.py": "",
            "infra/auth.py": "",
            "infra/config.py": "",
            "infra/http/__init__.py": "",
            "infra/http/app.py": "",
            "services/cli/__init__.py": "from services.cli.app import app\n",
            "services/cli/app.py": "from services.cli import client\nfrom services.dev.stack import Stack\n",
            "services/cli/client.py": "import websockets\nfrom infra import auth\nfrom infra.config import Settings\n",
            "services/cli/local.py": "from infra.http.app import create_app\n",
            "services/api.py": "from services.cli import client\nimport websockets\n",
            "services/dev/__init__.py": "",
            "services/dev/stack.py": "class Stack: ...\n",
        },
    )
    code, out = _run(root, capsys)
    assert code == 1
    assert "services/cli/local.py:1: imports infra.http.app: the command line talks HTTP" in out
    assert "services/api.py:1: imports services.cli: a service must not import another services module" in out
    assert "services/api.py:2: imports websockets: only infra imports websockets" in out
    assert "services/cli/app.py" not in out and "services/cli/client.py" not in out
    assert "services/cli/__init__.py" not in out


def test_the_project_tree_has_no_layer_violation_and_no_cycle(capsys: pytest.CaptureFixture[str]) -> None:
    # The real result, not an expected failure: the chains are printed when it fails.
    code, out = _run(REPO, capsys)
    assert code == 0, out
