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
from collections.abc import Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from bonemet.data.io import read_image, resample_to_reference
from bonemet.errors import UserError

if TYPE_CHECKING:  # pragma: no cover
    from bonemet.config import InferenceSpec, PreprocessSpec, SegmentSpec

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


def sliding_window_logits(
    model: Any,
    image: np.ndarray,
    roi_size: Sequence[int],
    *,
    overlap: float,
    sw_batch_size: int,
    device: Any,
    mirror_axes: Sequence[int],
    mode: str = "gaussian",
):
    """Logits ``(1, C, D, H, W)`` (float32 torch tensor on ``device``) for a ``(1, D, H, W)`` image.

    A volume smaller than ``roi_size`` along any axis is padded (MONAI pads and crops back), so
    the output always has the input's spatial shape. ``mirror_axes`` (spatial axes, 0 = D)
    turns on test-time mirroring: the logits are averaged over every combination of flips of
    those axes (``2**len(mirror_axes)`` passes), each flipped back before averaging.
    """
    import torch
    from monai.inferers import sliding_window_inference

    flips = mirror_flips(mirror_axes)
    x = torch.as_tensor(np.asarray(image, dtype=np.float32))[None].to(device)
    model.eval()
    total = None
    with torch.no_grad(), autocast_context(torch.device(device)):
        for flip in flips:
            dims = tuple(a + 2 for a in flip)
            xi = torch.flip(x, dims) if dims else x
            logits = sliding_window_inference(
                xi, roi_size=tuple(int(r) for r in roi_size), sw_batch_size=sw_batch_size,
                predictor=model, overlap=overlap, mode=mode, padding_mode="constant", cval=0.0,
            )
            if isinstance(logits, tuple | list):  # a network that still returns (logits, aux)
                logits = logits[0]
            logits = logits.float()
            logits = torch.flip(logits, dims) if dims else logits
            total = logits if total is None else total + logits
    return total / len(flips)


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

    Args:
        probability: ``(D, H, W)`` array on ``preprocessed``'s grid.
        preprocessed: the preprocessed image (its header carries the physical geometry).
        original: the raw CT; the result shares its size, spacing, origin and direction.
        threshold: probability at or above which a voxel is lesion.
        largest_component: keep only the largest connected component (after mapping).
    """
    prob = sitk.GetImageFromArray(np.asarray(probability, dtype=np.float32))
    prob.CopyInformation(preprocessed)
    on_original = resample_to_reference(prob, original, interpolator=sitk.sitkLinear, default=0.0)
    mask = (sitk.GetArrayViewFromImage(on_original) >= threshold).astype(np.uint8)
    if largest_component:
        mask = keep_largest_component(mask)
    out = sitk.GetImageFromArray(mask)
    out.CopyInformation(original)
    return out


@dataclass(frozen=True)
class InferenceSettings:
    """How a trained network segments a CT: the settings it was trained and validated with.

    The segment stage logs them with the registered model (:meth:`to_metadata`), and
    ``bonemet predict`` rebuilds them from there (:meth:`from_metadata`), so a new CT is
    preprocessed and segmented exactly as the training cases were.

    Attributes:
        preprocess: the ``preprocess`` params (spacing in mm, HU window, bone crop).
        roi_size: sliding-window size (D, H, W) in voxels at the preprocessing spacing.
        inference: overlap, windows per forward pass and test-time mirroring axes.
        threshold: lesion probability at or above which a voxel is lesion (original grid).
        largest_component: keep only the largest connected component of the mask.
    """

    preprocess: PreprocessSpec
    roi_size: tuple[int, int, int]
    inference: InferenceSpec
    threshold: float
    largest_component: bool

    @classmethod
    def from_params(cls, preprocess: PreprocessSpec, segment: SegmentSpec) -> InferenceSettings:
        return cls(preprocess, tuple(segment.roi_size), segment.inference, segment.threshold,
                   segment.largest_component)

    def to_metadata(self) -> dict[str, Any]:
        """JSON-serialisable form, for the model's metadata."""
        return {"preprocess": self.preprocess.model_dump(mode="json"), "roi_size": list(self.roi_size),
                "inference": self.inference.model_dump(mode="json"), "threshold": float(self.threshold),
                "largest_component": bool(self.largest_component)}

    @classmethod
    def from_metadata(cls, metadata: Mapping[str, Any], where: str) -> InferenceSettings:
        """Rebuild from :meth:`to_metadata`'s form; :class:`CaseInferenceError` naming ``where``
        (e.g. the registered model) when a key is missing or invalid."""
        from bonemet.config import InferenceSpec, ParamsError, PreprocessSpec, validate_spec

        missing = [k for k in ("preprocess", "roi_size", "inference", "threshold", "largest_component")
                   if k not in metadata]
        if missing:
            raise CaseInferenceError(
                f"{where}: its metadata lacks {', '.join(missing)} (a model logged by an older bonemet: "
                "run `bonemet segment` again to register one that carries its inference settings)")
        try:
            return cls(validate_spec(PreprocessSpec, metadata["preprocess"], "preprocess"),
                       tuple(int(v) for v in metadata["roi_size"]),
                       validate_spec(InferenceSpec, metadata["inference"], "inference"),
                       float(metadata["threshold"]), bool(metadata["largest_component"]))
        except (ParamsError, TypeError, ValueError) as exc:
            raise CaseInferenceError(f"{where}: its inference settings are invalid: {exc}") from exc


def _windows(settings: InferenceSettings) -> dict[str, Any]:
    inference = settings.inference
    return {"overlap": inference.overlap, "sw_batch_size": inference.sw_batch_size,
            "mirror_axes": inference.mirror_axes}


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
        image = sitk.GetArrayFromImage(preprocessed)[None]
        logits = sliding_window_logits(model, image, settings.roi_size, device=device, **_windows(settings))
        probability = lesion_probability(logits)
        return probability_to_original(probability, preprocessed, original, threshold=settings.threshold,
                                       largest_component=settings.largest_component)
    except Exception as exc:
        exc.add_note(f"while segmenting case '{case.case_id}' ({case.image})")
        raise


def segment_ct(
    model: Any, image_hu: sitk.Image, settings: InferenceSettings, *, device: Any, case_id: str | None
) -> sitk.Image:
    """Segment a new CT (HU, any grid) end to end: preprocess, sliding-window inference, map back.

    Args:
        model: a trained network (e.g. ``models:/bonemet-missu@staging`` loaded with the pytorch flavour).
        image_hu: the CT in Hounsfield units, any grid.
        settings: the model's :class:`InferenceSettings`.
        device: torch device.
        case_id: names the case in errors and notes.

    Returns:
        uint8 0/1 lesion mask on ``image_hu``'s grid.
    """
    from bonemet.preprocessing import preprocess_image

    try:
        pre = sitk.Cast(preprocess_image(image_hu, settings.preprocess, case_id=case_id).image, sitk.sitkFloat32)
        logits = sliding_window_logits(model, sitk.GetArrayFromImage(pre)[None], settings.roi_size, device=device,
                                       **_windows(settings))
        return probability_to_original(lesion_probability(logits), pre, image_hu, threshold=settings.threshold,
                                       largest_component=settings.largest_component)
    except Exception as exc:
        exc.add_note(f"while segmenting case '{case_id or '?'}'")
        raise
