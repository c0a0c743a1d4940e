"""One command line: every option explained, one name per concept across subcommands."""

from __future__ import annotations

import json

from bonemet.cli import build_parser


def _commands() -> dict:
    parser = build_parser()
    sub = next(a for a in parser._actions if a.__class__.__name__ == "_SubParsersAction")
    return dict(sub.choices)


def test_every_option_of_every_command_has_a_help_text():
    missing = [f"{name} {'/'.join(a.option_strings) or a.dest}" for name, command in _commands().items()
               for a in command._actions if a.dest != "help" and not a.help]
    assert missing == []


def test_one_name_per_concept_across_subcommands():
    options = {name: {o for a in command._actions for o in a.option_strings} for name, command in _commands().items()}
    assert all("--no-progress" in opts and "--params" in opts for opts in options.values())
    # the cohort folder, the output and switching MLflow off are spelt the same wherever they exist
    for name in ("validate", "preprocess", "split", "extract"):
        assert "--cohort-dir" in options[name], name
    for name in ("validate", "preprocess", "split", "extract", "register", "report"):
        assert "--out" in options[name], name
    for name in ("segment", "extract", "train", "evaluate", "report"):
        assert "--no-tracking" in options[name], name
    for name in ("models", "register"):
        assert "--json" in options[name], name
    spelt_otherwise = {"--output", "--outdir", "--out-dir", "--cohort", "--no-mlflow", "--notrack", "--quiet"}
    assert not {n: o & spelt_otherwise for n, o in options.items() if o & spelt_otherwise}


def test_models_json_lists_every_registered_model(tmp_path, monkeypatch, params_file, capsys):
    from bonemet.cli import main

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    params = params_file({"tracking": {"store_dir": str(tmp_path / "mlruns")}})
    assert main(["models", "--params", str(params), "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == {"bonemet-classifier": [], "bonemet-segmenter": []}
