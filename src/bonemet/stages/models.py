"""`bonemet models`: registered versions with aliases and key metrics."""

from __future__ import annotations

import argparse


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", action="append", default=None,
                        help="registered model name (repeatable; default: bonemet-classifier and bonemet-missu)")


def run(args: argparse.Namespace) -> int:
    import os

    from bonemet.config import section
    from bonemet.stages._common import params_from
    from bonemet.tracking.mlflow_backend import configure as configure_mlflow
    from bonemet.tracking.mlflow_backend import model_versions

    reg = section(params_from(args), "register")
    configure_mlflow(os.environ.get("MLFLOW_TRACKING_URI"), reg.get("store_dir", "mlruns"))
    names = args.model or [reg["model_name"], reg.get("segmentation_model_name", "bonemet-missu")]
    for name in names:
        rows = model_versions(name)
        print(f"{name}: {len(rows)} version(s)")
        for row in rows:
            tags = row["tags"]
            metrics = "  ".join(
                f"{k}={float(tags[k]):.3f}" for k in ("cv_auc_mean", "test_auc", "dice_mean") if k in tags
            )
            aliases = ",".join(row["aliases"]) or "-"
            print(f"  v{row['version']:<4} aliases={aliases:<20} {tags.get('classifier', '')}  {metrics}  run={row['run_id']}")
    return 0
