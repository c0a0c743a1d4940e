"""Speed, memory and size of the segmentation networks (MISSU vs MONAI UNet / UNETR / SwinUNETR).

Each network is built as the segment stage builds it for a params profile (``segment.networks``
of ``--profile``: ``cpu`` or ``paper``), at one crop size:
  * parameters of the full training graph and of the inference path (MISSU's teachers excluded);
  * training step time: forward + cross-entropy (+ MISSU's distillation term) + backward + SGD step
    on a random (batch, 1, D, H, W) batch, median of ``--steps`` after ``--warmup`` steps;
  * for MISSU also the training step without the self-distillation branch (its cost);
  * eval forward time on a batch of ``--sw-batch`` crops, and sliding-window inference time on a
    ``--volume`` volume (bonemet's ``sliding_window_logits``: MONAI's windows and weights,
    ``--overlap``, ``--sw-batch``), median of ``--repeats``;
  * peak memory of the training step: ``torch.cuda.max_memory_allocated`` on a GPU; on CPU the peak
    resident set size (psutil, sampled every 2 ms) above the resident size before the step.

``--clinical`` also segments a clinical-size CT (:func:`bonemet.data.synthetic_clinical.clinical_ct`,
512 x 512 x 200 at 0.8 x 0.8 x 1.5 mm by default) with the first network and the profile's
inference settings (``bonemet.segmentation.inference.segment_ct``: bone crop, windows, mapping
back), and reports each step's seconds.

Examples::

    python benchmarks/networks.py --profile cpu --roi 32 --volume 96 96 64          # CPU
    python benchmarks/networks.py --profile paper --networks missu unetr --roi 128 --device cuda --amp \
        --volume 256 256 160 --clinical --json benchmarks/results/networks_gpu.json   # GPU
    python benchmarks/networks.py --quick --json /tmp/networks_quick.json              # CI: seconds
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import logging
import multiprocessing
import platform
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psutil
import torch
import torch.nn.functional as F

from bonemet.segmentation.networks import (
    CT_CHANNELS,
    N_CLASSES,
    build_network,
    count_parameters,
    network_kwargs,
)

_HERE = Path(__file__).resolve().parent
_spec = importlib.util.spec_from_file_location("benchmarks_common", _HERE / "_common.py")
common = sys.modules["benchmarks_common"] = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(common)

log = logging.getLogger("benchmarks.networks")

#: --quick: tiny crops and volumes, one step each, cpu-profile networks (SwinUNETR needs 32^3)
NETWORK_NAMES = ["missu", "unet", "unetr", "swinunetr"]
QUICK_NETWORKS = ["missu", "unet", "unetr"]
QUICK = {"roi": [16], "batch": 1, "volume": [32, 32, 32], "warmup": 0,
         "steps": 1, "repeats": 1, "sw_batch": 2, "clinical_size": [64, 64, 24], "clinical_spacing": [2.0, 2.0, 3.0]}


class PeakRSS:
    """Peak resident set size of this process while the context is open (bytes above the start)."""

    def __init__(self, interval_s: float = 0.002) -> None:
        self.interval_s = interval_s
        self.peak = 0
        self._proc = psutil.Process()
        self._stop = threading.Event()

    def __enter__(self) -> PeakRSS:
        self.start = self._proc.memory_info().rss
        self.peak = self.start
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._proc.memory_info().rss)
            time.sleep(self.interval_s)

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._proc.memory_info().rss)

    @property
    def increase(self) -> int:
        return self.peak - self.start


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Callable[[], object], device: torch.device, warmup: int, repeats: int) -> list[float]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return times


def _autocast(device: torch.device, amp: bool):
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16, enabled=amp)


def train_step_fn(
    net: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, device: torch.device, amp: bool
) -> Callable[[], None]:
    """One SGD step: forward, cross-entropy (+ unweighted distillation term), backward, update."""
    opt = torch.optim.SGD(net.parameters(), lr=1e-3, momentum=0.9)
    net.train()

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        with _autocast(device, amp):
            out = net(x)
            logits, extra = out if isinstance(out, tuple) else (out, None)
            loss = F.cross_entropy(logits.float(), y)
            if extra is not None:
                loss = loss + extra
        loss.backward()
        opt.step()

    return step


def inference_times(
    net: torch.nn.Module,
    crop: torch.Tensor,
    roi: tuple[int, ...],
    args: argparse.Namespace,
    device: torch.device,
) -> dict[str, Any]:
    """Eval forward on a batch of ``sw_batch`` crops and sliding-window inference on a random volume.

    On CPU, PyTorch runs batch-1 3D convolutions through a slow non-oneDNN path, so a batch of one
    crop would time that path rather than the network; the sliding window batches crops too.
    """
    from bonemet.segmentation.inference import sliding_window_logits

    net.eval()
    vol = torch.rand(1, 1, *args.volume, device=device)

    def eval_forward() -> None:
        with torch.inference_mode(), _autocast(device, args.amp):
            net(crop)

    def sliding() -> None:
        with _autocast(device, args.amp):
            sliding_window_logits(net, vol[0].cpu().numpy(), roi, overlap=args.overlap, sw_batch_size=args.sw_batch,
                                  device=device, mirror_axes=(), channels_last=args.channels_last)

    out: dict[str, Any] = {"volume": list(args.volume), "sw_batch": args.sw_batch, "overlap": args.overlap}
    out["eval_forward_s"] = statistics.median(_timed(eval_forward, device, 1, args.repeats))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    out["sliding_window_s"] = statistics.median(_timed(sliding, device, 1, args.repeats))
    if device.type == "cuda":
        out["sliding_window_peak_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
    return out


def _cpu_train_peak_rss(
    name: str, kwargs: dict[str, Any], roi: tuple[int, ...], batch: int, seed: int, threads: int
) -> float:
    """Peak RSS increase (GiB) over two training steps, measured from model-built state (subprocess)."""
    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    device = torch.device("cpu")
    net = build_network(name, in_channels=CT_CHANNELS, out_channels=N_CLASSES, roi_size=roi, **kwargs)
    x = torch.rand(batch, 1, *roi)
    y = torch.randint(0, 2, (batch, *roi))
    step = train_step_fn(net, x, y, device, amp=False)
    gc.collect()
    with PeakRSS() as rss:
        step()
        step()
    return rss.increase / 2**30


def measure(
    name: str, kwargs: dict[str, Any], args: argparse.Namespace, device: torch.device
) -> dict[str, Any]:
    roi = tuple(args.roi)
    torch.manual_seed(args.seed)
    row: dict[str, Any] = {"network": name, "roi": list(roi), "batch": args.batch, "kwargs": kwargs}
    try:
        net = build_network(name, in_channels=CT_CHANNELS, out_channels=N_CLASSES, roi_size=roi, **kwargs).to(device)
    except ValueError as exc:
        row["skipped"] = str(exc)
        log.warning("%s skipped: %s", name, exc)
        return row
    row["params_train"] = count_parameters(net)
    row["params_inference"] = count_parameters(net, inference_only=True)

    x = torch.rand(args.batch, 1, *roi, device=device)
    y = torch.randint(0, 2, (args.batch, *roi), device=device)

    # Training step (and its peak memory).
    step = train_step_fn(net, x, y, device, args.amp)
    step()  # allocate optimizer state before measuring memory
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        step()
        _sync(device)
        row["train_peak_mem_gib"] = torch.cuda.max_memory_allocated(device) / 2**30
        row["train_peak_mem_above_weights_gib"] = (torch.cuda.max_memory_allocated(device) - base) / 2**30
    elif args.quick:  # a fresh process per network costs more than the quick mode itself
        row["train_peak_rss_increase_gib"] = None
    else:
        # In a fresh process: the first steps there allocate activations, gradients and optimizer
        # state from scratch, so the RSS increase is the step's footprint (not the allocator's reuse).
        ctx = multiprocessing.get_context("spawn")
        with ctx.Pool(1) as pool:
            row["train_peak_rss_increase_gib"] = pool.apply(
                _cpu_train_peak_rss, (name, kwargs, roi, args.batch, args.seed, torch.get_num_threads())
            )
    times = _timed(step, device, args.warmup, args.steps)
    row["train_step_s"] = statistics.median(times)
    row["train_step_s_all"] = times

    if name == "missu" and net.fusion is not None:
        # The same network without the teachers: cost of the self-distillation branch in training.
        torch.manual_seed(args.seed)
        lean = build_network(name, in_channels=CT_CHANNELS, out_channels=N_CLASSES, roi_size=roi,
                             **{**kwargs, "self_distillation": False}).to(device)
        lean.load_inference_state_dict(net.state_dict())
        lean_step = train_step_fn(lean, x, y, device, args.amp)
        row["train_step_no_distill_s"] = statistics.median(_timed(lean_step, device, args.warmup, args.steps))
        del lean, lean_step

    # Inference: eval forward on one crop and sliding window on a volume.
    row.update(inference_times(net, torch.rand(args.sw_batch, 1, *roi, device=device), roi, args, device))
    del net, step, x, y
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
    log.info("%s", {k: v for k, v in row.items() if k != "train_step_s_all"})
    return row


def machine(device: torch.device) -> dict[str, Any]:
    info: dict[str, Any] = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
        "logical_cpus": psutil.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "load_average_1m_at_start": psutil.getloadavg()[0],
        "device": str(device),
    }
    try:
        import monai

        info["monai"] = monai.__version__
    except ImportError:  # pragma: no cover
        pass
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def _roi(values: list[int]) -> list[int]:
    if len(values) == 1:
        return values * 3
    if len(values) != 3:
        raise argparse.ArgumentTypeError("--roi takes one or three integers")
    return values


def _num(value: float | None) -> str:
    return "" if value is None else f"{value:.2f}"


def markdown(rows: list[dict[str, Any]], amp: bool) -> str:
    mem_key = (
        "train_peak_mem_gib"
        if any("train_peak_mem_gib" in r for r in rows)
        else "train_peak_rss_increase_gib"
    )
    mem_head = "peak GPU memory (GiB)" if mem_key == "train_peak_mem_gib" else "peak RSS increase (GiB)"
    sw = next((r["sw_batch"] for r in rows if "sw_batch" in r), "")
    lines = [
        f"| network | crop | params train / inference (M) | train step (s){' bf16' if amp else ''} | "
        f"train step w/o distill (s) | {mem_head} | eval forward, {sw} crops (s) | sliding window (s) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        crop = "x".join(map(str, r["roi"]))
        if "skipped" in r:
            lines.append(f"| {r['network']} | {crop} | skipped: {r['skipped']} | | | | | |")
            continue
        nd = r.get("train_step_no_distill_s")
        lines.append(
            f"| {r['network']} | {crop} | {r['params_train'] / 1e6:.2f} / {r['params_inference'] / 1e6:.2f} | "
            f"{r['train_step_s']:.3f} | {'' if nd is None else f'{nd:.3f}'} | {_num(r[mem_key])} | "
            f"{r['eval_forward_s']:.3f} | {r['sliding_window_s']:.2f} |"
        )
    return "\n".join(lines)


def clinical_inference(name: str, spec: Any, params: Any, args: argparse.Namespace, device: torch.device) -> dict:
    """Seconds to segment a clinical-size CT with network ``name`` (untrained) and the profile's settings."""
    import SimpleITK as sitk

    from bonemet.data.io import read_mask
    from bonemet.data.manifest import read_manifest
    from bonemet.data.synthetic import generate_cohort
    from bonemet.data.synthetic_clinical import clinical_ct
    from bonemet.segmentation.inference import InferenceSettings, segment_ct

    spec = spec.updated({"model": name, "roi_size": list(args.roi)})
    net = build_network(name, in_channels=CT_CHANNELS, out_channels=N_CLASSES, roi_size=tuple(args.roi),
                        **network_kwargs(spec, name)).to(device).eval()
    settings = InferenceSettings.from_params(params.preprocess, spec)
    with tempfile.TemporaryDirectory() as tmp:
        generate_cohort(tmp, n_cases=2, n_positive=1, seed=args.seed, size="small" if args.quick else "full",
                        mask_label=1, show_progress=False)
        case = read_manifest(tmp)[0]
        image, _ = clinical_ct(sitk.ReadImage(str(case.image)), read_mask(case.manual_mask, label=1),
                               size=args.clinical_size, spacing_mm=args.clinical_spacing, seed=args.seed)
    times = []
    for _ in range(max(1, args.repeats)):
        steps: dict[str, float] = {}
        _sync(device)
        start = time.perf_counter()
        with _autocast(device, args.amp):
            segment_ct(net, image, settings, device=device, case_id="clinical", seconds=steps)
        _sync(device)
        times.append({"seconds": time.perf_counter() - start, **{f"{k}_s": v for k, v in steps.items()}})
    best = min(times, key=lambda t: t["seconds"])
    return {"network": name, "ct_size": list(args.clinical_size), "ct_spacing_mm": list(args.clinical_spacing),
            "inference": settings.inference.model_dump(mode="json"), "window": list(settings.window),
            **{k: round(v, 3) for k, v in best.items()}}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--params", default="params.yaml")
    p.add_argument("--networks", nargs="+", default=None, help="default missu unet unetr swinunetr (--quick: no swinunetr)")
    p.add_argument("--profile", default="cpu", help="params segment profile whose networks are built (cpu, paper)")
    p.add_argument("--roi", type=int, nargs="+", default=[32], help="crop D H W in voxels (one value: cubic)")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--volume", type=int, nargs=3, default=[96, 96, 64], help="sliding-window volume D H W")
    p.add_argument("--overlap", type=float, default=0.25)
    p.add_argument("--sw-batch", type=int, default=2)
    p.add_argument("--channels-last", action="store_true", help="channels-last 3D memory format at inference")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--amp", action="store_true", help="bf16 autocast")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: leave the default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--clinical", action="store_true", help="also segment a clinical-size CT with the first network")
    p.add_argument("--clinical-size", type=int, nargs=3, default=[512, 512, 200], help="x y z voxels")
    p.add_argument("--clinical-spacing", type=float, nargs=3, default=[0.8, 0.8, 1.5], help="x y z mm")
    p.add_argument("--spacing", type=float, default=0.0,
                   help="preprocess target spacing (mm) of the clinical inference (0: params; paper: 1)")
    p.add_argument("--quick", action="store_true", help="tiny sizes, one step (seconds; CI runs this)")
    p.add_argument("--json", default="", help="write the rows and machine info as JSON here")
    args = p.parse_args(argv)
    if args.quick:
        for key, value in QUICK.items():
            setattr(args, key, value)
        args.clinical = True
    args.networks = args.networks or (QUICK_NETWORKS if args.quick else NETWORK_NAMES)
    args.roi = _roi(args.roi)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    from bonemet.config import load_specs

    params = common.with_reference_plan(load_specs(args.params, segment_profile=args.profile))
    if args.quick:
        params = params.model_copy(update={
            "preprocess": params.preprocess.updated({"target_spacing_mm": [2.5, 2.5, 2.5],
                                                     "crop.min_size_vox": [16, 16, 16]}),
            "segment": params.segment.updated({"inference.mirror_axes": [], "inference.overlap": 0.25})})
    if args.spacing and not args.quick:
        params = params.model_copy(update={"preprocess": params.preprocess.updated(
            {"target_spacing_mm": [args.spacing] * 3})})
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True

    info = machine(device)
    rows = [measure(name, network_kwargs(params.segment, name), args, device) for name in args.networks]
    clinical = clinical_inference(args.networks[0], params.segment, params, args, device) if args.clinical else None
    info["load_average_1m_at_end"] = psutil.getloadavg()[0]
    table = markdown(rows, args.amp)
    print(table)  # the command's result
    if clinical is not None:
        print(json.dumps(clinical))
    if args.json:
        from bonemet.utils import write_json

        write_json(args.json, {"machine": info, "args": vars(args), "profile": args.profile, "rows": rows,
                               "clinical_ct": clinical})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
