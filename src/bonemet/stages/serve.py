"""`bonemet serve`: `mlflow models serve` for bonemet-classifier@ALIAS with this project's environment.

Workers: one per core by default (a request holds the GIL), each with one BLAS thread so they do
not compete for the cores; the registered model turns TCP_NODELAY on in the server
(:mod:`bonemet.registry.pyfunc`). Clients send ``Content-Type: application/json`` (MLflow 3.17
answers 500 without it) and may batch rows.
"""

from __future__ import annotations

import argparse


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--alias", default=None, help="model alias to serve (default: params register.alias)")
    parser.add_argument("--model", default=None, help="registered model name (default: params register.model_name)")
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (default 127.0.0.1: this machine only; 0.0.0.0 for every interface)")
    parser.add_argument("--port", type=int, default=5001, help="TCP port to listen on (default 5001)")
    parser.add_argument("--workers", type=int, default=None,
                        help="server processes (default: one per core of this machine)")
    parser.add_argument("--timeout", type=int, default=60,
                        help="seconds a request may take, queueing included, before a 504 (default 60)")


def server_command(mlflow_bin: str, model_uri: str, *, host: str, port: int, workers: int,
                   timeout: int) -> list[str]:
    """The `mlflow models serve` command line (in this interpreter's environment)."""
    return [mlflow_bin, "models", "serve", "-m", model_uri, "--env-manager", "local", "-h", host, "-p", str(port),
            "-w", str(workers), "-t", str(timeout)]


def run(args: argparse.Namespace) -> int:
    import logging
    import os
    import signal
    import subprocess
    import sys
    from pathlib import Path

    from bonemet.registry.store import alias_version
    from bonemet.stages._common import open_store, specs_from

    log = logging.getLogger(__name__)
    params = specs_from(args)
    args.alias = args.alias or params.registration.alias
    store = open_store(params)
    uri = store.tracking_uri
    name = args.model or params.registration.model_name
    version = alias_version(store, name, args.alias)
    if version is None:
        log.error("no model '%s@%s' in %s: run the pipeline (make run) or `bonemet promote`", name, args.alias, uri)
        return 1
    cores = os.cpu_count() or 1
    workers = args.workers or cores
    env = dict(os.environ)
    env["MLFLOW_TRACKING_URI"] = env["MLFLOW_REGISTRY_URI"] = uri  # the server's store: `models:/` resolves in it
    env["MLFLOW_DISABLE_TELEMETRY"] = "true"
    threads = str(max(1, cores // workers))
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        env.setdefault(var, threads)
    # `--env-manager local` runs the model in this interpreter's environment: its bin on PATH.
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    cmd = server_command(str(Path(sys.executable).parent / "mlflow"), f"models:/{name}@{args.alias}",
                         host=args.host, port=args.port, workers=workers, timeout=args.timeout)
    log.info("serving %s@%s (version %s) on http://%s:%d/invocations, %d worker(s)", name, args.alias, version,
             args.host, args.port, workers)
    signal.signal(signal.SIGTERM, _stop_server)  # `kill` stops the server too, not only this process
    return subprocess.call(cmd, env=env)


def _stop_server(signum: int, frame: object) -> None:
    """SIGTERM: end the server's processes (mlflow and the uvicorn workers it starts), then this one."""
    import psutil

    for child in psutil.Process().children(recursive=True):
        child.terminate()
    raise SystemExit(128 + signum)
