"""ops/ sits under the kernel: nothing in it imports the layers above (read from the source with ``ast``)."""

import ast
from pathlib import Path

import pytest

import moekit.ops

OPS = Path(moekit.ops.__file__).parent
# What ops must never import: the kernel and everything built on it, and the benchmark/testing tools.
FORBIDDEN = ("moekit.kernel", "moekit.quant", "moekit.bench", "moekit.testing", "moekit.router", "moekit.layer",
             "moekit.routed_experts", "moekit.shared_experts", "moekit.functional", "moekit.hf", "moekit.cli",
             "moekit.loading")


def _imported_modules(source: str, package: str) -> list[str]:
    """Absolute names of every module ``source`` (a module of ``package``) imports, lazy imports included."""
    names = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names += [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against the file's package
                parts = package.split(".")
                parts = parts[: len(parts) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            # `from moekit import kernel` imports moekit.kernel: count the imported names as submodules too.
            names += [base] + [f"{base}.{a.name}" for a in node.names]
    return names


SOURCES = sorted(OPS.rglob("*.py"))


@pytest.mark.parametrize("path", SOURCES, ids=lambda p: str(p.relative_to(OPS)))
def test_ops_import_nothing_above_them(path):
    package = ".".join(("moekit", *path.relative_to(OPS.parent).parts[:-1]))
    names = _imported_modules(path.read_text(), package)
    bad = sorted({n for n in names for f in FORBIDDEN if n == f or n.startswith(f + ".")})
    assert not bad, f"moekit/ops/{path.relative_to(OPS)} imports {bad}: ops sit below kernel, bench and testing"


def test_the_scan_sees_relative_and_lazy_imports():
    # The check itself: lazy and relative imports of what ops must not use are resolved to their full names.
    source = "def f():\n    from ...kernel import get_experts\n    from .. import heuristics\n    import moekit.bench\n"
    names = _imported_modules(source, "moekit.ops._kernels")
    assert {"moekit.kernel", "moekit.ops.heuristics", "moekit.bench"} <= set(names)
