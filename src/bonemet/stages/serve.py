"""`bonemet serve`: `mlflow models serve` for bonemet-classifier@ALIAS with this project's environment."""

from __future__ import annotations

import argparse


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--alias", default="staging", help="model alias to serve (default staging)")
    parser.add_argument("--model", default=None, help="registered model name (default: params register.model_name)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=5001)
    parser.add_argument("--workers", type=int, default=1)


def run(args: argparse.Namespace) -> int:
    import logging
    import os
    import subprocess
    import sys
    from pathlib import Path

    from bonemet.registry.store import alias_version
    from bonemet.stages._common import open_store, specs_from

    log = logging.getLogger(__name__)
    params = specs_from(args)
    uri = open_store(params)
    name = args.model or params.registration.model_name
    version = alias_version(name, args.alias)
    if version is None:
        log.error("no model '%s@%s' in %s: run the pipeline (make run) or `bonemet promote`", name, args.alias, uri)
        return 1
    env = dict(os.environ)
    env["MLFLOW_TRACKING_URI"] = uri
    env["MLFLOW_DISABLE_TELEMETRY"] = "true"
    # `--env-manager local` runs the model in this interpreter's environment: its bin on PATH.
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    cmd = [
        str(Path(sys.executable).parent / "mlflow"), "models", "serve",
        "-m", f"models:/{name}@{args.alias}", "--env-manager", "local",
        "-h", args.host, "-p", str(args.port), "-w", str(args.workers),
    ]
    log.info("serving %s@%s (version %s) on http://%s:%d/invocations", name, args.alias, version, args.host, args.port)
    return subprocess.call(cmd, env=env)
