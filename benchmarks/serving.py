"""Serving latency and throughput: bonemet-classifier against a plain MLflow model, side by side.

Both models answer one-row (``--rows``) ``dataframe_split`` requests of the same 1316 PyRadiomics
columns under the same server (`mlflow models serve --env-manager local`, ``--workers``), one after
the other in one run:

* **bonemet**: the registered pyfunc as the register stage logs it
  (:func:`bonemet.registry.pyfunc.log_classifier`: params-only signature, set-based checks, the
  pipeline cut to its selected columns, the training domain). With ``--model`` a registered model
  (e.g. ``models:/bonemet-classifier@staging`` in ``--tracking-uri``); otherwise the project's
  pipeline (params.yaml ``select``, logistic regression, calibration) fitted here on the
  ``--features`` table (or on a synthetic table with the 1316 names when it does not exist).
* **plain**: ``mlflow.sklearn`` StandardScaler + LogisticRegression on the same columns with the
  column signature MLflow infers: the yardstick of issue 16.

Method: start the server on loopback, check one answer against the in-process pipeline (bit for
bit for bonemet), warm up, then for each client count (``--clients``, default 1 and 20) wait up to
``--quiet-wait`` s for an idle machine and run a closed-loop, keep-alive load for ``--duration``
s. Client: wrk (Debian's ``wrk`` with ``serving_wrk.lua``, ~2 % of a core) when on PATH, else
Python threads with one keep-alive ``http.client`` connection each (~0.4 ms of CPU per request);
``--client`` forces one. Recorded per run: p50/p99 latency, throughput, CPU seconds of the server,
of the client and of everything else on the machine (from /proc), non-2xx answers. Targets
(issue 16): bonemet p50 <= 20 ms and p99 <= 60 ms with one client; with 20 clients at least 10x
the plain model's throughput. Only 127.0.0.1 is ever contacted.

    python benchmarks/serving.py --quick                  # plumbing check, ~1 min (CI runs it)
    python benchmarks/serving.py --out benchmarks/results/serving.json   # the full run, ~3 min, alone
"""

from __future__ import annotations

import argparse
import http.client
import importlib.util
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pandas as pd

_HERE = Path(__file__).resolve().parent
# benchmarks/ holds radiomics.py: keep this folder off the import path
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
_spec = importlib.util.spec_from_file_location("benchmarks_common", _HERE / "_common.py")
common = sys.modules["benchmarks_common"] = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(common)
REPO = _HERE.parent
NAMES_FILE = REPO / "tests" / "data" / "radiomics_feature_names_default.txt"
#: issue 24: one-client p50 <= 5 ms with the SVM registered; issue 16: p99 <= 60 ms, and with many
#: clients at least 10x the plain mlflow.sklearn model's throughput
TARGETS = {"p50_ms": 5.0, "p99_ms": 60.0, "throughput_ratio": 10.0}
#: the models served one after the other, on the same bodies (bonemet's and the anchor's carry case_id)
KINDS = ("plain", "anchor", "bonemet")


# --- data and models -------------------------------------------------------------------------
def feature_table(path: Path | None, n: int, seed: int) -> pd.DataFrame:
    """case_id, label and the 1316 features: the ``path`` table when it exists, else synthetic rows
    (heavy-tailed, a label carried by 12 features, volumes of 0.5-20 mL)."""
    if path is not None and path.is_file():
        return pd.read_parquet(path)
    names = NAMES_FILE.read_text().split()
    rng = np.random.default_rng(seed)
    y = np.arange(n) % 2
    scale = 10.0 ** rng.uniform(-3, 5, size=len(names))
    signal_cols = rng.choice(len(names), 12, replace=False)
    latent = rng.standard_normal((n, len(names)))
    latent[:, signal_cols] += 0.9 * y[:, None]
    table = pd.DataFrame(scale * (1.0 + 0.25 * latent), columns=names)
    table["original_shape_VoxelVolume"] = 1000.0 * rng.uniform(0.5, 20.0, size=n)
    table.insert(0, "case_id", [f"case_{i:03d}" for i in range(n)])
    table.insert(1, "label", y)
    return table


def build_models(table: pd.DataFrame, work: Path, seed: int) -> dict[str, object]:
    """Log and register ``bench-bonemet`` (the project's served pyfunc) and ``bench-plain`` in a store
    in ``work``; return the fitted in-process references."""
    from mlflow.models import infer_signature
    from sklearn.linear_model import LogisticRegression
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from bonemet.config import load_specs
    from bonemet.modeling.calibration import CalibratedPipeline, ScoreCalibrator
    from bonemet.modeling.domain import fit_training_domain
    from bonemet.modeling.pipeline import build_pipeline
    from bonemet.modeling.training import assemble_features, feature_columns
    from bonemet.registry.pyfunc import log_classifier
    from bonemet.registry.store import MlflowTracker, register_model

    params = load_specs(REPO / "params.yaml")
    names = feature_columns(table)
    rng = np.random.default_rng(seed)
    paired = table.copy()
    paired[names] = table[names] * (1.0 + rng.normal(scale=0.01, size=(len(table), len(names))))
    X, y = assemble_features(table, paired, params.select.icc.paired_prefix)
    pipeline = build_pipeline("svm", {"kernel": "rbf", "C": 1.0, "gamma": "scale", "calibration_folds": 3},
                              params.select, seed).fit(X, y.to_numpy())
    scores = pipeline.predict_proba(X[names])[:, 1]
    model = CalibratedPipeline(pipeline=pipeline, threshold=0.5,
                               calibrator=ScoreCalibrator(method="sigmoid").fit(scores, y.to_numpy()))
    domain = fit_training_domain(model, table[names], np.arange(len(table)) % 5, params.train.domain, seed=seed)
    plain = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000)).fit(table[names], y)
    tracker = MlflowTracker("serving-benchmark", tracking_uri=None, store_dir=work, system_metrics=False,
                            system_metrics_interval_s=None)
    with tracker.run("models"):
        info = log_classifier(tracker, model, names, threshold=0.5, model_name="svm", domain=domain,
                              check_rows=table)
        register_model(tracker.client, info, "bench-bonemet")
        signature = infer_signature(table[names], plain.predict(table[names]))
        plain_info = tracker.log_model(plain, "plain", flavor="sklearn", signature=signature,
                                       input_example=table[names].head(2))
        register_model(tracker.client, plain_info, "bench-plain")
        anchor_info = tracker.log_model(anchor_model(), "anchor", flavor="pyfunc")
        register_model(tracker.client, anchor_info, "bench-anchor")
    return {"bonemet": model, "plain": plain, "names": names,
            "serving_mode": (info.metadata or {}).get("serving_mode")}


def anchor_model():
    """The plain-MLflow anchor: a pyfunc that answers 0.5 per row and does nothing else (no signature).

    Served like bonemet on the same bodies, it measures what MLflow's server path costs by itself:
    HTTP, JSON, MLflow's request frame (built by pandas, column by column), the answer's JSON.
    """
    import mlflow

    class Anchor(mlflow.pyfunc.PythonModel):
        def predict(self, context, model_input, params=None):
            return pd.DataFrame({"probability_breast": np.full(len(model_input), 0.5)})

    return Anchor()


def bodies(kind: str, table: pd.DataFrame, names: list[str], rows: int, n: int = 50) -> list[bytes]:
    """``n`` distinct request bodies of ``rows`` rows each (bonemet and the anchor: with case_id and the
    threshold param)."""
    out = []
    for k in range(n):
        frame = table.iloc[[(k * rows + j) % len(table) for j in range(rows)]][names].reset_index(drop=True)
        if kind != "plain":
            frame.insert(0, "case_id", [f"case-{k:03d}-{j}" for j in range(rows)])
        split = frame.to_dict(orient="split")
        split.pop("index")
        payload = {"dataframe_split": split, **({"params": {"threshold": 0.5}} if kind != "plain" else {})}
        out.append(json.dumps(payload).encode())
    return out


# --- processes and CPU -----------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def proc_cpu(pids: list[int]) -> float:
    """CPU seconds (user + system) used so far by ``pids``."""
    total = 0.0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            total += (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
        except (FileNotFoundError, ProcessLookupError):
            pass
    return total


def busy_cpu_s() -> float:
    """CPU seconds the whole machine has been busy (all cores; /proc/stat)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    return (sum(fields[:8]) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")


def wait_quiet(max_wait: float, window: float = 2.0, limit: float = 0.15) -> float:
    """Wait until fewer than ``limit`` cores are busy over ``window`` s (at most ``max_wait`` s)."""
    start = time.time()
    while time.time() - start < max_wait:
        before = busy_cpu_s()
        time.sleep(window)
        if (busy_cpu_s() - before) / window < limit:
            break
    return round(time.time() - start, 1)


def process_tree(pid: int) -> list[int]:
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True).stdout.split()
    return [pid] + [q for child in out for q in process_tree(int(child))]


def serve(model_uri: str, store: str, workers: int, log_path: Path) -> tuple[subprocess.Popen, int, float]:
    port = free_port()
    bin_dir = Path(sys.executable).parent
    env = dict(os.environ, MLFLOW_TRACKING_URI=store, MLFLOW_REGISTRY_URI=store, MLFLOW_DISABLE_TELEMETRY="true",
               PATH=f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}")
    server = subprocess.Popen([str(bin_dir / "mlflow"), "models", "serve", "-m", model_uri, "--env-manager", "local",
                               "-h", "127.0.0.1", "-p", str(port), "-w", str(workers)],
                              env=env, stdout=log_path.open("wb"), stderr=subprocess.STDOUT, start_new_session=True)
    start = time.time()
    while True:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/ping", timeout=2)
            break
        except (urllib.error.URLError, ConnectionError):
            if server.poll() is not None or time.time() - start > 180:
                stop(server)
                raise SystemExit(f"server for {model_uri} did not start; see {log_path}") from None
            time.sleep(0.3)
    time.sleep(1.0 + 0.5 * workers)  # with -w N every worker loads the model
    return server, port, time.time() - start


def stop(server: subprocess.Popen) -> None:
    try:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
    except ProcessLookupError:
        pass
    except subprocess.TimeoutExpired:
        os.killpg(server.pid, signal.SIGKILL)


def post(port: int, body: bytes) -> tuple[int, dict]:
    request = urllib.request.Request(f"http://127.0.0.1:{port}/invocations", data=body,
                                     headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(request, timeout=120) as response:
        return response.status, json.loads(response.read())


# --- clients ---------------------------------------------------------------------------------
def run_wrk(port: int, clients: int, duration: float, body_file: Path) -> dict:
    cmd = ["wrk", "-t1", f"-c{clients}", f"-d{max(1, round(duration))}s", "--timeout", "120s",
           "-s", str(_HERE / "serving_wrk.lua"), f"http://127.0.0.1:{port}"]
    before = os.times()
    proc = subprocess.run(cmd, capture_output=True, text=True, env=dict(os.environ, BODIES=str(body_file)))
    after = os.times()
    found = re.search(r"^JSON (.*)$", proc.stdout, re.M)
    if proc.returncode != 0 or found is None:
        raise SystemExit(f"wrk failed: {proc.stdout[-500:]} {proc.stderr[-500:]}")
    result = json.loads(found.group(1))
    result["client_cpu_s"] = round((after.children_user - before.children_user)
                                   + (after.children_system - before.children_system), 3)
    result["throughput_rps"] = result["requests"] / result["duration_s"]
    return result


def run_python(port: int, clients: int, duration: float, payloads: list[bytes]) -> dict:
    """Closed loop: ``clients`` threads, each with one keep-alive connection, for ``duration`` s."""
    latencies: list[list[float]] = [[] for _ in range(clients)]
    errors = [0] * clients
    deadline = time.perf_counter() + duration

    def client(k: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        i = k
        while time.perf_counter() < deadline:
            body = payloads[i % len(payloads)]
            i += clients
            start = time.perf_counter()
            conn.request("POST", "/invocations", body=body, headers={"Content-Type": "application/json"})
            response = conn.getresponse()
            response.read()
            latencies[k].append(time.perf_counter() - start)
            errors[k] += response.status != 200
        conn.close()

    cpu0, wall0 = time.process_time(), time.perf_counter()
    threads = [threading.Thread(target=client, args=(k,)) for k in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    lat = np.asarray([x for per in latencies for x in per]) * 1000
    return {"requests": int(lat.size), "duration_s": round(wall, 3), "p50_ms": float(np.percentile(lat, 50)),
            "p90_ms": float(np.percentile(lat, 90)), "p99_ms": float(np.percentile(lat, 99)),
            "max_ms": float(lat.max()), "non2xx": int(sum(errors)), "client_cpu_s": round(cpu, 3),
            "throughput_rps": lat.size / wall}


# --- the run ---------------------------------------------------------------------------------
def check_answer(kind: str, port: int, body: bytes, reference: dict) -> None:
    status, answer = post(port, body)
    split = json.loads(body)["dataframe_split"]
    frame = pd.DataFrame(split["data"], columns=split["columns"])
    names = reference["names"]
    if kind == "plain":
        assert status == 200 and answer["predictions"] == reference["plain"].predict(frame[names]).tolist()
        return
    if kind == "anchor":
        assert status == 200 and [p["probability_breast"] for p in answer["predictions"]] == [0.5] * len(frame)
        return
    expected = reference["bonemet"].predict_proba(frame[names])[:, 1].tolist()
    got = [p["probability_breast"] for p in answer["predictions"]]
    if status != 200 or got != expected:
        raise SystemExit(f"bonemet answer not bit-equal to the in-process pipeline: {got} vs {expected}")
    assert [p["case_id"] for p in answer["predictions"]] == frame["case_id"].tolist()


def bench_model(kind: str, model_uri: str, args, store: str, table: pd.DataFrame, reference: dict,
                work: Path, client: str) -> list[dict]:
    payloads = bodies(kind, table, reference["names"], args.rows)
    body_file = work / f"bodies_{kind}.txt"
    body_file.write_bytes(b"\n".join(payloads) + b"\n")
    log_path = work / f"server_{kind}.log"
    server, port, startup = serve(model_uri, store, args.workers, log_path)
    results = []
    try:
        check_answer(kind, port, payloads[0], reference)
        for body in payloads[1:1 + 2 * args.workers]:  # warm-up, every worker
            post(port, body)
        for clients in args.clients:
            pids = process_tree(server.pid)
            waited = wait_quiet(args.quiet_wait)
            server0, busy0 = proc_cpu(pids), busy_cpu_s()
            result = (run_wrk(port, clients, args.duration, body_file) if client == "wrk"
                      else run_python(port, clients, args.duration, payloads))
            result["server_cpu_s"] = round(proc_cpu(pids) - server0, 2)
            # everything else that ran meanwhile (other jobs, the kernel's loopback work)
            result["other_cpu_s"] = round(busy_cpu_s() - busy0 - result["server_cpu_s"] - result["client_cpu_s"], 2)
            result.update(model=kind, model_uri=model_uri, clients=clients, workers=args.workers, rows=args.rows,
                          client=client, waited_quiet_s=waited, server_startup_s=round(startup, 1),
                          body_kB=round(len(payloads[0]) / 1024, 1), rows_per_s=round(result["throughput_rps"]
                                                                                       * args.rows, 1))
            result = {k: round(v, 2) if isinstance(v, float) else v for k, v in result.items()}
            print(json.dumps(result), flush=True)
            results.append(result)
    finally:
        stop(server)
    return results


def phase_split(model_uri: str, store: str, payloads: list[bytes], repeats: int) -> dict:
    """Median in-process milliseconds of each part of one bonemet request, as the server runs it.

    ``parse_pandas``: MLflow's JSON parse and request frame as pandas builds it (what the anchor
    pays); ``parse``: the same with bonemet's bulk frame (:func:`bonemet.registry.pyfunc.split_frame`,
    what the bonemet server runs); ``checks``: the feature contract; ``model``: the served model and
    domain check with the answer frame; ``answer_json``: MLflow's answer JSON; ``invocations``: all
    of MLflow's request handling in one call. The server's own part (HTTP, uvicorn, threads) is the
    one-client p50 less ``invocations``.
    """
    import io

    import mlflow
    from mlflow.pyfunc import scoring_server

    from bonemet.registry.pyfunc import enable_fast_request_parsing

    mlflow.set_tracking_uri(store)
    mlflow.set_registry_uri(store)
    model = mlflow.pyfunc.load_model(model_uri)
    served = model.unwrap_python_model().served

    def median_ms(fn) -> float:
        for body in payloads[:5]:
            fn(body)
        times = []
        for i in range(repeats):
            body = payloads[i % len(payloads)]
            start = time.perf_counter()
            fn(body)
            times.append(time.perf_counter() - start)
        return round(float(np.median(times)) * 1000, 3)

    def parse(body: bytes) -> pd.DataFrame:
        return scoring_server._parse_json_data(body, model.metadata, None).data

    split = {"parse_pandas": median_ms(parse)}
    enable_fast_request_parsing()
    frames = {body: parse(body) for body in payloads}
    answers = {body: served.answer(frames[body]) for body in payloads}
    split["parse"] = median_ms(parse)
    split["checks"] = median_ms(lambda b: served.contract.read(frames[b]))
    split["model"] = round(median_ms(lambda b: served.answer(frames[b])) - split["checks"], 3)
    split["answer_json"] = median_ms(lambda b: scoring_server.predictions_to_json(answers[b], io.StringIO()))
    split["invocations"] = median_ms(lambda b: scoring_server.invocations(b, "application/json", model, None))
    split["engine"] = getattr(served.serving, "engine", "sklearn")
    return split


def summarise(results: list[dict]) -> dict:
    def find(model, clients):
        return next((r for r in results if r["model"] == model and r["clients"] == clients), None)

    one, many = min(r["clients"] for r in results), max(r["clients"] for r in results)
    b1, bn, pn, a1 = find("bonemet", one), find("bonemet", many), find("plain", many), find("anchor", one)
    ratio = bn["throughput_rps"] / pn["throughput_rps"] if bn and pn and pn["throughput_rps"] else None
    summary = {"one_client": one, "many_clients": many, "bonemet_p50_ms": b1["p50_ms"], "bonemet_p99_ms": b1["p99_ms"],
               "anchor_p50_ms": a1["p50_ms"] if a1 else None,
               "throughput_ratio": None if ratio is None else round(ratio, 1)}
    summary["meets_targets"] = bool(b1["p50_ms"] <= TARGETS["p50_ms"] and b1["p99_ms"] <= TARGETS["p99_ms"]
                                    and ratio is not None and ratio >= TARGETS["throughput_ratio"])
    return summary


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true",
                        help="plumbing check: synthetic 30 rows, 2 s per load, 1 and 4 clients, no idle wait")
    parser.add_argument("--features", type=Path, default=REPO / "data" / "features" / "auto.parquet",
                        help="feature table (case_id, label, 1316 features); synthetic rows when it does not exist")
    parser.add_argument("--model", default=None,
                        help="serve this registered model as 'bonemet' (e.g. models:/bonemet-classifier@staging) "
                             "instead of one built here; its store is --tracking-uri")
    parser.add_argument("--tracking-uri", default=None, help="MLflow store of --model")
    parser.add_argument("--workers", type=int, default=1, help="server processes, the same for both models")
    parser.add_argument("--rows", type=int, default=1, help="rows per request")
    parser.add_argument("--clients", type=lambda s: [int(c) for c in s.split(",")], default=[1, 20])
    parser.add_argument("--duration", type=float, default=15.0, help="seconds per load run")
    parser.add_argument("--quiet-wait", type=float, default=60.0, help="max seconds to wait for an idle machine")
    parser.add_argument("--client", choices=["auto", "wrk", "python"], default="auto")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=None, help="write the results JSON here")
    args = parser.parse_args(argv)
    if args.quick:
        args.features, args.duration, args.quiet_wait = None, 2.0, 0.0
        if args.clients == [1, 20]:
            args.clients = [1, 4]
    client = args.client if args.client != "auto" else ("wrk" if shutil.which("wrk") else "python")
    if client == "wrk" and not shutil.which("wrk"):
        raise SystemExit("wrk not found (Debian: apt-get install -y wrk), or use --client python")
    table = feature_table(args.features, n=30 if args.quick else 178, seed=args.seed)
    with tempfile.TemporaryDirectory(prefix="bonemet-serving-") as tmp:
        work = Path(tmp)
        store = f"sqlite:///{work / 'mlflow.db'}"
        reference = build_models(table, work, args.seed)
        uris = {kind: f"models:/bench-{kind}/1" for kind in KINDS}
        bonemet_store = store
        if args.model:
            import mlflow

            from bonemet.modeling.training import feature_columns

            mlflow.set_tracking_uri(args.tracking_uri)
            mlflow.set_registry_uri(args.tracking_uri)  # build_models pointed the registry at its own store
            registered = mlflow.pyfunc.load_model(args.model)
            pipeline = registered.unwrap_python_model()
            reference.update(bonemet=_Registered(registered), names=list(pipeline.feature_names))
            if list(pipeline.feature_names) != feature_columns(table):
                raise SystemExit("--model was trained on other columns than --features holds")
            uris["bonemet"], bonemet_store = args.model, args.tracking_uri
        results = []
        for kind in KINDS:
            results += bench_model(kind, uris[kind], args, bonemet_store if kind == "bonemet" else store, table,
                                   reference, work, client)
        split = phase_split(uris["bonemet"], bonemet_store, bodies("bonemet", table, reference["names"], args.rows),
                            repeats=60 if args.quick else 600)
    summary = summarise(results)
    split["server"] = round(summary["bonemet_p50_ms"] - split["invocations"], 3)
    summary["phase_split_ms"] = split
    report = {"machine": common.machine(), "commit": common.commit(),
              "data": "synthetic" if args.features is None or not args.features.is_file() else str(args.features),
              "serving_mode": reference.get("serving_mode"), "client": client, "quick": args.quick,
              "results": results, "summary": summary, "targets": TARGETS}
    print(json.dumps(report["summary"], indent=2))
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    bad = [r for r in results if r.get("non2xx") or r.get("errors_timeout") or r.get("errors_other")]
    return 1 if bad else 0


class _Registered:
    """A loaded pyfunc as the in-process reference: ``predict_proba`` from its answer."""

    def __init__(self, model):
        self.model = model

    def predict_proba(self, frame: pd.DataFrame) -> np.ndarray:
        p = self.model.predict(frame)["probability_breast"].to_numpy()
        return np.column_stack([1 - p, p])


if __name__ == "__main__":
    sys.exit(main())
