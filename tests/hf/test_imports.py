"""How moekit.hf sits in the import graph, and what a missing optional dependency says."""

from __future__ import annotations

import ast
import importlib
import sys
from pathlib import Path

import pytest
import torch

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


def _reimport(monkeypatch, missing: str, module: str):
    """Import ``module`` afresh while ``missing`` cannot be imported."""
    monkeypatch.setitem(sys.modules, missing, None)  # None in sys.modules makes `import missing` fail
    for name in [n for n in sys.modules if n == module or n.startswith(module + ".")]:
        monkeypatch.delitem(sys.modules, name)
    return importlib.import_module(module)


def test_import_hf_without_transformers_names_the_extra(monkeypatch):
    with pytest.raises(ImportError, match=r"pip install 'moekit\[hf\]'"):
        _reimport(monkeypatch, "transformers", "moekit.hf")


def test_reading_safetensors_without_safetensors_names_the_extra(monkeypatch, tmp_path):
    pytest.importorskip("safetensors")
    from safetensors.torch import save_file

    from moekit.loading import Checkpoint

    save_file({"model.layers.0.mlp.gate.weight": torch.zeros(4, 8)}, tmp_path / "model.safetensors")
    monkeypatch.setitem(sys.modules, "safetensors", None)
    with pytest.raises(ImportError, match=r"pip install 'moekit\[hf\]'"):
        Checkpoint(tmp_path)
