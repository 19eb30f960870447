#!/usr/bin/env python3
"""Enforce the dependency rule of DESIGN.md ("Layout and dependency rule") by parsing imports.

- `domain` imports nothing of ours: only the standard library and msgspec.
- `projections` imports `domain` (plus the standard library and msgspec).
- `infra` imports `domain` and `projections`, never `services`.
- `services/<x>.py` import `domain`, `projections` and `infra`, but no other services module, except
  the shared `services.bootstrap` (anyone) and `services.dev` (only `services.cli`); the modules
  of `services.dev` (development tooling) import each other.
- Only `infra` (and the development tooling, `services.dev`) imports psycopg, nats, jwt, websockets,
  subprocess (the IO edge); imports under
  `if TYPE_CHECKING:` (annotations only) are exempt from this one rule.

Every import counts: top-level, inside functions, relative imports, and
`importlib.import_module("...")` / `__import__("...")` with a literal name.
Exits 1 listing the violations; 0 when clean.
"""

from __future__ import annotations

import ast
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OURS = ("domain", "projections", "infra", "services")
PURE_THIRD_PARTY = {"msgspec"}
IO_ONLY_IN_INFRA = {"psycopg", "psycopg_pool", "nats", "jwt", "websockets", "subprocess"}
SHARED_SERVICES = {"services.bootstrap"}
SERVICE_EXTRA = {"services.cli": {"services.dev"}}
# Development tooling (the `make up` supervisor, the embedded servers) manages processes and servers itself.
DEV_TOOLING = "services.dev"
STDLIB = set(sys.stdlib_module_names) | {"__future__"}


@dataclass(frozen=True)
class Violation:
    path: Path
    line: int
    module: str
    reason: str

    def __str__(self) -> str:
        rel = self.path.relative_to(ROOT) if self.path.is_relative_to(ROOT) else self.path
        return f"{rel}:{self.line}: imports {self.module}: {self.reason}"


def module_name(path: Path, root: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    """ids of the nodes under `if TYPE_CHECKING:` (imports for annotations only)."""
    inside: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If):
            test = node.test
            name = test.id if isinstance(test, ast.Name) else test.attr if isinstance(test, ast.Attribute) else ""
            if name == "TYPE_CHECKING":
                for stmt in node.body:
                    inside.update(id(n) for n in ast.walk(stmt))
    return inside


def imported_modules(tree: ast.AST, module: str, is_package: bool) -> Iterator[tuple[int, str, bool]]:
    """(line, absolute dotted name, under TYPE_CHECKING) of everything `module` imports."""
    package_parts = module.split(".") if is_package else module.split(".")[:-1]
    type_only = _type_checking_nodes(tree)
    for line, name, node_id in _imports(tree, package_parts):
        yield line, name, node_id in type_only


def _imports(tree: ast.AST, package_parts: list[str]) -> Iterator[tuple[int, str, int]]:
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name, id(node)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                keep = len(package_parts) - (node.level - 1)
                base_parts = package_parts[: max(keep, 0)]
                base = ".".join([*base_parts, *([node.module] if node.module else [])])
            else:
                base = node.module or ""
            if not base:
                continue
            yield node.lineno, base, id(node)
            # `from services import api` imports the module services.api
            for alias in node.names:
                if alias.name != "*" and base.split(".")[0] in OURS:
                    yield node.lineno, f"{base}.{alias.name}", id(node)
        elif isinstance(node, ast.Call):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""
            if (
                name in ("import_module", "__import__")
                and node.args
                and isinstance(node.args[0], ast.Constant)
                and isinstance(node.args[0].value, str)
            ):
                yield node.lineno, node.args[0].value, id(node)


def _is_module_file(root: Path, dotted: str) -> bool:
    """Whether `dotted` (inside one of our packages) is a module or package, not a name in one."""
    path = root.joinpath(*dotted.split("."))
    return path.with_suffix(".py").exists() or (path / "__init__.py").exists()


def _is_dev_tooling(module: str) -> bool:
    return module == DEV_TOOLING or module.startswith(DEV_TOOLING + ".")


def check_file(path: Path, root: Path = ROOT) -> list[Violation]:
    module = module_name(path, root)
    layer = module.split(".")[0]
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    except SyntaxError as exc:
        return [Violation(path, exc.lineno or 0, "?", f"syntax error: {exc.msg}")]
    violations: list[Violation] = []
    reported: set[tuple[int, str]] = set()
    for line, imported, type_only in imported_modules(tree, module, path.name == "__init__.py"):
        top = imported.split(".")[0]
        reason = None
        if top in OURS:
            if top == layer:
                if layer == "services" and "." in imported and _is_module_file(root, imported):
                    # services import no other service (bootstrap is shared; cli may use stack)
                    target = ".".join(imported.split(".")[:2])
                    own = ".".join(module.split(".")[:2])
                    allowed = SHARED_SERVICES | SERVICE_EXTRA.get(module, set()) | {module, own}
                    if target not in allowed:
                        reason = "a service must not import another services module"
            elif layer == "domain":
                reason = "domain imports nothing of ours"
            elif layer == "projections" and top != "domain":
                reason = "projections import only domain"
            elif layer == "infra" and top == "services":
                reason = "infra must not import services"
        elif layer in ("domain", "projections") and top not in STDLIB and top not in PURE_THIRD_PARTY:
            reason = f"{layer} is pure: standard library and msgspec only"
        elif top in IO_ONLY_IN_INFRA and layer != "infra" and not type_only and not _is_dev_tooling(module):
            reason = f"only infra imports {top} (an import under `if TYPE_CHECKING:` is fine)"
        if reason and (line, reason) not in reported:  # `from x import a, b` reports once
            reported.add((line, reason))
            violations.append(Violation(path, line, imported, reason))
    return violations


def check_tree(root: Path = ROOT) -> list[Violation]:
    violations: list[Violation] = []
    for layer in OURS:
        base = root / layer
        if not base.is_dir():
            continue
        for path in sorted(base.rglob("*.py")):
            violations.extend(check_file(path, root))
    return violations


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    root = Path(args[0]).resolve() if args else ROOT
    violations = check_tree(root)
    for violation in violations:
        print(violation)
    if violations:
        print(f"{len(violations)} import rule violation(s); see DESIGN.md, 'Layout and dependency rule'")
        return 1
    print("imports ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
