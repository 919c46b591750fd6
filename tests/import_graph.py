"""The import graph of ``appsrc/tugboat``, read with :mod:`ast` (nothing is imported).

Every ``import`` counts, at module level and inside functions (a deferred import still ties the two
modules together; it only hides the cycle until run time); imports under ``if TYPE_CHECKING:`` do not,
as they never run. Used by ``tests/test_architecture.py``.
"""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE_ROOT = Path(__file__).resolve().parents[1] / "appsrc" / "tugboat"


def module_files(root: Path = PACKAGE_ROOT) -> dict[str, Path]:
    """``tugboat.engine.io.models`` -> its file, for every module of the package."""
    out = {}
    for path in sorted(root.rglob("*.py")):
        parts = list(path.relative_to(root.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(tree: ast.AST):
    """(node, deferred) for every import that runs; deferred = inside a function."""
    def walk(node, deferred):
        for child in ast.iter_child_nodes(node):
            if isinstance(child, ast.If) and _is_type_checking(child):
                for sub in child.orelse:
                    yield from walk(sub, deferred)
                continue
            if isinstance(child, (ast.Import, ast.ImportFrom)):
                yield child, deferred
            yield from walk(child, deferred or isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef,
                                                                  ast.Lambda)))
    yield from walk(tree, False)


def edges(root: Path = PACKAGE_ROOT, missing: list[str] | None = None) -> dict[str, dict[str, list[str]]]:
    """module -> {imported module -> ["file:line (deferred)", ...]}, within the package only.

    ``missing`` collects imports of package modules that do not exist ("file:line: name"): a module
    renamed while a deferred import elsewhere still uses the old name fails only when that line runs."""
    files = module_files(root)
    top = root.name
    graph: dict[str, dict[str, list[str]]] = {m: {} for m in files}
    for mod, path in files.items():
        is_pkg = path.name == "__init__.py"
        package = mod if is_pkg else mod.rpartition(".")[0]
        tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
        for node, deferred in _imports(tree):
            targets: list[str] = []
            if isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                if node.level:
                    base_parts = package.split(".")
                    base_parts = base_parts[: len(base_parts) - (node.level - 1)]
                    base = ".".join(base_parts + ([node.module] if node.module else []))
                else:
                    base = node.module or ""
                for alias in node.names:
                    sub = f"{base}.{alias.name}"
                    targets.append(sub if sub in files else base)
            where = f"{path.relative_to(root.parent.parent)}:{node.lineno}" + (" (deferred)" if deferred else "")
            base_module = None
            if isinstance(node, ast.ImportFrom):
                base_module = base if node.level else (node.module or "")
            for name in ([base_module] if base_module is not None else targets):
                if missing is not None and name.split(".")[0] == top and name not in files:
                    missing.append(f"{where.removesuffix(' (deferred)')}: {name}")
            for target in targets:
                # "import tugboat.engine.io.models" names the module; a name from a module is that module
                while target and target not in files:
                    target = target.rpartition(".")[0]
                if target and target != mod and target != "tugboat":
                    found = graph[mod].setdefault(target, [])
                    if where not in found:
                        found.append(where)
    return graph


def _bound_names(tree: ast.Module) -> set[str] | None:
    """Names a module binds at its top level (under ``if``/``try`` too); None when it has a module
    ``__getattr__`` (any name may exist)."""
    names: set[str] = set()

    def visit(body) -> None:
        for node in body:
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                names.add(node.name)
            elif isinstance(node, (ast.Import, ast.ImportFrom)):
                names.update((a.asname or a.name).split(".")[0] for a in node.names)
            elif isinstance(node, (ast.Assign, ast.AnnAssign, ast.AugAssign)):
                targets = node.targets if isinstance(node, ast.Assign) else [node.target]
                for t in targets:
                    names.update(n.id for n in ast.walk(t) if isinstance(n, ast.Name))
            elif isinstance(node, (ast.If, ast.Try, ast.With, ast.For, ast.While)):
                for field in ("body", "orelse", "finalbody"):
                    visit(getattr(node, field, []))
                for handler in getattr(node, "handlers", []):
                    visit(handler.body)

    visit(tree.body)
    return None if "__getattr__" in names else names


def missing_names(root: Path = PACKAGE_ROOT) -> list[str]:
    """``from tugboat.x import name`` (deferred ones too) where module x neither binds ``name`` nor
    has a submodule of that name: "file:line: tugboat.x has no name". A function moved to another
    module while a deferred import elsewhere still names its old home fails only when that line runs."""
    files = module_files(root)
    bound = {m: _bound_names(ast.parse(p.read_text(encoding="utf-8"))) for m, p in files.items()}
    out = []
    for mod, path in files.items():
        package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        for node, _ in _imports(ast.parse(path.read_text(encoding="utf-8"))):
            if not isinstance(node, ast.ImportFrom):
                continue
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - (node.level - 1)] + ([node.module] if node.module else []))
            else:
                base = node.module or ""
            names = bound.get(base)
            if names is None:
                continue  # outside the package, or a module __getattr__
            for alias in node.names:
                if alias.name != "*" and alias.name not in names and f"{base}.{alias.name}" not in files:
                    out.append(f"{path.relative_to(root.parent.parent)}:{node.lineno}: {base} has no {alias.name}")
    return out


def cycles(graph: dict[str, dict[str, list[str]]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    out: list[list[str]] = []
    counter = [0]

    def visit(v: str) -> None:  # recursion depth is bounded by the package's ~80 modules
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on_stack.add(v)
        for w in graph.get(v, {}):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(out)


def describe(graph: dict[str, dict[str, list[str]]], component: list[str]) -> str:
    """The edges inside one cycle, with where each import is."""
    inside = set(component)
    lines = []
    for a in component:
        for b, where in sorted(graph[a].items()):
            if b in inside:
                lines.append(f"  {a} -> {b}  ({', '.join(where)})")
    return "\n".join(lines)


if __name__ == "__main__":  # pragma: no cover - a developer's view of the cycles
    g = edges()
    for comp in cycles(g):
        print(" <-> ".join(comp))
        print(describe(g, comp))
