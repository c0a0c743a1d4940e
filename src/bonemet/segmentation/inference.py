"""Sliding-window inference, postprocessing, and mapping masks back to the original CT grid.

The preprocessed image keeps its physical geometry (origin, spacing, direction) in the header,
so the lesion probability predicted in training space is resampled (linear) onto the
original image grid and thresholded there; this gives smoother masks than nearest-neighbour
resampling of a 1 mm label map onto a finer or anisotropic grid. Voxels outside the crop are
background.
"""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from bonemet.data.io import read_image, resample_to_reference
from bonemet.errors import UserError

if TYPE_CHECKING:  # pragma: no cover
    from bonemet.config import (
        InferenceSpec,
        PlannedPreprocessSpec,
        PreprocessSpec,
        SegmentSpec,
    )

log = logging.getLogger(__name__)


class CaseInferenceError(UserError, ValueError):
    """Inference failed for one case; the message names the case and the cause."""


def autocast_context(device: Any):
    """bf16 autocast on CUDA (fp16 when bf16 is unsupported); nothing on CPU."""
    import torch

    if getattr(device, "type", str(device)) != "cuda":
        return nullcontext()
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.autocast(device_type="cuda", dtype=dtype)


def check_mirror_axes(mirror_axes: Sequence[int] | None) -> tuple[int, ...]:
    """Validated spatial mirror axes (0 = D, 1 = H, 2 = W) as a sorted tuple; ``None`` is ``()``.

    Raises:
        ValueError: an axis outside 0-2 or repeated.
    """
    axes = tuple(int(a) for a in (mirror_axes or ()))
    if any(a not in (0, 1, 2) for a in axes) or len(set(axes)) != len(axes):
        raise ValueError(f"mirror_axes must be distinct spatial axes among 0, 1, 2 (D, H, W); found {list(axes)}")
    return tuple(sorted(axes))


def mirror_flips(mirror_axes: Sequence[int] | None) -> list[tuple[int, ...]]:
    """Every combination of ``mirror_axes`` (the identity first): 2**len(axes) flips, as nnU-Net mirrors."""
    axes = check_mirror_axes(mirror_axes)
    return [combo for n in range(len(axes) + 1) for combo in itertools.combinations(axes, n)]


#: MONAI's default sigma of the Gaussian window weight, as a fraction of the window size.
GAUSSIAN_SIGMA_SCALE = 0.125
#: Logit of the background class (the lesion classes get 0) where no window ran: a voxel far
#: from bone when windows are limited to the bone (softmax lesion probability ~1e-13).
SKIPPED_BACKGROUND_LOGIT = 30.0


def importance_map(roi_size: Sequence[int], mode: str) -> np.ndarray:
    """Per-voxel weight of a window's logits (float32, ``roi_size``): MONAI's ``compute_importance_map``.

    ``"gaussian"``: a separable Gaussian of sigma ``0.125 * size`` per axis, peak 1 at the
    centre, clamped below at its smallest value (at least 1e-3) so that every voxel counts;
    ``"constant"``: ones.
    """
    if mode == "constant":
        return np.ones(tuple(int(r) for r in roi_size), np.float32)
    if mode != "gaussian":
        raise ValueError(f"mode must be 'gaussian' or 'constant'; found {mode!r}")
    weight = None
    for n in roi_size:
        x = np.arange(-(n - 1) / 2.0, (n - 1) / 2.0 + 1, dtype=np.float32)[:int(n)]
        g = np.exp(x**2 / np.float32(-2 * (n * GAUSSIAN_SIGMA_SCALE) ** 2)).astype(np.float32)
        weight = g if weight is None else np.multiply.outer(weight, g)
    return np.clip(weight, max(float(weight.min()), 1e-3), None).astype(np.float32)


def window_starts(image_size: Sequence[int], roi_size: Sequence[int], overlap: float) -> np.ndarray:
    """Start indices ``(n, 3)`` of the sliding windows over an image at least ``roi_size`` large.

    MONAI's positions: a step of ``int(roi * (1 - overlap))`` (at least 1) along each axis from 0,
    the last window moved back to end at the image's edge; one window along an axis the roi spans.
    """
    per_axis = []
    for n, r in zip(image_size, roi_size, strict=True):
        n, r = int(n), int(r)
        step = r if r == n else max(int(r * (1 - overlap)), 1)
        count = next(k for k in range(math.ceil(n / step)) if k * step + r >= n) + 1
        per_axis.append([k * step - max(k * step + r - n, 0) for k in range(count)])
    grid = np.meshgrid(*per_axis, indexing="ij")
    return np.stack([g.ravel() for g in grid], axis=1).astype(int)


def windows_near(mask: np.ndarray, starts: np.ndarray, roi_size: Sequence[int], margin_vox: Sequence[int]) -> np.ndarray:
    """Which windows hold a voxel of ``mask`` within ``margin_vox`` of their box (bool per window).

    The box of each window grown by the margin (clipped to the image) is tested with a summed-volume
    table: exactly "the window holds a voxel of the mask dilated by the margin (a box)".
    """
    table = np.zeros(tuple(s + 1 for s in mask.shape), np.int64)
    table[1:, 1:, 1:] = np.asarray(mask, bool).cumsum(0).cumsum(1).cumsum(2)
    shape, roi, margin = np.asarray(mask.shape), np.asarray(roi_size), np.asarray(margin_vox)
    lo = np.clip(starts - margin, 0, shape)
    hi = np.clip(starts + roi + margin, 0, shape)
    (z0, y0, x0), (z1, y1, x1) = lo.T, hi.T
    total = (table[z1, y1, x1] - table[z0, y1, x1] - table[z1, y0, x1] - table[z1, y1, x0]
             + table[z0, y0, x1] + table[z0, y1, x0] + table[z1, y0, x0] - table[z0, y0, x0])
    return total > 0


def sliding_window_logits(
    model: Any,
    image: np.ndarray,
    roi_size: Sequence[int],
    *,
    overlap: float,
    sw_batch_size: int,
    device: Any,
    mirror_axes: Sequence[int],
    channels_last: bool,
    mode: str = "gaussian",
    keep: np.ndarray | None = None,
    keep_margin_vox: Sequence[int] = (0, 0, 0),
):
    """Logits ``(1, C, D, H, W)`` (float32 torch tensor on ``device``) for a ``(1, D, H, W)`` image.

    Windows of ``roi_size`` at MONAI's positions (:func:`window_starts`), weighted by
    :func:`importance_map` and averaged where they overlap: without ``keep`` and mirroring the
    result equals ``monai.inferers.sliding_window_inference`` (tested), without importing MONAI.
    A volume smaller than ``roi_size`` along an axis is padded with zeros on both sides and
    cropped back, so the output has the input's spatial shape.

    ``mirror_axes`` (spatial axes, 0 = D) turns on test-time mirroring as nnU-Net does it: each
    window is also run flipped along every combination of those axes (``2**len(mirror_axes)``
    passes) and the flipped-back logits are averaged. ``sw_batch_size`` windows (flipped copies
    included) go through the network per forward pass. ``channels_last`` runs the network in the
    channels-last 3D memory format (about 1.6x faster on a CPU; the network is converted in place).

    ``keep`` (a ``(D, H, W)`` bool array, e.g. the bone) limits the work: only windows holding a
    voxel of ``keep`` within ``keep_margin_vox`` (D, H, W voxels) of their box are run. Voxels no
    run window covers get background logits; a voxel that some skipped window covers is itself
    farther than the margin from ``keep``, so within the margin the result is the dense one.
    """
    import torch

    flips = mirror_flips(mirror_axes)
    roi = tuple(int(r) for r in roi_size)
    volume = np.asarray(image, dtype=np.float32)
    if volume.ndim != 4 or volume.shape[0] != 1:
        raise ValueError(f"image must be (1, D, H, W); found shape {volume.shape}")
    spatial = volume.shape[1:]
    volume, keep, pad = _pad_to_roi(volume, keep, roi)
    padded = volume.shape[1:]
    starts = window_starts(padded, roi, overlap)
    if keep is not None:
        if tuple(keep.shape) != tuple(padded):
            raise ValueError(f"keep must be (D, H, W) like the image {tuple(spatial)}; found {tuple(keep.shape)}")
        starts = starts[windows_near(keep, starts, roi, keep_margin_vox)]
    device = torch.device(device)
    x = torch.as_tensor(volume)[None].to(device)  # (1, 1, D, H, W)
    memory_format = torch.channels_last_3d if channels_last else torch.contiguous_format
    if channels_last:
        model.to(memory_format=memory_format)
    weight = torch.as_tensor(importance_map(roi, mode), device=device)
    # the weights' sum at each voxel: every run window once per flip
    count = torch.zeros(padded, dtype=torch.float32, device=device)
    for z, y, w in starts:
        count[z:z + roi[0], y:y + roi[1], w:w + roi[2]] += weight
    count *= len(flips)
    jobs = [(tuple(int(v) for v in start), flip) for start in starts for flip in flips]
    out = _weighted_window_sum(model, x, jobs, roi, weight, sw_batch_size=sw_batch_size,
                               memory_format=memory_format)
    if out is None:  # no window ran (nothing to keep): background everywhere
        out = torch.zeros((2, *padded), dtype=torch.float32, device=device)
    covered = count > 0
    out = torch.where(covered, out / torch.where(covered, count, 1.0), out)
    if not bool(covered.all()):
        out[0][~covered] = SKIPPED_BACKGROUND_LOGIT
    crop = tuple(slice(lo, lo + n) for (lo, _), n in zip(pad, spatial, strict=True))
    return out[(slice(None), *crop)][None]


def _pad_to_roi(volume: np.ndarray, keep: np.ndarray | None,
                roi: tuple[int, ...]) -> tuple[np.ndarray, np.ndarray | None, list[tuple[int, int]]]:
    """``volume`` (1, D, H, W) and ``keep`` (D, H, W) padded (zeros, False) on both sides of each
    axis shorter than ``roi``, and the (before, after) padding per axis."""
    spatial = volume.shape[1:]
    pad = [(max(r - n, 0) // 2, max(r - n, 0) - max(r - n, 0) // 2) for n, r in zip(spatial, roi, strict=True)]
    if any(lo or hi for lo, hi in pad):
        volume = np.pad(volume, [(0, 0), *pad], mode="constant", constant_values=0.0)
        if keep is not None:
            keep = np.pad(np.asarray(keep, bool), pad, mode="constant", constant_values=False)
    return volume, keep, pad


def _weighted_window_sum(model: Any, x: Any, jobs: Sequence[tuple[tuple[int, int, int], tuple[int, ...]]],
                         roi: tuple[int, ...], weight: Any, *, sw_batch_size: int, memory_format: Any) -> Any:
    """The sum of every job's window logits (flipped back), each weighted by ``weight``: a
    ``(C, D, H, W)`` float32 tensor on ``x``'s device, or None when there is no job. A job is a
    window's start (D, H, W) and the spatial axes it is flipped along; ``x`` is the
    ``(1, 1, D, H, W)`` volume; ``sw_batch_size`` windows go through ``model`` per pass."""
    import torch

    out = None
    model.eval()
    with torch.no_grad(), autocast_context(x.device):
        for first in range(0, len(jobs), sw_batch_size):
            batch = jobs[first:first + sw_batch_size]
            crops = []
            for (z, y, w), flip in batch:
                crop = x[0, :, z:z + roi[0], y:y + roi[1], w:w + roi[2]]
                crops.append(torch.flip(crop, tuple(a + 1 for a in flip)) if flip else crop)
            logits = model(torch.stack(crops).contiguous(memory_format=memory_format))
            if isinstance(logits, tuple | list):  # a network that still returns (logits, aux)
                logits = logits[0]
            logits = logits.float()
            if out is None:
                out = torch.zeros((logits.shape[1], *x.shape[2:]), dtype=torch.float32, device=x.device)
            for k, ((z, y, w), flip) in enumerate(batch):
                window = torch.flip(logits[k], tuple(a + 1 for a in flip)) if flip else logits[k]
                out[:, z:z + roi[0], y:y + roi[1], w:w + roi[2]].addcmul_(window, weight)
    return out


def lesion_probability(logits) -> np.ndarray:
    """Softmax probability of the lesion class (channel 1) as ``(D, H, W)`` float32."""
    import torch

    return torch.softmax(logits, dim=1)[0, 1].cpu().numpy().astype(np.float32)


def keep_largest_component(mask: np.ndarray) -> np.ndarray:
    """The largest 26-connected component of a binary mask (uint8); empty stays empty."""
    mask = np.asarray(mask).astype(bool)
    labels, n = ndimage.label(mask, structure=np.ones((3,) * mask.ndim, dtype=bool))
    if n <= 1:
        return mask.astype(np.uint8)
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    return (labels == int(sizes.argmax())).astype(np.uint8)


def probability_to_original(
    probability: np.ndarray,
    preprocessed: sitk.Image,
    original: sitk.Image,
    *,
    threshold: float,
    largest_component: bool,
) -> sitk.Image:
    """Map a lesion probability in preprocessed space onto the original grid; binary uint8 mask.

    Only the part of the original grid that the preprocessed box covers is resampled (linear;
    outside it the probability is 0 anyway), so a 512 x 512 x N CT costs what its bone crop costs.

    Args:
        probability: ``(D, H, W)`` array on ``preprocessed``'s grid.
        preprocessed: the preprocessed image (its header carries the physical geometry).
        original: the raw CT; the result shares its size, spacing, origin and direction.
        threshold: probability at or above which a voxel is lesion.
        largest_component: keep only the largest connected component (after mapping).
    """
    from bonemet.preprocessing.crop import source_box

    prob = sitk.GetImageFromArray(np.asarray(probability, dtype=np.float32))
    prob.CopyInformation(preprocessed)
    # every original voxel the linear interpolator can give a nonzero value (plus one voxel)
    start, size = source_box(original, prob, 1)
    region = sitk.Image(list(size), sitk.sitkUInt8)
    region.SetSpacing(original.GetSpacing())
    region.SetDirection(original.GetDirection())
    region.SetOrigin(original.TransformIndexToPhysicalPoint([int(v) for v in start]))
    on_region = resample_to_reference(prob, region, interpolator=sitk.sitkLinear, default=0.0)
    part = (sitk.GetArrayViewFromImage(on_region) >= threshold).astype(np.uint8)
    if largest_component:
        part = keep_largest_component(part)
    mask = np.zeros(tuple(reversed(original.GetSize())), np.uint8)
    (x0, y0, z0), (nx, ny, nz) = start, size
    mask[z0:z0 + nz, y0:y0 + ny, x0:x0 + nx] = part
    out = sitk.GetImageFromArray(mask)
    out.CopyInformation(original)
    return out


#: Keys of ``inference`` added after models were first registered, with the behaviour those
#: older models had (dense windows of the training size): read into their metadata when absent.
_LEGACY_INFERENCE = {"roi_size": None, "bone_margin_mm": None, "channels_last": False}


@dataclass(frozen=True)
class InferenceSettings:
    """How a trained network segments a CT: the settings it was trained and validated with.

    The segment stage logs them with the registered model (:meth:`to_metadata`), and
    ``bonemet predict`` rebuilds them from there (:meth:`from_metadata`), so a new CT is
    preprocessed and segmented exactly as the training cases were.

    Attributes:
        preprocess: the ``preprocess`` params (spacing in mm, HU window, bone crop).
        roi_size: the training crop (D, H, W) in voxels at the preprocessing spacing.
        inference: overlap, windows per forward pass, test-time mirroring axes, the inference
            window (``roi_size``; None = the training crop) and the bone margin that limits the
            windows (``bone_margin_mm``; None = every window of the crop).
        threshold: lesion probability at or above which a voxel is lesion (original grid).
        largest_component: keep only the largest connected component of the mask.
    """

    preprocess: PlannedPreprocessSpec
    roi_size: tuple[int, int, int]
    inference: InferenceSpec
    threshold: float
    largest_component: bool

    def __post_init__(self) -> None:
        if self.inference.bone_margin_mm is not None:
            lo, hi = self.preprocess.hu_window
            if not lo < self.preprocess.crop.bone_threshold_hu < hi:
                raise ValueError(
                    f"inference.bone_margin_mm needs preprocess.crop.bone_threshold_hu "
                    f"({self.preprocess.crop.bone_threshold_hu} HU) inside preprocess.hu_window {[lo, hi]}: "
                    "the bone is found on the normalised crop")

    @classmethod
    def from_params(cls, preprocess: PreprocessSpec, segment: SegmentSpec) -> InferenceSettings:
        """The settings of ``preprocess`` and ``segment`` (PlanRequiredError while one is still ``auto``)."""
        from bonemet.config import planned_spec

        segment = planned_spec(segment, "InferenceSettings")
        return cls(planned_spec(preprocess, "InferenceSettings"), tuple(segment.roi_size), segment.inference,
                   segment.threshold, segment.largest_component)

    @property
    def window(self) -> tuple[int, int, int]:
        """The sliding window (D, H, W voxels): ``inference.roi_size``, else the training crop."""
        return tuple(self.inference.roi_size) if self.inference.roi_size is not None else self.roi_size

    def without_mirroring(self) -> InferenceSettings:
        """The same settings with test-time mirroring off (``bonemet predict --disable-tta``)."""
        return replace(self, inference=self.inference.updated({"mirror_axes": []}))

    def bone_in_crop(self, normalised: np.ndarray) -> np.ndarray | None:
        """Bone voxels of a preprocessed (normalised) crop, ``(D, H, W)`` bool, when windows are
        limited to the bone (``inference.bone_margin_mm``); else None. Bone is above
        ``preprocess.crop.bone_threshold_hu`` HU, as the crop finds it."""
        if self.inference.bone_margin_mm is None:
            return None
        lo, hi = self.preprocess.hu_window
        return np.asarray(normalised) > (self.preprocess.crop.bone_threshold_hu - lo) / (hi - lo)

    def margin_vox(self) -> tuple[int, int, int]:
        """``inference.bone_margin_mm`` in voxels of the preprocessing grid, (D, H, W); zeros when off."""
        margin = self.inference.bone_margin_mm or 0.0
        spacing_zyx = tuple(reversed(self.preprocess.target_spacing_mm))
        return tuple(int(math.ceil(margin / s - 1e-9)) for s in spacing_zyx)

    def to_metadata(self) -> dict[str, Any]:
        """JSON-serialisable form, for the model's metadata."""
        return {"preprocess": self.preprocess.model_dump(mode="json"), "roi_size": list(self.roi_size),
                "inference": self.inference.model_dump(mode="json"), "threshold": float(self.threshold),
                "largest_component": bool(self.largest_component)}

    @classmethod
    def from_metadata(cls, metadata: Mapping[str, Any], where: str) -> InferenceSettings:
        """Rebuild from :meth:`to_metadata`'s form; :class:`CaseInferenceError` naming ``where``
        (e.g. the registered model) when a key is missing or invalid."""
        from bonemet.config import InferenceSpec, ParamsError, PlannedPreprocessSpec, validate_spec

        missing = [k for k in ("preprocess", "roi_size", "inference", "threshold", "largest_component")
                   if k not in metadata]
        if missing:
            raise CaseInferenceError(
                f"{where}: its metadata lacks {', '.join(missing)} (a model logged by an older bonemet: "
                "run `bonemet segment` again to register one that carries its inference settings)")
        try:
            inference = metadata["inference"]
            if isinstance(inference, Mapping):
                inference = {**_LEGACY_INFERENCE, **inference}
            return cls(validate_spec(PlannedPreprocessSpec, metadata["preprocess"], "preprocess"),
                       tuple(int(v) for v in metadata["roi_size"]),
                       validate_spec(InferenceSpec, inference, "inference"),
                       float(metadata["threshold"]), bool(metadata["largest_component"]))
        except (ParamsError, TypeError, ValueError) as exc:
            raise CaseInferenceError(f"{where}: its inference settings are invalid: {exc}") from exc


def crop_logits(model: Any, normalised: np.ndarray, settings: InferenceSettings, *, device: Any):
    """Sliding-window logits ``(1, C, D, H, W)`` over a preprocessed crop ``(D, H, W)`` with ``settings``:
    the inference window, overlap, batch, mirroring, and the windows limited to the bone when asked."""
    inference = settings.inference
    return sliding_window_logits(
        model, np.asarray(normalised)[None], settings.window, overlap=inference.overlap,
        sw_batch_size=inference.sw_batch_size, device=device, mirror_axes=inference.mirror_axes,
        channels_last=inference.channels_last, keep=settings.bone_in_crop(normalised),
        keep_margin_vox=settings.margin_vox(),
    )


def predict_case(model: Any, case: Any, settings: InferenceSettings, *, device: Any) -> sitk.Image:
    """Out-of-fold automatic mask of one :class:`~bonemet.segmentation.data.SegCase` (already
    preprocessed) on its original grid, uint8 0/1.

    A failure keeps its type (a user's unreadable file is an ``ImageReadError``) and gets a note
    naming the case.
    """
    try:
        preprocessed = read_image(case.image, case_id=case.case_id, pixel_type=sitk.sitkFloat32)
        original_path = case.original_image if case.original_image is not None else case.image
        original = read_image(original_path, case_id=case.case_id)
        logits = crop_logits(model, sitk.GetArrayFromImage(preprocessed), settings, device=device)
        probability = lesion_probability(logits)
        return probability_to_original(probability, preprocessed, original, threshold=settings.threshold,
                                       largest_component=settings.largest_component)
    except Exception as exc:
        exc.add_note(f"while segmenting case '{case.case_id}' ({case.image})")
        raise


def segment_ct(
    model: Any, image_hu: sitk.Image, settings: InferenceSettings, *, device: Any, case_id: str | None,
    seconds: dict[str, float] | None = None,
) -> sitk.Image:
    """Segment a new CT (HU, any grid) end to end: preprocess, sliding-window inference, map back.

    Args:
        model: a trained network (e.g. ``models:/bonemet-segmenter@staging`` loaded with the pytorch flavour).
        image_hu: the CT in Hounsfield units, any grid.
        settings: the model's :class:`InferenceSettings`.
        device: torch device.
        case_id: names the case in errors and notes.
        seconds: when given, receives the seconds of each step (``preprocess``, ``windows``, ``map_back``).

    Returns:
        uint8 0/1 lesion mask on ``image_hu``'s grid.
    """
    import time

    from bonemet.preprocessing import preprocess_image

    timing = seconds if seconds is not None else {}
    try:
        start = time.perf_counter()
        pre = sitk.Cast(preprocess_image(image_hu, settings.preprocess, case_id=case_id).image, sitk.sitkFloat32)
        timing["preprocess"] = time.perf_counter() - start
        start = time.perf_counter()
        logits = crop_logits(model, sitk.GetArrayFromImage(pre), settings, device=device)
        probability = lesion_probability(logits)
        timing["windows"] = time.perf_counter() - start
        start = time.perf_counter()
        mask = probability_to_original(probability, pre, image_hu, threshold=settings.threshold,
                                       largest_component=settings.largest_component)
        timing["map_back"] = time.perf_counter() - start
        return mask
    except Exception as exc:
        exc.add_note(f"while segmenting case '{case_id or '?'}'")
        raise
