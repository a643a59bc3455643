"""How moekit.hf sits in the import graph."""

from __future__ import annotations

import ast
from pathlib import Path

PACKAGE = Path(__file__).parents[2] / "moekit"


def _imports(path: Path) -> list[tuple[str, list[str]]]:
    """(module, names) of every import in ``path``, wherever it sits (functions included)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            found.append((node.module, [a.name for a in node.names]))
        elif isinstance(node, ast.Import):
            found.extend((a.name, []) for a in node.names)
    return found


def test_the_core_never_imports_the_integration():
    # MoE.from_hf imported moekit.hf inside the method: the core depended on an optional integration.
    core = [p for p in PACKAGE.rglob("*.py") if "hf" not in p.relative_to(PACKAGE).parts]
    offenders = [str(p) for p in core for module, _ in _imports(p) if module.startswith("moekit.hf")]
    assert offenders == []


def test_hf_modules_form_a_dag_of_public_names():
    graph = {}
    for path in sorted((PACKAGE / "hf").glob("*.py")):
        if path.name == "__init__.py":
            continue
        edges = set()
        for module, names in _imports(path):
            if module == "moekit.hf":
                edges.update(n for n in names)
            elif module.startswith("moekit.hf."):
                edges.add(module.removeprefix("moekit.hf."))
                # layouts.py imported experts.py's private helpers: shared helpers have a public home
                assert not [n for n in names if n.startswith("_")], f"{path.name} imports private {names} of {module}"
        graph[path.stem] = edges
    seen: dict[str, int] = {}  # 1 on the path, 2 done

    def visit(node: str, path: tuple[str, ...]) -> None:
        assert seen.get(node) != 1, f"import cycle {' -> '.join((*path, node))}"
        if seen.get(node) == 2:
            return
        seen[node] = 1
        for child in graph.get(node, ()):
            visit(child, (*path, node))
        seen[node] = 2

    for node in graph:
        visit(node, ())
    # The experts implementation needs neither the layer nor the checkpoint loader (which pulls in the layer).
    for name in ("experts", "spec"):
        modules = {m for m, _ in _imports(PACKAGE / "hf" / f"{name}.py")}
        assert not modules & {"moekit.layer", "moekit.loading"}, name
