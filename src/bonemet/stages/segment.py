"""`bonemet segment`: ten-fold MISSU training, out-of-fold automatic masks, metrics, registered model.

Params: the ``segment`` section; ``segment.profile`` picks ``segment.profiles.<name>``, merged
over the common keys (``dvc exp run -S segment.profile=paper``).
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path
from typing import Any

from bonemet.config import ParamsError, deep_merge, get, section
from bonemet.stages._common import params_from

log = logging.getLogger(__name__)

# Runtime requirements logged with the registered segmentation model (pinned like the venv).
MODEL_REQUIREMENTS = ["torch==2.13.0", "monai==1.6.1", "SimpleITK==2.5.7", "numpy", "scipy"]


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--profile", default=None, help="params profile (default: params segment.profile)")
    parser.add_argument("--folds", default=None, help="comma-separated fold numbers to run (default: all); "
                        "a partial run writes masks only for those folds' cases: for debugging and timing")
    parser.add_argument("--model", default=None, help="network (default: params segment.model)")
    parser.add_argument("--no-register", action="store_true", help="do not register the final model")


def resolve_params(params: dict[str, Any], profile: str | None = None) -> dict[str, Any]:
    """The ``segment`` section with its profile merged over the common keys."""
    seg = section(params, "segment")
    profiles = seg.pop("profiles", {}) or {}
    name = profile or seg.pop("profile", None)
    seg.pop("profile", None)
    if name:
        if name not in profiles:
            raise ParamsError(f"segment.profile '{name}' is not one of segment.profiles: {sorted(profiles)}")
        seg = deep_merge(seg, profiles[name])
    seg["profile"] = name or ""
    return seg


def train_config(seg: dict[str, Any], seed: int):
    """TrainConfig from the resolved ``segment`` params."""
    import os

    from bonemet.segmentation.training import TrainConfig

    flat = {
        **seg.get("train", {}), **seg.get("augment", {}), **seg.get("inference", {}),
        "roi_size": seg["roi_size"], "distill_weight": float(seg.get("distill_weight", 0.0)),
        "device": seg.get("device", "auto"), "amp": bool(seg.get("amp", True)),
        "num_threads": seg.get("num_threads") or os.cpu_count(), "seed": seed,
    }
    return TrainConfig.from_params(flat)


def run(args: argparse.Namespace) -> int:
    import json

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import pandas as pd

    from bonemet.data.manifest import read_manifest
    from bonemet.segmentation.cv import plot_curves, run_cross_validation
    from bonemet.segmentation.data import load_cases, load_volume
    from bonemet.segmentation.metrics import summarize
    from bonemet.segmentation.networks import build_network
    from bonemet.segmentation.training import tune
    from bonemet.stages._common import mlflow_tracker
    from bonemet.utils import atomic_path, write_json

    params = params_from(args)
    seg = resolve_params(params, args.profile)
    seed = int(get(params, "seed"))
    config = train_config(seg, seed)
    name = args.model or seg["model"]
    net_kwargs = dict((seg.get("networks") or {}).get(name, {}) or {})

    def factory():
        return build_network(name, in_channels=1, out_channels=2, roi_size=config.roi_size, **net_kwargs)

    manifest = read_manifest(get(params, "data.cohort_dir"))
    originals = {c.case_id: (c.image, c.manual_mask) for c in manifest}
    cases = load_cases(seg["preprocessed_dir"], originals)
    splits = json.loads(Path(seg["splits"]).read_text(encoding="utf-8"))
    folds = {k: int(v) for k, v in splits["all_folds"].items()}
    only_folds = [int(f) for f in args.folds.split(",")] if args.folds else None
    log.info("segment: %s, profile '%s', %d cases, %d folds, roi %s, %d threads, device %s", name, seg["profile"],
             len(cases), len(set(folds.values())), config.roi_size, config.num_threads, config.device)

    tracker = mlflow_tracker(seg.get("experiment", "bonemet-segmentation"))
    start = time.perf_counter()
    with tracker.run("segment", tags={"stage": "segment", "model": name, "profile": seg["profile"]}) as parent_id:
        tracker.log_params({
            "model": name, "profile": seg["profile"], "network": net_kwargs, **config.as_dict(),
            "val_fraction": seg["val_fraction"], "threshold": seg["threshold"],
            "largest_component": seg["largest_component"], "final_model": seg["final_model"],
        })
        n_trials = int(get(seg, "tune.n_trials", 0))
        if n_trials > 0:
            config = _tune(seg, config, cases, folds, factory, n_trials, tracker, tune, load_volume)
        result = run_cross_validation(
            cases, folds, factory, config, seg["masks_dir"], seg["work_dir"], tracker,
            val_fraction=float(seg["val_fraction"]), threshold=float(seg["threshold"]),
            largest_component=bool(seg["largest_component"]), fold_params={"model": name, "network": net_kwargs},
            only_folds=only_folds, parallel_folds=int(seg.get("parallel_folds", 1) or 1),
        )
        wall = time.perf_counter() - start
        table = pd.DataFrame(result.case_rows).sort_values("case_id")
        summary = summarize(result.case_rows) if "dice" in table.columns else {"n_cases": len(table)}
        summary.update({
            "model": name, "profile": seg["profile"], "n_folds": len(result.folds), "best_fold": result.best_fold,
            "wall_seconds": round(wall, 1),
            "train_seconds_total": round(sum(f.train_seconds for f in result.folds), 1),
            "infer_seconds_per_case": round(sum(f.infer_seconds_per_case * f.n_test for f in result.folds)
                                            / max(1, len(table)), 3),
            "epochs_mean": sum(len(f.history) for f in result.folds) / max(1, len(result.folds)),
            "n_parameters": result.folds[0].n_parameters if result.folds else 0,
        })
        tracker.log_metrics({k: v for k, v in summary.items() if isinstance(v, int | float) and v is not None})
        _write_outputs(seg, summary, table, result, plot_curves, plt, atomic_path, write_json)
        tracker.log_table(table, "segmentation_cases.csv")
        tracker.log_artifact(Path(seg["plots_dir"]) / "curves.png", artifact_path="curves")
        tracker.log_dict(summary, "segmentation.json")
        if seg["final_model"] != "none" and result.best_model is not None:
            _log_final_model(seg, params, name, net_kwargs, config, result, tracker, parent_id,
                             register=not args.no_register and not args.folds)
    log.info("segment: mean Dice %.4f (sd %.4f) over %d cases in %.0f s", summary.get("dice_mean") or float("nan"),
             summary.get("dice_sd") or float("nan"), len(table), wall)
    return 0


def _tune(seg, config, cases, folds, factory, n_trials, tracker, tune, load_volume):
    """Optuna on the first fold's training cases (its validation split); returns the tuned config."""
    from dataclasses import replace

    from bonemet.segmentation.cv import split_validation

    first = min(folds.values())
    train_all = [c for c in cases if folds[c.case_id] != first]
    train_ids, val_ids = split_validation([c.case_id for c in train_all], float(seg["val_fraction"]), config.seed)
    by_id = {c.case_id: c for c in train_all}
    train_items = [load_volume(by_id[i]) for i in train_ids]
    val_items = [load_volume(by_id[i]) for i in val_ids]
    space = {k: v for k, v in seg["tune"].items() if k in ("lr", "batch_size", "max_epochs")}
    best = tune(factory, train_items, val_items, config, n_trials, space, tracker, seed=config.seed)
    tracker.log_params({f"tuned.{k}": v for k, v in best.items()})
    return replace(config, **best)


def _write_outputs(seg, summary, table, result, plot_curves, plt, atomic_path, write_json) -> None:
    """metrics JSON, per-case CSV, per-fold curve CSVs (DVC plots) and the curves PNG."""
    import pandas as pd

    write_json(seg["metrics"], summary)
    with atomic_path(seg["cases_table"]) as tmp:
        table.to_csv(tmp, index=False)
    with atomic_path(seg["plots_dir"], is_dir=True) as tmp_dir:
        (tmp_dir / "curves").mkdir()
        for fold in result.folds:
            pd.DataFrame(fold.history).to_csv(tmp_dir / "curves" / f"fold-{fold.fold}.csv", index=False)
        fig = plot_curves({f.fold: f.history for f in result.folds}, title=f"{summary['model']}: loss and Dice per epoch")
        fig.savefig(tmp_dir / "curves.png", dpi=110)
        plt.close(fig)
        if "dice" in table.columns:
            fig, ax = plt.subplots(figsize=(6, 4))
            ax.hist(table["dice"], bins=20, range=(0, 1))
            ax.set_xlabel("out-of-fold Dice (auto vs manual, original grid)")
            ax.set_ylabel("cases")
            fig.tight_layout()
            fig.savefig(tmp_dir / "dice_histogram.png", dpi=110)
            plt.close(fig)


def _log_final_model(seg, params, name, net_kwargs, config, result, tracker, parent_id, register: bool) -> None:
    """Log the best fold's model (by validation Dice) and register it as ``model_name@alias``."""
    metadata = {
        "network": name, "network_kwargs": {k: list(v) if isinstance(v, tuple) else v for k, v in net_kwargs.items()},
        "roi_size": list(config.roi_size), "overlap": config.overlap, "sw_batch_size": config.sw_batch_size,
        "mirror_axes": list(config.mirror_axes), "threshold": float(seg["threshold"]),
        "largest_component": bool(seg["largest_component"]),
        "source_fold": result.best_fold, "source_run_id": result.best_run_id or "",
        "preprocess": _preprocess_kwargs(params),
    }
    tracker.log_dict(metadata, "model_metadata.json")
    tracker.log_model(result.best_model.eval(), name="model", flavor="pytorch",
                      pip_requirements=MODEL_REQUIREMENTS, metadata=metadata,
                      serialization_format="pickle")  # pt2 (torch.export) would need a traced example
    if not register or parent_id is None:
        return
    from bonemet.tracking.mlflow_backend import register_model, set_alias

    version = register_model(
        parent_id, "model", seg["model_name"],
        description=f"{name} segmentation model from fold {result.best_fold} (best validation Dice) of the "
                    f"ten-fold run; input: a CT preprocessed as in metadata['preprocess'].",
        tags={"network": name, "profile": seg["profile"], "source_fold": str(result.best_fold)},
    )
    set_alias(seg["model_name"], seg["alias"], version)


def _preprocess_kwargs(params: dict[str, Any]) -> dict[str, Any]:
    """Keyword arguments of preprocess_image that reproduce the training inputs."""
    pre = section(params, "preprocess")
    crop = pre.get("crop", {})
    return {
        "target_spacing_mm": list(pre["target_spacing_mm"]), "image_interpolator": pre["image_interpolator"],
        "hu_window": list(pre["hu_window"]), "bone_threshold_hu": crop.get("bone_threshold_hu"),
        "margin_mm": crop.get("margin_mm"), "min_size_vox": list(crop.get("min_size_vox", [64, 64, 64])),
        "min_component_ml": crop.get("min_component_ml", 1.0),
    }
