"""The package's layers import downward only, and no import closes a cycle (../shared/design/target-layout.md).

An AST scan of every module of ``moa_ray`` and ``jobs``: the imports at module level (``if TYPE_CHECKING:`` blocks
never run, so they are left out) and, separately, the imports inside functions, which run later but can hide an
upward dependency or a cycle that would break at module level. Whatever is left to fix sits in an allow-list below,
each entry with why; the tests compare the scan with the lists exactly, so an entry that is fixed must leave its list
and a new one fails: the lists can only shrink.
"""

from __future__ import annotations

import ast
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("moa_ray", "jobs")

#: Top to bottom: a module may import its own layer and the layers under it. A module belongs to the layer of the
#: longest name that it is or is under (``moa_ray.eval.judging`` is eval, ``moa_ray`` itself is the CLI layer).
LAYERS: tuple[tuple[str, tuple[str, ...]], ...] = (
    # The commands, their options, views and exit policy (the moa_ray.cli package), and the Ray jobs over them; the
    # package's __init__ is the public face over the session.
    ("cli", ("moa_ray", "moa_ray.cli", "jobs")),
    ("session", ("moa_ray.session",)),
    ("runtime", ("moa_ray.runtime",)),
    ("eval, serve", ("moa_ray.eval", "moa_ray.serve")),
    ("pipeline", ("moa_ray.pipeline",)),
    # redaction.py redacts at the backend boundary (it reads the backends' secret env names from the registry).
    ("backends", ("moa_ray.backends", "moa_ray.redaction")),
    ("config", ("moa_ray.config", "moa_ray.wire", "moa_ray.streaming", "moa_ray.prompts", "moa_ray.packaged_models", "moa_ray.presets")),
    # config.py's ModelSpec union is assembled from the registry's descriptors, so the registry sits under config.
    ("backend registry", ("moa_ray.backends.registry",)),
    # metrics.py only records (Ray's metrics API); it reads a trace it is handed, under TYPE_CHECKING.
    ("base", ("moa_ray.chat", "moa_ray.errors", "moa_ray.loopback", "moa_ray.ray_reaper", "moa_ray.json_text", "moa_ray.metrics")),
)

#: Module-level imports from a lower layer up (importer, imported). None left.
ALLOWED_UPWARD: set[tuple[str, str]] = set()

#: Module-level import cycles (each a set of modules). None left.
ALLOWED_CYCLES: list[set[str]] = []

#: Imports inside functions from a lower layer up (importer, imported).
ALLOWED_UPWARD_IN_FUNCTIONS: set[tuple[str, str]] = set()

#: Imports inside functions that would close a cycle at module level (importer, imported).
ALLOWED_HIDDEN_CYCLES: set[tuple[str, str]] = set()


@dataclass(frozen=True)
class Import:
    importer: str
    imported: str
    line: int
    in_function: bool


def _modules() -> dict[str, Path]:
    modules = {}
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            modules[".".join(parts)] = path
    return modules


MODULES = _modules()


def _resolve(name: str) -> str | None:
    """The scanned module that importing ``name`` runs (a name inside a module resolves to the module)."""
    while name and name not in MODULES:
        name = name.rpartition(".")[0]
    return name or None


def _imported(node: ast.Import | ast.ImportFrom, module: str) -> Iterator[str]:
    if isinstance(node, ast.Import):
        names = [alias.name for alias in node.names]
    else:
        base = node.module or ""
        if node.level:  # relative: from the importer's package up
            package = module if MODULES[module].name == "__init__.py" else module.rpartition(".")[0]
            parts = package.split(".")[: len(package.split(".")) - node.level + 1]
            base = ".".join([*parts, base] if base else parts)
        # ``from package import submodule`` imports the submodule; ``from module import name``, the module.
        names = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in MODULES else base for alias in node.names]
    for name in names:
        target = _resolve(name) if name.split(".")[0] in PACKAGES else None
        if target is not None and target != module:
            yield target


def _type_checking(node: ast.AST) -> bool:
    return isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test)


def _scan(module: str, tree: ast.Module) -> Iterator[Import]:
    """Every import of ``module``: at module level (also inside top-level ``try``/``if``, not ``TYPE_CHECKING``),
    and inside its functions."""
    stack: list[tuple[ast.AST, bool]] = [(node, False) for node in tree.body if not _type_checking(node)]
    while stack:
        node, in_function = stack.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            for target in _imported(node, module):
                yield Import(module, target, node.lineno, in_function)
            continue
        inside = in_function or isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda))
        stack.extend((child, inside) for child in ast.iter_child_nodes(node) if not _type_checking(child))


IMPORTS = [imp for module, path in MODULES.items() for imp in _scan(module, ast.parse(path.read_text(encoding="utf-8")))]


def layer_of(module: str) -> int | None:
    """The index in :data:`LAYERS` (0 = top) of ``module``; None for a module no layer names."""
    best: tuple[int, int] | None = None
    for index, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and (best is None or len(prefix) > best[1]):
                best = (index, len(prefix))
    return None if best is None else best[0]


def _upward(in_function: bool) -> set[tuple[str, str]]:
    found = set()
    for imp in IMPORTS:
        importer, imported = layer_of(imp.importer), layer_of(imp.imported)
        if imp.in_function == in_function and importer is not None and imported is not None and imported < importer:
            found.add((imp.importer, imp.imported))
    return found


def _module_graph() -> dict[str, set[str]]:
    graph: dict[str, set[str]] = {module: set() for module in MODULES}
    for imp in IMPORTS:
        if not imp.in_function:
            graph[imp.importer].add(imp.imported)
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[set[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[set[str]] = []
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
                component = set()
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.add(member)
                    if member == node:
                        break
                if len(component) > 1:
                    cycles.append(component)
    return cycles


def _reachable(graph: dict[str, set[str]], start: str) -> set[str]:
    seen: set[str] = set()
    todo = [start]
    while todo:
        for nxt in graph[todo.pop()] - seen:
            seen.add(nxt)
            todo.append(nxt)
    return seen


def test_the_scan_sees_the_package() -> None:
    """The scan reads what it should: a known module-level import, a known function-level one, none under
    TYPE_CHECKING (metrics.py reads the trace for types only)."""
    module_level = {(i.importer, i.imported) for i in IMPORTS if not i.in_function}
    in_functions = {(i.importer, i.imported) for i in IMPORTS if i.in_function}
    assert ("moa_ray.pipeline.trace", "moa_ray.pipeline.accounting") in module_level
    assert ("moa_ray.session", "moa_ray.serve.deploy") in in_functions
    assert not any(i.importer == "moa_ray.metrics" and i.imported == "moa_ray.pipeline.trace" for i in IMPORTS)


def test_every_module_has_a_layer() -> None:
    assert [m for m in MODULES if layer_of(m) is None] == []


@pytest.mark.parametrize("in_function", [False, True], ids=["module level", "in functions"])
def test_imports_go_down_the_layers(in_function: bool) -> None:
    allowed = ALLOWED_UPWARD_IN_FUNCTIONS if in_function else ALLOWED_UPWARD
    found = _upward(in_function)
    named = {f"{a} ({LAYERS[layer_of(a) or 0][0]}) -> {b} ({LAYERS[layer_of(b) or 0][0]})" for a, b in found - allowed}
    assert not named, f"upward imports: {sorted(named)}"
    assert found == allowed, f"fixed, so off the allow-list: {sorted(allowed - found)}"


def test_no_module_level_import_cycle() -> None:
    cycles = _cycles(_module_graph())
    assert sorted(map(sorted, cycles)) == sorted(map(sorted, ALLOWED_CYCLES))


def test_no_function_level_import_hides_a_cycle() -> None:
    """An import inside a function whose module already reaches the importer at module level would close a cycle if
    it moved up: a cycle kept out of sight, not removed."""
    graph = _module_graph()
    hidden = {(i.importer, i.imported) for i in IMPORTS if i.in_function and i.importer in _reachable(graph, i.imported)}
    assert hidden == ALLOWED_HIDDEN_CYCLES


def test_the_cycle_finder_finds_cycles() -> None:
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a", "e"}, "e": {"d"}, "f": set()}
    assert sorted(map(sorted, _cycles(graph))) == [["a", "b", "c"], ["d", "e"]]
