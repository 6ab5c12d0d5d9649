"""Every module of sdsonnx imports, module-level imports form no cycle, and validate never depends on export."""
from __future__ import annotations

import ast
import pkgutil
import subprocess
import sys
from pathlib import Path

import sdsonnx

ROOT = Path(sdsonnx.__file__).parent
MODULES = sorted(m.name for m in pkgutil.walk_packages([str(ROOT)], "sdsonnx."))
SKIP = {"sdsonnx.bench.deepsparse_worker"}  # runs inside the DeepSparse venv and imports deepsparse


def _file(module: str) -> Path:
    path = ROOT.parent.joinpath(*module.split("."))
    return path / "__init__.py" if path.is_dir() else path.with_suffix(".py")


def _package(module: str) -> str:
    return module if _file(module).name == "__init__.py" else module.rpartition(".")[0]


def imported(source: str, module: str, top_level_only: bool) -> set[str]:
    """Absolute names `module` (whose text is `source`) imports: `from .x import y` gives pkg.x and pkg.x.y."""
    tree = ast.parse(source)
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    package, found = _package(module), set()
    for node in nodes:
        if isinstance(node, ast.ImportFrom):
            base = package.rsplit(".", node.level - 1)[0] if node.level else ""
            target = ".".join(p for p in (base, node.module) if p)
            found |= {target} | {f"{target}.{a.name}" for a in node.names}
        elif isinstance(node, ast.Import):
            found |= {a.name for a in node.names}
    return {name for name in found if name.startswith("sdsonnx")}


def test_modules_found_and_no_shims_left():
    assert {"sdsonnx.artifact.export", "sdsonnx.artifact.validate", "sdsonnx.artifact.checkpoint",
            "sdsonnx.artifact.metadata", "sdsonnx.artifact.initializers", "sdsonnx.artifact.files",
            "sdsonnx.bench.workload", "sdsonnx.masks"} <= set(MODULES)
    for old in ("sdsonnx.export", "sdsonnx.validate", "sdsonnx.onnx_meta", "sdsonnx.onnx_weights"):
        assert old not in MODULES, f"{old} moved to sdsonnx.artifact; no shim should stay behind"


def test_every_module_imports():
    code = "import importlib, sys\nfor name in sys.argv[1:]:\n    importlib.import_module(name)\n"
    names = [m for m in MODULES if m not in SKIP]
    result = subprocess.run([sys.executable, "-c", code, *names], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def find_cycle(graph: dict[str, list[str]]) -> list[str] | None:
    """A cycle of the directed graph {node: [successors]} as [a, b, ..., a], or None (depth-first search)."""
    state: dict[str, str] = {}

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = "open"
        for dep in graph.get(node, []):
            if state.get(dep) == "open":
                return path[path.index(dep):] + [dep]
            if dep not in state and (cycle := visit(dep, path + [dep])):
                return cycle
        state[node] = "done"
        return None

    for node in graph:
        if node not in state and (cycle := visit(node, [node])):
            return cycle
    return None


def test_no_import_cycle():
    """Module-level imports only: function-level imports are lazy and cannot deadlock."""
    graph = {m: sorted(imported(_file(m).read_text(), m, True) & set(MODULES) - {m}) for m in MODULES}
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_validate_and_export_are_siblings():
    """validate reads artifacts through the shared readers; it never imports the producer (nor the reverse)."""
    for module, other in (("sdsonnx.artifact.validate", "sdsonnx.artifact.export"),
                          ("sdsonnx.artifact.export", "sdsonnx.artifact.validate")):
        names = imported(_file(module).read_text(), module, top_level_only=False)
        assert not any(n == other or n.startswith(other + ".") for n in names), f"{module} imports {other}"
    code = "import sys, sdsonnx.artifact.validate; print('sdsonnx.artifact.export' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"


def test_the_import_reader_sees_what_would_break_the_rules():
    """The checks above can fail: relative imports resolve, and a two-module cycle is found."""
    names = imported("from .export import x\nfrom ..masks import y\nimport sdsonnx.data\n",
                     "sdsonnx.artifact.validate", top_level_only=True)
    assert names == {"sdsonnx.artifact.export", "sdsonnx.artifact.export.x", "sdsonnx.masks", "sdsonnx.masks.y",
                     "sdsonnx.data"}
    assert imported("def f():\n    from .export import x\n", "sdsonnx.artifact.validate", True) == set()
    assert find_cycle({"a": ["b"], "b": ["c"], "c": ["b"]}) == ["b", "c", "b"]
    assert find_cycle({"a": ["b", "c"], "b": ["c"], "c": []}) is None
    assert imported("from . import files\n", "sdsonnx.artifact", True) == {"sdsonnx.artifact",
                                                                          "sdsonnx.artifact.files"}
