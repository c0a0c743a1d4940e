"""`bonemet report`: the self-contained HTML report of the pipeline's outputs (params ``report``).

It reads only files: the outputs of the other stages, at the paths their params sections name,
plus, for the registry section, what ``metrics/registry.json`` and (when it exists) the MLflow
store say. Without a store the report still builds (run ids from the files, no version list).
"Params that differ from the defaults": :func:`bonemet.report.build.committed_params`.
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default=None, help="HTML file to write (default: params report.out)")
    parser.add_argument("--no-tracking", action="store_true",
                        help="do not read the MLflow store (the registry section then shows the files only)")


def run(args: argparse.Namespace) -> int:
    from bonemet.config import load_params
    from bonemet.report import CaseSettings, Provenance, build_report
    from bonemet.report.build import committed_params, replication_settings, report_inputs
    from bonemet.stages._common import pseudonym_key, specs_from
    from bonemet.tracking.dvc import data_md5
    from bonemet.tracking.provenance import git_commit

    params = specs_from(args)
    spec = params.report
    store = None if args.no_tracking else read_store(params)
    baseline, note = committed_params(args.params)
    ev = params.evaluate
    build_report(
        args.out or spec.out, report_inputs(params), title=spec.title,
        cases=CaseSettings(mask_label=params.data.mask_label, roi=params.data.roi, seg_segment=params.data.segment,
                           grid_tolerance_mm=params.validation.grid_tolerance_mm,
                           pseudonym_key=pseudonym_key(params)),
        provenance=Provenance(git_commit=git_commit(), data_md5=data_md5(params.data.cohort_dir),
                              tracking_uri=store["uri"] if store else None, params=load_params(args.params),
                              baseline_params=baseline, baseline_note=note),
        method_settings=replication_settings(params),
        example_cases=spec.example_cases, figure_dpi=ev.figure_dpi, store=store, mlflow_ui_url=spec.mlflow_ui_url,
    )
    return 0


def read_store(params: Any) -> dict[str, Any] | None:
    """What the MLflow store says for the registry section, or None when there is no store to read.

    A local store that does not exist yet is not created (the report reads, never writes).
    """
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if not uri and not (Path(params.tracking.store_dir) / "mlflow.db").is_file():
        log.info("report: no MLflow store at %s; the registry section shows the files only", params.tracking.store_dir)
        return None
    from bonemet.registry.store import model_versions
    from bonemet.stages._common import open_store

    try:
        store = open_store(params)
        uri = store.tracking_uri
        models = {name: model_versions(store, name) for name in (params.registration.model_name, params.segment.model_name)}
        return {"uri": uri, "models": models}
    except Exception as exc:  # noqa: BLE001 - a store we cannot read must not stop the report
        log.warning("report: the MLflow store %s could not be read (%s: %s); the registry section shows the files "
                    "only", uri, type(exc).__name__, exc)
        return None
