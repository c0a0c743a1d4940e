"""The package's layers: no import cycle between its packages, each heavy library in one home,
no side effects at import."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

SRC = Path(__file__).resolve().parents[1] / "src" / "bonemet"

#: third-party packages that only one bonemet package may import
HOMES = {"mlflow": "bonemet.registry", "great_expectations": "bonemet.validation.gx", "radiomics": "bonemet.radiomics",
         "dask": "bonemet.compute", "distributed": "bonemet.compute",
         "torch": "bonemet.segmentation", "monai": "bonemet.segmentation",
         "optuna": "bonemet.search", "dvc": "bonemet.tracking.dvc"}

#: DVC is driven, never imported: its executable, its files and the environment it gives a stage are
#: named (as string constants, docstrings aside) only in its home
DVC_HOME = "bonemet.tracking.dvc"
DVC_NAMES = {"dvc", "dvc.lock", "dvc.yaml", ".dvc", "*.dvc", "DVC_ROOT", "DVC_EXP_NAME", "DVC_STAGE"}


def _module_name(path: Path) -> str:
    parts = path.relative_to(SRC.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> list[tuple[str, int]]:
    """Every module imported by ``path`` (at module level or inside functions), except imports
    under ``if TYPE_CHECKING:``, which never run."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    skipped: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            for inner in ast.walk(node):
                skipped.add(id(inner))
    found = []
    for node in ast.walk(tree):
        if id(node) in skipped:
            continue
        if isinstance(node, ast.Import):
            found += [(alias.name, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.append((node.module, node.lineno))
    return found


def _package(module: str) -> str:
    """``bonemet.x`` for any module under it (the unit of layering)."""
    parts = module.split(".")
    return ".".join(parts[:2])


def _graph() -> dict[str, set[str]]:
    edges: dict[str, set[str]] = defaultdict(set)
    for path in SRC.rglob("*.py"):
        source = _package(_module_name(path))
        for module, _ in _imports(path):
            if module.startswith("bonemet.") and _package(module) != source:
                edges[source].add(_package(module))
    return edges


def _cycle(edges: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(edges.get(node, ())):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(edges):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_the_package_graph_has_no_cycle():
    edges = _graph()
    assert "bonemet.registry" in edges  # the walk sees the packages
    assert _cycle(edges) is None, " -> ".join(_cycle(edges) or [])


def test_the_cycle_finder_finds_a_cycle():
    assert _cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert _cycle({"a": {"b"}, "b": {"c"}}) is None


def test_nothing_below_the_entry_points_imports_the_registry_or_the_stages():
    edges = _graph()
    importers = sorted(p for p, targets in edges.items() if "bonemet.registry" in targets)
    assert importers == ["bonemet.stages"]
    assert sorted(p for p, targets in edges.items() if "bonemet.stages" in targets) == ["bonemet.cli"] or not any(
        "bonemet.stages" in t for t in edges.values())


def test_each_heavy_library_is_imported_in_its_one_home():
    offenders = []
    for path in SRC.rglob("*.py"):
        module = _module_name(path)
        for imported, line in _imports(path):
            top = imported.split(".")[0]
            home = HOMES.get(top)
            if home and not (module == home or module.startswith(home + ".")):
                offenders.append(f"{path.relative_to(SRC.parent)}:{line} imports {imported} (home: {home})")
    assert offenders == []


def _dvc_names(path: Path) -> list[tuple[str, int]]:
    """The string constants of ``path`` (docstrings aside) that name DVC's executable, files or stage environment."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                  if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef)
                  and node.body and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)}
    return [(node.value, node.lineno) for node in ast.walk(tree)
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings
            and node.value in DVC_NAMES]


def test_dvc_is_driven_from_its_one_home():
    """Running ``dvc``, reading ``dvc.lock`` / ``.dvc`` files and DVC's stage environment: bonemet.tracking.dvc only."""
    offenders = [f"{path.relative_to(SRC.parent)}:{line} names {name!r} (home: {DVC_HOME})"
                 for path in SRC.rglob("*.py") if _module_name(path) != DVC_HOME for name, line in _dvc_names(path)]
    assert offenders == []
    assert {name for name, _ in _dvc_names(SRC / "tracking" / "dvc.py")} >= {"dvc", "dvc.lock", ".dvc"}


def test_importing_every_module_has_no_side_effects():
    """No environment writes, no matplotlib backend choice, no torch thread count change at import.

    The third-party libraries are imported first (scikit-learn, for one, sets OpenMP variables
    at import): what is measured is what bonemet's own modules do.
    """
    modules = sorted(_module_name(p) for p in SRC.rglob("*.py") if p.name != "__main__.py")
    third_party = sorted({imported.split(".")[0] for p in SRC.rglob("*.py") for imported, _ in _imports(p)
                          if not imported.startswith("bonemet") and imported.split(".")[0] not in sys.stdlib_module_names
                          and imported.split(".")[0] not in HOMES and imported.split(".")[0] != "matplotlib"})
    script = f"""
import json, os, sys, importlib
for name in {third_party!r}:
    importlib.import_module(name)
before = dict(os.environ)
import torch
threads = torch.get_num_threads()
import matplotlib
backend_before = matplotlib.rcParams._get_backend_or_none()
for name in {modules!r}:
    importlib.import_module(name)
print(json.dumps({{
    "env_changed": sorted(k for k in set(before) | set(os.environ) if before.get(k) != os.environ.get(k)),
    "backend_set": matplotlib.rcParams._get_backend_or_none() != backend_before,
    "threads_changed": torch.get_num_threads() != threads,
}}))
"""
    env = {k: v for k, v in __import__("os").environ.items() if k not in ("MPLBACKEND",)}
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result == {"env_changed": [], "backend_set": False, "threads_changed": False}
