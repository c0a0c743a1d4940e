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
from collections.abc import Sequence
from contextlib import nullcontext
from typing import Any

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from bonemet.data.io import read_image, resample_to_reference

log = logging.getLogger(__name__)


class CaseInferenceError(ValueError):
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
    overlap: float = 0.25,
    sw_batch_size: int = 4,
    device: Any = "cpu",
    mode: str = "gaussian",
    mirror_axes: Sequence[int] | None = None,
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
    threshold: float = 0.5,
    largest_component: bool = True,
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


def predict_case(
    model: Any,
    case: Any,
    roi_size: Sequence[int],
    overlap: float = 0.25,
    sw_batch_size: int = 4,
    device: Any = "cpu",
    threshold: float = 0.5,
    largest_component: bool = True,
    mirror_axes: Sequence[int] | None = None,
) -> sitk.Image:
    """Out-of-fold automatic mask of one :class:`~bonemet.segmentation.data.SegCase` on its original grid.

    Raises:
        CaseInferenceError: naming the case, for any failure (unreadable image, network error...).
    """
    try:
        preprocessed = read_image(case.image, case_id=case.case_id, pixel_type=sitk.sitkFloat32)
        original_path = case.original_image if case.original_image is not None else case.image
        original = read_image(original_path, case_id=case.case_id)
        image = sitk.GetArrayFromImage(preprocessed)[None]
        logits = sliding_window_logits(model, image, roi_size, overlap, sw_batch_size, device,
                                       mirror_axes=mirror_axes)
        probability = lesion_probability(logits)
        return probability_to_original(probability, preprocessed, original, threshold, largest_component)
    except CaseInferenceError:
        raise
    except Exception as exc:  # noqa: BLE001 - any failure must name the case
        raise CaseInferenceError(f"case '{case.case_id}': inference failed on {case.image}: {exc}") from exc


def segment_ct(
    model: Any,
    image_hu: sitk.Image,
    preprocess: dict[str, Any],
    roi_size: Sequence[int],
    overlap: float = 0.25,
    sw_batch_size: int = 4,
    device: Any = "cpu",
    threshold: float = 0.5,
    largest_component: bool = True,
    case_id: str | None = None,
    mirror_axes: Sequence[int] | None = None,
) -> sitk.Image:
    """Segment a new CT (HU) end to end: preprocess, sliding-window inference, map back.

    Args:
        model: a trained network (e.g. ``models:/bonemet-missu@staging`` loaded with the pytorch flavour).
        image_hu: the CT in Hounsfield units, any grid.
        preprocess: keyword arguments of :func:`bonemet.preprocessing.preprocess_image` (the
            values the model was trained with; the registered model keeps them in its metadata).
        roi_size, overlap, sw_batch_size, threshold, largest_component, mirror_axes: as in
            :func:`predict_case` (``mirror_axes``: test-time mirroring, see :func:`sliding_window_logits`).

    Returns:
        uint8 0/1 lesion mask on ``image_hu``'s grid.
    """
    from bonemet.preprocessing import preprocess_image

    try:
        pre = preprocess_image(image_hu, case_id=case_id, **preprocess).image
        pre = sitk.Cast(pre, sitk.sitkFloat32)
        logits = sliding_window_logits(model, sitk.GetArrayFromImage(pre)[None], roi_size, overlap, sw_batch_size,
                                       device, mirror_axes=mirror_axes)
        return probability_to_original(lesion_probability(logits), pre, image_hu, threshold, largest_component)
    except Exception as exc:  # noqa: BLE001 - name the case whatever failed
        raise CaseInferenceError(f"case '{case_id or '?'}': segmentation of the CT failed: {exc}") from exc
