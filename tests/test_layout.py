"""The repository's shape, as DESIGN.md draws it: imports flow one way, no module grows into
a god file, C lives in C files, the README stays a README."""

from __future__ import annotations

import ast
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PRODUCT = ("models", "worker", "coordinator", "cluster", "benchmarks")
MAX_LINES = 700


def _modules(folder: str) -> list[Path]:
    return sorted(p for p in (REPO / folder).rglob("*.py") if ".venv" not in p.parts)


def _imports(path: Path) -> list[str]:
    """Absolute names of every import in `path`, at any depth (function-level ones too)."""
    package = ["llm_shard", *path.relative_to(REPO).parent.parts]
    if package[1:2] == ["coordinator"] and package[2:3] == ["root"]:
        package = ["llm_shard"]
    names = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = package[: len(package) - node.level + 1] if node.level else []
            module = ".".join(base + ([node.module] if node.module else []))
            names += [module] if node.module else [f"{module}.{a.name}" for a in node.names]
    return names


def test_no_product_module_is_a_god_file():
    big = {str(p.relative_to(REPO)): n for f in PRODUCT for p in _modules(f)
           if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert not big, f"modules over {MAX_LINES} lines: {big}"


def test_no_c_source_inside_python():
    inline = [str(p.relative_to(REPO)) for f in PRODUCT for p in _modules(f)
              if any(line.lstrip().startswith("#include <") for line in p.read_text().splitlines())]
    assert not inline, f"C source in Python files: {inline}"
    header = list((REPO / "models" / "kernels" / "csrc").glob("*.h"))
    assert len(header) == 1, f"one header declares the C interface, found {header}"
    sources = list((REPO / "models" / "kernels" / "csrc").glob("*.c"))
    assert sources and all(f'#include "{header[0].name}"' in s.read_text() for s in sources)


def test_imports_flow_one_way():
    def reaching(folder: str, *targets: str) -> dict[str, list[str]]:
        found = {}
        for p in _modules(folder):
            hits = [n for n in _imports(p) if any(n == t or n.startswith(t + ".")
                                                  for t in targets)]
            if hits:
                found[str(p.relative_to(REPO))] = hits
        return found

    assert not reaching("models", "ray", "zmq", "msgpack", "llm_shard.worker",
                        "llm_shard.coordinator", "llm_shard.cluster.wire")
    assert not reaching("cluster", "llm_shard.models", "llm_shard.worker",
                        "llm_shard.coordinator")
    assert not reaching("worker", "llm_shard.coordinator")
    into_worker = reaching("coordinator", "llm_shard.worker")
    assert sum(map(len, into_worker.values())) <= 1, (
        f"the coordinator imports worker/ only to hand the actor class to Ray: {into_worker}")


def test_readme_is_for_users():
    lines = (REPO / "README.md").read_text().splitlines()
    assert len(lines) <= 350, f"README.md has {len(lines)} lines"
    assert (REPO / "docs" / "architecture.md").is_file()
