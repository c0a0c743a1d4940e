"""The DVC contract: a stage's outputs are a function of its declared code, data and params.

- every file a stage runs is among its ``deps`` (the import closure of its ``bonemet`` command,
  derived from the sources by tests/stage_closure.py, lazy imports and package data included);
- no output is a log, and every output is cached (a fresh workspace pulls them all: nothing reruns);
- the committed ``dvc.lock`` describes the committed ``dvc.yaml`` (its stages, deps, params, outs).

The end-to-end half (a forced rerun under load writes the same bytes, a fresh clone after
``dvc pull`` recomputes nothing, queued experiments rerun only what changed, ``dvc queue kill``
leaves no process) runs on the tiny cohort in tests/test_pipeline_smoke.py.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from stage_closure import SRC, closure, stage_modules, uncovered

REPO = Path(__file__).resolve().parents[1]


def _stages() -> dict:
    return yaml.safe_load((REPO / "dvc.yaml").read_text(encoding="utf-8"))["stages"]


def test_each_stage_depends_on_every_file_of_the_code_it_runs():
    assert uncovered(REPO / "dvc.yaml") == {}
    for name, stage in _stages().items():
        for dep in stage["deps"]:
            if str(dep).startswith("src/"):
                assert (REPO / dep).exists(), f"stage {name}: dep {dep} does not exist"


def test_the_closure_follows_lazy_imports_packages_and_their_data():
    segment = closure(stage_modules(REPO / "dvc.yaml")["segment"])
    # imported inside `run`, not at module level: still code the stage runs
    assert Path("src/bonemet/segmentation/cv.py") in segment
    assert Path("src/bonemet/segmentation/__init__.py") in segment  # the package runs first
    assert Path("src/bonemet/radiomics/extraction.py") not in segment  # no stage depends on everything
    report = closure(stage_modules(REPO / "dvc.yaml")["report"])
    templates = {p for p in report if p.suffix == ".j2"}
    assert templates and all((SRC.parent / p).is_file() for p in templates)  # the report's template


def test_no_output_is_a_log_and_every_output_is_cached():
    log_dir = yaml.safe_load((REPO / "params.yaml").read_text(encoding="utf-8"))["tracking"]["log_dir"]
    for name, stage in _stages().items():
        for out in stage.get("outs", []) + stage.get("metrics", []):
            path, options = (out, {}) if isinstance(out, str) else next(iter(out.items()))
            assert not str(path).startswith(("${tracking.log_dir}", log_dir)), f"stage {name}: {path}"
            assert (options or {}).get("cache", True), f"stage {name}: {path} is not cached"


def test_the_committed_lock_describes_the_committed_pipeline():
    import re

    params = yaml.safe_load((REPO / "params.yaml").read_text(encoding="utf-8"))

    def resolve(text: str) -> str:
        def value(match: re.Match) -> str:
            node = params
            for part in match.group(1).split("."):
                node = node[part]
            return str(node)

        return re.sub(r"\$\{([^}]+)\}", value, str(text))

    lock = yaml.safe_load((REPO / "dvc.lock").read_text(encoding="utf-8"))["stages"]
    stages = _stages()
    assert set(lock) == set(stages)
    for name, stage in stages.items():
        assert resolve(stage["cmd"]) == lock[name]["cmd"], name
        assert sorted(resolve(d) for d in stage["deps"]) == sorted(d["path"] for d in lock[name]["deps"]), name
        outs = [o if isinstance(o, str) else next(iter(o)) for o in stage.get("outs", []) + stage.get("metrics", [])]
        assert sorted(resolve(o) for o in outs) == sorted(o["path"] for o in lock[name].get("outs", [])), name
