"""`bonemet promote VERSION --alias staging|production`: move an alias by hand."""

from __future__ import annotations

import argparse

ALIASES = ("staging", "production")


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("version", help="registered model version number")
    parser.add_argument("--alias", required=True, choices=ALIASES)
    parser.add_argument("--model", default=None, help="registered model name (default: params register.model_name)")


def run(args: argparse.Namespace) -> int:
    import logging
    import os

    from bonemet.config import section
    from bonemet.stages._common import params_from
    from bonemet.tracking.mlflow_backend import configure as configure_mlflow
    from bonemet.tracking.mlflow_backend import model_versions, set_alias

    log = logging.getLogger(__name__)
    reg = section(params_from(args), "register")
    configure_mlflow(os.environ.get("MLFLOW_TRACKING_URI"), reg.get("store_dir", "mlruns"))
    name = args.model or reg["model_name"]
    versions = {v["version"] for v in model_versions(name)}
    if args.version not in versions:
        log.error("model '%s' has no version %s (versions: %s)", name, args.version, ", ".join(sorted(versions, key=int)) or "none")
        return 1
    set_alias(name, args.alias, args.version)
    print(f"{name}@{args.alias} -> version {args.version}")
    return 0
