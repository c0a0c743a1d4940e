"""Speed, memory and size of the segmentation networks (MISSU vs MONAI UNet / UNETR / SwinUNETR).

For each network at one crop size:
  * parameters of the full training graph and of the inference path (MISSU's teachers excluded);
  * training step time: forward + cross-entropy (+ MISSU's distillation term) + backward + SGD step
    on a random (batch, 1, D, H, W) batch, median of ``--steps`` after ``--warmup`` steps;
  * for MISSU also the training step without the self-distillation branch (its cost);
  * eval forward time on a batch of ``--sw-batch`` crops, and sliding-window inference time on a ``--volume`` volume
    (MONAI ``sliding_window_inference``, ``--overlap``, ``--sw-batch``), median of ``--repeats``;
  * peak memory of the training step: ``torch.cuda.max_memory_allocated`` on a GPU; on CPU the peak
    resident set size (psutil, sampled every 2 ms) above the resident size before the step.

Examples::

    python benchmarks/networks.py --profile tiny --roi 48 --volume 96 96 64          # CPU
    python benchmarks/networks.py --profile paper --roi 128 --device cuda --amp \\
        --volume 256 256 160 --out benchmarks/networks_gpu.json                     # GPU
"""

from __future__ import annotations

import argparse
import gc
import logging
import multiprocessing
import platform
import statistics
import threading
import time
from collections.abc import Callable
from typing import Any

import psutil
import torch
import torch.nn.functional as F

from bonemet.segmentation.networks import build_network, count_parameters

log = logging.getLogger("benchmarks.networks")

PROFILES: dict[str, dict[str, dict[str, Any]]] = {
    # Small enough for 2 CPU cores.
    "tiny": {
        "missu": dict(
            widths=(8, 16, 32, 64), blocks=(1, 2, 2, 4), embed_dim=64, num_layers=2, num_heads=4, mlp_dim=128
        ),
        "unet": dict(channels=(8, 16, 32, 64, 128), strides=(2, 2, 2, 2), num_res_units=2),
        "unetr": dict(feature_size=8, hidden_size=96, mlp_dim=192, num_heads=4),
        "swinunetr": dict(feature_size=12, depths=(2, 2, 2, 2), num_heads=(3, 6, 12, 24)),
    },
    # The papers' sizes (MISSU: TransBTS-like, E=512; baselines as in ../shared/MISSU.md anchors).
    "paper": {
        "missu": dict(),
        "unet": dict(channels=(32, 64, 128, 256, 320), strides=(2, 2, 2, 2), num_res_units=2),
        "unetr": dict(feature_size=16, hidden_size=768, mlp_dim=3072, num_heads=12),
        "swinunetr": dict(feature_size=48),
    },
}


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
    from monai.inferers import sliding_window_inference

    net.eval()
    vol = torch.rand(1, 1, *args.volume, device=device)

    def eval_forward() -> None:
        with torch.inference_mode(), _autocast(device, args.amp):
            net(crop)

    def sliding() -> None:
        with torch.inference_mode(), _autocast(device, args.amp):
            sliding_window_inference(vol, roi, args.sw_batch, net, overlap=args.overlap, mode="gaussian")

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
    net = build_network(name, in_channels=1, out_channels=2, roi_size=roi, **kwargs)
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
        net = build_network(name, in_channels=1, out_channels=2, roi_size=roi, **kwargs).to(device)
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
        lean = build_network(name, 1, 2, roi, **{**kwargs, "self_distillation": False}).to(device)
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
            f"{r['train_step_s']:.3f} | {'' if nd is None else f'{nd:.3f}'} | {r[mem_key]:.2f} | "
            f"{r['eval_forward_s']:.3f} | {r['sliding_window_s']:.2f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--networks", nargs="+", default=["missu", "unet", "unetr", "swinunetr"])
    p.add_argument("--profile", choices=sorted(PROFILES), default="tiny")
    p.add_argument("--roi", type=int, nargs="+", default=[48], help="crop D H W in voxels (one value: cubic)")
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--volume", type=int, nargs=3, default=[96, 96, 64], help="sliding-window volume D H W")
    p.add_argument("--overlap", type=float, default=0.25)
    p.add_argument("--sw-batch", type=int, default=2)
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    p.add_argument("--amp", action="store_true", help="bf16 autocast")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--steps", type=int, default=3)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: leave the default)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="", help="write the rows and machine info as JSON here")
    args = p.parse_args(argv)
    args.roi = _roi(args.roi)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")

    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device == "auto":
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True

    info = machine(device)
    rows = [measure(name, PROFILES[args.profile].get(name, {}), args, device) for name in args.networks]
    info["load_average_1m_at_end"] = psutil.getloadavg()[0]
    table = markdown(rows, args.amp)
    print(table)  # the command's result
    if args.out:
        from bonemet.utils import write_json

        write_json(args.out, {"machine": info, "args": vars(args), "rows": rows})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
