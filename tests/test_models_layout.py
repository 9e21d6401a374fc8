"""The shape of models/: its modules import each other without a cycle (every import
statement counts, at any depth, relative ones resolved), it imports no Ray, ZeroMQ or
msgpack, and no module of it is over 700 lines."""

from __future__ import annotations

import ast
from pathlib import Path

MODELS = Path(__file__).resolve().parents[1] / "models"
PACKAGE = "llm_shard.models"
FORBIDDEN = ("ray", "zmq", "msgpack")
MAX_LINES = 700


def module_name(path: Path, root: Path = MODELS) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join([PACKAGE, *parts])


def imported(path: Path, root: Path = MODELS) -> set[str]:
    """Every module name an import statement of the file names, relative ones resolved:
    for `from a import b`, both `a` and `a.b` (b may be a submodule)."""
    here = module_name(path, root).split(".")
    package = here if path.name == "__init__.py" else here[:-1]
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = ".".join(package[: len(package) - node.level + 1] + ([base] if base else []))
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


def graph(root: Path = MODELS) -> dict[str, set[str]]:
    """{module: the modules of `root` it imports}."""
    files = {module_name(p, root): p for p in root.rglob("*.py")}
    return {name: {m for m in imported(path, root) if m in files and m != name}
            for name, path in files.items()}


def cycles(edges: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan's algorithm)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(edges[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found


def test_the_cycle_finder_finds_cycles():
    edges = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": set()}
    assert cycles(edges) == [["a", "b", "c"]]
    assert cycles({"a": {"b"}, "b": set()}) == []


def test_imports_at_any_depth_and_relative_ones_count(tmp_path):
    pkg = tmp_path / "sub"
    pkg.mkdir()
    (tmp_path / "errors.py").write_text("")
    (pkg / "__init__.py").write_text("from . import x\n")
    (pkg / "x.py").write_text("def f():\n    from .y import g\n    from .. import errors\n")
    (pkg / "y.py").write_text("class A:\n    def m(self):\n        import llm_shard.models.sub.x\n")
    assert imported(pkg / "__init__.py", tmp_path) == {f"{PACKAGE}.sub", f"{PACKAGE}.sub.x"}
    assert imported(pkg / "x.py", tmp_path) == {f"{PACKAGE}.sub.y", f"{PACKAGE}.sub.y.g",
                                                PACKAGE, f"{PACKAGE}.errors"}
    assert cycles(graph(tmp_path)) == [[f"{PACKAGE}.sub.x", f"{PACKAGE}.sub.y"]]


def test_models_modules_import_each_other_without_a_cycle():
    edges = graph()
    assert f"{PACKAGE}.quant.linear" in edges and edges[f"{PACKAGE}.quant.linear"]
    assert cycles(edges) == []


def test_models_imports_no_ray_zmq_or_msgpack():
    bad = {str(p.relative_to(MODELS)): sorted(n for n in imported(p)
                                              if n.split(".")[0] in FORBIDDEN)
           for p in MODELS.rglob("*.py")}
    assert {k: v for k, v in bad.items() if v} == {}


def test_no_models_module_is_over_700_lines():
    long = {str(p.relative_to(MODELS)): n for p in MODELS.rglob("*.py")
            if (n := len(p.read_text(encoding="utf-8").splitlines())) > MAX_LINES}
    assert long == {}
