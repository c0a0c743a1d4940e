"""The `bonemet` command. Subcommands are thin: parse, load params, call the library.

Each subcommand lives in ``bonemet.stages.<module>`` with ``configure(parser)`` and
``run(args) -> int``; heavy libraries are imported inside ``run`` so that ``bonemet --help``
stays fast.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import os
import sys

from bonemet import __version__
from bonemet.errors import UserError
from bonemet.utils import (
    capture_warnings,
    configure_progress,
    end_with_parent,
    kill_descendants,
    setup_logging,
)

log = logging.getLogger("bonemet")

# name -> (module, one-line help). Order is the order of the pipeline, then the user commands.
COMMANDS: dict[str, tuple[str, str]] = {
    "synth": ("bonemet.stages.synth", "write a synthetic spine-CT cohort in the bring-your-own format"),
    "ensure-data": ("bonemet.stages.ensure_data", "regenerate the default synthetic cohort when it is missing"),
    "validate": ("bonemet.stages.validate", "validate a cohort (manifest, images, masks); exit 1 on hard failures"),
    "plan": ("bonemet.stages.plan", "fingerprint the cohort and plan spacing, HU window, crop and batch size"),
    "preprocess": ("bonemet.stages.preprocess", "resample, normalise and crop every case"),
    "split": ("bonemet.stages.split", "stratified train/test split and cross-validation folds"),
    "segment": ("bonemet.stages.segment", "MISSU ten-fold training and out-of-fold automatic masks"),
    "extract": ("bonemet.stages.extract", "PyRadiomics features from manual, automatic and annotator masks"),
    "train": ("bonemet.stages.train", "ICC/LASSO selection, eight tuned classifiers, evaluation (Table 1)"),
    "evaluate": ("bonemet.stages.evaluate", "the whole classification pipeline over repeated random splits"),
    "register": ("bonemet.stages.register", "register the best classifier and gate it to the alias 'staging'"),
    "report": ("bonemet.stages.report", "write the self-contained HTML report"),
    "promote": ("bonemet.stages.promote", "give a registered model version an alias (staging, production)"),
    "models": ("bonemet.stages.models", "list registered model versions with aliases and key metrics"),
    "serve": ("bonemet.stages.serve", "serve bonemet-classifier@ALIAS over HTTP (mlflow models serve)"),
    "predict": ("bonemet.stages.predict", "predict breast origin from a CT (segment, extract, classify)"),
    "pseudonyms": ("bonemet.stages.pseudonyms", "map pseudonymous ids back to the manifest's ids (needs the key)"),
}


#: Commands that write a log of their own (``<tracking.log_dir>/<command>.log``: the log lines and every
#: warning in full): the DVC stages. The others (and ``validate`` without ``--report``) write nothing.
LOGGED = {"plan", "preprocess", "split", "segment", "extract", "train", "evaluate", "register", "report"}


def stage_log(args: argparse.Namespace) -> str | None:
    """Where this command's log goes (None: nowhere; its warnings are still counted on screen)."""
    if args.command not in LOGGED and not (args.command == "validate" and getattr(args, "report", None)):
        return None
    try:  # the stage itself validates the params and names any mistake; here only the folder is read
        from bonemet.config import load_params

        log_dir = load_params(args.params)["tracking"]["log_dir"]
    except Exception:  # noqa: BLE001 - the stage reports a broken params file itself
        return None
    return os.path.join(str(log_dir), f"{args.command}.log")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bonemet", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"bonemet {__version__}")
    parser.add_argument("--log-level", default="INFO", help="logging level: DEBUG, INFO, WARNING or ERROR (default INFO)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module_name, help_text) in COMMANDS.items():
        module = importlib.import_module(module_name)
        command = sub.add_parser(name, help=help_text, description=help_text)
        command.add_argument("--params", default="params.yaml", help="params file (default params.yaml)")
        command.add_argument("--no-progress", action="store_true",
                             help="hide the progress bars (BONEMET_PROGRESS=0 hides them for every command)")
        module.configure(command)
        command.set_defaults(_run=module.run)
    return parser


#: Environment defaults of the command line (never set by the library): no telemetry or usage
#: statistics from MLflow, DVC or Great Expectations, and matplotlib's file-only backend.
ENV_DEFAULTS = {
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "DO_NOT_TRACK": "1",
    "DVC_NO_ANALYTICS": "1",
    "GX_ANALYTICS_ENABLED": "false",
    "MPLBACKEND": "Agg",
}


def main(argv: list[str] | None = None) -> int:
    """Run one subcommand. A user's mistake (:class:`~bonemet.errors.UserError`) is printed as one
    line with its exit code (1, or 2 for params); anything else is a bug and keeps its traceback."""
    for key, value in ENV_DEFAULTS.items():
        os.environ.setdefault(key, value)
    # BONEMET_PROGRESS=0 (CI sets it) hides every progress bar; the --no-progress flags do it per command
    configure_progress(os.environ.get("BONEMET_PROGRESS", "1").strip().lower() not in {"0", "false", "off", "no"})
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging(args.log_level)
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    if args.no_progress:
        configure_progress(False)
    from bonemet.tracking.dvc import in_dvc_stage

    if in_dvc_stage():  # a DVC stage: it ends, with its workers, when DVC's process does
        end_with_parent()
    with capture_warnings(stage_log(args), args.command):  # a user's mistake goes into the stage's log too
        try:
            return int(args._run(args) or 0)
        except UserError as exc:
            log.debug("user error", exc_info=True)
            log.error("%s", exc)
            return int(getattr(exc, "exit_code", 1))
        except KeyboardInterrupt:
            kill_descendants()  # no worker of an interrupted stage keeps training
            log.error("interrupted")
            return 130


if __name__ == "__main__":
    sys.exit(main())
