"""The package's layers only point down: no import loop and no upward import, not even inside a function.

A small AST check of its own (../shared/tools/import_graph.py is the reference it was checked against):
every `import` / `from ... import` in flexisearch/, resolved to a module of the package, must go to a
module in the same or a lower layer, and the module graph must have no cycle.
"""

import ast
import sys
from pathlib import Path

import pytest

PKG = Path(__file__).resolve().parent.parent / "flexisearch"
LAYERS = ["errors", "files", "validate", "data", "models", "metrics", "sampling", "optimize", "training", "cli"]


def modules() -> dict[str, Path]:
    out = {}
    for f in sorted(PKG.rglob("*.py")):
        parts = list(f.relative_to(PKG.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = f
    return out


def imports(mods: dict[str, Path]) -> dict[str, set[str]]:
    """module -> the package modules it imports (the longest known prefix of each imported name)."""
    graph = {}
    for mod, path in mods.items():
        package = mod if path.name == "__init__.py" else mod.rpartition(".")[0]
        targets = set()
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    up = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                    base = ".".join(up + ([base] if base else []))
                names = [base] + [f"{base}.{a.name}" for a in node.names]
            else:
                continue
            for name in names:
                while name and name not in mods:
                    name = name.rpartition(".")[0]
                if name and name != mod and name != "flexisearch":
                    targets.add(name)
        graph[mod] = targets
    return graph


def layer(mod: str) -> int | None:
    """Index of a module's layer; None for the package's __init__ (the public API, above all layers)."""
    parts = mod.split(".")
    return LAYERS.index(parts[1]) if len(parts) > 1 else None


def test_every_module_belongs_to_a_layer():
    assert {m.split(".")[1] for m in modules() if "." in m} == set(LAYERS)


def test_no_upward_import():
    graph = imports(modules())
    upward = [(a, b) for a, targets in graph.items() for b in targets
              if layer(a) is not None and layer(b) is not None and layer(b) > layer(a)]
    assert upward == []


def test_no_import_loop():
    graph = imports(modules())
    state: dict[str, int] = {}

    def visit(m: str, stack: list[str]) -> None:
        state[m] = 1
        for n in sorted(graph[m]):
            if state.get(n) == 1:
                pytest.fail(f"import loop: {' -> '.join(stack[stack.index(n):] + [m, n])}")
            if n not in state:
                visit(n, stack + [m])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [])


def test_the_check_sees_imports_inside_functions(tmp_path, monkeypatch):
    """The checker itself: an upward import hidden in a function, and a loop through relative imports, are found."""
    pkg = tmp_path / "flexisearch"
    (pkg / "models").mkdir(parents=True)
    (pkg / "optimize").mkdir()
    for d in (pkg, pkg / "models", pkg / "optimize"):
        (d / "__init__.py").write_text("")
    (pkg / "models" / "a.py").write_text("def f():\n    from ..optimize import b\n")
    (pkg / "optimize" / "b.py").write_text("from ..models.a import f\n")
    monkeypatch.setattr(sys.modules[__name__], "PKG", pkg)
    graph = imports(modules())
    assert graph["flexisearch.models.a"] == {"flexisearch.optimize", "flexisearch.optimize.b"}
    assert graph["flexisearch.optimize.b"] == {"flexisearch.models.a"}
    with pytest.raises(AssertionError):
        test_no_upward_import()
    with pytest.raises(pytest.fail.Exception, match="import loop"):
        test_no_import_loop()


def test_every_public_name_of_the_package_resolves_lazily():
    import flexisearch as fs

    for name in fs.__all__:
        assert getattr(fs, name) is not None
    with pytest.raises(AttributeError, match="no attribute 'nothing'"):
        fs.nothing  # noqa: B018
