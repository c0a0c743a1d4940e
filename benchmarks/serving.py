"""Serving latency and throughput of `mlflow models serve` for bonemet-classifier@ALIAS.

Method: start the server on loopback (`--env-manager local`, 1 worker unless --workers), send
``--requests`` POST /invocations bodies of one feature row each from ``--clients`` concurrent
client threads (bounded count and time), record per-request latency; report p50, p99 and
throughput. Only 127.0.0.1 is ever contacted.

    python benchmarks/serving.py --features data/features/auto.parquet --clients 20 --requests 400
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="models:/bonemet-classifier@staging")
    parser.add_argument("--tracking-uri", default=f"sqlite:///{Path('mlruns/mlflow.db').resolve()}")
    parser.add_argument("--features", default="data/features/auto.parquet")
    parser.add_argument("--clients", type=int, default=20)
    parser.add_argument("--requests", type=int, default=400)
    parser.add_argument("--workers", type=int, default=1)
    parser.add_argument("--timeout", type=float, default=300.0, help="stop sending after this many seconds")
    args = parser.parse_args()

    table = pd.read_parquet(args.features)
    features = table.drop(columns=[c for c in ("case_id", "label") if c in table.columns])
    bodies = [
        json.dumps({"dataframe_split": features.iloc[[i % len(features)]].to_dict(orient="split")}).encode()
        for i in range(min(len(features), 50))
    ]
    port = _free_port()
    env = dict(os.environ, MLFLOW_TRACKING_URI=args.tracking_uri,
               PATH=f"{Path(sys.executable).parent}:{os.environ.get('PATH', '')}")
    server = subprocess.Popen(
        [str(Path(sys.executable).parent / "mlflow"), "models", "serve", "-m", args.model, "--env-manager", "local",
         "-h", "127.0.0.1", "-p", str(port), "-w", str(args.workers)],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        t0 = time.time()
        while True:
            try:
                urllib.request.urlopen(f"{url}/ping", timeout=2)
                break
            except (urllib.error.URLError, ConnectionError):
                if time.time() - t0 > 120:
                    raise SystemExit("server did not start in 120 s") from None
                time.sleep(0.5)
        startup = time.time() - t0
        deadline = time.time() + args.timeout

        def one(i: int) -> float:
            if time.time() > deadline:
                return float("nan")
            req = urllib.request.Request(f"{url}/invocations", data=bodies[i % len(bodies)],
                                         headers={"Content-Type": "application/json"})
            start = time.perf_counter()
            with urllib.request.urlopen(req, timeout=60) as resp:
                resp.read()
                assert resp.status == 200
            return time.perf_counter() - start

        one(0)  # warm-up
        wall = time.perf_counter()
        with ThreadPoolExecutor(max_workers=args.clients) as pool:
            lat = np.array(list(pool.map(one, range(args.requests))))
        wall = time.perf_counter() - wall
        lat = lat[np.isfinite(lat)] * 1000
        print(json.dumps({
            "model": args.model, "clients": args.clients, "requests": int(lat.size), "workers": args.workers,
            "features": features.shape[1], "server_startup_s": round(startup, 1),
            "p50_ms": round(float(np.percentile(lat, 50)), 1), "p99_ms": round(float(np.percentile(lat, 99)), 1),
            "throughput_rps": round(lat.size / wall, 1),
        }, indent=2))
    finally:
        server.terminate()
        server.wait(timeout=30)


if __name__ == "__main__":
    main()
