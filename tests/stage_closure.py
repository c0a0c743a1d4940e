"""The code each DVC stage runs: the import closure of its ``bonemet`` subcommand, read from the sources.

Every ``import bonemet...`` / ``from bonemet... import ...`` statement of a module counts, at module
level or inside a function (the stages import their libraries lazily), and so does every package's
``__init__.py`` above an imported module and the data files (templates, tables) that sit beside
the package's modules. :func:`uncovered` lists what a stage's ``deps`` in dvc.yaml miss.
"""

from __future__ import annotations

import ast
import shlex
from collections.abc import Iterable
from pathlib import Path

import yaml

SRC = Path(__file__).resolve().parents[1] / "src"


def _module_file(name: str) -> Path | None:
    path = SRC.joinpath(*name.split("."))
    if (path / "__init__.py").is_file():
        return path / "__init__.py"
    if path.with_suffix(".py").is_file():
        return path.with_suffix(".py")
    return None


def _imports(file: Path) -> set[str]:
    """The ``bonemet`` modules ``file`` imports (a ``from X import y`` counts ``X.y`` when that is a module)."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(file.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {a.name for a in node.names if a.name.split(".")[0] == "bonemet"}
        elif isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "bonemet":
            found.add(node.module)
            found |= {f"{node.module}.{a.name}" for a in node.names if _module_file(f"{node.module}.{a.name}")}
    return found


def closure(roots: Iterable[str]) -> set[Path]:
    """The files (relative to the repository) that importing ``roots`` runs, with their packages'
    ``__init__.py`` and the packages' data files (``importlib.resources``: templates, tables)."""
    todo, seen = list(roots), set()
    files: set[Path] = set()
    while todo:
        name = todo.pop()
        parts = name.split(".")
        for i in range(1, len(parts) + 1):  # the packages above it run first
            prefix = ".".join(parts[:i])
            if prefix in seen:
                continue
            seen.add(prefix)
            file = _module_file(prefix)
            if file is None:
                continue
            files.add(file)
            todo.extend(_imports(file))
    data = {p for f in files for p in _data_files(f.parent)}
    return {p.relative_to(SRC.parent) for p in files | data}


def _data_files(package: Path) -> set[Path]:
    """The non-Python files of a package: in its folder and its sub-folders that are not packages."""
    found = set()
    for p in package.iterdir():
        if p.is_file() and p.suffix not in (".py", ".pyc"):
            found.add(p)
        elif p.is_dir() and p.name != "__pycache__" and not (p / "__init__.py").exists():
            found |= {q for q in p.rglob("*") if q.is_file() and "__pycache__" not in q.parts}
    return found


def stage_modules(dvc_yaml: Path) -> dict[str, list[str]]:
    """Each stage's entry modules: ``bonemet.cli`` and the module of its ``bonemet <command>``."""
    from bonemet.cli import COMMANDS

    stages = yaml.safe_load(dvc_yaml.read_text(encoding="utf-8"))["stages"]
    out = {}
    for name, stage in stages.items():
        argv = shlex.split(str(stage["cmd"]))
        assert argv[0] == "bonemet", f"stage {name}: {stage['cmd']!r} is not a bonemet command"
        out[name] = ["bonemet.__main__", "bonemet.cli", COMMANDS[argv[1]][0]]
    return out


def uncovered(dvc_yaml: Path) -> dict[str, list[str]]:
    """Per stage, the files of its import closure that none of its ``deps`` (a file or a folder) covers."""
    stages = yaml.safe_load(dvc_yaml.read_text(encoding="utf-8"))["stages"]
    missing = {}
    for name, modules in stage_modules(dvc_yaml).items():
        deps = [Path(str(d)) for d in stages[name].get("deps", []) if isinstance(d, str) and d.startswith("src/")]
        lost = sorted(str(f) for f in closure(modules) if not any(f == d or d in f.parents for d in deps))
        if lost:
            missing[name] = lost
    return missing


def minimal_deps(files: Iterable[Path]) -> list[str]:
    """``files`` as dvc.yaml deps: a package folder whose every file is in ``files`` stands for them."""
    files = set(files)

    def whole(folder: Path) -> bool:
        inside = {p.relative_to(SRC.parent) for p in (SRC.parent / folder).rglob("*")
                  if p.is_file() and "__pycache__" not in p.parts and p.suffix != ".pyc"}
        return inside <= files

    out: set[Path] = set()
    for f in files:
        top = f
        for parent in f.parents:
            if parent == Path("src") or parent == Path("."):
                break
            if whole(parent):
                top = parent
        out.add(top)
    return sorted({str(p) for p in out if not any(q in p.parents for q in out)})
