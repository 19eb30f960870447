#!/usr/bin/env python3
"""Enforce the dependency rule of DESIGN.md ("Layout and dependency rule") by parsing imports.

- `domain` imports nothing of ours: only the standard library and msgspec.
- `projections` imports `domain` (plus the standard library and msgspec).
- `infra` imports `domain` and `projections`, never `services`.
- `services/<x>.py` import `domain`, `projections` and `infra`, but no other services module, except
  the shared `services.bootstrap` (anyone) and `services.dev` (only `services.cli`); the modules
  of a services package (`services.dev`, development tooling; `services.cli`) import each other.
- The command line (`services.cli`) talks HTTP to any installation: of `infra` it imports only
  `infra.auth` and `infra.config` (for `pipelines token` and `pipelines up`), and it may import
  websockets (it is a client of the gateway).
- Only `infra` (and the development tooling, `services.dev`) imports psycopg, nats, jwt, websockets,
  subprocess (the IO edge); imports under
  `if TYPE_CHECKING:` (annotations only) are exempt from this one rule.

No import cycles among our modules: every import counts, inside functions too; only imports under
`if TYPE_CHECKING:` are exempt. Importing `a.b.c` runs the `__init__` of `a` and `a.b` as well (except
the packages the importer itself lives in: those are initialised before it). Each cycle is printed as
a chain `a -> b -> a`.

Every import counts: top-level, inside functions, relative imports, and
`importlib.import_module("...")` / `__import__("...")` with a literal name.
Exits 1 listing the violations and cycles; 0 when clean.
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
# The command line is a client of the API and the gateway, not a service.
CLI = "services.cli"
CLI_INFRA = {"infra.auth", "infra.config"}
CLI_IO = {"websockets"}
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


def _in_cli(module: str) -> bool:
    return module == CLI or module.startswith(CLI + ".")


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
                    allowed = SHARED_SERVICES | SERVICE_EXTRA.get(own, set()) | {module, own}
                    if target not in allowed:
                        reason = "a service must not import another services module"
            elif layer == "domain":
                reason = "domain imports nothing of ours"
            elif layer == "projections" and top != "domain":
                reason = "projections import only domain"
            elif layer == "infra" and top == "services":
                reason = "infra must not import services"
            elif _in_cli(module) and imported != "infra" and ".".join(imported.split(".")[:2]) not in CLI_INFRA:
                reason = "the command line talks HTTP: of infra it imports only infra.auth and infra.config"
        elif layer in ("domain", "projections") and top not in STDLIB and top not in PURE_THIRD_PARTY:
            reason = f"{layer} is pure: standard library and msgspec only"
        elif (
            top in IO_ONLY_IN_INFRA
            and layer != "infra"
            and not type_only
            and not _is_dev_tooling(module)
            and not (_in_cli(module) and top in CLI_IO)
        ):
            reason = f"only infra imports {top} (an import under `if TYPE_CHECKING:` is fine)"
        if reason and (line, reason) not in reported:  # `from x import a, b` reports once
            reported.add((line, reason))
            violations.append(Violation(path, line, imported, reason))
    return violations


def _our_files(root: Path) -> Iterator[Path]:
    for layer in OURS:
        base = root / layer
        if base.is_dir():
            yield from sorted(base.rglob("*.py"))


def check_tree(root: Path = ROOT) -> list[Violation]:
    violations: list[Violation] = []
    for path in _our_files(root):
        violations.extend(check_file(path, root))
    return violations


# -- cycles ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Edge:
    """`source` imports `target` (at `path:line`), at run time."""

    source: str
    target: str
    path: Path
    line: int


def _targets(tree: ast.AST, package_parts: list[str], root: Path) -> Iterator[tuple[int, str, bool, int]]:
    """(line, module, explicit, node id) of each of our modules an import runs. `explicit` is False
    for `from package import submodule`, which needs the package in sys.modules but not its names."""
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                keep = len(package_parts) - (node.level - 1)
                base = ".".join([*package_parts[: max(keep, 0)], *([node.module] if node.module else [])])
            else:
                base = node.module or ""
            if not base or base.split(".")[0] not in OURS:
                continue
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                if alias.name != "*" and _is_module_file(root, sub):
                    yield node.lineno, sub, True, id(node)
                    yield node.lineno, base, False, id(node)
                else:
                    yield node.lineno, base, True, id(node)
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] in OURS:
                    yield node.lineno, alias.name, True, id(node)
        elif isinstance(node, ast.Call):
            func = node.func
            name = func.attr if isinstance(func, ast.Attribute) else func.id if isinstance(func, ast.Name) else ""
            if (
                name in ("import_module", "__import__")
                and node.args
                and isinstance(node.args[0], ast.Constant)
                and isinstance(node.args[0].value, str)
                and node.args[0].value.split(".")[0] in OURS
            ):
                yield node.lineno, node.args[0].value, True, id(node)


def _module_of(root: Path, dotted: str) -> str | None:
    """The longest prefix of `dotted` that is one of our modules (`a.b.Name` -> `a.b`)."""
    parts = dotted.split(".")
    while parts:
        if _is_module_file(root, ".".join(parts)):
            return ".".join(parts)
        parts.pop()
    return None


def import_edges(path: Path, root: Path = ROOT) -> list[Edge]:
    """What importing the module at `path` runs of ours (imports under `if TYPE_CHECKING:` excluded)."""
    module = module_name(path, root)
    is_package = path.name == "__init__.py"
    package_parts = module.split(".") if is_package else module.split(".")[:-1]
    try:
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    except SyntaxError:
        return []  # reported by check_file
    type_only = _type_checking_nodes(tree)
    # The packages this module lives in are initialised before its own code runs.
    own_packages = {".".join(package_parts[:i]) for i in range(1, len(package_parts) + 1)}
    edges: dict[str, Edge] = {}
    for line, dotted, explicit, node_id in _targets(tree, package_parts, root):
        target = _module_of(root, dotted)
        if node_id in type_only or target is None:
            continue
        parts = target.split(".")
        runs = [".".join(parts[:i]) for i in range(1, len(parts))]  # the packages' __init__ first
        runs = [p for p in runs if p not in own_packages]
        if explicit or target not in own_packages:
            runs.append(target)
        for name in runs:
            if name != module and name not in edges:
                edges[name] = Edge(module, name, path, line)
    return list(edges.values())


def find_cycles(edges: list[Edge]) -> list[list[Edge]]:
    """Import cycles: for each module in a strongly connected component, a shortest cycle through
    it (each cycle once)."""
    graph: dict[str, dict[str, Edge]] = {}
    for edge in edges:
        graph.setdefault(edge.source, {})[edge.target] = edge
        graph.setdefault(edge.target, {})
    cycles: list[list[Edge]] = []
    seen: set[tuple[str, ...]] = set()
    for component in _components(graph):
        if len(component) < 2:
            continue
        for start in sorted(component):
            cycle = _shortest_cycle(graph, component, start)
            names = [e.source for e in cycle]
            turn = names.index(min(names))
            key = tuple(names[turn:] + names[:turn])
            if key not in seen:
                seen.add(key)
                cycles.append(cycle[turn:] + cycle[:turn])
    return cycles


def _components(graph: dict[str, dict[str, Edge]]) -> list[set[str]]:
    """Strongly connected components (Tarjan's algorithm, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    components: list[set[str]] = []
    for root in sorted(graph):
        if root in index:
            continue
        work: list[tuple[str, Iterator[str]]] = [(root, iter(sorted(graph[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component: set[str] = set()
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.add(member)
                    if member == node:
                        break
                components.append(component)
    return components


def _shortest_cycle(graph: dict[str, dict[str, Edge]], component: set[str], start: str) -> list[Edge]:
    """Breadth-first from `start` back to it, inside its component (there always is a way back)."""
    came_from: dict[str, Edge] = {}
    frontier = [start]
    while frontier:
        following: list[str] = []
        for node in frontier:
            for target, edge in sorted(graph[node].items()):
                if target not in component:
                    continue
                if target == start:
                    path = [edge]
                    while path[0].source != start:
                        path.insert(0, came_from[path[0].source])
                    return path
                if target not in came_from:
                    came_from[target] = edge
                    following.append(target)
        frontier = following
    raise AssertionError(f"{start} is in a component without a cycle through it")


def check_cycles(root: Path = ROOT) -> list[list[Edge]]:
    edges = [edge for path in _our_files(root) for edge in import_edges(path, root)]
    return find_cycles(edges)


def describe_cycle(cycle: list[Edge], root: Path = ROOT) -> str:
    chain = " -> ".join([*(e.source for e in cycle), cycle[0].source])
    where = "; ".join(f"{e.path.relative_to(root) if e.path.is_relative_to(root) else e.path}:{e.line}" for e in cycle)
    return f"import cycle: {chain}  ({where})"


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    root = Path(args[0]).resolve() if args else ROOT
    violations = check_tree(root)
    cycles = check_cycles(root)
    for violation in violations:
        print(violation)
    for cycle in cycles:
        print(describe_cycle(cycle, root))
    if violations:
        print(f"{len(violations)} import rule violation(s); see DESIGN.md, 'Layout and dependency rule'")
    if cycles:
        print(f"{len(cycles)} import cycle(s): fix the direction (a ports module, a protocol), not by moving an import")
    if violations or cycles:
        return 1
    print("imports ok")
    return 0


if __name__ == "__main__":
    sys.exit(main())
